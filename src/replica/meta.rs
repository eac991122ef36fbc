//! The metadata of a point on the replica, and the nodes that are neither
//! files, folders nor symlinks.
//!
//! Metadata is applied after the point's operations and content, so that
//! writing them does not move the times again: deepest paths first (a
//! folder's times are set after its entries changed), and on each path
//! the owner, then the mode (a chown clears set-id bits), then the
//! extended attributes (POSIX ACLs among them), then the times. A path
//! the replica does not hold with the same type is left alone: the
//! operation that makes it is in a later point, which carries its
//! metadata again.
//!
//! What this secondary may not do does not fail the point: a device node
//! without `serve --allow-devices`, an owner or an xattr the replica's
//! user or file system cannot set. Each is a *refusal*: one message,
//! logged as an error, counted in `status` here and sent back with
//! Applied to show in the primary's `status`. Every other failure fails
//! the apply (its redo stays, it is retried).

use std::fs;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::confine;
use super::records::bad;
use crate::error::{IoContext, Result};
use crate::proto::replication::PathMeta;
use crate::state::{self, ShortPath};
use crate::sys::{self, TimeSpec};

/// The messages of what an apply refused to do.
pub type Refusals = Vec<String>;

/// A path of the replica to apply to: `work` reaches it by a short path
/// (see [`state::ShortPath`]), `shown` names it in messages.
#[derive(Debug)]
pub struct Node {
    work: ShortPath,
    shown: PathBuf,
}

impl Node {
    /// The node at `raw` below `root`, the root itself for an empty path;
    /// `make` creates missing folders on the way (0700, until their
    /// metadata arrives). `None`: a folder on the way is missing.
    pub fn at(root: &Path, raw: &[u8], make: bool) -> Result<Option<Node>> {
        let shown = if raw.is_empty() {
            root.to_path_buf()
        } else {
            confine::join(root, raw).map_err(|e| bad(root, e.to_string()))?
        };
        let root_fd = state::open_root(root).at(root)?;
        match ShortPath::beneath(root_fd.as_fd(), raw, make.then_some(0o700)) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => Ok(None),
            found => Ok(Some(Node {
                work: found.at(&shown)?,
                shown,
            })),
        }
    }
}

/// Whether `e` is this secondary not being allowed or able to do it (not
/// permitted, not supported by the replica's file system): a refusal, not
/// a failure.
fn not_allowed(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EPERM | libc::EACCES | libc::EOPNOTSUPP)
    )
}

/// Applies `metas` to the replica at `root`, deepest paths first.
pub fn apply_metas(root: &Path, metas: &[PathMeta], refusals: &mut Refusals) -> Result<()> {
    let mut order: Vec<&PathMeta> = metas.iter().collect();
    order.sort_by_key(|m| std::cmp::Reverse(m.path.iter().filter(|b| **b == b'/').count()));
    for meta in order {
        apply_meta(root, meta, refusals)?;
    }
    Ok(())
}

/// Owner, mode, xattrs and times of one path.
fn apply_meta(root: &Path, meta: &PathMeta, refusals: &mut Refusals) -> Result<()> {
    let Some(node) = Node::at(root, &meta.path, false)? else {
        return Ok(());
    };
    let (path, shown) = (node.work.path(), &node.shown);
    let st = match fs::symlink_metadata(path) {
        Ok(st) => st,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => return Ok(()),
        Err(e) => return Err(e).at(shown),
    };
    if st.mode() & libc::S_IFMT != meta.mode & libc::S_IFMT {
        return Ok(());
    }
    if (st.uid(), st.gid()) != (meta.uid, meta.gid) {
        match sys::lchown(path, meta.uid, meta.gid) {
            Err(e) if not_allowed(&e) => refusals.push(format!(
                "{}: owner {}:{} not set: {e}",
                shown.display(),
                meta.uid,
                meta.gid
            )),
            other => other.at(shown)?,
        }
    }
    if !st.file_type().is_symlink() {
        let mode = fs::Permissions::from_mode(meta.mode & 0o7777);
        fs::set_permissions(path, mode).at(shown)?;
    }
    set_xattrs(&node, meta, refusals)?;
    let time = |sec, nsec: u32| TimeSpec::At(sec, i64::from(nsec));
    sys::utimens_nofollow(
        path,
        time(meta.atime_sec, meta.atime_nsec),
        time(meta.mtime_sec, meta.mtime_nsec),
    )
    .at(shown)
}

