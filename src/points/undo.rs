//! Undo records: the content an apply overwrites, saved first.
//!
//! A point's undo at generation G is two append-only files and a folder:
//! `undo-G.data` holds zstd frames (level 1) of old blocks; `undo-G.idx`
//! holds one fixed 40-byte little-endian record per saved block — inode
//! (u64), block number (u64), offset in the data file (u64), stored length
//! (u32), content length (u32, short for the block holding a file's end),
//! flags (u32: 1 = the block was zeros, nothing stored; 2 = stored
//! uncompressed), reserved (u32);
//! `files-G/<ino>` are hard links to files the next point removed. A
//! record torn by a crash (a partial last record) is cut off at open.
//!
//! The writer saves each block once per point, only below the file's size
//! before the point (what lies beyond reads as nothing in older points),
//! and syncs a batch of saves before the apply overwrites that batch.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::store::{PointsPaths, bad};
use crate::block;
use crate::error::{IoContext, Result};
use crate::state::{make_state_dirs, read_full, state_file_options};
use crate::sys;

/// Bytes of one index record.
const RECORD: usize = 40;
/// Flag: the old block was all zeros (nothing stored).
const ZERO: u32 = 1;
/// Flag: the old block is stored as it was (it did not compress).
const RAW: u32 = 2;
/// Bytes of a block compressed first to tell whether it compresses.
const PROBE: usize = 4096;
/// zstd level of saved blocks: the cheapest, an apply waits for it.
const LEVEL: i32 = 1;

/// Where one saved block lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UndoRef {
    /// Offset of its frame in the data file.
    pub offset: u64,
    /// Bytes of its frame.
    pub stored: u32,
    /// Bytes of content (the rest of the block, up to the point's file
    /// size, reads as zeros).
    pub length: u32,
    /// The block was zeros.
    pub zero: bool,
    /// The block is stored uncompressed.
    pub raw: bool,
}

/// (inode, block) → where its old content lies.
pub type UndoIndex = HashMap<(u64, u64), UndoRef>;

fn encode(ino: u64, block: u64, r: &UndoRef) -> [u8; RECORD] {
    let mut out = [0u8; RECORD];
    out[0..8].copy_from_slice(&ino.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    out[16..24].copy_from_slice(&r.offset.to_le_bytes());
    out[24..28].copy_from_slice(&r.stored.to_le_bytes());
    out[28..32].copy_from_slice(&r.length.to_le_bytes());
    let flags = if r.zero { ZERO } else { 0 } | if r.raw { RAW } else { 0 };
    out[32..36].copy_from_slice(&flags.to_le_bytes());
    out
}

fn decode(rec: &[u8]) -> (u64, u64, UndoRef) {
    let u64_at = |at: usize| u64::from_le_bytes(rec[at..at + 8].try_into().expect("8 bytes"));
    let u32_at = |at: usize| u32::from_le_bytes(rec[at..at + 4].try_into().expect("4 bytes"));
    let r = UndoRef {
        offset: u64_at(16),
        stored: u32_at(24),
        length: u32_at(28),
        zero: u32_at(32) & ZERO != 0,
        raw: u32_at(32) & RAW != 0,
    };
    (u64_at(0), u64_at(8), r)
}

/// Reads the undo index at `path` (none when it does not exist), with the
/// whole records' length: a partial last record is not one.
pub fn read_index(path: &Path) -> Result<(UndoIndex, u64)> {
    let bytes = match std::fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((UndoIndex::new(), 0)),
        read => read.at(path)?,
    };
    let whole = bytes.len() - bytes.len() % RECORD;
    let mut index = UndoIndex::new();
    for rec in bytes[..whole].chunks_exact(RECORD) {
        let (ino, block, r) = decode(rec);
        index.entry((ino, block)).or_insert(r);
    }
    Ok((index, whole as u64))
}

