//! What both wings keep on disk and the small helpers every state file
//! needs: the state folders' names ([`StatePaths`] on the primary,
//! [`ReplicaPaths`] on the secondary — no path literal of a state folder
//! lives outside them), durable small-file writes, timestamps, hex and the
//! walk of a datastore tree, paths below a root resolved by descriptors
//! (`*_beneath`), and the check that a state folder is a real folder of
//! the daemon's user. It imports only `error` and `sys`.

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Error, IoContext, Result};
use crate::sys;

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
    /// The local index of the object repository `repo_id` (hex) this
    /// datastore replicates to (`replicate::object`).
    pub fn object_cache(&self, repo_id: &str) -> PathBuf {
        self.dir.join("object").join(repo_id)
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
    /// The folder's role record (`roles`), shared with [`ReplicaPaths::role`]:
    /// one folder, one role.
    pub fn role(&self) -> PathBuf {
        self.dir.join("role")
    }
    /// Paths a `promote --point` rollback changed, which the first failback
    /// reconciles with the demoted side (`replicate::resync`).
    pub fn rolled_back(&self) -> PathBuf {
        self.dir.join("rolled-back")
    }
    /// Where `demote` moves this primary state (journal, bitmaps,
    /// pre-images, format) once its changes are in the resync list.
    pub fn demoted(&self) -> PathBuf {
        self.dir.join("demoted")
    }
}

