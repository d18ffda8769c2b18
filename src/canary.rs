//! The invisible file through which the daemon makes the kernel record an upper writeback
//! error in the FUSE superblock's own errseq, so that `syncfs(2)` on the union reports it
//! once per open file, exactly as ext4 reports its own.
//!
//! How: the kernel records an error in the superblock when the writeback of a FUSE page
//! fails. The daemon opens this file through the mount, dirties one page of a shared
//! mapping and msyncs it; the FUSE_WRITE that follows is answered with the upper errno,
//! and from then on every descriptor of the union opened before (or while the error is
//! unseen) gets it once from syncfs. A shared mapping is used rather than the writeback
//! cache because the kernel refuses FUSE passthrough together with the writeback cache.
//!
//! Owns: the file's name (random per mount), its node id, who may look it up, and what its
//! writes answer. Must never: be visible to anyone but the injecting daemon thread (lookups
//! from any other thread get ENOENT; it is never listed; its entry and attributes are never
//! cached by the kernel), be held open longer than one injection (an open file would make
//! `umount` fail with EBUSY), or be injected from a FUSE worker thread (the injection's own
//! requests need a worker, or the relay, to answer them).

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use parking_lot::Mutex;

/// The canary's node id and inode number: above every id the inode table hands out (its
/// counter starts at 0xff << 56 and would need 2^56 copy-ups to get here).
pub const CANARY_ID: u64 = u64::MAX;
/// The file handle of every open of the canary.
pub const CANARY_FH: u64 = u64::MAX;
/// The canary's size: one page, all it ever needs.
pub const CANARY_SIZE: u64 = 4096;

/// One mount's canary.
pub struct Canary {
    name: OsString,
    mountpoint: PathBuf,
    /// Thread id allowed to look the canary up (0: nobody): the injecting thread, for the
    /// duration of one injection.
    allowed_tid: AtomicI32,
    /// The errno the canary's writes fail with (0: writes succeed and are discarded).
    pending: AtomicI32,
    /// One injection at a time.
    injecting: Mutex<()>,
}

impl Canary {
    /// A canary for the union mounted at `mountpoint`, under a name nobody can guess.
    pub fn new(mountpoint: PathBuf) -> Canary {
        Canary {
            name: OsString::from(format!(".ovlfuse-errseq-{:016x}", random_u64())),
            mountpoint,
            allowed_tid: AtomicI32::new(0),
            pending: AtomicI32::new(0),
            injecting: Mutex::new(()),
        }
    }

    /// Whether a LOOKUP of `name` in the root, made by thread `pid`, is the injector
    /// looking for the canary. Everyone else gets the union's own answer for the name.
    pub fn is_lookup(&self, name: &OsStr, pid: u32) -> bool {
        let allowed = self.allowed_tid.load(Ordering::Acquire);
        allowed != 0 && allowed as u32 == pid && name == self.name.as_os_str()
    }

    /// Whether `name` (in the root) is the canary's: a failed lookup of it by anyone else
    /// must not leave a cached negative entry, which would hide it from the injector.
    pub fn is_name(&self, name: &OsStr) -> bool {
        name == self.name.as_os_str()
    }

    /// What a WRITE to the canary answers: `Some(errno)` while an injection is running.
    pub fn write_error(&self) -> Option<i32> {
        match self.pending.load(Ordering::Acquire) {
            0 => None,
            e => Some(e),
        }
    }

    /// Makes the kernel record `errno` in the union's superblock errseq. Runs in the calling
    /// thread, which must not be a FUSE worker; returns once the kernel has recorded it.
    pub fn inject(&self, errno: i32) -> io::Result<()> {
        let _one = self.injecting.lock();
        // SAFETY: gettid has no failure mode.
        let tid = unsafe { libc::gettid() };
        self.pending.store(errno, Ordering::Release);
        self.allowed_tid.store(tid, Ordering::Release);
        let result = self.dirty_and_write_back();
        self.allowed_tid.store(0, Ordering::Release);
        self.pending.store(0, Ordering::Release);
        result
    }

    fn dirty_and_write_back(&self) -> io::Result<()> {
        let path = self.mountpoint.join(&self.name);
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|_| io::Error::other("mountpoint contains a NUL byte"))?;
        // SAFETY: valid C string; the fd is owned below.
        let fd = unsafe { libc::open(c_path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fresh descriptor.
        let file = unsafe { OwnedFd::from_raw_fd(fd) };
        let len = CANARY_SIZE as usize;
        // SAFETY: a fresh shared mapping of the open file; unmapped below.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the mapping is `len` bytes long and writable; the volatile write makes
        // sure the page is really dirtied (page_mkwrite), whatever it held before.
        unsafe {
            let byte = map.cast::<u8>();
            std::ptr::write_volatile(byte, std::ptr::read_volatile(byte).wrapping_add(1));
        }
        // The writeback FUSE_WRITE is answered with the error; msync waits for it and then
        // reports it (to this descriptor only, which is closed right away).
        // SAFETY: the mapping made above.
        let synced = unsafe { libc::msync(map, len, libc::MS_SYNC) };
        let msync_error = (synced != 0).then(io::Error::last_os_error);
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(map, len) };
        drop(file);
        match msync_error {
            Some(e) if e.raw_os_error() == Some(self.pending.load(Ordering::Acquire)) => Ok(()),
            Some(e) => Err(io::Error::new(
                e.kind(),
                format!("msync reported {e}, not the injected error"),
            )),
            None => Err(io::Error::other(
                "the canary page was written back without the injected error",
            )),
        }
    }
}

/// 64 random bits from the kernel (getrandom), falling back to time and pid.
fn random_u64() -> u64 {
    let mut buf = [0u8; 8];
    // SAFETY: valid buffer of 8 bytes.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n == 8 {
        return u64::from_ne_bytes(buf);
    }
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    nanos ^ (u64::from(std::process::id()) << 32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_injecting_thread_finds_it_and_only_meanwhile() {
        let c = Canary::new(PathBuf::from("/nonexistent"));
        let name = c.name.clone();
        // SAFETY: gettid has no failure mode.
        let me = unsafe { libc::gettid() } as u32;
        assert!(!c.is_lookup(&name, me), "visible outside an injection");
        c.allowed_tid.store(me as i32, Ordering::Release);
        assert!(c.is_lookup(&name, me));
        assert!(!c.is_lookup(&name, me + 1), "visible to another thread");
        assert!(!c.is_lookup(OsStr::new(".ovlfuse-errseq-0"), me));
    }

    #[test]
    fn names_differ_between_mounts() {
        let a = Canary::new(PathBuf::from("/a"));
        let b = Canary::new(PathBuf::from("/a"));
        assert_ne!(a.name, b.name);
    }

    #[test]
    fn a_failed_injection_leaves_nothing_armed() {
        let c = Canary::new(PathBuf::from("/nonexistent-ovlfuse-mount"));
        assert!(c.inject(libc::EIO).is_err());
        assert_eq!(c.write_error(), None);
        assert_eq!(c.allowed_tid.load(Ordering::Acquire), 0);
    }
}
