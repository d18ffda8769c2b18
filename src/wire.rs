//! The FUSE kernel ABI for the few requests the daemon may serve itself on the relay
//! thread (see [`crate::relay::LocalAnswer::serve`]): decoding their bodies and encoding
//! their reply payloads.
//!
//! Layouts are those of `include/uapi/linux/fuse.h` (protocol 7.41), in host byte order.
//! Decoders take the request body (the bytes after the 40-byte `fuse_in_header`, already cut
//! to the header's `len`) and return `None` when it is too short or malformed; they never
//! panic. Encoders append a reply payload to a buffer, without the 16-byte
//! `fuse_out_header` (the relay writes that).
//!
//! Replies must be indistinguishable from the ones fuser 0.18 writes for the same values,
//! because the same request may be answered by either path: every encoder here produces the
//! bytes fuser's matching `Reply*` method produces (tested against fuser itself).

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileHandle, FileType, FopenFlags, Generation};

/// Size of `struct fuse_attr`.
pub const ATTR_LEN: usize = 88;
/// Size of `struct fuse_entry_out`.
pub const ENTRY_OUT_LEN: usize = 128;
/// Size of `struct fuse_attr_out`.
pub const ATTR_OUT_LEN: usize = 104;
/// Size of `struct fuse_open_out`.
pub const OPEN_OUT_LEN: usize = 16;
/// Size of the FUSE_CREATE reply: `fuse_entry_out` then `fuse_open_out`.
pub const CREATE_OUT_LEN: usize = ENTRY_OUT_LEN + OPEN_OUT_LEN;
/// Size of `struct fuse_write_out`.
pub const WRITE_OUT_LEN: usize = 8;
/// Size of `struct fuse_dirent` without its name.
pub const DIRENT_HEADER_LEN: usize = 24;

// Request structs whose end is not implied by their last field's offset.
const BATCH_FORGET_IN_LEN: usize = 8;
const FORGET_ONE_LEN: usize = 16;
const CREATE_IN_LEN: usize = 16;
/// `struct fuse_getxattr_in`: size, padding.
const GETXATTR_IN_LEN: usize = 8;
const READ_IN_LEN: usize = 40;
const WRITE_IN_LEN: usize = 40;

/// `FUSE_GETATTR_FH`: the `fh` of a GETATTR request is valid (fstat on an open file).
pub const GETATTR_FH: u32 = 1;

// ---- decoding ----

fn u32_at(body: &[u8], at: usize) -> Option<u32> {
    let bytes = body.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

fn u64_at(body: &[u8], at: usize) -> Option<u64> {
    let bytes = body.get(at..at.checked_add(8)?)?;
    Some(u64::from_ne_bytes(bytes.try_into().ok()?))
}

/// A NUL-terminated name at the start of `bytes`: the bytes before the first NUL. `None`
/// without a NUL (a truncated request) or when the name is empty (no request names "").
fn c_name(bytes: &[u8]) -> Option<&OsStr> {
    let end = bytes.iter().position(|&b| b == 0)?;
    (end > 0).then(|| OsStr::from_bytes(&bytes[..end]))
}

/// The body of FUSE_LOOKUP, FUSE_UNLINK and FUSE_RMDIR: the name in the parent (the
/// request's `nodeid`).
pub fn parse_name(body: &[u8]) -> Option<&OsStr> {
    c_name(body)
}

/// The body of FUSE_FORGET (`fuse_forget_in`): how many lookups of the request's node the
/// kernel gives back.
pub fn parse_forget(body: &[u8]) -> Option<u64> {
    u64_at(body, 0)
}

/// The body of FUSE_BATCH_FORGET: `(nodeid, nlookup)` pairs. `None` if even the count is
/// missing; a body holding fewer pairs than its count gives the whole pairs present.
pub fn parse_batch_forget(body: &[u8]) -> Option<impl Iterator<Item = (u64, u64)> + '_> {
    let count = u32_at(body, 0)? as usize;
    let pairs = body.get(BATCH_FORGET_IN_LEN..)?;
    Some(
        pairs
            .chunks_exact(FORGET_ONE_LEN)
            .take(count)
            .map(|one| (u64_at(one, 0).unwrap_or(0), u64_at(one, 8).unwrap_or(0))),
    )
}

/// `struct fuse_getattr_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GetattrIn {
    pub getattr_flags: u32,
    pub fh: u64,
}

impl GetattrIn {
    /// The file handle the attributes are asked through, when the kernel sent one.
    pub fn handle(&self) -> Option<u64> {
        (self.getattr_flags & GETATTR_FH != 0).then_some(self.fh)
    }
}

/// The body of FUSE_GETATTR.
pub fn parse_getattr(body: &[u8]) -> Option<GetattrIn> {
    Some(GetattrIn {
        getattr_flags: u32_at(body, 0)?,
        fh: u64_at(body, 8)?,
    })
}

/// `struct fuse_open_in`: `flags` are the open(2) flags, `open_flags` the FUSE_OPEN_*
/// request flags (FUSE_OPEN_KILL_SUIDGID).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenIn {
    pub flags: u32,
    pub open_flags: u32,
}

/// The body of FUSE_OPEN and FUSE_OPENDIR.
pub fn parse_open(body: &[u8]) -> Option<OpenIn> {
    Some(OpenIn {
        flags: u32_at(body, 0)?,
        open_flags: u32_at(body, 4)?,
    })
}

/// What a FUSE_SETATTR asks to change (`struct fuse_setattr_in`, 88 bytes), decoded as
/// fuser 0.18 decodes it: a field is `Some` when its FATTR_* bit is in `valid`; a time with
/// its `*_NOW` bit is "now"; `ctime`, the lock owner and FATTR_KILL_SUIDGID are not passed on
/// (fuser passes none of them to the filesystem's setattr that ours uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SetattrIn {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<fuser::TimeOrNow>,
    pub mtime: Option<fuser::TimeOrNow>,
    pub fh: Option<FileHandle>,
}

const FATTR_MODE: u32 = 1 << 0;
const FATTR_UID: u32 = 1 << 1;
const FATTR_GID: u32 = 1 << 2;
const FATTR_SIZE: u32 = 1 << 3;
const FATTR_ATIME: u32 = 1 << 4;
const FATTR_MTIME: u32 = 1 << 5;
const FATTR_FH: u32 = 1 << 6;
const FATTR_ATIME_NOW: u32 = 1 << 7;
const FATTR_MTIME_NOW: u32 = 1 << 8;
const SETATTR_IN_LEN: usize = 88;

/// The body of FUSE_SETATTR.
pub fn parse_setattr(body: &[u8]) -> Option<SetattrIn> {
    if body.len() < SETATTR_IN_LEN {
        return None;
    }
    let valid = u32_at(body, 0)?;
    let time = |bit: u32, now_bit: u32, secs_at: usize, nsecs_at: usize| {
        let secs = u64_at(body, secs_at)? as i64;
        let nsecs = u32_at(body, nsecs_at)?;
        if valid & bit == 0 {
            return Some(None);
        }
        Some(Some(if valid & now_bit != 0 {
            fuser::TimeOrNow::Now
        } else {
            fuser::TimeOrNow::SpecificTime(time_from_wire(secs, nsecs)?)
        }))
    };
    Some(SetattrIn {
        mode: if_set(valid, FATTR_MODE, u32_at(body, 68)?),
        uid: if_set(valid, FATTR_UID, u32_at(body, 76)?),
        gid: if_set(valid, FATTR_GID, u32_at(body, 80)?),
        size: if_set(valid, FATTR_SIZE, u64_at(body, 16)?),
        atime: time(FATTR_ATIME, FATTR_ATIME_NOW, 32, 56)?,
        mtime: time(FATTR_MTIME, FATTR_MTIME_NOW, 40, 60)?,
        fh: if_set(valid, FATTR_FH, FileHandle(u64_at(body, 8)?)),
    })
}

