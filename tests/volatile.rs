//! Volatile mode at mount time, checked against the kernel overlayfs: every scenario runs on
//! the kernel overlay and on ovlfuse, and both must behave the same — refused or mounted, with
//! the kernel's sentence in the refusal (mount(2)'s errno and dmesg for the kernel, exit code
//! 1 and stderr for ovlfuse), and the same marker on disk.
//!
//! - A volatile mount creates `workdir/work/incompat/volatile/dirty` (mode 000 throughout) and
//!   leaves it after unmounting.
//! - While any feature is marked in `work/incompat`, every mount with that work directory is
//!   refused (EINVAL, "overlay with incompat feature 'NAME' cannot be mounted"), volatile or
//!   not; removing `incompat/volatile` allows mounting again.
//! - A volatile mount of an upper whose filesystem has an unseen writeback error is refused
//!   (EIO, "Cannot mount volatile when upperdir has an unseen error. ..."), before the work
//!   directory is looked at. The error is real: raised on the fault rig
//!   (`common::faultrig`), with nobody reporting it.
//!
//! Only mount time is tested here: the runtime half of volatile mode is not.

mod common;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::faultrig::{FaultyExt4, cachestat, with_rig, writeback_unreported};
use common::*;

/// Deadline for a test without the rig.
const SECS: u64 = 60;
/// Deadline for a rig test's body (rig setup is bounded by its own command timeouts).
const RIG_SECS: u64 = 120;

const EINVAL_REFUSAL: &str = "overlay with incompat feature 'volatile' cannot be mounted";
const UNSEEN_REFUSAL: &str =
    "Cannot mount volatile when upperdir has an unseen error. Sync upperdir fs to clear state.";

// ---------------------------------------------------------------------------
// one mount attempt on either filesystem
// ---------------------------------------------------------------------------

/// What one mount attempt did. A mount that succeeds is unmounted again at once.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Mounted,
    /// `code`: mount(2)'s errno for the kernel, the exit code for ovlfuse; `message`: the
    /// kernel's `overlayfs:` log lines, or ovlfuse's stderr.
    Refused {
        code: i32,
        message: String,
    },
}

impl Outcome {
    /// `what`: which filesystem and options, for the message when it mounted.
    fn refusal(&self, what: &str) -> (i32, &str) {
        match self {
            Outcome::Refused { code, message } => (*code, message),
            Outcome::Mounted => panic!("{what}: expected a refusal, but it mounted"),
        }
    }
}

static ATTEMPT: AtomicUsize = AtomicUsize::new(0);
/// Kernel attempts run one at a time, so the log lines read after one are its own.
static KMSG: Mutex<()> = Mutex::new(());

fn fresh_mountpoint(layers: &Layers, tag: &str) -> PathBuf {
    let n = ATTEMPT.fetch_add(1, Ordering::SeqCst);
    let p = layers.base().join(format!("try-{tag}-{n}"));
    fs::create_dir_all(&p).unwrap();
    p
}

fn with_opts(layers: &Layers, extra: &str) -> String {
    let extra = extra.trim_matches(',');
    if extra.is_empty() {
        layers.mount_opts()
    } else {
        format!("{},{extra}", layers.mount_opts())
    }
}

