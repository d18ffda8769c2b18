//! Power-cut simulation: the upper layer is on ext4 on a loop device (the fault rig, never
//! failing here); a seeded random workload runs through ovlfuse (creates, writes, appends,
//! truncates, chmods, renames, unlinks, mkdirs, copy-ups of lower files) with fsync, fsyncdir
//! and syncfs at known points; right after some of those syncs return, the loop device's
//! backing image is copied (what a power cut would leave: see `common/powercut.rs`), and the
//! copy is checked: `e2fsck -fy`, mounted, the kernel overlayfs mounted over it (same lower,
//! upper and work dir from the copy), and every name compared with a model of the workload.
//!
//! The model keeps, for each name, the bindings (which file, or none) it has had since the
//! last sync that covered the name, and for each file the contents (bytes and mode) it has
//! had since the last sync that covered its data.  After a cut a name must show one of the
//! allowed bindings, and a file one of the allowed contents, or, while writes after its last
//! sync are outstanding, a page-by-page mix of them (ext4 writes pages back independently).
//! So a name whose last change was synced must be exactly as synced: a file synced before the
//! cut intact, a renamed-and-synced name pointing to the right content, an unlinked-and-synced
//! name gone.  Findings:
//! - `lost`: the copy shows a state from before the last sync (rolled back, or missing);
//! - `never written`: content the file never had, e.g. a copied-up file that is empty or
//!   truncated under its final name (ovlfuse stages copy-ups in workdir/work, flushes them and
//!   only then renames them into place, so partial copy-ups must never be visible);
//! - `unexpected`: a name the workload never made.
//!
//! What ovlfuse promises, and so what the model counts as synced: fsync of a file makes its
//! data and attributes durable, and on the first fsync of a handle that created the file, its
//! name too; fsyncdir makes the names in that directory durable; syncfs (root's default
//! fuseblk mount forwards it) makes everything durable.  ext4's journal often makes more
//! durable than that; the model allows it (a name not synced may show its new or its old
//! binding).  To expose what ext4 did not write, "neighbour" fsyncs of a file outside the
//! union commit the journal at random moments, as another tenant of the filesystem would.
//!
//! Teeth: the same workload with the syncs left out (the model still counts them) loses data
//! in some cuts; with `-o fsync=0` (copy-ups not flushed) copied-up files show up under their
//! final names with their full size and zeros for data once the journal commits (the copy's
//! size is set by an ftruncate, which ext4 journals, while the data waits for delayed
//! allocation).  And the model asks nothing the reference does not give: with the kernel
//! overlayfs as the writer the same workload passes the same check.
//!
//! Environment: `OVLFUSE_FULL=1` makes 100 cuts (teeth and kernel writer: 30; by default 15,
//! 10 and 8); `OVLFUSE_POWERCUT_CUTS=N` sets the number of cuts of the main run;
//! `OVLFUSE_SEED=N` replays a run (the seed is printed); `OVLFUSE_POWERCUT_REMOUNT_EVERY=N`
//! also mounts ovlfuse over every Nth copy and compares its tree with the kernel's (default
//! 3, 0 = never).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use common::faultrig::FaultyExt4;
use common::powercut::{CutLab, with_rig_and_lab};
use common::*;

const PAGE: usize = 4096;

fn full() -> bool {
    std::env::var_os("OVLFUSE_FULL").is_some()
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().map(|s| {
        s.trim()
            .parse()
            .unwrap_or_else(|e| panic!("{name}={s:?}: {e}"))
    })
}

/// One seed per test process (the main run and its teeth replay the same workload).
fn seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("OVLFUSE_SEED") {
        Ok(s) => {
            let s = s.trim();
            match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            }
            .unwrap_or_else(|e| panic!("OVLFUSE_SEED={s:?}: {e}"))
        }
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    })
}

/// splitmix64
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        assert!(n > 0);
        (self.next() % n as u64) as usize
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.below(v.len())].clone()
    }
}

// ---------------------------------------------------------------------------
// the model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Content {
    File { data: Arc<Vec<u8>>, mode: u32 },
    Dir,
}

