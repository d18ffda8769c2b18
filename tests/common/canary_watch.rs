//! Watching what a daemon touches outside the directories it was given.
//!
//! Two independent witnesses, both attributing every access to a process:
//!
//! - [`Tripwire`]: a tiny read-only FUSE filesystem (type `fuse.ovlfuse-tripwire`) served by
//!   a thread of the test process. Every request that reaches it — LOOKUP and GETATTR
//!   included, so even a `stat` or an `O_PATH` walk through it — is logged with the kernel
//!   thread id that made it, resolved at once to its process and that process's executable.
//!   Entries and attributes are never cached (TTL 0), so every path walk into it is seen.
//!   Mutations are answered EROFS (after being logged), so a caller that follows a symlink
//!   into it can never change it.
//! - [`FsWatch`]: a fanotify group with a `FAN_MARK_FILESYSTEM` mark (FID mode, directory
//!   handle + name) on a whole disk filesystem: every open, read, write, close, create,
//!   delete, rename and attribute change on that filesystem, by any process, with the pid
//!   (tgid) that caused it. Events of the pids being tracked are resolved to paths, so a test
//!   can list what a daemon touched outside the directories it may use.
//!
//! Neither sees accesses the kernel makes in the caller's context on its behalf as the
//! daemon's: a caller that follows a symlink shown by the union reaches the target itself,
//! with its own pid.
#![allow(dead_code)]

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fuser::{
    AccessFlags, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr,
    Request, Session, SessionACL, TimeOrNow, WriteFlags,
};

/// The process (thread group) a kernel thread id belongs to, from `/proc/<tid>/status`.
fn tgid_of(tid: i32) -> Option<i32> {
    let s = fs::read_to_string(format!("/proc/{tid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Tgid:"))
        .and_then(|v| v.trim().parse().ok())
}

fn exe_of(pid: i32) -> Option<PathBuf> {
    fs::read_link(format!("/proc/{pid}/exe")).ok()
}

// ---------------------------------------------------------------------------
// Tripwire: a FUSE filesystem that logs who touches it
// ---------------------------------------------------------------------------

/// Filesystem type as /proc/mounts shows it.
pub const TRIPWIRE_FSTYPE: &str = "fuse.ovlfuse-tripwire";
/// Content of every file the tripwire serves.
pub const TRIPWIRE_DATA: &[u8] = b"tripwire: outside the layers\n";
/// The one extended attribute every tripwire object has, and its value.
pub const TRIPWIRE_XATTR: (&str, &[u8]) = ("user.tripwire", b"outside");

/// One request that reached the tripwire.
#[derive(Debug, Clone)]
pub struct Touch {
    /// Order of arrival, from 0.
    pub seq: usize,
    /// Kernel thread id in the request header (FUSE sends the thread's id).
    pub tid: i32,
    /// Its process, if it could still be resolved when the request arrived.
    pub pid: Option<i32>,
    pub exe: Option<PathBuf>,
    /// "LOOKUP 1/dir", "OPEN 2", ...
    pub op: String,
}

impl std::fmt::Display for Touch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "#{} {} by tid {} (pid {:?}, exe {:?})",
            self.seq, self.op, self.tid, self.pid, self.exe
        )
    }
}

/// The tree the tripwire serves: `secret` (file), `dir/` with `inner` (file), `cwd/` with
/// `here` (file).
struct Node {
    ino: u64,
    parent: u64,
    name: &'static str,
    dir: bool,
}

const TREE: &[Node] = &[
    Node {
        ino: 1,
        parent: 1,
        name: "",
        dir: true,
    },
    Node {
        ino: 2,
        parent: 1,
        name: "secret",
        dir: false,
    },
    Node {
        ino: 3,
        parent: 1,
        name: "dir",
        dir: true,
    },
    Node {
        ino: 4,
        parent: 3,
        name: "inner",
        dir: false,
    },
    Node {
        ino: 5,
        parent: 1,
        name: "cwd",
        dir: true,
    },
    Node {
        ino: 6,
        parent: 5,
        name: "here",
        dir: false,
    },
];

