//! The status file container managers poll, its registry, and the `ovlfuse status` command.
//!
//! Owns: what a mount reports to the outside — its state (ok, poisoned, unmounted), the first
//! upper-layer error and when it happened, mode, transport, daemon pid — and the on-disk form
//! of that: `WORKDIR/ovlfuse-status`, a line-based `key=value` text replaced atomically on
//! every change; the registry entry that leads from a mountpoint to its workdir
//! (`/run/ovlfuse/mounts/` for root, `$XDG_RUNTIME_DIR/ovlfuse/mounts/` otherwise); and the
//! `ovlfuse status MOUNTPOINT|WORKDIR` command that reads them.
//!
//! Must never: touch the FUSE mount — no stat, open or lookup at or below the mountpoint,
//! since a hung daemon would hang the poller (the command reaches a mountpoint only through
//! its parent directory, `readlink`, the registry and `/proc`); fail, block on the mount or
//! panic the daemon because the status cannot be written (a failed write is logged and the
//! mount carries on); follow a path by string after [`StatusFile::create`] (every write goes
//! through the directory handles opened there).
//!
//! # The status file
//!
//! ```text
//! # ovlfuse status (format 1): one key=value per line
//! version=1
//! state=poisoned
//! errno=28
//! errno_name=ENOSPC
//! first_error=1767225600
//! mode=volatile
//! transport=fuseblk
//! pid=4242
//! pid_start=1234567
//! mountpoint=/var/lib/containers/storage/overlay/abc/merged
//! workdir=/var/lib/containers/storage/overlay/abc/work
//! updated=1767225600
//! ```
//!
//! - `state`: `ok` (mounted and served, no error recorded), `poisoned` (an upper-layer
//!   writeback error was recorded: data written through the union may be lost; it stays so
//!   for the life of the mount), `unmounted` (the daemon has finished serving; `errno` stays
//!   if an error was recorded, including a failed flush of the upper layer at unmount).
//! - `errno`, `errno_name`: the first error (`0` and empty when none); later errors never
//!   replace it. `first_error`: when it was recorded, in unix seconds (empty when none).
//! - `mode`: `durable` (fsync honoured), `volatile`, or `nosync` (`fsync=0`).
//! - `transport`: `fuse` or `fuseblk`.
//! - `pid`, `pid_start`: the daemon's pid, and its start time (field 22 of `/proc/PID/stat`,
//!   clock ticks after boot) so that a recycled pid is not taken for the daemon.
//! - `mountpoint`, `workdir`: canonical paths. A backslash, a control character or a byte
//!   that is not UTF-8 is written `\xHH`.
//! - `updated`: when this version of the file was written, in unix seconds.
//!
//! Each version is written to `.ovlfuse-status.next-PID` and renamed over `ovlfuse-status`
//! (with an `fsync` of the file and the workdir on durable mounts only: a volatile or
//! `fsync=0` mount must not flush the upper filesystem). While mounted, that temporary name
//! holds a spare with one block allocated, so the next version needs no allocation and can
//! still be written when the filesystem is full — ENOSPC or EDQUOT being what poisons a
//! mount. The last version (`unmounted`) leaves no spare.
//!
//! Lines starting with `#` and empty lines are comments. Readers ignore keys they do not
//! know (later versions may add some); a line without `=`, a repeated key, a missing key, a
//! bad value or a `version` other than 1 makes the file invalid.
//!
//! # Registry
//!
//! `REGISTRY/<escaped mountpoint>` (the canonical mountpoint with `%`, `/`, spaces and control
//! bytes written `%HH`, or `long-<hash>` past 255 bytes) holds `version`, `mountpoint`,
//! `workdir` and `pid` in the same format. The daemon writes it with the first state and
//! removes it when it records `unmounted`. An entry a killed daemon left behind still leads
//! to its status file (which then names a dead pid); the next daemon to register removes it
//! once that mount is gone too.
//!
//! # Locking
//!
//! One mutex per [`StatusFile`] guards its state and its writes, so files are written in the
//! order the changes happened. It is a leaf lock: nothing else is taken while it is held, and
//! the writes go to the workdir's own filesystem, never through the union.

use std::ffi::{CString, OsString};
use std::fmt;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

pub use crate::health::Mode;
use crate::health::errno_name;
use crate::sys;

/// The status file's name in the workdir.
pub const STATUS_FILE: &str = "ovlfuse-status";
/// The format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Where a root daemon registers its mountpoint.
pub const ROOT_REGISTRY: &str = "/run/ovlfuse/mounts";

/// `ovlfuse status` exit code: mounted, served, no error recorded.
pub const EXIT_HEALTHY: i32 = 0;
/// `ovlfuse status` exit code: an error was recorded (poisoned, or unmounted after an error),
/// whether or not the daemon still runs: data written through the union may be lost.
pub const EXIT_POISONED: i32 = 1;
/// `ovlfuse status` exit code: not running (unmounted cleanly, daemon gone, not mounted, no
/// status to be found) or the target could not be read.
pub const EXIT_NOT_RUNNING: i32 = 2;

const STATUS_TEMP_PREFIX: &str = ".ovlfuse-status.next-";
const REGISTRY_TEMP_PREFIX: &str = ".tmp-";
/// Longest file name the registry directory takes (NAME_MAX).
const MAX_NAME: usize = 255;

/// What a mount reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Ok,
    Poisoned,
    Unmounted,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Ok => "ok",
            State::Poisoned => "poisoned",
            State::Unmounted => "unmounted",
        }
    }

    fn parse(s: &str) -> Option<State> {
        [State::Ok, State::Poisoned, State::Unmounted]
            .into_iter()
            .find(|v| v.name() == s)
    }
}

/// How the kernel reaches the daemon: a plain `fuse.ovlfuse` mount, or `fuseblk.ovlfuse`
/// (which forwards syncfs to the daemon).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Fuse,
    Fuseblk,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Fuse => "fuse",
            Transport::Fuseblk => "fuseblk",
        }
    }

    fn parse(s: &str) -> Option<Transport> {
        [Transport::Fuse, Transport::Fuseblk]
            .into_iter()
            .find(|v| v.name() == s)
    }

    /// The type `/proc/self/mountinfo` shows for an ovlfuse mount of this transport.
    pub fn fstype(self) -> &'static str {
        match self {
            Transport::Fuse => "fuse.ovlfuse",
            Transport::Fuseblk => "fuseblk.ovlfuse",
        }
    }
}

fn mode_parse(s: &str) -> Option<Mode> {
    [Mode::Durable, Mode::Volatile, Mode::NoSync]
        .into_iter()
        .find(|v| v.name() == s)
}

/// One version of the status file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub state: State,
    /// The first error recorded; 0 when none.
    pub errno: i32,
    /// When `errno` was recorded, unix seconds.
    pub first_error: Option<u64>,
    pub mode: Mode,
    pub transport: Transport,
    pub pid: u32,
    /// Field 22 of `/proc/PID/stat`; `None` if it could not be read.
    pub pid_start: Option<u64>,
    pub mountpoint: PathBuf,
    pub workdir: PathBuf,
    /// When this version was written, unix seconds.
    pub updated: u64,
}

/// Why a status file or registry entry could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    /// 1-based line, when the problem is on one line.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(n) => write!(f, "line {n}: {}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for ParseError {}

impl Status {
    /// The file's text.
    pub fn to_text(&self) -> Vec<u8> {
        let mut w = Writer::new("ovlfuse status");
        w.field("state", self.state.name());
        w.field("errno", &self.errno.to_string());
        w.field(
            "errno_name",
            &if self.errno == 0 {
                String::new()
            } else {
                errno_name(self.errno)
            },
        );
        w.field("first_error", &opt_u64(self.first_error));
        w.field("mode", self.mode.name());
        w.field("transport", self.transport.name());
        w.field("pid", &self.pid.to_string());
        w.field("pid_start", &opt_u64(self.pid_start));
        w.path("mountpoint", &self.mountpoint);
        w.path("workdir", &self.workdir);
        w.field("updated", &self.updated.to_string());
        w.0
    }

