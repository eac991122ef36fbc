//! The resync list of a demoted secondary (`REPLICA/.hbrfs/resync`): what
//! an old primary wrote after the pair's common base that the new primary
//! does not have. `hbrfs demote` writes it ([`ResyncWriter`]); the service
//! names its token in the hello reply and streams it on `Resync`; the
//! first point that carries the token (`Begin.resync_token`) covers it,
//! and the list is dropped once that point is applied ([`drop_list`]).
//! A crash before keeps it: the next hello hands it over again.
//!
//! Format: length-delimited records (as `spill` writes them): a
//! `ResyncHeader` (token, base epoch, totals), then `ResyncChunk`s exactly
//! as they travel, each closed at [`RESYNC_CHUNK_BYTES`] and with at most
//! [`MAX_RESYNC_EXTENTS`] extents per entry, so no message exceeds the
//! wire's limits. Written to `resync.tmp`, synced, renamed: the list is
//! there whole or not at all.

use std::fs;

use super::records::bad;
use super::spill::{Records, Spill};
use crate::error::{IoContext, Result};
use crate::proto::replica::ResyncHeader;
use crate::proto::replication::{ResyncChunk, ResyncPath};
use crate::state::ReplicaPaths;
use crate::wire::{MAX_RESYNC_EXTENTS, RESYNC_CHUNK_BYTES};

/// Writes a resync list, chunk by chunk.
#[derive(Debug)]
pub struct ResyncWriter {
    paths: ReplicaPaths,
    spill: Spill,
    chunk: ResyncChunk,
    bytes: usize,
    header: ResyncHeader,
    chunks: Vec<ResyncChunk>,
}

impl ResyncWriter {
    /// A new list with `token`, after the demoted side's `base_epoch`.
    pub fn create(paths: &ReplicaPaths, token: [u8; 16], base_epoch: u64) -> Result<ResyncWriter> {
        let spill = Spill::create(&paths.resync().with_extension("tmp"))?;
        Ok(ResyncWriter {
            paths: paths.clone(),
            spill,
            chunk: ResyncChunk::default(),
            bytes: 0,
            header: ResyncHeader {
                token: token.to_vec(),
                base_epoch,
                paths: 0,
                blocks: 0,
            },
            chunks: Vec::new(),
        })
    }

    /// Adds one path; its extents are split over several entries when
    /// there are more than one message may carry.
    pub fn push(&mut self, mut entry: ResyncPath) {
        self.header.paths += 1;
        self.header.blocks += entry.extents.chunks(2).map(|e| e[1]).sum::<u64>();
        loop {
            let rest = if entry.extents.len() > 2 * MAX_RESYNC_EXTENTS {
                entry.extents.split_off(2 * MAX_RESYNC_EXTENTS)
            } else {
                Vec::new()
            };
            let next = ResyncPath {
                extents: rest,
                ..entry.clone()
            };
            self.bytes += entry.path.len() + 10 * entry.extents.len() + 16;
            self.chunk.paths.push(entry);
            if self.bytes >= RESYNC_CHUNK_BYTES {
                self.chunks.push(std::mem::take(&mut self.chunk));
                self.bytes = 0;
            }
            if next.extents.is_empty() {
                return;
            }
            entry = next;
        }
    }

    /// Writes the list durably; returns (paths, blocks) listed.
    pub fn finish(mut self) -> Result<(u64, u64)> {
        if !self.chunk.paths.is_empty() {
            self.chunks.push(std::mem::take(&mut self.chunk));
        }
        self.spill.push(&self.header)?;
        for chunk in &self.chunks {
            self.spill.push(chunk)?;
        }
        self.spill.sync()?;
        let (tmp, path) = (
            self.paths.resync().with_extension("tmp"),
            self.paths.resync(),
        );
        fs::rename(&tmp, &path).at(&path)?;
        sync_dir(&self.paths)?;
        Ok((self.header.paths, self.header.blocks))
    }
}

fn sync_dir(paths: &ReplicaPaths) -> Result<()> {
    fs::File::open(&paths.dir)
        .and_then(|d| d.sync_all())
        .at(&paths.dir)
}

/// The header of the replica's resync list, `None` when it has none.
pub fn header(paths: &ReplicaPaths) -> Result<Option<ResyncHeader>> {
    let path = paths.resync();
    if !path.exists() {
        return Ok(None);
    }
    let header: Option<ResyncHeader> = Records::open(&path)?.read()?;
    match header {
        Some(h) if h.token.len() == 16 => Ok(Some(h)),
        _ => Err(bad(&path, "a resync list without its header")),
    }
}

/// The chunks of the list whose token is `token`, as they travel.
pub fn chunks(paths: &ReplicaPaths, token: &[u8]) -> Result<Vec<ResyncChunk>> {
    let path = paths.resync();
    let mut records = Records::open(&path)?;
    let header: Option<ResyncHeader> = records.read()?;
    if header.is_none_or(|h| h.token != token) {
        return Err(bad(&path, "the resync list's token changed"));
    }
    let mut chunks = Vec::new();
    while let Some(chunk) = records.read::<ResyncChunk>()? {
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// Drops the list named `token` durably: a point covering it is applied.
pub fn drop_list(paths: &ReplicaPaths) -> Result<()> {
    let path = paths.resync();
    fs::remove_file(&path).at(&path)?;
    sync_dir(paths)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::replication::PathKind;

    /// A list is written whole, read back chunk by chunk with its token,
    /// a path with more extents than one entry may carry is split, and
    /// dropping it leaves no list.
    #[test]
    fn a_resync_list_round_trips_in_bounded_chunks() {
        let dir = tempfile::tempdir().expect("temp dir");
        let paths = ReplicaPaths::of(dir.path());
        fs::create_dir_all(&paths.dir).expect("state folder");
        assert!(header(&paths).expect("none").is_none());
        let mut w = ResyncWriter::create(&paths, [7; 16], 12).expect("writer");
        let many: Vec<u64> = (0..MAX_RESYNC_EXTENTS as u64 + 3)
            .flat_map(|i| [2 * i, 1])
            .collect();
        w.push(ResyncPath {
            path: b"vm1.img".to_vec(),
            kind: PathKind::File as i32,
            extents: many,
            ..Default::default()
        });
        w.push(ResyncPath {
            path: b"gone".to_vec(),
            renamed: true,
            ..Default::default()
        });
        let (n, blocks) = w.finish().expect("finish");
        assert_eq!((n, blocks), (2, MAX_RESYNC_EXTENTS as u64 + 3));
        let h = header(&paths).expect("read").expect("some");
        assert_eq!((h.token, h.base_epoch), (vec![7; 16], 12));
        let got = chunks(&paths, &[7; 16]).expect("chunks");
        let entries: Vec<&ResyncPath> = got.iter().flat_map(|c| &c.paths).collect();
        assert_eq!(entries.len(), 3, "the long path is split in two");
        assert!(
            entries
                .iter()
                .all(|e| e.extents.len() <= 2 * MAX_RESYNC_EXTENTS)
        );
        assert!(chunks(&paths, &[8; 16]).is_err(), "another token");
        drop_list(&paths).expect("drop");
        assert!(header(&paths).expect("gone").is_none());
    }
}
