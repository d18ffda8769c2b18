//! Layer objects the daemon refers to without holding a descriptor for each one.
//!
//! Owns: [`ObjRef`], the reference every node and merged-directory entry keeps on its layer
//! object, and [`FdCache`], which bounds how many of those references hold an open `O_PATH`
//! descriptor. The kernel may keep hundreds of thousands of inodes cached (and so alive in
//! our inode table) while the process may open at most `RLIMIT_NOFILE` files, which a
//! container manager can lower at any time. Past the budget (half the current soft limit,
//! re-read as we go), the least recently used descriptors are closed and their objects
//! remembered by file handle (`name_to_handle_at`), to be reopened by `open_by_handle_at`
//! when next used (and taken back into the cache at the second use). A handle names an inode, not a path, so a reopened object is exactly the
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

use std::collections::{HashMap, VecDeque};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
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
/// Handles up to this long (ext4, xfs, tmpfs, btrfs without parent: 8 to 20 bytes... most
/// of them) are kept inside the object; longer ones in the cache's side table.
const INLINE_HANDLE: usize = 18;
/// `Closed::len` of a handle kept in the side table.
const IN_SIDE_TABLE: u8 = u8::MAX;

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
    /// Handles too long to keep inline, by object address.
    long_handles: Mutex<HashMap<usize, Handle>>,
}

/// A file handle as `name_to_handle_at` gave it.
#[derive(Debug, Clone)]
struct Handle {
    kind: i32,
    bytes: Box<[u8]>,
}

/// A reference to one layer object (cheap to clone; clones are the same reference).
#[derive(Debug, Clone)]
pub struct ObjRef(Arc<Obj>);

/// Kept small on purpose: there is one per node the kernel remembers (a million for a walk
/// of a million entries), so everything but the cache pointer lives in the locked slot.
#[derive(Debug)]
struct Obj {
    cache: Arc<FdCache>,
    slot: Mutex<Slot>,
}

#[derive(Debug)]
enum Slot {
    /// The object's descriptor is open.
    Open {
        fd: Arc<OwnedFd>,
        layer: LayerIndex,
        /// Used since the eviction sweep last passed it (its second chance).
        used: bool,
        /// Never let go (and not counted in the budget): there is no way back without it.
        pinned: bool,
    },
    /// Let go of; reopened from its handle when used.
    Closed {
        layer: LayerIndex,
        /// Used once since it was let go of (that use opened it only for itself).
        used_once: bool,
        /// `handle_type` (when it fits a byte; else the handle is in the side table).
        kind: u8,
        /// Bytes of `bytes` used, or [`IN_SIDE_TABLE`].
        len: u8,
        bytes: [u8; INLINE_HANDLE],
    },
}

impl Slot {
    fn layer(&self) -> LayerIndex {
        match self {
            Slot::Open { layer, .. } | Slot::Closed { layer, .. } => *layer,
        }
    }
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
            long_handles: Mutex::new(HashMap::new()),
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
            slot: Mutex::new(Slot::Open {
                fd: Arc::new(fd),
                layer,
                used: false,
                pinned: !evictable,
            }),
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
            let Slot::Open {
                fd,
                layer,
                used,
                pinned,
            } = &mut *slot
            else {
                continue;
            };
            if *pinned {
                continue;
            }
            if std::mem::take(used) {
                drop(slot);
                self.queue.lock().push_back(weak);
                continue;
            }
            let layer = *layer;
            match self.handle_of(layer, fd) {
                Some(handle) => *slot = self.closed(&obj, layer, handle),
                // No way back without the descriptor: keep it, outside the budget.
                None => *pinned = true,
            }
            self.held.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The closed slot of `obj` for `handle` (kept inline when it fits).
    fn closed(&self, obj: &Arc<Obj>, layer: LayerIndex, handle: Handle) -> Slot {
        match u8::try_from(handle.kind) {
            Ok(kind) if handle.bytes.len() <= INLINE_HANDLE => {
                let mut bytes = [0; INLINE_HANDLE];
                bytes[..handle.bytes.len()].copy_from_slice(&handle.bytes);
                Slot::Closed {
                    layer,
                    used_once: false,
                    kind,
                    len: handle.bytes.len() as u8,
                    bytes,
                }
            }
            _ => self.closed_aside(obj, layer, handle),
        }
    }

