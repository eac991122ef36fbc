//! Every raw syscall hbrfs makes, each behind a helper that turns `-1` into
//! `io::Error::last_os_error()`, so `unsafe` lives in this one file.

use std::ffi::{CString, OsStr};
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn check_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// The `/proc/self/fd/N` path of a descriptor: how an `O_PATH` descriptor is
/// reopened for IO, or used where the kernel offers no fd-relative call.
pub fn proc_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// `openat(2)`; `dir` `None` means the current directory.
pub fn openat(
    dir: Option<BorrowedFd<'_>>,
    name: &OsStr,
    flags: i32,
    mode: u32,
) -> io::Result<OwnedFd> {
    let name = cstr(name)?;
    let dirfd = dir.map_or(libc::AT_FDCWD, |d| d.as_raw_fd());
    // SAFETY: name is a valid C string; the returned fd is owned by us.
    let fd = check(unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC, mode) })?;
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Reopens an `O_PATH` descriptor with real access `flags`.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> io::Result<OwnedFd> {
    let path = proc_path(fd);
    // SAFETY: path is a valid C string; the returned fd is owned by us.
    let fd = check(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fd was just returned by open and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstatat(2)`; an empty `name` stats `dir` itself (`AT_EMPTY_PATH`).
pub fn statat(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<libc::stat> {
    let cname = cstr(name)?;
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: st points to writable memory of the right size.
    check(unsafe { libc::fstatat(dir.as_raw_fd(), cname.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled st.
    Ok(unsafe { st.assume_init() })
}

/// `mkdirat(2)`.
pub fn mkdirat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: name is a valid C string.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `mknodat(2)`.
pub fn mknodat(dir: BorrowedFd<'_>, name: &OsStr, mode: u32, rdev: u64) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: name is a valid C string.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

/// `unlinkat(2)`; `dir_flag` removes a directory.
pub fn unlinkat(dir: BorrowedFd<'_>, name: &OsStr, remove_dir: bool) -> io::Result<()> {
    let name = cstr(name)?;
    let flags = if remove_dir { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: name is a valid C string.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

/// `renameat2(2)` with the caller's `RENAME_*` flags.
pub fn renameat2(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
    flags: u32,
) -> io::Result<()> {
    let old = cstr(old)?;
    let new = cstr(new)?;
    // SAFETY: both names are valid C strings.
    check(unsafe {
        libc::renameat2(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `symlinkat(2)`.
pub fn symlinkat(target: &Path, dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let target = cstr(target.as_os_str())?;
    let name = cstr(name)?;
    // SAFETY: both are valid C strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// `readlinkat(2)` of an `O_PATH` descriptor of the link itself.
pub fn readlink(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: buf is writable for its length; "" with an O_PATH fd reads the link itself.
    let n = check_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// `linkat(2)`: `old` in `old_dir` gets the new name `new` in `new_dir`;
/// an empty `old` links the object `old_dir` refers to itself
/// (`AT_EMPTY_PATH`, for an `O_PATH` descriptor of a file).
pub fn linkat(
    old_dir: BorrowedFd<'_>,
    old: &OsStr,
    new_dir: BorrowedFd<'_>,
    new: &OsStr,
) -> io::Result<()> {
    let flags = if old.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    };
    let old = cstr(old)?;
    let new = cstr(new)?;
    // SAFETY: both are valid C strings; "" with AT_EMPTY_PATH links old_dir itself.
    check(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

/// `fchownat(2)` of the object `fd` refers to; `u32::MAX` leaves an id as is.
pub fn chown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: "" with AT_EMPTY_PATH changes fd itself.
    check(unsafe {
        libc::fchownat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            uid,
            gid,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `chmod(2)` through the descriptor's `/proc` path.
pub fn chmod(fd: BorrowedFd<'_>, mode: u32) -> io::Result<()> {
    let path = proc_path(fd);
    // SAFETY: path is a valid C string.
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

/// A timestamp for [`utimens_fd`]: leave, now, or a given time.
#[derive(Clone, Copy, Debug)]
pub enum TimeSpec {
    /// Leave this time unchanged.
    Omit,
    /// Set it to the current time.
    Now,
    /// Seconds and nanoseconds since the epoch.
    At(i64, i64),
}

impl TimeSpec {
    fn to_timespec(self) -> libc::timespec {
        match self {
            TimeSpec::Omit => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_OMIT,
            },
            TimeSpec::Now => libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            },
            TimeSpec::At(s, ns) => libc::timespec {
                tv_sec: s,
                tv_nsec: ns,
            },
        }
    }
}

/// Sets the times of the object `fd` refers to, symlinks included:
/// `utimensat(fd, "", AT_EMPTY_PATH)`, which works on `O_PATH` descriptors
/// on current kernels; older ones refuse it (EINVAL) and get the
/// `/proc/self/fd` path instead, which cannot reach a symlink itself.
pub fn utimens_fd(fd: BorrowedFd<'_>, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let times = [atime.to_timespec(), mtime.to_timespec()];
    // SAFETY: "" is a valid C string and times has two entries.
    let direct = check(unsafe {
        libc::utimensat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            times.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    });
    match direct {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let path = proc_path(fd);
            // SAFETY: path is a valid C string and times has two entries.
            check(unsafe { libc::utimensat(libc::AT_FDCWD, path.as_ptr(), times.as_ptr(), 0) })
                .map(drop)
        }
        other => other.map(drop),
    }
}

/// `ftruncate(2)`.
pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size = i64::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) }).map(drop)
}

/// `fallocate(2)` with the caller's mode bits.
pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, offset: u64, len: u64) -> io::Result<()> {
    let off = i64::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let len = i64::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), mode, off, len) }).map(drop)
}

/// `lseek(2)`, for `SEEK_DATA`/`SEEK_HOLE`.
pub fn lseek(fd: BorrowedFd<'_>, offset: i64, whence: i32) -> io::Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `copy_file_range(2)` between explicit offsets.
pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: u64,
    fd_out: BorrowedFd<'_>,
    off_out: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in =
        i64::try_from(off_in).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    let mut off_out =
        i64::try_from(off_out).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: offsets point to live i64s; fds are valid.
    check_size(unsafe {
        libc::copy_file_range(
            fd_in.as_raw_fd(),
            &mut off_in,
            fd_out.as_raw_fd(),
            &mut off_out,
            len,
            0,
        )
    })
}

/// `fstatvfs(2)`.
pub fn statvfs(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: st points to writable memory of the right size.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded, so it filled st.
    Ok(unsafe { st.assume_init() })
}

/// `fgetxattr(2)`; an empty `buf` asks for the size.
pub fn getxattr(fd: BorrowedFd<'_>, name: &OsStr, buf: &mut [u8]) -> io::Result<usize> {
    let name = cstr(name)?;
    // SAFETY: buf is writable for its length (null with length 0 is allowed).
    check_size(unsafe {
        libc::fgetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })
}

/// `fsetxattr(2)`.
pub fn setxattr(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: value is readable for its length.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
    .map(drop)
}

/// `flistxattr(2)`; an empty `buf` asks for the size.
pub fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: buf is writable for its length.
    check_size(unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// `fremovexattr(2)`.
pub fn removexattr(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let name = cstr(name)?;
    // SAFETY: name is a valid C string.
    check(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Takes an exclusive `flock` without waiting; `Ok(false)` when another
/// process holds it.
pub fn try_lock_exclusive(fd: BorrowedFd<'_>) -> io::Result<bool> {
    flock(fd, libc::LOCK_EX | libc::LOCK_NB)
}

/// `flock(fd, op)`: `Ok(false)` when `op` has `LOCK_NB` and another open
/// file holds a conflicting lock.
pub fn flock(fd: BorrowedFd<'_>, op: i32) -> io::Result<bool> {
    // SAFETY: plain syscall on a valid fd.
    match check(unsafe { libc::flock(fd.as_raw_fd(), op) }) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Sets the process umask; the daemon uses 0 so the modes it is asked to
/// create are the modes it creates (the kernel already applied the caller's).
pub fn set_umask(mask: u32) {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) };
}

/// Blocks SIGINT, SIGTERM and SIGHUP in the calling thread (and the threads
/// it spawns later), so that one thread can take them with [`wait_signal`].
pub fn block_shutdown_signals() -> io::Result<()> {
    let set = shutdown_sigset();
    // SAFETY: set is initialised; the old mask is not needed.
    let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(())
}

/// Waits for one of the signals blocked by [`block_shutdown_signals`].
pub fn wait_signal() -> io::Result<i32> {
    let set = shutdown_sigset();
    let mut sig = 0;
    // SAFETY: set is initialised and sig is writable.
    let ret = unsafe { libc::sigwait(&set, &mut sig) };
    if ret != 0 {
        return Err(io::Error::from_raw_os_error(ret));
    }
    Ok(sig)
}

fn shutdown_sigset() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigemptyset initialises the set; sigaddset only adds valid signals.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
        set.assume_init()
    }
}

/// The errno an `io::Error` carries, `EIO` when it carries none.
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

/// Unmounts `path` lazily (`MNT_DETACH`), clearing a mount whose daemon died.
pub fn umount_detach(path: &Path) -> io::Result<()> {
    let path = cstr(path.as_os_str())?;
    // SAFETY: path is a valid C string.
    check(unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

/// `N` random bytes from the kernel, for ids and keys.
pub fn random_bytes<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(bytes)
}

/// Raises the soft limit on open files (`RLIMIT_NOFILE`) to the hard
/// limit, so a daemon is not held to the 1024 a shell hands down; returns
/// the new soft limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: lim points to writable memory of the right size.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) })?;
    // SAFETY: getrlimit succeeded, so it filled lim.
    let mut lim = unsafe { lim.assume_init() };
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: lim is a valid rlimit; the soft limit does not pass the hard one.
        check(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) })?;
    }
    Ok(lim.rlim_cur)
}

// Path-based calls that never follow a final symlink: what reading and
// setting the metadata of a replicated path needs (a symlink's own owner,
// times and xattrs), on the primary's backing and on the replica.

/// The C string of `path`.
fn cpath(path: &Path) -> io::Result<CString> {
    cstr(path.as_os_str())
}

/// Every extended attribute of `path` itself (`llistxattr` and
/// `lgetxattr`), as (name, value) pairs in the order listed. An attribute
/// removed between the list and the read is left out.
pub fn xattrs_of(path: &Path) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let p = cpath(path)?;
    let names = read_sized(|buf| {
        // SAFETY: p is a valid C string; buf is writable for its length.
        check_size(unsafe { libc::llistxattr(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
    })?;
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let n = CString::new(name).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        let value = read_sized(|buf| {
            // SAFETY: both are valid C strings; buf is writable for its length.
            check_size(unsafe {
                libc::lgetxattr(p.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
            })
        });
        match value {
            Ok(v) => out.push((name.to_vec(), v)),
            Err(e) if e.raw_os_error() == Some(libc::ENODATA) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// Runs a size-probing read (an empty buffer asks for the size) until the
/// buffer holds the whole answer (it may grow between the two calls).
fn read_sized(mut read: impl FnMut(&mut [u8]) -> io::Result<usize>) -> io::Result<Vec<u8>> {
    loop {
        let size = read(&mut [])?;
        let mut buf = vec![0u8; size];
        match read(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => {}
            Err(e) => return Err(e),
        }
    }
}

/// `lsetxattr(2)`: sets `name` on `path` itself.
pub fn set_xattr_at(path: &Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(path)?, cstr(OsStr::from_bytes(name))?);
    // SAFETY: both are valid C strings; value is readable for its length.
    check(unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// `lremovexattr(2)`: removes `name` from `path` itself.
pub fn remove_xattr_at(path: &Path, name: &[u8]) -> io::Result<()> {
    let (p, n) = (cpath(path)?, cstr(OsStr::from_bytes(name))?);
    // SAFETY: both are valid C strings.
    check(unsafe { libc::lremovexattr(p.as_ptr(), n.as_ptr()) }).map(drop)
}

/// `lchown(2)`: the owner of `path` itself.
pub fn lchown(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid C string.
    check(unsafe { libc::lchown(p.as_ptr(), uid, gid) }).map(drop)
}

/// `utimensat(AT_FDCWD, path, …, AT_SYMLINK_NOFOLLOW)`: the times of
/// `path` itself.
pub fn utimens_nofollow(path: &Path, atime: TimeSpec, mtime: TimeSpec) -> io::Result<()> {
    let p = cpath(path)?;
    let times = [atime.to_timespec(), mtime.to_timespec()];
    // SAFETY: p is a valid C string and times has two entries.
    check(unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

/// `mknod(2)` at `path`: a FIFO, socket or device node.
pub fn mknod_path(path: &Path, mode: u32, rdev: u64) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: p is a valid C string.
    check(unsafe { libc::mknod(p.as_ptr(), mode, rdev) }).map(drop)
}

/// `syncfs(2)` of the file system holding `fd`: makes the metadata an
/// apply set (modes, owners, times, xattrs) durable in one call.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fd is a valid open descriptor.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) }).map(drop)
}

/// `kill(pid, SIGTERM)`: asks the daemon `pid` to stop cleanly (`hbrfs
/// migrate` stopping its primary after the final point).
pub fn terminate(pid: i32) -> io::Result<()> {
    // SAFETY: kill takes plain integers; a wrong pid is an error, not UB.
    check(unsafe { libc::kill(pid, libc::SIGTERM) }).map(drop)
}

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() }
}
