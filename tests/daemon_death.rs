//! `kill -9` of the daemon at random moments of copy-up-, rename- and unlink-heavy work, on
//! both transports: after each kill the dead mount is unmounted, ovlfuse is mounted again
//! on the same layers, and
//!
//! - every entry is in its state before or after the operation that was in flight (never a
//!   partial file, never an empty file under a copied-up name, never a whiteout hiding a
//!   name that should be visible), checked against a model each worker keeps;
//! - the merged view equals the kernel overlayfs's read-only view of the same directories;
//! - `workdir/work` holds no leftovers of the interrupted operations.
//!
//! A write(2) in flight may be applied up to a page boundary (the kernel splits it into
//! several FUSE requests); that is allowed, as on any filesystem that crashes. Besides the
//! random kills, a seccomp filter kills the daemon at chosen system calls, so the same
//! checks also run at exact points inside a copy-up, an rmdir and a rename.
//!
//! `OVLFUSE_SEED` replays a run (the seed is printed), `OVLFUSE_DEATH_ROUNDS` sets the kills
//! per transport (default 5, 30 with `OVLFUSE_FULL=1`).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::load::*;
use common::*;

/// Workers per round, each on its own subtree `w0`, `w1`, ... of the union.
const WORKERS: usize = 3;

/// Mount options on both transports: redirects are written, so renamed lower directories
/// are part of what a kill may interrupt.
const OPTS: &str = "redirect_dir=on";

/// Rounds between fresh upper layers.
const EPOCH: usize = 3;

// ---------------------------------------------------------------------------
// the model: what a worker's subtree must look like
// ---------------------------------------------------------------------------

#[derive(Clone, PartialEq, Eq)]
enum MEntry {
    File { data: Vec<u8>, mode: u32 },
    Dir { mode: u32 },
    Symlink { target: String },
}

impl std::fmt::Debug for MEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MEntry::File { data, mode } => write!(
                f,
                "file {mode:04o} len={} hash={:016x}",
                data.len(),
                hash_bytes(data)
            ),
            MEntry::Dir { mode } => write!(f, "dir {mode:04o}"),
            MEntry::Symlink { target } => write!(f, "symlink -> {target}"),
        }
    }
}

/// Paths relative to the subtree root ("d0/f1"), the root itself left out.
type Model = BTreeMap<String, MEntry>;

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

fn is_inside(p: &str, dir: &str) -> bool {
    p.len() > dir.len() && p.starts_with(dir) && p.as_bytes()[dir.len()] == b'/'
}

fn depth(p: &str) -> usize {
    if p.is_empty() {
        0
    } else {
        p.matches('/').count() + 1
    }
}

fn is_empty_dir(m: &Model, dir: &str) -> bool {
    !m.keys().any(|k| is_inside(k, dir))
}

/// `rename(from, to)` on the model (`to` absent, or a file, or an empty directory).
fn model_rename(m: &Model, from: &str, to: &str) -> Model {
    let mut out = Model::new();
    for (k, v) in m {
        if k == to {
            continue;
        }
        let nk = if k == from {
            to.to_string()
        } else if is_inside(k, from) {
            format!("{to}{}", &k[from.len()..])
        } else {
            k.clone()
        };
        out.insert(nk, v.clone());
    }
    out
}

/// One operation through the union; compound ones (open, write, close) have intermediate
/// states a kill may leave.
#[derive(Debug, Clone)]
enum Op {
    /// open O_RDWR (copies a lower file up), pwrite, close
    Write {
        path: String,
        off: u64,
        data: Vec<u8>,
    },
    /// open O_APPEND (copy-up), write, close
    Append {
        path: String,
        data: Vec<u8>,
    },
    /// truncate(2) (copy-up, without data when to 0)
    Truncate {
        path: String,
        len: u64,
    },
    /// chmod(2) (copy-up of a file or a directory)
    Chmod {
        path: String,
        mode: u32,
    },
    /// open O_CREAT|O_EXCL, write, close
    Create {
        path: String,
        data: Vec<u8>,
    },
    /// open O_TRUNC (copy-up without data), write, close
    Overwrite {
        path: String,
        data: Vec<u8>,
    },
    Rename {
        from: String,
        to: String,
    },
    Unlink {
        path: String,
    },
    Rmdir {
        path: String,
    },
    Mkdir {
        path: String,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Write { path, off, data } => write!(f, "write {path} @{off}+{}", data.len()),
            Op::Append { path, data } => write!(f, "append {path} +{}", data.len()),
            Op::Truncate { path, len } => write!(f, "truncate {path} {len}"),
            Op::Chmod { path, mode } => write!(f, "chmod {path} {mode:o}"),
            Op::Create { path, data } => write!(f, "create {path} len={}", data.len()),
            Op::Overwrite { path, data } => write!(f, "overwrite {path} len={}", data.len()),
            Op::Rename { from, to } => write!(f, "rename {from} {to}"),
            Op::Unlink { path } => write!(f, "unlink {path}"),
            Op::Rmdir { path } => write!(f, "rmdir {path}"),
            Op::Mkdir { path } => write!(f, "mkdir {path}"),
            Op::Symlink { path, target } => write!(f, "symlink {target} {path}"),
        }
    }
}

const NEW_FILE_MODE: u32 = 0o644;
const NEW_DIR_MODE: u32 = 0o755;

