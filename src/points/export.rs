//! `hbrfs export`: one image of a kept point as a qcow2 file, in full or as
//! the change since an older point chained onto that point's export.
//!
//! The blocks that changed after point P1 up to point P2 are known without
//! reading the image: each kept point X keeps as undo the old content of
//! every block the next kept point overwrote, punched or cut off, so the
//! union of the undo keys of the points P1 ≤ X < P2 is the change (a
//! thinning merges undo into the older neighbour, which keeps the union).
//! Only blocks past the image's size at P1 are not in any undo, and are
//! read. An incremental export therefore costs the changed blocks, not the
//! image. Content is read through [`PointView`]s, which pin both points, so
//! an export runs while `serve` applies new points.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use super::namespace;
use super::store::{PointsPaths, find_point, lock, point_name, read_catalog};
use super::undo::read_index;
use super::view::PointView;
use crate::block;
use crate::error::{Error, IoContext, Result};
use crate::ids::BlockNo;
use crate::proto::points::{Entry, PointRecord};
use crate::qcow2::{self, Backing, Qcow2Writer};
use crate::state::ReplicaPaths;
use crate::sys;

/// What to export: a point of one replica's image, optionally as the change
/// since an older point.
#[derive(Clone, Copy, Debug)]
pub struct ExportRequest<'a> {
    /// The replica folder.
    pub replica: &'a Path,
    /// The point (epoch, name, or `latest`: see [`find_point`]).
    pub point: &'a str,
    /// The older point and the name of its export, stored as the backing
    /// file (qemu resolves a relative name against the output's folder).
    pub since: Option<(&'a str, &'a str)>,
    /// The image's path in the replica; `None` when the point holds one
    /// regular file.
    pub image: Option<&'a str>,
    /// The qcow2 file to write; it must not exist.
    pub out: &'a Path,
    /// The pair's block size: the undo's unit, and the cluster size.
    pub block_size: u64,
}

/// What an export wrote, for the command's summary.
#[derive(Debug)]
pub struct Exported {
    /// The image's path in the replica.
    pub image: String,
    /// The exported point.
    pub point: PointRecord,
    /// The older point of an incremental export.
    pub since: Option<PointRecord>,
    /// The image's size at the point.
    pub size: u64,
    /// Why every block was visited, when it was (no `--since`, or a file
    /// that is not the one of the older point).
    pub full: Option<String>,
    /// Clusters written with data.
    pub written: u64,
    /// Clusters marked as zeros over the backing file.
    pub zeroed: u64,
}

/// Which blocks to visit, and below which block a zero block must be
/// marked (it would otherwise show the backing file's content).
struct Plan {
    blocks: Box<dyn Iterator<Item = u64>>,
    zero_below: u64,
    full: Option<String>,
}

/// Writes the export `req` asks for to `req.out` (through `OUT.tmp`,
/// renamed into place once complete and durable).
pub fn export(req: &ExportRequest<'_>) -> Result<Exported> {
    let paths = PointsPaths::new(ReplicaPaths::of(req.replica).points());
    let catalog = read_catalog(&paths)?;
    let point = find_point(&catalog, req.point)?.clone();
    let since = match req.since {
        Some((spec, _)) => Some(find_point(&catalog, spec)?.clone()),
        None => None,
    };
    if let Some(p1) = since.as_ref().filter(|p1| p1.epoch > point.epoch) {
        return Err(Error::Usage(format!(
            "--since {} (epoch {}) is newer than --point {} (epoch {}): \
             an export holds the change from an older point to a newer one",
            point_name(p1),
            p1.epoch,
            point_name(&point),
            point.epoch
        )));
    }
    let tmp = temp_path(req.out)?;
    let view = PointView::open(req.replica, point.epoch, req.block_size)?;
    let base = match &since {
        Some(p1) => Some(PointView::open(req.replica, p1.epoch, req.block_size)?),
        None => None,
    };
    let entry = pick_image(&view, req.image)?;
    let name = String::from_utf8_lossy(&entry.path).into_owned();
    let plan = plan(req, &paths, &view, base.as_ref(), &entry, &name)?;
    let backing = req.since.map(|(_, file)| Backing {
        file,
        format: "qcow2",
    });
    let bs = req.block_size;
    let written = write_image(
        &tmp,
        &view,
        &entry,
        plan.blocks,
        plan.zero_below,
        backing,
        bs,
    )
    .and_then(|counts| publish(&tmp, req.out).map(|()| counts));
    let (written, zeroed) = written.inspect_err(|_| remove_partial(&tmp))?;
    Ok(Exported {
        image: name,
        point,
        since,
        size: entry.size,
        full: plan.full,
        written,
        zeroed,
    })
}