fn if_set<T>(valid: u32, bit: u32, value: T) -> Option<T> {
    (valid & bit != 0).then_some(value)
}

/// A time as the wire carries it (signed seconds, nanoseconds added), converted as fuser 0.18
/// converts it — including its treatment of negative seconds, which subtracts the nanoseconds.
/// None where `SystemTime` cannot hold it (fuser would panic; that request is left to it).
fn time_from_wire(secs: i64, nsecs: u32) -> Option<SystemTime> {
    if secs >= 0 {
        UNIX_EPOCH.checked_add(Duration::new(secs as u64, nsecs))
    } else {
        UNIX_EPOCH.checked_sub(Duration::new(secs.unsigned_abs(), nsecs))
    }
}

/// The body of FUSE_MKDIR: `struct fuse_mkdir_in { mode, umask }` and the name.
pub fn parse_mkdir(body: &[u8]) -> Option<(u32, &OsStr)> {
    Some((u32_at(body, 0)?, c_name(body.get(8..)?)?))
}

/// The body of FUSE_SYMLINK: the new name, then the target, each NUL-terminated.
pub fn parse_symlink(body: &[u8]) -> Option<(&OsStr, &OsStr)> {
    let name = c_name(body)?;
    let target = c_name(body.get(name.len() + 1..)?)?;
    Some((name, target))
}

/// The body of FUSE_LINK: `struct fuse_link_in { oldnodeid }` and the new name.
pub fn parse_link(body: &[u8]) -> Option<(u64, &OsStr)> {
    Some((u64_at(body, 0)?, c_name(body.get(8..)?)?))
}

/// The body of FUSE_RENAME: `struct fuse_rename_in { newdir }`, the old name, the new name.
pub fn parse_rename(body: &[u8]) -> Option<(u64, &OsStr, &OsStr)> {
    let names = body.get(8..)?;
    let name = c_name(names)?;
    let newname = c_name(names.get(name.len() + 1..)?)?;
    Some((u64_at(body, 0)?, name, newname))
}

/// The command of FUSE_IOCTL: `struct fuse_ioctl_in { fh: u64, flags: u32, cmd: u32, ... }`.
pub fn parse_ioctl_cmd(body: &[u8]) -> Option<u32> {
    u32_at(body, 12)
}

/// `struct fuse_create_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreateIn {
    pub flags: u32,
    pub mode: u32,
    pub umask: u32,
    pub open_flags: u32,
}

/// The body of FUSE_CREATE: the fixed part and the new name. Extension headers that may
/// follow the name (security context, supplementary groups) are not part of it.
pub fn parse_create(body: &[u8]) -> Option<(CreateIn, &OsStr)> {
    let create = CreateIn {
        flags: u32_at(body, 0)?,
        mode: u32_at(body, 4)?,
        umask: u32_at(body, 8)?,
        open_flags: u32_at(body, 12)?,
    };
    let name = c_name(body.get(CREATE_IN_LEN..)?)?;
    Some((create, name))
}

/// `struct fuse_release_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReleaseIn {
    pub fh: u64,
    pub flags: u32,
    pub release_flags: u32,
    pub lock_owner: u64,
}

/// The body of FUSE_RELEASE and FUSE_RELEASEDIR.
pub fn parse_release(body: &[u8]) -> Option<ReleaseIn> {
    Some(ReleaseIn {
        fh: u64_at(body, 0)?,
        flags: u32_at(body, 8)?,
        release_flags: u32_at(body, 12)?,
        lock_owner: u64_at(body, 16)?,
    })
}

/// `struct fuse_read_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadIn {
    pub fh: u64,
    pub offset: u64,
    /// The largest reply payload the kernel accepts.
    pub size: u32,
    pub read_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
}

/// The body of FUSE_READDIR (and FUSE_READ, which shares the layout).
pub fn parse_read(body: &[u8]) -> Option<ReadIn> {
    // The struct ends in a padding word, which must be there too.
    (body.len() >= READ_IN_LEN).then_some(())?;
    Some(ReadIn {
        fh: u64_at(body, 0)?,
        offset: u64_at(body, 8)?,
        size: u32_at(body, 16)?,
        read_flags: u32_at(body, 20)?,
        lock_owner: u64_at(body, 24)?,
        flags: u32_at(body, 32)?,
    })
}

/// `struct fuse_write_in`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteIn {
    pub fh: u64,
    pub offset: u64,
    /// How many data bytes follow the struct.
    pub size: u32,
    pub write_flags: u32,
    pub lock_owner: u64,
    pub flags: u32,
}

/// The body of FUSE_WRITE: the fixed part and exactly `size` data bytes. `None` if fewer
/// bytes follow.
pub fn parse_write(body: &[u8]) -> Option<(WriteIn, &[u8])> {
    let write = WriteIn {
        fh: u64_at(body, 0)?,
        offset: u64_at(body, 8)?,
        size: u32_at(body, 16)?,
        write_flags: u32_at(body, 20)?,
        lock_owner: u64_at(body, 24)?,
        flags: u32_at(body, 32)?,
    };
    let data_end = WRITE_IN_LEN.checked_add(write.size as usize)?;
    let data = body.get(WRITE_IN_LEN..data_end)?;
    Some((write, data))
}

// ---- encoding ----

/// A time as the kernel wants it: seconds since the epoch and a nanosecond part that is
/// always counted forward, so 1.2 s before the epoch is (-2, 800_000_000). Times beyond
/// the i64 range saturate the way fuser 0.18 does.
fn seconds_and_nanos(time: SystemTime) -> (i64, u32) {
    match time.duration_since(UNIX_EPOCH) {
        Ok(after) => match i64::try_from(after.as_secs()) {
            Ok(secs) => (secs, after.subsec_nanos()),
            Err(_) => (i64::MAX, 999_999_999),
        },
        Err(before) => {
            let before = before.duration();
            let nanos = before.subsec_nanos();
            let floor = -i128::from(before.as_secs()) - i128::from(nanos > 0);
            match i64::try_from(floor) {
                Ok(secs) if nanos == 0 => (secs, 0),
                Ok(secs) => (secs, 1_000_000_000 - nanos),
                Err(_) => (i64::MIN, 0),
            }
        }
    }
}

/// The `S_IFMT` bits of a file kind.
fn type_bits(kind: FileType) -> u32 {
    let bits = match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    };
    #[allow(clippy::unnecessary_cast)] // mode_t is u32 on Linux, u16 elsewhere
    {
        bits as u32
    }
}

/// The `d_type` (DT_*) value a directory entry of `kind` carries.
pub fn dirent_type(kind: FileType) -> u32 {
    type_bits(kind) >> 12
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_ne_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_ne_bytes());
}

/// Appends `struct fuse_attr` for `attr`, as fuser 0.18 encodes it on Linux: `mode` is the
/// kind's `S_IFMT` bits or'ed with `perm` as given (not masked); `crtime` and `flags` are
/// macOS fields and are not sent (the ABI's last word, `fuse_attr.flags`, is 0: its bits
/// mean FUSE_ATTR_SUBMOUNT/FUSE_ATTR_DAX on Linux).
pub fn put_attr(out: &mut Vec<u8>, attr: &FileAttr) {
    let (atime, atime_nsec) = seconds_and_nanos(attr.atime);
    let (mtime, mtime_nsec) = seconds_and_nanos(attr.mtime);
    let (ctime, ctime_nsec) = seconds_and_nanos(attr.ctime);
    out.reserve(ATTR_LEN);
    put_u64(out, attr.ino.0);
    put_u64(out, attr.size);
    put_u64(out, attr.blocks);
    out.extend_from_slice(&atime.to_ne_bytes());
    out.extend_from_slice(&mtime.to_ne_bytes());
    out.extend_from_slice(&ctime.to_ne_bytes());
    put_u32(out, atime_nsec);
    put_u32(out, mtime_nsec);
    put_u32(out, ctime_nsec);
    put_u32(out, type_bits(attr.kind) | u32::from(attr.perm));
    put_u32(out, attr.nlink);
    put_u32(out, attr.uid);
    put_u32(out, attr.gid);
    put_u32(out, attr.rdev);
    put_u32(out, attr.blksize);
    put_u32(out, 0);
}

