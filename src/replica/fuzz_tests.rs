//! Hostile input at the secondary (DESIGN invariants 3 and 4): every
//! message from the network is fed to the real [`Session`] (through the
//! service's own `handle`) over a real [`ReplicaStore`] in a temp dir.
//!
//! Each fixture holds a replica at epoch 1 (applied through a session) with
//! a symlink planted in it that points outside, and a legitimate epoch 2
//! that the tests mutate. One `#[test]` per class of bad input, each naming
//! the inputs it tries; then a proptest over random byte mutations of the
//! encoded epoch. After any refused sequence the replica's files must be
//! byte-identical to the last applied point, the applied epoch unchanged,
//! no redo record left (a restart would apply the refused epoch), nothing
//! written outside the root, and the store must still accept the next
//! legitimate epoch.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Instant;

use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tempfile::TempDir;
use xxhash_rust::xxh3::xxh3_64;

use super::records::{Applied, Pair};
use super::service::handle;
use super::session::Session;
use super::store::ReplicaStore;
use crate::block::{self, HashKey};
use crate::ids::Epoch;
use crate::proto::replication::{
    Begin, Block, Blocks, Commit, FileState, Manifest, NamespaceOp, Offer, Offers, OpKind,
    PathMeta, ShipMessage, ship_message, ship_reply,
};
use crate::wire::{MAX_BLOCKS, MAX_ENTRIES, MAX_FILE_SIZE, MAX_OFFERS, MAX_WINDOW_OFFERS};

/// The pair's block size: the smallest allowed, so epochs stay tiny.
const BS: u64 = 4096;
/// The last block of `vms/a.img` is short.
const A_SIZE: u64 = 3 * BS + 100;
/// `c.img`, created by epoch 2, ends in a 10-byte block.
const C_SIZE: u64 = BS + 10;

// ---------------------------------------------------------------------------
// Building messages.

/// Deterministic, non-repeating bytes: xxh3 of the seed and the offset.
/// Every point kept for an hour: the fuzzed applies save undo too.
fn keep() -> crate::points::Retention {
    let s = std::time::Duration::from_secs;
    crate::points::Retention::new(vec![(s(1), s(3600))], None)
}

fn content(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64)
        .step_by(8)
        .flat_map(|at| xxh3_64(&[seed.to_le_bytes(), at.to_le_bytes()].concat()).to_le_bytes())
        .take(len)
        .collect()
}

/// The 16-byte random id a primary gives a point (fixed per epoch here).
fn point_id(epoch: u64) -> Vec<u8> {
    content(epoch ^ 0x1d, 16)
}

fn op(kind: OpKind, file_id: u64, path: &str, target: &str, arg: u64) -> NamespaceOp {
    NamespaceOp {
        kind: kind as i32,
        file_id,
        path: path.as_bytes().to_vec(),
        target: target.as_bytes().to_vec(),
        arg,
    }
}

fn file(file_id: u64, path: &str, size: u64) -> FileState {
    FileState {
        file_id,
        path: path.as_bytes().to_vec(),
        size,
    }
}

fn msg(body: ship_message::Body) -> ShipMessage {
    ShipMessage { body: Some(body) }
}

fn begin(epoch: u64, base: u64) -> ShipMessage {
    msg(ship_message::Body::Begin(Begin {
        epoch,
        base_epoch: base,
        point: point_id(epoch),
        resync_token: Vec::new(),
    }))
}

/// A point's lists in one Manifest chunk, the last.
fn lists(ops: Vec<NamespaceOp>, files: Vec<FileState>) -> ShipMessage {
    chunk(ops, files, true)
}

fn chunk(ops: Vec<NamespaceOp>, files: Vec<FileState>, end: bool) -> ShipMessage {
    msg(ship_message::Body::Manifest(Manifest {
        ops,
        files,
        end,
        ..Default::default()
    }))
}

/// The offer a primary makes for `data` (a zero marker when all zero).
fn offer(key: &HashKey, file_id: u64, block: u64, data: &[u8]) -> Offer {
    let zero = block::is_zero(data);
    Offer {
        file_id,
        block,
        hash: if zero {
            Vec::new()
        } else {
            key.hash(data).to_bytes().to_vec()
        },
        zero,
        length: data.len() as u32,
    }
}

fn offers(list: Vec<Offer>) -> ShipMessage {
    msg(ship_message::Body::Offers(Offers { offers: list }))
}

fn zstd_block(file_id: u64, block: u64, frame: Vec<u8>) -> Block {
    Block {
        file_id,
        block,
        zstd: frame,
    }
}

fn data_block(file_id: u64, block: u64, data: &[u8]) -> Block {
    zstd_block(file_id, block, block::compress(data, 1).expect("zstd"))
}

fn blocks(list: Vec<Block>) -> ShipMessage {
    msg(ship_message::Body::Blocks(Blocks { blocks: list }))
}

fn commit(epoch: u64) -> ShipMessage {
    msg(ship_message::Body::Commit(Commit { epoch }))
}

/// Sends the first element of a list again at its end.
fn push_first_again<T: Clone>(list: &mut Vec<T>) {
    list.push(list[0].clone());
}

/// Makes a list `n` copies of its first element.
fn repeat_first<T: Clone>(list: &mut Vec<T>, n: usize) {
    *list = vec![list[0].clone(); n];
}

fn begin_of(m: &mut ShipMessage) -> &mut Begin {
    match &mut m.body {
        Some(ship_message::Body::Begin(b)) => b,
        other => panic!("not a Begin: {other:?}"),
    }
}

fn lists_of(m: &mut ShipMessage) -> &mut Manifest {
    match &mut m.body {
        Some(ship_message::Body::Manifest(l)) => l,
        other => panic!("not a Manifest: {other:?}"),
    }
}

fn offers_of(m: &mut ShipMessage) -> &mut Vec<Offer> {
    match &mut m.body {
        Some(ship_message::Body::Offers(o)) => &mut o.offers,
        other => panic!("not Offers: {other:?}"),
    }
}

fn blocks_of(m: &mut ShipMessage) -> &mut Vec<Block> {
    match &mut m.body {
        Some(ship_message::Body::Blocks(b)) => &mut b.blocks,
        other => panic!("not Blocks: {other:?}"),
    }
}

/// Epoch 1, as a primary ships it to an empty replica: `vms/a.img` (data,
/// a zero block, data, a short last block) and `b.img` (two blocks).
fn first_epoch(key: &HashKey) -> Vec<ShipMessage> {
    let zero = vec![0u8; BS as usize];
    let (a0, a2, a3) = (content(10, 4096), content(12, 4096), content(13, 100));
    let (b0, b1) = (content(20, 4096), content(21, 4096));
    vec![
        begin(1, 0),
        lists(
            vec![
                op(OpKind::Mkdir, 0, "vms", "", 0),
                op(OpKind::Create, 1, "vms/a.img", "", 0),
                op(OpKind::Create, 2, "b.img", "", 0),
            ],
            vec![file(1, "vms/a.img", A_SIZE), file(2, "b.img", 2 * BS)],
        ),
        offers(vec![
            offer(key, 1, 0, &a0),
            offer(key, 1, 1, &zero),
            offer(key, 1, 2, &a2),
            offer(key, 1, 3, &a3),
            offer(key, 2, 0, &b0),
            offer(key, 2, 1, &b1),
        ]),
        blocks(vec![
            data_block(1, 0, &a0),
            data_block(1, 2, &a2),
            data_block(1, 3, &a3),
            data_block(2, 0, &b0),
            data_block(2, 1, &b1),
        ]),
        commit(1),
    ]
}

// Where each message stands in [`next_epoch`].
/// `Begin`: the header.
const BEGIN: usize = 0;
/// Its lists in one Manifest chunk: creates `c.img`; files `vms/a.img`
/// (id 1) and `c.img` (id 3).
const LISTS: usize = BEGIN + 1;
/// Offers for `vms/a.img`: data, a zero block, the short last block.
const OFFERS_A: usize = LISTS + 1;
/// The two data blocks of `vms/a.img`.
const BLOCKS_A: usize = OFFERS_A + 1;
/// Offers for `c.img`: a full block and a 10-byte one.
const OFFERS_C: usize = BLOCKS_A + 1;
/// The two blocks of `c.img`.
const BLOCKS_C: usize = OFFERS_C + 1;
/// `Commit`.
const COMMIT: usize = BLOCKS_C + 1;

/// A legitimate next epoch on top of `base`: creates `c.img` and rewrites
/// two blocks of `vms/a.img` (and punches one), all with new content, so
/// every data block is wanted. The tests mutate it.
fn next_epoch(key: &HashKey, base: u64) -> Vec<ShipMessage> {
    let epoch = base + 1;
    let seed = epoch * 100;
    let zero = vec![0u8; BS as usize];
    let (a0, a3) = (content(seed, 4096), content(seed + 3, 100));
    let (c0, c1) = (content(seed + 10, 4096), content(seed + 11, 10));
    vec![
        begin(epoch, base),
        lists(
            vec![op(OpKind::Create, 3, "c.img", "", 0)],
            vec![file(1, "vms/a.img", A_SIZE), file(3, "c.img", C_SIZE)],
        ),
        offers(vec![
            offer(key, 1, 0, &a0),
            offer(key, 1, 2, &zero),
            offer(key, 1, 3, &a3),
        ]),
        blocks(vec![data_block(1, 0, &a0), data_block(1, 3, &a3)]),
        offers(vec![offer(key, 3, 0, &c0), offer(key, 3, 1, &c1)]),
        blocks(vec![data_block(3, 0, &c0), data_block(3, 1, &c1)]),
        commit(epoch),
    ]
}

