//! The `fuser::Filesystem` adapter: translates FUSE requests into calls on the layer modules
//! and their results into replies.
//!
//! Owns: open file and directory handles, attribute conversion, errno mapping. Must never:
//! decide union semantics itself (that is `lookup`, `readdir`, `whiteout`, `xattr`), or
//! block a worker on anything but the layer filesystems.
//!
//! Locking: `files` and `dirs` are independent `RwLock`s held only to insert, look up or
//! remove a handle; a directory handle's own `Mutex` serialises readers of one open
//! directory stream. No lock is held across I/O except that per-stream `Mutex`.

use std::collections::{HashMap, VecDeque};
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};

use crate::canary::{CANARY_FH, CANARY_ID, CANARY_SIZE, Canary};
use crate::errseq::Cursor;
use crate::handles::ObjRef;
use crate::health::{Health, Mode};
use crate::idmap::IdMap;
use crate::inodes::{Node, NodeState, ROOT_ID};
use crate::layers::LayerStack;
use crate::lookup::Resolved;
use crate::namespace::{Creator, NewObject, Union};
use crate::passthrough::{IoMode, Passthrough};
use crate::readdir;
use crate::sys;
use crate::xattr::{self, Caller};

/// Settings the adapter needs from the mount configuration.
#[derive(Debug, Clone)]
pub struct FsSettings {
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Let the kernel keep file pages across opens (`FOPEN_KEEP_CACHE`): every change goes
    /// through the union, which keeps them coherent.
    /// Off for volatile mounts, so that a poisoned mount's refusals are not hidden by caches.
    pub cache: bool,
    /// Largest WRITE the transport can carry, when something smaller than fuser's default
    /// bounds it (the relay's socket buffers do).
    pub max_write: Option<u32>,
    /// Owner ids as shown versus as stored (uidmapping/gidmapping/squash_*).
    pub ids: IdMap,
    /// Whether fsync/fdatasync/fsyncdir flush the upper layer (`fsync=0` turns it off, at
    /// the user's explicit request).
    pub flush: bool,
}

struct DirStream {
    /// Snapshot of the merged listing, taken at the first READDIR (not at opendir: when the
    /// kernel has the listing cached, an open is all it asks for) and again when a reader
    /// rewinds to offset 0 (rewinddir must show changes).
    entries: Option<Vec<readdir::Entry>>,
}

/// What a read-only open of a lower object watches: its node, the handle it was opened from,
/// and the open flags.
struct LowerOpen {
    node: Arc<Node>,
    source: ObjRef,
    flags: i32,
}

/// An open file.
struct OpenFile {
    node: Arc<Node>,
    file: RwLock<Arc<OwnedFd>>,
    /// This handle's cursor on the node's writeback errors (sampled at open).
    wb_since: Mutex<Cursor>,
    /// Opened for writing: a write through it may make the kernel ask us to clear set-id
    /// bits (see `attrs::kill_setgid`).
    writable: bool,
    /// For a read-only open of an object below the upper layer: its node, the handle it was
    /// opened from and the open flags. When the node is copied up through another descriptor,
    /// reads switch to the upper copy, as they do on the kernel overlay.
    follows: Mutex<Option<LowerOpen>>,
    /// How the kernel serves this open (through us, or straight to the upper file).
    io: IoMode,
}

/// One entry of a READDIRPLUS listing: with the attributes and generation a LOOKUP answers,
/// or without (`attr` None: the kernel then only lists it).
#[derive(Clone, Copy)]
pub(crate) struct PlusEntry<'a> {
    pub attr: Option<(&'a FileAttr, Generation)>,
    pub ino: u64,
    pub cookie: u64,
    pub kind: FileType,
    pub name: &'a OsStr,
}

/// A file OPEN opened: what the kernel is told.
pub(crate) struct Opened {
    pub fh: FileHandle,
    pub io: IoMode,
    /// The open flags to answer with (FOPEN_PASSTHROUGH included when `io` says so).
    pub flags: FopenFlags,
}

/// A file CREATE made and opened: what the kernel is told.
pub(crate) struct Created {
    pub attr: FileAttr,
    pub generation: Generation,
    pub open: Opened,
}

/// An entry a request made or found: what the kernel is told, and the node behind it.
struct Known {
    attr: FileAttr,
    node: Arc<Node>,
}

impl Known {
    /// What an entry reply carries.
    fn entry(&self) -> (FileAttr, Generation) {
        (self.attr, Generation(self.node.generation()))
    }
}

/// The union filesystem as fuser sees it: a handle on the [`Core`], which the relay's fast
/// path (`fast_path`) shares on a fuseblk mount.
pub struct OverlayFs {
    core: Arc<Core>,
}

impl std::ops::Deref for OverlayFs {
    type Target = Core;
    fn deref(&self) -> &Core {
        &self.core
    }
}

/// Everything the union's request handlers use, whichever thread serves the request.
pub struct Core {
    union: Union,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    /// Listings being read without an open (see `opendir`), by directory node, most recent
    /// last: a large directory takes several READDIRs, which continue from this instead of
    /// merging the layers again. Dropped once read to the end.
    recent_listings: Mutex<VecDeque<(u64, Arc<Vec<readdir::Entry>>)>>,
    next_handle: AtomicU64,
    /// FUSE_HANDLE_KILLPRIV_V2 was agreed: set-id bits are ours to clear on write and
    /// truncate.
    kills_privileges: AtomicBool,
    /// The largest WRITE the transport carries (0: no bound but fuser's own).
    max_write_limit: AtomicU32,
    settings: FsSettings,
    health: Arc<Health>,
    canary: Option<Arc<Canary>>,
    passthrough: Passthrough,
    /// When a LOOKUP last found something other than a directory, in milliseconds from
    /// `born` plus one (0: never). See [`Core::listing_wants_file_attrs`].
    file_looked_up: AtomicU64,
    born: std::time::Instant,
    /// What unlinks took away, dropped with the next FORGET: on the thread that reads
    /// FORGETs rather than the one the caller of the unlink waits for, since dropping one
    /// may be the upper filesystem's eviction of the deleted inode. The kernel forgets the
    /// unlinked node itself right after the reply, unless something still holds it open.
    graveyard: Mutex<Vec<crate::namespace::Removed>>,
}

/// The most removed objects kept for the next FORGET; past it, the unlink drops them.
const GRAVEYARD_MAX: usize = 256;

/// How long after a LOOKUP of a non-directory READDIRPLUS keeps giving non-directories
/// their attributes (see [`Core::listing_wants_file_attrs`]).
const FILE_ATTRS_WINDOW_MS: u64 = 2000;

/// Adds the entries a reader at `offset` has not seen yet, as many as fit; returns whether
/// the listing was given to its end. Offsets are the entries' cookies: the same place in
/// every snapshot of the directory.
/// `add` takes one entry (inode number, cookie, type, name) and says whether it fitted.
pub(crate) fn fill_listing(
    entries: &[readdir::Entry],
    offset: u64,
    mut add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
) -> bool {
    let start = readdir::resume_at(entries, offset);
    for entry in &entries[start..] {
        if !add(
            entry.ino,
            entry.cookie,
            file_type(entry.file_type),
            &entry.name,
        ) {
            return false;
        }
    }
    true
}

/// [`fill_listing`] into fuser's reply.
fn fill_reply(reply: &mut ReplyDirectory, entries: &[readdir::Entry], offset: u64) -> bool {
    fill_listing(entries, offset, |ino, cookie, kind, name| {
        !reply.add(INodeNo(ino), cookie, kind, name)
    })
}

fn errno(e: io::Error) -> Errno {
    Errno::from(e)
}

