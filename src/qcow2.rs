//! A sequential qcow2 v3 image writer, so a recovery point (or the change
//! between two points) can leave the secondary as a file any qemu tool
//! reads, chained onto the previous export as its backing file.
//!
//! Layout of a finished image, cluster by cluster, every cluster used once
//! (refcount 1, so the image has neither leaks nor shared clusters):
//!
//! ```text
//! 0            header (104 bytes), header extensions, backing file name
//! 1 ..         data clusters, in the order they were given
//! then         L2 tables, ascending guest order, only where a cluster was given
//! then         the L1 table (virtual size / (cluster size * cluster size / 8) entries)
//! then         refcount blocks (16-bit refcounts), then the refcount table
//! ```
//!
//! Everything is big-endian. The header is written last, after the rest is
//! durable, so an interrupted export leaves a file without a qcow2 header
//! rather than a header pointing at half-written tables.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, IoContext, Result};
use crate::ids::BlockNo;

/// "QFI\xfb".
const MAGIC: u32 = 0x5146_49fb;
/// Length of the version 3 header without extensions.
const HEADER_LEN: u64 = 104;
/// Header extension naming the backing file's format.
const BACKING_FORMAT_EXT: u32 = 0xE279_2ACA;
/// 2^4 = 16-bit refcounts, qemu's default.
const REFCOUNT_ORDER: u32 = 4;
/// L1/L2 flag: the cluster's refcount is exactly one.
const OFLAG_COPIED: u64 = 1 << 63;
/// L2 flag: the cluster reads as zeros, without data and without falling
/// through to the backing file.
const OFLAG_ZERO: u64 = 1;
/// qemu refuses larger L1 tables (`QCOW_MAX_L1_SIZE`).
const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu refuses longer backing file names.
const MAX_BACKING_NAME: usize = 1023;
/// L2 entries hold host offsets in bits 9..=55.
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// The file an image's unwritten clusters read from, as the header stores
/// it: qemu resolves a relative name against the image's own folder.
#[derive(Clone, Copy, Debug)]
pub struct Backing<'a> {
    /// The backing file's name, e.g. the previous export's file name.
    pub file: &'a str,
    /// Its format, e.g. `"qcow2"` or `"raw"`, so qemu does not probe it.
    pub format: &'a str,
}

/// Writes a qcow2 v3 image sequentially: data clusters are appended as
/// given, in any guest order; the tables are written by
/// [`Qcow2Writer::finish`]. Memory follows the number of clusters given
/// (one map entry each) plus the L1 table.
#[derive(Debug)]
pub struct Qcow2Writer {
    file: File,
    path: PathBuf,
    /// Cluster size in bytes, a power of two.
    cluster: u64,
    /// Virtual size in bytes, rounded up to 512 as qemu counts it.
    virtual_size: u64,
    /// Backing file name and format, owned until the header is written.
    backing: Option<(String, String)>,
    /// Guest cluster → its L2 entry (data offset with COPIED, or ZERO).
    entries: BTreeMap<u64, u64>,
    /// Host offset of the next free cluster (cluster 0 is the header's).
    next: u64,
}

