//! The mount lifecycle as container runtimes and users drive it: the command-line shapes
//! that must mount, the ways a mount must end (umount, fusermount3 -u, SIGTERM, SIGINT in
//! the foreground), and kernel requests fuser cannot parse, which must fail fast instead of
//! hanging the caller.

mod common;

use std::ffi::{CString, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

fn layers_with_file(s: &Scratch) -> Layers {
    let l = s.layers(3, true);
    l.lower(2).write_file("etc/issue", b"bottom\n", 0o644);
    l.lower(0).write_file("etc/issue", b"top\n", 0o644);
    l
}

fn wait_gone(pid: i32, mnt: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while (pid_alive(pid) || is_mounted(mnt)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(mnt), "{} is still mounted", mnt.display());
    assert!(!pid_alive(pid), "daemon {pid} is still running");
}

fn read_issue(m: &Mounted) -> String {
    let p = m.p("etc/issue");
    with_timeout(10, move || fs::read_to_string(p).expect("read etc/issue"))
}

#[test]
fn mount_fuse_convention_shows_source_and_type() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let opts = l.mount_opts();
    let m = mount_ovlfuse_with(&l, |mnt| {
        vec![
            "container-42".into(),
            mnt.as_os_str().to_owned(),
            "-o".into(),
            opts.into(),
        ]
    });
    assert_eq!(mount_source_of(m.path()).as_deref(), Some("container-42"));
    // root gets fuseblk, so that syncfs(2) reaches the daemon
    assert_eq!(fstype_of(m.path()).as_deref(), Some("fuseblk.ovlfuse"));
    assert_eq!(read_issue(&m), "top\n");
}

#[test]
fn fsname_option_names_the_source() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "fsname=my-rootfs");
    assert_eq!(mount_source_of(m.path()).as_deref(), Some("my-rootfs"));
}

#[test]
fn repeated_o_and_quoted_context_with_commas_mount() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let lowers: Vec<String> = l.lowers.iter().map(|p| p.display().to_string()).collect();
    let upper = l.upper.clone().expect("upper");
    let work = l.work.clone().expect("work");
    let m = mount_ovlfuse_with(&l, |mnt| {
        let args: Vec<OsString> = vec![
            "-o".into(),
            format!("lowerdir={}", lowers.join(":")).into(),
            "-o".into(),
            format!("upperdir={},workdir={}", upper.display(), work.display()).into(),
            "-o".into(),
            "context=\"system_u:object_r:container_file_t:s0:c1,c2\",noatime".into(),
            mnt.as_os_str().to_owned(),
        ];
        args
    });
    assert_eq!(read_issue(&m), "top\n");
}

#[test]
fn twenty_lower_layers_stack_in_order() {
    let s = Scratch::new();
    let l = s.layers(20, false);
    for i in 0..20 {
        l.lower(i)
            .write_file(&format!("only{i}"), format!("{i}\n").as_bytes(), 0o644);
        l.lower(i)
            .write_file("shared", format!("layer {i}\n").as_bytes(), 0o644);
    }
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let (shared, count) = with_timeout(20, move || {
        let shared = fs::read_to_string(root.join("shared")).expect("read shared");
        let count = fs::read_dir(&root).expect("readdir").count();
        (shared, count)
    });
    assert_eq!(shared, "layer 0\n", "the first lowerdir is the top layer");
    assert_eq!(count, 21);
}

/// The daemon sizes its descriptor table before its threads start (a multi-threaded process
/// that outgrows it waits an RCU grace period in the open that needed the room): right after
/// the mount, with a handful of descriptors open, the table already has its 16,384 slots, or
/// as many as the soft RLIMIT_NOFILE allows.
#[test]
fn the_daemon_sizes_its_descriptor_table_before_serving() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| {
                l.split_whitespace()
                    .nth(if key == "Max open files" { 3 } else { 1 })
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in /proc/{pid}"))
    };
    let fd_size = field(&status, "FDSize:");
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).expect("limits");
    let soft = field(&limits, "Max open files");
    let open = fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fd dir")
        .count() as u64;
    let want = soft.min(16384);
    assert!(
        fd_size >= want,
        "FDSize {fd_size} with {open} descriptors open; expected at least {want} \
         (soft RLIMIT_NOFILE {soft})"
    );
    drop(m);
}

#[test]
fn umount_ends_the_daemon() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let out = run_argv(
        &["umount".as_ref(), m.path().as_os_str()],
        Duration::from_secs(10),
    );
    assert!(out.ok(), "umount: {}", out.stderr);
    wait_gone(pid, m.path());
    m.unmount();
}