/// Unmounts `mnt` when dropped (also on a failed assertion) and waits for its ovlfuse daemon
/// to exit, killing it after 10 s.
struct UnmountOnDrop(PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let mnt = &self.0;
        if is_mounted(mnt) {
            let r = run_argv(
                &[OsStr::new("umount"), mnt.as_os_str()],
                Duration::from_secs(10),
            );
            if !r.ok() {
                let _ = run_argv(
                    &[OsStr::new("umount"), OsStr::new("-l"), mnt.as_os_str()],
                    Duration::from_secs(10),
                );
            }
        }
        let name = ovlfuse_bin().file_name().unwrap().to_os_string();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pids = find_daemons(&name, mnt);
            if pids.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                for pid in pids {
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The kernel overlay over `layers` with `extra` options, by mount(2) itself (mount(8) hides
/// the errno), with the `overlayfs:` lines the kernel logged meanwhile.
fn kernel_attempt(layers: &Layers, extra: &str) -> Outcome {
    let mnt = fresh_mountpoint(layers, "kernel");
    let _unmount = UnmountOnDrop(mnt.clone());
    // `ro` is a mount flag, not an overlay option (as mount(8) passes it).
    let read_only = extra.split(',').any(|o| o == "ro");
    let extra: Vec<&str> = extra.split(',').filter(|o| *o != "ro").collect();
    let data = cstr(with_opts(layers, &extra.join(",")));
    let target = cstr(&mnt);
    let flags = if read_only { libc::MS_RDONLY } else { 0 };
    let _serial = KMSG.lock().unwrap_or_else(|p| p.into_inner());
    let (result, log) = kernel_log_during(|| {
        let r = unsafe {
            libc::mount(
                c"overlay".as_ptr(),
                target.as_ptr(),
                c"overlay".as_ptr(),
                flags,
                data.as_ptr().cast(),
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    });
    match result {
        Ok(()) => Outcome::Mounted,
        Err(e) => Outcome::Refused {
            code: errno_of(&e),
            message: log
                .into_iter()
                .filter(|l| l.starts_with("overlayfs: "))
                .collect::<Vec<_>>()
                .join("\n"),
        },
    }
}

/// The kernel log lines (message text only) written while `f` runs.
fn kernel_log_during<T>(f: impl FnOnce() -> T) -> (T, Vec<String>) {
    let fd = unsafe {
        libc::open(
            c"/dev/kmsg".as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    assert!(fd >= 0, "open /dev/kmsg: {}", io::Error::last_os_error());
    let kmsg = unsafe { OwnedFd::from_raw_fd(fd) };
    // SEEK_END on /dev/kmsg: from now on only new records are read.
    assert!(unsafe { libc::lseek(kmsg.as_raw_fd(), 0, libc::SEEK_END) } >= 0);
    let value = f();
    let mut lines = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = unsafe { libc::read(kmsg.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            match io::Error::last_os_error().raw_os_error() {
                // EPIPE: records were overwritten meanwhile; the next read goes on.
                Some(libc::EPIPE) | Some(libc::EINTR) => continue,
                _ => break, // EAGAIN: no more records
            }
        }
        if n == 0 {
            break;
        }
        // "prio,seq,time,flags;text\n" followed by continuation lines
        let record = String::from_utf8_lossy(&buf[..n as usize]).into_owned();
        if let Some((_, text)) = record.split_once(';') {
            lines.push(text.lines().next().unwrap_or("").to_string());
        }
    }
    (value, lines)
}

/// ovlfuse over `layers` with `extra` options, as a container runtime calls it.
fn ovlfuse_attempt(layers: &Layers, extra: &str) -> Outcome {
    let mnt = fresh_mountpoint(layers, "fuse");
    let _unmount = UnmountOnDrop(mnt.clone());
    let bin = ovlfuse_bin();
    let r = run_argv(
        &[
            bin.as_os_str(),
            OsStr::new("-o"),
            OsStr::new(&with_opts(layers, extra)),
            mnt.as_os_str(),
        ],
        Duration::from_secs(30),
    );
    assert!(!r.timed_out, "{} did not return within 30 s", bin.display());
    if r.ok() {
        assert!(
            is_mounted(&mnt),
            "exit 0 but {} is not mounted",
            mnt.display()
        );
        return Outcome::Mounted;
    }
    assert!(
        !is_mounted(&mnt),
        "ovlfuse refused ({:?}) but left {} mounted",
        r.code,
        mnt.display()
    );
    Outcome::Refused {
        code: r.code.unwrap_or(-1),
        message: r.stderr,
    }
}

/// Both refuse: the kernel with `errno` and `sentence` in its log, ovlfuse with exit 1 and
/// the same sentence on stderr. The kernel goes first (ovlfuse's unseen-error check consumes
/// the error; see `documented_difference_*`).
fn assert_both_refuse(layers: &Layers, extra: &str, errno: i32, sentence: &str) {
    let kernel = kernel_attempt(layers, extra);
    let (code, log) = kernel.refusal(&format!("kernel overlay, -o {extra}"));
    assert_eq!(
        (errno_name(code), log.contains(sentence)),
        (errno_name(errno), true),
        "kernel overlay, -o {extra}: expected {} with {sentence:?}, got {} with {log:?}",
        errno_name(errno),
        errno_name(code)
    );
    let fuse = ovlfuse_attempt(layers, extra);
    let (code, stderr) = fuse.refusal(&format!("ovlfuse -o {extra}"));
    assert_eq!(
        (code, stderr.contains(sentence)),
        (1, true),
        "ovlfuse -o {extra}: expected exit 1 with {sentence:?}, got exit {code}: {stderr}"
    );
}

fn assert_both_mount(layers: &Layers, extra: &str) {
    assert_eq!(
        kernel_attempt(layers, extra),
        Outcome::Mounted,
        "kernel overlay, -o {extra}"
    );
    assert_eq!(
        ovlfuse_attempt(layers, extra),
        Outcome::Mounted,
        "ovlfuse -o {extra}"
    );
}

// ---------------------------------------------------------------------------
// the marker
// ---------------------------------------------------------------------------

/// Everything under `work/incompat`, as (path below `work`, st_mode, size), sorted.
fn marker(layers: &Layers) -> Vec<(String, u32, u64)> {
    let work = layers.work.as_ref().unwrap().join("work");
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::from("incompat")];
    while let Some(rel) = todo.pop() {
        let Ok(md) = fs::symlink_metadata(work.join(&rel)) else {
            continue;
        };
        if md.is_dir() {
            for e in fs::read_dir(work.join(&rel)).unwrap() {
                todo.push(rel.join(e.unwrap().file_name()));
            }
        }
        out.push((rel.display().to_string(), md.mode(), md.len()));
    }
    out.sort();
    out
}

fn expected_marker() -> Vec<(String, u32, u64)> {
    vec![
        ("incompat".into(), libc::S_IFDIR, 4096),
        ("incompat/volatile".into(), libc::S_IFDIR, 4096),
        ("incompat/volatile/dirty".into(), libc::S_IFREG, 0),
    ]
}

/// Directory sizes depend on the filesystem: compare them as "a directory".
fn shape(m: Vec<(String, u32, u64)>) -> Vec<(String, u32, u64)> {
    m.into_iter()
        .map(|(p, mode, size)| {
            let size = if mode & libc::S_IFMT == libc::S_IFDIR {
                4096
            } else {
                size
            };
            (p, mode, size)
        })
        .collect()
}

/// Fresh layers (one lower with a file, upper, work) in `scratch`.
fn layers_in(scratch: &Scratch) -> Layers {
    let layers = scratch.layers(1, true);
    layers.lower(0).write_file("f", b"lower\n", 0o644);
    layers
}

/// Mounts the kernel overlay or ovlfuse with `-o volatile` (or `fsync=volatile`), checks the marker while mounted
/// and after unmounting, and returns it.
fn volatile_mount_marker(layers: &Layers, kernel: bool, spelling: &str) -> Vec<(String, u32, u64)> {
    let mut m = if kernel {
        mount_kernel_overlay_opts(layers, spelling)
    } else {
        mount_ovlfuse(layers, spelling)
    };
    let mounted = marker(layers);
    m.unmount();
    let after = marker(layers);
    assert_eq!(mounted, after, "the marker changed at unmount");
    after
}

#[test]
fn volatile_mount_creates_the_marker_and_leaves_it_after_unmount() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        for spelling in ["volatile", "fsync=volatile"] {
            let (k, f) = (layers_in(&scratch), layers_in(&scratch));
            let kernel = volatile_mount_marker(&k, true, spelling);
            let ovlfuse = volatile_mount_marker(&f, false, spelling);
            assert_eq!(
                shape(kernel.clone()),
                expected_marker(),
                "kernel, -o {spelling}"
            );
            assert_eq!(
                shape(ovlfuse.clone()),
                shape(kernel),
                "ovlfuse differs from the kernel, -o {spelling}"
            );
        }
    })
}

#[test]
fn a_marked_work_dir_refuses_every_mount_on_both() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        // one work dir marked by each: either refuses the other's marker too
        let by_kernel = layers_in(&scratch);
        let by_ovlfuse = layers_in(&scratch);
        volatile_mount_marker(&by_kernel, true, "volatile");
        volatile_mount_marker(&by_ovlfuse, false, "volatile");
        for layers in [&by_kernel, &by_ovlfuse] {
            for extra in ["volatile", "fsync=volatile", "", "ro", "ro,volatile"] {
                assert_both_refuse(layers, extra, libc::EINVAL, EINVAL_REFUSAL);
            }
            // a refusal changes nothing on disk
            assert_eq!(shape(marker(layers)), expected_marker());
        }
    })
}