/// Takes the daemon lock of the state folder `dir` (`dir/lock`, `flock`ed
/// for as long as the returned file is open): one hbrfs process per
/// folder, whatever its role, so a `serve`, a `mount`, a `promote` or a
/// `demote` of one folder never run at once.
pub fn take_lock(dir: &Path) -> Result<File> {
    let path = dir.join("lock");
    let mut lock = state_file_options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .at(&path)?;
    if !sys::try_lock_exclusive(lock.as_fd()).at(&path)? {
        let holder = fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::Usage(format!(
            "{}: in use by another hbrfs process (pid {}); stop it first",
            dir.display(),
            holder.trim()
        )));
    }
    lock.set_len(0).at(&path)?;
    writeln!(lock, "{}", std::process::id()).at(&path)?;
    Ok(lock)
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
    /// The staged point's header and lists: its Begin, then its Manifest
    /// chunks (operations, files), as received.
    pub fn staged_point(&self) -> PathBuf {
        self.staging().join("point")
    }
    /// The staged point's offers, one record per complete offer: the
    /// manifest of its blocks, and the log a restart resumes it from.
    pub fn staged_offers(&self) -> PathBuf {
        self.staging().join("offers")
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
    /// The epoch of the point being applied in place, until it is
    /// committed or rolled back (see `replica::apply`).
    pub fn in_flight(&self) -> PathBuf {
        self.dir.join("inflight")
    }
    /// The pre-shared key primaries authenticate with.
    pub fn auth_key(&self) -> PathBuf {
        self.dir.join("auth.key")
    }
    /// The recovery points (`points`): catalog, one folder per point.
    pub fn points(&self) -> PathBuf {
        self.dir.join("points")
    }
    /// The address `serve` listens on (read by `hbrfs up` and `status`).
    pub fn listen(&self) -> PathBuf {
        self.dir.join("listen")
    }
    /// The folder's role record (see [`StatePaths::role`]).
    pub fn role(&self) -> PathBuf {
        self.dir.join("role")
    }
    /// The resync list of a demoted secondary (`replica::resync`).
    pub fn resync(&self) -> PathBuf {
        self.dir.join("resync")
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

/// Aborts the process here when the environment variable
/// `HBRFS_CRASH_POINT` names `place`: how the crash tests stop a daemon
/// at one exact step of a multi-step update (a `kill -9` cannot aim that
/// well). Unset, it costs one environment lookup.
pub fn crash_point(place: &str) {
    if std::env::var_os("HBRFS_CRASH_POINT").is_some_and(|v| v == place) {
        log::error!("HBRFS_CRASH_POINT={place}: aborting here, as a crash would");
        std::process::abort();
    }
}

/// A unix-nanosecond time as UTC `YYYY-MM-DD HH:MM:SS`: how tables and
/// point names show times (hbrfs records unix ns).
pub fn utc(ns: u64) -> String {
    let secs = ns / 1_000_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
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

// Paths below a root, resolved one component at a time from a descriptor
// of the root: a path relative to the root may be as long as PATH_MAX
// itself, so the root's own path joined to it can exceed PATH_MAX, which
// no path-taking call accepts. Each component is opened with `O_NOFOLLOW`,
// so a symlink on the way is refused (`ELOOP`), never followed out of the
// root.

/// Opens the folder `rel` (`/`-separated, relative) below the folder
/// `root` as an `O_PATH` descriptor, one component at a time; `make`
/// creates missing folders with that mode. A symlink on the way is
/// `ELOOP`, a `.` or `..` component `EINVAL`.
pub fn dir_beneath(root: BorrowedFd<'_>, rel: &[u8], make: Option<u32>) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
    let parts = || rel.split(|&b| b == b'/').filter(|p| !p.is_empty());
    if parts().any(|p| p == b"." || p == b"..") {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut dir = sys::openat(Some(root), OsStr::new("."), flags, 0)?;
    for part in parts() {
        let name = OsStr::from_bytes(part);
        let next = match (sys::openat(Some(dir.as_fd()), name, flags, 0), make) {
            (Err(e), Some(mode)) if e.raw_os_error() == Some(libc::ENOENT) => {
                match sys::mkdirat(dir.as_fd(), name, mode) {
                    Err(e) if e.raw_os_error() != Some(libc::EEXIST) => return Err(e),
                    _ => sys::openat(Some(dir.as_fd()), name, flags, 0),
                }
            }
            (Err(e), _) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                let st = sys::statat(dir.as_fd(), name)?;
                let link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
                Err(io::Error::from_raw_os_error(if link {
                    libc::ELOOP
                } else {
                    libc::ENOTDIR
                }))
            }
            (other, _) => other,
        }?;
        dir = next;
    }
    Ok(dir)
}

/// The folder holding the last component of `rel` (opened as by
/// [`dir_beneath`]) and that component, for the `*at` calls.
pub fn parent_beneath<'a>(
    root: BorrowedFd<'_>,
    rel: &'a [u8],
    make: Option<u32>,
) -> io::Result<(OwnedFd, &'a OsStr)> {
    let (parent, name) = match rel.iter().rposition(|&b| b == b'/') {
        Some(at) => (&rel[..at], &rel[at + 1..]),
        None => (&b""[..], rel),
    };
    if name.is_empty() || name == b"." || name == b".." {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    Ok((dir_beneath(root, parent, make)?, OsStr::from_bytes(name)))
}

/// Opens `rel` below `root` with `flags` (and `O_NOFOLLOW`: the last
/// component is not followed either).
pub fn open_beneath(
    root: BorrowedFd<'_>,
    rel: &[u8],
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let (dir, name) = parent_beneath(root, rel, None)?;
    sys::openat(Some(dir.as_fd()), name, flags | libc::O_NOFOLLOW, mode)
}

/// `lstat` of `rel` below `root`.
pub fn stat_beneath(root: BorrowedFd<'_>, rel: &[u8]) -> io::Result<libc::stat> {
    let (dir, name) = parent_beneath(root, rel, None)?;
    sys::statat(dir.as_fd(), name)
}

/// A path below a root reached by a short name, for the calls that take
/// only a path (`lchown`, `l*xattr`, `utimensat` on a name, `read_dir`):
/// the `/proc/self/fd` path of its folder's descriptor (walked as by
/// [`dir_beneath`]) joined to its last name, valid while this lives. So a
/// path longer than PATH_MAX below the root is reached too.
#[derive(Debug)]
pub struct ShortPath {
    _dir: OwnedFd,
    path: PathBuf,
}

impl ShortPath {
    /// `rel` below `root` (the root itself for an empty `rel`); `make`
    /// creates missing folders on the way with that mode.
    pub fn beneath(root: BorrowedFd<'_>, rel: &[u8], make: Option<u32>) -> io::Result<ShortPath> {
        // The root itself is "." in its descriptor's folder: the
        // `/proc/self/fd` link alone would be the link, to an `lstat`.
        let (dir, name) = if rel.is_empty() {
            (dir_beneath(root, rel, None)?, OsStr::new("."))
        } else {
            parent_beneath(root, rel, make)?
        };
        let at = sys::proc_path(dir.as_fd());
        let path = Path::new(OsStr::from_bytes(at.to_bytes())).join(name);
        Ok(ShortPath { _dir: dir, path })
    }

    /// The short path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// An `O_PATH` descriptor of the folder `root`, for the `*_beneath` calls.
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    sys::openat(None, root.as_os_str(), flags, 0)
}

/// Calls `found` with the path relative to `root` and the `lstat` of
/// every regular file below `root` (once per name: a file with several
/// links is found once per link), skipping the state folder. Walks by
/// descriptors, so the depth of the tree is not bounded by PATH_MAX.
pub fn walk_files(root: &Path, found: &mut dyn FnMut(Vec<u8>, &libc::stat)) -> Result<()> {
    walk(root, &mut |rel, st| {
        if st.st_mode & libc::S_IFMT == libc::S_IFREG {
            found(rel, st)
        }
    })
}

/// [`walk_files`] for every entry (folders before what they hold,
/// symlinks, special files), not only regular files.
pub fn walk(root: &Path, found: &mut dyn FnMut(Vec<u8>, &libc::stat)) -> Result<()> {
    let fd = open_root(root).at(root)?;
    walk_below(root, fd.as_fd(), &mut Vec::new(), found)
}

fn walk_below(
    root: &Path,
    dir: BorrowedFd<'_>,
    rel: &mut Vec<u8>,
    found: &mut dyn FnMut(Vec<u8>, &libc::stat),
) -> Result<()> {
    let here = |rel: &[u8]| root.join(OsStr::from_bytes(rel));
    let listing = PathBuf::from(OsStr::from_bytes(sys::proc_path(dir).to_bytes()));
    for entry in fs::read_dir(&listing).at(here(rel))? {
        let name = entry.at(here(rel))?.file_name();
        if rel.is_empty() && name == STATE_DIR {
            continue;
        }
        let len = rel.len();
        if len > 0 {
            rel.push(b'/');
        }
        rel.extend_from_slice(name.as_bytes());
        let st = sys::statat(dir, &name).at(here(rel))?;
        found(rel.clone(), &st);
        if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
            let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW;
            let sub = sys::openat(Some(dir), &name, flags, 0).at(here(rel))?;
            walk_below(root, sub.as_fd(), rel, found)?;
        }
        rel.truncate(len);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_beneath_a_root_go_past_path_max_and_never_through_a_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let root = open_root(dir.path()).unwrap();
        let name = "n".repeat(255);
        let deep: Vec<u8> = vec![name.as_str(); 16].join("/").into_bytes();
        let folder = dir_beneath(root.as_fd(), &deep, Some(0o755)).unwrap();
        assert!(dir.path().as_os_str().len() + deep.len() + 8 > libc::PATH_MAX as usize);
        let file = [&deep[..], b"/f"].concat();
        let made = open_beneath(root.as_fd(), &file, libc::O_CREAT | libc::O_WRONLY, 0o600);
        drop(made.unwrap());
        assert_eq!(
            stat_beneath(root.as_fd(), &file).unwrap().st_mode & libc::S_IFMT,
            libc::S_IFREG
        );
        drop(folder);
        let mut found = Vec::new();
        walk_files(dir.path(), &mut |rel, _| found.push(rel)).unwrap();
        assert_eq!(found, [file]);

        std::os::unix::fs::symlink("/tmp", dir.path().join("link")).unwrap();
        let through = dir_beneath(root.as_fd(), b"link/x", Some(0o755)).unwrap_err();
        assert_eq!(through.raw_os_error(), Some(libc::ELOOP));
        let up = dir_beneath(root.as_fd(), b"a/../b", None).unwrap_err();
        assert_eq!(up.raw_os_error(), Some(libc::EINVAL));
    }

    #[test]
    fn hex_round_trips_and_rejects_odd_or_non_hex() {
        assert_eq!(hex(&[0, 0xab, 0xff]), "00abff");
        assert_eq!(unhex("00abff"), Some(vec![0, 0xab, 0xff]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
    }
}
