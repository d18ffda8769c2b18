//! `FaultyExt4`: an ext4 filesystem whose writeback of newly allocated blocks can be made to
//! fail with ENOSPC (or, with [`Backing::FuseEio`], EIO) on demand, without device-mapper.
//!
//! Layout (all under one private directory `/tmp/ovlfuse-rig-XXXXXX`):
//!
//! ```text
//! backing/        a dedicated tmpfs (320 MiB)
//! backing/ext4.img  a dense 256 MiB image, attached to a loop device
//! mnt/            the ext4 on that loop device, mounted with errors=continue
//! ```
//!
//! After `mkfs.ext4 -b 4096 -E nodiscard,lazy_itable_init=0,lazy_journal_init=0` every metadata block
//! (superblock, group descriptors, bitmaps, inode tables, journal) has been written, so it has
//! backing pages in the tmpfs.  `fstrim` on the ext4 sends discards for the free blocks only;
//! the loop driver turns them into hole punches in the image.  [`FaultyExt4::fail_new_writes`]
//! trims again and shrinks the tmpfs to exactly the bytes it uses: from then on any write that
//! lands in a hole of the image (a block ext4 allocates now) fails in the loop driver with
//! ENOSPC, which the loop device passes up as the bio status, so ext4 records ENOSPC as the
//! writeback error of the file; overwrites of blocks that already have backing (existing file
//! data, journal, inode tables, bitmaps) keep working and ext4 stays read-write.
//! [`FaultyExt4::heal`] grows the tmpfs back to its full size.
//!
//! Two adjustments to the recipe in the shared notes, both measured on Linux 6.18:
//! - `-b 4096`: for a 256 MiB device mkfs picks 1 KiB blocks, so a newly allocated block can
//!   share a tmpfs page with an old one and be written without any allocation (no error).
//! - `max_sectors_kb=4` on the loop device: the loop driver completes a write whose backing
//!   write was short (first pages backed, then ENOSPC) as a success, silently dropping the
//!   rest; with one-page requests a request is either wholly backed or wholly a hole.  (Seen
//!   with 1 KiB blocks: a new file allocated right after an old one's last, half-used page
//!   was "written back" without error and its data was lost.)
//!
//! The EIO variant ([`FaultyExt4::new_with`]`(Backing::FuseEio)`, [`with_eio_rig`]): `backing/`
//! is a FUSE mount served by [`eio_server::EioServer`] on a thread of the test process; its
//! one file `ext4.img` (256 MiB) is a sparse in-memory map of 4 KiB blocks, which starts
//! empty (reads as zeros; mkfs writes what ext4 needs) and whose hole punches (the loop's
//! discards, i.e. `fstrim`) remove blocks.  `fail_new_writes` trims and turns on the server's
//! switch: from then on a FUSE write touching an absent block fails with EIO (nothing of it
//! stored), which the loop driver passes up as the bio status, exactly where the tmpfs rig
//! gives ENOSPC; `heal` turns the switch off.  Everything else (mkfs options, the loop device
//! with `max_sectors_kb=4`, ext4 with `errors=continue`, fstrim) is shared.  Measured on Linux
//! 6.18: ext4 behaves the same with both errnos (the error reaches fsync/syncfs the same way,
//! ext4 stays read-write, no error is recorded in the superblock); the loop driver writes one
//! page per FUSE_WRITE here even without `max_sectors_kb=4`, and the file is opened with
//! FOPEN_DIRECT_IO so no FUSE page cache holds data the server refused.
//!
//! A global `sync(2)` by anyone writes dirty pages back, so keep the window between dirtying
//! pages and `fail_new_writes` (and the fail window itself) short.
//!
//! Teardown (Drop, or [`FaultyExt4::teardown`]) lazily unmounts anything stacked on the ext4
//! (e.g. a kernel overlay whose upperdir is on it), unmounts the ext4 (lazily if busy), detaches
//! the loop device and unmounts the tmpfs (or stops the FUSE server: unmount, or if the loop
//! device still holds the image, lazy unmount plus a connection abort through fusectl; then
//! its threads are joined).  [`with_rig`] / [`with_eio_rig`] run a test body in a thread with a
//! deadline and tear the rig down from the calling thread even when the body hangs or panics.