    /// Reads a status file's text; `errno_name` is informative and not checked.
    pub fn parse(text: &[u8]) -> Result<Status, ParseError> {
        let f = Fields::parse(text)?;
        Ok(Status {
            state: f.choice("state", State::parse, "ok|poisoned|unmounted")?,
            errno: f.number("errno")?,
            first_error: f.optional_number("first_error")?,
            mode: f.choice("mode", mode_parse, "durable|volatile|nosync")?,
            transport: f.choice("transport", Transport::parse, "fuse|fuseblk")?,
            pid: f.number("pid")?,
            pid_start: f.optional_number("pid_start")?,
            mountpoint: f.path("mountpoint")?,
            workdir: f.path("workdir")?,
            updated: f.number("updated")?,
        })
    }
}

fn opt_u64(v: Option<u64>) -> String {
    v.map(|v| v.to_string()).unwrap_or_default()
}

/// Builds `key=value` text.
struct Writer(Vec<u8>);

impl Writer {
    fn new(what: &str) -> Writer {
        let mut w = Writer(Vec::new());
        w.0.extend_from_slice(
            format!("# {what} (format {FORMAT_VERSION}): one key=value per line\n").as_bytes(),
        );
        w.field("version", &FORMAT_VERSION.to_string());
        w
    }

    fn field(&mut self, key: &str, value: &str) {
        self.raw(key, value.as_bytes());
    }

    fn path(&mut self, key: &str, value: &Path) {
        self.raw(key, value.as_os_str().as_bytes());
    }

    fn raw(&mut self, key: &str, value: &[u8]) {
        self.0.extend_from_slice(key.as_bytes());
        self.0.push(b'=');
        escape_into(value, &mut self.0);
        self.0.push(b'\n');
    }
}

/// `\xHH` for a backslash, a control character and every byte that is not UTF-8, so a value
/// is one line whatever bytes a path holds.
fn escape_into(value: &[u8], out: &mut Vec<u8>) {
    let hex = |out: &mut Vec<u8>, b: u8| out.extend_from_slice(format!("\\x{b:02x}").as_bytes());
    for chunk in value.utf8_chunks() {
        for c in chunk.valid().chars() {
            let mut buf = [0u8; 4];
            let bytes = c.encode_utf8(&mut buf).as_bytes();
            if c == '\\' || c.is_control() {
                bytes.iter().for_each(|b| hex(out, *b));
            } else {
                out.extend_from_slice(bytes);
            }
        }
        chunk.invalid().iter().for_each(|b| hex(out, *b));
    }
}

fn unescape(value: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        if value[i] != b'\\' {
            out.push(value[i]);
            i += 1;
            continue;
        }
        let byte = value
            .get(i + 1..i + 4)
            .filter(|e| e[0] == b'x')
            .and_then(|e| std::str::from_utf8(&e[1..]).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .ok_or_else(|| {
                format!(
                    "bad escape {:?} (only \\xHH is allowed)",
                    String::from_utf8_lossy(&value[i..value.len().min(i + 4)])
                )
            })?;
        out.push(byte);
        i += 4;
    }
    Ok(out)
}

/// The `key=value` lines of a file, checked for shape and version.
struct Fields(Vec<(String, Vec<u8>, usize)>);

impl Fields {
    fn parse(text: &[u8]) -> Result<Fields, ParseError> {
        let at = |line: usize, message: String| ParseError {
            line: Some(line),
            message,
        };
        let mut fields: Vec<(String, Vec<u8>, usize)> = Vec::new();
        for (i, line) in text.split(|b| *b == b'\n').enumerate() {
            let n = i + 1;
            if line.is_empty() || line[0] == b'#' {
                continue;
            }
            let Some(eq) = line.iter().position(|b| *b == b'=') else {
                return Err(at(
                    n,
                    format!(
                        "expected key=value, found {:?}",
                        String::from_utf8_lossy(&line[..line.len().min(60)])
                    ),
                ));
            };
            let key = &line[..eq];
            let key_ok = !key.is_empty()
                && key
                    .iter()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_');
            if !key_ok {
                return Err(at(n, format!("bad key {:?}", String::from_utf8_lossy(key))));
            }
            let key = String::from_utf8_lossy(key).into_owned();
            if let Some((_, _, first)) = fields.iter().find(|(k, _, _)| *k == key) {
                return Err(at(
                    n,
                    format!("key {key} appears twice (first on line {first})"),
                ));
            }
            fields.push((key, line[eq + 1..].to_vec(), n));
        }
        if fields.is_empty() {
            return Err(ParseError {
                line: None,
                message: "no key=value lines (empty file?)".into(),
            });
        }
        let f = Fields(fields);
        let version: u32 = f.number("version")?;
        if version != FORMAT_VERSION {
            return Err(at(
                f.line_of("version"),
                format!(
                    "format version {version} is not supported (this ovlfuse reads {FORMAT_VERSION})"
                ),
            ));
        }
        Ok(f)
    }

    fn line_of(&self, key: &str) -> usize {
        self.0
            .iter()
            .find(|(k, _, _)| k == key)
            .map_or(0, |(_, _, n)| *n)
    }

    fn raw(&self, key: &str) -> Result<(&[u8], usize), ParseError> {
        self.0
            .iter()
            .find(|(k, _, _)| k == key)
            .map(|(_, v, n)| (v.as_slice(), *n))
            .ok_or_else(|| ParseError {
                line: None,
                message: format!("missing {key}="),
            })
    }

    fn text(&self, key: &str) -> Result<(&str, usize), ParseError> {
        let (value, n) = self.raw(key)?;
        let text = std::str::from_utf8(value).map_err(|_| ParseError {
            line: Some(n),
            message: format!("{key}= is not text"),
        })?;
        Ok((text, n))
    }

    fn bad(&self, key: &str, value: &str, n: usize, expected: &str) -> ParseError {
        ParseError {
            line: Some(n),
            message: format!("bad {key}={value:?}: expected {expected}"),
        }
    }

    fn number<T: std::str::FromStr>(&self, key: &str) -> Result<T, ParseError> {
        let (text, n) = self.text(key)?;
        text.parse()
            .map_err(|_| self.bad(key, text, n, "a non-negative decimal number"))
    }

    fn optional_number(&self, key: &str) -> Result<Option<u64>, ParseError> {
        let (text, n) = self.text(key)?;
        if text.is_empty() {
            return Ok(None);
        }
        text.parse()
            .map(Some)
            .map_err(|_| self.bad(key, text, n, "a decimal number, or nothing"))
    }

    fn choice<T>(
        &self,
        key: &str,
        parse: fn(&str) -> Option<T>,
        expected: &str,
    ) -> Result<T, ParseError> {
        let (text, n) = self.text(key)?;
        parse(text).ok_or_else(|| self.bad(key, text, n, expected))
    }

    fn path(&self, key: &str) -> Result<PathBuf, ParseError> {
        let (value, n) = self.raw(key)?;
        let bytes = unescape(value).map_err(|message| ParseError {
            line: Some(n),
            message: format!("{key}=: {message}"),
        })?;
        if bytes.first() != Some(&b'/') {
            return Err(ParseError {
                line: Some(n),
                message: format!(
                    "{key}={:?} is not an absolute path",
                    String::from_utf8_lossy(&bytes)
                ),
            });
        }
        Ok(PathBuf::from(OsString::from_vec(bytes)))
    }
}

/// A registry entry: which workdir holds the status of a mountpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RegistryEntry {
    mountpoint: PathBuf,
    workdir: PathBuf,
    pid: u32,
}

impl RegistryEntry {
    fn to_text(&self) -> Vec<u8> {
        let mut w = Writer::new("ovlfuse mount registry entry");
        w.path("mountpoint", &self.mountpoint);
        w.path("workdir", &self.workdir);
        w.field("pid", &self.pid.to_string());
        w.0
    }