#[test]
fn ovlfuse_names_the_directory_to_remove() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        let layers = layers_in(&scratch);
        volatile_mount_marker(&layers, false, "volatile");
        let path = layers.work.as_ref().unwrap().join("work/incompat/volatile");
        let out = ovlfuse_attempt(&layers, "");
        let (_, stderr) = out.refusal("ovlfuse");
        assert!(
            stderr.contains(&format!("remove {} ", path.display())),
            "{stderr}"
        );
    })
}

#[test]
fn removing_incompat_volatile_allows_mounting_again_removing_dirty_does_not() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        let layers = layers_in(&scratch);
        volatile_mount_marker(&layers, false, "volatile");
        let work = layers.work.as_ref().unwrap().join("work");
        fs::remove_file(work.join("incompat/volatile/dirty")).unwrap();
        assert_both_refuse(&layers, "", libc::EINVAL, EINVAL_REFUSAL);
        fs::remove_dir(work.join("incompat/volatile")).unwrap();
        assert_both_mount(&layers, "");
        // and a volatile mount marks it again, on either
        assert_eq!(
            shape(volatile_mount_marker(&layers, true, "volatile")),
            expected_marker()
        );
        fs::remove_dir_all(work.join("incompat")).unwrap();
        assert_eq!(
            shape(volatile_mount_marker(&layers, false, "volatile")),
            expected_marker()
        );
    })
}

