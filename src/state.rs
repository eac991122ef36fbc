//! What both wings keep on disk and the small helpers every state file
//! needs: the state folders' names ([`StatePaths`] on the primary,
//! [`ReplicaPaths`] on the secondary — no path literal of a state folder
//! lives outside them), durable small-file writes, timestamps, hex and the
//! walk of a datastore tree, and the check that a state folder is a real
//! folder of the daemon's user. It imports only `error` and `sys`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};

/// Name of the state folder inside a backing directory or a replica
/// folder; hidden from every mount.
pub const STATE_DIR: &str = ".hbrfs";

/// Paths inside a primary datastore's state folder (`BACKING/.hbrfs/`).
#[derive(Clone, Debug)]
pub struct StatePaths {
    /// The state folder itself.
    pub dir: PathBuf,
}

impl StatePaths {
    /// The state folder of the datastore at `backing`.
    pub fn of(backing: &Path) -> StatePaths {
        StatePaths {
            dir: backing.join(STATE_DIR),
        }
    }
    /// The format line.
    pub fn format(&self) -> PathBuf {
        self.dir.join("format")
    }
    /// The daemon lock.
    pub fn lock(&self) -> PathBuf {
        self.dir.join("lock")
    }
    /// The sled journal.
    pub fn journal(&self) -> PathBuf {
        self.dir.join("journal")
    }
    /// The bitmap folder.
    pub fn bitmaps(&self) -> PathBuf {
        self.dir.join("bitmaps")
    }
    /// The bitmap of one file, named by its file id.
    pub fn bitmap(&self, id: u64) -> PathBuf {
        self.bitmaps().join(format!("{id}.map"))
    }
    /// The pre-image folder (cut-time content of blocks rewritten while
    /// their point ships).
    pub fn preimages(&self) -> PathBuf {
        self.dir.join("preimages")
    }
    /// The pre-images of one file, named by its file id.
    pub fn preimage(&self, id: u64) -> PathBuf {
        self.preimages().join(format!("{id}.pre"))
    }
    /// The pair's hash key (made on first replication).
    pub fn pair_key(&self) -> PathBuf {
        self.dir.join("pair.key")
    }
    /// The control socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.join("control.sock")
    }
    /// Present only after a clean shutdown.
    pub fn clean_marker(&self) -> PathBuf {
        self.dir.join("clean")
    }
    /// A broken journal or bitmap folder moved aside at `stamp`.
    pub fn broken(&self, what: &str, stamp: u64) -> PathBuf {
        self.dir.join(format!("{what}.broken-{stamp}"))
    }
}

/// Paths inside a secondary's state folder (`REPLICA/.hbrfs/`).
#[derive(Clone, Debug)]
pub struct ReplicaPaths {
    /// The state folder itself.
    pub dir: PathBuf,
}

impl ReplicaPaths {
    /// The state folder of the replica at `root`.
    pub fn of(root: &Path) -> ReplicaPaths {
        ReplicaPaths {
            dir: root.join(STATE_DIR),
        }
    }
    /// Where a point is staged before it applies.
    pub fn staging(&self) -> PathBuf {
        self.dir.join("staging")
    }
    /// The staged point's block data.
    pub fn staged_data(&self) -> PathBuf {
        self.staging().join("data")
    }
    /// The staged point's manifest (operations, files, blocks).
    pub fn staged_manifest(&self) -> PathBuf {
        self.staging().join("manifest")
    }
    /// The log of the point being received (resume after a restart).
    pub fn partial(&self) -> PathBuf {
        self.staging().join("partial")
    }
    /// The content index (sled).
    pub fn index(&self) -> PathBuf {
        self.dir.join("index")
    }
    /// The pair this replica belongs to.
    pub fn pair(&self) -> PathBuf {
        self.dir.join("pair")
    }
    /// The last applied point.
    pub fn applied(&self) -> PathBuf {
        self.dir.join("applied")
    }
    /// The redo record of a point being applied: the commit point.
    pub fn redo(&self) -> PathBuf {
        self.dir.join("redo")
    }
    /// The pre-shared key primaries authenticate with.
    pub fn auth_key(&self) -> PathBuf {
        self.dir.join("auth.key")
    }
    /// The address `serve` listens on (read by `hbrfs up` and `status`).
    pub fn listen(&self) -> PathBuf {
        self.dir.join("listen")
    }
}

