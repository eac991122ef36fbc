//! The points folder as one object for the applying secondary
//! ([`PointKeeper`]), and its paths and catalog for everyone else
//! (`hbrfs points ls`, views, rollback).

use std::fs::{self, File};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use prost::Message;

use super::namespace;
use super::retention::{self, Retention};
use super::undo::UndoWriter;
use crate::error::{Error, IoContext, Result};
use crate::ids::Epoch;
use crate::proto::points::{Catalog, PointRecord};
use crate::state::{make_state_dirs, state_file_options, write_durably};
use crate::sys;

/// Paths inside `REPLICA/.hbrfs/points/`.
#[derive(Clone, Debug)]
pub struct PointsPaths {
    /// The points folder.
    pub dir: PathBuf,
}

impl PointsPaths {
    /// The points folder of the state folder whose points path is `dir`
    /// (`ReplicaPaths::points`).
    pub fn new(dir: PathBuf) -> PointsPaths {
        PointsPaths { dir }
    }
    /// The catalog.
    pub fn catalog(&self) -> PathBuf {
        self.dir.join("catalog")
    }
    /// The lock applies hold exclusively and view reads shared.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// The folder of point `epoch`.
    pub fn point(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("E{epoch:020}"))
    }
    /// Its namespace.
    pub fn namespace(&self, epoch: u64) -> PathBuf {
        self.point(epoch).join("namespace")
    }
    /// Its pin (see the module doc).
    pub fn pin(&self, epoch: u64) -> PathBuf {
        self.point(epoch).join("pin")
    }
    /// Its undo index at generation `generation`.
    pub fn undo_index(&self, epoch: u64, generation: u64) -> PathBuf {
        self.point(epoch).join(format!("undo-{generation}.idx"))
    }
    /// Its undo data at generation `generation`.
    pub fn undo_data(&self, epoch: u64, generation: u64) -> PathBuf {
        self.point(epoch).join(format!("undo-{generation}.data"))
    }
    /// The files its next point removed, at generation `generation`.
    pub fn kept_files(&self, epoch: u64, generation: u64) -> PathBuf {
        self.point(epoch).join(format!("files-{generation}"))
    }
}

