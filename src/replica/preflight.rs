//! Checks a point's namespace operations and file states against the
//! replica before anything is staged, so that a point an honest primary
//! could never send (an operation of unknown kind, a path through a
//! symlink, a folder where a file must be, a non-empty folder to remove)
//! is refused with a clear message instead of failing halfway through its
//! apply. Paths an earlier operation of the same point changes are not
//! checked against the disk (their state then is the apply's business;
//! see `store::apply_op`, which logs and skips what it cannot do).

use std::path::{Path, PathBuf};

use super::confine;
use crate::proto::replication::{Begin, OpKind};
use crate::wire::MAX_FILE_SIZE;

fn exists(p: &Path) -> Option<std::fs::Metadata> {
    std::fs::symlink_metadata(p).ok()
}

/// Refuses a path below something that exists and is not a folder.
fn no_file_on_the_way(root: &Path, path: &Path, shown: &str) -> Result<(), String> {
    let blocked = path
        .ancestors()
        .skip(1)
        .take_while(|a| a.starts_with(root) && *a != root)
        .find(|a| exists(a).is_some_and(|m| !m.is_dir()));
    match blocked {
        Some(a) => Err(format!(
            "{shown:?} lies below {:?}, which is not a folder on the replica",
            a.strip_prefix(root).unwrap_or(a)
        )),
        None => Ok(()),
    }
}

/// Refuses `begin` when applying it on the replica at `root` cannot work.
pub fn check(root: &Path, begin: &Begin) -> Result<(), String> {
    let mut touched: Vec<PathBuf> = Vec::new();
    let mut links: Vec<PathBuf> = Vec::new();
    let resolve = |raw: &[u8], links: &[PathBuf]| -> Result<PathBuf, String> {
        let path = confine::resolve(root, raw).map_err(|e| e.to_string())?;
        if let Some(link) = links.iter().find(|l| path.starts_with(l) && path != **l) {
            return Err(format!(
                "path {:?} goes through {:?}, a symlink made earlier in the same point",
                String::from_utf8_lossy(raw),
                link.strip_prefix(root).unwrap_or(link)
            ));
        }
        Ok(path)
    };
    for (i, op) in begin.ops.iter().enumerate() {
        let kind = OpKind::try_from(op.kind)
            .ok()
            .filter(|k| *k != OpKind::Unspecified)
            .ok_or_else(|| format!("operation {i} has unknown kind {}", op.kind))?;
        let path = resolve(&op.path, &links)?;
        let shown = String::from_utf8_lossy(&op.path);
        let target = match kind {
            // An empty target is refused by `confine` like any bad path.
            OpKind::Rename | OpKind::Link => Some(resolve(&op.target, &links)?),
            OpKind::Symlink if op.target.is_empty() => {
                return Err(format!("symlink {shown:?} has an empty target"));
            }
            _ => None,
        };
        if kind == OpKind::Truncate && op.arg > MAX_FILE_SIZE {
            return Err(format!(
                "truncate of {shown:?} to {} bytes is beyond the limit",
                op.arg
            ));
        }
        let untouched = !touched
            .iter()
            .any(|t| path.starts_with(t) || t.starts_with(&path));
        if untouched {
            no_file_on_the_way(root, &path, &shown)?;
        }
        if untouched && let Some(m) = exists(&path) {
            let wrong = match kind {
                OpKind::Rmdir if !m.is_dir() => Some("is not a folder"),
                OpKind::Rmdir
                    if std::fs::read_dir(&path).map_or(true, |mut d| d.next().is_some()) =>
                {
                    Some("is a folder that is not empty")
                }
                OpKind::Unlink if m.is_dir() => Some("is a folder"),
                OpKind::Mkdir if !m.is_dir() => Some("exists and is not a folder"),
                OpKind::Create | OpKind::Truncate | OpKind::Link if !m.is_file() => {
                    Some("is not a regular file")
                }
                _ => None,
            };
            if let Some(wrong) = wrong {
                return Err(format!(
                    "operation {i} ({kind:?}): {shown:?} {wrong} on the replica"
                ));
            }
        }
        if kind == OpKind::Symlink {
            links.push(path.clone());
        }
        touched.push(path);
        touched.extend(target);
    }
    for f in &begin.files {
        let path = resolve(&f.path, &links)?;
        if f.size > MAX_FILE_SIZE {
            return Err(format!(
                "file {} size {} is beyond the limit",
                f.file_id, f.size
            ));
        }
        let untouched = !touched
            .iter()
            .any(|t| path.starts_with(t) || t.starts_with(&path));
        if untouched {
            no_file_on_the_way(root, &path, &String::from_utf8_lossy(&f.path))?;
        }
        if untouched && exists(&path).is_some_and(|m| !m.is_file()) {
            return Err(format!(
                "file {} at {:?} is not a regular file on the replica",
                f.file_id,
                String::from_utf8_lossy(&f.path)
            ));
        }
    }
    Ok(())
}