use std::ffi::{CString, OsStr};
use std::fs::{self, File};
use std::io;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use super::{CmdOut, run_argv};

#[path = "eio_server.rs"]
pub mod eio_server;
use eio_server::EioServer;

/// Size of the tmpfs that holds the image.
pub const TMPFS_BYTES: u64 = 320 << 20;
/// Size of the (dense) ext4 image.
pub const IMAGE_BYTES: u64 = 256 << 20;

const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// What holds the image, and so which errno a failing write of a new block gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// A dense image on a dedicated tmpfs, shrunk to its used size to fail: ENOSPC.
    Tmpfs,
    /// A sparse in-memory image served by [`EioServer`] (FUSE, in this process), whose
    /// writes to absent blocks fail with EIO while failing.
    FuseEio,
}

impl Backing {
    /// The errno writeback of a new block fails with while the rig is failing.
    pub fn errno(self) -> i32 {
        match self {
            Backing::Tmpfs => libc::ENOSPC,
            Backing::FuseEio => libc::EIO,
        }
    }
}

#[derive(Default)]
struct State {
    tmpfs_mounted: bool,
    server: Option<EioServer>,
    loop_dev: Option<PathBuf>,
    ext4_mounted: bool,
    failing: bool,
    torn_down: bool,
}

/// See the module documentation.
pub struct FaultyExt4 {
    kind: Backing,
    base: PathBuf,
    backing: PathBuf,
    image: PathBuf,
    mnt: PathBuf,
    state: Mutex<State>,
}

fn must(what: &str, r: CmdOut) -> CmdOut {
    assert!(
        r.ok(),
        "[faultrig] {what} failed (exit {:?}{}): {}{}",
        r.code,
        if r.timed_out { ", timed out" } else { "" },
        r.stdout.trim(),
        r.stderr.trim()
    );
    r
}

fn statfs(p: &Path) -> io::Result<libc::statfs> {
    let c = super::cstr(p);
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st)
}

/// Bytes a tmpfs has allocated (statfs: total - free blocks).
fn tmpfs_used_bytes(p: &Path) -> u64 {
    let st = statfs(p).unwrap_or_else(|e| panic!("[faultrig] statfs {}: {e}", p.display()));
    (st.f_blocks - st.f_bfree) * st.f_bsize as u64
}

fn remount_tmpfs_size(p: &Path, bytes: u64) -> io::Result<()> {
    let target = super::cstr(p);
    let data = CString::new(format!("size={bytes}")).unwrap();
    let r = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT,
            data.as_ptr() as *const libc::c_void,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Mountpoints (as /proc/self/mountinfo shows them) equal to or below `p`, deepest first.
fn mounts_at_or_below(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = super::mounts()
        .into_iter()
        .map(|(m, _)| m)
        .filter(|m| m.starts_with(p))
        .collect();
    v.sort();
    v.dedup();
    v.reverse();
    v
}

/// Mountpoints of overlay-like mounts whose options name a path below `p` (an upperdir or
/// workdir on the rig), e.g. a kernel overlay a test forgot to unmount.
fn mounts_using(p: &Path) -> Vec<PathBuf> {
    let needle = format!("={}/", p.display());
    let needle2 = format!(":{}/", p.display());
    let s = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut v = Vec::new();
    for l in s.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let opts = f.get(sep + 3).copied().unwrap_or("");
        if (opts.contains(&needle) || opts.contains(&needle2))
            && let Some(m) = f.get(4)
        {
            // mountinfo escapes spaces etc. as \040; our paths have none.
            v.push(PathBuf::from(m));
        }
    }
    v
}

fn umount_path(p: &Path, who: &str) {
    let c = super::cstr(p);
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return;
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EINVAL) && !super::is_mounted(p) {
        return;
    }
    eprintln!(
        "[faultrig] umount {who} {} failed ({e}): detaching lazily",
        p.display()
    );
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!(
            "[faultrig] umount -l {} failed: {}",
            p.display(),
            io::Error::last_os_error()
        );
    }
}

