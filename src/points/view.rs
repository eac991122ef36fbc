//! A point, composed lazily: its namespace as recorded, and each block
//! read from the first undo record found walking from the point towards
//! the newest, else from the file as it is now (live, or kept by the
//! removal that took it). Opening a view reads the catalog and one
//! namespace, whatever the size of the images; nothing is copied.
//!
//! A view pins its point (retention leaves it), and each read holds the
//! points lock shared, so an apply or a thinning never runs under it;
//! the undo chain is reloaded when the catalog changed, so reads stay
//! exact while later points apply.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::namespace;
use super::store::{PointsPaths, bad, lock, read_catalog};
use super::undo::{UndoIndex, UndoRef, read_block, read_index};
use crate::error::{Error, IoContext, Result};
use crate::proto::points::{Entry, Namespace, PointRecord};
use crate::state::{ReplicaPaths, open_beneath, open_root, read_full};

/// One point of the chain a view walks, loaded.
#[derive(Debug)]
struct Link {
    epoch: u64,
    generation: u64,
    /// Undo blocks when loaded (the catalog's count).
    blocks: u64,
    index: UndoIndex,
    data: Option<File>,
    data_path: PathBuf,
    files: PathBuf,
}

impl Link {
    fn load(paths: &PointsPaths, p: &PointRecord) -> Result<Link> {
        let data_path = paths.undo_data(p.epoch, p.generation);
        let (index, _) = read_index(&paths.undo_index(p.epoch, p.generation))?;
        Ok(Link {
            epoch: p.epoch,
            generation: p.generation,
            blocks: p.undo_blocks,
            data: File::open(&data_path).ok(),
            index,
            data_path,
            files: paths.kept_files(p.epoch, p.generation),
        })
    }
}

/// What a view loaded from the catalog: the chain from its point to the
/// newest, and the newest namespace's files by inode.
#[derive(Debug, Default)]
struct Chain {
    /// The catalog's identity when loaded (inode, mtime ns, size).
    stamp: (u64, i64, u64),
    links: Vec<Link>,
    live: HashMap<u64, Vec<u8>>,
    /// Files opened for their base content, by inode.
    open: HashMap<u64, File>,
}

/// A read-only view of one retained point.
#[derive(Debug)]
pub struct PointView {
    root: PathBuf,
    replica: ReplicaPaths,
    paths: PointsPaths,
    record: PointRecord,
    namespace: Namespace,
    block_size: u64,
    chain: Mutex<Chain>,
    /// The pin, locked shared for the view's life.
    _pin: File,
    /// Opened by a rollback: it holds the points lock (reads take none)
    /// and reads while the replica is between points (a redo or in-flight
    /// record there), which other views refuse.
    settling: bool,
}

impl PointView {
    /// Opens point `epoch` of the replica at `root` (pair block size
    /// `block_size`) and pins it. A point that is not kept is a usage
    /// error naming the points there are.
    pub fn open(root: &Path, epoch: u64, block_size: u64) -> Result<PointView> {
        PointView::open_with(root, epoch, block_size, false)
    }

    /// [`PointView::open`] for a rollback, which holds the points lock
    /// exclusively (no shared lock is taken) and reads the point while the
    /// replica may be between points.
    pub fn open_to_settle(root: &Path, epoch: u64, block_size: u64) -> Result<PointView> {
        PointView::open_with(root, epoch, block_size, true)
    }

    fn open_with(root: &Path, epoch: u64, block_size: u64, settling: bool) -> Result<PointView> {
        let replica = ReplicaPaths::of(root);
        let paths = PointsPaths::new(replica.points());
        let _shared = (!settling)
            .then(|| lock(&paths.lock(), libc::LOCK_SH))
            .transpose()?;
        let points = read_catalog(&paths)?;
        let Some(record) = points.iter().find(|p| p.epoch == epoch).cloned() else {
            let kept: Vec<String> = points.iter().map(|p| p.epoch.to_string()).collect();
            return Err(Error::Usage(format!(
                "{}: no point {epoch} is kept (kept: {})",
                root.display(),
                if kept.is_empty() {
                    "none".into()
                } else {
                    kept.join(", ")
                }
            )));
        };
        let pin = super::store::open_lock(&paths.pin(epoch))?;
        crate::sys::flock(pin.as_fd(), libc::LOCK_SH).at(paths.pin(epoch))?;
        let namespace = namespace::read(&paths.namespace(epoch))?;
        Ok(PointView {
            root: root.to_path_buf(),
            replica,
            paths,
            record,
            namespace,
            block_size,
            chain: Mutex::new(Chain::default()),
            _pin: pin,
            settling,
        })
    }

    /// The point's record (epoch, time, counts).
    pub fn record(&self) -> &PointRecord {
        &self.record
    }

    /// The point's namespace: every entry, parents before children.
    pub fn entries(&self) -> &[Entry] {
        &self.namespace.entries
    }

