//! FUSE over io_uring: the kernel's second transport for requests (Linux 6.14 and later,
//! `fuse.enable_uring=Y`), as the relay uses it.
//!
//! Why: on a virtual machine most of a FUSE round trip is the wakeup of an idle vCPU.
//! Through `/dev/fuse` a request wakes whichever reading thread is first in line, on
//! whatever CPU it sleeps, and the reply wakes the caller back across CPUs. Through
//! io_uring the kernel queues each request on the queue of the CPU its caller runs on; the
//! thread serving that queue is pinned to the same CPU, so the caller's sleep hands the CPU
//! straight to the server and the reply hands it straight back.
//!
//! The protocol, as `fs/fuse/dev_uring.c` implements it:
//! * one queue per *possible* CPU (`num_possible_cpus()`); the transport switches over
//!   only once every queue has a registered entry;
//! * an entry is two buffers registered with `FUSE_IO_URING_CMD_REGISTER` (an
//!   `IORING_OP_URING_CMD` on the `/dev/fuse` descriptor, 128-byte SQEs): a 288-byte header
//!   (`fuse_in_header`/`fuse_out_header` at 0, the opcode's own header at 128, and
//!   `fuse_uring_ent_in_out` at 256, whose `payload_sz` says how much of the payload is
//!   valid) and a payload buffer of at least the connection's largest request or reply;
//! * the command completes when a request is in the buffers; the reply is written into
//!   the same buffers and handed back with `FUSE_IO_URING_CMD_COMMIT_AND_FETCH`, which also
//!   re-arms the entry for the next request;
//! * FORGET and INTERRUPT still come through `/dev/fuse` reads, so those stay.
//!
//! This module owns one queue's ring and entries; [`crate::relay`] decides what to do with
//! the requests.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use io_uring::{IoUring, cqueue, opcode, squeue, types};

use crate::relay::{IN_HEADER_LEN, InHeader};

/// `FUSE_OVER_IO_URING` (bit 41 of the INIT flags) as a bit of the `flags2` word.
pub const FLAGS2_OVER_IO_URING: u32 = 1 << (41 - 32);

const CMD_REGISTER: u32 = 1;
const CMD_COMMIT_AND_FETCH: u32 = 2;

/// `struct fuse_uring_req_header`: in/out header, opcode header, `fuse_uring_ent_in_out`.
const HEADER_LEN: usize = 288;
const OP_HEADER_AT: usize = 128;
const OP_HEADER_MAX: usize = 128;
const PAYLOAD_SZ_AT: usize = 256 + 16;
const OUT_HEADER_LEN: usize = 16;

/// user_data of the read that wakes the queue thread for replies made elsewhere.
const WAKE: u64 = u64::MAX;

/// Whether the kernel lets a server use io_uring: the `fuse` module's `enable_uring`
/// parameter (root may flip it at any time; a connection that negotiated io_uring keeps it).
pub fn kernel_allows() -> bool {
    std::fs::read_to_string("/sys/module/fuse/parameters/enable_uring")
        .map(|s| s.trim() == "Y")
        .unwrap_or(false)
}

/// How many queues the kernel expects: one per possible CPU, numbered from 0.
pub fn queue_count() -> io::Result<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/possible")?;
    parse_cpu_list_end(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("cannot read the CPU list {:?}", text.trim()),
        )
    })
}

/// One past the highest CPU in a kernel CPU list such as `0-3,8,10-11`.
fn parse_cpu_list_end(text: &str) -> Option<usize> {
    let mut end = None;
    for part in text.trim().split(',') {
        let last = part.rsplit('-').next()?;
        let n: usize = last.trim().parse().ok()?;
        end = Some(end.unwrap_or(0).max(n + 1));
    }
    end
}

/// What one completion means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// Entry `idx` holds a request.
    Request(usize),
    /// Replies made on other threads are waiting in the mailbox.
    Wake,
    /// The kernel refused entry `idx`'s command with `errno` and the entry is out of
    /// service. ENOTCONN, ECONNABORTED and ECANCELED mean the connection is going away;
    /// a refused registration (`registering`) means the kernel fell back to `/dev/fuse`.
    Failed {
        idx: usize,
        errno: i32,
        registering: bool,
    },
}

/// Where an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EntryState {
    /// Its command is in the kernel, waiting for a request.
    Armed { registering: bool },
    /// It holds a request whose reply has not been committed yet.
    InHand,
    /// The kernel refused it; no longer used.
    Dead,
}

/// Whether a command failure means the connection itself is gone.
pub fn connection_gone(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENOTCONN | libc::ECONNABORTED | libc::ECANCELED | libc::ENODEV
    )
}

struct Entry {
    header: Box<[u8; HEADER_LEN]>,
    payload: Box<[u8]>,
    /// The two iovecs REGISTER points at; read by the kernel when it takes the command.
    iov: Box<[libc::iovec; 2]>,
    state: EntryState,
}