/// The states the op goes through after `before`, the last one being its result.
fn states_after(m: &Model, op: &Op) -> Vec<Model> {
    let with = |path: &str, e: MEntry| {
        let mut n = m.clone();
        n.insert(path.to_string(), e);
        n
    };
    let file = |path: &str| match m.get(path) {
        Some(MEntry::File { data, mode }) => (data.clone(), *mode),
        other => panic!("model: {path} is not a file: {other:?}"),
    };
    match op {
        Op::Write { path, off, data } => {
            let (mut d, mode) = file(path);
            let end = *off as usize + data.len();
            if d.len() < end {
                d.resize(end, 0);
            }
            d[*off as usize..end].copy_from_slice(data);
            vec![with(path, MEntry::File { data: d, mode })]
        }
        Op::Append { path, data } => {
            let (mut d, mode) = file(path);
            d.extend_from_slice(data);
            vec![with(path, MEntry::File { data: d, mode })]
        }
        Op::Truncate { path, len } => {
            let (mut d, mode) = file(path);
            d.resize(*len as usize, 0);
            vec![with(path, MEntry::File { data: d, mode })]
        }
        Op::Chmod { path, mode } => {
            let e = match m.get(path) {
                Some(MEntry::File { data, .. }) => MEntry::File {
                    data: data.clone(),
                    mode: *mode,
                },
                Some(MEntry::Dir { .. }) => MEntry::Dir { mode: *mode },
                other => panic!("model: chmod of {path}: {other:?}"),
            };
            vec![with(path, e)]
        }
        Op::Create { path, data } => {
            let empty = MEntry::File {
                data: Vec::new(),
                mode: NEW_FILE_MODE,
            };
            let full = MEntry::File {
                data: data.clone(),
                mode: NEW_FILE_MODE,
            };
            vec![with(path, empty), with(path, full)]
        }
        Op::Overwrite { path, data } => {
            let (_, mode) = file(path);
            vec![
                with(
                    path,
                    MEntry::File {
                        data: Vec::new(),
                        mode,
                    },
                ),
                with(
                    path,
                    MEntry::File {
                        data: data.clone(),
                        mode,
                    },
                ),
            ]
        }
        Op::Rename { from, to } => vec![model_rename(m, from, to)],
        Op::Unlink { path } | Op::Rmdir { path } => {
            let mut n = m.clone();
            n.remove(path);
            vec![n]
        }
        Op::Mkdir { path } => vec![with(path, MEntry::Dir { mode: NEW_DIR_MODE })],
        Op::Symlink { path, target } => vec![with(
            path,
            MEntry::Symlink {
                target: target.clone(),
            },
        )],
    }
}

const NAMES: [&str; 14] = [
    "f0", "f1", "f2", "f3", "f4", "f5", "f6", "d0", "d1", "d2", "d3", "d4", "s0", "s1",
];

/// A name in some directory of the model that does not exist yet.
fn fresh_path(r: &mut Rng, m: &Model) -> Option<String> {
    let mut dirs: Vec<&str> = vec![""];
    dirs.extend(
        m.iter()
            .filter(|(k, v)| matches!(v, MEntry::Dir { .. }) && depth(k) < 3)
            .map(|(k, _)| k.as_str()),
    );
    for _ in 0..20 {
        let p = join(r.pick::<&str>(&dirs), r.pick::<&str>(&NAMES));
        if !m.contains_key(&p) {
            return Some(p);
        }
    }
    None
}

fn pick_where<'a>(
    r: &mut Rng,
    m: &'a Model,
    f: impl Fn(&str, &MEntry) -> bool,
) -> Option<&'a String> {
    let v: Vec<&String> = m.iter().filter(|(k, e)| f(k, e)).map(|(k, _)| k).collect();
    (!v.is_empty()).then(|| *r.pick(&v))
}

fn data(r: &mut Rng, max: u64) -> Vec<u8> {
    let len = r.range(1, max) as usize;
    noise(len, r.next())
}

/// A random operation that must succeed on `m` (POSIX rules; renamed lower directories are
/// allowed: redirect_dir=on). About a third copy lower files up, a quarter rename, a
/// quarter remove.
fn pick_op(r: &mut Rng, m: &Model) -> Op {
    let is_file = |_: &str, e: &MEntry| matches!(e, MEntry::File { .. });
    let is_dir = |_: &str, e: &MEntry| matches!(e, MEntry::Dir { .. });
    loop {
        let op = match r.below(100) {
            0..=13 => pick_where(r, m, is_file).map(|p| {
                let size = match &m[p] {
                    MEntry::File { data, .. } => data.len() as u64,
                    _ => 0,
                };
                Op::Write {
                    path: p.clone(),
                    off: r.below(size + 4096),
                    data: data(r, 8192),
                }
            }),
            14..=19 => pick_where(r, m, is_file).map(|p| Op::Append {
                path: p.clone(),
                data: data(r, 4096),
            }),
            20..=25 => pick_where(r, m, is_file).map(|p| {
                let size = match &m[p] {
                    MEntry::File { data, .. } => data.len() as u64,
                    _ => 0,
                };
                Op::Truncate {
                    path: p.clone(),
                    len: if r.chance(20) { 0 } else { r.below(size + 1) },
                }
            }),
            26..=30 => {
                pick_where(r, m, |_, e| !matches!(e, MEntry::Symlink { .. })).map(|p| Op::Chmod {
                    path: p.clone(),
                    mode: *r.pick(&[0o600, 0o640, 0o644, 0o755, 0o700]),
                })
            }
            31..=42 => {
                let from = pick_where(r, m, |_, e| !matches!(e, MEntry::Dir { .. }));
                match from {
                    Some(from) if r.chance(40) => {
                        // onto another non-directory
                        pick_where(r, m, |k, e| {
                            k != from.as_str() && !matches!(e, MEntry::Dir { .. })
                        })
                        .map(|to| Op::Rename {
                            from: from.clone(),
                            to: to.clone(),
                        })
                    }
                    Some(from) => fresh_path(r, m).map(|to| Op::Rename {
                        from: from.clone(),
                        to,
                    }),
                    None => None,
                }
            }
            43..=50 => pick_where(r, m, is_dir).and_then(|from| {
                if r.chance(30) {
                    // onto an empty directory that is neither inside it nor above it
                    pick_where(r, m, |k, e| {
                        matches!(e, MEntry::Dir { .. })
                            && k != from.as_str()
                            && !is_inside(k, from)
                            && !is_inside(from, k)
                            && is_empty_dir(m, k)
                    })
                    .map(|to| Op::Rename {
                        from: from.clone(),
                        to: to.clone(),
                    })
                } else {
                    let to = fresh_path(r, m)?;
                    (!is_inside(&to, from)).then(|| Op::Rename {
                        from: from.clone(),
                        to,
                    })
                }
            }),
            51..=63 => pick_where(r, m, |_, e| !matches!(e, MEntry::Dir { .. }))
                .map(|p| Op::Unlink { path: p.clone() }),
            64..=70 => pick_where(r, m, |k, e| {
                matches!(e, MEntry::Dir { .. }) && is_empty_dir(m, k)
            })
            .map(|p| Op::Rmdir { path: p.clone() }),
            71..=80 => fresh_path(r, m).map(|path| Op::Create {
                path,
                data: data(r, 64 << 10),
            }),
            81..=86 => pick_where(r, m, is_file).map(|p| Op::Overwrite {
                path: p.clone(),
                data: data(r, 16 << 10),
            }),
            87..=94 => fresh_path(r, m).map(|path| Op::Mkdir { path }),
            _ => fresh_path(r, m).map(|path| Op::Symlink {
                path,
                target: r.pick(&["f0", "../f1", "d0/f2", "nowhere"]).to_string(),
            }),
        };
        if let Some(op) = op {
            return op;
        }
    }
}

