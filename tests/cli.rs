//! Bad command lines and impossible mounts: each gets one clear message naming the option or
//! path and the reason, and the documented exit code (2 usage, 1 cannot mount). None of
//! these may leave a mount or a daemon behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const USAGE: i32 = 2;
const CANNOT_MOUNT: i32 = 1;

fn bin() -> PathBuf {
    std::env::var_os("OVLFUSE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_ovlfuse")))
}

/// Runs a command with a deadline; returns (exit code, stderr).
fn run(cmd: &mut Command) -> (i32, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            let out = child.wait_with_output().expect("output");
            return (
                status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("command did not finish in 30 s: {cmd:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ovlfuse(args: &[&str]) -> (i32, String) {
    run(Command::new(bin()).args(args))
}

/// Directories for a mount attempt: l1, l2, upper, work, mnt.
struct Dirs {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Dirs {
    fn new() -> Dirs {
        let tmp = tempfile::Builder::new()
            .prefix("ovlfuse-cli-")
            .tempdir()
            .expect("tempdir");
        let root = tmp.path().to_path_buf();
        for d in ["l1", "l2", "upper", "work", "mnt"] {
            std::fs::create_dir(root.join(d)).expect("mkdir");
        }
        Dirs { _tmp: tmp, root }
    }

    fn p(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }
}

/// A tmpfs mounted for the length of a test (unmounted lazily on drop, even on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn at(path: &Path) -> Tmpfs {
        std::fs::create_dir_all(path).expect("mkdir");
        let (code, err) = run(Command::new("mount")
            .args(["-t", "tmpfs", "tmpfs"])
            .arg(path));
        assert_eq!(code, 0, "mount tmpfs: {err}");
        Tmpfs(path.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn assert_fails(result: (i32, String), code: i32, message: &str) {
    let (got, stderr) = result;
    assert_eq!(got, code, "exit code; stderr was: {stderr}");
    let first = stderr.lines().next().unwrap_or("");
    assert_eq!(first, message, "full stderr: {stderr}");
}

fn assert_nothing_mounted(at: &str) {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(
        !mounts.lines().any(|l| l.split(' ').nth(4) == Some(at)),
        "{at} is still mounted"
    );
}

#[test]
fn unknown_option_is_named() {
    let d = Dirs::new();
    let opts = format!("lowerdir={},frobnicate", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        USAGE,
        "ovlfuse: unknown option \"frobnicate\"",
    );
}

#[test]
fn missing_lowerdir_is_a_usage_error() {
    let d = Dirs::new();
    assert_fails(
        ovlfuse(&["-o", "ro", &d.p("mnt")]),
        USAGE,
        "ovlfuse: missing required option lowerdir=",
    );
}

#[test]
fn upperdir_without_workdir_is_refused() {
    let d = Dirs::new();
    let opts = format!("lowerdir={},upperdir={}", d.p("l1"), d.p("upper"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        USAGE,
        "ovlfuse: upperdir= needs workdir= as well: both are needed for a writable overlay",
    );
}

#[test]
fn missing_mountpoint_is_a_usage_error() {
    let d = Dirs::new();
    let opts = format!("lowerdir={}", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts]),
        USAGE,
        "ovlfuse: missing MOUNTPOINT",
    );
}

#[test]
fn bad_thread_count_names_the_value() {
    let d = Dirs::new();
    let opts = format!("lowerdir={},threads=0", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        USAGE,
        "ovlfuse: invalid value \"0\" for threads=: expected a whole number >= 1",
    );
}

#[test]
fn missing_lower_directory_is_named() {
    let d = Dirs::new();
    let missing = d.p("nope");
    let opts = format!("lowerdir={}:{missing}", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!("ovlfuse: lowerdir: cannot use {missing}: no such directory"),
    );
    assert_nothing_mounted(&d.p("mnt"));
}

#[test]
fn lower_that_is_a_file_is_refused() {
    let d = Dirs::new();
    let file = d.p("file");
    std::fs::write(&file, b"x").expect("write");
    let opts = format!("lowerdir={file}");
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!("ovlfuse: lowerdir: cannot use {file}: not a directory"),
    );
}

#[test]
fn missing_upper_directory_is_named() {
    let d = Dirs::new();
    let missing = d.p("no-upper");
    let opts = format!(
        "lowerdir={},upperdir={missing},workdir={}",
        d.p("l1"),
        d.p("work")
    );
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!("ovlfuse: upperdir: cannot use {missing}: no such directory"),
    );
}

#[test]
fn upper_and_work_on_different_filesystems_are_refused() {
    let d = Dirs::new();
    let _work_fs = Tmpfs::at(&d.root.join("work"));
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        d.p("l1"),
        d.p("upper"),
        d.p("work")
    );
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!(
            "ovlfuse: workdir: {} and upperdir {} are on different filesystems; they must share one",
            d.p("work"),
            d.p("upper")
        ),
    );
    assert_nothing_mounted(&d.p("mnt"));
}

