//! `EioServer`: a tiny in-process FUSE file server (fuser) serving one regular file, an
//! in-memory disk image, whose writes can be made to fail with EIO on demand.
//!
//! The image is a sparse map of 4 KiB blocks: a block is *present* once something wrote it
//! (reads of absent blocks return zeros) and absent again after a hole punch
//! (`fallocate(PUNCH_HOLE)`, what a loop device turns a discard into).  While the switch
//! ([`EioServer::set_failing`]) is on, a write that touches any absent block fails with EIO
//! as a whole (nothing of it is stored), while writes that only touch present blocks
//! succeed: the EIO twin of a tmpfs shrunk to its used size, where writes into holes fail
//! with ENOSPC.
//!
//! The file is opened with `FOPEN_DIRECT_IO`: no FUSE page cache, so every write of the loop
//! device on top is a synchronous FUSE_WRITE whose error goes straight back to the loop
//! driver (and no third copy of the image in the page cache).
//!
//! The server is mounted with `mount(2)` directly (type `fuse.ovlfuse-eio-rig`) on a
//! directory of the caller and runs the fuser session loop on one thread of this process.
//! [`EioServer::stop`] (also on Drop) unmounts it and joins the thread; if the image is still
//! in use (a loop device that has not gone away yet) the mount is detached lazily and the
//! connection aborted through fusectl, which also ends the thread.

use std::collections::HashMap;
use std::ffi::{CString, OsStr};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, Session, SessionACL, WriteFlags,
};

/// Block size of the image map (and `f_bsize` of the mount: the loop driver uses it as its
/// discard granularity).
pub const BLOCK: u64 = 4096;
/// The file's inode number (the root directory is 1).
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(1);
/// How long `stop` waits for the session thread to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Filesystem type as /proc/mounts shows it.
pub const FSTYPE: &str = "fuse.ovlfuse-eio-rig";

type Block = Box<[u8; BLOCK as usize]>;

/// What the server thread and the owner share.
struct Shared {
    size: u64,
    blocks: Mutex<HashMap<u64, Block>>,
    failing: AtomicBool,
    failed_writes: AtomicU64,
    /// kernel thread ids: the thread running the session, the one answering requests
    session_tid: AtomicI32,
    serve_tid: AtomicI32,
}

impl Shared {
    fn note_server_thread(&self) {
        if self.serve_tid.load(Ordering::Relaxed) == 0 {
            self.serve_tid
                .store(unsafe { libc::gettid() }, Ordering::SeqCst);
        }
    }
}

struct ImageFs {
    name: CString,
    shared: Arc<Shared>,
    start: SystemTime,
}

impl ImageFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink, blocks) = if ino == FILE_INO {
            let present = self.shared.blocks.lock().unwrap().len() as u64;
            (
                FileType::RegularFile,
                0o600,
                self.shared.size,
                1,
                present * (BLOCK / 512),
            )
        } else {
            (FileType::Directory, 0o700, 0, 2, 0)
        };
        FileAttr {
            ino,
            size,
            blocks,
            atime: self.start,
            mtime: self.start,
            ctime: self.start,
            crtime: self.start,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK as u32,
            flags: 0,
        }
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= self.shared.size)
            .ok_or(Errno::EFBIG)?;
        if data.is_empty() {
            return Ok(());
        }
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut map = self.shared.blocks.lock().unwrap();
        if self.shared.failing.load(Ordering::SeqCst)
            && (first..=last).any(|b| !map.contains_key(&b))
        {
            self.shared.failed_writes.fetch_add(1, Ordering::SeqCst);
            return Err(Errno::EIO);
        }
        let mut pos = offset;
        let mut src = data;
        while !src.is_empty() {
            let (b, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = src.len().min(BLOCK as usize - within);
            let blk = map
                .entry(b)
                .or_insert_with(|| Box::new([0u8; BLOCK as usize]));
            blk[within..within + n].copy_from_slice(&src[..n]);
            pos += n as u64;
            src = &src[n..];
        }
        Ok(())
    }

    fn read_at(&self, offset: u64, size: u32) -> Vec<u8> {
        let end = offset.saturating_add(size as u64).min(self.shared.size);
        if offset >= end {
            return Vec::new();
        }
        let mut out = vec![0u8; (end - offset) as usize];
        let map = self.shared.blocks.lock().unwrap();
        let mut pos = offset;
        let mut done = 0;
        while pos < end {
            let (b, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = ((end - pos) as usize).min(BLOCK as usize - within);
            if let Some(blk) = map.get(&b) {
                out[done..done + n].copy_from_slice(&blk[within..within + n]);
            }
            pos += n as u64;
            done += n;
        }
        out
    }

    /// Whole blocks in the range become absent; partly covered blocks are zeroed in the range.
    fn punch_hole(&self, offset: u64, length: u64) {
        let end = offset.saturating_add(length).min(self.shared.size);
        let mut map = self.shared.blocks.lock().unwrap();
        let mut pos = offset;
        while pos < end {
            let (b, within) = (pos / BLOCK, (pos % BLOCK) as usize);
            let n = ((end - pos) as usize).min(BLOCK as usize - within);
            if n == BLOCK as usize {
                map.remove(&b);
            } else if let Some(blk) = map.get_mut(&b) {
                blk[within..within + n].fill(0);
            }
            pos += n as u64;
        }
    }
}

