//! Attribute changes (chmod, chown, truncate, utimens) on an object of the upper layer.
//!
//! Owns: applying a FUSE SETATTR to the real object behind a handle, in the order a real
//! filesystem would (owner before mode, so a chown that clears set-id bits cannot undo the
//! mode asked for). Must never: be called on a lower-layer object — the caller copies up
//! first.

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
        let path = sys::proc_fd_path(object);
        // SAFETY: valid path; the magic link lands on the handle's own object.
        sys::check(unsafe { libc::chmod(path.as_ptr(), mode & 0o7777) })?;
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
