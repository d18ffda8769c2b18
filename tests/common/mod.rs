//! Shared integration-test harness for ovlfuse.
//!
//! Everything here uses only std + libc + tempfile so the test crates compile
//! even while the filesystem itself is being rewritten.
//!
//! Binary selection: `OVLFUSE_BIN` (path of a compatible FUSE overlay binary,
//! e.g. `/usr/bin/fuse-overlayfs`) or the crate's own `ovlfuse` binary.  The
//! special value `OVLFUSE_BIN=kernel` makes `mount_ovlfuse` mount the kernel
//! overlay instead, which is only useful to validate the expectations of the
//! tests themselves.
#![allow(dead_code)]

pub mod bad_input;
pub mod canary_watch;
pub mod faultrig;
pub mod load;
pub mod powercut;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{CStr, CString, OsStr, OsString};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// small libc helpers
// ---------------------------------------------------------------------------

pub fn cstr(p: impl AsRef<OsStr>) -> CString {
    CString::new(p.as_ref().as_bytes()).expect("path contains NUL")
}

/// Mounts a tmpfs named `source` on `target` with mount `flags` and tmpfs `options`.
pub fn mount_tmpfs(
    source: &str,
    target: &Path,
    flags: libc::c_ulong,
    options: &str,
) -> io::Result<()> {
    let (src, dst, data) = (cstr(source), cstr(target), cstr(options));
    // SAFETY: valid NUL-terminated strings.
    cvt(unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            c"tmpfs".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn cvt_size(r: libc::ssize_t) -> io::Result<usize> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Symbolic name for an errno value ("ENOENT"), or "errno N".
pub fn errno_name(e: i32) -> String {
    let n = match e {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EIO => "EIO",
        libc::ENXIO => "ENXIO",
        libc::E2BIG => "E2BIG",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::EXDEV => "EXDEV",
        libc::ENODEV => "ENODEV",
        libc::ENOTDIR => "ENOTDIR",
        libc::EISDIR => "EISDIR",
        libc::EINVAL => "EINVAL",
        libc::EFBIG => "EFBIG",
        libc::ENOSPC => "ENOSPC",
        libc::ESPIPE => "ESPIPE",
        libc::EROFS => "EROFS",
        libc::EMLINK => "EMLINK",
        libc::ERANGE => "ERANGE",
        libc::ENAMETOOLONG => "ENAMETOOLONG",
        libc::ENOSYS => "ENOSYS",
        libc::ENOTEMPTY => "ENOTEMPTY",
        libc::ELOOP => "ELOOP",
        libc::ENODATA => "ENODATA",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ENOTCONN => "ENOTCONN",
        libc::ESTALE => "ESTALE",
        libc::ETXTBSY => "ETXTBSY",
        _ => return format!("errno {e}"),
    };
    n.to_string()
}

/// errno of an io::Error (panics for synthetic errors without one).
pub fn errno_of(e: &io::Error) -> i32 {
    e.raw_os_error()
        .unwrap_or_else(|| panic!("error without errno: {e}"))
}

/// `Ok(v)` -> panic; `Err(e)` -> errno.  For asserting that something fails.
#[track_caller]
pub fn expect_err<T: std::fmt::Debug>(r: io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got Ok({v:?})"),
        Err(e) => errno_of(&e),
    }
}

/// Format a result for op logs: "Ok(...)" / "Err(ENOENT)".
pub fn fmt_res<T>(r: &io::Result<T>, ok: impl FnOnce(&T) -> String) -> String {
    match r {
        Ok(v) => format!("Ok({})", ok(v)),
        Err(e) => match e.raw_os_error() {
            Some(n) => format!("Err({})", errno_name(n)),
            None => format!("Err({e})"),
        },
    }
}

pub fn lchown(p: &Path, uid: u32, gid: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::lchown(c.as_ptr(), uid, gid) }).map(|_| ())
}

pub fn mknod(p: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cstr(p);
    let dev = libc::makedev(major, minor);
    cvt(unsafe { libc::mknod(c.as_ptr(), mode as libc::mode_t, dev) }).map(|_| ())
}

pub fn mkfifo(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) })?;
    chmod_nofollow(p, mode)
}

fn chmod_nofollow(p: &Path, mode: u32) -> io::Result<()> {
    let c = cstr(p);
    cvt(unsafe { libc::fchmodat(libc::AT_FDCWD, c.as_ptr(), mode as libc::mode_t, 0) }).map(|_| ())
}

/// lsetxattr (does not follow symlinks).
pub fn set_xattr(p: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cstr(p);
    let n = cstr(name);
    cvt(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr() as *const libc::c_void,
            value.len(),
            0,
        )
    })
    .map(|_| ())
}

/// lgetxattr (does not follow symlinks).
pub fn get_xattr(p: &Path, name: &str) -> io::Result<Vec<u8>> {
    let c = cstr(p);
    let n = cstr(name);
    loop {
        let sz =
            cvt_size(unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), std::ptr::null_mut(), 0) })?;
        let mut buf = vec![0u8; sz + 1];
        match cvt_size(unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                n.as_ptr(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
            )
        }) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(buf);
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

/// llistxattr (does not follow symlinks); names in the order returned.
pub fn list_xattrs(p: &Path) -> io::Result<Vec<String>> {
    let c = cstr(p);
    loop {
        let sz = cvt_size(unsafe { libc::llistxattr(c.as_ptr(), std::ptr::null_mut(), 0) })?;
        if sz == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; sz + 1];
        match cvt_size(unsafe {
            libc::llistxattr(c.as_ptr(), buf.as_mut_ptr() as *mut libc::c_char, buf.len())
        }) {
            Ok(got) => {
                buf.truncate(got);
                return Ok(buf
                    .split(|b| *b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect());
            }
            Err(e) if e.raw_os_error() == Some(libc::ERANGE) => continue,
            Err(e) => return Err(e),
        }
    }
}

pub fn remove_xattr(p: &Path, name: &str) -> io::Result<()> {
    let c = cstr(p);
    let n = cstr(name);
    cvt(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) }).map(|_| ())
}

/// All names returned by libc readdir, including "." and "..", in order,
/// duplicates kept.
pub fn readdir_raw(p: &Path) -> io::Result<Vec<OsString>> {
    let c = cstr(p);
    let d = unsafe { libc::opendir(c.as_ptr()) };
    if d.is_null() {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let res = loop {
        unsafe { *libc::__errno_location() = 0 };
        let e = unsafe { libc::readdir(d) };
        if e.is_null() {
            let err = io::Error::last_os_error();
            break if err.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(err)
            };
        }
        let name = unsafe { CStr::from_ptr((*e).d_name.as_ptr()) };
        out.push(OsStr::from_bytes(name.to_bytes()).to_os_string());
    };
    unsafe { libc::closedir(d) };
    res.map(|_| out)
}

/// Visible names of a directory (no "." / ".."), sorted, duplicates kept.
pub fn list_names(p: &Path) -> io::Result<Vec<String>> {
    let mut v: Vec<String> = readdir_raw(p)?
        .into_iter()
        .filter(|n| n != "." && n != "..")
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    v.sort();
    Ok(v)
}

/// Problems of a raw readdir listing: duplicate names, missing "." / "..".
pub fn readdir_problems(raw: &[OsString]) -> Vec<String> {
    let mut seen: HashMap<&OsString, usize> = HashMap::new();
    for n in raw {
        *seen.entry(n).or_default() += 1;
    }
    let mut probs = Vec::new();
    for dot in [".", ".."] {
        match seen.get(&OsString::from(dot)).copied().unwrap_or(0) {
            1 => {}
            k => probs.push(format!("{dot:?} appears {k} times")),
        }
    }
    let mut dups: Vec<_> = seen
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(n, c)| (n.to_string_lossy().into_owned(), *c))
        .collect();
    dups.sort();
    for (n, c) in dups {
        if n != "." && n != ".." {
            probs.push(format!("{n:?} appears {c} times"));
        }
    }
    probs
}

// ---------------------------------------------------------------------------
// processes
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct CmdOut {
    /// exit code; None if killed by a signal or timed out
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub timed_out: bool,
}

