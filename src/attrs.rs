//! Attribute changes (chmod, chown, truncate, utimens) on an object of the upper layer.
//!
//! Owns: applying a FUSE SETATTR to the real object behind a handle, in the order a real
//! filesystem would (owner before mode, so a chown that clears set-id bits cannot undo the
//! mode asked for), and the kernel's rules for clearing set-id bits on write, truncate and
//! chown, which the FUSE kernel module leaves to the server (FUSE_HANDLE_KILLPRIV_V2). Must never: be called on a lower-layer
//! object — the caller copies up first.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

use crate::sys;

/// The parts of a SETATTR request; `None` leaves that attribute alone.
#[derive(Debug, Default, Clone, Copy)]
pub struct Change {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    /// `UTIME_NOW` in `tv_nsec` means "now".
    pub atime: Option<libc::timespec>,
    pub mtime: Option<libc::timespec>,
}

impl Change {
    /// Only times change: utimes never clears set-id bits.
    fn times_only(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && (self.atime.is_some() || self.mtime.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.mode.is_none()
            && self.uid.is_none()
            && self.gid.is_none()
            && self.size.is_none()
            && self.atime.is_none()
            && self.mtime.is_none()
    }
}

/// A file's owner and group as the union shows them.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Who sent a SETATTR, as FUSE reports it: ids as the union shows them, and the calling
/// thread, whose supplementary groups and capabilities FUSE does not carry.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    /// Whether to take the caller to hold CAP_FSETID if its thread cannot be asked: root,
    /// or the root of the container an id mapping serves.
    pub presumed_privileged: bool,
}

/// Completes `change`, about to be applied to a file whose current attributes are
/// `current` (owned by `file` as the union shows it), with the set-group-id rule of the
/// kernel that FUSE leaves out; `writing` tells whether a handle has the file open for
/// writing.
///
/// When a file is written, truncated or chowned by a caller without CAP_FSETID, the kernel
/// clears S_ISUID, and S_ISGID if the group may execute the file or — in current kernels
/// (`setattr_should_drop_sgid`; measured on 6.18) — if the caller is not in the file's
/// group. The kernel overlay follows that. The FUSE kernel module leaves the mode to us
/// (we agree FUSE_HANDLE_KILLPRIV_V2, see [`setid_bits_dropped`]) and, before writing to a
/// set-id file, sends an empty SETATTR. So a 2766 file written by someone outside its
/// group keeps S_ISGID unless we clear it here.
///
/// Any SETATTR other than a time change, from a caller without CAP_FSETID and not in the
/// file's group, may therefore not leave S_ISGID on a regular file: the kernel lets such
/// a caller's SETATTR through only as a write, truncate or chown (which clear it), or as a
/// chmod — and a chmod by a caller outside the group has S_ISGID stripped already
/// (`setattr_prepare`).
///
/// An empty SETATTR is also what chown(2) with both ids -1 sends. The kernel refuses that
/// (EPERM) to a caller other than the owner when it would have to clear S_ISGID, clearing
/// being a mode change; the kernel overlay does the same. It can only be a write's request
/// if the file is open for writing.
pub fn kill_setgid(
    change: &mut Change,
    current: &libc::stat,
    file: Owner,
    caller: Caller,
    writing: impl FnOnce() -> bool,
) -> io::Result<()> {
    if current.st_mode & libc::S_IFMT != libc::S_IFREG || change.times_only() {
        return Ok(());
    }
    let mode = change.mode.unwrap_or(current.st_mode & 0o7777);
    if mode & libc::S_ISGID == 0 || caller.gid == file.gid {
        return Ok(());
    }
    let exempt = match ThreadCreds::of(caller.pid) {
        Some(creds) => creds.cap_fsetid || creds.groups.contains(&file.gid),
        None => caller.presumed_privileged,
    };
    if exempt {
        return Ok(());
    }
    if change.is_empty() && caller.uid != file.uid && !writing() {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    change.mode = Some(mode & !libc::S_ISGID);
    Ok(())
}

/// What makes a file lose set-id bits (see [`setid_bits_dropped`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetidLoss {
    /// A write (or fallocate, copy_file_range) whose WRITE said the writer lacks
    /// CAP_FSETID.
    UnprivilegedWrite,
    /// A data change or truncation: only a caller without CAP_FSETID clears bits.
    Modification,
    /// An empty SETATTR: chown(2) with both ids -1, which clears S_ISUID whoever calls it,
    /// or a write's request, which the kernel sends only for a caller without CAP_FSETID
    /// — so the chown rule covers both.
    Chown,
}