/// `_IOW('f', 43, __u32)`: flush the journal and write all metadata to its home location.
const EXT4_IOC_CHECKPOINT: libc::c_ulong = 0x4004_662b;

/// The superblock options (last field of /proc/self/mountinfo) of the mount at `p`.
fn super_options(p: &Path) -> Option<String> {
    let want = p.to_str()?;
    let s = fs::read_to_string("/proc/self/mountinfo").ok()?;
    s.lines()
        .rfind(|l| l.split(' ').nth(4) == Some(want))
        .and_then(|l| l.rsplit(' ').next())
        .map(str::to_string)
}

/// `/sys/block/loopN/loop/backing_file` exists while the device is attached.
fn loop_attached(dev: &Path) -> bool {
    let Some(name) = dev.file_name() else {
        return false;
    };
    Path::new("/sys/block")
        .join(name)
        .join("loop/backing_file")
        .exists()
}

impl FaultyExt4 {
    /// Builds the tmpfs, image, loop device and ext4, healthy.  Panics (after undoing whatever
    /// was already set up) if any step fails.
    pub fn new() -> FaultyExt4 {
        FaultyExt4::new_with(Backing::Tmpfs)
    }

    /// Like [`FaultyExt4::new`], with the image held by `kind`.
    pub fn new_with(kind: Backing) -> FaultyExt4 {
        let base = tempfile::Builder::new()
            .prefix("ovlfuse-rig-")
            .tempdir_in("/tmp")
            .expect("[faultrig] create base dir")
            .keep();
        let rig = FaultyExt4 {
            kind,
            backing: base.join("backing"),
            image: base.join("backing/ext4.img"),
            mnt: base.join("mnt"),
            base,
            state: Mutex::new(State::default()),
        };
        // From here on, a panic drops `rig`, whose Drop undoes what was done.
        rig.setup();
        rig
    }

    fn setup(&self) {
        fs::create_dir(&self.backing).unwrap();
        fs::create_dir(&self.mnt).unwrap();

        match self.kind {
            Backing::Tmpfs => self.setup_tmpfs_image(),
            Backing::FuseEio => {
                // 1+2. the FUSE server; its image is sparse (reads as zeros) until mkfs
                let server = EioServer::start(&self.backing, "ext4.img", IMAGE_BYTES)
                    .unwrap_or_else(|e| {
                        panic!(
                            "[faultrig] start the EIO server on {}: {e}",
                            self.backing.display()
                        )
                    });
                assert_eq!(server.image(), self.image);
                self.state.lock().unwrap().server = Some(server);
            }
        }
        self.setup_ext4();
    }

    fn setup_tmpfs_image(&self) {
        // 1. the dedicated tmpfs
        let mounted = super::mount_tmpfs(
            "ovlfuse-rig",
            &self.backing,
            libc::MS_NOSUID | libc::MS_NODEV,
            &format!("size={TMPFS_BYTES},mode=0700"),
        );
        if let Err(e) = mounted {
            panic!("[faultrig] mount tmpfs on {}: {e}", self.backing.display());
        }
        self.state.lock().unwrap().tmpfs_mounted = true;

        // 2. a dense image
        must(
            "fallocate",
            run_argv(
                &[
                    OsStr::new("fallocate"),
                    OsStr::new("-l"),
                    OsStr::new(&IMAGE_BYTES.to_string()),
                    self.image.as_os_str(),
                ],
                CMD_TIMEOUT,
            ),
        );
        let used = tmpfs_used_bytes(&self.backing);
        assert!(
            used >= IMAGE_BYTES,
            "[faultrig] image is not dense: tmpfs uses {used} bytes"
        );
    }