fn time(sec: i64, nsec: i64) -> SystemTime {
    if sec >= 0 {
        UNIX_EPOCH + Duration::new(sec as u64, nsec as u32)
    } else {
        UNIX_EPOCH - Duration::new(sec.unsigned_abs(), 0) + Duration::new(0, nsec as u32)
    }
}

fn file_type(mode: u32) -> FileType {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        _ => FileType::RegularFile,
    }
}

/// The attributes of a negative entry: all zero, node id 0 included.
pub(crate) fn no_entry_attr() -> FileAttr {
    let mut attr = dot_attr(0);
    attr.kind = FileType::RegularFile;
    attr
}

/// What READDIRPLUS sends for `.` and `..`: only the inode number and type are read (the
/// kernel takes no reference on them and ignores their attributes).
fn dot_attr(ino: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 0,
        flags: 0,
    }
}

impl OverlayFs {
    /// Builds the union over `stack`; fails if the root cannot be read from the layers.
    pub fn new(
        stack: LayerStack,
        durable: bool,
        settings: FsSettings,
        health: Arc<Health>,
        canary: Option<Arc<Canary>>,
    ) -> io::Result<OverlayFs> {
        let core = Core {
            union: Union::new(stack, durable)?,
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            recent_listings: Mutex::new(VecDeque::new()),
            graveyard: Mutex::new(Vec::new()),
            next_handle: AtomicU64::new(1),
            kills_privileges: AtomicBool::new(false),
            max_write_limit: AtomicU32::new(0),
            settings,
            health,
            canary,
            passthrough: Passthrough::off(),
            file_looked_up: AtomicU64::new(0),
            born: std::time::Instant::now(),
        };
        Ok(OverlayFs {
            core: Arc::new(core),
        })
    }
}

impl OverlayFs {
    /// The relay hook of a fuseblk mount: serves the hottest requests on the relay's own
    /// threads from this union, and leaves the rest to `rest` and fuser.
    pub fn relay_hook(&self, rest: crate::health::RelayHook) -> Arc<dyn crate::relay::LocalAnswer> {
        Arc::new(crate::fast_path::FastPath::new(
            Arc::clone(&self.core),
            rest,
        ))
    }
}

impl Core {
    /// Offers FUSE passthrough for upper files through the mount's connection `device`
    /// (a descriptor of it; on fuseblk, the relay's). Not on volatile mounts: there every
    /// read and write must reach the daemon, which refuses them once the mount is poisoned.
    pub fn use_passthrough(&self, device: OwnedFd) {
        if self.settings.cache {
            self.passthrough.set_device(device);
        }
    }

    /// A volatile mount poisoned by a lost write refuses everything with EIO.
    fn gate(&self) -> Result<(), Errno> {
        match self.health.refusal() {
            Some(e) => Err(Errno::from_i32(e)),
            None => Ok(()),
        }
    }

    /// Copies `node` up; an I/O error on the way is a reason to check the upper now.
    fn copy_up(&self, node: &Node, with_data: bool) -> Result<crate::inodes::NodeState, Errno> {
        self.union
            .copy_up(node, with_data)
            .map_err(|e| self.upper_errno(e))
    }

    /// The errno for an error from the upper layer, after telling the health checker.
    fn upper_errno(&self, e: io::Error) -> Errno {
        if let Some(code) = e.raw_os_error() {
            self.health.suspect(code);
        }
        errno(e)
    }

    /// fsync of one handle, with ext4's rule: an upper writeback error is reported once per
    /// handle, whether the upper kernel reports it on this handle's descriptor or the
    /// daemon's checker found it first (then the kernel has it marked seen, and only the
    /// node's own record still knows that this handle has not been told). The two never
    /// report one error in two calls: the checker's descriptor is opened at each check, so
    /// it only finds errors nobody has been told about, which this handle's upper
    /// descriptor then reports in the same call as the node's record.
    fn fsync_handle(&self, fh: FileHandle, datasync: bool) -> Result<(), Errno> {
        let open = self.open_file(fh)?;
        let node = &open.node;
        match self.health.mode() {
            Mode::Volatile => {
                return self.health.volatile_fsync(node).map_err(Errno::from_i32);
            }
            // fsync=0: nothing is flushed, but errors the checker found are still told.
            Mode::NoSync => {
                let found = node.wb_err.check_and_advance(&mut open.wb_since.lock());
                return found.map_or(Ok(()), |e| Err(Errno::from_i32(e)));
            }
            Mode::Durable => {}
        }
        let file = self.file(fh)?;
        let mut direct = sys::sync_fd(file.as_fd(), datasync)
            .err()
            .map(|e| e.raw_os_error().unwrap_or(libc::EIO));
        if direct.is_none() {
            direct = self.sync_names(node);
        }
        let found = node.wb_err.check_and_advance(&mut open.wb_since.lock());
        if let Some(e) = direct {
            self.health.fsync_failed(e);
        }
        match direct.or(found) {
            Some(e) => Err(Errno::from_i32(e)),
            None => Ok(()),
        }
    }

    /// Makes the upper names of `node` and of its ancestors durable where they may not be
    /// yet (see `Node::name_unsynced`): flushes each such one's parent directory, walking
    /// up while the parent's own name is unsynced too (a copy-up deep in lower-only
    /// directories made all of them). Returns the first error.
    fn sync_names(&self, node: &Node) -> Option<i32> {
        let mut child = self.union.inodes.get(node.id)?;
        while child.id != ROOT_ID && child.name_unsynced.swap(false, Ordering::AcqRel) {
            let parent = self.union.inodes.get(child.state().parent)?;
            let state = parent.state();
            if !(self.union.stack.has_upper() && state.layer() == 0) {
                return None;
            }
            let synced = state
                .obj
                .reopen(libc::O_RDONLY | libc::O_DIRECTORY)
                .and_then(|dir| sys::sync_fd(dir.as_fd(), false));
            if let Err(e) = synced {
                child.name_unsynced.store(true, Ordering::Release);
                return Some(e.raw_os_error().unwrap_or(libc::EIO));
            }
            child = parent;
        }
        None
    }

    fn canary_attr(&self, req: &Request) -> FileAttr {
        let now = SystemTime::now();
        FileAttr {
            ino: INodeNo(CANARY_ID),
            size: CANARY_SIZE,
            blocks: CANARY_SIZE / 512,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: UNIX_EPOCH,
            kind: FileType::RegularFile,
            perm: 0o600,
            nlink: 1,
            uid: req.uid(),
            gid: req.gid(),
            rdev: 0,
            blksize: CANARY_SIZE as u32,
            flags: 0,
        }
    }

    /// The mount's health, shared with the daemon and the relay.
    pub fn health(&self) -> Arc<Health> {
        Arc::clone(&self.health)
    }

    /// Bounds WRITE requests to what the transport carries (the relay's buffers).
    pub fn limit_max_write(&self, max_write: u32) {
        self.max_write_limit.store(max_write, Ordering::Release);
    }

    fn kills_privileges(&self) -> bool {
        self.kills_privileges.load(Ordering::Acquire)
    }

