//! Concurrency and load: many threads on the same names and the same lower files at once,
//! fsx-style data checks on files that start in a lower layer, a long random operation
//! sequence checked against the kernel overlayfs, and the daemon's memory and descriptors
//! after load. No deadlock (a watchdog fails the test when a thread makes no progress for
//! 30 s), no lost write, no wrong data.
//!
//! Environment: `OVLFUSE_FULL=1` runs minutes instead of seconds; `OVLFUSE_LOAD_SECS` sets
//! each timed phase; `OVLFUSE_LOAD_OPS` the length of the random sequence; `OVLFUSE_SEED`
//! replays a run (every test prints its seed).

mod common;

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::load::*;
use common::*;

/// A thread making no progress for this long is a hang.
const STALL: Duration = Duration::from_secs(30);

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(-1)
}

/// Runs `threads` workers (`body(i)`, which must call `progress.tick(i)` after every
/// operation and return when its time is up) under the watchdog. On a stall: the daemon's
/// kernel stacks go into the panic message, the daemon is killed (which unblocks the
/// workers) and the test fails instead of hanging.
fn run_watched<T: Send + 'static>(
    threads: usize,
    daemon: Option<i32>,
    stall: Duration,
    body: impl Fn(usize, &Progress) -> T + Send + Sync + 'static,
) -> Result<Vec<T>, String> {
    let progress = Arc::new(Progress::new(threads));
    let body = Arc::new(body);
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (p, b) = (progress.clone(), body.clone());
            std::thread::Builder::new()
                .name(format!("load-{i}"))
                .spawn(move || {
                    struct Finish(Arc<Progress>, usize);
                    impl Drop for Finish {
                        fn drop(&mut self) {
                            self.0.finish(self.1);
                        }
                    }
                    let _f = Finish(p.clone(), i);
                    b(i, &p)
                })
                .expect("spawn load thread")
        })
        .collect();
    if let Err(stuck) = progress.watch(stall) {
        let stacks = daemon.map(daemon_stacks).unwrap_or_default();
        if let Some(pid) = daemon {
            // SAFETY: killing the daemon this test started, to unblock its callers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        return Err(format!(
            "no progress for {stall:?} (deadlock?):\n{stuck}\ndaemon threads:\n{stacks}"
        ));
    }
    Ok(handles
        .into_iter()
        .map(|h| match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        })
        .collect())
}

// ---------------------------------------------------------------------------
// self-describing contents
// ---------------------------------------------------------------------------

/// `REC <writer> <seq> <len>\n` then `len` bytes of noise seeded by writer and seq: any
/// mix-up of two writes, a cut or a shift shows.
fn record(writer: u64, seq: u64, len: usize) -> Vec<u8> {
    let mut v = format!("REC {writer} {seq} {len}\n").into_bytes();
    v.extend(noise(len, (writer << 40) ^ seq ^ 0x5eed));
    v
}

/// `Ok((writer, seq))` if `b` is a whole record.
fn parse_record(b: &[u8]) -> Result<(u64, u64), String> {
    let nl = b
        .iter()
        .position(|c| *c == b'\n')
        .ok_or_else(|| format!("no record header in {} bytes", b.len()))?;
    let head = String::from_utf8_lossy(&b[..nl]).into_owned();
    let f: Vec<&str> = head.split(' ').collect();
    let parsed = match f.as_slice() {
        ["REC", w, s, l] => w
            .parse::<u64>()
            .ok()
            .zip(s.parse::<u64>().ok())
            .zip(l.parse::<usize>().ok()),
        _ => None,
    };
    let ((w, s), l) = parsed.ok_or_else(|| format!("bad record header {head:?}"))?;
    if b != record(w, s, l).as_slice() {
        return Err(format!(
            "record {head:?}: {} bytes, not the {} it names, or wrong bytes",
            b.len(),
            nl + 1 + l
        ));
    }
    Ok((w, s))
}

// ---------------------------------------------------------------------------
// many threads, shared names
// ---------------------------------------------------------------------------

const HAMMER_THREADS: usize = 8;

/// Copy-up targets: lower files every thread opens for writing at once.
const CU_FILES: usize = 4;
const BLOCK: usize = 4096;
const CU_BLOCKS: usize = 256;
/// Blocks of a copy-up target each thread owns (it alone writes them).
const SLOTS: usize = 4;
const SLOT_BASE: usize = 8;
const SHARED_DIRS: [&str; 3] = ["s0", "s1", "s2"];
const SHARED_NAMES: usize = 10;
/// Writer id of the records the layers start with.
const LOWER_WRITER: u64 = 99;

fn cu_block_original(file: usize, block: usize) -> Vec<u8> {
    noise(BLOCK, ((file as u64) << 20) | block as u64 | 1 << 40)
}

fn slot_block(tid: usize, j: usize) -> usize {
    SLOT_BASE + tid * SLOTS + j
}

/// A block a thread writes in its slot: a record padded to the block size with its seq.
fn slot_content(tid: usize, j: usize, seq: u64) -> Vec<u8> {
    let mut v = record(tid as u64, seq, 64);
    v.resize(BLOCK, (j as u8) ^ (seq as u8));
    v
}

fn hammer_build(l: &Layers) {
    let (l0, l1) = (l.lower(0), l.lower(1));
    for f in 0..CU_FILES {
        let data: Vec<u8> = (0..CU_BLOCKS)
            .flat_map(|b| cu_block_original(f, b))
            .collect();
        let layer = if f == CU_FILES - 1 { &l0 } else { &l1 };
        layer.write_file(&format!("cu/c{f}"), &data, 0o644);
    }
    for (i, n) in ["n0", "n1", "n2", "n3"].iter().enumerate() {
        l1.write_file(
            &format!("s0/{n}"),
            &record(LOWER_WRITER, i as u64, 3000 * i),
            0o644,
        );
    }
    l1.write_file("s0/n4/x", &record(LOWER_WRITER, 10, 100), 0o644);
    l0.write_file("s0/n5", &record(LOWER_WRITER, 11, 20_000), 0o600)
        .write_file("s0/n6", &record(LOWER_WRITER, 12, 5), 0o644)
        .write_file("s1/n0", &record(LOWER_WRITER, 13, 70_000), 0o644)
        .write_file("s1/n7", &record(LOWER_WRITER, 14, 10), 0o644)
        .mkdir("s1/n8", 0o755)
        .mkdir("s2", 0o755);
}

/// The last record each thread wrote in each of its slots, per copy-up target.
type SlotLog = Vec<[[Option<u64>; SLOTS]; CU_FILES]>;

fn check_cu_file(file: usize, data: &[u8], slots: &SlotLog) -> Vec<String> {
    let mut v = Vec::new();
    if data.len() != CU_BLOCKS * BLOCK {
        v.push(format!(
            "cu/c{file}: size {} (want {})",
            data.len(),
            CU_BLOCKS * BLOCK
        ));
        return v;
    }
    for b in 0..CU_BLOCKS {
        let got = &data[b * BLOCK..(b + 1) * BLOCK];
        let owner = (SLOT_BASE..SLOT_BASE + HAMMER_THREADS * SLOTS)
            .contains(&b)
            .then(|| ((b - SLOT_BASE) / SLOTS, (b - SLOT_BASE) % SLOTS));
        let want = match owner.and_then(|(t, j)| slots[t][file][j].map(|s| (t, j, s))) {
            Some((t, j, seq)) => slot_content(t, j, seq),
            None => cu_block_original(file, b),
        };
        if got != want.as_slice() {
            let what = match (owner, parse_record(&got[..got.len().min(200)])) {
                (Some((t, j)), _) => format!("slot {j} of thread {t}"),
                (None, _) => "lower data".to_string(),
            };
            v.push(format!(
                "cu/c{file} block {b} ({what}): wrong data (starts {:?})",
                String::from_utf8_lossy(&got[..24])
            ));
        }
    }
    v
}

