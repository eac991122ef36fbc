//! Recovery: one kept point mounted read-only (`hbrfs mount-point`) or as
//! a writable sandbox (`hbrfs test-failover`), each in its own process,
//! beside a `serve` that goes on applying newer points into the same
//! replica (the view stays at its point: see `points::view`), or beside a
//! primary that goes on publishing newer points to an object store (a
//! published point never changes).

use std::path::{Path, PathBuf};

use super::{MountKind, check_mountpoint, existing_dir, raise_fd_limit, run_alone};
use crate::error::{IoContext, Result};
use crate::mirror::find_kept;
use crate::mirror::object::{ObjectPoint, runtime};
use crate::mirror::point::{PointFs, tree_of};
use crate::mirror::point_mount::PointMount;
use crate::mirror::sandbox::{self, Sandbox};
use crate::object::read::{PointSource, open_point};
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
    let tree = tree_of(&root, &view)?;
    let fs = Sandbox::new(&tree, Box::new(view), scratch.clone(), block_size)?;
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

/// Opens point `spec` of the object store `src` for a mount: the point,
/// its tree, and the local index folder.
fn open_object(src: &PointSource, spec: &str) -> Result<(ObjectPoint, PathBuf)> {
    let rt = runtime()?;
    let (reader, dir) = rt.block_on(open_point(src, spec))?;
    Ok((ObjectPoint::new(rt, reader), dir))
}

/// Runs `hbrfs mount-point s3://… POINT MOUNTPOINT`: the point read-only
/// at `mountpoint`, each read fetching only the blocks it needs (ranged
/// GETs, a bounded cache, read-ahead), until unmounted or signalled.
/// Opening costs the point's manifest and the index segments the local
/// index lacks, whatever the size of the images.
pub fn run_mount_object_point(src: &PointSource, spec: &str, mountpoint: &Path) -> Result<()> {
    sys::block_shutdown_signals().at("signal mask")?;
    let (point, dir) = open_object(src, spec)?;
    let mountpoint = check_mountpoint(mountpoint, &dir)?;
    let tree = point.tree()?;
    let shown = format!(
        "{} mounted read-only at {} (fetched lazily; index in {})",
        point.reader().name(),
        mountpoint.display(),
        dir.display()
    );
    let block_size = point.reader().repo().block_size();
    let fs = PointMount::new(PointFs::new(point, tree, block_size, 1), &dir)?;
    run_alone(
        fs,
        &dir,
        &mountpoint,
        MountKind::Mirror { allow_other: false },
        &shown,
    )
}

/// Runs `hbrfs test-failover s3://… --point P MOUNTPOINT`: a writable
/// sandbox over the object-store point (read lazily, as `mount-point`
/// reads it), its changes kept under `scratch` (default the index
/// folder's `sandboxes/`) and discarded when it stops.
pub fn run_test_failover_object(
    src: &PointSource,
    spec: &str,
    scratch: Option<PathBuf>,
    mountpoint: &Path,
) -> Result<()> {
    sys::block_shutdown_signals().at("signal mask")?;
    let (point, dir) = open_object(src, spec)?;
    let mountpoint = check_mountpoint(mountpoint, &dir)?;
    let scratch_dir = match scratch {
        Some(d) => existing_dir(&d, "scratch folder")?,
        None => dir.join("sandboxes"),
    };
    sandbox::remove_stale(&scratch_dir)?;
    let scratch = sandbox::scratch_for(&scratch_dir, std::process::id());
    let tree = point.tree()?;
    let shown = format!(
        "sandbox of {} mounted writable at {} (changes kept in {}, discarded when it stops)",
        point.reader().name(),
        mountpoint.display(),
        scratch.display()
    );
    let block_size = point.reader().repo().block_size();
    let fs = Sandbox::new(&tree, Box::new(point), scratch, block_size)?;
    run_alone(fs, &dir, &mountpoint, MountKind::Sandbox, &shown)
}
