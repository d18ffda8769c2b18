//! Command-line parsing and validation for ovlfuse.
//!
//! This module owns the grammar of the command line (flags, positionals,
//! `-o` option strings with their quoting and escaping, `lowerdir=` layer
//! lists), turns it into a [`Command`], and owns the `--help` text, which is
//! rendered from the same tables the parser matches against.
//!
//! It must never touch the filesystem (no `stat`, no `canonicalize`, no check
//! that a directory exists: another module does that once, with proper error
//! reporting), never print, log or exit, and never read the environment. The
//! only outside state it consults is the current directory, through
//! `std::path::absolute`, to make relative paths absolute.

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What the binary was asked to do.
// Built once per process, so boxing the config would only make callers'
// pattern matches clumsier.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Mount(MountConfig),
    Demo,
    /// `ovlfuse status MOUNTPOINT|WORKDIR`, with the path as given.
    Status(PathBuf),
    /// `ovlfuse sync PATH`: flush the upper layer of the union PATH is on.
    Sync(PathBuf),
    Help,
    Version,
}

/// A command-line mistake; the message is one lowercase line without a
/// trailing period, meant to be printed as `ovlfuse: <message>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Which xattr namespace holds overlay metadata (whiteouts, opaque markers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XattrNamespace {
    Trusted,
    User,
}

impl XattrNamespace {
    pub fn prefix(&self) -> &'static str {
        match self {
            XattrNamespace::Trusted => "trusted.overlay.",
            XattrNamespace::User => "user.overlay.",
        }
    }
}

/// The kernel's `redirect_dir=` setting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RedirectDir {
    #[default]
    Off,
    On,
    Follow,
    NoFollow,
}

/// One `CONTAINER:HOST:SIZE` range of `uidmapping=` / `gidmapping=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

/// Everything a mount needs, validated for shape but not against the disk.
#[derive(Debug, Clone, PartialEq)]
pub struct MountConfig {
    /// Absolute.
    pub mountpoint: PathBuf,
    /// The mount.fuse-style positional SOURCE, or `source=`.
    pub source: Option<String>,
    pub fsname: Option<String>,
    /// `-f`, also implied by `-d` and `-o debug` (as libfuse does).
    pub foreground: bool,
    pub debug: bool,
    pub single_threaded: bool,
    /// Top layer first, absolute, never empty.
    pub lowerdirs: Vec<PathBuf>,
    pub upperdir: Option<PathBuf>,
    pub workdir: Option<PathBuf>,
    pub xattr_namespace: XattrNamespace,
    pub redirect_dir: RedirectDir,
    /// `volatile` or `fsync=volatile`; kept apart from `fsync` because the
    /// kernel's volatile mode means more than skipping fsync. Use
    /// [`MountConfig::syncs_to_disk`] to decide whether to fsync.
    pub volatile: bool,
    /// `fsync=0` clears it.
    pub fsync: bool,
    /// `nofuseblk`: never mount as fuseblk, even when privileged.
    pub no_fuseblk: bool,
    /// `nouring`: never take requests through FUSE-over-io_uring.
    pub no_uring: bool,
    pub threads: Option<usize>,
    pub read_only: bool,
    /// `None` leaves the choice to the daemon.
    pub allow_other: Option<bool>,
    pub allow_root: bool,
    pub default_permissions: bool,
    /// `libc::MS_*` bits.
    pub ms_flags: u64,
    pub uid_mappings: Vec<IdMapping>,
    pub gid_mappings: Vec<IdMapping>,
    pub squash_to_root: bool,
    pub squash_to_uid: Option<u32>,
    pub squash_to_gid: Option<u32>,
    /// Entry/attribute cache lifetime in seconds.
    pub timeout: Option<f64>,
    pub noacl: bool,
    /// Options accepted for compatibility that have no effect, as written
    /// (`name` or `name=value`, quotes and escapes removed), so the daemon
    /// can log them once.
    pub ignored: Vec<String>,
}

impl MountConfig {
    fn unfinished() -> Self {
        MountConfig {
            mountpoint: PathBuf::new(),
            source: None,
            fsname: None,
            foreground: false,
            debug: false,
            single_threaded: false,
            lowerdirs: Vec::new(),
            upperdir: None,
            workdir: None,
            xattr_namespace: XattrNamespace::Trusted,
            redirect_dir: RedirectDir::Off,
            volatile: false,
            fsync: true,
            no_fuseblk: false,
            no_uring: false,
            threads: None,
            read_only: false,
            allow_other: None,
            allow_root: false,
            default_permissions: true,
            ms_flags: 0,
            uid_mappings: Vec::new(),
            gid_mappings: Vec::new(),
            squash_to_root: false,
            squash_to_uid: None,
            squash_to_gid: None,
            timeout: None,
            noacl: false,
            ignored: Vec::new(),
        }
    }

    /// Whether writes should be flushed with fsync at all.
    pub fn syncs_to_disk(&self) -> bool {
        self.fsync && !self.volatile
    }
}

/// What an option does when parsed. Private so the table stays the single
/// place that ties names to behaviour, and the exhaustive `match` in
/// `apply_option` forces every new entry to be handled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Key {
    LowerDir,
    LowerDirAppend,
    UpperDir,
    WorkDir,
    UserXattr,
    RedirectDir,
    /// A kernel option whose harmless values (the `|` list in the
    /// placeholder) are accepted without effect; `unsupported` values are
    /// known to the kernel but would need features ovlfuse lacks.
    KernelCompat {
        unsupported: &'static [&'static str],
    },
    Volatile,
    /// `fuseblk` (true) / `nofuseblk` (false).
    Fuseblk(bool),
    /// `uring` (true) / `nouring` (false).
    Uring(bool),
    FsName,
    Source,
    ReadOnly,
    ReadWrite,
    AllowOther,
    AllowRoot,
    DefaultPermissions,
    NoDefaultPermissions,
    Debug,
    Threads,
    MsSet(u64),
    MsClear(u64),
    NoAcl,
    Timeout,
    UidMapping,
    GidMapping,
    SquashToRoot,
    SquashToUid,
    SquashToGid,
    Fsync,
    /// Accepted, no effect; any non-empty value.
    Ignored,
    /// Accepted, no effect; the value must be one of the `|` list.
    IgnoredChoice,
    /// Accepted, no effect; the value must be an integer.
    IgnoredInt,
}

/// One `-o` option: the parser recognises exactly these names and the help
/// text lists exactly these lines.
#[derive(Debug, Clone, Copy)]
pub struct OptionSpec {
    pub name: &'static str,
    /// `None` for a bare word; `Some(placeholder)` for `name=VALUE`. For
    /// options with a fixed set of values the placeholder is that set,
    /// separated by `|`, and is also what error messages offer.
    pub value: Option<&'static str>,
    pub help: &'static str,
    key: Key,
}

// The libc constants are `c_ulong`, which is only 32 bits on some targets;
// MountConfig stores u64 so the field has the same type everywhere, and the
// cast is a no-op only on 64-bit targets.
#[allow(clippy::unnecessary_cast)]
const fn ms(bit: libc::c_ulong) -> u64 {
    bit as u64
}

const NO_EFFECT: &str = "accepted, no effect";

const fn opt(
    name: &'static str,
    value: Option<&'static str>,
    help: &'static str,
    key: Key,
) -> OptionSpec {
    OptionSpec {
        name,
        value,
        help,
        key,
    }
}

