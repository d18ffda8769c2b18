//! FUSE passthrough: opens of upper files are served by the kernel straight from the upper
//! file, and the kernel's rules for mixing passthrough and cached opens of one inode (which
//! fail an open with EIO when broken) are kept, on both transports.

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const T: u64 = 60;
const TRANSPORTS: [&str; 2] = ["", "nofuseblk"];

/// Runs `body(transport, mountpoint, upper)` once per transport, each on a fresh union of
/// one lower layer (filled by `fill`) and an empty upper layer.
fn on_each_transport(fill: fn(&Layers), body: fn(&str, PathBuf, PathBuf)) {
    for transport in TRANSPORTS {
        let s = Scratch::new();
        let l = s.layers(1, true);
        fill(&l);
        let m = mount_ovlfuse(&l, transport);
        let (mnt, upper) = (m.mnt.clone(), l.up().0.clone());
        with_timeout(T, move || body(transport, mnt, upper));
        drop(m);
    }
}

fn nothing(_: &Layers) {}

fn pread(f: &File, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = f.read_at(&mut buf, 0).unwrap();
    buf.truncate(n);
    buf
}

/// The read through an open union file shows a change made to the upper file behind its
/// back, after the same descriptor already read the old bytes: only a file served straight
/// from the upper file does that (a cached open answers from its page cache).
#[test]
fn upper_files_are_read_and_written_straight_through() {
    if testing_kernel_instead() {
        return;
    }
    on_each_transport(nothing, |transport, mnt, upper| {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(mnt.join("f"))
            .unwrap();
        f.write_all_at(b"aaaa", 0).unwrap();
        assert_eq!(pread(&f, 4), b"aaaa");
        OpenOptions::new()
            .write(true)
            .open(upper.join("f"))
            .unwrap()
            .write_all_at(b"bbbb", 0)
            .unwrap();
        assert_eq!(
            pread(&f, 4),
            b"bbbb",
            "[{transport}] the open union file was not served from the upper file"
        );
        // And the writes went to the upper file itself.
        f.write_all_at(b"cc", 4).unwrap();
        assert_eq!(fs::read(upper.join("f")).unwrap(), b"bbbbcc");
    });
}

/// A lower file open read-only is served through the daemon (it must follow the copy-up);
/// an open for writing made meanwhile copies it up and must then be served the same way,
/// and once both are closed, new opens pass through. No open may fail on the way.
#[test]
fn cached_and_passthrough_opens_of_one_file_never_clash() {
    fn lower_file(l: &Layers) {
        l.lower(0).write_file("lf", b"lower\n", 0o644);
    }
    on_each_transport(lower_file, |transport, mnt, _| {
        let p = mnt.join("lf");
        let reader = File::open(&p).unwrap();
        assert_eq!(pread(&reader, 64), b"lower\n");
        let writer = OpenOptions::new().write(true).open(&p).unwrap();
        writer.write_all_at(b"upper\n", 0).unwrap();
        assert_eq!(
            pread(&reader, 64),
            b"upper\n",
            "[{transport}] the reader opened before the copy-up"
        );
        drop((reader, writer));
        // Now an upper file: opens in every mode at once, from several threads.
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..200 {
                        let f = match (t + i) % 3 {
                            0 => File::open(&p),
                            1 => OpenOptions::new().write(true).open(&p),
                            _ => OpenOptions::new().read(true).append(true).open(&p),
                        }
                        .unwrap_or_else(|e| panic!("open {i} of thread {t}: {e}"));
                        // (EBADF for the write-only ones: only the opens are under test.)
                        let _ = f.read_at(&mut [0u8; 6], 0);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(fs::read(&p).unwrap(), b"upper\n");
    });
}

/// Shared mappings and exec of upper files go to the upper file too.
#[test]
fn shared_mappings_and_exec_of_upper_files() {
    on_each_transport(nothing, |transport, mnt, upper| {
        let p = mnt.join("mapped");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .unwrap();
        f.set_len(4096).unwrap();
        // SAFETY: a fresh shared mapping of a 4 KiB file, unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        // SAFETY: the mapping is 4096 bytes long and writable.
        unsafe {
            std::ptr::copy_nonoverlapping(b"mapped!".as_ptr(), addr.cast(), 7);
            assert_eq!(libc::msync(addr, 4096, libc::MS_SYNC), 0);
            libc::munmap(addr, 4096);
        }
        assert_eq!(&fs::read(upper.join("mapped")).unwrap()[..7], b"mapped!");

        let prog = mnt.join("true");
        fs::copy("/bin/true", &prog).unwrap();
        let out = Command::new(&prog).status().unwrap();
        assert!(
            out.success(),
            "[{transport}] exec of an upper binary: {out}"
        );
        wait_until_not_busy(&prog);
    });
}

/// O_DIRECT opens of upper files work through the backing file as well.
#[test]
fn direct_io_on_upper_files() {
    on_each_transport(nothing, |transport, mnt, _| {
        let p = mnt.join("direct");
        fs::write(&p, vec![7u8; 8192]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(&p)
            .unwrap();
        // O_DIRECT wants an aligned buffer: take one from a 4 KiB-aligned allocation.
        let layout = std::alloc::Layout::from_size_align(4096, 4096).unwrap();
        // SAFETY: non-zero size; freed below with the same layout.
        let buf = unsafe { std::alloc::alloc_zeroed(layout) };
        // SAFETY: `buf` is 4096 bytes.
        let slice = unsafe { std::slice::from_raw_parts_mut(buf, 4096) };
        slice.fill(9);
        f.write_all_at(slice, 4096).unwrap();
        slice.fill(0);
        f.read_exact_at(slice, 4096).unwrap();
        let all_nine = slice.iter().all(|&b| b == 9);
        // SAFETY: allocated above with `layout`.
        unsafe { std::alloc::dealloc(buf, layout) };
        assert!(all_nine, "[{transport}] O_DIRECT read back other bytes");
        let data = fs::read(&p).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 7) && data[4096..].iter().all(|&b| b == 9));
    });
}

/// exec keeps the binary busy for a moment after the child exits (ETXTBSY on a new writer);
/// wait until a write open works, so the unmount that follows is not refused.
fn wait_until_not_busy(p: &Path) {
    for _ in 0..50 {
        if OpenOptions::new().write(true).open(p).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