#[test]
fn any_feature_in_incompat_refuses_empty_or_dot_names_do_not() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        let layers = layers_in(&scratch);
        let incompat = layers.work.as_ref().unwrap().join("work/incompat");
        // The kernel empties `work` at each mount it allows; recreate before each attempt.
        let setup = |files: &[&str], dirs: &[&str]| {
            let _ = fs::remove_dir_all(&incompat);
            fs::create_dir_all(&incompat).unwrap();
            for d in dirs {
                fs::create_dir(incompat.join(d)).unwrap();
            }
            for f in files {
                fs::write(incompat.join(f), b"").unwrap();
            }
        };
        setup(&["foo"], &[]);
        assert_both_refuse(
            &layers,
            "",
            libc::EINVAL,
            "overlay with incompat feature 'foo' cannot be mounted",
        );
        setup(&[], &[]);
        assert_eq!(kernel_attempt(&layers, ""), Outcome::Mounted);
        setup(&[], &[]);
        assert_eq!(ovlfuse_attempt(&layers, ""), Outcome::Mounted);
        setup(&[".hidden"], &[]);
        assert_eq!(kernel_attempt(&layers, ""), Outcome::Mounted);
        setup(&[".hidden"], &[]);
        assert_eq!(ovlfuse_attempt(&layers, ""), Outcome::Mounted);
        // a file named `incompat` holds no feature
        let _ = fs::remove_dir_all(&incompat);
        fs::write(&incompat, b"").unwrap();
        assert_both_mount(&layers, "");
    })
}

#[test]
fn volatile_without_an_upper_layer_is_ignored_on_both() {
    with_timeout(SECS, || {
        let scratch = Scratch::new();
        let layers = scratch.layers(2, false);
        assert_both_mount(&layers, "volatile");
    })
}

// ---------------------------------------------------------------------------
// unseen upper writeback errors (the fault rig)
// ---------------------------------------------------------------------------

/// Layers whose upper and work directories are on the rig's ext4; the lower is in `scratch`.
fn layers_on_rig(rig: &FaultyExt4, scratch: &Scratch) -> Layers {
    let lower = scratch.mkdir("lower");
    fs::write(lower.join("f"), b"lower\n").unwrap();
    let (upper, work) = (rig.p("upper"), rig.p("work"));
    fs::create_dir(&upper).unwrap();
    fs::create_dir(&work).unwrap();
    Layers {
        lowers: vec![lower],
        upper: Some(upper),
        work: Some(work),
    }
}

/// Raises a writeback error on the upper's filesystem that nobody sees: a new file written
/// in the upper directly on the ext4, its writeback failed by the rig, without any fsync or
/// syncfs. Returns the file (kept open, as a running container would).
fn raise_unseen_upper_error(rig: &FaultyExt4, layers: &Layers, name: &str) -> File {
    rig.settle();
    let mut f = File::create(layers.upper.as_ref().unwrap().join(name)).unwrap();
    f.write_all(&noise(64 << 10, 3)).unwrap();
    let dirty = cachestat(&f).expect("cachestat").nr_dirty;
    assert!(dirty > 0, "the new data is not dirty in the page cache");
    rig.fail_new_writes();
    let still = cachestat(&f).expect("cachestat").nr_dirty;
    assert_eq!(
        still, dirty,
        "pages were written back before the rig failed them (a global sync?)"
    );
    writeback_unreported(&f, Duration::from_secs(20));
    assert!(rig.ext4_is_rw(), "ext4 went read-only");
    rig.heal();
    f
}

