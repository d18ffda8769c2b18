//! A daemon killed in the middle of a copy-up must never leave a partial or empty file
//! under the original name in the upper layer, and the next mount must clean the work dir.

mod common;

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 1 << 30;

/// Fills `path` with SIZE bytes of a pattern whose every 4 KiB block names its offset, so a
/// copy that is cut short or shifted cannot pass for the original.
fn write_big_lower(path: &Path) {
    let mut f = fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o644)
        .open(path)
        .expect("create big lower file");
    let mut block = vec![0u8; 1 << 20];
    for chunk in 0..(SIZE >> 20) {
        for (i, b) in block.chunks_mut(4096).enumerate() {
            let tag = format!("block {:>12} ", (chunk << 20) + (i as u64) * 4096);
            b.fill(b'.');
            b[..tag.len()].copy_from_slice(tag.as_bytes());
        }
        f.write_all(&block).expect("write big lower file");
    }
}

fn same_prefix(a: &Path, b: &Path, len: u64) -> bool {
    let (mut fa, mut fb) = (fs::File::open(a).unwrap(), fs::File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut left = len;
    while left > 0 {
        let n = left.min(ba.len() as u64) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
        left -= n as u64;
    }
    true
}

/// When a round kills the daemon.
#[derive(Debug, Clone, Copy)]
enum Moment {
    /// As soon as the copy-up has been asked for.
    AtOnce,
    /// When the copy staged in the work dir holds this many bytes.
    Staged(u64),
    /// Once the finished copy has been renamed into place.
    AfterRename,
}

/// Waits (bounded) until `moment` has come for a copy-up into `upper_file` staged in `work`.
fn wait_for(moment: Moment, work: &Path, upper_file: &Path) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let staged_size = || -> Option<u64> {
        fs::read_dir(work)
            .ok()?
            .filter_map(|e| e.ok())
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .max()
    };
    while Instant::now() < deadline {
        let reached = match moment {
            Moment::AtOnce => true,
            Moment::Staged(bytes) => staged_size().is_some_and(|n| n >= bytes),
            Moment::AfterRename => upper_file.exists(),
        };
        if reached {
            return;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    panic!("{moment:?} never came within 60 s");
}

fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

#[test]
fn kill_9_during_copy_up_never_exposes_a_partial_file() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    let lower_file = l.lower(0).p("big");
    write_big_lower(&lower_file);
    let upper_file = l.up().p("big");
    let work: PathBuf = l.work.clone().expect("work").join("work");
    // Kill right away, at random points of the data copy (the staged file's size tells
    // where the copy is, whatever the machine's speed), and just after the rename.
    // OVLFUSE_SEED replays a run.
    let mut seed: u64 = std::env::var("OVLFUSE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
        | 1;
    eprintln!("kill moments from OVLFUSE_SEED={seed}");
    let mut moments = vec![Moment::AtOnce];
    for _ in 0..4 {
        moments.push(Moment::Staged(1 + next(&mut seed) % (SIZE - 1)));
    }
    moments.push(Moment::AfterRename);
    let mut killed_mid_copy = 0;
    for (round, moment) in moments.iter().enumerate() {
        let mut m = mount_ovlfuse(&l, "");
        let pid = m.daemon_pid().expect("daemon pid");
        let target = m.p("big");
        // Opening for append triggers the copy-up; it blocks until the copy is done, or
        // fails once the daemon is dead.
        let writer = std::thread::spawn(move || {
            fs::OpenOptions::new()
                .append(true)
                .open(&target)
                .and_then(|mut f| f.write_all(b"appended\n"))
        });
        wait_for(*moment, &work, &upper_file);
        // SAFETY: killing the daemon this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !writer.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        m.unmount();
        let finished = writer.join().expect("writer thread");
        if fs::read_dir(&work).expect("read work dir").next().is_some() {
            killed_mid_copy += 1;
        }
        // Whatever the timing, the upper layer holds either nothing under the name or the
        // complete copy (plus the append, if the writer got that far).
        match fs::metadata(&upper_file) {
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "round {round}: {e}"),
            Ok(meta) => {
                assert!(
                    meta.len() == SIZE || meta.len() == SIZE + 9,
                    "round {round} (kill {moment:?}): upper file has {} bytes, a partial \
                     copy is visible",
                    meta.len()
                );
                assert!(
                    same_prefix(&lower_file, &upper_file, SIZE),
                    "round {round}: upper copy differs from the lower file"
                );
                fs::remove_file(&upper_file).expect("reset upper for the next round");
            }
        }
        eprintln!(
            "round {round}: killed {moment:?}; writer: {:?}",
            finished.as_ref().map(|_| "done")
        );
    }
    assert!(
        killed_mid_copy > 0,
        "no kill landed inside a copy-up (no staged file left in the work dir): the test \
         proved nothing"
    );
    // A fresh mount clears what the killed copies left in the work dir.
    let m = mount_ovlfuse(&l, "");
    let leftovers: Vec<_> = fs::read_dir(&work)
        .expect("read work dir")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert!(
        leftovers.is_empty(),
        "work dir not cleaned at mount: {leftovers:?}"
    );
    let root = m.path().to_path_buf();
    let size = with_timeout(20, move || fs::metadata(root.join("big")).map(|m| m.len()))
        .expect("stat big through the union");
    assert_eq!(size, SIZE, "the lower file shows through again");
    // Undisturbed, the same append completes: the whole copy plus the new bytes.
    let target = m.p("big");
    with_timeout(60, move || {
        fs::OpenOptions::new()
            .append(true)
            .open(&target)
            .and_then(|mut f| f.write_all(b"appended\n"))
    })
    .expect("append through the union");
    drop(m);
    assert_eq!(
        fs::metadata(&upper_file).expect("upper copy").len(),
        SIZE + 9
    );
    assert!(same_prefix(&lower_file, &upper_file, SIZE));
}