// ---------------------------------------------------------------------------
// Driving a session as the service does.

/// What one stream did.
#[derive(Debug, Default)]
struct Run {
    /// The epoch acknowledged with `Applied`, if any.
    applied: Option<u64>,
    /// Why the stream was refused, if it was.
    refused: Option<String>,
    /// The `Wants` answers, in order.
    wants: Vec<Vec<u32>>,
    /// How many messages were handled (the refused one included).
    handled: usize,
    /// Where Begin's answer said the point resumes.
    resumed_after: Option<u64>,
}

/// Feeds `msgs` to a new session the way `ReplicaService::ship` does: the
/// first refusal ends the stream.
fn drive(store: &ReplicaStore, msgs: impl IntoIterator<Item = ShipMessage>) -> Run {
    drive_with(store, msgs, false)
}

/// Like [`drive`], but as an honest primary: the offers Begin's answer
/// says are held are skipped, and of each Blocks message only the blocks
/// the secondary wanted are sent (content staged by an earlier, broken
/// stream is not wanted again).
fn drive_honest(store: &ReplicaStore, msgs: impl IntoIterator<Item = ShipMessage>) -> Run {
    drive_with(store, msgs, true)
}

fn drive_with(
    store: &ReplicaStore,
    msgs: impl IntoIterator<Item = ShipMessage>,
    honest: bool,
) -> Run {
    let mut run = Run::default();
    let mut offered: Vec<(u64, u64)> = Vec::new();
    let mut wanted: std::collections::HashSet<(u64, u64)> = std::collections::HashSet::new();
    let mut session = match Session::new(store) {
        Ok(s) => Some(s),
        Err(e) => {
            run.refused = Some(e.to_string());
            return run;
        }
    };
    // Offers an honest primary skips: those Begin's answer says the
    // secondary already holds.
    let mut skip = 0usize;
    for mut m in msgs {
        run.handled += 1;
        match &mut m.body {
            Some(ship_message::Body::Offers(o)) => {
                if honest {
                    let n = skip.min(o.offers.len());
                    o.offers.drain(..n);
                    skip -= n;
                }
                offered = o.offers.iter().map(|o| (o.file_id, o.block)).collect();
            }
            Some(ship_message::Body::Blocks(b)) if honest => {
                b.blocks.retain(|b| wanted.contains(&(b.file_id, b.block)));
            }
            _ => {}
        }
        match handle(&mut session, m) {
            Ok(None) => {}
            Ok(Some(reply)) => match reply.body {
                Some(ship_reply::Body::Wants(w)) => {
                    wanted.extend(
                        w.positions
                            .iter()
                            .filter_map(|p| offered.get(*p as usize).copied()),
                    );
                    run.wants.push(w.positions)
                }
                Some(ship_reply::Body::Applied(a)) => run.applied = Some(a.epoch),
                Some(ship_reply::Body::Resumed(r)) => {
                    skip = r.offers_done as usize;
                    run.resumed_after = Some(r.offers_done);
                }
                None => panic!("the session sent an empty reply"),
            },
            Err(e) => {
                run.refused = Some(e.to_string());
                return run;
            }
        }
    }
    run
}

// ---------------------------------------------------------------------------
// The replica's state.

/// One entry of the replica tree (the state folder excluded).
#[derive(Debug, PartialEq, Eq)]
enum Entry {
    Dir,
    File(Vec<u8>),
    Symlink(PathBuf),
}

type Tree = BTreeMap<PathBuf, Entry>;

fn tree(root: &Path) -> Tree {
    fn walk(root: &Path, dir: &Path, out: &mut Tree) {
        for e in fs::read_dir(dir).unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display())) {
            let path = e.expect("read_dir entry").path();
            let rel = path.strip_prefix(root).expect("below root").to_path_buf();
            if rel == Path::new(crate::state::STATE_DIR) {
                continue;
            }
            let meta = fs::symlink_metadata(&path).expect("lstat");
            let entry = if meta.file_type().is_symlink() {
                Entry::Symlink(fs::read_link(&path).expect("readlink"))
            } else if meta.is_dir() {
                walk(root, &path, out);
                Entry::Dir
            } else {
                Entry::File(fs::read(&path).expect("read replica file"))
            };
            out.insert(rel, entry);
        }
    }
    let mut out = Tree::new();
    walk(root, root, &mut out);
    out
}

/// The differences between two trees, one line each (empty when equal).
fn tree_diff(want: &Tree, got: &Tree) -> Vec<String> {
    let show = |e: Option<&Entry>| match e {
        None => "absent".to_string(),
        Some(Entry::Dir) => "folder".to_string(),
        Some(Entry::File(d)) => format!("file of {} bytes", d.len()),
        Some(Entry::Symlink(t)) => format!("symlink to {}", t.display()),
    };
    let mut paths: Vec<&PathBuf> = want.keys().chain(got.keys()).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .filter(|p| want.get(*p) != got.get(*p))
        .map(|p| {
            format!(
                "{}: was {}, now {}",
                p.display(),
                show(want.get(p)),
                show(got.get(p))
            )
        })
        .collect()
}

/// A replica at epoch 1 with a symlink `escape` planted in it that leads
/// to a folder outside the root.
struct Fixture {
    dir: TempDir,
    root: PathBuf,
    outside: PathBuf,
    key: HashKey,
    store: Option<ReplicaStore>,
    /// The replica tree at the last applied point.
    point: Tree,
    /// That point's epoch.
    applied: u64,
    /// What the store said about it when it was applied.
    applied_record: Applied,
    /// Bad inputs tried, and those that broke the replica (see
    /// [`Fixture::assert_refused`]).
    tried: usize,
    failures: Vec<String>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("hbrfs-fuzz-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().join("replica");
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).expect("mkdir outside");
        let key = HashKey::random().expect("random key");
        let store = ReplicaStore::open(&root, false, keep()).expect("open replica");
        store
            .accept(Pair {
                datastore_id: "primary-under-test".into(),
                block_size: BS as u32,
                key: key.clone(),
            })
            .expect("pair");
        let run = drive(&store, first_epoch(&key));
        assert_eq!(run.refused, None, "the legitimate epoch 1 was refused");
        assert_eq!(run.applied, Some(1));
        let root = store.root.clone();
        std::os::unix::fs::symlink(&outside, root.join("escape")).expect("plant symlink");
        let mut fx = Fixture {
            dir,
            root,
            outside,
            key,
            store: Some(store),
            point: Tree::new(),
            applied: 1,
            applied_record: Applied::default(),
            tried: 0,
            failures: Vec::new(),
        };
        fx.mark_applied(1);
        fx
    }

    /// The replica as it is now is the point of `epoch`.
    fn mark_applied(&mut self, epoch: u64) {
        self.applied = epoch;
        self.point = tree(&self.root);
        self.applied_record = self.store().applied();
        assert_eq!(self.applied_record.epoch, Epoch(epoch));
        assert_eq!(self.applied_record.point, point_id(epoch));
    }

    fn store(&self) -> &ReplicaStore {
        self.store.as_ref().expect("store open")
    }

    fn drive(&self, msgs: impl IntoIterator<Item = ShipMessage>) -> Run {
        drive(self.store(), msgs)
    }

    fn next_epoch(&self) -> Vec<ShipMessage> {
        next_epoch(&self.key, self.applied)
    }

    /// Why the replica is not exactly at its last applied point, if it
    /// is not.
    fn off_point(&self) -> Option<String> {
        let store = self.store();
        let mut wrong = Vec::new();
        if store.apply_pending() {
            wrong.push(
                "a redo record is left: a restart would apply the refused epoch (or fail)"
                    .to_string(),
            );
        }
        if store.applied() != self.applied_record {
            wrong.push(format!(
                "the applied record moved from {:?} to {:?}",
                self.applied_record,
                store.applied()
            ));
        }
        wrong.extend(tree_diff(&self.point, &tree(&self.root)));
        let mut leaked: Vec<_> = fs::read_dir(&self.outside)
            .expect("read outside")
            .map(|e| e.expect("entry").path())
            .collect();
        leaked.extend(
            fs::read_dir(self.dir.path())
                .expect("read the fixture's folder")
                .map(|e| e.expect("entry").path())
                .filter(|p| !p.ends_with("replica") && !p.ends_with("outside")),
        );
        if !leaked.is_empty() {
            wrong.push(format!("written outside the replica root: {leaked:?}"));
        }
        (!wrong.is_empty()).then(|| wrong.join("\n    "))
    }

    fn assert_at_point(&self, what: &str) {
        if let Some(wrong) = self.off_point() {
            panic!("{what}: the replica left its last applied point:\n  {wrong}");
        }
    }

    /// Feeds `msgs`, which must be refused with a message containing every
    /// one of `needles`, leaving the replica at its point, also across a
    /// restart of the store. A violation is recorded (see [`finish`]) and
    /// the fixture made afresh, so that one test reports every bad input
    /// that breaks the replica, not only the first.
    ///
    /// [`finish`]: Fixture::finish
    fn assert_refused(&mut self, what: &str, msgs: Vec<ShipMessage>, needles: &[&str]) {
        self.tried += 1;
        let run = self.drive(msgs);
        let mut wrong = Vec::new();
        match &run.refused {
            None => wrong.push("it was accepted".to_string()),
            Some(reason) => wrong.extend(
                needles
                    .iter()
                    .filter(|n| !reason.contains(*n))
                    .map(|n| format!("the refusal does not name {n:?}")),
            ),
        }
        if let Some(e) = run.applied {
            wrong.push(format!("epoch {e} was applied"));
        }
        wrong.extend(self.off_point());
        // What a restart of the secondary makes of it.
        drop(self.store.take());
        match ReplicaStore::open(&self.root, false, keep()) {
            Err(e) => wrong.push(format!("the secondary cannot restart: {e}")),
            Ok(store) => {
                self.store = Some(store);
                if let Some(off) = self.off_point() {
                    wrong.push(format!("after a restart: {off}"));
                }
            }
        }
        if !wrong.is_empty() {
            let failures = std::mem::take(&mut self.failures);
            let tried = self.tried;
            *self = Fixture::new();
            self.failures = failures;
            self.tried = tried;
            self.failures.push(format!(
                "{what} (refused: {:?}):\n    {}",
                run.refused,
                wrong.join("\n    ")
            ));
        }
    }

    /// [`Fixture::assert_refused`] for the next legitimate epoch after
    /// `change` (which gets the pair's key).
    fn refuse_changed(
        &mut self,
        what: &str,
        needles: &[&str],
        change: impl FnOnce(&mut Vec<ShipMessage>, &HashKey),
    ) {
        let mut m = self.next_epoch();
        change(&mut m, &self.key);
        self.assert_refused(what, m, needles);
    }

    /// Closes and opens the store again, as a restart of the secondary.
    fn reopen(&mut self) {
        drop(self.store.take());
        self.store = Some(
            ReplicaStore::open(&self.root, false, keep())
                .unwrap_or_else(|e| panic!("the replica does not open again: {e}")),
        );
    }

    /// Ends a test: the store still takes the next legitimate epoch, and
    /// no bad input broke the replica.
    fn finish(mut self) {
        self.assert_accepts_next_epoch();
        assert!(
            self.failures.is_empty(),
            "{} of {} bad inputs were not refused cleanly (the replica must stay at its \
             last applied point):\n  {}",
            self.failures.len(),
            self.tried,
            self.failures.join("\n  ")
        );
    }

    /// The store still takes the next legitimate epoch (a refusal closed
    /// one stream, not the replica).
    fn assert_accepts_next_epoch(&mut self) {
        let msgs = self.next_epoch();
        let run = drive_honest(self.store(), msgs.clone());
        assert_eq!(
            run.refused, None,
            "the next legitimate epoch was refused after the bad input"
        );
        let epoch = self.applied + 1;
        assert_eq!(run.applied, Some(epoch));
        assert_applied_as_offered(self, &msgs, epoch);
        self.mark_applied(epoch);
    }
}

