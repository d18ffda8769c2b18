//! Helpers for the long-running tests (`tests/concurrency.rs`, `tests/daemon_death.rs`):
//! run sizes, seeds, a seeded generator, a progress watchdog that turns a hang into a test
//! failure, and samples of a daemon's memory, descriptors and kernel stacks.
//!
//! Environment: `OVLFUSE_FULL=1` selects the long runs, `OVLFUSE_LOAD_SECS` sets the length
//! of each timed load phase, `OVLFUSE_SEED` replays a run (decimal or `0x` hex).

use std::fmt::Write as _;
use std::fs;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// `OVLFUSE_FULL` is set: run the long versions.
pub fn full_run() -> bool {
    std::env::var_os("OVLFUSE_FULL").is_some()
}

/// Length of one timed load phase: `OVLFUSE_LOAD_SECS`, else `short` (or `full` with
/// `OVLFUSE_FULL`).
pub fn load_secs(short: u64, full: u64) -> Duration {
    let secs = std::env::var("OVLFUSE_LOAD_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .map(Duration::from_secs_f64);
    secs.unwrap_or(Duration::from_secs(if full_run() { full } else { short }))
}

/// A number from the environment variable `var`, else `short` (or `full` with
/// `OVLFUSE_FULL`).
pub fn env_count(var: &str, short: usize, full: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(if full_run() { full } else { short })
}

/// The seed of a randomised test: `OVLFUSE_SEED` if set, else a fresh one. Printed (with the
/// test's name) so a failing run can be replayed.
pub fn seed_for(test: &str) -> u64 {
    let seed = match std::env::var("OVLFUSE_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|e| panic!("OVLFUSE_SEED={s:?}: {e}"))
        }
        Err(_) => {
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1);
            // Mixed with the pid so tests started in the same nanosecond differ.
            t ^ ((std::process::id() as u64) << 40)
        }
    };
    eprintln!("{test}: OVLFUSE_SEED={seed:#x}");
    seed
}

/// xorshift64* — small, seeded, reproducible.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        // splitmix64 step, so nearby seeds give unrelated streams.
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }

    /// True with probability `percent`/100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

/// The connection to the daemon is gone (it died, or the mount was aborted).
pub fn is_conn_error(errno: i32) -> bool {
    // ECANCELED: through FUSE-over-io_uring, a call the kernel was handing to the dead
    // daemon's ring when it died.
    matches!(errno, libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED)
}

// ---------------------------------------------------------------------------
// progress watchdog
// ---------------------------------------------------------------------------

/// Per-thread progress of a load run: each worker says what it is about to do and ticks
/// after every operation; [`Progress::watch`] fails when one stops ticking.
pub struct Progress {
    slots: Vec<Slot>,
}

struct Slot {
    ops: AtomicU64,
    finished: AtomicBool,
    doing: Mutex<String>,
}

impl Progress {
    pub fn new(threads: usize) -> Progress {
        Progress {
            slots: (0..threads)
                .map(|_| Slot {
                    ops: AtomicU64::new(0),
                    finished: AtomicBool::new(false),
                    doing: Mutex::new(String::from("starting")),
                })
                .collect(),
        }
    }

    /// Thread `i` is about to do `what` (shown if it never comes back).
    pub fn doing(&self, i: usize, what: String) {
        *self.slots[i]
            .doing
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = what;
    }

    /// Thread `i` finished one more operation.
    pub fn tick(&self, i: usize) {
        self.slots[i].ops.fetch_add(1, Ordering::Relaxed);
    }

    /// Thread `i` is done (normally or not).
    pub fn finish(&self, i: usize) {
        self.slots[i].finished.store(true, Ordering::SeqCst);
    }

    pub fn ops(&self, i: usize) -> u64 {
        self.slots[i].ops.load(Ordering::Relaxed)
    }

    pub fn total_ops(&self) -> u64 {
        (0..self.slots.len()).map(|i| self.ops(i)).sum()
    }

    /// Returns once every thread has finished, or `Err` naming the threads that made no
    /// progress for `stall` (what each was doing, its operation count) — the caller then
    /// unblocks them (kills the daemon) and fails the test, which must not hang.
    pub fn watch(&self, stall: Duration) -> Result<(), String> {
        let n = self.slots.len();
        let mut last: Vec<(u64, Instant)> = (0..n).map(|i| (self.ops(i), Instant::now())).collect();
        loop {
            let now = Instant::now();
            let mut stuck = Vec::new();
            let mut all_done = true;
            for (i, slot) in self.slots.iter().enumerate() {
                if slot.finished.load(Ordering::SeqCst) {
                    continue;
                }
                all_done = false;
                let ops = self.ops(i);
                if ops != last[i].0 {
                    last[i] = (ops, now);
                } else if now.duration_since(last[i].1) >= stall {
                    let doing = slot.doing.lock().unwrap_or_else(|e| e.into_inner()).clone();
                    stuck.push(format!(
                        "thread {i}: no progress for {:.1} s after {ops} ops, doing: {doing}",
                        now.duration_since(last[i].1).as_secs_f64()
                    ));
                }
            }
            if all_done {
                return Ok(());
            }
            if !stuck.is_empty() {
                return Err(stuck.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

// ---------------------------------------------------------------------------
// the daemon seen from /proc
// ---------------------------------------------------------------------------

/// One look at a daemon process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DaemonSample {
    /// Resident set size, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Open descriptors (entries of `/proc/PID/fd`).
    pub fds: u64,
    pub threads: u64,
}

impl std::fmt::Display for DaemonSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "rss {} KiB, {} fds, {} threads",
            self.rss_kib, self.fds, self.threads
        )
    }
}

pub fn sample_daemon(pid: i32) -> std::io::Result<DaemonSample> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    Ok(DaemonSample {
        rss_kib: field("VmRSS:"),
        fds,
        threads: field("Threads:"),
    })
}