/// Every option `-o` understands, in help order.
pub const OPTIONS: &[OptionSpec] = &[
    // Layers.
    opt(
        "lowerdir",
        Some("DIR[:DIR...]"),
        "read-only layers, top first; \\: and \\\\ escape ':' and '\\' in a path (required)",
        Key::LowerDir,
    ),
    opt(
        "lowerdir+",
        Some("DIR"),
        "append one read-only layer below the previous ones (no ':' splitting); not mixable with lowerdir=",
        Key::LowerDirAppend,
    ),
    opt(
        "upperdir",
        Some("DIR"),
        "writable layer receiving all changes (needs workdir=)",
        Key::UpperDir,
    ),
    opt(
        "workdir",
        Some("DIR"),
        "scratch directory on the upper filesystem (needs upperdir=)",
        Key::WorkDir,
    ),
    // Kernel overlayfs options.
    opt(
        "userxattr",
        None,
        "keep overlay metadata in user.overlay.* instead of trusted.overlay.*",
        Key::UserXattr,
    ),
    opt(
        "redirect_dir",
        Some("on|off|follow|nofollow"),
        "create and/or follow directory rename redirects (default off)",
        Key::RedirectDir,
    ),
    opt(
        "index",
        Some("off"),
        "kernel option; only off is supported: accepted, no effect",
        Key::KernelCompat {
            unsupported: &["on"],
        },
    ),
    opt(
        "xino",
        Some("off|auto"),
        "kernel option; on is not supported: accepted, no effect",
        Key::KernelCompat {
            unsupported: &["on"],
        },
    ),
    opt(
        "metacopy",
        Some("off"),
        "kernel option; only off is supported: accepted, no effect",
        Key::KernelCompat {
            unsupported: &["on"],
        },
    ),
    opt(
        "nfs_export",
        Some("off"),
        "kernel option; only off is supported: accepted, no effect",
        Key::KernelCompat {
            unsupported: &["on"],
        },
    ),
    opt(
        "verity",
        Some("off"),
        "kernel option; only off is supported: accepted, no effect",
        Key::KernelCompat {
            unsupported: &["on", "require"],
        },
    ),
    opt(
        "uuid",
        Some("on|off|null|auto"),
        "kernel option: accepted, no effect",
        Key::KernelCompat { unsupported: &[] },
    ),
    opt(
        "volatile",
        None,
        "never flush the upper layer; marks the work dir, and later mounts are refused until workdir/work/incompat/volatile is removed",
        Key::Volatile,
    ),
    opt(
        "fuseblk",
        None,
        "when privileged, mount as fuseblk on a tiny loop device so that syncfs(2) flushes the upper layer and reports its errors (default for root)",
        Key::Fuseblk(true),
    ),
    opt(
        "nofuseblk",
        None,
        "always mount as plain fuse (no relay: slightly faster metadata operations), but syncfs(2) on the union does not flush the upper layer (`ovlfuse sync` does)",
        Key::Fuseblk(false),
    ),
    opt(
        "uring",
        None,
        "on fuseblk, take requests through FUSE-over-io_uring, one queue per CPU, when the kernel allows it (fuse.enable_uring=Y; default)",
        Key::Uring(true),
    ),
    opt(
        "nouring",
        None,
        "always take requests through /dev/fuse reads",
        Key::Uring(false),
    ),
    // FUSE and mount options.
    opt(
        "fsname",
        Some("NAME"),
        "filesystem name shown in the mount table",
        Key::FsName,
    ),
    opt(
        "source",
        Some("NAME"),
        "source name shown in the mount table (same as the SOURCE argument)",
        Key::Source,
    ),
    opt("subtype", Some("NAME"), NO_EFFECT, Key::Ignored),
    opt("ro", None, "mount read-only", Key::ReadOnly),
    opt(
        "rw",
        None,
        "mount read-write (default; undoes ro)",
        Key::ReadWrite,
    ),
    opt(
        "allow_other",
        None,
        "let other users access the mount",
        Key::AllowOther,
    ),
    opt(
        "allow_root",
        None,
        "let root access the mount",
        Key::AllowRoot,
    ),
    opt(
        "default_permissions",
        None,
        "let the kernel check permissions from file modes (default)",
        Key::DefaultPermissions,
    ),
    opt(
        "no_default_permissions",
        None,
        "do not ask the kernel to check permissions",
        Key::NoDefaultPermissions,
    ),
    opt(
        "debug",
        None,
        "log every request (implies -f), same as -d",
        Key::Debug,
    ),
    opt(
        "threads",
        Some("N"),
        "number of worker threads, at least 1",
        Key::Threads,
    ),
    opt(
        "nosuid",
        None,
        "ignore set-user/group-id bits",
        Key::MsSet(ms(libc::MS_NOSUID)),
    ),
    opt(
        "suid",
        None,
        "honour set-user/group-id bits (undoes nosuid)",
        Key::MsClear(ms(libc::MS_NOSUID)),
    ),
    opt(
        "nodev",
        None,
        "refuse access to device files",
        Key::MsSet(ms(libc::MS_NODEV)),
    ),
    opt(
        "dev",
        None,
        "allow access to device files (undoes nodev)",
        Key::MsClear(ms(libc::MS_NODEV)),
    ),
    opt(
        "noexec",
        None,
        "refuse to execute programs",
        Key::MsSet(ms(libc::MS_NOEXEC)),
    ),
    opt(
        "exec",
        None,
        "allow executing programs (undoes noexec)",
        Key::MsClear(ms(libc::MS_NOEXEC)),
    ),
    opt(
        "noatime",
        None,
        "do not update access times",
        Key::MsSet(ms(libc::MS_NOATIME)),
    ),
    opt(
        "atime",
        None,
        "update access times (undoes noatime)",
        Key::MsClear(ms(libc::MS_NOATIME)),
    ),
    opt(
        "nodiratime",
        None,
        "do not update directory access times",
        Key::MsSet(ms(libc::MS_NODIRATIME)),
    ),
    opt(
        "diratime",
        None,
        "update directory access times (undoes nodiratime)",
        Key::MsClear(ms(libc::MS_NODIRATIME)),
    ),
    opt(
        "relatime",
        None,
        "update access times relative to modification times",
        Key::MsSet(ms(libc::MS_RELATIME)),
    ),
    opt(
        "norelatime",
        None,
        "undoes relatime",
        Key::MsClear(ms(libc::MS_RELATIME)),
    ),
    opt(
        "strictatime",
        None,
        "always update access times",
        Key::MsSet(ms(libc::MS_STRICTATIME)),
    ),
    opt(
        "nostrictatime",
        None,
        "undoes strictatime",
        Key::MsClear(ms(libc::MS_STRICTATIME)),
    ),
    opt(
        "sync",
        None,
        "synchronous writes",
        Key::MsSet(ms(libc::MS_SYNCHRONOUS)),
    ),
    opt(
        "async",
        None,
        "asynchronous writes (default; undoes sync)",
        Key::MsClear(ms(libc::MS_SYNCHRONOUS)),
    ),
    opt(
        "dirsync",
        None,
        "synchronous directory changes",
        Key::MsSet(ms(libc::MS_DIRSYNC)),
    ),
    opt("auto_unmount", None, NO_EFFECT, Key::Ignored),
    opt("max_read", Some("BYTES"), NO_EFFECT, Key::Ignored),
    opt(
        "context",
        Some("LABEL"),
        "SELinux label, not applied: accepted, no effect",
        Key::Ignored,
    ),
    opt(
        "fscontext",
        Some("LABEL"),
        "SELinux label, not applied: accepted, no effect",
        Key::Ignored,
    ),
    opt(
        "defcontext",
        Some("LABEL"),
        "SELinux label, not applied: accepted, no effect",
        Key::Ignored,
    ),
    opt(
        "rootcontext",
        Some("LABEL"),
        "SELinux label, not applied: accepted, no effect",
        Key::Ignored,
    ),
    opt(
        "noacl",
        None,
        "nothing to turn off: ACL attributes are kept in the layers like any xattr",
        Key::NoAcl,
    ),
    opt(
        "timeout",
        Some("SECONDS"),
        "how long the kernel may cache entries and attributes (default 1 for upper-layer objects and a day for objects only in lower layers, which change only through the union; when given, for all)",
        Key::Timeout,
    ),
    // fstab words that mount(8) may hand over.
    opt("defaults", None, NO_EFFECT, Key::Ignored),
    opt("auto", None, NO_EFFECT, Key::Ignored),
    opt("noauto", None, NO_EFFECT, Key::Ignored),
    opt("nofail", None, NO_EFFECT, Key::Ignored),
    opt("_netdev", None, NO_EFFECT, Key::Ignored),
    // fuse-overlayfs options.
    opt(
        "uidmapping",
        Some("C:H:S[:C:H:S...]"),
        "map container uid C..C+S-1 to host uid H..H+S-1",
        Key::UidMapping,
    ),
    opt(
        "gidmapping",
        Some("C:H:S[:C:H:S...]"),
        "map container gid C..C+S-1 to host gid H..H+S-1",
        Key::GidMapping,
    ),
    opt(
        "squash_to_root",
        None,
        "show every file as owned by 0:0",
        Key::SquashToRoot,
    ),
    opt(
        "squash_to_uid",
        Some("UID"),
        "show every file as owned by UID (overrides squash_to_root)",
        Key::SquashToUid,
    ),
    opt(
        "squash_to_gid",
        Some("GID"),
        "show every file as owned by group GID (overrides squash_to_root)",
        Key::SquashToGid,
    ),
    opt(
        "fsync",
        Some("0|1|volatile"),
        "0: fsync/fdatasync and copy-up flushes become no-ops (data may be lost on a crash); 1: honour them (default); volatile: as the volatile option",
        Key::Fsync,
    ),
    opt("threaded", Some("0|1"), NO_EFFECT, Key::IgnoredChoice),
    opt("fast_ino", Some("N"), NO_EFFECT, Key::IgnoredInt),
    opt("static_nlink", None, NO_EFFECT, Key::Ignored),
    opt("writeback", Some("N"), NO_EFFECT, Key::IgnoredInt),
    opt("plugins", Some("LIST"), NO_EFFECT, Key::Ignored),
    opt(
        "xattr_permissions",
        Some("0|1|2"),
        NO_EFFECT,
        Key::IgnoredChoice,
    ),
    opt("noxattrs", Some("N"), NO_EFFECT, Key::IgnoredInt),
    // libfuse session tuning.
    opt("clone_fd", None, NO_EFFECT, Key::Ignored),
    opt("splice_read", None, NO_EFFECT, Key::Ignored),
    opt("no_splice_read", None, NO_EFFECT, Key::Ignored),
    opt("splice_write", None, NO_EFFECT, Key::Ignored),
    opt("no_splice_write", None, NO_EFFECT, Key::Ignored),
    opt("splice_move", None, NO_EFFECT, Key::Ignored),
    opt("no_splice_move", None, NO_EFFECT, Key::Ignored),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FlagKey {
    Foreground,
    Debug,
    SingleThreaded,
    Options,
    Help,
    Version,
    EndOfFlags,
}

/// One command-line flag; the lexer and the help text both read this table.
#[derive(Debug, Clone, Copy)]
pub struct FlagSpec {
    pub short: Option<&'static str>,
    pub long: Option<&'static str>,
    /// Placeholder of the argument, for the one flag (`-o`) that takes one.
    pub arg: Option<&'static str>,
    pub help: &'static str,
    key: FlagKey,
}

const fn flag(
    short: Option<&'static str>,
    long: Option<&'static str>,
    arg: Option<&'static str>,
    help: &'static str,
    key: FlagKey,
) -> FlagSpec {
    FlagSpec {
        short,
        long,
        arg,
        help,
        key,
    }
}

/// Every flag, in help order.
pub const FLAGS: &[FlagSpec] = &[
    flag(
        Some("-f"),
        None,
        None,
        "stay in the foreground",
        FlagKey::Foreground,
    ),
    flag(
        Some("-d"),
        Some("--debug"),
        None,
        "log every request (implies -f)",
        FlagKey::Debug,
    ),
    flag(
        Some("-s"),
        None,
        None,
        "handle requests on a single thread",
        FlagKey::SingleThreaded,
    ),
    flag(
        Some("-o"),
        None,
        Some("OPTIONS"),
        "comma-separated options (below); may repeat, -oOPTIONS also works",
        FlagKey::Options,
    ),
    flag(
        Some("-h"),
        Some("--help"),
        None,
        "show this help",
        FlagKey::Help,
    ),
    flag(
        Some("-V"),
        Some("--version"),
        None,
        "show the version",
        FlagKey::Version,
    ),
    flag(
        None,
        Some("--"),
        None,
        "end of flags: everything after it is SOURCE or MOUNTPOINT",
        FlagKey::EndOfFlags,
    ),
];

/// The full `--help` text.
pub fn help_text() -> String {
    let mut out = String::new();
    out.push_str("ovlfuse: overlay (union) filesystem in userspace\n\n");
    out.push_str("Usage:\n");
    out.push_str("  ovlfuse [FLAGS] -o lowerdir=DIR[:DIR...][,OPTION...] MOUNTPOINT\n");
    out.push_str("  ovlfuse [FLAGS] SOURCE MOUNTPOINT -o OPTIONS   (mount.fuse style)\n");
    out.push_str(
        "  ovlfuse demo                                   (run the built-in demonstration)\n",
    );
    out.push_str(
        "  ovlfuse status MOUNTPOINT|WORKDIR              (print a mount's status and exit\n",
    );
    out.push_str(
        "                                                  0 healthy, 1 poisoned, 2 not running)\n",
    );
    out.push_str(
        "  ovlfuse sync PATH                              (flush the upper layer of the union\n",
    );
    out.push_str(
        "                                                  PATH is on; 0 all written, 1 lost)\n",
    );
    out.push_str("  ovlfuse -h | --help | -V | --version\n");
    out.push_str("Flags, options and arguments may come in any order.\n\n");

    out.push_str("Flags:\n");
    let flag_rows: Vec<(String, &str)> = FLAGS
        .iter()
        .map(|f| {
            let mut left = [f.short, f.long]
                .iter()
                .flatten()
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            if let Some(arg) = f.arg {
                left.push(' ');
                left.push_str(arg);
            }
            (left, f.help)
        })
        .collect();
    push_rows(&mut out, &flag_rows);

    out.push_str("\nOptions (-o; later ones override earlier ones):\n");
    let option_rows: Vec<(String, &str)> = OPTIONS
        .iter()
        .map(|o| {
            let left = match o.value {
                Some(v) => format!("{}={}", o.name, v),
                None => o.name.to_string(),
            };
            (left, o.help)
        })
        .collect();
    push_rows(&mut out, &option_rows);

    out.push_str(
        "\nQuoting: a value in double quotes may contain commas (context=\"a,b\");\n\
         a backslash makes the next character literal (\\, \\: \\\\ \\\").\n",
    );
    out
}

fn push_rows(out: &mut String, rows: &[(String, &str)]) {
    let width = rows.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    for (left, help) in rows {
        out.push_str(&format!("  {left:<width$}  {help}\n"));
    }
}

/// Backslash-escapes a value so that `parse_args` reads it back unchanged,
/// whatever `,` `:` `"` or `\` it contains; meant for building `-o` strings
/// (for example a `lowerdir=` list from several paths).
pub fn escape_option_value(value: &OsStr) -> OsString {
    let mut out = Vec::with_capacity(value.len());
    for &b in value.as_bytes() {
        if matches!(b, b'\\' | b':' | b',' | b'"') {
            out.push(b'\\');
        }
        out.push(b);
    }
    OsString::from_vec(out)
}

/// Parses the command line, without argv[0].
pub fn parse_args<I: IntoIterator<Item = OsString>>(args: I) -> Result<Command, UsageError> {
    let args: Vec<OsString> = args.into_iter().collect();
    let lexed = lex(&args);

    // Help and version win over every other mistake on the line, so a user
    // who typed something wrong can still ask what is right.
    if lexed.help {
        return Ok(Command::Help);
    }
    if lexed.version {
        return Ok(Command::Version);
    }
    if args.first().is_some_and(|a| a == "demo") {
        return match args.get(1) {
            None => Ok(Command::Demo),
            Some(extra) => Err(usage(format!(
                "demo takes no arguments, got {:?}",
                extra.to_string_lossy()
            ))),
        };
    }
    if args.first().is_some_and(|a| a == "status") {
        return parse_path_command(&lexed, "status", "a MOUNTPOINT or WORKDIR", Command::Status);
    }
    if args.first().is_some_and(|a| a == "sync") {
        return parse_path_command(&lexed, "sync", "a PATH on an ovlfuse mount", Command::Sync);
    }
    if let Some(err) = lexed.error {
        return Err(err);
    }

    let mut cfg = MountConfig::unfinished();
    cfg.foreground = lexed.foreground;
    cfg.debug = lexed.debug;
    cfg.single_threaded = lexed.single_threaded;
    let mut lower_style: Option<Key> = None;
    for opts in &lexed.option_strings {
        for item in split_items(opts)? {
            apply_item(&mut cfg, &mut lower_style, &item)?;
        }
    }
    if cfg.debug {
        cfg.foreground = true;
    }

    let (source, mountpoint) = match lexed.positionals.as_slice() {
        [] => return Err(usage("missing MOUNTPOINT")),
        [mp] => (None, mp),
        [src, mp] => (Some(src), mp),
        [_, _, extra @ ..] => {
            let listed: Vec<String> = extra
                .iter()
                .map(|e| format!("{:?}", e.to_string_lossy()))
                .collect();
            return Err(usage(format!(
                "too many arguments: unexpected {}",
                listed.join(", ")
            )));
        }
    };
    if mountpoint.is_empty() {
        return Err(usage("empty MOUNTPOINT argument"));
    }
    cfg.mountpoint = make_absolute(Path::new(mountpoint))?;
    // A positional SOURCE is what mount(8) passes; it is the more deliberate
    // of the two, so it overrides source=.
    if let Some(src) = source {
        cfg.source = Some(src.to_string_lossy().into_owned());
    }

    if cfg.lowerdirs.is_empty() {
        return Err(usage("missing required option lowerdir="));
    }
    match (&cfg.upperdir, &cfg.workdir) {
        (Some(_), None) => {
            return Err(usage(
                "upperdir= needs workdir= as well: both are needed for a writable overlay",
            ));
        }
        (None, Some(_)) => {
            return Err(usage(
                "workdir= needs upperdir= as well: both are needed for a writable overlay",
            ));
        }
        _ => {}
    }
    Ok(Command::Mount(cfg))
}

/// `status TARGET` and `sync PATH`: one path (`--` may come before it), no flags or options.
/// `what` names the argument in messages ("a MOUNTPOINT or WORKDIR").
fn parse_path_command(
    lexed: &Lexed,
    name: &str,
    what: &str,
    make: fn(PathBuf) -> Command,
) -> Result<Command, UsageError> {
    if let Some(err) = &lexed.error {
        return Err(err.clone());
    }
    let bare = what.trim_start_matches("a ");
    if lexed.foreground || lexed.debug || lexed.single_threaded || !lexed.option_strings.is_empty()
    {
        return Err(usage(format!(
            "{name} takes no flags or options, only {what}"
        )));
    }
    match &lexed.positionals[1..] {
        [] => Err(usage(format!("{name} needs {what} argument"))),
        [target] if target.is_empty() => Err(usage(format!("empty {bare} argument"))),
        [target] => Ok(make(PathBuf::from(target))),
        [_, extra @ ..] => {
            let listed: Vec<String> = extra
                .iter()
                .map(|e| format!("{:?}", e.to_string_lossy()))
                .collect();
            Err(usage(format!(
                "{name} takes one {bare}: unexpected {}",
                listed.join(", ")
            )))
        }
    }
}

#[derive(Default)]
struct Lexed {
    help: bool,
    version: bool,
    foreground: bool,
    debug: bool,
    single_threaded: bool,
    option_strings: Vec<Vec<u8>>,
    positionals: Vec<OsString>,
    /// Only the first mistake is kept; it is reported after help/version.
    error: Option<UsageError>,
}

fn lex(args: &[OsString]) -> Lexed {
    let mut lexed = Lexed::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let bytes = arg.as_bytes();
        if bytes.len() < 2 || bytes[0] != b'-' {
            // "-" alone is conventionally an operand, not a flag.
            lexed.positionals.push(arg.clone());
            continue;
        }
        let Some((spec, attached)) = find_flag(bytes) else {
            lexed
                .error
                .get_or_insert_with(|| usage(format!("unknown flag {:?}", arg.to_string_lossy())));
            continue;
        };
        match spec.key {
            FlagKey::Foreground => lexed.foreground = true,
            FlagKey::Debug => lexed.debug = true,
            FlagKey::SingleThreaded => lexed.single_threaded = true,
            FlagKey::Help => lexed.help = true,
            FlagKey::Version => lexed.version = true,
            FlagKey::EndOfFlags => {
                lexed.positionals.extend(it.by_ref().cloned());
            }
            FlagKey::Options => match attached {
                Some(value) => lexed.option_strings.push(value.to_vec()),
                None => match it.next() {
                    Some(value) => lexed.option_strings.push(value.as_bytes().to_vec()),
                    None => {
                        lexed.error.get_or_insert_with(|| {
                            usage("-o needs an argument: a comma-separated option list")
                        });
                    }
                },
            },
        }
    }
    lexed
}

