//! Power cuts of a [`FaultyExt4`] rig: copies of its loop device's backing image taken while
//! the ext4 is mounted and live, and the means to check such a copy (`e2fsck`, a mount, a
//! kernel overlay over it), all torn down even when a test panics or hangs.
//!
//! Why a copy of the image is what a power cut leaves: the rig's ext4 lives on a loop device
//! whose backing file is on a tmpfs, so every write the loop device has completed is in the
//! tmpfs pages of that file, and nothing else is.  What ext4 still holds in its page cache,
//! or in a journal transaction not yet written, is not.  A flush (`REQ_PREFLUSH`/FUA) of the
//! loop device is an fsync of a tmpfs file, a no-op, so the copy is a disk whose volatile
//! cache held nothing: stricter for the filesystem than a real cut (which may also drop
//! completed but unflushed writes), never weaker for data that was flushed.
//!
//! A copy must be of one instant.  [`CutLab::cut`] reads the loop device's counters
//! (`/sys/block/loopN/stat`: writes, discards, flushes completed and requests in flight)
//! before and after copying, and copies again if anything moved in between: a copy that
//! passes saw no write start, finish or be in flight, so it equals the image at every moment
//! of the copy.  The copy reads the tmpfs file with `pread`, which never makes the live ext4
//! write anything (no `sync(2)`, no `syncfs`, no fsync of anything on the rig).
//!
//! Layout (one private directory `/tmp/ovlfuse-cut-XXXXXX`, the lab's `base`):
//!
//! ```text
//! base/store/        a tmpfs of the lab's own, holding the copies (sparse; removed after use)
//! base/cut-N/        where a copy's ext4 is mounted while it is checked
//! ```
//!
//! Tests put their lower layer in `base` too (see [`CutLab::mkdir`]), so that the harness's
//! mountpoints (`Layers::base()/mnt-*`) of the live union and of the kernel overlays over the
//! copies are below `base`, and [`CutLab::teardown`] finds them whatever happened.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::faultrig::FaultyExt4;
use super::{CmdOut, find_daemons, is_mounted, mounts, ovlfuse_bin, run_argv, with_timeout};

const CMD_TIMEOUT: Duration = Duration::from_secs(60);
/// Size limit of the lab's tmpfs.  A copy holds only the image's non-zero pages (a few MiB
/// for the workloads here); a full 256 MiB image would fit too.
pub const STORE_BYTES: u64 = 768 << 20;
const PAGE: usize = 4096;

#[derive(Default)]
struct LabState {
    store_mounted: bool,
    /// loop devices attached to copies and not yet detached
    loops: Vec<PathBuf>,
    torn_down: bool,
}

/// See the module documentation.
pub struct CutLab {
    base: PathBuf,
    store: PathBuf,
    counter: AtomicUsize,
    state: Mutex<LabState>,
}

/// One copy of the rig's image.
pub struct Cut {
    /// the copy (in the lab's tmpfs)
    pub image: PathBuf,
    /// copies made until one saw the loop device quiet (1 = the first)
    pub attempts: u32,
    /// non-zero bytes copied
    pub bytes: u64,
    /// time the successful copy took
    pub took: Duration,
}

/// What `e2fsck -fy` said about a copy.
#[derive(Debug, Clone)]
pub struct Fsck {
    pub code: Option<i32>,
    /// the lines that name a problem it found (empty for a clean file system)
    pub fixes: Vec<String>,
    pub output: String,
}

impl Fsck {
    /// 0 (clean) or 1 (errors corrected): the file system is consistent now.
    pub fn ok(&self) -> bool {
        matches!(self.code, Some(0) | Some(1))
    }
}

/// A copy attached to a loop device, checked by `e2fsck -fy` and mounted read-write (ext4).
/// Drop unmounts it, detaches the device and deletes the copy.
pub struct OpenedCut<'l> {
    lab: &'l CutLab,
    pub image: PathBuf,
    pub dev: PathBuf,
    pub mnt: PathBuf,
    pub fsck: Fsck,
    mounted: bool,
}

