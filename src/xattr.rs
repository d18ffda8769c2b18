//! Which extended attributes users see, and under which names they are stored.
//!
//! Owns: the overlay's private namespace (`trusted.overlay.*`, or `user.overlay.*` with
//! `userxattr`): the union's own bookkeeping there (opaque, redirect, origin, ...) is never
//! shown, and a user's attribute whose name falls in it is stored escaped, as
//! `<prefix>overlay.<rest>`, exactly as the kernel overlay (6.7+) stores it, so either can
//! read the other's layers. Also hides `trusted.*` from callers who could not read it on a
//! real filesystem (the daemon itself runs privileged). Must never: let a private attribute
//! through, or store a user's attribute under a private name.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};

use crate::sys;

/// Who is asking: the kernel hides `trusted.*` from callers without CAP_SYS_ADMIN. FUSE does
/// not tell us capabilities, so uid 0 stands for it.
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
}

fn caller_may_see(name: &[u8], caller: Caller) -> bool {
    !(caller.uid != 0 && name.starts_with(b"trusted."))
}

/// The name under which the user's attribute `name` is stored in a layer.
pub fn stored_name(name: &[u8], private_prefix: &str) -> Vec<u8> {
    match name.strip_prefix(private_prefix.as_bytes()) {
        Some(rest) => [private_prefix.as_bytes(), b"overlay.", rest].concat(),
        None => name.to_vec(),
    }
}

/// The user-visible name of the stored attribute `stored`, or `None` for the union's own.
pub fn user_name(stored: &[u8], private_prefix: &str) -> Option<Vec<u8>> {
    match stored.strip_prefix(private_prefix.as_bytes()) {
        Some(rest) => rest
            .strip_prefix(b"overlay.")
            .map(|escaped| [private_prefix.as_bytes(), escaped].concat()),
        None => Some(stored.to_vec()),
    }
}

/// Whether a stored attribute is user data that copy-up must carry to the upper layer
/// (everything but the union's own bookkeeping, which describes the lower object).
pub fn is_user_data(stored: &[u8], private_prefix: &str) -> bool {
    user_name(stored, private_prefix).is_some()
}

#[cfg(test)]
fn visible(name: &[u8], private_prefix: &str, caller: Caller) -> bool {
    user_name(name, private_prefix).is_some() && caller_may_see(name, caller)
}

/// The value of attribute `name`, or `Ok(None)` if it does not exist or is not visible.
pub fn get(
    fd: BorrowedFd<'_>,
    name: &OsStr,
    private_prefix: &str,
    caller: Caller,
) -> io::Result<Option<Vec<u8>>> {
    if !caller_may_see(name.as_bytes(), caller) {
        return Ok(None);
    }
    let cname = CString::new(stored_name(name.as_bytes(), private_prefix))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    sys::get_xattr(fd, &cname)
}

/// The names of all visible attributes, in the order the layer lists them.
pub fn list(fd: BorrowedFd<'_>, private_prefix: &str, caller: Caller) -> io::Result<Vec<OsString>> {
    Ok(sys::list_xattr(fd)?
        .into_iter()
        .filter(|n| caller_may_see(n.as_bytes(), caller))
        .filter_map(|n| user_name(n.as_bytes(), private_prefix))
        .map(OsString::from_vec)
        .collect())
}

/// Whether the caller may set or remove attribute `name`: `trusted.*` needs privilege on any
/// filesystem (EPERM).
pub fn check_settable(name: &OsStr, caller: Caller) -> io::Result<()> {
    if !caller_may_see(name.as_bytes(), caller) {
        return Err(io::Error::from_raw_os_error(libc::EPERM));
    }
    Ok(())
}

fn stored_cname(name: &OsStr, private_prefix: &str) -> io::Result<CString> {
    CString::new(stored_name(name.as_bytes(), private_prefix))
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Sets the user's attribute `name` on the object behind a handle (`flags`:
/// XATTR_CREATE/REPLACE).
pub fn set(
    fd: BorrowedFd<'_>,
    name: &OsStr,
    value: &[u8],
    flags: i32,
    private_prefix: &str,
) -> io::Result<()> {
    sys::set_xattr(fd, &stored_cname(name, private_prefix)?, value, flags)
}

/// Removes the user's attribute `name` from the object behind a handle.
pub fn remove(fd: BorrowedFd<'_>, name: &OsStr, private_prefix: &str) -> io::Result<()> {
    sys::remove_xattr(fd, &stored_cname(name, private_prefix)?)
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
        assert!(visible(b"trusted.overlay.overlay.mine", p, root));
        assert_eq!(
            user_name(b"trusted.overlay.overlay.mine", p).as_deref(),
            Some(&b"trusted.overlay.mine"[..])
        );
        assert_eq!(
            stored_name(b"trusted.overlay.mine", p),
            b"trusted.overlay.overlay.mine"
        );
        assert_eq!(stored_name(b"user.x", p), b"user.x");
        assert!(visible(b"trusted.other", p, root));
        assert!(!visible(b"trusted.other", p, user));
        assert!(visible(b"user.overlay.opaque", p, user));
        assert!(!visible(b"user.overlay.opaque", "user.overlay.", user));
        assert!(visible(b"security.capability", p, user));
    }
}