/// Finds the flag `arg` names; for a flag taking an argument, also returns
/// the argument when it is attached (`-oOPTS`).
fn find_flag(arg: &[u8]) -> Option<(&'static FlagSpec, Option<&[u8]>)> {
    for spec in FLAGS {
        let names = [spec.short, spec.long];
        if names.iter().flatten().any(|n| n.as_bytes() == arg) {
            return Some((spec, None));
        }
        if spec.arg.is_some()
            && let Some(short) = spec.short
            && let Some(rest) = arg.strip_prefix(short.as_bytes())
        {
            return Some((spec, Some(rest)));
        }
    }
    None
}

/// Splits one `-o` argument at unquoted, unescaped commas and drops the
/// double quotes. Backslash pairs are kept intact because their meaning
/// depends on the option (`\:` only matters inside `lowerdir=`); values are
/// unescaped later, once the option is known.
fn split_items(opts: &[u8]) -> Result<Vec<Vec<u8>>, UsageError> {
    let mut items = Vec::new();
    let mut current = Vec::new();
    let mut quoted = false;
    let mut bytes = opts.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => {
                current.push(b);
                if let Some(&next) = bytes.next() {
                    current.push(next);
                }
            }
            b'"' => quoted = !quoted,
            b',' if !quoted => {
                if !current.is_empty() {
                    items.push(std::mem::take(&mut current));
                }
            }
            _ => current.push(b),
        }
    }
    if quoted {
        return Err(usage(format!(
            "unterminated double quote in {:?}",
            String::from_utf8_lossy(opts)
        )));
    }
    if !current.is_empty() {
        items.push(current);
    }
    Ok(items)
}

/// Removes one level of backslash escaping. A trailing lone backslash has
/// nothing to escape and stays literal rather than being an error.
fn unescape(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        if b == b'\\' {
            out.push(*bytes.next().unwrap_or(&b'\\'));
        } else {
            out.push(b);
        }
    }
    out
}

/// Splits a `lowerdir=` value at unescaped colons, unescaping each part.
fn split_layers(raw: &[u8]) -> Vec<Vec<u8>> {
    let mut layers = Vec::new();
    let mut current = Vec::new();
    let mut bytes = raw.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => current.push(*bytes.next().unwrap_or(&b'\\')),
            b':' => layers.push(std::mem::take(&mut current)),
            _ => current.push(b),
        }
    }
    layers.push(current);
    layers
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn invalid_value(name: &str, value: &str, expected: &str) -> UsageError {
    usage(format!(
        "invalid value {value:?} for {name}=: expected {expected}"
    ))
}

fn make_absolute(path: &Path) -> Result<PathBuf, UsageError> {
    std::path::absolute(path).map_err(|e| {
        usage(format!(
            "cannot make {:?} absolute: {e}",
            path.to_string_lossy()
        ))
    })
}

fn path_value(raw: &[u8]) -> Result<PathBuf, UsageError> {
    make_absolute(Path::new(OsStr::from_bytes(&unescape(raw))))
}

fn text_value(name: &str, raw: &[u8]) -> Result<String, UsageError> {
    String::from_utf8(unescape(raw))
        .map_err(|_| usage(format!("invalid value for {name}=: not valid UTF-8")))
}

fn choice_value(spec: &OptionSpec, raw: &[u8]) -> Result<String, UsageError> {
    let value = text_value(spec.name, raw)?;
    let choices = spec.value.unwrap_or_default();
    if choices.split('|').any(|c| c == value) {
        Ok(value)
    } else {
        Err(invalid_value(spec.name, &value, choices))
    }
}

