//! Permission differential tests: users other than root act on the union, and every
//! result must be what the kernel overlayfs gives over a copy of the same layers.
//!
//! ovlfuse runs as root with `allow_other` and `default_permissions` (its defaults as
//! root), so the kernel checks every access against the attributes ovlfuse reports, and
//! ovlfuse itself must apply the rules a real filesystem applies on its own: owners of new
//! objects, set-group-id directories, and clearing set-user/group-id bits on write,
//! truncate and chown.
//!
//! Operations run as another user on a thread of their own whose credentials are switched
//! with raw `setgroups`/`setresgid`/`setresuid` system calls: Linux credentials are per
//! thread (only glibc's wrappers broadcast them to every thread), so the test process and
//! its other threads stay root, and nothing but plain system calls runs as the user. The
//! thread's capabilities go with its root uid, as for any process that gives up root.
//!
//! A few writers are whole processes (`setpriv`), to check that ovlfuse finds their
//! supplementary groups and capabilities, which FUSE does not pass on, by the pid FUSE
//! reports.
//!
//! `OVLFUSE_BIN=kernel` runs both sides on the kernel overlay, which checks that the
//! scenarios are deterministic. `OVLFUSE_PERM_DUMP=1` prints the kernel's op logs (with
//! `--nocapture`).

mod common;

use common::*;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

// ---------------------------------------------------------------------------
// callers
// ---------------------------------------------------------------------------

/// Shared group of ALICE and BOB (not NOBODY's).
const STAFF: u32 = 1234;
/// A group none of the test users is in.
const OTHER_GID: u32 = 5;

/// A caller: ids and supplementary groups.
#[derive(Debug, Clone, Copy)]
struct User {
    name: &'static str,
    uid: u32,
    gid: u32,
    groups: &'static [u32],
}

const NOBODY: User = User {
    name: "nobody",
    uid: 65534,
    gid: 65534,
    groups: &[],
};
const ALICE: User = User {
    name: "alice",
    uid: 1000,
    gid: 1000,
    groups: &[1000, STAFF],
};
const BOB: User = User {
    name: "bob",
    uid: 1001,
    gid: 1001,
    groups: &[1001, STAFF],
};

/// Gives the calling thread (only) the credentials of `user`. Raw system calls: glibc's
/// wrappers would change every thread of the test process.
fn become_user(user: User) -> io::Result<()> {
    let check = |r: libc::c_long| {
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain system calls with valid arguments; they affect this thread only.
    unsafe {
        check(libc::syscall(
            libc::SYS_setgroups,
            user.groups.len(),
            user.groups.as_ptr(),
        ))?;
        check(libc::syscall(
            libc::SYS_setresgid,
            user.gid,
            user.gid,
            user.gid,
        ))?;
        check(libc::syscall(
            libc::SYS_setresuid,
            user.uid,
            user.uid,
            user.uid,
        ))?;
        let (euid, egid) = (
            libc::syscall(libc::SYS_geteuid),
            libc::syscall(libc::SYS_getegid),
        );
        assert_eq!((euid, egid), (user.uid as i64, user.gid as i64));
    }
    Ok(())
}

/// Runs `ops` with an [`OpLog`] on `root` as `user`, on a thread of its own; returns the
/// log lines, each prefixed with the user's name.
fn as_user(user: User, root: &Path, ops: impl FnOnce(&mut OpLog) + Send + 'static) -> Vec<String> {
    let root = root.to_path_buf();
    let log = thread::Builder::new()
        .name(format!("as-{}", user.name))
        .spawn(move || {
            become_user(user).unwrap_or_else(|e| panic!("become {user:?}: {e}"));
            let mut o = OpLog::new(&root);
            ops(&mut o);
            o.into_log()
        })
        .expect("spawn user thread")
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    log.into_iter()
        .map(|l| format!("[{}] {l}", user.name))
        .collect()
}

/// The same, as root (the test process's own credentials).
fn as_root(root: &Path, ops: impl FnOnce(&mut OpLog)) -> Vec<String> {
    let mut o = OpLog::new(root);
    ops(&mut o);
    o.into_log()
        .into_iter()
        .map(|l| format!("[root] {l}"))
        .collect()
}

// ---------------------------------------------------------------------------
// extra logged operations
// ---------------------------------------------------------------------------

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn rec<T>(o: &mut OpLog, what: String, r: io::Result<T>, ok: impl FnOnce(&T) -> String) {
    let line = format!("{what}: {}", fmt_res(&r, ok));
    o.push(line);
}

fn unit<T>(_: &T) -> String {
    String::new()
}

fn open_raw(p: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(p);
    // SAFETY: valid path; the descriptor is owned by the File.
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    // SAFETY: a fresh descriptor nobody else owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn flag_names(flags: i32) -> String {
    let mut v = vec![match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }];
    for (f, n) in [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
    ] {
        if flags & f == f {
            v.push(n);
        }
    }
    v.join("|")
}

fn access_names(mode: i32) -> &'static str {
    match mode {
        libc::F_OK => "F_OK",
        libc::R_OK => "R_OK",
        libc::W_OK => "W_OK",
        libc::X_OK => "X_OK",
        m if m == libc::R_OK | libc::W_OK => "R_OK|W_OK",
        m if m == libc::R_OK | libc::X_OK => "R_OK|X_OK",
        _ => "R_OK|W_OK|X_OK",
    }
}

/// Operations beyond [`OpLog`]'s, logged the same way.
trait PermOps {
    /// open(2) with `flags`, closed again at once.
    fn open_flags(&mut self, rel: &str, flags: i32, mode: u32);
    /// open(O_WRONLY|O_APPEND) and one write(2).
    fn append_write(&mut self, rel: &str, data: &[u8]);
    /// open(O_WRONLY) and ftruncate(2).
    fn ftruncate(&mut self, rel: &str, len: u64);
    /// truncate(2) by path.
    fn truncate_path(&mut self, rel: &str, len: i64);
    /// open(O_WRONLY) and fallocate(2) (mode 0).
    fn fallocate(&mut self, rel: &str, off: i64, len: i64);
    /// copy_file_range of all of `src` to the start of `dst`.
    fn copy_range(&mut self, src: &str, dst: &str);
    /// utimensat with explicit times.
    fn utimens(&mut self, rel: &str, atime: i64, mtime: i64);
    /// utimensat(NULL): both times "now".
    fn touch_now(&mut self, rel: &str);
    /// atime and mtime seconds.
    fn times(&mut self, rel: &str);
    /// faccessat with AT_EACCESS (effective ids).
    fn eaccess(&mut self, rel: &str, mode: i32);
    /// access(2) with the mode named.
    fn access_named(&mut self, rel: &str, mode: i32);
    /// lchown with -1 meaning "leave alone".
    fn chown_ids(&mut self, rel: &str, uid: Option<u32>, gid: Option<u32>);
    /// mknod of a fifo.
    fn fifo(&mut self, rel: &str, mode: u32);
    /// open(O_CREAT|O_EXCL|O_WRONLY) with `mode` (the process umask applies).
    fn create(&mut self, rel: &str, mode: u32);
}

impl PermOps for OpLog {
    fn open_flags(&mut self, rel: &str, flags: i32, mode: u32) {
        let r = open_raw(&self.p(rel), flags, mode).map(drop);
        rec(
            self,
            format!("open {rel} {} {mode:o}", flag_names(flags)),
            r,
            unit,
        );
    }