    fn setup_ext4(&self) {
        // 3. the loop device (`--find --show` can race with another attach: retry)
        let mut last = None;
        for _ in 0..5 {
            let r = run_argv(
                &[
                    OsStr::new("losetup"),
                    OsStr::new("--find"),
                    OsStr::new("--show"),
                    self.image.as_os_str(),
                ],
                CMD_TIMEOUT,
            );
            if r.ok() && r.stdout.trim().starts_with("/dev/") {
                self.state.lock().unwrap().loop_dev = Some(PathBuf::from(r.stdout.trim()));
                last = None;
                break;
            }
            last = Some(r);
            thread::sleep(Duration::from_millis(100));
        }
        if let Some(r) = last {
            must("losetup --find --show", r);
        }
        let dev = self.loop_device();
        // One page per request: the loop driver completes a write request whose backing
        // write came back short (some pages backed, the rest ENOSPC) as a success, silently
        // dropping the tail.  With single-page requests and 4 KiB ext4 blocks (one block = one
        // tmpfs page) every request is all backed or all hole.
        let msk = Path::new("/sys/block")
            .join(dev.file_name().unwrap())
            .join("queue/max_sectors_kb");
        fs::write(&msk, "4").unwrap_or_else(|e| panic!("[faultrig] write {}: {e}", msk.display()));

        // 4. ext4 with every metadata block written now
        must(
            "mkfs.ext4",
            run_argv(
                &[
                    OsStr::new("mkfs.ext4"),
                    OsStr::new("-q"),
                    OsStr::new("-F"),
                    OsStr::new("-b"),
                    OsStr::new("4096"),
                    OsStr::new("-E"),
                    OsStr::new("nodiscard,lazy_itable_init=0,lazy_journal_init=0"),
                    dev.as_os_str(),
                ],
                CMD_TIMEOUT,
            ),
        );
        must(
            "mount ext4",
            run_argv(
                &[
                    OsStr::new("mount"),
                    OsStr::new("-t"),
                    OsStr::new("ext4"),
                    OsStr::new("-o"),
                    OsStr::new("errors=continue"),
                    dev.as_os_str(),
                    self.mnt.as_os_str(),
                ],
                CMD_TIMEOUT,
            ),
        );
        self.state.lock().unwrap().ext4_mounted = true;
        let bsize = statfs(&self.mnt).unwrap().f_bsize as u64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
        assert!(
            bsize == page && page == 4096,
            "[faultrig] ext4 block size {bsize} must equal the page size {page} (4096)"
        );

        // 5. punch the free blocks out of the image
        self.fstrim();
        self.fstrim();
        let used = self.backing_used_bytes();
        assert!(
            used < IMAGE_BYTES / 2,
            "[faultrig] fstrim did not punch holes into the image: it still uses {used} bytes"
        );
    }

    fn fstrim(&self) {
        must(
            "fstrim",
            run_argv(&[OsStr::new("fstrim"), self.mnt.as_os_str()], CMD_TIMEOUT),
        );
    }

    /// The ext4 mountpoint.
    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `path().join(rel)`.
    /// Layers for a union over `lower` whose upper and work dirs are fresh directories
    /// (`upper`, `work`) on the rig's ext4, where writeback fails when the rig says so.
    pub fn union_layers(&self, lower: PathBuf) -> super::Layers {
        let (upper, work) = (self.p("upper"), self.p("work"));
        fs::create_dir(&upper).unwrap();
        fs::create_dir(&work).unwrap();
        super::Layers {
            lowers: vec![lower],
            upper: Some(upper),
            work: Some(work),
        }
    }

    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// The loop device the ext4 lives on (`/dev/loopN`).
    pub fn loop_device(&self) -> PathBuf {
        self.state
            .lock()
            .unwrap()
            .loop_dev
            .clone()
            .expect("[faultrig] no loop device")
    }

    /// What holds the image.
    pub fn backing(&self) -> Backing {
        self.kind
    }

    /// The errno writeback of a new block fails with while failing (ENOSPC or EIO).
    pub fn errno(&self) -> i32 {
        self.kind.errno()
    }

    /// The tmpfs (or the FUSE mount) holding the image.
    pub fn backing_dir(&self) -> &Path {
        &self.backing
    }

