//! A thin relay between the kernel's `/dev/fuse` connection and fuser's `Session`,
//! so that no kernel request can be left unanswered.
//!
//! What it owns: the one real `/dev/fuse` descriptor (replies must be written to
//! the descriptor the request was read from, because the kernel keeps the
//! "being processed" list per device file, so there is exactly one and it is
//! never cloned), a `SOCK_SEQPACKET` socketpair whose other end fuser reads as if
//! it were the device, and the threads that copy between them:
//!
//! * inbound (as many threads as fuser has workers, at least two): read a
//!   request from the device; let the daemon serve it right here if it wants to
//!   ([`LocalAnswer::serve`]: the daemon decodes the request and writes the whole
//!   reply, saving the two thread hops through fuser); otherwise decide with
//!   [`route`] whether fuser may see it, and either forward the bytes unchanged
//!   as one seqpacket message or answer it with a bare result. Once io_uring carries
//!   the requests, only thread 0 stays: the device then brings FORGETs and INTERRUPTs
//!   alone, and it collects FORGETs in batches (see `DeviceWait`);
//! * outbound (one thread): receive fuser's replies and notifications from the
//!   socket and write each one, unchanged, to the device;
//! * workers (a small fixed pool): run the requests the daemon offloads
//!   ([`LocalAnswer::offload`]: served like the others, but they may wait on a disk for
//!   long, a copy-up's fsync) and reply to them, so no reading thread waits meanwhile;
//! * io_uring queues (one thread per possible CPU, only if the kernel offers
//!   FUSE-over-io_uring at INIT and `start` was asked to use it; see [`crate::uring`]):
//!   after INIT the kernel puts requests in ring entries instead, each on its caller's
//!   CPU's queue. A queue's thread handles them exactly as an inbound thread would, and
//!   commits the replies through the entry; fuser's replies to them, and the workers' and
//!   deferred answers, are left in the queue's mailbox for its thread to commit. FORGET
//!   and INTERRUPT still come through the device.
//!
//! It also owns shutdown: when the device reports ENODEV (unmount or abort), or
//! after a FUSE_DESTROY was forwarded, it injects synthetic FUSE_DESTROY messages
//! so every fuser worker thread leaves its loop cleanly and `Session::run`
//! returns and calls the filesystem's `destroy()`.
//!
//! What it must never do: interpret or alter payloads itself (the single
//! exception is clamping `max_write`/`max_pages` in the INIT reply, so the
//! kernel can never send a request, or ask for a reply, bigger than the relay's
//! buffers; payloads of served requests are the daemon's, see [`crate::wire`]);
//! let anything but fuser see the protocol requests (INIT, DESTROY, INTERRUPT,
//! NOTIFY_REPLY); reply to a FORGET, whoever handled it; hand fuser an opcode
//! fuser cannot parse; write the reply to a synthetic request to the kernel; or
//! block on anything but the device, the socket, and the daemon's own work for a
//! request it chose to serve (which ties up one inbound thread meanwhile, hence
//! one inbound thread per fuser worker).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use parking_lot::Mutex;

use crate::uring;

/// FUSE opcodes the relay has to know by number.
pub mod opcode {
    pub const FORGET: u32 = 2;
    pub const INIT: u32 = 26;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const NOTIFY_REPLY: u32 = 41;
    pub const BATCH_FORGET: u32 = 42;
    pub const SETUPMAPPING: u32 = 48;
    pub const REMOVEMAPPING: u32 = 49;
    pub const SYNCFS: u32 = 50;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;
}

/// Size of `struct fuse_in_header`.
pub const IN_HEADER_LEN: usize = 40;
/// Size of `struct fuse_out_header`.
const OUT_HEADER_LEN: usize = 16;

/// Bytes reserved on top of `max_write` for the headers of a WRITE request
/// (fuse_in_header + fuse_write_in = 80; the kernel refuses reads into a buffer
/// smaller than that plus max_write) and for SETXATTR-style name+value requests.
const REQUEST_HEADROOM: usize = 4096;
/// The largest `max_write` we ever offer. fuser's own default (16 MiB) would make
/// the kernel refuse our reads (EINVAL) unless the buffers were as large.
const MAX_WRITE_CAP: usize = 1 << 20;
/// Socket buffer we ask for on each end; the kernel doubles it for bookkeeping.
const SOCKET_BUFFER_REQUEST: libc::c_int = 4 << 20;
/// A unix datagram/seqpacket message must satisfy `len <= sk_sndbuf - 32`.
const UNIX_DGRAM_OVERHEAD: usize = 32;
/// Pages per request the kernel uses when FUSE_MAX_PAGES is not negotiated.
const KERNEL_DEFAULT_MAX_PAGES: usize = 32;

/// The fewest threads reading the device: two, so that one can read the next
/// request while the other is still handing a large WRITE to the socket. When
/// fuser has more workers the relay matches them, because a request the daemon
/// serves is worked on by the inbound thread that read it, and served work must
/// not starve the reading of the others.
const INBOUND_THREADS: usize = 2;
/// Synthetic DESTROY requests use uniques counting down from here; the kernel's
/// counter starts near zero and steps by 2, so it never gets there.
const SYNTHETIC_TOP: u64 = u64::MAX;
/// Upper bound on `fuser_threads`, which also bounds the synthetic unique range.
const MAX_FUSER_THREADS: usize = 1024;
const SYNTHETIC_FLOOR: u64 = SYNTHETIC_TOP - MAX_FUSER_THREADS as u64;
/// How often the outbound thread wakes up while idle, to notice a stuck shutdown.
const OUTBOUND_TICK: Duration = Duration::from_millis(250);
/// How long after shutdown began the outbound thread waits for fuser to answer
/// the synthetic DESTROYs before giving up (a filesystem call may still be busy).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// `struct fuse_in_header`, decoded (host byte order, like the kernel ABI).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InHeader {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
    pub total_extlen: u16,
}

impl InHeader {
    /// Decode the first 40 bytes of `buf`; `None` if it is shorter.
    pub fn parse(buf: &[u8]) -> Option<InHeader> {
        let h: &[u8; IN_HEADER_LEN] = buf.get(..IN_HEADER_LEN)?.try_into().ok()?;
        let u32_at = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
        let u64_at = |o: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[o..o + 8]);
            u64::from_ne_bytes(b)
        };
        Some(InHeader {
            len: u32_at(0),
            opcode: u32_at(4),
            unique: u64_at(8),
            nodeid: u64_at(16),
            uid: u32_at(24),
            gid: u32_at(28),
            pid: u32_at(32),
            total_extlen: u16::from_ne_bytes([h[36], h[37]]),
        })
    }

    fn encode(&self) -> [u8; IN_HEADER_LEN] {
        let mut out = [0u8; IN_HEADER_LEN];
        out[0..4].copy_from_slice(&self.len.to_ne_bytes());
        out[4..8].copy_from_slice(&self.opcode.to_ne_bytes());
        out[8..16].copy_from_slice(&self.unique.to_ne_bytes());
        out[16..24].copy_from_slice(&self.nodeid.to_ne_bytes());
        out[24..28].copy_from_slice(&self.uid.to_ne_bytes());
        out[28..32].copy_from_slice(&self.gid.to_ne_bytes());
        out[32..36].copy_from_slice(&self.pid.to_ne_bytes());
        out[36..38].copy_from_slice(&self.total_extlen.to_ne_bytes());
        out
    }
}

/// Whether fuser 0.18.0 can parse `opcode`: exactly the Linux variants of its
/// `fuse_opcode` enum (1-6, 8-18, 20-47; 7 and 19 were never assigned). CUSE_INIT
/// (4096) is in that enum too but is never sent on a FUSE mount, so it is left
/// out. Anything else must not reach fuser.
pub fn fuser_parses(opcode: u32) -> bool {
    matches!(opcode, 1..=6 | 8..=18 | 20..=47)
}

/// Requests the kernel expects no reply to (FORGET, BATCH_FORGET, and the
/// NOTIFY_REPLY that carries retrieved data).
fn expects_reply(opcode: u32) -> bool {
    !matches!(
        opcode,
        opcode::FORGET | opcode::BATCH_FORGET | opcode::NOTIFY_REPLY
    )
}

/// The hook that lets the daemon answer requests in the relay instead of in fuser:
/// for opcodes fuser cannot parse at all (FUSE_SYNCFS must get a real result), to
/// override one, or to serve the hottest ones without the trip through fuser.
///
/// Every method runs on the relay thread that read the request (an inbound thread, or an
/// io_uring queue's thread, which serves every request of its CPU), which reads no other request
/// meanwhile. None may touch the mounted tree (that would send a request to
/// ourselves and deadlock the relay), or wait for anything that needs another
/// FUSE request answered first.
///
/// Order: [`LocalAnswer::serve`] first, for every request but the ones only fuser
/// may see (INIT, DESTROY, INTERRUPT, NOTIFY_REPLY); then, for requests that are
/// not FORGET or BATCH_FORGET either, [`LocalAnswer::defer`] and
/// [`LocalAnswer::answer`].
pub trait LocalAnswer: Send + Sync {
    /// Serve the request completely: decode `body` (the bytes after the
    /// `fuse_in_header`, cut to `header.len`; see [`crate::wire`]), do the work,
    /// and put the reply payload, without the `fuse_out_header`, in `out` (empty on
    /// entry; a buffer reused across requests). The relay then writes the header and
    /// payload to the kernel in one write, as fuser would have.
    ///
    /// `None` leaves the request alone: it goes on to `defer`, `answer` and fuser as
    /// if this hook did not exist. FORGET and BATCH_FORGET are offered too: serving
    /// one means the daemon took the lookups back itself, and no reply is written
    /// whatever this returns.
    fn serve(&self, _header: &InHeader, _body: &[u8], _out: &mut Vec<u8>) -> Option<Served> {
        None
    }

    /// Whether serving this request will likely wait for a disk (a READ of pages the page
    /// cache does not hold). An io_uring queue thread then lets go of its CPU for the
    /// request, so the disk's completion can wake it wherever it lands. Must be quick.
    fn may_wait_for_disk(&self, _header: &InHeader, _body: &[u8]) -> bool {
        false
    }

    /// `Some(0)` answers success with no payload, so it only fits opcodes whose
    /// reply has no body (SYNCFS, FLUSH, FSYNC, ...). `Some(-errno)` answers that
    /// error. `None` lets the relay decide: forward if fuser can parse the opcode,
    /// else answer ENOSYS. Must be quick.
    fn answer(&self, opcode: u32, header: &InHeader, body: &[u8]) -> Option<i32>;

    /// For requests whose answer takes time (FUSE_SYNCFS flushes a whole filesystem): a job
    /// that computes the result (0 or a negative errno). The relay runs it on a thread of
    /// its own and replies with its result, so neither the relay nor fuser's workers wait
    /// for it. Consulted before [`LocalAnswer::answer`], for the same requests.
    fn defer(&self, _header: &InHeader, _body: &[u8]) -> Option<DeferredAnswer> {
        None
    }

    /// For requests that may wait long but are otherwise served like [`LocalAnswer::serve`]
    /// (a change that first copies a lower file up: a copy and an fsync): a job that does
    /// the work, puts the reply payload in its buffer and returns 0 or a negative errno.
    /// One of the relay's workers runs it and replies, so the reading thread goes on with
    /// other requests meanwhile, and the request does not cross fuser's two extra threads.
    /// Consulted after `serve`, before `defer`, for the same requests as `defer`.
    fn offload(&self, _header: &InHeader, _body: &[u8]) -> Option<OffloadedAnswer> {
        None
    }

    /// Runs on the reading thread when FUSE_DESTROY arrives, before it goes to fuser. On a
    /// fuseblk mount umount waits for that reply, so work done here (flushing the upper
    /// layer) is finished by the time umount returns.
    fn before_destroy(&self) {}
}

/// A job computing the result of one deferred request; see [`LocalAnswer::defer`].
pub type DeferredAnswer = Box<dyn FnOnce() -> i32 + Send>;

/// A job serving one offloaded request; see [`LocalAnswer::offload`].
pub type OffloadedAnswer = Box<dyn FnOnce(&mut Vec<u8>) -> i32 + Send>;

/// Work handed to the relay's workers.
type WorkerJob = Box<dyn FnOnce() + Send>;

/// How many workers run offloaded requests: each may wait on a disk for a while (a copy-up
/// of a big file), and more than one caller may be waiting for one.
fn worker_count(fuser_threads: usize) -> usize {
    (2 * fuser_threads).max(4)
}

/// What the daemon did with a request it served on the relay thread; see
/// [`LocalAnswer::serve`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Reply with this result: 0 with the payload the hook put in `out`, or a
    /// negative errno (the payload, if any, is not sent: error replies have none).
    Reply(i32),
    /// Write nothing: the request expects no reply.
    NoReply,
}

/// Requests only fuser may see: it negotiates INIT, leaves its loop on DESTROY, and
/// matches INTERRUPT and NOTIFY_REPLY to requests it has in hand.
fn fuser_only(op: u32) -> bool {
    matches!(
        op,
        opcode::INIT | opcode::DESTROY | opcode::INTERRUPT | opcode::NOTIFY_REPLY
    )
}