    /// Reads up to `buf.len()` bytes at `offset` of the file with inode
    /// `ino` and size `size` in this point; returns the bytes read (short
    /// only at the end of the file).
    pub fn read(&self, ino: u64, size: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let end = size.min(offset.saturating_add(buf.len() as u64));
        if offset >= end {
            return Ok(0);
        }
        let _shared = (!self.settling)
            .then(|| lock(&self.paths.lock(), libc::LOCK_SH))
            .transpose()?;
        let between = [self.replica.redo(), self.replica.in_flight()];
        if let Some(record) = between.iter().find(|r| !self.settling && r.exists()) {
            return Err(bad(
                record,
                "an apply was interrupted and the replica is between points: \
                 start `hbrfs serve` on it to finish or roll back the apply",
            ));
        }
        let mut chain = self.chain.lock().expect("chain lock");
        self.refresh(&mut chain)?;
        let bs = self.block_size;
        let mut at = offset;
        while at < end {
            let block = at / bs;
            let dst = &mut buf[(at - offset) as usize..];
            let Some(content) = self.saved_block(&chain, ino, block)? else {
                // A run of blocks no undo holds: one read of the file now.
                let mut run = ((block + 1) * bs).min(end);
                while run < end && Self::saved(&chain, ino, run / bs).is_none() {
                    run = ((run / bs + 1) * bs).min(end);
                }
                let dst = &mut dst[..(run - at) as usize];
                let n = read_full(self.base(&mut chain, ino)?, dst, at).at(&self.root)?;
                dst[n..].fill(0);
                at = run;
                continue;
            };
            let from = (at - block * bs) as usize;
            let to = ((end - block * bs).min(bs)) as usize;
            let dst = &mut dst[..to - from];
            let have = content.len().clamp(from, to);
            dst[..have - from].copy_from_slice(&content[from..have]);
            dst[have - from..].fill(0);
            at = block * bs + to as u64;
        }
        Ok((end - offset) as usize)
    }

    /// Where the undo chain holds block `block` of inode `ino` as of this
    /// point: the first record walking from the point to the newest.
    fn saved(chain: &Chain, ino: u64, block: u64) -> Option<(&Link, &UndoRef)> {
        chain
            .links
            .iter()
            .find_map(|link| Some((link, link.index.get(&(ino, block))?)))
    }

    /// Block `block` of inode `ino` as of this point if the undo chain
    /// holds it (short where the content ends: the rest reads as zeros).
    fn saved_block(&self, chain: &Chain, ino: u64, block: u64) -> Result<Option<Vec<u8>>> {
        let Some((link, r)) = Self::saved(chain, ino, block) else {
            return Ok(None);
        };
        let data = link
            .data
            .as_ref()
            .ok_or_else(|| bad(&link.data_path, "missing, but its index names frames"))?;
        read_block(data, &link.data_path, r, self.block_size).map(Some)
    }

    /// The file inode `ino` is now: kept by a removal after this point, or
    /// live.
    fn base<'c>(&self, chain: &'c mut Chain, ino: u64) -> Result<&'c File> {
        if !chain.open.contains_key(&ino) {
            let file = self.open_base(chain, ino)?;
            chain.open.insert(ino, file);
        }
        Ok(&chain.open[&ino])
    }

    fn open_base(&self, chain: &Chain, ino: u64) -> Result<File> {
        let name = ino.to_string();
        if let Some(kept) = chain
            .links
            .iter()
            .map(|l| l.files.join(&name))
            .find(|p| p.exists())
        {
            return File::open(&kept).at(&kept);
        }
        let rel = chain.live.get(&ino).ok_or_else(|| {
            bad(
                &self.root,
                format!(
                    "inode {ino} of point {} is neither live nor kept",
                    self.record.epoch
                ),
            )
        })?;
        let root = open_root(&self.root).at(&self.root)?;
        let shown = self
            .root
            .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(rel));
        let fd = open_beneath(root.as_fd(), rel, libc::O_RDONLY, 0).at(&shown)?;
        let file = File::from(fd);
        if file.metadata().at(&shown)?.ino() != ino {
            return Err(bad(
                &shown,
                "changed behind the secondary's back (another inode)",
            ));
        }
        Ok(file)
    }

    /// Reloads the chain when the catalog changed.
    fn refresh(&self, chain: &mut Chain) -> Result<()> {
        let path = self.paths.catalog();
        let meta = std::fs::metadata(&path).at(&path)?;
        let stamp = (
            meta.ino(),
            meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
            meta.size(),
        );
        if stamp == chain.stamp && !chain.links.is_empty() {
            return Ok(());
        }
        let points = read_catalog(&self.paths)?;
        let newer: Vec<&PointRecord> = points
            .iter()
            .filter(|p| p.epoch >= self.record.epoch)
            .collect();
        if newer.first().map(|p| p.epoch) != Some(self.record.epoch) {
            return Err(bad(
                &path,
                format!("point {} is gone although pinned", self.record.epoch),
            ));
        }
        // A link is reloaded when its undo changed: a thinning (a new
        // generation) or an apply appending to it (more blocks).
        let mut old: HashMap<(u64, u64, u64), Link> = chain
            .links
            .drain(..)
            .map(|l| ((l.epoch, l.generation, l.blocks), l))
            .collect();
        for p in &newer {
            let link = match old.remove(&(p.epoch, p.generation, p.undo_blocks)) {
                Some(l) => l,
                None => Link::load(&self.paths, p)?,
            };
            chain.links.push(link);
        }
        let newest = newer.last().map_or(self.record.epoch, |p| p.epoch);
        let live = namespace::read(&self.paths.namespace(newest))?;
        chain.live = live
            .entries
            .into_iter()
            .filter(namespace::is_file)
            .map(|e| (e.ino, e.path))
            .collect();
        chain.stamp = stamp;
        Ok(())
    }
}
