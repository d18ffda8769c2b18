//! The status file container managers poll and `ovlfuse status`, against real mounts: what
//! the file says right after mounting and after unmounting, the command's exit codes (0
//! healthy, 1 poisoned, 2 not running) for a mountpoint and for a workdir, its messages for
//! targets it cannot use, and that it answers at once while the daemon is stopped.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::faultrig::{with_rig, writeback_unreported};
use common::*;
use ovlfuse::status::{
    Mode, STATUS_FILE, State, Status, StatusFile, Transport, registry_dirs, registry_name,
};

/// Longer than the command can need; a hang shows up as `timed_out`.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

fn status_of(target: &Path) -> CmdOut {
    run_argv(
        &[
            ovlfuse_bin().as_os_str(),
            OsStr::new("status"),
            target.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    )
}

fn describe(out: &CmdOut) -> String {
    format!(
        "exit {:?} (timed out: {})\n--- stdout\n{}--- stderr\n{}",
        out.code, out.timed_out, out.stdout, out.stderr
    )
}

fn workdir(l: &Layers) -> PathBuf {
    l.work.clone().expect("layers with a workdir")
}

fn read_status(workdir: &Path) -> Status {
    let path = workdir.join(STATUS_FILE);
    let text = fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Status::parse(&text).unwrap_or_else(|e| {
        panic!(
            "{}: {e}\n{}",
            path.display(),
            String::from_utf8_lossy(&text)
        )
    })
}

/// The name the daemon registers: canonical parent, last component as is (canonicalizing the
/// mountpoint itself would enter the mount).
fn canonical_mountpoint(m: &Mounted) -> PathBuf {
    let parent = m.path().parent().expect("mountpoint has a parent");
    fs::canonicalize(parent)
        .expect("canonical parent")
        .join(m.path().file_name().expect("mountpoint has a name"))
}

/// This user's registry entry for `mountpoint`, if this user has a registry.
fn registry_entry(mountpoint: &Path) -> Option<PathBuf> {
    registry_dirs()
        .into_iter()
        .next()
        .map(|dir| dir.join(registry_name(mountpoint)))
}

fn layers_with_file(s: &Scratch) -> Layers {
    let l = s.layers(1, true);
    l.lower(0).write_file("etc/issue", b"lower\n", 0o644);
    l
}

/// Sends SIGCONT on drop, so a stopped daemon is continued before its mount guard (declared
/// earlier, dropped later) unmounts, whatever assertion failed in between.
struct ContinueOnDrop(i32);

impl Drop for ContinueOnDrop {
    fn drop(&mut self) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A child blocked on a stopped daemon: at the end of the test the daemon continues first
/// (the child may be unkillable until its request is answered), then the child is reaped.
struct ReapAfterContinue {
    daemon: i32,
    child: std::process::Child,
}

impl Drop for ReapAfterContinue {
    fn drop(&mut self) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(self.daemon, libc::SIGCONT) };
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn process_state(pid: i32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

#[test]
fn status_file_says_ok_with_pid_mode_and_transport_right_after_mount() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let status = read_status(&workdir(&l));
    assert_eq!(status.state, State::Ok);
    assert_eq!(status.errno, 0);
    assert_eq!(status.first_error, None);
    assert_eq!(Some(status.pid as i32), m.daemon_pid());
    assert_eq!(status.mode.name(), "durable");
    assert_eq!(
        Some(status.transport.fstype()),
        fstype_of(m.path()).as_deref(),
        "transport matches the mount table"
    );
    assert_eq!(status.mountpoint, canonical_mountpoint(&m));
    assert_eq!(status.workdir, workdir(&l));
    let mut names: Vec<String> = fs::read_dir(workdir(&l))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "work")
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec![
            format!(".ovlfuse-status.next-{}", status.pid),
            STATUS_FILE.to_string()
        ],
        "the status file and the spare for its next version, nothing else"
    );
}

#[test]
fn fsync_0_is_reported_as_nosync_mode() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let _m = mount_ovlfuse(&l, "fsync=0");
    assert_eq!(read_status(&workdir(&l)).mode.name(), "nosync");
}