/// A damaged points file, named.
pub(super) fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadState {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a whole protobuf file (a catalog, a namespace).
pub(super) fn read_message<M: Message + Default>(path: &Path) -> Result<M> {
    let bytes = fs::read(path).at(path)?;
    M::decode(bytes.as_slice()).map_err(|e| bad(path, format!("does not parse: {e}")))
}

/// The retained points, oldest first; none when the folder has no catalog
/// (no point kept yet, or an older build).
pub fn read_catalog(paths: &PointsPaths) -> Result<Vec<PointRecord>> {
    let path = paths.catalog();
    if !path.exists() {
        return Ok(Vec::new());
    }
    Ok(read_message::<Catalog>(&path)?.points)
}

/// Drops every kept point of the folder at `paths` (catalog first, then
/// the folders); returns how many there were. For a replica that stops
/// keeping history, and for a folder about to be written as a primary,
/// whose writes would change what the points compose from.
pub fn drop_kept(paths: &PointsPaths) -> Result<usize> {
    let n = read_catalog(paths)?.len();
    if n > 0 {
        write_catalog(paths, &[])?;
    }
    if paths.dir.exists() {
        retention::remove_unnamed(paths, &[])?;
    }
    Ok(n)
}

/// Writes the catalog durably.
pub(super) fn write_catalog(paths: &PointsPaths, points: &[PointRecord]) -> Result<()> {
    let catalog = Catalog {
        points: points.to_vec(),
    };
    write_durably(&paths.catalog(), &catalog.encode_to_vec())
}

/// Opens (creating) a lock or pin file.
pub(super) fn open_lock(path: &Path) -> Result<File> {
    state_file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .at(path)
}

/// A held `flock`, released when dropped (with its file).
#[derive(Debug)]
pub struct Locked {
    _file: File,
}

/// Takes `flock(op)` on `path`, waiting for it.
pub(super) fn lock(path: &Path, op: i32) -> Result<Locked> {
    let file = open_lock(path)?;
    sys::flock(file.as_fd(), op).at(path)?;
    Ok(Locked { _file: file })
}

/// The applying secondary's points: it saves undo through
/// [`PointKeeper::base`], records each applied point with
/// [`PointKeeper::applied`], and applies the retention grid after each.
#[derive(Debug)]
pub struct PointKeeper {
    paths: PointsPaths,
    keep: Retention,
    /// The catalog as last written.
    catalog: Mutex<Vec<PointRecord>>,
}

impl PointKeeper {
    /// Opens the points folder at `paths`, removing what an interrupted
    /// thinning or apply left that the catalog does not name. The points
    /// a grid without history does not keep go at [`PointKeeper::settle`],
    /// once a point left in flight is rolled back (it needs the newest).
    pub fn open(paths: PointsPaths, keep: Retention) -> Result<PointKeeper> {
        make_state_dirs(&paths.dir)?;
        let points = read_catalog(&paths)?;
        retention::remove_unnamed(&paths, &points)?;
        Ok(PointKeeper {
            paths,
            keep,
            catalog: Mutex::new(points),
        })
    }

    /// The retained points, oldest first.
    pub fn list(&self) -> Vec<PointRecord> {
        self.catalog.lock().expect("catalog lock").clone()
    }

    /// Holds views off while the caller changes the replica (an apply).
    pub fn exclusive(&self) -> Result<Locked> {
        lock(&self.paths.lock(), libc::LOCK_EX)
    }

    /// Reads the catalog again, after a rollback rewrote it.
    pub fn reload(&self) -> Result<()> {
        *self.catalog.lock().expect("catalog lock") = read_catalog(&self.paths)?;
        Ok(())
    }

    /// With a grid that keeps no history, drops every kept point (the
    /// temporary record of the point before one in flight, or what an
    /// earlier run with history kept).
    pub fn settle(&self) -> Result<()> {
        if self.keep.keeps_history() {
            return Ok(());
        }
        let n = self.drop_all()?;
        if n > 0 {
            log::info!("keeping no recovery points (--keep none): dropped the {n} kept");
        }
        Ok(())
    }

    /// Where a point applied in place saves what it overwrites: the undo
    /// of the point before it (`applied`, the live replica now), which is
    /// first recorded (its namespace walked) unless it is the newest
    /// point kept: with `--keep none`, before the first point, or after
    /// history was dropped for space. Rolling back from it is how a point
    /// that does not complete leaves the replica as it was.
    pub fn base(&self, root: &Path, applied: PointRecord, block_size: u64) -> Result<UndoWriter> {
        let mut points = self.list();
        if points.last().map(|p| p.epoch) != Some(applied.epoch) {
            let record = self.with_namespace(root, applied)?;
            points.retain(|p| p.epoch < record.epoch);
            points.push(record);
            write_catalog(&self.paths, &points)?;
            *self.catalog.lock().expect("catalog lock") = points.clone();
        }
        let p = points.last().expect("recorded above");
        UndoWriter::open(&self.paths, p.epoch, p.generation, block_size)
    }

    /// Records point `record` (just applied to `root`): its namespace,
    /// the undo the apply saved into the previous point (`undo`), the
    /// catalog; then applies the retention grid. The record of the state
    /// before the first point (epoch 0) is not a point and goes; with no
    /// history kept, every point goes. Called under
    /// [`PointKeeper::exclusive`], before the apply is recorded as done.
    pub fn applied(
        &self,
        root: &Path,
        record: PointRecord,
        undo: Option<&mut UndoWriter>,
    ) -> Result<()> {
        let (bytes, blocks) = undo.map(|u| u.finish()).transpose()?.unwrap_or_default();
        if !self.keep.keeps_history() {
            self.drop_all()?;
            return Ok(());
        }
        let record = self.with_namespace(root, record)?;
        let mut points = self.list();
        points.retain(|p| p.epoch < record.epoch);
        if let Some(previous) = points.last_mut() {
            previous.undo_bytes = bytes;
            previous.undo_blocks = blocks;
        }
        let before_first = points.first().is_some_and(|p| p.epoch == 0);
        points.retain(|p| p.epoch != 0);
        points.push(record);
        write_catalog(&self.paths, &points)?;
        if before_first {
            let dir = self.paths.point(0);
            fs::remove_dir_all(&dir).at(&dir)?;
        }
        *self.catalog.lock().expect("catalog lock") = points;
        self.retain()
    }

    /// Point `record`'s folder made afresh with the namespace of the
    /// replica at `root` now; the record with its file count.
    fn with_namespace(&self, root: &Path, mut record: PointRecord) -> Result<PointRecord> {
        let dir = self.paths.point(record.epoch);
        if dir.exists() {
            fs::remove_dir_all(&dir).at(&dir)?;
        }
        make_state_dirs(&dir)?;
        record.files = namespace::write(root, &self.paths.namespace(record.epoch))?;
        Ok(record)
    }

    /// The undo of the newest point before `epoch`, if one is kept: where
    /// a point finished after a crash had saved what it overwrote.
    pub fn undo_before(&self, epoch: Epoch, block_size: u64) -> Result<Option<UndoWriter>> {
        match self.list().into_iter().rfind(|p| p.epoch < epoch.0) {
            Some(p) => UndoWriter::open(&self.paths, p.epoch, p.generation, block_size).map(Some),
            None => Ok(None),
        }
    }

    /// Applies the retention grid (after each point).
    fn retain(&self) -> Result<()> {
        let mut points = self.list();
        retention::apply(&self.paths, &self.keep, &mut points, crate::state::now_ns())?;
        *self.catalog.lock().expect("catalog lock") = points;
        Ok(())
    }

    /// Drops every kept point for want of space (an apply that could not
    /// save its undo): history is given up before the replica is. Returns
    /// how many were dropped.
    pub fn drop_all(&self) -> Result<usize> {
        let n = drop_kept(&self.paths)?;
        self.catalog.lock().expect("catalog lock").clear();
        Ok(n)
    }
}

/// A point's name in `.points/` and on the command line: its apply time,
/// UTC, to the millisecond (`2026-11-30T06:40:12.345Z`).
pub fn point_name(p: &PointRecord) -> String {
    let ms = p.at_ns / 1_000_000 % 1000;
    format!("{}.{ms:03}Z", crate::state::utc(p.at_ns).replace(' ', "T"))
}

/// The point `spec` names among `points`: its epoch, its name
/// ([`point_name`]), or `latest`. A spec that names none is a usage error
/// listing what is kept.
pub fn find_point<'p>(points: &'p [PointRecord], spec: &str) -> Result<&'p PointRecord> {
    let found = match spec {
        "latest" | "newest" => points.last(),
        _ => points
            .iter()
            .find(|p| spec.parse() == Ok(p.epoch) || point_name(p) == spec),
    };
    found.ok_or_else(|| {
        let kept: Vec<String> = points
            .iter()
            .map(|p| format!("{} ({})", p.epoch, point_name(p)))
            .collect();
        Error::Usage(format!(
            "no kept point is {spec:?}; kept: {}",
            if kept.is_empty() {
                "none".into()
            } else {
                kept.join(", ")
            }
        ))
    })
}