    fn parse(text: &[u8]) -> Result<RegistryEntry, ParseError> {
        let f = Fields::parse(text)?;
        Ok(RegistryEntry {
            mountpoint: f.path("mountpoint")?,
            workdir: f.path("workdir")?,
            pid: f.number("pid")?,
        })
    }
}

/// The registry entry's file name for a canonical mountpoint.
pub fn registry_name(mountpoint: &Path) -> String {
    let mut name = String::new();
    for &b in mountpoint.as_os_str().as_bytes() {
        if b == b'%' || b == b'/' || b <= b' ' || b >= 0x7f {
            name.push_str(&format!("%{b:02X}"));
        } else {
            name.push(char::from(b));
        }
    }
    if name.len() > MAX_NAME {
        // Escaped names all start with "%2F", so this form cannot collide with one; the entry
        // names its mountpoint, which the reader compares.
        return format!("long-{:016x}", fnv1a(mountpoint.as_os_str().as_bytes()));
    }
    name
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Registry directories, this user's first: where the daemon writes and `ovlfuse status`
/// looks. Root uses [`ROOT_REGISTRY`]; other users `$XDG_RUNTIME_DIR/ovlfuse/mounts`.
pub fn registry_dirs() -> Vec<PathBuf> {
    let xdg = std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
        .map(|p| p.join("ovlfuse/mounts"));
    let root = PathBuf::from(ROOT_REGISTRY);
    // SAFETY: geteuid has no failure mode.
    let mut dirs = if unsafe { libc::geteuid() } == 0 {
        vec![Some(root), xdg]
    } else {
        vec![xdg, Some(root)]
    };
    dirs.dedup();
    dirs.into_iter().flatten().collect()
}

/// The registry directory this process writes to, if any.
fn own_registry_dir() -> Option<PathBuf> {
    // SAFETY: geteuid has no failure mode.
    if unsafe { libc::geteuid() } == 0 {
        return Some(PathBuf::from(ROOT_REGISTRY));
    }
    let dir = registry_dirs().into_iter().next();
    dir.filter(|d| d != Path::new(ROOT_REGISTRY))
}

/// Canonicalizes a mountpoint before anything is mounted on it, so the daemon registers the
/// name `ovlfuse status` will look up. Falls back to the path as given.
pub fn canonical_mountpoint(mountpoint: &Path) -> PathBuf {
    std::fs::canonicalize(mountpoint).unwrap_or_else(|e| {
        log::warn!(
            "cannot resolve the mountpoint {}: {e}; registering it as given",
            mountpoint.display()
        );
        mountpoint.to_path_buf()
    })
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `ENOSPC` errnos are positive; a negative one (a kernel-style `-ENOSPC`) is taken for its
/// value, and 0 (no error at all) for EIO rather than "healthy".
fn normalize_errno(errno: i32) -> i32 {
    match errno.checked_abs() {
        Some(0) | None => libc::EIO,
        Some(e) => e,
    }
}

/// Field 22 of `/proc/PID/stat` (`self` for this process): start time in clock ticks.
fn process_start(pid: &str) -> Option<u64> {
    proc_stat(pid).and_then(|(_, start)| start)
}

/// (state letter, start time) from `/proc/PID/stat`.
fn proc_stat(pid: &str) -> Option<(char, Option<u64>)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields restart after the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    // Field 3 (state) is rest[0], so field 22 (starttime) is rest[19].
    Some((state, fields.get(19).and_then(|s| s.parse().ok())))
}

/// The daemon side: one mount's status file (and registry entry), updated on each change.
///
/// Created with [`StatusFile::create`], which opens the handles and writes nothing; the first
/// state change publishes the file (normally [`StatusFile::set_ok`] once the FUSE handshake
/// is done), so the handle may be made before the session and shared (`Arc<StatusFile>`)
/// with whatever records errors: [`StatusFile::set_poisoned`] records the first one.
pub struct StatusFile {
    /// `O_PATH | O_DIRECTORY` handle on the workdir.
    workdir: OwnedFd,
    status_name: CString,
    status_temp: CString,
    registry: Option<Registry>,
    inner: Mutex<Inner>,
}

struct Registry {
    /// `O_PATH | O_DIRECTORY` handle on the registry directory.
    dir: OwnedFd,
    path: PathBuf,
    name: CString,
    temp: CString,
}

struct Inner {
    status: Status,
    published: bool,
    registered: bool,
}

/// Tells one StatusFile's temporary registry names from another's in the same process.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

impl StatusFile {
    /// Prepares the status of the union mounted (or about to be mounted) at `mountpoint`,
    /// which must be canonical ([`canonical_mountpoint`]); `workdir` is opened once, here.
    /// The registry is this user's ([`registry_dirs`]); without one (not root and no
    /// `XDG_RUNTIME_DIR`), or if it cannot be made, the mount is not registered and
    /// `ovlfuse status` needs the workdir. Writes nothing yet.
    pub fn create(
        workdir: &Path,
        mountpoint: &Path,
        mode: Mode,
        transport: Transport,
    ) -> io::Result<StatusFile> {
        // A `/dev/fd/N` mount's mountpoint is the caller's secret: nothing to register.
        let registry = own_registry_dir().filter(|_| !is_fd_mount(mountpoint));
        if registry.is_none() && !is_fd_mount(mountpoint) {
            log::debug!(
                "no registry for {} (not root and XDG_RUNTIME_DIR unset): `ovlfuse status` \
                 will need the workdir {}",
                mountpoint.display(),
                workdir.display()
            );
        }
        Self::create_with_registry(workdir, mountpoint, mode, transport, registry.as_deref())
    }

    /// [`StatusFile::create`] with the registry directory given (`None`: no registry).
    pub fn create_with_registry(
        workdir: &Path,
        mountpoint: &Path,
        mode: Mode,
        transport: Transport,
        registry_dir: Option<&Path>,
    ) -> io::Result<StatusFile> {
        let workdir_fd = sys::open_dir_path(workdir)?;
        let pid = std::process::id();
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        remove_stale_temps(workdir_fd.as_fd(), STATUS_TEMP_PREFIX);
        let registry = registry_dir.and_then(|dir| match open_registry(dir, mountpoint, pid, id) {
            Ok(r) => Some(r),
            Err(e) => {
                log::warn!(
                    "cannot use the registry {}: {e}; `ovlfuse status {}` will not find this \
                     mount (`ovlfuse status {}` will)",
                    dir.display(),
                    mountpoint.display(),
                    workdir.display()
                );
                None
            }
        });
        Ok(StatusFile {
            workdir: workdir_fd,
            status_name: cstring(STATUS_FILE),
            status_temp: cstring(&format!("{STATUS_TEMP_PREFIX}{pid}")),
            registry,
            inner: Mutex::new(Inner {
                status: Status {
                    state: State::Ok,
                    errno: 0,
                    first_error: None,
                    mode,
                    transport,
                    pid,
                    pid_start: process_start("self"),
                    mountpoint: mountpoint.to_path_buf(),
                    workdir: workdir.to_path_buf(),
                    updated: 0,
                },
                published: false,
                registered: false,
            }),
        })
    }

    /// The mount is served (the first call publishes the file and the registry entry). Does
    /// not clear a poison: that lasts for the life of the mount.
    pub fn set_ok(&self) {
        let mut inner = self.inner.lock();
        if inner.status.state != State::Ok {
            log::debug!(
                "status of {} stays {}",
                inner.status.mountpoint.display(),
                inner.status.state.name()
            );
            return;
        }
        let first = !inner.published;
        self.write(&mut inner);
        if first {
            let status_path = inner.status.workdir.join(STATUS_FILE);
            log::info!(
                "status of {}: ok ({}, {}), in {}; `ovlfuse status {}` reports it",
                inner.status.mountpoint.display(),
                inner.status.mode.name(),
                inner.status.transport.name(),
                status_path.display(),
                inner.status.mountpoint.display()
            );
        }
    }

    /// Records an upper-layer error that loses data (`errno` positive, such as ENOSPC). The
    /// first call records `errno` and the time and marks the mount poisoned; later calls keep
    /// both and cost one lock.
    pub fn set_poisoned(&self, errno: i32) {
        let errno = normalize_errno(errno);
        let mut inner = self.inner.lock();
        let mut changed = false;
        if inner.status.errno == 0 {
            inner.status.errno = errno;
            inner.status.first_error = Some(now());
            changed = true;
        }
        if inner.status.state == State::Ok {
            inner.status.state = State::Poisoned;
            changed = true;
        }
        if !changed {
            return;
        }
        self.write(&mut inner);
        log::error!(
            "status of {}: poisoned by {} (errno {}): data written through the union may be \
             lost; `ovlfuse status` now exits 1",
            inner.status.mountpoint.display(),
            errno_name(inner.status.errno),
            inner.status.errno
        );
    }

    /// The daemon has stopped serving; `result` is the upper layer's final flush (an error is
    /// recorded unless one already was). Removes the registry entry.
    pub fn set_unmounted(&self, result: Result<(), i32>) {
        let mut inner = self.inner.lock();
        if let Err(errno) = result
            && inner.status.errno == 0
        {
            inner.status.errno = normalize_errno(errno);
            inner.status.first_error = Some(now());
        }
        inner.status.state = State::Unmounted;
        self.write(&mut inner);
        self.unregister(&mut inner);
        let errno = inner.status.errno;
        if errno == 0 {
            log::info!("status of {}: unmounted", inner.status.mountpoint.display());
        } else {
            log::error!(
                "status of {}: unmounted after {} (errno {errno}): data written through the \
                 union may be lost",
                inner.status.mountpoint.display(),
                errno_name(errno)
            );
        }
    }

    /// The status as last set (written or not).
    pub fn current(&self) -> Status {
        self.inner.lock().status.clone()
    }

    /// Where the status file is.
    pub fn path(&self) -> PathBuf {
        self.inner.lock().status.workdir.join(STATUS_FILE)
    }

    /// Writes the status (and, the first time, the registry entry); failures are logged.
    fn write(&self, inner: &mut Inner) {
        inner.status.updated = now();
        inner.published = true;
        let text = inner.status.to_text();
        let how = Replace {
            flush: inner.status.mode == Mode::Durable,
            // The last version needs no successor.
            spare: inner.status.state != State::Unmounted,
        };
        if let Err(e) = replace_file(
            self.workdir.as_fd(),
            &self.status_temp,
            &self.status_name,
            &text,
            how,
        ) {
            log::error!(
                "cannot write the status file {}: {e} (state {}); pollers see the previous \
                 version",
                inner.status.workdir.join(STATUS_FILE).display(),
                inner.status.state.name()
            );
        }
        if inner.registered || inner.status.state == State::Unmounted {
            return;
        }
        inner.registered = true;
        let Some(reg) = &self.registry else {
            return;
        };
        let entry = RegistryEntry {
            mountpoint: inner.status.mountpoint.clone(),
            workdir: inner.status.workdir.clone(),
            pid: inner.status.pid,
        };
        if let Err(e) = replace_file(
            reg.dir.as_fd(),
            &reg.temp,
            &reg.name,
            &entry.to_text(),
            // A runtime directory (tmpfs), gone at boot anyway: nothing to flush.
            Replace {
                flush: false,
                spare: false,
            },
        ) {
            log::warn!(
                "cannot register {} in {}: {e}; `ovlfuse status` will need the workdir {}",
                entry.mountpoint.display(),
                reg.path.display(),
                entry.workdir.display()
            );
        }
    }

    /// Removes the registry entry if it is still this daemon's (a new mount of the same
    /// mountpoint may have replaced it already).
    fn unregister(&self, inner: &mut Inner) {
        let Some(reg) = &self.registry else {
            return;
        };
        if !inner.registered {
            return;
        }
        inner.registered = false;
        let ours = read_at(reg.dir.as_fd(), &reg.name)
            .ok()
            .and_then(|text| RegistryEntry::parse(&text).ok())
            .is_some_and(|e| e.pid == inner.status.pid && e.workdir == inner.status.workdir);
        if !ours {
            return;
        }
        if let Err(e) = sys::unlink_at(reg.dir.as_fd(), &reg.name, 0) {
            log::warn!(
                "cannot remove the registry entry {}: {e}",
                reg.path.join(reg.name.to_string_lossy().as_ref()).display()
            );
        }
    }
}

fn cstring(s: &str) -> CString {
    // Built from fixed names and numbers: no NUL.
    CString::new(s).unwrap_or_default()
}

/// Makes (if needed) and opens the registry directory; removes temporary files a killed
/// daemon left there.
fn open_registry(dir: &Path, mountpoint: &Path, pid: u32, id: u64) -> io::Result<Registry> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)?;
    let fd = sys::open_dir_path(dir)?;
    remove_stale_temps(fd.as_fd(), REGISTRY_TEMP_PREFIX);
    prune_registry(fd.as_fd());
    Ok(Registry {
        dir: fd,
        path: dir.to_path_buf(),
        name: CString::new(registry_name(mountpoint))
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        temp: cstring(&format!("{REGISTRY_TEMP_PREFIX}{pid}-{id}")),
    })
}