#[derive(Default)]
struct HammerOut {
    ops: u64,
    errors: Vec<String>,
    slots: [[Option<u64>; SLOTS]; CU_FILES],
    /// Operations that failed with an allowed errno (contention).
    refused: u64,
}

fn hammer_thread(root: &Path, tid: usize, seed: u64, until: Instant, p: &Progress) -> HammerOut {
    let mut r = Rng::new(seed);
    let mut out = HammerOut::default();
    let mut seq = 0u64;
    let shared =
        |r: &mut Rng| format!("{}/n{}", r.pick(&SHARED_DIRS), r.below(SHARED_NAMES as u64));
    let fail = |out: &mut HammerOut, what: &str, e: String| {
        if out.errors.len() < 5 {
            out.errors.push(format!("thread {tid}: {what}: {e}"));
        }
    };
    while Instant::now() < until && out.errors.len() < 5 {
        seq += 1;
        let pick = r.below(100);
        // What may legitimately fail, given other threads racing on the same names.
        let (what, res, allowed): (String, io::Result<()>, &[i32]) = match pick {
            0..=11 => {
                let dir = r.pick(&SHARED_DIRS);
                let tmp = root.join(format!("{dir}/.t{tid}"));
                let to = shared(&mut r);
                let data = record(tid as u64, seq, r.below(20_000) as usize);
                p.doing(tid, format!("publish {to}"));
                let res = fs::write(&tmp, &data).and_then(|()| {
                    fs::rename(&tmp, root.join(&to)).inspect_err(|_| {
                        let _ = fs::remove_file(&tmp);
                    })
                });
                (format!("publish {to}"), res, &[libc::EISDIR][..])
            }
            12..=19 => {
                let n = shared(&mut r);
                p.doing(tid, format!("create {n}"));
                let res = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o644)
                    .open(root.join(&n))
                    .map(drop);
                (format!("create {n}"), res, &[libc::EEXIST][..])
            }
            20..=27 => {
                let n = shared(&mut r);
                p.doing(tid, format!("unlink {n}"));
                let res = fs::remove_file(root.join(&n));
                (
                    format!("unlink {n}"),
                    res,
                    &[libc::ENOENT, libc::EISDIR][..],
                )
            }
            28..=33 => {
                let (a, b) = (shared(&mut r), shared(&mut r));
                p.doing(tid, format!("rename {a} {b}"));
                let res = fs::rename(root.join(&a), root.join(&b));
                (
                    format!("rename {a} {b}"),
                    res,
                    &[
                        libc::ENOENT,
                        libc::EISDIR,
                        libc::ENOTDIR,
                        libc::ENOTEMPTY,
                        // a directory lower layers take part in (redirect_dir=off)
                        libc::EXDEV,
                    ][..],
                )
            }
            34..=37 => {
                let n = shared(&mut r);
                p.doing(tid, format!("mkdir {n}"));
                let res = fs::create_dir(root.join(&n));
                (format!("mkdir {n}"), res, &[libc::EEXIST][..])
            }
            38..=41 => {
                let n = shared(&mut r);
                p.doing(tid, format!("rmdir {n}"));
                let res = fs::remove_dir(root.join(&n));
                (
                    format!("rmdir {n}"),
                    res,
                    &[libc::ENOENT, libc::ENOTDIR, libc::ENOTEMPTY][..],
                )
            }
            42..=51 => {
                let d = if r.chance(70) {
                    r.pick(&SHARED_DIRS).to_string()
                } else {
                    shared(&mut r)
                };
                p.doing(tid, format!("readdir {d}"));
                let res =
                    readdir_raw(&root.join(&d)).and_then(|raw| {
                        // A directory removed while it is listed reads as empty, without
                        // even "." and ".." (getdents says ENOENT, which libc takes as the
                        // end), on every filesystem.
                        let mut bad = if raw.is_empty() {
                            Vec::new()
                        } else {
                            readdir_problems(&raw)
                        };
                        bad.extend(raw.iter().map(|n| n.to_string_lossy().into_owned()).filter(
                            |n| {
                                n.starts_with(".wh.")
                                    || n.starts_with("#ovlfuse")
                                    || n.contains("overlay")
                            },
                        ));
                        if bad.is_empty() {
                            Ok(())
                        } else {
                            Err(io::Error::other(format!("listing problems {bad:?}")))
                        }
                    });
                (
                    format!("readdir {d}"),
                    res,
                    &[libc::ENOENT, libc::ENOTDIR][..],
                )
            }
            52..=59 => {
                let n = shared(&mut r);
                p.doing(tid, format!("stat {n}"));
                let res = fs::symlink_metadata(root.join(&n)).map(drop);
                (format!("stat {n}"), res, &[libc::ENOENT][..])
            }
            60..=67 => {
                let n = shared(&mut r);
                p.doing(tid, format!("read {n}"));
                let res = fs::read(root.join(&n)).and_then(|b| {
                    if b.is_empty() {
                        return Ok(());
                    }
                    parse_record(&b).map(drop).map_err(io::Error::other)
                });
                (format!("read {n}"), res, &[libc::ENOENT, libc::EISDIR][..])
            }
            68..=71 => {
                let n = shared(&mut r);
                let mode = *r.pick(&[0o600, 0o644, 0o755]);
                p.doing(tid, format!("chmod {n}"));
                let res = fs::set_permissions(root.join(&n), fs::Permissions::from_mode(mode));
                (format!("chmod {n} {mode:o}"), res, &[libc::ENOENT][..])
            }
            72..=89 => {
                // Copy-up by every thread of the same lower files, then a write of an own block.
                let f = r.below(CU_FILES as u64) as usize;
                let j = r.below(SLOTS as u64) as usize;
                let path = root.join(format!("cu/c{f}"));
                p.doing(tid, format!("write cu/c{f} slot {j}"));
                let data = slot_content(tid, j, seq);
                let off = (slot_block(tid, j) * BLOCK) as u64;
                let res = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .and_then(|file| {
                        file.write_all_at(&data, off)?;
                        out.slots[f][j] = Some(seq);
                        // Read-your-write, and a lower block next to it, through the same fd.
                        let mut back = vec![0u8; BLOCK];
                        file.read_exact_at(&mut back, off)?;
                        if back != data {
                            return Err(io::Error::other("own block reads back different"));
                        }
                        let b = r.below(SLOT_BASE as u64) as usize;
                        file.read_exact_at(&mut back, (b * BLOCK) as u64)?;
                        if back != cu_block_original(f, b) {
                            return Err(io::Error::other(format!("lower block {b} changed")));
                        }
                        Ok(())
                    });
                (format!("write cu/c{f} slot {j}"), res, &[][..])
            }
            90..=94 => {
                let f = r.below(CU_FILES as u64);
                let mode = *r.pick(&[0o644, 0o664]);
                p.doing(tid, format!("chmod cu/c{f}"));
                let res = fs::set_permissions(
                    root.join(format!("cu/c{f}")),
                    fs::Permissions::from_mode(mode),
                );
                (format!("chmod cu/c{f}"), res, &[][..])
            }
            _ => {
                // Read-only: the lower blocks, and this thread's own slots, are exact.
                let f = r.below(CU_FILES as u64) as usize;
                p.doing(tid, format!("read cu/c{f}"));
                let res = fs::read(root.join(format!("cu/c{f}"))).and_then(|data| {
                    let mut only_mine: SlotLog = vec![[[None; SLOTS]; CU_FILES]; HAMMER_THREADS];
                    only_mine[tid] = out.slots;
                    let problems: Vec<String> = check_cu_file(f, &data, &only_mine)
                        .into_iter()
                        // Other threads' slots change under us.
                        .filter(|l| !l.contains("slot") || l.contains(&format!("thread {tid})")))
                        .collect();
                    if problems.is_empty() {
                        Ok(())
                    } else {
                        Err(io::Error::other(problems.join("; ")))
                    }
                });
                (format!("read cu/c{f}"), res, &[][..])
            }
        };
        match res {
            Ok(()) => {}
            Err(e) if e.raw_os_error().is_some_and(|n| allowed.contains(&n)) => out.refused += 1,
            Err(e) => fail(&mut out, &what, format!("{e} ({})", errno_name(errno(&e)))),
        }
        out.ops += 1;
        p.tick(tid);
    }
    out
}