/// After an accepted epoch: the store is at `epoch`, nothing left to redo,
/// nothing outside the root, every file of the epoch (with a path no other
/// file shares) has its size, and every offered block holds content that
/// hashes to its offer (zeros for a zero marker): a forged or corrupted
/// message never yields content other than what was offered. Offers after
/// the Commit are not part of the epoch (the stream is refused there).
fn assert_applied_as_offered(fx: &Fixture, msgs: &[ShipMessage], epoch: u64) {
    let store = fx.store();
    assert_eq!(store.applied().epoch, Epoch(epoch), "applied epoch");
    assert!(!store.apply_pending(), "redo record left after an apply");
    assert!(
        fs::read_dir(&fx.outside).expect("outside").next().is_none(),
        "an accepted epoch wrote outside the root"
    );
    let files: Vec<&FileState> = msgs
        .iter()
        .filter_map(|m| match &m.body {
            Some(ship_message::Body::Manifest(l)) => Some(&l.files),
            _ => None,
        })
        .flatten()
        .collect();
    assert!(!files.is_empty(), "an applied epoch lists its files");
    let mut uses: HashMap<&[u8], usize> = HashMap::new();
    for f in &files {
        *uses.entry(&f.path).or_default() += 1;
    }
    let paths: HashMap<u64, PathBuf> = files
        .iter()
        .filter(|f| uses[f.path.as_slice()] == 1)
        .map(|f| {
            let p = fx
                .root
                .join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&f.path));
            let meta = fs::symlink_metadata(&p)
                .unwrap_or_else(|e| panic!("applied file {}: {e}", p.display()));
            assert!(meta.is_file(), "{} is not a regular file", p.display());
            assert_eq!(meta.len(), f.size, "{}: size", p.display());
            (f.file_id, p)
        })
        .collect();
    // Offers after the Commit were never part of the epoch.
    let until_commit = msgs
        .iter()
        .take_while(|m| !matches!(m.body, Some(ship_message::Body::Commit(_))));
    for m in until_commit {
        let Some(ship_message::Body::Offers(o)) = &m.body else {
            continue;
        };
        for o in &o.offers {
            let Some(p) = paths.get(&o.file_id) else {
                continue;
            };
            let mut data = vec![0u8; o.length as usize];
            fs::File::open(p)
                .and_then(|f| f.read_exact_at(&mut data, o.block * BS))
                .unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
            if o.zero {
                assert!(
                    block::is_zero(&data),
                    "{}: zero block {}",
                    p.display(),
                    o.block
                );
            } else {
                assert_eq!(
                    fx.key.hash(&data).to_bytes().as_slice(),
                    o.hash.as_slice(),
                    "{} block {}: content differs from what was offered",
                    p.display(),
                    o.block
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------
// One test per class of bad input.

#[test]
fn the_legitimate_epochs_apply_and_the_fixture_is_sound() {
    let mut fx = Fixture::new();
    assert!(fx.root.join("vms/a.img").is_file() && fx.root.join("b.img").is_file());
    let run = fx.drive(fx.next_epoch());
    assert_eq!(
        run.wants,
        vec![vec![0, 2], vec![0, 1]],
        "new content is wanted"
    );
    assert_eq!(run.applied, Some(2), "{run:?}");
    assert_applied_as_offered(&fx, &fx.next_epoch(), 2);
    fx.mark_applied(2);
    fx.finish();
}

/// A point that cannot be applied (here a folder put in the way of
/// `vms/a.img` behind the secondary's back once the point's lists were
/// checked; in life EMFILE, ENOSPC, EIO) is a retryable failure that
/// names its cause, not a refusal, and skips nothing: the point is rolled
/// back to the applied point (what else was done behind its back is left
/// alone), and once the cause is gone the same point applies whole.
#[test]
fn a_point_that_cannot_be_applied_is_rolled_back_and_applies_once_the_cause_is_gone() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    let mut session = Some(Session::new(fx.store()).expect("a session"));
    for m in msgs[..OFFERS_A].iter().cloned() {
        handle(&mut session, m).expect("the lists are accepted");
    }
    let (image, moved) = (fx.root.join("vms/a.img"), fx.root.join("moved.img"));
    fs::rename(&image, &moved).expect("move a.img away");
    fs::create_dir(&image).expect("a folder in the way");
    let failed = msgs[OFFERS_A..]
        .iter()
        .cloned()
        .find_map(|m| handle(&mut session, m).err())
        .expect("the point fails");
    drop(session);
    assert!(
        failed.is_retryable(),
        "a failed apply is a refusal: {failed}"
    );
    assert!(
        failed.to_string().starts_with("applying epoch 2: ")
            && failed.to_string().contains("a.img"),
        "the cause is not named: {failed}"
    );
    let store = fx.store();
    assert!(
        !store.apply_pending(),
        "a redo record for a point never committed"
    );
    assert_eq!(
        store.applied().epoch,
        Epoch(1),
        "a failed point was recorded"
    );
    assert!(moved.is_file(), "what was done behind its back was undone");
    fs::remove_file(&moved).expect("remove the other name");
    assert_eq!(fx.off_point(), None, "the failed point was not rolled back");

    let run = fx.drive(msgs.clone());
    assert_eq!(run.refused, None, "the retry after the cause went failed");
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// A point that fails after its commit point (its blocks are durable; here
/// a folder put where its `applied` record goes, so that finishing it
/// fails) keeps its redo record: the replica is not at a new point yet,
/// each next stream tries to finish it first and says why it cannot, and
/// once the cause is gone it finishes, without a restart.
#[test]
fn a_point_failing_after_its_commit_point_keeps_its_redo_and_is_finished_once_the_cause_is_gone() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    let mut session = Some(Session::new(fx.store()).expect("a session"));
    for m in msgs[..COMMIT].iter().cloned() {
        handle(&mut session, m).expect("the point is accepted");
    }
    let record = fx.store().paths.applied();
    let before = fs::read(&record).expect("the applied record");
    fs::remove_file(&record).expect("remove the applied record");
    fs::create_dir(&record).expect("a folder in the way");
    let failed = handle(&mut session, msgs[COMMIT].clone()).expect_err("finishing fails");
    drop(session);
    assert!(failed.is_retryable(), "{failed}");
    let store = fx.store();
    assert!(store.apply_pending(), "the redo record is gone");
    assert_eq!(
        store.applied().epoch,
        Epoch(1),
        "a failed point was recorded"
    );
    let again = Session::new(store).expect_err("the retry fails while the cause stays");
    assert!(again.is_retryable(), "{again}");
    assert!(again.to_string().contains("applied"), "{again}");

    fs::remove_dir(&record).expect("rmdir the folder in the way");
    fs::write(&record, before).expect("the applied record back");
    let run = fx.drive(Vec::new());
    assert_eq!(run.refused, None, "the retry after the cause went failed");
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// A stream cut after its first Blocks message (the connection broke):
/// the next stream of the same point starts after the offers it left
/// complete, so a reconnect loop moves forward even when every stream
/// breaks early.
#[test]
fn a_stream_of_the_same_point_broken_after_its_first_blocks_resumes_after_them() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    let broken = fx.drive(msgs[..=BLOCKS_A].to_vec());
    assert_eq!((broken.refused.as_deref(), broken.applied), (None, None));
    assert_eq!(broken.resumed_after, Some(0));
    assert_eq!(broken.wants, vec![vec![0, 2]]);
    assert_eq!(fx.off_point(), None, "a broken stream moved the replica");
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(resumed.resumed_after, Some(3), "the three offers of a.img");
    assert_eq!(resumed.wants, vec![vec![], vec![0, 1]]);
    assert_eq!(resumed.applied, Some(2));
    assert_eq!(fx.store().stats.blocks_resumed.load(Ordering::Relaxed), 3);
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// A stream cut inside a chunk, after the first of its two wanted blocks
/// arrived: the next stream resumes at the block that had not.
#[test]
fn a_stream_broken_inside_a_chunk_resumes_at_the_first_block_that_had_not_arrived() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    let mut broken = msgs[..=BLOCKS_C].to_vec();
    let Some(ship_message::Body::Blocks(b)) = &mut broken[BLOCKS_C].body else {
        panic!("message 4 is the second Blocks");
    };
    b.blocks.truncate(1);
    let run = fx.drive(broken);
    assert_eq!((run.refused.as_deref(), run.applied), (None, None));
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(
        resumed.resumed_after,
        Some(4),
        "a.img's three offers and c.img's first"
    );
    assert_eq!(
        resumed.wants,
        vec![vec![], vec![0]],
        "only c.img's second block"
    );
    assert_eq!(resumed.applied, Some(2));
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// The secondary restarted (its memory lost) after a stream staged part
/// of a point: the point's log brings it back, re-hashed, and the next
/// stream of the point resumes after the offers it holds.
#[test]
fn a_point_interrupted_by_a_restart_of_the_secondary_resumes_from_its_log() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    let broken = fx.drive(msgs[..=BLOCKS_A].to_vec());
    assert_eq!(broken.applied, None);
    fx.reopen();
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(
        resumed.resumed_after,
        Some(3),
        "a.img's three offers, from the log"
    );
    assert_eq!(resumed.wants, vec![vec![], vec![0, 1]]);
    assert_eq!(resumed.applied, Some(2));
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    assert!(
        !fx.store().paths.staged_offers().exists(),
        "the log outlived the apply"
    );
    fx.finish();
}

/// A log whose staged data was damaged while the secondary was down is
/// trusted only up to the first block that no longer hashes right.
#[test]
fn a_log_over_damaged_staging_is_trusted_only_up_to_the_damage() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    fx.drive(msgs[..=BLOCKS_A].to_vec());
    let data = fx.store().paths.staged_data();
    let len = fs::metadata(&data).expect("staged data").len();
    fs::write(&data, vec![0x5a; len as usize]).expect("damage staging");
    fx.reopen();
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(resumed.resumed_after, Some(0));
    assert_eq!(resumed.wants, vec![vec![0, 2], vec![0, 1]]);
    assert_eq!(resumed.applied, Some(2));
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// The first stream of an epoch, with another point id than `msgs`, cut
/// after its first Blocks message.
fn break_another_point(fx: &Fixture, msgs: &[ShipMessage]) {
    let mut other = msgs[..=BLOCKS_A].to_vec();
    begin_of(&mut other[BEGIN]).point = vec![0xee; 16];
    let broken = fx.drive(other);
    assert_eq!((broken.refused.as_deref(), broken.applied), (None, None));
}

/// After a broken stream, the primary cut a newer point (folding the old
/// one in): its offers of content the broken stream staged are filled
/// from staging, not asked for again.
#[test]
fn a_newer_point_after_a_broken_stream_reuses_its_staged_content() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    break_another_point(&fx, &msgs);
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(
        resumed.resumed_after,
        Some(0),
        "another point starts afresh"
    );
    assert_eq!(
        resumed.wants,
        vec![vec![], vec![0, 1]],
        "content staged by the broken stream was asked for again"
    );
    assert_eq!(resumed.applied, Some(2));
    assert_eq!(fx.store().stats.blocks_resumed.load(Ordering::Relaxed), 2);
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// Carried content is a hint like the index: staged data damaged behind
/// the secondary's back is noticed when it is re-hashed, and asked for.
#[test]
fn carried_content_damaged_in_staging_is_asked_for_again_not_applied() {
    let mut fx = Fixture::new();
    let msgs = fx.next_epoch();
    break_another_point(&fx, &msgs);
    let data = fx.store().paths.staged_data();
    let len = fs::metadata(&data).expect("staged data").len();
    assert!(len > 0, "the broken stream staged nothing");
    fs::write(&data, vec![0x5a; len as usize]).expect("damage staging");
    let resumed = drive_honest(fx.store(), msgs.clone());
    assert_eq!(resumed.refused, None);
    assert_eq!(resumed.wants, vec![vec![0, 2], vec![0, 1]]);
    assert_eq!(resumed.applied, Some(2));
    assert_applied_as_offered(&fx, &msgs, 2);
    fx.mark_applied(2);
    fx.finish();
}

#[test]
fn refuses_a_session_before_any_primary_said_hello() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = ReplicaStore::open(&dir.path().join("r"), false, keep()).expect("open");
    let run = drive(&store, first_epoch(&HashKey::random().expect("key")));
    let reason = run.refused.expect("refused");
    assert!(reason.contains("no primary has said hello"), "{reason}");
    assert_eq!(store.applied(), Applied::default());
}

/// Every place a path travels: an operation's path, a rename's or link's
/// target, a file's path at the cut.
fn with_path(fx: &Fixture, place: &str, path: &str) -> Vec<ShipMessage> {
    let mut m = fx.next_epoch();
    let b = lists_of(&mut m[LISTS]);
    match place {
        "op path" => b.ops.push(op(OpKind::Create, 9, path, "", 0)),
        "mkdir path" => b.ops.push(op(OpKind::Mkdir, 0, path, "", 0)),
        "rename target" => b.ops.push(op(OpKind::Rename, 2, "b.img", path, 0)),
        "link target" => b.ops.push(op(OpKind::Link, 2, "b.img", path, 0)),
        "file path" => b.files[1].path = path.as_bytes().to_vec(),
        _ => unreachable!("{place}"),
    }
    m
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

const PLACES: [&str; 5] = [
    "op path",
    "mkdir path",
    "rename target",
    "link target",
    "file path",
];

/// Each path of `bad` (made for the fixture) in each place is refused
/// with a message containing `needle`.
fn refuse_paths(bad: &dyn Fn(&Fixture) -> Vec<String>, needle: &str) {
    let mut fx = Fixture::new();
    for path in bad(&fx) {
        for place in PLACES {
            let m = with_path(&fx, place, &path);
            fx.assert_refused(&format!("{place} {path:?}"), m, &[needle]);
        }
    }
    fx.finish();
}

#[test]
fn refuses_dotdot_paths_in_ops_targets_and_files() {
    refuse_paths(
        &|_| strings(&["../x.img", "vms/../../x.img", "..", "vms/..", "./c.img"]),
        "not a relative path below the replica root",
    );
}

#[test]
fn refuses_absolute_paths() {
    refuse_paths(
        &|fx| {
            let abs = fx.outside.join("x.img");
            let abs = abs.to_str().expect("utf-8");
            strings(&["/etc/hbrfs-fuzz-x", abs, "//x.img", "/"])
        },
        "not a relative path below the replica root",
    );
}

#[test]
fn refuses_paths_into_the_state_folder_hbrfs() {
    refuse_paths(
        &|_| {
            strings(&[
                ".hbrfs",
                ".hbrfs/applied",
                ".hbrfs/pair",
                ".hbrfs/index/db",
                ".hbrfs/staging/data",
            ])
        },
        "state folder",
    );
}

#[test]
fn refuses_paths_with_nul_bytes_empty_paths_and_overlong_paths() {
    let long = "a/".repeat(crate::wire::MAX_PATH / 2 + 1) + "x.img";
    refuse_paths(
        &|_| strings(&["c\0.img", "\0", "vms/\0/x", "", &long]),
        "not a relative path below the replica root",
    );
}

#[test]
fn refuses_paths_through_a_symlink_planted_in_the_replica() {
    refuse_paths(&|_| strings(&["escape/x.img", "escape/d/x.img"]), "symlink");
}

#[test]
fn refuses_paths_through_a_symlink_made_earlier_in_the_same_epoch() {
    let mut fx = Fixture::new();
    for (link_target, through) in [
        ("OUTSIDE", "newlink/x.img"),
        ("..", "newlink/x.img"),
        ("vms", "newlink/a.img"),
    ] {
        for place in PLACES {
            let outside = fx.outside.to_str().expect("utf-8").to_string();
            let link_target = link_target.replace("OUTSIDE", &outside);
            let mut m = with_path(&fx, place, through);
            lists_of(&mut m[LISTS])
                .ops
                .insert(0, op(OpKind::Symlink, 0, "newlink", &link_target, 0));
            fx.assert_refused(
                &format!("symlink newlink -> {link_target}, then {place} {through:?}"),
                m,
                &["symlink"],
            );
        }
    }
    fx.finish();
}

#[test]
fn refuses_file_paths_naming_a_symlink_or_a_folder() {
    let mut fx = Fixture::new();
    for path in ["escape", "vms", "vms/"] {
        fx.refuse_changed(
            &format!("file path {path:?}"),
            &[path.trim_end_matches('/')],
            |m, _| {
                lists_of(&mut m[LISTS]).files[1].path = path.as_bytes().to_vec();
            },
        );
    }
    fx.finish();
}

#[test]
fn refuses_namespace_operations_of_unknown_kind_0_and_99() {
    let mut fx = Fixture::new();
    for kind in [0, 99, -1] {
        fx.refuse_changed(&format!("op kind {kind}"), &["kind"], |m, _| {
            let mut bad = op(OpKind::Create, 4, "d.img", "", 0);
            bad.kind = kind;
            lists_of(&mut m[LISTS]).ops.push(bad);
        });
    }
    fx.finish();
}

#[test]
fn refuses_namespace_operations_the_replica_cannot_apply_rmdir_nonempty_unlink_folder_mkdir_over_file()
 {
    let mut fx = Fixture::new();
    for (what, bad) in [
        (
            "rmdir of a non-empty folder",
            op(OpKind::Rmdir, 0, "vms", "", 0),
        ),
        ("unlink of a folder", op(OpKind::Unlink, 0, "vms", "", 0)),
        ("mkdir over a file", op(OpKind::Mkdir, 0, "b.img/d", "", 0)),
        (
            "truncate of a planted symlink",
            op(OpKind::Truncate, 2, "escape", "", 0),
        ),
    ] {
        fx.refuse_changed(what, &[], |m, _| {
            lists_of(&mut m[LISTS]).ops.push(bad);
        });
    }
    fx.finish();
}

#[test]
fn refuses_huge_sizes_in_files_and_truncates_and_too_many_entries() {
    let mut fx = Fixture::new();
    for size in [u64::MAX, MAX_FILE_SIZE + 1, 1 << 63] {
        fx.refuse_changed(
            &format!("file size {size}"),
            &["beyond the limit"],
            |m, _| {
                lists_of(&mut m[LISTS]).files.push(file(5, "big.img", size));
            },
        );
    }
    // Beyond what the replica's file system holds (ext4: 16 TiB): refused,
    // not a failed apply.
    let size = 1u64 << 45;
    fx.refuse_changed(&format!("file size {size}"), &[], |m, _| {
        lists_of(&mut m[LISTS]).files.push(file(5, "big.img", size));
    });
    for size in [u64::MAX, 1 << 63, MAX_FILE_SIZE + 1] {
        fx.refuse_changed(&format!("truncate to {size}"), &[], |m, _| {
            lists_of(&mut m[LISTS])
                .ops
                .push(op(OpKind::Truncate, 2, "b.img", "", size));
        });
    }
    fx.refuse_changed("MAX_ENTRIES + 1 operations", &["at most"], |m, _| {
        let many = op(OpKind::Mkdir, 0, "", "", 0);
        lists_of(&mut m[LISTS]).ops = vec![many; MAX_ENTRIES + 1];
    });
    fx.refuse_changed("MAX_ENTRIES + 1 files", &["at most"], |m, _| {
        lists_of(&mut m[LISTS]).files = (0..=MAX_ENTRIES as u64)
            .map(|i| file(10 + i, "", 0))
            .collect();
    });
    fx.finish();
}

/// The lists of `msgs` split into one Manifest chunk per operation and
/// per file state, then an empty chunk that ends them.
fn split_lists(msgs: &mut Vec<ShipMessage>) {
    let whole = lists_of(&mut msgs[LISTS]).clone();
    let ops = whole
        .ops
        .into_iter()
        .map(|o| chunk(vec![o], Vec::new(), false));
    let files = whole
        .files
        .into_iter()
        .map(|f| chunk(Vec::new(), vec![f], false));
    let chunks: Vec<ShipMessage> = ops
        .chain(files)
        .chain([chunk(Vec::new(), Vec::new(), true)])
        .collect();
    msgs.splice(LISTS..=LISTS, chunks);
}

/// A point's lists may come in any number of Manifest chunks (the primary
/// cuts a backlog into chunks of a few MiB): the point applies as if they
/// came in one, and only the last chunk is answered.
#[test]
fn lists_split_across_many_manifest_chunks_apply_like_one_chunk() {
    let mut fx = Fixture::new();
    let mut m = fx.next_epoch();
    split_lists(&mut m);
    assert_eq!(
        m.len(),
        fx.next_epoch().len() + 3,
        "1 op and 2 files, then the end"
    );
    let run = fx.drive(m.clone());
    assert_eq!(run.refused, None, "{run:?}");
    assert_eq!(run.resumed_after, Some(0));
    assert_eq!(run.wants, vec![vec![0, 2], vec![0, 1]]);
    assert_eq!(run.applied, Some(2));
    assert_applied_as_offered(&fx, &m, 2);
    fx.mark_applied(2);
    fx.finish();
}

#[test]
fn refuses_manifest_chunks_out_of_place_and_entries_beyond_the_limit_across_chunks() {
    let mut fx = Fixture::new();
    fx.refuse_changed(
        "Manifest before Begin",
        &["Manifest chunk before Begin"],
        |m, _| {
            m.remove(BEGIN);
        },
    );
    fx.refuse_changed(
        "Manifest after the chunk that ended the lists",
        &["after the end of its lists"],
        |m, _| m.insert(LISTS + 1, chunk(Vec::new(), Vec::new(), true)),
    );
    fx.refuse_changed("operations after file states", &["out of order"], |m, _| {
        let whole = lists_of(&mut m[LISTS]).clone();
        let files_first = chunk(Vec::new(), whole.files, false);
        m.splice(
            LISTS..=LISTS,
            [files_first, chunk(whole.ops, Vec::new(), true)],
        );
    });
    fx.refuse_changed(
        "Offers before the lists ended",
        &["Offers before Begin and the end of its lists"],
        |m, _| lists_of(&mut m[LISTS]).end = false,
    );
    fx.refuse_changed(
        "Commit before the lists ended",
        &["Commit before Begin"],
        |m, _| {
            lists_of(&mut m[LISTS]).end = false;
            m.drain(OFFERS_A..COMMIT);
        },
    );
    // Each chunk within the limit, together beyond it.
    fx.refuse_changed(
        "MAX_ENTRIES + 2 operations in two chunks",
        &["at most"],
        |m, _| {
            let half = vec![op(OpKind::Mkdir, 0, "vms", "", 0); MAX_ENTRIES / 2 + 1];
            let chunks = [
                chunk(half.clone(), Vec::new(), false),
                chunk(half, Vec::new(), true),
            ];
            m.splice(LISTS..=LISTS, chunks);
        },
    );
    fx.finish();
}

/// Offers go file by file, blocks ascending, so that the secondary knows
/// a block offered twice from the last offer alone (no set of every offer
/// made): one out of order is refused like one offered twice.
#[test]
fn refuses_offers_out_of_order_within_a_file_or_back_to_a_file_left() {
    let mut fx = Fixture::new();
    fx.refuse_changed("blocks 2 then 0 of a.img", &["out of order"], |m, _| {
        offers_of(&mut m[OFFERS_A]).swap(0, 1);
    });
    fx.refuse_changed(
        "back to a.img after c.img",
        &["offered twice or out of order"],
        |m, key| {
            let late = offer(key, 1, 1, &content(4, 4096));
            offers_of(&mut m[OFFERS_C]).push(late);
        },
    );
    fx.finish();
}

#[test]
fn refuses_files_listed_twice_and_a_second_begin() {
    let mut fx = Fixture::new();
    fx.refuse_changed("file 3 listed twice", &["listed twice"], |m, _| {
        let dup = lists_of(&mut m[LISTS]).files[1].clone();
        lists_of(&mut m[LISTS]).files.push(dup);
    });
    fx.refuse_changed("a second Begin", &["second Begin"], |m, _| {
        m.insert(1, m[BEGIN].clone());
    });
    fx.finish();
}

#[test]
fn refuses_offers_beyond_the_file_size_and_for_files_not_in_the_epoch() {
    let mut fx = Fixture::new();
    type Change = fn(&mut Offer);
    let cases: [(&str, Change, &str); 5] = [
        (
            "block 4 of a 4-block file",
            |o| o.block = 4,
            "beyond its size",
        ),
        ("block u64::MAX", |o| o.block = u64::MAX, "beyond its size"),
        (
            "block 2^52 (offset overflows)",
            |o| o.block = 1 << 52,
            "beyond its size",
        ),
        (
            "file 2, not in this epoch",
            |o| o.file_id = 2,
            "not in the epoch",
        ),
        ("file 77, unknown", |o| o.file_id = 77, "not in the epoch"),
    ];
    for (what, change, needle) in cases {
        fx.refuse_changed(what, &[needle], |m, _| {
            change(&mut offers_of(&mut m[OFFERS_A])[0]);
        });
    }
    fx.finish();
}

#[test]
fn refuses_offers_with_wrong_lengths_short_long_zero_and_blocks_decoding_short() {
    let mut fx = Fixture::new();
    for (what, index, length) in [
        ("full block offered as 100 bytes", 0, 100),
        ("full block offered as 4097 bytes", 0, 4097),
        ("full block offered as 0 bytes", 0, 0),
        ("short last block offered as a full block", 2, 4096),
        ("short last block offered as 99 bytes", 2, 99),
        ("zero marker of the wrong length", 1, 4095),
    ] {
        fx.refuse_changed(what, &["has length"], |m, _| {
            offers_of(&mut m[OFFERS_A])[index].length = length;
        });
    }
    // The frame decodes to fewer bytes than offered.
    fx.refuse_changed(
        "a block decoding to 4000 of 4096 bytes",
        &["does not match the hash"],
        |m, _| {
            blocks_of(&mut m[BLOCKS_A])[0] = data_block(1, 0, &content(7, 4000));
        },
    );
    fx.finish();
}

#[test]
fn refuses_duplicate_offers_in_one_message_and_across_messages() {
    let mut fx = Fixture::new();
    fx.refuse_changed(
        "block 0 offered twice in one message",
        &["offered twice"],
        |m, _| push_first_again(offers_of(&mut m[OFFERS_A])),
    );
    fx.refuse_changed(
        "the same Offers message twice",
        &["offered twice"],
        |m, _| m.insert(BLOCKS_A + 1, m[OFFERS_A].clone()),
    );
    fx.refuse_changed(
        "a zero block offered again as data",
        &["offered twice"],
        |m, key| {
            let mut zero_again = offers_of(&mut m[OFFERS_A])[1].clone();
            zero_again.zero = false;
            zero_again.hash = key.hash(&[1u8; 4096]).to_bytes().to_vec();
            offers_of(&mut m[OFFERS_C]).push(zero_again);
        },
    );
    fx.finish();
}

#[test]
fn refuses_hashes_of_0_1_15_17_32_bytes_and_point_ids_of_0_15_17_bytes() {
    let mut fx = Fixture::new();
    let hashes = [0, 1, 15, 17, 32].map(|len| (len, true));
    let points = [0, 15, 17].map(|len| (len, false));
    for (len, is_hash) in hashes.into_iter().chain(points) {
        let needle = if is_hash {
            format!("{len}-byte hash")
        } else {
            format!("point id of {len} bytes")
        };
        fx.refuse_changed(&needle, &[&needle], |m, _| {
            if is_hash {
                offers_of(&mut m[OFFERS_A])[0].hash = vec![0xab; len];
            } else {
                begin_of(&mut m[BEGIN]).point = vec![7; len];
            }
        });
    }
    fx.finish();
}

/// Offers stream ahead of their blocks (protocol 5): the Offers of `c.img`
/// before the blocks of `vms/a.img` are answered, and the point applies as
/// offered.
#[test]
fn offers_ahead_of_the_blocks_they_want_are_answered_and_apply() {
    let mut fx = Fixture::new();
    let mut m = fx.next_epoch();
    let offers_c = m.remove(OFFERS_C);
    m.insert(BLOCKS_A, offers_c);
    let run = fx.drive(m.clone());
    assert_eq!(run.refused, None);
    assert_eq!(run.wants, vec![vec![0, 2], vec![0, 1]]);
    assert_eq!(run.applied, Some(2), "{run:?}");
    assert_applied_as_offered(&fx, &m, 2);
    fx.mark_applied(2);
    fx.finish();
}

/// The next epoch with `c.img` made big and its offers replaced by two
/// Offers messages of `first` and `second` offers (content nobody holds),
/// one after the other with no block in between.
fn two_offers_of_c(m: &mut [ShipMessage], first: usize, second: usize) {
    let n = (first + second) as u64;
    lists_of(&mut m[LISTS]).files[1].size = (n + 1) * BS;
    let fake = |block: u64| Offer {
        file_id: 3,
        block,
        hash: content(block ^ 0x5eed, 16),
        zero: false,
        length: BS as u32,
    };
    let split = first as u64;
    m[OFFERS_C] = offers((0..split).map(fake).collect());
    m[BLOCKS_C] = offers((split..n).map(fake).collect());
}

#[test]
fn refuses_offers_beyond_the_window_of_offers_awaiting_blocks() {
    let mut fx = Fixture::new();
    let half = MAX_WINDOW_OFFERS / 2;
    // Exactly the window: both Offers are answered; the Commit then finds
    // the blocks missing.
    fx.refuse_changed(
        "MAX_WINDOW_OFFERS offers awaiting blocks",
        &["wanted blocks never sent"],
        |m, _| two_offers_of_c(m, half, MAX_WINDOW_OFFERS - half),
    );
    fx.refuse_changed(
        "MAX_WINDOW_OFFERS + 1 offers awaiting blocks",
        &["await blocks still to come"],
        |m, _| two_offers_of_c(m, half, MAX_WINDOW_OFFERS - half + 1),
    );
    fx.finish();
}

#[test]
fn refuses_too_many_offers_or_blocks_in_one_message() {
    let mut fx = Fixture::new();
    fx.refuse_changed(
        "MAX_OFFERS + 1 offers",
        &["offers in one message"],
        |m, _| repeat_first(offers_of(&mut m[OFFERS_A]), MAX_OFFERS + 1),
    );
    fx.refuse_changed(
        "MAX_BLOCKS + 1 blocks",
        &["blocks in one message"],
        |m, _| repeat_first(blocks_of(&mut m[BLOCKS_A]), MAX_BLOCKS + 1),
    );
    fx.finish();
}

#[test]
fn refuses_blocks_not_asked_for_before_offers_twice_for_zero_and_held_blocks() {
    let mut fx = Fixture::new();
    fx.refuse_changed(
        "a block before its offer",
        &["was not asked for"],
        |m, _| {
            let b = blocks_of(&mut m[BLOCKS_C])[0].clone();
            m.insert(OFFERS_A, blocks(vec![b]));
        },
    );

    fx.refuse_changed(
        "the same block sent twice",
        &["was not asked for"],
        |m, _| push_first_again(blocks_of(&mut m[BLOCKS_A])),
    );

    fx.refuse_changed(
        "data for a block offered as zero",
        &["was not asked for"],
        |m, _| {
            blocks_of(&mut m[BLOCKS_A]).push(data_block(1, 2, &content(5, 4096)));
        },
    );

    fx.refuse_changed("a block never offered", &["was not asked for"], |m, _| {
        blocks_of(&mut m[BLOCKS_A]).push(data_block(1, 1, &content(5, 4096)));
    });

    // b.img's block 0 is held: offered under c.img it is answered "have";
    // sending it anyway is refused.
    fx.refuse_changed(
        "a block answered \"have\" sent anyway",
        &["was not asked for"],
        |m, key| {
            let held = content(20, 4096);
            offers_of(&mut m[OFFERS_C])[0] = offer(key, 3, 0, &held);
            blocks_of(&mut m[BLOCKS_C])[0] = data_block(3, 0, &held);
        },
    );

    fx.refuse_changed("Blocks before Begin", &["was not asked for"], |m, _| {
        m.insert(BEGIN + 1, blocks(vec![data_block(1, 0, &content(1, 4096))]));
        m.remove(BEGIN);
    });
    fx.finish();
}

/// A frame of `data` written by the streaming encoder, whose header does
/// not state the content size.
fn streamed_frame(data: &[u8]) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), 1).expect("encoder");
    e.write_all(data).expect("compress");
    e.finish().expect("finish frame")
}