/// Every thread of `pid` with its state, `wchan` and kernel stack: what a hang report needs.
pub fn daemon_stacks(pid: i32) -> String {
    let mut out = String::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return format!("(no /proc/{pid}/task)");
    };
    for t in tasks.flatten() {
        let dir = t.path();
        let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .unwrap_or("?")
            .to_string();
        let _ = writeln!(
            out,
            "  task {} ({}) state {state} wchan {}",
            t.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan").trim()
        );
        for line in read("stack").lines() {
            let _ = writeln!(out, "      {line}");
        }
    }
    out
}

/// `echo 2 > /proc/sys/vm/drop_caches`: the kernel evicts unused dentries and inodes, so a
/// FUSE daemon gets FORGETs for everything nobody holds.
pub fn drop_dentries_and_inodes() {
    let _ = fs::write("/proc/sys/vm/drop_caches", b"2");
}

/// Waits until `f` returns `Some`, polling every 50 ms, for at most `timeout`.
pub fn poll_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Names in `work` (a `workdir/work`) left by interrupted ovlfuse operations: its temporary
/// prefix, which `copy_up::clean_work_dir` removes at mount.
pub fn work_leftovers(work: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(work)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("#ovlfuse-cu-"))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
const JSET_K: u16 = (libc::BPF_JMP | libc::BPF_JSET | libc::BPF_K) as u16;
const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

const fn stmt(code: u16, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// Installs a seccomp filter (`filter` must start by checking the architecture). Runs
/// between fork and exec: only async-signal-safe calls.
fn install_filter(filter: &[libc::sock_filter]) -> std::io::Result<()> {
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
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A `pre_exec` hook for a daemon that must die at a known point: the process (and what it
/// forks) is killed by the kernel — like `kill -9`, it runs no further instruction — at its
/// first `fchmodat`, `chmod` or `fchmod`. ovlfuse calls them only right after creating an object: the temporary
/// copy of a copy-up in `workdir/work`, or a new object staged there (over a whiteout).
/// (Mounting calls none.)
pub fn die_at_first_fchmodat() -> std::io::Result<()> {
    install_filter(&[
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        // chmod too: ovlfuse sets modes through an O_PATH handle's /proc magic link, so a
        // name swapped for a symlink is never followed; and fchmod: a new file gets its
        // mode through the descriptor it was made with.
        jump(JEQ_K, libc::SYS_fchmodat as u32, 4, 0),
        jump(JEQ_K, libc::SYS_fchmodat2 as u32, 3, 0),
        jump(JEQ_K, libc::SYS_chmod as u32, 2, 0),
        jump(JEQ_K, libc::SYS_fchmod as u32, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ])
}

/// Like [`die_at_first_fchmodat`], at the first `setfsuid(0)`: a thread that made an object
/// in place as a caller other than root goes back to root's fsuid first thing after. (The
/// daemon reads its own fsuid with `setfsuid(-1)`, which does not match.)
pub fn die_at_first_setfsuid_root() -> std::io::Result<()> {
    install_filter(&[
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(JEQ_K, libc::SYS_setfsuid as u32, 0, 2),
        stmt(LD_W_ABS, 16), // low half of args[0], the uid
        jump(JEQ_K, 0, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ])
}

/// Like [`die_at_first_fchmodat`], at the first removal of a non-directory (`unlink`, or
/// `unlinkat` without `AT_REMOVEDIR`). A plain (`nofuseblk`) mount removes none; ovlfuse
/// removes the whiteouts inside a directory it cleans up after an rmdir or a rename over a
/// directory (a fuseblk mount removes a temporary file while mounting: not usable there).
pub fn die_at_first_unlink() -> std::io::Result<()> {
    install_filter(&[
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jump(JEQ_K, libc::SYS_unlink as u32, 4, 0),
        jump(JEQ_K, libc::SYS_unlinkat as u32, 0, 2),
        stmt(LD_W_ABS, 16 + 2 * 8), // low half of args[2], the unlinkat flags
        jump(JSET_K, libc::AT_REMOVEDIR as u32, 0, 1),
        stmt(RET_K, libc::SECCOMP_RET_ALLOW),
        stmt(RET_K, libc::SECCOMP_RET_KILL_PROCESS),
    ])
}
