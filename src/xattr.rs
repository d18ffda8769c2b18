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
    sys::get_xattr(fd, &stored_cname(name, private_prefix)?)
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

/// The longest attribute name Linux stores (`XATTR_NAME_MAX`).
pub const XATTR_NAME_MAX: usize = 255;

/// The stored name of the user's attribute `name`, ready for a system call. A name that only
/// becomes too long by escaping gets EOPNOTSUPP, as from the kernel overlay
/// (`ovl_xattr_escape_name`), not the ERANGE (E2BIG through FUSE) the layer would answer.
fn stored_cname(name: &OsStr, private_prefix: &str) -> io::Result<CString> {
    // The private prefix alone names nothing: the kernel refuses a name that is exactly the
    // prefix of its xattr handler (`xattr_resolve_name`).
    if name.as_bytes() == private_prefix.as_bytes() {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let stored = stored_name(name.as_bytes(), private_prefix);
    if stored.len() > XATTR_NAME_MAX {
        let errno = if stored.len() > name.len() {
            libc::EOPNOTSUPP
        } else {
            libc::ERANGE
        };
        return Err(io::Error::from_raw_os_error(errno));
    }
    CString::new(stored).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
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
    use proptest::prelude::*;

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

    const PREFIXES: [&str; 2] = ["trusted.overlay.", "user.overlay."];

    /// The kernel overlay's (6.7+) answer for a stored name: hidden (`None`) or the name
    /// listed, transcribed from `ovl_listxattr`/`ovl_is_escaped_xattr`/`ovl_can_list`.
    /// `None` as well for the names where the kernel's escape test, which for `trusted.`
    /// compares one byte short of the prefix, accepts `trusted.overlay.overlayX`: the kernel
    /// then lists a mangled name; ovlfuse keeps such a name private.
    fn kernel_listed(stored: &[u8], prefix: &str, caller: Caller) -> Option<Option<Vec<u8>>> {
        // Measured: an unprivileged caller sees no `trusted.*` name, escaped ones included.
        if stored.starts_with(b"trusted.") && caller.uid != 0 {
            return Some(None);
        }
        let escape = [prefix.as_bytes(), b"overlay."].concat();
        let kernel_escape = if prefix.starts_with("trusted.") {
            &escape[..escape.len() - 1]
        } else {
            &escape[..]
        };
        if stored.starts_with(kernel_escape) {
            if !stored.starts_with(&escape) {
                return None;
            }
            return Some(Some([prefix.as_bytes(), &stored[escape.len()..]].concat()));
        }
        if stored.starts_with(prefix.as_bytes()) {
            return Some(None);
        }
        Some(Some(stored.to_vec()))
    }

    fn listed(stored: &[u8], prefix: &str, caller: Caller) -> Option<Vec<u8>> {
        user_name(stored, prefix).filter(|_| caller_may_see(stored, caller))
    }

    /// Attribute names built from the pieces that matter, and some noise.
    fn xattr_name() -> impl Strategy<Value = Vec<u8>> {
        let piece = prop_oneof![
            Just(b"trusted.".to_vec()),
            Just(b"user.".to_vec()),
            Just(b"security.".to_vec()),
            Just(b"overlay.".to_vec()),
            Just(b"overlay".to_vec()),
            Just(b".".to_vec()),
            Just(b"opaque".to_vec()),
            Just(b"redirect".to_vec()),
            prop::collection::vec(1u8..=255, 0..6),
        ];
        prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
    }

    #[test]
    fn kernel_model_has_teeth() {
        let root = Caller { uid: 0 };
        let p = "trusted.overlay.";
        assert_eq!(
            kernel_listed(b"trusted.overlay.opaque", p, root),
            Some(None)
        );
        assert_eq!(
            kernel_listed(b"trusted.overlay.overlay.x", p, root),
            Some(Some(b"trusted.overlay.x".to_vec()))
        );
        assert_eq!(kernel_listed(b"trusted.overlay.overlayx", p, root), None);
        // A reader that forgot to unescape disagrees with the model.
        assert_ne!(
            kernel_listed(b"trusted.overlay.overlay.x", p, root),
            Some(Some(b"trusted.overlay.overlay.x".to_vec()))
        );
    }

    #[test]
    fn names_the_kernel_overlay_refuses_get_its_errno() {
        let p = "trusted.overlay.";
        // "trusted.overlay." (16) + "overlay." (8) + 231 = 255 bytes: still storable.
        let fits = format!("{p}{}", "a".repeat(231));
        assert_eq!(
            stored_cname(OsStr::new(&fits), p).unwrap().as_bytes().len(),
            255
        );
        let long = format!("{p}{}", "a".repeat(232));
        let err = stored_cname(OsStr::new(&long), p).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
        let err = stored_cname(OsStr::new(p), p).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EINVAL));
        let plain = format!("user.{}", "b".repeat(251));
        let err = stored_cname(OsStr::new(&plain), p).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ERANGE));
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: if std::env::var_os("OVLFUSE_FULL").is_some() { 50_000 } else { 2_000 },
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Every name a user can give is stored under a name that reads back as itself, and
        /// never under one of the union's own private names.
        #[test]
        fn user_names_round_trip_through_storage(name in xattr_name(), pi in 0usize..2) {
            let p = PREFIXES[pi];
            let stored = stored_name(&name, p);
            prop_assert_eq!(user_name(&stored, p), Some(name.clone()));
            prop_assert!(is_user_data(&stored, p));
            let escaped_prefix = [p.as_bytes(), b"overlay."].concat();
            prop_assert!(!stored.starts_with(p.as_bytes()) || stored.starts_with(&escaped_prefix));
        }

        /// Whatever names a layer holds, the listing shows what the kernel overlay shows.
        #[test]
        fn listed_names_match_the_kernel_overlay(
            stored in xattr_name(),
            pi in 0usize..2,
            uid in prop::sample::select(vec![0u32, 1000]),
        ) {
            let p = PREFIXES[pi];
            let caller = Caller { uid };
            if let Some(kernel) = kernel_listed(&stored, p, caller) {
                prop_assert_eq!(listed(&stored, p, caller), kernel);
            } else {
                prop_assert_eq!(listed(&stored, p, caller), None);
            }
        }

        /// Names and their stored forms never panic the checks, and a stored name that
        /// cannot be stored is refused with the errno the kernel overlay gives.
        #[test]
        fn stored_names_are_storable_or_refused(name in prop::collection::vec(1u8..=255, 0..300), pi in 0usize..2) {
            let p = PREFIXES[pi];
            match stored_cname(OsStr::from_bytes(&name), p) {
                Ok(c) => prop_assert!(c.as_bytes().len() <= XATTR_NAME_MAX),
                Err(e) if name == p.as_bytes() => prop_assert_eq!(e.raw_os_error(), Some(libc::EINVAL)),
                Err(e) => {
                    let stored = stored_name(&name, p);
                    prop_assert!(stored.len() > XATTR_NAME_MAX);
                    let expected = if stored.len() > name.len() { libc::EOPNOTSUPP } else { libc::ERANGE };
                    prop_assert_eq!(e.raw_os_error(), Some(expected));
                }
            }
            let names = vec![OsString::from_vec(name.clone())];
            let encoded = encode_names(&names);
            prop_assert_eq!(encoded.len(), name.len() + 1);
        }
    }
}
