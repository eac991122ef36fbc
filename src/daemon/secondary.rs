//! The secondary: the replication service with its optional mirrored
//! mount (`hbrfs serve`), and the mirror alone over a replica folder no
//! secondary serves (`hbrfs mount-replica`).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::SessionUnmounter;
use tokio::sync::watch;

use super::metrics::{self, SecondaryMetrics};
use super::{
    MountKind, check_mountpoint, existing_dir, mount, on_signal, raise_fd_limit, run_alone,
    runtime, unmount,
};
use crate::auth::AuthKey;
use crate::error::{Error, IoContext, Result};
use crate::mirror::Mirror;
use crate::replica::ReplicaStore;
use crate::state::{ReplicaPaths, write_durably};
use crate::sys;

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
    /// Let other users than the daemon's into the mirror (FUSE
    /// `allow_other`); off by default: the replica is as private as the
    /// primary's backing folder.
    pub mirror_allow_other: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<std::net::SocketAddr>,
    /// Create the device nodes points carry (`--allow-devices`); without
    /// it each is refused, visibly.
    pub allow_devices: bool,
    /// Which recovery points to keep (`--keep`, `--keep-space`).
    pub keep: crate::points::Retention,
}

/// Where a secondary keeps its key unless told otherwise.
pub fn default_key_path(replica: &Path) -> PathBuf {
    ReplicaPaths::of(replica).auth_key()
}

/// The secondary, started.
pub(super) struct Secondary {
    rt: tokio::runtime::Runtime,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    mirror_thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mirror_unmount: Option<(SessionUnmounter, PathBuf)>,
}

pub(super) fn start_secondary(opts: &ServeOptions) -> Result<Secondary> {
    raise_fd_limit();
    if opts.replica.exists() {
        crate::roles::check_serve(&opts.replica)?;
    }
    let store = Arc::new(ReplicaStore::open(
        &opts.replica,
        opts.allow_devices,
        opts.keep.clone(),
    )?);
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
    if let Some(addr) = opts.metrics {
        let collector = SecondaryMetrics {
            store: store.clone(),
        };
        metrics::serve(addr, collector, rt.handle())?;
    }
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
            let fs = Mirror::new(&store.root, store.view.clone(), store.overlay.clone())
                .at(&store.root)?;
            let kind = MountKind::Mirror {
                allow_other: opts.mirror_allow_other,
            };
            let mut session = mount(fs, &store.root, &mountpoint, kind, 4)?;
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
    pub(super) fn stopper(&mut self) -> impl FnOnce() + Send + 'static {
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
    pub(super) fn run(self) -> Result<()> {
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
    raise_fd_limit();
    sys::block_shutdown_signals().at("signal mask")?;
    let root = existing_dir(replica, "replica folder")?;
    let mountpoint = check_mountpoint(mountpoint, &root)?;
    let fs = Mirror::new(&root, Arc::default(), Arc::default()).at(&root)?;
    let kind = MountKind::Mirror { allow_other: false };
    let shown = format!(
        "replica {} mounted read-only at {}",
        root.display(),
        mountpoint.display()
    );
    run_alone(fs, &root, &mountpoint, kind, &shown)
}