/// Runs `op` on the subtree at `root`.
fn execute(root: &Path, op: &Op) -> io::Result<()> {
    let p = |rel: &str| root.join(rel);
    match op {
        Op::Write { path, off, data } => fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(p(path))?
            .write_all_at(data, *off),
        Op::Append { path, data } => fs::OpenOptions::new()
            .append(true)
            .open(p(path))?
            .write_all(data),
        Op::Truncate { path, len } => {
            let c = cstr(p(path));
            // SAFETY: valid C string.
            match unsafe { libc::truncate(c.as_ptr(), *len as libc::off_t) } {
                0 => Ok(()),
                _ => Err(io::Error::last_os_error()),
            }
        }
        Op::Chmod { path, mode } => fs::set_permissions(p(path), fs::Permissions::from_mode(*mode)),
        Op::Create { path, data } => fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(NEW_FILE_MODE)
            .open(p(path))?
            .write_all(data),
        Op::Overwrite { path, data } => fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(p(path))?
            .write_all(data),
        Op::Rename { from, to } => fs::rename(p(from), p(to)),
        Op::Unlink { path } => fs::remove_file(p(path)),
        Op::Rmdir { path } => fs::remove_dir(p(path)),
        Op::Mkdir { path } => {
            fs::create_dir(p(path))?;
            // mkdir's mode is subject to the umask; the model's is not.
            fs::set_permissions(p(path), fs::Permissions::from_mode(NEW_DIR_MODE))
        }
        Op::Symlink { path, target } => std::os::unix::fs::symlink(target, p(path)),
    }
}

// ---------------------------------------------------------------------------
// what the union shows
// ---------------------------------------------------------------------------

/// The subtree at `root` as a model; entries a union must never show (devices, which is how
/// a whiteout would look, and private names) are errors.
fn observe(root: &Path) -> Result<Model, Vec<String>> {
    let mut m = Model::new();
    let mut errors = Vec::new();
    let mut stack = vec![String::new()];
    while let Some(dir) = stack.pop() {
        let abs = if dir.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&dir)
        };
        let names = match list_names(&abs) {
            Ok(n) => n,
            Err(e) => {
                errors.push(format!("{dir}: readdir: {e}"));
                continue;
            }
        };
        for name in names {
            let rel = join(&dir, &name);
            if name.starts_with(".wh.") || name.starts_with("#ovlfuse") {
                errors.push(format!("{rel}: private name shown"));
                continue;
            }
            let path = root.join(&rel);
            let md = match fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) => {
                    errors.push(format!("{rel}: listed but lstat fails: {e}"));
                    continue;
                }
            };
            let mode = md.mode() & 0o7777;
            let ft = md.file_type();
            if ft.is_file() {
                match fs::read(&path) {
                    Ok(data) => {
                        m.insert(rel, MEntry::File { data, mode });
                    }
                    Err(e) => errors.push(format!("{rel}: read: {e}")),
                }
            } else if ft.is_dir() {
                m.insert(rel.clone(), MEntry::Dir { mode });
                stack.push(rel);
            } else if ft.is_symlink() {
                match fs::read_link(&path) {
                    Ok(t) => {
                        m.insert(
                            rel,
                            MEntry::Symlink {
                                target: t.to_string_lossy().into_owned(),
                            },
                        );
                    }
                    Err(e) => errors.push(format!("{rel}: readlink: {e}")),
                }
            } else {
                errors.push(format!(
                    "{rel}: unexpected {:?} (mode {:o}, rdev {:x}): a whiteout shown?",
                    kind_of(md.mode()),
                    md.mode(),
                    md.rdev()
                ));
            }
        }
    }
    if errors.is_empty() {
        Ok(m)
    } else {
        Err(errors)
    }
}

/// Lines describing how `got` differs from `want`.
fn model_diff(want: &Model, got: &Model) -> Vec<String> {
    let mut v = Vec::new();
    for (k, w) in want {
        match got.get(k) {
            None => v.push(format!("{k}: missing (want {w:?})")),
            Some(g) if g != w => {
                let mut line = format!("{k}: want {w:?}, got {g:?}");
                if let (MEntry::File { data: wd, .. }, MEntry::File { data: gd, .. }) = (w, g) {
                    if gd.is_empty() && !wd.is_empty() {
                        line.push_str(" (EMPTY file under the name)");
                    } else if gd.len() < wd.len() && wd.starts_with(gd) {
                        line.push_str(" (PARTIAL: a prefix of the wanted data)");
                    } else if let Some(i) = wd.iter().zip(gd.iter()).position(|(a, b)| a != b) {
                        line.push_str(&format!(" (first differing byte at {i})"));
                    }
                }
                v.push(line);
            }
            Some(_) => {}
        }
    }
    for (k, g) in got {
        if !want.contains_key(k) {
            v.push(format!("{k}: unexpected {g:?}"));
        }
    }
    v
}

/// What the subtree may look like after a kill: `states[0]` is the state before the op in
/// flight, `states[after]` the one after it, the others intermediate.
struct Allowed {
    states: Vec<Model>,
    after: usize,
}

/// `Ok((state, index))`: the subtree at `root` and which allowed state it is in; else every
/// problem, against the states before and after the op.
fn check_subtree(root: &Path, allowed: &Allowed) -> Result<(Model, usize), Vec<String>> {
    let got = observe(root)?;
    let states = &allowed.states;
    if let Some(i) = states.iter().position(|s| *s == got) {
        return Ok((got, i));
    }
    let mut v = vec![format!(
        "neither of the {} allowed states; against the state before the op:",
        states.len()
    )];
    v.extend(
        model_diff(&states[0], &got)
            .into_iter()
            .map(|l| format!("  {l}")),
    );
    if allowed.after > 0 {
        v.push("against the state after the op:".into());
        v.extend(
            model_diff(&states[allowed.after], &got)
                .into_iter()
                .map(|l| format!("  {l}")),
        );
    }
    Err(v)
}

// ---------------------------------------------------------------------------
// layers
// ---------------------------------------------------------------------------