/// Requests that belong to the protocol itself and go to fuser unless served: the
/// fuser-only ones, and the FORGETs, which must never be answered (so `answer` and
/// `defer`, which always produce a reply, never see them).
fn is_protocol(op: u32) -> bool {
    fuser_only(op) || matches!(op, opcode::FORGET | opcode::BATCH_FORGET)
}

/// The default [`LocalAnswer`]: ENOSYS for every opcode fuser cannot parse, and
/// nothing else. After ENOSYS the kernel stops asking (O_TMPFILE then fails with
/// EOPNOTSUPP, statx falls back to GETATTR, syncfs reports success).
#[derive(Debug, Default, Clone, Copy)]
pub struct UnsupportedOpcodes;

impl LocalAnswer for UnsupportedOpcodes {
    fn answer(&self, opcode: u32, _header: &InHeader, _body: &[u8]) -> Option<i32> {
        (!fuser_parses(opcode)).then_some(-libc::ENOSYS)
    }
}

/// What the relay does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Hand the bytes to fuser.
    Forward,
    /// Reply right here with this result (0 or a negative errno).
    Answer(i32),
}

/// The single place that decides whether a request reaches fuser.
///
/// Runs for requests [`LocalAnswer::serve`] left alone. Order matters: protocol
/// requests always go to fuser (it must negotiate INIT, leave its loop on DESTROY,
/// and never reply to FORGETs); then the daemon's [`LocalAnswer::answer`]; then the
/// safety net that keeps unparseable opcodes away from fuser whatever the hook said.
pub fn route(local: &dyn LocalAnswer, header: &InHeader, body: &[u8]) -> Route {
    let op = header.opcode;
    if is_protocol(op) {
        return Route::Forward;
    }
    if let Some(result) = local.answer(op, header, body) {
        return Route::Answer(normalize_errno(result));
    }
    if fuser_parses(op) {
        Route::Forward
    } else {
        Route::Answer(-libc::ENOSYS)
    }
}

/// The kernel wants 0 or a negative errno in (-4096, 0); a positive errno is a
/// sign slip and gets negated, anything else out of range becomes EIO (the
/// kernel would otherwise reject the reply with EINVAL and the caller would hang).
/// The bytes after the `fuse_in_header`, cut to the request's own length.
fn request_body<'a>(header: &InHeader, message: &'a [u8]) -> &'a [u8] {
    let end = (header.len as usize).clamp(IN_HEADER_LEN, message.len());
    &message[IN_HEADER_LEN..end]
}

fn normalize_errno(result: i32) -> i32 {
    match result {
        0 => 0,
        1..4096 => -result,
        -4095..=-1 => result,
        _ => -libc::EIO,
    }
}

/// Why the relay is shutting down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShutdownCause {
    /// The device said ENODEV (unmounted or aborted) or failed for good.
    Disconnected,
    /// A real FUSE_DESTROY went to fuser; it stops one worker itself.
    DestroyForwarded,
}

/// State shared by the relay threads. Everything is atomics except
/// `shutdown_at`, which is written once at shutdown and read on the outbound
/// thread's idle tick, so the per-request path takes no lock.
struct Shared {
    device: OwnedFd,
    socket: OwnedFd,
    fuser_threads: usize,
    local: Arc<dyn LocalAnswer>,
    max_write: u32,
    /// Largest message the relay end may send (its sk_sndbuf - 32).
    max_forward: usize,
    /// Receive buffer for replies: fuser's sk_sndbuf, so nothing fuser managed to
    /// send can be truncated.
    reply_buf_len: usize,
    /// Largest `max_pages` for which a full READ reply still fits fuser's socket.
    max_reply_pages: u16,
    /// Unique of the forwarded FUSE_INIT, whose reply gets clamped.
    init_unique: AtomicU64,
    init_pending: AtomicBool,
    /// Unique of the real FUSE_DESTROY forwarded to fuser, whose reply must reach the
    /// kernel (umount of a fuseblk mount waits for it) before the relay may stop.
    destroy_unique: AtomicU64,
    destroy_pending: AtomicBool,
    /// Set once fuser's end is closed: from then on requests are answered EIO.
    fuser_gone: AtomicBool,
    shutdown_started: AtomicBool,
    shutdown_at: Mutex<Option<Instant>>,
    injected: AtomicUsize,
    injection_done: AtomicBool,
    /// io_uring queues built at start, waiting for INIT to say whether they are used.
    rings_waiting: Mutex<Option<Vec<uring::Queue>>>,
    /// The kernel's INIT offered FUSE_OVER_IO_URING.
    uring_offered: AtomicBool,
    /// Requests now arrive through io_uring (the INIT reply accepted it).
    ring_active: AtomicBool,
    /// Requests read from a ring entry whose reply will be made on another thread
    /// (fuser's, through the outbound thread, or a deferred job's): where it must go.
    ring_pending: Mutex<HashMap<u64, RingSlot>>,
    /// Per queue: where other threads leave those replies, and how they wake its thread.
    mailboxes: OnceLock<Vec<Mailbox>>,
    /// The queue threads, started after INIT.
    ring_threads: Mutex<Vec<JoinHandle<()>>>,
    /// Where offloaded requests go to the workers (who hold the receiving end: they leave
    /// when this is dropped with the rest of the relay).
    workers: Sender<WorkerJob>,
    /// Test-only statistics: requests seen per opcode (63 = "63 or above"),
    /// and the largest request forwarded / reply relayed.
    #[cfg(test)]
    seen: [AtomicU64; 64],
    #[cfg(test)]
    largest_request: AtomicUsize,
    #[cfg(test)]
    largest_reply: AtomicUsize,
}

