//! The secondary's replica folder: the pair it belongs to, the last applied
//! point, the content index, and the atomic apply of a staged epoch.
//!
//! Atomicity: an epoch is first staged completely (block data and a
//! manifest, fsynced) in `REPLICA/.hbrfs/staging/`; then a `redo` record
//! naming it is written durably — the commit point; then it is applied in
//! place and the replica fsynced; then `applied` is updated and the redo
//! record and staging removed. A restart that finds a redo record applies
//! the staged epoch again (every step is idempotent; namespace operations
//! count their progress in the redo record). So after a crash at any
//! instant the replica is at the previous point or, after the replay at
//! start, at the new one — never between. The mirrored mount is kept out
//! of the replica (the `view` lock) while an epoch applies.

use std::fs::{self, File, OpenOptions};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, RwLock};

use prost::Message;

use super::confine;
use super::session::Carried;
use crate::block::{BlockHash, HashKey};
use crate::error::{Error, IoContext, Result};
use crate::proto::replica::StagedEpoch;
use crate::proto::replication::{NamespaceOp, OpKind, VerifyReply, VerifyRequest, VerifyResult};
use crate::state::{ReplicaPaths, hex, now_ns, read_full, unhex, walk_files, write_durably};
use crate::sys;

/// The pair a replica belongs to, fixed by the first primary that ships.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The primary datastore's id.
    pub datastore_id: String,
    /// Its block size.
    pub block_size: u32,
    /// The pair's hash key.
    pub key: HashKey,
}

/// Counters for `hbrfs status` on the secondary.
#[derive(Debug, Default)]
pub struct ReplicaStats {
    /// Bytes of block data received (compressed).
    pub bytes_received: AtomicU64,
    /// Blocks filled from content the replica already held.
    pub blocks_have: AtomicU64,
    /// Blocks the primary had to send.
    pub blocks_sent: AtomicU64,
    /// Blocks filled from content staged by a stream that broke before
    /// its commit (a reconnect resuming, not resending).
    pub blocks_resumed: AtomicU64,
}

/// File ids from here up name files found in the replica folder when it
/// was paired (seeding); the primary's ids are far below.
pub const SEED_IDS: u64 = 1 << 62;

/// The last point applied: a primary checks it against its history.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Its epoch, 0 before the first.
    pub epoch: u64,
    /// When it was applied, unix nanoseconds.
    pub at_ns: u64,
    /// The point's random id (empty before the first).
    pub point: Vec<u8>,
}

impl Applied {
    /// Reads the applied record of the replica at `paths`; the default
    /// (epoch 0) when no point was applied yet. Also read by `hbrfs status`
    /// while no secondary runs.
    pub fn read(paths: &ReplicaPaths) -> Result<Applied> {
        let path = paths.applied();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(Applied::default());
        };
        let mut words = text.split_whitespace();
        let epoch = words.next().and_then(|w| w.parse().ok());
        let at = words.next().and_then(|w| w.parse().ok());
        let point = words.next().and_then(unhex);
        match (epoch, at, point) {
            (Some(epoch), Some(at_ns), Some(point)) => Ok(Applied {
                epoch,
                at_ns,
                point,
            }),
            _ => Err(bad(&path, "unreadable applied record (epoch, time, point)")),
        }
    }
}

/// An open replica folder.
#[derive(Debug)]
pub struct ReplicaStore {
    /// The replica root (what a hypervisor uses after failover).
    pub root: PathBuf,
    /// Its state folder.
    pub paths: ReplicaPaths,
    /// The index of content held: hash → (file id, block), and file id →
    /// path. Hints only: every use re-reads and re-hashes the content.
    index: sled::Tree,
    files: sled::Tree,
    db: sled::Db,
    pair: Mutex<Option<Pair>>,
    /// The last applied point.
    applied: Mutex<Applied>,
    /// Content staged by streams that broke before their commit, handed
    /// to the next stream (see `session`); `None` when staging is empty.
    carried: Mutex<Option<Carried>>,
    /// Held exclusively while an epoch applies, shared by the mirror's
    /// reads, so the mirror never shows a half-applied point.
    pub view: Arc<RwLock<()>>,
    /// Counters.
    pub stats: ReplicaStats,
}