/// Two lower layers; every worker's subtree `wN` holds lower files (1 KiB to 2 MiB, so a
/// copy-up takes long enough to be hit), a lower directory, one merged across both lowers,
/// an empty one, a shadowed file and a symlink.
fn build(l: &Layers) {
    let (l0, l1) = (l.lower(0), l.lower(1));
    for w in 0..WORKERS {
        let s = |rel: &str| format!("w{w}/{rel}");
        let n = |i: u64| (w as u64) * 100 + i;
        let file = |layer: &Layer, rel: &str, len: usize, mode: u32, i: u64| {
            layer.write_file(&s(rel), &noise(len, n(i)), mode);
        };
        file(&l1, "f0", 64 << 10, 0o644, 1);
        file(&l1, "f1", 200 << 10, 0o600, 2);
        file(&l1, "f2", 3 << 10, 0o644, 3);
        file(&l1, "f3", 1 << 20, 0o755, 4);
        file(&l1, "d0/f0", 10 << 10, 0o644, 5);
        file(&l1, "d0/f1", 500 << 10, 0o644, 6);
        file(&l1, "d0/d1/f2", 20 << 10, 0o640, 7);
        file(&l1, "d1/f0", 7 << 10, 0o644, 8);
        l1.mkdir(&s("d2"), 0o755);
        l1.symlink(&s("s0"), "f0");
        file(&l0, "f2", 5 << 10, 0o644, 9);
        file(&l0, "d1/f1", 30 << 10, 0o644, 10);
        file(&l0, "d3/f0", 1 << 10, 0o600, 11);
        file(&l0, "f4", 2 << 20, 0o644, 12);
    }
}

/// The kernel overlay's read-only view of the same directories: the upper layer as the top
/// lower layer (no work dir, nothing written).
fn kernel_view_layers(l: &Layers) -> Layers {
    let mut lowers = vec![l.upper.clone().expect("upper")];
    lowers.extend(l.lowers.iter().cloned());
    Layers {
        lowers,
        upper: None,
        work: None,
    }
}

fn snapshot_of(m: &Mounted) -> Snapshot {
    let root = m.path().to_path_buf();
    with_timeout(120, move || snapshot(&root))
}

/// Problems of the merged view: ovlfuse's (already taken) against the kernel's.
fn compare_with_kernel(l: &Layers, ovlfuse: &Snapshot) -> Vec<String> {
    let k = mount_kernel_overlay_opts(&kernel_view_layers(l), "ro,redirect_dir=follow");
    let ks = snapshot_of(&k);
    drop(k);
    let mut v: Vec<String> = diff_snapshots_labeled(&ks, ovlfuse, "kernel", "ovlfuse")
        .into_iter()
        .map(|d| format!("merged view: {d}"))
        .collect();
    v.extend(
        snapshot_problems(ovlfuse)
            .into_iter()
            .map(|p| format!("ovlfuse view: {p}")),
    );
    v
}

/// The raw upper layer around the paths `problems` name (the directories holding them):
/// entries, whiteouts, opaque and redirect attributes — what a bug report needs.
fn upper_dump(l: &Layers, problems: &[String]) -> Vec<String> {
    let upper = l.upper.clone().expect("upper");
    let mut dirs = std::collections::BTreeSet::new();
    let mut worker = None;
    for line in problems {
        if let Some(rest) = line.strip_prefix("worker ") {
            worker = rest.split(',').next().and_then(|n| n.parse::<usize>().ok());
            continue;
        }
        let path = if let Some(rest) = line.strip_prefix("merged view: ") {
            rest.split(':').next().map(str::to_string)
        } else if line.starts_with("  ") {
            let rel = line.trim_start().split(':').next().unwrap_or("");
            worker.map(|w| format!("w{w}/{rel}"))
        } else {
            None
        };
        if let Some(p) = path {
            let p = PathBuf::from(p);
            dirs.insert(p.parent().map(Path::to_path_buf).unwrap_or_default());
        }
    }
    let snap = snapshot(&upper);
    let mut out = vec!["raw upper layer around those paths:".to_string()];
    for (p, e) in &snap {
        if !dirs
            .iter()
            .any(|d| p.parent() == Some(d.as_path()) || p == d)
        {
            continue;
        }
        let mut line = format!("  upper/{}: {:?} {:04o}", show_path(p), e.kind, e.mode);
        if let Some((ma, mi)) = e.rdev {
            line.push_str(&format!(" rdev {ma}:{mi}"));
        }
        if e.kind == Kind::File {
            line.push_str(&format!(" size {}", e.size));
        }
        for (n, v) in &e.xattrs {
            if let Ok(v) = v {
                line.push_str(&format!(" {n}={:?}", String::from_utf8_lossy(v)));
            }
        }
        out.push(line);
    }
    out
}

/// Problems in the work dir after a mount: leftovers it should have removed, and status
/// files of earlier (dead) daemons.
fn workdir_problems(l: &Layers, live_pid: Option<i32>) -> Vec<String> {
    let workdir = l.work.clone().expect("work");
    let mut v: Vec<String> = work_leftovers(&workdir.join("work"))
        .into_iter()
        .map(|n| format!("workdir/work/{n} left after the remount"))
        .collect();
    if let Ok(rd) = fs::read_dir(&workdir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name.strip_prefix(".ovlfuse-status.next-")
                && pid.parse::<i32>().ok() != live_pid
            {
                v.push(format!("workdir/{name}: a dead daemon's status file left"));
            }
        }
    }
    v
}

/// The states a write(2) in flight may leave when the daemon dies: the kernel sends a write
/// that starts inside a page it does not hold as several WRITE requests split at page
/// boundaries (`fuse_fill_write_pages` stops at the end of a page that is not up to date),
/// so the data may be applied up to any page boundary it crosses. The same holds for every
/// FUSE filesystem, and for a local one that crashes: write(2) is not atomic. What must
/// never happen — the file's other bytes changing, or a copy-up left partial — still fails.
fn torn_write_states(before: &Model, op: &Op) -> Vec<Model> {
    const PAGE: usize = 4096;
    // (path, file before the data is written, its mode, where the data starts, the data)
    let (path, base, mode, off, data) = match (op, before.get(op_path(op))) {
        (Op::Write { path, off, data }, Some(MEntry::File { data: d, mode })) => {
            (path, d.clone(), *mode, *off as usize, data)
        }
        (Op::Append { path, data }, Some(MEntry::File { data: d, mode })) => {
            (path, d.clone(), *mode, d.len(), data)
        }
        (Op::Overwrite { path, data }, Some(MEntry::File { mode, .. })) => {
            (path, Vec::new(), *mode, 0, data)
        }
        (Op::Create { path, data }, None) => (path, Vec::new(), NEW_FILE_MODE, 0, data),
        _ => return Vec::new(),
    };
    let end = off + data.len();
    let mut out = Vec::new();
    let mut cut = (off / PAGE + 1) * PAGE;
    while cut < end {
        let mut d = base.clone();
        if d.len() < cut {
            d.resize(cut, 0);
        }
        d[off..cut].copy_from_slice(&data[..cut - off]);
        let mut m = before.clone();
        m.insert(path.clone(), MEntry::File { data: d, mode });
        out.push(m);
        cut += PAGE;
    }
    out
}