/// Removes the entries of killed daemons whose mounts are gone too (the entry of a mount
/// still there, even with its daemon dead, stays: `ovlfuse status` reports on it).
fn prune_registry(dir: BorrowedFd<'_>) {
    let Ok(entries) = sys::read_dir(dir) else {
        return;
    };
    let mounts = std::fs::read("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    for entry in entries {
        if entry.name.as_bytes().starts_with(b".") {
            continue;
        }
        let Ok(name) = sys::component(&entry.name) else {
            continue;
        };
        let Some(found) = read_at(dir, &name)
            .ok()
            .and_then(|text| RegistryEntry::parse(&text).ok())
        else {
            continue;
        };
        let daemon_gone = process(found.pid, None) == Process::Gone;
        let unmounted =
            !mount_type(&mounts, &found.mountpoint).is_some_and(|t| is_ovlfuse_type(&t));
        if daemon_gone && unmounted {
            let _ = sys::unlink_at(dir, &name, 0);
        }
    }
}

/// How [`replace_file`] replaces a file.
#[derive(Debug, Clone, Copy)]
struct Replace {
    /// fsync the new version and the directory, so the change survives a crash. Only for
    /// durable mounts: a volatile or `fsync=0` mount must not flush the upper filesystem (on
    /// ext4 an fsync commits the journal, which writes other files' data back too), and after
    /// a crash its status file means nothing anyway.
    flush: bool,
    /// Leave the next version's temporary file behind with its block already allocated.
    spare: bool,
}

/// Replaces `name` in `dir` with `bytes` atomically: a reader sees the old version or the new
/// one, whole. The new version is written under `temp` and renamed over `name`.
///
/// With `spare`, `temp` is kept allocated between writes: writing into a block the file
/// already owns allocates nothing, so the status can still change when the workdir's
/// filesystem is full (ENOSPC, EDQUOT) — the very error that poisons a mount.
fn replace_file(
    dir: BorrowedFd<'_>,
    temp: &CString,
    name: &CString,
    bytes: &[u8],
    how: Replace,
) -> io::Result<()> {
    let file = open_temp(dir, temp)?;
    let written = sys::pwrite_all(file.as_fd(), bytes, 0)
        .and_then(|()| sys::ftruncate(file.as_fd(), bytes.len() as u64));
    // A failed flush (a writeback error on the workdir's filesystem, likely the very error
    // being recorded) must not hide the new state from pollers: it only costs durability
    // across a crash, so the new version is put in place anyway.
    let flushed = match how.flush {
        true => sys::sync_fd(file.as_fd(), false),
        false => Ok(()),
    };
    let written = written.and_then(|()| sys::rename_at(dir, temp, dir, name, 0));
    drop(file);
    if let Err(e) = written {
        if !how.spare {
            let _ = sys::unlink_at(dir, temp, 0);
        }
        return Err(e);
    }
    if how.spare {
        make_spare(dir, temp);
    }
    let flushed = flushed.and_then(|()| match how.flush {
        true => sys::reopen(dir, libc::O_RDONLY | libc::O_DIRECTORY)
            .and_then(|dir| sys::sync_fd(dir.as_fd(), false)),
        false => Ok(()),
    });
    if let Err(e) = flushed {
        log::warn!(
            "status file {} replaced but not flushed: {e}; a crash may bring back the previous \
             version",
            name.to_string_lossy()
        );
    }
    Ok(())
}