#[test]
fn refuses_zstd_bombs_sized_or_streamed_or_concatenated_beyond_the_block() {
    let mut fx = Fixture::new();
    let huge = vec![0x5au8; 64 << 20];
    let sized = block::compress(&huge, 1).expect("zstd");
    let streamed = streamed_frame(&huge);
    let one_more = block::compress(&content(30, 4097), 1).expect("zstd");
    let concatenated = [
        block::compress(&content(31, 4096), 1).expect("zstd"),
        block::compress(&content(32, 4096), 1).expect("zstd"),
    ]
    .concat();
    println!(
        "bombs: 64 MiB in {} B (size in header), {} B (streamed, no size)",
        sized.len(),
        streamed.len()
    );
    for (what, frame) in [
        ("64 MiB frame with its size in the header", sized),
        ("64 MiB streamed frame without a size", streamed),
        ("4097 bytes for a 4096-byte block", one_more),
        ("two concatenated 4096-byte frames", concatenated),
    ] {
        let started = Instant::now();
        fx.refuse_changed(
            what,
            &["block 0 of file 1", "expands beyond 4096 bytes"],
            |m, _| blocks_of(&mut m[BLOCKS_A])[0].zstd = frame,
        );
        assert!(
            started.elapsed().as_secs() < 5,
            "{what}: took {:?} to refuse",
            started.elapsed()
        );
    }
    fx.finish();
}