    fn append_write(&mut self, rel: &str, data: &[u8]) {
        let r = open_raw(&self.p(rel), libc::O_WRONLY | libc::O_APPEND, 0)
            .and_then(|mut f| f.write_all(data));
        rec(
            self,
            format!("append_write {rel} len={}", data.len()),
            r,
            unit,
        );
    }

    fn ftruncate(&mut self, rel: &str, len: u64) {
        let r = open_raw(&self.p(rel), libc::O_WRONLY, 0).and_then(|f| f.set_len(len));
        rec(self, format!("ftruncate {rel} {len}"), r, unit);
    }

    fn truncate_path(&mut self, rel: &str, len: i64) {
        let c = cstr(self.p(rel));
        // SAFETY: valid path.
        let r = cvt(unsafe { libc::truncate(c.as_ptr(), len) }).map(drop);
        rec(self, format!("truncate {rel} {len}"), r, unit);
    }

    fn fallocate(&mut self, rel: &str, off: i64, len: i64) {
        let r = open_raw(&self.p(rel), libc::O_WRONLY, 0).and_then(|f| {
            // SAFETY: valid descriptor.
            cvt(unsafe { libc::fallocate(f.as_raw_fd(), 0, off, len) }).map(drop)
        });
        rec(self, format!("fallocate {rel} @{off}+{len}"), r, unit);
    }

    fn copy_range(&mut self, src: &str, dst: &str) {
        let r = (|| {
            let s = open_raw(&self.p(src), libc::O_RDONLY, 0)?;
            let d = open_raw(&self.p(dst), libc::O_WRONLY, 0)?;
            let len = s.metadata()?.len() as usize;
            let (mut so, mut dof): (libc::loff_t, libc::loff_t) = (0, 0);
            // SAFETY: valid descriptors and offset pointers.
            let n = unsafe {
                libc::copy_file_range(s.as_raw_fd(), &mut so, d.as_raw_fd(), &mut dof, len, 0)
            };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n)
            }
        })();
        rec(self, format!("copy_file_range {src} {dst}"), r, |n| {
            format!("copied={n}")
        });
    }

    fn utimens(&mut self, rel: &str, atime: i64, mtime: i64) {
        let c = cstr(self.p(rel));
        let ts = [
            libc::timespec {
                tv_sec: atime,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: mtime,
                tv_nsec: 0,
            },
        ];
        // SAFETY: valid path and a two-element array.
        let r =
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) }).map(drop);
        rec(self, format!("utimensat {rel} {atime} {mtime}"), r, unit);
    }

    fn touch_now(&mut self, rel: &str) {
        let c = cstr(self.p(rel));
        // SAFETY: valid path; NULL times means "now".
        let r = cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) })
            .map(drop);
        rec(self, format!("utimensat {rel} NULL"), r, unit);
    }

    fn times(&mut self, rel: &str) {
        let r = fs::symlink_metadata(self.p(rel));
        rec(self, format!("times {rel}"), r, |m| {
            format!("atime={} mtime={}", m.atime(), m.mtime())
        });
    }

    fn eaccess(&mut self, rel: &str, mode: i32) {
        let c = cstr(self.p(rel));
        // SAFETY: valid path.
        let r = cvt(unsafe { libc::faccessat(libc::AT_FDCWD, c.as_ptr(), mode, libc::AT_EACCESS) })
            .map(drop);
        rec(
            self,
            format!("faccessat {rel} {} AT_EACCESS", access_names(mode)),
            r,
            unit,
        );
    }

    fn access_named(&mut self, rel: &str, mode: i32) {
        let c = cstr(self.p(rel));
        // SAFETY: valid path.
        let r = cvt(unsafe { libc::access(c.as_ptr(), mode) }).map(drop);
        rec(
            self,
            format!("access {rel} {}", access_names(mode)),
            r,
            unit,
        );
    }

    fn chown_ids(&mut self, rel: &str, uid: Option<u32>, gid: Option<u32>) {
        let r = lchown(
            &self.p(rel),
            uid.unwrap_or(u32::MAX),
            gid.unwrap_or(u32::MAX),
        );
        let show = |id: Option<u32>| id.map_or("-1".to_string(), |i| i.to_string());
        rec(
            self,
            format!("chown {rel} {}:{}", show(uid), show(gid)),
            r,
            unit,
        );
    }

    fn fifo(&mut self, rel: &str, mode: u32) {
        let _ = self.mkfifo(rel, mode);
    }

    fn create(&mut self, rel: &str, mode: u32) {
        self.open_flags(rel, libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY, mode);
    }
}

// ---------------------------------------------------------------------------
// running scenarios
// ---------------------------------------------------------------------------

/// `run_differential` on a scenario over 2 lowers + upper; `OVLFUSE_PERM_DUMP=1` also prints
/// the kernel's op log. Returns the kernel's op log for the scenario's own teeth checks.
fn run(name: &'static str, build: fn(&Layers), ops: fn(&Path) -> Vec<String>) -> Vec<String> {
    run_scenario(Scenario {
        name,
        lowers: 2,
        upper: true,
        opts: "",
        build,
        ops,
    })
}

fn run_scenario(sc: Scenario) -> Vec<String> {
    let out = run_differential_collect(&sc);
    if std::env::var_os("OVLFUSE_PERM_DUMP").is_some() {
        eprintln!("=== {}\n  {}", sc.name, out.kernel_log.join("\n  "));
    }
    let mut all = op_log_differences(&out.kernel_log, &out.ovlfuse_log);
    all.extend(out.problems.iter().cloned());
    assert!(
        all.is_empty(),
        "scenario {:?}: {} differences between the kernel overlay and ovlfuse:\n  {}\n\
         kernel op log:\n    {}",
        sc.name,
        all.len(),
        all.join("\n  "),
        out.kernel_log.join("\n    ")
    );
    out.kernel_log
}

