//! Confines paths received from the network to the replica root: relative,
//! no `..`, no NUL, not the state folder, and no symlink on the way (a
//! symlink planted in the replica must not lead a write outside it).

use std::ffi::OsStr;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::state::{self, STATE_DIR};
use crate::wire::MAX_PATH;

/// Why a received path was refused.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// Not a plain relative path below the root.
    #[error("path {0:?} is not a relative path below the replica root")]
    Outside(String),
    /// The path names the state folder.
    #[error("path {0:?} names the replica's state folder")]
    StateDir(String),
    /// A component on the way is a symlink.
    #[error("path {0:?} goes through a symlink")]
    ThroughSymlink(String),
}

/// Checks the shape of `raw` and joins it to `root`. Does not look at the
/// file system; see [`no_symlink_parents`].
pub fn join(root: &Path, raw: &[u8]) -> Result<PathBuf, PathError> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.is_empty() || raw.contains(&0) || raw.len() > MAX_PATH {
        return Err(PathError::Outside(shown()));
    }
    let rel = Path::new(OsStr::from_bytes(raw));
    let mut first = true;
    for c in rel.components() {
        match c {
            Component::Normal(name) => {
                if first && name == STATE_DIR {
                    return Err(PathError::StateDir(shown()));
                }
                first = false;
            }
            _ => return Err(PathError::Outside(shown())),
        }
    }
    Ok(root.join(rel))
}

/// Refuses `path` (below `root`) when any directory on the way from
/// `root` is a symlink. Walks by descriptors from `root` (see
/// [`state::dir_beneath`]), so it works for paths longer than PATH_MAX
/// once joined to `root`. The final component is opened with `O_NOFOLLOW`
/// by the caller; a part of the way that does not exist yet is no symlink.
pub fn no_symlink_parents(root: &Path, path: &Path) -> Result<(), PathError> {
    let rel = path
        .strip_prefix(root)
        .map_err(|_| PathError::Outside(path.display().to_string()))?;
    let parent = rel.parent().unwrap_or(Path::new(""));
    let walked = state::open_root(root)
        .and_then(|fd| state::dir_beneath(fd.as_fd(), parent.as_os_str().as_bytes(), None));
    match walked {
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
            Err(PathError::ThroughSymlink(rel.display().to_string()))
        }
        _ => Ok(()),
    }
}

/// [`join`] then [`no_symlink_parents`].
pub fn resolve(root: &Path, raw: &[u8]) -> Result<PathBuf, PathError> {
    let path = join(root, raw)?;
    no_symlink_parents(root, &path)?;
    Ok(path)
}

/// Opens the file at `raw` below `root` for reading: confined, and walked
/// by descriptors, never following a symlink. `None` when it cannot be.
pub fn open_file(root: &Path, raw: &[u8]) -> Option<File> {
    join(root, raw).ok()?;
    let fd = state::open_root(root).ok()?;
    state::open_beneath(fd.as_fd(), raw, libc::O_RDONLY, 0)
        .ok()
        .map(File::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes_and_the_state_folder() {
        let root = Path::new("/r");
        assert_eq!(join(root, b"a/b.img").unwrap(), Path::new("/r/a/b.img"));
        for bad in [
            &b"../x"[..],
            b"/etc/passwd",
            b"a/../../x",
            b"",
            b"a\0b",
            b".hbrfs/applied",
            b"./x",
        ] {
            assert!(
                join(root, bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(
            join(root, b"d/.hbrfs").is_ok(),
            "only the root's state folder is special"
        );
    }

    #[test]
    fn refuses_paths_through_symlinks() {
        let root = std::env::temp_dir().join(format!("hbrfs-confine-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("real")).unwrap();
        std::os::unix::fs::symlink("/tmp", root.join("link")).unwrap();
        assert!(resolve(&root, b"real/f").is_ok());
        assert!(matches!(
            resolve(&root, b"link/f"),
            Err(PathError::ThroughSymlink(_))
        ));
        assert!(
            resolve(&root, b"link").is_ok(),
            "the last component is the caller's O_NOFOLLOW"
        );
    }
}