#[test]
fn refuses_corrupted_zstd_garbage_truncated_bitflipped_and_empty_frames() {
    let mut fx = Fixture::new();
    let good = blocks_of(&mut fx.next_epoch()[BLOCKS_A])[0].zstd.clone();
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x10;
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    for (what, frame, needle) in [
        ("garbage", b"not a zstd frame at all".to_vec(), "corrupt"),
        ("empty frame", Vec::new(), "corrupt"),
        ("truncated frame", good[..good.len() / 2].to_vec(), ""),
        ("bad magic", bad_magic, "corrupt"),
        ("bit flipped in the middle", flipped, ""),
    ] {
        fx.refuse_changed(what, &["block 0 of file 1", needle], |m, _| {
            blocks_of(&mut m[BLOCKS_A])[0].zstd = frame;
        });
    }
    fx.finish();
}

#[test]
fn refuses_blocks_whose_content_does_not_match_the_offered_hash_forged_hashes() {
    let mut fx = Fixture::new();
    // The offer names content X; the block carries Y.
    fx.refuse_changed(
        "content other than offered",
        &["does not match the hash"],
        |m, _| {
            blocks_of(&mut m[BLOCKS_A])[0] = data_block(1, 0, &content(666, 4096));
        },
    );
    // A hash made with another pair's key for the content sent.
    fx.refuse_changed(
        "hash under another key",
        &["does not match the hash"],
        |m, _| {
            let other = HashKey::random().expect("key");
            let data = content(667, 4096);
            offers_of(&mut m[OFFERS_A])[0] = offer(&other, 1, 0, &data);
            blocks_of(&mut m[BLOCKS_A])[0] = data_block(1, 0, &data);
        },
    );
    // Zeros sent as data under a forged hash.
    fx.refuse_changed(
        "zeros under a data hash",
        &["does not match the hash"],
        |m, _| {
            blocks_of(&mut m[BLOCKS_A])[0] = data_block(1, 0, &[0u8; 4096]);
        },
    );
    fx.finish();
}