/// Asserts that the op log has a line starting with `line` (teeth: the scenario really
/// exercises the rule, so an implementation without it would differ from the kernel).
#[track_caller]
fn assert_logged(log: &[String], line: &str) {
    assert!(
        log.iter().any(|l| l.starts_with(line)),
        "expected the kernel op log to contain {line:?}; it has:\n  {}",
        log.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// reading and listing what only root may read
// ---------------------------------------------------------------------------

/// Root-only objects in the top lower (l0), the bottom lower (l1) and the upper layer, a
/// shadowed file whose upper copy is private, and a merged directory whose upper copy is.
fn root_only_objects(l: &Layers) {
    let (u, l0, l1) = (l.up(), l.lower(0), l.lower(1));
    l1.write_file("bottom_secret", b"bottom secret\n", 0o600)
        .write_file("bottom_none", b"no access\n", 0o000)
        .mkdir("bottom_private", 0o700)
        .write_file("bottom_private/inner", b"inner\n", 0o644)
        .write_file("shadowed", b"lower, public\n", 0o644)
        .mkdir("merged", 0o755)
        .write_file("merged/from_lower", b"lower entry\n", 0o644);
    l0.write_file("secret", b"lower secret\n", 0o600)
        .write_file("none", b"no access\n", 0o000)
        .write_file("staff_only", b"for staff\n", 0o640)
        .chown("staff_only", 0, STAFF)
        .write_file("owner_none", b"owner may not read\n", 0o044)
        .chown("owner_none", ALICE.uid, OTHER_GID)
        .mkdir("private", 0o700)
        .write_file("private/inner", b"inner\n", 0o644)
        .mkdir("search_only", 0o711)
        .write_file("search_only/known", b"reachable by name\n", 0o644)
        .mkdir("list_only", 0o744)
        .write_file("list_only/entry", b"listed, not reachable\n", 0o644);
    u.write_file("upper_secret", b"upper secret\n", 0o600)
        .write_file("upper_none", b"no access\n", 0o000)
        .mkdir("upper_private", 0o700)
        .write_file("upper_private/inner", b"inner\n", 0o644)
        .write_file("shadowed", b"upper, private\n", 0o600)
        .mkdir("merged", 0o700)
        .write_file("merged/from_upper", b"upper entry\n", 0o644);
}

const SECRET_FILES: &[&str] = &[
    "bottom_secret",
    "bottom_none",
    "secret",
    "none",
    "upper_secret",
    "upper_none",
    "shadowed",
    "staff_only",
    "owner_none",
];

const PRIVATE_DIRS: &[&str] = &[
    "bottom_private",
    "private",
    "upper_private",
    "merged",
    "search_only",
    "list_only",
];

fn try_to_read_everything(o: &mut OpLog) {
    for f in SECRET_FILES {
        let _ = o.stat(f);
        let _ = o.read(f);
        o.open_flags(f, libc::O_RDONLY, 0);
        o.open_flags(f, libc::O_WRONLY, 0);
        o.open_flags(f, libc::O_RDWR, 0);
    }
    for d in PRIVATE_DIRS {
        let _ = o.stat(d);
        let _ = o.readdir(d);
        o.open_flags(d, libc::O_RDONLY | libc::O_DIRECTORY, 0);
    }
    for inner in [
        "bottom_private/inner",
        "private/inner",
        "upper_private/inner",
        "merged/from_lower",
        "merged/from_upper",
        "search_only/known",
        "search_only/unknown",
        "list_only/entry",
    ] {
        let _ = o.stat(inner);
        let _ = o.read(inner);
    }
}

#[test]
fn others_cannot_read_or_list_root_only_objects_in_any_layer() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = as_user(NOBODY, root, try_to_read_everything);
        log.extend(as_user(ALICE, root, try_to_read_everything));
        log.extend(as_root(root, try_to_read_everything));
        log
    }
    let k = run("read_root_only_objects", root_only_objects, ops);
    for line in [
        "[nobody] read bottom_secret: Err(EACCES)",
        "[nobody] read upper_none: Err(EACCES)",
        "[nobody] read shadowed: Err(EACCES)",
        "[nobody] readdir merged: Err(EACCES)",
        "[nobody] stat private/inner: Err(EACCES)",
        "[nobody] stat list_only/entry: Err(EACCES)",
        "[alice] read staff_only: Ok(len=10 ",
        "[alice] read owner_none: Err(EACCES)",
        "[root] read upper_none: Ok(len=10 ",
    ] {
        assert_logged(&k, line);
    }
}

// ---------------------------------------------------------------------------
// changing root-owned and world-writable directories
// ---------------------------------------------------------------------------

/// Root-owned 0755 directories in a lower layer (`ro`), in the upper (`uro`) and merged
/// (`mro`); world-writable ones without the sticky bit (`pub` lower, `upub` upper) holding
/// files of other users.
fn root_owned_dirs(l: &Layers) {
    let (u, l0, l1) = (l.up(), l.lower(0), l.lower(1));
    l1.mkdir("mro", 0o755)
        .write_file("mro/bottom", b"bottom\n", 0o666)
        .mkdir("pub", 0o777)
        .write_file("pub/by_alice", b"alice's\n", 0o644)
        .chown("pub/by_alice", ALICE.uid, ALICE.gid);
    l0.mkdir("ro", 0o755)
        .mkdir("pub", 0o777)
        .write_file("ro/f", b"root's file\n", 0o666)
        .mkdir("ro/sub", 0o777)
        .mkdir("pub/alice_dir", 0o755)
        .chown("pub/alice_dir", ALICE.uid, ALICE.gid)
        .write_file("pub/by_root", b"root's\n", 0o644)
        .write_file("mine", b"nobody's own file\n", 0o644)
        .chown("mine", NOBODY.uid, NOBODY.gid);
    u.mkdir("uro", 0o755)
        .write_file("uro/f", b"root's upper file\n", 0o666)
        .mkdir("uro/sub", 0o777)
        .mkdir("mro", 0o755)
        .write_file("mro/top", b"top\n", 0o666)
        .mkdir("upub", 0o777)
        .write_file("upub/by_alice", b"alice's\n", 0o644)
        .chown("upub/by_alice", ALICE.uid, ALICE.gid)
        .write_file("upub/kept_by_alice", b"alice's, readable\n", 0o644)
        .chown("upub/kept_by_alice", ALICE.uid, ALICE.gid)
        .mkdir("upub/alice_dir", 0o755)
        .chown("upub/alice_dir", ALICE.uid, ALICE.gid)
        .mkdir("upub/nobody_dir2", 0o755)
        .chown("upub/nobody_dir2", NOBODY.uid, NOBODY.gid);
}

#[test]
fn others_cannot_change_root_owned_directories() {
    fn ops(root: &Path) -> Vec<String> {
        as_user(NOBODY, root, |o| {
            for d in ["ro", "uro", "mro"] {
                o.create(&format!("{d}/new"), 0o644);
                let _ = o.mkdir(&format!("{d}/newdir"), 0o755);
                let _ = o.symlink("target", &format!("{d}/newlink"));
                o.fifo(&format!("{d}/newfifo"), 0o644);
                let _ = o.link("mine", &format!("{d}/newhardlink"));
                let _ = o.unlink(&format!("{d}/f"));
                let _ = o.unlink(&format!("{d}/top"));
                let _ = o.unlink(&format!("{d}/bottom"));
                let _ = o.rmdir(&format!("{d}/sub"));
                let _ = o.rename(&format!("{d}/f"), &format!("{d}/g"));
                let _ = o.rename(&format!("{d}/sub"), &format!("{d}/sub2"));
                let _ = o.rename("mine", &format!("{d}/mine"));
                let _ = o.rename(&format!("{d}/f"), "pub/stolen");
                // writable files in a read-only directory: contents may change, the name not
                let _ = o.append(&format!("{d}/f"), b"appended\n");
                let _ = o.readdir(d);
            }
            // the root directory itself is root's 0755
            o.create("new_in_root", 0o644);
            let _ = o.unlink("mine");
        })
    }
    let k = run("root_owned_dirs", root_owned_dirs, ops);
    for line in [
        "[nobody] open ro/new O_WRONLY|O_CREAT|O_EXCL 644: Err(EACCES)",
        "[nobody] unlink uro/f: Err(EACCES)",
        "[nobody] unlink mro/top: Err(EACCES)",
        "[nobody] rename uro/sub uro/sub2: Err(EACCES)",
        "[nobody] append ro/f len=9: Ok(",
    ] {
        assert_logged(&k, line);
    }
}