impl Content {
    fn show(&self) -> String {
        match self {
            Content::File { data, mode } => {
                format!(
                    "file {:04o} {} bytes #{:016x}",
                    mode,
                    data.len(),
                    hash_bytes(data)
                )
            }
            Content::Dir => "dir".into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Lower,
    CopyUp,
    Created,
}

/// `allowed[0]` is the state the last sync covering it made durable (or the first state),
/// `allowed[1..]` the states after it; `past` the states before `allowed[0]`.
#[derive(Debug, Clone)]
struct Hist<T> {
    past: Vec<T>,
    allowed: Vec<T>,
}

impl<T: Clone> Hist<T> {
    fn new(first: T) -> Self {
        Hist {
            past: Vec::new(),
            allowed: vec![first],
        }
    }
    fn push(&mut self, x: T) {
        self.allowed.push(x);
    }
    fn current(&self) -> &T {
        self.allowed.last().unwrap()
    }
    fn sync(&mut self) {
        let last = self.allowed.len() - 1;
        self.past.extend(self.allowed.drain(..last));
    }
    fn synced(&self) -> bool {
        self.allowed.len() == 1
    }
    fn all(&self) -> impl Iterator<Item = &T> {
        self.past.iter().chain(self.allowed.iter())
    }
}

struct Inode {
    origin: Origin,
    content: Hist<Content>,
}

#[derive(Default)]
struct Model {
    inodes: Vec<Inode>,
    /// relative path ("a/b") -> binding history; the root ("") is not in it
    names: BTreeMap<String, Hist<Option<usize>>>,
    /// files that have been renamed
    renamed: BTreeSet<usize>,
}

fn parent_of(p: &str) -> &str {
    p.rfind('/').map_or("", |i| &p[..i])
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

impl Model {
    fn new_inode(&mut self, origin: Origin, c: Content) -> usize {
        self.inodes.push(Inode {
            origin,
            content: Hist::new(c),
        });
        self.inodes.len() - 1
    }
    fn bind(&mut self, p: &str, x: Option<usize>) {
        self.names
            .entry(p.to_string())
            .or_insert_with(|| Hist::new(None))
            .push(x);
    }
    fn at(&self, p: &str) -> Option<usize> {
        self.names.get(p).and_then(|h| *h.current())
    }
    fn content(&self, id: usize) -> &Content {
        self.inodes[id].content.current()
    }
    fn file(&self, id: usize) -> (Arc<Vec<u8>>, u32) {
        match self.content(id) {
            Content::File { data, mode } => (data.clone(), *mode),
            Content::Dir => panic!("inode {id} is a directory"),
        }
    }
    fn set_file(&mut self, id: usize, data: Vec<u8>, mode: u32) {
        self.inodes[id].content.push(Content::File {
            data: Arc::new(data),
            mode,
        });
    }
    /// A copy-up of the lower file at `p` (what ovlfuse does before changing it): a new
    /// upper file with the lower data (none when `with_data` is false), bound to `p`.
    fn copy_up(&mut self, p: &str, with_data: bool) -> usize {
        let lower = self.at(p).expect("copy-up of a missing name");
        let (data, mode) = self.file(lower);
        let data = if with_data {
            data
        } else {
            Arc::new(Vec::new())
        };
        let id = self.new_inode(Origin::CopyUp, Content::File { data, mode });
        self.bind(p, Some(id));
        id
    }
    /// The inode a change to `p` goes to (after a copy-up if `p` is a lower file).
    fn writable(&mut self, p: &str, with_data: bool) -> usize {
        let id = self.at(p).expect("change of a missing name");
        if self.inodes[id].origin == Origin::Lower {
            self.copy_up(p, with_data)
        } else {
            id
        }
    }
    fn live(&self, want_dir: bool) -> Vec<String> {
        self.names
            .iter()
            .filter(|(_, h)| {
                h.current()
                    .is_some_and(|id| matches!(self.content(id), Content::Dir) == want_dir)
            })
            .map(|(p, _)| p.clone())
            .collect()
    }
    fn sync_data(&mut self, id: usize) {
        self.inodes[id].content.sync();
    }
    fn sync_name(&mut self, p: &str) {
        if let Some(h) = self.names.get_mut(p) {
            h.sync();
        }
    }
    fn sync_dir(&mut self, d: &str) {
        for (p, h) in self.names.iter_mut() {
            if parent_of(p) == d {
                h.sync();
            }
        }
    }
    fn sync_all(&mut self) {
        for h in self.names.values_mut() {
            h.sync();
        }
        for i in &mut self.inodes {
            i.content.sync();
        }
    }
}

// ---------------------------------------------------------------------------
// checking a cut against the model
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// a state from before the last sync covering it (rolled back, or missing)
    Lost,
    /// content the file never had (a partial copy-up, ...)
    NeverWritten,
    /// a name the workload never made
    Unexpected,
    /// ovlfuse mounted over the copy shows another tree than the kernel overlay
    RemountDiffers,
    /// e2fsck could not repair the copy (exit >= 4)
    Fsck,
}

#[derive(Debug, Clone)]
struct Finding {
    kind: Kind,
    path: String,
    detail: String,
    /// the name's file was a copy-up at some point of its allowed history
    copy_up: bool,
}

#[derive(Debug, Default)]
struct CutReport {
    findings: Vec<Finding>,
    /// names whose binding and content were all synced, checked exactly
    synced_checked: usize,
    /// of those, files made by the workload (created or copied up), not lower files
    synced_files: usize,
    /// of those, names whose file was renamed there
    synced_renamed: usize,
    /// synced names that had a file and must be gone now (unlinked, or renamed away)
    synced_gone: usize,
    /// files with writes outstanding that showed a page-by-page mix of their states
    torn: usize,
}

#[derive(Debug)]
enum Seen {
    Absent,
    Dir,
    File(Vec<u8>, u32),
    Other(String),
}

fn observe(p: &Path) -> Seen {
    match fs::symlink_metadata(p) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Seen::Absent,
        Err(e) => Seen::Other(format!("lstat: {e}")),
        Ok(m) if m.is_dir() => Seen::Dir,
        Ok(m) if m.is_file() => match fs::read(p) {
            Ok(d) => Seen::File(d, m.permissions().mode() & 0o7777),
            Err(e) => Seen::Other(format!("read: {e}")),
        },
        Ok(m) => Seen::Other(format!("type {:o}", m.permissions().mode() & libc::S_IFMT)),
    }
}

/// `data` (`mode`) is a page-by-page mix of `states` (each page equal to that page of one
/// state, a state shorter than the page reading as zeros past its end), with the mode of one
/// of them and the length of one of them or a page boundary between two of them.
fn torn_mix<'a>(data: &[u8], mode: u32, states: impl Iterator<Item = &'a Content>) -> bool {
    let files: Vec<(&[u8], u32)> = states
        .filter_map(|c| match c {
            Content::File { data, mode } => Some((data.as_slice(), *mode)),
            Content::Dir => None,
        })
        .collect();
    // ext4 moves the on-disk size forward page (folio) by page as it writes an extending
    // write back, so a page boundary between two of the lengths is one too.
    let lo = files.iter().map(|(d, _)| d.len()).min().unwrap_or(0);
    let hi = files.iter().map(|(d, _)| d.len()).max().unwrap_or(0);
    let len_ok = files.iter().any(|(d, _)| d.len() == data.len())
        || (data.len().is_multiple_of(PAGE) && data.len() > lo && data.len() < hi);
    if !len_ok || !files.iter().any(|(_, m)| *m == mode) {
        return false;
    }
    data.chunks(PAGE).enumerate().all(|(k, page)| {
        let off = k * PAGE;
        files.iter().any(|(d, _)| {
            let have = d.get(off..).unwrap_or(&[]);
            let n = have.len().min(page.len());
            page[..n] == have[..n] && page[n..].iter().all(|b| *b == 0)
        })
    })
}

