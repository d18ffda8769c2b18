//! Layer objects the daemon refers to without holding a descriptor for each one.
//!
//! Owns: [`ObjRef`], the reference every node and merged-directory entry keeps on its layer
//! object, and [`FdCache`], which bounds how many of those references hold an open `O_PATH`
//! descriptor. The kernel may keep hundreds of thousands of inodes cached (and so alive in
//! our inode table) while the process may open at most `RLIMIT_NOFILE` files, which a
//! container manager can lower at any time. Past the budget (half the current soft limit,
//! re-read as we go), the least recently used descriptors are closed and their objects
//! remembered by file handle (`name_to_handle_at`), to be reopened by `open_by_handle_at`
//! when next used. A handle names an inode, not a path, so a reopened object is exactly the
//! one that was held, wherever it has been renamed to — the same thing a held descriptor
//! would have given — and no path is resolved again.
//!
//! Must never: drop the only way back to an object. Objects whose layer cannot decode handles
//! (no CAP_DAC_READ_SEARCH, as in a rootless mount, or a filesystem without export support),
//! and objects on another mount than their layer root, keep their descriptor for life.
//!
//! Locking: each object's slot lock is held to read or replace its descriptor (and while
//! reopening it); the queue lock only for queue operations. Eviction takes slot locks with
//! `try_lock` while holding no other lock, so it never waits on an object that is itself
//! evicting others.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use crate::layers::LayerIndex;
use crate::sys;

/// Fewest descriptors the cache may keep, whatever the limit says.
const MIN_BUDGET: usize = 32;
/// The limit is re-read after this many descriptors were taken into the cache.
const REFRESH_EVERY: usize = 64;
/// `MAX_HANDLE_SZ` of the kernel.
const MAX_HANDLE_BYTES: usize = 128;

/// How one layer's objects are reopened from their handles.
#[derive(Debug)]
struct Decoder {
    /// The layer root, opened for reading: `open_by_handle_at` needs a descriptor on the
    /// mount (it refuses `O_PATH` ones).
    mount_fd: OwnedFd,
    /// The mount the root is on; an object on any other mount keeps its descriptor.
    mount_id: i32,
}

/// The descriptor budget of one mount's layer objects.
#[derive(Debug)]
pub struct FdCache {
    /// Per layer, how to reopen its objects (`None`: they keep their descriptors).
    decoders: Vec<Option<Decoder>>,
    /// Descriptors held by objects that can let go of them.
    held: AtomicUsize,
    budget: AtomicUsize,
    /// A budget set by hand (0: follow the descriptor limit).
    fixed: AtomicUsize,
    taken: AtomicUsize,
    /// Objects holding an evictable descriptor, oldest first (entries of objects dropped
    /// meanwhile are skipped and pruned).
    queue: Mutex<VecDeque<Weak<Obj>>>,
}

/// A reference to one layer object (cheap to clone; clones are the same reference).
#[derive(Debug, Clone)]
pub struct ObjRef(Arc<Obj>);

#[derive(Debug)]
struct Obj {
    cache: Arc<FdCache>,
    layer: LayerIndex,
    slot: Mutex<Slot>,
    /// Used since the eviction sweep last passed it (its second chance).
    used: AtomicBool,
}

#[derive(Debug)]
struct Slot {
    fd: Option<Arc<OwnedFd>>,
    /// `struct file_handle` as the kernel filled it, once the descriptor was let go.
    handle: Option<Box<[u8]>>,
    /// The descriptor is never let go (and not counted in the budget).
    pinned: bool,
}