/// Opens the spare `temp` if it is there, else creates it. Anything else by that name (a
/// directory, a symlink, a FIFO) is removed first, never followed or opened for reading.
fn open_temp(dir: BorrowedFd<'_>, temp: &CString) -> io::Result<OwnedFd> {
    match sys::open_at(dir, temp, libc::O_WRONLY | libc::O_NONBLOCK) {
        Ok(fd) if sys::stat_fd(fd.as_fd())?.st_mode & libc::S_IFMT == libc::S_IFREG => {
            return Ok(fd);
        }
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
        _ => sys::unlink_at(dir, temp, 0)?,
    }
    sys::create_file_at(dir, temp, 0o644)
}

/// Far more than a status file needs: one block.
const SPARE_SIZE: u64 = 4096;

/// Creates `temp` with [`SPARE_SIZE`] bytes allocated; on failure there is simply no spare.
fn make_spare(dir: BorrowedFd<'_>, temp: &CString) {
    let made = sys::create_file_at(dir, temp, 0o644).and_then(|file| {
        match sys::fallocate(file.as_fd(), 0, SPARE_SIZE) {
            // Written zeros get their space reserved at write time too (delayed allocation).
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                sys::pwrite_all(file.as_fd(), &[0; SPARE_SIZE as usize], 0)
            }
            other => other,
        }
    });
    if let Err(e) = made {
        log::debug!("no spare status file {}: {e}", temp.to_string_lossy());
        let _ = sys::unlink_at(dir, temp, 0);
    }
}

fn read_at(dir: BorrowedFd<'_>, name: &CString) -> io::Result<Vec<u8>> {
    let fd = sys::open_at(dir, name, libc::O_RDONLY)?;
    let mut text = Vec::new();
    std::fs::File::from(fd).read_to_end(&mut text)?;
    Ok(text)
}

/// Removes `PREFIX<pid>...` files whose writer (`pid`) is gone.
fn remove_stale_temps(dir: BorrowedFd<'_>, prefix: &str) {
    let Ok(entries) = sys::read_dir(dir) else {
        return;
    };
    for entry in entries {
        let Some(rest) = entry.name.as_bytes().strip_prefix(prefix.as_bytes()) else {
            continue;
        };
        let pid: String = String::from_utf8_lossy(rest)
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        if pid.is_empty() || proc_stat(&pid).is_some_and(|(state, _)| state != 'Z') {
            continue;
        }
        if let Ok(name) = sys::component(&entry.name) {
            let _ = sys::unlink_at(dir, &name, 0);
        }
    }
}

// --- mount table --------------------------------------------------------------------------

/// (mountpoint, fstype) of each line of a mountinfo table, in order.
fn parse_mountinfo(table: &[u8]) -> Vec<(PathBuf, String)> {
    table
        .split(|b| *b == b'\n')
        .filter_map(|line| {
            let fields: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
            let sep = fields.iter().position(|f| *f == b"-")?;
            let mountpoint = unescape_octal(fields.get(4)?);
            let fstype = String::from_utf8_lossy(fields.get(sep + 1)?).into_owned();
            Some((PathBuf::from(OsString::from_vec(mountpoint)), fstype))
        })
        .collect()
}

/// Mountinfo writes space, tab, newline and backslash in paths as `\ooo`.
fn unescape_octal(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|d| field[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    out
}

/// The type of the topmost mount at `mountpoint`.
fn mount_type(mounts: &[(PathBuf, String)], mountpoint: &Path) -> Option<String> {
    mounts
        .iter()
        .rev()
        .find(|(m, _)| m == mountpoint)
        .map(|(_, t)| t.clone())
}

fn is_ovlfuse_type(fstype: &str) -> bool {
    [Transport::Fuse, Transport::Fuseblk]
        .iter()
        .any(|t| t.fstype() == fstype)
}

// --- the `ovlfuse status` command ---------------------------------------------------------

/// `ovlfuse status MOUNTPOINT|WORKDIR`: prints the status and returns the exit code —
/// [`EXIT_HEALTHY`], [`EXIT_POISONED`] or [`EXIT_NOT_RUNNING`].
pub fn command(target: &Path) -> i32 {
    let status_path = match locate(target) {
        Ok(p) => p,
        Err(msg) => return complain(&msg),
    };
    let status = match std::fs::read(&status_path) {
        Ok(text) => match Status::parse(&text) {
            Ok(s) => s,
            Err(e) => {
                return complain(&format!(
                    "{}: not a valid ovlfuse status file: {e}",
                    status_path.display()
                ));
            }
        },
        Err(e) => {
            return complain(&format!(
                "{}: {}",
                status_path.display(),
                describe_read_error(&e)
            ));
        }
    };
    let (code, verdict) = judge(&status);
    // A closed pipe (`ovlfuse status M | head -1`) must not turn the verdict into a panic.
    let _ = writeln!(
        io::stdout().lock(),
        "{}verdict:     {verdict}",
        render(&status, &status_path)
    );
    code
}

/// Prints why there is no status to show; the exit code for that.
fn complain(msg: &str) -> i32 {
    let _ = writeln!(io::stderr().lock(), "ovlfuse status: {msg}");
    EXIT_NOT_RUNNING
}

fn describe_read_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no status file: not an ovlfuse workdir, or the daemon never \
                               served a mount with it"
            .to_string(),
        Some(libc::EACCES) => {
            "permission denied (the workdir may be readable by root only)".to_string()
        }
        _ => e.to_string(),
    }
}

/// Finds the status file for TARGET without touching a FUSE mount.
fn locate(target: &Path) -> Result<PathBuf, String> {
    let shown = target.display();
    if target.as_os_str().is_empty() {
        return Err("empty path".into());
    }
    let absolute = std::path::absolute(target).map_err(|e| format!("{shown}: {e}"))?;
    let mounts = std::fs::read("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default();
    // Resolving a path below an ovlfuse mount would walk into it.
    let lexical = !absolute.components().any(|c| c == Component::ParentDir);
    if lexical
        && let Some((m, _)) = mounts
            .iter()
            .find(|(m, t)| is_ovlfuse_type(t) && absolute.starts_with(m) && absolute != *m)
    {
        return Err(format!(
            "{shown} is inside the ovlfuse mount {}: pass the mountpoint itself or the workdir \
             (looking inside the mount would hang if its daemon does)",
            m.display()
        ));
    }
    let resolved = resolve_outside(&absolute).map_err(|e| {
        let why = match e.raw_os_error() {
            Some(libc::ENOENT) => "no such file or directory".to_string(),
            _ => e.to_string(),
        };
        format!("{shown}: {why}")
    })?;
    let dirs = registry_dirs();
    if let Some(workdir) = registry_lookup(&dirs, &resolved) {
        return Ok(workdir.join(STATUS_FILE));
    }
    let listed = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(fstype) = mount_type(&mounts, &resolved) {
        if is_ovlfuse_type(&fstype) {
            return Err(format!(
                "{}: an ovlfuse mount ({fstype}) with no entry in the registry ({listed}): a \
                 read-only union without workdir has no status; otherwise pass the workdir",
                resolved.display()
            ));
        }
        if fstype.starts_with("fuse") {
            return Err(format!(
                "{}: a FUSE mount of type {fstype}, not ovlfuse (not looking inside it)",
                resolved.display()
            ));
        }
    }
    let status_path = resolved.join(STATUS_FILE);
    if !status_path.exists() && resolved.is_dir() {
        return Err(format!(
            "{}: neither a mountpoint in the registry ({listed}) nor an ovlfuse workdir (no \
             {STATUS_FILE} in it); a mount that has ended is no longer in the registry",
            resolved.display()
        ));
    }
    Ok(status_path)
}

/// The canonical form of `path` (absolute) reached without entering its last component:
/// the parent is canonicalized, and the last component, if it is a symlink, read with
/// `readlink` (which answers EINVAL for a mount root without asking its filesystem) and
/// resolved in turn. A mountpoint's own attributes are never looked at.
fn resolve_outside(path: &Path) -> io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let (Some(parent), Some(name)) = (path.parent(), path.file_name()) else {
            // "/" or a path ending in "..": nothing to stay out of.
            return std::fs::canonicalize(&path);
        };
        let candidate = std::fs::canonicalize(parent)?.join(name);
        match std::fs::read_link(&candidate) {
            Ok(target) => path = candidate.parent().unwrap_or(Path::new("/")).join(target),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(candidate),
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::from_raw_os_error(libc::ELOOP))
}