impl CmdOut {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// Run a command with stdin=/dev/null, stdout/stderr captured through
/// anonymous temp files (not pipes: a daemonizing child may keep them open),
/// and kill it after `timeout`.
pub fn run_cmd(cmd: &mut Command, timeout: Duration) -> CmdOut {
    let out = tempfile::tempfile().expect("tempfile");
    let err = tempfile::tempfile().expect("tempfile");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(err.try_clone().unwrap()));
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return CmdOut {
                code: Some(127),
                stdout: String::new(),
                stderr: format!("spawn {cmd:?}: {e}"),
                timed_out: false,
            };
        }
    };
    let (code, timed_out) = wait_child(&mut child, timeout);
    let read = |mut f: File| {
        let mut s = String::new();
        let _ = f.seek(SeekFrom::Start(0));
        let mut b = Vec::new();
        let _ = f.read_to_end(&mut b);
        s.push_str(&String::from_utf8_lossy(&b));
        s
    };
    CmdOut {
        code,
        stdout: read(out),
        stderr: read(err),
        timed_out,
    }
}

/// Convenience: run argv with a timeout.
pub fn run_argv<S: AsRef<OsStr>>(argv: &[S], timeout: Duration) -> CmdOut {
    let mut c = Command::new(argv[0].as_ref());
    c.args(argv[1..].iter().map(|s| s.as_ref()));
    run_cmd(&mut c, timeout)
}

/// Poll a child until it exits or the timeout passes (then SIGKILL it).
/// Returns (exit code, timed_out).
fn wait_child(child: &mut Child, timeout: Duration) -> (Option<i32>, bool) {
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return (st.code(), false),
            Ok(None) => {}
            Err(_) => return (None, false),
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return (None, true);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn pid_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => {
            // state is the field after the ")" that closes comm
            let st = s
                .rfind(')')
                .and_then(|i| s[i + 1..].split_whitespace().next().map(|x| x.to_string()));
            !matches!(st.as_deref(), Some("Z") | Some("X") | None)
        }
        Err(_) => false,
    }
}

fn proc_cmdline(pid: i32) -> Option<Vec<OsString>> {
    let raw = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        raw.split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| OsStr::from_bytes(s).to_os_string())
            .collect(),
    )
}

/// Pids (other than ours) whose argv[0] has basename `bin_name` and whose
/// argv contains `mnt`.
pub fn find_daemons(bin_name: &OsStr, mnt: &Path) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut v = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return v;
    };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some(argv) = proc_cmdline(pid) else {
            continue;
        };
        let Some(a0) = argv.first() else { continue };
        if Path::new(a0).file_name() != Some(bin_name) {
            continue;
        }
        if argv.iter().skip(1).any(|a| Path::new(a) == mnt) && pid_alive(pid) {
            v.push(pid);
        }
    }
    v
}

// ---------------------------------------------------------------------------
// mount table
// ---------------------------------------------------------------------------

fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

/// (mountpoint, fstype) of every mount in /proc/self/mountinfo.
pub fn mounts() -> Vec<(PathBuf, String)> {
    let s = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    s.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((unescape_mountinfo(f.get(4)?), f.get(sep + 1)?.to_string()))
        })
        .collect()
}

pub fn is_mounted(p: &Path) -> bool {
    mounts().iter().any(|(m, _)| m == p)
}

/// The source ("device") column of the mount at `p`, as /proc/self/mountinfo shows it.
pub fn mount_source_of(p: &Path) -> Option<String> {
    let s = fs::read_to_string("/proc/self/mountinfo").ok()?;
    s.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let sep = f.iter().position(|x| *x == "-")?;
        (unescape_mountinfo(f.get(4)?) == p).then(|| f.get(sep + 2).map(|x| x.to_string()))?
    })
}

pub fn fstype_of(p: &Path) -> Option<String> {
    mounts().into_iter().rfind(|(m, _)| m == p).map(|(_, t)| t)
}

fn umount(p: &Path) {
    if !is_mounted(p) {
        return;
    }
    let r = run_argv(
        &[OsStr::new("umount"), p.as_os_str()],
        Duration::from_secs(5),
    );
    if !r.ok() && is_mounted(p) {
        let why = if r.timed_out {
            "timed out after 5 s".to_string()
        } else {
            r.stderr.trim().to_string()
        };
        eprintln!(
            "[harness] umount {} failed ({why}), trying lazy umount",
            p.display()
        );
        let r = run_argv(
            &[OsStr::new("umount"), OsStr::new("-l"), p.as_os_str()],
            Duration::from_secs(10),
        );
        if !r.ok() {
            eprintln!(
                "[harness] umount -l {} failed: {}",
                p.display(),
                r.stderr.trim()
            );
        }
    }
}

// ---------------------------------------------------------------------------
// scratch space
// ---------------------------------------------------------------------------

/// A temp dir under /tmp, removed on drop after anything still mounted
/// below it has been (lazily) unmounted.
pub struct Scratch {
    dir: tempfile::TempDir,
    counter: AtomicUsize,
}

impl Scratch {
    pub fn new() -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix("ovlfuse-it-")
            .tempdir_in("/tmp")
            .expect("create scratch dir");
        // make it traversable for everyone (tests may chown things)
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        Scratch {
            dir,
            counter: AtomicUsize::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A fresh, unique, empty directory inside the scratch dir.
    pub fn mkdir(&self, prefix: &str) -> PathBuf {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let p = self.path().join(format!("{prefix}{n}"));
        fs::create_dir(&p).unwrap();
        p
    }

    /// `n_lowers` empty lower dirs plus (optionally) upper + work dirs.
    pub fn layers(&self, n_lowers: usize, with_upper: bool) -> Layers {
        let base = self.mkdir("set");
        Layers::create(&base, n_lowers, with_upper)
    }
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch::new()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let root = self.dir.path().to_path_buf();
        let mut left: Vec<PathBuf> = mounts()
            .into_iter()
            .map(|(m, _)| m)
            .filter(|m| m.starts_with(&root))
            .collect();
        left.sort();
        left.reverse(); // deepest first
        for m in left {
            eprintln!(
                "[harness] scratch drop: {} still mounted, lazily unmounting",
                m.display()
            );
            let _ = run_argv(
                &[OsStr::new("umount"), OsStr::new("-l"), m.as_os_str()],
                Duration::from_secs(10),
            );
        }
        // TempDir removes the tree after this.
    }
}

// ---------------------------------------------------------------------------
// layers
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Layers {
    /// top first (same order as in `lowerdir=`)
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
}

/// Helper to populate one layer directory.  All paths are relative to the
/// layer root; missing parent directories are created (mode 0755).
#[derive(Debug, Clone)]
pub struct Layer(pub PathBuf);

impl Layers {
    /// Creates `base/l0..l{n-1}` and optionally `base/upper`, `base/work`.
    pub fn create(base: &Path, n_lowers: usize, with_upper: bool) -> Layers {
        let mut lowers = Vec::new();
        for i in 0..n_lowers {
            let p = base.join(format!("l{i}"));
            fs::create_dir_all(&p).unwrap();
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).unwrap();
            lowers.push(p);
        }
        let (upper, work) = if with_upper {
            let u = base.join("upper");
            let w = base.join("work");
            fs::create_dir_all(&u).unwrap();
            fs::create_dir_all(&w).unwrap();
            fs::set_permissions(&u, fs::Permissions::from_mode(0o755)).unwrap();
            (Some(u), Some(w))
        } else {
            (None, None)
        };
        Layers {
            lowers,
            upper,
            work,
        }
    }

    /// Lower layer `i` (0 = top-most lower).
    /// The upper and work directories (panics for a read-only union).
    pub fn upper_and_work(&self) -> (PathBuf, PathBuf) {
        (
            self.upper.clone().expect("a writable union"),
            self.work.clone().expect("a writable union"),
        )
    }

    pub fn lower(&self, i: usize) -> Layer {
        Layer(self.lowers[i].clone())
    }

    pub fn up(&self) -> Layer {
        Layer(self.upper.clone().expect("layers have no upper"))
    }

    /// The directory all layer dirs live in (parent of the first lower).
    pub fn base(&self) -> PathBuf {
        self.lowers[0].parent().unwrap().to_path_buf()
    }

    /// `lowerdir=..[,upperdir=..,workdir=..]`
    pub fn mount_opts(&self) -> String {
        let lowers: Vec<String> = self
            .lowers
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        let mut s = format!("lowerdir={}", lowers.join(":"));
        if let Some(u) = &self.upper {
            write!(s, ",upperdir={}", u.display()).unwrap();
        }
        if let Some(w) = &self.work {
            write!(s, ",workdir={}", w.display()).unwrap();
        }
        s
    }
}