fn is_content(c: &Content, seen: &Seen) -> bool {
    match (c, seen) {
        (Content::Dir, Seen::Dir) => true,
        (Content::File { data, mode }, Seen::File(d, m)) => mode == m && data.as_slice() == d,
        _ => false,
    }
}

fn show_seen(s: &Seen) -> String {
    match s {
        Seen::Absent => "absent".into(),
        Seen::Dir => "dir".into(),
        Seen::File(d, m) => format!(
            "file {:04o} {} bytes #{:016x}{}",
            m,
            d.len(),
            hash_bytes(d),
            if !d.is_empty() && d.iter().all(|b| *b == 0) {
                " (all zeros)"
            } else {
                ""
            }
        ),
        Seen::Other(e) => e.clone(),
    }
}

fn check_cut(model: &Model, root: &Path) -> CutReport {
    let mut r = CutReport::default();
    // parents before children
    let mut names: Vec<&String> = model.names.keys().collect();
    names.sort_by_key(|p| (p.matches('/').count(), p.to_string()));
    let mut gone_dirs: BTreeSet<String> = BTreeSet::new();
    for p in names {
        let parent = parent_of(p);
        if !parent.is_empty() && gone_dirs.contains(parent) {
            // its directory is absent (judged on its own): so is it
            gone_dirs.insert(p.clone());
            continue;
        }
        let h = &model.names[p];
        let seen = observe(&root.join(p));
        if !matches!(seen, Seen::Dir) {
            gone_dirs.insert(p.clone());
        }
        let cands: Vec<usize> = h.allowed.iter().flatten().copied().collect();
        let copy_up = cands
            .iter()
            .any(|id| model.inodes[*id].origin == Origin::CopyUp);
        let synced = h.synced() && cands.iter().all(|id| model.inodes[*id].content.synced());
        if synced {
            r.synced_checked += 1;
            if cands
                .iter()
                .any(|id| model.inodes[*id].origin != Origin::Lower)
            {
                r.synced_files += 1;
            }
            if cands.iter().any(|id| model.renamed.contains(id)) {
                r.synced_renamed += 1;
            }
            if cands.is_empty() && h.past.iter().any(Option::is_some) {
                r.synced_gone += 1;
            }
        }
        let exact = match &seen {
            Seen::Absent => h.allowed.contains(&None),
            _ => cands.iter().any(|id| {
                model.inodes[*id]
                    .content
                    .allowed
                    .iter()
                    .any(|c| is_content(c, &seen))
            }),
        };
        if exact {
            continue;
        }
        if let Seen::File(d, m) = &seen
            && cands.iter().any(|id| {
                let c = &model.inodes[*id].content;
                !c.synced() && torn_mix(d, *m, c.allowed.iter())
            })
        {
            r.torn += 1;
            continue;
        }
        // Not allowed: a state from before the last sync (lost), or one never written.
        let all: Vec<usize> = h.all().flatten().copied().collect();
        let earlier = match &seen {
            Seen::Absent => true,
            Seen::File(d, m) => all.iter().any(|id| {
                let c = &model.inodes[*id].content;
                c.all().any(|x| is_content(x, &seen)) || torn_mix(d, *m, c.all())
            }),
            Seen::Dir => all
                .iter()
                .any(|id| matches!(model.content(*id), Content::Dir)),
            Seen::Other(_) => false,
        };
        let expected: Vec<String> = h
            .allowed
            .iter()
            .map(|b| match b {
                None => "absent".to_string(),
                Some(id) => {
                    let states: Vec<String> = model.inodes[*id]
                        .content
                        .allowed
                        .iter()
                        .map(Content::show)
                        .collect();
                    format!(
                        "{:?} inode {id}: {}",
                        model.inodes[*id].origin,
                        states.join(" | ")
                    )
                }
            })
            .collect();
        r.findings.push(Finding {
            kind: if earlier {
                Kind::Lost
            } else {
                Kind::NeverWritten
            },
            path: p.clone(),
            detail: format!(
                "shows {}; allowed: {}",
                show_seen(&seen),
                expected.join(" / ")
            ),
            copy_up,
        });
    }
    // names nobody made
    let mut stack = vec![String::new()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = fs::read_dir(root.join(&d)) else {
            continue;
        };
        for e in rd.flatten() {
            let p = join(&d, &e.file_name().to_string_lossy());
            if !model.names.contains_key(&p) {
                r.findings.push(Finding {
                    kind: Kind::Unexpected,
                    path: p.clone(),
                    detail: format!("shows {}", show_seen(&observe(&e.path()))),
                    copy_up: false,
                });
            } else if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(p);
            }
        }
    }
    r
}

// ---------------------------------------------------------------------------
// the workload
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SyncKind {
    FsyncCreated,
    Fsync,
    Fsyncdir,
    Syncfs,
}

#[derive(Debug, Default)]
struct Stats {
    ops: BTreeMap<&'static str, usize>,
    syncs: BTreeMap<String, usize>,
    cuts_after: BTreeMap<String, usize>,
    copy_ups: usize,
    cut_attempts: u32,
    cut_bytes: u64,
    copy_time: Duration,
    check_time: Duration,
    fsck: BTreeMap<String, usize>,
    fsck_fixes: BTreeSet<String>,
    work_leftovers: usize,
    remounts: usize,
}

struct RunOpts {
    /// perform the syncs (false: the teeth run; the model still counts them)
    syncs: bool,
    /// extra ovlfuse mount options
    mount_opts: &'static str,
    /// the kernel overlayfs is the writer instead of ovlfuse
    kernel: bool,
    cuts: usize,
    lower_files: usize,
    remount_every: usize,
    label: &'static str,
}