/// Merged views of the shared names: every file is empty or a whole record, no private
/// name shows.
fn shared_view_problems(root: &Path) -> Vec<String> {
    let mut v = Vec::new();
    let snap = snapshot(root);
    v.extend(snapshot_problems(&snap));
    for (p, e) in &snap {
        let s = p.to_string_lossy();
        if !(s.starts_with("s0") || s.starts_with("s1") || s.starts_with("s2")) {
            continue;
        }
        if e.kind == Kind::File && e.size > 0 {
            match fs::read(root.join(p)) {
                Ok(b) => {
                    if let Err(err) = parse_record(&b) {
                        v.push(format!("{s}: {err}"));
                    }
                }
                Err(err) => v.push(format!("{s}: read: {err}")),
            }
        }
        if !matches!(e.kind, Kind::File | Kind::Dir) {
            v.push(format!("{s}: unexpected {:?}", e.kind));
        }
    }
    v
}

fn hammer(transport: &str, label: &str) {
    let seed = seed_for(label);
    let secs = load_secs(6, 120);
    let s = Scratch::new();
    let l = s.layers(2, true);
    hammer_build(&l);
    let m = mount_ovlfuse(&l, transport);
    let pid = m.daemon_pid();
    let root = m.path().to_path_buf();
    let until = Instant::now() + secs;
    let outs = run_watched(HAMMER_THREADS, pid, STALL, move |i, p| {
        hammer_thread(&root, i, seed ^ (i as u64 * 0x9e37), until, p)
    })
    .unwrap_or_else(|e| panic!("{label} (OVLFUSE_SEED={seed:#x}): {e}"));
    let errors: Vec<String> = outs.iter().flat_map(|o| o.errors.clone()).collect();
    let (ops, refused): (u64, u64) = outs
        .iter()
        .fold((0, 0), |(a, b), o| (a + o.ops, b + o.refused));
    eprintln!(
        "{label}: {HAMMER_THREADS} threads, {ops} ops in {secs:?} ({refused} refused by \
         contention: ENOENT, EEXIST, ...)"
    );
    assert!(
        errors.is_empty(),
        "{label} (OVLFUSE_SEED={seed:#x}): {} unexpected results:\n  {}",
        errors.len(),
        errors.join("\n  ")
    );
    let slots: SlotLog = outs.iter().map(|o| o.slots).collect();
    let check_all = move |root: PathBuf| -> Vec<String> {
        let mut v = Vec::new();
        for f in 0..CU_FILES {
            match fs::read(root.join(format!("cu/c{f}"))) {
                Ok(d) => v.extend(check_cu_file(f, &d, &slots)),
                Err(e) => v.push(format!("cu/c{f}: {e}")),
            }
        }
        v.extend(shared_view_problems(&root));
        v
    };
    let root = m.path().to_path_buf();
    let c = check_all.clone();
    let mut problems = with_timeout(120, move || c(root));
    let fuse_snap = {
        let root = m.path().to_path_buf();
        with_timeout(120, move || snapshot(&root))
    };
    drop(m);
    // After a remount: the same data, and the kernel overlay sees the same union.
    let m = mount_ovlfuse(&l, transport);
    let root = m.path().to_path_buf();
    let c = check_all.clone();
    problems.extend(
        with_timeout(120, move || c(root))
            .into_iter()
            .map(|p| format!("after remount: {p}")),
    );
    drop(m);
    let k = mount_kernel_overlay(&l);
    let kroot = k.path().to_path_buf();
    let ksnap = with_timeout(120, move || snapshot(&kroot));
    drop(k);
    problems.extend(
        diff_snapshots_labeled(&ksnap, &fuse_snap, "kernel", "ovlfuse")
            .into_iter()
            .map(|d| format!("merged view: {d}")),
    );
    assert!(
        problems.is_empty(),
        "{label} (OVLFUSE_SEED={seed:#x}): {} problems after the load:\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

#[test]
fn eight_threads_on_shared_names_and_lower_files_fuseblk() {
    hammer("", "hammer_fuseblk");
}

#[test]
fn eight_threads_on_shared_names_and_lower_files_fuse() {
    hammer("nofuseblk", "hammer_fuse");
}

/// fuseblk with every request read from /dev/fuse, as when the kernel does not allow
/// FUSE-over-io_uring (where it does, the default fuseblk test above goes through it).
#[test]
fn eight_threads_on_shared_names_and_lower_files_fuseblk_without_io_uring() {
    hammer("nouring", "hammer_fuseblk_nouring");
}

/// Listings of a merged directory taken while other threads create, rename and remove
/// names in it show every name at most once, as on the kernel overlay (whose merged-dir
/// cache is one consistent list per directory version).
///
/// Regression: ovlfuse takes a snapshot per opendir and numbers entries by position in it;
/// it used to answer opendir with `FOPEN_CACHE_DIR`, whose cache belongs to the directory
/// inode and is filled by whichever open stream reaches its end, so one stream's first
/// entries and another's (taken after a change) got mixed: names twice, others missing.
#[test]
fn concurrent_listings_show_each_name_once_while_names_change() {
    let label = "concurrent_listings";
    let seed = seed_for(label);
    let s = Scratch::new();
    let l = s.layers(2, true);
    hammer_build(&l);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let until = Instant::now() + load_secs(4, 60);
    let outs = run_watched(6, m.daemon_pid(), STALL, move |i, p| {
        let mut r = Rng::new(seed ^ i as u64);
        let mut bad = Vec::new();
        let mut listings = 0u64;
        while Instant::now() < until && bad.len() < 5 {
            let d = *r.pick(&["s0", "s2"]);
            if i < 2 {
                let (a, b) = (r.below(SHARED_NAMES as u64), r.below(SHARED_NAMES as u64));
                let (pa, pb) = (
                    root.join(format!("{d}/n{a}")),
                    root.join(format!("{d}/n{b}")),
                );
                p.doing(i, format!("change {d}"));
                let _ = match r.below(3) {
                    0 => fs::rename(&pa, &pb),
                    1 => fs::write(&pa, b""),
                    _ => fs::remove_file(&pa),
                };
            } else {
                p.doing(i, format!("list {d}"));
                listings += 1;
                match readdir_raw(&root.join(d)) {
                    Ok(raw) => {
                        let dup = readdir_problems(&raw);
                        if !dup.is_empty() {
                            bad.push(format!("{d}: {dup:?}"));
                        }
                    }
                    Err(e) => bad.push(format!("{d}: {e}")),
                }
            }
            p.tick(i);
        }
        (listings, bad)
    })
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    drop(m);
    let listings: u64 = outs.iter().map(|o| o.0).sum();
    let bad: Vec<String> = outs.into_iter().flat_map(|o| o.1).collect();
    assert!(
        bad.is_empty(),
        "{label} (OVLFUSE_SEED={seed:#x}): listings with a name twice (of {listings}):\n  {}",
        bad.join("\n  ")
    );
}

/// The known-difference filter of the redirect run leaves out only a missing opaque mark or
/// whiteout, nothing else.
#[test]
fn known_difference_filter_is_narrow() {
    let f = only_opaque_or_whiteout_missing;
    assert!(f("upper: a/x5: only in kernel (Char)"));
    assert!(f(
        "upper: a/x5: xattrs differs: kernel=[trusted.overlay.opaque=\"y\"] ovlfuse=[]"
    ));
    assert!(f(
        "upper: a/c: xattrs differs: kernel=[trusted.overlay.opaque=\"y\", user.k=\"v2\"] \
         ovlfuse=[user.k=\"v2\"]"
    ));
    assert!(!f("upper: a/x5: only in ovlfuse (Char)"));
    assert!(!f("upper: a/x5: only in kernel (File)"));
    assert!(!f(
        "upper: a/c: xattrs differs: kernel=[trusted.overlay.opaque=\"y\", user.k=\"v2\"] \
         ovlfuse=[user.k=\"v3\"]"
    ));
    assert!(!f(
        "upper: a/c: xattrs differs: kernel=[trusted.overlay.redirect=\"/x\"] ovlfuse=[]"
    ));
}

/// The checks of the hammer test catch what they claim to: a lost slot write, a changed
/// lower block and a torn record.
#[test]
fn hammer_checks_catch_lost_writes_and_wrong_data() {
    let mut slots: SlotLog = vec![[[None; SLOTS]; CU_FILES]; HAMMER_THREADS];
    slots[3][1][2] = Some(77);
    let mut data: Vec<u8> = (0..CU_BLOCKS)
        .flat_map(|b| cu_block_original(1, b))
        .collect();
    let at = |b: usize| b * BLOCK..(b + 1) * BLOCK;
    data[at(slot_block(3, 2))].copy_from_slice(&slot_content(3, 2, 77));
    assert!(check_cu_file(1, &data, &slots).is_empty());
    // the write is lost: the slot still has the lower data
    slots[3][1][2] = Some(78);
    let p = check_cu_file(1, &data, &slots);
    assert!(p.len() == 1 && p[0].contains("slot 2 of thread 3"), "{p:?}");
    slots[3][1][2] = Some(77);
    // a lower block changed
    data[at(200)][10] ^= 1;
    let p = check_cu_file(1, &data, &slots);
    assert!(
        p.len() == 1 && p[0].contains("block 200 (lower data)"),
        "{p:?}"
    );
    // a cut or mixed record
    let rec = record(2, 5, 1000);
    assert_eq!(parse_record(&rec), Ok((2, 5)));
    assert!(parse_record(&rec[..900]).is_err());
    let mut mixed = rec.clone();
    mixed[500..].copy_from_slice(&record(2, 6, 1000)[500..]);
    assert!(parse_record(&mixed).is_err());
}

/// The watchdog turns a hung daemon into a failure naming the stuck threads and what they
/// were doing, with the daemon's kernel stacks, within its limit, and kills the daemon so
/// the blocked threads come back: the test fails, it does not hang.
#[test]
fn watchdog_reports_a_stopped_daemon_instead_of_hanging() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    let m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let root = m.path().to_path_buf();
    let started = Instant::now();
    let freeze = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        // SAFETY: stopping the daemon this test started; the watchdog kills it.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
    });
    let result = run_watched(2, Some(pid), Duration::from_secs(2), move |i, p| {
        for n in 0u64.. {
            p.doing(i, format!("stat new{i}-{n}"));
            // A fresh name each time: never answered from the kernel's caches.
            match fs::symlink_metadata(root.join(format!("new{i}-{n}"))) {
                Err(e) if e.raw_os_error().is_some_and(is_conn_error) => return n,
                _ => {}
            }
            p.tick(i);
            if started.elapsed() > Duration::from_secs(30) {
                return n;
            }
        }
        unreachable!()
    });
    freeze.join().unwrap();
    let report = result.expect_err("a stopped daemon must be reported");
    let elapsed = started.elapsed();
    assert!(
        report.contains("no progress for") && report.contains("doing: stat new"),
        "{report}"
    );
    assert!(
        report.contains("state T"),
        "the report shows the daemon's threads stopped:\n{report}"
    );
    assert!(elapsed < Duration::from_secs(10), "took {elapsed:?}");
    assert!(
        poll_until(Duration::from_secs(10), || (!pid_alive(pid)).then_some(())).is_some(),
        "the watchdog did not kill the daemon"
    );
    drop(m);
}

