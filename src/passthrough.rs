//! FUSE passthrough: the kernel reads, writes and maps an open upper file itself, with no
//! request to the daemon per read(2) or write(2) (kernel >= 6.9, CAP_SYS_ADMIN).
//!
//! The kernel's rules (fs/fuse/iomode.c), which this module exists to keep:
//! - the opens of one FUSE inode that are alive at the same time are either all cached
//!   (served by the daemon, through the page cache) or all passthrough;
//! - all the passthrough opens alive on one inode use the same backing file;
//! - an open whose reply breaks either rule fails with EIO in the caller.
//!
//! So the mode of a new open is decided per node, from the opens of that node we answered and
//! have not yet seen released: the kernel drops an open's mode before it sends RELEASE, so
//! our count is never below its own, and a decision based on it is never refused. Counts
//! leave only with the last release, never at FORGET: a FORGET of an old kernel inode can
//! be handled after a LOOKUP that gave the same node id to a new one, whose opens count here
//! too. An open whose answer was lost (its caller interrupted) stays counted; if its node
//! later stands for another object, the stale backing file is dropped, not used.
//!
//! Which opens may pass through is the adapter's call (`fs`): only upper files, never lower
//! ones (a read-only open of a lower file must switch to the upper copy once another open
//! copies it up, which a fixed backing file could not). Set-id bits still get cleared: before
//! a passthrough write the kernel checks the FUSE inode and, when a bit must go, sends the
//! same empty SETATTR as for a cached write, which `attrs` answers by the kernel's rules
//! (the permission tests write set-id upper files this way).
//!
//! Owns: a descriptor of the mount's `/dev/fuse` connection (the backing ioctls are made
//! on it; on fuseblk that is the relay's device), the backing ids handed to the kernel,
//! and the per-node open counts. Must never: answer an open in a mode the kernel would
//! refuse, or close a backing id while an open we answered may still use it.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::handles::ObjRef;

/// How the kernel serves one open file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// Reads and writes are requests to the daemon (and the page cache).
    Cached,
    /// Reads, writes and mmap go to the upper file behind this backing id.
    Passthrough(u32),
}

impl IoMode {
    /// The `backing_id` of an open reply in this mode (0: none).
    pub fn backing_id(self) -> i32 {
        match self {
            IoMode::Passthrough(id) => id as i32,
            IoMode::Cached => 0,
        }
    }
}

/// The opens of one node we answered and have not seen released.
#[derive(Debug)]
enum NodeOpens {
    Cached {
        opens: usize,
    },
    /// `object`: the upper object the backing file was opened on.
    Passthrough {
        backing_id: u32,
        object: ObjRef,
        opens: usize,
    },
}

/// `FUSE_DEV_IOC_BACKING_CLOSE`: `_IOW(229, 2, uint32_t)`.
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = 0x4004_e502;

/// The mount's passthrough state.
pub struct Passthrough {
    device: OnceLock<OwnedFd>,
    /// Whether new backing files may be opened: set when the kernel agrees at INIT; cleared
    /// for good when the kernel refuses one for a reason that would repeat.
    enabled: AtomicBool,
    nodes: Mutex<HashMap<u64, NodeOpens>>,
}