/// Reads one saved block from `data` (at `data_path`) into `out` (its
/// content length; zeros for a zero block), checking its bounds.
pub fn read_block(data: &File, data_path: &Path, r: &UndoRef, block_size: u64) -> Result<Vec<u8>> {
    if u64::from(r.length) > block_size {
        return Err(bad(
            data_path,
            format!("a saved block of {} bytes", r.length),
        ));
    }
    if r.zero {
        return Ok(vec![0u8; r.length as usize]);
    }
    let mut frame = vec![0u8; r.stored as usize];
    data.read_exact_at(&mut frame, r.offset).at(data_path)?;
    if r.raw {
        if r.stored != r.length {
            return Err(bad(
                data_path,
                format!("a raw block at {} of the wrong length", r.offset),
            ));
        }
        return Ok(frame);
    }
    let content = block::decompress(&frame, r.length as usize)
        .map_err(|e| bad(data_path, format!("frame at {}: {e}", r.offset)))?;
    if content.len() != r.length as usize {
        return Err(bad(data_path, format!("frame at {} is short", r.offset)));
    }
    Ok(content)
}

/// `block` compressed, or `None` when it does not compress (random or
/// already compressed data: its first bytes are tried first, so such a
/// block costs a copy, not a full compression).
fn compressed(block: &[u8]) -> std::io::Result<Option<Vec<u8>>> {
    let probe = &block[..block.len().min(PROBE)];
    if block::compress(probe, LEVEL)?.len() * 100 > probe.len() * 95 {
        return Ok(None);
    }
    let frame = block::compress(block, LEVEL)?;
    Ok((frame.len() < block.len()).then_some(frame))
}

/// Appends, for one apply, the old content of what it overwrites to the
/// undo of the point before it.
#[derive(Debug)]
pub struct UndoWriter {
    index_path: PathBuf,
    data_path: PathBuf,
    files: PathBuf,
    index: File,
    data: File,
    data_len: u64,
    /// Index records, the ones of an interrupted apply included.
    records: u64,
    /// File sizes before the apply, as the apply first saw each file.
    sizes: HashMap<u64, u64>,
    /// Index records of frames written but not yet synced.
    pending_index: Vec<u8>,
    block_size: u64,
}

fn append(path: &Path) -> Result<File> {
    state_file_options()
        .append(true)
        .create(true)
        .open(path)
        .at(path)
}

impl UndoWriter {
    /// The undo of point `epoch` at `generation`, opened for appending.
    /// A replayed apply may save a block an interrupted one saved: the
    /// second record holds the new content, but the first record of a
    /// block is the one every reader takes ([`read_index`]), so nothing
    /// is remembered in memory (a point of a million blocks costs no
    /// memory per block).
    pub fn open(
        paths: &PointsPaths,
        epoch: u64,
        generation: u64,
        block_size: u64,
    ) -> Result<UndoWriter> {
        let index_path = paths.undo_index(epoch, generation);
        let data_path = paths.undo_data(epoch, generation);
        let files = paths.kept_files(epoch, generation);
        make_state_dirs(&files)?;
        let (_, whole) = read_index(&index_path)?;
        let index_file = append(&index_path)?;
        index_file.set_len(whole).at(&index_path)?;
        let data = append(&data_path)?;
        let data_len = data.metadata().at(&data_path)?.len();
        Ok(UndoWriter {
            records: whole / RECORD as u64,
            index: index_file,
            data,
            data_len,
            index_path,
            data_path,
            files,
            sizes: HashMap::new(),
            pending_index: Vec::new(),
            block_size,
        })
    }

    /// Notes the size of file `ino` before the apply changes it (the first
    /// time the apply sees it): blocks at or past it are not saved.
    pub fn note_size(&mut self, ino: u64, size: u64) {
        self.sizes.entry(ino).or_insert(size);
    }