impl OpenedCut<'_> {
    /// `mnt.join(rel)`.
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
}

impl Drop for OpenedCut<'_> {
    fn drop(&mut self) {
        if self.mounted {
            umount_or_detach(&self.mnt);
            self.mounted = false;
        }
        self.lab.detach(&self.dev);
        let _ = fs::remove_file(&self.image);
        let _ = fs::remove_dir(&self.mnt);
    }
}

fn must(what: &str, r: CmdOut) -> CmdOut {
    assert!(
        r.ok(),
        "[powercut] {what} failed (exit {:?}{}): {}{}",
        r.code,
        if r.timed_out { ", timed out" } else { "" },
        r.stdout.trim(),
        r.stderr.trim()
    );
    r
}

fn umount_or_detach(p: &Path) {
    let c = super::cstr(p);
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 || !is_mounted(p) {
        return;
    }
    eprintln!(
        "[powercut] umount {} failed ({}): detaching lazily",
        p.display(),
        io::Error::last_os_error()
    );
    unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
}

fn loop_attached(dev: &Path) -> bool {
    dev.file_name().is_some_and(|n| {
        Path::new("/sys/block")
            .join(n)
            .join("loop/backing_file")
            .exists()
    })
}

/// The counters of a block device that move when something writes to it: writes, write
/// sectors, discards, flushes completed, and the requests in flight
/// (`Documentation/block/stat.rst`), plus `/sys/block/<dev>/inflight`.
fn write_counters(dev: &Path) -> io::Result<[u64; 7]> {
    let sys = Path::new("/sys/block").join(dev.file_name().unwrap_or_default());
    let stat = fs::read_to_string(sys.join("stat"))?;
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(u64::MAX))
        .collect();
    let inflight = fs::read_to_string(sys.join("inflight"))?;
    let i: Vec<u64> = inflight
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(u64::MAX))
        .collect();
    let at = |v: &[u64], k: usize| v.get(k).copied().unwrap_or(0);
    Ok([
        at(&f, 4),  // writes completed
        at(&f, 6),  // sectors written
        at(&f, 8),  // in flight
        at(&f, 11), // discards completed
        at(&f, 15), // flushes completed
        at(&i, 0),  // reads in flight
        at(&i, 1),  // writes in flight
    ])
}

fn quiet(c: &[u64; 7]) -> bool {
    c[2] == 0 && c[5] == 0 && c[6] == 0
}

/// Copies the data of `src` into a new sparse file `dst` of the same size, leaving out the
/// holes of `src` and every all-zero page.  Returns the bytes written.
fn copy_sparse(src: &Path, dst: &Path) -> io::Result<u64> {
    let input = File::open(src)?;
    let len = input.metadata()?.len();
    let out = OpenOptions::new().write(true).create_new(true).open(dst)?;
    out.set_len(len)?;
    let fd = input.as_raw_fd();
    let mut buf = vec![0u8; 1 << 20];
    let mut written = 0u64;
    let mut off: i64 = 0;
    while (off as u64) < len {
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole after `off`
            }
            return Err(e);
        }
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut pos = data as u64;
        while pos < hole as u64 {
            let n = ((hole as u64 - pos) as usize).min(buf.len());
            input.read_exact_at(&mut buf[..n], pos)?;
            for (k, page) in buf[..n].chunks(PAGE).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    out.write_all_at(page, pos + (k * PAGE) as u64)?;
                    written += page.len() as u64;
                }
            }
            pos += n as u64;
        }
        off = hole;
    }
    Ok(written)
}