/// Appends `struct fuse_entry_out`, the reply to LOOKUP (and MKNOD, MKDIR, SYMLINK, LINK):
/// what `ReplyEntry::entry(ttl, attr, generation)` sends. The node id is `attr.ino`, and
/// `ttl` is both the entry and the attribute validity.
pub fn put_entry_out(out: &mut Vec<u8>, ttl: &Duration, attr: &FileAttr, generation: Generation) {
    out.reserve(ENTRY_OUT_LEN);
    put_u64(out, attr.ino.0);
    put_u64(out, generation.0);
    put_u64(out, ttl.as_secs());
    put_u64(out, ttl.as_secs());
    put_u32(out, ttl.subsec_nanos());
    put_u32(out, ttl.subsec_nanos());
    put_attr(out, attr);
}

/// Appends `struct fuse_attr_out`, the reply to GETATTR and SETATTR: what
/// `ReplyAttr::attr(ttl, attr)` sends.
pub fn put_attr_out(out: &mut Vec<u8>, ttl: &Duration, attr: &FileAttr) {
    out.reserve(ATTR_OUT_LEN);
    put_u64(out, ttl.as_secs());
    put_u32(out, ttl.subsec_nanos());
    put_u32(out, 0);
    put_attr(out, attr);
}

/// Appends `struct fuse_open_out`, the reply to OPEN and OPENDIR. `backing_id` is 0 unless
/// `flags` has FOPEN_PASSTHROUGH; `ReplyOpen::opened(fh, flags)` is `backing_id` 0.
pub fn put_open_out(out: &mut Vec<u8>, fh: FileHandle, flags: FopenFlags, backing_id: i32) {
    out.reserve(OPEN_OUT_LEN);
    put_u64(out, fh.0);
    put_u32(out, flags.bits());
    out.extend_from_slice(&backing_id.to_ne_bytes());
}

/// Appends the reply to CREATE, `fuse_entry_out` then `fuse_open_out`: what
/// `ReplyCreate::created(ttl, attr, generation, fh, flags)` sends (`backing_id` 0), or
/// `created_passthrough` (FOPEN_PASSTHROUGH in `flags` and its backing id).
pub fn put_create_out(
    out: &mut Vec<u8>,
    ttl: &Duration,
    attr: &FileAttr,
    generation: Generation,
    fh: FileHandle,
    flags: FopenFlags,
    backing_id: i32,
) {
    out.reserve(CREATE_OUT_LEN);
    put_entry_out(out, ttl, attr, generation);
    put_open_out(out, fh, flags, backing_id);
}

/// The body of FUSE_GETXATTR: the caller's buffer size (0: it asks for the size) and the
/// attribute's name.
pub fn parse_getxattr(body: &[u8]) -> Option<(u32, &OsStr)> {
    let size = u32_at(body, 0)?;
    let name = c_name(body.get(GETXATTR_IN_LEN..)?)?;
    Some((size, name))
}

/// Appends `struct fuse_getxattr_out`, the reply to a GETXATTR of size 0: what
/// `ReplyXattr::size(size)` sends.
pub fn put_getxattr_out(out: &mut Vec<u8>, size: u32) {
    put_u32(out, size);
    put_u32(out, 0);
}

/// Appends `struct fuse_write_out`, the reply to WRITE: what `ReplyWrite::written(size)`
/// sends.
pub fn put_write_out(out: &mut Vec<u8>, size: u32) {
    out.reserve(WRITE_OUT_LEN);
    put_u32(out, size);
    put_u32(out, 0);
}

/// The payload of a READDIR reply: `fuse_dirent` records, each padded to 8 bytes, never
/// more in total than the request's `size`.
#[derive(Debug)]
pub struct DirentList<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    limit: usize,
}

impl<'a> DirentList<'a> {
    /// A listing appended to `out`, for a READDIR whose `fuse_read_in.size` is `size`.
    pub fn new(out: &'a mut Vec<u8>, size: u32) -> DirentList<'a> {
        let start = out.len();
        DirentList {
            out,
            start,
            limit: size as usize,
        }
    }

    /// Appends one entry if it fits and returns whether it did; when it returns `false`
    /// nothing was added and the reply is full. Note the opposite sense from fuser's
    /// `ReplyDirectory::add`, which returns `true` when full. `offset` is where a reader
    /// continues after this entry.
    pub fn add_if_fits(&mut self, ino: u64, offset: u64, kind: FileType, name: &OsStr) -> bool {
        let name = name.as_bytes();
        let Ok(namelen) = u32::try_from(name.len()) else {
            return false;
        };
        let unpadded = DIRENT_HEADER_LEN + name.len();
        let padded = unpadded.next_multiple_of(8);
        if self.len() + padded > self.limit {
            return false;
        }
        self.out.reserve(padded);
        put_u64(self.out, ino);
        put_u64(self.out, offset);
        put_u32(self.out, namelen);
        put_u32(self.out, dirent_type(kind));
        self.out.extend_from_slice(name);
        self.out.resize(self.out.len() + (padded - unpadded), 0);
        true
    }

    /// Bytes of listing so far.
    pub fn len(&self) -> usize {
        self.out.len() - self.start
    }

    /// Whether no entry was added (an empty reply means end of directory).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The payload of a READDIRPLUS reply: `fuse_direntplus` records (`fuse_entry_out`, then
/// `fuse_dirent` and the name padded to 8 bytes), never more in total than the request's
/// `size`; what fuser's `ReplyDirectoryPlus::add(ino, offset, name, ttl, attr, generation)`
/// sends (node id and `d_ino` are `attr.ino`, `d_type` comes from the mode it sends).
#[derive(Debug)]
pub struct DirentPlusList<'a> {
    out: &'a mut Vec<u8>,
    start: usize,
    limit: usize,
}

impl<'a> DirentPlusList<'a> {
    /// A listing appended to `out`, for a READDIRPLUS whose `fuse_read_in.size` is `size`.
    pub fn new(out: &'a mut Vec<u8>, size: u32) -> DirentPlusList<'a> {
        let start = out.len();
        DirentPlusList {
            out,
            start,
            limit: size as usize,
        }
    }

    /// Appends one entry if it fits and returns whether it did (`false`: nothing added,
    /// the reply is full).
    pub fn add_if_fits(
        &mut self,
        ttl: &Duration,
        attr: &FileAttr,
        generation: Generation,
        offset: u64,
        name: &OsStr,
    ) -> bool {
        // fuser takes the type from the whole mode, perm included, as sent in `attr`.
        let dtype = (type_bits(attr.kind) | u32::from(attr.perm)) >> 12;
        self.push(attr.ino.0, offset, dtype, name, |out| {
            put_entry_out(out, ttl, attr, generation)
        })
    }

    /// Appends one entry without attributes (node id 0: the kernel lists it and looks it up
    /// only when asked), if it fits; returns whether it did.
    pub fn add_bare_if_fits(
        &mut self,
        ino: u64,
        offset: u64,
        kind: FileType,
        name: &OsStr,
    ) -> bool {
        self.push(ino, offset, dirent_type(kind), name, |out| {
            out.resize(out.len() + ENTRY_OUT_LEN, 0)
        })
    }

    fn push(
        &mut self,
        ino: u64,
        offset: u64,
        dtype: u32,
        name: &OsStr,
        entry_out: impl FnOnce(&mut Vec<u8>),
    ) -> bool {
        let name = name.as_bytes();
        let Ok(namelen) = u32::try_from(name.len()) else {
            return false;
        };
        let unpadded = ENTRY_OUT_LEN + DIRENT_HEADER_LEN + name.len();
        let padded = unpadded.next_multiple_of(8);
        if self.out.len() - self.start + padded > self.limit {
            return false;
        }
        self.out.reserve(padded);
        entry_out(self.out);
        put_u64(self.out, ino);
        put_u64(self.out, offset);
        put_u32(self.out, namelen);
        put_u32(self.out, dtype);
        self.out.extend_from_slice(name);
        self.out.resize(self.out.len() + (padded - unpadded), 0);
        true
    }
}

/// The reply structs as `include/uapi/linux/fuse.h` declares them, for one purpose: letting
/// the compiler work out their C sizes (alignment padding included), which must be the
/// lengths the encoders above write field by field. A wrong length makes the kernel fail
/// the request.
#[allow(dead_code)]
mod c_layout {
    #[repr(C)]
    pub struct FuseAttr {
        ino: u64,
        size: u64,
        blocks: u64,
        atime: u64,
        mtime: u64,
        ctime: u64,
        atimensec: u32,
        mtimensec: u32,
        ctimensec: u32,
        mode: u32,
        nlink: u32,
        uid: u32,
        gid: u32,
        rdev: u32,
        blksize: u32,
        flags: u32,
    }