    /// A handle on the upper layer's root, if there is an upper layer.
    pub fn upper_root(&self) -> Option<OwnedFd> {
        let stack = &self.union.stack;
        if !stack.has_upper() {
            return None;
        }
        stack.layers[0].root.try_clone().ok()
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.union.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn attr(&self, node: &Node) -> Result<FileAttr, Errno> {
        let state = node.state();
        let st = sys::stat_fd(state.obj.fd()?.as_fd()).map_err(errno)?;
        Ok(self.attr_of(node, &state, &st))
    }

    /// The attributes of `node`, in `state`, whose object has the status `st`.
    fn attr_of(&self, node: &Node, state: &NodeState, st: &libc::stat) -> FileAttr {
        // Like the kernel overlay: the link count of a merged directory cannot be known
        // without counting subdirectories in every layer; 1 tells `find` not to rely on it.
        let nlink = if state.merged.len() > 1 {
            1
        } else {
            st.st_nlink as u32
        };
        FileAttr {
            ino: INodeNo(self.union.inodes.ino(node)),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink,
            uid: self.settings.ids.shown_uid(st.st_uid),
            gid: self.settings.ids.shown_gid(st.st_gid),
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        }
    }

    /// Attributes of a node reached by lookup. fuser uses `attr.ino` as the FUSE node id, so
    /// the root (id 1) must be reported under its id when the kernel looks it up by name.
    fn entry_attr(&self, node: &Node) -> Result<FileAttr, Errno> {
        let mut attr = self.attr(node)?;
        if node.id == ROOT_ID {
            attr.ino = INodeNo(ROOT_ID);
        }
        Ok(attr)
    }

    fn handle(&self) -> u64 {
        self.next_handle.fetch_add(1, Ordering::Relaxed)
    }

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<Known, Errno> {
        let dir = self.node(parent)?;
        let resolved = self
            .union
            .resolve(&dir, name)
            .map_err(errno)?
            .ok_or(Errno::ENOENT)?;
        let known = self.remember(&dir, name, resolved)?;
        if known.attr.kind != FileType::Directory {
            self.file_looked_up
                .store(self.millis() + 1, Ordering::Relaxed);
        }
        Ok(known)
    }

    fn millis(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Whether READDIRPLUS should give entries that are not directories their attributes:
    /// only while the workload looks such entries up (a stat walk, `ls -l`, a build), as it
    /// did within the last [`FILE_ATTRS_WINDOW_MS`]. A walk that only reads names (`find`,
    /// `du --inodes`) descends into directories but never looks files up, and giving their
    /// attributes would cost a lookup in every layer for each; directories always get theirs
    /// (the walk's next step is to open them). A file listed bare costs a stat walk one
    /// LOOKUP, which brings the attributes back for the listings after it.
    fn listing_wants_file_attrs(&self) -> bool {
        let last = self.file_looked_up.load(Ordering::Relaxed);
        last != 0 && self.millis() + 1 - last < FILE_ATTRS_WINDOW_MS
    }

    /// Open flags for a regular file served through us: no FLUSH on close (ours does
    /// nothing: close never reports errors), and the page cache kept across opens when
    /// caching is on — except for an upper file while passthrough is on, whose writes
    /// through earlier passthrough opens went around the page cache.
    fn file_open_flags(&self, upper: bool) -> FopenFlags {
        if self.settings.cache && !(upper && self.passthrough.enabled()) {
            FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::FOPEN_NOFLUSH
        }
    }

    /// How the kernel is to serve a new open `file` of `node`: straight to the upper file
    /// when passthrough is on and allowed for it (see `passthrough`), else through us.
    fn io_mode(&self, node: &Node, file: &OwnedFd, upper: bool) -> IoMode {
        let allowed = upper && self.passthrough.enabled();
        let object = node.state().obj.clone();
        self.passthrough
            .open(node.id, &object, allowed.then(|| file.as_fd()))
    }

    /// Registers a kernel lookup of `resolved` (found as `name` in `dir`) and returns the
    /// attributes to answer with.
    fn remember(&self, dir: &Node, name: &OsStr, resolved: Resolved) -> Result<Known, Errno> {
        let (st, obj) = (resolved.stat, resolved.obj.clone());
        let node = self.union.inodes.lookup(dir.id, name, resolved);
        let state = node.state();
        // A node that stands for the object just resolved (a new node, the usual case of a
        // walk) has its attributes in that object's status, taken a moment ago; a node
        // that was known already keeps its own object (copied up meanwhile, say).
        if ObjRef::same(&state.obj, &obj) {
            let mut attr = self.attr_of(&node, &state, &st);
            if node.id == ROOT_ID {
                attr.ino = INodeNo(ROOT_ID);
            }
            return Ok(Known { attr, node });
        }
        drop(state);
        match self.entry_attr(&node) {
            Ok(attr) => Ok(Known { attr, node }),
            Err(e) => {
                self.union.inodes.forget(node.id, 1);
                Err(e)
            }
        }
    }

    /// READDIR without an open (the kernel stopped opening directories, see `opendir`):
    /// offset 0 merges the layers anew; a later offset continues the listing last merged
    /// for this directory (or a fresh one: cookies make either correct).
    fn readdir_unopened_reply(&self, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
        match self.readdir_unopened(ino.0, offset, |ino, cookie, kind, name| {
            !reply.add(INodeNo(ino), cookie, kind, name)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    /// READDIR of a directory the kernel did not open (see `opendir`), into `add` (see
    /// [`fill_listing`]).
    pub(crate) fn readdir_unopened(
        &self,
        ino: u64,
        offset: u64,
        add: impl FnMut(u64, u64, FileType, &OsStr) -> bool,
    ) -> Result<(), Errno> {
        self.with_unopened_listing(ino, offset, |_, entries| fill_listing(entries, offset, add))
    }

    /// READDIRPLUS of a directory the kernel did not open: each entry with what a LOOKUP of
    /// it answers, into `add` (the entry; says whether it fitted). Every entry given with
    /// attributes counts as a lookup, except `.` and `..`, which the kernel never takes a
    /// reference on. An entry whose lookup fails (a redirect the kernel refuses, an xattr
    /// whiteout outside an `opaque=x` directory, a name gone since the merge, ...) is listed
    /// without attributes, exactly as READDIR lists it; so, when `bare_keeps_ino` (only where a
    /// bare entry keeps its d_ino: glibc's readdir skips d_ino 0), is one the kernel still
    /// holds, and one that is not a directory while no LOOKUP asks for such entries
    /// ([`Core::listing_wants_file_attrs`]).
    pub(crate) fn readdirplus_unopened(
        &self,
        ino: u64,
        offset: u64,
        bare_keeps_ino: bool,
        mut add: impl FnMut(PlusEntry<'_>) -> bool,
    ) -> Result<(), Errno> {
        // Bare entries only where they keep their d_ino.
        let file_attrs = !bare_keeps_ino || self.listing_wants_file_attrs();
        self.with_unopened_listing(ino, offset, |dir, entries| {
            let start = readdir::resume_at(entries, offset);
            for entry in &entries[start..] {
                let name = entry.name.as_os_str();
                let bare = PlusEntry {
                    attr: None,
                    ino: entry.ino,
                    cookie: entry.cookie,
                    kind: file_type(entry.file_type),
                    name,
                };
                if name == "." || name == ".." {
                    let attr = dot_attr(entry.ino);
                    let dot = PlusEntry {
                        attr: Some((&attr, Generation(0))),
                        ..bare
                    };
                    if !add(dot) {
                        return false;
                    }
                    continue;
                }
                // A child the kernel still holds under this name (a listing read again
                // after the kernel dropped its cached copy): attributes would only repeat
                // what it has, and cost a lookup of the object. Bare, as READDIR lists it.
                if (!file_attrs && entry.file_type != libc::S_IFDIR)
                    || (bare_keeps_ino && self.union.inodes.held_at(entry.ino, dir.id, name))
                {
                    if !add(bare) {
                        return false;
                    }
                    continue;
                }
                let known = match self.union.resolve(dir, name) {
                    Ok(Some(resolved)) => self.remember(dir, name, resolved),
                    Ok(None) => Err(Errno::ENOENT),
                    Err(e) => Err(errno(e)),
                };
                let Ok(known) = known else {
                    if !add(bare) {
                        return false;
                    }
                    continue;
                };
                let generation = Generation(known.node.generation());
                let full = PlusEntry {
                    attr: Some((&known.attr, generation)),
                    ..bare
                };
                if !add(full) {
                    // Not sent: the kernel never counted it.
                    self.union.inodes.forget(known.node.id, 1);
                    return false;
                }
            }
            true
        })
    }

    /// Runs `fill` over the listing of directory `ino` for a reader at `offset` (see
    /// `readdir_unopened`); `fill` says whether it gave the listing to its end.
    fn with_unopened_listing(
        &self,
        ino: u64,
        offset: u64,
        fill: impl FnOnce(&Node, &[readdir::Entry]) -> bool,
    ) -> Result<(), Errno> {
        const KEPT: usize = 32;
        let ino = INodeNo(ino);
        let dir = self.node(ino)?;
        let recent = match offset {
            0 => None,
            _ => self
                .recent_listings
                .lock()
                .iter()
                .find(|(id, _)| *id == ino.0)
                .map(|(_, l)| Arc::clone(l)),
        };
        let entries = match recent {
            Some(entries) => entries,
            None => Arc::new(self.listing(&dir)?),
        };
        let finished = fill(&dir, &entries);
        let mut recent = self.recent_listings.lock();
        recent.retain(|(id, _)| *id != ino.0);
        if !finished {
            if recent.len() >= KEPT {
                recent.pop_front();
            }
            recent.push_back((ino.0, entries));
        }
        Ok(())
    }

    fn listing(&self, dir: &Node) -> Result<Vec<readdir::Entry>, Errno> {
        let state = dir.state();
        let parent_ino = self
            .union
            .inodes
            .get(state.parent)
            .map(|p| self.union.inodes.ino(&p))
            .unwrap_or_else(|| self.union.inodes.ino(dir));
        readdir::list(
            &self.union.stack,
            &self.union.inodes,
            &state.merged,
            self.union.inodes.ino(dir),
            parent_ino,
        )
        .map_err(errno)
    }

    fn file(&self, fh: FileHandle) -> Result<Arc<OwnedFd>, Errno> {
        let open = self.open_file(fh)?;
        let mut follows = open.follows.lock();
        if let Some(lower) = follows.as_ref() {
            let state = lower.node.state();
            if !ObjRef::same(&state.obj, &lower.source) {
                let upper = state.obj.reopen(lower.flags).map_err(errno)?;
                *open.file.write() = Arc::new(upper);
                *follows = None;
            }
        }
        drop(follows);
        Ok(open.file.read().clone())
    }

    /// Whether some handle has `node` open for writing.
    fn open_for_writing(&self, node: &Node) -> bool {
        self.files
            .read()
            .values()
            .any(|f| f.writable && f.node.id == node.id)
    }

    fn open_file(&self, fh: FileHandle) -> Result<Arc<OpenFile>, Errno> {
        self.files.read().get(&fh.0).cloned().ok_or(Errno::EBADF)
    }

    fn register_file(
        &self,
        node: Arc<Node>,
        file: OwnedFd,
        follows: Option<LowerOpen>,
        writable: bool,
        io: IoMode,
    ) -> u64 {
        let fh = self.handle();
        if writable && io != IoMode::Cached {
            // Its writes never reach us: watch it for as long as it is open.
            self.health.note_open_writer(&node);
        }
        let open = OpenFile {
            wb_since: Mutex::new(node.wb_err.sample()),
            node,
            file: RwLock::new(Arc::new(file)),
            follows: Mutex::new(follows),
            writable,
            io,
        };
        self.files.write().insert(fh, Arc::new(open));
        fh
    }

    /// Who sent `req`, for the set-id rules of `attrs`.
    fn setid_caller(&self, uid: u32, gid: u32, pid: u32) -> crate::attrs::Caller {
        let ids = &self.settings.ids;
        crate::attrs::Caller {
            uid,
            gid,
            pid,
            presumed_privileged: uid == 0 || ids.stored_uid(uid) == Some(0),
        }
    }

    /// The owner of an object as the union shows it.
    fn owner_of(&self, st: &libc::stat) -> crate::attrs::Owner {
        let ids = &self.settings.ids;
        crate::attrs::Owner {
            uid: ids.shown_uid(st.st_uid),
            gid: ids.shown_gid(st.st_gid),
        }
    }

    /// Clears the set-id bits of the open `file` that a change `why` by `req`'s caller
    /// clears, before the change, as the kernel's own write path would.
    fn drop_setid_bits(
        &self,
        req: &Request,
        file: std::os::fd::BorrowedFd<'_>,
        why: crate::attrs::SetidLoss,
    ) -> Result<(), Errno> {
        let st = sys::stat_fd(file).map_err(errno)?;
        if let Some(mode) = crate::attrs::setid_bits_dropped(
            &st,
            self.owner_of(&st),
            self.setid_caller(req.uid(), req.gid(), req.pid()),
            why,
        ) {
            // Stated just above: a regular file, so no symlink check is needed.
            sys::chmod_handle(file, mode).map_err(errno)?;
        }
        Ok(())
    }

    /// Opens the upper object of `node` (copying it up first) with `flags`.
    fn open_for_write(&self, node: &Node, flags: i32) -> Result<OwnedFd, Errno> {
        let with_data = flags & libc::O_TRUNC == 0;
        let state = self.copy_up(node, with_data)?;
        state.obj.reopen(real_open_flags(flags)).map_err(errno)
    }

    /// MKDIR, SYMLINK and MKNOD by the caller `uid`/`gid`: the new object's entry.
    fn make_entry(
        &self,
        parent: u64,
        name: &OsStr,
        what: NewObject<'_>,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, Generation), Errno> {
        self.gate()?;
        let dir = self.node(INodeNo(parent))?;
        let resolved = self
            .union
            .create(&dir, name, what, mode, self.creator(uid, gid))
            .map_err(errno)?;
        let known = self.remember(&dir, name, resolved)?;
        known.node.name_unsynced.store(true, Ordering::Release);
        Ok(known.entry())
    }

    /// MKDIR by the caller `uid`/`gid` (`mode`: the permission bits the kernel sends).
    pub(crate) fn mkdir_entry(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, Generation), Errno> {
        self.make_entry(parent, name, NewObject::Dir, libc::S_IFDIR | mode, uid, gid)
    }

    /// SYMLINK `name` -> `target` by the caller `uid`/`gid`.
    pub(crate) fn symlink_entry(
        &self,
        parent: u64,
        name: &OsStr,
        target: &OsStr,
        uid: u32,
        gid: u32,
    ) -> Result<(FileAttr, Generation), Errno> {
        let what = NewObject::Symlink {
            target: target.as_bytes(),
        };
        self.make_entry(parent, name, what, libc::S_IFLNK | 0o777, uid, gid)
    }

    /// LINK of node `ino` as `newname` in `newparent`: the entry of the new name.
    pub(crate) fn link_entry(
        &self,
        ino: u64,
        newparent: u64,
        newname: &OsStr,
    ) -> Result<(FileAttr, Generation), Errno> {
        self.gate()?;
        let node = self.node(INodeNo(ino))?;
        let dir = self.node(INodeNo(newparent))?;
        let resolved = self.union.link(&node, &dir, newname).map_err(errno)?;
        node.name_unsynced.store(true, Ordering::Release);
        Ok(self.remember(&dir, newname, resolved)?.entry())
    }

    /// RENAME and RENAME2 (`flags`: RENAME_NOREPLACE, RENAME_EXCHANGE).
    pub(crate) fn rename_entry(
        &self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
    ) -> Result<(), Errno> {
        self.gate()?;
        let from = self.node(INodeNo(parent))?;
        let to = self.node(INodeNo(newparent))?;
        self.union
            .rename(&from, name, &to, newname, flags)
            .map_err(errno)
    }

    /// Whether a change to node `ino` would first copy a regular file up from a lower layer
    /// (with its data, unless truncated to nothing): a copy and an fsync, which the relay
    /// leaves to fuser's workers so that its reading threads never wait on one.
    pub(crate) fn copies_file_up(&self, ino: u64) -> bool {
        self.node(INodeNo(ino)).is_ok_and(|node| {
            node.file_type() == libc::S_IFREG && !self.union.is_upper(&node.state())
        })
    }

    /// Whether an OPEN of node `ino` with open(2) `flags` would copy it up (see
    /// [`Core::copies_file_up`]).
    pub(crate) fn open_copies_file_up(&self, ino: u64, flags: i32) -> bool {
        opens_for_writing(flags) && self.copies_file_up(ino)
    }

    /// How long the kernel may keep entries and attributes.
    pub(crate) fn ttl(&self) -> Duration {
        self.settings.ttl
    }

    /// Whether a request from `pid` for `name` in `parent` is the canary's own lookup,
    /// which only fuser's path answers.
    pub(crate) fn is_canary_lookup(&self, parent: u64, name: &OsStr, pid: u32) -> bool {
        parent == ROOT_ID && self.canary.as_ref().is_some_and(|c| c.is_lookup(name, pid))
    }

    /// How long the kernel may remember that `name` in `parent` does not exist, when a
    /// LOOKUP finds nothing: as long as it keeps entries (names only appear through the
    /// union, which tells the kernel), except on volatile mounts (kept caches hide a
    /// poisoned mount's refusals) and for the canary's name (the injector must reach us).
    pub(crate) fn negative_ttl(&self, parent: u64, name: &OsStr) -> Option<Duration> {
        let canary = parent == ROOT_ID && self.canary.as_ref().is_some_and(|c| c.is_name(name));
        (self.settings.cache && !canary).then_some(self.settings.ttl)
    }

    /// LOOKUP (not of the canary): the entry's attributes and generation.
    pub(crate) fn lookup_entry(
        &self,
        parent: u64,
        name: &OsStr,
    ) -> Result<(FileAttr, Generation), Errno> {
        self.gate()?;
        let known = self.do_lookup(INodeNo(parent), name)?;
        Ok((known.attr, Generation(known.node.generation())))
    }

    /// GETATTR (not of the canary).
    pub(crate) fn getattr_of(&self, ino: u64) -> Result<FileAttr, Errno> {
        self.gate()?;
        self.node(INodeNo(ino)).and_then(|n| self.attr(&n))
    }

    /// FORGET: the kernel dropped `nlookup` references to node `ino`.
    pub(crate) fn forget_node(&self, ino: u64, nlookup: u64) {
        self.union.inodes.forget(ino, nlookup);
        let dead = std::mem::take(&mut *self.graveyard.lock());
        drop(dead);
    }

    pub(crate) fn unlink_entry(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.gate()?;
        let dir = self.node(INodeNo(parent))?;
        let removed = self.union.unlink(&dir, name).map_err(errno)?;
        let mut graveyard = self.graveyard.lock();
        graveyard.push(removed);
        if graveyard.len() >= GRAVEYARD_MAX {
            // No FORGET came to take them: let them go here rather than pile up.
            let dead = std::mem::take(&mut *graveyard);
            drop(graveyard);
            drop(dead);
        }
        Ok(())
    }

    pub(crate) fn rmdir_entry(&self, parent: u64, name: &OsStr) -> Result<(), Errno> {
        self.gate()?;
        let dir = self.node(INodeNo(parent))?;
        self.union.rmdir(&dir, name).map_err(errno)
    }

    /// RELEASE of file handle `fh` (not the canary's).
    pub(crate) fn release_file(&self, fh: u64) {
        let open = self.files.write().remove(&fh);
        if let Some(open) = open {
            self.passthrough.release(open.node.id, open.io);
            if open.writable && open.io != IoMode::Cached {
                self.health.note_writer_closed(&open.node);
            }
        }
    }

    /// READLINK of node `ino`: the symlink's target, as stored.
    pub(crate) fn read_link(&self, ino: u64) -> Result<Vec<u8>, Errno> {
        self.gate()?;
        let node = self.node(INodeNo(ino))?;
        sys::readlink_fd(node.state().obj.fd()?.as_fd()).map_err(errno)
    }

    /// READ of file handle `fh` (not the canary's), appended to `data`.
    pub(crate) fn read_file(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        data: &mut Vec<u8>,
    ) -> Result<(), Errno> {
        self.gate()?;
        let file = self.file(FileHandle(fh))?;
        sys::read_at_into(file.as_fd(), offset, size as usize, data).map_err(errno)
    }

    /// Whether READ of `size` bytes at `offset` of handle `fh` would wait for a disk: no
    /// page of the range is in the page cache. A range partly there counts as cached: it is
    /// a sequential reader's, whose pages the lower file's readahead has in flight, and
    /// treating those as cold made sequential reads slower. A range past the end of the
    /// file counts as cold. When the kernel cannot tell (no cachestat, a filesystem that
    /// refuses it), nothing does: letting go of the CPU for every READ made sequential reads
    /// slower.
    pub(crate) fn read_may_wait(&self, fh: u64, offset: u64, size: u32) -> bool {
        let Ok(file) = self.file(FileHandle(fh)) else {
            return false;
        };
        let page = sys::page_size();
        let first = offset / page;
        let end = (offset + u64::from(size)).div_ceil(page);
        sys::cachestat(file.as_fd(), first * page, (end - first) * page)
            .is_ok_and(|st| st.cached == 0)
    }

    /// OPEN of node `ino` (not the canary) with the open(2) `flags`.
    pub(crate) fn open_file_of(&self, ino: u64, flags: i32) -> Result<Opened, Errno> {
        self.gate()?;
        let node = self.node(INodeNo(ino))?;
        let (fh, io, upper) = if opens_for_writing(flags) {
            let file = self.open_for_write(&node, flags)?;
            let io = self.io_mode(&node, &file, true);
            (self.register_file(node, file, None, true, io), io, true)
        } else {
            let state = node.state();
            let real_flags = real_open_flags(flags);
            let file = state.obj.reopen(real_flags).map_err(errno)?;
            let upper = self.union.is_upper(&state);
            let follows = (!upper).then(|| LowerOpen {
                node: node.clone(),
                source: state.obj.clone(),
                flags: real_flags,
            });
            let io = self.io_mode(&node, &file, upper);
            (
                self.register_file(node, file, follows, false, io),
                io,
                upper,
            )
        };
        Ok(Opened {
            fh: FileHandle(fh),
            io,
            flags: self.open_reply_flags(io, upper),
        })
    }

    /// The open flags answering an open served in mode `io` (of an upper file if `upper`).
    fn open_reply_flags(&self, io: IoMode, upper: bool) -> FopenFlags {
        match io {
            IoMode::Cached => self.file_open_flags(upper),
            IoMode::Passthrough(_) => FopenFlags::FOPEN_NOFLUSH | FopenFlags::FOPEN_PASSTHROUGH,
        }
    }

    /// CREATE by the caller `uid`/`gid`: the new file, made and opened.
    pub(crate) fn create_file(
        &self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        flags: i32,
        uid: u32,
        gid: u32,
    ) -> Result<Created, Errno> {
        self.gate()?;
        let dir = self.node(INodeNo(parent))?;
        let (resolved, file) = self
            .union
            .create_open(
                &dir,
                name,
                mode,
                self.creator(uid, gid),
                real_open_flags(flags) & !libc::O_TRUNC,
            )
            .map_err(errno)?;
        let Known { attr, node } = self.remember(&dir, name, resolved)?;
        node.name_unsynced.store(true, Ordering::Release);
        node.no_file_caps.store(true, Ordering::Release);
        let generation = Generation(node.generation());
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let upper = self.union.stack.has_upper();
        let io = self.io_mode(&node, &file, upper);
        let fh = self.register_file(node, file, None, writable, io);
        let flags = self.open_reply_flags(io, upper);
        Ok(Created {
            attr,
            generation,
            open: Opened {
                fh: FileHandle(fh),
                io,
                flags,
            },
        })
    }

    /// SETATTR (not of the canary) by the caller `uid`/`gid`/`pid`: the attributes after.
    pub(crate) fn setattr_of(
        &self,
        ino: u64,
        set: &crate::wire::SetattrIn,
        uid: u32,
        gid: u32,
        pid: u32,
    ) -> Result<FileAttr, Errno> {
        self.gate()?;
        let node = self.node(INodeNo(ino))?;
        // Only the data up to the new size matters when truncating to zero.
        let with_data = set.size != Some(0);
        let ids = &self.settings.ids;
        let stored = |id: Option<u32>, map: &dyn Fn(u32) -> Option<u32>| match id {
            // An id no mapping covers cannot be stored, as in a user namespace.
            Some(id) => map(id).map(Some).ok_or(Errno::EINVAL),
            None => Ok(None),
        };
        let mut change = crate::attrs::Change {
            mode: set.mode,
            uid: stored(set.uid, &|id| ids.stored_uid(id))?,
            gid: stored(set.gid, &|id| ids.stored_gid(id))?,
            size: set.size,
            atime: set.atime.map(time_spec),
            mtime: set.mtime.map(time_spec),
        };
        // Decided on the object as it is, wherever it is: a refusal copies nothing up.
        let st = sys::stat_fd(node.state().obj.fd()?.as_fd()).map_err(errno)?;
        let caller = self.setid_caller(uid, gid, pid);
        let file = self.owner_of(&st);
        // With KILLPRIV_V2 the kernel no longer works out the mode that clears set-id
        // bits: a truncation, and the empty SETATTR a write sends before writing to a
        // set-id file, are ours to complete (chown clears them in the upper filesystem
        // itself). An empty SETATTR is also chown(-1, -1), which the kernel refuses to
        // a non-owner when it would clear a bit, unless the file is open for writing
        // (then it cannot be told from a write's request).
        if self.kills_privileges()
            && change.mode.is_none()
            && (change.size.is_some() || change.is_empty())
            && let Some(mode) = crate::attrs::setid_bits_dropped(
                &st,
                file,
                caller,
                if change.is_empty() {
                    crate::attrs::SetidLoss::Chown
                } else {
                    crate::attrs::SetidLoss::Modification
                },
            )
        {
            if change.is_empty()
                && caller.uid != file.uid
                && !caller.presumed_privileged
                && !self.open_for_writing(&node)
            {
                return Err(Errno::EPERM);
            }
            change.mode = Some(mode);
        }
        crate::attrs::kill_setgid(&mut change, &st, file, caller, || {
            self.open_for_writing(&node)
        })
        .map_err(errno)?;
        let state = self.copy_up(&node, with_data)?;
        let open = match set.fh {
            Some(fh) => self.file(fh).ok(),
            None => None,
        };
        crate::attrs::apply(state.obj.fd()?.as_fd(), open.as_deref(), &change).map_err(errno)?;
        self.attr(&node)
    }

    /// GETXATTR by the caller `uid`: the attribute's value.
    pub(crate) fn getxattr_of(&self, ino: u64, name: &OsStr, uid: u32) -> Result<Vec<u8>, Errno> {
        self.gate()?;
        let node = self.node(INodeNo(ino))?;
        if name.as_bytes() == b"security.capability" && node.no_file_caps.load(Ordering::Acquire) {
            return Err(Errno::NO_XATTR);
        }
        xattr::get(
            node.state().obj.fd()?.as_fd(),
            name,
            self.union.stack.xattr_prefix,
            Caller { uid },
        )
        .map_err(errno)?
        .ok_or(Errno::NO_XATTR)
    }

    /// Whether `fh` is a directory stream the kernel opened (volatile mounts open every
    /// directory; see `opendir`).
    pub(crate) fn is_open_dir(&self, fh: u64) -> bool {
        self.dirs.read().contains_key(&fh)
    }

    /// Answers a request that makes or finds an entry.
    fn reply_entry(&self, reply: ReplyEntry, found: Result<(FileAttr, Generation), Errno>) {
        match found {
            Ok((attr, generation)) => reply.entry(&self.settings.ttl, &attr, generation),
            Err(e) => reply.error(e),
        }
    }

    /// The owner a new object gets: the caller's ids as the layers store them (a caller
    /// outside every mapping creates overflow-owned objects, as in a user namespace).
    fn creator(&self, uid: u32, gid: u32) -> Creator {
        let ids = &self.settings.ids;
        Creator {
            uid: ids.stored_uid(uid).unwrap_or(crate::idmap::OVERFLOW_ID),
            gid: ids.stored_gid(gid).unwrap_or(crate::idmap::OVERFLOW_ID),
        }
    }

    fn caller(req: &Request) -> Caller {
        Caller { uid: req.uid() }
    }
}

impl fuser::Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // The kernel then stops asking for security.capability before every write(2) (one
        // GETXATTR round trip per write) and leaves clearing set-id bits to us: a WRITE
        // says when (FUSE_WRITE_KILL_SUIDGID); truncation is decided here (fuser does not
        // pass FATTR_KILL_SUIDGID on); chown clears them in the upper filesystem itself.
        let killpriv = config
            .add_capabilities(fuser::InitFlags::FUSE_HANDLE_KILLPRIV_V2)
            .is_ok();
        self.kills_privileges.store(killpriv, Ordering::Release);
        let limit = self.max_write_limit.load(Ordering::Acquire);
        if let Some(max_write) = (limit != 0).then_some(limit).or(self.settings.max_write)
            && let Err(nearest) = config.set_max_write(max_write)
        {
            let _ = config.set_max_write(nearest);
        }
        // READDIRPLUS: a listing brings each entry's attributes, so a walk that stats what it
        // lists (find, ls -l, git, python's imports) sends no LOOKUP per entry. AUTO lets
        // the kernel use it only for a directory's first chunk and where lookups follow.
        // Only where directories are not opened (see `opendir`).
        if self.settings.cache {
            let _ = config.add_capabilities(
                fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
            );
            // The kernel keeps each symlink's target: without it every path walked through
            // a symlink asks READLINK again (a merged-/usr root has them in most paths). A
            // node id only changes object under a new generation, which the kernel takes
            // for a new inode, so a kept target is never another object's.
            let _ = config.add_capabilities(fuser::InitFlags::FUSE_CACHE_SYMLINKS);
        }
        // Lookups and listings in one directory may run side by side (the kernel otherwise
        // serialises them per directory); the union takes its own locks.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS);
        // Passthrough needs a stacking depth of at least 1; exactly 1 keeps the union
        // usable as a layer of a kernel overlay, and refuses backing files on stacked
        // filesystems (those opens are then served through us).
        if self.passthrough.wanted()
            && config.set_max_stack_depth(1).is_ok()
            && config
                .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                .is_ok()
        {
            self.passthrough.agreed();
        } else {
            let _ = config.set_max_stack_depth(0);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        log::info!("filesystem released ({} nodes)", self.union.inodes.len());
        // On a fuseblk mount the kernel waits for this answer in umount: flush now, so
        // umount returns only once written data is on disk (the daemon reports the result).
        let _ = self.health.flush_at_unmount();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        if cmd != crate::health::SYNC_IOCTL {
            return reply.error(Errno::ENOTTY);
        }
        match self.health.sync_now() {
            Ok(()) => reply.ioctl(0, &[]),
            Err(e) => reply.error(Errno::from_i32(e)),
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.is_canary_lookup(parent.0, name, req.pid()) {
            // Never cached: the next lookup by anyone else must reach us and get ENOENT.
            return reply.entry(&Duration::ZERO, &self.canary_attr(req), Generation(0));
        }
        match self.lookup_entry(parent.0, name) {
            Ok((attr, generation)) => reply.entry(&self.settings.ttl, &attr, generation),
            Err(Errno::ENOENT) if let Some(ttl) = self.negative_ttl(parent.0, name) => {
                // Node id 0 (fuser sends `attr.ino`): a negative entry the kernel keeps.
                reply.entry(&ttl, &no_entry_attr(), Generation(0))
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.forget_node(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == CANARY_ID {
            return reply.attr(&Duration::ZERO, &self.canary_attr(req));
        }
        match self.getattr_of(ino.0) {
            Ok(attr) => reply.attr(&self.settings.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        if ino.0 == CANARY_ID {
            return reply.attr(&Duration::ZERO, &self.canary_attr(req));
        }
        let set = crate::wire::SetattrIn {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh,
        };
        match self.setattr_of(ino.0, &set, req.uid(), req.gid(), req.pid()) {
            Ok(attr) => reply.attr(&self.settings.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.read_link(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let what = if mode & libc::S_IFMT == libc::S_IFREG {
            NewObject::File
        } else {
            NewObject::Node { rdev: rdev as u64 }
        };
        let made = self.make_entry(parent.0, name, what, mode, req.uid(), req.gid());
        self.reply_entry(reply, made);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let made = self.mkdir_entry(parent.0, name, mode, req.uid(), req.gid());
        self.reply_entry(reply, made);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.unlink_entry(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.rmdir_entry(parent.0, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        let target = target.as_os_str();
        let made = self.symlink_entry(parent.0, link_name, target, req.uid(), req.gid());
        self.reply_entry(reply, made);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        match self.rename_entry(parent.0, name, newparent.0, newname, flags.bits()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.reply_entry(reply, self.link_entry(ino.0, newparent.0, newname));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == CANARY_ID {
            return reply.opened(FileHandle(CANARY_FH), FopenFlags::empty());
        }
        match self.open_file_of(ino.0, flags.0) {
            Ok(Opened {
                fh,
                io: IoMode::Cached,
                flags,
            }) => reply.opened(fh, flags),
            Ok(Opened {
                fh,
                io: IoMode::Passthrough(id),
                flags,
            }) => {
                // SAFETY: `id` is open on this connection and stays open until the release
                // of every open answered with it (`Passthrough::release`); `into_raw` keeps
                // fuser from closing it.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.opened_passthrough(fh, flags, &backing);
                let _ = backing.into_raw();
            }
            Err(e) => reply.error(e),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self.create_file(parent.0, name, mode, flags, req.uid(), req.gid()) {
            Ok(Created {
                attr,
                generation,
                open:
                    Opened {
                        fh,
                        io: IoMode::Cached,
                        flags,
                    },
            }) => reply.created(&self.settings.ttl, &attr, generation, fh, flags),
            Ok(Created {
                attr,
                generation,
                open:
                    Opened {
                        fh,
                        io: IoMode::Passthrough(id),
                        flags,
                    },
            }) => {
                // SAFETY: as in `open`.
                let backing = unsafe { reply.wrap_backing(id) };
                reply.created_passthrough(
                    &self.settings.ttl,
                    &attr,
                    generation,
                    fh,
                    flags,
                    &backing,
                );
                let _ = backing.into_raw();
            }
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if fh.0 == CANARY_FH {
            let len = CANARY_SIZE.saturating_sub(offset).min(u64::from(size));
            return reply.data(&vec![0u8; len as usize]);
        }
        let mut data = Vec::new();
        match self.read_file(fh.0, offset, size, &mut data) {
            Ok(()) => reply.data(&data),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if fh.0 == CANARY_FH {
            // The injection's writeback fails with the upper errno; anything else the
            // kernel writes back to the canary is accepted and dropped.
            return match self.canary.as_ref().and_then(|c| c.write_error()) {
                Some(e) => reply.error(Errno::from_i32(e)),
                None => reply.written(data.len() as u32),
            };
        }
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.open_file(fh).and_then(|open| {
            let f = self.file(fh)?;
            if self.kills_privileges() && write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID)
            {
                self.drop_setid_bits(req, f.as_fd(), crate::attrs::SetidLoss::UnprivilegedWrite)?;
            }
            let n = sys::write_at(f.as_fd(), offset, data).map_err(|e| self.upper_errno(e))?;
            self.health.note_written(&open.node);
            Ok(n)
        });
        match result {
            Ok(n) => reply.written(n as u32),
            Err(e) => reply.error(e),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 != CANARY_FH {
            self.release_file(fh.0);
        }
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        if fh.0 == CANARY_FH {
            return reply.ok();
        }
        match self.fsync_handle(fh, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        // Where the kernel may cache listings, it need not ask us to open a directory at
        // all: ENOSYS makes it stop sending OPENDIR and RELEASEDIR for the life of the mount
        // and keep every listing (FOPEN_CACHE_DIR and KEEP_CACHE) — a warm walk then costs
        // no request per directory. That is safe because every change to a listing goes
        // through the kernel, which then drops the cached one, and because offsets are
        // cookies that mean the same place in every snapshot (`readdir`), so a listing cached
        // by one reader and completed by another cannot repeat or skip a name.
        if self.settings.cache {
            return reply.error(Errno::ENOSYS);
        }
        let result = self.node(ino).and_then(|dir| {
            if !dir.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            let fh = self.handle();
            self.dirs
                .write()
                .insert(fh, Arc::new(Mutex::new(DirStream { entries: None })));
            Ok(fh)
        });
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let Some(stream) = self.dirs.read().get(&fh.0).cloned() else {
            return self.readdir_unopened_reply(ino, offset, reply);
        };
        let mut stream = stream.lock();
        if offset == 0 || stream.entries.is_none() {
            match self.node(ino).and_then(|dir| self.listing(&dir)) {
                Ok(entries) => stream.entries = Some(entries),
                Err(e) => return reply.error(e),
            }
        }
        let Some(entries) = stream.entries.as_deref() else {
            return reply.error(Errno::EIO);
        };
        fill_reply(&mut reply, entries, offset);
        reply.ok();
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: fuser::ReplyDirectoryPlus,
    ) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        // Asked for only where OPENDIR is not (see `init`): the listing is the unopened one.
        let ttl = self.settings.ttl;
        // Bare entries have d_ino 0 here (below), so every entry the kernel holds comes with
        // its attributes again.
        let result = self.readdirplus_unopened(ino.0, offset, false, |entry| match entry.attr {
            Some((attr, generation)) => {
                !reply.add(attr.ino, entry.cookie, entry.name, &ttl, attr, generation)
            }
            // fuser has no way to send node id 0 with a real d_ino: such an entry (one
            // whose lookup fails) is listed with d_ino 0 on plain fuse.
            None => {
                let mut attr = dot_attr(0);
                attr.kind = entry.kind;
                !reply.add(
                    INodeNo(0),
                    entry.cookie,
                    entry.name,
                    &ttl,
                    &attr,
                    Generation(0),
                )
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.dirs.write().remove(&fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Volatile: every fsync answers the poison's own errno.
        if let Some(e) = self.health.poisoned() {
            return reply.error(Errno::from_i32(e));
        }
        if !self.settings.flush {
            return reply.ok();
        }
        // A directory only in lower layers has nothing of ours to flush.
        let result = self.node(ino).and_then(|dir| {
            let state = dir.state();
            if !(self.union.stack.has_upper() && state.layer() == 0) {
                return Ok(());
            }
            let fd = state
                .obj
                .reopen(libc::O_RDONLY | libc::O_DIRECTORY)
                .map_err(errno)?;
            sys::sync_fd(fd.as_fd(), datasync).map_err(|e| self.upper_errno(e))?;
            self.sync_names(&dir)
                .map_or(Ok(()), |e| Err(Errno::from_i32(e)))
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        // Like the kernel overlay: the space figures are the top layer's (the upper, where
        // writes go, when there is one).
        match sys::statfs_fd(self.union.stack.layers[0].root.as_fd()) {
            Ok(st) => reply.statfs(
                st.f_blocks,
                st.f_bfree,
                st.f_bavail,
                st.f_files,
                st.f_ffree,
                st.f_bsize as u32,
                st.f_namemax as u32,
                st.f_frsize as u32,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.node(ino).and_then(|node| {
            xattr::check_settable(name, Core::caller(req)).map_err(errno)?;
            let state = self.copy_up(&node, true)?;
            // Before the attribute is there, so no GETXATTR after it answers from this.
            node.no_file_caps.store(false, Ordering::Release);
            xattr::set(
                state.obj.fd()?.as_fd(),
                name,
                value,
                flags,
                self.union.stack.xattr_prefix,
            )
            .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        match self.getxattr_of(ino.0, name, req.uid()) {
            Ok(value) => reply_sized(reply, size, &value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.node(ino).and_then(|node| {
            xattr::list(
                node.state().obj.fd()?.as_fd(),
                self.union.stack.xattr_prefix,
                Core::caller(req),
            )
            .map_err(errno)
        });
        match result {
            Ok(names) => reply_sized(reply, size, &xattr::encode_names(&names)),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.node(ino).and_then(|node| {
            xattr::check_settable(name, Core::caller(req)).map_err(errno)?;
            // Removing what is not there must not copy anything up.
            xattr::get(
                node.state().obj.fd()?.as_fd(),
                name,
                self.union.stack.xattr_prefix,
                Core::caller(req),
            )
            .map_err(errno)?
            .ok_or(Errno::NO_XATTR)?;
            let state = self.copy_up(&node, true)?;
            xattr::remove(state.obj.fd()?.as_fd(), name, self.union.stack.xattr_prefix)
                .map_err(errno)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.node(ino).and_then(|node| {
            let st = sys::stat_fd(node.state().obj.fd()?.as_fd()).map_err(errno)?;
            if mask.contains(AccessFlags::W_OK) && !self.union.stack.has_upper() {
                return Err(Errno::EROFS);
            }
            check_access(&st, req.uid(), req.gid(), mask)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn fallocate(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.file(fh).and_then(|f| {
            // Changing a file's data or size clears its set-id bits, as a write does.
            if self.kills_privileges() {
                self.drop_setid_bits(req, f.as_fd(), crate::attrs::SetidLoss::Modification)?;
            }
            // SAFETY: valid fd.
            let ret = unsafe {
                libc::fallocate(
                    sys::raw(&*f),
                    mode,
                    offset as libc::off_t,
                    length as libc::off_t,
                )
            };
            if ret == 0 {
                Ok(())
            } else {
                Err(self.upper_errno(io::Error::last_os_error()))
            }
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        flags: fuser::CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        if let Err(e) = self.gate() {
            return reply.error(e);
        }
        let result = self.file(fh_in).and_then(|input| {
            let output = self.file(fh_out)?;
            if self.kills_privileges() {
                self.drop_setid_bits(req, output.as_fd(), crate::attrs::SetidLoss::Modification)?;
            }
            let mut off_in = offset_in as libc::off64_t;
            let mut off_out = offset_out as libc::off64_t;
            // SAFETY: valid fds and offset pointers.
            let n = unsafe {
                libc::copy_file_range(
                    sys::raw(&*input),
                    &mut off_in,
                    sys::raw(&*output),
                    &mut off_out,
                    len as usize,
                    flags.bits() as libc::c_uint,
                )
            };
            if n < 0 {
                Err(self.upper_errno(io::Error::last_os_error()))
            } else {
                if let Ok(open) = self.open_file(fh_out) {
                    self.health.note_written(&open.node);
                }
                Ok(n as u32)
            }
        });
        match result {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }
}

/// Whether an open with open(2) `flags` writes to the file (and so needs it in the upper
/// layer).
fn opens_for_writing(flags: i32) -> bool {
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// Flags for opening the real file behind an open request: creation is handled by the union,
/// `O_NOCTTY`/`O_CLOEXEC` concern the caller's descriptor, not ours, and `O_NOFOLLOW` was
/// already applied by the kernel to the caller's path (on ours, the /proc magic link, it
/// would fail with ELOOP).
fn real_open_flags(flags: i32) -> i32 {
    flags & !(libc::O_CREAT | libc::O_EXCL | libc::O_NOCTTY | libc::O_CLOEXEC | libc::O_NOFOLLOW)
}

fn time_spec(t: TimeOrNow) -> libc::timespec {
    match t {
        TimeOrNow::Now => libc::timespec {
            tv_sec: 0,
            tv_nsec: libc::UTIME_NOW,
        },
        TimeOrNow::SpecificTime(t) => match t.duration_since(UNIX_EPOCH) {
            Ok(d) => libc::timespec {
                tv_sec: d.as_secs() as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            },
            Err(before) => {
                let d = before.duration();
                let (sec, nsec) = if d.subsec_nanos() == 0 {
                    (-(d.as_secs() as i64), 0)
                } else {
                    (
                        -(d.as_secs() as i64) - 1,
                        1_000_000_000 - d.subsec_nanos() as i64,
                    )
                };
                libc::timespec {
                    tv_sec: sec as libc::time_t,
                    tv_nsec: nsec as libc::c_long,
                }
            }
        },
    }
}

/// getxattr/listxattr protocol: size 0 asks for the length; a too-small buffer is ERANGE.
fn reply_sized(reply: ReplyXattr, size: u32, data: &[u8]) {
    if size == 0 {
        reply.size(data.len() as u32);
    } else if data.len() > size as usize {
        reply.error(Errno::ERANGE);
    } else {
        reply.data(data);
    }
}

/// The classic owner/group/other check, used only when the mount runs without
/// `default_permissions` (otherwise the kernel checks and never sends ACCESS).
fn check_access(st: &libc::stat, uid: u32, gid: u32, mask: AccessFlags) -> Result<(), Errno> {
    let mode = st.st_mode;
    let want = mask.bits() & 0o7;
    if want == 0 {
        return Ok(());
    }
    if uid == 0 {
        // Root may do anything but execute a file nobody may execute.
        let any_x = mode & 0o111 != 0 || mode & libc::S_IFMT == libc::S_IFDIR;
        return if want & libc::X_OK != 0 && !any_x {
            Err(Errno::EACCES)
        } else {
            Ok(())
        };
    }
    let bits = if st.st_uid == uid {
        (mode >> 6) & 0o7
    } else if st.st_gid == gid {
        (mode >> 3) & 0o7
    } else {
        mode & 0o7
    };
    if bits as i32 & want == want {
        Ok(())
    } else {
        Err(Errno::EACCES)
    }
}
