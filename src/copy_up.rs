//! Copy-up: makes a copy of one layer object in the upper layer, atomically.
//!
//! Owns: building the copy under a temporary name in `workdir/work` (same filesystem as the
//! upper layer), giving it all its data and metadata, flushing it, and renaming it into place
//! with `RENAME_NOREPLACE`, so a crash or kill at any moment never leaves a partial object
//! under the real name; and removing the leftovers of interrupted copy-ups at mount.
//! Must never: follow a symlink (every access is a held handle plus one name component), leave
//! a temporary object behind when it fails, or copy the overlay's private attributes.
//!
//! Order of the metadata steps matters, and differs from the naive one on purpose: the data is
//! written first (a write strips setuid bits and file capabilities), then the owner is set
//! (`chown` of a non-directory strips setuid/setgid bits and `security.capability`), then the
//! extended attributes, then the mode, and the times last (everything before changes them).

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

/// Every temporary name this module creates in the work directory starts with this.
const TEMP_PREFIX: &str = "#ovlfuse-cu-";

/// Chunk size of one `copy_file_range` call, and buffer size of the read/write fallback.
const CHUNK: usize = 1 << 20;

static NEXT_TEMP: AtomicU64 = AtomicU64::new(0);

/// How to copy one object up.
#[derive(Debug, Clone, Copy)]
pub struct CopyUpOptions<'a> {
    /// `"trusted.overlay."` or `"user.overlay."`: attributes with this prefix are the
    /// overlay's own bookkeeping and are never copied.
    pub private_xattr_prefix: &'a str,
    /// `false` e.g. for `open(O_TRUNC)`: a regular file is created empty.
    pub with_data: bool,
    /// fsync the new object before the rename (so no crash can show a partial copy under
    /// the name); `false` in volatile (`fsync=0`) mode.
    pub durable: bool,
}

/// Copies the object behind `src` (an `O_PATH` handle in any layer; a symlink handle is the
/// link itself) into `upper_parent` (an `O_PATH` handle of an existing upper directory) under
/// `name`, staging it in `work` (an `O_PATH` handle of `workdir/work`).
///
/// Regular files get their data (unless `opts.with_data` is false), directories are created
/// empty (the union keeps showing the lower contents), symlinks get the same target, and
/// fifos, sockets and devices the same type and device number. Every object gets the source's
/// owner, mode (setuid/setgid/sticky included), extended attributes (except the private
/// overlay ones) and access/modification times.
///
/// Returns an `O_PATH | O_NOFOLLOW` handle of the new upper object. Fails with `EEXIST` if
/// `name` already exists in `upper_parent`. On any failure before the rename, the temporary
/// object is removed.
pub fn copy_up(
    src: BorrowedFd<'_>,
    work: BorrowedFd<'_>,
    upper_parent: BorrowedFd<'_>,
    name: &CStr,
    opts: &CopyUpOptions<'_>,
) -> io::Result<OwnedFd> {
    let name = sys::component(OsStr::from_bytes(name.to_bytes()))?;
    // Cheap early answer (a big file is not copied only to fail at the rename); the rename
    // with RENAME_NOREPLACE below is what makes it race-free.
    if sys::stat_at(upper_parent, &name)?.is_some() {
        return Err(io::Error::from_raw_os_error(libc::EEXIST));
    }
    let st = sys::stat_fd(src)?;
    let temp = temp_name();
    let kind = st.st_mode & libc::S_IFMT;

    // Create the temporary object; from here on the guard removes it on every early return.
    let mut data_fd = None;
    match kind {
        libc::S_IFREG => data_fd = Some(sys::create_file_at(work, &temp, 0o600)?),
        libc::S_IFDIR => sys::mkdir_at(work, &temp, 0o700)?,
        libc::S_IFLNK => {
            let target = sys::readlink_fd(src)?;
            let target =
                CString::new(target).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
            sys::symlink_at(&target, work, &temp)?;
        }
        libc::S_IFIFO | libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK => {
            sys::mknod_at(work, &temp, kind | 0o600, st.st_rdev)?
        }
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    }
    let mut guard = TempGuard {
        work,
        name: &temp,
        is_dir: kind == libc::S_IFDIR,
        armed: true,
    };

    let handle = sys::open_path_at(work, &temp)?;
    // The handle must be the object we just made, not something else under that name.
    let made = sys::stat_fd(handle.as_fd())?;
    if made.st_mode & libc::S_IFMT != kind {
        return Err(io::Error::from_raw_os_error(libc::EIO));
    }

    // A regular file is read, and its copy written, through descriptors opened for I/O; its
    // metadata then takes one system call each, where a name or handle needs a path walk.
    let input = match &data_fd {
        Some(_) if opts.with_data => Some(sys::reopen(src, libc::O_RDONLY)?),
        _ => None,
    };
    if let (Some(dst), Some(input)) = (&data_fd, &input) {
        copy_data(input.as_fd(), dst.as_fd(), st.st_size as u64, made.st_dev)?;
    }

    // This process made the copy: it may have the owner already (a rootful daemon's files
    // and root's lower files), and then there is nothing to change.
    if (made.st_uid, made.st_gid) != (st.st_uid, st.st_gid) {
        match &data_fd {
            Some(fd) => sys::chown_open_fd(fd.as_fd(), st.st_uid, st.st_gid)?,
            None => sys::chown_at(work, &temp, st.st_uid, st.st_gid)?,
        }
    }
    let from = match &input {
        Some(fd) => sys::XattrSource::Open(fd.as_fd()),
        None => sys::XattrSource::Handle(src),
    };
    let set = |name: &CStr, value: &[u8]| match &data_fd {
        Some(fd) => sys::set_xattr_open_fd(fd.as_fd(), name, value, 0),
        None => sys::set_xattr(handle.as_fd(), name, value, 0),
    };
    copy_xattrs(from, set, kind, opts.private_xattr_prefix)?;
    match &data_fd {
        Some(fd) => {
            sys::chmod_open_fd(fd.as_fd(), st.st_mode & 0o7777)?;
            sys::set_times_open_fd(fd.as_fd(), &st)?;
        }
        None => {
            // `handle` is the object just made (its kind checked above), so no name is
            // looked up again.
            if kind != libc::S_IFLNK {
                sys::chmod_handle(handle.as_fd(), st.st_mode & 0o7777)?;
            }
            sys::set_times_at(work, &temp, &st)?;
        }
    }

    if opts.durable {
        match (&data_fd, kind) {
            (Some(fd), _) => sys::sync_fd(fd.as_fd(), false)?,
            (None, libc::S_IFDIR) => sys::sync_fd(
                sys::open_at(work, &temp, libc::O_RDONLY | libc::O_DIRECTORY)?.as_fd(),
                false,
            )?,
            // Symlinks and special files cannot be opened for fsync; their inode reaches the
            // disk with the directory that holds them.
            _ => sys::sync_fd(
                sys::reopen(work, libc::O_RDONLY | libc::O_DIRECTORY)?.as_fd(),
                false,
            )?,
        }
    }
    drop(data_fd);

    // The rename itself is not flushed (the kernel overlay does not either): a crash before
    // the next flush of `upper_parent` loses the copy, never half of it, and the lower
    // object shows again. An fsync of the object flushes the directory (the caller marks
    // the name as not yet durable).
    sys::rename_at(work, &temp, upper_parent, &name, libc::RENAME_NOREPLACE)?;
    guard.armed = false;
    Ok(handle)
}