impl FdCache {
    /// A cache for layers whose roots are `roots` (in layer order). Each layer is probed:
    /// its objects are evictable only if a handle of its root round-trips here.
    pub fn new(roots: &[BorrowedFd<'_>]) -> Arc<FdCache> {
        let decoders = roots
            .iter()
            .enumerate()
            .map(|(i, root)| match probe(*root) {
                Ok(decoder) => Some(decoder),
                Err(e) => {
                    log::info!(
                        "layer {i}: objects cannot be reopened by file handle ({e}); the \
                         daemon keeps one descriptor per object the kernel remembers"
                    );
                    None
                }
            })
            .collect();
        Arc::new(FdCache {
            decoders,
            held: AtomicUsize::new(0),
            budget: AtomicUsize::new(current_budget()),
            fixed: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            queue: Mutex::new(VecDeque::new()),
        })
    }

    /// Takes `fd` (an `O_PATH` descriptor on an object of `layer`) under management.
    pub fn adopt(self: &Arc<Self>, layer: LayerIndex, fd: OwnedFd) -> ObjRef {
        let evictable = self
            .decoders
            .get(layer as usize)
            .is_some_and(|d| d.is_some());
        let obj = Arc::new(Obj {
            cache: Arc::clone(self),
            layer,
            slot: Mutex::new(Slot {
                fd: Some(Arc::new(fd)),
                handle: None,
                pinned: !evictable,
            }),
            used: AtomicBool::new(false),
        });
        if evictable {
            self.admit(&obj);
        }
        ObjRef(obj)
    }

    /// Descriptors currently held by evictable objects.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// The most descriptors evictable objects may hold now.
    pub fn budget(&self) -> usize {
        self.budget.load(Ordering::Relaxed)
    }

    /// Runs `open`, and if the process is out of descriptors, lets go of cached ones and
    /// runs it once more.
    pub fn retry<T>(&self, mut open: impl FnMut() -> io::Result<T>) -> io::Result<T> {
        match open() {
            Err(e) if is_out_of_descriptors(&e) => {
                self.relieve();
                open()
            }
            other => other,
        }
    }

    /// The process ran out of descriptors: re-read the limit and let go of half the cached
    /// descriptors (all of them above the new budget).
    pub fn relieve(&self) {
        self.refresh_budget();
        let target = (self.held() / 2).min(self.budget());
        log::debug!(
            "out of descriptors: closing cached ones down to {target} (of {})",
            self.held()
        );
        self.evict_to(target);
    }

    /// Holds at most `n` descriptors from now on, whatever the limit (0: follow the limit).
    pub fn set_budget(&self, n: usize) {
        self.fixed.store(n, Ordering::Relaxed);
        self.refresh_budget();
        self.evict_to(self.budget());
    }

    fn refresh_budget(&self) {
        let budget = match self.fixed.load(Ordering::Relaxed) {
            0 => current_budget(),
            n => n,
        };
        self.budget.store(budget, Ordering::Relaxed);
    }

    /// `obj` just got a descriptor: count it, queue it, and keep the total within budget.
    fn admit(&self, obj: &Arc<Obj>) {
        let held = self.held.fetch_add(1, Ordering::Relaxed) + 1;
        let mut queue = self.queue.lock();
        queue.push_back(Arc::downgrade(obj));
        // Entries of dropped objects are skipped when met; prune them when they pile up
        // (a create/unlink load drops objects without them ever reaching the front).
        if queue.len() > 2 * held + 4096 {
            queue.retain(|w| w.strong_count() > 0);
        }
        drop(queue);
        if self
            .taken
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(REFRESH_EVERY)
        {
            self.refresh_budget();
        }
        if held > self.budget() {
            self.evict_to(self.budget());
        }
    }

    /// Lets go of descriptors, least recently used first, until at most `target` are held
    /// (or no more can be let go).
    fn evict_to(&self, target: usize) {
        // Each queued object is met at most twice (the second time without its second
        // chance), so this ends even if nothing can be evicted.
        let mut rounds = 2 * self.queue.lock().len() + 1;
        while self.held() > target && rounds > 0 {
            rounds -= 1;
            let Some(weak) = self.queue.lock().pop_front() else {
                return;
            };
            let Some(obj) = weak.upgrade() else {
                continue;
            };
            let Some(mut slot) = obj.slot.try_lock() else {
                self.queue.lock().push_back(weak);
                continue;
            };
            if slot.fd.is_none() || slot.pinned {
                continue;
            }
            if obj.used.swap(false, Ordering::Relaxed) {
                drop(slot);
                self.queue.lock().push_back(weak);
                continue;
            }
            if slot.handle.is_none() {
                match self.handle_of(obj.layer, slot.fd.as_deref()) {
                    Some(handle) => slot.handle = Some(handle),
                    None => {
                        // No way back without the descriptor: keep it, outside the budget.
                        slot.pinned = true;
                        self.held.fetch_sub(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            slot.fd = None;
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The file handle of an object's descriptor, if its layer can reopen it from that.
    fn handle_of(&self, layer: LayerIndex, fd: Option<&OwnedFd>) -> Option<Box<[u8]>> {
        let decoder = self.decoders.get(layer as usize)?.as_ref()?;
        let (handle, mount_id) = name_to_handle(fd?.as_fd()).ok()?;
        (mount_id == decoder.mount_id).then_some(handle)
    }

    fn reopen(&self, layer: LayerIndex, handle: &[u8]) -> io::Result<OwnedFd> {
        let decoder = self
            .decoders
            .get(layer as usize)
            .and_then(Option::as_ref)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        self.retry(|| open_by_handle(decoder.mount_fd.as_fd(), handle))
    }
}

impl ObjRef {
    /// The object's `O_PATH` descriptor, reopened from its handle if it was let go. Fails
    /// with ESTALE if the object is gone (deleted, and no longer open anywhere).
    pub fn fd(&self) -> io::Result<Arc<OwnedFd>> {
        let obj = &self.0;
        let mut slot = obj.slot.lock();
        if let Some(fd) = &slot.fd {
            obj.used.store(true, Ordering::Relaxed);
            return Ok(Arc::clone(fd));
        }
        let handle = slot
            .handle
            .as_deref()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?;
        let fd = Arc::new(obj.cache.reopen(obj.layer, handle)?);
        slot.fd = Some(Arc::clone(&fd));
        drop(slot);
        obj.cache.admit(obj);
        Ok(fd)
    }

    /// The object opened anew with `flags` (`sys::reopen`), letting go of cached descriptors
    /// first if the process has run out of them.
    pub fn reopen(&self, flags: libc::c_int) -> io::Result<OwnedFd> {
        self.0
            .cache
            .retry(|| sys::reopen(self.fd()?.as_fd(), flags))
    }

    /// Whether two references are the same reference (not merely the same object).
    pub fn same(a: &ObjRef, b: &ObjRef) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// The layer the object is in.
    pub fn layer(&self) -> LayerIndex {
        self.0.layer
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        let slot = self.slot.get_mut();
        if slot.fd.is_some() && !slot.pinned {
            self.cache.held.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

fn is_out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// Half the current soft descriptor limit: the other half stays for open files, the FUSE
/// channels and everything else the daemon opens.
fn current_budget() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return MIN_BUDGET;
    }
    let soft = usize::try_from(lim.rlim_cur).unwrap_or(usize::MAX);
    (soft / 2).max(MIN_BUDGET)
}

/// Whether handles of `root`'s filesystem can be made and decoded by this process.
fn probe(root: BorrowedFd<'_>) -> io::Result<Decoder> {
    let mount_fd = sys::reopen(root, libc::O_RDONLY | libc::O_DIRECTORY)?;
    let (handle, mount_id) = name_to_handle(root)?;
    let back = open_by_handle(mount_fd.as_fd(), &handle)?;
    let (a, b) = (sys::stat_fd(root)?, sys::stat_fd(back.as_fd())?);
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino) {
        return Err(io::Error::other("a handle reopened another object"));
    }
    Ok(Decoder { mount_fd, mount_id })
}

/// Header of `struct file_handle`: `handle_bytes` (u32) then `handle_type` (i32).
const HEADER: usize = 8;

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the object's handle (as the kernel's
/// `struct file_handle`, trimmed to its length) and the id of the mount it is on.
fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(Box<[u8]>, i32)> {
    // u32-aligned storage for the struct.
    let mut buf = [0u32; (HEADER + MAX_HANDLE_BYTES) / 4];
    buf[0] = MAX_HANDLE_BYTES as u32;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: buf is a writable struct file_handle with room for MAX_HANDLE_BYTES; the empty
    // path with AT_EMPTY_PATH names fd itself.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            buf.as_mut_ptr(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = HEADER + (buf[0] as usize).min(MAX_HANDLE_BYTES);
    let bytes: Vec<u8> = buf.iter().flat_map(|w| w.to_ne_bytes()).take(len).collect();
    Ok((bytes.into_boxed_slice(), mount_id))
}

/// `open_by_handle_at(mount_fd, handle, O_PATH)`: an object's descriptor back from its
/// handle (a symlink's handle gives the link itself).
fn open_by_handle(mount_fd: BorrowedFd<'_>, handle: &[u8]) -> io::Result<OwnedFd> {
    let mut buf = [0u32; (HEADER + MAX_HANDLE_BYTES) / 4];
    for (i, chunk) in handle.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        buf[i] = u32::from_ne_bytes(word);
    }
    // SAFETY: buf holds a struct file_handle as name_to_handle_at filled it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            buf.as_mut_ptr(),
            libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret as i32) })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> (std::path::PathBuf, OwnedFd) {
        let path = std::env::temp_dir().join(format!(
            "ovlfuse-handles-{}-{}",
            std::process::id(),
            crate::copy_up::temp_name().to_string_lossy()
        ));
        std::fs::create_dir_all(&path).expect("mkdir");
        let fd = sys::open_dir_path(&path).expect("open");
        (path, fd)
    }

    fn key(fd: &OwnedFd) -> (u64, u64) {
        let st = sys::stat_fd(fd.as_fd()).expect("stat");
        (st.st_dev, st.st_ino)
    }

    /// Past the budget, the least recently used objects let go of their descriptors and
    /// come back as the same objects (after a rename too); a used object keeps its own.
    #[test]
    fn objects_past_the_budget_let_go_and_come_back_as_themselves() {
        let (path, root) = dir();
        let cache = FdCache::new(&[root.as_fd()]);
        if cache.decoders[0].is_none() {
            eprintln!("no handle support here (not root?): nothing to check");
            return;
        }
        cache.set_budget(4);
        let mut objs = Vec::new();
        for i in 0..10 {
            let name = std::ffi::CString::new(format!("f{i}")).expect("name");
            std::fs::write(path.join(format!("f{i}")), b"x").expect("write");
            let fd = sys::open_path_at(root.as_fd(), &name).expect("open");
            let k = key(&fd);
            objs.push((cache.adopt(0, fd), k));
            // Keep the first one in use: it must survive every sweep.
            objs[0].0.fd().expect("fd");
        }
        assert!(cache.held() <= 4, "held {} with budget 4", cache.held());
        assert!(
            objs[0].0.0.slot.lock().fd.is_some(),
            "a used object was evicted"
        );
        std::fs::rename(path.join("f1"), path.join("moved")).expect("rename");
        for (obj, k) in &objs {
            assert_eq!(key(&obj.fd().expect("reopen")), *k);
        }
        assert!(cache.held() <= 4, "held {} after reopening", cache.held());
        drop(objs);
        assert_eq!(cache.held(), 0, "dropped objects still counted");
        let _ = std::fs::remove_dir_all(&path);
    }

    /// A deleted object that nobody has open any more cannot come back: ESTALE, not some
    /// other object.
    #[test]
    fn a_deleted_object_comes_back_as_stale() {
        let (path, root) = dir();
        let cache = FdCache::new(&[root.as_fd()]);
        if cache.decoders[0].is_none() {
            return;
        }
        std::fs::write(path.join("gone"), b"x").expect("write");
        let obj = cache.adopt(0, sys::open_path_at(root.as_fd(), c"gone").expect("open"));
        cache.evict_to(0);
        assert_eq!(cache.held(), 0);
        std::fs::remove_file(path.join("gone")).expect("unlink");
        let e = obj.fd().expect_err("a deleted object reopened");
        assert_eq!(e.raw_os_error(), Some(libc::ESTALE));
        let _ = std::fs::remove_dir_all(&path);
    }
}