/// One queue: its ring, its entries, and the eventfd other threads use to wake it.
pub struct Queue {
    qid: u16,
    device: RawFd,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
    entries: Vec<Entry>,
    wake: OwnedFd,
    wake_buf: Box<u64>,
}

// SAFETY: the raw pointers in `Entry::iov` point into the entry's own boxed buffers, which
// move with it; nothing else aliases them across threads.
unsafe impl Send for Queue {}

impl Queue {
    /// Build the ring and buffers for queue `qid` of the connection on `device` (which must
    /// outlive the queue). `payload_len` must cover the largest request and reply. The ring
    /// starts disabled: [`Queue::start`] enables it on the thread that will serve it, because
    /// only that thread may submit (IORING_SETUP_SINGLE_ISSUER).
    pub fn new(qid: u16, device: RawFd, depth: usize, payload_len: usize) -> io::Result<Queue> {
        let sq_entries = u32::try_from((depth + 1).next_power_of_two())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_r_disabled()
            .build(sq_entries)?;
        // SAFETY: plain eventfd creation.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just created, owned by nobody else.
        let wake = unsafe { OwnedFd::from_raw_fd(efd) };
        let entries = (0..depth)
            .map(|_| {
                let mut header = Box::new([0u8; HEADER_LEN]);
                let mut payload = vec![0u8; payload_len].into_boxed_slice();
                let iov = Box::new([
                    libc::iovec {
                        iov_base: header.as_mut_ptr().cast(),
                        iov_len: HEADER_LEN,
                    },
                    libc::iovec {
                        iov_base: payload.as_mut_ptr().cast(),
                        iov_len: payload_len,
                    },
                ]);
                Entry {
                    header,
                    payload,
                    iov,
                    state: EntryState::Dead,
                }
            })
            .collect();
        Ok(Queue {
            qid,
            device,
            ring,
            entries,
            wake,
            wake_buf: Box::new(0),
        })
    }

    /// The descriptor other threads write to (an eventfd) after leaving replies for this
    /// queue.
    pub fn waker(&self) -> io::Result<OwnedFd> {
        self.wake.try_clone()
    }

    /// On the serving thread: enable the ring, register every entry and arm the wakeup.
    /// Registration results arrive as events.
    pub fn start(&mut self) -> io::Result<()> {
        self.ring.submitter().register_enable_rings()?;
        for idx in 0..self.entries.len() {
            self.register(idx)?;
        }
        self.arm_wake()?;
        self.ring.submit()?;
        Ok(())
    }

