//! The primary daemon: checks the mountpoint, opens the datastore, mounts
//! the passthrough filesystem, and runs the control socket, the cut timer
//! and the signal handler beside it until the mount goes away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, SessionACL};

use crate::control;
use crate::datastore::{Access, Datastore};
use crate::error::{Error, IoContext, Result};
use crate::fs::Passthrough;
use crate::ids::BlockSize;
use crate::sys;

/// What `hbrfs mount` was asked to do.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// The backing directory.
    pub backing: PathBuf,
    /// Where to mount it.
    pub mountpoint: PathBuf,
    /// `--block-size` (only used when the datastore is created).
    pub block_size: Option<BlockSize>,
    /// FUSE worker threads.
    pub threads: usize,
    /// Close an epoch this often.
    pub cut_every: Option<Duration>,
    /// False only for benchmarks: a plain passthrough.
    pub tracking: bool,
}

/// One mount of `/proc/self/mountinfo`.
#[derive(Clone, Debug)]
pub struct MountEntry {
    /// Where it is mounted.
    pub point: PathBuf,
    /// Filesystem type (`fuse` for ours: the kernel drops the subtype on a direct mount).
    pub fstype: String,
    /// Source (for ours: the backing directory).
    pub source: String,
}

/// The current mounts: how a mountpoint is told busy, and how the CLI finds
/// the backing directory behind an hbrfs mountpoint.
pub fn mounts() -> Vec<MountEntry> {
    let unescape = |s: &str| s.replace("\\040", " ");
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(MountEntry {
                point: PathBuf::from(unescape(fields.get(4)?)),
                fstype: fields.get(sep + 1)?.to_string(),
                source: unescape(fields.get(sep + 2)?),
            })
        })
        .collect()
}

/// Refuses mountpoints that are missing, stale or busy, with what to do.
fn check_mountpoint(mountpoint: &Path, backing: &Path) -> Result<PathBuf> {
    match std::fs::metadata(mountpoint) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => {
            return Err(Error::Usage(format!(
                "{0}: stale FUSE mount left by a daemon that died (transport endpoint is not connected). \
                 Clear it with `umount -l {0}` (or `fusermount3 -u {0}`) and mount again.",
                mountpoint.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "mountpoint {} does not exist",
                mountpoint.display()
            )));
        }
        Err(e) => return Err(e).at(mountpoint),
        Ok(m) if !m.is_dir() => {
            return Err(Error::Usage(format!(
                "mountpoint {} is not a directory",
                mountpoint.display()
            )));
        }
        Ok(_) => {}
    }
    let canon = mountpoint.canonicalize().at(mountpoint)?;
    if let Some(m) = mounts().into_iter().find(|m| m.point == canon) {
        return Err(Error::Usage(format!(
            "mountpoint {} is busy: {} ({}) is already mounted there; unmount it first",
            canon.display(),
            m.source,
            m.fstype
        )));
    }
    if canon.starts_with(backing) {
        return Err(Error::Usage(format!(
            "mountpoint {} lies inside the backing directory {}",
            canon.display(),
            backing.display()
        )));
    }
    Ok(canon)
}

/// Runs `hbrfs mount` in the foreground until unmounted or signalled.
pub fn run_mount(opts: &MountOptions) -> Result<()> {
    let backing = match std::fs::metadata(&opts.backing) {
        Ok(m) if m.is_dir() => opts.backing.canonicalize().at(&opts.backing)?,
        Ok(_) => {
            return Err(Error::Usage(format!(
                "backing {} is not a directory",
                opts.backing.display()
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::Usage(format!(
                "backing directory {} does not exist",
                opts.backing.display()
            )));
        }
        Err(e) => return Err(e).at(&opts.backing),
    };
    let mountpoint = check_mountpoint(&opts.mountpoint, &backing)?;
    sys::set_umask(0);
    sys::block_shutdown_signals().at("signal mask")?;

    let ds = Arc::new(Datastore::open(
        &backing,
        Access::Daemon {
            block_size: opts.block_size,
        },
    )?);
    let scan = ds.start()?;
    log::info!(
        "datastore {} (block size {}): {} files tracked, {} without state, {} moved, {} gone",
        backing.display(),
        ds.format.block_size,
        scan.tracked,
        scan.untracked,
        scan.moved,
        scan.gone
    );
    let fs = Passthrough::new(ds.clone(), opts.tracking).at(&backing)?;
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(backing.display().to_string()),
        MountOption::Subtype("hbrfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session = fuser::Session::new(fs, &mountpoint, &config).map_err(|e| {
        Error::Usage(format!(
            "mounting {} on {}: {e}",
            backing.display(),
            mountpoint.display()
        ))
    })?;
    let mut session = session;
    let mut unmounter = session.unmount_callable();
    control::serve(ds.clone())?;
    if let Some(every) = opts.cut_every {
        let ds = ds.clone();
        std::thread::Builder::new()
            .name("hbrfs-cut".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(every);
                    if let Err(e) = ds.tracker.cut() {
                        log::error!("cutting an epoch: {e}");
                    }
                }
            })
            .at("cut thread")?;
    }
    let signal_mountpoint = mountpoint.clone();
    std::thread::Builder::new()
        .name("hbrfs-signals".into())
        .spawn(move || {
            if let Ok(sig) = sys::wait_signal() {
                log::info!("signal {sig}: unmounting {}", signal_mountpoint.display());
                if let Err(e) = unmounter.unmount() {
                    log::warn!(
                        "unmount: {e}; detaching lazily (it goes once the last file closes)"
                    );
                    if let Err(e) = sys::umount_detach(&signal_mountpoint) {
                        log::error!("lazy unmount of {}: {e}", signal_mountpoint.display());
                    }
                }
            }
        })
        .at("signal thread")?;
    eprintln!(
        "hbrfs: {} mounted at {}",
        backing.display(),
        mountpoint.display()
    );
    let result = session.run();
    let _ = std::fs::remove_file(ds.paths.socket());
    ds.shutdown()?;
    result.map_err(|e| {
        Error::Usage(format!(
            "FUSE session on {} ended with an error: {e}",
            mountpoint.display()
        ))
    })?;
    eprintln!("hbrfs: {} unmounted cleanly", mountpoint.display());
    Ok(())
}
