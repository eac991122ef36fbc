//! Pre-images: the content a block had at the cut, saved just before a
//! write overwrites it while its epoch is still shipping, so the epoch
//! ships as it was at its cut (invariant 2). Kept in a file in the state
//! folder, not in memory: a guest rewriting a whole disk during a slow ship
//! costs disk, not RAM.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};

/// One file's saved blocks for the epoch being shipped.
#[derive(Debug)]
pub struct PreImages {
    path: PathBuf,
    file: File,
    /// block → (offset in `file`, length)
    index: HashMap<u64, (u64, usize)>,
    end: u64,
}

impl PreImages {
    /// An empty store backed by `path` (replaced if it exists).
    pub fn create(path: &Path) -> Result<PreImages> {
        let file = crate::state::state_file_options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .at(path)?;
        Ok(PreImages {
            path: path.to_path_buf(),
            file,
            index: HashMap::new(),
            end: 0,
        })
    }

    /// Whether `block` was saved.
    pub fn contains(&self, block: u64) -> bool {
        self.index.contains_key(&block)
    }

    /// Saves `data` as the cut-time content of `block`.
    pub fn save(&mut self, block: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, self.end).at(&self.path)?;
        self.index.insert(block, (self.end, data.len()));
        self.end += data.len() as u64;
        Ok(())
    }

    /// The saved content of `block`, if any.
    pub fn get(&self, block: u64) -> Result<Option<Vec<u8>>> {
        let Some(&(offset, len)) = self.index.get(&block) else {
            return Ok(None);
        };
        let mut buf = vec![0u8; len];
        self.file.read_exact_at(&mut buf, offset).at(&self.path)?;
        Ok(Some(buf))
    }

    /// Number of saved blocks.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing was saved.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}

impl Drop for PreImages {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