#[test]
fn workdir_inside_upperdir_is_refused() {
    let d = Dirs::new();
    let inner = d.p("upper/work");
    std::fs::create_dir(&inner).expect("mkdir");
    let opts = format!(
        "lowerdir={},upperdir={},workdir={inner}",
        d.p("l1"),
        d.p("upper")
    );
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!(
            "ovlfuse: workdir: {inner} is inside upperdir {}; they must be separate directories",
            d.p("upper")
        ),
    );
}

#[test]
fn upperdir_inside_workdir_is_refused() {
    let d = Dirs::new();
    let inner = d.p("work/upper");
    std::fs::create_dir(&inner).expect("mkdir");
    let opts = format!(
        "lowerdir={},upperdir={inner},workdir={}",
        d.p("l1"),
        d.p("work")
    );
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        CANNOT_MOUNT,
        &format!(
            "ovlfuse: upperdir: {inner} is inside workdir {}; they must be separate directories",
            d.p("work")
        ),
    );
}

#[test]
fn busy_mountpoint_is_refused() {
    let d = Dirs::new();
    let _busy = Tmpfs::at(&d.root.join("mnt"));
    let opts = format!("lowerdir={}", d.p("l1"));
    let (code, stderr) = ovlfuse(&["-o", &opts, &d.p("mnt")]);
    assert_eq!(code, CANNOT_MOUNT, "stderr: {stderr}");
    assert!(
        stderr.starts_with(&format!("ovlfuse: mountpoint {} is busy", d.p("mnt"))),
        "stderr: {stderr}"
    );
}

#[test]
fn missing_mountpoint_directory_is_refused() {
    let d = Dirs::new();
    let missing = d.p("no-mnt");
    let opts = format!("lowerdir={}", d.p("l1"));
    let (code, stderr) = ovlfuse(&["-o", &opts, &missing]);
    assert_eq!(code, CANNOT_MOUNT, "stderr: {stderr}");
    assert!(
        stderr.starts_with("ovlfuse: mountpoint") && stderr.contains(&missing),
        "stderr: {stderr}"
    );
}

#[test]
fn missing_dev_fuse_is_explained() {
    let d = Dirs::new();
    // A private mount namespace whose /dev is an empty tmpfs: /dev/fuse is gone for the
    // command only, the host is untouched.
    let opts = format!("lowerdir={}", d.p("l1"));
    let script = format!(
        "mount -t tmpfs none /dev && exec {} -o {} {}",
        bin().display(),
        opts,
        d.p("mnt")
    );
    let (code, stderr) =
        run(Command::new("unshare").args(["-m", "--propagation", "private", "sh", "-c", &script]));
    assert_eq!(code, CANNOT_MOUNT, "stderr: {stderr}");
    assert!(
        stderr.starts_with("ovlfuse: cannot open /dev/fuse"),
        "stderr: {stderr}"
    );
    assert_nothing_mounted(&d.p("mnt"));
}

#[test]
fn help_and_version_exit_zero() {
    let out = Command::new(bin()).arg("--help").output().expect("run");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in ["lowerdir=", "upperdir=", "workdir=", "userxattr", "demo"] {
        assert!(help.contains(option), "--help does not document {option}");
    }
    let out = Command::new(bin()).arg("--version").output().expect("run");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("ovlfuse {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn demo_shows_the_union_and_cleans_up() {
    let out = Command::new(bin()).arg("demo").output().expect("run demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let union: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("the union at"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .map(str::trim)
        .collect();
    let names: Vec<&str> = union
        .iter()
        .map(|l| l.split_whitespace().next().unwrap_or(""))
        .collect();
    assert_eq!(
        names,
        [
            "app/run.sh",
            "docs/readme.txt",
            "etc/hostname",
            "etc/motd",
            "etc/os-release"
        ],
        "demo output: {stdout}"
    );
    assert!(
        union[2].ends_with("app-image"),
        "lower1 must shadow lower2: {stdout}"
    );
    let base = stdout
        .lines()
        .find_map(|l| l.strip_prefix("layers in "))
        .and_then(|l| l.strip_suffix(':'))
        .expect("demo names its directory");
    assert!(!Path::new(base).exists(), "demo left {base} behind");
}

#[test]
fn malformed_uid_mapping_is_named() {
    let d = Dirs::new();
    let opts = format!("lowerdir={},uidmapping=0:1000", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        USAGE,
        "ovlfuse: invalid uidmapping= \"0:1000\": expected CONTAINER:HOST:SIZE triples separated by ':'",
    );
    let opts = format!("lowerdir={},gidmapping=0:x:1", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, &d.p("mnt")]),
        USAGE,
        "ovlfuse: invalid gidmapping= \"0:x:1\": \"x\" is not a number from 0 to 4294967295",
    );
}

#[test]
fn dev_fd_that_is_not_open_is_refused() {
    let d = Dirs::new();
    let opts = format!("lowerdir={}", d.p("l1"));
    assert_fails(
        ovlfuse(&["-o", &opts, "/dev/fd/987"]),
        CANNOT_MOUNT,
        "ovlfuse: mountpoint /dev/fd/987: descriptor 987 is not open (the caller must open /dev/fuse, mount it, and pass the descriptor)",
    );
}
