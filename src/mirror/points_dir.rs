//! `.points/` in the mirror's root: one read-only folder per kept point,
//! named as `hbrfs points ls` names it (its apply time, UTC, to the ms).
//!
//! The listing is the catalog, read again whenever the catalog file
//! changed. A point is opened (its view pinned, its namespace made a
//! tree) on the first lookup of its folder, and served as FUSE inodes of
//! its own slot: `SLOTS | slot << 32 | node`, far above the passthrough's
//! (which count up from 1), so the two never meet. A slot's view is let go
//! once no file of it is open and nothing read it for a minute (a sweep
//! every 10 s), so a browsed point does not stay pinned for ever; the
//! next read opens it again. A slot whose point has left the catalog is
//! dropped at the sweep once its view is let go; the kernel then gets
//! `ESTALE` for inodes it still holds there.
//!
//! `.points` is reserved: a replica's own `.points` in its root (shipped
//! by a primary that has one) stays in the replica folder and in every
//! point, but the mirror's root shows this folder in its place and logs a
//! warning.

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileHandle, FileType, INodeNo};

use super::block_size_of;
use super::point::PointFs;
use crate::fs::handles::{DirEntry, HandleTable, listing};
use crate::fs::reply::{Entry, Listing, Res, io_errno, state_errno};
use crate::points::{PointsPaths, point_name, read_catalog};
use crate::state::ReplicaPaths;

/// The reserved name in the mirror's root.
pub const NAME: &str = ".points";
/// FUSE inode of `.points` itself.
const DIR_INO: u64 = 1 << 62;
/// Where the slots' inodes start.
const SLOTS: u64 = 1 << 63;
/// A point's view is let go after this long unused.
const IDLE: Duration = Duration::from_secs(60);
/// How often the sweep looks for idle views.
const SWEEP: Duration = Duration::from_secs(10);
/// How long the kernel may keep `.points` and its names: points come and
/// go with every apply.
const TTL: Duration = Duration::from_secs(1);

/// The catalog as last read.
#[derive(Debug, Default)]
struct Listed {
    /// The catalog file's identity when read (inode, mtime ns, size).
    stamp: Option<(u64, i64, u64)>,
    /// Point name → epoch.
    names: BTreeMap<String, u64>,
    /// When the newest point applied (the folder's mtime).
    newest_ns: u64,
}

/// The opened points.
#[derive(Debug, Default)]
struct Slots {
    by_slot: HashMap<u64, Arc<PointFs>>,
    by_epoch: HashMap<u64, u64>,
    /// The next slot number (never reused, so stale inodes stay stale).
    next: u64,
}

/// The `.points` folder of one mirror.
#[derive(Debug)]
pub struct PointsDir {
    root: PathBuf,
    paths: PointsPaths,
    /// The replica root's stat: the folder's owner and permissions.
    owner: (u32, u32, u32),
    /// Read again when the catalog file changed; its own lock, as a
    /// lookup may re-read it while others list.
    catalog: Mutex<Listed>,
    /// Opened points: read by every op on a point's inodes, written when
    /// one opens or is dropped.
    slots: RwLock<Slots>,
    /// Listings of `.points` itself.
    listings: HandleTable,
}

impl PointsDir {
    /// The `.points` folder of the replica at `root`.
    pub fn new(root: &Path) -> std::io::Result<PointsDir> {
        let meta = std::fs::metadata(root)?;
        if root.join(NAME).symlink_metadata().is_ok() {
            log::warn!(
                "{}: the replica has its own {NAME} in its root; the mirror shows the \
                 recovery points there instead (the replica's {NAME} stays in the folder \
                 and in every point)",
                root.display()
            );
        }
        Ok(PointsDir {
            root: root.to_path_buf(),
            paths: PointsPaths::new(ReplicaPaths::of(root).points()),
            owner: (meta.uid(), meta.gid(), meta.mode() & 0o555),
            catalog: Mutex::new(Listed::default()),
            slots: RwLock::new(Slots::default()),
            listings: HandleTable::default(),
        })
    }