fn op_path(op: &Op) -> &str {
    match op {
        Op::Write { path, .. }
        | Op::Append { path, .. }
        | Op::Truncate { path, .. }
        | Op::Chmod { path, .. }
        | Op::Create { path, .. }
        | Op::Overwrite { path, .. }
        | Op::Unlink { path }
        | Op::Rmdir { path }
        | Op::Mkdir { path }
        | Op::Symlink { path, .. } => path,
        Op::Rename { from, .. } => from,
    }
}

/// The tests of this file that kill daemons run one at a time: a daemon killed by one test
/// leaves its entry in the mount registry, and the next daemon to start removes such stale
/// entries — an unlink, which the tests dying at their first unlink must not meet.
fn killing_alone() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Mounts (and unmounts) a plain ovlfuse on `l`: it removes the registry entries that
/// daemons killed earlier left, so that a daemon dying at its first unlink starts with
/// none to remove.
fn clear_stale_registry_entries(l: &Layers) {
    drop(mount_ovlfuse(l, "nofuseblk"));
}

// ---------------------------------------------------------------------------
// one worker, one round
// ---------------------------------------------------------------------------

struct Worker {
    /// The subtree's state after the last operation that returned.
    committed: Model,
    /// The operation in flight when the daemon died: the states it allows, first the
    /// state before it.
    inflight: Option<(Op, Vec<Model>)>,
    done: u64,
    /// The op in flight failed with EIO rather than ECONNABORTED/ENOTCONN.
    eio_at_kill: bool,
    /// An error the kill does not explain.
    unexpected: Option<String>,
}

fn work(root: PathBuf, mut w: Worker, mut r: Rng, killed: Arc<AtomicBool>) -> Worker {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let op = pick_op(&mut r, &w.committed);
        let mut states = vec![w.committed.clone()];
        states.extend(states_after(&w.committed, &op));
        match execute(&root, &op) {
            Ok(()) => {
                w.committed = states.pop().expect("a state after");
                w.done += 1;
            }
            // A daemon killed while it served the call answers it no more: the kernel ends it
            // with ECONNABORTED (ENOTCONN for calls after). Rarely a write(2) in flight on a
            // fuseblk mount returns EIO instead (2 in 800 kills): the state check is the same.
            Err(e)
                if killed.load(Ordering::SeqCst)
                    && e.raw_os_error()
                        .is_some_and(|n| is_conn_error(n) || n == libc::EIO) =>
            {
                w.eio_at_kill = e.raw_os_error() == Some(libc::EIO);
                w.inflight = Some((op, states));
                return w;
            }
            Err(e) => {
                w.unexpected = Some(format!(
                    "{op}: {e} (killed: {})",
                    killed.load(Ordering::SeqCst)
                ));
                return w;
            }
        }
    }
    w.unexpected = Some("still running 60 s after the round started".into());
    w
}

fn fail(label: &str, seed: u64, round: usize, what: &str, problems: &[String]) -> ! {
    panic!(
        "{label}: round {round}: {what} (replay with OVLFUSE_SEED={seed:#x}):\n  {}",
        problems.join("\n  ")
    )
}

