//! The long-running commands: the primary (`mount`: datastore, FUSE mount,
//! control socket, cut timer or replicator), the secondary (`serve`, with
//! an optional mirrored mount), the mirror alone (`mount-replica`), and
//! both sides at once on loopback (`up`). Each runs in the foreground until
//! its mounts go away or it is signalled, then stops cleanly.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fuser::{Config, MountOption, Session, SessionACL, SessionUnmounter};
use tokio::sync::watch;

use crate::auth::AuthKey;
use crate::control;
use crate::datastore::{Access, Datastore};
use crate::error::{Error, IoContext, Result};
use crate::fs::Passthrough;
use crate::ids::BlockSize;
use crate::replica::ReplicaStore;
use crate::replicate::{ReplicateOptions, Replicator};
use crate::state::{ReplicaPaths, write_durably};
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
    /// Ship points to a secondary.
    pub replicate: Option<ReplicateOptions>,
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

/// Mounts `fs` at `mountpoint`, showing `source` as the mount's source.
fn mount(
    fs: Passthrough,
    source: &Path,
    mountpoint: &Path,
    read_only: bool,
    threads: usize,
) -> Result<Session<Passthrough>> {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(source.display().to_string()),
        MountOption::Subtype("hbrfs".into()),
        MountOption::DefaultPermissions,
        MountOption::Dev,
        MountOption::Suid,
    ];
    if read_only {
        config.mount_options.push(MountOption::RO);
    }
    config.acl = SessionACL::All;
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

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hbrfs-rt")
        .enable_all()
        .build()
        .at("tokio runtime")
}

/// The primary, started: what `mount` and `up` wait on and stop.
struct Primary {
    ds: Arc<Datastore>,
    session: Session<Passthrough>,
    mountpoint: PathBuf,
    /// Stops the replicator (and the runtime it runs on).
    replication: Option<(
        tokio::runtime::Runtime,
        watch::Sender<bool>,
        tokio::task::JoinHandle<()>,
    )>,
}