impl Layer {
    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() || rel == "." {
            self.0.clone()
        } else {
            self.0.join(rel)
        }
    }

    fn parent_of(&self, rel: &str) -> PathBuf {
        let p = self.p(rel);
        let parent = p.parent().unwrap().to_path_buf();
        fs::create_dir_all(&parent)
            .unwrap_or_else(|e| panic!("mkdir -p {}: {e}", parent.display()));
        p
    }

    /// Regular file with exact mode (umask ignored).
    pub fn write_file(&self, rel: &str, bytes: &[u8], mode: u32) -> &Self {
        let p = self.parent_of(rel);
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&p)
            .unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
        f.write_all(bytes).unwrap();
        f.set_permissions(fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn mkdir(&self, rel: &str, mode: u32) -> &Self {
        let p = self.parent_of(rel);
        match fs::create_dir(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && p.is_dir() => {}
            Err(e) => panic!("mkdir {}: {e}", p.display()),
        }
        chmod_nofollow(&p, mode).unwrap();
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        let p = self.parent_of(rel);
        std::os::unix::fs::symlink(target, &p)
            .unwrap_or_else(|e| panic!("symlink {}: {e}", p.display()));
        self
    }

    /// `rel` becomes a hard link to the existing `existing` (both relative).
    pub fn hardlink(&self, existing: &str, rel: &str) -> &Self {
        let p = self.parent_of(rel);
        fs::hard_link(self.p(existing), &p).unwrap_or_else(|e| panic!("link {}: {e}", p.display()));
        self
    }

    pub fn mkfifo(&self, rel: &str, mode: u32) -> &Self {
        let p = self.parent_of(rel);
        mkfifo(&p, mode).unwrap_or_else(|e| panic!("mkfifo {}: {e}", p.display()));
        self
    }

    pub fn mknod_char(&self, rel: &str, mode: u32, major: u32, minor: u32) -> &Self {
        let p = self.parent_of(rel);
        mknod(&p, libc::S_IFCHR | mode, major, minor)
            .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
        chmod_nofollow(&p, mode).unwrap();
        self
    }

    pub fn mknod_block(&self, rel: &str, mode: u32, major: u32, minor: u32) -> &Self {
        let p = self.parent_of(rel);
        mknod(&p, libc::S_IFBLK | mode, major, minor)
            .unwrap_or_else(|e| panic!("mknod {}: {e}", p.display()));
        chmod_nofollow(&p, mode).unwrap();
        self
    }

    /// Kernel-format whiteout: a character device 0/0 named `rel`.
    pub fn whiteout(&self, rel: &str) -> &Self {
        let p = self.parent_of(rel);
        mknod(&p, libc::S_IFCHR, 0, 0).unwrap_or_else(|e| panic!("whiteout {}: {e}", p.display()));
        self
    }

    /// AUFS-format whiteout: an empty regular file `.wh.NAME` next to NAME.
    pub fn aufs_whiteout(&self, rel: &str) -> &Self {
        let p = self.p(rel);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let dir = p.parent().unwrap();
        let r = dir
            .strip_prefix(&self.0)
            .unwrap()
            .join(format!(".wh.{name}"));
        self.write_file(r.to_str().unwrap(), b"", 0o644)
    }

    /// Directory made opaque with `trusted.overlay.opaque=y` (created if
    /// missing).
    pub fn opaque_dir(&self, rel: &str) -> &Self {
        if !self.p(rel).is_dir() {
            self.mkdir(rel, 0o755);
        }
        set_xattr(&self.p(rel), "trusted.overlay.opaque", b"y").unwrap();
        self
    }

    /// Directory made opaque with `user.overlay.opaque=y` (for `-o userxattr`).
    pub fn user_opaque_dir(&self, rel: &str) -> &Self {
        if !self.p(rel).is_dir() {
            self.mkdir(rel, 0o755);
        }
        set_xattr(&self.p(rel), "user.overlay.opaque", b"y").unwrap();
        self
    }

    /// AUFS-format opaque directory: contains an empty `.wh..wh..opq` file.
    pub fn aufs_opaque_dir(&self, rel: &str) -> &Self {
        if !self.p(rel).is_dir() {
            self.mkdir(rel, 0o755);
        }
        let marker = if rel.is_empty() {
            ".wh..wh..opq".to_string()
        } else {
            format!("{rel}/.wh..wh..opq")
        };
        self.write_file(&marker, b"", 0o644)
    }

    /// lsetxattr on an existing entry (`user.*`, `trusted.*`, ...).
    pub fn setxattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        let p = self.p(rel);
        set_xattr(&p, name, value)
            .unwrap_or_else(|e| panic!("setxattr {} {name}: {e}", p.display()));
        self
    }

    /// Sparse file of `size` bytes, with `chunks` written at their offsets.
    pub fn sparse_file(&self, rel: &str, size: u64, chunks: &[(u64, &[u8])], mode: u32) -> &Self {
        let p = self.parent_of(rel);
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        f.set_len(size).unwrap();
        for (off, data) in chunks {
            f.write_all_at(data, *off).unwrap();
        }
        f.set_permissions(fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    /// lchown (does not follow symlinks).
    pub fn chown(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let p = self.p(rel);
        lchown(&p, uid, gid).unwrap_or_else(|e| panic!("chown {}: {e}", p.display()));
        self
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        chmod_nofollow(&self.p(rel), mode).unwrap();
        self
    }
}

/// `cp -a from to`: keeps xattrs incl. trusted.*, device nodes, hard links and holes.
pub fn cp_a(from: &Path, to: &Path) {
    let r = run_argv(
        &[
            OsStr::new("cp"),
            OsStr::new("-a"),
            from.as_os_str(),
            to.as_os_str(),
        ],
        Duration::from_secs(300),
    );
    assert!(
        r.ok(),
        "cp -a {} {} failed: {}{}",
        from.display(),
        to.display(),
        r.stdout,
        r.stderr
    );
}

/// An identical copy of every layer (`cp -a`: keeps xattrs incl. trusted.*,
/// device nodes, hard links, sparseness) in `dest/`; a fresh empty work dir.
pub fn copy_layers(src: &Layers, dest: &Path) -> Layers {
    fs::create_dir_all(dest).unwrap();
    let cp = |from: &Path, name: &str| -> PathBuf {
        let to = dest.join(name);
        cp_a(from, &to);
        to
    };
    let lowers = src
        .lowers
        .iter()
        .enumerate()
        .map(|(i, l)| cp(l, &format!("l{i}")))
        .collect();
    let upper = src.upper.as_ref().map(|u| cp(u, "upper"));
    let work = src.work.as_ref().map(|_| {
        let w = dest.join("work");
        fs::create_dir_all(&w).unwrap();
        w
    });
    Layers {
        lowers,
        upper,
        work,
    }
}

// ---------------------------------------------------------------------------
// mounting
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (file contents that catch offset mix-ups).
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Path of the filesystem binary under test.
pub fn ovlfuse_bin() -> PathBuf {
    match std::env::var_os("OVLFUSE_BIN") {
        Some(b) if !b.is_empty() => PathBuf::from(b),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_ovlfuse")),
    }
}

/// True when OVLFUSE_BIN=kernel (tests run against the kernel overlay).
pub fn testing_kernel_instead() -> bool {
    std::env::var_os("OVLFUSE_BIN").is_some_and(|v| v == "kernel")
}

static MNT_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn new_mountpoint(layers: &Layers, tag: &str) -> PathBuf {
    let n = MNT_COUNTER.fetch_add(1, Ordering::SeqCst);
    let p = layers.base().join(format!("mnt-{tag}-{n}"));
    fs::create_dir_all(&p).unwrap();
    p
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountKind {
    Daemon,
    Foreground,
    Kernel,
}

/// A mounted overlay.  Drop unmounts (lazily if needed), waits up to ~10 s
/// for the daemon to exit and SIGKILLs it otherwise.
pub struct Mounted {
    pub mnt: PathBuf,
    pub layers: Layers,
    pub kind: MountKind,
    pub bin: Option<PathBuf>,
    pid: Option<i32>,
    child: Option<Child>,
    /// stdout/stderr of the mount command (daemon mode)
    pub mount_output: String,
    torn_down: bool,
}

impl Mounted {
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `mnt.join(rel)`
    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() || rel == "." {
            self.mnt.clone()
        } else {
            self.mnt.join(rel)
        }
    }

    pub fn daemon_pid(&self) -> Option<i32> {
        self.pid
            .or_else(|| self.child.as_ref().map(|c| c.id() as i32))
    }

    /// For a foreground mount: wait for the daemon to exit on its own (after an unmount or a
    /// signal) and return its exit code; `None` if it had to be killed after `timeout`.
    pub fn wait_foreground(&mut self, timeout: Duration) -> Option<i32> {
        let child = self.child.as_mut().expect("not a foreground mount");
        let (code, _timed_out) = wait_child(child, timeout);
        code
    }

    /// Unmount now (idempotent; also done by Drop).
    pub fn unmount(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        umount(&self.mnt);
        let deadline = Instant::now() + Duration::from_secs(10);
        if let Some(child) = self.child.as_mut() {
            let (_, timed_out) = wait_child(child, Duration::from_secs(10));
            if timed_out {
                eprintln!(
                    "[harness] foreground daemon for {} did not exit in 10 s: killed",
                    self.mnt.display()
                );
            }
        } else if let Some(pid) = self.pid {
            while pid_alive(pid) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if pid_alive(pid) {
                eprintln!(
                    "[harness] daemon {pid} for {} did not exit in 10 s: SIGKILL",
                    self.mnt.display()
                );
                unsafe { libc::kill(pid, libc::SIGKILL) };
                let d2 = Instant::now() + Duration::from_secs(5);
                while pid_alive(pid) && Instant::now() < d2 {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
        // any other stray daemon for this mountpoint
        if let Some(bin) = &self.bin
            && let Some(name) = bin.file_name()
        {
            for pid in find_daemons(name, &self.mnt) {
                eprintln!(
                    "[harness] stray daemon {pid} for {}: SIGKILL",
                    self.mnt.display()
                );
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        if is_mounted(&self.mnt) {
            let _ = run_argv(
                &[OsStr::new("umount"), OsStr::new("-l"), self.mnt.as_os_str()],
                Duration::from_secs(10),
            );
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// Mount the filesystem under test in daemon mode.  Asserts the mount command
/// exits 0 and that the mountpoint shows up in /proc/self/mountinfo.
pub fn mount_ovlfuse(layers: &Layers, extra_opts: &str) -> Mounted {
    if testing_kernel_instead() {
        return mount_kernel_overlay_opts(layers, extra_opts);
    }
    let opts = join_opts(&layers.mount_opts(), extra_opts);
    mount_ovlfuse_with(layers, |mnt| {
        vec!["-o".into(), opts.clone().into(), mnt.as_os_str().to_owned()]
    })
}

/// Mount the filesystem under test in daemon mode with the arguments `args`
/// builds from the mountpoint (for tests of the command-line shapes), with
/// the same checks and guard as [`mount_ovlfuse`].
pub fn mount_ovlfuse_with(layers: &Layers, args: impl FnOnce(&Path) -> Vec<OsString>) -> Mounted {
    let bin = ovlfuse_bin();
    mount_ovlfuse_cmd(layers, |mnt| {
        let mut argv = vec![bin.clone().into_os_string()];
        argv.extend(args(mnt));
        argv
    })
}

/// Runs the full command line `argv` (program first) that must mount the filesystem under
/// test, in daemon mode, with the checks and guard of [`mount_ovlfuse`].
fn mount_ovlfuse_cmd(layers: &Layers, argv: impl FnOnce(&Path) -> Vec<OsString>) -> Mounted {
    mount_ovlfuse_command(layers, |mnt| {
        let argv = argv(mnt);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]);
        cmd
    })
}

/// Mounts the filesystem under test in daemon mode under a seccomp filter that answers EPERM to every mknod/mknodat
/// and to renameat2 with RENAME_WHITEOUT, as a process without the right to create
/// whiteout devices sees (e.g. rootless, on an upper it does not own).
pub fn mount_ovlfuse_denying_whiteout_devices(layers: &Layers, extra_opts: &str) -> Mounted {
    use std::os::unix::process::CommandExt;
    let opts = join_opts(&layers.mount_opts(), extra_opts);
    mount_ovlfuse_command(layers, |mnt| {
        let mut cmd = Command::new(ovlfuse_bin());
        cmd.arg("-o").arg(&opts).arg(mnt);
        // SAFETY: only async-signal-safe prctl calls between fork and exec.
        unsafe { cmd.pre_exec(deny_whiteout_devices) };
        cmd
    })
}

fn deny_whiteout_devices() -> io::Result<()> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jump = |code, k, jt, jf| libc::sock_filter { code, jt, jf, k };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let filter = [
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(JEQ_K, libc::SYS_mknodat as u32, 4, 0),
        jump(JEQ_K, libc::SYS_mknod as u32, 3, 0),
        jump(JEQ_K, libc::SYS_renameat2 as u32, 0, 3),
        stmt(LD_W_ABS, 16 + 4 * 8), // low half of args[4], the rename flags
        jump(JSET_K, libc::RENAME_WHITEOUT, 0, 1),
        stmt(RET_K, deny),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid filter program that outlives the call.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Runs the command `build` makes for the mountpoint, which must mount the filesystem under
/// test in daemon mode, with the checks and guard of [`mount_ovlfuse`].
pub fn mount_ovlfuse_command(layers: &Layers, build: impl FnOnce(&Path) -> Command) -> Mounted {
    let bin = ovlfuse_bin();
    let mnt = new_mountpoint(layers, "fuse");
    let mut cmd = build(&mnt);
    let opts = format!("{:?}", cmd.get_args().collect::<Vec<_>>());
    let r = run_cmd(&mut cmd, Duration::from_secs(30));
    let output = format!("{}{}", r.stdout, r.stderr);
    let mut m = Mounted {
        mnt: mnt.clone(),
        layers: layers.clone(),
        kind: MountKind::Daemon,
        bin: Some(bin.clone()),
        pid: None,
        child: None,
        mount_output: output.clone(),
        torn_down: false,
    };
    // from here on, `m`'s Drop cleans up even if the asserts below fail
    assert!(
        !r.timed_out,
        "{} {opts} {} did not return within 30 s (does it daemonize?)\n{output}",
        bin.display(),
        mnt.display()
    );
    assert_eq!(
        r.code,
        Some(0),
        "{} {opts} {} failed\n{output}",
        bin.display(),
        mnt.display()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !is_mounted(&mnt) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert!(
        is_mounted(&mnt),
        "{} exited 0 but {} is not in /proc/self/mountinfo\n{output}",
        bin.display(),
        mnt.display()
    );
    let name = bin.file_name().unwrap().to_os_string();
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let pids = find_daemons(&name, &mnt);
        if let Some(p) = pids.first() {
            m.pid = Some(*p);
            break;
        }
        if Instant::now() > deadline {
            eprintln!(
                "[harness] warning: no daemon process found for {}",
                mnt.display()
            );
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    m
}

/// Mount the filesystem under test with `-f` (foreground), waiting up to
/// 30 s for the mount to appear.
pub fn mount_ovlfuse_foreground(layers: &Layers, extra_opts: &str) -> Mounted {
    if testing_kernel_instead() {
        return mount_kernel_overlay_opts(layers, extra_opts);
    }
    let bin = ovlfuse_bin();
    let mnt = new_mountpoint(layers, "fusefg");
    let opts = join_opts(&layers.mount_opts(), extra_opts);
    let log = tempfile::tempfile().unwrap();
    let child = Command::new(&bin)
        .arg("-f")
        .arg("-o")
        .arg(&opts)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log.try_clone().unwrap()))
        .stderr(Stdio::from(log.try_clone().unwrap()))
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));
    let mut m = Mounted {
        mnt: mnt.clone(),
        layers: layers.clone(),
        kind: MountKind::Foreground,
        bin: Some(bin.clone()),
        pid: None,
        child: Some(child),
        mount_output: String::new(),
        torn_down: false,
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if is_mounted(&mnt) {
            break;
        }
        if let Ok(Some(st)) = m.child.as_mut().unwrap().try_wait() {
            let mut s = String::new();
            let mut l = log;
            let _ = l.seek(SeekFrom::Start(0));
            let _ = l.read_to_string(&mut s);
            panic!(
                "{} -f exited ({st}) before mounting {}\n{s}",
                bin.display(),
                mnt.display()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} -f did not mount {} within 30 s",
            bin.display(),
            mnt.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
    m
}

/// Mount the kernel overlay over `layers`.
pub fn mount_kernel_overlay(layers: &Layers) -> Mounted {
    mount_kernel_overlay_opts(layers, "")
}

pub fn mount_kernel_overlay_opts(layers: &Layers, extra_opts: &str) -> Mounted {
    let mnt = new_mountpoint(layers, "kernel");
    let opts = join_opts(&layers.mount_opts(), extra_opts);
    let r = run_argv(
        &[
            OsStr::new("mount"),
            OsStr::new("-t"),
            OsStr::new("overlay"),
            OsStr::new("overlay"),
            OsStr::new("-o"),
            OsStr::new(&opts),
            mnt.as_os_str(),
        ],
        Duration::from_secs(30),
    );
    let m = Mounted {
        mnt: mnt.clone(),
        layers: layers.clone(),
        kind: MountKind::Kernel,
        bin: None,
        pid: None,
        child: None,
        mount_output: format!("{}{}", r.stdout, r.stderr),
        torn_down: false,
    };
    assert!(
        r.ok(),
        "mount -t overlay -o {opts} {} failed: {}{}",
        mnt.display(),
        r.stdout,
        r.stderr
    );
    assert!(
        is_mounted(&mnt),
        "kernel overlay mount of {} not in mountinfo",
        mnt.display()
    );
    m
}

fn join_opts(a: &str, b: &str) -> String {
    let b = b.trim_matches(',');
    if b.is_empty() {
        a.to_string()
    } else {
        format!("{a},{b}")
    }
}

// ---------------------------------------------------------------------------
// timeouts
// ---------------------------------------------------------------------------

/// Run `f` on another thread; panic if it does not finish within `secs`
/// (a hung FUSE daemon must fail the test, not hang it).  Panics inside `f`
/// are propagated.  After a timeout the stuck thread is left behind; the
/// mount guard's Drop lazily unmounts and kills the daemon, which unblocks it.
pub fn with_timeout<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    let h = thread::Builder::new()
        .name("fs-access".into())
        .spawn(move || {
            let v = f();
            let _ = tx.send(v);
        })
        .expect("spawn fs-access thread");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(v) => {
            let _ = h.join();
            v
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => match h.join() {
            Err(payload) => std::panic::resume_unwind(payload),
            Ok(()) => unreachable!("fs-access thread ended without a result"),
        },
        Err(mpsc::RecvTimeoutError::Timeout) => panic!(
            "filesystem access did not finish within {secs} s: the FUSE daemon probably hangs \
             (the mount is now lazily unmounted and the daemon killed)"
        ),
    }
}

// ---------------------------------------------------------------------------
// snapshots
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    File,
    Dir,
    Symlink,
    Fifo,
    Char,
    Block,
    Socket,
}

pub fn kind_of(mode: u32) -> Kind {
    match mode & libc::S_IFMT {
        libc::S_IFREG => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFCHR => Kind::Char,
        libc::S_IFBLK => Kind::Block,
        libc::S_IFSOCK => Kind::Socket,
        other => panic!("unknown file type {other:o}"),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: Kind,
    /// permission bits (07777)
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// files and symlinks only (0 otherwise)
    pub size: u64,
    /// link count for non-directories (0 for directories)
    pub nlink: u64,
    /// content hash of regular files (large files: a few regions only)
    pub content: Option<u64>,
    /// symlink target
    pub target: Option<OsString>,
    /// (major, minor) for char/block devices
    pub rdev: Option<(u32, u32)>,
    /// sorted (name, value); value is Err(errno name) if getxattr failed
    pub xattrs: Vec<(String, Result<Vec<u8>, String>)>,
    /// directories: names from libc readdir, sorted, without "." and "..",
    /// duplicates kept
    pub names: Option<Vec<OsString>>,
    /// directories: duplicate names / missing dot entries
    pub readdir_problems: Vec<String>,
    /// other paths in the tree with the same st_ino (non-directories)
    pub hardlinks: Vec<PathBuf>,
    /// error while reading this entry (content/xattrs/readdir)
    pub error: Option<String>,
}

pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Files bigger than this are hashed by regions only.
pub const BIG_FILE: u64 = 64 << 20;

#[derive(Clone, Default)]
pub struct SnapOpts {
    /// xattr names (exact, or prefixes ending in '*') to leave out
    pub ignore_xattrs: Vec<String>,
}

struct Fnv(u64);
impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf29ce484222325)
    }
    fn write(&mut self, b: &[u8]) {
        for x in b {
            self.0 ^= *x as u64;
            self.0 = self.0.wrapping_mul(0x100000001b3);
        }
    }
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = Fnv::new();
    h.write(b);
    h.0
}

/// Content hash of a regular file.  Files up to BIG_FILE are streamed;
/// larger (typically sparse) files are sampled: 1 MiB at 0, at every GiB
/// boundary, and at the end.
pub fn hash_file(p: &Path) -> io::Result<u64> {
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)?;
    let size = f.metadata()?.len();
    let mut h = Fnv::new();
    let mut buf = vec![0u8; 1 << 20];
    if size <= BIG_FILE {
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.write(&buf[..n]);
        }
    } else {
        let mut offs: Vec<u64> = (0..=size / (1 << 30)).map(|g| g << 30).collect();
        offs.push(size.saturating_sub(1 << 20));
        for off in offs {
            let mut got = 0;
            while got < buf.len() {
                let n = f.read_at(&mut buf[got..], off + got as u64)?;
                if n == 0 {
                    break;
                }
                got += n;
            }
            h.write(&off.to_le_bytes());
            h.write(&buf[..got]);
        }
    }
    Ok(h.0)
}

fn ignored(name: &str, opts: &SnapOpts) -> bool {
    opts.ignore_xattrs
        .iter()
        .any(|i| match i.strip_suffix('*') {
            Some(pref) => name.starts_with(pref),
            None => name == i,
        })
}

pub fn snapshot(root: &Path) -> Snapshot {
    snapshot_with(root, &SnapOpts::default())
}

/// Walk `root` (not following symlinks) and record every entry.
pub fn snapshot_with(root: &Path, opts: &SnapOpts) -> Snapshot {
    let mut out = Snapshot::new();
    let mut inos: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = if rel.as_os_str().is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let md = match fs::symlink_metadata(&abs) {
            Ok(m) => m,
            Err(e) => {
                // listed by readdir but not lstat-able: record as an error
                out.insert(
                    rel.clone(),
                    Entry {
                        kind: Kind::File,
                        mode: 0,
                        uid: 0,
                        gid: 0,
                        size: 0,
                        nlink: 0,
                        content: None,
                        target: None,
                        rdev: None,
                        xattrs: vec![],
                        names: None,
                        readdir_problems: vec![],
                        hardlinks: vec![],
                        error: Some(format!(
                            "lstat: {}",
                            fmt_res::<()>(&Err(e), |_| String::new())
                        )),
                    },
                );
                continue;
            }
        };
        let kind = kind_of(md.mode());
        let mut e = Entry {
            kind,
            mode: md.mode() & 0o7777,
            uid: md.uid(),
            gid: md.gid(),
            size: if matches!(kind, Kind::File | Kind::Symlink) {
                md.size()
            } else {
                0
            },
            nlink: if kind == Kind::Dir { 0 } else { md.nlink() },
            content: None,
            target: None,
            rdev: None,
            xattrs: vec![],
            names: None,
            readdir_problems: vec![],
            hardlinks: vec![],
            error: None,
        };
        let mut errs = Vec::new();
        match kind {
            Kind::File => match hash_file(&abs) {
                Ok(h) => e.content = Some(h),
                Err(err) => errs.push(format!(
                    "read: {}",
                    fmt_res::<()>(&Err(err), |_| String::new())
                )),
            },
            Kind::Symlink => match fs::read_link(&abs) {
                Ok(t) => e.target = Some(t.into_os_string()),
                Err(err) => errs.push(format!(
                    "readlink: {}",
                    fmt_res::<()>(&Err(err), |_| String::new())
                )),
            },
            Kind::Char | Kind::Block => {
                let rd = md.rdev();
                e.rdev = Some((libc::major(rd), libc::minor(rd)));
            }
            Kind::Dir => match readdir_raw(&abs) {
                Ok(raw) => {
                    e.readdir_problems = readdir_problems(&raw);
                    let mut names: Vec<OsString> =
                        raw.into_iter().filter(|n| n != "." && n != "..").collect();
                    names.sort();
                    let uniq: BTreeSet<OsString> = names.iter().cloned().collect();
                    for n in uniq {
                        stack.push(if rel.as_os_str().is_empty() {
                            PathBuf::from(&n)
                        } else {
                            rel.join(&n)
                        });
                    }
                    e.names = Some(names);
                }
                Err(err) => errs.push(format!(
                    "readdir: {}",
                    fmt_res::<()>(&Err(err), |_| String::new())
                )),
            },
            _ => {}
        }
        match list_xattrs(&abs) {
            Ok(mut names) => {
                names.sort();
                for n in names {
                    if ignored(&n, opts) {
                        continue;
                    }
                    let v = get_xattr(&abs, &n)
                        .map_err(|err| fmt_res::<()>(&Err(err), |_| String::new()));
                    e.xattrs.push((n, v));
                }
            }
            // symlinks / special files on some filesystems
            Err(err)
                if matches!(
                    err.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EPERM)
                ) => {}
            Err(err) => errs.push(format!(
                "listxattr: {}",
                fmt_res::<()>(&Err(err), |_| String::new())
            )),
        }
        if !errs.is_empty() {
            e.error = Some(errs.join("; "));
        }
        if kind != Kind::Dir && md.nlink() > 1 {
            inos.entry(md.ino()).or_default().push(rel.clone());
        }
        out.insert(rel, e);
    }
    for group in inos.values() {
        for p in group {
            let others: Vec<PathBuf> = group.iter().filter(|q| *q != p).cloned().collect();
            out.get_mut(p).unwrap().hardlinks = others;
        }
    }
    out
}