struct Run<'a> {
    rig: &'a FaultyExt4,
    lab: &'a CutLab,
    opts: &'a RunOpts,
    union: PathBuf,
    lowers: Vec<PathBuf>,
    model: Model,
    rng: Rng,
    next_name: usize,
    neighbour: usize,
    stats: Stats,
    reports: Vec<CutReport>,
    started: Instant,
}

/// A lower layer of `n` files in a few directories, sizes mostly below a few pages, some of
/// several MiB (copy-ups of more than one chunk); entered in the model as lower files.
fn build_lower(lower: &Path, n: usize, rng: &mut Rng, model: &mut Model) {
    let dirs = ["", "ld0", "ld1", "ld1/deep"];
    for d in &dirs[1..] {
        fs::create_dir(lower.join(d)).unwrap();
        let id = model.new_inode(Origin::Lower, Content::Dir);
        model.names.insert(d.to_string(), Hist::new(Some(id)));
    }
    for i in 0..n {
        let len = match rng.below(20) {
            0 => rng.range(1 << 20, 3 << 20),
            1..=3 => 0,
            4..=9 => rng.range(1, PAGE),
            _ => rng.range(PAGE, 300 << 10),
        };
        let data = noise(len, rng.next());
        let mode = rng.pick(&[0o644, 0o600, 0o755, 0o640]);
        let p = join(rng.pick(&dirs), &format!("l{i}"));
        let path = lower.join(&p);
        fs::write(&path, &data).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
        let id = model.new_inode(
            Origin::Lower,
            Content::File {
                data: Arc::new(data),
                mode,
            },
        );
        model.names.insert(p, Hist::new(Some(id)));
    }
}

fn ctx<T>(r: io::Result<T>, what: impl FnOnce() -> String) -> T {
    r.unwrap_or_else(|e| panic!("{}: {e}", what()))
}