impl Qcow2Writer {
    /// Creates `path` (which must not exist: an export never clobbers a
    /// file, least of all its own backing file) for an image of
    /// `virtual_size` bytes in clusters of `cluster_size` bytes (a power of
    /// two in 512..=2 MiB; hbrfs uses its block size, 64 KiB by default).
    /// qemu counts sizes in 512-byte sectors, so a size that is not a
    /// multiple of 512 is rounded up and its tail reads as zeros, as qemu
    /// shows a raw file of that size. Without `backing`, unwritten clusters
    /// read as zeros; with it, they read from the backing file.
    pub fn create(
        path: &Path,
        virtual_size: u64,
        cluster_size: u32,
        backing: Option<Backing<'_>>,
    ) -> Result<Qcow2Writer> {
        let cluster = u64::from(cluster_size);
        if !cluster.is_power_of_two() || !(512..=2 << 20).contains(&cluster) {
            return Err(usage(
                path,
                format!("cluster size {cluster_size} is not a power of two from 512 to 2 MiB"),
            ));
        }
        let virtual_size = checked_size(path, virtual_size, cluster)?;
        if let Some(b) = backing {
            check_backing(path, b, cluster)?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .at(path)?;
        Ok(Qcow2Writer {
            file,
            path: path.to_path_buf(),
            cluster,
            virtual_size,
            backing: backing.map(|b| (b.file.to_owned(), b.format.to_owned())),
            entries: BTreeMap::new(),
            next: cluster,
        })
    }

    /// Stores the data of guest cluster `index`. `data` is one cluster
    /// long, or shorter for the image's last cluster (padded with zeros).
    /// Each cluster is given at most once, by this or by
    /// [`Qcow2Writer::zero_cluster`]: a second time is an error, since it
    /// means the caller lost track of what it exported.
    pub fn write_cluster(&mut self, index: BlockNo, data: &[u8]) -> Result<()> {
        self.check_new(index)?;
        let len = data.len() as u64;
        let last = index.0 == self.clusters() - 1;
        if len > self.cluster || (len < self.cluster && !last) {
            return Err(usage(
                &self.path,
                format!(
                    "cluster {} has {len} bytes, clusters hold {} (only the last may be shorter)",
                    index.0, self.cluster
                ),
            ));
        }
        let offset = self.append(data)?;
        self.entries.insert(index.0, offset | OFLAG_COPIED);
        Ok(())
    }

    /// Marks guest cluster `index` as reading zeros (the L2 zero flag, no
    /// data), so it does not fall through to the backing file: a block that
    /// became zero between two points reads as zero in the chain.
    pub fn zero_cluster(&mut self, index: BlockNo) -> Result<()> {
        self.check_new(index)?;
        self.entries.insert(index.0, OFLAG_ZERO);
        Ok(())
    }

    /// Writes the L2 tables, the L1 table, the refcounts, fsyncs, then
    /// writes the header and fsyncs again. Clusters never given are
    /// unallocated: they read from the backing file, or as zeros without
    /// one.
    pub fn finish(mut self) -> Result<()> {
        let l1 = self.write_l2_tables()?;
        let l1_offset = self.append(&table_bytes(&l1))?;
        let (refcount_table, refcount_clusters) = self.write_refcounts()?;
        self.file.sync_all().at(&self.path)?;
        let header = self.header(
            l1.len() as u32,
            l1_offset,
            refcount_table,
            refcount_clusters,
        );
        self.file.write_all_at(&header, 0).at(&self.path)?;
        self.file.sync_all().at(&self.path)
    }

    /// Guest clusters in the image.
    fn clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cluster)
    }

    /// Refuses an index past the end or one already given.
    fn check_new(&self, index: BlockNo) -> Result<()> {
        if index.0 >= self.clusters() {
            return Err(usage(
                &self.path,
                format!(
                    "cluster {} is past the end: the image has {} clusters of {} bytes",
                    index.0,
                    self.clusters(),
                    self.cluster
                ),
            ));
        }
        if self.entries.contains_key(&index.0) {
            return Err(usage(
                &self.path,
                format!(
                    "cluster {} was already given: each cluster is given once",
                    index.0
                ),
            ));
        }
        Ok(())
    }

    /// Writes `bytes` at the next free cluster, zero-padded to whole
    /// clusters (at least one); returns its host offset.
    fn append(&mut self, bytes: &[u8]) -> Result<u64> {
        let len = (bytes.len() as u64).div_ceil(self.cluster).max(1) * self.cluster;
        let offset = self.next;
        if offset + len > MAX_HOST_OFFSET {
            return Err(usage(
                &self.path,
                "the image outgrew qcow2's 64 PiB of host offsets".into(),
            ));
        }
        self.file.write_all_at(bytes, offset).at(&self.path)?;
        let pad = len - bytes.len() as u64;
        if pad > 0 {
            let zeros = vec![0; pad as usize];
            self.file
                .write_all_at(&zeros, offset + bytes.len() as u64)
                .at(&self.path)?;
        }
        self.next = offset + len;
        Ok(offset)
    }

    /// Writes one L2 table per L1 slot that covers a given cluster;
    /// returns the L1 table.
    fn write_l2_tables(&mut self) -> Result<Vec<u64>> {
        let per_l2 = self.cluster / 8;
        let mut l1 = vec![0; self.clusters().div_ceil(per_l2) as usize];
        let mut l2 = vec![0; per_l2 as usize];
        let entries = std::mem::take(&mut self.entries);
        let mut entries = entries.into_iter().peekable();
        while let Some(&(first, _)) = entries.peek() {
            let slot = first / per_l2;
            l2.fill(0);
            while let Some((index, entry)) = entries.next_if(|(i, _)| i / per_l2 == slot) {
                l2[(index % per_l2) as usize] = entry;
            }
            l1[slot as usize] = self.append(&table_bytes(&l2))? | OFLAG_COPIED;
        }
        Ok(l1)
    }

    /// Writes refcount blocks giving every cluster of the file, their own
    /// included, a refcount of one, then the refcount table; returns the
    /// table's offset and length in clusters.
    fn write_refcounts(&mut self) -> Result<(u64, u32)> {
        let per_block = self.cluster / 2;
        let per_table_cluster = self.cluster / 8;
        let used = self.next / self.cluster;
        // The refcount clusters count themselves: grow until they cover all.
        let (mut blocks, mut tables) = (0, 0);
        loop {
            let need = (used + blocks + tables).div_ceil(per_block);
            let need_tables = need.div_ceil(per_table_cluster);
            if (need, need_tables) == (blocks, tables) {
                break;
            }
            (blocks, tables) = (need, need_tables);
        }
        let total = used + blocks + tables;
        let mut offsets = Vec::with_capacity(blocks as usize);
        let mut block = vec![0; self.cluster as usize];
        for first in (0..blocks).map(|b| b * per_block) {
            block.fill(0);
            let ones = (total - first).min(per_block) as usize;
            for count in block[..ones * 2].chunks_exact_mut(2) {
                count.copy_from_slice(&1u16.to_be_bytes());
            }
            offsets.push(self.append(&block)?);
        }
        let table = self.append(&table_bytes(&offsets))?;
        // At most a few clusters: the L1 limit bounds the image.
        Ok((table, tables as u32))
    }

    /// The header cluster: header, extensions, backing file name.
    fn header(&self, l1_size: u32, l1: u64, refcounts: u64, refcount_clusters: u32) -> Vec<u8> {
        let backing = self.backing.as_ref();
        let name_offset = HEADER_LEN + backing.map_or(0, |(_, f)| extension_len(f)) + 8;
        let (name_at, name_len) = match backing {
            Some((name, _)) => (name_offset, name.len() as u32),
            None => (0, 0),
        };
        let mut h = Vec::with_capacity(self.cluster as usize);
        h.extend_from_slice(&MAGIC.to_be_bytes());
        h.extend_from_slice(&3u32.to_be_bytes());
        h.extend_from_slice(&name_at.to_be_bytes());
        h.extend_from_slice(&name_len.to_be_bytes());
        h.extend_from_slice(&self.cluster.trailing_zeros().to_be_bytes());
        h.extend_from_slice(&self.virtual_size.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no encryption
        h.extend_from_slice(&l1_size.to_be_bytes());
        h.extend_from_slice(&l1.to_be_bytes());
        h.extend_from_slice(&refcounts.to_be_bytes());
        h.extend_from_slice(&refcount_clusters.to_be_bytes());
        h.extend_from_slice(&0u32.to_be_bytes()); // no snapshots
        h.extend_from_slice(&0u64.to_be_bytes()); // snapshot table offset
        h.extend_from_slice(&[0; 24]); // incompatible, compatible, autoclear features
        h.extend_from_slice(&REFCOUNT_ORDER.to_be_bytes());
        h.extend_from_slice(&(HEADER_LEN as u32).to_be_bytes());
        if let Some((_, format)) = backing {
            h.extend_from_slice(&BACKING_FORMAT_EXT.to_be_bytes());
            h.extend_from_slice(&(format.len() as u32).to_be_bytes());
            h.extend_from_slice(format.as_bytes());
            h.resize(h.len().next_multiple_of(8), 0);
        }
        h.extend_from_slice(&[0; 8]); // end of extensions
        if let Some((name, _)) = backing {
            h.extend_from_slice(name.as_bytes());
        }
        h.resize(self.cluster as usize, 0);
        h
    }
}