pub fn show_path(p: &Path) -> String {
    if p.as_os_str().is_empty() {
        ".".into()
    } else {
        p.display().to_string()
    }
}

fn show_xattrs(x: &[(String, Result<Vec<u8>, String>)]) -> String {
    let parts: Vec<String> = x
        .iter()
        .map(|(n, v)| match v {
            Ok(b) => format!("{n}={:?}", String::from_utf8_lossy(b)),
            Err(e) => format!("{n}=<{e}>"),
        })
        .collect();
    format!("[{}]", parts.join(", "))
}

fn show_names(n: &Option<Vec<OsString>>) -> String {
    match n {
        None => "-".into(),
        Some(v) if v.len() > 20 => format!("{} names", v.len()),
        Some(v) => format!("{v:?}"),
    }
}

/// Human-readable differences between two snapshots ("a" vs "b", labelled).
pub fn diff_snapshots_labeled(a: &Snapshot, b: &Snapshot, la: &str, lb: &str) -> Vec<String> {
    let mut d = Vec::new();
    let keys: BTreeSet<&PathBuf> = a.keys().chain(b.keys()).collect();
    for k in keys {
        let p = show_path(k);
        match (a.get(k), b.get(k)) {
            (Some(x), None) => d.push(format!("{p}: only in {la} ({:?})", x.kind)),
            (None, Some(y)) => d.push(format!("{p}: only in {lb} ({:?})", y.kind)),
            (Some(x), Some(y)) => {
                macro_rules! cmp {
                    ($f:ident, $fmt:expr) => {
                        if x.$f != y.$f {
                            d.push(format!(
                                "{p}: {} differs: {la}={} {lb}={}",
                                stringify!($f),
                                $fmt(&x.$f),
                                $fmt(&y.$f)
                            ));
                        }
                    };
                }
                cmp!(kind, |v: &Kind| format!("{v:?}"));
                cmp!(mode, |v: &u32| format!("{v:04o}"));
                cmp!(uid, |v: &u32| v.to_string());
                cmp!(gid, |v: &u32| v.to_string());
                cmp!(size, |v: &u64| v.to_string());
                cmp!(nlink, |v: &u64| v.to_string());
                cmp!(content, |v: &Option<u64>| format!("{v:x?}"));
                cmp!(target, |v: &Option<OsString>| format!("{v:?}"));
                cmp!(rdev, |v: &Option<(u32, u32)>| format!("{v:?}"));
                cmp!(xattrs, |v: &Vec<(String, Result<Vec<u8>, String>)>| {
                    show_xattrs(v)
                });
                if x.names != y.names {
                    let sa: BTreeSet<&OsString> = x.names.iter().flatten().collect();
                    let sb: BTreeSet<&OsString> = y.names.iter().flatten().collect();
                    let only_a: Vec<_> = sa.difference(&sb).collect();
                    let only_b: Vec<_> = sb.difference(&sa).collect();
                    d.push(format!(
                        "{p}: readdir names differ: {la}={} {lb}={}; only in {la}: {only_a:?}; only in {lb}: {only_b:?}",
                        show_names(&x.names),
                        show_names(&y.names)
                    ));
                }
                cmp!(readdir_problems, |v: &Vec<String>| format!("{v:?}"));
                cmp!(hardlinks, |v: &Vec<PathBuf>| format!("{v:?}"));
                cmp!(error, |v: &Option<String>| format!("{v:?}"));
            }
            (None, None) => unreachable!(),
        }
    }
    d
}

