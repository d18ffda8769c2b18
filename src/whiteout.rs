//! Whiteouts, opaque directories and the other overlay markers, as found in layers.
//!
//! Owns: recognising the kernel overlay format (a character device 0/0 whiteout; the kernel
//! 6.7+ xattr whiteout, an empty regular file carrying `<prefix>whiteout`; a directory made
//! opaque by the `<prefix>opaque` xattr set to "y", or marked "x" as holding xattr
//! whiteouts) and the AUFS format that container tools produce (`.wh.NAME` files,
//! `.wh..wh..opq` in an opaque directory, and the AUFS private `.wh..wh.*` entries), and
//! reading the values of a directory's `<prefix>redirect` and of a file's `<prefix>metacopy`
//! the way the kernel validates them. Must never: show any of these markers to a user, or
//! turn a malformed marker into a path to follow.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
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

/// Whether a `<prefix>opaque` value makes its directory opaque: exactly "y", as the kernel
/// reads it (one byte; anything longer, empty, or another letter — "x" marks a directory
/// holding xattr whiteouts — is not opaque).
pub fn is_opaque_value(value: &[u8]) -> bool {
    value == b"y"
}

/// Whether a `<prefix>opaque` value marks a directory as holding xattr whiteouts: exactly
/// "x", read the way "y" is (one byte). Such a directory is not opaque.
pub fn marks_xwhiteouts(value: &[u8]) -> bool {
    value == b"x"
}

/// Whether `dir` (a handle on a directory in some layer) is marked as holding xattr
/// whiteouts; `opaque_xattr` is the mount's `<prefix>opaque`.
pub fn holds_xwhiteouts(dir: BorrowedFd<'_>, opaque_xattr: &CStr) -> io::Result<bool> {
    Ok(sys::get_xattr(dir, opaque_xattr)?.is_some_and(|v| marks_xwhiteouts(&v)))
}

/// Whether `file` (with `st` its stat) is a kernel 6.7+ xattr whiteout: an empty regular file
/// carrying `whiteout_xattr` (the mount's `<prefix>whiteout`) with any value, even an empty
/// one. Only empty regular files cost an xattr read.
pub fn is_xattr_whiteout(
    file: sys::XattrSource<'_>,
    st: &libc::stat,
    whiteout_xattr: &CStr,
) -> io::Result<bool> {
    if !is_empty_regular(st) {
        return Ok(false);
    }
    has_xattr(file, whiteout_xattr)
}