    #[repr(C)]
    pub struct FuseEntryOut {
        nodeid: u64,
        generation: u64,
        entry_valid: u64,
        attr_valid: u64,
        entry_valid_nsec: u32,
        attr_valid_nsec: u32,
        attr: FuseAttr,
    }

    #[repr(C)]
    pub struct FuseAttrOut {
        attr_valid: u64,
        attr_valid_nsec: u32,
        dummy: u32,
        attr: FuseAttr,
    }

    #[repr(C)]
    pub struct FuseOpenOut {
        fh: u64,
        open_flags: u32,
        backing_id: i32,
    }

    #[repr(C)]
    pub struct FuseWriteOut {
        size: u32,
        padding: u32,
    }

    /// Without the flexible `name[]` member.
    #[repr(C)]
    pub struct FuseDirent {
        ino: u64,
        off: u64,
        namelen: u32,
        kind: u32,
    }
}

const _: () = assert!(size_of::<c_layout::FuseAttr>() == ATTR_LEN && ATTR_LEN == 88);
const _: () = assert!(size_of::<c_layout::FuseEntryOut>() == ENTRY_OUT_LEN && ENTRY_OUT_LEN == 128);
const _: () = assert!(size_of::<c_layout::FuseAttrOut>() == ATTR_OUT_LEN && ATTR_OUT_LEN == 104);
const _: () = assert!(size_of::<c_layout::FuseOpenOut>() == OPEN_OUT_LEN && OPEN_OUT_LEN == 16);
const _: () = assert!(size_of::<c_layout::FuseWriteOut>() == WRITE_OUT_LEN && WRITE_OUT_LEN == 8);
const _: () =
    assert!(size_of::<c_layout::FuseDirent>() == DIRENT_HEADER_LEN && DIRENT_HEADER_LEN == 24);

#[cfg(test)]
mod tests {
    use super::*;
    use fuser::INodeNo;

    fn attr_sample() -> FileAttr {
        FileAttr {
            ino: INodeNo(0x0102_0304_0506_0708),
            size: 0x1111_2222_3333_4444,
            blocks: 77,
            atime: UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            mtime: UNIX_EPOCH - Duration::new(1, 200_000_000),
            ctime: UNIX_EPOCH - Duration::new(5, 0),
            crtime: UNIX_EPOCH + Duration::new(42, 0),
            kind: FileType::Symlink,
            perm: 0o4755,
            nlink: 3,
            uid: 1000,
            gid: 100,
            rdev: 0x0803,
            blksize: 4096,
            flags: 0xdead,
        }
    }

    fn u32_of(b: &[u8], at: usize) -> u32 {
        u32_at(b, at).unwrap()
    }

    fn u64_of(b: &[u8], at: usize) -> u64 {
        u64_at(b, at).unwrap()
    }

    fn i64_of(b: &[u8], at: usize) -> i64 {
        u64_of(b, at) as i64
    }

    /// Checks the fuse_attr at `b[at..at + 88]` field by field against `attr_sample()`.
    fn check_sample_attr(b: &[u8], at: usize) {
        assert_eq!(u64_of(b, at), 0x0102_0304_0506_0708, "ino");
        assert_eq!(u64_of(b, at + 8), 0x1111_2222_3333_4444, "size");
        assert_eq!(u64_of(b, at + 16), 77, "blocks");
        assert_eq!(i64_of(b, at + 24), 1_700_000_000, "atime");
        assert_eq!(i64_of(b, at + 32), -2, "mtime");
        assert_eq!(i64_of(b, at + 40), -5, "ctime");
        assert_eq!(u32_of(b, at + 48), 123_456_789, "atimensec");
        assert_eq!(u32_of(b, at + 52), 800_000_000, "mtimensec");
        assert_eq!(u32_of(b, at + 56), 0, "ctimensec");
        assert_eq!(u32_of(b, at + 60), 0o120000 | 0o4755, "mode");
        assert_eq!(u32_of(b, at + 64), 3, "nlink");
        assert_eq!(u32_of(b, at + 68), 1000, "uid");
        assert_eq!(u32_of(b, at + 72), 100, "gid");
        assert_eq!(u32_of(b, at + 76), 0x0803, "rdev");
        assert_eq!(u32_of(b, at + 80), 4096, "blksize");
        assert_eq!(u32_of(b, at + 84), 0, "flags");
    }

    #[test]
    fn attr_layout() {
        let mut out = vec![0xAA];
        put_attr(&mut out, &attr_sample());
        assert_eq!(out.len(), 1 + ATTR_LEN);
        assert_eq!(out[0], 0xAA, "appends, does not overwrite");
        check_sample_attr(&out, 1);
    }

    #[test]
    fn times_are_floored_seconds_with_forward_nanos() {
        let cases = [
            (UNIX_EPOCH, (0, 0)),
            (UNIX_EPOCH + Duration::new(3, 5), (3, 5)),
            (UNIX_EPOCH - Duration::new(0, 1), (-1, 999_999_999)),
            (
                UNIX_EPOCH - Duration::new(1, 200_000_000),
                (-2, 800_000_000),
            ),
            (UNIX_EPOCH - Duration::new(7, 0), (-7, 0)),
        ];
        for (time, expected) in cases {
            assert_eq!(seconds_and_nanos(time), expected, "{time:?}");
        }
        // The extremes a Linux SystemTime can hold are representable and kept as they are.
        let earliest = UNIX_EPOCH - Duration::new(i64::MAX as u64 + 1, 0);
        assert_eq!(seconds_and_nanos(earliest), (i64::MIN, 0));
        let almost = UNIX_EPOCH - Duration::new(i64::MAX as u64, 800_000_000);
        assert_eq!(seconds_and_nanos(almost), (i64::MIN, 200_000_000));
    }

    #[test]
    fn entry_out_layout() {
        let mut out = Vec::new();
        let ttl = Duration::new(2, 500);
        put_entry_out(&mut out, &ttl, &attr_sample(), Generation(9));
        assert_eq!(out.len(), ENTRY_OUT_LEN);
        assert_eq!(u64_of(&out, 0), 0x0102_0304_0506_0708, "nodeid is attr.ino");
        assert_eq!(u64_of(&out, 8), 9, "generation");
        assert_eq!(u64_of(&out, 16), 2, "entry_valid");
        assert_eq!(u64_of(&out, 24), 2, "attr_valid");
        assert_eq!(u32_of(&out, 32), 500, "entry_valid_nsec");
        assert_eq!(u32_of(&out, 36), 500, "attr_valid_nsec");
        check_sample_attr(&out, 40);
    }