/// The workdir registered for a canonical mountpoint, from the first registry that has it.
fn registry_lookup(dirs: &[PathBuf], mountpoint: &Path) -> Option<PathBuf> {
    let name = registry_name(mountpoint);
    dirs.iter().find_map(|dir| {
        let text = std::fs::read(dir.join(&name)).ok()?;
        match RegistryEntry::parse(&text) {
            Ok(entry) if entry.mountpoint == mountpoint => Some(entry.workdir),
            Ok(_) => None,
            Err(e) => {
                let _ = writeln!(
                    io::stderr().lock(),
                    "ovlfuse status: ignoring the registry entry {}: {e}",
                    dir.join(&name).display()
                );
                None
            }
        }
    })
}

/// The daemon process as `/proc` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Process {
    Running,
    Stopped,
    Gone,
    /// The pid now belongs to a process started at another time.
    Recycled,
}

fn process(pid: u32, start: Option<u64>) -> Process {
    if pid == 0 {
        return Process::Gone;
    }
    match proc_stat(&pid.to_string()) {
        None | Some(('Z' | 'X' | 'x', _)) => Process::Gone,
        Some((_, Some(now))) if start.is_some_and(|s| s != now) => Process::Recycled,
        Some(('T' | 't', _)) => Process::Stopped,
        Some(_) => Process::Running,
    }
}

/// The exit code for a status and the one-line reason.
fn judge(status: &Status) -> (i32, String) {
    if status.state == State::Poisoned || status.errno != 0 {
        let error = if status.errno == 0 {
            "an error".to_string()
        } else {
            errno_name(status.errno)
        };
        let running = if status.state == State::Unmounted {
            "the mount has ended"
        } else {
            "the mount is poisoned"
        };
        return (
            EXIT_POISONED,
            format!(
                "poisoned (exit 1): {error} on the upper layer, {running}; data written through \
                 the union may be lost"
            ),
        );
    }
    if status.state == State::Unmounted {
        return (
            EXIT_NOT_RUNNING,
            format!(
                "not running (exit 2): unmounted cleanly at {}",
                format_time(status.updated)
            ),
        );
    }
    let pid = status.pid;
    let daemon = process(pid, status.pid_start);
    match daemon {
        Process::Gone => {
            return (
                EXIT_NOT_RUNNING,
                format!(
                    "not running (exit 2): the daemon (pid {pid}) is gone without recording an \
                     unmount (killed?)"
                ),
            );
        }
        Process::Recycled => {
            return (
                EXIT_NOT_RUNNING,
                format!(
                    "not running (exit 2): the daemon (pid {pid}) is gone; its pid now belongs \
                     to another process"
                ),
            );
        }
        Process::Running | Process::Stopped => {}
    }
    if !is_fd_mount(&status.mountpoint) {
        match daemon_mount_type(pid, &status.mountpoint) {
            Some(t) if is_ovlfuse_type(&t) => {}
            Some(t) => {
                return (
                    EXIT_NOT_RUNNING,
                    format!(
                        "not running (exit 2): {} is a {t} mount, not ovlfuse's",
                        status.mountpoint.display()
                    ),
                );
            }
            None => {
                return (
                    EXIT_NOT_RUNNING,
                    format!(
                        "not running (exit 2): {} is not mounted (daemon pid {pid} still exists)",
                        status.mountpoint.display()
                    ),
                );
            }
        }
    }
    let note = if daemon == Process::Stopped {
        " (but the daemon process is stopped: requests wait until it continues)"
    } else {
        ""
    };
    (EXIT_HEALTHY, format!("healthy (exit 0){note}"))
}

/// `/dev/fd/N`: the caller mounted the connection; the mountpoint is not known here.
fn is_fd_mount(mountpoint: &Path) -> bool {
    mountpoint.starts_with("/dev/fd")
}

/// The mount type at `mountpoint` as the daemon sees it (its own mount namespace), falling
/// back to this process's view.
fn daemon_mount_type(pid: u32, mountpoint: &Path) -> Option<String> {
    let table = std::fs::read(format!("/proc/{pid}/mountinfo"))
        .or_else(|_| std::fs::read("/proc/self/mountinfo"))
        .ok()?;
    mount_type(&parse_mountinfo(&table), mountpoint)
}

/// The human-readable form `ovlfuse status` prints.
fn render(status: &Status, status_path: &Path) -> String {
    let errno = if status.errno == 0 {
        "none".to_string()
    } else {
        let text = io::Error::from_raw_os_error(status.errno).to_string();
        let text = text.split(" (os error").next().unwrap_or_default();
        format!("{} {} ({text})", status.errno, errno_name(status.errno))
    };
    let process = match process(status.pid, status.pid_start) {
        Process::Running => "running",
        Process::Stopped => "stopped",
        Process::Gone => "gone",
        Process::Recycled => "gone (pid reused)",
    };
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("{k:<12} {v}\n"));
    row("state:", status.state.name().to_string());
    row("errno:", errno);
    row(
        "first error:",
        status.first_error.map_or("none".into(), format_time),
    );
    row("mode:", status.mode.name().to_string());
    row("transport:", status.transport.name().to_string());
    row("pid:", format!("{} ({process})", status.pid));
    row("mountpoint:", status.mountpoint.display().to_string());
    row("workdir:", status.workdir.display().to_string());
    row("updated:", format_time(status.updated));
    row("file:", status_path.display().to_string());
    out
}