#[test]
fn a_hash_reference_to_content_changed_behind_the_index_is_asked_for_not_copied() {
    let mut fx = Fixture::new();
    // Someone rewrites b.img's block 0 behind hbrfs's back: the content
    // index still points there for the old hash.
    let b0 = content(20, 4096);
    let b1 = content(21, 4096);
    fs::OpenOptions::new()
        .write(true)
        .open(fx.root.join("b.img"))
        .and_then(|f| f.write_all_at(&[0xee; 4096], 0))
        .expect("rewrite b.img");
    fx.point = tree(&fx.root);
    let mut m = fx.next_epoch();
    offers_of(&mut m[OFFERS_C])[0] = offer(&fx.key, 3, 0, &b0);
    blocks_of(&mut m[BLOCKS_C])[0] = data_block(3, 0, &b0);
    // b.img's block 1 is intact: a reference to it is filled locally.
    // Offers go file by file, blocks ascending: between blocks 0 and 2.
    offers_of(&mut m[OFFERS_A]).insert(1, offer(&fx.key, 1, 1, &b1));
    let run = fx.drive(m.clone());
    assert_eq!(run.refused, None, "{run:?}");
    assert_eq!(
        run.wants,
        vec![vec![0, 3], vec![0, 1]],
        "the changed block must be asked for, the intact one answered \"have\""
    );
    assert_applied_as_offered(&fx, &m, 2);
    assert_eq!(fs::read(fx.root.join("c.img")).expect("c.img")[..4096], b0);
    let a = fs::read(fx.root.join("vms/a.img")).expect("a.img");
    assert_eq!(a[4096..8192], b1, "the held block was copied wrongly");
}