fn start_primary(opts: &MountOptions) -> Result<Primary> {
    let backing = existing_dir(&opts.backing, "backing directory")?;
    let mountpoint = check_mountpoint(&opts.mountpoint, &backing)?;
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
    let fs = Passthrough::new(&backing, opts.tracking.then(|| ds.clone())).at(&backing)?;
    let session = mount(fs, &backing, &mountpoint, false, opts.threads)?;
    let mut replication = None;
    let mut stats = None;
    if let Some(r) = &opts.replicate {
        let replicator = Arc::new(Replicator::new(ds.clone(), r.clone())?);
        let rt = runtime()?;
        stats = Some(control::Replication {
            replicator: replicator.clone(),
            runtime: rt.handle().clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let task = rt.spawn(replicator.run(stopped));
        log::info!("replicating to {} every {:?}", r.addr, r.rpo);
        replication = Some((rt, stop, task));
    } else if let Some(every) = opts.cut_every {
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
    control::serve(control::Context {
        ds: ds.clone(),
        replication: stats,
    })?;
    eprintln!(
        "hbrfs: {} mounted at {}",
        backing.display(),
        mountpoint.display()
    );
    Ok(Primary {
        ds,
        session,
        mountpoint,
        replication,
    })
}

impl Primary {
    /// Serves the mount until it goes away, then stops cleanly.
    fn run(self) -> Result<()> {
        let Primary {
            ds,
            session,
            mountpoint,
            replication,
        } = self;
        let result = session.run();
        if let Some((rt, stop, task)) = replication {
            let _ = stop.send(true);
            let _ =
                rt.block_on(async { tokio::time::timeout(Duration::from_secs(30), task).await });
        }
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
}

/// Runs `hbrfs mount` in the foreground until unmounted or signalled.
pub fn run_mount(opts: &MountOptions) -> Result<()> {
    sys::set_umask(0);
    sys::block_shutdown_signals().at("signal mask")?;
    let mut primary = start_primary(opts)?;
    let mut unmounter = primary.session.unmount_callable();
    let mountpoint = primary.mountpoint.clone();
    on_signal(move || unmount(&mut unmounter, &mountpoint))?;
    primary.run()
}

/// What `hbrfs serve` was asked to do.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The replica folder.
    pub replica: PathBuf,
    /// Address to listen on.
    pub listen: std::net::SocketAddr,
    /// Also mount the mirrored read-only view here.
    pub mount: Option<PathBuf>,
    /// The pre-shared key file; default `REPLICA/.hbrfs/auth.key`, made
    /// on first start.
    pub auth_key: Option<PathBuf>,
}

/// Where a secondary keeps its key unless told otherwise.
pub fn default_key_path(replica: &Path) -> PathBuf {
    ReplicaPaths::of(replica).auth_key()
}

/// The secondary, started.
struct Secondary {
    rt: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    mirror_thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mirror_unmount: Option<(SessionUnmounter, PathBuf)>,
}

fn start_secondary(opts: &ServeOptions) -> Result<Secondary> {
    let store = Arc::new(ReplicaStore::open(&opts.replica)?);
    let epoch = store.applied().epoch;
    let rt = runtime()?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(opts.listen))
        .map_err(|e| Error::Usage(format!("listening on {}: {e}", opts.listen)))?;
    let addr = listener.local_addr().at("listener")?;
    write_durably(&store.paths.listen(), addr.to_string().as_bytes())?;
    let (stop, mut stopped) = watch::channel(false);
    let key_path = opts
        .auth_key
        .clone()
        .unwrap_or_else(|| default_key_path(&store.root));
    let key = AuthKey::load_or_create(&key_path)?;
    eprintln!(
        "hbrfs: primaries must authenticate with the key in {} (copy it to the primary: --auth-key FILE); \
         the channel is TLS with certificates from the pair's authority, derived from that key",
        key_path.display()
    );
    let tls = crate::tls::server_config(&key)?;
    let server = rt.spawn(crate::replica::serve_on(
        store.clone(),
        key,
        tls,
        listener,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    let (mirror_thread, mirror_unmount) = match &opts.mount {
        Some(mnt) => {
            let mountpoint = check_mountpoint(mnt, &store.root)?;
            let fs = Passthrough::mirror(&store.root, store.view.clone()).at(&store.root)?;
            let mut session = mount(fs, &store.root, &mountpoint, true, 4)?;
            let unmounter = session.unmount_callable();
            let thread = std::thread::Builder::new()
                .name("hbrfs-mirror".into())
                .spawn(move || session.run())
                .at("mirror thread")?;
            eprintln!(
                "hbrfs: replica {} mirrored read-only at {}",
                store.root.display(),
                mountpoint.display()
            );
            (Some(thread), Some((unmounter, mountpoint)))
        }
        None => (None, None),
    };
    eprintln!(
        "hbrfs: secondary for {} listening on {addr} (at epoch {epoch})",
        store.root.display()
    );
    Ok(Secondary {
        rt,
        stop,
        server,
        mirror_thread,
        mirror_unmount,
    })
}

impl Secondary {
    /// A handle that stops the secondary from another thread.
    fn stopper(&mut self) -> impl FnOnce() + Send + 'static {
        let stop = self.stop.clone();
        let mirror = self.mirror_unmount.take();
        move || {
            if let Some((mut u, p)) = mirror {
                unmount(&mut u, &p);
            }
            let _ = stop.send(true);
        }
    }

    /// Serves until stopped.
    fn run(self) -> Result<()> {
        let served = self.rt.block_on(self.server);
        if let Some(thread) = self.mirror_thread {
            let _ = thread.join();
        }
        match served {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Remote(format!("server: {e}"))),
            Err(e) => Err(Error::Remote(format!("server task: {e}"))),
        }
    }
}

/// Runs `hbrfs serve` in the foreground until signalled.
pub fn run_serve(opts: &ServeOptions) -> Result<()> {
    sys::set_umask(0);
    sys::block_shutdown_signals().at("signal mask")?;
    let mut secondary = start_secondary(opts)?;
    on_signal(secondary.stopper())?;
    secondary.run()
}

/// Runs `hbrfs mount-replica`: the read-only view of a replica folder that
/// no secondary is serving (after failover, or for inspection).
pub fn run_mount_replica(replica: &Path, mountpoint: &Path) -> Result<()> {
    sys::block_shutdown_signals().at("signal mask")?;
    let root = existing_dir(replica, "replica folder")?;
    let mountpoint = check_mountpoint(mountpoint, &root)?;
    let fs = Passthrough::mirror(&root, Arc::new(std::sync::RwLock::new(()))).at(&root)?;
    let mut session = mount(fs, &root, &mountpoint, true, 4)?;
    let mut unmounter = session.unmount_callable();
    let shown = mountpoint.clone();
    on_signal(move || unmount(&mut unmounter, &shown))?;
    eprintln!(
        "hbrfs: replica {} mounted read-only at {}",
        root.display(),
        mountpoint.display()
    );
    session.run().map_err(|e| {
        Error::Usage(format!(
            "FUSE session on {} ended with an error: {e}",
            mountpoint.display()
        ))
    })
}

/// Runs `hbrfs up`: a secondary (with its mirror) and a primary replicating
/// to it over loopback, under `dir`.
pub fn run_up(dir: &Path, rpo: Duration) -> Result<()> {
    sys::set_umask(0);
    sys::block_shutdown_signals().at("signal mask")?;
    let sub = |name: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::create_dir_all(&p).at(&p)?;
        p.canonicalize().at(&p)
    };
    let (backing, mnt, replica, replica_mnt) = (
        sub("backing")?,
        sub("mnt")?,
        sub("replica")?,
        sub("replica-mnt")?,
    );
    let mut secondary = start_secondary(&ServeOptions {
        replica,
        listen: "127.0.0.1:0".parse().expect("literal address"),
        mount: Some(replica_mnt.clone()),
        auth_key: None,
    })?;
    let key = AuthKey::load(&default_key_path(&dir.join("replica")))?;
    let listen_path = ReplicaPaths::of(&dir.join("replica")).listen();
    let listen = std::fs::read_to_string(&listen_path).at(&listen_path)?;
    let mut primary = start_primary(&MountOptions {
        backing,
        mountpoint: mnt.clone(),
        block_size: None,
        threads: 8,
        cut_every: None,
        tracking: true,
        replicate: Some(ReplicateOptions {
            addr: listen.trim().to_string(),
            rpo,
            level: 1,
            key,
            max_rate: None,
        }),
    })?;
    let mnt = primary.mountpoint.clone();
    eprintln!(
        "\nhbrfs is up.\n  primary datastore: {mnt}  (write images here)\n  replica, read-only: {rep}  (updated every {rpo:?})\n\n\
         Try:\n  qemu-img create -f qcow2 {mnt}/disk.qcow2 1G\n  qemu-io -f qcow2 -t none -c 'write -P 0xab 0 1M' {mnt}/disk.qcow2\n  \
         hbrfs status -d {mnt}\n  qemu-img compare {mnt}/disk.qcow2 {rep}/disk.qcow2\n\
         A VM: qemu-system-x86_64 -drive file={mnt}/disk.qcow2,cache=none,aio=threads ...\n\nCtrl-C stops both sides.",
        mnt = mnt.display(),
        rep = replica_mnt.display(),
    );
    let mut unmounter = primary.session.unmount_callable();
    let stop_secondary = secondary.stopper();
    on_signal(move || {
        unmount(&mut unmounter, &mnt);
        stop_secondary();
    })?;
    let primary_result = primary.run();
    let secondary_result = secondary.run();
    primary_result.and(secondary_result)
}