#[test]
fn world_writable_directories_without_sticky_bit_let_anyone_delete() {
    fn ops(root: &Path) -> Vec<String> {
        as_user(NOBODY, root, |o| {
            for d in ["pub", "upub"] {
                o.create(&format!("{d}/by_nobody"), 0o600);
                let _ = o.stat(&format!("{d}/by_nobody"));
                let _ = o.rename(&format!("{d}/by_alice"), &format!("{d}/moved"));
                let _ = o.unlink(&format!("{d}/moved"));
                let _ = o.unlink(&format!("{d}/by_root"));
                let _ = o.mkdir(&format!("{d}/nobody_dir"), 0o700);
                let _ = o.rmdir(&format!("{d}/nobody_dir"));
                let _ = o.rename(&format!("{d}/alice_dir"), &format!("{d}/alice_moved"));
                let _ = o.readdir(d);
            }
            // moving a directory to another parent rewrites its "..": needs write on it
            let _ = o.rename("upub/alice_moved", "pub/alice_far");
            let _ = o.rename("upub/nobody_dir2", "pub/nobody_moved");
            // fs.protected_hardlinks: only links to files one may read and write
            let _ = o.link("upub/kept_by_alice", "pub/link_to_alices");
            let _ = o.link("pub/by_nobody", "pub/link_to_own");
            let _ = o.readdir("pub");
        })
    }
    let k = run("world_writable_dirs", root_owned_dirs, ops);
    assert_logged(&k, "[nobody] unlink pub/by_root: Ok(");
    // within one parent, the directory itself need not be writable
    assert_logged(&k, "[nobody] rename upub/alice_dir upub/alice_moved: Ok(");
    assert_logged(
        &k,
        "[nobody] rename upub/alice_moved pub/alice_far: Err(EACCES)",
    );
    assert_logged(&k, "[nobody] rename upub/nobody_dir2 pub/nobody_moved: Ok(");
    assert_logged(&k, "[nobody] link pub/by_nobody pub/link_to_own: Ok(");
    assert_logged(
        &k,
        "[nobody] link upub/kept_by_alice pub/link_to_alices: Err(EPERM)",
    );
}

// ---------------------------------------------------------------------------
// sticky directories
// ---------------------------------------------------------------------------

/// 1777 directories: `tmp` (lower, root's), `utmp` (upper, root's), `mtmp` (merged, root's)
/// and `atmp` (lower, alice's), each with files of nobody, alice and root.
fn sticky_dirs(l: &Layers) {
    let (u, l0, l1) = (l.up(), l.lower(0), l.lower(1));
    let fill = |layer: &common::Layer, d: &str| {
        layer
            .mkdir(d, 0o1777)
            .write_file(&format!("{d}/of_nobody"), b"nobody's\n", 0o666)
            .chown(&format!("{d}/of_nobody"), NOBODY.uid, NOBODY.gid)
            .write_file(&format!("{d}/of_alice"), b"alice's\n", 0o666)
            .chown(&format!("{d}/of_alice"), ALICE.uid, ALICE.gid)
            .write_file(&format!("{d}/of_root"), b"root's\n", 0o666)
            .mkdir(&format!("{d}/dir_of_alice"), 0o777)
            .chown(&format!("{d}/dir_of_alice"), ALICE.uid, ALICE.gid)
            .mkdir(&format!("{d}/dir_of_nobody"), 0o755)
            .chown(&format!("{d}/dir_of_nobody"), NOBODY.uid, NOBODY.gid);
    };
    fill(&l0, "tmp");
    fill(&l0, "atmp");
    l0.chown("atmp", ALICE.uid, ALICE.gid);
    fill(&u, "utmp");
    l1.mkdir("mtmp", 0o1777)
        .write_file("mtmp/lower_of_alice", b"alice's\n", 0o666)
        .chown("mtmp/lower_of_alice", ALICE.uid, ALICE.gid)
        .write_file("mtmp/lower_of_nobody", b"nobody's\n", 0o666)
        .chown("mtmp/lower_of_nobody", NOBODY.uid, NOBODY.gid);
    u.mkdir("mtmp", 0o1777)
        .write_file("mtmp/upper_of_alice", b"alice's\n", 0o666)
        .chown("mtmp/upper_of_alice", ALICE.uid, ALICE.gid)
        .write_file("mtmp/upper_of_nobody", b"nobody's\n", 0o666)
        .chown("mtmp/upper_of_nobody", NOBODY.uid, NOBODY.gid);
}

#[test]
fn sticky_directories_protect_other_users_entries() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = as_user(NOBODY, root, |o| {
            for d in ["tmp", "utmp", "atmp"] {
                let _ = o.unlink(&format!("{d}/of_alice"));
                let _ = o.unlink(&format!("{d}/of_root"));
                let _ = o.rename(&format!("{d}/of_alice"), &format!("{d}/taken"));
                let _ = o.rmdir(&format!("{d}/dir_of_alice"));
                // replacing someone else's file by rename is a deletion too
                o.create(&format!("{d}/new_of_nobody"), 0o644);
                let _ = o.rename(&format!("{d}/new_of_nobody"), &format!("{d}/of_alice"));
                let _ = o.rename(&format!("{d}/new_of_nobody"), &format!("{d}/renamed"));
                let _ = o.rename(&format!("{d}/of_nobody"), &format!("{d}/of_nobody2"));
                let _ = o.unlink(&format!("{d}/of_nobody2"));
                let _ = o.rmdir(&format!("{d}/dir_of_nobody"));
                // others' files stay writable by their mode
                let _ = o.append(&format!("{d}/of_alice"), b"nobody was here\n");
                o.open_flags(
                    &format!("{d}/of_root"),
                    libc::O_WRONLY | libc::O_CREAT,
                    0o644,
                );
                let _ = o.readdir(d);
            }
            let _ = o.unlink("mtmp/lower_of_alice");
            let _ = o.unlink("mtmp/upper_of_alice");
            let _ = o.unlink("mtmp/lower_of_nobody");
            let _ = o.unlink("mtmp/upper_of_nobody");
            let _ = o.readdir("mtmp");
        });
        log.extend(as_user(ALICE, root, |o| {
            // alice owns atmp: she may delete anyone's entries there, and only there
            let _ = o.unlink("atmp/of_root");
            let _ = o.unlink("atmp/renamed");
            let _ = o.unlink("tmp/renamed");
            let _ = o.rename("utmp/renamed", "utmp/alice_took_it");
            let _ = o.unlink("utmp/of_alice");
            let _ = o.readdir("atmp");
        }));
        log.extend(as_root(root, |o| {
            let _ = o.unlink("tmp/renamed");
            let _ = o.rmdir("utmp/dir_of_alice");
        }));
        log
    }
    let k = run("sticky_dirs", sticky_dirs, ops);
    for line in [
        "[nobody] unlink tmp/of_alice: Err(EPERM)",
        "[nobody] unlink utmp/of_root: Err(EPERM)",
        "[nobody] rename tmp/new_of_nobody tmp/of_alice: Err(EPERM)",
        "[nobody] unlink tmp/of_nobody2: Ok(",
        "[nobody] unlink mtmp/lower_of_nobody: Ok(",
        "[nobody] unlink mtmp/lower_of_alice: Err(EPERM)",
        "[alice] unlink atmp/of_root: Ok(",
        "[alice] unlink tmp/renamed: Err(EPERM)",
    ] {
        assert_logged(&k, line);
    }
}

// ---------------------------------------------------------------------------
// chmod, chown and utimes by owners and others
// ---------------------------------------------------------------------------

