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

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow, WriteFlags,
};
use parking_lot::{Mutex, RwLock};

use crate::inodes::{InodeTable, Node, ROOT_ID};
use crate::layers::LayerStack;
use crate::lookup::{self, LayerDir, Resolved};
use crate::readdir;
use crate::sys;
use crate::xattr::{self, Caller};

/// Settings the adapter needs from the mount configuration.
#[derive(Debug, Clone)]
pub struct FsSettings {
    /// How long the kernel may cache entries and attributes.
    pub ttl: Duration,
    /// Largest WRITE the transport can carry, when something smaller than fuser's default
    /// bounds it (the relay's socket buffers do).
    pub max_write: Option<u32>,
}

struct DirStream {
    /// Snapshot of the merged listing; taken at opendir and again when a reader that has
    /// already been served rewinds to offset 0 (rewinddir must show changes).
    entries: Vec<readdir::Entry>,
    served: bool,
}

/// The union filesystem as fuser sees it.
pub struct OverlayFs {
    stack: LayerStack,
    inodes: InodeTable,
    files: RwLock<HashMap<u64, Arc<OwnedFd>>>,
    dirs: RwLock<HashMap<u64, Arc<Mutex<DirStream>>>>,
    next_handle: AtomicU64,
    settings: FsSettings,
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

impl OverlayFs {
    /// Builds the union over `stack`; fails if the root cannot be read from the layers.
    pub fn new(stack: LayerStack, settings: FsSettings) -> io::Result<OverlayFs> {
        let root = root_of(&stack)?;
        Ok(OverlayFs {
            inodes: InodeTable::new(root),
            stack,
            files: RwLock::new(HashMap::new()),
            dirs: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            settings,
        })
    }

    fn node(&self, ino: INodeNo) -> Result<Arc<Node>, Errno> {
        self.inodes.get(ino.0).ok_or(Errno::ESTALE)
    }