impl CutLab {
    /// Makes the lab's directory and mounts its tmpfs.  Panics (after undoing what was done)
    /// if that fails.
    pub fn new() -> CutLab {
        let base = tempfile::Builder::new()
            .prefix("ovlfuse-cut-")
            .tempdir_in("/tmp")
            .expect("[powercut] create base dir")
            .keep();
        let lab = CutLab {
            store: base.join("store"),
            base,
            counter: AtomicUsize::new(0),
            state: Mutex::new(LabState::default()),
        };
        fs::create_dir(&lab.store).unwrap();
        let mounted = super::mount_tmpfs(
            "ovlfuse-cuts",
            &lab.store,
            libc::MS_NOSUID | libc::MS_NODEV,
            &format!("size={STORE_BYTES},mode=0700"),
        );
        if let Err(e) = mounted {
            panic!("[powercut] mount tmpfs on {}: {e}", lab.store.display());
        }
        lab.state.lock().unwrap().store_mounted = true;
        lab
    }

    /// The lab's private directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// A fresh directory `base/<name>` (e.g. a lower layer; see the module documentation).
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.base.join(name);
        fs::create_dir(&p).unwrap_or_else(|e| panic!("[powercut] mkdir {}: {e}", p.display()));
        p
    }

    /// Cuts the power of `rig` now: copies its image into the lab's tmpfs at a moment when
    /// the loop device has nothing in flight and completes nothing (see the module
    /// documentation).  Retries for up to 10 s, then panics.
    pub fn cut(&self, rig: &FaultyExt4) -> Cut {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let image = self.store.join(format!("cut-{n}.img"));
        let src = rig.backing_dir().join("ext4.img");
        let dev = rig.loop_device();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let before = write_counters(&dev).expect("[powercut] read the loop device's stat");
            if quiet(&before) {
                let t0 = Instant::now();
                let bytes = copy_sparse(&src, &image).unwrap_or_else(|e| {
                    panic!(
                        "[powercut] copy {} to {}: {e}",
                        src.display(),
                        image.display()
                    )
                });
                let took = t0.elapsed();
                let after = write_counters(&dev).expect("[powercut] read the loop device's stat");
                if before == after {
                    return Cut {
                        image,
                        attempts,
                        bytes,
                        took,
                    };
                }
                let _ = fs::remove_file(&image);
            }
            assert!(
                Instant::now() < deadline,
                "[powercut] the loop device {} did not stay quiet for one copy in 10 s \
                 ({attempts} attempts)",
                dev.display()
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Attaches `cut` to a loop device, runs `e2fsck -fy` on it and mounts it read-write.
    /// A failing `e2fsck` (exit 4 or more) is reported in the result, not a panic: the mount
    /// is still attempted (and panics if it fails).
    pub fn open(&self, cut: &Cut) -> OpenedCut<'_> {
        let n = self.counter.fetch_add(1, Ordering::SeqCst);
        let mnt = self.base.join(format!("cut-{n}"));
        fs::create_dir(&mnt).unwrap();
        let mut last = None;
        let mut dev = None;
        for _ in 0..5 {
            let r = run_argv(
                &[
                    OsStr::new("losetup"),
                    OsStr::new("--find"),
                    OsStr::new("--show"),
                    cut.image.as_os_str(),
                ],
                CMD_TIMEOUT,
            );
            if r.ok() && r.stdout.trim().starts_with("/dev/") {
                let d = PathBuf::from(r.stdout.trim());
                self.state.lock().unwrap().loops.push(d.clone());
                dev = Some(d);
                break;
            }
            last = Some(r);
            thread::sleep(Duration::from_millis(100));
        }
        let Some(dev) = dev else {
            let _ = fs::remove_dir(&mnt);
            must("losetup --find --show", last.unwrap());
            unreachable!();
        };
        // From here on Drop undoes what was done.
        let mut opened = OpenedCut {
            lab: self,
            image: cut.image.clone(),
            dev: dev.clone(),
            mnt: mnt.clone(),
            fsck: Fsck {
                code: None,
                fixes: Vec::new(),
                output: String::new(),
            },
            mounted: false,
        };
        let r = run_argv(
            &[OsStr::new("e2fsck"), OsStr::new("-fy"), dev.as_os_str()],
            CMD_TIMEOUT,
        );
        let output = format!("{}{}", r.stdout, r.stderr);
        let fixes = output
            .lines()
            .map(str::trim)
            .filter(|l| {
                !l.is_empty()
                    && !l.starts_with("e2fsck ")
                    && !l.starts_with("Pass ")
                    && !l.starts_with(dev.to_str().unwrap_or("?"))
                    && !l.starts_with("Fix? yes")
                    && !l.starts_with("Clear? yes")
            })
            .map(str::to_string)
            .collect();
        opened.fsck = Fsck {
            code: r.code,
            fixes,
            output,
        };
        must(
            "mount the copy (ext4)",
            run_argv(
                &[
                    OsStr::new("mount"),
                    OsStr::new("-t"),
                    OsStr::new("ext4"),
                    dev.as_os_str(),
                    mnt.as_os_str(),
                ],
                CMD_TIMEOUT,
            ),
        );
        opened.mounted = true;
        opened
    }

    fn detach(&self, dev: &Path) {
        let r = run_argv(
            &[OsStr::new("losetup"), OsStr::new("-d"), dev.as_os_str()],
            CMD_TIMEOUT,
        );
        if !r.ok() {
            eprintln!(
                "[powercut] losetup -d {} failed: {}",
                dev.display(),
                r.stderr.trim()
            );
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while loop_attached(dev) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.loops.retain(|d| d != dev);
    }

    /// Undoes everything below `base` (idempotent; never panics): kills ovlfuse daemons of
    /// FUSE mounts below it and unmounts every mount below it (lazily if busy), detaches the
    /// loop devices of copies, unmounts the tmpfs and removes `base`.
    pub fn teardown(&self) {
        let loops = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if st.torn_down {
                return;
            }
            st.torn_down = true;
            std::mem::take(&mut st.loops)
        };
        let mut below: Vec<(PathBuf, String)> = mounts()
            .into_iter()
            .filter(|(m, _)| m.starts_with(&self.base) && m != &self.store)
            .collect();
        below.sort();
        below.dedup();
        below.reverse(); // deepest first
        let bin = ovlfuse_bin();
        for (m, fstype) in &below {
            eprintln!(
                "[powercut] {} ({fstype}) still mounted: detaching lazily",
                m.display()
            );
            let c = super::cstr(m);
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            if fstype.starts_with("fuse")
                && let Some(name) = bin.file_name()
            {
                for pid in find_daemons(name, m) {
                    eprintln!("[powercut] daemon {pid} for {}: SIGKILL", m.display());
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for dev in loops {
            self.detach(&dev);
        }
        let mounted = {
            let st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            st.store_mounted
        };
        if mounted {
            umount_or_detach(&self.store);
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .store_mounted = false;
        }
        if mounts().iter().any(|(m, _)| m.starts_with(&self.base)) {
            eprintln!(
                "[powercut] {} still has mounts: not removed",
                self.base.display()
            );
        } else {
            let _ = fs::remove_dir_all(&self.base);
        }
    }
}

impl Default for CutLab {
    fn default() -> Self {
        CutLab::new()
    }
}

impl Drop for CutLab {
    fn drop(&mut self) {
        self.teardown();
    }
}

struct Teardown<F: Fn()>(F);

impl<F: Fn()> Drop for Teardown<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// Builds a fresh (tmpfs) rig and a lab, runs `body` on them in a separate thread with a
/// deadline of `secs`, and tears both down from the calling thread afterwards, the lab first
/// (it holds the union whose upper is on the rig): when `body` returns, panics or hangs.
pub fn with_rig_and_lab<T: Send + 'static>(
    secs: u64,
    body: impl FnOnce(&FaultyExt4, &CutLab) -> T + Send + 'static,
) -> T {
    let rig = Arc::new(FaultyExt4::new());
    let rig2 = rig.clone();
    let _rig_guard = Teardown(move || rig2.teardown());
    let lab = Arc::new(CutLab::new());
    let lab2 = lab.clone();
    let _lab_guard = Teardown(move || lab2.teardown());
    with_timeout(secs, move || body(&rig, &lab))
}