// ---------------------------------------------------------------------------
// fsx: random I/O on files that start in a lower layer
// ---------------------------------------------------------------------------

/// One fsx file: the union path, an in-memory model, a read-write descriptor (reopened now
/// and then) and a read-only one opened before the first write, so before the copy-up.
struct FsxFile {
    rel: String,
    model: Vec<u8>,
    rw: Option<File>,
    ro: File,
    ops: u64,
    log: Vec<String>,
}

const FSX_MAX: u64 = 3 << 20;

fn fsx_files() -> Vec<(&'static str, usize)> {
    // name, lower layer it starts in
    vec![
        ("fsx/a", 1),
        ("fsx/b", 0),
        ("fsx/c", 1),
        ("fsx/d", 0),
        ("fsx/shared", 1),
    ]
}

fn fsx_build(l: &Layers) -> Vec<Vec<u8>> {
    let (l0, l1) = (l.lower(0), l.lower(1));
    l1.write_file("fsx/a", &noise(300 << 10, 11), 0o644);
    l0.write_file("fsx/b", b"", 0o644);
    l1.sparse_file(
        "fsx/c",
        2 << 20,
        &[
            (0, &noise(64 << 10, 12)),
            ((2 << 20) - 5000, &noise(5000, 13)),
        ],
        0o600,
    );
    // d: shadowed; the union shows l0's.
    l1.write_file("fsx/d", &noise(64 << 10, 14), 0o644);
    l0.write_file("fsx/d", &noise(100 << 10, 15), 0o644);
    l1.write_file("fsx/shared", &noise(256 << 10, 16), 0o644);
    fsx_files()
        .iter()
        .map(|(rel, layer)| fs::read(l.lowers[*layer].join(rel)).expect("lower fsx file"))
        .collect()
}

fn check_range(f: &FsxFile, via: &File, off: u64, len: usize) -> Result<(), String> {
    let size = f.model.len() as u64;
    let md = via.metadata().map_err(|e| format!("fstat: {e}"))?;
    if md.len() != size {
        return Err(format!("size {} (model {size})", md.len()));
    }
    let end = (off + len as u64).min(size);
    if off >= end {
        return Ok(());
    }
    let mut buf = vec![0u8; (end - off) as usize];
    let mut got = 0;
    while got < buf.len() {
        match via.read_at(&mut buf[got..], off + got as u64) {
            Ok(0) => return Err(format!("short read at {} (size {size})", off + got as u64)),
            Ok(n) => got += n,
            Err(e) => return Err(format!("pread @{off}: {e}")),
        }
    }
    let want = &f.model[off as usize..end as usize];
    if buf != want {
        let i = buf.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
        return Err(format!(
            "wrong data at {} (range {off}+{}): got {:02x?} want {:02x?}",
            off + i as u64,
            end - off,
            &buf[i..(i + 8).min(buf.len())],
            &want[i..(i + 8).min(want.len())]
        ));
    }
    Ok(())
}

fn map(fd: &File, off: u64, len: usize, write: bool) -> io::Result<(*mut libc::c_void, usize)> {
    let prot = libc::PROT_READ | if write { libc::PROT_WRITE } else { 0 };
    // SAFETY: a fresh shared mapping of an open file; unmapped by the caller.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            prot,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            off as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok((p, len))
    }
}