    /// The closed slot of `obj`, its handle kept in the side table.
    fn closed_aside(&self, obj: &Arc<Obj>, layer: LayerIndex, handle: Handle) -> Slot {
        self.long_handles
            .lock()
            .insert(Arc::as_ptr(obj) as usize, handle);
        Slot::Closed {
            layer,
            used_once: false,
            kind: 0,
            len: IN_SIDE_TABLE,
            bytes: [0; INLINE_HANDLE],
        }
    }

    /// The file handle of an object's descriptor, if its layer can reopen it from that.
    fn handle_of(&self, layer: LayerIndex, fd: &OwnedFd) -> Option<Handle> {
        let decoder = self.decoders.get(layer as usize)?.as_ref()?;
        let (handle, mount_id) = name_to_handle(fd.as_fd()).ok()?;
        (mount_id == decoder.mount_id).then_some(handle)
    }

    fn reopen(&self, layer: LayerIndex, handle: &Handle) -> io::Result<OwnedFd> {
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
    ///
    /// An object let go of is taken back into the cache only at its second use since: the
    /// first gets a descriptor of its own, closed when the caller drops it. A walk over more
    /// objects than the budget (a second `find` over a big tree, which asks the attributes
    /// of every directory again) would otherwise let go of each object just before it is
    /// needed again, and pay a reopen and a let-go for every one; this way the objects
    /// still held stay held, and the others cost one reopen each.
    pub fn fd(&self) -> io::Result<Arc<OwnedFd>> {
        let obj = &self.0;
        let mut slot = obj.slot.lock();
        let (layer, handle, first_use) = match &mut *slot {
            Slot::Open { fd, used, .. } => {
                *used = true;
                return Ok(Arc::clone(fd));
            }
            Slot::Closed {
                layer,
                used_once,
                kind,
                len,
                bytes,
            } => {
                let handle = match *len {
                    IN_SIDE_TABLE => obj
                        .cache
                        .long_handles
                        .lock()
                        .get(&(Arc::as_ptr(obj) as usize))
                        .cloned()
                        .ok_or_else(|| io::Error::from_raw_os_error(libc::EIO))?,
                    n => Handle {
                        kind: i32::from(*kind),
                        bytes: bytes[..n as usize].into(),
                    },
                };
                (*layer, handle, !std::mem::replace(used_once, true))
            }
        };
        let fd = Arc::new(obj.cache.reopen(layer, &handle)?);
        if first_use {
            return Ok(fd);
        }
        *slot = Slot::Open {
            fd: Arc::clone(&fd),
            layer,
            used: false,
            pinned: false,
        };
        drop(slot);
        obj.cache
            .long_handles
            .lock()
            .remove(&(Arc::as_ptr(obj) as usize));
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

    /// Whether `fd` (a descriptor on an object with this one's filesystem and inode number)
    /// is this very object, not a new one that was given the number of this one after it
    /// was deleted. A held descriptor keeps its inode — and so its number — from being
    /// reused, so only a let-go object needs its handle (which carries the generation)
    /// compared.
    pub fn is(&self, fd: BorrowedFd<'_>) -> bool {
        let obj = &self.0;
        let slot = obj.slot.lock();
        let Slot::Closed {
            kind, len, bytes, ..
        } = &*slot
        else {
            return true;
        };
        let Ok((now, _)) = name_to_handle(fd) else {
            return true; // cannot tell: keep what we have
        };
        match *len {
            IN_SIDE_TABLE => obj
                .cache
                .long_handles
                .lock()
                .get(&(Arc::as_ptr(obj) as usize))
                .is_none_or(|h| h.kind == now.kind && h.bytes == now.bytes),
            n => i32::from(*kind) == now.kind && bytes[..n as usize] == *now.bytes,
        }
    }

    /// Whether two references are the same reference (not merely the same object).
    pub fn same(a: &ObjRef, b: &ObjRef) -> bool {
        Arc::ptr_eq(&a.0, &b.0)
    }

    /// The layer the object is in.
    pub fn layer(&self) -> LayerIndex {
        self.0.slot.lock().layer()
    }
}

impl Drop for Obj {
    fn drop(&mut self) {
        match self.slot.get_mut() {
            Slot::Open { pinned: false, .. } => {
                self.cache.held.fetch_sub(1, Ordering::Relaxed);
            }
            Slot::Closed {
                len: IN_SIDE_TABLE, ..
            } => {
                let key = self as *const Obj as usize;
                self.cache.long_handles.lock().remove(&key);
            }
            _ => {}
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

/// `struct file_handle`: `handle_bytes`, `handle_type`, then the handle itself.
#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_BYTES],
}

/// `name_to_handle_at(fd, "", AT_EMPTY_PATH)`: the object's handle and the id of the mount
/// it is on.
fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<(Handle, i32)> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_BYTES as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_BYTES],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: raw is a writable struct file_handle with room for MAX_HANDLE_BYTES; the empty
    // path with AT_EMPTY_PATH names fd itself.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut raw,
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_BYTES);
    let handle = Handle {
        kind: raw.handle_type,
        bytes: raw.f_handle[..len].into(),
    };
    Ok((handle, mount_id))
}

/// `open_by_handle_at(mount_fd, handle, O_PATH)`: an object's descriptor back from its
/// handle (a symlink's handle gives the link itself).
fn open_by_handle(mount_fd: BorrowedFd<'_>, handle: &Handle) -> io::Result<OwnedFd> {
    let len = handle.bytes.len().min(MAX_HANDLE_BYTES);
    let mut raw = RawHandle {
        handle_bytes: len as u32,
        handle_type: handle.kind,
        f_handle: [0; MAX_HANDLE_BYTES],
    };
    raw.f_handle[..len].copy_from_slice(&handle.bytes[..len]);
    // SAFETY: raw holds a struct file_handle as name_to_handle_at filled it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut raw,
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

    /// A test directory and a cache for it, or `None` (said on stderr) where this process
    /// cannot reopen objects by handle (not root).
    fn handle_cache() -> Option<(std::path::PathBuf, OwnedFd, Arc<FdCache>)> {
        let (path, root) = dir();
        let cache = FdCache::new(&[root.as_fd()]);
        if cache.decoders[0].is_none() {
            eprintln!("no handle support here (not root?): nothing to check");
            let _ = std::fs::remove_dir_all(&path);
            return None;
        }
        Some((path, root, cache))
    }

    fn key(fd: &OwnedFd) -> (u64, u64) {
        let st = sys::stat_fd(fd.as_fd()).expect("stat");
        (st.st_dev, st.st_ino)
    }

    /// Makes file `f<i>` in the test directory and puts it under `cache`'s management;
    /// returns the object and its (st_dev, st_ino).
    fn adopt_new_file(
        cache: &Arc<FdCache>,
        path: &std::path::Path,
        root: &OwnedFd,
        i: usize,
    ) -> (ObjRef, (u64, u64)) {
        let name = std::ffi::CString::new(format!("f{i}")).expect("name");
        std::fs::write(path.join(format!("f{i}")), b"x").expect("write");
        let fd = sys::open_path_at(root.as_fd(), &name).expect("open");
        let k = key(&fd);
        (cache.adopt(0, fd), k)
    }

    /// Past the budget, the least recently used objects let go of their descriptors and
    /// come back as the same objects (after a rename too); a used object keeps its own.
    #[test]
    fn objects_past_the_budget_let_go_and_come_back_as_themselves() {
        let Some((path, root, cache)) = handle_cache() else {
            return;
        };
        cache.set_budget(4);
        let mut objs = Vec::new();
        for i in 0..10 {
            objs.push(adopt_new_file(&cache, &path, &root, i));
            // Keep the first one in use: it must survive every sweep.
            objs[0].0.fd().expect("fd");
        }
        assert!(cache.held() <= 4, "held {} with budget 4", cache.held());
        assert!(
            matches!(*objs[0].0.0.slot.lock(), Slot::Open { .. }),
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

    /// A handle too long to keep inline round-trips through the side table, which lets go
    /// of it when the object is reopened or dropped.
    #[test]
    fn long_handles_are_kept_aside_and_released() {
        let Some((path, root, cache)) = handle_cache() else {
            return;
        };
        std::fs::write(path.join("f"), b"x").expect("write");
        let fd = sys::open_path_at(root.as_fd(), c"f").expect("open");
        let k = key(&fd);
        let obj = cache.adopt(0, fd);
        let (handle, _) = name_to_handle(obj.fd().expect("fd").as_fd()).expect("handle");
        *obj.0.slot.lock() = cache.closed_aside(&obj.0, 0, handle);
        cache.held.fetch_sub(1, Ordering::Relaxed);
        assert_eq!(cache.long_handles.lock().len(), 1);
        assert_eq!(key(&obj.fd().expect("first use")), k);
        assert_eq!(
            cache.long_handles.lock().len(),
            1,
            "let go of after a first use, which still needs it"
        );
        assert_eq!(key(&obj.fd().expect("reopen")), k);
        assert_eq!(cache.long_handles.lock().len(), 0, "kept after the reopen");
        let (handle, _) = name_to_handle(obj.fd().expect("fd").as_fd()).expect("handle");
        *obj.0.slot.lock() = cache.closed_aside(&obj.0, 0, handle);
        cache.held.fetch_sub(1, Ordering::Relaxed);
        drop(obj);
        assert_eq!(cache.long_handles.lock().len(), 0, "kept after the drop");
        assert_eq!(cache.held(), 0);
        let _ = std::fs::remove_dir_all(&path);
    }

    /// An object let go of and deleted, whose inode number a new file then gets, is told
    /// apart from that file (by the handle's generation); a held one needs no comparison.
    #[test]
    fn a_let_go_object_is_told_apart_from_a_new_one() {
        let Some((path, root, cache)) = handle_cache() else {
            return;
        };
        std::fs::write(path.join("a"), b"x").expect("write");
        std::fs::write(path.join("b"), b"y").expect("write");
        let a = cache.adopt(0, sys::open_path_at(root.as_fd(), c"a").expect("open"));
        let a_again = sys::open_path_at(root.as_fd(), c"a").expect("open");
        let b = sys::open_path_at(root.as_fd(), c"b").expect("open");
        assert!(
            a.is(a_again.as_fd()) && a.is(b.as_fd()),
            "held: taken as itself"
        );
        cache.evict_to(0);
        assert!(a.is(a_again.as_fd()), "let go: the same file");
        assert!(!a.is(b.as_fd()), "let go: another file");
        let _ = std::fs::remove_dir_all(&path);
    }

    /// The first use of an object let go of opens it for that use only (nothing else is
    /// let go of for it); the second takes it back into the cache.
    #[test]
    fn a_let_go_object_is_taken_back_at_its_second_use() {
        let Some((path, root, cache)) = handle_cache() else {
            return;
        };
        cache.set_budget(2);
        let objs: Vec<_> = (0..3)
            .map(|i| adopt_new_file(&cache, &path, &root, i))
            .collect();
        let is_open = |o: &ObjRef| matches!(*o.0.slot.lock(), Slot::Open { .. });
        assert!(!is_open(&objs[0].0), "the oldest was not let go of");
        assert!(is_open(&objs[1].0) && is_open(&objs[2].0));

        assert_eq!(key(&objs[0].0.fd().expect("first use")), objs[0].1);
        assert!(!is_open(&objs[0].0), "taken back at its first use");
        assert!(
            is_open(&objs[1].0) && is_open(&objs[2].0),
            "another object let go of for a single use"
        );
        assert_eq!(cache.held(), 2);

        assert_eq!(key(&objs[0].0.fd().expect("second use")), objs[0].1);
        assert!(is_open(&objs[0].0), "not taken back at its second use");
        assert!(cache.held() <= 2, "held {} with budget 2", cache.held());
        let _ = std::fs::remove_dir_all(&path);
    }

    #[test]
    fn objects_stay_small() {
        // Arc header + Obj within a 64-byte malloc chunk (56 usable).
        assert!(
            std::mem::size_of::<Obj>() <= 40,
            "{}",
            std::mem::size_of::<Obj>()
        );
    }

    /// A deleted object that nobody has open any more cannot come back: ESTALE, not some
    /// other object.
    #[test]
    fn a_deleted_object_comes_back_as_stale() {
        let Some((path, root, cache)) = handle_cache() else {
            return;
        };
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
