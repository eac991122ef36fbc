//! A point of an object-store repository as [`PointBytes`] and a
//! [`Tree`]: what `mount-point` and `test-failover` of an `s3://` point
//! serve, through the same ops as a replica's point.
//!
//! FUSE callbacks run on fuser's threads; each read drives the reader's
//! async fetches on a tokio runtime this point owns (`block_on` from the
//! FUSE thread, never from inside the runtime), so read-ahead goes on in
//! the runtime's workers between reads.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::point::PointBytes;
use super::tree::{Node, Tree};
use crate::error::{IoContext, Result};
use crate::object::read::PointReader;

/// One object-store point, read lazily.
#[derive(Debug)]
pub struct ObjectPoint {
    rt: tokio::runtime::Runtime,
    reader: Arc<PointReader>,
}

impl ObjectPoint {
    /// `reader`'s point, its reads run on `rt`.
    pub fn new(rt: tokio::runtime::Runtime, reader: PointReader) -> ObjectPoint {
        ObjectPoint {
            rt,
            reader: Arc::new(reader),
        }
    }

    /// The reader.
    pub fn reader(&self) -> &PointReader {
        &self.reader
    }

    /// The point's inode table: its namespace under its recorded root.
    pub fn tree(&self) -> Result<Tree> {
        let m = self.reader.manifest();
        let root = m.root.clone().unwrap_or_default();
        let top = Node {
            mode: if root.mode & libc::S_IFMT == libc::S_IFDIR {
                root.mode
            } else {
                libc::S_IFDIR | 0o755
            },
            uid: root.uid,
            gid: root.gid,
            size: root.size,
            mtime_ns: root.mtime_ns,
            rdev: 0,
            nlink: 2,
            replica_ino: root.ino,
            target: Vec::new(),
            children: Default::default(),
        };
        Tree::build(self.reader.namespace(), top, Path::new(&self.reader.name()))
    }
}

impl PointBytes for ObjectPoint {
    fn read(&self, ino: u64, size: u64, offset: u64, buf: &mut [u8]) -> Result<usize> {
        let len = size.saturating_sub(offset).min(buf.len() as u64);
        let data = self.rt.block_on(self.reader.read(ino, offset, len))?;
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        Ok(n)
    }

    fn fetched(&self) -> Option<(u64, u64)> {
        let f = self.reader.fetched();
        Some((
            f.gets.load(Ordering::Relaxed),
            f.bytes.load(Ordering::Relaxed),
        ))
    }
}

/// A runtime for an object point's reads: a few workers for the fetches
/// and read-ahead in flight.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .thread_name("hbrfs-object")
        .enable_all()
        .build()
        .at("tokio runtime")
}