/// `1767225600 (2026-01-01 00:00:00 UTC)`.
fn format_time(secs: u64) -> String {
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{secs} ({y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC)",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Proleptic Gregorian date of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Status {
        Status {
            state: State::Poisoned,
            errno: libc::ENOSPC,
            first_error: Some(1_767_225_600),
            mode: Mode::Volatile,
            transport: Transport::Fuseblk,
            pid: 4242,
            pid_start: Some(123_456),
            mountpoint: PathBuf::from("/var/lib/c/merged"),
            workdir: PathBuf::from("/var/lib/c/work"),
            updated: 1_767_225_601,
        }
    }

    fn error_of(text: &str) -> String {
        Status::parse(text.as_bytes()).unwrap_err().to_string()
    }

    fn sample_text_with(key: &str, line: Option<&str>) -> String {
        let text = String::from_utf8(sample().to_text()).unwrap();
        text.lines()
            .filter_map(|l| {
                if l.starts_with(&format!("{key}=")) {
                    line.map(str::to_string)
                } else {
                    Some(l.to_string())
                }
            })
            .map(|l| l + "\n")
            .collect()
    }

    #[test]
    fn format_round_trips() {
        let s = sample();
        assert_eq!(Status::parse(&s.to_text()), Ok(s));
    }

    #[test]
    fn format_is_the_documented_text() {
        let text = String::from_utf8(sample().to_text()).unwrap();
        assert_eq!(
            text,
            "# ovlfuse status (format 1): one key=value per line\n\
             version=1\n\
             state=poisoned\n\
             errno=28\n\
             errno_name=ENOSPC\n\
             first_error=1767225600\n\
             mode=volatile\n\
             transport=fuseblk\n\
             pid=4242\n\
             pid_start=123456\n\
             mountpoint=/var/lib/c/merged\n\
             workdir=/var/lib/c/work\n\
             updated=1767225601\n"
        );
    }

    #[test]
    fn no_error_is_written_as_zero_and_empty() {
        let s = Status {
            state: State::Ok,
            errno: 0,
            first_error: None,
            pid_start: None,
            mode: Mode::Durable,
            transport: Transport::Fuse,
            ..sample()
        };
        let text = String::from_utf8(s.to_text()).unwrap();
        assert!(
            text.contains("\nerrno=0\nerrno_name=\nfirst_error=\n"),
            "{text}"
        );
        assert_eq!(Status::parse(text.as_bytes()), Ok(s));
    }

    #[test]
    fn paths_with_any_bytes_round_trip_on_one_line() {
        let odd =
            OsString::from_vec(b"/a b/new\nline/back\\slash/eq=ual/\xff\xfe/caf\xc3\xa9".to_vec());
        let s = Status {
            mountpoint: PathBuf::from(odd.clone()),
            workdir: PathBuf::from(odd),
            mode: Mode::NoSync,
            ..sample()
        };
        let text = s.to_text();
        let line = text
            .split(|b| *b == b'\n')
            .find(|l| l.starts_with(b"mountpoint="))
            .unwrap();
        assert_eq!(
            line,
            b"mountpoint=/a b/new\\x0aline/back\\x5cslash/eq=ual/\\xff\\xfe/caf\xc3\xa9"
        );
        assert_eq!(Status::parse(&text), Ok(s));
    }

    #[test]
    fn comments_blank_lines_and_unknown_keys_are_ignored() {
        let mut text = sample_text_with("nothing", None);
        text.push_str("\n# a comment\nfuture_key=whatever\n");
        assert_eq!(Status::parse(text.as_bytes()), Ok(sample()));
    }

    #[test]
    fn parser_rejects_a_line_without_equals() {
        let text = sample_text_with("pid", Some("pid 4242"));
        assert_eq!(
            error_of(&text),
            r#"line 9: expected key=value, found "pid 4242""#
        );
    }

    #[test]
    fn parser_rejects_a_repeated_key() {
        let text = sample_text_with("pid", Some("pid=1\npid=2"));
        assert_eq!(
            error_of(&text),
            "line 10: key pid appears twice (first on line 9)"
        );
    }

    #[test]
    fn parser_rejects_a_missing_key() {
        assert_eq!(
            error_of(&sample_text_with("workdir", None)),
            "missing workdir="
        );
    }

    #[test]
    fn parser_rejects_bad_values() {
        assert_eq!(
            error_of(&sample_text_with("state", Some("state=sick"))),
            r#"line 3: bad state="sick": expected ok|poisoned|unmounted"#
        );
        assert_eq!(
            error_of(&sample_text_with("pid", Some("pid=-1"))),
            r#"line 9: bad pid="-1": expected a non-negative decimal number"#
        );
        assert_eq!(
            error_of(&sample_text_with("first_error", Some("first_error=soon"))),
            r#"line 6: bad first_error="soon": expected a decimal number, or nothing"#
        );
        assert_eq!(
            error_of(&sample_text_with("workdir", Some("workdir=relative"))),
            r#"line 12: workdir="relative" is not an absolute path"#
        );
        assert_eq!(
            error_of(&sample_text_with("workdir", Some("workdir=/a\\q"))),
            r#"line 12: workdir=: bad escape "\\q" (only \xHH is allowed)"#
        );
        assert_eq!(
            error_of(&sample_text_with("mode", Some("Mode=durable"))),
            r#"line 7: bad key "Mode""#
        );
    }

    #[test]
    fn parser_rejects_other_versions_and_empty_files() {
        assert_eq!(
            error_of(&sample_text_with("version", Some("version=2"))),
            "line 2: format version 2 is not supported (this ovlfuse reads 1)"
        );
        assert_eq!(
            error_of(&sample_text_with("version", None)),
            "missing version="
        );
        assert_eq!(error_of(""), "no key=value lines (empty file?)");
        assert_eq!(
            error_of("\u{7f}ELF\u{2}\u{1}"),
            "line 1: expected key=value, found \"\\u{7f}ELF\\u{2}\\u{1}\""
        );
    }

    #[test]
    fn registry_names_escape_slashes_and_hash_long_paths() {
        assert_eq!(registry_name(Path::new("/c/merged")), "%2Fc%2Fmerged");
        assert_eq!(registry_name(Path::new("/a%b c")), "%2Fa%25b%20c");
        assert_ne!(
            registry_name(Path::new("/a/b")),
            registry_name(Path::new("/a%2Fb"))
        );
        let long = PathBuf::from(format!("/{}", "x".repeat(300)));
        let name = registry_name(&long);
        assert!(name.starts_with("long-") && name.len() == 21, "{name}");
    }

    #[test]
    fn registry_entry_round_trips() {
        let e = RegistryEntry {
            mountpoint: PathBuf::from("/c/merged"),
            workdir: PathBuf::from("/c/work"),
            pid: 7,
        };
        assert_eq!(RegistryEntry::parse(&e.to_text()), Ok(e));
    }

    use std::os::unix::fs::MetadataExt;

    fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn read_status(workdir: &Path) -> Status {
        Status::parse(&std::fs::read(workdir.join(STATUS_FILE)).unwrap()).unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        work: PathBuf,
        registry: PathBuf,
        status: StatusFile,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let registry = dir.path().join("run/ovlfuse/mounts");
        let status = StatusFile::create_with_registry(
            &work,
            Path::new("/c/merged"),
            Mode::Durable,
            Transport::Fuse,
            Some(&registry),
        )
        .unwrap();
        Fixture {
            dir,
            work,
            registry,
            status,
        }
    }

    #[test]
    fn create_writes_nothing_until_the_first_state() {
        let f = fixture();
        assert!(names_in(&f.work).is_empty());
        assert!(names_in(&f.registry).is_empty());
        assert_eq!(f.status.current().state, State::Ok);
    }

    #[test]
    fn set_ok_publishes_the_status_and_the_registry_entry() {
        let f = fixture();
        f.status.set_ok();
        let s = read_status(&f.work);
        assert_eq!(s, f.status.current());
        assert_eq!(s.state, State::Ok);
        assert_eq!(s.errno, 0);
        assert_eq!(s.pid, std::process::id());
        assert_eq!(s.pid_start, process_start("self"));
        assert_eq!(s.workdir, f.work);
        assert!(s.updated > 0);
        assert_eq!(names_in(&f.registry), vec!["%2Fc%2Fmerged".to_string()]);
        assert_eq!(
            registry_lookup(std::slice::from_ref(&f.registry), Path::new("/c/merged")),
            Some(f.work.clone())
        );
    }

    #[test]
    fn atomic_replacement_keeps_one_allocated_spare_and_leaves_nothing_at_the_end() {
        let f = fixture();
        let spare = format!("{STATUS_TEMP_PREFIX}{}", std::process::id());
        f.status.set_ok();
        f.status.set_poisoned(libc::ENOSPC);
        assert_eq!(
            names_in(&f.work),
            vec![spare.clone(), STATUS_FILE.to_string()]
        );
        let meta = std::fs::metadata(f.work.join(&spare)).unwrap();
        assert_eq!(meta.len(), SPARE_SIZE);
        assert!(meta.blocks() > 0, "the spare's block is allocated");
        f.status.set_unmounted(Ok(()));
        assert_eq!(names_in(&f.work), vec![STATUS_FILE.to_string()]);
        assert!(names_in(&f.registry).is_empty(), "unmount unregisters");
    }

    #[test]
    fn something_else_in_the_spare_s_place_is_replaced_not_followed() {
        let f = fixture();
        let spare = f
            .work
            .join(format!("{STATUS_TEMP_PREFIX}{}", std::process::id()));
        let outside = f.dir.path().join("outside");
        std::fs::write(&outside, "keep").unwrap();
        std::os::unix::fs::symlink(&outside, &spare).unwrap();
        f.status.set_ok();
        assert_eq!(std::fs::read_to_string(&outside).unwrap(), "keep");
        assert_eq!(read_status(&f.work).state, State::Ok);
        assert!(std::fs::symlink_metadata(&spare).unwrap().is_file());
    }

    #[test]
    fn the_first_error_and_its_time_are_kept() {
        let f = fixture();
        f.status.set_ok();
        f.status.set_poisoned(libc::ENOSPC);
        let first = read_status(&f.work);
        assert_eq!(first.state, State::Poisoned);
        assert_eq!(first.errno, libc::ENOSPC);
        let at = first.first_error.expect("time of the first error");
        f.status.set_poisoned(libc::EIO);
        f.status.set_ok();
        let later = read_status(&f.work);
        assert_eq!(
            (later.state, later.errno, later.first_error),
            (State::Poisoned, libc::ENOSPC, Some(at))
        );
        f.status.set_unmounted(Err(libc::EIO));
        let end = read_status(&f.work);
        assert_eq!(
            (end.state, end.errno, end.first_error),
            (State::Unmounted, libc::ENOSPC, Some(at))
        );
    }

    #[test]
    fn a_failed_final_flush_is_recorded_at_unmount() {
        let f = fixture();
        f.status.set_ok();
        f.status.set_unmounted(Err(-libc::EIO));
        let s = read_status(&f.work);
        assert_eq!((s.state, s.errno), (State::Unmounted, libc::EIO));
        assert!(s.first_error.is_some());
        assert_eq!(judge(&s).0, EXIT_POISONED);
    }

    #[test]
    fn a_registry_entry_replaced_by_another_mount_is_left_alone() {
        let f = fixture();
        f.status.set_ok();
        let other = RegistryEntry {
            mountpoint: PathBuf::from("/c/merged"),
            workdir: PathBuf::from("/other/work"),
            pid: 1,
        };
        let entry = f.registry.join("%2Fc%2Fmerged");
        std::fs::write(&entry, other.to_text()).unwrap();
        f.status.set_unmounted(Ok(()));
        assert!(entry.exists());
    }

    #[test]
    fn entries_of_dead_daemons_without_mounts_are_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("mounts");
        std::fs::create_dir(&registry).unwrap();
        let entry = |pid: u32, mountpoint: &str| {
            let e = RegistryEntry {
                mountpoint: PathBuf::from(mountpoint),
                workdir: PathBuf::from("/w"),
                pid,
            };
            let path = registry.join(registry_name(&e.mountpoint));
            std::fs::write(&path, e.to_text()).unwrap();
            path
        };
        let dead = entry(99_999_999, "/nowhere/a");
        let live = entry(std::process::id(), "/nowhere/b");
        let mounted = entry(99_999_999, "/");
        let garbage = registry.join("garbage");
        std::fs::write(&garbage, "not an entry").unwrap();
        let _s = StatusFile::create_with_registry(
            dir.path(),
            Path::new("/m"),
            Mode::Durable,
            Transport::Fuse,
            Some(&registry),
        )
        .unwrap();
        assert!(!dead.exists());
        assert!(live.exists());
        assert!(garbage.exists(), "only entries are judged");
        // "/" is mounted, though not by ovlfuse: its entry is of no use either.
        assert!(!mounted.exists());
    }

    #[test]
    fn stale_temporary_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // pid_max is at most 2^22: this pid cannot exist.
        let stale = dir.path().join(format!("{STATUS_TEMP_PREFIX}99999999"));
        let live = dir.path().join(format!("{STATUS_TEMP_PREFIX}1"));
        std::fs::write(&stale, "x").unwrap();
        std::fs::write(&live, "x").unwrap();
        let _s = StatusFile::create_with_registry(
            dir.path(),
            Path::new("/m"),
            Mode::Durable,
            Transport::Fuse,
            None,
        )
        .unwrap();
        assert!(!stale.exists());
        assert!(live.exists(), "pid 1 is alive");
    }

    #[test]
    fn a_write_failure_is_survived() {
        let f = fixture();
        f.status.set_ok();
        std::fs::remove_dir_all(&f.work).unwrap();
        f.status.set_poisoned(libc::EIO);
        assert_eq!(f.status.current().state, State::Poisoned);
    }

    #[test]
    fn verdicts() {
        let me = Status {
            state: State::Ok,
            errno: 0,
            first_error: None,
            pid: std::process::id(),
            pid_start: process_start("self"),
            mountpoint: PathBuf::from("/dev/fd/3"),
            ..sample()
        };
        assert_eq!(judge(&me).0, EXIT_HEALTHY, "{}", judge(&me).1);
        let not_mounted = Status {
            mountpoint: PathBuf::from("/nonexistent/mnt"),
            ..me.clone()
        };
        assert_eq!(judge(&not_mounted).0, EXIT_NOT_RUNNING);
        assert!(judge(&not_mounted).1.contains("is not mounted"));
        let recycled = Status {
            pid_start: Some(1),
            ..me.clone()
        };
        assert_eq!(
            judge(&recycled),
            (
                EXIT_NOT_RUNNING,
                format!(
                    "not running (exit 2): the daemon (pid {}) is gone; its pid now belongs to \
                     another process",
                    me.pid
                )
            )
        );
        let gone = Status {
            pid: 99_999_999,
            ..me.clone()
        };
        assert_eq!(judge(&gone).0, EXIT_NOT_RUNNING);
        let poisoned_and_gone = Status {
            state: State::Poisoned,
            errno: libc::ENOSPC,
            ..gone.clone()
        };
        assert_eq!(judge(&poisoned_and_gone).0, EXIT_POISONED);
        let unmounted = Status {
            state: State::Unmounted,
            ..me
        };
        assert_eq!(judge(&unmounted).0, EXIT_NOT_RUNNING);
    }

    #[test]
    fn mountinfo_paths_are_unescaped() {
        let table =
            b"36 35 98:0 /mnt1 /mnt\\040with\\040space rw,noatime master:1 - fuse.ovlfuse ovl rw\n\
                      37 35 98:0 / /plain rw - ext4 /dev/sda rw\n";
        let mounts = parse_mountinfo(table);
        assert_eq!(
            mount_type(&mounts, Path::new("/mnt with space")).as_deref(),
            Some("fuse.ovlfuse")
        );
        assert_eq!(
            mount_type(&mounts, Path::new("/plain")).as_deref(),
            Some("ext4")
        );
        assert_eq!(mount_type(&mounts, Path::new("/other")), None);
    }

    #[test]
    fn resolving_follows_a_symlinked_last_component_without_entering_it() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        std::os::unix::fs::symlink("real", dir.path().join("link")).unwrap();
        let canonical_real = std::fs::canonicalize(&real).unwrap();
        assert_eq!(
            resolve_outside(&dir.path().join("link")).unwrap(),
            canonical_real
        );
        assert_eq!(resolve_outside(&real).unwrap(), canonical_real);
        assert_eq!(
            resolve_outside(&dir.path().join("missing"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOENT)
        );
    }

    #[test]
    fn times_are_shown_in_utc() {
        assert_eq!(format_time(0), "0 (1970-01-01 00:00:00 UTC)");
        assert_eq!(
            format_time(1_767_225_600),
            "1767225600 (2026-01-01 00:00:00 UTC)"
        );
        assert_eq!(
            format_time(951_825_599),
            "951825599 (2000-02-29 11:59:59 UTC)"
        );
    }

    #[test]
    fn errnos_are_normalized() {
        assert_eq!(normalize_errno(libc::ENOSPC), libc::ENOSPC);
        assert_eq!(normalize_errno(-libc::ENOSPC), libc::ENOSPC);
        assert_eq!(normalize_errno(0), libc::EIO);
        assert_eq!(normalize_errno(i32::MIN), libc::EIO);
    }
}