/// [`is_xattr_whiteout`] for the entry `name` of the layer directory `dir`. An entry gone
/// meanwhile is not a whiteout.
pub fn is_xattr_whiteout_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    whiteout_xattr: &CStr,
) -> io::Result<bool> {
    if !sys::stat_at(dir, name)?.is_some_and(|st| is_empty_regular(&st)) {
        return Ok(false);
    }
    match sys::open_path_at(dir, name) {
        Ok(file) => has_xattr(sys::XattrSource::Handle(file.as_fd()), whiteout_xattr),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

fn is_empty_regular(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0
}

/// Whether `obj` carries the attribute `name`. A `user.*` attribute this process may not
/// read (EACCES) counts as absent, as it does for the kernel.
fn has_xattr(obj: sys::XattrSource<'_>, name: &CStr) -> io::Result<bool> {
    match obj.get(name) {
        Ok(value) => Ok(value.is_some()),
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The header of the kernel's `struct ovl_metacopy` (version, length, flags and digest
/// algorithm, one byte each): the shortest non-empty `<prefix>metacopy` value.
pub const METACOPY_HEADER_LEN: usize = 4;

/// Whether a `<prefix>metacopy` value is one the kernel's lookup accepts as marking a
/// metadata-only copy (`ovl_check_metacopy_xattr`, asked for the size only): empty (the form
/// written without a digest), or at least the header long whatever its bytes (version, length
/// and digest are checked only when the data is opened, which metacopy=off never gets to).
/// One to three bytes are malformed: the kernel's lookup answers EIO.
pub fn is_valid_metacopy(value: &[u8]) -> bool {
    value.is_empty() || value.len() >= METACOPY_HEADER_LEN
}

/// Whether `dir` (a handle on a directory in some layer) hides the layers below it;
/// `opaque_xattr` is the mount's `<prefix>opaque`.
pub fn is_opaque(dir: sys::XattrSource<'_>, opaque_xattr: &CStr) -> io::Result<bool> {
    if dir.get(opaque_xattr)?.is_some_and(|v| is_opaque_value(&v)) {
        return Ok(true);
    }
    Ok(sys::stat_at(dir.handle(), AUFS_OPAQUE)?.is_some())
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

/// Where a directory's `<prefix>redirect` says its lower parts are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// A bare name: the directory was renamed within its parent.
    InParent(CString),
    /// A path from the layer roots, one component each (never empty).
    FromRoot(Vec<CString>),
}

/// Why a redirect value cannot be followed; the lookup answers EIO and logs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MalformedRedirect(pub &'static str);

impl std::fmt::Display for MalformedRedirect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// Reads a `<prefix>redirect` value with the kernel's rules (`ovl_get_redirect_xattr`): the
/// value is a C string (it ends at the first NUL); it must not be empty; an absolute path
/// (leading `/`) must have no empty component (no `//`, no trailing `/`, not `/` alone); a
/// relative one is a single name. The kernel lets `.` and `..` through and then fails the
/// lookup with EACCES; they are refused here, so no redirect ever leaves a layer root.
/// A component longer than NAME_MAX is not refused: like the kernel, the lookup finds
/// nothing there (ENAMETOOLONG means "not in this layer").
pub fn parse_redirect(value: &[u8]) -> Result<Redirect, MalformedRedirect> {
    let value = value.split(|b| *b == 0).next().unwrap_or_default();
    let component = |c: &[u8]| -> Result<CString, MalformedRedirect> {
        match c {
            b"" => Err(MalformedRedirect("empty path component")),
            b"." | b".." => Err(MalformedRedirect("'.' or '..' component")),
            // No NUL is left after the split above.
            c => CString::new(c).map_err(|_| MalformedRedirect("NUL in a component")),
        }
    };
    match value {
        b"" => Err(MalformedRedirect("empty value")),
        [b'/', path @ ..] => Ok(Redirect::FromRoot(
            path.split(|b| *b == b'/')
                .map(component)
                .collect::<Result<_, _>>()?,
        )),
        name if name.contains(&b'/') => Err(MalformedRedirect("relative path with '/'")),
        name => Ok(Redirect::InParent(component(name)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    /// A transcription of the kernel's checks (`ovl_get_redirect_xattr`, then the lookup of
    /// each component, which refuses `.` and `..`): `true` when the kernel follows `value`.
    fn kernel_follows(value: &[u8]) -> bool {
        let buf: Vec<u8> = value.iter().copied().take_while(|b| *b != 0).collect();
        if buf.is_empty() {
            return false;
        }
        let valid = if buf[0] == b'/' {
            // for (s = buf; *s++ == '/'; s = next) { next = strchrnul(s, '/'); if (s == next) invalid; }
            let mut s = 0;
            loop {
                let at = buf.get(s).copied();
                s += 1;
                if at != Some(b'/') {
                    break true;
                }
                let next = buf[s..]
                    .iter()
                    .position(|b| *b == b'/')
                    .map_or(buf.len(), |i| s + i);
                if s == next {
                    break false;
                }
                s = next;
            }
        } else {
            !buf.contains(&b'/')
        };
        valid && buf.split(|b| *b == b'/').all(|c| c != b"." && c != b"..")
    }

    fn redirect_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            4 => prop::sample::select(b"/./a".to_vec()),
            1 => Just(0u8),
            1 => any::<u8>(),
        ]
    }

    fn component() -> impl Strategy<Value = Vec<u8>> {
        // Any byte but NUL and '/'.
        prop::collection::vec(prop_oneof![1u8..=46, 48u8..=255], 1..300)
            .prop_filter("a real name", |c| c != b"." && c != b"..")
    }

    #[test]
    fn the_kernel_model_has_teeth() {
        assert!(kernel_follows(b"/a/b"));
        assert!(kernel_follows(b"a"));
        assert!(kernel_follows(b"a\0/x"));
        for bad in [
            &b""[..],
            b"/",
            b"//a",
            b"/a/",
            b"a/b",
            b"..",
            b"/a/../b",
            b"\0a",
        ] {
            assert!(!kernel_follows(bad), "{bad:?}");
        }
    }

    #[test]
    fn malformed_redirects_are_named() {
        assert_eq!(
            parse_redirect(b"/a//b"),
            Err(MalformedRedirect("empty path component"))
        );
        assert_eq!(parse_redirect(b""), Err(MalformedRedirect("empty value")));
        assert_eq!(
            parse_redirect(b"x/y").unwrap_err().to_string(),
            "relative path with '/'"
        );
        assert_eq!(
            parse_redirect(b"/a/b\0junk"),
            Ok(Redirect::FromRoot(vec![c"a".into(), c"b".into()]))
        );
    }

    /// What the kernel 6.18 overlay (metacopy=off) answered for files carrying these values:
    /// EPERM ("refusing to follow metacopy origin") for a well-formed one, EIO ("has too small
    /// xattr") for the others.
    #[test]
    fn metacopy_values_are_read_like_the_kernel() {
        let garbage_header = [1u8, 2, 3, 4];
        let long = [0u8; 100];
        for valid in [&b""[..], b"garbage", &garbage_header, &long] {
            assert!(is_valid_metacopy(valid), "{valid:?}");
        }
        for malformed in [&b"ab"[..], &[0u8; 3], &[0u8]] {
            assert!(!is_valid_metacopy(malformed), "{malformed:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: if std::env::var_os("OVLFUSE_FULL").is_some() { 50_000 } else { 2_000 },
            failure_persistence: None,
            ..ProptestConfig::default()
        })]

        /// Any value: the parser follows exactly what the kernel follows, and what it
        /// returns is only ever single, real names.
        #[test]
        fn redirects_are_followed_exactly_when_the_kernel_follows_them(
            value in prop_oneof![
                prop::collection::vec(redirect_byte(), 0..12),
                prop::collection::vec(any::<u8>(), 0..70_000),
            ]
        ) {
            let parsed = parse_redirect(&value);
            prop_assert_eq!(parsed.is_ok(), kernel_follows(&value), "{:?}", parsed);
            let names = match parsed {
                Ok(Redirect::InParent(n)) => vec![n],
                Ok(Redirect::FromRoot(p)) => {
                    prop_assert!(!p.is_empty());
                    p
                }
                Err(_) => Vec::new(),
            };
            for n in names {
                let b = n.as_bytes();
                prop_assert!(!b.is_empty() && !b.contains(&b'/') && b != b"." && b != b"..");
            }
        }

        /// A path written the way the kernel writes redirects reads back as itself.
        #[test]
        fn written_redirects_read_back(path in prop::collection::vec(component(), 1..5)) {
            let absolute = [&b"/"[..], &path.join(&b"/"[..])].concat();
            let expected: Vec<CString> = path.iter().map(|c| CString::new(c.clone()).unwrap()).collect();
            prop_assert_eq!(parse_redirect(&absolute), Ok(Redirect::FromRoot(expected.clone())));
            prop_assert_eq!(parse_redirect(&path[0]), Ok(Redirect::InParent(expected[0].clone())));
        }

        /// Only the exact value "y" makes a directory opaque, as the kernel reads it (a
        /// one-byte read that must return 'y').
        #[test]
        fn only_y_is_opaque(value in prop_oneof![
            prop::collection::vec(prop::sample::select(b"yYx\0n".to_vec()), 0..3),
            prop::collection::vec(any::<u8>(), 0..4),
        ]) {
            prop_assert_eq!(is_opaque_value(&value), value.len() == 1 && value[0] == b'y');
        }

        /// Only the exact value "x" marks a directory as holding xattr whiteouts, and no value
        /// both marks it and makes it opaque.
        #[test]
        fn only_x_marks_xwhiteouts(value in prop_oneof![
            prop::collection::vec(prop::sample::select(b"xXy\0".to_vec()), 0..3),
            prop::collection::vec(any::<u8>(), 0..4),
        ]) {
            prop_assert_eq!(marks_xwhiteouts(&value), value.len() == 1 && value[0] == b'x');
            prop_assert!(!(marks_xwhiteouts(&value) && is_opaque_value(&value)));
        }

        /// Every name is exactly one of: visible, `.wh.` + the (non-empty) name it hides,
        /// or an AUFS private entry; and a name never hides itself.
        #[test]
        fn names_classify_consistently(name in prop_oneof![
            prop::collection::vec(prop::sample::select(b".wh".to_vec()), 0..12),
            prop::collection::vec(1u8..=255, 0..256),
        ]) {
            let os = OsStr::from_bytes(&name);
            match classify(os) {
                NameKind::Visible => prop_assert!(!name.starts_with(AUFS_PREFIX)),
                NameKind::AufsWhiteout(target) => {
                    prop_assert_eq!([AUFS_PREFIX, target].concat(), name.clone());
                    prop_assert!(!target.is_empty() && !target.starts_with(AUFS_PREFIX));
                    prop_assert_ne!(target, &name[..]);
                }
                NameKind::AufsPrivate => {
                    prop_assert!(name.starts_with(AUFS_PREFIX));
                    let rest = &name[AUFS_PREFIX.len()..];
                    prop_assert!(rest.is_empty() || rest.starts_with(AUFS_PREFIX));
                }
            }
        }
    }
}