fn u32_value(name: &str, raw: &[u8]) -> Result<u32, UsageError> {
    let value = text_value(name, raw)?;
    value
        .parse()
        .map_err(|_| invalid_value(name, &value, "a number from 0 to 4294967295"))
}

fn parse_mappings(name: &str, raw: &[u8]) -> Result<Vec<IdMapping>, UsageError> {
    let value = text_value(name, raw)?;
    let fields: Vec<&str> = value.split(':').collect();
    if !fields.len().is_multiple_of(3) {
        return Err(usage(format!(
            "invalid {name}= {value:?}: expected CONTAINER:HOST:SIZE triples separated by ':'"
        )));
    }
    let mut numbers = Vec::with_capacity(fields.len());
    for field in &fields {
        let n: u32 = field.parse().map_err(|_| {
            usage(format!(
                "invalid {name}= {value:?}: {field:?} is not a number from 0 to 4294967295"
            ))
        })?;
        numbers.push(n);
    }
    numbers
        .chunks_exact(3)
        .map(|t| {
            if t[2] == 0 {
                Err(usage(format!(
                    "invalid {name}= {value:?}: a range size must be at least 1"
                )))
            } else {
                Ok(IdMapping {
                    container: t[0],
                    host: t[1],
                    size: t[2],
                })
            }
        })
        .collect()
}

fn apply_item(
    cfg: &mut MountConfig,
    lower_style: &mut Option<Key>,
    item: &[u8],
) -> Result<(), UsageError> {
    let (name, value) = match item.iter().position(|&b| b == b'=') {
        Some(eq) => (&item[..eq], Some(&item[eq + 1..])),
        None => (item, None),
    };
    let Some(spec) = OPTIONS.iter().find(|o| o.name.as_bytes() == name) else {
        return Err(usage(format!("unknown option {:?}", lossy(name))));
    };
    let value = match (spec.value, value) {
        (None, None) => None,
        (None, Some(_)) => {
            return Err(usage(format!(
                "option {:?} takes no value, got {:?}",
                spec.name,
                lossy(&unescape(item))
            )));
        }
        (Some(hint), None | Some([])) => return Err(missing_value(spec.name, hint)),
        (Some(_), Some(v)) => Some(v),
    };
    apply_option(cfg, lower_style, spec, value.unwrap_or_default())
}

fn missing_value(name: &str, hint: &str) -> UsageError {
    usage(format!("option {name:?} needs a value: {name}={hint}"))
}

/// `raw` is the still-escaped value; empty for bare words.
fn apply_option(
    cfg: &mut MountConfig,
    lower_style: &mut Option<Key>,
    spec: &OptionSpec,
    raw: &[u8],
) -> Result<(), UsageError> {
    let name = spec.name;
    match spec.key {
        Key::LowerDir | Key::LowerDirAppend => {
            if lower_style.is_some_and(|k| k != spec.key) {
                return Err(usage("lowerdir= and lowerdir+= cannot be mixed"));
            }
            *lower_style = Some(spec.key);
            if spec.key == Key::LowerDir {
                let layers = split_layers(raw);
                if layers.iter().any(Vec::is_empty) {
                    return Err(usage(format!(
                        "lowerdir= {:?} contains an empty layer (data-only \"::\" layers are not supported by ovlfuse)",
                        lossy(raw)
                    )));
                }
                cfg.lowerdirs = layers
                    .iter()
                    .map(|l| make_absolute(Path::new(OsStr::from_bytes(l))))
                    .collect::<Result<_, _>>()?;
            } else {
                cfg.lowerdirs.push(path_value(raw)?);
            }
        }
        Key::UpperDir => cfg.upperdir = Some(path_value(raw)?),
        Key::WorkDir => cfg.workdir = Some(path_value(raw)?),
        Key::UserXattr => cfg.xattr_namespace = XattrNamespace::User,
        Key::RedirectDir => {
            cfg.redirect_dir = match choice_value(spec, raw)?.as_str() {
                "on" => RedirectDir::On,
                "follow" => RedirectDir::Follow,
                "nofollow" => RedirectDir::NoFollow,
                _ => RedirectDir::Off,
            };
        }
        Key::KernelCompat { unsupported } => {
            let value = text_value(name, raw)?;
            if unsupported.contains(&value.as_str()) {
                return Err(usage(format!(
                    "{name}={value} is not supported by ovlfuse (accepted: {})",
                    spec.value.unwrap_or_default()
                )));
            }
            let value = choice_value(spec, raw)?;
            cfg.ignored.push(format!("{name}={value}"));
        }
        Key::Volatile => cfg.volatile = true,
        Key::Fuseblk(on) => cfg.no_fuseblk = !on,
        Key::Uring(on) => cfg.no_uring = !on,
        Key::FsName => cfg.fsname = Some(text_value(name, raw)?),
        Key::Source => cfg.source = Some(text_value(name, raw)?),
        Key::ReadOnly => cfg.read_only = true,
        Key::ReadWrite => cfg.read_only = false,
        Key::AllowOther => cfg.allow_other = Some(true),
        Key::AllowRoot => cfg.allow_root = true,
        Key::DefaultPermissions => cfg.default_permissions = true,
        Key::NoDefaultPermissions => cfg.default_permissions = false,
        Key::Debug => cfg.debug = true,
        Key::Threads => {
            let value = text_value(name, raw)?;
            match value.parse::<usize>() {
                Ok(n) if n >= 1 => cfg.threads = Some(n),
                _ => return Err(invalid_value(name, &value, "a whole number >= 1")),
            }
        }
        Key::MsSet(bit) => cfg.ms_flags |= bit,
        Key::MsClear(bit) => cfg.ms_flags &= !bit,
        Key::NoAcl => cfg.noacl = true,
        Key::Timeout => {
            let value = text_value(name, raw)?;
            match value.parse::<f64>() {
                Ok(t) if t.is_finite() && t >= 0.0 => cfg.timeout = Some(t),
                _ => {
                    return Err(invalid_value(name, &value, "a number of seconds >= 0"));
                }
            }
        }
        Key::UidMapping => cfg.uid_mappings = parse_mappings(name, raw)?,
        Key::GidMapping => cfg.gid_mappings = parse_mappings(name, raw)?,
        Key::SquashToRoot => cfg.squash_to_root = true,
        Key::SquashToUid => cfg.squash_to_uid = Some(u32_value(name, raw)?),
        Key::SquashToGid => cfg.squash_to_gid = Some(u32_value(name, raw)?),
        Key::Fsync => match choice_value(spec, raw)?.as_str() {
            "0" => cfg.fsync = false,
            "1" => cfg.fsync = true,
            _ => cfg.volatile = true,
        },
        Key::Ignored => cfg.ignored.push(as_written(spec, raw)),
        Key::IgnoredChoice => {
            choice_value(spec, raw)?;
            cfg.ignored.push(as_written(spec, raw));
        }
        Key::IgnoredInt => {
            let value = text_value(name, raw)?;
            if value.parse::<i64>().is_err() {
                return Err(invalid_value(name, &value, "an integer"));
            }
            cfg.ignored.push(as_written(spec, raw));
        }
    }
    Ok(())
}