/// Removes the leftovers of interrupted copy-ups (every entry of `work` whose name starts
/// with this module's temporary prefix, whichever process made it) and returns how many
/// entries were removed. Must be called while no copy-up is running on this work directory,
/// i.e. at mount.
pub fn clean_work_dir(work: BorrowedFd<'_>) -> io::Result<usize> {
    let mut removed = 0;
    for entry in sys::read_dir(work)? {
        if !entry.name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
            continue;
        }
        let name = sys::component(&entry.name)?;
        match sys::remove_tree(work, &name) {
            Ok(()) => removed += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A fresh temporary name, unique within the process and (through the pid) across the
/// processes that may have used this work directory. Other code that stages objects in the
/// work directory uses it too, so [`clean_work_dir`] also removes their leftovers.
pub fn temp_name() -> CString {
    let n = NEXT_TEMP.fetch_add(1, Ordering::Relaxed);
    // Prefix and digits only: CString::new cannot fail.
    CString::new(format!("{TEMP_PREFIX}{}-{n}", std::process::id())).unwrap_or_default()
}

/// Removes the temporary object when dropped while armed.
struct TempGuard<'a> {
    work: BorrowedFd<'a>,
    name: &'a CStr,
    is_dir: bool,
    armed: bool,
}

impl Drop for TempGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let flags = if self.is_dir { libc::AT_REMOVEDIR } else { 0 };
        if let Err(e) = sys::unlink_at(self.work, self.name, flags) {
            log::warn!(
                "copy-up: cannot remove temporary {:?} from the work directory: {e}",
                self.name
            );
        }
    }
}

/// Copies the extended attributes of `src` onto the new object, which `set(name, value)`
/// gives one.
fn copy_xattrs(
    src: sys::XattrSource<'_>,
    set: impl Fn(&CStr, &[u8]) -> io::Result<()>,
    kind: libc::mode_t,
    private_prefix: &str,
) -> io::Result<()> {
    for xname in src.list()? {
        let bytes = xname.as_bytes();
        if !crate::xattr::is_user_data(bytes, private_prefix) {
            continue;
        }
        let cname = CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // Gone since the listing: nothing to copy.
        let Some(value) = src.get(&cname)? else {
            continue;
        };
        if let Err(e) = set(&cname, &value) {
            let must = must_copy_xattr(bytes);
            match e.raw_os_error() {
                // The upper filesystem does not know this attribute: like the kernel overlay,
                // drop it unless it carries security or access-control meaning.
                Some(libc::EOPNOTSUPP) if !must => {
                    log::debug!("copy-up: upper layer does not support xattr {xname:?}: dropped")
                }
                // Linux allows user.* only on regular files and directories.
                Some(libc::EPERM)
                    if bytes.starts_with(b"user.")
                        && kind != libc::S_IFREG
                        && kind != libc::S_IFDIR => {}
                _ => return Err(e),
            }
        }
    }
    Ok(())
}

/// Attributes whose loss would change security or access decisions: a copy-up that cannot
/// keep them must fail rather than silently widen or narrow access.
fn must_copy_xattr(name: &[u8]) -> bool {
    name.starts_with(b"security.")
        || name == b"system.posix_acl_access"
        || name == b"system.posix_acl_default"
}

