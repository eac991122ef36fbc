//! The primary: opens the datastore, mounts the tracking passthrough,
//! serves the control socket and runs the cut timer or the replicator
//! (`hbrfs mount`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use fuser::Session;
use tokio::sync::watch;

use super::metrics::{self, PrimaryMetrics};
use super::{
    MountKind, check_mountpoint, existing_dir, mount, on_signal, raise_fd_limit, runtime, unmount,
};
use crate::control;
use crate::datastore::{Access, Datastore};
use crate::error::{Error, IoContext, Result};
use crate::fs::{Cache, ChangeRecorder, Passthrough};
use crate::ids::BlockSize;
use crate::points::{PointsPaths, drop_kept};
use crate::replicate::{ReplicateOptions, Replicator};
use crate::state::ReplicaPaths;
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
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics: Option<SocketAddr>,
}

/// The primary, started: what `mount` and `up` wait on and stop.
pub(super) struct Primary {
    ds: Arc<Datastore>,
    pub(super) session: Session<Passthrough>,
    pub(super) mountpoint: PathBuf,
    /// The runtime of the replicator and the metrics endpoint, when
    /// either runs.
    rt: Option<tokio::runtime::Runtime>,
    /// Stops the replicator.
    replication: Option<(watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

/// A folder that was a replica (promoted) may still hold its recovery
/// points; they compose from the files as they are, which this primary is
/// about to write without saving undo, so they are dropped, loudly.
fn drop_replica_points(backing: &std::path::Path) -> Result<()> {
    let paths = PointsPaths::new(ReplicaPaths::of(backing).points());
    let n = drop_kept(&paths)?;
    if n > 0 {
        log::warn!(
            "dropped the {n} recovery points {} kept as a replica: writes through this mount \
             would change what they are composed from",
            backing.display()
        );
    }
    Ok(())
}

pub(super) fn start_primary(opts: &MountOptions) -> Result<Primary> {
    raise_fd_limit();
    let backing = existing_dir(&opts.backing, "backing directory")?;
    let mountpoint = check_mountpoint(&opts.mountpoint, &backing)?;
    crate::roles::check_mount(&backing)?;
    let ds = Arc::new(Datastore::open(
        &backing,
        Access::Daemon {
            block_size: opts.block_size,
        },
    )?);
    drop_replica_points(&backing)?;
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
    let recorder = opts.tracking.then(|| ds.clone() as Arc<dyn ChangeRecorder>);
    let fs = Passthrough::new(&backing, recorder, Cache::Kernel).at(&backing)?;
    let notifier = fs.notifier_slot();
    let session = mount(fs, &backing, &mountpoint, MountKind::Primary, opts.threads)?;
    let _ = notifier.set(session.notifier());
    let rt = (opts.replicate.is_some() || opts.metrics.is_some())
        .then(runtime)
        .transpose()?;
    let mut replication = None;
    let mut stats = None;
    if let (Some(r), Some(rt)) = (&opts.replicate, &rt) {
        let replicator = Arc::new(Replicator::new(ds.clone(), r.clone())?);
        stats = Some(control::Replication {
            replicator: replicator.clone(),
            runtime: rt.handle().clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let task = rt.spawn(replicator.run(stopped));
        log::info!(
            "replicating to {}: a point {:?} after a change with the link idle, at least every {:?}",
            r.target,
            r.coalesce,
            r.rpo
        );
        replication = Some((stop, task));
    } else if let Some(every) = opts.cut_every {
        start_cut_timer(ds.clone(), every)?;
    }
    if let (Some(addr), Some(rt)) = (opts.metrics, &rt) {
        let collector = PrimaryMetrics {
            ds: ds.clone(),
            stats: stats.as_ref().map(|s| s.replicator.stats.clone()),
        };
        metrics::serve(addr, collector, rt.handle())?;
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
        rt,
        replication,
    })
}

/// Cuts an epoch every `every` on a thread of its own (a primary that does
/// not replicate, for `hbrfs journal` and tests).
fn start_cut_timer(ds: Arc<Datastore>, every: Duration) -> Result<()> {
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
    Ok(())
}

impl Primary {
    /// Serves the mount until it goes away, then stops cleanly.
    pub(super) fn run(self) -> Result<()> {
        let Primary {
            ds,
            session,
            mountpoint,
            rt,
            replication,
        } = self;
        let result = session.run();
        if let (Some((stop, task)), Some(rt)) = (replication, &rt) {
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
