//! Seeding: content already in a replica folder when it is paired (a copy
//! made by hand, a restore) is indexed before the first point, so that it
//! does not travel. Files found here get ids of their own, far above the
//! primary's ([`SEED_IDS`]).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use super::index::ContentIndex;
use crate::block::HashKey;
use crate::error::{IoContext, Result};
use crate::ids::{BlockNo, FileId};
use crate::state::{open_beneath, open_root, read_full, walk_files};

/// File ids from here up name files found in the replica folder when it
/// was paired (seeding); the primary's ids are far below.
pub const SEED_IDS: FileId = FileId(1 << 62);

/// Indexes every non-zero block of the regular files under `root`, under
/// ids of their own (from [`SEED_IDS`]); returns (files, blocks).
pub fn index_existing(
    root: &Path,
    index: &ContentIndex,
    key: &HashKey,
    block_size: u64,
) -> Result<(u64, u64)> {
    let mut files = Vec::new();
    walk_files(root, &mut |rel, _| files.push(rel))?;
    let mut blocks = 0;
    let mut buf = vec![0u8; block_size as usize];
    let root_fd = open_root(root).at(root)?;
    for (n, rel) in files.iter().enumerate() {
        let id = FileId(SEED_IDS.0 + n as u64);
        let path = root.join(OsStr::from_bytes(rel));
        let file = File::from(open_beneath(root_fd.as_fd(), rel, libc::O_RDONLY, 0).at(&path)?);
        index.set_path(id, rel)?;
        for block in 0.. {
            let len = read_full(&file, &mut buf, block * block_size).at(&path)?;
            if len == 0 {
                break;
            }
            let data = &buf[..len];
            if !crate::block::is_zero(data) {
                index.record(&key.hash(data).to_bytes(), id, BlockNo(block))?;
                blocks += 1;
            }
            if len < buf.len() {
                break;
            }
        }
    }
    index.flush()?;
    Ok((files.len() as u64, blocks))
}