    #[test]
    fn attr_out_layout() {
        let mut out = Vec::new();
        put_attr_out(&mut out, &Duration::new(1, 7), &attr_sample());
        assert_eq!(out.len(), ATTR_OUT_LEN);
        assert_eq!(u64_of(&out, 0), 1, "attr_valid");
        assert_eq!(u32_of(&out, 8), 7, "attr_valid_nsec");
        assert_eq!(u32_of(&out, 12), 0, "dummy");
        check_sample_attr(&out, 16);
    }

    #[test]
    fn open_create_write_layouts() {
        let mut out = Vec::new();
        let flags = FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_DIRECT_IO;
        put_open_out(&mut out, FileHandle(0xABCD), flags, -3);
        assert_eq!(out.len(), OPEN_OUT_LEN);
        assert_eq!(u64_of(&out, 0), 0xABCD);
        assert_eq!(u32_of(&out, 8), flags.bits());
        assert_eq!(u32_of(&out, 12) as i32, -3);

        out.clear();
        let ttl = Duration::from_millis(1500);
        put_create_out(
            &mut out,
            &ttl,
            &attr_sample(),
            Generation(4),
            FileHandle(77),
            flags,
            5,
        );
        assert_eq!(out.len(), CREATE_OUT_LEN);
        let mut entry = Vec::new();
        put_entry_out(&mut entry, &ttl, &attr_sample(), Generation(4));
        assert_eq!(&out[..ENTRY_OUT_LEN], &entry[..]);
        assert_eq!(u64_of(&out, 128), 77);
        assert_eq!(u32_of(&out, 136), flags.bits());
        assert_eq!(u32_of(&out, 140), 5, "the backing id");

        out.clear();
        put_write_out(&mut out, 65536);
        assert_eq!(out, [65536u32.to_ne_bytes(), [0; 4]].concat());
    }

    #[test]
    fn dirent_padding_and_size_limit() {
        let mut out = vec![1, 2, 3];
        // 24 + 1 = 25 -> 32; 24 + 8 = 32 -> 32; 24 + 9 = 33 -> 40. Room for 32 + 32 + 39.
        let mut list = DirentList::new(&mut out, 32 + 32 + 39);
        assert!(list.is_empty());
        assert!(list.add_if_fits(5, 1, FileType::Directory, OsStr::new(".")));
        assert_eq!(list.len(), 32);
        assert!(list.add_if_fits(6, 2, FileType::RegularFile, OsStr::new("eightchr")));
        assert_eq!(list.len(), 64);
        assert!(!list.add_if_fits(7, 3, FileType::Symlink, OsStr::new("ninechars")));
        assert_eq!(list.len(), 64, "a refused entry adds nothing");
        // A shorter one still fits exactly.
        assert!(list.add_if_fits(7, 3, FileType::Symlink, OsStr::new("x")));
        assert_eq!(list.len(), 96);
        assert_eq!(out.len(), 3 + 96);
        assert_eq!(&out[..3], &[1, 2, 3]);
        let first = &out[3..];
        assert_eq!(u64_of(first, 0), 5);
        assert_eq!(u64_of(first, 8), 1);
        assert_eq!(u32_of(first, 16), 1, "namelen");
        assert_eq!(u32_of(first, 20), libc::DT_DIR as u32);
        assert_eq!(&first[24..32], b".\0\0\0\0\0\0\0");
        let second = &out[3 + 32..];
        assert_eq!(u32_of(second, 16), 8);
        assert_eq!(u32_of(second, 20), libc::DT_REG as u32);
        assert_eq!(&second[24..32], b"eightchr");
        assert_eq!(u32_of(&out[3 + 64..], 20), libc::DT_LNK as u32);

        let mut out = Vec::new();
        let mut none = DirentList::new(&mut out, 31);
        assert!(!none.add_if_fits(1, 1, FileType::RegularFile, OsStr::new("a")));
        assert!(none.is_empty());
    }

    #[test]
    fn dirent_types_are_dt_values() {
        let expected = [
            (FileType::NamedPipe, libc::DT_FIFO),
            (FileType::CharDevice, libc::DT_CHR),
            (FileType::Directory, libc::DT_DIR),
            (FileType::BlockDevice, libc::DT_BLK),
            (FileType::RegularFile, libc::DT_REG),
            (FileType::Symlink, libc::DT_LNK),
            (FileType::Socket, libc::DT_SOCK),
        ];
        for (kind, dt) in expected {
            assert_eq!(dirent_type(kind), u32::from(dt), "{kind:?}");
        }
    }