#[test]
fn fusermount3_unmount_ends_the_daemon() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let out = run_argv(
        &["fusermount3".as_ref(), "-u".as_ref(), m.path().as_os_str()],
        Duration::from_secs(10),
    );
    assert!(out.ok(), "fusermount3 -u: {}", out.stderr);
    wait_gone(pid, m.path());
    m.unmount();
}

#[test]
fn sigterm_unmounts_and_ends_the_daemon() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    assert_eq!(read_issue(&m), "top\n");
    // SAFETY: signalling the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    wait_gone(pid, m.path());
    m.unmount();
}

#[test]
fn sigint_ends_a_foreground_mount_with_exit_zero() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse_foreground(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    assert_eq!(read_issue(&m), "top\n");
    // SAFETY: signalling the daemon this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_mounted(m.path()) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!is_mounted(m.path()), "SIGINT did not unmount");
    let status = m.wait_foreground(Duration::from_secs(10));
    assert_eq!(status, Some(0), "foreground daemon exit code after SIGINT");
}

#[test]
fn o_tmpfile_fails_fast_with_eopnotsupp() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let dir = CString::new(m.path().as_os_str().as_bytes()).expect("path");
    let errno = with_timeout(10, move || {
        // SAFETY: valid path; the fd, if any, is closed right away.
        let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
        if fd >= 0 {
            unsafe { libc::close(fd) };
            0
        } else {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
        }
    });
    assert_eq!(errno, libc::EOPNOTSUPP, "O_TMPFILE on a read-only union");
}

#[test]
fn statx_asking_for_birth_time_answers_promptly() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let path = CString::new(m.p("etc/issue").as_os_str().as_bytes()).expect("path");
    let size = with_timeout(10, move || {
        // SAFETY: zeroed statx is a valid out-buffer.
        let mut stx: libc::statx = unsafe { std::mem::zeroed() };
        let ret = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                path.as_ptr(),
                0,
                libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                &mut stx,
            )
        };
        assert_eq!(ret, 0, "statx: {}", std::io::Error::last_os_error());
        stx.stx_size
    });
    assert_eq!(size, 4);
}

/// `nofuseblk` gives a plain fuse mount, with the same source.
#[test]
fn nofuseblk_mounts_plain_fuse() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "fsname=plain-42,nofuseblk");
    assert_eq!(mount_source_of(m.path()).as_deref(), Some("plain-42"));
    assert_eq!(fstype_of(m.path()).as_deref(), Some("fuse.ovlfuse"));
    assert_eq!(read_issue(&m), "top\n");
}

/// The loop device behind a fuseblk mount goes away with the mount, and the helper node
/// that named its source is gone as soon as the mount is made.
#[test]
fn fuseblk_leaves_no_loop_device_behind() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "fsname=loop-42");
    assert_eq!(fstype_of(m.path()).as_deref(), Some("fuseblk.ovlfuse"));
    // mountinfo: "id parent MAJ:MIN root mountpoint ..."
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let mnt = m.path().to_str().unwrap().to_string();
    let dev = mountinfo
        .lines()
        .map(|l| l.split(' ').collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[4] == mnt)
        .map(|f| f[2].to_string())
        .expect("the mount is not in mountinfo");
    let backing = std::path::PathBuf::from(format!("/sys/dev/block/{dev}/loop/backing_file"));
    let name = std::fs::read_to_string(&backing).unwrap_or_default();
    assert!(
        name.contains("ovlfuse-fuseblk"),
        "device {dev} is not our loop device (backing file {name:?})"
    );
    let pid = m.daemon_pid().expect("daemon pid");
    let leftovers: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".ovlfuse-source-{pid}-"))
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "source-naming dirs left: {leftovers:?}"
    );
    m.unmount();
    let still = || {
        std::fs::read_to_string(&backing)
            .map(|b| b.contains("ovlfuse-fuseblk"))
            .unwrap_or(false)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while still() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!still(), "loop device {dev} still attached after umount");
}

/// umount of a fuseblk mount waits for the daemon's answer to FUSE_DESTROY, which passes
/// through the relay while it shuts the fuser workers down: that answer must never be
/// dropped, whatever order the workers finish in (it once was, and umount hung in D state).
#[test]
fn fuseblk_umount_never_hangs() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    for round in 0..15 {
        let mut m = mount_ovlfuse(&l, "threads=6");
        assert_eq!(fstype_of(m.path()).as_deref(), Some("fuseblk.ovlfuse"));
        assert_eq!(read_issue(&m), "top\n");
        let out = run_argv(
            &["umount".as_ref(), m.path().as_os_str()],
            std::time::Duration::from_secs(20),
        );
        assert!(
            out.ok(),
            "round {round}: umount: {}{}",
            out.stdout,
            out.stderr
        );
        m.unmount();
    }
}