impl Shared {
    /// The loop of inbound thread `index`.
    fn inbound(self: &Arc<Self>, index: usize) {
        let mut buf = vec![0u8; self.max_write as usize + REQUEST_HEADROOM];
        // Payloads of served requests; keeps its capacity from one request to the next.
        let mut served_payload = Vec::new();
        let mut forgetting = false;
        loop {
            // With io_uring active the device brings only FORGETs and INTERRUPTs, which no
            // caller waits for. Spinning for them would only burn the CPU the callers need,
            // and every thread asleep on the device is one the kernel wakes for each FORGET
            // (an rm -rf sends one per file): one reader is enough, and while FORGETs keep
            // coming it collects them every FORGET_WINDOW instead of being woken for each.
            let wait = if !self.ring_active.load(Ordering::Acquire) {
                DeviceWait::Spin
            } else if index > 0 {
                log::debug!("relay: inbound thread {index} leaves the device to thread 0");
                return;
            } else if forgetting {
                DeviceWait::Window
            } else {
                DeviceWait::Sleep
            };
            let n = match read_request(self.device.as_fd(), &mut buf, wait) {
                // /dev/fuse never reads 0 bytes; a descriptor that does (a socket standing
                // in for it) has no more requests to give.
                Ok(0) => {
                    log::debug!("relay: the device reached end of file");
                    self.begin_shutdown(ShutdownCause::Disconnected);
                    return;
                }
                Ok(n) => n,
                // ENOENT: the request was interrupted and withdrawn before we got
                // it; EINTR/EAGAIN: nothing read. All safe to retry.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ENOENT | libc::EINTR | libc::EAGAIN)
                    ) =>
                {
                    // A window without a FORGET: back to sleeping on the device.
                    forgetting = false;
                    continue;
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    log::debug!("relay: /dev/fuse disconnected (unmounted or aborted)");
                    self.begin_shutdown(ShutdownCause::Disconnected);
                    return;
                }
                Err(e) => {
                    log::error!("relay: reading a request from /dev/fuse failed: {e}; stopping");
                    self.begin_shutdown(ShutdownCause::Disconnected);
                    return;
                }
            };
            let Some(header) = InHeader::parse(&buf[..n]) else {
                log::error!(
                    "relay: /dev/fuse returned a {n}-byte request, shorter than its header"
                );
                continue;
            };
            forgetting = matches!(header.opcode, opcode::FORGET | opcode::BATCH_FORGET);
            self.dispatch(&header, &buf[..n], &mut served_payload, &mut DeviceReplies);
        }
    }

    /// Everything that happens to one request, whichever way it came in: serve it here,
    /// defer it, forward it to fuser, or answer it. `message` is the whole request as
    /// `/dev/fuse` lays it out; `replies` says where a reply made on this thread goes.
    fn dispatch(
        self: &Arc<Self>,
        header: &InHeader,
        message: &[u8],
        served_payload: &mut Vec<u8>,
        replies: &mut dyn Replies,
    ) {
        #[cfg(test)]
        self.seen[(header.opcode as usize).min(63)].fetch_add(1, Ordering::Relaxed);

        if self.shutdown_started.load(Ordering::Acquire) || self.fuser_gone.load(Ordering::Acquire)
        {
            // fuser's workers are leaving or gone: nobody would answer.
            replies.reply(self, header, -libc::EIO, &[]);
            return;
        }
        let body = request_body(header, message);
        if !fuser_only(header.opcode) {
            served_payload.clear();
            if let Some(served) = self.local.serve(header, body, served_payload) {
                match served {
                    Served::Reply(result) => {
                        replies.reply(self, header, normalize_errno(result), served_payload)
                    }
                    Served::NoReply => replies.no_reply(self, header),
                }
                return;
            }
        }
        if !is_protocol(header.opcode)
            && let Some(job) = self.local.offload(header, body)
        {
            replies.reply_later(self, header);
            self.run_offloaded(*header, job);
            return;
        }
        if !is_protocol(header.opcode)
            && let Some(job) = self.local.defer(header, body)
        {
            replies.reply_later(self, header);
            self.run_deferred(*header, job);
            return;
        }
        match route(&*self.local, header, body) {
            Route::Forward => {
                if expects_reply(header.opcode) {
                    replies.reply_later(self, header);
                } else {
                    replies.no_reply(self, header);
                }
                self.forward(header, message)
            }
            Route::Answer(result) => replies.reply(self, header, result, &[]),
        }
    }

    fn forward(&self, header: &InHeader, message: &[u8]) {
        if message.len() > self.max_forward {
            // Cannot happen while the INIT clamp holds; never let it hang a caller.
            log::error!(
                "relay: request {} (opcode {}) is {} bytes, more than the socket takes ({}); answering EIO",
                header.unique,
                header.opcode,
                message.len(),
                self.max_forward
            );
            self.answer(header, -libc::EIO);
            return;
        }
        if header.opcode == opcode::DESTROY {
            self.local.before_destroy();
            self.destroy_unique.store(header.unique, Ordering::Release);
            self.destroy_pending.store(true, Ordering::Release);
        }
        if header.opcode == opcode::INIT {
            self.uring_offered.store(
                init_offers_uring(&message[IN_HEADER_LEN..]),
                Ordering::Release,
            );
            // Published before the send so the outbound thread knows it by the
            // time fuser's reply comes back.
            self.init_unique.store(header.unique, Ordering::Release);
            self.init_pending.store(true, Ordering::Release);
        }
        if let Err(e) = send_message(self.socket.as_fd(), message) {
            if matches!(e.raw_os_error(), Some(libc::EPIPE | libc::ECONNRESET)) {
                if !self.fuser_gone.swap(true, Ordering::AcqRel) {
                    log::error!(
                        "relay: fuser's end of the relay socket is closed; answering EIO from now on"
                    );
                }
            } else {
                log::error!(
                    "relay: forwarding request {} (opcode {}) to fuser failed: {e}; answering EIO",
                    header.unique,
                    header.opcode
                );
            }
            self.answer(header, -libc::EIO);
            return;
        }
        #[cfg(test)]
        self.largest_request
            .fetch_max(message.len(), Ordering::Relaxed);
        if header.opcode == opcode::DESTROY {
            self.begin_shutdown(ShutdownCause::DestroyForwarded);
        }
    }

    /// Hands an offloaded request to the workers, which reply with its result.
    fn run_offloaded(self: &Arc<Self>, header: InHeader, job: OffloadedAnswer) {
        let shared = Arc::clone(self);
        let work: WorkerJob = Box::new(move || {
            let mut payload = Vec::new();
            match std::panic::catch_unwind(AssertUnwindSafe(|| job(&mut payload))) {
                Ok(result) => shared.reply(&header, normalize_errno(result), &payload),
                Err(_) => {
                    log::error!(
                        "relay: serving request {} (opcode {}) panicked; answering EIO",
                        header.unique,
                        header.opcode
                    );
                    shared.answer(&header, -libc::EIO);
                }
            }
        });
        // The workers leave only once this sender is gone, so the send cannot fail while
        // the relay runs; if it ever does, the caller still gets an answer.
        if self.workers.send(work).is_err() {
            log::error!(
                "relay: no worker takes request {} (opcode {}); answering EIO",
                header.unique,
                header.opcode
            );
            self.answer(&header, -libc::EIO);
        }
    }

    /// Runs a deferred answer on its own thread and replies with its result. If no thread
    /// can be started, runs it here: slower, but the caller still gets an answer.
    fn run_deferred(self: &Arc<Self>, header: InHeader, job: DeferredAnswer) {
        let shared = Arc::clone(self);
        let job = Arc::new(Mutex::new(Some(job)));
        let for_thread = Arc::clone(&job);
        let spawned = std::thread::Builder::new()
            .name("ovlfuse-deferred".into())
            .spawn(move || {
                if let Some(job) = for_thread.lock().take() {
                    let result = normalize_errno(job());
                    shared.answer(&header, result);
                }
            });
        if let Err(e) = spawned {
            log::warn!(
                "relay: cannot start a thread for a deferred answer ({e}); answering inline"
            );
            if let Some(job) = job.lock().take() {
                let result = normalize_errno(job());
                self.answer(&header, result);
            }
        }
    }

    /// Reply to a request with a bare fuse_out_header carrying `result`.
    fn answer(&self, header: &InHeader, result: i32) {
        self.reply(header, result, &[]);
    }

    /// Reply to a request with `result` (0 or a negative errno) and, on success,
    /// `payload`: header and payload in one write, as the kernel requires, or through its
    /// io_uring queue if it came from one and was left for later. Requests that expect no
    /// reply get none.
    fn reply(&self, header: &InHeader, result: i32, payload: &[u8]) {
        if !expects_reply(header.opcode) {
            return;
        }
        if self.to_ring(header.unique, result, payload) {
            return;
        }
        // The kernel refuses an error reply that carries anything after the header.
        let payload = if result == 0 { payload } else { &[] };
        let Ok(len) = u32::try_from(OUT_HEADER_LEN + payload.len()) else {
            log::error!(
                "relay: a {}-byte reply to request {} (opcode {}) cannot be sent; answering EIO",
                payload.len(),
                header.unique,
                header.opcode
            );
            return self.answer(header, -libc::EIO);
        };
        let mut out = [0u8; OUT_HEADER_LEN];
        out[0..4].copy_from_slice(&len.to_ne_bytes());
        out[4..8].copy_from_slice(&result.to_ne_bytes());
        out[8..16].copy_from_slice(&header.unique.to_ne_bytes());
        match write_reply(self.device.as_fd(), &out, payload) {
            Ok(_) => {}
            // ENOENT: the request was interrupted meanwhile; ENODEV: the
            // connection is gone, so is the caller.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) => {}
            // A reply the kernel finds malformed (EINVAL) still ends its request, with
            // EIO, so nobody hangs; the log says which one.
            Err(e) => log::error!(
                "relay: answering request {} (opcode {}) with {result} and {} payload bytes failed: {e}",
                header.unique,
                header.opcode,
                payload.len()
            ),
        }
    }

    /// Make every fuser worker leave its loop: each returns Ok after reading one
    /// FUSE_DESTROY, so send one per worker that has not already had a real one.
    /// Runs at most once.
    fn begin_shutdown(&self, cause: ShutdownCause) {
        if self.shutdown_started.swap(true, Ordering::AcqRel) {
            return;
        }
        *self.shutdown_at.lock() = Some(Instant::now());
        let count = match cause {
            ShutdownCause::Disconnected => self.fuser_threads,
            ShutdownCause::DestroyForwarded => self.fuser_threads - 1,
        };
        let mut sent = 0;
        for i in 0..count {
            let destroy = InHeader {
                len: IN_HEADER_LEN as u32,
                opcode: opcode::DESTROY,
                unique: SYNTHETIC_TOP - i as u64,
                nodeid: 0,
                uid: 0,
                gid: 0,
                pid: 0,
                total_extlen: 0,
            };
            if let Err(e) = send_message(self.socket.as_fd(), &destroy.encode()) {
                // EPIPE: fuser is already gone, which is what we wanted.
                if e.raw_os_error() != Some(libc::EPIPE) {
                    log::warn!("relay: sending a shutdown DESTROY to fuser failed: {e}");
                }
                break;
            }
            sent += 1;
        }
        log::debug!("relay: shutting down ({cause:?}); sent {sent} synthetic DESTROY");
        self.injected.store(sent, Ordering::Release);
        self.injection_done.store(true, Ordering::Release);
    }

    fn outbound(self: &Arc<Self>) {
        let mut buf = vec![0u8; self.reply_buf_len];
        let mut synthetic_seen = 0usize;
        let mut device_gone = false;
        loop {
            if self.injection_done.load(Ordering::Acquire)
                && synthetic_seen >= self.injected.load(Ordering::Acquire)
                && (device_gone || !self.destroy_pending.load(Ordering::Acquire))
            {
                log::debug!("relay: every fuser worker acknowledged shutdown");
                return;
            }
            let n = match recv_message(self.socket.as_fd(), &mut buf) {
                // Every descriptor of fuser's end is closed: nothing more can come.
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                    let started = *self.shutdown_at.lock();
                    if started.is_some_and(|t| t.elapsed() > SHUTDOWN_GRACE) {
                        log::warn!(
                            "relay: fuser did not finish within {SHUTDOWN_GRACE:?} of shutdown; \
                             no longer relaying its replies"
                        );
                        return;
                    }
                    continue;
                }
                // fuser's workers closed their end with requests still unread (they leave on
                // DESTROY or ENODEV without draining): the same as an orderly close.
                Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    log::debug!("relay: fuser closed its end of the socket");
                    return;
                }
                Err(e) => {
                    log::error!("relay: receiving replies from fuser failed: {e}; stopping");
                    return;
                }
            };
            if n < OUT_HEADER_LEN {
                log::error!("relay: fuser sent a {n}-byte reply, shorter than its header");
                continue;
            }
            let unique = u64::from_ne_bytes(buf[8..16].try_into().unwrap_or([0; 8]));
            if n > buf.len() {
                // MSG_TRUNC reported a message longer than our buffer. Cannot
                // happen (the buffer is fuser's whole send buffer), but a lost
                // reply would hang its caller, so fail the request instead.
                log::error!("relay: reply {unique} of {n} bytes does not fit; answering EIO");
                self.fail_request(unique);
                continue;
            }
            if unique > SYNTHETIC_FLOOR {
                synthetic_seen += 1;
                continue;
            }
            let error = i32::from_ne_bytes(buf[4..8].try_into().unwrap_or([0; 4]));
            if self.to_ring(unique, error, &buf[OUT_HEADER_LEN..n]) {
                if self.destroy_pending.load(Ordering::Acquire)
                    && unique == self.destroy_unique.load(Ordering::Acquire)
                {
                    self.destroy_pending.store(false, Ordering::Release);
                }
                continue;
            }
            if self.destroy_pending.load(Ordering::Acquire)
                && unique == self.destroy_unique.load(Ordering::Acquire)
            {
                // Cleared only after the write below; the loop's exit test runs next turn.
                let result = if device_gone {
                    Ok(0)
                } else {
                    write_fd(self.device.as_fd(), &buf[..n])
                };
                if let Err(e) = result
                    && !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV))
                {
                    log::error!("relay: writing the DESTROY reply failed: {e}");
                }
                self.destroy_pending.store(false, Ordering::Release);
                continue;
            }
            if self.init_pending.load(Ordering::Acquire)
                && unique == self.init_unique.load(Ordering::Acquire)
            {
                self.init_pending.store(false, Ordering::Release);
                clamp_init_reply(&mut buf[..n], self.max_write, self.max_reply_pages);
                self.finish_init(&mut buf[..n], device_gone);
                continue;
            }
            if device_gone {
                continue;
            }
            #[cfg(test)]
            self.largest_reply.fetch_max(n, Ordering::Relaxed);
            match write_fd(self.device.as_fd(), &buf[..n]) {
                Ok(_) => {}
                // The request was interrupted or aborted meanwhile (also the
                // answer to replies for no-reply requests): nothing to do.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                    log::debug!("relay: reply {unique}: request no longer pending");
                }
                Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                    // Keep draining so fuser's workers never block on a full socket.
                    device_gone = true;
                }
                Err(e) => {
                    log::error!(
                        "relay: writing reply {unique} ({n} bytes) to /dev/fuse failed: {e}"
                    )
                }
            }
        }
    }

    /// Send fuser's INIT reply (already clamped) to the kernel, accepting io_uring in it
    /// if the kernel offered it and the queues are built, and start serving the queues once
    /// the kernel has it. From then on the kernel holds every new request until all queues
    /// have registered, and if a registration fails it falls back to `/dev/fuse` by itself.
    fn finish_init(self: &Arc<Self>, reply: &mut [u8], device_gone: bool) {
        let offered = self.uring_offered.load(Ordering::Acquire);
        let queues = self.rings_waiting.lock().take().filter(|_| offered);
        // Everything that can fail is done before the reply says yes: once it does, the
        // kernel holds every request until the queues register.
        let prepared = queues.and_then(|queues| match mailboxes_for(&queues) {
            Ok((mailboxes, inboxes)) => Some((queues, mailboxes, inboxes)),
            Err(e) => {
                log::warn!("relay: io_uring off: cannot set up the queues' wakeups: {e}");
                None
            }
        });
        let prepared = prepared.filter(|_| accept_uring_in_init_reply(reply));
        if device_gone {
            return;
        }
        if let Err(e) = write_fd(self.device.as_fd(), reply) {
            if !matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENODEV)) {
                log::error!("relay: writing the INIT reply failed: {e}");
            }
            return;
        }
        let Some((queues, mailboxes, inboxes)) = prepared else {
            return;
        };
        let _ = self.mailboxes.set(mailboxes);
        self.ring_active.store(true, Ordering::Release);
        let mut threads = self.ring_threads.lock();
        for (queue, inbox) in queues.into_iter().zip(inboxes) {
            let shared = Arc::clone(self);
            let name = format!("ovlfuse-ring{}", queue.qid());
            match spawn(&name, move || shared.serve_ring(queue, inbox)) {
                Ok(handle) => threads.push(handle),
                Err(e) => log::error!("relay: {e}"),
            }
        }
        log::debug!(
            "relay: serving requests through io_uring, {} queues",
            threads.len()
        );
    }

    /// The loop of one io_uring queue's thread: register the entries, then serve each
    /// request that lands in one, and commit the replies other threads leave in `inbox`.
    /// Ends when the kernel takes the entries back (unmount or abort).
    fn serve_ring(self: &Arc<Self>, mut queue: uring::Queue, inbox: Receiver<Completion>) {
        let qid = queue.qid();
        let mut placement = match uring::Placement::pin_to_cpu(usize::from(qid)) {
            Ok(p) => Some(p),
            Err(e) => {
                log::debug!("relay: queue {qid} runs unpinned: {e}");
                None
            }
        };
        if let Err(e) = uring::yield_to_callers() {
            log::debug!("relay: queue {qid} keeps the normal scheduling policy: {e}");
        }
        if let Err(e) = queue.start() {
            log::error!("relay: starting io_uring queue {qid} failed: {e}");
            return;
        }
        let mut message = Vec::with_capacity(IN_HEADER_LEN + 4096);
        let mut served_payload = Vec::new();
        let mut events = Vec::new();
        let mut gone = false;
        let mut failing = false;
        loop {
            events.clear();
            if let Err(e) = queue.wait(&mut events) {
                // Leaving would strand every request made on this CPU from now on; a
                // failure that passes (ENOMEM) lets the queue go on.
                if !failing {
                    log::error!("relay: waiting on io_uring queue {qid} failed: {e}; retrying");
                }
                failing = true;
                if self.shutdown_started.load(Ordering::Acquire) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            failing = false;
            for event in events.drain(..) {
                match event {
                    uring::Event::Request(idx) => {
                        let Some(header) = queue.read_request(idx, &mut message) else {
                            let unique = queue.unique_of(idx);
                            log::error!(
                                "relay: request {unique} in queue {qid} has inconsistent lengths; answering EIO"
                            );
                            commit_or_log(&mut queue, idx, unique, -libc::EIO, &[]);
                            continue;
                        };
                        let mut replies = RingReplies {
                            queue: &mut queue,
                            idx,
                        };
                        // Back on the queue's CPU only when a request that does not wait
                        // for a disk comes: a run of cold reads moves no thread back and
                        // forth between them.
                        if let Some(p) = placement.as_mut() {
                            let placed = if self
                                .local
                                .may_wait_for_disk(&header, request_body(&header, &message))
                            {
                                p.loosen()
                            } else {
                                p.pin()
                            };
                            if let Err(e) = placed {
                                log::debug!("relay: queue {qid} affinity: {e}");
                            }
                        }
                        // A panic must not take the queue's thread down with it: every
                        // request later made on this CPU would wait for it forever.
                        let dispatched = std::panic::catch_unwind(AssertUnwindSafe(|| {
                            self.dispatch(&header, &message, &mut served_payload, &mut replies)
                        }));
                        if dispatched.is_err() {
                            log::error!(
                                "relay: serving request {} (opcode {}) panicked; answering EIO",
                                header.unique,
                                header.opcode
                            );
                            self.ring_pending.lock().remove(&header.unique);
                            if queue.holds_request(idx) {
                                commit_or_log(&mut queue, idx, header.unique, -libc::EIO, &[]);
                            }
                        }
                    }
                    uring::Event::Wake => {
                        while let Ok(done) = inbox.try_recv() {
                            commit_or_log(
                                &mut queue,
                                done.idx,
                                done.unique,
                                done.result,
                                &done.payload,
                            );
                        }
                    }
                    uring::Event::Failed { errno, .. } if uring::connection_gone(errno) => {
                        gone = true;
                    }
                    uring::Event::Failed {
                        idx,
                        errno,
                        registering: true,
                    } => {
                        // The kernel turned io_uring off for this connection and serves it
                        // through /dev/fuse, which the relay's readers keep reading.
                        log::warn!(
                            "relay: the kernel refused io_uring queue {qid} entry {idx} ({}); \
                             requests go through /dev/fuse",
                            io::Error::from_raw_os_error(errno)
                        );
                    }
                    uring::Event::Failed { idx, errno, .. } => {
                        // A refused commit loses the entry in the kernel: register its
                        // buffers anew so the queue keeps its depth.
                        log::warn!(
                            "relay: io_uring queue {qid} entry {idx}: commit refused ({}); re-registering",
                            io::Error::from_raw_os_error(errno)
                        );
                        if let Err(e) = queue.register(idx) {
                            log::error!("relay: re-registering queue {qid} entry {idx}: {e}");
                        }
                    }
                }
            }
            if queue.live() == 0 || (gone && queue.armed() == 0) {
                log::debug!("relay: io_uring queue {qid} has no entries left; leaving");
                return;
            }
        }
    }

    /// If request `unique` came from a ring entry and its reply was left for later, hand
    /// the reply to that queue's thread and return true.
    fn to_ring(&self, unique: u64, result: i32, payload: &[u8]) -> bool {
        // Entries are only ever recorded once the rings are active, and that never ends.
        if !self.ring_active.load(Ordering::Acquire) {
            return false;
        }
        let Some(slot) = self.ring_pending.lock().remove(&unique) else {
            return false;
        };
        let Some(mailbox) = self
            .mailboxes
            .get()
            .and_then(|m| m.get(usize::from(slot.queue)))
        else {
            return true;
        };
        let done = Completion {
            idx: slot.idx,
            unique,
            result: normalize_errno(result),
            // An error reply's payload is dropped by the commit, as by a device write.
            payload: payload.to_vec(),
        };
        if mailbox.tx.send(done).is_ok() {
            uring::wake(&mailbox.waker);
        }
        true
    }

    fn fail_request(&self, unique: u64) {
        let header = InHeader {
            len: 0,
            opcode: 0,
            unique,
            nodeid: 0,
            uid: 0,
            gid: 0,
            pid: 0,
            total_extlen: 0,
        };
        self.answer(&header, -libc::EIO);
    }
}