    fn body(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    #[test]
    fn names() {
        assert_eq!(parse_name(b"abc\0"), Some(OsStr::new("abc")));
        // Only up to the first NUL: whatever follows (padding, extensions) is not the name.
        assert_eq!(parse_name(b"abc\0def\0"), Some(OsStr::new("abc")));
        assert_eq!(parse_name(b"abc"), None, "no NUL");
        assert_eq!(parse_name(b"\0"), None, "empty");
        assert_eq!(parse_name(b""), None);
        assert_eq!(
            parse_name(b"\xff\xfe\0"),
            Some(OsStr::from_bytes(b"\xff\xfe"))
        );
    }

    #[test]
    fn forgets() {
        assert_eq!(parse_forget(&7u64.to_ne_bytes()), Some(7));
        assert_eq!(parse_forget(&[0; 7]), None);

        let one = |n: u64, l: u64| body(&[&n.to_ne_bytes(), &l.to_ne_bytes()]);
        let full = body(&[
            &2u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &one(10, 1),
            &one(11, 5),
        ]);
        let pairs: Vec<_> = parse_batch_forget(&full).unwrap().collect();
        assert_eq!(pairs, [(10, 1), (11, 5)]);
        // Fewer pairs than counted, and a torn last pair: only whole pairs.
        let short = body(&[&3u32.to_ne_bytes(), &[0; 4], &one(10, 1), &[9; 15]]);
        let pairs: Vec<_> = parse_batch_forget(&short).unwrap().collect();
        assert_eq!(pairs, [(10, 1)]);
        // More pairs than counted: only the counted ones.
        let extra = body(&[&1u32.to_ne_bytes(), &[0; 4], &one(1, 2), &one(3, 4)]);
        assert_eq!(parse_batch_forget(&extra).unwrap().count(), 1);
        assert!(parse_batch_forget(&[0; 7]).is_none());
        assert_eq!(
            parse_batch_forget(&[0; 8]).unwrap().count(),
            0,
            "count 0, nothing more"
        );
    }

    #[test]
    fn getattr_open_release() {
        let g = body(&[&1u32.to_ne_bytes(), &[0; 4], &99u64.to_ne_bytes()]);
        let parsed = parse_getattr(&g).unwrap();
        assert_eq!(
            parsed,
            GetattrIn {
                getattr_flags: 1,
                fh: 99
            }
        );
        assert_eq!(parsed.handle(), Some(99));
        let g0 = body(&[&0u32.to_ne_bytes(), &[0; 4], &99u64.to_ne_bytes()]);
        assert_eq!(parse_getattr(&g0).unwrap().handle(), None);
        assert_eq!(parse_getattr(&g[..15]), None);

        let o = body(&[&0o2u32.to_ne_bytes(), &1u32.to_ne_bytes()]);
        assert_eq!(
            parse_open(&o),
            Some(OpenIn {
                flags: 2,
                open_flags: 1
            })
        );
        assert_eq!(parse_open(&o[..7]), None);

        let r = body(&[
            &5u64.to_ne_bytes(),
            &0o100002u32.to_ne_bytes(),
            &1u32.to_ne_bytes(),
            &0xFEEDu64.to_ne_bytes(),
        ]);
        assert_eq!(
            parse_release(&r),
            Some(ReleaseIn {
                fh: 5,
                flags: 0o100002,
                release_flags: 1,
                lock_owner: 0xFEED
            })
        );
        assert_eq!(parse_release(&r[..23]), None);
    }

    #[test]
    fn create() {
        let fixed = body(&[
            &0o101u32.to_ne_bytes(),
            &0o100644u32.to_ne_bytes(),
            &0o022u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
        ]);
        // The name, then an 8-byte-aligned extension header area.
        let with_ext = body(&[&fixed, b"new\0", &[0; 4], &[1; 32]]);
        let (c, name) = parse_create(&with_ext).unwrap();
        assert_eq!(
            c,
            CreateIn {
                flags: 0o101,
                mode: 0o100644,
                umask: 0o022,
                open_flags: 0
            }
        );
        assert_eq!(name, "new");
        assert_eq!(parse_create(&body(&[&fixed, b"new"])), None, "no NUL");
        assert_eq!(parse_create(&body(&[&fixed, b"\0"])), None, "empty name");
        assert_eq!(parse_create(&fixed), None);
        assert_eq!(parse_create(&fixed[..12]), None);
    }

    fn read_in_bytes(size: u32) -> Vec<u8> {
        body(&[
            &3u64.to_ne_bytes(),
            &4096u64.to_ne_bytes(),
            &size.to_ne_bytes(),
            &2u32.to_ne_bytes(),
            &0x77u64.to_ne_bytes(),
            &0o2u32.to_ne_bytes(),
            &[0; 4],
        ])
    }

    #[test]
    fn read_and_write() {
        let r = read_in_bytes(4096);
        assert_eq!(
            parse_read(&r),
            Some(ReadIn {
                fh: 3,
                offset: 4096,
                size: 4096,
                read_flags: 2,
                lock_owner: 0x77,
                flags: 2
            })
        );
        assert_eq!(parse_read(&r[..39]), None);

        let w = body(&[&read_in_bytes(5), b"hello", &[0xEE; 8]]);
        let (parsed, data) = parse_write(&w).unwrap();
        assert_eq!(
            parsed,
            WriteIn {
                fh: 3,
                offset: 4096,
                size: 5,
                write_flags: 2,
                lock_owner: 0x77,
                flags: 2
            }
        );
        assert_eq!(data, b"hello", "exactly size bytes, not what follows");
        assert_eq!(parse_write(&w[..44]), None, "data cut short");
        assert_eq!(parse_write(&w[..39]), None);
        let huge = read_in_bytes(u32::MAX);
        assert_eq!(parse_write(&huge), None);
        let no_data = read_in_bytes(0);
        assert_eq!(parse_write(&no_data).map(|(_, d)| d.len()), Some(0));
    }

    #[test]
    fn decoders_never_panic_on_short_bodies() {
        let long = [0xFFu8; 128];
        for len in 0..long.len() {
            let b = &long[..len];
            let _ = parse_name(b);
            let _ = parse_forget(b);
            if let Some(pairs) = parse_batch_forget(b) {
                let _ = pairs.count();
            }
            let _ = parse_getattr(b);
            let _ = parse_open(b);
            let _ = parse_create(b);
            let _ = parse_release(b);
            let _ = parse_read(b);
            let _ = parse_write(b);
            let _ = parse_setattr(b);
            let _ = parse_mkdir(b);
            let _ = parse_symlink(b);
            let _ = parse_link(b);
            let _ = parse_rename(b);
        }
    }

    // ---- against fuser itself ----

    mod oracle {
        //! fuser 0.18 serving a filesystem over a socket on which the test plays the
        //! kernel: the replies it writes are the reference for our encoders.

        use super::*;
        use std::os::fd::{AsRawFd, OwnedFd};

        use fuser::{
            Filesystem, LockOwner, OpenFlags, ReplyAttr, ReplyCreate, ReplyDirectory, ReplyEntry,
            ReplyOpen, ReplyWrite, Request, WriteFlags,
        };

        /// Answers every request from `attrs` (indexed by node id or by the name's number);
        /// keeps what fuser decoded from each SETATTR.
        pub struct Fixed {
            pub attrs: Vec<FileAttr>,
            pub setattrs: std::sync::Arc<parking_lot::Mutex<Vec<SetattrIn>>>,
            /// MKDIR, SYMLINK, LINK and RENAME as fuser decoded them, in `decoded`'s words.
            pub made: std::sync::Arc<parking_lot::Mutex<Vec<String>>>,
        }

        /// One line for a decoded MKDIR/SYMLINK/LINK/RENAME, whoever decoded it.
        pub fn decoded(op: &str, node: u64, other: u64, a: &OsStr, b: &OsStr) -> String {
            format!("{op} node={node} other={other:o} a={a:?} b={b:?}")
        }

        const TTL: Duration = Duration::new(3, 250_000_000);
        const GENERATION: Generation = Generation(0x5EED);
        const FH: FileHandle = FileHandle(0xF00D);

        fn flags() -> FopenFlags {
            FopenFlags::FOPEN_KEEP_CACHE
        }

        impl Filesystem for Fixed {
            fn lookup(&self, _req: &Request, _parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
                let i: usize = name.to_str().unwrap().parse().unwrap();
                reply.entry(&TTL, &self.attrs[i], GENERATION);
            }

            fn getattr(
                &self,
                _req: &Request,
                ino: INodeNo,
                _fh: Option<FileHandle>,
                reply: ReplyAttr,
            ) {
                reply.attr(&TTL, &self.attrs[ino.0 as usize]);
            }

            fn setattr(
                &self,
                _req: &Request,
                ino: INodeNo,
                mode: Option<u32>,
                uid: Option<u32>,
                gid: Option<u32>,
                size: Option<u64>,
                atime: Option<fuser::TimeOrNow>,
                mtime: Option<fuser::TimeOrNow>,
                _ctime: Option<SystemTime>,
                fh: Option<FileHandle>,
                _crtime: Option<SystemTime>,
                _chgtime: Option<SystemTime>,
                _bkuptime: Option<SystemTime>,
                _flags: Option<fuser::BsdFileFlags>,
                reply: ReplyAttr,
            ) {
                self.setattrs.lock().push(SetattrIn {
                    mode,
                    uid,
                    gid,
                    size,
                    atime,
                    mtime,
                    fh,
                });
                reply.attr(&TTL, &self.attrs[ino.0 as usize]);
            }

            fn mkdir(
                &self,
                _req: &Request,
                parent: INodeNo,
                name: &OsStr,
                mode: u32,
                _umask: u32,
                reply: ReplyEntry,
            ) {
                let line = decoded("mkdir", parent.0, mode.into(), name, OsStr::new(""));
                self.made.lock().push(line);
                reply.entry(&TTL, &self.attrs[2], GENERATION);
            }

            fn symlink(
                &self,
                _req: &Request,
                parent: INodeNo,
                link_name: &OsStr,
                target: &std::path::Path,
                reply: ReplyEntry,
            ) {
                let line = decoded("symlink", parent.0, 0, link_name, target.as_os_str());
                self.made.lock().push(line);
                reply.entry(&TTL, &self.attrs[2], GENERATION);
            }

            fn link(
                &self,
                _req: &Request,
                ino: INodeNo,
                newparent: INodeNo,
                newname: &OsStr,
                reply: ReplyEntry,
            ) {
                let line = decoded("link", newparent.0, ino.0, newname, OsStr::new(""));
                self.made.lock().push(line);
                reply.entry(&TTL, &self.attrs[2], GENERATION);
            }

            fn rename(
                &self,
                _req: &Request,
                parent: INodeNo,
                name: &OsStr,
                newparent: INodeNo,
                newname: &OsStr,
                _flags: fuser::RenameFlags,
                reply: fuser::ReplyEmpty,
            ) {
                let line = decoded("rename", parent.0, newparent.0, name, newname);
                self.made.lock().push(line);
                reply.ok();
            }

            fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
                reply.opened(FH, flags());
            }

            fn create(
                &self,
                _req: &Request,
                _parent: INodeNo,
                name: &OsStr,
                _mode: u32,
                _umask: u32,
                _flags: i32,
                reply: ReplyCreate,
            ) {
                let i: usize = name.to_str().unwrap().parse().unwrap();
                reply.created(&TTL, &self.attrs[i], GENERATION, FH, flags());
            }

            fn write(
                &self,
                _req: &Request,
                _ino: INodeNo,
                _fh: FileHandle,
                _offset: u64,
                data: &[u8],
                _write_flags: WriteFlags,
                _flags: OpenFlags,
                _lock_owner: Option<LockOwner>,
                reply: ReplyWrite,
            ) {
                reply.written(data.len() as u32);
            }

            fn readdir(
                &self,
                _req: &Request,
                _ino: INodeNo,
                _fh: FileHandle,
                _offset: u64,
                mut reply: ReplyDirectory,
            ) {
                for (i, a) in self.attrs.iter().enumerate() {
                    let name = format!("entry-{}", "x".repeat(i));
                    if reply.add(a.ino, i as u64 + 1, a.kind, name) {
                        break;
                    }
                }
                reply.ok();
            }

            fn readdirplus(
                &self,
                _req: &Request,
                _ino: INodeNo,
                _fh: FileHandle,
                _offset: u64,
                mut reply: fuser::ReplyDirectoryPlus,
            ) {
                for (i, a) in self.attrs.iter().enumerate() {
                    let name = format!("plus-{}", "y".repeat(i));
                    if reply.add(a.ino, i as u64 + 7, name, &TTL, a, GENERATION) {
                        break;
                    }
                }
                reply.ok();
            }
        }

        /// What our encoders must produce for the same requests.
        pub fn expected_lookup(attr: &FileAttr) -> Vec<u8> {
            let mut out = Vec::new();
            put_entry_out(&mut out, &TTL, attr, GENERATION);
            out
        }

        pub fn expected_getattr(attr: &FileAttr) -> Vec<u8> {
            let mut out = Vec::new();
            put_attr_out(&mut out, &TTL, attr);
            out
        }

        pub fn expected_open() -> Vec<u8> {
            let mut out = Vec::new();
            put_open_out(&mut out, FH, flags(), 0);
            out
        }

        pub fn expected_create(attr: &FileAttr) -> Vec<u8> {
            let mut out = Vec::new();
            put_create_out(&mut out, &TTL, attr, GENERATION, FH, flags(), 0);
            out
        }

        pub fn expected_readdir(attrs: &[FileAttr], size: u32) -> Vec<u8> {
            let mut out = Vec::new();
            let mut list = DirentList::new(&mut out, size);
            for (i, a) in attrs.iter().enumerate() {
                let name = format!("entry-{}", "x".repeat(i));
                if !list.add_if_fits(a.ino.0, i as u64 + 1, a.kind, OsStr::new(&name)) {
                    break;
                }
            }
            out
        }

        pub fn expected_readdirplus(attrs: &[FileAttr], size: u32) -> Vec<u8> {
            let mut out = Vec::new();
            let mut list = DirentPlusList::new(&mut out, size);
            for (i, a) in attrs.iter().enumerate() {
                let name = format!("plus-{}", "y".repeat(i));
                if !list.add_if_fits(&TTL, a, GENERATION, i as u64 + 7, OsStr::new(&name)) {
                    break;
                }
            }
            out
        }

        /// The test's side of the socket fuser reads as its device.
        pub struct Kernel {
            fd: OwnedFd,
            unique: u64,
        }

        pub fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
            crate::relay::seqpacket_pair().unwrap()
        }