fn node(ino: INodeNo) -> Option<&'static Node> {
    TREE.iter().find(|n| n.ino == ino.0)
}

struct TripShared {
    log: Mutex<Vec<Touch>>,
    start: SystemTime,
}

struct TripFs {
    shared: Arc<TripShared>,
}

const ZERO: Duration = Duration::ZERO;

impl TripFs {
    fn note(&self, req: &Request, op: String) {
        let tid = req.pid() as i32;
        let pid = tgid_of(tid);
        let exe = pid.and_then(exe_of);
        let mut log = self.shared.log.lock().unwrap();
        let seq = log.len();
        log.push(Touch {
            seq,
            tid,
            pid,
            exe,
            op,
        });
    }

    fn attr(&self, n: &Node) -> FileAttr {
        FileAttr {
            ino: INodeNo(n.ino),
            size: if n.dir { 0 } else { TRIPWIRE_DATA.len() as u64 },
            blocks: 1,
            atime: self.shared.start,
            mtime: self.shared.start,
            ctime: self.shared.start,
            crtime: self.shared.start,
            kind: if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if n.dir { 0o755 } else { 0o644 },
            nlink: if n.dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }
}

fn show(name: &OsStr) -> String {
    format!("{:?}", name.to_string_lossy())
}

impl Filesystem for TripFs {
    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.note(req, format!("LOOKUP {}/{}", parent.0, show(name)));
        match TREE
            .iter()
            .find(|n| n.ino != 1 && n.parent == parent.0 && OsStr::new(n.name) == name)
        {
            Some(n) => reply.entry(&ZERO, &self.attr(n), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.note(req, format!("GETATTR {}", ino.0));
        match node(ino) {
            Some(n) => reply.attr(&ZERO, &self.attr(n)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
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
        self.note(
            req,
            format!("SETATTR {} mode={mode:?} uid={uid:?} size={size:?}", ino.0),
        );
        reply.error(Errno::EROFS);
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        self.note(req, format!("READLINK {}", ino.0));
        reply.error(Errno::EINVAL);
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        self.note(req, format!("MKNOD {}/{}", parent.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        self.note(req, format!("MKDIR {}/{}", parent.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.note(req, format!("UNLINK {}/{}", parent.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.note(req, format!("RMDIR {}/{}", parent.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        _target: &Path,
        reply: ReplyEntry,
    ) {
        self.note(req, format!("SYMLINK {}/{}", parent.0, show(link_name)));
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        _flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.note(
            req,
            format!(
                "RENAME {}/{} {}/{}",
                parent.0,
                show(name),
                newparent.0,
                show(newname)
            ),
        );
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.note(
            req,
            format!("LINK {} {}/{}", ino.0, newparent.0, show(newname)),
        );
        reply.error(Errno::EROFS);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.note(req, format!("OPEN {} flags={:#o}", ino.0, flags.0));
        if flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & libc::O_TRUNC != 0 {
            return reply.error(Errno::EROFS);
        }
        match node(ino) {
            Some(n) if !n.dir => reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO),
            Some(_) => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.note(req, format!("READ {} @{offset}", ino.0));
        let start = (offset as usize).min(TRIPWIRE_DATA.len());
        let end = (start + size as usize).min(TRIPWIRE_DATA.len());
        reply.data(&TRIPWIRE_DATA[start..end]);
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.note(req, format!("WRITE {}", ino.0));
        reply.error(Errno::EROFS);
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
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.note(req, format!("FSYNC {}", ino.0));
        reply.ok();
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        self.note(req, format!("OPENDIR {}", ino.0));
        match node(ino) {
            Some(n) if n.dir => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.note(req, format!("READDIR {} @{offset}", ino.0));
        let Some(dir) = node(ino).filter(|n| n.dir) else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut entries: Vec<(u64, FileType, &OsStr)> = vec![
            (dir.ino, FileType::Directory, OsStr::new(".")),
            (dir.parent, FileType::Directory, OsStr::new("..")),
        ];
        for n in TREE.iter().filter(|n| n.ino != 1 && n.parent == dir.ino) {
            let kind = if n.dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            entries.push((n.ino, kind, OsStr::new(n.name)));
        }
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.note(req, format!("STATFS {}", ino.0));
        reply.statfs(1, 0, 0, 8, 0, 4096, 255, 4096);
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.note(req, format!("SETXATTR {} {}", ino.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        self.note(req, format!("GETXATTR {} {}", ino.0, show(name)));
        if name != OsStr::new(TRIPWIRE_XATTR.0) {
            return reply.error(Errno::NO_XATTR);
        }
        let value = TRIPWIRE_XATTR.1;
        if size == 0 {
            reply.size(value.len() as u32);
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(value);
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        self.note(req, format!("LISTXATTR {}", ino.0));
        let list = [TRIPWIRE_XATTR.0.as_bytes(), b"\0"].concat();
        if size == 0 {
            reply.size(list.len() as u32);
        } else if (size as usize) < list.len() {
            reply.error(Errno::ERANGE);
        } else {
            reply.data(&list);
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.note(req, format!("REMOVEXATTR {} {}", ino.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        self.note(req, format!("ACCESS {} {mask}", ino.0));
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        self.note(req, format!("CREATE {}/{}", parent.0, show(name)));
        reply.error(Errno::EROFS);
    }

    fn fallocate(
        &self,
        req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        self.note(req, format!("FALLOCATE {}", ino.0));
        reply.error(Errno::EROFS);
    }
}

/// See the module documentation. Unmounted (and its thread joined) on drop.
pub struct Tripwire {
    mnt: PathBuf,
    shared: Arc<TripShared>,
    mounted: bool,
    thread: Option<JoinHandle<io::Result<()>>>,
}

impl Tripwire {
    /// Mounts a tripwire on the empty directory `mnt` (created if missing).
    pub fn start(mnt: &Path) -> io::Result<Tripwire> {
        fs::create_dir_all(mnt)?;
        let dev = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        let fd: OwnedFd = dev.into();
        let src = CString::new("ovlfuse-tripwire").unwrap();
        let fstype = CString::new(TRIPWIRE_FSTYPE).unwrap();
        // No default_permissions: access(2) and chdir reach the server too.
        let data = CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
            fd.as_raw_fd()
        ))
        .unwrap();
        let target = super::cstr(mnt);
        // SAFETY: valid C strings.
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
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| UNIX_EPOCH + Duration::from_secs(d.as_secs()))
            .unwrap_or(UNIX_EPOCH);
        let shared = Arc::new(TripShared {
            log: Mutex::new(Vec::new()),
            start,
        });
        let mut trip = Tripwire {
            mnt: mnt.to_path_buf(),
            shared: shared.clone(),
            mounted: true,
            thread: None,
        };
        let session = Session::from_fd(TripFs { shared }, fd, SessionACL::All, Config::default())?;
        trip.thread = Some(
            thread::Builder::new()
                .name("tripwire-fuse".into())
                .spawn(move || session.run())?,
        );
        // The handshake is done once the first request is answered.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match fs::metadata(&trip.mnt) {
                Ok(md) if libc::major(md.dev()) == 0 => break,
                Ok(md) => {
                    return Err(io::Error::other(format!(
                        "{} is not a FUSE mount (st_dev {:#x})",
                        trip.mnt.display(),
                        md.dev()
                    )));
                }
                Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(e),
            }
        }
        Ok(trip)
    }

    pub fn path(&self) -> &Path {
        &self.mnt
    }

    /// `path().join(rel)`
    pub fn p(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }

    /// Position in the log: [`Tripwire::since`] of it lists only later requests.
    pub fn mark(&self) -> usize {
        self.shared.log.lock().unwrap().len()
    }

    /// Requests that arrived after `mark`.
    pub fn since(&self, mark: usize) -> Vec<Touch> {
        self.shared.log.lock().unwrap()[mark..].to_vec()
    }

    /// Requests after `mark` made by a process running `exe`, or by one of `pids`.
    pub fn touched_by(&self, mark: usize, exe: &Path, pids: &[i32]) -> Vec<Touch> {
        let exe = fs::canonicalize(exe).unwrap_or_else(|_| exe.to_path_buf());
        self.since(mark)
            .into_iter()
            .filter(|t| {
                t.exe.as_deref() == Some(exe.as_path())
                    || t.pid.is_some_and(|p| pids.contains(&p))
                    || pids.contains(&t.tid)
            })
            .collect()
    }

    /// Unmounts and joins the session thread (idempotent; lazily if still busy).
    pub fn stop(&mut self) {
        if self.mounted {
            self.mounted = false;
            let c = super::cstr(&self.mnt);
            // SAFETY: valid path.
            if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
                eprintln!(
                    "[tripwire] umount {} failed ({}): detaching lazily",
                    self.mnt.display(),
                    io::Error::last_os_error()
                );
                // SAFETY: valid path.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        if let Some(t) = self.thread.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(10));
            }
            if t.is_finished() {
                let _ = t.join();
            } else {
                eprintln!(
                    "[tripwire] session thread of {} still running: left behind",
                    self.mnt.display()
                );
            }
        }
    }
}

impl Drop for Tripwire {
    fn drop(&mut self) {
        self.stop();
    }
}

// ---------------------------------------------------------------------------
// FsWatch: fanotify on a whole filesystem
// ---------------------------------------------------------------------------

/// One event of a tracked process.
#[derive(Debug, Clone)]
pub struct FsEvent {
    pub pid: i32,
    pub mask: u64,
    /// The object the event is about, as a path (the directory's path from its handle
    /// plus the entry name); `<unresolved ...>` if the directory is gone.
    pub path: PathBuf,
}

/// Names of the bits of a fanotify event mask.
pub fn fan_mask_names(mask: u64) -> String {
    const NAMES: &[(u64, &str)] = &[
        (libc::FAN_ACCESS, "ACCESS"),
        (libc::FAN_MODIFY, "MODIFY"),
        (libc::FAN_ATTRIB, "ATTRIB"),
        (libc::FAN_CLOSE_WRITE, "CLOSE_WRITE"),
        (libc::FAN_CLOSE_NOWRITE, "CLOSE_NOWRITE"),
        (libc::FAN_OPEN, "OPEN"),
        (libc::FAN_MOVED_FROM, "MOVED_FROM"),
        (libc::FAN_MOVED_TO, "MOVED_TO"),
        (libc::FAN_CREATE, "CREATE"),
        (libc::FAN_DELETE, "DELETE"),
        (libc::FAN_DELETE_SELF, "DELETE_SELF"),
        (libc::FAN_MOVE_SELF, "MOVE_SELF"),
        (libc::FAN_OPEN_EXEC, "OPEN_EXEC"),
        (libc::FAN_ONDIR, "ONDIR"),
    ];
    let v: Vec<&str> = NAMES
        .iter()
        .filter(|(b, _)| mask & b != 0)
        .map(|(_, n)| *n)
        .collect();
    v.join("|")
}

impl std::fmt::Display for FsEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} {} {}",
            self.pid,
            fan_mask_names(self.mask),
            self.path.display()
        )
    }
}

struct WatchShared {
    tracked: Mutex<HashSet<i32>>,
    events: Mutex<Vec<FsEvent>>,
    /// Sentinel names (entry names created by this process) seen so far.
    sentinels: Mutex<HashSet<OsString>>,
    overflowed: AtomicBool,
    stop: AtomicBool,
    /// Events of tracked processes about objects already gone, without a name.
    unnamed: AtomicU64,
    /// The watched filesystems: fsid and a directory on each (for `open_by_handle_at`).
    filesystems: Mutex<Vec<([u8; 8], OwnedFd)>>,
}

/// See the module documentation. The reader thread stops on drop.
pub struct FsWatch {
    shared: Arc<WatchShared>,
    fan: Arc<OwnedFd>,
    thread: Option<JoinHandle<()>>,
    sentinel_dir: PathBuf,
}

static SENTINEL: AtomicU64 = AtomicU64::new(0);

const WATCH_MASK: u64 = libc::FAN_ACCESS
    | libc::FAN_MODIFY
    | libc::FAN_ATTRIB
    | libc::FAN_CLOSE_WRITE
    | libc::FAN_CLOSE_NOWRITE
    | libc::FAN_OPEN
    | libc::FAN_MOVED_FROM
    | libc::FAN_MOVED_TO
    | libc::FAN_CREATE
    | libc::FAN_DELETE
    | libc::FAN_DELETE_SELF
    | libc::FAN_MOVE_SELF
    | libc::FAN_OPEN_EXEC
    | libc::FAN_ONDIR;

impl FsWatch {
    /// Watches the whole filesystem `sentinel_dir` is on (a writable directory of the
    /// test's own: [`FsWatch::sync`] creates its sentinel files there).
    pub fn start(sentinel_dir: &Path) -> io::Result<FsWatch> {
        // SAFETY: plain system calls with valid arguments; the fds are owned below.
        let fan = unsafe {
            libc::fanotify_init(
                libc::FAN_CLASS_NOTIF
                    | libc::FAN_CLOEXEC
                    | libc::FAN_NONBLOCK
                    | libc::FAN_UNLIMITED_QUEUE
                    // The parent's handle and the entry name, the object's handle, and
                    // (TARGET) the child's handle for create/delete/move of directories too.
                    | libc::FAN_REPORT_DFID_NAME_TARGET,
                (libc::O_RDONLY | libc::O_CLOEXEC) as libc::c_uint,
            )
        };
        if fan < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh fd.
        let fan = Arc::new(unsafe { OwnedFd::from_raw_fd(fan) });
        let shared = Arc::new(WatchShared {
            tracked: Mutex::new(HashSet::new()),
            events: Mutex::new(Vec::new()),
            sentinels: Mutex::new(HashSet::new()),
            overflowed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            unnamed: AtomicU64::new(0),
            filesystems: Mutex::new(Vec::new()),
        });
        let mut watch = FsWatch {
            shared: shared.clone(),
            fan: fan.clone(),
            thread: None,
            sentinel_dir: sentinel_dir.to_path_buf(),
        };
        watch.add_filesystem(sentinel_dir)?;
        watch.thread = Some(
            thread::Builder::new()
                .name("fanotify-watch".into())
                .spawn(move || read_events(&fan, shared))?,
        );
        // The mark is live once our own sentinel comes through.
        watch.sync();
        Ok(watch)
    }

    /// Also watches the whole filesystem `dir` is on.
    pub fn add_filesystem(&self, dir: &Path) -> io::Result<()> {
        let c = super::cstr(dir);
        // SAFETY: valid fd and path.
        let r = unsafe {
            libc::fanotify_mark(
                self.fan.as_raw_fd(),
                libc::FAN_MARK_ADD | libc::FAN_MARK_FILESYSTEM,
                WATCH_MASK,
                libc::AT_FDCWD,
                c.as_ptr(),
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        let mount_fd: OwnedFd = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(dir)?
            .into();
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and out-pointer.
        if unsafe { libc::fstatfs(mount_fd.as_raw_fd(), &mut st) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fsid_t is two ints; read as the 8 bytes fanotify reports.
        let fsid: [u8; 8] = unsafe { std::mem::transmute(st.f_fsid) };
        self.shared
            .filesystems
            .lock()
            .unwrap()
            .push((fsid, mount_fd));
        Ok(())
    }

    /// From now on, events of process `pid` are recorded.
    pub fn track(&self, pid: i32) {
        self.shared.tracked.lock().unwrap().insert(pid);
    }

    pub fn untrack(&self, pid: i32) {
        self.shared.tracked.lock().unwrap().remove(&pid);
    }

    /// Returns once every event caused before the call has been read: creates a sentinel
    /// file and waits for its own event (the queue is in order). Panics after 20 s.
    pub fn sync(&self) {
        let n = SENTINEL.fetch_add(1, Ordering::SeqCst);
        let name = OsString::from(format!(".fanotify-sentinel-{}-{n}", std::process::id()));
        let p = self.sentinel_dir.join(&name);
        fs::write(&p, b"").expect("create sentinel");
        let _ = fs::remove_file(&p);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.shared.sentinels.lock().unwrap().contains(&name) {
            assert!(
                Instant::now() < deadline,
                "fanotify watch: sentinel {} not seen within 20 s",
                p.display()
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Events of `pid` recorded so far (after a [`FsWatch::sync`] for completeness).
    pub fn events_of(&self, pid: i32) -> Vec<FsEvent> {
        assert!(
            !self.shared.overflowed.load(Ordering::SeqCst),
            "fanotify queue overflowed: the watch missed events"
        );
        self.shared
            .events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e.pid == pid)
            .cloned()
            .collect()
    }

    /// Events of tracked processes left out because they name no path (see `resolve`).
    pub fn unnamed_events(&self) -> u64 {
        self.shared.unnamed.load(Ordering::SeqCst)
    }

    /// Forgets the events recorded so far.
    pub fn clear(&self) {
        self.shared.events.lock().unwrap().clear();
    }
}

impl Drop for FsWatch {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Whether `path` is one of `roots` or inside one.
pub fn is_within(path: &Path, roots: &[PathBuf]) -> bool {
    roots.iter().any(|r| path.starts_with(r))
}

/// The events of `events` whose path is outside every root in `allowed`.
pub fn outside(events: &[FsEvent], allowed: &[PathBuf]) -> Vec<FsEvent> {
    // Resolved like the kernel names them (no symlink in the parents), but a root that is
    // itself a symlink now (a layer swapped for one) is not followed.
    let allowed: Vec<PathBuf> = allowed
        .iter()
        .map(|p| match (p.parent(), p.file_name()) {
            (Some(dir), Some(name)) => fs::canonicalize(dir)
                .map(|d| d.join(name))
                .unwrap_or_else(|_| p.clone()),
            _ => p.clone(),
        })
        .collect();
    events
        .iter()
        .filter(|e| !is_within(&e.path, &allowed))
        .cloned()
        .collect()
}

fn read_events(fan: &OwnedFd, sh: Arc<WatchShared>) {
    let me = std::process::id() as i32;
    // Paths of the objects tracked processes created or named, by file handle.
    let mut known: HashMap<Vec<u8>, PathBuf> = HashMap::new();
    let mut buf = vec![0u8; 256 * 1024];
    while !sh.stop.load(Ordering::SeqCst) {
        let mut pfd = libc::pollfd {
            fd: fan.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 50) };
        if r <= 0 {
            continue;
        }
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::read(fan.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            continue;
        }
        let n = n as usize;
        let mut off = 0usize;
        let tracked = sh.tracked.lock().unwrap().clone();
        while off + 24 <= n {
            let rec = &buf[off..n];
            let event_len = u32::from_ne_bytes(rec[0..4].try_into().unwrap()) as usize;
            let meta_len = u16::from_ne_bytes(rec[6..8].try_into().unwrap()) as usize;
            let mask = u64::from_ne_bytes(rec[8..16].try_into().unwrap());
            let fd = i32::from_ne_bytes(rec[16..20].try_into().unwrap());
            let pid = i32::from_ne_bytes(rec[20..24].try_into().unwrap());
            if event_len < 24 || event_len > rec.len() {
                break;
            }
            if fd >= 0 {
                // SAFETY: an fd the kernel gave us (not in FID mode, but be tidy).
                unsafe { libc::close(fd) };
            }
            if mask & libc::FAN_Q_OVERFLOW != 0 {
                sh.overflowed.store(true, Ordering::SeqCst);
            }
            let wanted = tracked.contains(&pid);
            if wanted || pid == me {
                let info = parse_info(&rec[meta_len.min(event_len)..event_len]);
                if pid == me
                    && mask & libc::FAN_CREATE != 0
                    && let Some((_, Some(name))) = &info.dir
                    && name.as_bytes().starts_with(b".fanotify-sentinel-")
                {
                    sh.sentinels.lock().unwrap().insert(name.clone());
                }
                if wanted {
                    let fss = sh.filesystems.lock().unwrap();
                    let Some((_, mount_fd)) = fss
                        .iter()
                        .find(|(fsid, _)| Some(fsid) == info.fsid.as_ref())
                        .or(fss.first())
                    else {
                        continue;
                    };
                    match resolve(mount_fd, mask, &info, &mut known) {
                        Some(path) => sh.events.lock().unwrap().push(FsEvent { pid, mask, path }),
                        None => {
                            sh.unnamed.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
            }
            off += event_len;
        }
    }
}

/// Events about an object itself rather than a name in a directory.
const SELF_EVENTS: u64 =
    libc::FAN_DELETE_SELF | libc::FAN_MOVE_SELF | libc::FAN_ATTRIB | libc::FAN_ONDIR;

/// File handles of one event: the directory's (with the entry name) and the object's.
#[derive(Default)]
struct EventInfo {
    fsid: Option<[u8; 8]>,
    dir: Option<(Vec<u8>, Option<OsString>)>,
    object: Option<Vec<u8>>,
}

fn parse_info(mut b: &[u8]) -> EventInfo {
    let mut info = EventInfo::default();
    while b.len() >= 4 {
        let kind = b[0];
        let len = u16::from_ne_bytes([b[2], b[3]]) as usize;
        if len < 4 || len > b.len() {
            break;
        }
        let rec = &b[..len];
        // header (4) + fsid (8), then struct file_handle: u32 bytes, i32 type, bytes
        if rec.len() >= 20 {
            let hbytes = u32::from_ne_bytes(rec[12..16].try_into().unwrap()) as usize;
            let hend = (20 + hbytes).min(rec.len());
            let handle = rec[12..hend].to_vec();
            info.fsid
                .get_or_insert_with(|| rec[4..12].try_into().unwrap());
            match kind {
                libc::FAN_EVENT_INFO_TYPE_FID => info.object = Some(handle),
                libc::FAN_EVENT_INFO_TYPE_DFID => info.dir = Some((handle, None)),
                libc::FAN_EVENT_INFO_TYPE_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_OLD_DFID_NAME
                | libc::FAN_EVENT_INFO_TYPE_NEW_DFID_NAME => {
                    let rest = &rec[hend..];
                    let nlen = rest.iter().position(|c| *c == 0).unwrap_or(rest.len());
                    let name = OsString::from_vec(rest[..nlen].to_vec());
                    // A rename reports both ends; keep the first (old) one.
                    if info.dir.is_none() {
                        info.dir = Some((handle, Some(name)));
                    }
                }
                _ => {}
            }
        }
        b = &b[len..];
    }
    info
}

/// The path of a directory or object handle, through `open_by_handle_at`. A directory
/// too deep for its path to fit in PATH_MAX gets the path of its closest ancestor that fits,
/// followed by one `…` per level below it (enough to tell which tree it is in); the levels
/// are remembered in `known`.
fn handle_path(
    mount_fd: &OwnedFd,
    handle: &[u8],
    known: &mut HashMap<Vec<u8>, PathBuf>,
) -> Result<PathBuf, String> {
    // struct file_handle needs 4-byte alignment: copy into u32 words.
    let mut words = vec![0u32; handle.len().div_ceil(4) + 1];
    // SAFETY: words has at least handle.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(handle.as_ptr(), words.as_mut_ptr().cast(), handle.len())
    };
    // SAFETY: a well-formed file_handle from the kernel, valid mount fd.
    let fd = unsafe {
        libc::open_by_handle_at(
            mount_fd.as_raw_fd(),
            words.as_mut_ptr().cast(),
            libc::O_PATH | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error().to_string());
    }
    // SAFETY: fresh fd.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let path = match fd_path(&fd) {
        Ok(p) => p,
        Err(e) if e.raw_os_error() == Some(libc::ENAMETOOLONG) => {
            return deep_path(fd, known);
        }
        Err(e) => return Err(e.to_string()),
    };
    // A non-directory decoded from its handle alone may not be connected to any name: its
    // path then reads "/". Only a directory can really be "/".
    if path == Path::new("/")
        && !fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd())).is_ok_and(|m| m.is_dir())
    {
        return Err("not connected to a name".into());
    }
    Ok(path)
}

fn fd_path(fd: &OwnedFd) -> io::Result<PathBuf> {
    fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// The handle of the object behind `fd`, in the layout fanotify reports.
fn handle_of(fd: &OwnedFd) -> Option<Vec<u8>> {
    let mut words = [0u32; 2 + 128 / 4];
    words[0] = 128;
    let mut mount_id: libc::c_int = 0;
    // SAFETY: a file_handle buffer with room for MAX_HANDLE_SZ bytes.
    let r = unsafe {
        libc::name_to_handle_at(
            fd.as_raw_fd(),
            c"".as_ptr(),
            words.as_mut_ptr().cast(),
            &mut mount_id,
            libc::AT_EMPTY_PATH,
        )
    };
    if r != 0 {
        return None;
    }
    let len = 8 + words[0] as usize;
    // SAFETY: the kernel filled `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) };
    Some(bytes.to_vec())
}

/// See [`handle_path`]: climbs with `..` to the first ancestor whose path fits (or whose
/// handle is known).
fn deep_path(fd: OwnedFd, known: &mut HashMap<Vec<u8>, PathBuf>) -> Result<PathBuf, String> {
    let mut below: Vec<Vec<u8>> = Vec::new();
    let mut cur = fd;
    let mut base = None;
    for _ in 0..1_000_000 {
        let h = handle_of(&cur).ok_or("no handle for a deep directory")?;
        if let Some(p) = known.get(&h) {
            base = Some(p.clone());
            break;
        }
        if let Ok(p) = fd_path(&cur) {
            known.insert(h, p.clone());
            base = Some(p);
            break;
        }
        below.push(h);
        // SAFETY: valid fd and name; the result is owned below.
        let up = unsafe {
            libc::openat(
                cur.as_raw_fd(),
                c"..".as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if up < 0 {
            return Err(io::Error::last_os_error().to_string());
        }
        // SAFETY: fresh fd.
        cur = unsafe { OwnedFd::from_raw_fd(up) };
    }
    let mut path = base.ok_or("no ancestor with a path")?;
    for h in below.into_iter().rev() {
        path.push("\u{2026}");
        known.insert(h, path.clone());
    }
    Ok(path)
}

/// The path an event is about: the directory's path (from its handle, or from the names
/// seen for that handle earlier, if the directory is gone: every object a create or move
/// names is remembered under its own handle) plus the entry name; for an event
/// with only the object's handle, the object's path. `None` for an event about an object
/// that is already gone and has no name: such "self" events (the link-count change and the
/// DELETE_SELF of an unlink, the MOVE_SELF of a rename) always come with a named event
/// (DELETE, MOVED_FROM/TO) that is checked instead.
fn resolve(
    mount_fd: &OwnedFd,
    mask: u64,
    info: &EventInfo,
    known: &mut HashMap<Vec<u8>, PathBuf>,
) -> Option<PathBuf> {
    if let Some((dir, name)) = &info.dir {
        let live = handle_path(mount_fd, dir, known).ok();
        if let Some(base) = &live {
            known.insert(dir.clone(), base.clone());
        }
        let base = match live.or_else(|| known.get(dir).cloned()) {
            Some(base) => base,
            // A directory's own DELETE_SELF/MOVE_SELF/ATTRIB after it is gone: its removal
            // or move is the named event in its parent, checked instead.
            None if mask & !SELF_EVENTS == 0 => return None,
            None => PathBuf::from("<unresolved directory>"),
        };
        let path = match name {
            Some(n) if n != "." && !n.is_empty() => base.join(n),
            _ => base,
        };
        if let Some(obj) = &info.object {
            known.insert(obj.clone(), path.clone());
        }
        return Some(path);
    }
    let obj = info.object.as_ref()?;
    handle_path(mount_fd, obj, known)
        .ok()
        .or_else(|| known.get(obj).cloned())
}
