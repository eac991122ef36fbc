//! The mirror's view of the point before while a point that changes only
//! block content is in flight: the old content of every block the point
//! has overwritten so far, by (inode, block), read from the undo it was
//! saved to. The mirror patches what it reads from the live replica with
//! it, so it keeps serving the point before for the whole transfer instead
//! of waiting for the commit. A point that changes the namespace or a
//! size holds the mirror out instead (see `inflight`).
//!
//! Order: a batch's old content is saved and synced, then entered here
//! (under the write lock), then written in place; a read holds the read
//! lock across its read of the replica and its patching, so a block is
//! either read before it is overwritten or patched from the undo.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::error::{IoContext, Result};
use crate::points::undo::{UndoRef, read_block};

/// The overlay the store and its mirror share.
pub type SharedOverlay = Arc<RwLock<Overlay>>;

/// Old content of the blocks a data-only point in flight overwrote.
#[derive(Debug, Default)]
pub struct Overlay {
    /// The undo data file and its path, while active.
    data: Option<(File, PathBuf)>,
    block_size: u64,
    blocks: HashMap<(u64, u64), UndoRef>,
}

impl Overlay {
    /// Starts serving the point before from the undo data at `path`.
    pub fn start(&mut self, path: &Path, block_size: u64) -> Result<()> {
        let file = File::open(path).at(path)?;
        *self = Overlay {
            data: Some((file, path.to_path_buf())),
            block_size,
            blocks: HashMap::new(),
        };
        Ok(())
    }

    /// Whether a point in flight is served through it.
    pub fn is_active(&self) -> bool {
        self.data.is_some()
    }

    /// Block `block` of inode `ino` is about to be overwritten; its old
    /// content was saved at `saved` (the first save of a block wins).
    pub fn insert(&mut self, ino: u64, block: u64, saved: UndoRef) {
        if self.is_active() {
            self.blocks.entry((ino, block)).or_insert(saved);
        }
    }

    /// Stops serving: the point is committed or rolled back.
    pub fn clear(&mut self) {
        *self = Overlay::default();
    }

    /// Patches `buf`, read at `offset` of the replica file with inode
    /// `ino`, with the old content of the blocks the point overwrote.
    pub fn patch(&self, ino: u64, offset: u64, buf: &mut [u8]) -> Result<()> {
        let Some((data, path)) = &self.data else {
            return Ok(());
        };
        let bs = self.block_size;
        let end = offset + buf.len() as u64;
        for block in offset / bs..end.div_ceil(bs) {
            let Some(saved) = self.blocks.get(&(ino, block)) else {
                continue;
            };
            let old = read_block(data, path, saved, bs)?;
            let (from, to) = ((block * bs).max(offset), ((block + 1) * bs).min(end));
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            let old = old.get((from - block * bs) as usize..).unwrap_or_default();
            let n = old.len().min(dst.len());
            dst[..n].copy_from_slice(&old[..n]);
            dst[n..].fill(0);
        }
        Ok(())
    }
}