/// Files and directories of alice in both layers; one in a group she is not in.
fn owned_by_alice(l: &Layers) {
    let (u, l0) = (l.up(), l.lower(0));
    for (layer, p) in [(&l0, "l"), (&u, "u")] {
        layer
            .write_file(&format!("{p}_open"), b"world-writable\n", 0o666)
            .chown(&format!("{p}_open"), ALICE.uid, ALICE.gid)
            .write_file(&format!("{p}_closed"), b"alice only\n", 0o644)
            .chown(&format!("{p}_closed"), ALICE.uid, ALICE.gid)
            .write_file(&format!("{p}_foreign_group"), b"group 5\n", 0o644)
            .chown(&format!("{p}_foreign_group"), ALICE.uid, OTHER_GID)
            .mkdir(&format!("{p}_dir"), 0o755)
            .chown(&format!("{p}_dir"), ALICE.uid, ALICE.gid);
    }
}

#[test]
fn only_owners_change_modes_owners_and_times() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = as_user(NOBODY, root, |o| {
            for p in ["l", "u"] {
                for f in ["open", "closed", "dir"] {
                    let rel = format!("{p}_{f}");
                    let _ = o.chmod(&rel, 0o777);
                    o.chown_ids(&rel, Some(NOBODY.uid), None);
                    o.chown_ids(&rel, None, Some(NOBODY.gid));
                    o.chown_ids(&rel, None, None);
                    o.utimens(&rel, 1_000_000, 2_000_000);
                    o.touch_now(&rel);
                    let _ = o.stat(&rel);
                }
            }
        });
        log.extend(as_user(ALICE, root, |o| {
            for p in ["l", "u"] {
                let open = format!("{p}_open");
                let closed = format!("{p}_closed");
                let foreign = format!("{p}_foreign_group");
                let _ = o.chmod(&open, 0o600);
                let _ = o.stat(&open);
                o.chown_ids(&open, Some(BOB.uid), None);
                o.chown_ids(&open, Some(ALICE.uid), None);
                o.chown_ids(&open, None, Some(STAFF));
                o.chown_ids(&open, None, Some(OTHER_GID));
                let _ = o.stat(&open);
                // setgid is kept for a group she is in, silently dropped for another
                let _ = o.chmod(&open, 0o2755);
                let _ = o.stat(&open);
                let _ = o.chmod(&foreign, 0o2755);
                let _ = o.stat(&foreign);
                let _ = o.chmod(&closed, 0o4700);
                let _ = o.stat(&closed);
                o.utimens(&closed, 1_000_000, 2_000_000);
                o.times(&closed);
                o.touch_now(&closed);
                // her own directory, maybe still in a lower layer: copied up, still hers
                o.create(&format!("{p}_dir/new"), 0o640);
                let _ = o.lstat(&format!("{p}_dir/new"));
                let _ = o.chmod(&format!("{p}_dir"), 0o3777);
                let _ = o.stat(&format!("{p}_dir"));
            }
        }));
        log.extend(as_root(root, |o| {
            o.chown_ids("l_closed", Some(BOB.uid), Some(BOB.gid));
            o.chown_ids("u_dir", Some(NOBODY.uid), None);
            let _ = o.stat("l_closed");
            let _ = o.stat("u_dir");
        }));
        log
    }
    let k = run("owners_and_others", owned_by_alice, ops);
    for line in [
        "[nobody] chmod l_open 777: Err(EPERM)",
        "[nobody] chown u_closed 65534:-1: Err(EPERM)",
        "[nobody] utimensat l_open 1000000 2000000: Err(EPERM)",
        "[nobody] utimensat l_open NULL: Ok(",
        "[nobody] utimensat u_closed NULL: Err(EACCES)",
        "[alice] chown l_open 1001:-1: Err(EPERM)",
        "[alice] chown u_open -1:5: Err(EPERM)",
        "[alice] stat l_foreign_group: Ok(File 0755 1000:5",
        "[alice] stat u_open: Ok(File 2755 1000:1234",
    ] {
        assert_logged(&k, line);
    }
}

/// Extended attributes of alice's files in both layers: `user.*` follows the file's
/// permissions, `trusted.*` is root's only (invisible to others, EPERM to set).
fn xattr_files(l: &Layers) {
    let (u, l0) = (l.up(), l.lower(0));
    for (layer, p) in [(&l0, "l"), (&u, "u")] {
        for (name, mode) in [("open", 0o666), ("closed", 0o644), ("private", 0o600)] {
            let rel = format!("{p}_{name}");
            layer
                .write_file(&rel, b"with attributes\n", mode)
                .chown(&rel, ALICE.uid, ALICE.gid)
                .setxattr(&rel, "user.note", b"alice's note")
                .setxattr(&rel, "trusted.mark", b"root's mark");
        }
        layer.symlink(&format!("{p}_link"), &format!("{p}_open"));
    }
}

#[test]
fn xattrs_follow_file_permissions() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = as_user(NOBODY, root, |o| {
            for p in ["l", "u"] {
                for name in ["open", "closed", "private"] {
                    let rel = format!("{p}_{name}");
                    let _ = o.listxattr(&rel);
                    let _ = o.getxattr(&rel, "user.note");
                    let _ = o.getxattr(&rel, "trusted.mark");
                    let _ = o.setxattr(&rel, "user.by_nobody", b"x");
                    let _ = o.setxattr(&rel, "trusted.by_nobody", b"x");
                    let _ = o.removexattr(&rel, "user.note");
                    let _ = o.removexattr(&rel, "trusted.mark");
                }
                let _ = o.setxattr(&format!("{p}_link"), "user.on_link", b"x");
            }
        });
        log.extend(as_user(ALICE, root, |o| {
            for p in ["l", "u"] {
                let rel = format!("{p}_private");
                let _ = o.setxattr(&rel, "user.by_alice", b"y");
                let _ = o.listxattr(&rel);
                let _ = o.removexattr(&rel, "trusted.mark");
            }
        }));
        log.extend(as_root(root, |o| {
            for p in ["l", "u"] {
                let _ = o.listxattr(&format!("{p}_open"));
                let _ = o.listxattr(&format!("{p}_private"));
            }
        }));
        log
    }
    let k = run("xattr_permissions", xattr_files, ops);
    for line in [
        "[nobody] getxattr l_closed user.note: Ok(",
        "[nobody] getxattr u_private user.note: Err(EACCES)",
        "[nobody] getxattr l_open trusted.mark: Err(ENODATA)",
        "[nobody] setxattr l_closed user.by_nobody: Err(EACCES)",
        "[nobody] setxattr u_open trusted.by_nobody: Err(EPERM)",
        "[nobody] setxattr l_open user.by_nobody: Ok(",
    ] {
        assert_logged(&k, line);
    }
}

// ---------------------------------------------------------------------------
// set-user-id and set-group-id bits on write, truncate and chown
// ---------------------------------------------------------------------------

/// Set-id files of alice, world-writable so that others may write them, in the lower and
/// the upper layer: `*_ug` 6777 (setgid with group execute), `*_u` 4777, `*_g` 2777,
/// `*_gnx` 2766 (setgid without group execute: kept for writers in the group), and
/// `*_staff_gnx` 2766 in STAFF (alice's and bob's group), `*_foreign_gnx` 2766 in a group
/// alice is not in, each once per operation (`.w` write, `.t` ftruncate, `.o` open with
/// O_TRUNC, `.p` truncate by path, `.f` fallocate, `.c` copy_file_range into it).
fn setid_files(l: &Layers) {
    let (u, l0) = (l.up(), l.lower(0));
    for (layer, p) in [(&l0, "l"), (&u, "u")] {
        for (kind, mode, gid) in [
            ("ug", 0o6777, ALICE.gid),
            ("u", 0o4777, ALICE.gid),
            ("g", 0o2777, ALICE.gid),
            ("gnx", 0o2766, ALICE.gid),
            ("staff_gnx", 0o2766, STAFF),
            ("foreign_gnx", 0o2766, OTHER_GID),
        ] {
            for op in SETID_OPS {
                let rel = format!("{p}_{kind}.{op}");
                layer
                    .write_file(&rel, b"set-id file\n", 0o600)
                    .chown(&rel, ALICE.uid, gid)
                    .chmod(&rel, mode);
            }
        }
        layer.write_file("source", b"copied by copy_file_range\n", 0o644);
        // root-owned set-id programs for chown by root
        for (name, mode) in [("su", 0o6755), ("sg_x", 0o2755), ("sg_nx", 0o2745)] {
            let rel = format!("{p}_root_{name}");
            layer
                .write_file(&rel, b"program\n", 0o600)
                .chmod(&rel, mode);
        }
    }
}