/// The virtual size of the qcow2 image at `path`, from its header: an
/// incremental export checks that its backing file is the size the image
/// had at the older point, so a chain is not built on the wrong file.
pub fn virtual_size(path: &Path) -> Result<u64> {
    let mut header = [0u8; 32];
    let file = File::open(path).at(path)?;
    match file.read_exact_at(&mut header, 0) {
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
        read => read.at(path)?,
    }
    let magic = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
    if magic != MAGIC {
        return Err(usage(
            path,
            "is not a qcow2 image (no QFI\\xfb magic)".into(),
        ));
    }
    Ok(u64::from_be_bytes(
        header[24..].try_into().expect("8 bytes"),
    ))
}

/// The virtual size rounded up to 512, refused when zero or when its L1
/// table would pass qemu's limit.
fn checked_size(path: &Path, virtual_size: u64, cluster: u64) -> Result<u64> {
    let rounded = virtual_size.checked_next_multiple_of(512);
    let l1_bytes = rounded.map(|s| s.div_ceil(cluster).div_ceil(cluster / 8) * 8);
    match (rounded, l1_bytes) {
        (Some(0), _) => Err(usage(
            path,
            "virtual size 0: an image holds at least one byte".into(),
        )),
        (Some(size), Some(l1)) if l1 <= MAX_L1_BYTES => Ok(size),
        _ => Err(usage(
            path,
            format!(
                "virtual size {virtual_size} is too large for clusters of {cluster} bytes \
                 (its L1 table would pass qemu's 32 MiB)"
            ),
        )),
    }
}

