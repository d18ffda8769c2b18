//! A tiny loop device that exists only so the union can be mounted as `fuseblk`.
//!
//! Why: the kernel forwards `syncfs(2)` to a FUSE server (as FUSE_SYNCFS) only for a
//! `fuseblk` mount, and a `fuseblk` mount needs a block device as its source. The device's
//! content is never read or written by anyone: FUSE only opens it.
//!
//! Owns: the backing memory (a memfd, so nothing is left on any disk), the attach, and the
//! autoclear flag that makes the kernel detach the device by itself when the mount (its
//! last opener) goes away. Must never: leave a device attached when the mount was not made
//! (dropping [`LoopDevice`] before mounting detaches it), or touch a loop device it did not
//! configure itself.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use crate::sys;

/// Size of the backing memory. FUSE never reads the device; the kernel only needs it to
/// have a size that is a whole number of the mount's 512-byte blocks.
const BACKING_BYTES: u64 = 64 << 10;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_AUTOCLEAR: u32 = 4;
const LO_NAME_SIZE: usize = 64;
const LO_KEY_SIZE: usize = 32;

/// `struct loop_info64` from `<linux/loop.h>`.
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; LO_KEY_SIZE],
    lo_init: [u64; 2],
}

/// `struct loop_config` from `<linux/loop.h>`.
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

/// An attached loop device, held open until the mount that uses it is made.
#[derive(Debug)]
pub struct LoopDevice {
    path: PathBuf,
    /// Held so autoclear cannot detach the device before the mount opens it.
    _device: OwnedFd,
}

impl LoopDevice {
    /// Attaches a fresh loop device to a small anonymous memory file, with autoclear set.
    /// Needs CAP_SYS_ADMIN (loop-control) — the same privilege a `fuseblk` mount needs.
    pub fn attach_tiny() -> io::Result<LoopDevice> {
        let backing = memfd("ovlfuse-fuseblk")?;
        sys::ftruncate(std::os::fd::AsFd::as_fd(&backing), BACKING_BYTES)?;
        let control = open_path(c"/dev/loop-control", libc::O_RDWR)?;
        // Another process may take the free device between GET_FREE and CONFIGURE (EBUSY):
        // ask again a few times.
        let mut last = io::Error::from_raw_os_error(libc::EBUSY);
        for _ in 0..16 {
            // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number.
            let n = unsafe { libc::ioctl(control.as_raw_fd(), LOOP_CTL_GET_FREE) };
            if n < 0 {
                return Err(annotate(io::Error::last_os_error(), "/dev/loop-control"));
            }
            let path = format!("/dev/loop{n}");
            let c_path = CString::new(path.clone()).map_err(io::Error::other)?;
            let device = match open_path(&c_path, libc::O_RDWR) {
                Ok(d) => d,
                Err(e) => return Err(annotate(e, &path)),
            };
            let mut info: LoopInfo64 = unsafe { std::mem::zeroed() };
            info.lo_flags = LO_FLAGS_AUTOCLEAR;
            let name = b"ovlfuse-fuseblk";
            info.lo_file_name[..name.len()].copy_from_slice(name);
            let config = LoopConfig {
                fd: backing.as_raw_fd() as u32,
                block_size: 0,
                info,
                reserved: [0; 8],
            };
            // SAFETY: valid device fd and a fully initialised loop_config.
            let rc = unsafe { libc::ioctl(device.as_raw_fd(), LOOP_CONFIGURE, &config) };
            if rc == 0 {
                return Ok(LoopDevice {
                    path: PathBuf::from(path),
                    _device: device,
                });
            }
            last = io::Error::last_os_error();
            if last.raw_os_error() != Some(libc::EBUSY) {
                return Err(annotate(last, &path));
            }
        }
        Err(annotate(last, "loop device"))
    }

    /// The device node, e.g. `/dev/loop3`: the mount's source.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }
}

/// Runs `mount` with a source string for the block device `device` that reads `name` in
/// the mount table, so `df`, `findmnt` and container tools see the union's fsname rather
/// than `/dev/loopN`: the kernel records a block device's source exactly as passed, and
/// resolves it relative to the caller's working directory. So a node named `name` for the
/// same device is made in a private directory, the process works there for the duration
/// of the call, and the node goes afterwards (the mount holds the device itself).
///
/// Falls back to the device path when `name` is not a plain file name or the node cannot
/// be made. Changes the working directory of the whole process while `mount` runs: call it
/// before any other thread exists that resolves relative paths.
pub fn with_source_named<T>(
    device: &std::path::Path,
    name: &str,
    mount: impl FnOnce(&std::ffi::OsStr) -> T,
) -> T {
    let plain = !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() < 256;
    let staged = if plain {
        NamedNode::make(device, name)
    } else {
        Err(io::Error::other("not a plain name"))
    };
    match staged {
        Ok(node) => {
            let result = mount(std::ffi::OsStr::new(name));
            drop(node);
            result
        }
        Err(e) => {
            if plain {
                log::debug!(
                    "cannot name the fuseblk source {name:?} ({e}); showing the device path"
                );
            }
            mount(device.as_os_str())
        }
    }
}

/// A block device node in a private directory that is the working directory until drop.
struct NamedNode {
    dir: PathBuf,
    node: PathBuf,
    previous_cwd: PathBuf,
}

impl NamedNode {
    fn make(device: &std::path::Path, name: &str) -> io::Result<NamedNode> {
        use std::os::unix::fs::FileTypeExt;
        let meta = std::fs::metadata(device)?;
        if !meta.file_type().is_block_device() {
            return Err(io::Error::other("not a block device"));
        }
        let rdev = std::os::unix::fs::MetadataExt::rdev(&meta);
        let dir =
            std::env::temp_dir().join(format!(".ovlfuse-source-{}-{:x}", std::process::id(), rdev));
        std::fs::create_dir(&dir)?;
        let node = dir.join(name);
        let c_node = CString::new(std::os::unix::ffi::OsStrExt::as_bytes(node.as_os_str()))
            .map_err(io::Error::other)?;
        // SAFETY: valid C string.
        if unsafe { libc::mknod(c_node.as_ptr(), libc::S_IFBLK | 0o600, rdev as libc::dev_t) } != 0
        {
            let e = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        let previous_cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
        if let Err(e) = std::env::set_current_dir(&dir) {
            let _ = std::fs::remove_file(&node);
            let _ = std::fs::remove_dir(&dir);
            return Err(e);
        }
        Ok(NamedNode {
            dir,
            node,
            previous_cwd,
        })
    }
}

impl Drop for NamedNode {
    fn drop(&mut self) {
        let _ = std::env::set_current_dir(&self.previous_cwd);
        let _ = std::fs::remove_file(&self.node);
        let _ = std::fs::remove_dir(&self.dir);
    }
}

fn memfd(name: &str) -> io::Result<OwnedFd> {
    let c_name = CString::new(name).map_err(io::Error::other)?;
    // SAFETY: valid C string; the returned fd is owned by us.
    let fd = unsafe { libc::memfd_create(c_name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_path(path: &std::ffi::CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: valid C string.
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fresh descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attached(path: &std::path::Path) -> bool {
        let name = path.file_name().unwrap_or_default();
        std::path::Path::new("/sys/block")
            .join(name)
            .join("loop/backing_file")
            .exists()
    }

    #[test]
    fn an_unused_device_detaches_when_dropped() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let dev = LoopDevice::attach_tiny().expect("attach");
        let path = dev.path().to_path_buf();
        assert!(attached(&path), "{} not attached", path.display());
        drop(dev);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while attached(&path) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!attached(&path), "{} still attached", path.display());
    }
}