        impl Kernel {
            pub fn new(fd: OwnedFd) -> Kernel {
                crate::relay::set_receive_timeout(
                    std::os::fd::AsFd::as_fd(&fd),
                    Duration::from_secs(10),
                )
                .unwrap();
                Kernel { fd, unique: 0 }
            }

            /// Sends one request (header built here) and returns its unique.
            pub fn send(&mut self, opcode: u32, nodeid: u64, body: &[u8]) -> u64 {
                self.unique += 2;
                let len = (40 + body.len()) as u32;
                let mut msg = Vec::with_capacity(len as usize);
                msg.extend_from_slice(&len.to_ne_bytes());
                msg.extend_from_slice(&opcode.to_ne_bytes());
                msg.extend_from_slice(&self.unique.to_ne_bytes());
                msg.extend_from_slice(&nodeid.to_ne_bytes());
                msg.extend_from_slice(&[0; 16]); // uid, gid, pid, total_extlen, padding
                msg.extend_from_slice(body);
                // SAFETY: valid buffer.
                let n = unsafe {
                    libc::send(
                        self.fd.as_raw_fd(),
                        msg.as_ptr().cast(),
                        msg.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                assert_eq!(n, msg.len() as isize, "send to fuser");
                self.unique
            }

            /// Receives one reply; checks its header against `unique` and success, returns
            /// the payload.
            pub fn payload(&self, unique: u64) -> Vec<u8> {
                let mut buf = vec![0u8; 1 << 16];
                // SAFETY: valid buffer.
                let n = unsafe {
                    libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
                };
                assert!(
                    n >= 16,
                    "no reply from fuser: {}",
                    std::io::Error::last_os_error()
                );
                buf.truncate(n as usize);
                assert_eq!(u32_at(&buf, 0), Some(n as u32), "len");
                assert_eq!(u32_at(&buf, 4), Some(0), "error");
                assert_eq!(u64_at(&buf, 8), Some(unique), "unique");
                buf.split_off(16)
            }
        }
    }

    /// SETATTR bodies: every field set with distinct values, each time as "now", negative
    /// and out-of-range times, no field, and bits fuser does not pass on.
    fn setattr_bodies() -> Vec<Vec<u8>> {
        let make = |valid: u32, atime: i64, atimensec: u32, mtime: i64, mtimensec: u32| {
            let mut b = vec![0u8; SETATTR_IN_LEN];
            b[0..4].copy_from_slice(&valid.to_ne_bytes());
            b[8..16].copy_from_slice(&0xF00Du64.to_ne_bytes());
            b[16..24].copy_from_slice(&(5u64 << 32 | 7).to_ne_bytes());
            b[32..40].copy_from_slice(&atime.to_ne_bytes());
            b[40..48].copy_from_slice(&mtime.to_ne_bytes());
            b[48..56].copy_from_slice(&99i64.to_ne_bytes());
            b[56..60].copy_from_slice(&atimensec.to_ne_bytes());
            b[60..64].copy_from_slice(&mtimensec.to_ne_bytes());
            b[68..72].copy_from_slice(&0o104755u32.to_ne_bytes());
            b[76..80].copy_from_slice(&1234u32.to_ne_bytes());
            b[80..84].copy_from_slice(&5678u32.to_ne_bytes());
            b
        };
        let every = FATTR_MODE | FATTR_UID | FATTR_GID | FATTR_SIZE | FATTR_ATIME | FATTR_MTIME;
        vec![
            make(
                every | FATTR_FH,
                1_700_000_000,
                123,
                1_600_000_000,
                999_999_999,
            ),
            make(every | FATTR_ATIME_NOW | FATTR_MTIME_NOW, 1, 2, 3, 4),
            make(FATTR_ATIME | FATTR_MTIME | FATTR_MTIME_NOW, -5, 500, 0, 0),
            make(FATTR_ATIME_NOW | FATTR_MTIME_NOW, 7, 0, 8, 0),
            make(FATTR_SIZE, 0, 0, 0, 0),
            make(0, 0, 0, 0, 0),
            // FATTR_LOCKOWNER, FATTR_CTIME, FATTR_KILL_SUIDGID and unknown bits.
            make(FATTR_UID | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 30, 0, 0, 0, 0),
        ]
    }