#[test]
fn refuses_replayed_and_out_of_order_epochs() {
    let mut fx = Fixture::new();
    for (what, epoch, base, needle) in [
        ("epoch 1 replayed", 1, 0, "based on epoch 0"),
        ("epoch 1 on base 1", 1, 1, "not newer"),
        ("epoch 0 on base 1", 0, 1, "not newer"),
        ("epoch 3 on base 2 (skips 2)", 3, 2, "based on epoch 2"),
        ("epoch 2 on base 0", 2, 0, "based on epoch 0"),
        ("epoch u64::MAX on base 7", u64::MAX, 7, "based on epoch 7"),
    ] {
        fx.refuse_changed(what, &[needle, "epoch 1"], |m, _| {
            let b = begin_of(&mut m[BEGIN]);
            (b.epoch, b.base_epoch) = (epoch, base);
            m[COMMIT] = commit(epoch);
        });
    }
    fx.assert_refused(
        "epoch 1 replayed verbatim",
        first_epoch(&fx.key),
        &["at epoch 1"],
    );
    let two = fx.next_epoch();
    fx.assert_accepts_next_epoch();
    fx.assert_refused("epoch 2 replayed after it applied", two, &["at epoch 2"]);
    fx.finish();
}

#[test]
fn refuses_commit_before_begin_with_missing_blocks_or_for_another_epoch() {
    let mut fx = Fixture::new();
    fx.assert_refused(
        "Commit before Begin",
        vec![commit(2)],
        &["Commit before Begin"],
    );
    fx.refuse_changed(
        "Commit with 2 blocks never sent",
        &["2 wanted blocks never sent"],
        |m, _| {
            m.remove(BLOCKS_C);
        },
    );
    fx.refuse_changed(
        "Commit with 1 block never sent",
        &["1 wanted blocks never sent"],
        |m, _| {
            blocks_of(&mut m[BLOCKS_A]).pop();
        },
    );
    fx.refuse_changed(
        "Commit for epoch 3 in epoch 2",
        &["Commit for epoch 3 inside epoch 2"],
        |m, _| {
            m[COMMIT] = commit(3);
        },
    );
    fx.refuse_changed("Offers before Begin", &["Offers before Begin"], |m, _| {
        m.drain(BEGIN..=LISTS);
    });
    // A stream that ends without its Commit applies nothing.
    let mut m = fx.next_epoch();
    m.pop();
    let run = fx.drive(m);
    assert_eq!((run.applied, run.refused), (None, None));
    fx.assert_at_point("a stream ended before its Commit");
    fx.finish();
}

#[test]
fn refuses_messages_after_commit_and_keeps_the_applied_point() {
    let mut fx = Fixture::new();
    for extra in [
        commit(fx.applied + 1),
        begin(9, 8),
        offers(Vec::new()),
        blocks(Vec::new()),
        ShipMessage { body: None },
    ] {
        let good = fx.next_epoch();
        let epoch = fx.applied + 1;
        let mut m = good.clone();
        m.push(extra.clone());
        let run = fx.drive(m);
        assert_eq!(run.applied, Some(epoch), "{extra:?}: {run:?}");
        let reason = run.refused.expect("a message after Commit is refused");
        let needle = if extra.body.is_some() {
            "message after Commit"
        } else {
            "empty ship message"
        };
        assert!(
            reason.contains(needle),
            "{extra:?}: refused with {reason:?}"
        );
        // The refusal came after the point was applied: it stays applied.
        assert_applied_as_offered(&fx, &good, epoch);
        fx.mark_applied(epoch);
        fx.reopen();
        fx.assert_at_point(&format!("{extra:?} after Commit, reopened"));
    }
    fx.finish();
}

#[test]
fn refuses_empty_messages_and_empty_begins_and_ignores_empty_offers_and_blocks() {
    let mut fx = Fixture::new();
    fx.assert_refused(
        "a message without a body",
        vec![ShipMessage { body: None }],
        &["empty ship message"],
    );
    let decoded = ShipMessage::decode(&[][..]).expect("empty bytes decode");
    fx.assert_refused(
        "zero bytes on the wire",
        vec![decoded],
        &["empty ship message"],
    );
    fx.assert_refused(
        "an empty Begin",
        vec![msg(ship_message::Body::Begin(Begin::default()))],
        &["point id of 0 bytes"],
    );
    let mut m = fx.next_epoch();
    m.insert(OFFERS_A, ShipMessage { body: None });
    fx.assert_refused(
        "an empty message inside an epoch",
        m,
        &["empty ship message"],
    );
    // Empty Offers and Blocks are harmless: nothing wanted, nothing staged.
    let mut m = fx.next_epoch();
    m.insert(OFFERS_A, offers(Vec::new()));
    m.insert(OFFERS_A + 1, blocks(Vec::new()));
    let run = fx.drive(m.clone());
    assert_eq!(run.refused, None);
    assert_eq!(run.applied, Some(2));
    assert_eq!(run.wants[0], Vec::<u32>::new());
    assert_applied_as_offered(&fx, &m, 2);
}

// ---------------------------------------------------------------------------
// Random byte mutations of the encoded epoch.