/// Runs every round on one transport; panics at the first inconsistency.
fn kill_rounds(transport_opts: &str, label: &str) {
    // The model's modes are the created ones: no umask on this process's creations.
    // SAFETY: umask only changes this process's file-creation mask.
    unsafe { libc::umask(0o022) };
    let seed = seed_for(label);
    let rounds = env_count("OVLFUSE_DEATH_ROUNDS", 5, 30);
    let mut r = Rng::new(seed);
    let s = Scratch::new();
    let l = s.layers(2, true);
    build(&l);
    let opts = format!("{OPTS},{transport_opts}");
    let work_dir = l.work.clone().expect("work").join("work");
    let fail =
        |round: usize, what: &str, problems: &[String]| fail(label, seed, round, what, problems);

    // Round 0: the models start from what the union shows, checked against the kernel.
    let m = mount_ovlfuse(&l, &opts);
    let mut models = Vec::new();
    for w in 0..WORKERS {
        let root = m.p(&format!("w{w}"));
        match with_timeout(60, move || observe(&root)) {
            Ok(model) => models.push(model),
            Err(e) => fail(0, "initial view", &e),
        }
    }
    let snap = snapshot_of(&m);
    drop(m);
    let problems = compare_with_kernel(&l, &snap);
    if !problems.is_empty() {
        fail(0, "initial view differs from the kernel's", &problems);
    }

    let initial = models.clone();
    let (mut inflight_kills, mut staged_kills, mut ops_total) = (0, 0, 0);
    let mut eio_kills = 0;
    for round in 1..=rounds {
        if round % EPOCH == 1 && round > 1 {
            // A fresh upper layer every few rounds: the lower files need copying up again,
            // so kills keep landing in copy-ups.
            let (upper, workdir) = l.upper_and_work();
            for d in [upper, workdir] {
                fs::remove_dir_all(&d).expect("wipe upper/work");
                fs::create_dir(&d).expect("recreate upper/work");
            }
            models = initial.clone();
        }
        let mut m = mount_ovlfuse(&l, &opts);
        let pid = m.daemon_pid().expect("daemon pid");
        let killed = Arc::new(AtomicBool::new(false));
        let handles: Vec<_> = models
            .iter()
            .enumerate()
            .map(|(w, model)| {
                let root = m.p(&format!("w{w}"));
                let worker = Worker {
                    committed: model.clone(),
                    inflight: None,
                    done: 0,
                    eio_at_kill: false,
                    unexpected: None,
                };
                let (wr, k) = (Rng::new(r.next()), killed.clone());
                std::thread::spawn(move || work(root, worker, wr, k))
            })
            .collect();
        // Early kills land in the copy-ups that start an epoch, later ones in whatever the
        // workers have got to.
        let delay = Duration::from_millis(if r.chance(50) {
            r.range(2, 100)
        } else {
            r.range(100, 600)
        });
        std::thread::sleep(delay);
        killed.store(true, Ordering::SeqCst);
        // SAFETY: killing the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while handles.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if handles.iter().any(|h| !h.is_finished()) {
            m.unmount();
            fail(round, "a worker still blocked 30 s after the kill", &[]);
        }
        let workers: Vec<Worker> = handles
            .into_iter()
            .map(|h| h.join().expect("worker thread"))
            .collect();
        // The dead mount answers ENOTCONN; the guard unmounts it (lazily if busy).
        m.unmount();
        let raw_leftovers = work_leftovers(&work_dir);
        if !raw_leftovers.is_empty() {
            staged_kills += 1;
        }
        let unexpected: Vec<String> = workers
            .iter()
            .enumerate()
            .filter_map(|(i, w)| w.unexpected.as_ref().map(|u| format!("worker {i}: {u}")))
            .collect();
        if !unexpected.is_empty() {
            fail(round, "an operation failed before the kill", &unexpected);
        }

        let m = mount_ovlfuse(&l, &opts);
        let mut problems = workdir_problems(&l, m.daemon_pid());
        let mut summary = Vec::new();
        for (i, w) in workers.into_iter().enumerate() {
            ops_total += w.done;
            eio_kills += w.eio_at_kill as usize;
            let (allowed, what) = match w.inflight {
                Some((op, mut states)) => {
                    inflight_kills += 1;
                    let after = states.len() - 1;
                    states.extend(torn_write_states(&states[0], &op));
                    let allowed = Allowed { states, after };
                    (allowed, op.to_string())
                }
                None => {
                    let allowed = Allowed {
                        states: vec![w.committed],
                        after: 0,
                    };
                    (allowed, "nothing".to_string())
                }
            };
            let root = m.p(&format!("w{i}"));
            let (what2, after) = (what.clone(), allowed.after);
            match with_timeout(60, move || check_subtree(&root, &allowed)) {
                Ok((got, which)) => {
                    let which = match which {
                        0 => "before".to_string(),
                        n if n == after => "after".to_string(),
                        n => format!("intermediate #{n}"),
                    };
                    summary.push(format!(
                        "w{i}: {} ops, in flight: {what2} -> {which}",
                        w.done
                    ));
                    models[i] = got;
                }
                Err(e) => {
                    problems.push(format!("worker {i}, in flight: {what}"));
                    problems.extend(e);
                }
            }
        }
        let snap = snapshot_of(&m);
        drop(m);
        problems.extend(compare_with_kernel(&l, &snap));
        eprintln!(
            "{label}: round {round}: killed after {delay:?}; work dir leftovers {:?}; {}",
            raw_leftovers,
            summary.join("; ")
        );
        if !problems.is_empty() {
            problems.extend(upper_dump(&l, &problems));
            fail(round, "inconsistent after the kill", &problems);
        }
    }
    eprintln!(
        "{label}: {rounds} kills, {ops_total} ops completed, {inflight_kills} ops interrupted, \
         {staged_kills} kills left staged objects in workdir/work, {eio_kills} ops in flight \
         got EIO"
    );
    assert!(
        inflight_kills > 0,
        "no kill landed during an operation: the test proved nothing (seed {seed:#x})"
    );
}

#[test]
fn kill_9_during_copy_up_rename_unlink_work_fuse() {
    let _one_at_a_time = killing_alone();
    kill_rounds("nofuseblk", "kill_9_fuse");
}

/// fuseblk reading every request from /dev/fuse (see the io_uring note in README).
#[test]
fn kill_9_during_copy_up_rename_unlink_work_fuseblk_without_io_uring() {
    let _one_at_a_time = killing_alone();
    kill_rounds("nouring", "kill_9_fuseblk_nouring");
}

#[test]
fn kill_9_during_copy_up_rename_unlink_work_fuseblk() {
    let _one_at_a_time = killing_alone();
    kill_rounds("", "kill_9_fuseblk");
}

// ---------------------------------------------------------------------------
// teeth: the checks above catch what they are meant to catch
// ---------------------------------------------------------------------------

/// Planted defects — a partial copy, an empty file under a lower name, a whiteout over a
/// live file, an unaccounted-for file, a temp left in the work dir — are each reported by
/// the checks the kill rounds use.
#[test]
fn checks_catch_partial_empty_hidden_and_leftover_entries() {
    let s = Scratch::new();
    let l = s.layers(2, true);
    build(&l);
    let m = mount_ovlfuse(&l, OPTS);
    let root = m.p("w0");
    let model = with_timeout(60, move || observe(&root)).expect("initial view");
    drop(m);
    let work = l.work.clone().expect("work");
    let lower_f1 = fs::read(l.lower(1).p("w0/f1")).unwrap();
    // partial copy of f1, empty f3, whiteout over d0/f0, an extra file
    let u = l.up();
    u.write_file("w0/f1", &lower_f1[..lower_f1.len() / 2], 0o600);
    u.write_file("w0/f3", b"", 0o755);
    u.whiteout("w0/d0/f0");
    u.write_file("w0/extra", b"x", 0o644);
    fs::create_dir_all(work.join("work")).unwrap();
    // A leftover of an interrupted copy-up: the mount must remove it.
    fs::write(work.join("work/#ovlfuse-cu-1-1"), b"partial").unwrap();
    let m = mount_ovlfuse(&l, OPTS);
    assert!(
        workdir_problems(&l, m.daemon_pid()).is_empty(),
        "the mount cleans its own leftovers"
    );
    let root = m.p("w0");
    let st = Allowed {
        states: vec![model.clone()],
        after: 0,
    };
    let problems = with_timeout(60, move || check_subtree(&root, &st))
        .expect_err("planted defects must be reported");
    let text = problems.join("\n");
    for want in [
        "f1: want file 0600 len=204800",
        "(PARTIAL",
        "f3: want file 0755 len=1048576",
        "(EMPTY file under the name)",
        "d0/f0: missing",
        "extra: unexpected file",
    ] {
        assert!(text.contains(want), "{want:?} not reported in:\n{text}");
    }
    // The defects are in the layers, not in ovlfuse's reading of them: the kernel agrees.
    let snap = snapshot_of(&m);
    drop(m);
    assert!(compare_with_kernel(&l, &snap).is_empty());
    // ... and reports a view that is not the layers' (here: changed after the snapshot).
    u.write_file("w0/late", b"written after the snapshot", 0o644);
    let d = compare_with_kernel(&l, &snap);
    assert!(
        d.iter().any(|l| l.contains("w0/late: only in kernel")),
        "{d:?}"
    );
    // A leftover or a dead daemon's status file found after a mount is reported.
    fs::write(work.join("work/#ovlfuse-cu-9-9"), b"").unwrap();
    fs::write(work.join(".ovlfuse-status.next-999999"), b"").unwrap();
    let p = workdir_problems(&l, Some(1));
    assert_eq!(p.len(), 2, "{p:?}");
}