pub fn diff_snapshots(a: &Snapshot, b: &Snapshot) -> Vec<String> {
    diff_snapshots_labeled(a, b, "a", "b")
}

/// Problems inside one snapshot of a merged view: readdir duplicates,
/// missing dot entries, entries that could not be read.
pub fn snapshot_problems(s: &Snapshot) -> Vec<String> {
    let mut v = Vec::new();
    for (k, e) in s {
        for p in &e.readdir_problems {
            v.push(format!("{}: readdir: {p}", show_path(k)));
        }
        if let Some(err) = &e.error {
            v.push(format!("{}: {err}", show_path(k)));
        }
    }
    v
}

/// Snapshot both trees (each under a timeout) and panic listing every
/// difference.
pub fn assert_same_tree(kernel_root: &Path, ovlfuse_root: &Path) {
    let k = kernel_root.to_path_buf();
    let o = ovlfuse_root.to_path_buf();
    let ks = with_timeout(300, move || snapshot(&k));
    let os = with_timeout(300, move || snapshot(&o));
    let mut d = diff_snapshots_labeled(&ks, &os, "kernel", "ovlfuse");
    d.extend(
        snapshot_problems(&os)
            .into_iter()
            .map(|p| format!("ovlfuse: {p}")),
    );
    assert!(
        d.is_empty(),
        "merged trees differ ({} problems):\n  {}",
        d.len(),
        d.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// op logs for differential scenarios
// ---------------------------------------------------------------------------

/// Runs operations relative to a merged root and logs each result as one
/// line ("stat a/b: Ok(File 0644 0:0 size=3 nlink=1)", "unlink x: Err(ENOENT)").
/// Nothing implementation-specific (inode numbers, times, dir sizes) is logged.
pub struct OpLog {
    pub root: PathBuf,
    pub log: Vec<String>,
}

pub fn fmt_md(m: &fs::Metadata) -> String {
    let k = kind_of(m.mode());
    let mut s = format!("{k:?} {:04o} {}:{}", m.mode() & 0o7777, m.uid(), m.gid());
    if matches!(k, Kind::File | Kind::Symlink) {
        write!(s, " size={}", m.size()).unwrap();
    }
    if k != Kind::Dir {
        write!(s, " nlink={}", m.nlink()).unwrap();
    }
    if matches!(k, Kind::Char | Kind::Block) {
        write!(
            s,
            " rdev={}:{}",
            libc::major(m.rdev()),
            libc::minor(m.rdev())
        )
        .unwrap();
    }
    s
}

impl OpLog {
    pub fn new(root: &Path) -> OpLog {
        OpLog {
            root: root.to_path_buf(),
            log: Vec::new(),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        if rel.is_empty() || rel == "." {
            self.root.clone()
        } else {
            self.root.join(rel)
        }
    }

    pub fn push(&mut self, s: String) {
        self.log.push(s);
    }

    fn rec<T>(
        &mut self,
        what: String,
        r: io::Result<T>,
        ok: impl FnOnce(&T) -> String,
    ) -> io::Result<T> {
        let line = format!("{what}: {}", fmt_res(&r, ok));
        self.log.push(line);
        r
    }

    pub fn read(&mut self, rel: &str) -> io::Result<Vec<u8>> {
        let r = fs::read(self.p(rel));
        self.rec(format!("read {rel}"), r, |b| {
            format!("len={} hash={:016x}", b.len(), hash_bytes(b))
        })
    }

    pub fn pread(&mut self, rel: &str, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let r = File::open(self.p(rel)).and_then(|f| {
            let mut buf = vec![0u8; len];
            let n = f.read_at(&mut buf, off)?;
            buf.truncate(n);
            Ok(buf)
        });
        self.rec(format!("pread {rel} @{off}+{len}"), r, |b| {
            format!("len={} hash={:016x}", b.len(), hash_bytes(b))
        })
    }

    pub fn stat(&mut self, rel: &str) -> io::Result<fs::Metadata> {
        let r = fs::metadata(self.p(rel));
        self.rec(format!("stat {rel}"), r, fmt_md)
    }

    pub fn lstat(&mut self, rel: &str) -> io::Result<fs::Metadata> {
        let r = fs::symlink_metadata(self.p(rel));
        self.rec(format!("lstat {rel}"), r, fmt_md)
    }

    pub fn readlink(&mut self, rel: &str) -> io::Result<PathBuf> {
        let r = fs::read_link(self.p(rel));
        self.rec(format!("readlink {rel}"), r, |t| format!("{t:?}"))
    }

    pub fn readdir(&mut self, rel: &str) -> io::Result<Vec<OsString>> {
        let r = readdir_raw(&self.p(rel));
        self.rec(format!("readdir {rel}"), r, |raw| {
            let probs = readdir_problems(raw);
            let mut v: Vec<_> = raw.iter().filter(|n| *n != "." && *n != "..").collect();
            v.sort();
            if probs.is_empty() {
                format!("{v:?}")
            } else {
                format!("{v:?} PROBLEMS {probs:?}")
            }
        })
    }

    pub fn listxattr(&mut self, rel: &str) -> io::Result<Vec<String>> {
        let r = list_xattrs(&self.p(rel)).map(|mut v| {
            v.sort();
            v
        });
        self.rec(format!("listxattr {rel}"), r, |v| format!("{v:?}"))
    }

    pub fn getxattr(&mut self, rel: &str, name: &str) -> io::Result<Vec<u8>> {
        let r = get_xattr(&self.p(rel), name);
        self.rec(format!("getxattr {rel} {name}"), r, |v| {
            format!("{:?}", String::from_utf8_lossy(v))
        })
    }

    pub fn access(&mut self, rel: &str, mode: i32) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let r = cvt(unsafe { libc::access(c.as_ptr(), mode) }).map(|_| ());
        self.rec(format!("access {rel} {mode}"), r, |_| String::new())
    }

    // --- mutating operations (for write scenarios) ---

    pub fn write_file(&mut self, rel: &str, data: &[u8]) -> io::Result<()> {
        let r = fs::write(self.p(rel), data);
        self.rec(format!("write {rel} len={}", data.len()), r, |_| {
            String::new()
        })
    }

    pub fn append(&mut self, rel: &str, data: &[u8]) -> io::Result<()> {
        let r = OpenOptions::new()
            .append(true)
            .open(self.p(rel))
            .and_then(|mut f| f.write_all(data));
        self.rec(format!("append {rel} len={}", data.len()), r, |_| {
            String::new()
        })
    }

    pub fn create_excl(&mut self, rel: &str, mode: u32) -> io::Result<()> {
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(self.p(rel))
            .map(|_| ());
        self.rec(format!("create_excl {rel} {mode:o}"), r, |_| String::new())
    }

    pub fn open_write(&mut self, rel: &str) -> io::Result<()> {
        let r = OpenOptions::new().write(true).open(self.p(rel)).map(|_| ());
        self.rec(format!("open_write {rel}"), r, |_| String::new())
    }

    pub fn truncate(&mut self, rel: &str, len: u64) -> io::Result<()> {
        let r = OpenOptions::new()
            .write(true)
            .open(self.p(rel))
            .and_then(|f| f.set_len(len));
        self.rec(format!("truncate {rel} {len}"), r, |_| String::new())
    }

    pub fn mkdir(&mut self, rel: &str, mode: u32) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let r = cvt(unsafe { libc::mkdir(c.as_ptr(), mode as libc::mode_t) }).map(|_| ());
        self.rec(format!("mkdir {rel} {mode:o}"), r, |_| String::new())
    }

    pub fn rmdir(&mut self, rel: &str) -> io::Result<()> {
        let r = fs::remove_dir(self.p(rel));
        self.rec(format!("rmdir {rel}"), r, |_| String::new())
    }

    pub fn unlink(&mut self, rel: &str) -> io::Result<()> {
        let r = fs::remove_file(self.p(rel));
        self.rec(format!("unlink {rel}"), r, |_| String::new())
    }

    pub fn rename(&mut self, from: &str, to: &str) -> io::Result<()> {
        let r = fs::rename(self.p(from), self.p(to));
        self.rec(format!("rename {from} {to}"), r, |_| String::new())
    }

    pub fn symlink(&mut self, target: &str, rel: &str) -> io::Result<()> {
        let r = std::os::unix::fs::symlink(target, self.p(rel));
        self.rec(format!("symlink {target} {rel}"), r, |_| String::new())
    }

    pub fn link(&mut self, existing: &str, rel: &str) -> io::Result<()> {
        let r = fs::hard_link(self.p(existing), self.p(rel));
        self.rec(format!("link {existing} {rel}"), r, |_| String::new())
    }

    pub fn chmod(&mut self, rel: &str, mode: u32) -> io::Result<()> {
        let r = fs::set_permissions(self.p(rel), fs::Permissions::from_mode(mode));
        self.rec(format!("chmod {rel} {mode:o}"), r, |_| String::new())
    }

    pub fn chown(&mut self, rel: &str, uid: u32, gid: u32) -> io::Result<()> {
        let r = lchown(&self.p(rel), uid, gid);
        self.rec(format!("chown {rel} {uid}:{gid}"), r, |_| String::new())
    }

    pub fn setxattr(&mut self, rel: &str, name: &str, value: &[u8]) -> io::Result<()> {
        let r = set_xattr(&self.p(rel), name, value);
        self.rec(format!("setxattr {rel} {name}"), r, |_| String::new())
    }

    pub fn removexattr(&mut self, rel: &str, name: &str) -> io::Result<()> {
        let r = remove_xattr(&self.p(rel), name);
        self.rec(format!("removexattr {rel} {name}"), r, |_| String::new())
    }

    pub fn mkfifo(&mut self, rel: &str, mode: u32) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let r = cvt(unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) }).map(|_| ());
        self.rec(format!("mkfifo {rel}"), r, |_| String::new())
    }

    pub fn into_log(self) -> Vec<String> {
        self.log
    }
}