impl Run<'_> {
    fn u(&self, p: &str) -> PathBuf {
        self.union.join(p)
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next_name += 1;
        format!("{prefix}{}", self.next_name)
    }

    fn count(&mut self, op: &'static str) {
        *self.stats.ops.entry(op).or_default() += 1;
    }

    fn pick_file(&mut self, lower_only: bool) -> Option<String> {
        let v: Vec<String> = self
            .model
            .live(false)
            .into_iter()
            .filter(|p| {
                !lower_only
                    || self
                        .model
                        .at(p)
                        .is_some_and(|id| self.model.inodes[id].origin == Origin::Lower)
            })
            .collect();
        (!v.is_empty()).then(|| self.rng.pick(&v))
    }

    fn pick_dir(&mut self) -> String {
        let mut v = self.model.live(true);
        v.push(String::new());
        self.rng.pick(&v)
    }

    fn note_copy_up(&mut self, p: &str) {
        let before = self.model.at(p);
        if before.is_some_and(|id| self.model.inodes[id].origin == Origin::Lower) {
            self.stats.copy_ups += 1;
        }
    }

    /// A sync point: the sync has just returned (or, in the teeth run, would have). Cuts
    /// the power here with probability 40 %.
    fn synced(&mut self, kind: SyncKind) {
        *self.stats.syncs.entry(format!("{kind:?}")).or_default() += 1;
        if self.rng.chance(40) && self.reports.len() < self.opts.cuts {
            *self
                .stats
                .cuts_after
                .entry(format!("{kind:?}"))
                .or_default() += 1;
            self.cut_and_check();
        }
    }

    fn step(&mut self) {
        let files = self.model.live(false).len();
        let roll = self.rng.below(100);
        // keep the tree between ~30 and ~120 files
        let roll = if files > 120 && roll < 20 {
            60
        } else if files < 30 && (60..70).contains(&roll) {
            0
        } else {
            roll
        };
        match roll {
            0..=14 => self.create(),
            15..=26 => self.append(),
            27..=32 => self.overwrite(),
            33..=36 => self.open_trunc(),
            37..=40 => self.truncate(),
            41..=45 => self.chmod(),
            46..=55 => self.rename(),
            56..=59 => self.mkdir(),
            60..=69 => self.unlink(),
            70..=79 => self.fsyncdir(),
            80..=86 => self.fsync_existing(),
            87..=92 => self.syncfs(),
            _ => self.neighbour_commit(),
        }
    }

    fn chunk(&mut self, max: usize) -> Vec<u8> {
        let len = match self.rng.below(4) {
            0 => self.rng.range(1, 64),
            1 => self.rng.range(1, PAGE),
            _ => self.rng.range(1, max),
        };
        noise(len, self.rng.next())
    }

    fn create(&mut self) {
        self.count("create");
        let dir = self.pick_dir();
        let name = self.fresh("c");
        let p = join(&dir, &name);
        let mut f = ctx(
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .open(self.u(&p)),
            || format!("create {p}"),
        );
        let mode = ctx(f.metadata(), || format!("fstat {p}"))
            .permissions()
            .mode()
            & 0o7777;
        let id = self.model.new_inode(
            Origin::Created,
            Content::File {
                data: Arc::new(Vec::new()),
                mode,
            },
        );
        self.model.bind(&p, Some(id));
        let mut data = Vec::new();
        for _ in 0..self.rng.range(1, 3) {
            let c = self.chunk(40 << 10);
            ctx(f.write_all(&c), || format!("write {p}"));
            data.extend_from_slice(&c);
            self.model.set_file(id, data.clone(), mode);
        }
        if self.rng.chance(50) {
            if self.opts.syncs {
                ctx(f.sync_all(), || format!("fsync {p} (created)"));
            }
            self.model.sync_data(id);
            self.model.sync_name(&p);
            self.synced(SyncKind::FsyncCreated);
        }
    }

    /// Fsyncs `f` (the handle that wrote `id`) with probability 35 %: a sync point.
    fn maybe_fsync(&mut self, f: &File, id: usize, p: &str) {
        if self.rng.chance(35) {
            if self.opts.syncs {
                ctx(f.sync_all(), || format!("fsync {p}"));
            }
            self.model.sync_data(id);
            self.synced(SyncKind::Fsync);
        }
    }

    fn append(&mut self) {
        // copy-ups half of the time
        let lower = self.rng.chance(50);
        let Some(p) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        self.count("append");
        self.note_copy_up(&p);
        let f = ctx(OpenOptions::new().append(true).open(self.u(&p)), || {
            format!("open {p} O_APPEND")
        });
        let id = self.model.writable(&p, true);
        let (old, mode) = self.model.file(id);
        let c = self.chunk(12 << 10);
        ctx((&f).write_all(&c), || format!("append to {p}"));
        let mut data = old.to_vec();
        data.extend_from_slice(&c);
        self.model.set_file(id, data, mode);
        self.maybe_fsync(&f, id, &p);
    }

    fn overwrite(&mut self) {
        let lower = self.rng.chance(50);
        let Some(p) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        self.count("overwrite");
        self.note_copy_up(&p);
        let f = ctx(OpenOptions::new().write(true).open(self.u(&p)), || {
            format!("open {p} O_WRONLY")
        });
        let id = self.model.writable(&p, true);
        let (old, mode) = self.model.file(id);
        let off = self.rng.range(0, old.len());
        let c = self.chunk(10 << 10);
        ctx(f.write_all_at(&c, off as u64), || format!("pwrite {p}"));
        let mut data = old.to_vec();
        if data.len() < off + c.len() {
            data.resize(off + c.len(), 0);
        }
        data[off..off + c.len()].copy_from_slice(&c);
        self.model.set_file(id, data, mode);
        self.maybe_fsync(&f, id, &p);
    }

    fn open_trunc(&mut self) {
        let lower = self.rng.chance(50);
        let Some(p) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        self.count("open O_TRUNC");
        self.note_copy_up(&p);
        let mut f = ctx(
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(self.u(&p)),
            || format!("open {p} O_TRUNC"),
        );
        let id = self.model.writable(&p, false);
        let (_, mode) = self.model.file(id);
        self.model.set_file(id, Vec::new(), mode);
        let c = self.chunk(24 << 10);
        ctx(f.write_all(&c), || format!("write {p}"));
        self.model.set_file(id, c, mode);
        self.maybe_fsync(&f, id, &p);
    }

    fn truncate(&mut self) {
        let lower = self.rng.chance(50);
        let Some(p) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        self.count("truncate");
        self.note_copy_up(&p);
        let id = self.model.at(&p).unwrap();
        let (old, _) = self.model.file(id);
        // never a page boundary (but 0): a copy cut short at a page would not pass for it
        let mut len = self.rng.range(0, old.len() + 3 * PAGE / 2);
        if len.is_multiple_of(PAGE) && len > 0 {
            len -= 1;
        }
        let c = cstr(self.u(&p));
        let r = unsafe { libc::truncate(c.as_ptr(), len as libc::off_t) };
        ctx(
            if r == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            },
            || format!("truncate {p} {len}"),
        );
        let id = self.model.writable(&p, true);
        let (old, mode) = self.model.file(id);
        let mut data = old.to_vec();
        data.resize(len, 0);
        self.model.set_file(id, data, mode);
    }

    fn chmod(&mut self) {
        let lower = self.rng.chance(70);
        let Some(p) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        self.count("chmod");
        self.note_copy_up(&p);
        let mode = self
            .rng
            .pick(&[0o600, 0o640, 0o644, 0o664, 0o700, 0o755, 0o444]);
        ctx(
            fs::set_permissions(self.u(&p), fs::Permissions::from_mode(mode)),
            || format!("chmod {p} {mode:o}"),
        );
        let id = self.model.writable(&p, true);
        let (data, _) = self.model.file(id);
        self.model.set_file(id, data.to_vec(), mode);
    }

    fn rename(&mut self) {
        let lower = self.rng.chance(40);
        let Some(a) = self.pick_file(lower).or_else(|| self.pick_file(false)) else {
            return self.create();
        };
        let b = if self.rng.chance(40) {
            match self.pick_file(false) {
                Some(b) if b != a => b,
                _ => return,
            }
        } else {
            let d = self.pick_dir();
            let n = self.fresh("r");
            join(&d, &n)
        };
        self.count("rename");
        self.note_copy_up(&a);
        ctx(fs::rename(self.u(&a), self.u(&b)), || {
            format!("rename {a} {b}")
        });
        let id = self.model.writable(&a, true);
        self.model.renamed.insert(id);
        self.model.bind(&b, Some(id));
        self.model.bind(&a, None);
    }

    fn mkdir(&mut self) {
        let d = self.pick_dir();
        if d.matches('/').count() >= 2 {
            return;
        }
        self.count("mkdir");
        let n = self.fresh("d");
        let p = join(&d, &n);
        ctx(fs::create_dir(self.u(&p)), || format!("mkdir {p}"));
        let id = self.model.new_inode(Origin::Created, Content::Dir);
        self.model.bind(&p, Some(id));
    }

    fn unlink(&mut self) {
        let Some(p) = self.pick_file(false) else {
            return;
        };
        self.count("unlink");
        ctx(fs::remove_file(self.u(&p)), || format!("unlink {p}"));
        self.model.bind(&p, None);
    }

    fn fsyncdir(&mut self) {
        let d = self.pick_dir();
        self.count("fsyncdir");
        if self.opts.syncs {
            let f = ctx(File::open(self.u(&d)), || format!("open dir {d:?}"));
            ctx(f.sync_all(), || format!("fsyncdir {d:?}"));
        }
        self.model.sync_dir(&d);
        self.synced(SyncKind::Fsyncdir);
    }

    fn fsync_existing(&mut self) {
        let v: Vec<String> = self
            .model
            .live(false)
            .into_iter()
            .filter(|p| {
                self.model
                    .at(p)
                    .is_some_and(|id| self.model.inodes[id].origin != Origin::Lower)
            })
            .collect();
        if v.is_empty() {
            return self.fsyncdir();
        }
        let p = self.rng.pick(&v);
        self.count("fsync");
        if self.opts.syncs {
            let f = ctx(File::open(self.u(&p)), || format!("open {p}"));
            ctx(f.sync_all(), || format!("fsync {p}"));
        }
        let id = self.model.at(&p).unwrap();
        self.model.sync_data(id);
        self.synced(SyncKind::Fsync);
    }

    fn syncfs(&mut self) {
        let mut v = self.model.live(false);
        v.extend(self.model.live(true));
        v.push(String::new());
        let p = self.rng.pick(&v);
        self.count("syncfs");
        if self.opts.syncs {
            let f = ctx(File::open(self.u(&p)), || format!("open {p:?}"));
            let r = unsafe { libc::syncfs(f.as_raw_fd()) };
            assert_eq!(r, 0, "syncfs through {p:?}: {}", io::Error::last_os_error());
        }
        self.model.sync_all();
        self.synced(SyncKind::Syncfs);
    }

    /// Another tenant of the upper filesystem fsyncs a file of its own: ext4 commits its
    /// journal, with whatever metadata the union changed so far, but none of its data that
    /// nobody asked to write.
    fn neighbour_commit(&mut self) {
        self.count("neighbour fsync");
        self.neighbour += 1;
        let p = self.rig.p(&format!("neighbour/n{}", self.neighbour % 8));
        let data = noise(PAGE, self.rng.next());
        ctx(fs::write(&p, &data), || format!("write {}", p.display()));
        let f = ctx(File::open(&p), || format!("open {}", p.display()));
        ctx(f.sync_all(), || format!("fsync {}", p.display()));
    }

    fn cut_and_check(&mut self) {
        let n = self.reports.len();
        let cut = self.lab.cut(self.rig);
        self.stats.cut_attempts += cut.attempts;
        self.stats.cut_bytes += cut.bytes;
        self.stats.copy_time += cut.took;
        let t0 = Instant::now();
        let opened = self.lab.open(&cut);
        let mut report = CutReport::default();
        let fsck = &opened.fsck;
        let fsck_code = fsck.code;
        *self
            .stats
            .fsck
            .entry(format!("exit {:?}", fsck.code))
            .or_default() += 1;
        // "Free blocks count wrong (57268, counted=56374)." -> "(N, counted=N)"
        self.stats.fsck_fixes.extend(fsck.fixes.iter().map(|l| {
            let mut out = String::new();
            let mut digits = false;
            for ch in l.chars() {
                if !ch.is_ascii_digit() {
                    out.push(ch);
                } else if !digits {
                    out.push('N');
                }
                digits = ch.is_ascii_digit();
            }
            out
        }));
        if !fsck.ok() {
            report.findings.push(Finding {
                kind: Kind::Fsck,
                path: String::new(),
                detail: format!("e2fsck -fy exit {:?}:\n{}", fsck.code, fsck.output),
                copy_up: false,
            });
        }
        // interrupted copy-ups staged in the work dir are legal (the next mount removes them)
        self.stats.work_leftovers += fs::read_dir(opened.p("work/work"))
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("#ovlfuse-cu-"))
                    .count()
            })
            .unwrap_or(0);
        // The kernel needs a writable upper and work dir: the copy is mounted read-write, as
        // the next boot would mount it, so the kernel's own checks of the work dir apply too.
        let layers = Layers {
            lowers: self.lowers.clone(),
            upper: Some(opened.p("upper")),
            work: Some(opened.p("work")),
        };
        let kernel = mount_kernel_overlay(&layers);
        let r = check_cut(&self.model, kernel.path());
        report.findings.extend(r.findings);
        report.synced_checked = r.synced_checked;
        report.synced_files = r.synced_files;
        report.synced_renamed = r.synced_renamed;
        report.synced_gone = r.synced_gone;
        report.torn = r.torn;
        let every = self.opts.remount_every;
        if every > 0 && n % every == every - 1 {
            // what ovlfuse itself shows after the reboot
            self.stats.remounts += 1;
            let ks = snapshot(kernel.path());
            drop(kernel);
            let fuse = mount_ovlfuse(&layers, "");
            let root = fuse.path().to_path_buf();
            let os = with_timeout(120, move || snapshot(&root));
            drop(fuse);
            for d in diff_snapshots_labeled(&ks, &os, "kernel", "ovlfuse") {
                report.findings.push(Finding {
                    kind: Kind::RemountDiffers,
                    path: String::new(),
                    detail: d,
                    copy_up: false,
                });
            }
        } else {
            drop(kernel);
        }
        drop(opened);
        self.stats.check_time += t0.elapsed();
        eprintln!(
            "[{}] cut {n} at {:.1} s: {} synced names checked ({} files of the workload, {} \
             renamed, {} gone), {} torn, {} findings; e2fsck exit {:?}",
            self.opts.label,
            self.started.elapsed().as_secs_f64(),
            report.synced_checked,
            report.synced_files,
            report.synced_renamed,
            report.synced_gone,
            report.torn,
            report.findings.len(),
            fsck_code,
        );
        self.reports.push(report);
    }
}

