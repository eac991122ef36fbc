//! Dropping setuid and setgid when someone without `CAP_FSETID` changes a
//! file's data, as the kernel does on a local file system.
//!
//! The mount negotiates `FUSE_HANDLE_KILLPRIV_V2`: without it the kernel
//! asks for `security.capability` before every write, one more round trip
//! per write (random 4 KiB writes ran at a seventh of the speed, see
//! `shared/PERF-NOTES.md`). With it, killing privileges is the daemon's
//! job:
//! - a write carries `FUSE_WRITE_KILL_SUIDGID` when the writer lacks
//!   `CAP_FSETID` (the kernel decides; the flag is all we need);
//! - truncate (also `open(O_TRUNC)`, which the kernel turns into a
//!   truncate), fallocate and copy_file_range carry no flag fuser shows
//!   (fuser 0.18 keeps `FATTR_KILL_SUIDGID` to itself), so the caller's
//!   effective capabilities are read from `/proc/PID/status`, and only when
//!   the file has a bit to lose;
//! - chown needs nothing: the daemon's `fchown` on the backing file clears
//!   the bits itself, as a chown always does;
//! - `security.capability` needs nothing either: the backing file system
//!   drops it on every write and truncate the daemon makes.
//!
//! Which bits go is the kernel's rule (`setattr_should_drop_suidgid`), on
//! regular files only: see [`bits_to_kill`].

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use super::{Passthrough, stat};
use crate::fs::inodes::Inode;
use crate::fs::reply::{Res, io_errno};
use crate::sys;

/// `CAP_FSETID`'s bit in a capability set.
const CAP_FSETID: u32 = 4;

/// What `/proc/PID/status` says of a caller, as far as killing privileges
/// goes.
#[derive(Debug, Default, PartialEq)]
struct Credentials {
    /// Its effective capabilities hold `CAP_FSETID`.
    fsetid: bool,
    /// Its supplementary groups.
    groups: Vec<u32>,
}

/// The credentials in a `/proc/PID/status` text; `None` when it has no
/// readable `CapEff` line.
fn parse_status(status: &str) -> Option<Credentials> {
    let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
    let caps = u64::from_str_radix(field("CapEff:")?.trim(), 16).ok()?;
    let groups = field("Groups:")
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|g| g.parse().ok())
        .collect();
    Some(Credentials {
        fsetid: caps & (1 << CAP_FSETID) != 0,
        groups,
    })
}

/// The credentials of process `pid`. A process we cannot read (it exited
/// meanwhile) has none: losing a setuid bit is the safe mistake, keeping
/// one is not.
fn credentials(pid: u32) -> Credentials {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| parse_status(&s))
        .unwrap_or_default()
}

/// Who changes a file's data, as far as killing privileges goes.
#[derive(Clone, Copy, Debug)]
pub struct Changer {
    /// The process that asked.
    pub pid: u32,
    /// Its file-system group.
    pub gid: u32,
    /// What the kernel said (a write's `FUSE_WRITE_KILL_SUIDGID`: the
    /// caller lacks `CAP_FSETID`); `None` for truncate, fallocate and
    /// copy_file_range, whose caller's capabilities decide.
    pub flagged: Option<bool>,
}

/// The privilege bits of a file (`st`) that `changer` loses by changing
/// its data: setuid, and setgid with group execute, unless the caller
/// holds `CAP_FSETID`; setgid without group execute (a mandatory-locking
/// mark, not a privilege) only when the caller is not in the file's
/// group either. `creds` is read only when a bit is at stake.
fn bits_to_kill(st: &libc::stat, changer: Changer, creds: impl FnOnce() -> Credentials) -> u32 {
    let mode = st.st_mode;
    let at_stake = mode & (libc::S_ISUID | libc::S_ISGID);
    if mode & libc::S_IFMT != libc::S_IFREG || at_stake == 0 {
        return 0;
    }
    let creds = creds();
    let privileged = changer.flagged.map_or(creds.fsetid, |kill| !kill);
    if privileged {
        return 0;
    }
    let mut kill = mode & libc::S_ISUID;
    if mode & libc::S_ISGID != 0 {
        let in_group = changer.gid == st.st_gid || creds.groups.contains(&st.st_gid);
        if mode & libc::S_IXGRP != 0 || !in_group {
            kill |= libc::S_ISGID;
        }
    }
    kill
}