const SETID_OPS: &[&str] = &["w", "t", "o", "p", "f", "c"];

fn modify_each_way(o: &mut OpLog, kinds: &[&str]) {
    for p in ["l", "u"] {
        for kind in kinds {
            let f = |op: &str| format!("{p}_{kind}.{op}");
            o.append_write(&f("w"), b"more\n");
            o.ftruncate(&f("t"), 3);
            o.open_flags(&f("o"), libc::O_WRONLY | libc::O_TRUNC, 0);
            o.truncate_path(&f("p"), 5);
            o.fallocate(&f("f"), 0, 8192);
            o.copy_range("source", &f("c"));
            for op in SETID_OPS {
                let _ = o.stat(&f(op));
            }
        }
    }
}

#[test]
fn writes_by_others_clear_setid_bits_like_the_kernel() {
    fn ops(root: &Path) -> Vec<String> {
        // nobody is in no group of these files; bob is in STAFF
        let mut log = as_user(NOBODY, root, |o| {
            modify_each_way(o, &["ug", "u", "g", "gnx", "foreign_gnx"]);
        });
        log.extend(as_user(BOB, root, |o| modify_each_way(o, &["staff_gnx"])));
        log
    }
    let k = run("setid_write_by_others", setid_files, ops);
    for line in [
        // setuid goes, setgid goes where the group may execute...
        "[nobody] stat l_ug.w: Ok(File 0777 ",
        "[nobody] stat u_u.t: Ok(File 0777 ",
        "[nobody] stat l_g.o: Ok(File 0777 ",
        // ... and without group execute for writers outside the group
        "[nobody] stat l_gnx.w: Ok(File 0766 ",
        "[nobody] stat u_gnx.t: Ok(File 0766 ",
        "[nobody] stat l_gnx.o: Ok(File 0766 ",
        "[nobody] stat u_gnx.p: Ok(File 0766 ",
        "[nobody] stat l_gnx.f: Ok(File 0766 ",
        "[nobody] stat u_gnx.c: Ok(File 0766 ",
        // a writer in the group keeps it
        "[bob] stat l_staff_gnx.w: Ok(File 2766 ",
        "[bob] stat u_staff_gnx.t: Ok(File 2766 ",
    ] {
        assert_logged(&k, line);
    }
}

#[test]
fn writes_by_the_owner_and_by_root_on_setid_files() {
    fn ops(root: &Path) -> Vec<String> {
        // the owner is not exempt (only CAP_FSETID is): alice is in her own group
        let mut log = as_user(ALICE, root, |o| {
            modify_each_way(o, &["ug", "gnx", "staff_gnx", "foreign_gnx"]);
        });
        log.extend(as_root(root, |o| modify_each_way(o, &["u", "g"])));
        log
    }
    let k = run("setid_write_by_owner_and_root", setid_files, ops);
    for line in [
        "[alice] stat l_ug.w: Ok(File 0777 ",
        "[alice] stat u_gnx.t: Ok(File 2766 ",
        "[alice] stat l_staff_gnx.w: Ok(File 2766 ",
        "[alice] stat u_foreign_gnx.w: Ok(File 0766 ",
        "[alice] stat l_foreign_gnx.o: Ok(File 0766 ",
        "[root] stat l_u.w: Ok(File 4777 ",
        "[root] stat u_g.t: Ok(File 2777 ",
    ] {
        assert_logged(&k, line);
    }
}

#[test]
fn chown_clears_setid_bits_like_the_kernel() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = as_root(root, |o| {
            for p in ["l", "u"] {
                for name in ["su", "sg_x", "sg_nx"] {
                    let rel = format!("{p}_root_{name}");
                    o.chown_ids(&rel, Some(BOB.uid), None);
                    let _ = o.stat(&rel);
                }
                // root changing nothing keeps everything
                o.chown_ids(&format!("{p}_ug.w"), None, None);
                let _ = o.stat(&format!("{p}_ug.w"));
            }
        });
        log.extend(as_user(ALICE, root, |o| {
            for p in ["l", "u"] {
                // chgrp by the owner, from her own group and from one she is not in
                o.chown_ids(&format!("{p}_ug.t"), None, Some(STAFF));
                o.chown_ids(&format!("{p}_gnx.t"), None, Some(STAFF));
                o.chown_ids(&format!("{p}_staff_gnx.t"), None, Some(ALICE.gid));
                o.chown_ids(&format!("{p}_u.o"), None, None);
                o.chown_ids(&format!("{p}_gnx.o"), None, None);
                o.chown_ids(&format!("{p}_foreign_gnx.t"), None, Some(STAFF));
                o.chown_ids(&format!("{p}_foreign_gnx.o"), None, None);
                o.chown_ids(&format!("{p}_foreign_gnx.w"), None, Some(OTHER_GID));
                for f in [
                    "ug.t",
                    "gnx.t",
                    "staff_gnx.t",
                    "u.o",
                    "gnx.o",
                    "foreign_gnx.t",
                    "foreign_gnx.o",
                    "foreign_gnx.w",
                ] {
                    let _ = o.stat(&format!("{p}_{f}"));
                }
            }
        }));
        log.extend(as_user(BOB, root, |o| {
            // bob is in STAFF but owns nothing: a no-op chown is still a chown
            for p in ["l", "u"] {
                o.chown_ids(&format!("{p}_staff_gnx.w"), None, None);
                let _ = o.stat(&format!("{p}_staff_gnx.w"));
            }
        }));
        log.extend(as_user(NOBODY, root, |o| {
            // outside the group, a no-op chown would clear the bit, which only the owner
            // may do: others are refused
            for p in ["l", "u"] {
                o.chown_ids(&format!("{p}_gnx.w"), None, None);
                o.chown_ids(&format!("{p}_gnx.p"), Some(NOBODY.uid), None);
                let _ = o.stat(&format!("{p}_gnx.w"));
                let _ = o.stat(&format!("{p}_gnx.p"));
                // times alone never clear it
                o.touch_now(&format!("{p}_gnx.f"));
                let _ = o.stat(&format!("{p}_gnx.f"));
            }
        }));
        log
    }
    let k = run("setid_chown", setid_files, ops);
    for line in [
        "[root] stat l_root_su: Ok(File 0755 1001:0",
        "[root] stat u_root_sg_x: Ok(File 0755 1001:0",
        "[root] stat l_root_sg_nx: Ok(File 2745 1001:0",
        "[alice] stat l_ug.t: Ok(File 0777 1000:1234",
        "[alice] stat u_foreign_gnx.t: Ok(File 0766 1000:1234",
        "[alice] stat l_foreign_gnx.o: Ok(File 0766 1000:5",
        "[bob] stat l_staff_gnx.w: Ok(File 2766 ",
        "[nobody] chown u_gnx.w -1:-1: Err(EPERM)",
        "[nobody] stat u_gnx.w: Ok(File 2766 ",
        "[nobody] chown l_gnx.p 65534:-1: Err(EPERM)",
        "[nobody] stat l_gnx.f: Ok(File 2766 ",
    ] {
        assert_logged(&k, line);
    }
}