    /// Entries with a command in the kernel.
    pub fn armed(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| matches!(e.state, EntryState::Armed { .. }))
            .count()
    }

    /// Whether entry `idx` holds a request not committed yet.
    pub fn holds_request(&self, idx: usize) -> bool {
        self.entries
            .get(idx)
            .is_some_and(|e| e.state == EntryState::InHand)
    }

    /// Entries still in service: armed, or holding a request.
    pub fn live(&self) -> usize {
        self.entries
            .iter()
            .filter(|e| e.state != EntryState::Dead)
            .count()
    }

    /// (Re)register entry `idx`'s buffers as a fresh entry of this queue.
    pub fn register(&mut self, idx: usize) -> io::Result<()> {
        let addr = self.entries[idx].iov.as_ptr() as u64;
        let sqe = self.command(CMD_REGISTER, 0, idx, Some(addr));
        self.push(&sqe)?;
        self.entries[idx].state = EntryState::Armed { registering: true };
        Ok(())
    }

    fn command(
        &self,
        cmd_op: u32,
        commit_id: u64,
        idx: usize,
        addr: Option<u64>,
    ) -> squeue::Entry128 {
        // struct fuse_uring_cmd_req { u64 flags; u64 commit_id; u16 qid; u8 padding[6]; }
        let mut cmd = [0u8; 80];
        cmd[8..16].copy_from_slice(&commit_id.to_ne_bytes());
        cmd[16..18].copy_from_slice(&self.qid.to_ne_bytes());
        let mut builder = opcode::UringCmd80::new(types::Fd(self.device), cmd_op).cmd(cmd);
        if let Some(addr) = addr {
            builder = builder.addr(Some(addr));
        }
        let mut sqe = builder.build().user_data(idx as u64);
        if addr.is_some() {
            // REGISTER wants `len` = 2 (header and payload iovecs), a field the builder
            // does not expose. Entry128 is repr(C) over struct io_uring_sqe, whose `len`
            // is the u32 at byte 24.
            // SAFETY: offset 24..28 lies inside the 128-byte entry and holds a plain u32.
            unsafe {
                (&raw mut sqe)
                    .cast::<u8>()
                    .add(24)
                    .cast::<u32>()
                    .write_unaligned(2);
            }
        }
        sqe
    }

    fn arm_wake(&mut self) -> io::Result<()> {
        let buf = (&raw mut *self.wake_buf).cast::<u8>();
        let sqe: squeue::Entry128 = opcode::Read::new(types::Fd(self.wake.as_raw_fd()), buf, 8)
            .build()
            .user_data(WAKE)
            .into();
        self.push(&sqe)
    }

    fn push(&mut self, sqe: &squeue::Entry128) -> io::Result<()> {
        loop {
            // SAFETY: every buffer an SQE points at (entry buffers, iovecs, the wake
            // counter) is owned by this queue and outlives the command.
            if unsafe { self.ring.submission().push(sqe) }.is_ok() {
                return Ok(());
            }
            self.ring.submit()?;
        }
    }

    /// Submit what is queued, sleep until at least one completion, and append what
    /// completed to `events`.
    pub fn wait(&mut self, events: &mut Vec<Event>) -> io::Result<()> {
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => break,
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) =>
                {
                    if !self.ring.completion().is_empty() {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        let mut rearm_wake = false;
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            if data == WAKE {
                rearm_wake = true;
                events.push(Event::Wake);
                continue;
            }
            let Ok(idx) = usize::try_from(data) else {
                continue;
            };
            let Some(entry) = self.entries.get_mut(idx) else {
                continue;
            };
            let registering = matches!(entry.state, EntryState::Armed { registering: true });
            let res = cqe.result();
            if res < 0 {
                entry.state = EntryState::Dead;
                events.push(Event::Failed {
                    idx,
                    errno: -res,
                    registering,
                });
            } else {
                entry.state = EntryState::InHand;
                events.push(Event::Request(idx));
            }
        }
        if rearm_wake {
            self.arm_wake()?;
        }
        Ok(())
    }

    /// Copy the request in entry `idx` into `msg` laid out as `/dev/fuse` delivers it
    /// (fuse_in_header, opcode header, payload), and return its header. `None` if the
    /// kernel's lengths do not add up; the caller then fails the request.
    pub fn read_request(&self, idx: usize, msg: &mut Vec<u8>) -> Option<InHeader> {
        let entry = &self.entries[idx];
        let header = InHeader::parse(&entry.header[..IN_HEADER_LEN])?;
        let payload_sz = u32::from_ne_bytes(
            entry.header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4]
                .try_into()
                .ok()?,
        ) as usize;
        let op_len = (header.len as usize)
            .checked_sub(IN_HEADER_LEN)?
            .checked_sub(payload_sz)?;
        if op_len > OP_HEADER_MAX || payload_sz > entry.payload.len() {
            return None;
        }
        msg.clear();
        msg.extend_from_slice(&entry.header[..IN_HEADER_LEN]);
        msg.extend_from_slice(&entry.header[OP_HEADER_AT..OP_HEADER_AT + op_len]);
        msg.extend_from_slice(&entry.payload[..payload_sz]);
        Some(header)
    }

    /// The unique of the request in entry `idx`, for failing a request whose lengths do not
    /// add up.
    pub fn unique_of(&self, idx: usize) -> u64 {
        InHeader::parse(&self.entries[idx].header[..IN_HEADER_LEN]).map_or(0, |h| h.unique)
    }

    /// Hand the reply to request `unique` back through entry `idx` and re-arm the entry:
    /// `result` is 0 or a negative errno; the payload goes only with success. Submitted
    /// with the next [`Queue::wait`].
    pub fn commit(
        &mut self,
        idx: usize,
        unique: u64,
        result: i32,
        payload: &[u8],
    ) -> io::Result<()> {
        if !self.holds_request(idx) {
            // Committing an entry the kernel has armed would be refused and lose the entry.
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("entry {idx} holds no request"),
            ));
        }
        let entry = &mut self.entries[idx];
        let (result, payload) = if result != 0 {
            (result, &[][..])
        } else if payload.len() > entry.payload.len() {
            log::error!(
                "uring: a {}-byte reply to request {unique} exceeds the {}-byte buffer; answering EIO",
                payload.len(),
                entry.payload.len()
            );
            (-libc::EIO, &[][..])
        } else {
            (0, payload)
        };
        let len = (OUT_HEADER_LEN + payload.len()) as u32;
        entry.header[0..4].copy_from_slice(&len.to_ne_bytes());
        entry.header[4..8].copy_from_slice(&result.to_ne_bytes());
        entry.header[8..16].copy_from_slice(&unique.to_ne_bytes());
        entry.payload[..payload.len()].copy_from_slice(payload);
        entry.header[PAYLOAD_SZ_AT..PAYLOAD_SZ_AT + 4]
            .copy_from_slice(&(payload.len() as u32).to_ne_bytes());
        let sqe = self.command(CMD_COMMIT_AND_FETCH, unique, idx, None);
        self.push(&sqe)?;
        self.entries[idx].state = EntryState::Armed { registering: false };
        Ok(())
    }

    /// This queue's number, which is also the CPU whose callers it serves.
    pub fn qid(&self) -> u16 {
        self.qid
    }
}