/// Mode of the daemon's own state files: the daemons run with umask 0 (so
/// files made through a mount get the modes asked for), so each state file
/// and folder is given its mode explicitly; none is group- or world-writable.
pub const STATE_FILE_MODE: u32 = 0o600;
/// Mode of state folders (see [`STATE_FILE_MODE`]).
pub const STATE_DIR_MODE: u32 = 0o700;

/// Creates `path` and any missing parents as private state folders (0700).
pub fn make_state_dirs(path: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(STATE_DIR_MODE)
        .create(path)
        .at(path)
}

/// Makes the state folder `dir` (0700) if it is missing, and refuses it
/// when it is a symlink or belongs to another user: state followed through
/// a planted symlink, or kept in a folder someone else controls, could be
/// read or replaced by that user. The folder is opened with `O_NOFOLLOW`
/// and its owner compared with the daemon's effective user; the error
/// names the folder and what is wrong.
pub fn open_state_dir(dir: &Path) -> Result<()> {
    match fs::DirBuilder::new().mode(STATE_DIR_MODE).create(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e).at(dir),
        _ => {}
    }
    let refuse = |reason: String| Error::BadState {
        path: dir.to_path_buf(),
        reason,
    };
    let opened = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY)
        .open(dir);
    let folder = match opened {
        Ok(f) => f,
        Err(_) if fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) => {
            return Err(refuse(
                "the state folder is a symlink; hbrfs refuses to follow it (replace it with a real folder)"
                    .into(),
            ));
        }
        Err(e) => return Err(e).at(dir),
    };
    let owner = folder.metadata().at(dir)?.uid();
    let me = crate::sys::euid();
    if owner != me {
        return Err(refuse(format!(
            "the state folder belongs to uid {owner}, not to this daemon's user (uid {me});              hbrfs refuses state another user controls (chown it or remove it)"
        )));
    }
    Ok(())
}

/// Options for creating a private state file (0600); add access flags.
pub fn state_file_options() -> fs::OpenOptions {
    let mut o = fs::OpenOptions::new();
    o.mode(STATE_FILE_MODE);
    o
}

/// Gives `path` the private `mode` ([`STATE_DIR_MODE`] or
/// [`STATE_FILE_MODE`]): state made by an older build, by a library or
/// before a bind may be wider, and the daemons run with umask 0.
pub fn set_private(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).at(path)
}

/// Makes what a library created under `dir` (sled's files) private:
/// folders 0700, files 0600. A failure is an error: the failure contract
/// says nothing hbrfs keeps is readable by other users.
pub fn make_private_tree(dir: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(dir).at(dir)?;
    if meta.is_dir() {
        set_private(dir, STATE_DIR_MODE)?;
        for entry in fs::read_dir(dir).at(dir)? {
            make_private_tree(&entry.at(dir)?.path())?;
        }
    } else if meta.is_file() {
        set_private(dir, STATE_FILE_MODE)?;
    }
    Ok(())
}

/// Writes a small file durably: temp file, fsync, rename, fsync folder.
/// The file is made 0600 whatever the umask.
pub fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = state_file_options()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .at(&tmp)?;
    f.write_all(bytes).and_then(|_| f.sync_all()).at(&tmp)?;
    fs::rename(&tmp, path).at(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir).and_then(|d| d.sync_all()).at(dir)
}

/// Unix time in nanoseconds, the unit of every timestamp hbrfs records.
pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Lower-case hex, for ids and keys in messages and small state files.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bytes of a hex string; `None` when it is not hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect()
}

/// Reads up to `buf.len()` bytes at `offset`, fewer only at the end of the
/// file (`read_at` may return short counts).
pub fn read_full(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

/// Calls `found` with the path relative to `root` and the metadata of
/// every regular file below `root`, skipping the state folder.
pub fn walk_files(root: &Path, found: &mut dyn FnMut(Vec<u8>, &fs::Metadata)) -> Result<()> {
    walk_below(root, root, found)
}

fn walk_below(
    root: &Path,
    dir: &Path,
    found: &mut dyn FnMut(Vec<u8>, &fs::Metadata),
) -> Result<()> {
    for entry in fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        if dir == root && entry.file_name() == STATE_DIR {
            continue;
        }
        let path = entry.path();
        let meta = fs::symlink_metadata(&path).at(&path)?;
        if meta.is_dir() {
            walk_below(root, &path, found)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            found(rel.as_os_str().as_bytes().to_vec(), &meta);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips_and_rejects_odd_or_non_hex() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