/// One random fsx operation on `f`; verifies what it touched. `Err` describes a mismatch.
fn fsx_op(root: &Path, f: &mut FsxFile, r: &mut Rng) -> Result<(), String> {
    let path = root.join(&f.rel);
    if f.rw.is_none() || r.chance(3) {
        f.rw = None;
        f.rw = Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| format!("open O_RDWR: {e}"))?,
        );
    }
    let size = f.model.len() as u64;
    let rw = f.rw.as_ref().expect("rw fd");
    let page = 4096u64;
    let (desc, off, len) = match r.below(100) {
        0..=29 => {
            let off = r.below((size + (64 << 10)).min(FSX_MAX));
            let len = r.range(1, 64 << 10).min(FSX_MAX - off) as usize;
            let data = noise(len, r.next());
            rw.write_all_at(&data, off)
                .map_err(|e| format!("pwrite @{off}+{len}: {e}"))?;
            let end = off as usize + len;
            if f.model.len() < end {
                f.model.resize(end, 0);
            }
            f.model[off as usize..end].copy_from_slice(&data);
            (format!("pwrite @{off}+{len}"), off, len)
        }
        30..=49 => {
            let off = r.below(size + 1);
            let len = r.range(1, 128 << 10) as usize;
            (format!("pread @{off}+{len}"), off, len)
        }
        50..=59 => {
            let to = if r.chance(50) {
                r.below(size + 1)
            } else {
                r.below(FSX_MAX)
            };
            if r.chance(50) {
                rw.set_len(to).map_err(|e| format!("ftruncate {to}: {e}"))?;
            } else {
                let c = cstr(&path);
                // SAFETY: valid C string.
                if unsafe { libc::truncate(c.as_ptr(), to as libc::off_t) } != 0 {
                    return Err(format!("truncate {to}: {}", io::Error::last_os_error()));
                }
            }
            f.model.resize(to as usize, 0);
            (format!("truncate {to}"), to.saturating_sub(4096), 8192)
        }
        60..=69 if size > 0 => {
            // mapwrite inside the file, msync
            let off = r.below(size) / page * page;
            let len = r.range(1, (size - off).min(256 << 10)) as usize;
            let data = noise(len, r.next());
            let (p, maplen) = map(rw, off, len, true).map_err(|e| format!("mmap rw: {e}"))?;
            // SAFETY: the mapping is `maplen` >= len bytes, writable, ours until munmap.
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), p.cast::<u8>(), len);
                let ret = libc::msync(p, maplen, libc::MS_SYNC);
                libc::munmap(p, maplen);
                if ret != 0 {
                    return Err(format!("msync: {}", io::Error::last_os_error()));
                }
            }
            f.model[off as usize..off as usize + len].copy_from_slice(&data);
            (format!("mapwrite @{off}+{len}"), off, len)
        }
        70..=77 if size > 0 => {
            // mapread through the descriptor opened before the copy-up
            let off = r.below(size) / page * page;
            let len = r.range(1, (size - off).min(256 << 10)) as usize;
            let (p, maplen) = map(&f.ro, off, len, false).map_err(|e| format!("mmap ro: {e}"))?;
            // SAFETY: readable mapping of `maplen` >= len bytes.
            let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len).to_vec() };
            unsafe { libc::munmap(p, maplen) };
            if got != f.model[off as usize..off as usize + len] {
                return Err(format!("mapread @{off}+{len} (read-only fd): wrong data"));
            }
            (format!("mapread @{off}+{len}"), off, len)
        }
        78..=85 if size > 0 => {
            // punch a hole (size unchanged)
            let off = r.below(size);
            let len = r.range(1, (size - off).min(200 << 10));
            // SAFETY: valid fd.
            let ret = unsafe {
                libc::fallocate(
                    rw.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if ret != 0 {
                return Err(format!(
                    "punch @{off}+{len}: {}",
                    io::Error::last_os_error()
                ));
            }
            f.model[off as usize..(off + len) as usize].fill(0);
            (format!("punch @{off}+{len}"), off, len as usize)
        }
        86..=92 if size > 1 => {
            // copy_file_range within the file, ranges apart
            let len = r.range(1, (size / 2).min(128 << 10));
            let src = r.below(size - len + 1);
            // Ranges of one file must not overlap (EINVAL): before the source, or after it.
            let after = src + len + r.below(64 << 10);
            let dst = if src >= len && (r.chance(50) || after + len > FSX_MAX) {
                r.below(src - len + 1)
            } else if after + len <= FSX_MAX {
                after
            } else {
                return Ok(());
            };
            let (mut si, mut di) = (src as i64, dst as i64);
            let mut left = len as usize;
            while left > 0 {
                // SAFETY: valid fds and offsets.
                let n = unsafe {
                    libc::copy_file_range(rw.as_raw_fd(), &mut si, rw.as_raw_fd(), &mut di, left, 0)
                };
                if n < 0 {
                    return Err(format!(
                        "copy_file_range {src}->{dst}+{len}: {}",
                        io::Error::last_os_error()
                    ));
                }
                if n == 0 {
                    return Err(format!("copy_file_range {src}->{dst}+{len}: short copy"));
                }
                left -= n as usize;
            }
            let chunk = f.model[src as usize..(src + len) as usize].to_vec();
            let end = (dst + len) as usize;
            if f.model.len() < end {
                f.model.resize(end, 0);
            }
            f.model[dst as usize..end].copy_from_slice(&chunk);
            (format!("copy_range {src}->{dst}+{len}"), dst, len as usize)
        }
        93..=95 => {
            rw.sync_all().map_err(|e| format!("fsync: {e}"))?;
            ("fsync".to_string(), 0, 4096)
        }
        _ => {
            // append through a fresh O_APPEND descriptor
            let data = noise(r.range(1, 10_000) as usize, r.next());
            if size + data.len() as u64 > FSX_MAX {
                return Ok(());
            }
            OpenOptions::new()
                .append(true)
                .open(&path)
                .and_then(|mut a| a.write_all(&data))
                .map_err(|e| format!("append: {e}"))?;
            f.model.extend_from_slice(&data);
            (format!("append +{}", data.len()), size, data.len())
        }
    };
    f.ops += 1;
    if f.log.len() >= 20 {
        f.log.remove(0);
    }
    f.log.push(desc.clone());
    let via = if r.chance(50) {
        &f.ro
    } else {
        f.rw.as_ref().expect("rw fd")
    };
    check_range(f, via, off, len).map_err(|e| format!("after {desc}: {e}"))?;
    if f.ops.is_multiple_of(64) {
        let whole = f.model.len();
        check_range(f, &f.ro, 0, whole).map_err(|e| format!("whole file after {desc}: {e}"))?;
    }
    Ok(())
}

fn open_fsx(root: &Path, rel: &str, model: Vec<u8>) -> FsxFile {
    FsxFile {
        rel: rel.to_string(),
        ro: File::open(root.join(rel)).expect("open fsx file read-only"),
        model,
        rw: None,
        ops: 0,
        log: Vec::new(),
    }
}

fn whole_file_problems(path: &Path, want: &[u8]) -> Option<String> {
    match fs::read(path) {
        Ok(got) if got == want => None,
        Ok(got) => {
            let i = got.iter().zip(want).position(|(a, b)| a != b);
            Some(format!(
                "{}: {} bytes (model {}), first difference at {i:?}",
                path.display(),
                got.len(),
                want.len()
            ))
        }
        Err(e) => Some(format!("{}: {e}", path.display())),
    }
}