#[test]
fn status_of_mountpoint_and_of_workdir_exit_0_and_say_ok() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let root = m.p("etc/issue");
    assert_eq!(
        with_timeout(10, move || fs::read_to_string(root)
            .expect("read through the union")),
        "lower\n"
    );
    for target in [m.path().to_path_buf(), workdir(&l)] {
        let out = status_of(&target);
        assert_eq!(
            out.code,
            Some(0),
            "{}: {}",
            target.display(),
            describe(&out)
        );
        assert!(out.stdout.contains("state:       ok"), "{}", describe(&out));
        assert!(
            out.stdout.contains(&format!(
                "pid:         {} (running)",
                m.daemon_pid().unwrap()
            )),
            "{}",
            describe(&out)
        );
        assert!(
            out.stdout.contains("healthy (exit 0)"),
            "{}",
            describe(&out)
        );
    }
}

#[test]
fn registry_entry_exists_while_mounted_and_goes_at_unmount() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let Some(entry) = registry_entry(&canonical_mountpoint(&m)) else {
        eprintln!("no registry for this user (not root, no XDG_RUNTIME_DIR): nothing to check");
        return;
    };
    let text = fs::read_to_string(&entry)
        .unwrap_or_else(|e| panic!("registry entry {}: {e}", entry.display()));
    assert!(
        text.contains(&format!("\nworkdir={}\n", workdir(&l).display())),
        "{text}"
    );
    m.unmount();
    assert!(!entry.exists(), "{} is left after unmount", entry.display());
}

#[test]
fn after_unmount_the_file_says_unmounted_and_the_command_exits_2() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    m.unmount();
    let status = read_status(&workdir(&l));
    assert_eq!(status.state, State::Unmounted);
    assert_eq!(status.errno, 0);
    assert_eq!(status.pid as i32, pid);
    let out = status_of(&workdir(&l));
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stdout.contains("state:       unmounted"),
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout.contains("not running (exit 2)"),
        "{}",
        describe(&out)
    );
    // The mountpoint is now a plain empty directory, no longer in the registry.
    let out = status_of(m.path());
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stderr.contains(&m.path().display().to_string())
            && out.stderr.contains("nor an ovlfuse workdir"),
        "{}",
        describe(&out)
    );
}

#[test]
fn foreground_daemon_reports_its_pid_and_records_the_unmount() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse_foreground(&l, "");
    let pid = m.daemon_pid().expect("foreground child");
    // The mount shows up in the mount table at the handshake, just before the status file.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !workdir(&l).join(STATUS_FILE).exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(read_status(&workdir(&l)).pid as i32, pid);
    let out = status_of(m.path());
    assert_eq!(out.code, Some(0), "{}", describe(&out));
    let r = run_argv(
        &[OsStr::new("umount"), m.path().as_os_str()],
        COMMAND_TIMEOUT,
    );
    assert!(r.ok(), "umount: {}", r.stderr);
    assert_eq!(m.wait_foreground(Duration::from_secs(20)), Some(0));
    assert_eq!(read_status(&workdir(&l)).state, State::Unmounted);
}