/// Wake a queue's thread after leaving a reply in its mailbox.
pub fn wake(waker: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd.
    let _ = unsafe { libc::write(waker.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Make the calling queue thread SCHED_IDLE, so that the caller it wakes with a reply is
/// placed back on this CPU.
///
/// Why: the reply wakes the caller while this thread still runs on the caller's CPU, so
/// the scheduler sees that CPU busy and moves the caller to an idle one, which on a virtual
/// machine means waking a halted vCPU; the caller's next request then lands on the other
/// queue, and each round trip crosses CPUs twice (measured here: a stat loop took 40 µs
/// per call this way, against 16–23 µs through `/dev/fuse` with spinning readers). A CPU
/// running only SCHED_IDLE tasks counts as idle when a task is placed, and the caller
/// preempts this thread at once: 12 µs per call. Under load the policy did not starve the
/// queues: with six CPU-bound loops on two CPUs the same stat loop took 35 µs per call,
/// against 52 µs through `/dev/fuse`.
pub fn yield_to_callers() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: sets the calling thread's policy from a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A queue thread's place: pinned to its queue's CPU while it waits for and serves
/// requests, let loose while it waits for a disk.
///
/// Why both: pinned, a caller's request hands its CPU straight to the queue thread and back
/// (11 µs a round trip here, against 55–60 µs unpinned). But a request that waits for the
/// disk is woken by the disk's completion, which runs on whatever CPU took the interrupt;
/// pinned, that wakeup must first wake the queue's CPU, halted meanwhile, which on a virtual
/// machine costs tens of µs on every such read. Random 4 KiB reads of a lower file, caches
/// dropped: 100–105 µs a read pinned, 86–90 µs let loose for the reads that miss the page
/// cache, 68–77 µs on the kernel overlay.
pub struct Placement {
    home: libc::cpu_set_t,
    anywhere: libc::cpu_set_t,
    loose: bool,
}

impl Placement {
    /// Pin the calling thread to `cpu`, so it runs where the requests of its queue come
    /// from. `anywhere` is the affinity it had before.
    pub fn pin_to_cpu(cpu: usize) -> io::Result<Placement> {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        }
        // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE, and
        // sched_getaffinity writes at most the size it is given.
        let placement = unsafe {
            let mut anywhere: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut anywhere) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut home: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut home);
            Placement {
                home,
                anywhere,
                loose: true,
            }
        };
        let mut placement = placement;
        placement.pin()?;
        Ok(placement)
    }

    /// Back on the queue's CPU (a no-op when already there).
    pub fn pin(&mut self) -> io::Result<()> {
        if self.loose {
            set_affinity(&self.home)?;
            self.loose = false;
        }
        Ok(())
    }

    /// Free to be woken on any CPU, for work that may wait for a disk.
    pub fn loosen(&mut self) -> io::Result<()> {
        if !self.loose {
            set_affinity(&self.anywhere)?;
            self.loose = true;
        }
        Ok(())
    }
}

fn set_affinity(set: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: passes a whole, initialised cpu_set_t with its own size.
    if unsafe { libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), set) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn affinity() -> libc::cpu_set_t {
        // SAFETY: sched_getaffinity writes at most the size it is given.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            assert_eq!(
                libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set),
                0
            );
            set
        }
    }

    fn cpus(set: &libc::cpu_set_t) -> Vec<usize> {
        // SAFETY: CPU_ISSET reads within the set for i < CPU_SETSIZE.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&i| unsafe { libc::CPU_ISSET(i, set) })
            .collect()
    }

    #[test]
    fn a_queue_thread_is_pinned_let_loose_and_pinned_again() {
        // On a thread of its own: affinity is per thread, and the test harness's must stay.
        std::thread::spawn(|| {
            let before = cpus(&affinity());
            let home = before[0];
            let mut placement = Placement::pin_to_cpu(home).unwrap();
            assert_eq!(cpus(&affinity()), vec![home]);
            placement.loosen().unwrap();
            assert_eq!(cpus(&affinity()), before);
            placement.pin().unwrap();
            assert_eq!(cpus(&affinity()), vec![home]);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list_end("0-1\n"), Some(2));
        assert_eq!(parse_cpu_list_end("0"), Some(1));
        assert_eq!(parse_cpu_list_end("0-3,8,10-11"), Some(12));
        assert_eq!(parse_cpu_list_end(""), None);
        assert_eq!(parse_cpu_list_end("x"), None);
    }
}