// ---------------------------------------------------------------------------
// differential scenarios
// ---------------------------------------------------------------------------

/// Overlay xattrs that the kernel stores in the upper layer as internal
/// bookkeeping (file handles, flags); they are implementation-specific and
/// left out when comparing upper dirs.  `opaque`, `redirect` (where the lower
/// layers keep a moved directory: it decides what the next mount shows) and
/// whiteouts are compared.
pub const UPPER_XATTR_IGNORE: &[&str] = &[
    "trusted.overlay.origin",
    "trusted.overlay.impure",
    "trusted.overlay.nlink",
    "trusted.overlay.uuid",
    "trusted.overlay.upper",
    "trusted.overlay.metacopy",
    "trusted.overlay.protattr",
    // the same with -o userxattr
    "user.overlay.origin",
    "user.overlay.impure",
    "user.overlay.nlink",
    "user.overlay.uuid",
    "user.overlay.upper",
    "user.overlay.metacopy",
    "user.overlay.protattr",
];

pub struct Scenario {
    pub name: &'static str,
    /// number of lower layers created (top first)
    pub lowers: usize,
    /// whether an upper (+ work) dir is created
    pub upper: bool,
    /// extra mount options for both implementations ("" for none)
    pub opts: &'static str,
    pub build: fn(&Layers),
    /// operations on the merged root; returns one log line per op
    pub ops: fn(&Path) -> Vec<String>,
}

