//! Stat conversion: a backing `struct stat` becomes the `FileAttr` the
//! kernel is told, mode bits become a `FileType`, and times cross between
//! `SystemTime` (fuser) and seconds + nanoseconds (the syscalls).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use crate::sys::TimeSpec;

/// The attributes the kernel is told for node `ino` with backing stat `st`
/// (the inode number is ours, everything else the backing object's).
pub fn file_attr(ino: INodeNo, st: &libc::stat) -> FileAttr {
    FileAttr {
        ino,
        size: st.st_size as u64,
        blocks: st.st_blocks as u64,
        atime: system_time(st.st_atime, st.st_atime_nsec),
        mtime: system_time(st.st_mtime, st.st_mtime_nsec),
        ctime: system_time(st.st_ctime, st.st_ctime_nsec),
        crtime: UNIX_EPOCH,
        kind: file_type(st.st_mode),
        perm: (st.st_mode & 0o7777) as u16,
        nlink: st.st_nlink as u32,
        uid: st.st_uid,
        gid: st.st_gid,
        rdev: st.st_rdev as u32,
        blksize: st.st_blksize as u32,
        flags: 0,
    }
}

/// The file type of `st_mode` bits (anything unknown counts as a regular
/// file, as the kernel would show it).
pub fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

/// The file type of a directory entry as `read_dir` reports it.
pub fn entry_type(t: std::fs::FileType) -> FileType {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        FileType::Directory
    } else if t.is_symlink() {
        FileType::Symlink
    } else if t.is_fifo() {
        FileType::NamedPipe
    } else if t.is_socket() {
        FileType::Socket
    } else if t.is_char_device() {
        FileType::CharDevice
    } else if t.is_block_device() {
        FileType::BlockDevice
    } else {
        FileType::RegularFile
    }
}

/// A stat time (seconds may be negative: before 1970) as a `SystemTime`.
fn system_time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::from_secs(sec.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// A time `setattr` was given, as `utimensat` takes it (`None`: leave it).
pub fn time_spec(t: Option<TimeOrNow>) -> TimeSpec {
    match t {
        None => TimeSpec::Omit,
        Some(TimeOrNow::Now) => TimeSpec::Now,
        Some(TimeOrNow::SpecificTime(t)) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => TimeSpec::At(d.as_secs() as i64, i64::from(d.subsec_nanos())),
            Err(e) => {
                let d = e.duration();
                let (s, ns) = (d.as_secs() as i64, i64::from(d.subsec_nanos()));
                if ns == 0 {
                    TimeSpec::At(-s, 0)
                } else {
                    TimeSpec::At(-s - 1, 1_000_000_000 - ns)
                }
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_1970_round_trip() {
        let back = |sec, nsec| time_spec(Some(TimeOrNow::SpecificTime(system_time(sec, nsec))));
        assert!(matches!(
            back(-2, 250_000_000),
            TimeSpec::At(-2, 250_000_000)
        ));
        assert!(matches!(back(-3, 0), TimeSpec::At(-3, 0)));
        assert!(matches!(back(5, 7), TimeSpec::At(5, 7)));
    }
}
