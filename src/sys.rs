//! Thin, safe wrappers around the few system calls the layer code needs.
//!
//! Owns: every `unsafe` libc call made on layer files. Everything here takes a held directory
//! fd plus ONE name component, and never follows a symlink in that component: the daemon must
//! never reach a path outside the layer directories, whatever symlinks the layers contain.
//! Must never: accept a multi-component path, or open with a flag that follows symlinks.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

/// A single path component, checked once so every `*at` call below can rely on it.
pub fn component(name: &OsStr) -> io::Result<CString> {
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes == b"." || bytes == b".." || bytes.contains(&b'/') {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `Ok(())` for a zero or positive system call result, the errno otherwise.
pub fn check(ret: libc::c_int) -> io::Result<()> {
    cvt(ret).map(|_| ())
}

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// Opens `name` inside `dir` as an `O_PATH` handle without following a symlink in `name`
/// (a symlink yields a handle on the link itself).
pub fn open_path_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    open_at(dir, name, libc::O_PATH | libc::O_NOFOLLOW)
}

/// `openat(dir, name, flags | O_CLOEXEC | O_NOFOLLOW)`.
pub fn open_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and NUL-terminated name; the returned fd is owned by the caller.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
        )
    })?;
    // SAFETY: fd was just returned by openat and is not owned elsewhere.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a directory given by path (only used for layer roots named by the mounter, and for
