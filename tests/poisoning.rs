//! Volatile mode at run time: nothing is ever flushed for callers, and from the first upper
//! writeback error on (a real one, from the fault rig) the mount is poisoned: every fsync
//! returns the upper errno and every syncfs EIO, forever, on every descriptor (the kernel
//! overlay's volatile rule), every other operation that reaches the daemon fails with EIO
//! (beyond the kernel, so a container manager cannot miss it), unmount still works and the
//! daemon exits non-zero.
//!
//! Both transports: fuseblk (root's default; syncfs(2) reaches the daemon, which answers EIO
//! on every call) and plain fuse (`nofuseblk`; the kernel answers syncfs itself, so the
//! daemon records EIO in the union's superblock: each descriptor's next syncfs reports it
//! once — the one weaker cell, documented in the README).

mod common;

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::faultrig::{FaultyExt4, cachestat, with_rig, writeback_unreported};
use common::*;

const BODY_SECS: u64 = 120;
const NEW_DATA: usize = 64 << 10;
/// How long detection may take: the checker looks every second.
const DETECTION: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Fuseblk,
    Plain,
}

impl Transport {
    fn opts(self) -> &'static str {
        match self {
            Transport::Fuseblk => "volatile",
            Transport::Plain => "volatile,nofuseblk",
        }
    }
}

/// A foreground volatile ovlfuse whose upper and work dirs are on the rig.
struct Union {
    m: Mounted,
    upper: PathBuf,
    work: PathBuf,
    _scratch: Scratch,
}

fn volatile_union(rig: &FaultyExt4, transport: Transport) -> Union {
    let scratch = Scratch::new();
    let lower = scratch.mkdir("lower");
    fs::write(lower.join("lowerfile"), b"from the lower layer\n").unwrap();
    fs::create_dir(lower.join("dir")).unwrap();
    fs::write(lower.join("dir/x"), b"x\n").unwrap();
    let layers = rig.union_layers(lower);
    let (upper, work) = layers.upper_and_work();
    let m = mount_ovlfuse_foreground(&layers, transport.opts());
    let want = match transport {
        Transport::Fuseblk => "fuseblk.ovlfuse",
        Transport::Plain => "fuse.ovlfuse",
    };
    assert_eq!(fstype_of(m.path()).as_deref(), Some(want));
    Union {
        m,
        upper,
        work,
        _scratch: scratch,
    }
}

fn res(r: libc::c_int) -> Result<(), i32> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    }
}

fn fsync(f: &File) -> Result<(), i32> {
    res(unsafe { libc::fsync(f.as_raw_fd()) })
}

fn syncfs(f: &File) -> Result<(), i32> {
    res(unsafe { libc::syncfs(f.as_raw_fd()) })
}

fn io_res<T>(r: io::Result<T>) -> Result<(), i32> {
    r.map(|_| ()).map_err(|e| errno_of(&e))
}

fn show(r: Result<(), i32>) -> String {
    match r {
        Ok(()) => "OK".into(),
        Err(e) => format!("ERR({})", errno_name(e)),
    }
}

/// One call's result: Ok or the errno.
type Outcome = Result<(), i32>;

/// Expected vs got, printed as a table; panics listing every mismatch.
struct Cells(String, Vec<(String, Outcome, Outcome)>);

impl Cells {
    fn new(title: String) -> Cells {
        Cells(title, Vec::new())
    }

    fn cell(&mut self, what: &str, expected: Result<(), i32>, got: Result<(), i32>) {
        self.1.push((what.to_string(), expected, got));
    }

    fn finish(self) {
        let mut out = format!("{}:\n", self.0);
        let mut bad = 0;
        for (what, exp, got) in &self.1 {
            let mark = if exp == got {
                ""
            } else {
                bad += 1;
                "   <-- MISMATCH"
            };
            out.push_str(&format!(
                "  {what:<40} expected {:<14} got {:<14}{mark}\n",
                show(*exp),
                show(*got)
            ));
        }
        eprint!("{out}");
        assert!(bad == 0, "{bad} cell(s) differ\n{out}");
    }
}

fn open_rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()))
}

/// Raises a real writeback error on the upper copy of `name` (written through `a`), unseen.
fn raise_error(rig: &FaultyExt4, u: &Union, a: &File, name: &str, fail: bool) {
    a.write_all_at(&noise(NEW_DATA, 3), 0).unwrap();
    let x = File::open(u.upper.join(name)).unwrap();
    let dirty = cachestat(&x).unwrap().nr_dirty;
    assert!(
        dirty > 0,
        "the written data is not dirty in the upper page cache"
    );
    if fail {
        rig.fail_new_writes();
    }
    writeback_unreported(&x, Duration::from_secs(20));
    if fail {
        assert!(rig.ext4_is_rw(), "ext4 went read-only");
        rig.heal();
    }
}