    /// Writes the EIO server has failed so far (0 on a tmpfs rig).
    pub fn failed_server_writes(&self) -> u64 {
        let st = self.state.lock().unwrap();
        st.server.as_ref().map_or(0, |s| s.failed_writes())
    }

    /// Kernel thread ids of the EIO server's threads (empty on a tmpfs rig).
    pub fn server_thread_ids(&self) -> Vec<i32> {
        let st = self.state.lock().unwrap();
        st.server.as_ref().map_or(Vec::new(), |s| s.thread_ids())
    }

    /// The private directory everything lives in (removed by teardown).
    pub fn base_dir(&self) -> &Path {
        &self.base
    }

    /// Bytes the backing tmpfs has allocated now (the EIO server: bytes present in its image).
    pub fn backing_used_bytes(&self) -> u64 {
        match self.kind {
            Backing::Tmpfs => tmpfs_used_bytes(&self.backing),
            Backing::FuseEio => {
                let st = self.state.lock().unwrap();
                st.server.as_ref().map_or(0, |s| s.used_bytes())
            }
        }
    }

    pub fn is_failing(&self) -> bool {
        self.state.lock().unwrap().failing
    }

    fn assert_live(&self) {
        assert!(
            !self.state.lock().unwrap().torn_down,
            "[faultrig] rig used after teardown"
        );
    }

    /// `syncfs` on the ext4 through a fresh descriptor, then a journal checkpoint
    /// (`EXT4_IOC_CHECKPOINT`): writes back everything dirty and writes every metadata block
    /// (directory blocks of files and directories just created, ...) to its home location, so
    /// that only data dirtied afterwards is exposed to `fail_new_writes`.  Panics if either
    /// reports an error.
    ///
    /// syncfs alone is not enough: a metadata block that someone modifies while it runs (the
    /// ovlfuse daemon rewriting its status file in the work dir) is committed to the journal
    /// but its home write waits for a checkpoint; if that first home write (into a hole of
    /// the image) falls into a fail window, jbd2 aborts the journal and ext4 turns
    /// `emergency_ro`.  Measured: about 1 run in 10 of the unmount test without the
    /// checkpoint.
    pub fn settle(&self) {
        self.assert_live();
        let d = File::open(&self.mnt).expect("[faultrig] open mountpoint");
        let r = unsafe { libc::syncfs(d.as_raw_fd()) };
        assert!(
            r == 0,
            "[faultrig] syncfs on a healthy rig failed: {}",
            io::Error::last_os_error()
        );
        let flags: u32 = 0;
        let r = unsafe { libc::ioctl(d.as_raw_fd(), EXT4_IOC_CHECKPOINT, &flags as *const u32) };
        assert!(
            r == 0,
            "[faultrig] EXT4_IOC_CHECKPOINT on a healthy rig failed: {}",
            io::Error::last_os_error()
        );
    }

    /// From now on, writeback of any block ext4 allocates fails with [`FaultyExt4::errno`]
    /// (ENOSPC or EIO), until `heal`.  Data already dirty in the page cache is not written by
    /// this call.
    pub fn fail_new_writes(&self) {
        self.assert_live();
        self.fstrim();
        if self.kind == Backing::FuseEio {
            let mut st = self.state.lock().unwrap();
            st.server
                .as_ref()
                .expect("[faultrig] no server")
                .set_failing(true);
            st.failing = true;
            return;
        }
        let mut last_err = None;
        for _ in 0..20 {
            let used = tmpfs_used_bytes(&self.backing);
            match remount_tmpfs_size(&self.backing, used) {
                Ok(()) => {
                    let st = statfs(&self.backing).unwrap();
                    if st.f_bavail == 0 {
                        self.state.lock().unwrap().failing = true;
                        return;
                    }
                    // something allocated/freed between the two calls: measure again
                    last_err = Some(format!("{} blocks still free", st.f_bavail));
                }
                // EINVAL: the tmpfs grew past `used` before the remount
                Err(e) => last_err = Some(e.to_string()),
            }
            thread::sleep(Duration::from_millis(5));
        }
        let _ = remount_tmpfs_size(&self.backing, TMPFS_BYTES);
        panic!(
            "[faultrig] could not shrink {} to its used size: {}",
            self.backing.display(),
            last_err.unwrap_or_default()
        );
    }