fn bad(path: &Path, reason: impl Into<String>) -> Error {
    Error::BadState {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Replica folders and files get fixed modes (0755, 0644): the primary's
/// modes are not shipped yet, and the secondary's umask must not decide.
fn make_dirs(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(path)
        .at(path)
}

fn open_for_write(path: &Path) -> Result<File> {
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .at(path)
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica at `root`, finishing an
    /// apply a crash interrupted.
    pub fn open(root: &Path) -> Result<ReplicaStore> {
        make_dirs(root)?;
        let root = root.canonicalize().at(root)?;
        let paths = ReplicaPaths::of(&root);
        make_dirs(&paths.staging())?;
        fs::set_permissions(
            &paths.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .at(&paths.dir)?;
        let db_path = paths.index();
        let db = sled::Config::new()
            .path(&db_path)
            .open()
            .map_err(|source| Error::Journal {
                path: db_path.clone(),
                source,
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| Error::Journal {
                path: db_path.clone(),
                source,
            })
        };
        let store = ReplicaStore {
            index: tree("index")?,
            files: tree("files")?,
            db,
            pair: Mutex::new(None),
            applied: Mutex::new(Applied::default()),
            carried: Mutex::new(None),
            view: Arc::new(RwLock::new(())),
            stats: ReplicaStats::default(),
            root,
            paths,
        };
        store.load_pair()?;
        store.load_applied()?;
        store.recover()?;
        Ok(store)
    }

    /// Whether an interrupted apply is waiting to be finished.
    pub fn apply_pending(&self) -> bool {
        self.paths.redo().exists()
    }

    /// Takes what broken streams staged, for the stream starting now.
    pub fn take_carried(&self) -> Option<Carried> {
        self.carried.lock().expect("carried lock").take()
    }

    /// Keeps what a broken stream staged (and what it did not use of the
    /// earlier ones) for the next stream.
    pub fn keep_carried(&self, carried: Carried) {
        *self.carried.lock().expect("carried lock") = Some(carried);
    }

    fn load_pair(&self) -> Result<()> {
        let path = self.paths.pair();
        let Ok(text) = fs::read_to_string(&path) else {
            return Ok(());
        };
        let mut id = None;
        let mut bs = None;
        let mut key = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("datastore", v)) => id = Some(v.to_string()),
                Some(("block_size", v)) => bs = v.parse().ok(),
                Some(("hash_key", v)) => key = unhex(v).as_deref().and_then(HashKey::from_bytes),
                _ => {}
            }
        }
        match (id, bs, key) {
            (Some(datastore_id), Some(block_size), Some(key)) => {
                *self.pair.lock().expect("pair lock") = Some(Pair {
                    datastore_id,
                    block_size,
                    key,
                });
                Ok(())
            }
            _ => Err(bad(
                &path,
                "incomplete pair record (datastore, block_size, hash_key)",
            )),
        }
    }

    fn load_applied(&self) -> Result<()> {
        *self.applied.lock().expect("applied lock") = Applied::read(&self.paths)?;
        Ok(())
    }

    /// The pair, once a primary has said hello.
    pub fn pair(&self) -> Option<Pair> {
        self.pair.lock().expect("pair lock").clone()
    }

    /// Accepts a primary: the first one fixes the pair; later ones must be
    /// the same datastore with the same parameters.
    pub fn accept(&self, offered: Pair) -> std::result::Result<(), String> {
        let mut pair = self.pair.lock().expect("pair lock");
        match &*pair {
            Some(p) if p.datastore_id != offered.datastore_id => Err(format!(
                "this replica ({}) belongs to primary datastore {}; refusing datastore {}. \
                 To replicate another datastore, use another replica folder.",
                self.root.display(),
                p.datastore_id,
                offered.datastore_id
            )),
            Some(p) if p.block_size != offered.block_size => Err(format!(
                "block size {} differs from the pair's {}",
                offered.block_size, p.block_size
            )),
            Some(p) if p.key != offered.key => Err(format!(
                "datastore {} presents a different hash key than when the pair was made; \
                 its state folder was recreated? Use a new replica folder to reseed.",
                offered.datastore_id
            )),
            Some(_) => Ok(()),
            None => {
                let text = format!(
                    "datastore={}\nblock_size={}\nhash_key={}\n",
                    offered.datastore_id,
                    offered.block_size,
                    hex(offered.key.as_bytes())
                );
                let (key, bs) = (offered.key.clone(), u64::from(offered.block_size));
                *pair = Some(offered);
                drop(pair);
                // Content already here (a copy made by hand, a restore) is
                // indexed before the first point, so it does not travel.
                match self.index_existing(&key, bs) {
                    Ok((files, blocks)) if files > 0 => {
                        log::info!(
                            "seeding: indexed {blocks} blocks of {files} files already in the replica folder"
                        )
                    }
                    Ok(_) => {}
                    Err(e) => log::warn!(
                        "seeding: indexing the replica folder failed ({e}); everything will be sent"
                    ),
                }
                write_durably(&self.paths.pair(), text.as_bytes()).map_err(|e| e.to_string())
            }
        }
    }

    /// The last applied epoch and when it was applied.
    pub fn applied(&self) -> Applied {
        self.applied.lock().expect("applied lock").clone()
    }

    /// Files the index knows.
    pub fn file_count(&self) -> usize {
        self.files.len()
    }

    fn sled<T>(&self, r: sled::Result<T>) -> Result<T> {
        r.map_err(|source| Error::Journal {
            path: self.paths.index(),
            source,
        })
    }

    /// Where the replica keeps file `id`, if known.
    pub fn file_path(&self, id: u64) -> Result<Option<Vec<u8>>> {
        Ok(self
            .sled(self.files.get(id.to_be_bytes()))?
            .map(|v| v.to_vec()))
    }

    /// Content this replica verifiably holds for `hash`, `length` bytes
    /// long: read from where the index points and re-hashed.
    pub fn find(&self, key: &HashKey, hash: BlockHash, length: usize) -> Result<Option<Vec<u8>>> {
        let Some(loc) = self.sled(self.index.get(hash.to_bytes()))? else {
            return Ok(None);
        };
        if loc.len() != 16 {
            return Ok(None);
        }
        let id = u64::from_be_bytes(loc[..8].try_into().expect("8 bytes"));
        let block = u64::from_be_bytes(loc[8..].try_into().expect("8 bytes"));
        let Some(rel) = self.file_path(id)? else {
            return Ok(None);
        };
        let Ok(path) = confine::resolve(&self.root, &rel) else {
            return Ok(None);
        };
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        else {
            return Ok(None);
        };
        let bs = self.pair().map_or(0, |p| u64::from(p.block_size));
        let mut buf = vec![0u8; length];
        if file.read_exact_at(&mut buf, block * bs).is_err() || key.hash(&buf) != hash {
            return Ok(None);
        }
        Ok(Some(buf))
    }

    /// Applies the staged epoch durably; see the module docs for the order.
    pub fn commit(&self, staged: &StagedEpoch, epoch: u64) -> Result<()> {
        let manifest = self.paths.staged_manifest();
        write_durably(&manifest, &staged.encode_to_vec())?;
        write_durably(&self.paths.redo(), format!("{epoch} 0\n").as_bytes())?;
        self.apply_staged(staged, epoch, 0)
    }

    /// Finishes an apply that a crash interrupted.
    fn recover(&self) -> Result<()> {
        let redo = self.paths.redo();
        let Ok(text) = fs::read_to_string(&redo) else {
            // A point a stream was receiving when the secondary stopped:
            // kept for the primary to resume, if its log checks out.
            let key = self.pair().map(|p| p.key);
            match key.and_then(|key| Carried::from_log(&self.paths, &key)) {
                Some(carried) => {
                    log::info!("kept the part of a point received before the restart: {carried}");
                    *self.carried.lock().expect("carried lock") = Some(carried);
                }
                None => self.clear_staging()?,
            }
            return Ok(());
        };
        let mut words = text.split_whitespace();
        let epoch: u64 = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(|| bad(&redo, "unreadable redo record"))?;
        let ops_done: usize = words.next().and_then(|w| w.parse().ok()).unwrap_or(0);
        if epoch <= self.applied().epoch {
            log::info!("epoch {epoch} was applied before the restart; removing its staging");
            fs::remove_file(&redo).at(&redo)?;
            return self.clear_staging();
        }
        let manifest = self.paths.staged_manifest();
        let bytes = fs::read(&manifest).at(&manifest)?;
        let staged = StagedEpoch::decode(bytes.as_slice())
            .map_err(|e| bad(&manifest, format!("corrupt staged manifest: {e}")))?;
        log::warn!("an apply of epoch {epoch} was interrupted; applying it again from staging");
        self.apply_staged(&staged, epoch, ops_done)
    }

    fn clear_staging(&self) -> Result<()> {
        *self.carried.lock().expect("carried lock") = None;
        let dir = self.paths.staging();
        fs::remove_dir_all(&dir).at(&dir)?;
        fs::create_dir_all(&dir).at(&dir)
    }

    fn apply_staged(&self, staged: &StagedEpoch, epoch: u64, ops_done: usize) -> Result<()> {
        let _view = self.view.write().expect("view lock");
        let begin = staged.begin.clone().unwrap_or_default();
        // Preflight refused every point it could tell would fail; what an
        // earlier operation of the same point makes impossible is logged
        // and skipped, so that a bad point can never wedge the replica.
        for (i, op) in begin.ops.iter().enumerate().skip(ops_done) {
            if let Err(e) = self.apply_op(op) {
                log::error!("epoch {epoch}: operation {i} could not be applied, skipped: {e}");
            }
            write_durably(
                &self.paths.redo(),
                format!("{epoch} {}\n", i + 1).as_bytes(),
            )?;
        }
        let bs = u64::from(self.pair().map_or(0, |p| p.block_size));
        let data_path = self.paths.staged_data();
        let data = File::open(&data_path).at(&data_path)?;
        let mut open = std::collections::HashMap::new();
        for f in &begin.files {
            let opened = confine::resolve(&self.root, &f.path)
                .map_err(|e| bad(&self.root, e.to_string()))
                .and_then(|path| {
                    if let Some(parent) = path.parent() {
                        make_dirs(parent)?;
                    }
                    let file = open_for_write(&path)?;
                    file.set_len(f.size).at(&path)?;
                    Ok((file, path))
                });
            let (file, path) = match opened {
                Ok(opened) => opened,
                Err(e) => {
                    log::error!(
                        "epoch {epoch}: file {} could not be written, skipped: {e}",
                        f.file_id
                    );
                    continue;
                }
            };
            self.sled(
                self.files
                    .insert(f.file_id.to_be_bytes(), f.path.as_slice()),
            )?;
            open.insert(f.file_id, (file, path));
        }
        let mut buf = Vec::new();
        for b in &staged.blocks {
            let Some((file, path)) = open.get(&b.file_id) else {
                continue; // its file was skipped above (logged there)
            };
            let at = b.block * bs;
            if b.zero {
                let punched = sys::fallocate(
                    file.as_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at,
                    u64::from(b.length),
                );
                if punched.is_err() {
                    file.write_all_at(&vec![0u8; b.length as usize], at)
                        .at(path)?;
                }
                continue;
            }
            buf.resize(b.length as usize, 0);
            data.read_exact_at(&mut buf, b.offset).at(&data_path)?;
            file.write_all_at(&buf, at).at(path)?;
            let mut loc = [0u8; 16];
            loc[..8].copy_from_slice(&b.file_id.to_be_bytes());
            loc[8..].copy_from_slice(&b.block.to_be_bytes());
            self.sled(self.index.insert(b.hash.as_slice(), &loc))?;
        }
        for (file, path) in open.values() {
            file.sync_all().at(path)?;
        }
        // Only what this epoch touched is synced (not the whole file
        // system): the files above, and the folders whose entries changed.
        let mut dirs: std::collections::BTreeSet<PathBuf> = std::collections::BTreeSet::new();
        let raw_paths = begin.ops.iter().flat_map(|op| [&op.path, &op.target]);
        for raw in raw_paths.chain(begin.files.iter().map(|f| &f.path)) {
            if let Ok(p) = confine::join(&self.root, raw) {
                dirs.extend(
                    p.ancestors()
                        .skip(1)
                        .take_while(|d| d.starts_with(&self.root))
                        .map(Path::to_path_buf),
                );
            }
        }
        for dir in dirs {
            if let Ok(d) = File::open(&dir) {
                d.sync_all().at(&dir)?;
            }
        }
        self.sled(self.db.flush())?;
        let applied = Applied {
            epoch,
            at_ns: now_ns(),
            point: begin.point.clone(),
        };
        let line = format!(
            "{} {} {}\n",
            applied.epoch,
            applied.at_ns,
            hex(&applied.point)
        );
        write_durably(&self.paths.applied(), line.as_bytes())?;
        *self.applied.lock().expect("applied lock") = applied;
        let redo = self.paths.redo();
        fs::remove_file(&redo).at(&redo)?;
        self.clear_staging()
    }

    /// Applies one namespace operation; each is a no-op when it finds its
    /// effect already done, so a replay after a crash is harmless.
    fn apply_op(&self, op: &NamespaceOp) -> Result<()> {
        let resolve = |raw: &[u8]| {
            confine::resolve(&self.root, raw).map_err(|e| bad(&self.root, e.to_string()))
        };
        let path = resolve(&op.path)?;
        let exists = |p: &Path| fs::symlink_metadata(p).is_ok();
        let parent_of = |p: &Path| {
            p.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| self.root.clone())
        };
        match op.kind() {
            OpKind::Create => {
                if !exists(&path) {
                    make_dirs(&parent_of(&path))?;
                    open_for_write(&path)?;
                }
            }
            OpKind::Mkdir => make_dirs(&path)?,
            OpKind::Rmdir => {
                if exists(&path) {
                    fs::remove_dir(&path).at(&path)?;
                }
            }
            OpKind::Unlink => {
                if exists(&path) {
                    fs::remove_file(&path).at(&path)?;
                }
            }
            OpKind::Truncate => {
                if exists(&path) {
                    OpenOptions::new()
                        .write(true)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(&path)
                        .and_then(|f| f.set_len(op.arg))
                        .at(&path)?;
                }
            }
            OpKind::Rename => {
                let target = resolve(&op.target)?;
                let exchange = op.arg as u32 & libc::RENAME_EXCHANGE != 0;
                if exists(&path) && (exchange || path != target) {
                    make_dirs(&parent_of(&target))?;
                    let flags = if exchange { libc::RENAME_EXCHANGE } else { 0 };
                    let (from_dir, to_dir) = (
                        File::open(parent_of(&path)).at(&path)?,
                        File::open(parent_of(&target)).at(&target)?,
                    );
                    let name =
                        |p: &Path| p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                    sys::renameat2(
                        from_dir.as_fd(),
                        &name(&path),
                        to_dir.as_fd(),
                        &name(&target),
                        flags,
                    )
                    .at(&path)?;
                    self.repath(&op.path, &op.target)?;
                }
            }
            OpKind::Symlink => {
                if fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
                    fs::remove_file(&path).at(&path)?;
                }
                make_dirs(&parent_of(&path))?;
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&op.target), &path)
                    .at(&path)?;
            }
            OpKind::Link => {
                let target = resolve(&op.target)?;
                if exists(&path) && !exists(&target) {
                    fs::hard_link(&path, &target).at(&target)?;
                }
            }
            OpKind::Unspecified => {
                return Err(bad(&self.root, "namespace operation of unknown kind"));
            }
        }
        Ok(())
    }

    /// Indexes every non-zero block of the regular files under the root,
    /// under ids of their own (above [`SEED_IDS`]); returns (files, blocks).
    fn index_existing(&self, key: &HashKey, block_size: u64) -> Result<(u64, u64)> {
        let mut files = Vec::new();
        walk_files(&self.root, &mut |rel, _| files.push(rel))?;
        let mut blocks = 0;
        let mut buf = vec![0u8; block_size as usize];
        for (n, rel) in files.iter().enumerate() {
            let id = SEED_IDS + n as u64;
            let path = self.root.join(std::ffi::OsStr::from_bytes(rel));
            let file = File::open(&path).at(&path)?;
            self.sled(self.files.insert(id.to_be_bytes(), rel.as_slice()))?;
            for block in 0.. {
                let len = read_full(&file, &mut buf, block * block_size).at(&path)?;
                if len == 0 {
                    break;
                }
                let data = &buf[..len];
                if !crate::block::is_zero(data) {
                    let mut loc = [0u8; 16];
                    loc[..8].copy_from_slice(&id.to_be_bytes());
                    loc[8..].copy_from_slice(&block.to_be_bytes());
                    self.sled(self.index.insert(key.hash(data).to_bytes(), &loc))?;
                    blocks += 1;
                }
                if len < buf.len() {
                    break;
                }
            }
        }
        self.sled(self.db.flush())?;
        Ok((files.len() as u64, blocks))
    }

    /// Checks the primary's block hashes against the replica at its applied
    /// point (`hbrfs verify`); applies wait while it reads.
    pub fn verify(&self, req: &VerifyRequest) -> std::result::Result<VerifyReply, String> {
        let _view = self.view.read().expect("view lock");
        let applied = self.applied().epoch;
        if req.epoch != applied {
            return Err(format!(
                "the replica is at epoch {applied}, not {}: verify again once it caught up",
                req.epoch
            ));
        }
        let pair = self
            .pair()
            .ok_or("no primary has said hello to this replica yet")?;
        let bs = u64::from(pair.block_size);
        if req.files.len() > 1 << 20 {
            return Err(format!("{} files in one request", req.files.len()));
        }
        let mut files = Vec::new();
        for f in &req.files {
            if f.blocks.len() != f.hashes.len() || f.blocks.len() > 1 << 20 {
                return Err(format!(
                    "file {}: {} blocks but {} hashes",
                    f.file_id,
                    f.blocks.len(),
                    f.hashes.len()
                ));
            }
            let rel = self
                .file_path(f.file_id)
                .map_err(|e| e.to_string())?
                .unwrap_or_default();
            let file = confine::resolve(&self.root, &rel).ok().and_then(|p| {
                OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(p)
                    .ok()
            });
            let size = file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len());
            let mut differing = Vec::new();
            for (&block, hash) in f.blocks.iter().zip(&f.hashes) {
                let start = block.saturating_mul(bs);
                let len = f.size.saturating_sub(start).min(bs) as usize;
                if !f.idle && start + len as u64 > size {
                    // Past the replica's end while a size change waits to ship.
                    continue;
                }
                let mut buf = vec![0u8; len];
                let same = file.as_ref().is_some_and(|file| {
                    file.read_exact_at(&mut buf, start).is_ok()
                        && pair.key.hash(&buf).to_bytes()[..] == hash[..]
                });
                if !same {
                    differing.push(block);
                }
            }
            files.push(VerifyResult {
                file_id: f.file_id,
                path: rel,
                size_differs: f.idle && size != f.size,
                size,
                differing,
            });
        }
        Ok(VerifyReply {
            epoch: applied,
            files,
        })
    }

    /// Keeps the index's file paths right after a rename of `from`.
    fn repath(&self, from: &[u8], to: &[u8]) -> Result<()> {
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
}