/// Where the reply to a request goes when the thread that read it makes it, and what to
/// remember when another thread will.
trait Replies {
    /// Reply now with `result` (0 or a negative errno) and, on success, `payload`.
    fn reply(&mut self, shared: &Shared, header: &InHeader, result: i32, payload: &[u8]);
    /// The reply will be made elsewhere (fuser, a deferred job).
    fn reply_later(&mut self, shared: &Shared, header: &InHeader);
    /// The request takes no reply (FORGET).
    fn no_reply(&mut self, shared: &Shared, header: &InHeader);
}

/// Requests read from `/dev/fuse`: replies are written to it.
struct DeviceReplies;

impl Replies for DeviceReplies {
    fn reply(&mut self, shared: &Shared, header: &InHeader, result: i32, payload: &[u8]) {
        shared.reply(header, result, payload);
    }

    fn reply_later(&mut self, _shared: &Shared, _header: &InHeader) {}

    fn no_reply(&mut self, _shared: &Shared, _header: &InHeader) {}
}

/// Requests that arrived in entry `idx` of a ring queue: the reply is committed through it.
struct RingReplies<'a> {
    queue: &'a mut uring::Queue,
    idx: usize,
}

impl Replies for RingReplies<'_> {
    fn reply(&mut self, _shared: &Shared, header: &InHeader, result: i32, payload: &[u8]) {
        commit_or_log(self.queue, self.idx, header.unique, result, payload);
    }

    fn reply_later(&mut self, shared: &Shared, header: &InHeader) {
        // Recorded before the request is handed on, so the reply cannot arrive first.
        let slot = RingSlot {
            queue: self.queue.qid(),
            idx: self.idx,
        };
        shared.ring_pending.lock().insert(header.unique, slot);
    }

    fn no_reply(&mut self, _shared: &Shared, header: &InHeader) {
        // Only FORGETs take no reply, and the kernel sends those through /dev/fuse. An
        // entry must be committed to be used again, so if one ever comes, fail it.
        log::error!(
            "relay: opcode {} (request {}) came through io_uring without expecting a reply",
            header.opcode,
            header.unique
        );
        commit_or_log(self.queue, self.idx, header.unique, -libc::EIO, &[]);
    }
}

fn commit_or_log(queue: &mut uring::Queue, idx: usize, unique: u64, result: i32, payload: &[u8]) {
    if let Err(e) = queue.commit(idx, unique, result, payload) {
        log::error!(
            "relay: committing the reply to request {unique} on queue {} failed: {e}",
            queue.qid()
        );
    }
}

/// One mailbox per queue, and the receiving ends for the queues' threads.
fn mailboxes_for(queues: &[uring::Queue]) -> io::Result<(Vec<Mailbox>, Vec<Receiver<Completion>>)> {
    let mut mailboxes = Vec::with_capacity(queues.len());
    let mut inboxes = Vec::with_capacity(queues.len());
    for queue in queues {
        let (tx, rx) = crossbeam_channel::unbounded();
        mailboxes.push(Mailbox {
            tx,
            waker: queue.waker()?,
        });
        inboxes.push(rx);
    }
    Ok((mailboxes, inboxes))
}

/// Where a request read from a ring entry gets its reply.
#[derive(Debug, Clone, Copy)]
struct RingSlot {
    queue: u16,
    idx: usize,
}

/// A reply made on another thread, for a queue's thread to commit.
struct Completion {
    idx: usize,
    unique: u64,
    result: i32,
    payload: Vec<u8>,
}

struct Mailbox {
    tx: Sender<Completion>,
    waker: OwnedFd,
}

/// Entries per io_uring queue: requests in hand at once on one CPU, counting the ones
/// fuser is working on. Each entry's payload buffer is as large as the biggest request or
/// reply, but only what a request really uses is ever touched.
const RING_DEPTH: usize = 8;

/// Whether a FUSE_INIT request body (struct fuse_init_in: major, minor, max_readahead,
/// flags, flags2) offers FUSE_OVER_IO_URING. The kernel offers it only while
/// `fuse.enable_uring` is on.
fn init_offers_uring(body: &[u8]) -> bool {
    let word = |at: usize| {
        body.get(at..at + 4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .unwrap_or(0)
    };
    word(12) & FUSE_INIT_EXT != 0 && word(16) & uring::FLAGS2_OVER_IO_URING != 0
}

/// FUSE_INIT_EXT: the INIT flags continue in `flags2`.
const FUSE_INIT_EXT: u32 = 1 << 30;

/// Set FUSE_OVER_IO_URING in a successful FUSE_INIT reply (flags at 12 and flags2 at 32
/// after the out header). Returns false, leaving the reply alone, for an error reply or a
/// short one.
fn accept_uring_in_init_reply(msg: &mut [u8]) -> bool {
    const FLAGS_AT: usize = OUT_HEADER_LEN + 12;
    const FLAGS2_AT: usize = OUT_HEADER_LEN + 32;
    if msg.len() < FLAGS2_AT + 4 || i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]) != 0 {
        return false;
    }
    let mut update = |at: usize, bit: u32| {
        let old = u32::from_ne_bytes([msg[at], msg[at + 1], msg[at + 2], msg[at + 3]]);
        msg[at..at + 4].copy_from_slice(&(old | bit).to_ne_bytes());
    };
    update(FLAGS_AT, FUSE_INIT_EXT);
    update(FLAGS2_AT, uring::FLAGS2_OVER_IO_URING);
    true
}

/// Lower `max_write` and `max_pages` in a FUSE_INIT reply to what the relay's
/// buffers hold. Layout after the 16-byte out header (struct fuse_init_out):
/// major@0 minor@4 max_readahead@8 flags@12 max_background@16
/// congestion_threshold@18 max_write@20 time_gran@24 max_pages@28.
fn clamp_init_reply(msg: &mut [u8], max_write: u32, max_pages: u16) {
    let error = i32::from_ne_bytes([msg[4], msg[5], msg[6], msg[7]]);
    if error != 0 {
        return;
    }
    const MAX_WRITE_AT: usize = OUT_HEADER_LEN + 20;
    const MAX_PAGES_AT: usize = OUT_HEADER_LEN + 28;
    if let Some(field) = msg.get_mut(MAX_WRITE_AT..MAX_WRITE_AT + 4) {
        let asked = u32::from_ne_bytes([field[0], field[1], field[2], field[3]]);
        if asked > max_write {
            log::warn!(
                "relay: the filesystem asked for max_write {asked} in INIT; clamping to {max_write} \
                 (call KernelConfig::set_max_write with the relay's value)"
            );
            field.copy_from_slice(&max_write.to_ne_bytes());
        }
    }
    if let Some(field) = msg.get_mut(MAX_PAGES_AT..MAX_PAGES_AT + 2) {
        let asked = u16::from_ne_bytes([field[0], field[1]]);
        if asked > max_pages {
            log::debug!("relay: clamping max_pages {asked} in INIT to {max_pages}");
            field.copy_from_slice(&max_pages.to_ne_bytes());
        }
    }
}

/// The running relay. Dropping it detaches the threads; they still end on unmount.
pub struct Relay {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("device", &self.shared.device)
            .field("max_write", &self.shared.max_write)
            .field("threads", &self.threads.len())
            .finish()
    }
}

impl Relay {
    /// The real `/dev/fuse` descriptor, for ioctls that fuser would otherwise
    /// issue on its end (which is a socket), e.g. FUSE_DEV_IOC_BACKING_OPEN for
    /// passthrough. Never read from or write to it.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.shared.device.as_fd()
    }

    /// The `max_write` the filesystem must pass to `KernelConfig::set_max_write`.
    pub fn max_write(&self) -> u32 {
        self.shared.max_write
    }

    /// Wait until the connection is gone and fuser has been told to stop.
    /// Returns after the device reports ENODEV (unmount/abort) and fuser's
    /// workers acknowledged the synthetic DESTROYs (or a grace period passed).
    pub fn join(self) {
        let rings = std::mem::take(&mut *self.shared.ring_threads.lock());
        for handle in self.threads.into_iter().chain(rings) {
            let name = handle.thread().name().unwrap_or("relay").to_string();
            if handle.join().is_err() {
                log::error!("relay: thread {name} panicked");
            }
        }
    }

    #[cfg(test)]
    fn seen(&self, op: u32) -> u64 {
        self.shared.seen[(op as usize).min(63)].load(Ordering::Relaxed)
    }
}