    /// Saves block `block` of `file` (inode `ino`) as it is now, unless it
    /// lies past the file's size before the apply, or it is zeros and
    /// `zero_next` (the apply writes zeros there too: nothing changes);
    /// returns where it was saved, if it was. Not durable until
    /// [`UndoWriter::sync`].
    pub fn save(
        &mut self,
        file: &File,
        ino: u64,
        block: u64,
        zero_next: bool,
        shown: &Path,
    ) -> Result<Option<UndoRef>> {
        let size = match self.sizes.get(&ino) {
            Some(&size) => size,
            None => file.metadata().at(shown)?.size(),
        };
        let at = block * self.block_size;
        if at >= size {
            return Ok(None);
        }
        let mut buf = vec![0u8; (size - at).min(self.block_size) as usize];
        let n = read_full(file, &mut buf, at).at(shown)?;
        buf.truncate(n);
        let mut r = UndoRef {
            offset: self.data_len,
            stored: 0,
            length: n as u32,
            zero: block::is_zero(&buf),
            raw: false,
        };
        if r.zero && zero_next {
            return Ok(None);
        }
        if !r.zero {
            let frame = compressed(&buf).at(&self.data_path)?;
            r.raw = frame.is_none();
            let stored = frame.as_deref().unwrap_or(&buf);
            r.stored = stored.len() as u32;
            self.data.write_all(stored).at(&self.data_path)?;
            self.data_len += stored.len() as u64;
        }
        self.pending_index
            .extend_from_slice(&encode(ino, block, &r));
        self.records += 1;
        Ok(Some(r))
    }

    /// Saves the blocks of `file` that a shrink to `new_size` cuts off or
    /// cuts into, and syncs them: call before the shrink.
    pub fn save_tail(&mut self, file: &File, ino: u64, new_size: u64, shown: &Path) -> Result<()> {
        let size = file.metadata().at(shown)?.size();
        self.note_size(ino, size);
        let end = size.div_ceil(self.block_size);
        for block in new_size / self.block_size..end {
            self.save(file, ino, block, false, shown)?;
        }
        self.sync()
    }

    /// Keeps the file `name` in `dir` (stat `st`), which the apply is about
    /// to remove or replace: a hard link in `files-G/`, when it is a
    /// regular file with no other name (one with other names lives on, and
    /// its blocks are saved as they are overwritten).
    pub fn keep_removed(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        st: &libc::stat,
    ) -> Result<()> {
        if st.st_mode & libc::S_IFMT != libc::S_IFREG || st.st_nlink > 1 {
            return Ok(());
        }
        let files = sys::openat(
            None,
            self.files.as_os_str(),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )
        .at(&self.files)?;
        let link = std::ffi::OsString::from(st.st_ino.to_string());
        if sys::statat(files.as_fd(), &link).is_ok() {
            return Ok(());
        }
        sys::linkat(dir, name, files.as_fd(), &link).at(self.files.join(&link))
    }

    /// The data file saved blocks are in (see [`UndoRef`]).
    pub fn data_path(&self) -> &Path {
        &self.data_path
    }

    /// Syncs what was saved since the last sync: the frames (written as
    /// they were saved) first, then the index records that point into
    /// them, written and synced.
    pub fn sync(&mut self) -> Result<()> {
        if self.pending_index.is_empty() {
            return Ok(());
        }
        self.data.sync_data().at(&self.data_path)?;
        self.index
            .write_all(&self.pending_index)
            .and_then(|_| self.index.sync_data())
            .at(&self.index_path)?;
        self.pending_index.clear();
        Ok(())
    }

    /// Syncs the rest; returns the undo's size: bytes of data and blocks.
    pub fn finish(&mut self) -> Result<(u64, u64)> {
        self.sync()?;
        Ok((self.data_len, self.records))
    }
}

/// Writes a whole undo index durably (a thinning's next generation).
pub fn write_index(path: &Path, index: &UndoIndex) -> Result<()> {
    let mut bytes = Vec::with_capacity(index.len() * RECORD);
    for (&(ino, block), r) in index {
        bytes.extend_from_slice(&encode(ino, block, r));
    }
    crate::state::write_durably(path, &bytes)
}