impl Passthrough {
    /// No passthrough until a device is set: every open is cached.
    pub fn off() -> Passthrough {
        Passthrough {
            device: OnceLock::new(),
            enabled: AtomicBool::new(false),
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// Passthrough through the connection `device`, once [`Passthrough::agreed`] is called
    /// (before INIT; a second device is ignored).
    pub fn set_device(&self, device: OwnedFd) {
        let _ = self.device.set(device);
    }

    /// Whether a device was given, so INIT should ask the kernel for passthrough.
    pub fn wanted(&self) -> bool {
        self.device.get().is_some()
    }

    /// The kernel agreed to FUSE_PASSTHROUGH at INIT.
    pub fn agreed(&self) {
        if self.wanted() {
            self.enabled.store(true, Ordering::Release);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    /// Decides how the kernel serves a new open of node `id`, now standing for `object`,
    /// and counts it until
    /// [`Passthrough::release`]. `upper` is the open upper file when the adapter allows
    /// passthrough for it. An open of a node that already has passthrough opens alive
    /// passes through too, to the same backing file, whatever `upper` says: the kernel
    /// accepts nothing else.
    pub fn open(&self, id: u64, object: &ObjRef, upper: Option<BorrowedFd<'_>>) -> IoMode {
        let mut nodes = self.nodes.lock();
        match nodes.get_mut(&id) {
            Some(NodeOpens::Passthrough {
                backing_id,
                object: backed,
                opens,
            }) if ObjRef::same(backed, object) => {
                *opens += 1;
                return IoMode::Passthrough(*backing_id);
            }
            Some(NodeOpens::Passthrough { backing_id, .. }) => {
                // The object behind the backing file is gone (our descriptors would have
                // kept it otherwise), so nothing open uses it: only a lost answer kept it.
                let stale = *backing_id;
                nodes.remove(&id);
                self.backing_close(stale);
            }
            Some(NodeOpens::Cached { opens }) => {
                *opens += 1;
                return IoMode::Cached;
            }
            None => {}
        }
        let backing = match (upper, self.device.get()) {
            (Some(file), Some(device)) if self.enabled() => self.backing_open(device, file),
            _ => None,
        };
        let (entry, mode) = match backing {
            Some(backing_id) => (
                NodeOpens::Passthrough {
                    backing_id,
                    object: object.clone(),
                    opens: 1,
                },
                IoMode::Passthrough(backing_id),
            ),
            None => (NodeOpens::Cached { opens: 1 }, IoMode::Cached),
        };
        nodes.insert(id, entry);
        mode
    }

    /// An open of node `id` answered with `mode` was released (or its answer never reached
    /// the kernel). The last passthrough open closes the backing id.
    pub fn release(&self, id: u64, mode: IoMode) {
        let mut nodes = self.nodes.lock();
        let last = match nodes.get_mut(&id) {
            Some(NodeOpens::Cached { opens }) if mode == IoMode::Cached => {
                *opens -= 1;
                *opens == 0
            }
            Some(NodeOpens::Passthrough {
                backing_id, opens, ..
            }) if mode == IoMode::Passthrough(*backing_id) => {
                *opens -= 1;
                *opens == 0
            }
            other => {
                log::error!(
                    "passthrough: release of node {id} in mode {mode:?} does not match its opens ({other:?})"
                );
                return;
            }
        };
        if last && let Some(NodeOpens::Passthrough { backing_id, .. }) = nodes.remove(&id) {
            self.backing_close(backing_id);
        }
    }

    fn backing_open(&self, device: &OwnedFd, file: BorrowedFd<'_>) -> Option<u32> {
        match fuser::BackingId::create_raw(device, file) {
            Ok(id) => Some(id),
            Err(e) => {
                // EPERM (no CAP_SYS_ADMIN), ELOOP (the layer is itself stacked),
                // EOPNOTSUPP (its filesystem cannot be read through): every later file
                // would be refused the same way.
                let lasting = matches!(
                    e.raw_os_error(),
                    Some(libc::EPERM | libc::ELOOP | libc::EOPNOTSUPP | libc::EINVAL)
                );
                if lasting && self.enabled.swap(false, Ordering::AcqRel) {
                    log::warn!("passthrough: the kernel refuses backing files ({e}); turned off");
                } else if !lasting {
                    log::debug!("passthrough: no backing file for this open ({e})");
                }
                None
            }
        }
    }

    fn backing_close(&self, backing_id: u32) {
        let Some(device) = self.device.get() else {
            return;
        };
        // SAFETY: an ioctl taking a pointer to a u32 that lives across the call.
        let rc = unsafe {
            libc::ioctl(
                device.as_raw_fd(),
                FUSE_DEV_IOC_BACKING_CLOSE as _,
                &backing_id as *const u32,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // ENODEV: the connection is gone, and every backing file with it.
            if e.raw_os_error() != Some(libc::ENODEV) {
                log::warn!("passthrough: closing backing id {backing_id} failed: {e}");
            }
        }
    }
}