/// Start relaying `device` (a mounted `/dev/fuse` descriptor whose INIT has not
/// been read yet). With `use_uring`, requests move to FUSE-over-io_uring queues after
/// INIT when the kernel offers it (see [`crate::uring`]); otherwise, or if the queues
/// cannot be built, everything goes through `/dev/fuse`.
///
/// Returns the relay, fuser's end of the socket (pass it to
/// `fuser::Session::from_fd` with `Config::n_threads == Some(fuser_threads)` and
/// `clone_fd == false`), and the `max_write` the filesystem must set in `init`.
pub fn start(
    device: OwnedFd,
    fuser_threads: usize,
    local: Arc<dyn LocalAnswer>,
    use_uring: bool,
) -> io::Result<(Relay, OwnedFd, u32)> {
    if !(1..=MAX_FUSER_THREADS).contains(&fuser_threads) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("relay: fuser_threads must be 1..={MAX_FUSER_THREADS}, got {fuser_threads}"),
        ));
    }
    // Reads spin briefly before they sleep (`read_request`), so the device is non-blocking.
    set_nonblocking(device.as_fd())?;
    let (relay_end, fuser_end) = seqpacket_pair()?;
    for fd in [&relay_end, &fuser_end] {
        enlarge_buffers(fd.as_fd())?;
    }
    let relay_sndbuf = socket_buffer(relay_end.as_fd(), libc::SO_SNDBUF)?;
    let fuser_sndbuf = socket_buffer(fuser_end.as_fd(), libc::SO_SNDBUF)?;
    let page = crate::sys::page_size() as usize;

    let max_forward = relay_sndbuf.saturating_sub(UNIX_DGRAM_OVERHEAD);
    let max_reply = fuser_sndbuf.saturating_sub(UNIX_DGRAM_OVERHEAD);
    let write_room = max_forward
        .saturating_sub(REQUEST_HEADROOM)
        .min(MAX_WRITE_CAP);
    let max_write = prev_power_of_two(write_room);
    // A READ reply is the out header plus up to max_pages pages.
    let reply_pages = max_reply.saturating_sub(REQUEST_HEADROOM) / page;
    if max_write < 4096 || reply_pages < KERNEL_DEFAULT_MAX_PAGES {
        return Err(io::Error::other(format!(
            "relay: socket buffers too small (send buffers {relay_sndbuf} and {fuser_sndbuf} bytes; \
             need room for a {}-byte READ reply); raise net.core.wmem_max or run as root",
            KERNEL_DEFAULT_MAX_PAGES * page
        )));
    }
    let max_write_u32 = u32::try_from(max_write).map_err(io::Error::other)?;
    let max_reply_pages = u16::try_from(reply_pages).unwrap_or(u16::MAX);

    // The outbound thread wakes up periodically so a shutdown whose DESTROYs are
    // never answered cannot make join() hang.
    set_receive_timeout(relay_end.as_fd(), OUTBOUND_TICK)?;

    log::debug!(
        "relay: socket send buffers {relay_sndbuf}/{fuser_sndbuf}; max_write {max_write}, \
         max_pages {max_reply_pages}"
    );
    let rings = if use_uring {
        build_queues(
            device.as_raw_fd(),
            max_write,
            usize::from(max_reply_pages) * page,
        )
    } else {
        None
    };
    let (workers, work) = crossbeam_channel::unbounded::<WorkerJob>();
    let shared = Arc::new(Shared {
        device,
        socket: relay_end,
        fuser_threads,
        local,
        max_write: max_write_u32,
        max_forward,
        reply_buf_len: fuser_sndbuf,
        max_reply_pages,
        init_unique: AtomicU64::new(0),
        init_pending: AtomicBool::new(false),
        destroy_unique: AtomicU64::new(0),
        destroy_pending: AtomicBool::new(false),
        fuser_gone: AtomicBool::new(false),
        shutdown_started: AtomicBool::new(false),
        shutdown_at: Mutex::new(None),
        injected: AtomicUsize::new(0),
        injection_done: AtomicBool::new(false),
        rings_waiting: Mutex::new(rings),
        uring_offered: AtomicBool::new(false),
        ring_active: AtomicBool::new(false),
        ring_pending: Mutex::new(HashMap::new()),
        mailboxes: OnceLock::new(),
        ring_threads: Mutex::new(Vec::new()),
        workers,
        #[cfg(test)]
        seen: std::array::from_fn(|_| AtomicU64::new(0)),
        #[cfg(test)]
        largest_request: AtomicUsize::new(0),
        #[cfg(test)]
        largest_reply: AtomicUsize::new(0),
    });

    let inbound_threads = INBOUND_THREADS.max(fuser_threads);
    let mut threads = Vec::with_capacity(inbound_threads + 1);
    let out = Arc::clone(&shared);
    threads.push(spawn("ovlfuse-relay-out", move || out.outbound())?);
    for i in 0..inbound_threads {
        let inb = Arc::clone(&shared);
        threads.push(spawn(&format!("ovlfuse-relay-in{i}"), move || {
            inb.inbound(i)
        })?);
    }
    // Not joined: a worker holds no part of the relay while it waits, and leaves when the
    // relay (and with it the sending end) is dropped.
    for i in 0..worker_count(fuser_threads) {
        let work = work.clone();
        spawn(&format!("ovlfuse-work{i}"), move || {
            while let Ok(job) = work.recv() {
                job();
            }
        })?;
    }
    Ok((Relay { shared, threads }, fuser_end, max_write_u32))
}

/// The io_uring queues for a connection, one per possible CPU, or `None` (logged) when the
/// kernel does not allow io_uring or a queue cannot be built. `reply_room` is the largest
/// reply the INIT clamp lets the kernel ask for.
fn build_queues(
    device: libc::c_int,
    max_write: usize,
    reply_room: usize,
) -> Option<Vec<uring::Queue>> {
    if !uring::kernel_allows() {
        log::debug!("relay: fuse.enable_uring is off; requests go through /dev/fuse");
        return None;
    }
    // The kernel wants each payload buffer to hold max(8 KiB, max_write, max_pages pages),
    // max_pages being capped by fs.fuse.max_pages_limit.
    let page = crate::sys::page_size() as usize;
    let pages_limit = std::fs::read_to_string("/proc/sys/fs/fuse/max_pages_limit")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
        .unwrap_or(256);
    let payload_len = (8192usize)
        .max(max_write)
        .max(reply_room.min(pages_limit.saturating_mul(page)));
    let built = uring::queue_count().and_then(|count| {
        (0..count)
            .map(|qid| {
                let qid = u16::try_from(qid).map_err(|_| {
                    io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("{count} CPUs is too many queues"),
                    )
                })?;
                uring::Queue::new(qid, device, RING_DEPTH, payload_len)
            })
            .collect::<io::Result<Vec<_>>>()
    });
    match built {
        Ok(queues) => Some(queues),
        Err(e) => {
            log::warn!("relay: io_uring off: cannot build the queues: {e}");
            None
        }
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(f)
        .map_err(|e| io::Error::new(e.kind(), format!("relay: cannot start thread {name}: {e}")))
}

fn prev_power_of_two(n: usize) -> usize {
    if n == 0 {
        0
    } else {
        1 << (usize::BITS - 1 - n.leading_zeros())
    }
}

pub(crate) fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: `fds` is a valid array of two ints for the kernel to fill.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("relay: socketpair failed: {e}"),
        ));
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ask for SOCKET_BUFFER_REQUEST on both directions. The *FORCE variants ignore
/// net.core.[rw]mem_max but need CAP_NET_ADMIN; without it the plain options are
/// silently capped, and `start` works out max_write from what it really got.
fn enlarge_buffers(fd: BorrowedFd<'_>) -> io::Result<()> {
    for (force, plain) in [
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
    ] {
        if let Err(e) = set_int_opt(fd, force, SOCKET_BUFFER_REQUEST) {
            if e.raw_os_error() != Some(libc::EPERM) {
                return Err(e);
            }
            set_int_opt(fd, plain, SOCKET_BUFFER_REQUEST)?;
        }
    }
    Ok(())
}

fn set_int_opt(fd: BorrowedFd<'_>, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("relay: setsockopt({name}) on the relay socket failed: {e}"),
        ));
    }
    Ok(())
}

fn socket_buffer(fd: BorrowedFd<'_>, name: libc::c_int) -> io::Result<usize> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("relay: getsockopt({name}) on the relay socket failed: {e}"),
        ));
    }
    usize::try_from(value).map_err(io::Error::other)
}

pub(crate) fn set_receive_timeout(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval for the duration of the call.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const tv).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("relay: setting SO_RCVTIMEO on the relay socket failed: {e}"),
        ));
    }
    Ok(())
}

/// How long a reading thread keeps trying for the next request before it sleeps: on a
/// virtual machine an idle CPU takes tens of microseconds to wake, more than a request's
/// own work, and requests of one workload come back to back.
const SPIN: Duration = Duration::from_micros(SPIN_MICROS);
const SPIN_MICROS: u64 = 30;

/// How an inbound thread waits for the next request when the device has none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceWait {
    /// Keep trying for [`SPIN`], then sleep on the device: requests that callers wait for
    /// come back to back.
    Spin,
    /// Sleep on the device until it has a request.
    Sleep,
    /// Sleep [`FORGET_WINDOW`] off the device, then try once more: the FORGETs that came
    /// meanwhile arrive together (as BATCH_FORGET), and the thread that queued each did
    /// not have to wake this one.
    Window,
}

/// How long the reader of a device that brings only FORGETs and INTERRUPTs stays away
/// from it while FORGETs keep coming. Waking a sleeping reader on another, halted vCPU
/// cost an `rm -rf` 39 % of its own time here (the wakeup inside `unlinkat`'s eviction);
/// a FORGET or INTERRUPT waits at most this long.
const FORGET_WINDOW: Duration = Duration::from_millis(1);

/// Reads the next request from the (non-blocking) device, waiting as `wait` says. EAGAIN
/// when nothing came.
fn read_request(fd: BorrowedFd<'_>, buf: &mut [u8], wait: DeviceWait) -> io::Result<usize> {
    let spin_until = Instant::now()
        + if wait == DeviceWait::Spin {
            SPIN
        } else {
            Duration::ZERO
        };
    loop {
        match read_fd(fd, buf) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {}
            other => return other,
        }
        if Instant::now() < spin_until {
            std::hint::spin_loop();
            continue;
        }
        if wait == DeviceWait::Window {
            std::thread::sleep(FORGET_WINDOW);
            return read_fd(fd, buf);
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, -1) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
        // Readable, or an error the next read reports (ENODEV once unmounted).
        return match read_fd(fd, buf) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(e),
            other => other,
        };
    }
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fcntl on a valid descriptor with integer arguments.
    let flags = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_fd(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

/// Runs a system call returning a byte count until it is not interrupted.
fn retrying_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        match usize::try_from(call()) {
            Ok(n) => return Ok(n),
            Err(_) => {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EINTR) {
                    return Err(e);
                }
            }
        }
    }
}