impl Scenario {
    /// 3 lowers + upper, no extra options.
    pub fn new(name: &'static str, build: fn(&Layers), ops: fn(&Path) -> Vec<String>) -> Scenario {
        Scenario {
            name,
            lowers: 3,
            upper: true,
            opts: "",
            build,
            ops,
        }
    }
}

// ---------------------------------------------------------------------------
// write-path differential runs (added for tests/write_path.rs)
// ---------------------------------------------------------------------------

/// A whiteout as stored in an upper dir: character device 0/0.
pub fn is_whiteout_entry(e: &Entry) -> bool {
    e.kind == Kind::Char && e.rdev == Some((0, 0))
}

/// The kernel shares one whiteout inode (hard-linked from its work dir) among
/// all the whiteouts it creates, so their link count and hard-link grouping
/// are implementation details: reset both for every whiteout in `s`.
pub fn normalize_whiteouts(s: &mut Snapshot) {
    let wh: BTreeSet<PathBuf> = s
        .iter()
        .filter(|(_, e)| is_whiteout_entry(e))
        .map(|(k, _)| k.clone())
        .collect();
    for (k, e) in s.iter_mut() {
        if wh.contains(k) {
            e.nlink = 1;
            e.hardlinks.clear();
        } else {
            e.hardlinks.retain(|p| !wh.contains(p));
        }
    }
}

