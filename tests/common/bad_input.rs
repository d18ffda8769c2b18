//! Helpers for the bad-input tests: a foreground mount whose log can be read, a tiny tmpfs
//! of one's own (to fill up), and running the binary on arbitrary command lines in a sandbox
//! in which it can never mount anything.
//!
//! Everything here cleans up in `Drop`, so a failing or panicking test leaves nothing
//! mounted.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::{
    CmdOut, Layers, MountKind, Mounted, is_mounted, join_opts, new_mountpoint, ovlfuse_bin,
    run_argv, run_cmd,
};

/// A foreground ovlfuse mount (`-f`) whose stderr — the daemon's log — goes to a file.
pub struct LoggedMount {
    pub m: Mounted,
    pub log: PathBuf,
}

impl LoggedMount {
    /// Everything the daemon has logged so far.
    pub fn log_text(&self) -> String {
        fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Whether the daemon process is still running (not a zombie).
    pub fn daemon_alive(&self) -> bool {
        self.m.daemon_pid().is_some_and(super::pid_alive)
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.m.p(rel)
    }
}

/// Mounts ovlfuse over `layers` in the foreground (`-f`, `RUST_LOG` as the caller's
/// environment has it, `warn` by default), its stderr and stdout in a log file next to the
/// layers. Waits up to 30 s for the mount; the guard unmounts and reaps the daemon.
pub fn mount_ovlfuse_logged(layers: &Layers, extra_opts: &str) -> LoggedMount {
    let bin = ovlfuse_bin();
    let mnt = new_mountpoint(layers, "fuselog");
    let log = mnt.with_extension("log");
    let opts = join_opts(&layers.mount_opts(), extra_opts);
    let file = fs::File::create(&log).expect("create the daemon log file");
    let child = Command::new(&bin)
        .arg("-f")
        .arg("-o")
        .arg(&opts)
        .arg(&mnt)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().expect("dup log fd")))
        .stderr(Stdio::from(file))
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
    while !is_mounted(&mnt) {
        if let Ok(Some(st)) = m.child.as_mut().expect("child").try_wait() {
            panic!(
                "{} -f exited ({st}) before mounting {}\n{}",
                bin.display(),
                mnt.display(),
                String::from_utf8_lossy(&fs::read(&log).unwrap_or_default())
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
    LoggedMount { m, log }
}

/// A tmpfs of a given size (and inode count) mounted on a fresh directory; unmounted
/// (lazily if busy) on drop. Made to be filled up.
pub struct TinyTmpfs {
    pub dir: PathBuf,
}

impl TinyTmpfs {
    /// `size` in bytes; `nr_inodes` 0 for tmpfs's default.
    pub fn new(dir: PathBuf, size: u64, nr_inodes: u64) -> TinyTmpfs {
        fs::create_dir_all(&dir).expect("create tmpfs mountpoint");
        let mut opts = format!("size={size}");
        if nr_inodes > 0 {
            opts.push_str(&format!(",nr_inodes={nr_inodes}"));
        }
        if let Err(e) = super::mount_tmpfs("ovlfuse-tiny", &dir, 0, &opts) {
            panic!("mount tmpfs on {}: {e}", dir.display());
        }
        TinyTmpfs { dir }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.dir.join(rel)
    }

    /// Free bytes (statvfs f_bavail * f_frsize).
    pub fn free_bytes(&self) -> u64 {
        statvfs(&self.dir).map_or(0, |s| s.f_bavail * s.f_frsize)
    }

    /// Free inodes.
    pub fn free_inodes(&self) -> u64 {
        free_inodes_at(&self.dir)
    }
}

/// Free inodes of the filesystem holding `p` (0 if it cannot be asked).
pub fn free_inodes_at(p: &Path) -> u64 {
    statvfs(p).map_or(0, |s| s.f_favail)
}

impl Drop for TinyTmpfs {
    fn drop(&mut self) {
        if !is_mounted(&self.dir) {
            return;
        }
        let r = run_argv(
            &[OsStr::new("umount"), self.dir.as_os_str()],
            Duration::from_secs(10),
        );
        if !r.ok() && is_mounted(&self.dir) {
            eprintln!(
                "[bad_input] umount {} failed ({}), lazily",
                self.dir.display(),
                r.stderr.trim()
            );
            let _ = run_argv(
                &[OsStr::new("umount"), OsStr::new("-l"), self.dir.as_os_str()],
                Duration::from_secs(10),
            );
        }
    }
}

fn statvfs(p: &Path) -> io::Result<libc::statvfs> {
    let c = super::cstr(p);
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Layers on a tiny tmpfs: `lowers` elsewhere (any filesystem), upper and work on `tiny`.
pub fn layers_on(tiny: &TinyTmpfs, lowers: Vec<PathBuf>) -> Layers {
    let upper = tiny.p("upper");
    let work = tiny.p("work");
    fs::create_dir_all(&upper).expect("mkdir upper");
    fs::create_dir_all(&work).expect("mkdir work");
    Layers {
        lowers,
        upper: Some(upper),
        work: Some(work),
    }
}

/// Runs `argv` (program first) with `cwd` as its directory, under a seccomp filter that
/// answers EPERM to every way of mounting (mount, the new mount API, and the loop-device
/// ioctls a fuseblk mount needs first), so that whatever the arguments say, nothing can be
/// mounted or attached. The filter is inherited by every child (a daemonized ovlfuse, a
/// fusermount3 helper) and survives exec (`no_new_privs` also keeps set-uid helpers
/// unprivileged). Killed after `timeout`.
pub fn run_unable_to_mount(argv: &[OsString], cwd: &Path, timeout: Duration) -> CmdOut {
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]).current_dir(cwd);
    // Built before the fork: nothing may allocate between fork and exec.
    let filter = no_mount_filter();
    // SAFETY: only async-signal-safe prctl calls between fork and exec.
    unsafe { cmd.pre_exec(move || install_filter(&filter)) };
    run_cmd(&mut cmd, timeout)
}

/// A seccomp program refusing (EPERM) the mount system calls and the loop-device ioctls.
fn no_mount_filter() -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    // Loop-device ioctls (linux/loop.h): LOOP_SET_FD, LOOP_CONFIGURE, LOOP_CTL_ADD,
    // LOOP_CTL_GET_FREE.
    const LOOP_IOCTLS: [u32; 4] = [0x4C00, 0x4C0A, 0x4C80, 0x4C82];
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let deny = libc::SECCOMP_RET_ERRNO | libc::EPERM as u32;
    let mount_calls = [
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_open_tree,
        libc::SYS_move_mount,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_mount_setattr,
    ];
    let mut filter = vec![
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        libc::sock_filter {
            code: JEQ_K,
            jt: 1,
            jf: 0,
            k: AUDIT_ARCH_X86_64,
        },
        // Any other architecture (an x32/i386 syscall table): refuse the call outright.
        stmt(RET_K, deny),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
    ];
    // Each mount call: "if nr == call, jump to the deny at the end" (jt counts the
    // instructions to skip).
    let n_mount = mount_calls.len();
    for (i, nr) in mount_calls.iter().enumerate() {
        // Instructions after this one up to the final `deny`: the rest of the mount checks,
        // the ioctl block (1 + 1 + 1 + 4 + 1), then the allow.
        let to_deny = (n_mount - i - 1) + 1 + 1 + 1 + LOOP_IOCTLS.len() + 1;
        filter.push(libc::sock_filter {
            code: JEQ_K,
            jt: to_deny as u8,
            jf: 0,
            k: *nr as u32,
        });
    }
    // if nr != ioctl: allow
    filter.push(libc::sock_filter {
        code: JEQ_K,
        jt: 1,
        jf: 0,
        k: libc::SYS_ioctl as u32,
    });
    filter.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    filter.push(stmt(LD_W_ABS, 16 + 8)); // low half of args[1], the ioctl request
    for (i, req) in LOOP_IOCTLS.iter().enumerate() {
        let to_deny = (LOOP_IOCTLS.len() - i - 1) + 1;
        filter.push(libc::sock_filter {
            code: JEQ_K,
            jt: to_deny as u8,
            jf: 0,
            k: *req,
        });
    }
    filter.push(stmt(RET_K, libc::SECCOMP_RET_ALLOW));
    filter.push(stmt(RET_K, deny));
    filter
}

fn install_filter(filter: &[libc::sock_filter]) -> io::Result<()> {
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