#[test]
fn fsx_on_lower_files_from_several_threads_matches_the_model() {
    let label = "fsx";
    let seed = seed_for(label);
    let secs = load_secs(6, 120);
    let s = Scratch::new();
    let l = s.layers(2, true);
    let originals = fsx_build(&l);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let names = fsx_files();
    // One thread per file, and two more sharing the last one under a lock.
    let own = names.len() - 1;
    let files: Vec<Arc<Mutex<FsxFile>>> = {
        let root = root.clone();
        let originals = originals.clone();
        with_timeout(30, move || {
            names
                .iter()
                .zip(originals)
                .map(|((rel, _), data)| Arc::new(Mutex::new(open_fsx(&root, rel, data))))
                .collect()
        })
    };
    let until = Instant::now() + secs;
    let shared_ro: Vec<Mutex<Option<File>>> = (0..2).map(|_| Mutex::new(None)).collect();
    let shared_ro = Arc::new(shared_ro);
    let threads_files = files.clone();
    let result = run_watched(own + 2, m.daemon_pid(), STALL, move |i, p| {
        let mut r = Rng::new(seed ^ ((i as u64 + 1) << 32));
        let file = &threads_files[i.min(own)];
        let mut ops = 0u64;
        while Instant::now() < until {
            let mut f = file.lock().unwrap_or_else(|e| e.into_inner());
            if i > own {
                // The second sharer reads through a read-only descriptor of its own too.
                let mut mine = shared_ro[i - own].lock().unwrap_or_else(|e| e.into_inner());
                let ro = mine.get_or_insert_with(|| File::open(root.join(&f.rel)).expect("ro"));
                let whole = f.model.len();
                if let Err(e) = check_range(&f, ro, 0, whole) {
                    return Err(format!(
                        "{} (second sharer): {e}; recent ops: {:?}",
                        f.rel, f.log
                    ));
                }
            }
            p.doing(i, format!("{} op #{}", f.rel, f.ops));
            if let Err(e) = fsx_op(&root, &mut f, &mut r) {
                return Err(format!("{}: {e}; recent ops: {:?}", f.rel, f.log));
            }
            drop(f);
            ops += 1;
            p.tick(i);
        }
        Ok(ops)
    })
    .unwrap_or_else(|e| panic!("{label} (OVLFUSE_SEED={seed:#x}): {e}"));
    let mut problems: Vec<String> = result.iter().filter_map(|r| r.clone().err()).collect();
    let total: u64 = result.iter().filter_map(|r| r.as_ref().ok()).sum();
    eprintln!("{label}: {} threads, {total} ops in {secs:?}", own + 2);
    let models: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|f| {
            let f = f.lock().unwrap_or_else(|e| e.into_inner());
            (f.rel.clone(), f.model.clone())
        })
        .collect();
    drop(files);
    let check = |root: PathBuf, models: Vec<(String, Vec<u8>)>| {
        with_timeout(60, move || {
            models
                .iter()
                .filter_map(|(rel, want)| whole_file_problems(&root.join(rel), want))
                .collect::<Vec<_>>()
        })
    };
    problems.extend(check(m.path().to_path_buf(), models.clone()));
    drop(m);
    let m = mount_ovlfuse(&l, "");
    problems.extend(
        check(m.path().to_path_buf(), models.clone())
            .into_iter()
            .map(|p| format!("after remount: {p}")),
    );
    drop(m);
    let upper = l.upper.clone().expect("upper");
    for (rel, want) in &models {
        if let Some(p) = whole_file_problems(&upper.join(rel), want) {
            problems.push(format!("upper file: {p}"));
        }
    }
    for ((rel, layer), original) in fsx_files().iter().zip(&originals) {
        if let Some(p) = whole_file_problems(&l.lowers[*layer].join(rel), original) {
            problems.push(format!("lower file changed: {p}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{label} (OVLFUSE_SEED={seed:#x}):\n  {}",
        problems.join("\n  ")
    );
}

/// fsx's verification catches wrong data and a wrong size.
#[test]
fn fsx_checks_catch_wrong_data_and_size() {
    let dir = tempfile::tempdir_in("/tmp").unwrap();
    let p = dir.path().join("f");
    fs::write(&p, noise(10_000, 1)).unwrap();
    let mut f = open_fsx(dir.path(), "f", noise(10_000, 1));
    let ro = File::open(&p).unwrap();
    assert!(check_range(&f, &ro, 0, 10_000).is_ok());
    f.model[5000] ^= 0xff;
    let e = check_range(&f, &ro, 4000, 2000).unwrap_err();
    assert!(e.contains("wrong data at 5000"), "{e}");
    f.model.push(0);
    assert!(
        check_range(&f, &ro, 0, 10)
            .unwrap_err()
            .contains("size 10000")
    );
    assert!(whole_file_problems(&p, &f.model).is_some());
}

// ---------------------------------------------------------------------------
// a long random sequence, against the kernel overlay
// ---------------------------------------------------------------------------

static RANDOM_SEED: OnceLock<u64> = OnceLock::new();

fn random_seed() -> u64 {
    *RANDOM_SEED.get_or_init(|| seed_for("long_random_sequence"))
}

fn random_op_count() -> usize {
    env_count("OVLFUSE_LOAD_OPS", 3000, 60_000)
}

const R_DIRS: [&str; 4] = ["", "a", "b", "a/c"];
const R_NAMES: [&str; 6] = ["x0", "x1", "x2", "x3", "x4", "x5"];

/// Files large enough that writes at random offsets land inside the lower data, in every
/// layer, shadowed and merged.
fn long_build(l: &Layers) {
    let (u, l0, l1, l2) = (l.up(), l.lower(0), l.lower(1), l.lower(2));
    l2.write_file("x0", &noise(200 << 10, 1), 0o644)
        .write_file("a/x1", &noise(70 << 10, 2), 0o644)
        .write_file("a/c/x2", &noise(9000, 3), 0o600)
        .write_file("b/x3", &noise(300 << 10, 4), 0o644)
        .mkdir("a/x4", 0o755);
    l1.write_file("x1", &noise(50 << 10, 5), 0o644)
        .write_file("a/x1", &noise(10 << 10, 6), 0o640)
        .write_file("b/x0", &noise(1 << 20, 7), 0o644)
        .whiteout("b/x3")
        .write_file("a/c/x3", &noise(4000, 8), 0o644)
        .symlink("x5", "x0");
    l0.write_file("x2", &noise(150 << 10, 9), 0o644)
        .write_file("a/x0", &noise(64 << 10, 10), 0o644)
        .write_file("b/x4/x0", &noise(3000, 11), 0o644);
    u.write_file("a/x5", &noise(1000, 12), 0o644)
        .whiteout("a/c/x3")
        .opaque_dir("b/x4");
}

fn rand_path(r: &mut Rng) -> String {
    let d = *r.pick(&R_DIRS);
    let n = *r.pick(&R_NAMES);
    if d.is_empty() {
        n.to_string()
    } else if r.chance(10) {
        format!("{d}/{n}/{}", r.pick(&R_NAMES))
    } else {
        format!("{d}/{n}")
    }
}

fn rec(o: &mut OpLog, what: String, r: io::Result<String>) {
    let line = format!("{what}: {}", fmt_res(&r, |s| s.clone()));
    o.push(line);
}

/// The sequence depends only on the seed, never on results, so both sides run the same
/// operations. Data operations at random offsets dominate; the rest move names around.
fn long_ops(root: &Path) -> Vec<String> {
    let mut r = Rng::new(random_seed());
    let mut o = OpLog::new(root);
    for i in 0..random_op_count() {
        let p = rand_path(&mut r);
        match r.below(100) {
            0..=21 => {
                let off = r.below(400 << 10);
                let data = noise(r.range(1, 16 << 10) as usize, i as u64 + 1);
                let res = OpenOptions::new()
                    .write(true)
                    .create(r.chance(30))
                    .truncate(false)
                    .open(o.p(&p))
                    .and_then(|f| f.write_all_at(&data, off))
                    .map(|()| String::new());
                rec(&mut o, format!("pwrite {p} @{off}+{}", data.len()), res);
            }
            22..=33 => {
                let off = r.below(400 << 10);
                let len = r.range(1, 64 << 10) as usize;
                let _ = o.pread(&p, off, len);
            }
            34..=39 => {
                let len = r.below(300 << 10);
                let _ = o.truncate(&p, len);
            }
            40..=43 => {
                let _ = o.append(&p, &noise(r.range(1, 5000) as usize, i as u64));
            }
            44..=47 => {
                let _ = o.write_file(&p, &noise(r.range(0, 20_000) as usize, i as u64));
            }
            48..=53 => {
                let _ = o.unlink(&p);
            }
            54..=56 => {
                let _ = o.mkdir(&p, 0o755);
            }
            57..=59 => {
                let _ = o.rmdir(&p);
            }
            60..=69 => {
                let to = rand_path(&mut r);
                let _ = o.rename(&p, &to);
            }
            70..=71 => {
                let to = rand_path(&mut r);
                let _ = o.link(&p, &to);
            }
            72..=73 => {
                let _ = o.symlink(r.pick::<&str>(&["x0", "../x1", "c/x2"]), &p);
            }
            74..=77 => {
                let _ = o.chmod(&p, *r.pick(&[0o600, 0o644, 0o755]));
            }
            78..=79 => {
                let _ = o.setxattr(&p, "user.k", format!("v{}", r.below(100)).as_bytes());
            }
            80..=84 => {
                let _ = o.stat(&p);
            }
            85..=89 => {
                let _ = o.read(&p);
            }
            _ => {
                let d = if r.chance(50) {
                    r.pick(&R_DIRS).to_string()
                } else {
                    p
                };
                let _ = o.readdir(&d);
            }
        }
    }
    o.into_log()
}

#[test]
fn long_random_sequence_matches_the_kernel_overlay() {
    long_random_sequence("");
}

/// Known difference (namespace.rs `rename`): moving away a directory whose lower part is
/// reached through a redirect, from a parent whose lower layers do not have the name, the
/// kernel leaves a whiteout at the old name (so a later mkdir there is opaque); ovlfuse
/// leaves none. Nothing visible changes (no lower entry has that name), but the upper
/// layers differ. While true, the redirect run leaves out upper-layer differences of just
/// these two kinds (a whiteout only the kernel made, an opaque mark only the kernel set).
/// Reproducer: lower `src/y`, `a/`, `b/`; `rename src a/x5; rename a/x5 b/x5; mkdir a/x5`.
const KNOWN_DIFF_MOVED_REDIRECT_DIR_LEAVES_NO_WHITEOUT: bool = true;

/// Whether a difference line of an upper-layer comparison is of the kind
/// [`KNOWN_DIFF_MOVED_REDIRECT_DIR_LEAVES_NO_WHITEOUT`] describes.
fn only_opaque_or_whiteout_missing(line: &str) -> bool {
    if line.ends_with(": only in kernel (Char)") {
        return true;
    }
    let Some((_, rest)) = line.split_once(": xattrs differs: kernel=[") else {
        return false;
    };
    let Some((kernel, ovlfuse)) = rest.split_once("] ovlfuse=[") else {
        return false;
    };
    let ovlfuse = ovlfuse.strip_suffix(']').unwrap_or(ovlfuse);
    let opaque = "trusted.overlay.opaque=\"y\"";
    let without: Vec<&str> = kernel.split(", ").filter(|x| *x != opaque).collect();
    kernel.split(", ").any(|x| x == opaque) && without.join(", ") == ovlfuse
}

/// The same with `redirect_dir=on` on both: renamed lower directories record where their
/// lower parts are, and every later operation in them follows the redirect.
#[test]
fn long_random_sequence_with_redirects_matches_the_kernel_overlay() {
    long_random_sequence("redirect_dir=on");
}

fn long_random_sequence(opts: &'static str) {
    let seed = random_seed();
    let n = random_op_count();
    let mut sc = Scenario::new("long random", long_build, long_ops);
    sc.opts = opts;
    let mut out = run_differential_collect(&sc);
    if KNOWN_DIFF_MOVED_REDIRECT_DIR_LEAVES_NO_WHITEOUT && opts.contains("redirect_dir=on") {
        let before = out.problems.len();
        out.problems
            .retain(|p| !(p.starts_with("upper: ") && only_opaque_or_whiteout_missing(p)));
        eprintln!(
            "long_random_sequence {opts:?}: {} upper-layer differences of the known kind left out",
            before - out.problems.len()
        );
    }
    let oks = out
        .kernel_log
        .iter()
        .filter(|l| l.contains(": Ok("))
        .count();
    eprintln!("long_random_sequence: {n} ops, {oks} succeeded on the kernel overlay");
    let mut msg = String::new();
    if let Some(d) = first_log_divergence(&out.kernel_log, &out.ovlfuse_log, 20) {
        msg.push_str(&d);
    }
    if !out.problems.is_empty() {
        msg.push_str(&format!(
            "final state: {} differences:\n  {}",
            out.problems.len(),
            out.problems
                .iter()
                .take(60)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n  ")
        ));
        // The operations that named the differing paths, for the bug report.
        let paths: BTreeSet<&str> = out
            .problems
            .iter()
            .filter_map(|p| p.split(": ").nth(1))
            .collect();
        for path in paths {
            let ops: Vec<String> = out
                .kernel_log
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    l.split([' ', ':'])
                        .any(|w| w == path || w.starts_with(&format!("{path}/")))
                })
                .map(|(i, l)| format!("#{i}: {l}"))
                .collect();
            let from = ops.len().saturating_sub(30);
            msg.push_str(&format!(
                "\nops naming {path} (kernel's results):\n    {}",
                ops[from..].join("\n    ")
            ));
        }
    }
    assert!(
        msg.is_empty(),
        "long random sequence {opts:?} (OVLFUSE_SEED={seed:#x} OVLFUSE_LOAD_OPS={n}) \
         differs:\n{msg}"
    );
    assert!(
        oks * 4 > n,
        "only {oks} of {n} ops succeeded: the sequence mostly tests errors"
    );
}