/// `OUT.tmp`, after refusing an existing `OUT` or `OUT.tmp`.
fn temp_path(out: &Path) -> Result<PathBuf> {
    let name = out
        .file_name()
        .ok_or_else(|| Error::Usage(format!("{}: not a file name", out.display())))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(".tmp");
    let tmp = out.with_file_name(tmp_name);
    if out.symlink_metadata().is_ok() {
        return Err(Error::Usage(format!(
            "{} exists: an export never overwrites a file (least of all the \
             backing file of another); choose a new name or remove it",
            out.display()
        )));
    }
    if tmp.symlink_metadata().is_ok() {
        return Err(Error::Usage(format!(
            "{} exists: an interrupted export left it, or another export is \
             writing it; remove it when none runs",
            tmp.display()
        )));
    }
    Ok(tmp)
}

/// The regular file `image` names in the point, or its only one.
fn pick_image(view: &PointView, image: Option<&str>) -> Result<Entry> {
    let files: Vec<&Entry> = view
        .entries()
        .iter()
        .filter(|e| namespace::is_file(e))
        .collect();
    let epoch = view.record().epoch;
    let names = || {
        let names: Vec<_> = files
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path))
            .collect();
        names.join(", ")
    };
    let found = match image {
        Some(path) => {
            let path = path.trim_start_matches('/').as_bytes();
            files.iter().find(|e| e.path == path)
        }
        None if files.len() == 1 => files.first(),
        None if files.is_empty() => {
            return Err(Error::Usage(format!("point {epoch} holds no regular file")));
        }
        None => {
            return Err(Error::Usage(format!(
                "point {epoch} holds {} files: name one with --image ({})",
                files.len(),
                names()
            )));
        }
    };
    found.map(|e| (*e).clone()).ok_or_else(|| {
        Error::Usage(format!(
            "point {epoch} has no regular file {:?} (it holds: {})",
            image.unwrap_or_default(),
            names()
        ))
    })
}

/// Which blocks to visit: every one without an older point or when the
/// image is not the older point's file (another inode: replaced or
/// re-created), else the change (see the module doc).
fn plan(
    req: &ExportRequest<'_>,
    paths: &PointsPaths,
    view: &PointView,
    base: Option<&PointView>,
    entry: &Entry,
    name: &str,
) -> Result<Plan> {
    let bs = req.block_size;
    let blocks = entry.size.div_ceil(bs);
    let Some(base) = base else {
        return Ok(Plan {
            blocks: Box::new(0..blocks),
            zero_below: 0,
            full: Some("no --since".into()),
        });
    };
    let (p1, p2) = (base.record().epoch, view.record().epoch);
    let old = base.entries().iter().find(|e| e.path == entry.path);
    let old = old.filter(|e| namespace::is_file(e));
    check_backing(req, old, name, p1)?;
    let zero_below = old.map_or(0, |e| e.size.div_ceil(bs));
    let full = match old {
        None => Some(format!("{name} is not a file in point {p1}")),
        Some(e) if e.ino != entry.ino => Some(format!(
            "{name} is another file at point {p2} than at point {p1} (replaced or re-created)"
        )),
        Some(_) => None,
    };
    if let Some(why) = full {
        log::info!("{why}: exporting every block of it over the backing file");
        return Ok(Plan {
            blocks: Box::new(0..blocks),
            zero_below,
            full: Some(why),
        });
    }
    let mut changed = changed_blocks(paths, p1, p2, entry.ino)?;
    changed.extend(zero_below..blocks);
    changed.retain(|&b| b < blocks);
    log::info!(
        "{name}: {} of {blocks} blocks changed from point {p1} to point {p2}",
        changed.len()
    );
    Ok(Plan {
        blocks: Box::new(changed.into_iter()),
        zero_below,
        full: None,
    })
}