impl Filesystem for ImageFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.shared.note_server_thread();
        if parent == INodeNo::ROOT && name.as_bytes() == self.name.as_bytes() {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.shared.note_server_thread();
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino == FILE_INO {
            reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
        } else {
            reply.error(Errno::EISDIR);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply.data(&self.read_at(offset, size));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.write_at(offset, data) {
            Ok(()) => reply.written(data.len() as u32),
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

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        // A loop device discards with PUNCH_HOLE|KEEP_SIZE; anything else (ZERO_RANGE for
        // write-zeroes, plain preallocation) is refused per call, so callers fall back to
        // writing (EOPNOTSUPP, unlike ENOSYS, does not disable fallocate for good).
        if mode == libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE {
            self.punch_hole(offset, length);
            reply.ok();
        } else {
            reply.error(Errno::EOPNOTSUPP);
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            reply.error(Errno::ENOTDIR);
            return;
        }
        let name = OsStr::from_bytes(self.name.as_bytes());
        let entries = [
            (INodeNo::ROOT, FileType::Directory, OsStr::new(".")),
            (INodeNo::ROOT, FileType::Directory, OsStr::new("..")),
            (FILE_INO, FileType::RegularFile, name),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // blocks - bfree = the bytes the image holds, as on a tmpfs
        let total = self.shared.size / BLOCK;
        let used = self.shared.blocks.lock().unwrap().len() as u64;
        let free = total.saturating_sub(used);
        reply.statfs(total, free, free, 2, 0, BLOCK as u32, 255, BLOCK as u32);
    }
}

/// See the module documentation.
pub struct EioServer {
    mnt: PathBuf,
    image: PathBuf,
    shared: Arc<Shared>,
    /// the connection's name in fusectl: the kernel's dev_t of the mount
    conn: u64,
    mounted: bool,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl EioServer {
    /// Mounts a server on the (empty) directory `mnt` serving one file `name` of `size`
    /// bytes (a multiple of [`BLOCK`]), all zeros and absent.
    pub fn start(mnt: &Path, name: &str, size: u64) -> io::Result<EioServer> {
        assert!(
            size.is_multiple_of(BLOCK),
            "image size must be a multiple of {BLOCK}"
        );
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        let fd: OwnedFd = dev.into();
        let src = CString::new("ovlfuse-eio-rig").unwrap();
        let fstype = CString::new(FSTYPE).unwrap();
        let data = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0",
            std::os::fd::AsRawFd::as_raw_fd(&fd)
        ))
        .unwrap();
        let target = super::super::cstr(mnt);
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                data.as_ptr() as *const libc::c_void,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let shared = Arc::new(Shared {
            size,
            blocks: Mutex::new(HashMap::new()),
            failing: AtomicBool::new(false),
            failed_writes: AtomicU64::new(0),
            session_tid: AtomicI32::new(0),
            serve_tid: AtomicI32::new(0),
        });
        let fs = ImageFs {
            name: CString::new(name).unwrap(),
            shared: shared.clone(),
            start: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| UNIX_EPOCH + Duration::from_secs(d.as_secs()))
                .unwrap_or(UNIX_EPOCH),
        };
        let mut server = EioServer {
            mnt: mnt.to_path_buf(),
            image: mnt.join(name),
            shared,
            conn: 0,
            mounted: true,
            thread: None,
        };
        // From here on a failure drops `server`, which unmounts (and joins nothing yet).
        // The kernel queued FUSE_INIT at mount time: the handshake answers it.
        let session = Session::from_fd(fs, fd, SessionACL::Owner, Config::default())?;
        let sh = server.shared.clone();
        server.thread = Some(thread::Builder::new().name("eio-rig-fuse".into()).spawn(
            move || {
                sh.session_tid
                    .store(unsafe { libc::gettid() }, Ordering::SeqCst);
                // run() answers requests on a thread of its own and joins it
                session.run()
            },
        )?);
        let md = fs::metadata(&server.mnt)?;
        // fusectl names a connection by the kernel's dev_t (major << 20 | minor)
        server.conn = ((libc::major(md.dev()) as u64) << 20) | libc::minor(md.dev()) as u64;
        if libc::major(md.dev()) != 0 {
            return Err(io::Error::other(format!(
                "{} is not a FUSE mount (st_dev {:#x})",
                server.mnt.display(),
                md.dev()
            )));
        }
        Ok(server)
    }

    /// The served file.
    pub fn image(&self) -> &Path {
        &self.image
    }

    /// While on, writes touching an absent block fail with EIO.
    pub fn set_failing(&self, on: bool) {
        self.shared.failing.store(on, Ordering::SeqCst);
    }

    pub fn is_failing(&self) -> bool {
        self.shared.failing.load(Ordering::SeqCst)
    }

    /// Writes answered with EIO so far.
    pub fn failed_writes(&self) -> u64 {
        self.shared.failed_writes.load(Ordering::SeqCst)
    }

    /// Bytes of the image that are present (written and not punched out).
    pub fn used_bytes(&self) -> u64 {
        self.shared.blocks.lock().unwrap().len() as u64 * BLOCK
    }

    /// Kernel thread ids of the server's threads (running the session, answering requests;
    /// 0 while not known yet), e.g. to check `/proc/self/task/<tid>` is gone after `stop`.
    pub fn thread_ids(&self) -> Vec<i32> {
        [&self.shared.session_tid, &self.shared.serve_tid]
            .iter()
            .map(|t| t.load(Ordering::SeqCst))
            .filter(|t| *t != 0)
            .collect()
    }

    /// The session thread is still running.
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Aborts the FUSE connection through fusectl (mounted for the purpose next to `mnt`):
    /// every pending and future request fails, the session thread's read returns ENODEV.
    fn abort_connection(&self) {
        let ctl = self.mnt.with_extension("fusectl");
        let _ = fs::create_dir(&ctl);
        let c = super::super::cstr(&ctl);
        let (src, ty) = (
            CString::new("fusectl").unwrap(),
            CString::new("fusectl").unwrap(),
        );
        let mounted =
            unsafe { libc::mount(src.as_ptr(), c.as_ptr(), ty.as_ptr(), 0, std::ptr::null()) } == 0;
        if !mounted {
            eprintln!(
                "[eio-server] mount fusectl on {}: {}",
                ctl.display(),
                io::Error::last_os_error()
            );
        } else {
            let abort = ctl.join(format!("{}/abort", self.conn));
            if let Err(e) = fs::write(&abort, "1") {
                eprintln!("[eio-server] write {}: {e}", abort.display());
            }
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
        let _ = fs::remove_dir(&ctl);
    }

    /// Unmounts and joins the session thread (idempotent, never panics).  If the image is
    /// still busy the mount is detached lazily and the connection aborted.
    pub fn stop(&mut self) {
        self.shared.failing.store(false, Ordering::SeqCst);
        if self.mounted {
            self.mounted = false;
            let c = super::super::cstr(&self.mnt);
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                let e = io::Error::last_os_error();
                eprintln!(
                    "[eio-server] umount {} failed ({e}): detaching lazily and aborting the \
                     connection",
                    self.mnt.display()
                );
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                if self.thread.is_some() {
                    self.abort_connection();
                }
            }
        }
        if let Some(t) = self.thread.take() {
            // the session ends as soon as the kernel ends the connection; never hang a test
            // run on it
            let deadline = Instant::now() + JOIN_TIMEOUT;
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if !t.is_finished() {
                eprintln!(
                    "[eio-server] session thread of {} still running after {JOIN_TIMEOUT:?}: \
                     left behind",
                    self.mnt.display()
                );
                return;
            }
            match t.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => eprintln!("[eio-server] session ended with {e}"),
                Err(_) => eprintln!("[eio-server] session thread panicked"),
            }
        }
    }
}

impl Drop for EioServer {
    fn drop(&mut self) {
        self.stop();
    }
}