/// /proc/self/fd). Symlinks in that path are the mounter's choice, as with the kernel overlay.
pub fn open_dir_path(path: &std::path::Path) -> io::Result<OwnedFd> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid NUL-terminated path.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fstat` of a held handle (works on `O_PATH` handles and on symlink handles).
pub fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<libc::stat> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: empty path with AT_EMPTY_PATH operates on fd itself; st is a valid out-pointer.
    cvt(unsafe {
        libc::fstatat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut st,
            libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    Ok(st)
}

/// `fstatat(dir, name, AT_SYMLINK_NOFOLLOW)`; `Ok(None)` when the name does not exist.
pub fn stat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd, name and out-pointer.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        return Ok(Some(st));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ENOTDIR) => Ok(None),
        _ => Err(err),
    }
}

/// `fstatfs` of a held handle.
pub fn statfs_fd(fd: BorrowedFd<'_>) -> io::Result<libc::statvfs> {
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // fstatvfs does not accept O_PATH handles; go through the handle's /proc magic link.
    let path = proc_fd_path(fd);
    // SAFETY: valid path and out-pointer.
    cvt(unsafe { libc::statvfs(path.as_ptr(), &mut st) })?;
    Ok(st)
}

/// The /proc magic-link path of a held handle. Resolving it lands exactly on the inode the
/// handle refers to (never on a path), which is why it is safe to use for xattr calls and
/// for reopening a handle with other flags.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    // Digits only: CString::new cannot fail.
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default()
}

/// Reopens an `O_PATH` handle of a regular file or directory with real access flags.
pub fn reopen(fd: BorrowedFd<'_>, flags: libc::c_int) -> io::Result<OwnedFd> {
    let path = proc_fd_path(fd);
    // No O_NOFOLLOW: the final component is the /proc magic link itself, which only ever
    // resolves to the inode behind our own handle.
    // SAFETY: valid path.
    let raw = cvt(unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) })?;
    // SAFETY: fresh fd.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Reads a symlink given by handle.
pub fn readlink_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize];
    // SAFETY: empty path means the symlink the handle refers to; buf is valid for its length.
    let n = cvt_size(unsafe {
        libc::readlinkat(
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

/// Where an object's extended attributes are read.
#[derive(Clone, Copy)]
pub enum XattrSource<'a> {
    /// Through the object's handle.
    Handle(BorrowedFd<'a>),
    /// A descriptor opened for I/O (`f*xattr`: no path walk).
    Open(BorrowedFd<'a>),
    /// An object of a layer that does not change while mounted (a lower layer), just opened
    /// as `name` in `dir`: by name (see [`get_xattr_of_entry`]).
    LowerEntry {
        dir: BorrowedFd<'a>,
        name: &'a CStr,
        handle: BorrowedFd<'a>,
    },
}

impl XattrSource<'_> {
    /// The attribute `attr`; `Ok(None)` if the object does not have it.
    pub fn get(&self, attr: &CStr) -> io::Result<Option<Vec<u8>>> {
        match *self {
            XattrSource::Handle(fd) => get_xattr(fd, attr),
            XattrSource::Open(fd) => get_xattr_open_fd(fd, attr),
            XattrSource::LowerEntry { dir, name, handle } => {
                get_xattr_of_entry(dir, name, handle, attr)
            }
        }
    }

    /// The names of all the object's attributes.
    pub fn list(&self) -> io::Result<Vec<OsString>> {
        match *self {
            XattrSource::Open(fd) => list_xattr_open_fd(fd),
            _ => list_xattr(self.handle()),
        }
    }

    /// The object's descriptor.
    pub fn handle(&self) -> BorrowedFd<'_> {
        match *self {
            XattrSource::Handle(fd) | XattrSource::Open(fd) => fd,
            XattrSource::LowerEntry { handle, .. } => handle,
        }
    }
}

/// One extended attribute of the inode behind a handle; `Ok(None)` if it does not exist.
pub fn get_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    let path = proc_fd_path(fd);
    read_xattr(|buf: &mut [u8]| {
        // SAFETY: valid path and name; a null buffer with size 0 asks for the size only,
        // else buf is valid for its length.
        unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), buf_ptr(buf), buf.len()) }
    })
}

/// `getxattrat(2)` (Linux 6.13; the same number on every architecture but alpha).
const SYS_GETXATTRAT: libc::c_long = 464;

/// Set once `getxattrat` has answered ENOSYS (an older kernel).
static NO_GETXATTRAT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `struct xattr_args` of `getxattrat(2)`.
#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

/// One extended attribute of `handle`, an object just opened as `name` in `dir` of a layer
/// that does not change while mounted (a lower layer): read by name, without following a
/// symlink, which costs a third of going through the handle's `/proc/self/fd` link. (The
/// name cannot stand for another object meanwhile, the layer being read-only.) Through the
/// handle on kernels before 6.13.
pub fn get_xattr_of_entry(
    dir: BorrowedFd<'_>,
    name: &CStr,
    handle: BorrowedFd<'_>,
    attr: &CStr,
) -> io::Result<Option<Vec<u8>>> {
    use std::sync::atomic::Ordering;
    if NO_GETXATTRAT.load(Ordering::Relaxed) {
        return get_xattr(handle, attr);
    }
    let read = read_xattr(|buf: &mut [u8]| {
        let args = XattrArgs {
            value: if buf.is_empty() {
                0
            } else {
                buf.as_mut_ptr() as u64
            },
            size: buf.len() as u32,
            flags: 0,
        };
        // SAFETY: valid fd, name and attribute name; args points at a valid struct of the
        // size given, whose buffer (if any) is valid for its length.
        unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir.as_raw_fd(),
                name.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
                attr.as_ptr(),
                &args as *const XattrArgs,
                size_of::<XattrArgs>(),
            ) as libc::ssize_t
        }
    });
    match read {
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            NO_GETXATTRAT.store(true, Ordering::Relaxed);
            get_xattr(handle, attr)
        }
        other => other,
    }
}

/// An extended attribute's value through `get(buf)`, a getxattr-like call (an empty buffer
/// asks for the size); `Ok(None)` if it does not exist.
fn read_xattr(mut get: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Option<Vec<u8>>> {
    loop {
        let size = get(&mut []);
        if size < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENODATA) => Ok(None),
                // Filesystems or inodes without xattr support simply have none.
                Some(libc::ENOTSUP) => Ok(None),
                _ => Err(err),
            };
        }
        let mut buf = vec![0u8; size as usize];
        let got = get(&mut buf);
        if got < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // The value grew between the two calls: ask again.
                Some(libc::ERANGE) => continue,
                Some(libc::ENODATA) => return Ok(None),
                _ => return Err(err),
            }
        }
        buf.truncate(got as usize);
        return Ok(Some(buf));
    }
}

/// All extended attribute names of the inode behind a handle.
pub fn list_xattr(fd: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    let path = proc_fd_path(fd);
    read_xattr_names(|buf: &mut [u8]| {
        // SAFETY: valid path; a null buffer with size 0 asks for the size only, else buf is
        // valid for its length.
        unsafe { libc::listxattr(path.as_ptr(), buf_ptr(buf).cast(), buf.len()) }
    })
}

/// All extended attribute names of a descriptor opened for I/O (no path walk).
pub fn list_xattr_open_fd(fd: BorrowedFd<'_>) -> io::Result<Vec<OsString>> {
    read_xattr_names(|buf: &mut [u8]| {
        // SAFETY: as in `list_xattr`, on a valid descriptor.
        unsafe { libc::flistxattr(fd.as_raw_fd(), buf_ptr(buf).cast(), buf.len()) }
    })
}

/// One extended attribute of a descriptor opened for I/O; `Ok(None)` if it does not exist.
pub fn get_xattr_open_fd(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<Vec<u8>>> {
    read_xattr(|buf: &mut [u8]| {
        // SAFETY: valid descriptor and name; buffer as in `get_xattr`.
        unsafe { libc::fgetxattr(fd.as_raw_fd(), name.as_ptr(), buf_ptr(buf), buf.len()) }
    })
}

/// Sets an extended attribute of a descriptor opened for I/O.
pub fn set_xattr_open_fd(
    fd: BorrowedFd<'_>,
    name: &CStr,
    value: &[u8],
    flags: i32,
) -> io::Result<()> {
    // SAFETY: valid descriptor, name and value buffer.
    check(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// The buffer argument of a getxattr-like call: null for an empty buffer (a size query).
fn buf_ptr(buf: &mut [u8]) -> *mut libc::c_void {
    if buf.is_empty() {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    }
}

/// The attribute names a listxattr-like call `list(buf)` gives (an empty buffer asks for
/// the size). An object without attributes costs the size query alone.
fn read_xattr_names(mut list: impl FnMut(&mut [u8]) -> libc::ssize_t) -> io::Result<Vec<OsString>> {
    loop {
        let size = list(&mut []);
        if size < 0 {
            let err = io::Error::last_os_error();
            return match err.raw_os_error() {
                Some(libc::ENOTSUP) => Ok(Vec::new()),
                _ => Err(err),
            };
        }
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size as usize];
        let got = list(&mut buf);
        if got < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ERANGE) {
                continue;
            }
            return Err(err);
        }
        buf.truncate(got as usize);
        return Ok(buf
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| OsString::from_vec(n.to_vec()))
            .collect());
    }
}

/// One raw directory entry as the layer's filesystem reports it.
#[derive(Debug, Clone)]
pub struct RawDirEntry {
    pub name: OsString,
    pub ino: u64,
    pub d_type: u8,
}

/// Reads every entry of a directory given by handle (including `.` and `..`).
pub fn read_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<RawDirEntry>> {
    let fd = open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)?;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: buf is valid for its length; getdents64 fills linux_dirent64 records.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n == 0 {
            break;
        }
        let mut off = 0usize;
        let n = n as usize;
        // linux_dirent64: u64 d_ino, i64 d_off, u16 d_reclen, u8 d_type, char d_name[].
        while off + 19 <= n {
            let rec = &buf[off..n];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or_default());
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().unwrap_or_default()) as usize;
            if reclen == 0 || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let d_type = rec[18];
            let name_bytes = &rec[19..reclen];
            let len = name_bytes
                .iter()
                .position(|b| *b == 0)
                .unwrap_or(name_bytes.len());
            out.push(RawDirEntry {
                name: OsString::from_vec(name_bytes[..len].to_vec()),
                ino,
                d_type,
            });
            off += reclen;
        }
    }
    Ok(out)
}

/// Appends up to `size` bytes read at `offset` to `buf`: `pread` until `size` bytes or end
/// of file, retried on EINTR.
pub fn read_at_into(
    fd: BorrowedFd<'_>,
    offset: u64,
    size: usize,
    buf: &mut Vec<u8>,
) -> io::Result<()> {
    let start = buf.len();
    buf.resize(start + size, 0);
    let mut done = 0;
    while done < size {
        match pread(fd, &mut buf[start + done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) => {
                buf.truncate(start);
                return Err(e);
            }
        }
    }
    buf.truncate(start + done);
    Ok(())
}

/// The page size, in bytes.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory effects.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|&s| s > 0).unwrap_or(4096)
}

/// What `cachestat(2)` (Linux 6.5) counts in a range of a file, in pages.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStat {
    /// In the page cache, including pages whose read is still under way.
    pub cached: u64,
    pub dirty: u64,
    pub writeback: u64,
}

/// `cachestat(2)` of `len` bytes at `offset` (`len` 0: to the end of the file). Starts no
/// I/O and takes no lock a reader would wait for. ENOSYS before Linux 6.5.
pub fn cachestat(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<CacheStat> {
    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }
    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }
    const SYS_CACHESTAT: libc::c_long = 451;
    let range = Range { off: offset, len };
    let mut st = Stat::default();
    // SAFETY: valid descriptor and pointers to structs laid out as the kernel's.
    let rc = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            fd.as_raw_fd(),
            &raw const range,
            &raw mut st,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(CacheStat {
        cached: st.nr_cache,
        dirty: st.nr_dirty,
        writeback: st.nr_writeback,
    })
}

/// Raw descriptor of a borrowed fd, for log lines.
pub fn raw(fd: &impl AsFd) -> RawFd {
    fd.as_fd().as_raw_fd()
}

/// Raises the soft open-file limit to the hard limit: the daemon holds one handle per
/// inode the kernel remembers.
pub fn raise_nofile_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 && lim.rlim_cur < lim.rlim_max
    {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: valid in-pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// The most descriptor slots [`reserve_descriptor_slots`] sets aside: 128 KiB of kernel
/// memory for the table, enough for the layer objects a large tree keeps open.
pub const DESCRIPTOR_SLOTS: u32 = 16384;

/// Grow this process's descriptor table to `slots` entries (at most the soft
/// `RLIMIT_NOFILE`) now, while it has a single thread.
///
/// Why: each time a multi-threaded process outgrows its table, the kernel doubles it and
/// waits for an RCU grace period first (`expand_fdtable`), which on this machine kind took
/// 10–25 ms, with the thread that opened the descriptor (serving a request) stopped all
/// that time; a fresh mount that opens a few thousand layer objects grows it eight times.
/// A single-threaded process grows it without waiting.
pub fn reserve_descriptor_slots(slots: u32) -> io::Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    check(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) })?;
    let top = u64::from(slots).min(lim.rlim_cur).saturating_sub(1);
    let top = libc::c_int::try_from(top).unwrap_or(libc::c_int::MAX);
    // SAFETY: opens a path-only descriptor of "/", owned right away.
    let probe = unsafe {
        OwnedFd::from_raw_fd(cvt(libc::open(
            c"/".as_ptr(),
            libc::O_PATH | libc::O_CLOEXEC,
        ))?)
    };
    // The lowest free slot at or above `top`: the kernel sizes the table for it.
    // SAFETY: duplicates a valid descriptor; the copy is owned right away and closed.
    let high = unsafe {
        OwnedFd::from_raw_fd(cvt(libc::fcntl(
            probe.as_raw_fd(),
            libc::F_DUPFD_CLOEXEC,
            top,
        ))?)
    };
    drop(high);
    Ok(())
}

/// `pwrite` that retries on EINTR and short writes; returns the bytes written.
pub fn write_at(fd: BorrowedFd<'_>, offset: u64, data: &[u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < data.len() {
        // SAFETY: the slice from done is valid for its length.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                data[done..].as_ptr().cast(),
                data.len() - done,
                (offset + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Report what was written before the error, like write(2) does.
            return if done > 0 { Ok(done) } else { Err(err) };
        }
        if n == 0 {
            break;
        }
        done += n as usize;
    }
    Ok(done)
}

/// `fsync` or `fdatasync` of an open file.
pub fn sync_fd(fd: BorrowedFd<'_>, data_only: bool) -> io::Result<()> {
    // SAFETY: valid fd.
    let ret = unsafe {
        if data_only {
            libc::fdatasync(fd.as_raw_fd())
        } else {
            libc::fsync(fd.as_raw_fd())
        }
    };
    cvt(ret).map(|_| ())
}

/// `openat(dir, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_CLOEXEC, mode)`.
pub fn create_file_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<OwnedFd> {
    // SAFETY: valid fd and NUL-terminated name; mode is passed because O_CREAT is set.
    let fd = unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            mode as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `fchown` of a descriptor opened for I/O (on an `O_PATH` one it fails with EBADF).
pub fn chown_open_fd(fd: BorrowedFd<'_>, uid: libc::uid_t, gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: valid fd.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) })
}

/// `openat(dir, name, flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode)`: a new file,
/// opened with `flags`; fails with EEXIST if anything has the name.
pub fn create_open_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    let flags = flags | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid fd and NUL-terminated name; mode is passed because O_CREAT is set.
    let fd =
        cvt(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode as libc::c_uint) })?;
    // SAFETY: fd was just returned by openat and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The calling thread's fsuid and fsgid (asked with an id the kernel refuses, which changes
/// nothing and returns the current one).
pub fn fs_ids() -> (u32, u32) {
    // SAFETY: plain system calls on the calling thread's credentials.
    unsafe {
        (
            libc::setfsuid(u32::MAX) as u32,
            libc::setfsgid(u32::MAX) as u32,
        )
    }
}

/// Sets the calling thread's fsuid and fsgid (and nothing else: the syscalls act on the
/// thread, not the process), from `current`, the ones it has now. Fails with EPERM if either
/// is refused (e.g. an id that is not mapped in the daemon's user namespace); the thread
/// has `current` again then.
pub fn set_fs_ids(uid: u32, gid: u32, current: (u32, u32)) -> io::Result<()> {
    // SAFETY: as in `fs_ids`. setfsgid/setfsuid report the old id even when they fail, so
    // success is read back.
    unsafe {
        libc::setfsgid(gid);
        libc::setfsuid(uid);
    }
    if fs_ids() == (uid, gid) {
        return Ok(());
    }
    restore_fs_ids(current.0, current.1);
    Err(io::Error::from_raw_os_error(libc::EPERM))
}

/// Sets the calling thread's fsuid and fsgid back to ids it had (always allowed).
pub fn restore_fs_ids(uid: u32, gid: u32) {
    // SAFETY: as in `fs_ids`.
    unsafe {
        libc::setfsuid(uid);
        libc::setfsgid(gid);
    }
}

/// `SECBIT_NO_SETUID_FIXUP` (linux/securebits.h): changing the fsuid keeps the capabilities.
const SECBIT_NO_SETUID_FIXUP: libc::c_ulong = 1 << 2;

/// Turns on `SECBIT_NO_SETUID_FIXUP` for the calling thread, so that an fsuid other than 0
/// does not drop CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID and the other file capabilities
/// (needs CAP_SETPCAP).
pub fn keep_caps_across_fsuid() -> io::Result<()> {
    // SAFETY: prctl with integer arguments on the calling thread.
    let bits = cvt(unsafe { libc::prctl(libc::PR_GET_SECUREBITS, 0, 0, 0, 0) })? as libc::c_ulong;
    if bits & SECBIT_NO_SETUID_FIXUP != 0 {
        return Ok(());
    }
    // SAFETY: as above.
    check(unsafe {
        libc::prctl(
            libc::PR_SET_SECUREBITS,
            bits | SECBIT_NO_SETUID_FIXUP,
            0,
            0,
            0,
        )
    })
}

/// `fchmod` of a descriptor opened for I/O (on an `O_PATH` one it fails with EBADF).
pub fn chmod_open_fd(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) })
}

/// Sets the access and modification times of a descriptor opened for I/O to `st`'s.
pub fn set_times_open_fd(fd: BorrowedFd<'_>, st: &libc::stat) -> io::Result<()> {
    let times = times_of(st);
    // SAFETY: valid fd and a two-element times array.
    check(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) })
}

/// `st`'s access and modification times, as utimensat(2) takes them.
fn times_of(st: &libc::stat) -> [libc::timespec; 2] {
    [
        libc::timespec {
            tv_sec: st.st_atime,
            tv_nsec: st.st_atime_nsec,
        },
        libc::timespec {
            tv_sec: st.st_mtime,
            tv_nsec: st.st_mtime_nsec,
        },
    ]
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid fd and name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) })
}

pub fn symlink_at(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid strings and fd.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) })
}

pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    rdev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid fd and name.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) })
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd and name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

pub fn chown_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    uid: libc::uid_t,
    gid: libc::gid_t,
) -> io::Result<()> {
    // SAFETY: valid fd and name.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `chmod` of `name` in `dir`, never following a symlink: fchmodat follows one, so an object
/// swapped for a symlink right after the daemon created it (by anyone who can write the
/// layer) would have let the daemon chmod something outside the layers. A symlink gives ELOOP.
pub fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    let fd = open_path_at(dir, name)?;
    chmod_fd(fd.as_fd(), mode)
}

pub fn set_times_at(dir: BorrowedFd<'_>, name: &CStr, st: &libc::stat) -> io::Result<()> {
    let times = times_of(st);
    // SAFETY: valid fd, name and a two-element times array.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// Sets an attribute on the inode behind a handle, through its /proc magic link (which
/// lands on the inode itself, the link for a symlink handle).
pub fn set_xattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> io::Result<()> {
    let path = proc_fd_path(fd);
    // SAFETY: valid path, name and value buffer.
    check(unsafe {
        libc::setxattr(
            path.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

/// Removes an attribute from the inode behind a handle (through its /proc magic link).
pub fn remove_xattr(fd: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let path = proc_fd_path(fd);
    // SAFETY: valid path and name.
    check(unsafe { libc::removexattr(path.as_ptr(), name.as_ptr()) })
}

/// `renameat2(from_dir, from, to_dir, to, flags)`.
pub fn rename_at(
    from_dir: BorrowedFd<'_>,
    from: &CStr,
    to_dir: BorrowedFd<'_>,
    to: &CStr,
    flags: u32,
) -> io::Result<()> {
    // SAFETY: valid fds and names.
    check(unsafe {
        libc::renameat2(
            from_dir.as_raw_fd(),
            from.as_ptr(),
            to_dir.as_raw_fd(),
            to.as_ptr(),
            flags,
        )
    })
}

/// Links the object behind the handle `target` as `name` in `dir` (AT_EMPTY_PATH: needs
/// CAP_DAC_READ_SEARCH, which the privileged daemon has).
pub fn link_at(target: BorrowedFd<'_>, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid fds and names.
    check(unsafe {
        libc::linkat(
            target.as_raw_fd(),
            c"".as_ptr(),
            dir.as_raw_fd(),
            name.as_ptr(),
            libc::AT_EMPTY_PATH,
        )
    })
}

/// How deep [`remove_tree`] descends. Directories the union moves aside hold only
/// whiteouts; this only bounds the work done on a directory someone else filled.
const MAX_REMOVE_DEPTH: usize = 64;

/// Removes `name` under `dir` with everything in it, never following a symlink; a name
/// that is already gone is fine.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    remove_below(dir, name, 0)
}

fn remove_below(dir: BorrowedFd<'_>, name: &CStr, depth: usize) -> io::Result<()> {
    let Some(st) = stat_at(dir, name)? else {
        return Ok(());
    };
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return unlink_at(dir, name, 0);
    }
    match unlink_at(dir, name, libc::AT_REMOVEDIR) {
        Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) && depth < MAX_REMOVE_DEPTH => {
            let sub = open_path_at(dir, name)?;
            for entry in read_dir(sub.as_fd())? {
                let bytes = entry.name.as_bytes();
                if bytes == b"." || bytes == b".." {
                    continue;
                }
                let child = component(&entry.name)?;
                remove_below(sub.as_fd(), &child, depth + 1)?;
            }
            unlink_at(dir, name, libc::AT_REMOVEDIR)
        }
        other => other,
    }
}

pub fn ftruncate(fd: BorrowedFd<'_>, size: u64) -> io::Result<()> {
    let size =
        libc::off_t::try_from(size).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
    // SAFETY: valid fd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), size) })
}

pub fn lseek(fd: BorrowedFd<'_>, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid fd.
    let ret = unsafe { libc::lseek(fd.as_raw_fd(), offset, whence) };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as u64)
    }
}

/// `copy_file_range` at explicit, equal offsets on both sides (the file positions are not
/// used or moved).
pub fn copy_file_range(
    input: BorrowedFd<'_>,
    output: BorrowedFd<'_>,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    let mut off_in = offset as libc::loff_t;
    let mut off_out = offset as libc::loff_t;
    // SAFETY: valid fds and offset pointers; flags must be 0.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_copy_file_range,
            input.as_raw_fd(),
            &mut off_in as *mut libc::loff_t,
            output.as_raw_fd(),
            &mut off_out as *mut libc::loff_t,
            len,
            0u32,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    loop {
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::pread(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

pub fn pwrite_all(fd: BorrowedFd<'_>, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: buf is valid for its length.
        let n = unsafe {
            libc::pwrite(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                offset as libc::off_t,
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(err);
        }
        if n == 0 {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        buf = &buf[n as usize..];
        offset += n as u64;
    }
    Ok(())
}

/// `syncfs(2)` on an open (not `O_PATH`) descriptor: writes the whole filesystem back and
/// reports, once per open file description, a writeback error recorded on the filesystem
/// since the descriptor was opened — or before, if nobody had seen it yet.
pub fn syncfs(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: valid fd.
    check(unsafe { libc::syncfs(fd.as_raw_fd()) })
}

/// `faccessat(dir, name, mode, AT_EACCESS | AT_SYMLINK_NOFOLLOW)`: whether this process, with
/// its effective ids and capabilities, may access `name` as `mode` (`W_OK | X_OK`, ...).
pub fn access_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::c_int) -> io::Result<()> {
    // SAFETY: valid fd and name.
    check(unsafe {
        libc::faccessat(
            dir.as_raw_fd(),
            name.as_ptr(),
            mode,
            libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
}

/// `fallocate(fd, 0, offset, len)`: gives the range its blocks now (growing the file), so
/// that writing there later needs no allocation and cannot fail with ENOSPC.
pub fn fallocate(fd: BorrowedFd<'_>, offset: u64, len: u64) -> io::Result<()> {
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let len = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: valid fd.
    check(unsafe { libc::fallocate(fd.as_raw_fd(), 0, offset, len) })
}

/// `chmod` of the object behind a held handle (an `O_PATH` one too); ELOOP for a symlink,
/// whose mode means nothing.
pub fn chmod_fd(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    if stat_fd(fd)?.st_mode & libc::S_IFMT == libc::S_IFLNK {
        return Err(io::Error::from_raw_os_error(libc::ELOOP));
    }
    chmod_handle(fd, mode)
}

/// Set once `fchmodat2` has answered ENOSYS (a kernel before 6.6).
static NO_FCHMODAT2: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// `chmod` of the object behind a handle, whatever it is (`O_PATH` included): fchmodat2 with
/// an empty path (Linux 6.6), which spares the path walk and magic link of the handle's
/// `/proc/self/fd` link, the way on older kernels. fchmod refuses `O_PATH` descriptors.
pub fn chmod_handle(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    use std::sync::atomic::Ordering;
    if !NO_FCHMODAT2.load(Ordering::Relaxed) {
        // SAFETY: valid fd and an empty NUL-terminated path; AT_EMPTY_PATH makes the call
        // act on the descriptor's own object.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_fchmodat2,
                fd.as_raw_fd(),
                c"".as_ptr(),
                mode,
                libc::AT_EMPTY_PATH,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENOSYS) => NO_FCHMODAT2.store(true, Ordering::Relaxed),
            // A seccomp filter that does not know the call may answer EPERM or EINVAL for
            // it: the /proc link below gives the real answer.
            Some(libc::EPERM | libc::EINVAL) => {}
            _ => return Err(e),
        }
    }
    chmod_through_proc(fd, mode)
}

/// [`chmod_handle`] through the handle's `/proc/self/fd` link.
fn chmod_through_proc(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    let path = proc_fd_path(fd);
    // SAFETY: valid path; the magic link resolves to the handle's own inode.
    check(unsafe { libc::chmod(path.as_ptr(), mode) })
}

#[cfg(test)]
mod chmod_nofollow_tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A layer directory holding `file` and `link`, a symlink to `outside` next to the layer:
    /// (outside, layer).
    pub(super) fn layer_with_a_link_out(
        tmp: &tempfile::TempDir,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, b"x").unwrap();
        let layer = tmp.path().join("layer");
        std::fs::create_dir(&layer).unwrap();
        std::fs::write(layer.join("file"), b"y").unwrap();
        std::os::unix::fs::symlink(&outside, layer.join("link")).unwrap();
        (outside, layer)
    }

    /// The mode bits of `p`, not following a symlink.
    fn mode(p: &std::path::Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode()
    }

    /// [`layer_with_a_link_out`] with the outside file at mode 0600, and the layer's
    /// `O_PATH` handle: (tmp, outside, layer, handle).
    fn chmod_fixture() -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::path::PathBuf,
        OwnedFd,
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let (outside, layer) = layer_with_a_link_out(&tmp);
        std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o600)).unwrap();
        let dir = open_dir_path(&layer).unwrap();
        (tmp, outside, layer, dir)
    }

    #[test]
    fn chmod_nofollow_changes_the_object_and_refuses_a_symlink() {
        let (_tmp, outside, layer, dir) = chmod_fixture();
        chmod_at(dir.as_fd(), c"file", 0o4751).unwrap();
        assert_eq!(mode(&layer.join("file")) & 0o7777, 0o4751);
        let err = chmod_at(dir.as_fd(), c"link", 0o777).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert_eq!(
            mode(&outside) & 0o7777,
            0o600,
            "the link's target was changed"
        );
    }

    /// Both ways of changing a handle's mode change the object itself, a file's or a
    /// directory's, and neither follows a symlink handle to its target: they agree.
    #[test]
    fn chmod_of_a_handle_acts_on_its_own_object_both_ways() {
        let (_tmp, outside, layer, dir) = chmod_fixture();
        type Chmod = fn(BorrowedFd<'_>, libc::mode_t) -> io::Result<()>;
        let ways: [(&str, Chmod); 2] = [("fchmodat2", chmod_handle), ("/proc", chmod_through_proc)];
        for (way, chmod) in ways {
            for (name, want) in [(c"file", 0o2741), (c"file", 0o600)] {
                let handle = open_path_at(dir.as_fd(), name).unwrap();
                chmod(handle.as_fd(), want).unwrap();
                assert_eq!(mode(&layer.join("file")) & 0o7777, want, "{way}");
            }
            chmod(dir.as_fd(), 0o751).unwrap();
            assert_eq!(mode(&layer) & 0o7777, 0o751, "{way}");
            let link = open_path_at(dir.as_fd(), c"link").unwrap();
            let refused = chmod(link.as_fd(), 0o777).map_err(|e| e.raw_os_error());
            assert_eq!(mode(&outside) & 0o7777, 0o600, "{way} followed the link");
            // Linux 6.6 and later refuse a symlink's mode change; both ways the same.
            assert_eq!(refused, Err(Some(libc::EOPNOTSUPP)), "{way}");
        }
    }
}

#[cfg(test)]
mod xattr_by_name_tests {
    use super::*;

    #[test]
    fn an_entry_attribute_is_read_by_name_without_following_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        let (_outside, layer) = super::chmod_nofollow_tests::layer_with_a_link_out(&tmp);
        let dir = open_dir_path(&layer).unwrap();
        let file = open_path_at(dir.as_fd(), c"file").unwrap();
        set_xattr(file.as_fd(), c"user.mark", b"in", 0).unwrap();
        let out = open_dir_path(tmp.path()).unwrap();
        let out_file = open_path_at(out.as_fd(), c"outside").unwrap();
        set_xattr(out_file.as_fd(), c"user.mark", b"out", 0).unwrap();

        let of = |name: &CStr, handle: BorrowedFd<'_>, attr: &CStr| {
            XattrSource::LowerEntry {
                dir: dir.as_fd(),
                name,
                handle,
            }
            .get(attr)
        };
        assert_eq!(
            of(c"file", file.as_fd(), c"user.mark").unwrap(),
            Some(b"in".to_vec())
        );
        assert_eq!(of(c"file", file.as_fd(), c"user.none").unwrap(), None);
        // The same answers through the handle.
        assert_eq!(
            XattrSource::Handle(file.as_fd()).get(c"user.mark").unwrap(),
            Some(b"in".to_vec())
        );
        // A symlink's own attributes (a user.* one it cannot have), never its target's.
        let link = open_path_at(dir.as_fd(), c"link").unwrap();
        let through_link = of(c"link", link.as_fd(), c"user.mark");
        assert!(
            !matches!(&through_link, Ok(Some(v)) if v == b"out"),
            "followed the symlink: {through_link:?}"
        );
    }
}

#[cfg(test)]
mod cachestat_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cachestat_counts_the_pages_of_a_range_in_the_page_cache() {
        // In the build directory, on a disk filesystem: tmpfs pages cannot be dropped.
        let tmp = tempfile::tempdir_in(concat!(env!("CARGO_MANIFEST_DIR"), "/target")).unwrap();
        let page = page_size();
        let path = tmp.path().join("file");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(&vec![7u8; 8 * page as usize]).unwrap();
        let dirty = cachestat(file.as_fd(), 0, 0).unwrap();
        assert_eq!((dirty.cached, dirty.dirty), (8, 8), "{dirty:?}");
        file.sync_all().unwrap();
        // SAFETY: plain advice on a valid descriptor.
        let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0);
        let file = std::fs::File::open(&path).unwrap();
        assert_eq!(cachestat(file.as_fd(), 0, 0).unwrap(), CacheStat::default());
        let mut buf = vec![0u8; page as usize];
        assert_eq!(
            pread(file.as_fd(), &mut buf, 2 * page).unwrap(),
            page as usize
        );
        // Readahead may bring more than the page read, never less.
        assert_eq!(cachestat(file.as_fd(), 2 * page, page).unwrap().cached, 1);
        assert_eq!(
            cachestat(file.as_fd(), 0, 2 * page).unwrap().cached,
            0,
            "pages before the read"
        );
    }
}