#[test]
fn a_poisoned_status_file_exits_1_even_with_the_daemon_gone() {
    let s = Scratch::new();
    let work = s.mkdir("work");
    let status = Status {
        state: State::Poisoned,
        errno: libc::ENOSPC,
        first_error: Some(1_767_225_600),
        mode: Mode::Volatile,
        transport: Transport::Fuse,
        // Above pid_max: no such process.
        pid: 99_999_999,
        pid_start: None,
        mountpoint: s.path().join("merged"),
        workdir: work.clone(),
        updated: 1_767_225_601,
    };
    fs::write(work.join(STATUS_FILE), status.to_text()).unwrap();
    let out = status_of(&work);
    assert_eq!(out.code, Some(1), "{}", describe(&out));
    assert!(
        out.stdout.contains("state:       poisoned"),
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout
            .contains("errno:       28 ENOSPC (No space left on device)"),
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout.contains("2026-01-01 00:00:00 UTC"),
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout
            .contains("data written through the union may be lost"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_missing_target_exits_2_naming_it() {
    let s = Scratch::new();
    let missing = s.path().join("no-such-dir");
    let out = status_of(&missing);
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert_eq!(
        out.stderr,
        format!(
            "ovlfuse status: {}: no such file or directory\n",
            missing.display()
        )
    );
}

#[test]
fn a_directory_without_status_exits_2_naming_it() {
    let s = Scratch::new();
    let dir = s.mkdir("plain");
    let out = status_of(&dir);
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    let canonical = fs::canonicalize(&dir).unwrap();
    assert!(
        out.stderr.starts_with(&format!(
            "ovlfuse status: {}: neither a mountpoint in the registry",
            canonical.display()
        )),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_garbage_status_file_exits_2_naming_the_file_and_line() {
    let s = Scratch::new();
    let work = s.mkdir("work");
    fs::write(work.join(STATUS_FILE), "this is not a status file\n").unwrap();
    let out = status_of(&work);
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert_eq!(
        out.stderr,
        format!(
            "ovlfuse status: {}: not a valid ovlfuse status file: line 1: expected key=value, \
             found \"this is not a status file\"\n",
            fs::canonicalize(&work).unwrap().join(STATUS_FILE).display()
        )
    );
}

#[test]
fn no_target_is_a_usage_error() {
    let out = run_argv(
        &[ovlfuse_bin().as_os_str(), OsStr::new("status")],
        COMMAND_TIMEOUT,
    );
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stderr
            .contains("ovlfuse: status needs a MOUNTPOINT or WORKDIR argument"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_path_inside_the_mount_is_refused_without_entering_it() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let inside = m.p("etc");
    let out = status_of(&inside);
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stderr.contains(&format!(
            "{} is inside the ovlfuse mount {}",
            inside.display(),
            m.path().display()
        )),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_read_only_union_has_no_status_and_says_why() {
    let s = Scratch::new();
    let l = s.layers(2, false);
    let m = mount_ovlfuse(&l, "");
    let out = status_of(m.path());
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stderr
            .contains("read-only union without workdir has no status"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_killed_daemon_is_not_running() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let mut m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let entry = registry_entry(&canonical_mountpoint(&m));
    // SAFETY: plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while pid_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = status_of(&workdir(&l));
    m.unmount();
    // A killed daemon cannot remove its registry entry; do it for it.
    if let Some(entry) = entry {
        let _ = fs::remove_file(entry);
    }
    assert_eq!(out.code, Some(2), "{}", describe(&out));
    assert!(
        out.stdout.contains(&format!(
            "the daemon (pid {pid}) is gone without recording an unmount"
        )),
        "{}",
        describe(&out)
    );
}

/// End to end: a real lost write (the fault rig's ENOSPC writeback) poisons a volatile mount;
/// the status file says so with the errno, `ovlfuse status` exits 1 for the mountpoint and the
/// workdir, and still after the unmount (the errno stays).
#[test]
fn a_volatile_mount_poisoned_by_a_lost_write_reports_it_and_exits_1() {
    with_rig(120, |rig| {
        let scratch = Scratch::new();
        let lower = scratch.mkdir("lower");
        fs::write(lower.join("lowerfile"), b"lower\n").unwrap();
        let layers = rig.union_layers(lower);
        let (upper, work) = layers.upper_and_work();
        let mut m = mount_ovlfuse_foreground(&layers, "volatile");
        let status_path = work.join(STATUS_FILE);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !status_path.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = read_status(&work);
        assert_eq!((before.state, before.mode.name()), (State::Ok, "volatile"));

        let file = m.p("f");
        fs::File::create(&file).unwrap();
        rig.settle();
        let through_union = fs::OpenOptions::new().write(true).open(&file).unwrap();
        through_union.write_all_at(&noise(64 << 10, 3), 0).unwrap();
        let upper_copy = fs::File::open(upper.join("f")).unwrap();
        rig.fail_new_writes();
        writeback_unreported(&upper_copy, Duration::from_secs(20));
        rig.heal();

        let deadline = Instant::now() + Duration::from_secs(10);
        while read_status(&work).state == State::Ok && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let poisoned = read_status(&work);
        assert_eq!(
            (poisoned.state, poisoned.errno),
            (State::Poisoned, rig.errno())
        );
        assert!(poisoned.first_error.is_some());
        for target in [m.path().to_path_buf(), work.clone()] {
            let out = status_of(&target);
            assert_eq!(
                out.code,
                Some(1),
                "{}: {}",
                target.display(),
                describe(&out)
            );
            assert!(
                out.stdout.contains("state:       poisoned"),
                "{}",
                describe(&out)
            );
        }

        drop((through_union, upper_copy));
        let r = run_argv(
            &[OsStr::new("umount"), m.path().as_os_str()],
            COMMAND_TIMEOUT,
        );
        assert!(r.ok(), "umount: {}", describe(&r));
        assert_ne!(m.wait_foreground(Duration::from_secs(20)), Some(0));
        let after = read_status(&work);
        assert_eq!(
            (after.state, after.errno, after.first_error),
            (State::Unmounted, poisoned.errno, poisoned.first_error)
        );
        let out = status_of(&work);
        assert_eq!(out.code, Some(1), "{}", describe(&out));
    });
}

/// Unmounts a plain mount on drop.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = run_argv(&[OsStr::new("umount"), self.0.as_os_str()], COMMAND_TIMEOUT);
    }
}

#[test]
fn the_poison_is_recorded_even_when_the_workdir_filesystem_is_full() {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    }
    let s = Scratch::new();
    let tiny = s.mkdir("tiny");
    let r = run_argv(
        &[
            OsStr::new("mount"),
            OsStr::new("-t"),
            OsStr::new("tmpfs"),
            OsStr::new("-o"),
            OsStr::new("size=256k"),
            OsStr::new("ovlfuse-status-test"),
            tiny.as_os_str(),
        ],
        COMMAND_TIMEOUT,
    );
    assert!(r.ok(), "mount tmpfs: {}", describe(&r));
    let _unmount = UnmountOnDrop(tiny.clone());
    let work = tiny.join("work");
    fs::create_dir(&work).unwrap();
    let status = StatusFile::create_with_registry(
        &work,
        Path::new("/c/merged"),
        Mode::Durable,
        Transport::Fuse,
        None,
    )
    .unwrap();
    status.set_ok();
    assert_eq!(read_status(&work).state, State::Ok);

    let mut filler = fs::File::create(tiny.join("filler")).unwrap();
    let full = loop {
        if let Err(e) = filler.write_all(&[0xa5; 4096]) {
            break e;
        }
    };
    assert_eq!(full.raw_os_error(), Some(libc::ENOSPC), "{full}");
    let probe = fs::write(tiny.join("probe"), [0u8; 4096]).unwrap_err();
    assert_eq!(
        probe.raw_os_error(),
        Some(libc::ENOSPC),
        "the filesystem is full"
    );

    status.set_poisoned(libc::ENOSPC);
    let written = read_status(&work);
    assert_eq!(
        (written.state, written.errno),
        (State::Poisoned, libc::ENOSPC)
    );
    let out = status_of(&work);
    assert_eq!(out.code, Some(1), "{}", describe(&out));
}

#[test]
fn status_of_a_mountpoint_does_not_hang_while_the_daemon_is_stopped() {
    let s = Scratch::new();
    let l = layers_with_file(&s);
    let m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let _continue = ContinueOnDrop(pid);
    // SAFETY: plain kill(2) of the daemon this test started.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while process_state(pid) != Some('T') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(process_state(pid), Some('T'), "daemon {pid} did not stop");

    // The daemon really answers nothing now: a lookup in the mount waits. It is not killed:
    // through FUSE-over-io_uring the kernel hands a request to the ring at once, and a
    // caller whose request was handed over cannot be killed until it is answered. The
    // lookup ends when the daemon continues, and is reaped then (ReapAfterContinue).
    let probe = m.p("never-looked-up");
    let child = std::process::Command::new("stat")
        .arg(&probe)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn stat");
    let mut stuck = ReapAfterContinue { daemon: pid, child };
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        matches!(stuck.child.try_wait(), Ok(None)),
        "stat inside the mount of a stopped daemon returned"
    );

    let started = Instant::now();
    let out = status_of(m.path());
    assert!(!out.timed_out, "ovlfuse status hung: {}", describe(&out));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ovlfuse status took {:?}",
        started.elapsed()
    );
    assert_eq!(out.code, Some(0), "{}", describe(&out));
    assert!(
        out.stdout
            .contains(&format!("pid:         {pid} (stopped)")),
        "{}",
        describe(&out)
    );
    assert!(
        out.stdout.contains("the daemon process is stopped"),
        "{}",
        describe(&out)
    );
}