fn incompat_exists(layers: &Layers) -> bool {
    layers.work.as_ref().unwrap().join("work/incompat").exists()
}

#[test]
fn unseen_upper_writeback_error_refuses_a_volatile_mount_on_both() {
    with_rig(RIG_SECS, |rig| {
        let scratch = Scratch::new();
        let layers = layers_on_rig(rig, &scratch);
        let _f = raise_unseen_upper_error(rig, &layers, "lost");
        // The kernel: EIO, and again (its check leaves the error unseen).
        for _ in 0..2 {
            let k = kernel_attempt(&layers, "volatile");
            let (code, log) = k.refusal("kernel overlay, -o volatile");
            assert_eq!(errno_name(code), "EIO", "{log}");
            assert!(log.contains(UNSEEN_REFUSAL), "{log}");
        }
        // ovlfuse: exit 1 with the kernel's sentence and the upper directory.
        let f = ovlfuse_attempt(&layers, "volatile");
        let (code, stderr) = f.refusal("ovlfuse -o volatile");
        assert_eq!(code, 1, "{stderr}");
        assert!(stderr.contains(UNSEEN_REFUSAL), "{stderr}");
        let upper = layers.upper.as_ref().unwrap().display().to_string();
        assert!(stderr.contains(&upper), "{stderr}");
        // Neither got as far as marking the work dir.
        assert!(!incompat_exists(&layers));
    })
}

#[test]
fn unseen_upper_error_is_checked_before_the_marker_on_both() {
    with_rig(RIG_SECS, |rig| {
        let scratch = Scratch::new();
        let layers = layers_on_rig(rig, &scratch);
        // a marker from an earlier volatile mount, flushed before the error
        let marker = layers.work.as_ref().unwrap().join("work/incompat/volatile");
        fs::create_dir_all(&marker).unwrap();
        fs::write(marker.join("dirty"), b"").unwrap();
        let _f = raise_unseen_upper_error(rig, &layers, "lost");
        // Non-volatile mounts do not check the error: the marker refuses them.
        assert_both_refuse(&layers, "", libc::EINVAL, EINVAL_REFUSAL);
        // Volatile mounts: the unseen error wins.
        assert_both_refuse(&layers, "volatile", libc::EIO, UNSEEN_REFUSAL);
    })
}

/// Documented difference (`src/volatile.rs`): userspace can only test for an unseen error by
/// reporting it (syncfs), so ovlfuse refuses one volatile mount and the next one mounts, as
/// after the sync the kernel's message asks for; the kernel refuses until someone syncs.
#[test]
fn documented_difference_ovlfuse_refuses_only_the_first_volatile_mount_after_an_unseen_error() {
    with_rig(RIG_SECS, |rig| {
        let scratch = Scratch::new();
        let layers = layers_on_rig(rig, &scratch);
        let _f = raise_unseen_upper_error(rig, &layers, "lost");
        assert_both_refuse(&layers, "volatile", libc::EIO, UNSEEN_REFUSAL);
        // ovlfuse's check was a syncfs: the error is seen now, and both mount.
        assert_eq!(kernel_attempt(&layers, "volatile"), Outcome::Mounted);
        fs::remove_dir_all(layers.work.as_ref().unwrap().join("work/incompat")).unwrap();
        assert_eq!(ovlfuse_attempt(&layers, "volatile"), Outcome::Mounted);
        // The kernel's way, for comparison: its refusal stays until the upper is synced.
        let _g = raise_unseen_upper_error(rig, &layers, "lost-again");
        fs::remove_dir_all(layers.work.as_ref().unwrap().join("work/incompat")).unwrap();
        for _ in 0..2 {
            let (code, _) =
                kernel_attempt(&layers, "volatile").refusal("kernel overlay, -o volatile");
            assert_eq!(errno_name(code), "EIO");
        }
        let upper = File::open(layers.upper.as_ref().unwrap()).unwrap();
        let r = unsafe { libc::syncfs(upper.as_raw_fd()) };
        assert_eq!(r, -1, "the user's sync reports the error");
        assert_eq!(kernel_attempt(&layers, "volatile"), Outcome::Mounted);
    })
}