/// Snapshot of a raw upper dir for comparisons: kernel bookkeeping xattrs
/// left out, whiteout link counts normalized.
pub fn upper_snapshot(upper: &Path) -> Snapshot {
    let raw = SnapOpts {
        ignore_xattrs: UPPER_XATTR_IGNORE.iter().map(|s| s.to_string()).collect(),
    };
    let mut s = snapshot_with(upper, &raw);
    normalize_whiteouts(&mut s);
    s
}

/// Everything a differential run produced, after both mounts are gone.
pub struct DiffOutcome {
    /// keeps the layer dirs alive
    pub scratch: Scratch,
    pub orig: Layers,
    /// layers the kernel overlay ran on (upper holds its result)
    pub kernel: Layers,
    /// layers the filesystem under test ran on
    pub ovlfuse: Layers,
    pub kernel_log: Vec<String>,
    pub ovlfuse_log: Vec<String>,
    /// merged-tree, upper-dir and lower-dir differences (not op-log ones)
    pub problems: Vec<String>,
}

/// One "op #i" line per differing op-log entry.
pub fn op_log_differences(klog: &[String], flog: &[String]) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..klog.len().max(flog.len()) {
        let a = klog.get(i).map(String::as_str).unwrap_or("<none>");
        let b = flog.get(i).map(String::as_str).unwrap_or("<none>");
        if a != b {
            v.push(format!("op #{i}: kernel: {a}\n      ovlfuse: {b}"));
        }
    }
    v
}

/// The first differing op-log entry with up to `context` preceding entries.
pub fn first_log_divergence(klog: &[String], flog: &[String], context: usize) -> Option<String> {
    let n = klog.len().max(flog.len());
    let i = (0..n).find(|&i| klog.get(i) != flog.get(i))?;
    let mut s = format!("first divergence at op #{i} of {n}\n  preceding ops (identical):\n");
    for (j, line) in klog
        .iter()
        .enumerate()
        .take(i)
        .skip(i.saturating_sub(context))
    {
        writeln!(s, "    #{j}: {line}").unwrap();
    }
    writeln!(
        s,
        "  kernel : {}\n  ovlfuse: {}",
        klog.get(i).map(String::as_str).unwrap_or("<none>"),
        flog.get(i).map(String::as_str).unwrap_or("<none>")
    )
    .unwrap();
    Some(s)
}

/// [`run_differential`] without the verdict: the logs, the differences and
/// the layers (both mounts unmounted) are returned.
pub fn run_differential_collect(sc: &Scenario) -> DiffOutcome {
    let scratch = Scratch::new();
    let orig = scratch.layers(sc.lowers, sc.upper);
    (sc.build)(&orig);
    let kl = copy_layers(&orig, &scratch.mkdir("kernel"));
    let fl = copy_layers(&orig, &scratch.mkdir("ovlfuse"));

    let mut km = mount_kernel_overlay_opts(&kl, sc.opts);
    let mut fm = mount_ovlfuse(&fl, sc.opts);
    let ops = sc.ops;

    let kroot = km.mnt.clone();
    let klog = with_timeout(300, move || ops(&kroot));
    let froot = fm.mnt.clone();
    let flog = with_timeout(300, move || ops(&froot));

    let mut problems = Vec::new();
    let kroot = km.mnt.clone();
    let ks = with_timeout(300, move || snapshot(&kroot));
    let froot = fm.mnt.clone();
    let fs_ = with_timeout(300, move || snapshot(&froot));
    for d in diff_snapshots_labeled(&ks, &fs_, "kernel", "ovlfuse") {
        problems.push(format!("merged: {d}"));
    }
    for p in snapshot_problems(&fs_) {
        problems.push(format!("merged ovlfuse: {p}"));
    }
    km.unmount();
    fm.unmount();

    if let (Some(ku), Some(fu)) = (&kl.upper, &fl.upper) {
        let a = upper_snapshot(ku);
        let b = upper_snapshot(fu);
        for d in diff_snapshots_labeled(&a, &b, "kernel", "ovlfuse") {
            problems.push(format!("upper: {d}"));
        }
    }
    for (i, ol) in orig.lowers.iter().enumerate() {
        let o = snapshot(ol);
        for (who, l) in [("kernel", &kl.lowers[i]), ("ovlfuse", &fl.lowers[i])] {
            for d in diff_snapshots_labeled(&o, &snapshot(l), "original", who) {
                problems.push(format!("lower {i} modified by {who}: {d}"));
            }
        }
    }
    drop(km);
    drop(fm);
    DiffOutcome {
        scratch,
        orig,
        kernel: kl,
        ovlfuse: fl,
        kernel_log: klog,
        ovlfuse_log: flog,
        problems,
    }
}

/// Build the layers once, copy them twice, mount the kernel overlay on one
/// copy and the filesystem under test on the other, run `ops` on both and
/// compare the op logs, the merged trees, and (after unmounting) the upper
/// dirs (raw, incl. whiteouts and overlay xattrs; whiteout link counts
/// normalized) and the lower dirs (must be unchanged).  Panics listing every
/// difference, op logs first.
pub fn run_differential(sc: &Scenario) {
    let o = run_differential_collect(sc);
    let mut all = op_log_differences(&o.kernel_log, &o.ovlfuse_log);
    all.extend(o.problems.iter().cloned());
    assert!(
        all.is_empty(),
        "scenario {:?}: {} differences between kernel overlay and ovlfuse:\n  {}\n\
         kernel op log:\n    {}",
        sc.name,
        all.len(),
        all.join("\n  "),
        o.kernel_log.join("\n    ")
    );
}

/// `lowers` plus a `cp -a` copy of `upper` (in `dest/upper`) and a fresh
/// work dir (`dest/work`), for mounting an upper another mount produced.
pub fn layers_with_upper_copy(lowers: &[PathBuf], upper: &Path, dest: &Path) -> Layers {
    fs::create_dir_all(dest).unwrap();
    let to = dest.join("upper");
    cp_a(upper, &to);
    let work = dest.join("work");
    fs::create_dir_all(&work).unwrap();
    Layers {
        lowers: lowers.to_vec(),
        upper: Some(to),
        work: Some(work),
    }
}
