//! The long-running commands: the primary (`mount`: datastore, FUSE mount,
//! control socket, cut timer or replicator), the secondary (`serve`, with
//! an optional mirrored mount), the mirror alone (`mount-replica`), and
//! both sides at once on loopback (`up`). Each runs in the foreground until
//! its mounts go away or it is signalled, then stops cleanly.
//!
//! # Layout
//!
//! - this file: what they share: the mount table, mountpoint checks, mounting and unmounting, signals, the runtime.
//! - `primary`: `hbrfs mount`.
//! - `secondary`: `hbrfs serve` and `hbrfs mount-replica`.
//! - `up`: `hbrfs up`.
//! - `recovery`: `hbrfs mount-point` and `hbrfs test-failover`.
//! - `metrics`: the `--metrics` endpoint of `mount` and `serve`.

mod metrics;
mod primary;
mod recovery;
mod secondary;
mod up;

use std::path::{Path, PathBuf};

use fuser::{Config, Filesystem, MountOption, Session, SessionACL, SessionUnmounter};

use crate::error::{Error, IoContext, Result};
use crate::sys;

pub use primary::{MountOptions, run_mount};
pub use recovery::{
    run_mount_object_point, run_mount_point, run_test_failover, run_test_failover_object,
};
pub use secondary::{ServeOptions, default_key_path, run_mount_replica, run_serve};
pub use up::run_up;

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

fn existing_dir(path: &Path, what: &str) -> Result<PathBuf> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => path.canonicalize().at(path),
        Ok(_) => Err(Error::Usage(format!(
            "{what} {} is not a directory",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(Error::Usage(format!(
            "{what} {} does not exist",
            path.display()
        ))),
        Err(e) => Err(e).at(path),
    }
}

/// Which mount [`mount`] makes.
#[derive(Clone, Copy, Debug)]
enum MountKind {
    /// The primary's read-write passthrough: open to every user (the
    /// backing folder's modes decide), devices and setuid honoured.
    Primary,
    /// A replica's read-only mirror: `nodev,nosuid`, and only for the
    /// daemon's user unless `allow_other` (`serve --mirror-allow-other`).
    Mirror { allow_other: bool },
    /// A test-failover sandbox: writable, `nodev,nosuid`, the daemon's
    /// user only.
    Sandbox,
}

/// Mounts `fs` at `mountpoint`, showing `source` as the mount's source.
fn mount<F: Filesystem>(
    fs: F,
    source: &Path,
    mountpoint: &Path,
    kind: MountKind,
    threads: usize,
) -> Result<Session<F>> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(source.display().to_string()),
        MountOption::Subtype("hbrfs".into()),
        MountOption::DefaultPermissions,
    ];
    config.acl = match kind {
        MountKind::Primary => {
            config
                .mount_options
                .extend([MountOption::Dev, MountOption::Suid]);
            SessionACL::All
        }
        MountKind::Mirror { allow_other } => {
            config
                .mount_options
                .extend([MountOption::RO, MountOption::NoDev, MountOption::NoSuid]);
            if allow_other {
                SessionACL::All
            } else {
                SessionACL::Owner
            }
        }
        MountKind::Sandbox => {
            config
                .mount_options
                .extend([MountOption::NoDev, MountOption::NoSuid]);
            SessionACL::Owner
        }
    };
    config.n_threads = Some(threads.max(1));
    config.clone_fd = true;
    Session::new(fs, mountpoint, &config).map_err(|e| {
        Error::Usage(format!(
            "mounting {} on {}: {e}",
            source.display(),
            mountpoint.display()
        ))
    })
}

/// Mounts `fs` at `mountpoint` (checked by the caller; signals blocked)
/// and serves it in the foreground until it is unmounted or the process
/// is signalled; `shown` is the line that says it is up.
fn run_alone<F: Filesystem>(
    fs: F,
    source: &Path,
    mountpoint: &Path,
    kind: MountKind,
    shown: &str,
) -> Result<()> {
    let mut session = mount(fs, source, mountpoint, kind, 4)?;
    let mut unmounter = session.unmount_callable();
    let at = mountpoint.to_path_buf();
    on_signal(move || unmount(&mut unmounter, &at))?;
    eprintln!("hbrfs: {shown}");
    session.run().map_err(|e| {
        Error::Usage(format!(
            "FUSE session on {} ended with an error: {e}",
            mountpoint.display()
        ))
    })
}

/// Unmounts `mountpoint` through `unmounter`, lazily if it is busy.
fn unmount(unmounter: &mut SessionUnmounter, mountpoint: &Path) {
    log::info!("unmounting {}", mountpoint.display());
    if let Err(e) = unmounter.unmount() {
        log::warn!(
            "unmount {}: {e}; detaching lazily (it goes once the last file closes)",
            mountpoint.display()
        );
        if let Err(e) = sys::umount_detach(mountpoint) {
            log::error!("lazy unmount of {}: {e}", mountpoint.display());
        }
    }
}

/// Runs `on_signal` on a thread once SIGINT, SIGTERM or SIGHUP arrives.
/// The signals must have been blocked before any thread was started.
fn on_signal(on_signal: impl FnOnce() + Send + 'static) -> Result<()> {
    std::thread::Builder::new()
        .name("hbrfs-signals".into())
        .spawn(move || {
            if let Ok(sig) = sys::wait_signal() {
                log::info!("signal {sig}: stopping");
                on_signal();
            }
        })
        .at("signal thread")?;
    Ok(())
}

/// Raises the open-file limit to the hard limit before any work: an apply
/// or a datastore with many files must not meet the shell's 1024. A
/// failure is logged; the daemon runs with the limit it has.
fn raise_fd_limit() {
    match crate::sys::raise_nofile_limit() {
        Ok(n) => log::info!("open-file limit (RLIMIT_NOFILE): {n}"),
        Err(e) => log::warn!("could not raise the open-file limit: {e}"),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hbrfs-rt")
        .enable_all()
        .build()
        .at("tokio runtime")
}
