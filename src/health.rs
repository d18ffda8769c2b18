//! The mount's health: finding upper-layer writeback errors and passing them on, as ext4
//! would report its own — to `fsync` per handle, to `syncfs(2)` per descriptor — and, in
//! volatile mode, poisoning the mount from the first error on.
//!
//! Owns:
//! - the daemon's cursor on the upper superblock's errseq: a directory descriptor on the
//!   upper root opened at mount, on which `syncfs` reports each upper error exactly once;
//! - the list of upper files written since they were last checked, and the checker thread
//!   that looks at them without flushing anything (`sync_file_range(WAIT_BEFORE)` on a
//!   descriptor opened for the check, then `cachestat(2)` to drop files with nothing left to
//!   write back): a file first [`CHECK_INTERVAL`] after it was written, then at doubling
//!   intervals up to [`CHECK_INTERVAL_MAX`] while it stays dirty (the kernel writes data
//!   back about 30 s after it was dirtied, so checking each of thousands of fresh files
//!   every second was most of the daemon's work under a create load);
//! - passing an upper superblock error on to the union's own superblock through the
//!   [`Canary`], so `syncfs(2)` on the union reports it once per descriptor;
//! - the volatile poison: the errno, and the refusal every operation gets afterwards;
//! - the status file updates for the above.
//!
//! Must never: report one upper error twice through the union's superblock (everything
//! that reaches the canary first went through the superblock cursor, which reports each
//! error once), flush the upper layer in volatile mode, or run an injection on a FUSE
//! worker thread (its requests need the workers).
//!
//! Locking: `sb_check` serialises superblock checks with the injection they lead to, so a
//! FUSE_SYNCFS answered after another one found an error also finds it injected. `watch`
//! is held only to push or take the list.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::canary::Canary;
use crate::inodes::Node;
use crate::sys;

/// How often the checker looks at the upper files written since their last check (plain
/// `fuse` mounts and volatile mounts; a `fuseblk` mount checks at each syncfs instead).
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// The longest a dirty watched file goes unchecked: how late a writeback error of a file
/// written through a plain `fuse` mount can be found at worst.
pub const CHECK_INTERVAL_MAX: Duration = Duration::from_secs(4);
/// How long an `fsync` that failed waits for its error to reach the union's superblock
/// before answering, so a `syncfs` right after it reports the error too.
const INJECTION_WAIT: Duration = Duration::from_secs(5);

/// How the mount treats durability.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// fsync and syncfs flush the upper layer and report its errors (the default).
    Durable,
    /// `fsync=0`: flushes are skipped at the user's request; errors are still reported.
    NoSync,
    /// `volatile`: never flush; after the first upper error the mount is poisoned.
    Volatile,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Durable => "durable",
            Mode::NoSync => "nosync",
            Mode::Volatile => "volatile",
        }
    }
}

/// Called with the errno when a volatile mount gets poisoned.
pub type PoisonHook = Box<dyn Fn(i32) + Send + Sync>;

/// The first error of a poisoned (volatile) mount.
#[derive(Debug, Clone, Copy)]
pub struct Poison {
    pub errno: i32,
    pub at: SystemTime,
}

enum Event {
    /// Check the upper superblock now (and reply on the channel once done, if given).
    CheckNow(Option<Sender<()>>),
    /// Look at the watched files now (and reply once done, if asked).
    ScanNow(Option<Sender<()>>),
    /// Poison the mount with this errno, then reply.
    Poison(i32, Sender<()>),
}