fn write_fd(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
    retrying_eintr(|| unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
}

/// Write a reply made of `header` and `payload` with one writev: the kernel takes a
/// reply only whole, from a single write.
fn write_reply(fd: BorrowedFd<'_>, header: &[u8], payload: &[u8]) -> io::Result<usize> {
    if payload.is_empty() {
        return write_fd(fd, header);
    }
    let iov = [
        libc::iovec {
            iov_base: header.as_ptr().cast_mut().cast(),
            iov_len: header.len(),
        },
        libc::iovec {
            iov_base: payload.as_ptr().cast_mut().cast(),
            iov_len: payload.len(),
        },
    ];
    // SAFETY: both iovecs describe live buffers, which writev only reads.
    retrying_eintr(|| unsafe {
        libc::writev(fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int)
    })
}

/// Send one seqpacket message. MSG_NOSIGNAL: a closed peer must be an EPIPE
/// error, not a process-killing SIGPIPE.
fn send_message(fd: BorrowedFd<'_>, buf: &[u8]) -> io::Result<()> {
    loop {
        // SAFETY: `buf` is valid for reads of `buf.len()` bytes.
        let n = unsafe {
            libc::send(
                fd.as_raw_fd(),
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// Receive one seqpacket message. With MSG_TRUNC a unix socket returns the real
/// message length even when it exceeded `buf`, so truncation is detectable.
fn recv_message(fd: BorrowedFd<'_>, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_TRUNC,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mount::tests::{MountGuard, TempDir, is_root, within};
    use crate::mount::{MountSpec, mount, unmount};
    use std::ffi::{CString, OsStr};
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::DirEntryExt;
    use std::os::unix::fs::MetadataExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::AtomicBool;
    use std::time::UNIX_EPOCH;

    use fuser::{
        Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, KernelConfig,
        LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen,
        ReplyWrite, Request, TimeOrNow, WriteFlags,
    };
    use parking_lot::RwLock;

    const HANG_LIMIT: Duration = Duration::from_secs(10);

    // ---- pure logic ----

    #[test]
    fn fuser_opcode_set_matches_fuser_0_18() {
        let parsed: Vec<u32> = (0..4200).filter(|&op| fuser_parses(op)).collect();
        let expected: Vec<u32> = (1..=6).chain(8..=18).chain(20..=47).collect();
        assert_eq!(parsed, expected);
        for op in [
            opcode::SETUPMAPPING,
            opcode::REMOVEMAPPING,
            opcode::SYNCFS,
            opcode::TMPFILE,
            opcode::STATX,
            53,
            4096,
        ] {
            assert!(!fuser_parses(op), "{op}");
        }
    }

    fn header(op: u32) -> InHeader {
        InHeader {
            len: IN_HEADER_LEN as u32,
            opcode: op,
            unique: 42,
            nodeid: 1,
            uid: 0,
            gid: 0,
            pid: 1,
            total_extlen: 0,
        }
    }

    struct Syncfs(i32);
    impl LocalAnswer for Syncfs {
        fn answer(&self, op: u32, _h: &InHeader, _b: &[u8]) -> Option<i32> {
            match op {
                opcode::SYNCFS => Some(self.0),
                // A buggy hook trying to swallow protocol requests.
                opcode::INIT | opcode::FORGET | opcode::DESTROY => Some(-libc::EIO),
                _ => None,
            }
        }
    }

    #[test]
    fn routing_decisions() {
        let d = UnsupportedOpcodes;
        assert_eq!(route(&d, &header(1), &[]), Route::Forward);
        assert_eq!(route(&d, &header(47), &[]), Route::Forward);
        for op in [7, 19, 48, 49, 50, 51, 52, 53, 200, 4096] {
            assert_eq!(
                route(&d, &header(op), &[]),
                Route::Answer(-libc::ENOSYS),
                "{op}"
            );
        }
        let s = Syncfs(0);
        assert_eq!(route(&s, &header(opcode::SYNCFS), &[]), Route::Answer(0));
        assert_eq!(route(&s, &header(opcode::INIT), &[]), Route::Forward);
        assert_eq!(route(&s, &header(opcode::FORGET), &[]), Route::Forward);
        assert_eq!(route(&s, &header(opcode::DESTROY), &[]), Route::Forward);
        // Without an answer the safety net still applies.
        assert_eq!(
            route(&s, &header(opcode::TMPFILE), &[]),
            Route::Answer(-libc::ENOSYS)
        );
        assert_eq!(
            route(&Syncfs(libc::EROFS), &header(opcode::SYNCFS), &[]),
            Route::Answer(-libc::EROFS)
        );
        assert_eq!(
            route(&Syncfs(-100_000), &header(opcode::SYNCFS), &[]),
            Route::Answer(-libc::EIO)
        );
    }

    #[test]
    fn in_header_round_trip() {
        let h = InHeader {
            len: 0x1234_5678,
            opcode: 51,
            unique: 0x0102_0304_0506_0708,
            nodeid: u64::MAX - 7,
            uid: 1000,
            gid: 100,
            pid: 4242,
            total_extlen: 3,
        };
        assert_eq!(InHeader::parse(&h.encode()), Some(h));
        assert_eq!(InHeader::parse(&h.encode()[..39]), None);
    }

    #[test]
    fn init_reply_is_clamped() {
        let mut msg = vec![0u8; OUT_HEADER_LEN + 64];
        msg[36..40].copy_from_slice(&(16u32 << 20).to_ne_bytes());
        msg[44..46].copy_from_slice(&4096u16.to_ne_bytes());
        clamp_init_reply(&mut msg, 1 << 20, 256);
        assert_eq!(u32::from_ne_bytes(msg[36..40].try_into().unwrap()), 1 << 20);
        assert_eq!(u16::from_ne_bytes(msg[44..46].try_into().unwrap()), 256);
        // Smaller values and error replies are left alone.
        clamp_init_reply(&mut msg, 2 << 20, 512);
        assert_eq!(u32::from_ne_bytes(msg[36..40].try_into().unwrap()), 1 << 20);
        let mut err = msg.clone();
        err[4..8].copy_from_slice(&(-libc::EIO).to_ne_bytes());
        err[36..40].copy_from_slice(&(16u32 << 20).to_ne_bytes());
        let before = err.clone();
        clamp_init_reply(&mut err, 4096, 1);
        assert_eq!(err, before);
        // A short (old-ABI) reply must not be touched out of bounds.
        let mut short = vec![0u8; OUT_HEADER_LEN + 8];
        clamp_init_reply(&mut short, 4096, 1);
    }

    #[test]
    fn power_of_two() {
        assert_eq!(prev_power_of_two(0), 0);
        assert_eq!(prev_power_of_two(1), 1);
        assert_eq!(prev_power_of_two(4096), 4096);
        assert_eq!(prev_power_of_two(8 << 20), 8 << 20);
        assert_eq!(prev_power_of_two((1 << 20) + 5), 1 << 20);
    }

    /// A connected seqpacket pair is not limited by net.unix.max_dgram_qlen (10
    /// here): the kernel skips the receive-queue check when the receiver's peer
    /// is the sender, so only the send buffer bounds what is in flight.
    #[test]
    fn socketpair_queue_is_bounded_by_bytes_not_count() {
        let (a, b) = seqpacket_pair().unwrap();
        enlarge_buffers(a.as_fd()).unwrap();
        let msg = [7u8; 64];
        let mut queued = 0;
        for _ in 0..1000 {
            // SAFETY: valid buffer.
            let n = unsafe {
                libc::send(
                    a.as_raw_fd(),
                    msg.as_ptr().cast(),
                    msg.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            };
            if n < 0 {
                break;
            }
            queued += 1;
        }
        assert_eq!(queued, 1000);
        let mut buf = [0u8; 128];
        assert_eq!(recv_message(b.as_fd(), &mut buf).unwrap(), 64);
    }

    #[test]
    fn only_fuser_sees_the_session_requests() {
        for op in [
            opcode::INIT,
            opcode::DESTROY,
            opcode::INTERRUPT,
            opcode::NOTIFY_REPLY,
        ] {
            assert!(fuser_only(op) && is_protocol(op), "{op}");
        }
        // The daemon may serve FORGETs, but `answer` and `defer` never see them.
        for op in [opcode::FORGET, opcode::BATCH_FORGET] {
            assert!(!fuser_only(op) && is_protocol(op), "{op}");
        }
        for op in [1, 3, 14, 28, 35, opcode::SYNCFS, opcode::STATX] {
            assert!(!fuser_only(op) && !is_protocol(op), "{op}");
        }
    }

    // ---- serving, with a socket standing in for /dev/fuse ----

    const LOOKUP: u32 = 1;
    const GETATTR: u32 = 3;
    const SETATTR: u32 = 4;
    const OPEN: u32 = 14;

    /// Serves GETATTR with a payload made from the request (its body, then its unique),
    /// LOOKUP with a positive ENOENT and a payload that must not be sent, FORGET and
    /// BATCH_FORGET with `forgets` (a wrong `Reply(0)` included), and nothing else.
    /// Offloads SETATTR when `gate` is set: the job waits for a word from the gate, then
    /// replies with the request's body, or panics if the word is `PANIC`.
    /// Records the opcode of every call to each method.
    struct Recorder {
        forgets: Option<Served>,
        gate: Option<Receiver<u32>>,
        served: Mutex<Vec<u32>>,
        answered: Mutex<Vec<u32>>,
        offloaded: Mutex<Vec<u32>>,
        deferred: Mutex<Vec<u32>>,
    }

    const PANIC: u32 = 666;

    impl Recorder {
        fn new(forgets: Option<Served>) -> Arc<Recorder> {
            Recorder::with_gate(forgets, None)
        }

        fn with_gate(forgets: Option<Served>, gate: Option<Receiver<u32>>) -> Arc<Recorder> {
            Arc::new(Recorder {
                forgets,
                gate,
                served: Mutex::new(Vec::new()),
                answered: Mutex::new(Vec::new()),
                offloaded: Mutex::new(Vec::new()),
                deferred: Mutex::new(Vec::new()),
            })
        }
    }

    impl LocalAnswer for Recorder {
        fn serve(&self, header: &InHeader, body: &[u8], out: &mut Vec<u8>) -> Option<Served> {
            self.served.lock().push(header.opcode);
            assert!(
                out.is_empty(),
                "the payload buffer is cleared before each call"
            );
            match header.opcode {
                GETATTR => {
                    out.extend_from_slice(body);
                    out.extend_from_slice(&header.unique.to_ne_bytes());
                    Some(Served::Reply(0))
                }
                LOOKUP => {
                    out.extend_from_slice(b"not for an error reply");
                    Some(Served::Reply(libc::ENOENT))
                }
                opcode::FORGET | opcode::BATCH_FORGET => self.forgets,
                _ => None,
            }
        }

        fn answer(&self, op: u32, _header: &InHeader, _body: &[u8]) -> Option<i32> {
            self.answered.lock().push(op);
            None
        }

        fn offload(&self, header: &InHeader, body: &[u8]) -> Option<OffloadedAnswer> {
            self.offloaded.lock().push(header.opcode);
            let gate = self.gate.clone().filter(|_| header.opcode == SETATTR)?;
            let body = body.to_vec();
            Some(Box::new(move |out| {
                if gate.recv_timeout(HANG_LIMIT) == Ok(PANIC) {
                    panic!("an offloaded job panics");
                }
                out.extend_from_slice(&body);
                0
            }))
        }

        fn defer(&self, header: &InHeader, _body: &[u8]) -> Option<DeferredAnswer> {
            self.deferred.lock().push(header.opcode);
            None
        }
    }

    /// A relay whose device is one end of a socketpair: the test writes requests into
    /// the other end as the kernel would and reads what the relay writes back; it also
    /// holds fuser's end and reads what is forwarded.
    struct FakeDevice {
        kernel: OwnedFd,
        fuser: OwnedFd,
        relay: Relay,
    }

    /// How long a "nothing arrives" check waits; a wrong write comes within microseconds.
    const QUIET: Duration = Duration::from_millis(300);

    impl FakeDevice {
        fn start(local: Arc<dyn LocalAnswer>) -> FakeDevice {
            let (kernel, device) = seqpacket_pair().unwrap();
            let (relay, fuser, _) = start(device, 2, local, false).unwrap();
            FakeDevice {
                kernel,
                fuser,
                relay,
            }
        }

        fn send(&self, op: u32, unique: u64, body: &[u8]) {
            let header = InHeader {
                len: (IN_HEADER_LEN + body.len()) as u32,
                opcode: op,
                unique,
                nodeid: 7,
                uid: 0,
                gid: 0,
                pid: 1,
                total_extlen: 0,
            };
            let message = [&header.encode()[..], body].concat();
            send_message(self.kernel.as_fd(), &message).unwrap();
        }

        /// The next message on `fd` within `limit`, if any.
        fn receive(fd: BorrowedFd<'_>, limit: Duration) -> Option<Vec<u8>> {
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let ready = unsafe { libc::poll(&mut pfd, 1, limit.as_millis() as libc::c_int) };
            if ready <= 0 {
                return None;
            }
            let mut buf = vec![0u8; 1 << 16];
            let n = recv_message(fd, &mut buf).unwrap();
            buf.truncate(n);
            Some(buf)
        }

        /// What the relay wrote to the device next.
        fn reply(&self) -> Vec<u8> {
            Self::receive(self.kernel.as_fd(), HANG_LIMIT).expect("no reply written")
        }

        fn assert_no_reply(&self) {
            if let Some(extra) = Self::receive(self.kernel.as_fd(), QUIET) {
                panic!("unexpected write to the device: {extra:?}");
            }
        }

        /// What the relay forwarded to fuser next.
        fn forwarded(&self) -> Vec<u8> {
            Self::receive(self.fuser.as_fd(), HANG_LIMIT).expect("nothing forwarded")
        }

        fn assert_nothing_forwarded(&self) {
            if let Some(extra) = Self::receive(self.fuser.as_fd(), QUIET) {
                panic!("unexpected message to fuser: {extra:?}");
            }
        }

        /// Close both ends the test plays; every relay thread must then end.
        fn finish(self) {
            let FakeDevice {
                kernel,
                fuser,
                relay,
            } = self;
            drop(kernel);
            drop(fuser);
            within("relay join", move || relay.join());
        }
    }

    fn out_header(reply: &[u8]) -> (u32, i32, u64) {
        (
            u32::from_ne_bytes(reply[0..4].try_into().unwrap()),
            i32::from_ne_bytes(reply[4..8].try_into().unwrap()),
            u64::from_ne_bytes(reply[8..16].try_into().unwrap()),
        )
    }

    #[test]
    fn served_reply_is_header_and_payload_in_one_write() {
        let hook = Recorder::new(None);
        let dev = FakeDevice::start(hook.clone());
        // More requests than inbound threads, so some thread serves twice and the hook's
        // check that it gets an empty buffer means something.
        for unique in [1000u64, 1002, 1004, 1006, 1008] {
            let body: Vec<u8> = (0..16).map(|i| i as u8 ^ unique as u8).collect();
            dev.send(GETATTR, unique, &body);
            let reply = dev.reply();
            let expected_payload = [&body[..], &unique.to_ne_bytes()].concat();
            assert_eq!(reply.len(), OUT_HEADER_LEN + expected_payload.len());
            assert_eq!(out_header(&reply), (reply.len() as u32, 0, unique));
            assert_eq!(&reply[OUT_HEADER_LEN..], &expected_payload[..]);
        }
        dev.assert_nothing_forwarded();
        assert!(
            hook.answered.lock().is_empty(),
            "served requests go no further"
        );
        assert!(hook.deferred.lock().is_empty());
        dev.finish();
    }

    #[test]
    fn served_error_reply_has_no_payload() {
        let dev = FakeDevice::start(Recorder::new(None));
        dev.send(LOOKUP, 77, b"name\0");
        let reply = dev.reply();
        assert_eq!(reply.len(), OUT_HEADER_LEN);
        assert_eq!(out_header(&reply), (16, -libc::ENOENT, 77));
        dev.assert_no_reply();
        dev.finish();
    }

    #[test]
    fn served_forgets_are_never_answered() {
        for forgets in [Served::Reply(0), Served::Reply(-libc::EIO), Served::NoReply] {
            let hook = Recorder::new(Some(forgets));
            let dev = FakeDevice::start(hook.clone());
            dev.send(opcode::FORGET, 10, &1u64.to_ne_bytes());
            let batch = [&1u32.to_ne_bytes()[..], &[0; 4], &[5; 16]].concat();
            dev.send(opcode::BATCH_FORGET, 12, &batch);
            // A served request after them: its reply must be the only write.
            dev.send(GETATTR, 14, &[0; 16]);
            let reply = dev.reply();
            assert_eq!(out_header(&reply).2, 14, "{forgets:?}");
            dev.assert_no_reply();
            dev.assert_nothing_forwarded();
            let mut served = hook.served.lock().clone();
            served.sort();
            assert_eq!(
                served,
                [opcode::FORGET, GETATTR, opcode::BATCH_FORGET],
                "{forgets:?}"
            );
            dev.finish();
        }
    }

    #[test]
    fn unserved_requests_go_on_as_before() {
        let hook = Recorder::new(None);
        let dev = FakeDevice::start(hook.clone());
        // OPEN: not served, so `defer`, `answer`, and finally fuser.
        dev.send(OPEN, 20, &[1, 2, 3, 4, 5, 6, 7, 8]);
        let forwarded = dev.forwarded();
        let header = InHeader::parse(&forwarded).unwrap();
        assert_eq!((header.opcode, header.unique), (OPEN, 20));
        assert_eq!(&forwarded[IN_HEADER_LEN..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(*hook.offloaded.lock(), [OPEN]);
        assert_eq!(*hook.deferred.lock(), [OPEN]);
        assert_eq!(*hook.answered.lock(), [OPEN]);

        // FORGET and BATCH_FORGET not served: to fuser, never past `answer` or `defer`.
        dev.send(opcode::FORGET, 22, &1u64.to_ne_bytes());
        assert_eq!(InHeader::parse(&dev.forwarded()).unwrap().unique, 22);
        dev.send(opcode::BATCH_FORGET, 24, &[0; 8]);
        assert_eq!(InHeader::parse(&dev.forwarded()).unwrap().unique, 24);

        // INTERRUPT is fuser's alone: not even offered to `serve`.
        dev.send(opcode::INTERRUPT, 26, &20u64.to_ne_bytes());
        assert_eq!(InHeader::parse(&dev.forwarded()).unwrap().unique, 26);

        // An opcode fuser cannot parse, unserved: the ENOSYS safety net.
        dev.send(opcode::TMPFILE, 28, &[0; 16]);
        assert_eq!(out_header(&dev.reply()), (16, -libc::ENOSYS, 28));

        dev.assert_no_reply();
        assert_eq!(
            *hook.served.lock(),
            [OPEN, opcode::FORGET, opcode::BATCH_FORGET, opcode::TMPFILE]
        );
        assert_eq!(*hook.answered.lock(), [OPEN, opcode::TMPFILE]);
        assert_eq!(*hook.offloaded.lock(), [OPEN, opcode::TMPFILE]);
        assert_eq!(*hook.deferred.lock(), [OPEN, opcode::TMPFILE]);
        dev.finish();
    }

    /// Offloaded requests wait on the relay's workers, not on the threads that read
    /// requests: with more of them waiting than there are reading threads, a served
    /// request still gets its reply. Each offloaded one then gets its own payload, and one
    /// whose job panics gets EIO.
    #[test]
    fn offloaded_requests_hold_up_no_reader() {
        let (open_gate, gate) = crossbeam_channel::unbounded();
        let hook = Recorder::with_gate(None, Some(gate));
        let dev = FakeDevice::start(hook.clone());
        let waiting = INBOUND_THREADS + 1;
        for i in 0..waiting as u64 {
            dev.send(SETATTR, 40 + 2 * i, &[i as u8; 8]);
        }
        dev.send(GETATTR, 60, &[7; 16]);
        assert_eq!(out_header(&dev.reply()), (16 + 16 + 8, 0, 60));

        for _ in 1..waiting {
            open_gate.send(0).unwrap();
        }
        open_gate.send(PANIC).unwrap();
        let mut replies: Vec<_> = (0..waiting).map(|_| dev.reply()).collect();
        replies.sort_by_key(|r| out_header(r).2);
        let mut panicked = 0;
        for (i, reply) in replies.iter().enumerate() {
            let (len, error, unique) = out_header(reply);
            assert_eq!(unique, 40 + 2 * i as u64);
            if error == -libc::EIO {
                assert_eq!(len, 16, "an error reply carries no payload");
                panicked += 1;
            } else {
                assert_eq!((len, error), (16 + 8, 0));
                assert_eq!(&reply[16..], &[i as u8; 8]);
            }
        }
        assert_eq!(panicked, 1);
        dev.assert_no_reply();
        dev.assert_nothing_forwarded();
        assert_eq!(hook.offloaded.lock().len(), waiting);
        assert!(hook.deferred.lock().is_empty());
        dev.finish();
    }

    #[test]
    fn nothing_is_served_once_shutdown_began() {
        let hook = Recorder::new(None);
        let dev = FakeDevice::start(hook.clone());
        dev.send(opcode::DESTROY, 30, &[]);
        assert_eq!(InHeader::parse(&dev.forwarded()).unwrap().unique, 30);
        let began = Instant::now();
        while !dev.relay.shared.shutdown_started.load(Ordering::Acquire) {
            assert!(began.elapsed() < HANG_LIMIT, "shutdown did not begin");
            std::thread::sleep(Duration::from_millis(1));
        }
        dev.send(GETATTR, 32, &[0; 16]);
        assert_eq!(out_header(&dev.reply()), (16, -libc::EIO, 32));
        assert!(hook.served.lock().is_empty());
        dev.finish();
    }

    // ---- a tiny filesystem: root directory with one file, "data" ----

    const ROOT: u64 = 1;
    const DATA: u64 = 2;

    struct TinyFs {
        content: Arc<RwLock<Vec<u8>>>,
        ttl: Duration,
        max_write: Option<u32>,
        destroyed: Arc<AtomicBool>,
    }

    fn attr(ino: u64, size: u64) -> FileAttr {
        FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind: if ino == ROOT {
                FileType::Directory
            } else {
                FileType::RegularFile
            },
            perm: if ino == ROOT { 0o755 } else { 0o644 },
            nlink: if ino == ROOT { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    impl TinyFs {
        fn attr_of(&self, ino: u64) -> Option<FileAttr> {
            match ino {
                ROOT => Some(attr(ROOT, 0)),
                DATA => Some(attr(DATA, self.content.read().len() as u64)),
                _ => None,
            }
        }
    }

    impl Filesystem for TinyFs {
        fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
            if let Some(max_write) = self.max_write {
                config.set_max_write(max_write).map_err(|nearest| {
                    io::Error::other(format!("max_write {max_write} refused; nearest {nearest}"))
                })?;
            }
            Ok(())
        }

        fn destroy(&mut self) {
            self.destroyed.store(true, Ordering::SeqCst);
        }

        fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
            if u64::from(parent) == ROOT && name == "data" {
                let a = attr(DATA, self.content.read().len() as u64);
                reply.entry(&self.ttl, &a, fuser::Generation(0));
            } else {
                reply.error(Errno::ENOENT);
            }
        }

        fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
            match self.attr_of(ino.into()) {
                Some(a) => reply.attr(&self.ttl, &a),
                None => reply.error(Errno::ENOENT),
            }
        }

        fn setattr(
            &self,
            _req: &Request,
            ino: INodeNo,
            _mode: Option<u32>,
            _uid: Option<u32>,
            _gid: Option<u32>,
            size: Option<u64>,
            _atime: Option<TimeOrNow>,
            _mtime: Option<TimeOrNow>,
            _ctime: Option<std::time::SystemTime>,
            _fh: Option<FileHandle>,
            _crtime: Option<std::time::SystemTime>,
            _chgtime: Option<std::time::SystemTime>,
            _bkuptime: Option<std::time::SystemTime>,
            _flags: Option<fuser::BsdFileFlags>,
            reply: ReplyAttr,
        ) {
            if let (DATA, Some(size)) = (u64::from(ino), size) {
                self.content.write().resize(size as usize, 0);
            }
            match self.attr_of(ino.into()) {
                Some(a) => reply.attr(&self.ttl, &a),
                None => reply.error(Errno::ENOENT),
            }
        }

        fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
            reply.opened(FileHandle(0), FopenFlags::empty());
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
            let content = self.content.read();
            let start = (offset as usize).min(content.len());
            let end = (start + size as usize).min(content.len());
            reply.data(&content[start..end]);
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
            let mut content = self.content.write();
            let end = offset as usize + data.len();
            if content.len() < end {
                content.resize(end, 0);
            }
            content[offset as usize..end].copy_from_slice(data);
            reply.written(data.len() as u32);
        }

        fn readdir(
            &self,
            _req: &Request,
            ino: INodeNo,
            _fh: FileHandle,
            offset: u64,
            mut reply: ReplyDirectory,
        ) {
            if u64::from(ino) != ROOT {
                reply.error(Errno::ENOTDIR);
                return;
            }
            let entries = [
                (ROOT, FileType::Directory, "."),
                (ROOT, FileType::Directory, ".."),
                (DATA, FileType::RegularFile, "data"),
            ];
            for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                    break;
                }
            }
            reply.ok();
        }
    }

    // ---- harness ----

    /// A mounted TinyFs. Field order is drop order: unmount before removing the dir.
    struct Harness {
        guard: MountGuard,
        dir: TempDir,
        relay: Option<Relay>,
        session: crossbeam_channel::Receiver<io::Result<()>>,
        destroyed: Arc<AtomicBool>,
        content: Arc<RwLock<Vec<u8>>>,
    }

    impl Harness {
        fn path(&self, name: &str) -> PathBuf {
            self.dir.0.join(name)
        }

        /// Unmount and check that fuser's run() returned Ok, destroy() ran, and
        /// the relay threads ended.
        fn unmount_and_check(mut self) {
            let mountpoint = self.dir.0.clone();
            within("umount", move || unmount(&mountpoint)).unwrap();
            let result = self
                .session
                .recv_timeout(HANG_LIMIT)
                .expect("Session::run did not return after umount");
            result.expect("Session::run returned an error");
            assert!(
                self.destroyed.load(Ordering::SeqCst),
                "destroy() not called"
            );
            if let Some(relay) = self.relay.take() {
                within("relay join", move || relay.join());
            }
            let _ = &self.guard;
        }
    }

    fn tiny_fs(content: Vec<u8>, ttl: Duration, max_write: Option<u32>) -> TinyFs {
        TinyFs {
            content: Arc::new(RwLock::new(content)),
            ttl,
            max_write,
            destroyed: Arc::new(AtomicBool::new(false)),
        }
    }

    fn fuser_config(threads: usize) -> fuser::Config {
        let mut config = fuser::Config::default();
        config.n_threads = Some(threads);
        config.clone_fd = false;
        config
    }

    fn mount_with_relay(
        tag: &str,
        content: Vec<u8>,
        ttl: Duration,
        fuser_threads: usize,
        local: Arc<dyn LocalAnswer>,
    ) -> Harness {
        let dir = TempDir::new(tag);
        let spec = MountSpec {
            mountpoint: dir.0.clone(),
            fsname: format!("ovlfuse-{tag}"),
            subtype: "ovlfuse".into(),
            ms_flags: libc::MS_NOSUID | libc::MS_NODEV,
            allow_other: true,
            default_permissions: true,
            read_only: false,
            block_device: None,
        };
        let mounted = mount(&spec).unwrap();
        let guard = MountGuard(dir.0.clone());
        let (relay, fuser_end, max_write) =
            start(mounted.into_device(), fuser_threads, local, false).unwrap();
        let fs = tiny_fs(content, ttl, Some(max_write));
        let (destroyed, content) = (Arc::clone(&fs.destroyed), Arc::clone(&fs.content));
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let result = fuser::Session::from_fd(
                fs,
                fuser_end,
                fuser::SessionACL::All,
                fuser_config(fuser_threads),
            )
            .and_then(|session| session.run());
            let _ = tx.send(result);
        });
        Harness {
            guard,
            dir,
            relay: Some(relay),
            session: rx,
            destroyed,
            content,
        }
    }

    fn mount_plain_fuser(tag: &str, content: Vec<u8>, ttl: Duration) -> Harness {
        let dir = TempDir::new(tag);
        let fs = tiny_fs(content, ttl, None);
        let (destroyed, content) = (Arc::clone(&fs.destroyed), Arc::clone(&fs.content));
        let mut config = fuser_config(2);
        config.acl = fuser::SessionACL::All;
        config.mount_options = vec![
            fuser::MountOption::FSName(format!("ovlfuse-{tag}")),
            fuser::MountOption::Subtype("ovlfuse".into()),
        ];
        let session = fuser::Session::new(fs, &dir.0, &config).unwrap();
        let guard = MountGuard(dir.0.clone());
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(session.run());
        });
        Harness {
            guard,
            dir,
            relay: None,
            session: rx,
            destroyed,
            content,
        }
    }

    fn c_path(path: &Path) -> CString {
        CString::new(path.as_os_str().as_bytes()).unwrap()
    }

    /// open(dir, O_TMPFILE|O_RDWR); returns the errno (0 on success).
    fn open_tmpfile(dir: PathBuf) -> i32 {
        let c = c_path(&dir);
        // SAFETY: valid path; the descriptor is closed right away.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
        if fd < 0 {
            return io::Error::last_os_error().raw_os_error().unwrap_or(-1);
        }
        // SAFETY: we own fd.
        unsafe { libc::close(fd) };
        0
    }

    /// statx(path, STATX_BASIC_STATS|STATX_BTIME); returns (errno, size).
    fn statx_btime(path: PathBuf) -> (i32, u64) {
        let c = c_path(&path);
        // SAFETY: zeroed statx is a valid value to be overwritten.
        let mut buf: libc::statx = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and output buffer.
        let rc = unsafe {
            libc::statx(
                libc::AT_FDCWD,
                c.as_ptr(),
                0,
                libc::STATX_BASIC_STATS | libc::STATX_BTIME,
                &mut buf,
            )
        };
        if rc != 0 {
            return (io::Error::last_os_error().raw_os_error().unwrap_or(-1), 0);
        }
        (0, buf.stx_size)
    }

    fn stat_errno(path: &CString) -> i32 {
        // SAFETY: zeroed stat is a valid value to be overwritten.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid path and output buffer.
        if unsafe { libc::stat(path.as_ptr(), &mut st) } == 0 {
            0
        } else {
            io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    // ---- end to end ----

    #[test]
    fn relay_end_to_end() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        let _ = env_logger::builder().is_test(true).try_init();
        let size = (1 << 20) + 123;
        let h = mount_with_relay(
            "e2e",
            pattern(size),
            Duration::from_secs(1),
            2,
            Arc::new(UnsupportedOpcodes),
        );

        let dir = h.dir.0.clone();
        let names = within("readdir", move || {
            let mut names: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        });
        assert_eq!(names, ["data"]);

        let data = h.path("data");
        let meta = within("stat", move || std::fs::metadata(data).unwrap());
        assert_eq!(meta.len(), size as u64);
        assert!(meta.is_file());

        let data = h.path("data");
        let read = within("1 MiB read", move || std::fs::read(data).unwrap());
        assert!(read == pattern(size), "read back different bytes");

        let relay = h.relay.as_ref().unwrap();
        let largest_read = relay.shared.largest_reply.load(Ordering::Relaxed);

        let errno = within("O_TMPFILE open", {
            let dir = h.dir.0.clone();
            move || open_tmpfile(dir)
        });
        assert_eq!(
            errno,
            libc::EOPNOTSUPP,
            "O_TMPFILE should fail with EOPNOTSUPP"
        );
        assert_eq!(relay.seen(opcode::TMPFILE), 1);
        // The kernel remembers ENOSYS: a second try does not even ask.
        let errno = within("second O_TMPFILE open", {
            let dir = h.dir.0.clone();
            move || open_tmpfile(dir)
        });
        assert_eq!(errno, libc::EOPNOTSUPP);
        assert_eq!(relay.seen(opcode::TMPFILE), 1);

        let (errno, stx_size) = within("statx(STATX_BTIME)", {
            let data = h.path("data");
            move || statx_btime(data)
        });
        assert_eq!(errno, 0);
        assert_eq!(stx_size, size as u64);
        eprintln!(
            "FUSE_STATX requests seen by the relay: {}",
            relay.seen(opcode::STATX)
        );

        let errno = within("syncfs", {
            let data = h.path("data");
            move || {
                let file = std::fs::File::open(data).unwrap();
                // SAFETY: valid descriptor.
                if unsafe { libc::syncfs(file.as_raw_fd()) } == 0 {
                    0
                } else {
                    io::Error::last_os_error().raw_os_error().unwrap_or(-1)
                }
            }
        });
        assert_eq!(errno, 0);
        eprintln!(
            "FUSE_SYNCFS requests seen by the relay: {}",
            relay.seen(opcode::SYNCFS)
        );

        // A 1 MiB write arrives as max_write-sized WRITE requests.
        let new = pattern(1 << 20).into_iter().rev().collect::<Vec<u8>>();
        within("1 MiB write", {
            let data = h.path("data");
            let new = new.clone();
            move || std::fs::write(data, new).unwrap()
        });
        assert!(*h.content.read() == new, "fs content differs after write");
        let largest_write = relay.shared.largest_request.load(Ordering::Relaxed);
        eprintln!(
            "max_write {}; largest request forwarded {largest_write} bytes; \
             largest read reply {largest_read} bytes",
            relay.max_write()
        );
        // How the kernel splits a 1 MiB write varies from run to run; what must hold is that
        // no request exceeded what the negotiated max_write lets the kernel send.
        assert!(
            largest_write <= relay.max_write() as usize + 4096,
            "a WRITE larger than max_write was forwarded"
        );

        let mut seen: Vec<(usize, u64)> = (0..64)
            .map(|op| (op, relay.shared.seen[op].load(Ordering::Relaxed)))
            .filter(|&(_, n)| n > 0)
            .collect();
        seen.sort();
        eprintln!("opcodes seen by the relay (opcode, count): {seen:?}");

        h.unmount_and_check();
    }

    /// Shutdown with more fuser workers than relay threads: every worker must
    /// get its DESTROY, even with no traffic at all after INIT.
    #[test]
    fn relay_shutdown_with_many_workers() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        for threads in [1, 5] {
            let h = mount_with_relay(
                &format!("shutdown{threads}"),
                b"hello\n".to_vec(),
                Duration::from_secs(1),
                threads,
                Arc::new(UnsupportedOpcodes),
            );
            let data = h.path("data");
            assert_eq!(
                within("read", move || std::fs::read(data).unwrap()),
                b"hello\n"
            );
            h.unmount_and_check();
        }
    }

    /// The LocalAnswer hook answers an opcode fuser cannot parse with a real result.
    #[test]
    fn local_answer_hook_is_used() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        struct NoTmpfileButEnoent;
        impl LocalAnswer for NoTmpfileButEnoent {
            fn answer(&self, op: u32, _h: &InHeader, _b: &[u8]) -> Option<i32> {
                (op == opcode::TMPFILE).then_some(-libc::EROFS)
            }
        }
        let h = mount_with_relay(
            "hook",
            Vec::new(),
            Duration::from_secs(1),
            2,
            Arc::new(NoTmpfileButEnoent),
        );
        let errno = within("O_TMPFILE open", {
            let dir = h.dir.0.clone();
            move || open_tmpfile(dir)
        });
        assert_eq!(errno, libc::EROFS);
        h.unmount_and_check();
    }

    /// Replies the daemon serves itself reach the kernel intact: a name fuser's
    /// filesystem does not have, its attributes, and a listing that shows it.
    #[test]
    fn served_replies_are_accepted_by_the_kernel() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        const SERVED: u64 = 3;
        const SERVED_SIZE: u64 = 4242;
        /// Serves LOOKUP of "served", GETATTR of its node, and READDIR of the root;
        /// leaves everything else to fuser's TinyFs.
        #[derive(Default)]
        struct ServeOne {
            lookups: AtomicU64,
            getattrs: AtomicU64,
            readdirs: AtomicU64,
        }
        impl ServeOne {
            fn attr() -> FileAttr {
                FileAttr {
                    atime: UNIX_EPOCH - Duration::new(1, 200_000_000),
                    ..attr(SERVED, SERVED_SIZE)
                }
            }
        }
        impl LocalAnswer for ServeOne {
            fn serve(&self, header: &InHeader, body: &[u8], out: &mut Vec<u8>) -> Option<Served> {
                use crate::wire;
                match header.opcode {
                    1 if header.nodeid == ROOT => {
                        if wire::parse_name(body)? != "served" {
                            return None;
                        }
                        self.lookups.fetch_add(1, Ordering::Relaxed);
                        // TTL zero: every stat asks again.
                        wire::put_entry_out(
                            out,
                            &Duration::ZERO,
                            &Self::attr(),
                            fuser::Generation(1),
                        );
                        Some(Served::Reply(0))
                    }
                    3 if header.nodeid == SERVED => {
                        wire::parse_getattr(body)?;
                        self.getattrs.fetch_add(1, Ordering::Relaxed);
                        wire::put_attr_out(out, &Duration::ZERO, &Self::attr());
                        Some(Served::Reply(0))
                    }
                    28 if header.nodeid == ROOT => {
                        let Some(read) = wire::parse_read(body) else {
                            return Some(Served::Reply(-libc::EIO));
                        };
                        self.readdirs.fetch_add(1, Ordering::Relaxed);
                        let entries = [
                            (ROOT, FileType::Directory, "."),
                            (ROOT, FileType::Directory, ".."),
                            (SERVED, FileType::RegularFile, "served"),
                        ];
                        let mut list = wire::DirentList::new(out, read.size);
                        for (i, (ino, kind, name)) in
                            entries.iter().enumerate().skip(read.offset as usize)
                        {
                            if !list.add_if_fits(*ino, i as u64 + 1, *kind, OsStr::new(name)) {
                                break;
                            }
                        }
                        Some(Served::Reply(0))
                    }
                    _ => None,
                }
            }

            fn answer(&self, op: u32, h: &InHeader, b: &[u8]) -> Option<i32> {
                UnsupportedOpcodes.answer(op, h, b)
            }
        }
        let hook = Arc::new(ServeOne::default());
        let h = mount_with_relay(
            "serve",
            b"fuser's\n".to_vec(),
            Duration::from_secs(1),
            2,
            hook.clone(),
        );

        let served = h.path("served");
        let meta = within("stat served", move || {
            std::fs::symlink_metadata(served).unwrap()
        });
        assert_eq!(meta.len(), SERVED_SIZE);
        assert_eq!(meta.ino(), SERVED);
        assert_eq!(meta.mode(), libc::S_IFREG | 0o644);
        assert_eq!((meta.atime(), meta.atime_nsec()), (-2, 800_000_000));
        assert!(hook.lookups.load(Ordering::Relaxed) >= 1);

        // fstat on an open file: attributes expired at once, so a GETATTR (with fh).
        let served = h.path("served");
        let size = within("fstat served", move || {
            let file = std::fs::File::open(served).unwrap();
            file.metadata().unwrap().len()
        });
        assert_eq!(size, SERVED_SIZE);
        assert!(hook.getattrs.load(Ordering::Relaxed) >= 1);

        let dir = h.dir.0.clone();
        let mut names = within("readdir", move || {
            std::fs::read_dir(dir)
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    (e.file_name().to_string_lossy().into_owned(), e.ino())
                })
                .collect::<Vec<_>>()
        });
        names.sort();
        assert_eq!(names, [("served".to_string(), SERVED)]);
        assert!(hook.readdirs.load(Ordering::Relaxed) >= 1);

        // fuser still answers what the hook leaves alone.
        let data = h.path("data");
        assert_eq!(
            within("read data", move || std::fs::read(data).unwrap()),
            b"fuser's\n"
        );
        h.unmount_and_check();
    }

    /// What plain fuser 0.18.0 (no relay) does with opcodes it cannot parse.
    #[test]
    fn plain_fuser_unknown_opcodes() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        let h = mount_plain_fuser("plain-unknown", b"x".to_vec(), Duration::from_secs(1));
        let errno = within("O_TMPFILE open on plain fuser", {
            let dir = h.dir.0.clone();
            move || open_tmpfile(dir)
        });
        eprintln!("plain fuser: O_TMPFILE -> errno {errno}");
        let (errno, _) = within("statx on plain fuser", {
            let data = h.path("data");
            move || statx_btime(data)
        });
        eprintln!("plain fuser: statx -> errno {errno}");
        h.unmount_and_check();
    }

    /// 20,000 stat() calls with entry/attr TTL 0 (each one is a LOOKUP round
    /// trip), through the relay and through a plain fuser mount.
    /// Run with: cargo test --release -- --ignored --nocapture relay_overhead
    #[test]
    #[ignore = "benchmark; run explicitly"]
    fn relay_overhead_benchmark() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        const N: usize = 20_000;
        fn time_stats(h: &Harness) -> Duration {
            let path = c_path(&h.path("data"));
            // Warm up (and let the kernel learn ENOSYS for anything optional).
            for _ in 0..500 {
                assert_eq!(stat_errno(&path), 0);
            }
            let begin = Instant::now();
            for _ in 0..N {
                assert_eq!(stat_errno(&path), 0);
            }
            begin.elapsed()
        }
        let mut results = Vec::new();
        for round in 0..3 {
            let relay = mount_with_relay(
                &format!("bench-relay{round}"),
                b"x".to_vec(),
                Duration::ZERO,
                2,
                Arc::new(UnsupportedOpcodes),
            );
            let with_relay = time_stats(&relay);
            let lookups = relay.relay.as_ref().map_or(0, |r| r.seen(1));
            relay.unmount_and_check();

            let plain = mount_plain_fuser(
                &format!("bench-plain{round}"),
                b"x".to_vec(),
                Duration::ZERO,
            );
            let without = time_stats(&plain);
            plain.unmount_and_check();
            eprintln!(
                "round {round}: relay {:.2} us/stat ({lookups} LOOKUPs), plain fuser {:.2} us/stat, ratio {:.3}",
                with_relay.as_secs_f64() * 1e6 / N as f64,
                without.as_secs_f64() * 1e6 / N as f64,
                with_relay.as_secs_f64() / without.as_secs_f64()
            );
            results.push(with_relay.as_secs_f64() / without.as_secs_f64());
        }
        results.sort_by(f64::total_cmp);
        eprintln!("median relay/plain ratio: {:.3}", results[1]);
    }
}