/// The model agrees with the kernel overlay on every operation kind: the same random
/// operations on the kernel overlay (no kill) leave exactly the model's state.
#[test]
fn model_matches_the_kernel_overlay() {
    // SAFETY: only this process's file-creation mask.
    unsafe { libc::umask(0o022) };
    let seed = seed_for("model_matches_the_kernel_overlay");
    let s = Scratch::new();
    let l = s.layers(2, true);
    build(&l);
    let k = mount_kernel_overlay_opts(&l, OPTS);
    let root = k.p("w0");
    let (ops, problems) = with_timeout(120, move || {
        let mut r = Rng::new(seed);
        let mut m = observe(&root).expect("initial view");
        for i in 0..400 {
            let op = pick_op(&mut r, &m);
            if let Err(e) = execute(&root, &op) {
                return (i, vec![format!("op {i}: {op}: {e}")]);
            }
            m = states_after(&m, &op).pop().unwrap();
            let got = match observe(&root) {
                Ok(g) => g,
                Err(e) => return (i, e),
            };
            let d = model_diff(&m, &got);
            if !d.is_empty() {
                let mut v = vec![format!("after op {i}: {op}")];
                v.extend(d);
                return (i, v);
            }
        }
        (400, vec![])
    });
    assert!(
        problems.is_empty(),
        "kernel overlay and model differ (OVLFUSE_SEED={seed:#x}), after {ops} ops:\n  {}",
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------
// deterministic kills: the daemon dies at its first fchmodat
// ---------------------------------------------------------------------------

/// Mounts ovlfuse on `l` as a daemon the kernel kills at its first `fchmodat`.
fn mount_dying_at_fchmodat(l: &Layers, opts: &str) -> Mounted {
    mount_dying(l, opts, die_at_first_fchmodat)
}

/// Mounts ovlfuse on `l` as a daemon with the seccomp hook `die` (see `common::load`).
fn mount_dying(l: &Layers, opts: &str, die: fn() -> io::Result<()>) -> Mounted {
    use std::os::unix::process::CommandExt;
    let opts = format!("{},{opts}", l.mount_opts());
    let opts = opts.trim_end_matches(',').to_string();
    mount_ovlfuse_command(l, |mnt| {
        let mut cmd = std::process::Command::new(ovlfuse_bin());
        cmd.arg("-o").arg(&opts).arg(mnt);
        // SAFETY: the hook only makes async-signal-safe prctl calls.
        unsafe { cmd.pre_exec(die) };
        cmd
    })
}

/// Waits (bounded) for the daemon to be gone.
fn wait_dead(pid: i32) -> bool {
    poll_until(Duration::from_secs(10), || (!pid_alive(pid)).then_some(())).is_some()
}

/// A copy-up killed after its data was copied, while its temporary object in the work dir
/// gets its mode (the daemon dies at that `fchmodat`), leaves the lower objects showing,
/// unchanged, and a remount removes the temporary object — on both transports, for a file
/// and for a directory.
#[test]
fn kill_inside_copy_up_leaves_the_lower_object_and_a_clean_work_dir() {
    let _one_at_a_time = killing_alone();
    for transport in ["nofuseblk", ""] {
        let s = Scratch::new();
        let l = s.layers(1, true);
        let big = noise(3 << 20, 77);
        l.lower(0)
            .write_file("f", &big, 0o644)
            .write_file("d/g", b"in a lower dir\n", 0o640);
        let work = l.work.clone().expect("work").join("work");
        for (target, what) in [("f", "file"), ("d/g", "parent directory")] {
            let m = mount_dying_at_fchmodat(&l, transport);
            let pid = m.daemon_pid().expect("daemon pid");
            let p = m.p(target);
            let r = with_timeout(30, move || {
                fs::set_permissions(&p, fs::Permissions::from_mode(0o600))
            });
            let e = r.expect_err("the daemon dies inside the copy-up");
            assert!(
                e.raw_os_error().is_some_and(is_conn_error),
                "{transport:?} {target}: {e}"
            );
            assert!(wait_dead(pid), "the daemon did not die");
            drop(m);
            // The kill landed inside the copy-up: its temporary object is still there,
            // and nothing under the real name.
            let left = work_leftovers(&work);
            assert_eq!(left.len(), 1, "{transport:?} {target} ({what}): {left:?}");
            let upper = l.upper.clone().expect("upper");
            assert!(
                !upper.join(target).exists() && !upper.join("f").exists(),
                "{transport:?}: a copy-up killed before its rename is visible"
            );
            let m = mount_ovlfuse(&l, transport);
            assert!(
                workdir_problems(&l, m.daemon_pid()).is_empty(),
                "{transport:?}: {:?}",
                workdir_problems(&l, m.daemon_pid())
            );
            let root = m.path().to_path_buf();
            let (data, mode) = with_timeout(30, move || {
                let md = fs::metadata(root.join("f")).expect("stat f");
                (
                    fs::read(root.join("f")).expect("read f"),
                    md.mode() & 0o7777,
                )
            });
            assert!(data == big && mode == 0o644, "{transport:?}: f changed");
            let snap = snapshot_of(&m);
            drop(m);
            let d = compare_with_kernel(&l, &snap);
            assert!(d.is_empty(), "{transport:?}: {d:?}");
        }
    }
}

/// A new directory or file must appear whole or not at all. Made in place as the caller (a
/// user other than root here), it has its owner and mode from the system call that makes it:
/// a daemon killed right after (at the `setfsuid(0)` that ends acting as the caller) leaves
/// it whole or not there. Made over a whiteout, it is built in the work dir and swapped into
/// place, as the kernel overlay does: a daemon killed while it gets its mode there (at that
/// `fchmodat`) must not leave a directory with mode 0700 where mkdir asked for 0755.
#[test]
fn kill_while_making_a_new_object_leaves_nothing_or_the_whole_object() {
    let _one_at_a_time = killing_alone();
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0).write_file("lower", b"x", 0o644);
    l.up().whiteout("lower");
    // The user may create in the union's root.
    fs::set_permissions(l.up().path(), fs::Permissions::from_mode(0o777)).unwrap();
    let user = 4321;
    let mut problems = Vec::new();
    for (name, mkdir, as_user) in [
        ("newdir", true, true),
        ("newfile", false, true),
        ("lower", true, false),
    ] {
        let die = if as_user {
            die_at_first_setfsuid_root
        } else {
            die_at_first_fchmodat
        };
        let m = mount_dying(&l, "nofuseblk", die);
        let pid = m.daemon_pid().expect("daemon pid");
        let p = m.p(name);
        let make = if mkdir {
            format!("umask 022; mkdir '{}'", p.display())
        } else {
            format!("umask 022; : > '{}'", p.display())
        };
        let mut argv: Vec<String> = Vec::new();
        if as_user {
            argv.extend(
                [
                    "setpriv",
                    "--reuid",
                    "4321",
                    "--regid",
                    "4321",
                    "--clear-groups",
                ]
                .map(String::from),
            );
        }
        argv.extend(["sh".to_string(), "-c".to_string(), make]);
        let out = run_argv(&argv, Duration::from_secs(30));
        assert!(
            !out.ok(),
            "the daemon dies while creating {name}: {}",
            out.stderr
        );
        assert!(wait_dead(pid), "the daemon did not die");
        drop(m);
        let m = mount_ovlfuse(&l, "nofuseblk");
        let p = m.p(name);
        let md = with_timeout(30, move || fs::symlink_metadata(&p));
        match md {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(md) => {
                let want = if mkdir { 0o755 } else { 0o644 };
                if md.mode() & 0o7777 != want {
                    problems.push(format!(
                        "{name}: mode {:04o} after the kill (asked for {want:04o})",
                        md.mode() & 0o7777
                    ));
                }
                let owner = if as_user { user } else { 0 };
                if (md.uid(), md.gid()) != (owner, owner) {
                    problems.push(format!(
                        "{name}: owner {}:{} after the kill (made by {owner})",
                        md.uid(),
                        md.gid()
                    ));
                }
            }
            Err(e) => problems.push(format!("{name}: {e}")),
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// An rmdir of a directory lower layers take part in replaces it with a whiteout in one
/// exchange, then removes the old upper directory (and the whiteouts in it) from the work
/// dir: a daemon killed in that removal has already done the rmdir, and the next mount
/// removes the leftover.
#[test]
fn kill_after_the_exchange_of_an_rmdir_leaves_it_done() {
    let _one_at_a_time = killing_alone();
    {
        let transport = "nofuseblk";
        let s = Scratch::new();
        let l = s.layers(1, true);
        l.lower(0).write_file("d/x", b"x", 0o644);
        l.up().mkdir("d", 0o755).whiteout("d/x");
        clear_stale_registry_entries(&l);
        let m = mount_dying(&l, transport, die_at_first_unlink);
        let pid = m.daemon_pid().expect("daemon pid");
        let p = m.p("d");
        let _ = with_timeout(30, move || fs::remove_dir(&p));
        assert!(wait_dead(pid), "the daemon did not die");
        drop(m);
        let work = l.work.clone().expect("work").join("work");
        assert_eq!(
            work_leftovers(&work).len(),
            1,
            "{transport:?}: killed elsewhere"
        );
        let m = mount_ovlfuse(&l, transport);
        assert!(
            workdir_problems(&l, m.daemon_pid()).is_empty(),
            "{transport:?}"
        );
        let p = m.p("d");
        let gone = with_timeout(30, move || fs::symlink_metadata(&p));
        assert!(
            gone.is_err_and(|e| e.kind() == io::ErrorKind::NotFound),
            "{transport:?}: d is back"
        );
        let snap = snapshot_of(&m);
        drop(m);
        let d = compare_with_kernel(&l, &snap);
        assert!(d.is_empty(), "{transport:?}: {d:?}");
    }
}

/// A rename of a directory over one that lower layers take part in (empty in the union)
/// must leave the target in its before or after state, even when the daemon is killed
/// while the target's old upper directory (with its whiteouts) is being removed: the name
/// must never show the lower entries the union had deleted. Like the kernel overlay
/// (`ovl_clear_empty`), ovlfuse first exchanges the target with an empty opaque directory
/// made in the work dir, so the name never disappears.
#[test]
fn kill_inside_a_rename_over_a_merged_directory_leaves_the_before_or_after_state() {
    let _one_at_a_time = killing_alone();
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0).write_file("target/x", b"lower\n", 0o644);
    // target: a directory lower layers take part in, emptied by a whiteout; src: upper only.
    l.up()
        .mkdir("target", 0o755)
        .whiteout("target/x")
        .write_file("src/f", b"moved\n", 0o644);
    clear_stale_registry_entries(&l);
    let m = mount_dying(&l, "nofuseblk", die_at_first_unlink);
    let pid = m.daemon_pid().expect("daemon pid");
    let (a, b) = (m.p("src"), m.p("target"));
    let _ = with_timeout(30, move || fs::rename(&a, &b));
    assert!(wait_dead(pid), "the daemon did not die");
    drop(m);
    let m = mount_ovlfuse(&l, "nofuseblk");
    let root = m.path().to_path_buf();
    let view = with_timeout(30, move || observe(&root)).expect("view");
    drop(m);
    let dir = || MEntry::Dir { mode: 0o755 };
    let file = || MEntry::File {
        data: b"moved\n".to_vec(),
        mode: 0o644,
    };
    let before: Model = [
        ("src".to_string(), dir()),
        ("src/f".to_string(), file()),
        ("target".to_string(), dir()),
    ]
    .into_iter()
    .collect();
    let after: Model = [
        ("target".to_string(), dir()),
        ("target/f".to_string(), file()),
    ]
    .into_iter()
    .collect();
    assert!(
        view == before || view == after,
        "neither before nor after the rename:\n  vs before: {:?}\n  vs after: {:?}",
        model_diff(&before, &view),
        model_diff(&after, &view)
    );
}