/// The filesystem (`st_dev`) that last refused a reflink outright (EOPNOTSUPP, as ext4
/// always does): copy-ups onto it go straight to copying.
static CANNOT_CLONE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Copies the data of `input` into the empty file `output` (on filesystem `output_dev`): a
/// reflink when the filesystem can, else only the data regions (holes stay holes), then the
/// size.
fn copy_data(
    input: BorrowedFd<'_>,
    output: BorrowedFd<'_>,
    size: u64,
    output_dev: u64,
) -> io::Result<()> {
    if size == 0 {
        return Ok(());
    }
    if CANNOT_CLONE.load(Ordering::Relaxed) != output_dev {
        // SAFETY: both fds are valid; FICLONE takes the source fd as its argument.
        let cloned =
            unsafe { libc::ioctl(output.as_raw_fd(), libc::FICLONE, input.as_raw_fd()) } == 0;
        if cloned {
            return Ok(());
        }
        if io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
            CANNOT_CLONE.store(output_dev, Ordering::Relaxed);
        }
    }
    let mut use_cfr = true;
    let mut offset = 0u64;
    while offset < size {
        let data = match sys::lseek(input, offset, libc::SEEK_DATA) {
            Ok(d) => d,
            // No data after offset: the rest is a hole.
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // No hole support at all: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => offset,
            Err(e) => return Err(e),
        };
        if data >= size {
            break;
        }
        let hole = match sys::lseek(input, data, libc::SEEK_HOLE) {
            Ok(h) => h.min(size),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENXIO) | Some(libc::EINVAL)) => size,
            Err(e) => return Err(e),
        };
        if hole <= data {
            // Cannot happen with a sane filesystem; do not loop forever if it does.
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        let copied = copy_range(input, output, data, hole - data, &mut use_cfr)?;
        if copied < hole - data {
            // The source got shorter while we copied: keep what is there.
            break;
        }
        offset = hole;
    }
    // Copying up to the end made the size already; a trailing hole (or a source that got
    // shorter meanwhile) leaves it to set.
    if offset < size {
        sys::ftruncate(output, size)?;
    }
    Ok(())
}