fn as_written(spec: &OptionSpec, raw: &[u8]) -> String {
    match spec.value {
        Some(_) => format!("{}={}", spec.name, lossy(&unescape(raw))),
        None => spec.name.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn os(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn parse(list: &[&str]) -> Result<Command, UsageError> {
        parse_args(os(list))
    }

    fn mount(list: &[&str]) -> MountConfig {
        match parse(list) {
            Ok(Command::Mount(cfg)) => cfg,
            other => panic!("expected a mount for {list:?}, got {other:?}"),
        }
    }

    /// A mount with `extra` appended to a valid lowerdir-only option string.
    fn mount_with(extra: &str) -> MountConfig {
        mount(&["-o", &format!("lowerdir=/l,{extra}"), "/mnt"])
    }

    fn error(list: &[&str]) -> String {
        match parse(list) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("expected an error for {list:?}, got {other:?}"),
        }
    }

    fn error_with(extra: &str) -> String {
        error(&["-o", &format!("lowerdir=/l,{extra}"), "/mnt"])
    }

    fn abs(p: &str) -> PathBuf {
        std::path::absolute(p).unwrap()
    }

    // --- invocation styles -------------------------------------------------

    #[test]
    fn fuse_overlayfs_style_mount_with_defaults() {
        let cfg = mount(&[
            "-o",
            "lowerdir=/lower,upperdir=/upper,workdir=/work",
            "/mnt",
        ]);
        let expected = MountConfig {
            mountpoint: PathBuf::from("/mnt"),
            lowerdirs: vec![PathBuf::from("/lower")],
            upperdir: Some(PathBuf::from("/upper")),
            workdir: Some(PathBuf::from("/work")),
            ..MountConfig::unfinished()
        };
        assert_eq!(cfg, expected);
        assert!(cfg.default_permissions);
        assert!(cfg.fsync);
        assert!(cfg.syncs_to_disk());
        assert_eq!(cfg.allow_other, None);
        assert_eq!(cfg.xattr_namespace, XattrNamespace::Trusted);
        assert_eq!(cfg.redirect_dir, RedirectDir::Off);
    }

    #[test]
    fn lowerdir_alone_gives_a_read_only_stack_without_upper() {
        let cfg = mount(&["-o", "lowerdir=/a", "/mnt"]);
        assert_eq!(cfg.upperdir, None);
        assert_eq!(cfg.workdir, None);
    }

    #[test]
    fn repeated_o_flags_accumulate() {
        let cfg = mount(&[
            "-o",
            "lowerdir=/l",
            "-o",
            "upperdir=/u",
            "-o",
            "workdir=/w",
            "/m",
        ]);
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/u")));
        assert_eq!(cfg.workdir, Some(PathBuf::from("/w")));
    }

    #[test]
    fn attached_o_value_works() {
        let cfg = mount(&["-olowerdir=/l,ro", "/m"]);
        assert_eq!(cfg.lowerdirs, vec![PathBuf::from("/l")]);
        assert!(cfg.read_only);
    }

    #[test]
    fn flags_options_and_positionals_come_in_any_order() {
        let a = mount(&["/m", "-o", "lowerdir=/l", "-f", "-s"]);
        let b = mount(&["-s", "-o", "lowerdir=/l", "-f", "/m"]);
        assert_eq!(a, b);
        assert!(a.foreground && a.single_threaded && !a.debug);
    }

    #[test]
    fn mount_fuse_convention_takes_source_then_mountpoint() {
        let cfg = mount(&["overlay", "/m", "-o", "lowerdir=/l"]);
        assert_eq!(cfg.source.as_deref(), Some("overlay"));
        assert_eq!(cfg.mountpoint, PathBuf::from("/m"));
    }

    #[test]
    fn positional_source_overrides_source_option() {
        let cfg = mount(&["src", "/m", "-o", "source=opt,lowerdir=/l"]);
        assert_eq!(cfg.source.as_deref(), Some("src"));
    }

    #[test]
    fn source_option_sets_source() {
        assert_eq!(mount_with("source=foo").source.as_deref(), Some("foo"));
    }

    #[test]
    fn demo_as_first_argument_is_the_demo() {
        assert_eq!(parse(&["demo"]), Ok(Command::Demo));
    }

    #[test]
    fn demo_with_arguments_is_an_error() {
        assert_eq!(error(&["demo", "x"]), r#"demo takes no arguments, got "x""#);
    }

    #[test]
    fn demo_elsewhere_is_a_mountpoint() {
        let cfg = mount(&["-o", "lowerdir=/l", "demo"]);
        assert_eq!(cfg.mountpoint, abs("demo"));
    }

    #[test]
    fn status_as_first_argument_takes_one_target_as_given() {
        assert_eq!(
            parse(&["status", "/c/merged"]),
            Ok(Command::Status(PathBuf::from("/c/merged")))
        );
        assert_eq!(
            parse(&["status", "work"]),
            Ok(Command::Status(PathBuf::from("work")))
        );
        assert_eq!(
            parse(&["status", "--", "-odd"]),
            Ok(Command::Status(PathBuf::from("-odd")))
        );
    }

    #[test]
    fn sync_takes_one_path() {
        assert_eq!(
            parse(&["sync", "/c/merged/etc"]),
            Ok(Command::Sync(PathBuf::from("/c/merged/etc")))
        );
        assert_eq!(
            error(&["sync"]),
            "sync needs a PATH on an ovlfuse mount argument"
        );
        assert_eq!(
            error(&["sync", "-o", "x", "/a"]),
            "sync takes no flags or options, only a PATH on an ovlfuse mount"
        );
    }

    #[test]
    fn status_needs_exactly_one_target_and_nothing_else() {
        assert_eq!(
            error(&["status"]),
            "status needs a MOUNTPOINT or WORKDIR argument"
        );
        assert_eq!(
            error(&["status", ""]),
            "empty MOUNTPOINT or WORKDIR argument"
        );
        assert_eq!(
            error(&["status", "/a", "/b", "/c"]),
            r#"status takes one MOUNTPOINT or WORKDIR: unexpected "/b", "/c""#
        );
        assert_eq!(
            error(&["status", "-f", "/a"]),
            "status takes no flags or options, only a MOUNTPOINT or WORKDIR"
        );
        assert_eq!(
            error(&["status", "-o", "ro", "/a"]),
            "status takes no flags or options, only a MOUNTPOINT or WORKDIR"
        );
        assert_eq!(error(&["status", "-x", "/a"]), r#"unknown flag "-x""#);
    }

    #[test]
    fn status_elsewhere_is_a_mountpoint_and_help_still_wins() {
        let cfg = mount(&["-o", "lowerdir=/l", "status"]);
        assert_eq!(cfg.mountpoint, abs("status"));
        assert_eq!(parse(&["status", "--help"]), Ok(Command::Help));
        assert_eq!(parse(&["status", "/m", "-V"]), Ok(Command::Version));
    }

    #[test]
    fn help_mentions_the_status_command_and_its_exit_codes() {
        let help = help_text();
        assert!(help.contains("ovlfuse status MOUNTPOINT|WORKDIR"), "{help}");
        assert!(
            help.contains("0 healthy, 1 poisoned, 2 not running"),
            "{help}"
        );
    }

    #[test]
    fn help_and_version_are_recognised_anywhere() {
        assert_eq!(parse(&["-h"]), Ok(Command::Help));
        assert_eq!(
            parse(&["-o", "lowerdir=/l", "/m", "--help"]),
            Ok(Command::Help)
        );
        assert_eq!(parse(&["-V"]), Ok(Command::Version));
        assert_eq!(parse(&["/m", "--version"]), Ok(Command::Version));
        assert_eq!(parse(&["demo", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn help_wins_over_version_and_mistakes() {
        assert_eq!(parse(&["-V", "-h"]), Ok(Command::Help));
        assert_eq!(parse(&["-x", "a", "b", "c", "--help"]), Ok(Command::Help));
    }

    #[test]
    fn double_dash_ends_flag_parsing() {
        let cfg = mount(&["-o", "lowerdir=/l", "--", "-weird"]);
        assert_eq!(cfg.mountpoint, abs("-weird"));
        let cfg = mount(&["-o", "lowerdir=/l", "--", "--help"]);
        assert_eq!(cfg.mountpoint, abs("--help"));
    }

    #[test]
    fn lone_dash_is_a_positional() {
        assert_eq!(mount(&["-o", "lowerdir=/l", "-"]).mountpoint, abs("-"));
    }

    #[test]
    fn d_flag_means_debug_and_foreground() {
        let cfg = mount(&["-d", "-o", "lowerdir=/l", "/m"]);
        assert!(cfg.debug && cfg.foreground);
        let cfg = mount(&["--debug", "-o", "lowerdir=/l", "/m"]);
        assert!(cfg.debug && cfg.foreground);
    }

    #[test]
    fn debug_option_means_debug_and_foreground() {
        let cfg = mount_with("debug");
        assert!(cfg.debug && cfg.foreground);
    }

    // --- option string syntax ----------------------------------------------

    #[test]
    fn quoted_context_keeps_commas() {
        let cfg = mount_with(r#"context="system_u:object_r:container_file_t:s0:c1,c2",ro"#);
        assert_eq!(
            cfg.ignored,
            vec!["context=system_u:object_r:container_file_t:s0:c1,c2".to_string()]
        );
        assert!(cfg.read_only);
    }

    #[test]
    fn escaped_comma_is_a_literal_comma() {
        let cfg = mount_with(r"upperdir=/a\,b,workdir=/w");
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/a,b")));
    }

    #[test]
    fn empty_items_are_ignored() {
        let cfg = mount(&["-o", ",lowerdir=/l,,ro,", "-o", "", "/m"]);
        assert!(cfg.read_only);
    }

    #[test]
    fn unterminated_quote_is_an_error() {
        assert_eq!(
            error_with(r#"context="abc"#),
            r#"unterminated double quote in "lowerdir=/l,context=\"abc""#
        );
    }

    #[test]
    fn later_options_override_earlier_ones() {
        let cfg = mount_with("upperdir=/u1,workdir=/w1,upperdir=/u2,workdir=/w2");
        assert_eq!(cfg.upperdir, Some(PathBuf::from("/u2")));
        assert_eq!(cfg.workdir, Some(PathBuf::from("/w2")));
    }

    // --- lowerdir -----------------------------------------------------------

    #[test]
    fn lowerdir_lists_top_layer_first() {
        let cfg = mount(&["-o", "lowerdir=/top:/mid:/bottom", "/m"]);
        assert_eq!(
            cfg.lowerdirs,
            vec![
                PathBuf::from("/top"),
                PathBuf::from("/mid"),
                PathBuf::from("/bottom")
            ]
        );
    }

    #[test]
    fn escaped_colon_stays_in_lowerdir() {
        let cfg = mount(&["-o", r"lowerdir=/a\:b:/c", "/m"]);
        assert_eq!(
            cfg.lowerdirs,
            vec![PathBuf::from("/a:b"), PathBuf::from("/c")]
        );
    }

    #[test]
    fn escaped_backslash_stays_in_lowerdir() {
        let cfg = mount(&["-o", r"lowerdir=/a\\:/b\\\:c", "/m"]);
        assert_eq!(
            cfg.lowerdirs,
            vec![PathBuf::from(r"/a\"), PathBuf::from(r"/b\:c")]
        );
    }

    #[test]
    fn later_lowerdir_replaces_earlier() {
        let cfg = mount(&["-o", "lowerdir=/a:/b", "-o", "lowerdir=/c", "/m"]);
        assert_eq!(cfg.lowerdirs, vec![PathBuf::from("/c")]);
    }

    #[test]
    fn lowerdir_plus_appends_one_layer_each_without_splitting() {
        let cfg = mount(&["-o", "lowerdir+=/top,lowerdir+=/x:y", "/m"]);
        assert_eq!(
            cfg.lowerdirs,
            vec![PathBuf::from("/top"), PathBuf::from("/x:y")]
        );
    }

    #[test]
    fn mixing_lowerdir_and_lowerdir_plus_is_an_error() {
        let msg = "lowerdir= and lowerdir+= cannot be mixed";
        assert_eq!(error(&["-o", "lowerdir=/a,lowerdir+=/b", "/m"]), msg);
        assert_eq!(error(&["-o", "lowerdir+=/a,lowerdir=/b", "/m"]), msg);
    }

    #[test]
    fn empty_layer_in_lowerdir_is_an_error() {
        let msg = r#"lowerdir= "/a::/b" contains an empty layer (data-only "::" layers are not supported by ovlfuse)"#;
        assert_eq!(error(&["-o", "lowerdir=/a::/b", "/m"]), msg);
        assert!(error(&["-o", "lowerdir=/a:", "/m"]).contains("empty layer"));
    }

    #[test]
    fn relative_paths_are_made_absolute() {
        let cfg = mount(&["-o", "lowerdir=l1:sub/l2,upperdir=u,workdir=./w", "mnt"]);
        assert_eq!(cfg.lowerdirs, vec![abs("l1"), abs("sub/l2")]);
        assert_eq!(cfg.upperdir, Some(abs("u")));
        assert_eq!(cfg.workdir, Some(abs("./w")));
        assert_eq!(cfg.mountpoint, abs("mnt"));
        assert!(cfg.mountpoint.is_absolute());
    }

    #[test]
    fn paths_are_not_checked_against_the_disk() {
        let cfg = mount(&["-o", "lowerdir=/does/not/exist", "/nor/does/this"]);
        assert_eq!(cfg.lowerdirs, vec![PathBuf::from("/does/not/exist")]);
    }

    // --- kernel overlay options ---------------------------------------------

    #[test]
    fn userxattr_selects_the_user_namespace() {
        assert_eq!(
            mount_with("userxattr").xattr_namespace,
            XattrNamespace::User
        );
        assert_eq!(XattrNamespace::User.prefix(), "user.overlay.");
        assert_eq!(XattrNamespace::Trusted.prefix(), "trusted.overlay.");
    }

    #[test]
    fn redirect_dir_accepts_its_four_values() {
        for (word, value) in [
            ("on", RedirectDir::On),
            ("off", RedirectDir::Off),
            ("follow", RedirectDir::Follow),
            ("nofollow", RedirectDir::NoFollow),
        ] {
            assert_eq!(
                mount_with(&format!("redirect_dir={word}")).redirect_dir,
                value
            );
        }
    }

    #[test]
    fn bad_redirect_dir_names_value_and_choices() {
        assert_eq!(
            error_with("redirect_dir=maybe"),
            r#"invalid value "maybe" for redirect_dir=: expected on|off|follow|nofollow"#
        );
    }

    #[test]
    fn harmless_kernel_options_are_accepted_without_effect() {
        let cfg = mount_with("index=off,xino=off,xino=auto,metacopy=off,nfs_export=off,uuid=null");
        assert_eq!(
            cfg.ignored,
            [
                "index=off",
                "xino=off",
                "xino=auto",
                "metacopy=off",
                "nfs_export=off",
                "uuid=null"
            ]
        );
    }

    #[test]
    fn unsupported_kernel_features_are_errors() {
        assert_eq!(
            error_with("index=on"),
            "index=on is not supported by ovlfuse (accepted: off)"
        );
        assert_eq!(
            error_with("metacopy=on"),
            "metacopy=on is not supported by ovlfuse (accepted: off)"
        );
        assert_eq!(
            error_with("nfs_export=on"),
            "nfs_export=on is not supported by ovlfuse (accepted: off)"
        );
        assert_eq!(
            error_with("xino=on"),
            "xino=on is not supported by ovlfuse (accepted: off|auto)"
        );
    }

    #[test]
    fn unknown_kernel_option_value_is_an_invalid_value() {
        assert_eq!(
            error_with("index=banana"),
            r#"invalid value "banana" for index=: expected off"#
        );
    }

    #[test]
    fn volatile_comes_in_two_spellings() {
        let cfg = mount_with("volatile");
        assert!(cfg.volatile && !cfg.syncs_to_disk());
        let cfg = mount_with("fsync=volatile");
        assert!(cfg.volatile && !cfg.syncs_to_disk());
    }

    // --- FUSE and mount options ---------------------------------------------

    #[test]
    fn fsname_and_subtype() {
        let cfg = mount_with("fsname=myfs,subtype=ovl");
        assert_eq!(cfg.fsname.as_deref(), Some("myfs"));
        assert_eq!(cfg.ignored, ["subtype=ovl"]);
    }

    #[test]
    fn rw_resets_ro() {
        assert!(mount_with("ro").read_only);
        assert!(!mount_with("ro,rw").read_only);
    }

    #[test]
    fn permission_options() {
        let cfg = mount_with("allow_other,allow_root");
        assert_eq!(cfg.allow_other, Some(true));
        assert!(cfg.allow_root);
        assert!(!mount_with("no_default_permissions").default_permissions);
        assert!(mount_with("no_default_permissions,default_permissions").default_permissions);
    }

    #[test]
    fn threads_takes_a_positive_count() {
        assert_eq!(mount_with("threads=4").threads, Some(4));
        assert_eq!(
            error_with("threads=abc"),
            r#"invalid value "abc" for threads=: expected a whole number >= 1"#
        );
        assert_eq!(
            error_with("threads=0"),
            r#"invalid value "0" for threads=: expected a whole number >= 1"#
        );
    }

    #[test]
    fn ms_flag_words_set_bits_and_positive_forms_clear_them() {
        let all = "nosuid,nodev,noexec,noatime,nodiratime,relatime,strictatime,sync,dirsync";
        let bits = libc::MS_NOSUID
            | libc::MS_NODEV
            | libc::MS_NOEXEC
            | libc::MS_NOATIME
            | libc::MS_NODIRATIME
            | libc::MS_RELATIME
            | libc::MS_STRICTATIME
            | libc::MS_SYNCHRONOUS
            | libc::MS_DIRSYNC;
        assert_eq!(mount_with(all).ms_flags, ms(bits));
        let cleared = mount_with(&format!(
            "{all},suid,dev,exec,atime,diratime,norelatime,nostrictatime,async"
        ));
        assert_eq!(cleared.ms_flags, ms(libc::MS_DIRSYNC));
    }

    #[test]
    fn compatibility_options_are_listed_as_written() {
        let cfg = mount_with(
            "auto_unmount,max_read=131072,fscontext=a,defcontext=b,rootcontext=c,\
             threaded=1,fast_ino=1,static_nlink,writeback=0,plugins=/p.so,\
             xattr_permissions=2,noxattrs=1,clone_fd,splice_read,no_splice_write,splice_move",
        );
        assert_eq!(
            cfg.ignored,
            [
                "auto_unmount",
                "max_read=131072",
                "fscontext=a",
                "defcontext=b",
                "rootcontext=c",
                "threaded=1",
                "fast_ino=1",
                "static_nlink",
                "writeback=0",
                "plugins=/p.so",
                "xattr_permissions=2",
                "noxattrs=1",
                "clone_fd",
                "splice_read",
                "no_splice_write",
                "splice_move"
            ]
        );
    }

    #[test]
    fn ignored_options_still_check_their_values() {
        assert_eq!(
            error_with("xattr_permissions=3"),
            r#"invalid value "3" for xattr_permissions=: expected 0|1|2"#
        );
        assert_eq!(
            error_with("fast_ino=yes"),
            r#"invalid value "yes" for fast_ino=: expected an integer"#
        );
    }

    #[test]
    fn noacl_and_timeout() {
        let cfg = mount_with("noacl,timeout=1.5");
        assert!(cfg.noacl);
        assert_eq!(cfg.timeout, Some(1.5));
        assert_eq!(
            error_with("timeout=soon"),
            r#"invalid value "soon" for timeout=: expected a number of seconds >= 0"#
        );
        assert_eq!(
            error_with("timeout=-1"),
            r#"invalid value "-1" for timeout=: expected a number of seconds >= 0"#
        );
        assert!(error_with("timeout=inf").starts_with("invalid value \"inf\""));
    }

    // --- fuse-overlayfs options ---------------------------------------------

    #[test]
    fn uidmapping_reads_concatenated_triples() {
        let cfg = mount_with("uidmapping=0:1000:1:1:100000:65536,gidmapping=0:1000:1");
        assert_eq!(
            cfg.uid_mappings,
            [
                IdMapping {
                    container: 0,
                    host: 1000,
                    size: 1
                },
                IdMapping {
                    container: 1,
                    host: 100000,
                    size: 65536
                }
            ]
        );
        assert_eq!(
            cfg.gid_mappings,
            [IdMapping {
                container: 0,
                host: 1000,
                size: 1
            }]
        );
    }

    #[test]
    fn uidmapping_with_wrong_count_is_an_error() {
        assert_eq!(
            error_with("uidmapping=0:1000"),
            r#"invalid uidmapping= "0:1000": expected CONTAINER:HOST:SIZE triples separated by ':'"#
        );
    }

    #[test]
    fn gidmapping_with_non_number_is_an_error() {
        assert_eq!(
            error_with("gidmapping=0:x:1"),
            r#"invalid gidmapping= "0:x:1": "x" is not a number from 0 to 4294967295"#
        );
        assert_eq!(
            error_with("gidmapping=0:1:4294967296"),
            r#"invalid gidmapping= "0:1:4294967296": "4294967296" is not a number from 0 to 4294967295"#
        );
    }

    #[test]
    fn mapping_with_zero_size_is_an_error() {
        assert_eq!(
            error_with("uidmapping=0:1000:0"),
            r#"invalid uidmapping= "0:1000:0": a range size must be at least 1"#
        );
    }

    #[test]
    fn squash_options() {
        let cfg = mount_with("squash_to_root,squash_to_uid=5,squash_to_gid=6");
        assert!(cfg.squash_to_root);
        assert_eq!((cfg.squash_to_uid, cfg.squash_to_gid), (Some(5), Some(6)));
        assert_eq!(
            error_with("squash_to_uid=-1"),
            r#"invalid value "-1" for squash_to_uid=: expected a number from 0 to 4294967295"#
        );
    }

    #[test]
    fn fsync_zero_and_one() {
        assert!(!mount_with("fsync=0").fsync);
        assert!(mount_with("fsync=0,fsync=1").fsync);
        assert_eq!(
            error_with("fsync=2"),
            r#"invalid value "2" for fsync=: expected 0|1|volatile"#
        );
    }

    // --- option errors ------------------------------------------------------

    #[test]
    fn unknown_option_is_named() {
        assert_eq!(error_with("frobnicate"), r#"unknown option "frobnicate""#);
        assert_eq!(error_with("frobnicate=3"), r#"unknown option "frobnicate""#);
    }

    #[test]
    fn value_option_without_value_is_an_error() {
        let msg = r#"option "upperdir" needs a value: upperdir=DIR"#;
        assert_eq!(error_with("upperdir"), msg);
        assert_eq!(error_with("upperdir="), msg);
        assert_eq!(error_with(r#"upperdir="""#), msg);
    }

    #[test]
    fn flag_option_given_a_value_is_an_error() {
        assert_eq!(
            error_with("userxattr=1"),
            r#"option "userxattr" takes no value, got "userxattr=1""#
        );
    }

    // --- validation after parsing -------------------------------------------

    #[test]
    fn missing_lowerdir_is_an_error() {
        assert_eq!(
            error(&["-o", "upperdir=/u,workdir=/w", "/m"]),
            "missing required option lowerdir="
        );
        assert_eq!(error(&["/m"]), "missing required option lowerdir=");
    }

    #[test]
    fn upperdir_without_workdir_is_an_error() {
        assert_eq!(
            error_with("upperdir=/u"),
            "upperdir= needs workdir= as well: both are needed for a writable overlay"
        );
    }

    #[test]
    fn workdir_without_upperdir_is_an_error() {
        assert_eq!(
            error_with("workdir=/w"),
            "workdir= needs upperdir= as well: both are needed for a writable overlay"
        );
    }

    #[test]
    fn missing_mountpoint_is_an_error() {
        assert_eq!(error(&["-o", "lowerdir=/l"]), "missing MOUNTPOINT");
        assert_eq!(error(&[]), "missing MOUNTPOINT");
    }

    #[test]
    fn empty_mountpoint_is_an_error() {
        assert_eq!(
            error(&["-o", "lowerdir=/l", ""]),
            "empty MOUNTPOINT argument"
        );
    }

    #[test]
    fn extra_positionals_are_listed() {
        assert_eq!(
            error(&["-o", "lowerdir=/l", "a", "b", "c"]),
            r#"too many arguments: unexpected "c""#
        );
        assert_eq!(
            error(&["a", "b", "c", "d"]),
            r#"too many arguments: unexpected "c", "d""#
        );
    }

    #[test]
    fn unknown_flag_is_named() {
        assert_eq!(
            error(&["-x", "-o", "lowerdir=/l", "/m"]),
            r#"unknown flag "-x""#
        );
        assert_eq!(error(&["--frob", "/m"]), r#"unknown flag "--frob""#);
    }

    #[test]
    fn o_at_the_end_without_value_is_an_error() {
        assert_eq!(
            error(&["/m", "-o"]),
            "-o needs an argument: a comma-separated option list"
        );
    }

    #[test]
    fn o_consumes_the_next_argument_even_if_it_looks_like_a_flag() {
        assert_eq!(error(&["/m", "-o", "-h"]), r#"unknown option "-h""#);
    }

    #[test]
    fn every_message_is_one_lowercase_line_without_trailing_period() {
        let cases: &[&[&str]] = &[
            &["-x"],
            &["/m"],
            &["-o", "lowerdir=/l"],
            &["-o", "lowerdir=/l,upperdir=/u", "/m"],
            &["-o", "lowerdir=/l,threads=x", "/m"],
            &["-o", "lowerdir=/l,index=on", "/m"],
            &["-o", "lowerdir=/l,\"", "/m"],
            &["a", "b", "c"],
            &["/m", "-o"],
        ];
        for case in cases {
            let msg = error(case);
            assert!(!msg.contains('\n'), "{msg}");
            assert!(!msg.ends_with('.'), "{msg}");
            assert!(!msg.starts_with(|c: char| c.is_uppercase()), "{msg}");
        }
    }

    #[test]
    fn non_utf8_paths_survive() {
        let raw = b"lowerdir=/l\xff".to_vec();
        let args = vec![
            OsString::from("-o"),
            OsString::from_vec(raw),
            OsString::from("/m"),
        ];
        let Ok(Command::Mount(cfg)) = parse_args(args) else {
            panic!("expected a mount")
        };
        assert_eq!(cfg.lowerdirs[0].as_os_str().as_bytes(), b"/l\xff");
    }

    // --- the table ----------------------------------------------------------

    #[test]
    fn option_names_are_unique() {
        for (i, a) in OPTIONS.iter().enumerate() {
            assert!(
                OPTIONS[i + 1..].iter().all(|b| b.name != a.name),
                "duplicate {}",
                a.name
            );
        }
    }

    fn sample_value(spec: &OptionSpec) -> Option<String> {
        let hint = spec.value?;
        Some(match spec.key {
            Key::Threads | Key::IgnoredInt | Key::SquashToUid | Key::SquashToGid => "1".into(),
            Key::Timeout => "0.5".into(),
            Key::UidMapping | Key::GidMapping => "0:1:1".into(),
            Key::RedirectDir | Key::KernelCompat { .. } | Key::Fsync | Key::IgnoredChoice => {
                hint.split('|').next().unwrap().into()
            }
            _ => "/x".into(),
        })
    }

    #[test]
    fn parser_accepts_every_option_in_the_table() {
        for spec in OPTIONS {
            let item = match sample_value(spec) {
                Some(v) => format!("{}={v}", spec.name),
                None => spec.name.to_string(),
            };
            let lower = if spec.key == Key::LowerDirAppend {
                "lowerdir+=/l"
            } else {
                "lowerdir=/l"
            };
            let pair = match spec.key {
                Key::UpperDir => ",workdir=/w",
                Key::WorkDir => ",upperdir=/u",
                _ => "",
            };
            let opts = format!("{lower},{item}{pair}");
            assert!(
                matches!(parse(&["-o", &opts, "/m"]), Ok(Command::Mount(_))),
                "{opts} was rejected: {:?}",
                parse(&["-o", &opts, "/m"])
            );
        }
    }

    #[test]
    fn help_lists_every_option_and_flag_and_the_three_styles() {
        let help = help_text();
        for spec in OPTIONS {
            let shown = match spec.value {
                Some(v) => format!("  {}={v} ", spec.name),
                None => format!("  {} ", spec.name),
            };
            assert!(help.contains(&shown), "help lacks {shown:?}");
        }
        for f in FLAGS {
            for name in [f.short, f.long].into_iter().flatten() {
                assert!(help.contains(name), "help lacks {name}");
            }
        }
        assert!(help.contains("ovlfuse demo"));
        assert!(help.contains("SOURCE MOUNTPOINT"));
        assert!(help.contains("lowerdir=DIR[:DIR...][,OPTION...] MOUNTPOINT"));
        assert_eq!(
            help.lines().filter(|l| l.contains(NO_EFFECT)).count(),
            OPTIONS
                .iter()
                .filter(|o| matches!(
                    o.key,
                    Key::Ignored | Key::IgnoredChoice | Key::IgnoredInt | Key::KernelCompat { .. }
                ))
                .count()
        );
    }

    #[test]
    fn usage_error_displays_just_the_message() {
        let e = UsageError("missing MOUNTPOINT".into());
        assert_eq!(e.to_string(), "missing MOUNTPOINT");
        let _: &dyn std::error::Error = &e;
    }

    #[test]
    fn escape_option_value_escapes_the_special_characters() {
        assert_eq!(
            escape_option_value(OsStr::new(r#"a:b,c\d"e"#)),
            OsString::from(r#"a\:b\,c\\d\"e"#)
        );
    }

    // --- properties ---------------------------------------------------------

    fn layer() -> impl Strategy<Value = String> {
        prop_oneof!["[a-z/:,\\\\\"=. ]{1,12}", "\\PC{1,8}",]
    }

    proptest! {
        #[test]
        fn escaped_lowerdir_round_trips(layers in prop::collection::vec(layer(), 1..5)) {
            let joined: Vec<String> = layers
                .iter()
                .map(|l| escape_option_value(OsStr::new(l)).into_string().unwrap())
                .collect();
            let opts = format!("upperdir=/u,lowerdir={},workdir=/w", joined.join(":"));
            let parsed = parse_args(vec![
                OsString::from("-o"),
                OsString::from(opts),
                OsString::from("/m"),
            ]);
            let expected: Vec<PathBuf> = layers.iter().map(|l| abs(l)).collect();
            match parsed {
                Ok(Command::Mount(cfg)) => prop_assert_eq!(cfg.lowerdirs, expected),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        #[test]
        fn parse_args_never_panics_on_arbitrary_strings(
            args in prop::collection::vec(any::<String>(), 0..6)
        ) {
            let _ = parse_args(args.into_iter().map(OsString::from));
        }

        #[test]
        fn parse_args_never_panics_on_option_like_strings(
            args in prop::collection::vec("(-o|-d|-f|--|demo|[-a-z=,:\"\\\\/+.0-9]{0,24})", 0..6)
        ) {
            let _ = parse_args(args.into_iter().map(OsString::from));
        }

        #[test]
        fn parse_args_never_panics_on_arbitrary_bytes(
            args in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..24), 0..6)
        ) {
            let _ = parse_args(args.into_iter().map(OsString::from_vec));
        }
    }

    // --- fuzzing: arbitrary command lines (bad input) ------------------------

    /// Cases per fuzz property: a quick run by default, many more with `OVLFUSE_FULL=1`;
    /// `OVLFUSE_FUZZ_CASES=N` sets the number outright.
    fn fuzz_config() -> ProptestConfig {
        let full = std::env::var_os("OVLFUSE_FULL").is_some();
        let cases = std::env::var("OVLFUSE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if full { 5_000 } else { 400 });
        ProptestConfig {
            cases,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    /// Bytes that matter to the grammar, mixed with anything at all (non-UTF-8 included).
    fn fuzz_byte() -> impl Strategy<Value = u8> {
        prop_oneof![
            3 => prop::sample::select(b",\"\\=:+/-. ".to_vec()),
            2 => prop::sample::select(b"abcdefghlorstuvwxyz0123".to_vec()),
            1 => any::<u8>(),
        ]
    }

    fn fuzz_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            30 => prop::collection::vec(fuzz_byte(), 0..24),
            1 => prop::collection::vec(fuzz_byte(), 4096..70_000),
        ]
    }

    /// One `-o` item: a real option name (with or without a value, empty values too),
    /// `lowerdir+=`, or noise.
    fn fuzz_item() -> impl Strategy<Value = Vec<u8>> {
        let names: Vec<&'static str> = OPTIONS.iter().map(|o| o.name).collect();
        prop_oneof![
            4 => (prop::sample::select(names.clone()), fuzz_value())
                .prop_map(|(n, v)| [n.as_bytes(), b"=", &v].concat()),
            2 => prop::sample::select(names).prop_map(|n| n.as_bytes().to_vec()),
            2 => fuzz_value().prop_map(|v| [&b"lowerdir+="[..], &v].concat()),
            1 => fuzz_value().prop_map(|v| [&b"lowerdir="[..], &v].concat()),
            2 => fuzz_value(),
        ]
    }

    fn fuzz_option_string() -> impl Strategy<Value = Vec<u8>> {
        (prop::collection::vec(fuzz_item(), 0..6), any::<bool>()).prop_map(|(items, quote)| {
            let joined = items.join(&b","[..]);
            if quote {
                [&b"\""[..], &joined, b"\""].concat()
            } else {
                joined
            }
        })
    }

    fn fuzz_arg() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            4 => Just(b"-o".to_vec()),
            4 => fuzz_option_string(),
            1 => fuzz_option_string().prop_map(|o| [&b"-o"[..], &o].concat()),
            1 => prop::sample::select(vec![
                "-f", "-d", "-s", "--", "-", "--debug", "demo", "status", "sync", "/m", "rel/m", "",
            ])
            .prop_map(|s| s.as_bytes().to_vec()),
            2 => prop::collection::vec(fuzz_byte(), 0..16),
        ]
    }

    /// The contents of every Rust-`Debug`-quoted string in `msg`, unescaped.
    fn debug_strings(msg: &str) -> Vec<String> {
        let mut found = Vec::new();
        let mut chars = msg.chars();
        while let Some(c) = chars.next() {
            if c != '"' {
                continue;
            }
            let mut s = String::new();
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => match chars.next() {
                        Some('n') => s.push('\n'),
                        Some('r') => s.push('\r'),
                        Some('t') => s.push('\t'),
                        Some('0') => s.push('\0'),
                        Some('u') => {
                            let hex: String =
                                chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                            if let Some(c) =
                                u32::from_str_radix(&hex, 16).ok().and_then(char::from_u32)
                            {
                                s.push(c);
                            }
                        }
                        Some(other) => s.push(other),
                        None => {}
                    },
                    c => s.push(c),
                }
            }
            found.push(s);
        }
        found
    }

    /// The printable ASCII of a text, without the quoting and escaping characters: error
    /// messages show values unescaped, unquoted and lossily decoded, so this is what a
    /// message and the command line it is about still have in common.
    fn comparable(bytes: &[u8]) -> String {
        bytes
            .iter()
            .filter(|b| b.is_ascii() && !matches!(b, b'\\' | b'"'))
            .map(|&b| b as char)
            .collect()
    }

    /// Whether the usage error `msg` names something the command line `args` contains (a
    /// quoted argument, value or name; an option name), or is one of the few messages about
    /// something missing, and that thing is indeed missing.
    fn names_something_from(msg: &str, args: &[OsString]) -> bool {
        let input: Vec<String> = args.iter().map(|a| comparable(a.as_bytes())).collect();
        let in_input = |s: &str| input.iter().any(|a| a.contains(s));
        if debug_strings(msg)
            .iter()
            .any(|q| in_input(&comparable(q.as_bytes())))
        {
            return true;
        }
        if OPTIONS
            .iter()
            .any(|o| msg.contains(&format!("{}=", o.name)) && in_input(o.name))
            && !msg.starts_with("missing required option")
        {
            return true;
        }
        let first = args.first().map(|a| a.to_string_lossy().into_owned());
        if first
            .filter(|f| ["demo", "status", "sync"].contains(&f.as_str()))
            .is_some_and(|first| msg.starts_with(&format!("{first} ")))
        {
            return true;
        }
        match msg {
            "missing MOUNTPOINT" => true,
            "missing required option lowerdir=" => true,
            m if m.starts_with("empty ") && m.ends_with(" argument") => {
                args.iter().any(|a| a.is_empty())
            }
            "lowerdir= and lowerdir+= cannot be mixed" => {
                in_input("lowerdir+=") && in_input("lowerdir=")
            }
            m if m.starts_with("-o needs an argument") => args.last().is_some_and(|a| a == "-o"),
            m if m.starts_with("upperdir= needs workdir=") => in_input("upperdir"),
            m if m.starts_with("workdir= needs upperdir=") => in_input("workdir"),
            _ => false,
        }
    }

    /// What a successful parse must always hold, whatever the input.
    fn mount_invariants(cfg: &MountConfig) -> Result<(), String> {
        if cfg.lowerdirs.is_empty() {
            return Err("no lower layer".into());
        }
        let all = cfg
            .lowerdirs
            .iter()
            .chain(&cfg.upperdir)
            .chain(&cfg.workdir)
            .chain(std::iter::once(&cfg.mountpoint));
        for p in all {
            if !p.is_absolute() {
                return Err(format!("{p:?} is not absolute"));
            }
        }
        if cfg.upperdir.is_some() != cfg.workdir.is_some() {
            return Err("upperdir= without workdir= or the reverse".into());
        }
        if cfg.threads == Some(0) {
            return Err("threads=0".into());
        }
        if cfg.debug && !cfg.foreground {
            return Err("debug without foreground".into());
        }
        Ok(())
    }

    #[test]
    fn the_message_check_has_teeth() {
        let args = os(&["-o", "lowerdir=/l,frob=1", "/m"]);
        assert!(names_something_from(r#"unknown option "frob""#, &args));
        assert!(!names_something_from(r#"unknown option "zzz""#, &args));
        assert!(!names_something_from("something went wrong", &args));
        assert!(!names_something_from("-o needs an argument: x", &args));
        assert!(!names_something_from("empty MOUNTPOINT argument", &args));
        assert!(names_something_from(
            r#"unknown flag "-\u{1}x""#,
            &[OsString::from("-\u{1}x")]
        ));
        assert_eq!(debug_strings(r#"a "b\"c" d "\\" e"#), vec!["b\"c", "\\"]);
        let mut cfg = mount(&["-o", "lowerdir=/l", "/m"]);
        assert!(mount_invariants(&cfg).is_ok());
        cfg.upperdir = Some(abs("/u"));
        assert!(mount_invariants(&cfg).is_err());
    }

    #[test]
    fn every_real_error_message_passes_the_message_check() {
        let cases: &[&[&str]] = &[
            &["-x"],
            &["/m"],
            &["-o", "lowerdir=/l"],
            &["-o", "lowerdir=/l,upperdir=/u", "/m"],
            &["-o", "lowerdir=/l,workdir=/w", "/m"],
            &["-o", "lowerdir=/l,threads=x", "/m"],
            &["-o", "lowerdir=/l,index=on", "/m"],
            &["-o", "lowerdir=/l,\"", "/m"],
            &["-o", "lowerdir=/l,lowerdir+=/k", "/m"],
            &["-o", "lowerdir=/l,uidmapping=1:2", "/m"],
            &["-o", "lowerdir=/l,ro=1", "/m"],
            &["-o", "lowerdir=/l,fsname=", "/m"],
            &["-o", "lowerdir=/l", ""],
            &["-o", "upperdir=/u,workdir=/w", "/m"],
            &["a", "b", "c"],
            &["/m", "-o"],
            &["demo", "x"],
            &["status"],
            &["sync", "-f", "/x"],
        ];
        for case in cases {
            let msg = error(case);
            assert!(names_something_from(&msg, &os(case)), "{case:?}: {msg}");
        }
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        /// Any command line parses into a mount that holds the invariants, or fails with
        /// a one-line message that names what it is about.
        #[test]
        fn any_command_line_gives_a_mount_or_a_message_naming_the_input(
            args in prop::collection::vec(fuzz_arg(), 0..8)
        ) {
            let args: Vec<OsString> = args.into_iter().map(OsString::from_vec).collect();
            match parse_args(args.clone()) {
                Ok(Command::Mount(cfg)) => {
                    if let Err(why) = mount_invariants(&cfg) {
                        prop_assert!(false, "{:?} gave a bad mount ({}): {:?}", args, why, cfg);
                    }
                }
                Ok(_) => {}
                Err(UsageError(msg)) => {
                    prop_assert!(!msg.is_empty() && !msg.contains('\n') && !msg.ends_with('.'),
                        "badly shaped message {:?}", msg);
                    prop_assert!(!msg.starts_with(|c: char| c.is_uppercase()), "{:?}", msg);
                    prop_assert!(names_something_from(&msg, &args),
                        "message {:?} names nothing from {:?}", msg, args);
                }
            }
        }

        /// Layer paths of arbitrary bytes, escaped, come back from `lowerdir=` unchanged.
        #[test]
        fn escaped_byte_paths_round_trip_through_lowerdir(
            layers in prop::collection::vec(prop::collection::vec(1u8..=255, 1..20), 1..6)
        ) {
            let joined: Vec<Vec<u8>> = layers
                .iter()
                .map(|l| escape_option_value(OsStr::from_bytes(l)).into_vec())
                .collect();
            let opts = [&b"lowerdir="[..], &joined.join(&b":"[..])].concat();
            let expected: Vec<PathBuf> = layers
                .iter()
                .map(|l| std::path::absolute(OsStr::from_bytes(l)).unwrap())
                .collect();
            match parse_args(vec!["-o".into(), OsString::from_vec(opts), "/m".into()]) {
                Ok(Command::Mount(cfg)) => prop_assert_eq!(cfg.lowerdirs, expected),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        /// `lowerdir+=` takes each escaped path whole (colons included), in order, from one
        /// `-o` or from several.
        #[test]
        fn escaped_byte_paths_round_trip_through_lowerdir_plus(
            layers in prop::collection::vec(prop::collection::vec(1u8..=255, 1..20), 1..6),
            one_o in any::<bool>(),
        ) {
            let items: Vec<Vec<u8>> = layers
                .iter()
                .map(|l| [&b"lowerdir+="[..], &escape_option_value(OsStr::from_bytes(l)).into_vec()].concat())
                .collect();
            let mut args: Vec<OsString> = Vec::new();
            if one_o {
                args.push("-o".into());
                args.push(OsString::from_vec(items.join(&b","[..])));
            } else {
                for item in items {
                    args.push("-o".into());
                    args.push(OsString::from_vec(item));
                }
            }
            args.push("/m".into());
            let expected: Vec<PathBuf> = layers
                .iter()
                .map(|l| std::path::absolute(OsStr::from_bytes(l)).unwrap())
                .collect();
            match parse_args(args) {
                Ok(Command::Mount(cfg)) => prop_assert_eq!(cfg.lowerdirs, expected),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }

        /// Splitting an option list over several `-o` means the same as one comma-separated
        /// `-o`, whatever the (escaped) values.
        #[test]
        fn repeated_o_means_the_same_as_one_joined_o(
            items in prop::collection::vec(
                (prop::sample::select(vec![
                    "lowerdir", "lowerdir+", "upperdir", "workdir", "fsname", "source",
                    "threads", "redirect_dir", "uidmapping", "context", "subtype", "ro", "rw",
                    "userxattr", "volatile",
                ]), prop::option::of("\\PC{0,12}")),
                0..8,
            )
        ) {
            let items: Vec<Vec<u8>> = items
                .iter()
                .map(|(name, value)| match value {
                    Some(v) => [name.as_bytes(), b"=", escape_option_value(OsStr::new(v)).as_bytes()].concat(),
                    None => name.as_bytes().to_vec(),
                })
                .collect();
            let joined = vec!["-o".into(), OsString::from_vec(items.join(&b","[..])), "/m".into()];
            let mut split: Vec<OsString> = Vec::new();
            for item in &items {
                split.push("-o".into());
                split.push(OsString::from_vec(item.clone()));
            }
            split.push("/m".into());
            prop_assert_eq!(parse_args(joined), parse_args(split));
        }

        /// A text value, escaped or double-quoted, comes back unchanged.
        #[test]
        fn fsname_round_trips_escaped_or_quoted(name in "\\PC{1,40}") {
            let escaped = format!("lowerdir=/l,fsname={}", escape_option_value(OsStr::new(&name)).to_string_lossy());
            prop_assert_eq!(mount(&["-o", &escaped, "/m"]).fsname, Some(name.clone()));
            if !name.contains(['"', '\\']) {
                let quoted = format!("lowerdir=/l,fsname=\"{name}\"");
                prop_assert_eq!(mount(&["-o", &quoted, "/m"]).fsname, Some(name));
            }
        }

        /// `uidmapping=` and `gidmapping=` read back the triples they were given.
        #[test]
        fn id_mappings_round_trip(
            triples in prop::collection::vec((any::<u32>(), any::<u32>(), 1u32..), 1..6)
        ) {
            let text: Vec<String> = triples.iter().map(|(c, h, s)| format!("{c}:{h}:{s}")).collect();
            let cfg = mount(&["-o", &format!("lowerdir=/l,uidmapping={},gidmapping={}", text.join(":"), text.join(":")), "/m"]);
            let expected: Vec<IdMapping> = triples
                .iter()
                .map(|&(container, host, size)| IdMapping { container, host, size })
                .collect();
            prop_assert_eq!(&cfg.uid_mappings, &expected);
            prop_assert_eq!(&cfg.gid_mappings, &expected);
        }

        /// Any non-empty mountpoint after `--` is taken as given (made absolute).
        #[test]
        fn any_mountpoint_after_double_dash_is_taken_as_given(
            mp in prop::collection::vec(1u8..=255, 1..64)
        ) {
            let args = vec![
                "-o".into(),
                "lowerdir=/l".into(),
                "--".into(),
                OsString::from_vec(mp.clone()),
            ];
            match parse_args(args) {
                Ok(Command::Mount(cfg)) => prop_assert_eq!(
                    cfg.mountpoint,
                    std::path::absolute(OsStr::from_bytes(&mp)).unwrap()
                ),
                other => prop_assert!(false, "unexpected {:?}", other),
            }
        }
    }
}