/// One change to the encoded stream. Positions are taken modulo the
/// message count and length.
#[derive(Clone, Debug)]
enum Mutation {
    FlipBit {
        msg: usize,
        at: usize,
        bit: u8,
    },
    SetByte {
        msg: usize,
        at: usize,
        value: u8,
    },
    Insert {
        msg: usize,
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        msg: usize,
        at: usize,
        len: usize,
    },
    Truncate {
        msg: usize,
        at: usize,
    },
    /// Overwrite with 0xff: varints turn huge.
    Saturate {
        msg: usize,
        at: usize,
        len: usize,
    },
    /// A whole message of random bytes.
    Replace {
        msg: usize,
        bytes: Vec<u8>,
    },
    Duplicate {
        msg: usize,
    },
    Drop {
        msg: usize,
    },
    Swap {
        a: usize,
        b: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let i = any::<usize>;
    prop_oneof![
        4 => (i(), i(), 0u8..8).prop_map(|(msg, at, bit)| Mutation::FlipBit { msg, at, bit }),
        3 => (i(), i(), any::<u8>()).prop_map(|(msg, at, value)| Mutation::SetByte { msg, at, value }),
        1 => (i(), i(), prop::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(msg, at, bytes)| Mutation::Insert { msg, at, bytes }),
        1 => (i(), i(), 1usize..16).prop_map(|(msg, at, len)| Mutation::Remove { msg, at, len }),
        1 => (i(), i()).prop_map(|(msg, at)| Mutation::Truncate { msg, at }),
        1 => (i(), i(), 1usize..10).prop_map(|(msg, at, len)| Mutation::Saturate { msg, at, len }),
        1 => (i(), prop::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(msg, bytes)| Mutation::Replace { msg, bytes }),
        1 => i().prop_map(|msg| Mutation::Duplicate { msg }),
        1 => i().prop_map(|msg| Mutation::Drop { msg }),
        1 => (i(), i()).prop_map(|(a, b)| Mutation::Swap { a, b }),
    ]
}

fn mutate(wire: &mut Vec<Vec<u8>>, m: &Mutation) {
    if wire.is_empty() {
        return;
    }
    let n = wire.len();
    let pos = |len: usize, at: usize| if len == 0 { 0 } else { at % len };
    match m {
        Mutation::FlipBit { msg, at, bit } => {
            let w = &mut wire[msg % n];
            if !w.is_empty() {
                let p = pos(w.len(), *at);
                w[p] ^= 1 << bit;
            }
        }
        Mutation::SetByte { msg, at, value } => {
            let w = &mut wire[msg % n];
            if !w.is_empty() {
                let p = pos(w.len(), *at);
                w[p] = *value;
            }
        }
        Mutation::Insert { msg, at, bytes } => {
            let w = &mut wire[msg % n];
            let p = pos(w.len() + 1, *at);
            w.splice(p..p, bytes.iter().copied());
        }
        Mutation::Remove { msg, at, len } => {
            let w = &mut wire[msg % n];
            let p = pos(w.len(), *at);
            let end = (p + len).min(w.len());
            w.drain(p..end);
        }
        Mutation::Truncate { msg, at } => {
            let w = &mut wire[msg % n];
            let p = pos(w.len(), *at);
            w.truncate(p);
        }
        Mutation::Saturate { msg, at, len } => {
            let w = &mut wire[msg % n];
            let p = pos(w.len(), *at);
            let end = (p + len).min(w.len());
            w[p..end].fill(0xff);
        }
        Mutation::Replace { msg, bytes } => wire[msg % n] = bytes.clone(),
        Mutation::Duplicate { msg } => {
            let w = wire[msg % n].clone();
            wire.insert(msg % n, w);
        }
        Mutation::Drop { msg } => {
            wire.remove(msg % n);
        }
        Mutation::Swap { a, b } => wire.swap(a % n, b % n),
    }
}

/// Tallies of the fuzz run, printed at the end.
#[derive(Default)]
struct Tally {
    cases: Cell<u64>,
    messages: Cell<u64>,
    undecodable: Cell<u64>,
    applied: Cell<u64>,
    unfinished: Cell<u64>,
    refused: RefCell<BTreeMap<String, u64>>,
}

impl Tally {
    fn add(c: &Cell<u64>, n: u64) {
        c.set(c.get() + n);
    }

    /// A refusal's kind: its words without numbers or quoted paths.
    fn reason(&self, reason: &str) {
        let kind: String = reason
            .split_whitespace()
            .filter(|w| !w.chars().any(|c| c.is_ascii_digit() || c == '"'))
            .take(7)
            .collect::<Vec<_>>()
            .join(" ");
        *self.refused.borrow_mut().entry(kind).or_default() += 1;
    }
}

/// `HBRFS_FUZZ_SEED`, or a fresh random seed.
fn seed() -> u64 {
    match std::env::var("HBRFS_FUZZ_SEED") {
        Ok(s) => s.parse().expect("HBRFS_FUZZ_SEED is a number"),
        Err(_) => {
            std::hash::BuildHasher::hash_one(&std::collections::hash_map::RandomState::new(), 0u8)
        }
    }
}

#[test]
fn random_byte_mutations_of_an_encoded_epoch_never_panic_and_never_leave_the_last_point() {
    const CASES: u32 = 4096;
    let seed = seed();
    println!("fuzz seed {seed} (HBRFS_FUZZ_SEED={seed} to repeat)");
    let config = Config {
        cases: CASES,
        failure_persistence: None,
        max_shrink_iters: 200,
        ..Config::default()
    };
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &seed.to_le_bytes().repeat(4));
    let mut runner = TestRunner::new_with_rng(config, rng);
    let fx = RefCell::new(Fixture::new());
    let fresh = Cell::new(0u64);
    let tally = Tally::default();
    let started = Instant::now();
    let result = runner.run(&prop::collection::vec(mutation(), 1..5), |mutations| {
        let mut f = fx.borrow_mut();
        let mut wire: Vec<Vec<u8>> = f.next_epoch().iter().map(|m| m.encode_to_vec()).collect();
        for m in &mutations {
            mutate(&mut wire, m);
        }
        Tally::add(&tally.cases, 1);
        // The stream ends at the first message that does not decode
        // (tonic fails the stream there); those before it are handled.
        let mut msgs = Vec::new();
        for w in &wire {
            match ShipMessage::decode(w.as_slice()) {
                Ok(m) => msgs.push(m),
                Err(_) => {
                    Tally::add(&tally.undecodable, 1);
                    break;
                }
            }
        }
        let run = f.drive(msgs.clone());
        Tally::add(&tally.messages, run.handled as u64);
        if let Some(reason) = &run.refused {
            tally.reason(reason);
        }
        match run.applied {
            Some(epoch) => {
                Tally::add(&tally.applied, 1);
                assert_applied_as_offered(&f, &msgs[..run.handled], epoch);
                // A new replica at epoch 1, so that the next case's
                // epoch 2 is not refused for its base alone.
                *f = Fixture::new();
                fresh.set(fresh.get() + 1);
            }
            None => {
                if run.refused.is_none() {
                    Tally::add(&tally.unfinished, 1);
                }
                if let Some(wrong) = f.off_point() {
                    prop_assert!(
                        false,
                        "refused ({:?}) yet the replica left its point:\n  {wrong}",
                        run.refused
                    );
                }
            }
        }
        Ok(())
    });
    println!(
        "fuzz: {} executions ({} messages handled) in {:?}: {} applied (then a fresh replica, \
         {} times), {} refused, {} ended early without a refusal, {} streams cut at an \
         undecodable message",
        tally.cases.get(),
        tally.messages.get(),
        started.elapsed(),
        tally.applied.get(),
        fresh.get(),
        tally.refused.borrow().values().sum::<u64>(),
        tally.unfinished.get(),
        tally.undecodable.get(),
    );
    for (kind, n) in tally.refused.borrow().iter() {
        println!("  refused {n:4}× {kind}");
    }
    if let Err(e) = result {
        panic!("{e}");
    }
    // Each refused or broken stream rolls its point back (a few syncs),
    // so a case costs milliseconds: 28 s alone on 2 cores, 102 s beside
    // builds and mount tests. The bound catches a run gone pathological
    // (a hang, a sync per block), not a busy machine.
    assert!(
        started.elapsed().as_secs() < 240,
        "the fuzz run took {:?}",
        started.elapsed()
    );
    assert!(
        tally.cases.get() >= u64::from(CASES),
        "only {} executions",
        tally.cases.get()
    );
}

/// What an apply makes (folders, files) is private, 0700 and 0600, until
/// the point's metadata arrives; a point's metadata then lands after its
/// content, deepest paths first, so a folder keeps the time it was sent
/// with even though a file in it was written by the same apply.
#[test]
fn what_an_apply_makes_is_private_until_its_metadata_arrives_and_then_takes_it() {
    use std::os::unix::fs::MetadataExt;
    let mut fx = Fixture::new();
    let stat = |p: &str| fs::metadata(fx.root.join(p)).expect("stat");
    let mode = |p: &str| stat(p).mode() & 0o7777;
    assert_eq!(
        (mode("vms"), mode("vms/a.img"), mode("b.img")),
        (0o700, 0o600, 0o600)
    );
    let (uid, gid) = (stat("b.img").uid(), stat("b.img").gid());
    let meta = |path: &str, mode: u32, mtime_sec: i64| PathMeta {
        path: path.into(),
        mode,
        uid,
        gid,
        mtime_sec,
        atime_sec: mtime_sec,
        ..Default::default()
    };
    let mut msgs = fx.next_epoch();
    lists_of(&mut msgs[LISTS]).metas = vec![
        meta("vms", libc::S_IFDIR | 0o751, 1_000),
        meta("vms/a.img", libc::S_IFREG | 0o644, 2_000),
    ];
    let run = fx.drive(msgs);
    assert_eq!(run.applied, Some(2), "{run:?}");
    assert_eq!((mode("vms"), stat("vms").mtime()), (0o751, 1_000));
    assert_eq!(
        (mode("vms/a.img"), stat("vms/a.img").mtime()),
        (0o644, 2_000)
    );
    assert_eq!(mode("c.img"), 0o600, "c.img had no metadata in the point");
    fx.mark_applied(2);
    fx.finish();
}