/// Turns the fuse module's `enable_uring` on for the test (if the kernel has it) and puts
/// the old value back at the end. Connections keep what they negotiated at INIT, so other
/// tests mounting meanwhile work either way.
struct UringEnabled {
    before: Option<String>,
}

const ENABLE_URING: &str = "/sys/module/fuse/parameters/enable_uring";

impl UringEnabled {
    /// `None` if this kernel has no FUSE-over-io_uring.
    fn new() -> Option<UringEnabled> {
        let before = fs::read_to_string(ENABLE_URING).ok()?.trim().to_string();
        if before != "Y" {
            fs::write(ENABLE_URING, "Y").expect("turn fuse.enable_uring on");
            return Some(UringEnabled {
                before: Some(before),
            });
        }
        Some(UringEnabled { before: None })
    }
}

impl Drop for UringEnabled {
    fn drop(&mut self) {
        if let Some(before) = &self.before {
            let _ = fs::write(ENABLE_URING, before);
        }
    }
}

/// Completions the daemon's io_uring instances have posted, from their `CqTail` in
/// /proc/PID/fdinfo, and how many instances it has.
fn uring_completions(pid: i32) -> (u64, usize) {
    let mut total = 0u64;
    let mut rings = 0;
    for entry in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        let is_ring = fs::read_link(entry.path())
            .is_ok_and(|target| target.to_string_lossy().contains("io_uring"));
        if !is_ring {
            continue;
        }
        let fd = entry.file_name();
        let info = fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.to_string_lossy()))
            .unwrap_or_default();
        if let Some(tail) = info
            .lines()
            .find_map(|l| l.strip_prefix("CqTail:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            total += tail;
            rings += 1;
        }
    }
    (total, rings)
}

fn stat_missing_names(m: &Mounted, tag: &str, count: usize) {
    for i in 0..count {
        let err = fs::metadata(m.p(&format!("{tag}-{i}"))).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
    }
}

/// A fuseblk mount made with `opts` while the kernel allows FUSE-over-io_uring, and its
/// daemon's pid; `None` (the test is skipped) on a kernel without it. Bind the tuple in
/// this order: bindings drop last first, so the mount goes before its scratch directory,
/// and both before the setting is put back.
fn fuseblk_mount_with_uring_allowed(opts: &str) -> Option<(UringEnabled, Scratch, Mounted, i32)> {
    let Some(enabled) = UringEnabled::new() else {
        eprintln!("skipped: this kernel has no FUSE-over-io_uring");
        return None;
    };
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, opts);
    assert_eq!(fstype_of(m.path()).as_deref(), Some("fuseblk.ovlfuse"));
    let pid = m.daemon_pid().expect("daemon pid");
    Some((enabled, s, m, pid))
}

/// On fuseblk the daemon takes requests through FUSE-over-io_uring when the kernel allows
/// it: one ring per possible CPU, and each lookup of a new name is a completion on one of
/// them. The union still works as before, syncfs included.
#[test]
fn fuseblk_serves_requests_through_io_uring() {
    let Some((_enabled, _s, m, pid)) = fuseblk_mount_with_uring_allowed("") else {
        return;
    };
    let possible = fs::read_to_string("/sys/devices/system/cpu/possible").unwrap();
    let queues = possible
        .trim()
        .split(',')
        .filter_map(|part| part.rsplit('-').next()?.parse::<usize>().ok())
        .max()
        .unwrap()
        + 1;

    let (before, rings) = uring_completions(pid);
    assert_eq!(rings, queues, "one io_uring per possible CPU");
    stat_missing_names(&m, "absent", 200);
    let (after, _) = uring_completions(pid);
    assert!(
        after >= before + 200,
        "200 lookups of new names made {} io_uring completions",
        after - before
    );
    assert_eq!(read_issue(&m), "top\n");
    fs::write(m.p("new"), b"data").unwrap();
    let dir = fs::File::open(m.path()).unwrap();
    // SAFETY: syncfs on a descriptor we own.
    assert_eq!(
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)) },
        0
    );
    assert_eq!(fs::read(m.p("new")).unwrap(), b"data");
}

/// `nouring` keeps every request on `/dev/fuse` reads, whatever the kernel allows.
#[test]
fn nouring_reads_requests_from_the_device() {
    let Some((_enabled, _s, m, pid)) = fuseblk_mount_with_uring_allowed("nouring") else {
        return;
    };
    assert_eq!(uring_completions(pid), (0, 0), "no io_uring instance");
    stat_missing_names(&m, "absent", 20);
    assert_eq!(read_issue(&m), "top\n");
}