    /// Gives the backing tmpfs its full size back (turns the EIO server's switch off): writes
    /// succeed again.
    pub fn heal(&self) {
        self.assert_live();
        if self.kind == Backing::FuseEio {
            let mut st = self.state.lock().unwrap();
            st.server
                .as_ref()
                .expect("[faultrig] no server")
                .set_failing(false);
            st.failing = false;
            return;
        }
        remount_tmpfs_size(&self.backing, TMPFS_BYTES).unwrap_or_else(|e| {
            panic!(
                "[faultrig] remount {} size={TMPFS_BYTES}: {e}",
                self.backing.display()
            )
        });
        self.state.lock().unwrap().failing = false;
    }

    /// The ext4 is mounted read-write (it has not remounted itself read-only after an error).
    ///
    /// On Linux 6.18 an aborted journal does not set the superblock read-only (statvfs keeps
    /// saying rw): ext4 marks itself `emergency_ro` (shown among the superblock options in
    /// mountinfo) and every modification fails with EROFS.  Both are checked.
    pub fn ext4_is_rw(&self) -> bool {
        let c = super::cstr(&self.mnt);
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let statvfs_rw =
            unsafe { libc::statvfs(c.as_ptr(), &mut st) == 0 && st.f_flag & libc::ST_RDONLY == 0 };
        statvfs_rw
            && super_options(&self.mnt)
                .is_some_and(|o| !o.split(',').any(|x| x == "ro" || x == "emergency_ro"))
    }

    /// `/sys/fs/ext4/<loop>/errors_count`: errors ext4 recorded since mkfs (0 while nothing
    /// but data writeback failed).
    pub fn ext4_errors_count(&self) -> u64 {
        let dev = self.loop_device();
        let p = Path::new("/sys/fs/ext4")
            .join(dev.file_name().unwrap())
            .join("errors_count");
        fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("[faultrig] read {}: {e}", p.display()))
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("[faultrig] parse {}: {e}", p.display()))
    }

    /// Undo everything (idempotent; Drop calls it).  Never panics.
    pub fn teardown(&self) {
        let mut st = match self.state.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if st.torn_down {
            return;
        }
        st.torn_down = true;
        if st.failing && st.tmpfs_mounted {
            let _ = remount_tmpfs_size(&self.backing, TMPFS_BYTES);
            st.failing = false;
        }
        if let Some(s) = &st.server {
            s.set_failing(false);
            st.failing = false;
        }
        // anything stacked on the ext4 (an overlay using it as upper, a mount below mnt)
        for m in mounts_using(&self.mnt)
            .into_iter()
            .chain(mounts_at_or_below(&self.mnt))
        {
            if m == self.mnt {
                continue;
            }
            eprintln!(
                "[faultrig] {} still mounted on the rig: detaching lazily",
                m.display()
            );
            let c = super::cstr(&m);
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if st.ext4_mounted {
            umount_path(&self.mnt, "ext4");
            st.ext4_mounted = false;
        }
        if let Some(dev) = st.loop_dev.take() {
            let r = run_argv(
                &[OsStr::new("losetup"), OsStr::new("-d"), dev.as_os_str()],
                CMD_TIMEOUT,
            );
            if !r.ok() {
                eprintln!(
                    "[faultrig] losetup -d {} failed: {}",
                    dev.display(),
                    r.stderr.trim()
                );
            }
            // The detach completes when the last opener closes the device; with a lazily
            // unmounted ext4 that is when its last file is closed.
            let deadline = Instant::now() + Duration::from_secs(5);
            while loop_attached(&dev) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if loop_attached(&dev) {
                eprintln!(
                    "[faultrig] {} is still attached (in use); it detaches automatically \
                     once its last user closes it",
                    dev.display()
                );
            }
        }
        if st.tmpfs_mounted {
            umount_path(&self.backing, "tmpfs");
            st.tmpfs_mounted = false;
        }
        // unmounts (lazily and aborting the connection if the loop device still holds the
        // image) and joins the server's threads
        if let Some(mut s) = st.server.take() {
            s.stop();
        }
        for m in mounts_at_or_below(&self.base) {
            let c = super::cstr(&m);
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        if mounts_at_or_below(&self.base).is_empty() {
            let _ = fs::remove_dir_all(&self.base);
        } else {
            eprintln!(
                "[faultrig] {} still has mounts: not removed",
                self.base.display()
            );
        }
    }
}

impl Default for FaultyExt4 {
    fn default() -> Self {
        FaultyExt4::new()
    }
}

impl Drop for FaultyExt4 {
    fn drop(&mut self) {
        self.teardown();
    }
}

struct TeardownOnDrop(Arc<FaultyExt4>);

impl Drop for TeardownOnDrop {
    fn drop(&mut self) {
        self.0.teardown();
    }
}

/// Builds a fresh (tmpfs, ENOSPC) rig, runs `body` on it in a separate thread and tears the
/// rig down from the calling thread afterwards: when `body` returns, panics, or is still
/// running after `secs` seconds (then this panics).
pub fn with_rig<T: Send + 'static>(
    secs: u64,
    body: impl FnOnce(&FaultyExt4) -> T + Send + 'static,
) -> T {
    with_rig_on(Backing::Tmpfs, secs, body)
}