/// Waits until a stat through the union fails (the mount got poisoned) or `DETECTION` ends.
fn wait_poisoned(mnt: &Path) -> bool {
    let deadline = Instant::now() + DETECTION;
    while Instant::now() < deadline {
        if fs::metadata(mnt.join("lowerfile")).is_err() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

fn scenario(transport: Transport, fail: bool) {
    with_rig(BODY_SECS, move |rig| {
        let mut u = volatile_union(rig, transport);
        let mnt = u.m.path().to_path_buf();
        File::create(mnt.join("f")).unwrap();
        File::create(mnt.join("e")).unwrap();
        rig.settle();
        let a = open_rw(&mnt.join("f"));
        let other = open_rw(&mnt.join("e"));
        let lower_ro = File::open(mnt.join("lowerfile")).unwrap();
        raise_error(rig, &u, &a, "f", fail);
        let poisoned = wait_poisoned(&mnt);
        assert_eq!(
            poisoned,
            fail,
            "poisoned: {poisoned}, but the rig {} fail",
            if fail { "did" } else { "did not" }
        );
        let (enospc, eio) = if fail {
            (Err(libc::ENOSPC), Err(libc::EIO))
        } else {
            (Ok(()), Ok(()))
        };
        let mut t = Cells::new(format!(
            "volatile {transport:?}, {}",
            if fail {
                "after a writeback error"
            } else {
                "healthy rig (teeth)"
            }
        ));
        t.cell("fsync(A) #1", enospc, fsync(&a));
        t.cell("fsync(A) #2 (forever)", enospc, fsync(&a));
        t.cell("fsync(other file)", enospc, fsync(&other));
        t.cell("fsync(lower file, read-only)", enospc, fsync(&lower_ro));
        let syncfs_second = match transport {
            // fuseblk: the daemon answers every syncfs
            Transport::Fuseblk => eio,
            // plain: the kernel reports the recorded EIO once per descriptor
            Transport::Plain => Ok(()),
        };
        t.cell("syncfs(A) #1", eio, syncfs(&a));
        t.cell("syncfs(A) #2", syncfs_second, syncfs(&a));
        t.cell("syncfs(other file)", eio, syncfs(&other));
        t.cell("stat", eio, io_res(fs::metadata(mnt.join("lowerfile"))));
        t.cell("open", eio, io_res(File::open(mnt.join("dir/x"))));
        t.cell(
            "readdir",
            eio,
            io_res(fs::read_dir(mnt.join("dir")).and_then(|d| d.collect::<io::Result<Vec<_>>>())),
        );
        t.cell("create", eio, io_res(File::create(mnt.join("new"))));
        t.cell("mkdir", eio, io_res(fs::create_dir(mnt.join("newdir"))));
        t.cell("unlink", eio, io_res(fs::remove_file(mnt.join("e"))));
        t.cell(
            "rename",
            eio,
            io_res(fs::rename(mnt.join("dir/x"), mnt.join("dir/y"))),
        );
        let mut buf = [0u8; 16];
        t.cell(
            "read on an open fd",
            eio,
            io_res(lower_ro.read_at(&mut buf, 0)),
        );
        t.cell("write on an open fd", eio, io_res(a.write_at(b"more", 0)));
        t.cell(
            "getxattr",
            if fail { eio } else { Err(libc::ENODATA) },
            io_res(get_xattr(&mnt.join("lowerfile"), "user.x")),
        );
        let statfs = unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            res(libc::statfs(cstr(&mnt).as_ptr(), &mut st))
        };
        t.cell("statfs", eio, statfs);
        if fail {
            std::thread::sleep(Duration::from_secs(2));
            t.cell("fsync(A) 2 s later (forever)", enospc, fsync(&a));
            t.cell(
                "stat 2 s later",
                eio,
                io_res(fs::metadata(mnt.join("lowerfile"))),
            );
        }
        t.cell(
            "close",
            Ok(()),
            res(unsafe { libc::close(std::os::unix::io::IntoRawFd::into_raw_fd(a)) }),
        );
        drop((other, lower_ro));
        t.finish();
        // unmount still works, and the daemon says the data was lost
        let out = run_argv(
            &["umount".as_ref(), mnt.as_os_str()],
            Duration::from_secs(20),
        );
        assert!(out.ok(), "umount of a poisoned mount: {}", out.stderr);
        let code = u.m.wait_foreground(Duration::from_secs(30));
        assert_eq!(code, Some(if fail { 1 } else { 0 }), "daemon exit code");
        u.m.unmount();
        // the kernel's volatile marker stays behind
        assert!(
            u.work.join("work/incompat/volatile/dirty").exists(),
            "volatile marker missing after unmount"
        );
    })
}

#[test]
fn volatile_fuseblk_is_poisoned_by_a_writeback_error() {
    scenario(Transport::Fuseblk, true)
}

#[test]
fn volatile_plain_is_poisoned_by_a_writeback_error() {
    scenario(Transport::Plain, true)
}

#[test]
fn volatile_fuseblk_stays_healthy_without_errors() {
    scenario(Transport::Fuseblk, false)
}

#[test]
fn volatile_plain_stays_healthy_without_errors() {
    scenario(Transport::Plain, false)
}

/// Volatile never flushes for callers: after fsync and syncfs the data is still dirty in
/// the upper page cache.
#[test]
fn volatile_fsync_and_syncfs_do_not_flush() {
    with_rig(BODY_SECS, |rig| {
        let u = volatile_union(rig, Transport::Fuseblk);
        let mnt = u.m.path().to_path_buf();
        let a = File::create(mnt.join("f")).unwrap();
        a.write_all_at(&noise(NEW_DATA, 9), 0).unwrap();
        assert_eq!(fsync(&a), Ok(()));
        assert_eq!(syncfs(&a), Ok(()));
        let x = File::open(u.upper.join("f")).unwrap();
        let st = cachestat(&x).unwrap();
        assert!(
            st.nr_dirty > 0,
            "volatile fsync/syncfs flushed the upper file: {st:?}"
        );
    })
}
