//! Recovery: one kept point mounted read-only (`hbrfs mount-point`) or as
//! a writable sandbox (`hbrfs test-failover`), each in its own process,
//! beside a `serve` that goes on applying newer points into the same
//! replica (the view stays at its point: see `points::view`).

use std::path::{Path, PathBuf};

use super::{MountKind, check_mountpoint, existing_dir, raise_fd_limit, run_alone};
use crate::error::{IoContext, Result};
use crate::mirror::find_kept;
use crate::mirror::point_mount::PointMount;
use crate::mirror::sandbox::{self, Sandbox};
use crate::points::{PointView, point_name};
use crate::state::ReplicaPaths;
use crate::sys;

/// Runs `hbrfs mount-point`: point `spec` (epoch, name or `latest`) of
/// the replica at `replica`, read-only at `mountpoint`, until unmounted
/// or signalled. Opening costs the catalog and the point's namespace,
/// whatever the size of the images; the point is pinned meanwhile.
pub fn run_mount_point(replica: &Path, spec: &str, mountpoint: &Path) -> Result<()> {
    raise_fd_limit();
    sys::block_shutdown_signals().at("signal mask")?;
    let root = existing_dir(replica, "replica folder")?;
    let mountpoint = check_mountpoint(mountpoint, &root)?;
    let (record, block_size) = find_kept(&root, spec)?;
    let fs = PointMount::open(&root, record.epoch, block_size)?;
    let shown = format!(
        "point {} ({}) of replica {} mounted read-only at {}",
        record.epoch,
        point_name(&record),
        root.display(),
        mountpoint.display()
    );
    run_alone(
        fs,
        &root,
        &mountpoint,
        MountKind::Mirror { allow_other: false },
        &shown,
    )
}

/// Runs `hbrfs test-failover`: a writable sandbox of point `spec` of the
/// replica at `replica` at `mountpoint`, its changes kept under `scratch`
/// (default `REPLICA/.hbrfs/sandboxes/`) in a folder of this process's,
/// removed when it stops; the replica and its points are never written.
pub fn run_test_failover(
    replica: &Path,
    spec: &str,
    scratch: Option<PathBuf>,
    mountpoint: &Path,
) -> Result<()> {
    raise_fd_limit();
    sys::block_shutdown_signals().at("signal mask")?;
    let root = existing_dir(replica, "replica folder")?;
    let mountpoint = check_mountpoint(mountpoint, &root)?;
    let (record, block_size) = find_kept(&root, spec)?;
    let view = PointView::open(&root, record.epoch, block_size)?;
    let dir = match scratch {
        Some(dir) => existing_dir(&dir, "scratch folder")?,
        None => ReplicaPaths::of(&root).dir.join("sandboxes"),
    };
    sandbox::remove_stale(&dir)?;
    let scratch = sandbox::scratch_for(&dir, std::process::id());
    let fs = Sandbox::new(&root, view, scratch.clone(), block_size)?;
    let shown = format!(
        "sandbox of point {} ({}) of replica {} mounted writable at {} \
         (changes kept in {}, discarded when it stops)",
        record.epoch,
        point_name(&record),
        root.display(),
        mountpoint.display(),
        scratch.display()
    );
    run_alone(fs, &root, &mountpoint, MountKind::Sandbox, &shown)
}