    #[test]
    fn setattr_times_fuser_cannot_hold_are_left_to_it() {
        let mut b = vec![0u8; SETATTR_IN_LEN];
        b[0..4].copy_from_slice(&FATTR_ATIME.to_ne_bytes());
        b[32..40].copy_from_slice(&i64::MIN.to_ne_bytes());
        b[56..60].copy_from_slice(&1u32.to_ne_bytes());
        assert_eq!(parse_setattr(&b), None);
        assert_eq!(parse_setattr(&b[..SETATTR_IN_LEN - 1]), None);
        b[0..4].copy_from_slice(&FATTR_MODE.to_ne_bytes());
        assert_eq!(parse_setattr(&b).map(|s| s.atime), Some(None));
    }

    fn awkward_attrs() -> Vec<FileAttr> {
        let base = attr_sample();
        vec![
            FileAttr {
                ino: INodeNo(1),
                kind: FileType::Directory,
                perm: 0o755,
                ..base
            },
            base,
            FileAttr {
                ino: INodeNo(2),
                // Bits outside 0o7777 in perm: fuser or's them in as they are.
                perm: 0o177777,
                kind: FileType::RegularFile,
                atime: UNIX_EPOCH - Duration::new(i64::MAX as u64, 1),
                mtime: UNIX_EPOCH - Duration::new(0, 999_999_999),
                ctime: UNIX_EPOCH + Duration::new(u32::MAX as u64 * 4, 999_999_999),
                flags: u32::MAX,
                rdev: u32::MAX,
                blksize: 0,
                ..base
            },
            FileAttr {
                ino: INodeNo(3),
                kind: FileType::CharDevice,
                ..base
            },
            FileAttr {
                ino: INodeNo(4),
                kind: FileType::BlockDevice,
                ..base
            },
            FileAttr {
                ino: INodeNo(5),
                kind: FileType::NamedPipe,
                ..base
            },
            FileAttr {
                ino: INodeNo(u64::MAX),
                kind: FileType::Socket,
                ..base
            },
        ]
    }

    /// fuser's replies for LOOKUP, GETATTR, SETATTR, OPEN, CREATE, WRITE and READDIR are byte
    /// for byte what our encoders produce from the same values, and its decoding of SETATTR
    /// is ours.
    #[test]
    fn encoders_match_fuser_0_18_bytes() {
        use oracle::*;
        let attrs = awkward_attrs();
        let (kernel_end, fuser_end) = seqpacket_pair();
        let mut kernel = Kernel::new(kernel_end);

        // FUSE_INIT 7.31 with no capabilities; queued before fuser reads it.
        let mut init = Vec::new();
        for word in [7u32, 31, 128 * 1024, 0, 0] {
            init.extend_from_slice(&word.to_ne_bytes());
        }
        init.extend_from_slice(&[0; 44]);
        let init_unique = kernel.send(26, 0, &init);
        let mut config = fuser::Config::default();
        config.n_threads = Some(1);
        config.clone_fd = false;
        let setattrs = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let made = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
        let session = fuser::Session::from_fd(
            Fixed {
                attrs: attrs.clone(),
                setattrs: setattrs.clone(),
                made: made.clone(),
            },
            fuser_end,
            fuser::SessionACL::All,
            config,
        )
        .unwrap();
        kernel.payload(init_unique);
        let running = std::thread::spawn(move || session.run());

        for (i, attr) in attrs.iter().enumerate() {
            let name = format!("{i}\0");
            let u = kernel.send(1, 1, name.as_bytes());
            assert_eq!(kernel.payload(u), expected_lookup(attr), "LOOKUP {i}");

            let getattr_in = [0u8; 16];
            let u = kernel.send(3, i as u64, &getattr_in);
            assert_eq!(kernel.payload(u), expected_getattr(attr), "GETATTR {i}");

            let mut create_in = vec![0u8; 16];
            create_in.extend_from_slice(name.as_bytes());
            let u = kernel.send(35, 1, &create_in);
            assert_eq!(kernel.payload(u), expected_create(attr), "CREATE {i}");
        }

        let u = kernel.send(14, 2, &[0u8; 8]);
        assert_eq!(kernel.payload(u), expected_open(), "OPEN");

        let mut write_in = vec![0u8; 40];
        write_in[16..20].copy_from_slice(&11u32.to_ne_bytes());
        write_in.extend_from_slice(b"hello world");
        let u = kernel.send(16, 2, &write_in);
        let mut written = Vec::new();
        put_write_out(&mut written, 11);
        assert_eq!(kernel.payload(u), written, "WRITE");

        // SETATTR: fuser's decoding of each body is ours, and its reply GETATTR's.
        for body in setattr_bodies() {
            let u = kernel.send(4, 2, &body);
            assert_eq!(kernel.payload(u), expected_getattr(&attrs[2]), "SETATTR");
            let theirs = setattrs.lock().pop();
            assert_eq!(parse_setattr(&body), theirs, "SETATTR {body:?}");
        }

        // MKDIR, SYMLINK, LINK, RENAME: fuser's decoding is ours; entries as LOOKUP's.
        let cat = |parts: &[&[u8]]| parts.concat();
        let mkdir = cat(&[&0o40755u32.to_ne_bytes(), &0o22u32.to_ne_bytes(), b"dir\0"]);
        let (mode, name) = parse_mkdir(&mkdir).unwrap();
        let ours = decoded("mkdir", 7, mode.into(), name, OsStr::new(""));
        let u = kernel.send(9, 7, &mkdir);
        assert_eq!(kernel.payload(u), expected_lookup(&attrs[2]), "MKDIR");
        assert_eq!(made.lock().pop(), Some(ours), "MKDIR decoded");

        let symlink = cat(&[b"ln\0", b"../a b/\xffc\0"]);
        let (name, target) = parse_symlink(&symlink).unwrap();
        let ours = decoded("symlink", 7, 0, name, target);
        let u = kernel.send(6, 7, &symlink);
        assert_eq!(kernel.payload(u), expected_lookup(&attrs[2]), "SYMLINK");
        assert_eq!(made.lock().pop(), Some(ours), "SYMLINK decoded");

        let link = cat(&[&0x1234_5678_9abcu64.to_ne_bytes(), b"hard\0"]);
        let (old, name) = parse_link(&link).unwrap();
        let ours = decoded("link", 7, old, name, OsStr::new(""));
        let u = kernel.send(13, 7, &link);
        assert_eq!(kernel.payload(u), expected_lookup(&attrs[2]), "LINK");
        assert_eq!(made.lock().pop(), Some(ours), "LINK decoded");

        let rename = cat(&[&42u64.to_ne_bytes(), b"from\0", b"to\0"]);
        let (newdir, name, newname) = parse_rename(&rename).unwrap();
        let ours = decoded("rename", 7, newdir, name, newname);
        let u = kernel.send(12, 7, &rename);
        assert_eq!(kernel.payload(u), Vec::<u8>::new(), "RENAME");
        assert_eq!(made.lock().pop(), Some(ours), "RENAME decoded");

        // Sizes that cut the listing at different places, including mid-entry.
        for size in [4096u32, 0, 31, 32, 33, 100, 200, 152, 160, 320, 500] {
            let mut read_in = vec![0u8; 40];
            read_in[16..20].copy_from_slice(&size.to_ne_bytes());
            let u = kernel.send(28, 1, &read_in);
            assert_eq!(
                kernel.payload(u),
                expected_readdir(&attrs, size),
                "READDIR size {size}"
            );
            let u = kernel.send(44, 1, &read_in);
            assert_eq!(
                kernel.payload(u),
                expected_readdirplus(&attrs, size),
                "READDIRPLUS size {size}"
            );
        }

        let u = kernel.send(38, 0, &[]);
        kernel.payload(u);
        running.join().unwrap().unwrap();
    }
}