/// The health of one mount. Shared by the FUSE adapter, the relay (FUSE_SYNCFS) and the
/// checker thread.
pub struct Health {
    mode: Mode,
    /// Whether syncfs reaches the daemon (fuseblk); if not, the checker finds errors.
    /// Known once mounted.
    syncfs_forwarded: std::sync::atomic::AtomicBool,
    upper_root: Option<OwnedFd>,
    canary: Option<Arc<Canary>>,
    /// Errno of the poison (0: healthy); the fast path of every request reads only this.
    poisoned: AtomicI32,
    poison: Mutex<Option<Poison>>,
    sb_check: Mutex<()>,
    /// Held for a whole scan of the watched files (and while one node's file is drained),
    /// so a scan that answers a syncfs cannot miss files another scan has taken.
    scanning: Mutex<()>,
    /// Upper files written through the union that may still have data to write back.
    watch: Mutex<Vec<Watched>>,
    /// Nodes open for writing through FUSE passthrough, with their number of such opens:
    /// their writes never reach the daemon, so they stay on the watch list while open.
    open_writers: Mutex<HashMap<u64, usize>>,
    events: Sender<Event>,
    receiver: Mutex<Option<Receiver<Event>>>,
    /// Told of the poison once (the daemon records it in the status file).
    on_poison: Mutex<Option<PoisonHook>>,
    /// What the flush at unmount found, once it ran.
    unmount_flush: Mutex<Option<Result<(), i32>>>,
}

