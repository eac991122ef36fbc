//! One file of a sandbox: copy-on-write at block granularity over the
//! point's file. A block written in the sandbox lives in the file's
//! sparse scratch file (the whole block, copied from the point first when
//! the write covers only part of it) and is listed in the file's set of
//! written blocks; any other block reads from the point, up to the
//! shortest size the file had in the sandbox (what a shrink cut off reads
//! as zeros after a regrow), else as zeros.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::PathBuf;

use crate::error::{IoContext, Result};
use crate::mirror::point::PointBytes;
use crate::state::read_full;

/// The point's file under a sandbox file.
#[derive(Debug)]
pub struct Base {
    /// Its identity in the point's namespace (the replica inode its
    /// undo records are keyed by, or the primary's file id).
    pub ino: u64,
    /// Bytes of it still showing: its size at the point, less what
    /// shrinks cut off since.
    pub len: u64,
}

/// The content of one sandbox file.
#[derive(Debug)]
pub struct CowFile {
    /// Its size now.
    pub size: u64,
    /// Its modification time now, unix ns.
    pub mtime_ns: i64,
    /// The point's file, if the file came from the point.
    base: Option<Base>,
    /// Where its scratch file goes (made at the first write).
    path: PathBuf,
    scratch: Option<File>,
    /// Blocks whose content is the scratch file's.
    written: HashSet<u64>,
    block_size: u64,
}

impl CowFile {
    /// A file over `base` (none: made in the sandbox, empty), scratch at
    /// `path`.
    pub fn new(base: Option<Base>, mtime_ns: i64, path: PathBuf, block_size: u64) -> CowFile {
        CowFile {
            size: base.as_ref().map_or(0, |b| b.len),
            mtime_ns,
            base,
            path,
            scratch: None,
            written: HashSet::new(),
            block_size,
        }
    }

    fn scratch(&mut self) -> Result<&File> {
        if self.scratch.is_none() {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&self.path)
                .at(&self.path)?;
            self.scratch = Some(file);
        }
        Ok(self.scratch.as_ref().expect("just opened"))
    }

    /// Reads up to `len` bytes at `offset`, short at the end of the file.
    pub fn read(&self, view: &dyn PointBytes, offset: u64, len: u32) -> Result<Vec<u8>> {
        let n = self.size.saturating_sub(offset).min(u64::from(len));
        let mut buf = vec![0u8; n as usize];
        self.read_into(view, offset, &mut buf)?;
        Ok(buf)
    }

    /// Fills `buf` from `offset` (within the file's size): runs of written
    /// blocks from the scratch file, runs of others from the point in one
    /// view read each.
    fn read_into(&self, view: &dyn PointBytes, offset: u64, buf: &mut [u8]) -> Result<()> {
        let end = offset + buf.len() as u64;
        let bs = self.block_size;
        let mut at = offset;
        while at < end {
            let written = self.written.contains(&(at / bs));
            let mut run = ((at / bs + 1) * bs).min(end);
            while run < end && self.written.contains(&(run / bs)) == written {
                run = ((run / bs + 1) * bs).min(end);
            }
            let dst = &mut buf[(at - offset) as usize..(run - offset) as usize];
            let got = match (&self.scratch, &self.base) {
                (Some(f), _) if written => read_full(f, dst, at).at(&self.path)?,
                (_, Some(base)) if !written && at < base.len => {
                    let upto = (run.min(base.len) - at) as usize;
                    view.read(base.ino, base.len, at, &mut dst[..upto])?
                }
                _ => 0,
            };
            dst[got..].fill(0);
            at = run;
        }
        Ok(())
    }

    /// Writes `data` at `offset`: each block it touches that is not
    /// written yet is first copied whole into the scratch file.
    pub fn write(&mut self, view: &dyn PointBytes, offset: u64, data: &[u8]) -> Result<()> {
        let bs = self.block_size;
        let end = offset + data.len() as u64;
        for block in offset / bs..end.div_ceil(bs) {
            if self.written.contains(&block) {
                continue;
            }
            let whole = offset <= block * bs && end >= (block + 1) * bs;
            if !whole {
                let from = block * bs;
                let n = self.size.min(from + bs).saturating_sub(from);
                let mut content = vec![0u8; n as usize];
                self.read_into(view, from, &mut content)?;
                self.scratch()?
                    .write_all_at(&content, from)
                    .at(&self.path)?;
            }
            self.written.insert(block);
        }
        self.scratch()?.write_all_at(data, offset).at(&self.path)?;
        self.size = self.size.max(end);
        self.mtime_ns = crate::state::now_ns() as i64;
        Ok(())
    }

    /// Cuts or extends the file to `new_size` bytes: what a cut removes
    /// reads as zeros if the file grows again.
    pub fn truncate(&mut self, new_size: u64) -> Result<()> {
        let shrinks = new_size < self.size;
        self.size = new_size;
        self.mtime_ns = crate::state::now_ns() as i64;
        if !shrinks {
            return Ok(());
        }
        if let Some(base) = &mut self.base {
            base.len = base.len.min(new_size);
        }
        let bs = self.block_size;
        self.written.retain(|&b| b * bs < new_size);
        if let Some(f) = &self.scratch {
            f.set_len(new_size).at(&self.path)?;
        }
        Ok(())
    }

    /// Syncs the scratch file (the sandbox is thrown away at the end, but
    /// a guest's flush is honoured while it runs).
    pub fn sync(&self) -> Result<()> {
        match &self.scratch {
            Some(f) => f.sync_data().at(&self.path),
            None => Ok(()),
        }
    }
}
