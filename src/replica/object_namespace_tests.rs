//! `object::namespace` against the real thing: random points (operations,
//! file states as an honest primary makes them, metadata) shipped through a real [`Session`] into a real
//! [`ReplicaStore`], and replayed in memory over the previous point's
//! namespace. Both must agree on whether each point applies, and after
//! each applied point on every name: its type, permissions, owner, a
//! file's size and which names are one file, a symlink's target.
//! Points the session refuses before applying them (its preflight) are
//! skipped. (Times are not compared: a folder's time moves on the secondary when
//! its entries change, and the primary ships it again as metadata.)

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::records::Pair;
use super::service::handle;
use super::session::Session;
use super::store::ReplicaStore;
use crate::block::HashKey;
use crate::object::namespace::Namespace;
use crate::object::namespace::arbitrary::{PATHS, any_op};
use crate::proto::points::Entry;
use crate::proto::replication::{
    Begin, Commit, FileState, Manifest, OpKind, PathMeta, ShipMessage, ship_message,
};

/// What the secondary and the namespace must agree on, by path.
type Shape = BTreeMap<Vec<u8>, (u32, u32, u32, u64, Vec<u8>)>;

/// The names as `(mode, uid, gid, size of a file, symlink target)`, and
/// the sets of names that are one file (by `ino`).
fn shape(entries: &[Entry]) -> (Shape, BTreeSet<BTreeSet<Vec<u8>>>) {
    let mut files: BTreeMap<u64, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut names = Shape::new();
    for e in entries {
        let file = e.mode & libc::S_IFMT == libc::S_IFREG;
        if file {
            files.entry(e.ino).or_default().insert(e.path.clone());
        }
        let size = if file { e.size } else { 0 };
        names.insert(
            e.path.clone(),
            (e.mode, e.uid, e.gid, size, e.target.clone()),
        );
    }
    (names, files.into_values().collect())
}

/// Ships one point's lists (no blocks: files are sized, holes only);
/// whether the secondary applied it, or why not.
fn ship(store: &ReplicaStore, epoch: u64, lists: Manifest) -> Result<(), String> {
    let body = |b| ShipMessage { body: Some(b) };
    let msgs = [
        body(ship_message::Body::Begin(Begin {
            epoch,
            base_epoch: epoch - 1,
            point: vec![epoch as u8; 16],
            resync_token: Vec::new(),
        })),
        body(ship_message::Body::Manifest(lists)),
        body(ship_message::Body::Commit(Commit { epoch })),
    ];
    let mut session = Some(Session::new(store).map_err(|e| e.to_string())?);
    for m in msgs {
        handle(&mut session, m).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Replays `lists` over `ns` as an honest primary would have made them:
/// each create gets a new file id (`next_id` counts them), and the file
/// states name files the operations left, at one of their names (`picks`:
/// which file and its size). Returns the lists to ship.
fn replay(
    ns: &mut Namespace,
    mut lists: Manifest,
    picks: &[(usize, u64)],
    next_id: &mut u64,
) -> (Manifest, crate::error::Result<()>) {
    for op in lists
        .ops
        .iter_mut()
        .filter(|op| op.kind() == OpKind::Create)
    {
        *next_id += 1;
        op.file_id = *next_id;
    }
    let mut done = lists.ops.iter().try_for_each(|op| ns.apply_op(op));
    let (_, entries) = ns.clone().into_parts();
    let files: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.mode & libc::S_IFMT == libc::S_IFREG)
        .collect();
    if !files.is_empty() {
        for &(pick, size) in picks {
            let f = files[pick % files.len()];
            if lists.files.iter().all(|s| s.file_id != f.ino) {
                lists.files.push(FileState {
                    file_id: f.ino,
                    path: f.path.clone(),
                    size,
                });
            }
        }
    }
    if done.is_ok() {
        done = lists.files.iter().try_for_each(|f| ns.set_file(f));
    }
    if done.is_ok() {
        done = lists.metas.iter().try_for_each(|m| ns.set_meta(m));
    }
    (lists, done)
}

fn any_point() -> impl Strategy<Value = Manifest> {
    let path = || prop::sample::select(PATHS.to_vec());
    let types = [libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK, libc::S_IFIFO];
    let meta = (
        path(),
        prop::sample::select(types.to_vec()),
        0u32..0o1000,
        0u32..3,
    )
        .prop_map(|(p, kind, perm, uid)| PathMeta {
            path: p.into(),
            mode: kind | perm,
            uid,
            gid: uid + 1,
            mtime_sec: 1_000_000,
            ..PathMeta::default()
        });
    let ops = prop::collection::vec(any_op(), 0..8);
    let metas = prop::collection::vec(meta, 0..3);
    (ops, metas).prop_map(|(ops, metas)| Manifest {
        ops,
        metas,
        end: true,
        ..Manifest::default()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]

    #[test]
    fn the_namespace_replays_what_the_secondary_applies(
        points in prop::collection::vec((any_point(), prop::collection::vec((0usize..8, 0u64..9000), 0..3)), 1..6)
    ) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("replica");
        let keep = crate::points::Retention::new(Vec::new(), None);
        let store = ReplicaStore::open(&root, true, keep).unwrap();
        store
            .accept(Pair {
                datastore_id: "differential".into(),
                block_size: 4096,
                key: HashKey::random().unwrap(),
            })
            .unwrap();
        let mut ns = Namespace::empty();
        let mut epoch = 1;
        let mut next_id = 0;
        for (lists, picks) in points {
            let mut next = ns.clone();
            let (lists, replayed) = replay(&mut next, lists, &picks, &mut next_id);
            let shipped = ship(&store, epoch, lists.clone());
            // Refused before its apply (preflight: lists no honest primary
            // sends, such as one file listed twice): not the apply's
            // business, nor the namespace's.
            if shipped.as_ref().is_err_and(|e| !e.contains("applying epoch")) {
                continue;
            }
            prop_assert_eq!(
                replayed.is_ok(),
                shipped.is_ok(),
                "{:?}\nreplayed: {:?}\nshipped: {:?}",
                lists,
                replayed,
                shipped
            );
            if shipped.is_err() {
                continue;
            }
            ns = next;
            epoch += 1;
            let real = crate::points::namespace::of(&root).unwrap();
            let (_, entries) = ns.clone().into_parts();
            prop_assert_eq!(shape(&real.entries), shape(&entries), "{:?}", lists);
        }
    }
}