impl Health {
    /// `upper_root`: a descriptor on the upper layer's root (None without an upper layer);
    /// it is reopened here, so its errseq sample is taken now, at mount. `canary`: None
    /// when the daemon cannot reach its own mount by path (`/dev/fd/N` mounts).
    pub fn new(
        mode: Mode,
        upper_root: Option<&OwnedFd>,
        canary: Option<Arc<Canary>>,
    ) -> io::Result<Arc<Health>> {
        let upper_root = match upper_root {
            Some(root) => Some(sys::reopen(
                root.as_fd(),
                libc::O_RDONLY | libc::O_DIRECTORY,
            )?),
            None => None,
        };
        let (events, receiver) = crossbeam_channel::unbounded();
        Ok(Arc::new(Health {
            mode,
            syncfs_forwarded: std::sync::atomic::AtomicBool::new(false),
            upper_root,
            canary,
            poisoned: AtomicI32::new(0),
            poison: Mutex::new(None),
            sb_check: Mutex::new(()),
            scanning: Mutex::new(()),
            watch: Mutex::new(Vec::new()),
            open_writers: Mutex::new(HashMap::new()),
            events,
            receiver: Mutex::new(Some(receiver)),
            on_poison: Mutex::new(None),
            unmount_flush: Mutex::new(None),
        }))
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Who to tell when the mount gets poisoned (the status file for container managers).
    pub fn on_poison(&self, hook: PoisonHook) {
        *self.on_poison.lock() = Some(hook);
    }

    /// Called once mounted: whether the kernel forwards syncfs(2) to the daemon.
    pub fn set_syncfs_forwarded(&self, forwarded: bool) {
        self.syncfs_forwarded.store(forwarded, Ordering::Release);
    }

    /// Starts the checker thread (once; none without an upper layer). On a durable fuseblk
    /// mount it only runs the checks others ask for; elsewhere it also looks at the written
    /// files every [`CHECK_INTERVAL`].
    pub fn start_checker(self: &Arc<Self>) -> io::Result<()> {
        let Some(receiver) = self.receiver.lock().take() else {
            return Ok(());
        };
        if self.upper_root.is_none() {
            return Ok(());
        }
        let health = Arc::clone(self);
        std::thread::Builder::new()
            .name("ovlfuse-health".into())
            .spawn(move || health.checker(receiver))?;
        Ok(())
    }

    fn periodic(&self) -> bool {
        self.mode == Mode::Volatile || !self.syncfs_forwarded.load(Ordering::Acquire)
    }

    // --- what FUSE requests ask -------------------------------------------------------

    /// The errno every request gets once a volatile mount is poisoned.
    pub fn refusal(&self) -> Option<i32> {
        (self.poisoned.load(Ordering::Acquire) != 0).then_some(libc::EIO)
    }

    /// The poison's errno (for fsync in volatile mode), if poisoned.
    pub fn poisoned(&self) -> Option<i32> {
        match self.poisoned.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    pub fn poison(&self) -> Option<Poison> {
        *self.poison.lock()
    }

    /// An upper file got written through the union: watch it until its data is on disk.
    /// (A watched node holds no descriptor: its object is reopened for each check.)
    pub fn note_written(&self, node: &Arc<Node>) {
        if !self.periodic() || node.watched.swap(true, Ordering::AcqRel) {
            return;
        }
        self.watch.lock().push(Watched {
            node: Arc::clone(node),
            due: Instant::now() + CHECK_INTERVAL,
            every: CHECK_INTERVAL,
        });
    }

    /// An upper file was opened for writing through passthrough: its writes go straight to
    /// the upper file, so it is watched until it is closed and then clean.
    pub fn note_open_writer(&self, node: &Arc<Node>) {
        if !self.periodic() {
            return;
        }
        *self.open_writers.lock().entry(node.id).or_insert(0) += 1;
        self.note_written(node);
    }

    /// One passthrough writer of `node` was closed; its last writes may still be dirty, so
    /// the file stays watched until a check finds it clean.
    pub fn note_writer_closed(&self, node: &Arc<Node>) {
        if !self.periodic() {
            return;
        }
        {
            let mut writers = self.open_writers.lock();
            if let Some(count) = writers.get_mut(&node.id) {
                *count -= 1;
                if *count == 0 {
                    writers.remove(&node.id);
                }
            }
        }
        self.note_written(node);
    }

    fn has_open_writer(&self, node: &Node) -> bool {
        self.open_writers.lock().contains_key(&node.id)
    }

    /// An upper operation failed with `errno`. EIO, ENOSPC and EDQUOT can mean the upper
    /// filesystem lost written data: check now rather than at the next tick. (The error
    /// itself is not recorded: a caller that got it directly lost nothing unknowingly, and
    /// ext4 does not record it either. What the check finds is recorded.)
    pub fn suspect(&self, errno: i32) {
        if matches!(errno, libc::EIO | libc::ENOSPC | libc::EDQUOT) {
            let _ = self.events.send(match self.mode {
                Mode::Volatile => Event::ScanNow(None),
                _ => Event::CheckNow(None),
            });
        }
    }

    /// fsync in volatile mode: nothing is flushed; the answer is the poison's errno, after a
    /// look at this file's own writeback (which poisons the mount if it failed).
    pub fn volatile_fsync(&self, node: &Node) -> Result<(), i32> {
        if node.watched.load(Ordering::Acquire)
            && let (Some(errno), _) = check_file(node)
        {
            self.ask_checker(|done| Event::Poison(errno, done), "poisoning");
        }
        self.poisoned().map_or(Ok(()), Err)
    }

    /// An fsync of an upper file failed with `errno` (a writeback error on this file):
    /// poison a volatile mount, or make the error reach the union's superblock before the
    /// caller hears about it, so a syncfs right after reports it too.
    pub fn fsync_failed(&self, errno: i32) {
        if self.mode == Mode::Volatile {
            self.ask_checker(|done| Event::Poison(errno, done), "poisoning");
            return;
        }
        self.ask_checker(
            |done| Event::CheckNow(Some(done)),
            &format!("passing on fsync error {}", errno_name(errno)),
        );
    }

    /// FUSE_SYNCFS (fuseblk mounts): flush the upper filesystem and pass on what it reports;
    /// the result is what syncfs(2) returns to every caller, so 0 unless the error could not
    /// be passed on per descriptor. Volatile: no flush; EIO forever once poisoned.
    pub fn syncfs(&self) -> i32 {
        match self.mode {
            Mode::Volatile => {
                self.scan(true);
                if self.poisoned().is_some() {
                    -libc::EIO
                } else {
                    0
                }
            }
            Mode::NoSync => 0,
            Mode::Durable => match self.check_superblock() {
                Ok(()) => 0,
                Err(e) => -e,
            },
        }
    }

    /// `ovlfuse sync` (the ioctl): flush the upper filesystem now and say whether it failed.
    /// An error found here is passed on to the union's superblock in the background (the
    /// caller is a FUSE worker, which must not wait for the injection's own requests).
    pub fn sync_now(&self) -> Result<(), i32> {
        if self.mode == Mode::Volatile {
            self.ask_checker(
                |done| Event::ScanNow(Some(done)),
                "checking the upper files",
            );
            return self.poisoned().map_or(Ok(()), Err);
        }
        let Some(root) = &self.upper_root else {
            return Ok(());
        };
        let _one = self.sb_check.lock();
        match syncfs(root) {
            Ok(()) => Ok(()),
            Err(e) => {
                log::error!(
                    "upper filesystem reports a writeback error: {}",
                    errno_name(e)
                );
                if let Some(canary) = self.canary.clone() {
                    std::thread::spawn(move || {
                        if let Err(err) = canary.inject(e) {
                            log::error!("cannot pass the upper error on to syncfs callers: {err}");
                        }
                    });
                }
                Err(e)
            }
        }
    }

    /// Final flush at unmount (durable mode only; volatile and fsync=0 never flush): what
    /// the upper reports since the last check. Runs once; later calls return the first
    /// result. On a fuseblk mount it runs while the kernel waits for FUSE_DESTROY, so
    /// `umount` returns only once the data is on disk.
    pub fn flush_at_unmount(&self) -> Result<(), i32> {
        let mut done = self.unmount_flush.lock();
        if let Some(result) = *done {
            return result;
        }
        let result = match (&self.upper_root, self.mode) {
            (Some(root), Mode::Durable) => {
                let _one = self.sb_check.lock();
                syncfs(root)
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            log::error!(
                "flushing the upper layer at unmount failed: {}; data written through the union \
                 may be lost",
                errno_name(e)
            );
        }
        *done = Some(result);
        result
    }

    // --- the checks ---------------------------------------------------------------------

    /// syncfs on the daemon's upper-root descriptor; an error is passed on through the
    /// canary before returning. `Err` only when it could not be passed on.
    fn check_superblock(&self) -> Result<(), i32> {
        let Some(root) = &self.upper_root else {
            return Ok(());
        };
        let _one = self.sb_check.lock();
        let errno = match syncfs(root) {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        log::error!(
            "upper filesystem reports a writeback error: {}; passing it on to syncfs callers",
            errno_name(errno)
        );
        let Some(canary) = &self.canary else {
            log::warn!("no way to record it per descriptor on this mount; syncfs fails once");
            return Err(errno);
        };
        canary.inject(errno).map_err(|e| {
            log::error!("cannot record the error in the union's superblock: {e}");
            errno
        })
    }

    /// Looks at the watched files without flushing — every one if `all`, else those due —
    /// and retires the clean ones: an error found is recorded on its node (for fsync of
    /// handles opened later) and then handled as the mode says.
    fn scan(&self, all: bool) {
        let _one = self.scanning.lock();
        let mut list = std::mem::take(&mut *self.watch.lock());
        let mut found = None;
        let now = Instant::now();
        list.retain_mut(|w| {
            if !all && now < w.due {
                return true;
            }
            let (error, clean) = check_file(&w.node);
            if let Some(e) = error {
                found = Some(e);
            }
            if clean && !self.has_open_writer(&w.node) {
                w.node.watched.store(false, Ordering::Release);
                return false;
            }
            w.every = (w.every * 2).min(CHECK_INTERVAL_MAX);
            w.due = now + w.every;
            true
        });
        self.watch.lock().extend(list);
        if let Some(errno) = found {
            match self.mode {
                Mode::Volatile => self.set_poison(errno),
                Mode::Durable | Mode::NoSync => {
                    let _ = self.check_superblock();
                }
            }
        }
    }

    /// Poisons the mount (first call only). Never on a FUSE worker thread: on plain fuse it
    /// records EIO in the union's superblock first — before any request can see the poison,
    /// so a syncfs made after that sees the error too — and that needs the workers.
    fn set_poison(&self, errno: i32) {
        let mut poison = self.poison.lock();
        if poison.is_some() {
            return;
        }
        // Without FUSE_SYNCFS (plain fuse) the kernel answers syncfs(2) itself: the recorded
        // EIO is what each descriptor's next syncfs reports (once per descriptor there, not
        // forever as on fuseblk, where the daemon answers every syncfs).
        if !self.syncfs_forwarded.load(Ordering::Acquire)
            && let Some(canary) = &self.canary
            && let Err(e) = canary.inject(libc::EIO)
        {
            log::error!("cannot record the poison for syncfs callers: {e}");
        }
        *poison = Some(Poison {
            errno,
            at: SystemTime::now(),
        });
        self.poisoned.store(errno, Ordering::Release);
        drop(poison);
        log::error!(
            "volatile mount poisoned by an upper writeback error ({}): data written through \
             the union was lost; every operation now fails with EIO — discard this container",
            errno_name(errno)
        );
        if let Some(hook) = self.on_poison.lock().as_ref() {
            hook(errno);
        }
    }

    /// From a FUSE worker: has the checker thread do `event`, waiting for it a bounded time
    /// (the checker may need other workers to answer the hidden file's requests).
    fn ask_checker(&self, event: impl FnOnce(Sender<()>) -> Event, what: &str) {
        let (done, wait) = crossbeam_channel::bounded(1);
        if self.events.send(event(done)).is_ok() && wait.recv_timeout(INJECTION_WAIT).is_err() {
            log::warn!("{what}: the health checker did not finish within {INJECTION_WAIT:?}");
        }
    }

    fn checker(&self, events: Receiver<Event>) {
        loop {
            let event = if self.periodic() {
                match events.recv_timeout(CHECK_INTERVAL) {
                    Ok(e) => Some(e),
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => None,
                    Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
                }
            } else {
                match events.recv() {
                    Ok(e) => Some(e),
                    Err(_) => return,
                }
            };
            match event {
                Some(Event::CheckNow(done)) => {
                    if self.mode == Mode::Volatile {
                        self.scan(true);
                    } else {
                        let _ = self.check_superblock();
                    }
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Some(Event::ScanNow(done)) => {
                    self.scan(true);
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                }
                Some(Event::Poison(errno, done)) => {
                    self.set_poison(errno);
                    let _ = done.send(());
                }
                None => self.scan(false),
            }
        }
    }
}

/// A file on the checker's list, and when to look at it next.
struct Watched {
    node: Arc<Node>,
    due: Instant,
    /// The wait before the next check, doubling while the file stays dirty.
    every: Duration,
}

/// Looks at one upper file without flushing it, through a descriptor opened just for this:
/// its errseq sample is taken now, so it reports an error nobody has been told about yet —
/// never one already reported to a FUSE handle, which would then hear of it twice. What it
/// finds is recorded on the node. Returns the error, and whether nothing is left to write
/// back (also when the file cannot be opened any more: nothing to watch then).
fn check_file(node: &Node) -> (Option<i32>, bool) {
    let state = node.state();
    // A node whose object is gone (ESTALE: deleted and closed) has nothing left to watch.
    let opened = state.obj.fd().and_then(|obj| {
        sys::reopen(obj.as_fd(), libc::O_RDONLY | libc::O_NOATIME)
            .or_else(|_| sys::reopen(obj.as_fd(), libc::O_RDONLY))
    });
    let Ok(fd) = opened else {
        return (None, true);
    };
    let error = wait_for_writeback(&fd).err();
    // An unlinked file has no data anyone can read back: stop watching it (a create-and-
    // remove load would otherwise keep thousands of nodes, and their descriptors, alive).
    let unlinked = sys::stat_fd(fd.as_fd()).is_ok_and(|st| st.st_nlink == 0);
    if let Some(e) = error {
        log::error!(
            "writeback of an upper file (node {}) failed: {}",
            node.id,
            errno_name(e)
        );
        node.wb_err.set(e);
    }
    (error, unlinked || nothing_to_write_back(&fd))
}

fn syncfs(fd: &OwnedFd) -> Result<(), i32> {
    sys::syncfs(fd.as_fd()).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))
}

/// Waits for writeback already under way and reports (once per descriptor) an error of it,
/// without starting any writeback itself.
fn wait_for_writeback(fd: &OwnedFd) -> Result<(), i32> {
    // SAFETY: valid descriptor; the range 0..0 means the whole file.
    let rc =
        unsafe { libc::sync_file_range(fd.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WAIT_BEFORE) };
    if rc == 0 { Ok(()) } else { Err(last_errno()) }
}

/// Whether the file has no dirty page and none under writeback (cachestat(2), Linux 6.5).
/// Without cachestat, a file counts as clean once checked: the kernel writes dirty pages
/// back within 30 s by default, and the next write puts it back on the list anyway.
fn nothing_to_write_back(fd: &OwnedFd) -> bool {
    match sys::cachestat(fd.as_fd(), 0, 0) {
        Ok(st) => st.dirty == 0 && st.writeback == 0,
        Err(_) => true,
    }
}

fn last_errno() -> i32 {
    io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `ENOSPC`, `EIO`, ... for log lines and the status file.
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EROFS => "EROFS",
        libc::EUCLEAN => "EUCLEAN",
        libc::ENODEV => "ENODEV",
        libc::EFBIG => "EFBIG",
        _ => return format!("errno {errno}"),
    };
    name.to_string()
}

/// The relay's hook on a fuseblk mount: FUSE_SYNCFS is answered by [`Health::syncfs`] on a
/// thread of its own, and the canary's failing writeback is answered right in the relay, so
/// an injection never needs a fuser worker for its WRITE.
pub struct RelayHook {
    pub health: Arc<Health>,
}

impl crate::relay::LocalAnswer for RelayHook {
    fn answer(&self, opcode: u32, header: &crate::relay::InHeader, _body: &[u8]) -> Option<i32> {
        if opcode == FUSE_WRITE && header.nodeid == crate::canary::CANARY_ID {
            let canary = self.health.canary.as_ref()?;
            return canary.write_error().map(|e| -e);
        }
        None
    }

    fn defer(
        &self,
        header: &crate::relay::InHeader,
        _body: &[u8],
    ) -> Option<crate::relay::DeferredAnswer> {
        if header.opcode != crate::relay::opcode::SYNCFS {
            return None;
        }
        let health = Arc::clone(&self.health);
        Some(Box::new(move || health.syncfs()))
    }

    fn before_destroy(&self) {
        let _ = self.health.flush_at_unmount();
    }
}

const FUSE_WRITE: u32 = 16;

/// The ioctl behind `ovlfuse sync`: `_IO('o', 1)`, no argument.
pub const SYNC_IOCTL: u32 = 0x6f01;

/// `ovlfuse sync PATH`: flush the upper layer of the union PATH is in and report whether any
/// written data failed to reach it. Exit code 0 (all written), 1 (an error: printed), 2 (PATH
/// is not on an ovlfuse mount, or cannot be opened).
pub fn sync_command(path: &std::path::Path) -> i32 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        eprintln!(
            "ovlfuse sync: {}: the path contains a NUL byte",
            path.display()
        );
        return 2;
    };
    // SAFETY: valid C string; O_PATH is not enough for an ioctl.
    let fd = unsafe {
        libc::open(
            c_path.as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NONBLOCK,
        )
    };
    if fd < 0 {
        eprintln!(
            "ovlfuse sync: {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
        return 2;
    }
    // SAFETY: fresh descriptor, owned from here.
    let file = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // SAFETY: an argument-less ioctl on a valid descriptor.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), SYNC_IOCTL as _) };
    if rc == 0 {
        println!("{}: upper layer flushed, no write lost", path.display());
        return 0;
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOTTY) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            eprintln!(
                "ovlfuse sync: {}: not on an ovlfuse mount ({err})",
                path.display()
            );
            2
        }
        Some(e) => {
            eprintln!(
                "ovlfuse sync: {}: the upper layer reports a writeback error: {} ({err}); data \
                 written through the union was lost",
                path.display(),
                errno_name(e)
            );
            1
        }
        None => 1,
    }
}