    fn attr(&self, node: &Node) -> Result<FileAttr, Errno> {
        let st = sys::stat_fd(node.fd.as_fd()).map_err(errno)?;
        // Like the kernel overlay: the link count of a merged directory cannot be known
        // without counting subdirectories in every layer; 1 tells `find` not to rely on it.
        let nlink = if node.merged.len() > 1 {
            1
        } else {
            st.st_nlink as u32
        };
        Ok(FileAttr {
            ino: INodeNo(node.ino),
            size: st.st_size as u64,
            blocks: st.st_blocks as u64,
            atime: time(st.st_atime, st.st_atime_nsec),
            mtime: time(st.st_mtime, st.st_mtime_nsec),
            ctime: time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(st.st_mode),
            perm: (st.st_mode & 0o7777) as u16,
            nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev as u32,
            blksize: st.st_blksize as u32,
            flags: 0,
        })
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

    fn do_lookup(&self, parent: INodeNo, name: &OsStr) -> Result<FileAttr, Errno> {
        let dir = self.node(parent)?;
        if !dir.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        let resolved = lookup::resolve(&self.stack, &dir.merged, name)
            .map_err(errno)?
            .ok_or(Errno::ENOENT)?;
        let node = self.inodes.lookup(dir.id, resolved);
        match self.entry_attr(&node) {
            Ok(attr) => Ok(attr),
            Err(e) => {
                self.inodes.forget(node.id, 1);
                Err(e)
            }
        }
    }

    fn listing(&self, dir: &Node) -> Result<Vec<readdir::Entry>, Errno> {
        let parent_ino = self
            .inodes
            .get(dir.parent)
            .map(|p| p.ino)
            .unwrap_or(dir.ino);
        readdir::list(&self.stack, &self.inodes, dir, parent_ino).map_err(errno)
    }

    fn caller(req: &Request) -> Caller {
        Caller { uid: req.uid() }
    }

    /// Writes are not implemented yet (the write path lands with copy-up); a read-only union
    /// answers EROFS like a read-only mount would, rather than a confusing ENOSYS.
    fn refuse_write(&self, what: &str) -> Errno {
        log::debug!("{what}: refused, the union is read-only");
        Errno::EROFS
    }
}

fn root_of(stack: &LayerStack) -> io::Result<Resolved> {
    let mut merged = Vec::new();
    for (i, layer) in stack.layers.iter().enumerate() {
        let fd = layer.root.try_clone()?;
        let opaque = crate::whiteout::is_opaque(fd.as_fd(), stack.xattr_prefix)?;
        merged.push(LayerDir {
            layer: i as u16,
            fd,
        });
        if opaque {
            break;
        }
    }
    let top = &stack.layers[0];
    Ok(Resolved {
        layer: 0,
        fd: top.root.try_clone()?,
        stat: sys::stat_fd(top.root.as_fd())?,
        merged,
    })
}

impl fuser::Filesystem for OverlayFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        if let Some(max_write) = self.settings.max_write
            && let Err(nearest) = config.set_max_write(max_write)
        {
            let _ = config.set_max_write(nearest);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        log::info!("filesystem released ({} nodes)", self.inodes.len());
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.do_lookup(parent, name) {
            Ok(attr) => reply.entry(&self.settings.ttl, &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.inodes.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.node(ino).and_then(|n| self.attr(&n)) {
            Ok(attr) => reply.attr(&self.settings.ttl, &attr),
            Err(e) => reply.error(e),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self
            .node(ino)
            .and_then(|n| sys::readlink_fd(n.fd.as_fd()).map_err(errno))
        {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = (|| {
            if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
                return Err(self.refuse_write("open for writing"));
            }
            let node = self.node(ino)?;
            let file = sys::reopen(node.fd.as_fd(), libc::O_RDONLY).map_err(errno)?;
            let fh = self.handle();
            self.files.write().insert(fh, Arc::new(file));
            Ok(fh)
        })();
        match result {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
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
        let Some(file) = self.files.read().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        match sys::read_at(file.as_fd(), offset, size as usize) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
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
        self.files.write().remove(&fh.0);
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
        let Some(file) = self.files.read().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        // SAFETY: valid fd.
        let ret = unsafe {
            if datasync {
                libc::fdatasync(sys::raw(&*file))
            } else {
                libc::fsync(sys::raw(&*file))
            }
        };
        if ret == 0 {
            reply.ok()
        } else {
            reply.error(errno(io::Error::last_os_error()))
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.node(ino).and_then(|dir| {
            if !dir.is_dir() {
                return Err(Errno::ENOTDIR);
            }
            let entries = self.listing(&dir)?;
            let fh = self.handle();
            self.dirs.write().insert(
                fh,
                Arc::new(Mutex::new(DirStream {
                    entries,
                    served: false,
                })),
            );
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
        let Some(stream) = self.dirs.read().get(&fh.0).cloned() else {
            return reply.error(Errno::EBADF);
        };
        let mut stream = stream.lock();
        if offset == 0 && stream.served {
            match self.node(ino).and_then(|dir| self.listing(&dir)) {
                Ok(entries) => stream.entries = entries,
                Err(e) => return reply.error(e),
            }
        }
        stream.served = true;
        // Offset of entry i is i + 1: the position to continue after it, stable for the
        // life of the snapshot, which is what telldir/seekdir hand back to us.
        for (i, entry) in stream.entries.iter().enumerate().skip(offset as usize) {
            if reply.add(
                INodeNo(entry.ino),
                (i + 1) as u64,
                file_type(entry.file_type),
                &entry.name,
            ) {
                break;
            }
        }
        reply.ok();
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
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Nothing of a directory can be dirty while the union is read-only.
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // Like the kernel overlay: the space figures are the top layer's (the upper, where
        // writes go, when there is one).
        match sys::statfs_fd(self.stack.layers[0].root.as_fd()) {
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

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let result = self.node(ino).and_then(|node| {
            xattr::get(
                node.fd.as_fd(),
                name,
                self.stack.xattr_prefix,
                Self::caller(req),
            )
            .map_err(errno)?
            .ok_or(Errno::NO_XATTR)
        });
        match result {
            Ok(value) => reply_sized(reply, size, &value),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let result = self.node(ino).and_then(|node| {
            xattr::list(node.fd.as_fd(), self.stack.xattr_prefix, Self::caller(req)).map_err(errno)
        });
        match result {
            Ok(names) => reply_sized(reply, size, &xattr::encode_names(&names)),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        let result = self.node(ino).and_then(|node| {
            let st = sys::stat_fd(node.fd.as_fd()).map_err(errno)?;
            if mask.contains(AccessFlags::W_OK) {
                return Err(self.refuse_write("access(W_OK)"));
            }
            check_access(&st, req.uid(), req.gid(), mask)
        });
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(self.refuse_write("setattr"));
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("mknod"));
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("mkdir"));
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write("unlink"));
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write("rmdir"));
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("symlink"));
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_write("rename"));
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(self.refuse_write("link"));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(self.refuse_write("write"));
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        reply.error(self.refuse_write("create"));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_write("setxattr"));
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(self.refuse_write("removexattr"));
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(self.refuse_write("fallocate"));
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
