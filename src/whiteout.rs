//! Whiteouts and opaque directories, as found in layers.
//!
//! Owns: recognising the kernel overlay format (a character device 0/0 whiteout; a directory
//! made opaque by the `<prefix>opaque` xattr set to "y") and the AUFS format that container
//! tools produce (`.wh.NAME` files, `.wh..wh..opq` in an opaque directory, and the AUFS
//! private `.wh..wh.*` entries). Must never: show any of these markers to a user.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use crate::sys;

/// Prefix of an AUFS whiteout file: `.wh.NAME` hides NAME in the layers below.
pub const AUFS_PREFIX: &[u8] = b".wh.";
/// AUFS marker file that makes its directory opaque.
pub const AUFS_OPAQUE: &CStr = c".wh..wh..opq";

/// How a name found in a layer directory must be treated.
#[derive(Debug, PartialEq, Eq)]
pub enum NameKind<'a> {
    /// An ordinary entry, visible unless shadowed.
    Visible,
    /// `.wh.NAME`: hides NAME in lower layers; never shown itself.
    AufsWhiteout(&'a [u8]),
    /// `.wh..wh..opq` or another AUFS private `.wh..wh.*` entry: never shown.
    AufsPrivate,
}

pub fn classify(name: &OsStr) -> NameKind<'_> {
    let bytes = name.as_bytes();
    match bytes.strip_prefix(AUFS_PREFIX) {
        None => NameKind::Visible,
        Some(rest) if rest.starts_with(AUFS_PREFIX) || rest.is_empty() => NameKind::AufsPrivate,
        Some(rest) => NameKind::AufsWhiteout(rest),
    }
}

/// A kernel-format whiteout: a character device with device number 0/0.
pub fn is_whiteout(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFCHR && st.st_rdev == 0
}

/// Whether `dir` (a handle on a directory in some layer) hides the layers below it;
/// `opaque_xattr` is the mount's `<prefix>opaque`.
pub fn is_opaque(dir: BorrowedFd<'_>, opaque_xattr: &CStr) -> io::Result<bool> {
    if sys::get_xattr(dir, opaque_xattr)?.is_some_and(|v| v == b"y") {
        return Ok(true);
    }
    Ok(sys::stat_at(dir, AUFS_OPAQUE)?.is_some())
}

/// Whether `dir` holds an AUFS whiteout `.wh.NAME` for `name`.
pub fn has_aufs_whiteout(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<bool> {
    let mut marker = AUFS_PREFIX.to_vec();
    marker.extend_from_slice(name.as_bytes());
    // A name at NAME_MAX cannot have a `.wh.` twin; ENAMETOOLONG means "no whiteout".
    if marker.len() > 255 {
        return Ok(false);
    }
    let marker = CString::new(marker).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    Ok(sys::stat_at(dir, &marker)?.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aufs_names_are_classified() {
        assert_eq!(classify(OsStr::new("file")), NameKind::Visible);
        assert_eq!(
            classify(OsStr::new(".wh.file")),
            NameKind::AufsWhiteout(b"file")
        );
        assert_eq!(classify(OsStr::new(".wh..wh..opq")), NameKind::AufsPrivate);
        assert_eq!(classify(OsStr::new(".wh..wh.plnk")), NameKind::AufsPrivate);
        assert_eq!(classify(OsStr::new(".wh.")), NameKind::AufsPrivate);
        assert_eq!(classify(OsStr::new(".whx")), NameKind::Visible);
    }
}