impl Passthrough {
    /// Drops the privilege bits of `node` (open as `fd`) before `changer`
    /// changes its data, and records the new mode for the replica. Costs
    /// a flag test for a write the kernel does not flag, one `fstat`
    /// otherwise, and a read of the caller's `/proc` status only when the
    /// file has a privilege bit.
    pub(super) fn kill_privileges(
        &self,
        node: &Arc<Inode>,
        fd: BorrowedFd<'_>,
        changer: Changer,
    ) -> Res<()> {
        if changer.flagged == Some(false) {
            return Ok(());
        }
        let st = stat(fd)?;
        let kill = bits_to_kill(&st, changer, || credentials(changer.pid));
        if kill == 0 {
            return Ok(());
        }
        sys::chmod(node.fd(), st.st_mode & 0o7777 & !kill).map_err(io_errno)?;
        if let Some(kernel) = self.notifier.get() {
            // Attributes only (a negative offset): no page is dropped, and
            // no lock the kernel holds for this very write is needed.
            if let Err(e) = kernel.inval_inode(node.ino, -1, 0) {
                log::warn!(
                    "telling the kernel the mode of inode {} changed: {e}",
                    node.ino
                );
            }
        }
        self.meta_changed(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32, gid: u32) -> libc::stat {
        // SAFETY: a stat is plain data; all zeroes is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = mode;
        st.st_gid = gid;
        st
    }

    #[test]
    fn the_kernels_rule_for_which_bits_go() {
        let reg = libc::S_IFREG;
        let user = |flagged| Changer {
            pid: 0,
            gid: 100,
            flagged,
        };
        let none = Credentials::default;
        let (suid, sgid) = (libc::S_ISUID, libc::S_ISGID);
        assert_eq!(
            bits_to_kill(&file(reg | 0o6777, 0), user(Some(true)), none),
            suid | sgid
        );
        assert_eq!(
            bits_to_kill(&file(reg | 0o6777, 0), user(Some(false)), none),
            0
        );
        // setgid without group execute: only for a caller outside the group.
        assert_eq!(
            bits_to_kill(&file(reg | 0o2767, 0), user(Some(true)), none),
            sgid
        );
        assert_eq!(
            bits_to_kill(&file(reg | 0o2767, 100), user(Some(true)), none),
            0
        );
        let member = || Credentials {
            fsetid: false,
            groups: vec![7],
        };
        assert_eq!(
            bits_to_kill(&file(reg | 0o2767, 7), user(Some(true)), member),
            0
        );
        // Unflagged: the caller's capabilities decide.
        let capable = || Credentials {
            fsetid: true,
            groups: vec![],
        };
        assert_eq!(bits_to_kill(&file(reg | 0o4700, 0), user(None), capable), 0);
        assert_eq!(bits_to_kill(&file(reg | 0o4700, 0), user(None), none), suid);
        assert_eq!(
            bits_to_kill(&file(reg | 0o0777, 0), user(Some(true)), || unreachable!()),
            0
        );
        assert_eq!(
            bits_to_kill(&file(libc::S_IFDIR | 0o6777, 0), user(Some(true)), none),
            0
        );
    }

    #[test]
    fn credentials_are_read_from_the_status_text() {
        let root =
            "Name:\tx\nGroups:\t0 4 \nCapInh:\t0000000000000000\nCapEff:\t000001ffffffffff\n";
        let user = "Name:\tx\nGroups:\nCapEff:\t0000000000000000\n";
        let fsetid_only = "CapEff:\t0000000000000010\n";
        let got = |s| parse_status(s).map(|c| (c.fsetid, c.groups));
        assert_eq!(got(root), Some((true, vec![0, 4])));
        assert_eq!(got(user), Some((false, vec![])));
        assert_eq!(got(fsetid_only), Some((true, vec![])));
        assert_eq!(got("Name:\tx\n"), None);
        assert_eq!(got("CapEff:\tzz\n"), None);
        // This test runs as some process: whatever it holds, it parses.
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(parse_status(&own).is_some());
    }
}