    /// Lets idle views go every 10 s for as long as `dir` lives.
    pub fn sweep_while_alive(dir: Weak<PointsDir>) -> std::io::Result<()> {
        std::thread::Builder::new()
            .name("hbrfs-points".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(SWEEP);
                    match dir.upgrade() {
                        Some(dir) => dir.sweep(),
                        None => return,
                    }
                }
            })
            .map(drop)
    }

    /// Whether FUSE inode `ino` is `.points` or below it.
    pub fn owns(ino: INodeNo) -> bool {
        ino.0 >= DIR_INO
    }

    /// Reads the catalog again if it changed.
    fn listed(&self) -> Res<std::sync::MutexGuard<'_, Listed>> {
        let mut listed = self.catalog.lock().expect("catalog lock");
        let path = self.paths.catalog();
        let stamp = match std::fs::metadata(&path) {
            Ok(m) => Some((
                m.ino(),
                m.mtime() * 1_000_000_000 + m.mtime_nsec(),
                m.size(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_errno(e)),
        };
        if stamp != listed.stamp || stamp.is_none() {
            let points = read_catalog(&self.paths).map_err(state_errno)?;
            listed.names = points.iter().map(|p| (point_name(p), p.epoch)).collect();
            listed.newest_ns = points.last().map_or(0, |p| p.at_ns);
            listed.stamp = stamp;
        }
        Ok(listed)
    }

    /// The attributes of `.points`.
    fn dir_entry(&self) -> Res<Entry> {
        let listed = self.listed()?;
        let (uid, gid, perm) = self.owner;
        Ok(Entry {
            attr: FileAttr {
                ino: INodeNo(DIR_INO),
                size: 0,
                blocks: 0,
                atime: UNIX_EPOCH + Duration::from_nanos(listed.newest_ns),
                mtime: UNIX_EPOCH + Duration::from_nanos(listed.newest_ns),
                ctime: UNIX_EPOCH + Duration::from_nanos(listed.newest_ns),
                crtime: UNIX_EPOCH,
                kind: FileType::Directory,
                perm: perm as u16,
                nlink: 2 + listed.names.len() as u32,
                uid,
                gid,
                rdev: 0,
                blksize: 4096,
                flags: 0,
            },
            ttl: TTL,
        })
    }

    /// The opened point serving inode `ino`.
    fn point_of(&self, ino: INodeNo) -> Res<Arc<PointFs>> {
        let slot = ino.0.checked_sub(SLOTS).ok_or(Errno::ESTALE)? >> 32;
        let slots = self.slots.read().expect("slots lock");
        slots.by_slot.get(&slot).cloned().ok_or(Errno::ESTALE)
    }

    /// The point `epoch`, opened (and pinned) if it was not.
    fn open_point(&self, epoch: u64) -> Res<Arc<PointFs>> {
        if let Some(p) = {
            let slots = self.slots.read().expect("slots lock");
            slots
                .by_epoch
                .get(&epoch)
                .and_then(|s| slots.by_slot.get(s))
                .cloned()
        } {
            return Ok(p);
        }
        let block_size = block_size_of(&self.root).map_err(state_errno)?;
        let mut slots = self.slots.write().expect("slots lock");
        if let Some(p) = slots
            .by_epoch
            .get(&epoch)
            .and_then(|s| slots.by_slot.get(s))
        {
            return Ok(p.clone());
        }
        let slot = slots.next + 1;
        if slot >= 1 << 31 {
            return Err(Errno::ENFILE);
        }
        let base = SLOTS | slot << 32;
        let point = PointFs::open(&self.root, epoch, block_size, base).map_err(state_errno)?;
        let point = Arc::new(point);
        slots.next = slot;
        slots.by_slot.insert(slot, point.clone());
        slots.by_epoch.insert(epoch, slot);
        Ok(point)
    }

    /// Looks up `.points` in the root.
    pub fn op_lookup_self(&self) -> Res<Entry> {
        self.dir_entry()
    }

    /// Looks `name` up in `parent`, `.points` or a folder below it.
    pub fn op_lookup(&self, parent: INodeNo, name: &OsStr) -> Res<Entry> {
        if parent.0 != DIR_INO {
            return self.point_of(parent)?.op_lookup(parent, name);
        }
        let epoch = {
            let listed = self.listed()?;
            let name = name.to_str().ok_or(Errno::ENOENT)?;
            *listed.names.get(name).ok_or(Errno::ENOENT)?
        };
        let point = self.open_point(epoch)?;
        let mut entry = point.op_getattr(point.root_ino())?;
        entry.ttl = TTL;
        Ok(entry)
    }

    /// The attributes of `ino`.
    pub fn op_getattr(&self, ino: INodeNo) -> Res<Entry> {
        match ino.0 {
            DIR_INO => self.dir_entry(),
            _ => self.point_of(ino)?.op_getattr(ino),
        }
    }

    /// The target of symlink `ino`.
    pub fn op_readlink(&self, ino: INodeNo) -> Res<Vec<u8>> {
        self.point_of(ino)?.op_readlink(ino)
    }

    /// Opens file `ino` for reading.
    pub fn op_open(&self, ino: INodeNo, flags: i32) -> Res<(FileHandle, fuser::FopenFlags)> {
        self.point_of(ino)?.op_open(ino, flags)
    }

    /// Closes a file of `ino`.
    pub fn release(&self, ino: INodeNo) {
        if let Ok(p) = self.point_of(ino) {
            p.release();
        }
    }

    /// Reads file `ino`.
    pub fn op_read(&self, ino: INodeNo, offset: u64, size: u32) -> Res<Vec<u8>> {
        self.point_of(ino)?.op_read(ino, offset, size)
    }

    /// Data and holes of file `ino`.
    pub fn op_lseek(&self, ino: INodeNo, offset: i64, whence: i32) -> Res<i64> {
        self.point_of(ino)?.op_lseek(ino, offset, whence)
    }

    /// Lists `.points` (every kept point) or a folder below it.
    pub fn op_opendir(&self, ino: INodeNo) -> Res<FileHandle> {
        if ino.0 != DIR_INO {
            return self.point_of(ino)?.op_opendir(ino);
        }
        let listed = self.listed()?;
        let children = listed.names.iter().map(|(name, epoch)| DirEntry {
            ino: INodeNo(DIR_INO + 1 + epoch),
            kind: FileType::Directory,
            name: name.into(),
        });
        Ok(self.listings.insert(listing(ino, children)))
    }

    /// The entries of listing `fh` of folder `ino`.
    pub fn op_readdir(&self, ino: INodeNo, fh: FileHandle, offset: u64) -> Res<Listing> {
        if ino.0 != DIR_INO {
            return self.point_of(ino)?.op_readdir(fh, offset);
        }
        Listing::of(&self.listings, fh, offset)
    }

    /// Forgets listing `fh` of folder `ino`.
    pub fn releasedir(&self, ino: INodeNo, fh: FileHandle) {
        if ino.0 == DIR_INO {
            self.listings.remove(fh);
        } else if let Ok(p) = self.point_of(ino) {
            p.releasedir(fh);
        }
    }

    /// Lets idle views go, and drops the slots of points no longer kept.
    fn sweep(&self) {
        let kept: Vec<u64> = match self.listed() {
            Ok(listed) => listed.names.values().copied().collect(),
            Err(e) => {
                log::error!("{}: reading the points catalog: {e:?}", self.root.display());
                return;
            }
        };
        let mut slots = self.slots.write().expect("slots lock");
        let gone: Vec<(u64, u64)> = slots
            .by_epoch
            .iter()
            .filter(|(epoch, slot)| {
                let idle = slots.by_slot[slot].let_go_if_idle(IDLE);
                idle && !kept.contains(epoch)
            })
            .map(|(&e, &s)| (e, s))
            .collect();
        for (epoch, slot) in gone {
            slots.by_epoch.remove(&epoch);
            slots.by_slot.remove(&slot);
        }
    }
}