/// The mode a regular file must get when `caller` changes it as `why` says, if that clears
/// a set-id bit (the kernel's `setattr_should_drop_suidgid`, and chown's unconditional
/// S_ISUID): S_ISUID goes; S_ISGID goes if the group may execute the file, or if the
/// caller, without CAP_FSETID, is not in the file's group. With FUSE_HANDLE_KILLPRIV_V2 the
/// kernel leaves this to us (and fuser does not pass FATTR_KILL_SUIDGID on).
pub fn setid_bits_dropped(
    current: &libc::stat,
    file: Owner,
    caller: Caller,
    why: SetidLoss,
) -> Option<u32> {
    let mode = current.st_mode & 0o7777;
    if current.st_mode & libc::S_IFMT != libc::S_IFREG
        || mode & (libc::S_ISUID | libc::S_ISGID) == 0
    {
        return None;
    }
    let creds = ThreadCreds::of(caller.pid);
    let privileged = why != SetidLoss::UnprivilegedWrite
        && match &creds {
            Some(c) => c.cap_fsetid,
            None => caller.presumed_privileged,
        };
    if privileged && why == SetidLoss::Modification {
        return None;
    }
    let in_group =
        caller.gid == file.gid || creds.as_ref().is_some_and(|c| c.groups.contains(&file.gid));
    let mut new = mode & !libc::S_ISUID;
    if mode & libc::S_IXGRP != 0 || !(in_group || privileged) {
        new &= !libc::S_ISGID;
    }
    (new != mode).then_some(new)
}

/// What the kernel knows of the calling thread and FUSE does not pass on.
#[derive(Debug, PartialEq)]
struct ThreadCreds {
    /// Supplementary groups.
    groups: Vec<u32>,
    /// CAP_FSETID is effective (in the thread's own user namespace, which is where the
    /// kernel's `in_group_or_capable` looks for it).
    cap_fsetid: bool,
}

impl ThreadCreds {
    /// From `/proc/PID/status` of the calling thread, which waits for our answer and so is
    /// there to be asked (unless its pid is not visible to us).
    fn of(pid: u32) -> Option<ThreadCreds> {
        match std::fs::read_to_string(format!("/proc/{pid}/status")) {
            Ok(status) => ThreadCreds::parse(&status),
            Err(e) => {
                log::debug!("credentials of pid {pid}: {e}");
                None
            }
        }
    }

    fn parse(status: &str) -> Option<ThreadCreds> {
        const CAP_FSETID: u32 = 4;
        let field = |name: &str| status.lines().find_map(|l| l.strip_prefix(name));
        let groups = field("Groups:")?
            .split_whitespace()
            .map(|g| g.parse().ok())
            .collect::<Option<Vec<u32>>>()?;
        let cap_eff = u64::from_str_radix(field("CapEff:")?.trim(), 16).ok()?;
        Some(ThreadCreds {
            groups,
            cap_fsetid: cap_eff & (1 << CAP_FSETID) != 0,
        })
    }
}