struct Outcome {
    reports: Vec<CutReport>,
    stats: Stats,
    seed: u64,
    elapsed: Duration,
}

impl Outcome {
    fn findings(&self, kind: Kind) -> Vec<(usize, &Finding)> {
        self.reports
            .iter()
            .enumerate()
            .flat_map(|(i, r)| r.findings.iter().map(move |f| (i, f)))
            .filter(|(_, f)| f.kind == kind)
            .collect()
    }
    fn cuts_with(&self, kind: Kind) -> usize {
        self.reports
            .iter()
            .filter(|r| r.findings.iter().any(|f| f.kind == kind))
            .count()
    }
    fn show_findings(&self, max: usize) -> String {
        let mut s = String::new();
        let mut k = 0;
        for (i, r) in self.reports.iter().enumerate() {
            for f in &r.findings {
                k += 1;
                if k <= max {
                    let _ = writeln!(
                        s,
                        "  cut {i}: {:?}{} {}: {}",
                        f.kind,
                        if f.copy_up { " (copy-up)" } else { "" },
                        f.path,
                        f.detail
                    );
                }
            }
        }
        if k > max {
            let _ = writeln!(s, "  ... and {} more", k - max);
        }
        s
    }
    fn summary(&self, label: &str) -> String {
        let total = |f: fn(&CutReport) -> usize| self.reports.iter().map(f).sum::<usize>();
        format!(
            "[{label}] seed {} (OVLFUSE_SEED={} replays it): {} cuts in {:.1} s\n  \
             findings: lost {} (in {} cuts), never written {}, unexpected {}, remount \
             differs {}, fsck {}\n  synced names checked exactly: {} ({} files of the \
             workload, {} renamed there, {} gone); torn but legal: {}\n  ops: {:?}; copy-ups: {}\n  syncs: {:?}; cuts \
             after: {:?}\n  copies: {} attempts, {} KiB non-zero, {:.0} ms copying, {:.1} s \
             checking; ovlfuse remounts: {}; staged copy-ups left in work dirs: {}\n  \
             e2fsck: {:?}; what it fixed: {:?}",
            self.seed,
            self.seed,
            self.reports.len(),
            self.elapsed.as_secs_f64(),
            self.findings(Kind::Lost).len(),
            self.cuts_with(Kind::Lost),
            self.findings(Kind::NeverWritten).len(),
            self.findings(Kind::Unexpected).len(),
            self.findings(Kind::RemountDiffers).len(),
            self.findings(Kind::Fsck).len(),
            total(|r| r.synced_checked),
            total(|r| r.synced_files),
            total(|r| r.synced_renamed),
            total(|r| r.synced_gone),
            total(|r| r.torn),
            self.stats.ops,
            self.stats.copy_ups,
            self.stats.syncs,
            self.stats.cuts_after,
            self.stats.cut_attempts,
            self.stats.cut_bytes >> 10,
            self.stats.copy_time.as_secs_f64() * 1000.0,
            self.stats.check_time.as_secs_f64(),
            self.stats.remounts,
            self.stats.work_leftovers,
            self.stats.fsck,
            self.stats.fsck_fixes,
        )
    }
}