/// Copies `len` bytes at `offset` (same offset on both sides). Returns the bytes copied,
/// fewer only at the source's end of file.
fn copy_range(
    input: BorrowedFd<'_>,
    output: BorrowedFd<'_>,
    offset: u64,
    len: u64,
    use_cfr: &mut bool,
) -> io::Result<u64> {
    let mut done = 0u64;
    let mut buf = Vec::new();
    while done < len {
        let want = (len - done).min(CHUNK as u64) as usize;
        let pos = offset + done;
        if *use_cfr {
            match sys::copy_file_range(input, output, pos, want) {
                Ok(0) => return Ok(done),
                Ok(n) => {
                    done += n as u64;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EXDEV)
                            | Some(libc::EINVAL)
                            | Some(libc::ENOSYS)
                            | Some(libc::EOPNOTSUPP)
                    ) =>
                {
                    *use_cfr = false;
                }
                Err(e) => return Err(e),
            }
        }
        if buf.is_empty() {
            buf = vec![0u8; CHUNK];
        }
        let got = sys::pread(input, &mut buf[..want], pos)?;
        if got == 0 {
            return Ok(done);
        }
        sys::pwrite_all(output, &buf[..got], pos)?;
        done += got as u64;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::{FileExt, PermissionsExt};
    use std::path::{Path, PathBuf};

    const TRUSTED: &str = "trusted.overlay.";

    /// lower/, upper/ and workdir/work/ in a fresh directory, with their handles.
    struct Env {
        _tmp: tempfile::TempDir,
        lower_path: PathBuf,
        upper_path: PathBuf,
        work_path: PathBuf,
        lower: OwnedFd,
        upper: OwnedFd,
        work: OwnedFd,
    }

    fn env_in(base: &Path) -> Env {
        let tmp = tempfile::Builder::new()
            .prefix("copyup-")
            .tempdir_in(base)
            .unwrap();
        let lower_path = tmp.path().join("lower");
        let upper_path = tmp.path().join("upper");
        let work_path = tmp.path().join("workdir/work");
        for p in [&lower_path, &upper_path, &work_path] {
            std::fs::create_dir_all(p).unwrap();
        }
        Env {
            lower: sys::open_dir_path(&lower_path).unwrap(),
            upper: sys::open_dir_path(&upper_path).unwrap(),
            work: sys::open_dir_path(&work_path).unwrap(),
            lower_path,
            upper_path,
            work_path,
            _tmp: tmp,
        }
    }

    fn env() -> Env {
        env_in(Path::new("/tmp"))
    }

    fn opts(prefix: &str) -> CopyUpOptions<'_> {
        CopyUpOptions {
            private_xattr_prefix: prefix,
            with_data: true,
            durable: true,
        }
    }

    fn cpath(p: &Path) -> CString {
        CString::new(p.as_os_str().as_bytes()).unwrap()
    }

    fn cname(s: &str) -> CString {
        CString::new(s).unwrap()
    }

    fn lstat(p: &Path) -> libc::stat {
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        let c = cpath(p);
        assert_eq!(unsafe { libc::lstat(c.as_ptr(), &mut st) }, 0, "{p:?}");
        st
    }

    fn lset(p: &Path, name: &str, value: &[u8]) {
        let (c, n) = (cpath(p), cname(name));
        let ret = unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(
            ret,
            0,
            "lsetxattr {p:?} {name}: {}",
            io::Error::last_os_error()
        );
    }

    fn lget(p: &Path, name: &str) -> Option<Vec<u8>> {
        let h = sys::open_dir_path(p)
            .or_else(|_| {
                let parent = sys::open_dir_path(p.parent().unwrap())?;
                sys::open_path_at(parent.as_fd(), &cpath(Path::new(p.file_name().unwrap())))
            })
            .unwrap();
        sys::get_xattr(h.as_fd(), &cname(name)).unwrap()
    }

    fn lchown(p: &Path, uid: u32, gid: u32) {
        let c = cpath(p);
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), uid, gid) }, 0);
    }

    fn chmod(p: &Path, mode: u32) {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    const ATIME: (i64, i64) = (1_000_000_000, 123_456_789);
    const MTIME: (i64, i64) = (1_100_000_000, 987_654_321);

    fn set_times(p: &Path) {
        let c = cpath(p);
        let t = [
            libc::timespec {
                tv_sec: ATIME.0,
                tv_nsec: ATIME.1,
            },
            libc::timespec {
                tv_sec: MTIME.0,
                tv_nsec: MTIME.1,
            },
        ];
        let ret = unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                t.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        assert_eq!(ret, 0);
    }

    fn assert_times(st: &libc::stat) {
        assert_eq!((st.st_atime, st.st_atime_nsec), ATIME);
        assert_eq!((st.st_mtime, st.st_mtime_nsec), MTIME);
    }

    fn work_entries(e: &Env) -> Vec<OsString> {
        std::fs::read_dir(&e.work_path)
            .unwrap()
            .map(|d| d.unwrap().file_name())
            .collect()
    }

    /// Copies lower/`name` to upper/`name`.
    fn copy(e: &Env, name: &str, o: &CopyUpOptions<'_>) -> io::Result<OwnedFd> {
        let n = cname(name);
        let src = sys::open_path_at(e.lower.as_fd(), &n).unwrap();
        copy_up(src.as_fd(), e.work.as_fd(), e.upper.as_fd(), &n, o)
    }

    fn mknod(p: &Path, mode: u32, dev: libc::dev_t) {
        let c = cpath(p);
        let ret = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
        assert_eq!(ret, 0, "mknod {p:?}: {}", io::Error::last_os_error());
    }

    fn errno(r: io::Result<OwnedFd>) -> i32 {
        r.err().and_then(|e| e.raw_os_error()).unwrap_or(0)
    }

    #[test]
    fn regular_file_copy_keeps_bytes_mode_owner_times_and_xattrs() {
        let e = env();
        let src = e.lower_path.join("f");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        lchown(&src, 1000, 1001);
        chmod(&src, 0o640);
        lset(&src, "user.color", b"blue");
        lset(&src, "trusted.note", b"\x00binary\xff");
        set_times(&src);

        let handle = copy(&e, "f", &opts(TRUSTED)).unwrap();
        let dst = e.upper_path.join("f");
        // Stat before reading: reading the copy updates its atime.
        let st = lstat(&dst);
        assert_eq!(std::fs::read(&dst).unwrap(), data);
        assert_eq!(st.st_mode, libc::S_IFREG | 0o640);
        assert_eq!((st.st_uid, st.st_gid), (1000, 1001));
        assert_times(&st);
        assert_eq!(lget(&dst, "user.color").as_deref(), Some(&b"blue"[..]));
        assert_eq!(
            lget(&dst, "trusted.note").as_deref(),
            Some(&b"\x00binary\xff"[..])
        );
        let hst = sys::stat_fd(handle.as_fd()).unwrap();
        assert_eq!((hst.st_dev, hst.st_ino), (st.st_dev, st.st_ino));
        assert!(work_entries(&e).is_empty());
        // The source is untouched.
        assert_eq!(lstat(&src).st_mode, libc::S_IFREG | 0o640);
    }

    #[test]
    fn sparse_4gib_file_stays_sparse() {
        let e = env();
        let src = e.lower_path.join("sparse");
        let size = 4u64 << 30;
        {
            let f = std::fs::File::create(&src).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(b"head", 0).unwrap();
            f.write_all_at(b"middle", 1 << 31).unwrap();
            f.write_all_at(b"tail", size - 4).unwrap();
        }
        let start = std::time::Instant::now();
        copy(&e, "sparse", &opts(TRUSTED)).unwrap();
        assert!(start.elapsed() < std::time::Duration::from_secs(10));
        let dst = e.upper_path.join("sparse");
        let st = lstat(&dst);
        assert_eq!(st.st_size as u64, size);
        // Three 4 KiB data blocks plus metadata, in 512-byte units; a dense copy would be
        // 8 Mi blocks.
        assert!(st.st_blocks <= 256, "st_blocks = {}", st.st_blocks);
        let f = std::fs::File::open(&dst).unwrap();
        let mut buf = [0u8; 6];
        f.read_exact_at(&mut buf[..4], 0).unwrap();
        assert_eq!(&buf[..4], b"head");
        f.read_exact_at(&mut buf, 1 << 31).unwrap();
        assert_eq!(&buf, b"middle");
        f.read_exact_at(&mut buf[..4], size - 4).unwrap();
        assert_eq!(&buf[..4], b"tail");
        f.read_exact_at(&mut buf, 1 << 30).unwrap();
        assert_eq!(buf, [0; 6]);
    }

    /// A file that ends in a hole: the copy has the whole size (the copying stops at the
    /// last data), and the hole stays one.
    #[test]
    fn a_trailing_hole_keeps_the_size() {
        let e = env();
        let src = e.lower_path.join("tail-hole");
        {
            let f = std::fs::File::create(&src).unwrap();
            f.write_all_at(b"data", 0).unwrap();
            f.set_len(64 << 20).unwrap();
        }
        copy(&e, "tail-hole", &opts(TRUSTED)).unwrap();
        let st = lstat(&e.upper_path.join("tail-hole"));
        assert_eq!(st.st_size, 64 << 20);
        assert!(st.st_blocks <= 64, "st_blocks = {}", st.st_blocks);
        let mut head = [0u8; 4];
        std::fs::File::open(e.upper_path.join("tail-hole"))
            .unwrap()
            .read_exact_at(&mut head, 0)
            .unwrap();
        assert_eq!(&head, b"data");
    }

    /// A version-2 `security.capability` value granting CAP_NET_BIND_SERVICE (effective).
    fn cap_net_bind_service() -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&(0x0200_0000u32 | 1).to_le_bytes());
        v.extend_from_slice(&(1u32 << 10).to_le_bytes()); // permitted, low word
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, low word
        v.extend_from_slice(&0u32.to_le_bytes()); // permitted, high word
        v.extend_from_slice(&0u32.to_le_bytes()); // inheritable, high word
        v
    }

    #[test]
    fn security_capability_and_trusted_xattrs_are_copied() {
        let e = env();
        let src = e.lower_path.join("ping");
        std::fs::write(&src, b"#!/bin/true\n").unwrap();
        chmod(&src, 0o755);
        // A non-root owner: the copy's chown must not strip the capability.
        lchown(&src, 1000, 1000);
        lset(&src, "security.capability", &cap_net_bind_service());
        lset(&src, "trusted.something", b"kept");
        copy(&e, "ping", &opts(TRUSTED)).unwrap();
        let dst = e.upper_path.join("ping");
        assert_eq!(
            lget(&dst, "security.capability"),
            Some(cap_net_bind_service())
        );
        assert_eq!(
            lget(&dst, "trusted.something").as_deref(),
            Some(&b"kept"[..])
        );
        let st = lstat(&dst);
        assert_eq!((st.st_uid, st.st_mode & 0o7777), (1000, 0o755));
    }

    #[test]
    fn private_overlay_xattrs_are_not_copied() {
        let e = env();
        for (name, is_dir) in [("d", true), ("f", false)] {
            let src = e.lower_path.join(name);
            if is_dir {
                std::fs::create_dir(&src).unwrap();
            } else {
                std::fs::write(&src, b"x").unwrap();
            }
            lset(&src, "trusted.overlay.opaque", b"y");
            lset(&src, "trusted.overlay.origin", b"\x00\xfb");
            lset(&src, "user.overlay.opaque", b"y");
            lset(&src, "user.plain", b"1");
        }
        // Default namespace: trusted.overlay.* is private, user.overlay.* an ordinary name.
        for name in ["d", "f"] {
            copy(&e, name, &opts(TRUSTED)).unwrap();
            let dst = e.upper_path.join(name);
            assert_eq!(lget(&dst, "trusted.overlay.opaque"), None);
            assert_eq!(lget(&dst, "trusted.overlay.origin"), None);
            assert_eq!(
                lget(&dst, "user.overlay.opaque").as_deref(),
                Some(&b"y"[..])
            );
            assert_eq!(lget(&dst, "user.plain").as_deref(), Some(&b"1"[..]));
        }
        // userxattr: the other way round.
        for name in ["d", "f"] {
            let n = cname(name);
            let src = sys::open_path_at(e.lower.as_fd(), &n).unwrap();
            let to = cname(&format!("{name}2"));
            copy_up(
                src.as_fd(),
                e.work.as_fd(),
                e.upper.as_fd(),
                &to,
                &opts("user.overlay."),
            )
            .unwrap();
            let dst = e.upper_path.join(format!("{name}2"));
            assert_eq!(lget(&dst, "user.overlay.opaque"), None);
            assert_eq!(
                lget(&dst, "trusted.overlay.opaque").as_deref(),
                Some(&b"y"[..])
            );
            assert_eq!(lget(&dst, "user.plain").as_deref(), Some(&b"1"[..]));
        }
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn setuid_bit_survives_chown() {
        let e = env();
        let f = e.lower_path.join("su");
        std::fs::write(&f, b"\x7fELF").unwrap();
        lchown(&f, 1000, 1000);
        chmod(&f, 0o6755);
        let d = e.lower_path.join("shared");
        std::fs::create_dir(&d).unwrap();
        lchown(&d, 1000, 2000);
        chmod(&d, 0o3775);
        copy(&e, "su", &opts(TRUSTED)).unwrap();
        copy(&e, "shared", &opts(TRUSTED)).unwrap();
        let st = lstat(&e.upper_path.join("su"));
        assert_eq!(st.st_mode, libc::S_IFREG | 0o6755);
        assert_eq!((st.st_uid, st.st_gid), (1000, 1000));
        let st = lstat(&e.upper_path.join("shared"));
        assert_eq!(st.st_mode, libc::S_IFDIR | 0o3775);
        assert_eq!((st.st_uid, st.st_gid), (1000, 2000));
    }

    #[test]
    fn symlink_copy_keeps_target_and_owner() {
        let e = env();
        let src = e.lower_path.join("escape");
        // Never followed: the copy is made from the link itself.
        std::os::unix::fs::symlink("../../../../etc/shadow", &src).unwrap();
        lchown(&src, 1000, 2000);
        lset(&src, "trusted.linknote", b"on the link");
        set_times(&src);
        let handle = copy(&e, "escape", &opts(TRUSTED)).unwrap();
        let dst = e.upper_path.join("escape");
        // Stat before reading the link: readlink updates its atime.
        let st = lstat(&dst);
        assert_eq!(
            std::fs::read_link(&dst).unwrap(),
            Path::new("../../../../etc/shadow")
        );
        assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFLNK);
        assert_eq!((st.st_uid, st.st_gid), (1000, 2000));
        assert_times(&st);
        assert_eq!(
            sys::get_xattr(handle.as_fd(), c"trusted.linknote")
                .unwrap()
                .as_deref(),
            Some(&b"on the link"[..])
        );
        assert_eq!(
            sys::readlink_fd(handle.as_fd()).unwrap(),
            b"../../../../etc/shadow"
        );
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn fifo_and_device_copy_keep_rdev() {
        let e = env();
        let nodes = [
            ("fifo", libc::S_IFIFO | 0o620, 0),
            ("null", libc::S_IFCHR | 0o666, libc::makedev(1, 3)),
            ("blk", libc::S_IFBLK | 0o600, libc::makedev(7, 200)),
            ("sock", libc::S_IFSOCK | 0o755, 0),
            // A kernel-format whiteout is a 0/0 character device: copied like any other.
            ("wh", libc::S_IFCHR, libc::makedev(0, 0)),
        ];
        for (name, mode, dev) in nodes {
            let p = e.lower_path.join(name);
            mknod(&p, mode, dev);
            chmod(&p, mode & 0o7777);
            lchown(&p, 5, 6);
            set_times(&p);
        }
        for (name, mode, dev) in nodes {
            copy(&e, name, &opts(TRUSTED)).unwrap();
            let st = lstat(&e.upper_path.join(name));
            assert_eq!(st.st_mode, mode, "{name}");
            assert_eq!(st.st_rdev, dev, "{name}");
            assert_eq!((st.st_uid, st.st_gid), (5, 6), "{name}");
            assert_times(&st);
        }
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn directory_copy_keeps_metadata_not_contents() {
        let e = env();
        let d = e.lower_path.join("etc");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("passwd"), b"root:x:0:0").unwrap();
        std::fs::create_dir(d.join("sub")).unwrap();
        lchown(&d, 7, 8);
        chmod(&d, 0o751);
        lset(&d, "user.dirnote", b"d");
        set_times(&d);
        let handle = copy(&e, "etc", &opts(TRUSTED)).unwrap();
        let dst = e.upper_path.join("etc");
        // Stat before listing: the listing updates its atime.
        let st = lstat(&dst);
        assert_eq!(std::fs::read_dir(&dst).unwrap().count(), 0);
        assert_eq!(st.st_mode, libc::S_IFDIR | 0o751);
        assert_eq!((st.st_uid, st.st_gid), (7, 8));
        assert_times(&st);
        assert_eq!(lget(&dst, "user.dirnote").as_deref(), Some(&b"d"[..]));
        assert_eq!(sys::stat_fd(handle.as_fd()).unwrap().st_ino, st.st_ino);
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn existing_target_gives_eexist_and_leaves_no_temp() {
        let e = env();
        std::fs::write(e.lower_path.join("f"), b"lower").unwrap();
        std::fs::create_dir(e.lower_path.join("d")).unwrap();
        std::fs::write(e.upper_path.join("f"), b"upper").unwrap();
        std::fs::create_dir(e.upper_path.join("d")).unwrap();
        assert_eq!(errno(copy(&e, "f", &opts(TRUSTED))), libc::EEXIST);
        assert_eq!(errno(copy(&e, "d", &opts(TRUSTED))), libc::EEXIST);
        assert_eq!(std::fs::read(e.upper_path.join("f")).unwrap(), b"upper");
        assert!(work_entries(&e).is_empty());
        // A dangling symlink counts as existing too.
        std::os::unix::fs::symlink("nowhere", e.upper_path.join("g")).unwrap();
        std::fs::write(e.lower_path.join("g"), b"lower").unwrap();
        assert_eq!(errno(copy(&e, "g", &opts(TRUSTED))), libc::EEXIST);
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn rename_noreplace_refuses_a_name_that_appears_during_the_copy() {
        // The early check cannot see a name created after it; the rename must still refuse.
        let e = env();
        std::fs::write(e.lower_path.join("f"), b"lower").unwrap();
        let temp = temp_name();
        let file = sys::create_file_at(e.work.as_fd(), &temp, 0o600).unwrap();
        drop(file);
        std::fs::write(e.upper_path.join("f"), b"upper").unwrap();
        let err = sys::rename_at(
            e.work.as_fd(),
            &temp,
            e.upper.as_fd(),
            c"f",
            libc::RENAME_NOREPLACE,
        )
        .unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EEXIST));
        sys::unlink_at(e.work.as_fd(), &temp, 0).unwrap();
    }

    #[test]
    fn bad_names_are_refused() {
        let e = env();
        std::fs::write(e.lower_path.join("f"), b"x").unwrap();
        let src = sys::open_path_at(e.lower.as_fd(), c"f").unwrap();
        for bad in [c"", c".", c"..", c"a/b"] {
            let r = copy_up(
                src.as_fd(),
                e.work.as_fd(),
                e.upper.as_fd(),
                bad,
                &opts(TRUSTED),
            );
            assert_eq!(errno(r), libc::EINVAL, "{bad:?}");
        }
        assert!(work_entries(&e).is_empty());
    }

    /// A small tmpfs mounted for one test, unmounted (lazily if busy) when dropped.
    struct TmpfsMount {
        _dir: tempfile::TempDir,
        path: PathBuf,
    }

    impl TmpfsMount {
        fn new(size: &str) -> TmpfsMount {
            let dir = tempfile::Builder::new()
                .prefix("copyup-tmpfs-")
                .tempdir_in("/tmp")
                .unwrap();
            let path = dir.path().to_path_buf();
            let (target, data) = (cpath(&path), cname(&format!("size={size},mode=0755")));
            let ret = unsafe {
                libc::mount(
                    c"tmpfs".as_ptr(),
                    target.as_ptr(),
                    c"tmpfs".as_ptr(),
                    0,
                    data.as_ptr().cast(),
                )
            };
            assert_eq!(ret, 0, "mount tmpfs: {}", io::Error::last_os_error());
            TmpfsMount { _dir: dir, path }
        }
    }

    impl Drop for TmpfsMount {
        fn drop(&mut self) {
            let c = cpath(&self.path);
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    #[test]
    fn failure_midway_leaves_no_temp() {
        let lower_env = env();
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8 + 1).collect();
        let src_path = lower_env.lower_path.join("big");
        std::fs::write(&src_path, &data).unwrap();
        lset(&src_path, "user.x", b"y");
        let mnt = TmpfsMount::new("64k");
        let upper_path = mnt.path.join("upper");
        let work_path = mnt.path.join("work");
        std::fs::create_dir(&upper_path).unwrap();
        std::fs::create_dir(&work_path).unwrap();
        let upper = sys::open_dir_path(&upper_path).unwrap();
        let work = sys::open_dir_path(&work_path).unwrap();
        let src = sys::open_path_at(lower_env.lower.as_fd(), c"big").unwrap();
        for durable in [true, false] {
            let o = CopyUpOptions {
                durable,
                ..opts(TRUSTED)
            };
            let r = copy_up(src.as_fd(), work.as_fd(), upper.as_fd(), c"big", &o);
            assert_eq!(errno(r), libc::ENOSPC);
            assert_eq!(std::fs::read_dir(&work_path).unwrap().count(), 0);
            assert!(!upper_path.join("big").exists());
        }
        // Still usable afterwards: an empty copy fits.
        let o = CopyUpOptions {
            with_data: false,
            ..opts(TRUSTED)
        };
        copy_up(src.as_fd(), work.as_fd(), upper.as_fd(), c"big", &o).unwrap();
        assert_eq!(lstat(&upper_path.join("big")).st_size, 0);
        drop((upper, work));
    }

    #[test]
    fn cross_filesystem_copy_keeps_bytes_and_holes() {
        // Lower on /tmp, upper on tmpfs: no reflink and (depending on the kernel) no
        // copy_file_range across them, so this exercises the fallbacks.
        let lower_env = env();
        let upper_env = env_in(Path::new("/dev/shm"));
        let src_path = lower_env.lower_path.join("holey");
        let size = 64u64 << 20;
        let chunk: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8 + 1).collect();
        {
            let f = std::fs::File::create(&src_path).unwrap();
            f.set_len(size).unwrap();
            f.write_all_at(&chunk, 1 << 20).unwrap();
            f.write_all_at(b"end", size - 3).unwrap();
        }
        let src = sys::open_path_at(lower_env.lower.as_fd(), c"holey").unwrap();
        copy_up(
            src.as_fd(),
            upper_env.work.as_fd(),
            upper_env.upper.as_fd(),
            c"holey",
            &opts(TRUSTED),
        )
        .unwrap();
        let dst = upper_env.upper_path.join("holey");
        let st = lstat(&dst);
        assert_eq!(st.st_size as u64, size);
        assert!((st.st_blocks as u64) * 512 < 8 << 20, "{}", st.st_blocks);
        let got = std::fs::read(&dst).unwrap();
        assert_eq!(&got[1 << 20..(1 << 20) + chunk.len()], &chunk[..]);
        assert!(got[..1 << 20].iter().all(|b| *b == 0));
        assert_eq!(&got[got.len() - 3..], b"end");
    }

    /// An XFS image with reflink support, loop-mounted for one test; unmounted when dropped
    /// (the loop device, attached by mount with autoclear, goes with it).
    struct XfsLoop {
        _dir: tempfile::TempDir,
        mnt: PathBuf,
    }

    impl XfsLoop {
        /// `None` when this machine cannot make one (no mkfs.xfs, no loop devices).
        fn new() -> Option<XfsLoop> {
            use std::process::{Command, Stdio};
            let dir = tempfile::Builder::new()
                .prefix("copyup-xfs-")
                .tempdir_in("/tmp")
                .unwrap();
            let img = dir.path().join("img");
            let mnt = dir.path().join("mnt");
            std::fs::create_dir(&mnt).unwrap();
            std::fs::File::create(&img)
                .unwrap()
                .set_len(320 << 20)
                .unwrap();
            let ok = |c: &mut Command| {
                c.stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if !ok(Command::new("mkfs.xfs")
                .args(["-q", "-m", "reflink=1"])
                .arg(&img))
            {
                return None;
            }
            if !ok(Command::new("mount")
                .args(["-t", "xfs", "-o", "loop"])
                .arg(&img)
                .arg(&mnt))
            {
                return None;
            }
            Some(XfsLoop { _dir: dir, mnt })
        }
    }

    impl Drop for XfsLoop {
        fn drop(&mut self) {
            let c = cpath(&self.mnt);
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }

    fn free_bytes(p: &Path) -> u64 {
        let c = cpath(p);
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bfree as u64 * st.f_frsize as u64
    }

    #[test]
    fn reflink_is_used_when_the_filesystem_supports_it() {
        let Some(xfs) = XfsLoop::new() else {
            eprintln!("skipped: cannot make a reflink-capable XFS loop mount here");
            return;
        };
        let e = env_in(&xfs.mnt);
        let data: Vec<u8> = (0..(8u32 << 20)).map(|i| (i % 239) as u8 + 1).collect();
        std::fs::write(e.lower_path.join("img"), &data).unwrap();
        let sync = |p: &Path| {
            let f = std::fs::File::open(p).unwrap();
            assert_eq!(unsafe { libc::syncfs(f.as_raw_fd()) }, 0);
        };
        sync(&xfs.mnt);
        let before = free_bytes(&xfs.mnt);
        copy(&e, "img", &opts(TRUSTED)).unwrap();
        sync(&xfs.mnt);
        let used = before.saturating_sub(free_bytes(&xfs.mnt));
        // A real copy would take 8 MiB; a clone only some metadata.
        assert!(used < 1 << 20, "copy used {used} bytes");
        assert_eq!(std::fs::read(e.upper_path.join("img")).unwrap(), data);
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn clean_work_dir_removes_only_our_leftovers() {
        let e = env();
        let w = &e.work_path;
        std::fs::write(w.join("#ovlfuse-cu-1-0"), b"partial").unwrap();
        std::fs::create_dir(w.join("#ovlfuse-cu-2-5")).unwrap();
        std::fs::create_dir_all(w.join("#ovlfuse-cu-3-1/a/b")).unwrap();
        std::fs::write(w.join("#ovlfuse-cu-3-1/a/b/c"), b"").unwrap();
        std::os::unix::fs::symlink("/etc", w.join("#ovlfuse-cu-4-2")).unwrap();
        mknod(&w.join("#ovlfuse-cu-5-9"), libc::S_IFIFO | 0o600, 0);
        // Not ours: left alone. The symlink into a directory with "our" names is not followed.
        let outside = e.lower_path.join("keep");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("#ovlfuse-cu-6-6"), b"").unwrap();
        std::os::unix::fs::symlink(&outside, w.join("#ovlfuse-cu-7-7")).unwrap();
        std::fs::write(w.join("index"), b"").unwrap();
        std::fs::create_dir(w.join("#other-tool-1")).unwrap();
        std::fs::write(w.join("ovlfuse-cu-1-0"), b"").unwrap();

        assert_eq!(clean_work_dir(e.work.as_fd()).unwrap(), 6);
        let mut left: Vec<_> = work_entries(&e);
        left.sort();
        assert_eq!(left, ["#other-tool-1", "index", "ovlfuse-cu-1-0"]);
        assert!(outside.join("#ovlfuse-cu-6-6").exists());
        assert_eq!(clean_work_dir(e.work.as_fd()).unwrap(), 0);
    }

    #[test]
    fn without_data_gives_empty_file_with_metadata() {
        let e = env();
        let src = e.lower_path.join("log");
        std::fs::write(&src, vec![b'x'; 100_000]).unwrap();
        lchown(&src, 33, 44);
        chmod(&src, 0o4711);
        lset(&src, "user.a", b"b");
        set_times(&src);
        let o = CopyUpOptions {
            with_data: false,
            durable: false,
            ..opts(TRUSTED)
        };
        copy(&e, "log", &o).unwrap();
        let dst = e.upper_path.join("log");
        let st = lstat(&dst);
        assert_eq!(st.st_size, 0);
        assert_eq!(st.st_mode, libc::S_IFREG | 0o4711);
        assert_eq!((st.st_uid, st.st_gid), (33, 44));
        assert_times(&st);
        assert_eq!(lget(&dst, "user.a").as_deref(), Some(&b"b"[..]));
        assert!(work_entries(&e).is_empty());
    }

    #[test]
    fn temp_names_are_unique_and_recognisable() {
        let a = temp_name();
        let b = temp_name();
        assert_ne!(a, b);
        assert!(a.to_bytes().starts_with(TEMP_PREFIX.as_bytes()));
        assert!(sys::component(OsStr::from_bytes(a.to_bytes())).is_ok());
    }
}
