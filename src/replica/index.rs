//! The content index of a replica: which content it holds where, so that
//! an offer of content already here is not sent again (DESIGN invariant
//! 3). Hints only: a location found here is read and re-hashed before its
//! content is used ([`ContentIndex::find`]).
//!
//! Two sled trees in `REPLICA/.hbrfs/index`: `index` maps a block hash to
//! its location (file id and block number, 8 bytes big-endian each), and
//! `files` maps a file id (8 bytes big-endian) to its path below the root.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::confine;
use crate::block::{BlockHash, HashKey};
use crate::error::{Error, Result};
use crate::ids::{BlockNo, FileId};

/// The open index: hash → (file id, block), and file id → path.
#[derive(Debug)]
pub struct ContentIndex {
    /// The sled folder, for messages.
    path: PathBuf,
    db: sled::Db,
    index: sled::Tree,
    files: sled::Tree,
}

/// A location as the `index` tree stores it.
fn encode(file: FileId, block: BlockNo) -> [u8; 16] {
    let mut loc = [0u8; 16];
    loc[..8].copy_from_slice(&file.0.to_be_bytes());
    loc[8..].copy_from_slice(&block.0.to_be_bytes());
    loc
}

/// The location an `index` entry names; `None` when it is not one (not
/// exactly 16 bytes).
fn decode(loc: &[u8]) -> Option<(FileId, BlockNo)> {
    let file = u64::from_be_bytes(loc.get(..8)?.try_into().ok()?);
    let block = u64::from_be_bytes(loc.get(8..)?.try_into().ok()?);
    Some((FileId(file), BlockNo(block)))
}

impl ContentIndex {
    /// Opens (creating if needed) the index in the sled folder `path`.
    pub fn open(path: &Path) -> Result<ContentIndex> {
        let journal = |source| Error::Journal {
            path: path.to_path_buf(),
            source,
        };
        crate::state::make_state_dirs(path)?;
        let db = sled::Config::new().path(path).open().map_err(journal)?;
        crate::state::make_private_tree(path)?;
        let index = db.open_tree("index").map_err(journal)?;
        let files = db.open_tree("files").map_err(journal)?;
        Ok(ContentIndex {
            path: path.to_path_buf(),
            db,
            index,
            files,
        })
    }

    fn sled<T>(&self, r: sled::Result<T>) -> Result<T> {
        r.map_err(|source| Error::Journal {
            path: self.path.clone(),
            source,
        })
    }

    /// Files the index knows.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    /// Where the replica keeps file `id`, if known.
    pub fn file_path(&self, id: FileId) -> Result<Option<Vec<u8>>> {
        Ok(self
            .sled(self.files.get(id.0.to_be_bytes()))?
            .map(|v| v.to_vec()))
    }

    /// Records that file `id` lives at `rel` below the root.
    pub fn set_path(&self, id: FileId, rel: &[u8]) -> Result<()> {
        self.sled(self.files.insert(id.0.to_be_bytes(), rel))?;
        Ok(())
    }

    /// Records that block `block` of file `file` holds content of `hash`
    /// (the hash's bytes, as offered).
    pub fn record(&self, hash: &[u8], file: FileId, block: BlockNo) -> Result<()> {
        self.sled(self.index.insert(hash, &encode(file, block)))?;
        Ok(())
    }

    /// Keeps the file paths right after a rename of `from` to `to`.
    pub fn repath(&self, from: &[u8], to: &[u8]) -> Result<()> {
        for kv in self.files.iter() {
            let (k, v) = self.sled(kv)?;
            if let Some(rest) = v.strip_prefix(from)
                && (rest.is_empty() || rest[0] == b'/')
            {
                self.sled(self.files.insert(k, [to, rest].concat()))?;
            }
        }
        Ok(())
    }

    /// Makes what was recorded durable (before the point is applied).
    pub fn flush(&self) -> Result<()> {
        self.sled(self.db.flush())?;
        Ok(())
    }

    /// Content the replica at `root` verifiably holds for `hash`, `length`
    /// bytes long: read from where the index points and re-hashed.
    pub fn find(
        &self,
        root: &Path,
        block_size: u64,
        key: &HashKey,
        hash: BlockHash,
        length: usize,
    ) -> Result<Option<Vec<u8>>> {
        let Some(loc) = self.sled(self.index.get(hash.to_bytes()))? else {
            return Ok(None);
        };
        let Some((id, block)) = decode(&loc) else {
            return Ok(None);
        };
        let Some(rel) = self.file_path(id)? else {
            return Ok(None);
        };
        let Some(file) = confine::open_file(root, &rel) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; length];
        let at = block.0 * block_size;
        if file.read_exact_at(&mut buf, at).is_err() || key.hash(&buf) != hash {
            return Ok(None);
        }
        Ok(Some(buf))
    }
}