/// Runs the workload on a fresh rig until `opts.cuts` cuts have been checked.
fn run(opts: RunOpts, secs: u64) -> Outcome {
    let seed = seed();
    eprintln!(
        "[{}] seed {seed} (OVLFUSE_SEED={seed} replays it), {} cuts, syncs {}",
        opts.label,
        opts.cuts,
        if opts.syncs { "on" } else { "LEFT OUT" }
    );
    with_rig_and_lab(secs, move |rig, lab| {
        let started = Instant::now();
        let mut rng = Rng(seed);
        let mut model = Model::default();
        let lower = lab.mkdir("lower");
        build_lower(&lower, opts.lower_files, &mut rng, &mut model);
        fs::create_dir(rig.p("neighbour")).unwrap();
        let layers = rig.union_layers(lower.clone());
        let m = if opts.kernel {
            mount_kernel_overlay(&layers)
        } else {
            mount_ovlfuse(&layers, opts.mount_opts)
        };
        // The starting point (empty upper and work dirs, what the mount put in the work dir)
        // is on disk before the workload starts: the kernel overlay's mount syncs nothing,
        // and a copy without the upper dir cannot be mounted at all.
        rig.settle();
        let mut r = Run {
            rig,
            lab,
            opts: &opts,
            union: m.path().to_path_buf(),
            lowers: vec![lower],
            model,
            rng,
            next_name: 0,
            neighbour: 0,
            stats: Stats::default(),
            reports: Vec::new(),
            started,
        };
        let mut steps = 0;
        while r.reports.len() < opts.cuts {
            r.step();
            steps += 1;
            assert!(
                steps < 1000 * (opts.cuts + 1),
                "{steps} steps and only {} cuts",
                r.reports.len()
            );
        }
        drop(m);
        Outcome {
            reports: r.reports,
            stats: r.stats,
            seed,
            elapsed: started.elapsed(),
        }
    })
}

fn main_cuts() -> usize {
    env_usize("OVLFUSE_POWERCUT_CUTS").unwrap_or(if full() { 100 } else { 15 })
}

fn lower_files(cuts: usize) -> usize {
    (40 + cuts * 2).min(300)
}

fn remount_every() -> usize {
    env_usize("OVLFUSE_POWERCUT_REMOUNT_EVERY").unwrap_or(3)
}

#[test]
fn power_cuts_after_syncs_lose_nothing_synced_and_show_no_partial_copy_up() {
    let cuts = main_cuts();
    let out = run(
        RunOpts {
            syncs: true,
            mount_opts: "",
            kernel: false,
            cuts,
            lower_files: lower_files(cuts),
            remount_every: remount_every(),
            label: "power cut",
        },
        if full() { 3000 } else { 300 },
    );
    eprintln!("{}", out.summary("power cut"));
    let all: usize = out.reports.iter().map(|r| r.findings.len()).sum();
    assert!(
        all == 0,
        "{all} findings in {} cuts (OVLFUSE_SEED={}):\n{}",
        out.reports.len(),
        out.seed,
        out.show_findings(60)
    );
    assert_eq!(out.reports.len(), cuts);
    // the run did what it is meant to check
    let synced: usize = out.reports.iter().map(|r| r.synced_files).sum();
    assert!(
        synced >= cuts,
        "only {synced} synced files of the workload were checked in {cuts} cuts"
    );
    assert!(out.stats.copy_ups > 0, "no copy-ups: {:?}", out.stats.ops);
    for op in ["create", "rename", "unlink"] {
        assert!(
            out.stats.ops.contains_key(op),
            "no {op}: {:?}",
            out.stats.ops
        );
    }
}