// ---------------------------------------------------------------------------
// set-group-id directories
// ---------------------------------------------------------------------------

/// 2777 directories of group STAFF: `sg` (lower), `usg` (upper), `msg` (merged); and a
/// 2755 one of alice's for her own creations.
fn setgid_dirs(l: &Layers) {
    let (u, l0, l1) = (l.up(), l.lower(0), l.lower(1));
    l0.mkdir("sg", 0o2777)
        .chown("sg", 0, STAFF)
        .chmod("sg", 0o2777)
        .mkdir("asg", 0o2755)
        .chown("asg", ALICE.uid, OTHER_GID)
        .chmod("asg", 0o2755);
    l1.mkdir("msg", 0o2777)
        .chown("msg", 0, STAFF)
        .chmod("msg", 0o2777)
        .write_file("msg/lower", b"lower\n", 0o644);
    u.mkdir("usg", 0o2777)
        .chown("usg", 0, STAFF)
        .chmod("usg", 0o2777)
        .mkdir("msg", 0o2777)
        .chown("msg", 0, STAFF)
        .chmod("msg", 0o2777);
}

fn create_in_setgid_dirs(o: &mut OpLog, dirs: &[&str]) {
    for d in dirs {
        o.create(&format!("{d}/file"), 0o644);
        o.create(&format!("{d}/setgid_exec"), 0o2775);
        o.create(&format!("{d}/setgid_noexec"), 0o2664);
        let _ = o.mkdir(&format!("{d}/sub"), 0o777);
        o.create(&format!("{d}/sub/nested"), 0o644);
        let _ = o.mkdir(&format!("{d}/sub/subsub"), 0o700);
        let _ = o.symlink("file", &format!("{d}/link"));
        o.fifo(&format!("{d}/fifo"), 0o620);
        for e in [
            "file",
            "setgid_exec",
            "setgid_noexec",
            "sub",
            "sub/nested",
            "sub/subsub",
            "link",
            "fifo",
        ] {
            let _ = o.lstat(&format!("{d}/{e}"));
        }
    }
}

#[test]
fn setgid_directories_hand_down_group_and_bit() {
    fn ops(root: &Path) -> Vec<String> {
        // nobody is not in STAFF: a setgid file he creates there loses the bit
        let mut log = as_user(NOBODY, root, |o| create_in_setgid_dirs(o, &["sg", "usg"]));
        log.extend(as_user(ALICE, root, |o| {
            create_in_setgid_dirs(o, &["msg", "asg"]);
        }));
        log.extend(as_root(root, |o| {
            o.create("sg/by_root", 0o2755);
            let _ = o.mkdir("usg/by_root", 0o755);
            let _ = o.lstat("sg/by_root");
            let _ = o.lstat("usg/by_root");
        }));
        log
    }
    let k = run("setgid_dirs", setgid_dirs, ops);
    for line in [
        "[nobody] lstat sg/file: Ok(File 0644 65534:1234",
        "[nobody] lstat usg/sub: Ok(Dir 2755 65534:1234",
        "[nobody] lstat sg/sub/subsub: Ok(Dir 2700 65534:1234",
        "[nobody] lstat sg/setgid_exec: Ok(File 0755 65534:1234",
        "[alice] lstat msg/setgid_exec: Ok(File 2755 1000:1234",
        "[alice] lstat asg/setgid_exec: Ok(File 0755 1000:5",
    ] {
        assert_logged(&k, line);
    }
}

// ---------------------------------------------------------------------------
// access(2) and faccessat(2)
// ---------------------------------------------------------------------------

const ACCESS_MODES: &[u32] = &[
    0o000, 0o400, 0o040, 0o004, 0o100, 0o010, 0o001, 0o111, 0o755, 0o600, 0o660, 0o606, 0o4711,
];

/// One file per mode of ACCESS_MODES, alice's, group STAFF, in a lower and the upper layer;
/// directories the same way.
fn access_table(l: &Layers) {
    let (u, l0) = (l.up(), l.lower(0));
    for (layer, p) in [(&l0, "l"), (&u, "u")] {
        for m in ACCESS_MODES {
            let f = format!("{p}_f{m:04o}");
            layer
                .write_file(&f, b"x\n", 0o600)
                .chown(&f, ALICE.uid, STAFF)
                .chmod(&f, *m);
            let d = format!("{p}_d{m:04o}");
            layer
                .mkdir(&d, 0o700)
                .chown(&d, ALICE.uid, STAFF)
                .chmod(&d, *m);
        }
    }
}

fn check_access_table(o: &mut OpLog) {
    for p in ["l", "u"] {
        for kind in ["f", "d"] {
            for m in ACCESS_MODES {
                let rel = format!("{p}_{kind}{m:04o}");
                for mode in [libc::F_OK, libc::R_OK, libc::W_OK, libc::X_OK] {
                    o.access_named(&rel, mode);
                }
                o.eaccess(&rel, libc::R_OK | libc::W_OK | libc::X_OK);
            }
        }
    }
}

fn access_ops(root: &Path) -> Vec<String> {
    let mut log = as_user(NOBODY, root, check_access_table);
    log.extend(as_user(ALICE, root, check_access_table));
    log.extend(as_user(BOB, root, check_access_table));
    log.extend(as_root(root, check_access_table));
    log
}

#[test]
fn access_and_faccessat_answer_like_the_kernel() {
    let k = run("access_table", access_table, access_ops);
    for line in [
        "[nobody] access l_f0004 R_OK: Ok(",
        "[nobody] access l_f0040 R_OK: Err(EACCES)",
        "[bob] access u_f0040 R_OK: Ok(",
        "[alice] access l_f0040 R_OK: Err(EACCES)",
        "[root] access l_f0600 X_OK: Err(EACCES)",
        "[root] access u_f0010 X_OK: Ok(",
        "[nobody] access l_f0606 W_OK: Ok(",
    ] {
        assert_logged(&k, line);
    }
}

#[test]
fn access_for_writing_in_a_union_without_upper_is_erofs() {
    let k = run_scenario(Scenario {
        name: "access_table_read_only",
        lowers: 2,
        upper: false,
        opts: "",
        build: |l| {
            // the builder's upper-layer half has nowhere to go: put both halves in the lower
            let l0 = l.lower(0);
            for p in ["l", "u"] {
                for m in ACCESS_MODES {
                    let f = format!("{p}_f{m:04o}");
                    l0.write_file(&f, b"x\n", 0o600)
                        .chown(&f, ALICE.uid, STAFF)
                        .chmod(&f, *m);
                    let d = format!("{p}_d{m:04o}");
                    l0.mkdir(&d, 0o700)
                        .chown(&d, ALICE.uid, STAFF)
                        .chmod(&d, *m);
                }
            }
        },
        ops: access_ops,
    });
    assert_logged(&k, "[nobody] access l_f0606 W_OK: Err(EROFS)");
    assert_logged(&k, "[nobody] access l_f0004 R_OK: Ok(");
}

// ---------------------------------------------------------------------------
// teeth
// ---------------------------------------------------------------------------