// ---------------------------------------------------------------------------
// bounded resources
// ---------------------------------------------------------------------------

/// Waits until the daemon's descriptor count stops falling (FORGETs arrive in batches after
/// the kernel drops its caches) and returns the last sample.
fn settled_sample(pid: i32) -> DaemonSample {
    let mut last = sample_daemon(pid).expect("sample daemon");
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline && stable_since.elapsed() < Duration::from_millis(1500) {
        std::thread::sleep(Duration::from_millis(100));
        let now = sample_daemon(pid).expect("sample daemon");
        if now.fds != last.fds {
            stable_since = Instant::now();
        }
        last = now;
    }
    last
}

fn resources(transport: &str, label: &str) {
    let secs = load_secs(5, 60);
    let s = Scratch::new();
    let l = s.layers(1, true);
    // Lower files to copy up (by chmod), in lower directories.
    for d in 0..20 {
        for f in 0..50 {
            l.lower(0).write_file(
                &format!("low{d}/f{f}"),
                &noise(2000, (d * 100 + f) as u64),
                0o644,
            );
        }
    }
    let m = mount_ovlfuse(&l, transport);
    let pid = m.daemon_pid().expect("daemon pid");
    let root = m.path().to_path_buf();
    {
        let root = root.clone();
        with_timeout(30, move || fs::metadata(&root)).expect("stat root");
    }
    drop_dentries_and_inodes();
    let baseline = settled_sample(pid);
    let peak = Arc::new(Mutex::new(baseline));
    let until = Instant::now() + secs;
    // Load: 4 threads create, stat, read, copy up, list and remove files, in rounds, and
    // leave nothing behind; one samples the daemon.
    let sampler = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            while Instant::now() < until {
                if let Ok(now) = sample_daemon(pid) {
                    let mut p = peak.lock().unwrap();
                    p.rss_kib = p.rss_kib.max(now.rss_kib);
                    p.fds = p.fds.max(now.fds);
                    p.threads = p.threads.max(now.threads);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let load_root = root.clone();
    let outs = run_watched(4, Some(pid), STALL, move |i, p| -> Result<u64, String> {
        let mut n = 0u64;
        let mut round = 0;
        let e = |what: &str, e: io::Error| format!("thread {i}: {what}: {e}");
        while Instant::now() < until {
            let dir = load_root.join(format!("t{i}-{round}"));
            p.doing(i, format!("round {round}"));
            fs::create_dir(&dir).map_err(|x| e("mkdir", x))?;
            for f in 0..500 {
                fs::write(dir.join(format!("f{f}")), b"data").map_err(|x| e("create", x))?;
            }
            p.tick(i);
            for f in 0..500 {
                let path = dir.join(format!("f{f}"));
                fs::metadata(&path).map_err(|x| e("stat", x))?;
                fs::read(&path).map_err(|x| e("read", x))?;
            }
            p.tick(i);
            // Copy-ups: a lower directory's files, chmod back and forth.
            let low = load_root.join(format!("low{}", (i * 5 + round) % 20));
            for f in 0..50 {
                let mode = if round % 2 == 0 { 0o600 } else { 0o644 };
                fs::set_permissions(low.join(format!("f{f}")), fs::Permissions::from_mode(mode))
                    .map_err(|x| e("chmod", x))?;
            }
            list_names(&low).map_err(|x| e("readdir", x))?;
            list_names(&dir).map_err(|x| e("readdir", x))?;
            for f in 0..500 {
                fs::remove_file(dir.join(format!("f{f}"))).map_err(|x| e("unlink", x))?;
            }
            fs::remove_dir(&dir).map_err(|x| e("rmdir", x))?;
            n += 1;
            round += 1;
            p.tick(i);
        }
        Ok(n)
    })
    .unwrap_or_else(|e| panic!("{label}: {e}"));
    sampler.join().unwrap();
    for o in &outs {
        if let Err(e) = o {
            panic!("{label}: {e}");
        }
    }
    let rounds: u64 = outs.iter().filter_map(|o| o.as_ref().ok()).sum();
    let before_drop = sample_daemon(pid).expect("sample");
    drop_dentries_and_inodes();
    let after = settled_sample(pid);
    let peak = *peak.lock().unwrap();
    eprintln!(
        "{label}: {rounds} rounds of 500 files in {secs:?}\n  baseline     {baseline}\n  peak         \
         {peak}\n  after load   {before_drop}\n  after forget {after}"
    );
    // The measure sees nodes: during the load the daemon held one descriptor per node the
    // kernel knew (the same check on the peak fails).
    assert!(
        peak.fds > baseline.fds + 200,
        "the descriptor count never rose with the load ({baseline} -> {peak}): the measure \
         proves nothing"
    );
    // Once the kernel forgets the nodes, their descriptors are closed.
    assert!(
        after.fds <= baseline.fds + 8,
        "descriptors not released after the kernel forgot the nodes: {baseline} -> {after}"
    );
    // Memory: the allocator keeps some of what the load used; it must not keep growing
    // with the load. The bound is from measurements (see the report printed above).
    assert!(
        after.rss_kib <= baseline.rss_kib + 16 * 1024,
        "memory not returned after the load: {baseline} -> {after}"
    );
    assert!(
        peak.rss_kib <= baseline.rss_kib + 64 * 1024,
        "memory grew without bound during the load: {baseline} -> {peak}"
    );
    assert!(
        after.threads <= baseline.threads + 2,
        "{baseline} -> {after}"
    );
    // Nothing the load made is left in the union.
    let root2 = root.clone();
    let names: BTreeSet<String> = with_timeout(30, move || list_names(&root2))
        .expect("list root")
        .into_iter()
        .collect();
    assert!(
        names.iter().all(|n| n.starts_with("low")),
        "leftovers in the union: {names:?}"
    );
    drop(m);
}

#[test]
fn daemon_memory_and_descriptors_return_to_baseline_after_load_fuseblk() {
    resources("", "resources_fuseblk");
}

#[test]
fn daemon_memory_and_descriptors_return_to_baseline_after_load_fuse() {
    resources("nofuseblk", "resources_fuse");
}

/// The daemon's descriptors stay bounded by what the kernel holds (nodes it knows, files
/// open), whatever the rate of changes: here under a limit of 256 descriptors, rounds of
/// 150 files created, written, read and removed must all succeed (the kernel holds at most
/// one round's files at a time).
///
/// Regression: on plain fuse the health checker kept each written file's node (and its
/// descriptor) until the upper filesystem had written the file back (~30 s), even once it
/// was unlinked and forgotten by the kernel, so after about 240 files the daemon answered
/// EMFILE.
#[test]
fn creating_and_removing_files_faster_than_writeback_never_runs_the_daemon_out_of_descriptors() {
    let mut problems = Vec::new();
    for transport in ["", "nofuseblk"] {
        let s = Scratch::new();
        let l = s.layers(1, true);
        let m = mount_ovlfuse(&l, transport);
        let pid = m.daemon_pid().expect("daemon pid");
        let lim = libc::rlimit {
            rlim_cur: 256,
            rlim_max: 256,
        };
        // SAFETY: lowering the descriptor limit of the daemon this test started.
        let ret = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &lim, std::ptr::null_mut()) };
        assert_eq!(ret, 0, "prlimit: {}", io::Error::last_os_error());
        let root = m.path().to_path_buf();
        let r = with_timeout(120, move || -> Result<(), String> {
            for round in 0..8 {
                let dir = root.join(format!("r{round}"));
                let e = |what: &str, x: io::Error| format!("round {round}: {what}: {x}");
                fs::create_dir(&dir).map_err(|x| e("mkdir", x))?;
                for f in 0..150 {
                    let p = dir.join(format!("f{f}"));
                    fs::write(&p, b"data").map_err(|x| e("create", x))?;
                    fs::read(&p).map_err(|x| e("read", x))?;
                }
                for f in 0..150 {
                    fs::remove_file(dir.join(format!("f{f}"))).map_err(|x| e("unlink", x))?;
                }
                fs::remove_dir(&dir).map_err(|x| e("rmdir", x))?;
            }
            Ok(())
        });
        let fds = sample_daemon(pid).map(|s| s.fds).unwrap_or(0);
        if let Err(e) = r {
            problems.push(format!(
                "{transport:?}: {e} (daemon holds {fds} descriptors)"
            ));
        }
        drop(m);
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// a write through one name of a lower hard link
// ---------------------------------------------------------------------------

/// The names of a lower hard link are one node in ovlfuse (fuser makes the node id the
/// inode number), so an open for writing cannot say which name it came through; the copy-up
/// goes to the name the kernel looked up last. A write through the second name looked up
/// must land under that name: after a remount it has the data and the other name does not,
/// exactly as the kernel overlay leaves the layers. (Until then both names show the new
/// data: the documented difference for lower hard links.)
#[test]
fn a_write_through_the_last_looked_up_name_of_a_lower_hard_link_lands_under_it() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0)
        .write_file("a", b"data\n", 0o644)
        .hardlink("a", "d/b");
    let ops = |root: PathBuf| {
        with_timeout(30, move || -> io::Result<()> {
            fs::symlink_metadata(root.join("a"))?;
            fs::symlink_metadata(root.join("d/b"))?;
            OpenOptions::new()
                .append(true)
                .open(root.join("d/b"))?
                .write_all(b"more\n")
        })
        .expect("stat a, stat d/b, append to d/b")
    };
    let kl = copy_layers(&l, &s.mkdir("kernel"));
    let k = mount_kernel_overlay(&kl);
    ops(k.path().to_path_buf());
    drop(k);
    let m = mount_ovlfuse(&l, "");
    ops(m.path().to_path_buf());
    drop(m);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let (a, b) = with_timeout(30, move || {
        (fs::read(root.join("a")), fs::read(root.join("d/b")))
    });
    drop(m);
    assert_eq!(
        (a.ok().as_deref(), b.ok().as_deref()),
        (Some(&b"data\n"[..]), Some(&b"data\nmore\n"[..])),
        "after a remount: a keeps the lower data, d/b has the write"
    );
    let diff = diff_snapshots_labeled(
        &upper_snapshot(&kl.upper.clone().expect("upper")),
        &upper_snapshot(&l.upper.clone().expect("upper")),
        "kernel",
        "ovlfuse",
    );
    assert!(diff.is_empty(), "upper layers differ: {diff:?}");
}