#[test]
fn power_cuts_without_the_syncs_lose_data() {
    let cuts = if full() { 30 } else { 10 };
    let out = run(
        RunOpts {
            syncs: false,
            mount_opts: "",
            kernel: false,
            cuts,
            lower_files: lower_files(cuts),
            remount_every: 0,
            label: "no syncs",
        },
        if full() { 1200 } else { 300 },
    );
    eprintln!("{}", out.summary("no syncs"));
    eprintln!("findings:\n{}", out.show_findings(15));
    assert!(
        !out.findings(Kind::Lost).is_empty(),
        "without the syncs no cut lost anything the model counted as synced: the check has \
         no teeth (or a global sync(2) wrote everything back during the run)"
    );
    // Copy-ups are flushed by ovlfuse itself, syncs or not: never partial.
    let partial: Vec<_> = out
        .findings(Kind::NeverWritten)
        .into_iter()
        .filter(|(_, f)| f.copy_up)
        .collect();
    assert!(
        partial.is_empty(),
        "copied-up files in states never written, even though copy-ups are flushed:\n{}",
        out.show_findings(30)
    );
}

/// A few lower files copied up by chmod and by appends, then a neighbour's fsync commits the
/// journal, then the power is cut.  Returns the findings of that one cut.
fn copy_ups_then_commit(mount_opts: &'static str) -> (Vec<Finding>, usize) {
    let seed = seed();
    with_rig_and_lab(120, move |rig, lab| {
        let mut rng = Rng(seed ^ 0xc0c0);
        let mut model = Model::default();
        let lower = lab.mkdir("lower");
        for i in 0..8 {
            let len = rng.range(3 * PAGE, 200 << 10);
            let data = noise(len, rng.next());
            let p = format!("f{i}");
            fs::write(lower.join(&p), &data).unwrap();
            fs::set_permissions(lower.join(&p), fs::Permissions::from_mode(0o644)).unwrap();
            let id = model.new_inode(
                Origin::Lower,
                Content::File {
                    data: Arc::new(data),
                    mode: 0o644,
                },
            );
            model.names.insert(p, Hist::new(Some(id)));
        }
        fs::create_dir(rig.p("neighbour")).unwrap();
        let layers = rig.union_layers(lower.clone());
        let m = mount_ovlfuse(&layers, mount_opts);
        let opts = RunOpts {
            syncs: true,
            mount_opts,
            kernel: false,
            cuts: 1,
            lower_files: 0,
            remount_every: 0,
            label: "copy-ups",
        };
        let mut r = Run {
            rig,
            lab,
            opts: &opts,
            union: m.path().to_path_buf(),
            lowers: vec![lower],
            model,
            rng,
            next_name: 0,
            neighbour: 0,
            stats: Stats::default(),
            reports: Vec::new(),
            started: Instant::now(),
        };
        // Nothing dirty from the setup: only what the copy-ups write is at stake.
        rig.settle();
        for i in 0..8 {
            let p = format!("f{i}");
            if i % 2 == 0 {
                ctx(
                    fs::set_permissions(r.u(&p), fs::Permissions::from_mode(0o600)),
                    || format!("chmod {p}"),
                );
                let id = r.model.writable(&p, true);
                let (data, _) = r.model.file(id);
                r.model.set_file(id, data.to_vec(), 0o600);
            } else {
                let f = ctx(OpenOptions::new().append(true).open(r.u(&p)), || {
                    format!("open {p}")
                });
                ctx((&f).write_all(b"appended"), || format!("append {p}"));
                let id = r.model.writable(&p, true);
                let (data, mode) = r.model.file(id);
                let mut d = data.to_vec();
                d.extend_from_slice(b"appended");
                r.model.set_file(id, d, mode);
            }
        }
        r.neighbour_commit();
        r.cut_and_check();
        drop(m);
        let rep = r.reports.pop().unwrap();
        (rep.findings, rep.synced_checked)
    })
}

#[test]
fn copy_ups_are_never_partial_after_a_cut_unless_fsync_is_off() {
    let (flushed, _) = copy_ups_then_commit("");
    assert!(
        flushed.is_empty(),
        "copy-ups flushed by ovlfuse, journal committed, power cut: findings {flushed:#?}"
    );
    // Teeth: fsync=0 skips the flush of the staged copy, so once the journal commits the
    // rename, the copy is visible under its final name without its data.
    let (unflushed, _) = copy_ups_then_commit("fsync=0");
    let partial: Vec<&Finding> = unflushed
        .iter()
        .filter(|f| f.kind == Kind::NeverWritten && f.copy_up)
        .collect();
    eprintln!(
        "fsync=0: {} partial copy-ups seen: {partial:#?}",
        partial.len()
    );
    assert!(
        !partial.is_empty(),
        "with fsync=0 no copied-up file was seen partial after the cut: the check has no \
         teeth; findings: {unflushed:#?}"
    );
}

/// The model asks nothing of ovlfuse that the reference does not give: with the kernel
/// overlayfs as the writer, the same workload passes the same check.
#[test]
fn kernel_overlay_as_the_writer_passes_the_same_check() {
    let cuts = if full() { 30 } else { 8 };
    let out = run(
        RunOpts {
            syncs: true,
            mount_opts: "",
            kernel: true,
            cuts,
            lower_files: lower_files(cuts),
            remount_every: remount_every(),
            label: "kernel writer",
        },
        if full() { 1200 } else { 300 },
    );
    eprintln!("{}", out.summary("kernel writer"));
    let all: usize = out.reports.iter().map(|r| r.findings.len()).sum();
    assert!(
        all == 0,
        "{all} findings with the kernel overlay as the writer (OVLFUSE_SEED={}):\n{}",
        out.seed,
        out.show_findings(60)
    );
}