/// Makes the extended attributes of `path` those of `meta`: the others
/// removed, the missing or different ones set.
fn set_xattrs(node: &Node, meta: &PathMeta, refusals: &mut Refusals) -> Result<()> {
    let (path, shown) = (node.work.path(), &node.shown);
    let have = match sys::xattrs_of(path) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Vec::new(),
        other => other.at(shown)?,
    };
    let mut refuse = |what: &str, name: &[u8], res: io::Result<()>| -> Result<()> {
        match res {
            Err(e) if not_allowed(&e) => {
                let name = String::from_utf8_lossy(name);
                refusals.push(format!("{}: xattr {name} not {what}: {e}", shown.display()));
                Ok(())
            }
            other => other.at(shown),
        }
    };
    for (name, _) in have
        .iter()
        .filter(|(n, _)| !meta.xattrs.iter().any(|x| x.name == *n))
    {
        refuse("removed", name, sys::remove_xattr_at(path, name))?;
    }
    for x in &meta.xattrs {
        if !have.iter().any(|(n, v)| *n == x.name && *v == x.value) {
            refuse("set", &x.name, sys::set_xattr_at(path, &x.name, &x.value))?;
        }
    }
    Ok(())
}

/// Makes the FIFO, socket or device node of a mknod operation at `path`
/// (`arg`: its mode in the low 32 bits, its device in the high 32), 0600
/// until its metadata arrives. A device node is made only with
/// `allow_devices`; otherwise it is refused: a replica must not grow the
/// device nodes a primary chose.
pub fn mknod(node: &Node, arg: u64, allow_devices: bool, refusals: &mut Refusals) -> Result<()> {
    let (path, shown) = (node.work.path(), &node.shown);
    let kind = arg as u32 & libc::S_IFMT;
    let rdev = arg >> 32;
    let device = matches!(kind, libc::S_IFCHR | libc::S_IFBLK);
    if !(device || matches!(kind, libc::S_IFIFO | libc::S_IFSOCK)) {
        return Err(bad(shown, format!("mknod of unknown type {kind:o}")));
    }
    if device && !allow_devices {
        refusals.push(format!(
            "{}: device node ({}, device {}:{}) not created: this secondary runs without \
             --allow-devices",
            shown.display(),
            if kind == libc::S_IFCHR {
                "char"
            } else {
                "block"
            },
            libc::major(rdev),
            libc::minor(rdev)
        ));
        return Ok(());
    }
    if fs::symlink_metadata(path).is_ok_and(|m| m.mode() & libc::S_IFMT == kind) {
        return Ok(());
    }
    sys::mknod_path(path, kind | 0o600, rdev).at(shown)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::replication::Xattr;

    fn meta_of(path: &str, mode: u32) -> PathMeta {
        PathMeta {
            path: path.into(),
            mode,
            uid: sys::euid(),
            gid: fs::metadata("/proc/self").unwrap().gid(),
            mtime_sec: 1_000_000,
            mtime_nsec: 5,
            atime_sec: 2_000_000,
            ..Default::default()
        }
    }

    #[test]
    fn metadata_lands_deepest_first_and_other_types_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), b"x").unwrap();
        let mut file = meta_of("d/f", libc::S_IFREG | 0o640);
        file.xattrs = vec![Xattr {
            name: b"user.k".to_vec(),
            value: b"v".to_vec(),
        }];
        let metas = [
            meta_of("d", libc::S_IFDIR | 0o750),
            file,
            meta_of("gone", libc::S_IFREG | 0o777),
            meta_of("d", libc::S_IFREG | 0o777),
        ];
        let mut refusals = Refusals::new();
        apply_metas(root, &metas, &mut refusals).unwrap();
        let d = fs::metadata(root.join("d")).unwrap();
        assert_eq!(
            (d.mode() & 0o7777, d.mtime(), d.mtime_nsec()),
            (0o750, 1_000_000, 5)
        );
        let f = fs::metadata(root.join("d/f")).unwrap();
        assert_eq!((f.mode() & 0o7777, f.atime()), (0o640, 2_000_000));
        // A file system without user xattrs refuses it, visibly.
        match &refusals[..] {
            [] => assert_eq!(
                sys::xattrs_of(&root.join("d/f")).unwrap(),
                [(b"user.k".to_vec(), b"v".to_vec())]
            ),
            [one] => assert!(one.contains("xattr user.k not set"), "{one}"),
            more => panic!("{more:?}"),
        }
        assert!(!root.join("gone").exists());
    }

    #[test]
    fn a_device_node_is_refused_without_allow_devices_and_a_fifo_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let mut refusals = Refusals::new();
        let null = u64::from(libc::S_IFCHR | 0o666) | libc::makedev(1, 3) << 32;
        let at = |name: &str| {
            Node::at(dir.path(), name.as_bytes(), true)
                .unwrap()
                .unwrap()
        };
        mknod(&at("null"), null, false, &mut refusals).unwrap();
        assert!(!dir.path().join("null").exists());
        assert!(refusals[0].contains("--allow-devices"), "{refusals:?}");
        let fifo = u64::from(libc::S_IFIFO | 0o644);
        mknod(&at("p"), fifo, false, &mut refusals).unwrap();
        let p = fs::symlink_metadata(dir.path().join("p")).unwrap();
        assert_eq!(p.mode(), libc::S_IFIFO | 0o600);
        assert_eq!(refusals.len(), 1);
    }
}
