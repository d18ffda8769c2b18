//! Which extended attributes users see.
//!
//! Owns: hiding the overlay's private attributes (`trusted.overlay.*`, or `user.overlay.*`
//! with `userxattr`) and, because the daemon runs privileged, the `trusted.*` namespace from
//! callers who could not read it on a real filesystem. Must never: let a private attribute
//! through getxattr or listxattr.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use crate::sys;

/// Who is asking: the kernel hides `trusted.*` from callers without CAP_SYS_ADMIN. FUSE does
/// not tell us capabilities, so uid 0 stands for it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
}

fn visible(name: &[u8], private_prefix: &str, caller: Caller) -> bool {
    if name.starts_with(private_prefix.as_bytes()) {
        return false;
    }
    !(caller.uid != 0 && name.starts_with(b"trusted."))
}

/// The value of attribute `name`, or `Ok(None)` if it does not exist or is not visible.
pub fn get(
    fd: BorrowedFd<'_>,
    name: &OsStr,
    private_prefix: &str,
    caller: Caller,
) -> io::Result<Option<Vec<u8>>> {
    if !visible(name.as_bytes(), private_prefix, caller) {
        return Ok(None);
    }
    let cname =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::get_xattr(fd, &cname)
}

/// The names of all visible attributes, in the order the layer lists them.
pub fn list(fd: BorrowedFd<'_>, private_prefix: &str, caller: Caller) -> io::Result<Vec<OsString>> {
    Ok(sys::list_xattr(fd)?
        .into_iter()
        .filter(|n| visible(n.as_bytes(), private_prefix, caller))
        .collect())
}

/// Whether the caller may set or remove attribute `name`: the overlay's private attributes
/// are the union's own bookkeeping (the kernel overlay answers EOPNOTSUPP), and `trusted.*`
/// needs privilege on any filesystem (EPERM).
pub fn check_settable(name: &OsStr, private_prefix: &str, caller: Caller) -> io::Result<()> {
    let bytes = name.as_bytes();
    if bytes.starts_with(private_prefix.as_bytes()) {
        return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
    }
    if caller.uid != 0 && bytes.starts_with(b"trusted.") {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

fn cname(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sets attribute `name` on the object behind a handle (`flags`: XATTR_CREATE/REPLACE).
pub fn set(fd: BorrowedFd<'_>, name: &OsStr, value: &[u8], flags: i32) -> io::Result<()> {
    let path = sys::proc_fd_path(fd);
    let name = cname(name)?;
    // SAFETY: valid path, name and value buffer.
    let ret = unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Removes attribute `name` from the object behind a handle.
pub fn remove(fd: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let path = sys::proc_fd_path(fd);
    let name = cname(name)?;
    // SAFETY: valid path and name.
    if unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) } < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// The listxattr wire format: names, each NUL-terminated.
pub fn encode_names(names: &[OsString]) -> Vec<u8> {
    let mut out = Vec::new();
    for n in names {
        out.extend_from_slice(n.as_bytes());
        out.push(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_and_trusted_names_are_hidden_from_the_right_callers() {
        let root = Caller { uid: 0 };
        let user = Caller { uid: 1000 };
        let p = "trusted.overlay.";
        assert!(!visible(b"trusted.overlay.opaque", p, root));
        assert!(visible(b"trusted.other", p, root));
        assert!(!visible(b"trusted.other", p, user));
        assert!(visible(b"user.overlay.opaque", p, user));
        assert!(!visible(b"user.overlay.opaque", "user.overlay.", user));
        assert!(visible(b"security.capability", p, user));
    }
}