/// Applies `change` to the object behind the `O_PATH` handle `object`; `open`, if the
/// caller passed a file handle, is used for truncation (it may be the only way a caller
/// without write permission on the path can truncate).
pub fn apply(object: BorrowedFd<'_>, open: Option<&OwnedFd>, change: &Change) -> io::Result<()> {
    if change.uid.is_some() || change.gid.is_some() {
        let uid = change.uid.unwrap_or(u32::MAX);
        let gid = change.gid.unwrap_or(u32::MAX);
        // SAFETY: empty path with AT_EMPTY_PATH changes the handle's object itself.
        sys::check(unsafe {
            libc::fchownat(
                object.as_raw_fd(),
                c"".as_ptr(),
                uid,
                gid,
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
    }
    if let Some(mode) = change.mode {
        sys::chmod_handle(object, mode & 0o7777)?;
    }
    if let Some(size) = change.size {
        let reopened;
        let fd = match open {
            Some(f) => f.as_fd(),
            None => {
                reopened = sys::reopen(object, libc::O_WRONLY)?;
                reopened.as_fd()
            }
        };
        sys::ftruncate(fd, size)?;
    }
    if change.atime.is_some() || change.mtime.is_some() {
        let omit = libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_OMIT,
        };
        let times = [change.atime.unwrap_or(omit), change.mtime.unwrap_or(omit)];
        // SAFETY: valid handle, empty path and a two-element times array.
        sys::check(unsafe {
            libc::utimensat(
                object.as_raw_fd(),
                c"".as_ptr(),
                times.as_ptr(),
                libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(mode: u32) -> libc::stat {
        // SAFETY: an all-zero stat is a valid value.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | mode;
        st
    }

    const ALICE_FILE: Owner = Owner {
        uid: 1000,
        gid: 1000,
    };

    /// A caller whose thread cannot be asked (no such pid): only its own group counts.
    fn caller(uid: u32, gid: u32) -> Caller {
        Caller {
            uid,
            gid,
            pid: u32::MAX,
            presumed_privileged: uid == 0,
        }
    }

    fn killed(change: Change, mode: u32, who: Caller, writing: bool) -> io::Result<Option<u32>> {
        let mut change = change;
        kill_setgid(&mut change, &file(mode), ALICE_FILE, who, || writing)?;
        Ok(change.mode)
    }

    /// The kernel's rules for what a write, a truncation and chown(-1, -1) clear.
    #[test]
    fn setid_bits_go_as_the_kernel_drops_them() {
        use SetidLoss::*;
        let dropped = |mode, who, why| setid_bits_dropped(&file(mode), ALICE_FILE, who, why);
        let (root, alice, nobody) = (caller(0, 0), caller(1000, 1000), caller(65534, 65534));
        // An unprivileged writer loses S_ISUID; S_ISGID if group-executable or not its group.
        assert_eq!(dropped(0o6777, nobody, UnprivilegedWrite), Some(0o777));
        assert_eq!(dropped(0o6766, alice, UnprivilegedWrite), Some(0o2766));
        assert_eq!(dropped(0o2766, nobody, UnprivilegedWrite), Some(0o766));
        assert_eq!(dropped(0o2766, alice, UnprivilegedWrite), None);
        // A truncation by a privileged caller keeps everything.
        assert_eq!(dropped(0o6777, root, Modification), None);
        assert_eq!(dropped(0o6777, nobody, Modification), Some(0o777));
        // chown(-1, -1) clears S_ISUID whoever calls; root keeps S_ISGID without group exec.
        assert_eq!(dropped(0o6766, root, Chown), Some(0o2766));
        assert_eq!(dropped(0o6777, root, Chown), Some(0o777));
        // Nothing to clear, or not a regular file: no change.
        assert_eq!(dropped(0o777, nobody, UnprivilegedWrite), None);
        let mut dir = file(0o6777);
        dir.st_mode = libc::S_IFDIR | 0o6777;
        assert_eq!(setid_bits_dropped(&dir, ALICE_FILE, nobody, Chown), None);
    }

    const TRUNCATE: Change = Change {
        mode: None,
        uid: None,
        gid: None,
        size: Some(0),
        atime: None,
        mtime: None,
    };

    #[test]
    fn setgid_without_group_execute_goes_for_writers_outside_the_group() {
        let nobody = caller(65534, 65534);
        assert_eq!(killed(TRUNCATE, 0o2766, nobody, true).unwrap(), Some(0o766));
        // the write's empty request, from a writer or from the owner
        assert_eq!(
            killed(Change::default(), 0o2766, nobody, true).unwrap(),
            Some(0o766)
        );
        assert_eq!(
            killed(Change::default(), 0o2766, caller(1000, 5), false).unwrap(),
            Some(0o766)
        );
        // a mode the kernel already derived keeps its other changes
        let mode = Change {
            mode: Some(0o2766),
            ..Change::default()
        };
        assert_eq!(killed(mode, 0o6766, nobody, true).unwrap(), Some(0o766));
    }

    #[test]
    fn setgid_stays_for_group_members_root_times_and_non_files() {
        assert_eq!(
            killed(TRUNCATE, 0o2766, caller(1001, 1000), true).unwrap(),
            None
        );
        assert_eq!(killed(TRUNCATE, 0o2766, caller(0, 0), true).unwrap(), None);
        let touch = Change {
            mtime: Some(libc::timespec {
                tv_sec: 0,
                tv_nsec: libc::UTIME_NOW,
            }),
            ..Change::default()
        };
        assert_eq!(
            killed(touch, 0o2766, caller(65534, 65534), true).unwrap(),
            None
        );
        let mut change = TRUNCATE;
        let mut dir = file(0o2777);
        dir.st_mode = libc::S_IFDIR | 0o2777;
        kill_setgid(&mut change, &dir, ALICE_FILE, caller(65534, 65534), || true).unwrap();
        assert_eq!(change.mode, None);
        assert_eq!(
            killed(TRUNCATE, 0o766, caller(65534, 65534), true).unwrap(),
            None
        );
    }

    #[test]
    fn noop_chown_by_others_that_would_clear_setgid_is_refused() {
        let e = killed(Change::default(), 0o2766, caller(65534, 65534), false).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    #[test]
    fn thread_credentials_come_from_proc_status() {
        let status = "Name:\tsh\nGroups:\t1000 1234 \nCapInh:\t0000000000000000\n\
                      CapEff:\t0000000000000010\n";
        assert_eq!(
            ThreadCreds::parse(status),
            Some(ThreadCreds {
                groups: vec![1000, 1234],
                cap_fsetid: true
            })
        );
        let status = "Groups:\t\nCapEff:\t000001ffffffffef\n";
        assert_eq!(
            ThreadCreds::parse(status),
            Some(ThreadCreds {
                groups: vec![],
                cap_fsetid: false
            })
        );
        // this test runs as root with every capability: a caller on its thread is exempt
        // whatever its ids
        let me = ThreadCreds::of(std::process::id()).unwrap();
        assert!(me.cap_fsetid);
        let capable = Caller {
            pid: std::process::id(),
            presumed_privileged: false,
            ..caller(1001, 1001)
        };
        assert_eq!(killed(TRUNCATE, 0o2766, capable, true).unwrap(), None);
    }
}
