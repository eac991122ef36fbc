//! Encoding and checking the repository's records: every record is a
//! prost message compressed with zstd; a pack ends with its footer. What
//! is read back comes from the network: each bound is checked and a bad
//! object is an error naming it, never a panic.

use prost::Message;

use crate::error::{Error, Result};
use crate::proto::object::{PackEntry, PackFooter};

use super::S3Url;

/// The last 8 bytes of every pack.
pub const PACK_MAGIC: &[u8; 8] = b"HBRFSPK1";
/// Bytes after a pack's footer: its length (u32 LE) and the magic.
pub const PACK_TRAILER: usize = 4 + PACK_MAGIC.len();
/// The largest record this build decodes (a manifest of a few million
/// entries): a forged size cannot make a reader allocate more.
pub const MAX_RECORD: usize = 512 * 1024 * 1024;
/// zstd level of records: they are small and written once.
const RECORD_LEVEL: i32 = 3;

/// `record`, encoded and compressed.
pub fn seal<M: Message>(record: &M) -> Result<Vec<u8>> {
    zstd::bulk::compress(&record.encode_to_vec(), RECORD_LEVEL)
        .map_err(|e| Error::Remote(format!("compressing a record: {e}")))
}

/// The record in `bytes`, read from object `rel` of `url`.
pub fn open<M: Message + Default>(bytes: &[u8], url: &S3Url, rel: &str) -> Result<M> {
    let raw = zstd::bulk::decompress(bytes, MAX_RECORD)
        .map_err(|e| url.damaged(rel, format!("not a compressed record: {e}")))?;
    M::decode(raw.as_slice()).map_err(|e| url.damaged(rel, format!("undecodable record: {e}")))
}

/// The footer and trailer that end a pack holding `entries`.
pub fn pack_footer(entries: Vec<PackEntry>) -> Result<Vec<u8>> {
    let mut footer = seal(&PackFooter { entries })?;
    let len = u32::try_from(footer.len())
        .map_err(|_| Error::Remote("a pack footer over 4 GiB".into()))?;
    footer.extend_from_slice(&len.to_le_bytes());
    footer.extend_from_slice(PACK_MAGIC);
    Ok(footer)
}

/// The footer's length, from a pack's last [`PACK_TRAILER`] bytes.
pub fn footer_len(trailer: &[u8], url: &S3Url, rel: &str) -> Result<usize> {
    if trailer.len() < PACK_TRAILER || &trailer[trailer.len() - 8..] != PACK_MAGIC {
        return Err(url.damaged(rel, "no pack trailer (not a pack, or cut short)"));
    }
    let at = trailer.len() - PACK_TRAILER;
    let len = u32::from_le_bytes(trailer[at..at + 4].try_into().expect("4 bytes")) as usize;
    Ok(len)
}

/// The entries of the pack `rel` of `size` bytes, from its `tail` (at
/// least the footer and trailer), each checked to lie inside the pack's
/// blobs.
pub fn parse_footer(tail: &[u8], size: u64, url: &S3Url, rel: &str) -> Result<Vec<PackEntry>> {
    let len = footer_len(tail, url, rel)?;
    let need = len + PACK_TRAILER;
    if tail.len() < need || (size as usize) < need {
        return Err(url.damaged(rel, format!("footer of {len} bytes does not fit")));
    }
    let footer = &tail[tail.len() - need..tail.len() - PACK_TRAILER];
    let PackFooter { entries } = open(footer, url, rel)?;
    let blobs_end = size - need as u64;
    for e in &entries {
        check_entry(e, blobs_end, url, rel)?;
    }
    Ok(entries)
}

/// Checks that `e` names a 16-byte hash and lies within `blobs_end`.
pub fn check_entry(e: &PackEntry, blobs_end: u64, url: &S3Url, rel: &str) -> Result<()> {
    if e.hash.len() != 16 {
        return Err(url.damaged(
            rel,
            format!("an entry with a hash of {} bytes", e.hash.len()),
        ));
    }
    if e.offset.saturating_add(u64::from(e.stored)) > blobs_end {
        return Err(url.damaged(
            rel,
            format!(
                "an entry at {}+{} past the blobs' end {blobs_end}",
                e.offset, e.stored
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::object::BlobKind;

    fn url() -> S3Url {
        S3Url::parse("s3://b/p").unwrap().unwrap()
    }

    #[test]
    fn a_footer_reads_back_and_damage_is_named() {
        let entry = PackEntry {
            hash: vec![7; 16],
            offset: 0,
            stored: 10,
            raw: 20,
            kind: BlobKind::Block as i32,
        };
        let mut pack = vec![1u8; 10];
        pack.extend(pack_footer(vec![entry.clone()]).unwrap());
        let size = pack.len() as u64;
        assert_eq!(
            parse_footer(&pack, size, &url(), "data/x").unwrap(),
            vec![entry]
        );
        let cut = &pack[..pack.len() - 1];
        let e = parse_footer(cut, size - 1, &url(), "data/x").unwrap_err();
        assert!(e.to_string().contains("s3://b/p/data/x"), "{e}");
        let mut past = vec![1u8; 5];
        past.extend(
            pack_footer(vec![PackEntry {
                stored: 10,
                ..Default::default()
            }])
            .unwrap(),
        );
        let e = parse_footer(&past, past.len() as u64, &url(), "data/y").unwrap_err();
        assert!(e.to_string().contains("hash of 0 bytes"), "{e}");
        assert!(open::<PackFooter>(b"garbage", &url(), "index/z").is_err());
    }
}