/// Refuses a backing file name or format qemu would not read, or one that
/// does not fit the header cluster.
fn check_backing(path: &Path, backing: Backing<'_>, cluster: u64) -> Result<()> {
    let Backing { file, format } = backing;
    if file.is_empty() || file.len() > MAX_BACKING_NAME || file.contains('\0') {
        return Err(usage(
            path,
            format!(
                "backing file name {file:?} must be 1 to {MAX_BACKING_NAME} bytes, without NUL"
            ),
        ));
    }
    if format.is_empty() || format.contains('\0') {
        return Err(usage(
            path,
            format!("backing format {format:?} must be a format name"),
        ));
    }
    let header = HEADER_LEN + extension_len(format) + 8 + file.len() as u64;
    if header > cluster {
        return Err(usage(
            path,
            format!(
                "backing file name {file:?} and format {format:?} do not fit a header \
                 cluster of {cluster} bytes"
            ),
        ));
    }
    Ok(())
}

/// Bytes of the backing format extension: type, length, padded name.
fn extension_len(format: &str) -> u64 {
    8 + (format.len() as u64).next_multiple_of(8)
}

/// A table of big-endian 64-bit entries.
fn table_bytes(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// A usage error naming the image.
fn usage(path: &Path, reason: String) -> Error {
    Error::Usage(format!("qcow2 image {}: {reason}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    const CLUSTER: u32 = 65536;

    fn tempdir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("hbrfs-qcow2-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Runs qemu-img; returns (success, stdout + stderr).
    fn qemu_img(args: &[&str]) -> (bool, String) {
        let out = Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img runs");
        let text = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text.into_owned())
    }

    fn assert_clean(image: &Path) {
        let (ok, text) = qemu_img(&["check", image.to_str().unwrap()]);
        assert!(ok && text.contains("No errors were found"), "{text}");
        assert!(!text.contains("leaked"), "{text}");
    }

    fn assert_identical(raw: &Path, image: &Path) {
        let (raw, image) = (raw.to_str().unwrap(), image.to_str().unwrap());
        let (ok, text) = qemu_img(&["compare", "-f", "raw", "-F", "qcow2", raw, image]);
        assert!(ok && text.contains("Images are identical"), "{text}");
    }

    /// A cluster of `byte`s, distinct per cluster.
    fn pattern(byte: u8, len: usize) -> Vec<u8> {
        (0..len).map(|i| byte ^ (i % 251) as u8).collect()
    }

    /// Writes `clusters` (index, content; `None` = zeroed) into `writer`
    /// and into the raw `expected` image at the same places.
    fn put(writer: &mut Qcow2Writer, expected: &mut [u8], clusters: &[(u64, Option<Vec<u8>>)]) {
        for (index, data) in clusters {
            let at = (*index * u64::from(CLUSTER)) as usize;
            let end = (at + CLUSTER as usize).min(expected.len());
            match data {
                Some(data) => {
                    writer.write_cluster(BlockNo(*index), data).unwrap();
                    expected[at..at + data.len()].copy_from_slice(data);
                }
                None => {
                    writer.zero_cluster(BlockNo(*index)).unwrap();
                    expected[at..end].fill(0);
                }
            }
        }
    }

    #[test]
    fn full_image_with_a_short_last_cluster_and_zeros_matches_raw() {
        let dir = tempdir("full");
        let size = 5 * u64::from(CLUSTER) + 1000;
        let image = dir.join("full.qcow2");
        let mut w = Qcow2Writer::create(&image, size, CLUSTER, None).unwrap();
        let mut expected = vec![0; size as usize];
        let c = CLUSTER as usize;
        // Out of order; 1 zeroed, 3 never given, 5 is the short last one.
        let clusters = [
            (4, Some(pattern(4, c))),
            (0, Some(pattern(9, c))),
            (1, None),
        ];
        put(&mut w, &mut expected, &clusters);
        put(&mut w, &mut expected, &[(5, Some(pattern(5, 1000)))]);
        put(&mut w, &mut expected, &[(2, Some(pattern(2, c)))]);
        w.finish().unwrap();
        let raw = dir.join("full.raw");
        std::fs::write(&raw, &expected).unwrap();
        assert_clean(&image);
        assert_identical(&raw, &image);
        assert_eq!(virtual_size(&image).unwrap(), size.next_multiple_of(512));
        usage_error(virtual_size(&raw), "not a qcow2 image");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_chain_reads_changes_over_its_backing_and_zeros_hide_the_backing() {
        let dir = tempdir("chain");
        let c = CLUSTER as usize;
        let size = 8 * u64::from(CLUSTER);
        let mut expected = vec![0; size as usize];
        let base = dir.join("base.qcow2");
        let mut w = Qcow2Writer::create(&base, size, CLUSTER, None).unwrap();
        let full: Vec<_> = (0..8).map(|i| (i, Some(pattern(i as u8, c)))).collect();
        put(&mut w, &mut expected, &full);
        w.finish().unwrap();

        let top = dir.join("top.qcow2");
        let backing = Backing {
            file: "base.qcow2",
            format: "qcow2",
        };
        let mut w = Qcow2Writer::create(&top, size, CLUSTER, Some(backing)).unwrap();
        let changes = [
            (6, Some(pattern(60, c))),
            (1, Some(pattern(10, c))),
            (3, None),
            (7, Some(pattern(70, c))),
        ];
        put(&mut w, &mut expected, &changes);
        w.finish().unwrap();

        let raw = dir.join("expected.raw");
        std::fs::write(&raw, &expected).unwrap();
        assert_clean(&top);
        assert_identical(&raw, &top);
        let (ok, info) = qemu_img(&["info", "--backing-chain", top.to_str().unwrap()]);
        assert!(ok, "{info}");
        assert!(info.contains("backing file: base.qcow2"), "{info}");
        assert!(info.contains("backing file format: qcow2"), "{info}");
        assert!(
            info.contains(&format!("image: {}", base.display())),
            "{info}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_sparse_terabyte_with_two_clusters_stays_small() {
        let dir = tempdir("sparse");
        let size = 1 << 40;
        let image = dir.join("sparse.qcow2");
        let started = std::time::Instant::now();
        let mut w = Qcow2Writer::create(&image, size, CLUSTER, None).unwrap();
        let last = size / u64::from(CLUSTER) - 1;
        w.write_cluster(BlockNo(last), &pattern(1, CLUSTER as usize))
            .unwrap();
        w.write_cluster(BlockNo(3), &pattern(2, CLUSTER as usize))
            .unwrap();
        w.finish().unwrap();
        assert!(
            started.elapsed().as_secs() < 5,
            "took {:?}",
            started.elapsed()
        );
        // Header, 2 data, 2 L2, 1 L1 (2048 entries), 1 refcount block, 1 table.
        let len = std::fs::metadata(&image).unwrap().len();
        assert_eq!(len, 8 * u64::from(CLUSTER));
        assert_clean(&image);
        let (ok, map) = qemu_img(&["map", "--output=json", image.to_str().unwrap()]);
        assert!(ok, "{map}");
        assert_eq!(map.matches("\"data\": true").count(), 2, "{map}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn small_clusters_and_an_odd_size_still_check_clean() {
        let dir = tempdir("small");
        let image = dir.join("small.qcow2");
        // 512-byte clusters: 64 per L2 table, 256 per refcount block, so
        // several of each; the size rounds up to 512 * 300.
        let mut w = Qcow2Writer::create(&image, 512 * 300 - 7, 512, None).unwrap();
        let mut expected = vec![0; 512 * 300];
        for i in (0..300).step_by(2) {
            let data = pattern(i as u8, 512);
            w.write_cluster(BlockNo(i), &data).unwrap();
            expected[i as usize * 512..][..512].copy_from_slice(&data);
        }
        w.finish().unwrap();
        let raw = dir.join("small.raw");
        std::fs::write(&raw, &expected).unwrap();
        assert_clean(&image);
        assert_identical(&raw, &image);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn usage_error(result: Result<impl std::fmt::Debug>, names: &str) {
        match result {
            Err(Error::Usage(message)) => assert!(message.contains(names), "{message}"),
            other => panic!("expected a usage error naming {names}, got {other:?}"),
        }
    }

    #[test]
    fn bad_inputs_are_usage_errors() {
        let dir = tempdir("bad");
        let image = dir.join("bad.qcow2");
        usage_error(
            Qcow2Writer::create(&image, 0, CLUSTER, None),
            "virtual size 0",
        );
        usage_error(
            Qcow2Writer::create(&image, u64::MAX, CLUSTER, None),
            "18446744073709551615",
        );
        usage_error(Qcow2Writer::create(&image, 1 << 60, 512, None), "too large");
        for cluster in [0, 256, 1000, 4 << 20] {
            usage_error(
                Qcow2Writer::create(&image, 1 << 20, cluster, None),
                "cluster size",
            );
        }
        let long = "x".repeat(1024);
        let backing = |file, format| Some(Backing { file, format });
        usage_error(
            Qcow2Writer::create(&image, 1 << 20, CLUSTER, backing(&long, "raw")),
            "backing",
        );
        usage_error(
            Qcow2Writer::create(&image, 1 << 20, CLUSTER, backing("", "raw")),
            "backing",
        );
        usage_error(
            Qcow2Writer::create(&image, 1 << 20, CLUSTER, backing("b", "")),
            "backing",
        );
        let name = "n".repeat(500);
        usage_error(
            Qcow2Writer::create(&image, 1 << 20, 512, backing(&name, "raw")),
            "fit",
        );
        assert!(!image.exists(), "a refused create leaves no file");

        let mut w =
            Qcow2Writer::create(&image, 2 * u64::from(CLUSTER) + 100, CLUSTER, None).unwrap();
        let c = CLUSTER as usize;
        usage_error(
            w.write_cluster(BlockNo(3), &[1; 100]),
            "cluster 3 is past the end",
        );
        usage_error(w.zero_cluster(BlockNo(u64::MAX)), "past the end");
        usage_error(
            w.write_cluster(BlockNo(0), &vec![1; c + 1]),
            "cluster 0 has",
        );
        usage_error(w.write_cluster(BlockNo(1), &[1; 10]), "only the last");
        usage_error(
            w.write_cluster(BlockNo(2), &vec![1; c + 1]),
            "cluster 2 has",
        );
        w.write_cluster(BlockNo(2), &[1; 100]).unwrap();
        w.zero_cluster(BlockNo(0)).unwrap();
        usage_error(w.write_cluster(BlockNo(2), &[1; 100]), "already given");
        usage_error(w.zero_cluster(BlockNo(0)), "already given");
        w.finish().unwrap();
        assert_clean(&image);
        match Qcow2Writer::create(&image, 1 << 20, CLUSTER, None) {
            Err(Error::Io { path, .. }) => assert_eq!(path, image),
            other => panic!("an existing file must not be overwritten: {other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