/// The blocks of inode `ino` an apply after point `from` up to point `to`
/// changed: the keys of the undo of every kept point `from ≤ X < to`,
/// read under the points lock so no thinning moves them meanwhile.
fn changed_blocks(paths: &PointsPaths, from: u64, to: u64, ino: u64) -> Result<BTreeSet<u64>> {
    let _shared = lock(&paths.lock(), libc::LOCK_SH)?;
    let mut changed = BTreeSet::new();
    for p in read_catalog(paths)?
        .iter()
        .filter(|p| (from..to).contains(&p.epoch))
    {
        let (index, _) = read_index(&paths.undo_index(p.epoch, p.generation))?;
        changed.extend(index.into_keys().filter(|k| k.0 == ino).map(|k| k.1));
    }
    Ok(changed)
}

/// Refuses a backing file that is missing, or (when the image existed at
/// the older point) not of the size the image had there: a chain on the
/// wrong file would read wrong content wherever nothing changed.
fn check_backing(req: &ExportRequest<'_>, old: Option<&Entry>, name: &str, p1: u64) -> Result<()> {
    let Some((_, file)) = req.since else {
        return Ok(());
    };
    let folder = req.out.parent().unwrap_or(Path::new("."));
    let path = folder.join(file);
    if !path.exists() {
        return Err(Error::Usage(format!(
            "backing file {file:?} ({}) does not exist: export point {p1} first \
             (a relative name is taken from the output's folder, as qemu does)",
            path.display()
        )));
    }
    let have = qcow2::virtual_size(&path)?;
    match old.map(|e| e.size.next_multiple_of(512)) {
        Some(want) if want != have => Err(Error::Usage(format!(
            "backing file {} holds {have} bytes, but {name} had {want} at point {p1}: \
             it is not the export of {name} at point {p1}",
            path.display()
        ))),
        _ => Ok(()),
    }
}

/// Writes the planned blocks of `entry` as `view` shows them into a new
/// qcow2 at `tmp`; returns (clusters written, clusters zeroed).
fn write_image(
    tmp: &Path,
    view: &PointView,
    entry: &Entry,
    blocks: impl Iterator<Item = u64>,
    zero_below: u64,
    backing: Option<Backing<'_>>,
    bs: u64,
) -> Result<(u64, u64)> {
    let cluster = u32::try_from(bs)
        .map_err(|_| Error::Usage(format!("block size {bs} is not a qcow2 cluster size")))?;
    let mut writer = Qcow2Writer::create(tmp, entry.size, cluster, backing)?;
    let mut buf = vec![0u8; bs as usize];
    let (mut written, mut zeroed) = (0, 0);
    for block in blocks {
        let n = view.read(entry.ino, entry.size, block * bs, &mut buf)?;
        let data = &buf[..n];
        if !block::is_zero(data) {
            writer.write_cluster(BlockNo(block), data)?;
            written += 1;
        } else if block < zero_below {
            writer.zero_cluster(BlockNo(block))?;
            zeroed += 1;
        }
    }
    writer.finish()?;
    Ok((written, zeroed))
}

/// Renames the finished `tmp` to `out` unless `out` appeared meanwhile,
/// and syncs the folder so the name is durable.
fn publish(tmp: &Path, out: &Path) -> Result<()> {
    let folder = out.parent().filter(|p| !p.as_os_str().is_empty());
    let folder = folder.unwrap_or(Path::new("."));
    let dir = File::open(folder).at(folder)?;
    let name = |p: &Path| p.file_name().unwrap_or_default().to_os_string();
    sys::renameat2(
        dir.as_fd(),
        &name(tmp),
        dir.as_fd(),
        &name(out),
        libc::RENAME_NOREPLACE,
    )
    .at(out)?;
    dir.sync_all().at(folder)
}

/// Removes what a failed export wrote (the error that failed it is the
/// one reported; a failed removal is logged).
fn remove_partial(tmp: &Path) {
    if let Err(e) = fs::remove_file(tmp)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        log::warn!("{}: could not remove a failed export: {e}", tmp.display());
    }
}