/// The credential switch works: as nobody, a root-only file on a plain filesystem is out
/// of reach, and the test process itself is still root afterwards.
#[test]
fn user_threads_really_lose_root() {
    let scratch = Scratch::new();
    let dir = scratch.mkdir("plain");
    let secret = dir.join("secret");
    fs::write(&secret, b"x").unwrap();
    fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let log = as_user(NOBODY, &dir, |o| {
        let _ = o.read("secret");
        let _ = o.chmod("secret", 0o644);
    });
    assert_eq!(
        log,
        [
            "[nobody] read secret: Err(EACCES)",
            "[nobody] chmod secret 644: Err(EPERM)"
        ]
    );
    // SAFETY: no arguments, no failure mode.
    assert_eq!(unsafe { libc::geteuid() }, 0, "the test process stays root");
    assert!(fs::read(&secret).is_ok());
}

/// The comparison catches a union that lets others in: ovlfuse mounted with
/// `no_default_permissions` (the daemon, root, then opens whatever it is asked to) differs
/// from the kernel overlay on the very reads the first scenario checks.
#[test]
fn differential_catches_a_union_without_permission_checks() {
    if testing_kernel_instead() {
        return;
    }
    let scratch = Scratch::new();
    let orig = scratch.layers(2, true);
    root_only_objects(&orig);
    let kl = copy_layers(&orig, &scratch.mkdir("kernel"));
    let fl = copy_layers(&orig, &scratch.mkdir("ovlfuse"));
    let km = mount_kernel_overlay(&kl);
    let fm = mount_ovlfuse(&fl, "no_default_permissions");
    let run_as_nobody = |m: &Mounted| -> Vec<String> {
        let root: PathBuf = m.mnt.clone();
        with_timeout(60, move || as_user(NOBODY, &root, try_to_read_everything))
    };
    let (klog, flog) = (run_as_nobody(&km), run_as_nobody(&fm));
    let diffs = op_log_differences(&klog, &flog);
    assert!(
        diffs.iter().any(|d| d.contains("read bottom_secret: Ok(")),
        "reading a 0600 root file as nobody through an unchecked union went unnoticed:\n  {}",
        diffs.join("\n  ")
    );
}

/// The same rules for writers that are whole processes (`setpriv` children), whose
/// supplementary groups ovlfuse must find by the pid FUSE reports.
#[test]
fn setid_bits_with_writers_in_other_processes() {
    fn ops(root: &Path) -> Vec<String> {
        let mut log = Vec::new();
        let mut as_process = |who: &[&str], script: &str, rel: &str| {
            let path = root.join(rel);
            let mut argv: Vec<&OsStr> = vec![OsStr::new("setpriv")];
            argv.extend(who.iter().map(OsStr::new));
            argv.extend([
                OsStr::new("--"),
                OsStr::new("sh"),
                OsStr::new("-c"),
                OsStr::new(script),
                OsStr::new("sh"),
                path.as_os_str(),
            ]);
            let out = run_argv(&argv, Duration::from_secs(30));
            log.push(format!(
                "{who:?} {script:?} {rel}: exit {:?} {}",
                out.code,
                out.stderr.trim()
            ));
            let md = fs::metadata(&path);
            log.push(format!("stat {rel}: {}", fmt_res(&md, fmt_md)));
        };
        let nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"];
        let bob = ["--reuid=1001", "--regid=1001", "--groups=1001,1234"];
        let alice = ["--reuid=1000", "--regid=1000", "--groups=1000,1234"];
        let append = "echo more >> \"$1\"";
        let trunc = "truncate -s 2 \"$1\"";
        for p in ["l", "u"] {
            as_process(&nobody, append, &format!("{p}_gnx.w"));
            as_process(&nobody, trunc, &format!("{p}_gnx.t"));
            as_process(&bob, append, &format!("{p}_staff_gnx.w"));
            as_process(&bob, trunc, &format!("{p}_staff_gnx.t"));
            as_process(&alice, append, &format!("{p}_foreign_gnx.w"));
            as_process(&alice, trunc, &format!("{p}_staff_gnx.p"));
            as_process(&nobody, append, &format!("{p}_ug.w"));
        }
        log
    }
    let k = run("setid_processes", setid_files, ops);
    for line in [
        "stat l_gnx.w: Ok(File 0766 ",
        "stat u_gnx.t: Ok(File 0766 ",
        "stat l_staff_gnx.w: Ok(File 2766 ",
        "stat u_staff_gnx.t: Ok(File 2766 ",
        "stat l_foreign_gnx.w: Ok(File 0766 ",
        "stat u_staff_gnx.p: Ok(File 2766 ",
        "stat l_ug.w: Ok(File 0777 ",
    ] {
        assert_logged(&k, line);
    }
}

/// Known difference: chown(2) with both ids -1 by someone who neither owns a 2766 file nor
/// is in its group, while any handle has the file open for writing. The kernel refuses it
/// (EPERM: clearing S_ISGID would be a chmod); FUSE sends it as the same empty SETATTR as a
/// write's request to clear the bit, so ovlfuse clears the bit instead.
#[test]
#[ignore = "known difference: no-op chown by a non-owner while the file is open for writing"]
fn noop_chown_by_non_owner_while_open_for_writing() {
    fn ops(root: &Path) -> Vec<String> {
        let keep = open_raw(&root.join("u_gnx.w"), libc::O_WRONLY, 0).unwrap();
        let log = as_user(NOBODY, root, |o| {
            o.chown_ids("u_gnx.w", None, None);
            let _ = o.stat("u_gnx.w");
        });
        drop(keep);
        log
    }
    run("noop_chown_open", setid_files, ops);
}

/// Root without CAP_FSETID is like anyone else: writing a 2766 file outside its group
/// clears S_ISGID. FUSE does not pass capabilities on; ovlfuse asks the calling thread.
#[test]
fn root_without_cap_fsetid_clears_setid_bits_too() {
    fn ops(root: &Path) -> Vec<String> {
        let root = root.to_path_buf();
        thread::spawn(move || {
            drop_cap_fsetid().expect("drop CAP_FSETID");
            let mut o = OpLog::new(&root);
            for p in ["l", "u"] {
                o.append_write(&format!("{p}_gnx.w"), b"root without CAP_FSETID\n");
                o.append_write(&format!("{p}_ug.w"), b"root without CAP_FSETID\n");
                o.ftruncate(&format!("{p}_foreign_gnx.t"), 1);
                for f in ["gnx.w", "ug.w", "foreign_gnx.t"] {
                    let _ = o.stat(&format!("{p}_{f}"));
                }
            }
            o.into_log()
        })
        .join()
        .unwrap()
    }
    let k = run("root_without_fsetid", setid_files, ops);
    for line in [
        "stat l_gnx.w: Ok(File 0766 ",
        "stat u_ug.w: Ok(File 0777 ",
        "stat u_foreign_gnx.t: Ok(File 0766 ",
    ] {
        assert_logged(&k, line);
    }
}

/// Removes CAP_FSETID from the calling thread's effective and permitted sets.
fn drop_cap_fsetid() -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_FSETID: u32 = 4;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [Data::default(); 2];
    // SAFETY: capget/capset with a v3 header and a two-element data array; pid 0 is this
    // thread only.
    unsafe {
        if libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
        data[0].effective &= !(1 << CAP_FSETID);
        data[0].permitted &= !(1 << CAP_FSETID);
        if libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