/// [`with_rig`] with the EIO server as backing.
pub fn with_eio_rig<T: Send + 'static>(
    secs: u64,
    body: impl FnOnce(&FaultyExt4) -> T + Send + 'static,
) -> T {
    with_rig_on(Backing::FuseEio, secs, body)
}

/// [`with_rig`] with the image held by `kind`.
pub fn with_rig_on<T: Send + 'static>(
    kind: Backing,
    secs: u64,
    body: impl FnOnce(&FaultyExt4) -> T + Send + 'static,
) -> T {
    let rig = Arc::new(FaultyExt4::new_with(kind));
    let _guard = TeardownOnDrop(rig.clone());
    super::with_timeout(secs, move || body(&rig))
}

// ---------------------------------------------------------------------------
// writeback without reporting
// ---------------------------------------------------------------------------

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

/// Page-cache state of a file (`cachestat(2)`, Linux 6.5+).
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct CacheStat {
    pub nr_cache: u64,
    pub nr_dirty: u64,
    pub nr_writeback: u64,
    pub nr_evicted: u64,
    pub nr_recently_evicted: u64,
}

const SYS_CACHESTAT: libc::c_long = 451;

/// `cachestat(2)` over the whole file.  Reads page-cache counters only: no errseq cursor of
/// any descriptor is looked at or moved.
pub fn cachestat(f: &File) -> io::Result<CacheStat> {
    let range = CachestatRange { off: 0, len: 0 };
    let mut cs = CacheStat::default();
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd() as libc::c_long,
            &range as *const CachestatRange,
            &mut cs as *mut CacheStat,
            0 as libc::c_long,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cs)
}

/// Writes back every dirty page of `f`'s file and waits for the writeback to finish, without
/// reporting (or marking as seen) any writeback error: `sync_file_range(SYNC_FILE_RANGE_WRITE)`
/// only starts writeback (the WAIT flags would go through `file_check_and_advance_wb_err`,
/// reporting the error to `f` and marking it seen), and completion is observed with
/// `cachestat(2)`.  `f` must be a descriptor of the file on the filesystem that holds its page
/// cache (for an overlay: the upper file).  Panics after `timeout`.
pub fn writeback_unreported(f: &File, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        assert!(
            r == 0,
            "[faultrig] sync_file_range(WRITE): {}",
            io::Error::last_os_error()
        );
        let cs = cachestat(f).expect("[faultrig] cachestat");
        if cs.nr_dirty == 0 && cs.nr_writeback == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "[faultrig] writeback did not finish within {timeout:?}: {cs:?}"
        );
        thread::sleep(Duration::from_millis(5));
    }
}
