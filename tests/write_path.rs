//! Write-path differential tests: every mutating operation is run on the
//! kernel overlay and on ovlfuse over identical copies of the same layers;
//! op results, merged trees, raw upper dirs (whiteouts, opaque markers, copied
//! up attributes) and the untouched lowers must all match.
//!
//! `OVLFUSE_BIN=kernel` runs both sides on the kernel overlay, which checks
//! that every scenario is deterministic and its expectations are sound.

mod common;

use common::*;
use std::fs::{self, File};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::OnceLock;

// ---------------------------------------------------------------------------
// extra logged operations
// ---------------------------------------------------------------------------

fn rec<T>(
    o: &mut OpLog,
    what: String,
    r: io::Result<T>,
    ok: impl FnOnce(&T) -> String,
) -> io::Result<T> {
    let line = format!("{what}: {}", fmt_res(&r, ok));
    o.push(line);
    r
}

fn unit<T>(_: &T) -> String {
    String::new()
}

fn data_desc(b: &[u8]) -> String {
    format!("len={} hash={:016x}", b.len(), hash_bytes(b))
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn flag_names(flags: i32) -> String {
    let mut v = vec![match flags & libc::O_ACCMODE {
        libc::O_RDONLY => "O_RDONLY",
        libc::O_WRONLY => "O_WRONLY",
        _ => "O_RDWR",
    }];
    for (f, n) in [
        (libc::O_CREAT, "O_CREAT"),
        (libc::O_EXCL, "O_EXCL"),
        (libc::O_TRUNC, "O_TRUNC"),
        (libc::O_APPEND, "O_APPEND"),
        (libc::O_NOFOLLOW, "O_NOFOLLOW"),
        (libc::O_DIRECTORY, "O_DIRECTORY"),
    ] {
        if flags & f == f {
            v.push(n);
        }
    }
    v.join("|")
}

fn open_raw(p: &Path, flags: i32, mode: u32) -> io::Result<File> {
    let c = cstr(p);
    let fd = cvt(unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, mode as libc::c_uint) })?;
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn sec_nsec(s: i64, ns: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: ns as _,
    }
}

/// Write-side operations, logged like the ones of [`OpLog`].
trait WriteOps {
    fn open_flags(&mut self, rel: &str, flags: i32, mode: u32) -> io::Result<File>;
    fn pwrite(&mut self, rel: &str, off: u64, data: &[u8]) -> io::Result<()>;
    fn fd_write(&mut self, label: &str, f: &File, off: u64, data: &[u8]) -> io::Result<()>;
    fn fd_append(&mut self, label: &str, f: &mut File, data: &[u8]) -> io::Result<()>;
    fn fd_read(&mut self, label: &str, f: &File, off: u64, len: usize) -> io::Result<Vec<u8>>;
    fn mknod(&mut self, rel: &str, kind: u32, mode: u32, major: u32, minor: u32) -> io::Result<()>;
    fn bind_socket(&mut self, rel: &str) -> io::Result<()>;
    fn rename2(&mut self, from: &str, to: &str, flags: u32) -> io::Result<()>;
    fn utimens(&mut self, rel: &str, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()>;
    fn utime_now(&mut self, rel: &str) -> io::Result<()>;
    fn times(&mut self, rel: &str) -> io::Result<fs::Metadata>;
    fn fallocate(&mut self, rel: &str, mode: i32, off: i64, len: i64) -> io::Result<()>;
    fn copy_range(
        &mut self,
        src: &str,
        soff: u64,
        dst: &str,
        doff: u64,
        len: usize,
    ) -> io::Result<usize>;
    fn mmap_write(&mut self, rel: &str, off: usize, data: &[u8]) -> io::Result<()>;
    fn setxattr_flags(&mut self, rel: &str, name: &str, val: &[u8], flags: i32) -> io::Result<()>;
    fn show(&mut self, rel: &str);
    fn blocks_sparse(&mut self, rel: &str) -> io::Result<bool>;
}

impl WriteOps for OpLog {
    fn open_flags(&mut self, rel: &str, flags: i32, mode: u32) -> io::Result<File> {
        let r = open_raw(&self.p(rel), flags, mode);
        rec(
            self,
            format!("open {rel} {} {mode:o}", flag_names(flags)),
            r,
            unit,
        )
    }

    fn pwrite(&mut self, rel: &str, off: u64, data: &[u8]) -> io::Result<()> {
        let r = open_raw(&self.p(rel), libc::O_WRONLY, 0).and_then(|f| f.write_all_at(data, off));
        rec(
            self,
            format!("pwrite {rel} @{off} {}", data_desc(data)),
            r,
            unit,
        )
    }

    fn fd_write(&mut self, label: &str, f: &File, off: u64, data: &[u8]) -> io::Result<()> {
        let r = f.write_all_at(data, off);
        rec(
            self,
            format!("fd_write {label} @{off} {}", data_desc(data)),
            r,
            unit,
        )
    }

    fn fd_append(&mut self, label: &str, f: &mut File, data: &[u8]) -> io::Result<()> {
        use std::io::Write;
        let r = f.write_all(data);
        rec(
            self,
            format!("fd_append {label} {}", data_desc(data)),
            r,
            unit,
        )
    }

    fn fd_read(&mut self, label: &str, f: &File, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        let r = f.read_at(&mut buf, off).map(|n| {
            buf.truncate(n);
            buf
        });
        rec(self, format!("fd_read {label} @{off}+{len}"), r, |b| {
            format!(
                "{} {:?}",
                data_desc(b),
                String::from_utf8_lossy(&b[..b.len().min(48)])
            )
        })
    }

    fn mknod(&mut self, rel: &str, kind: u32, mode: u32, major: u32, minor: u32) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let dev = libc::makedev(major, minor);
        let r =
            cvt(unsafe { libc::mknod(c.as_ptr(), (kind | mode) as libc::mode_t, dev) }).map(|_| ());
        rec(
            self,
            format!("mknod {rel} {:o} {mode:o} {major}:{minor}", kind >> 12),
            r,
            unit,
        )
    }

    fn bind_socket(&mut self, rel: &str) -> io::Result<()> {
        let r = std::os::unix::net::UnixListener::bind(self.p(rel)).map(drop);
        rec(self, format!("bind {rel}"), r, unit)
    }

    fn rename2(&mut self, from: &str, to: &str, flags: u32) -> io::Result<()> {
        let (a, b) = (cstr(self.p(from)), cstr(self.p(to)));
        let r = cvt(unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                a.as_ptr(),
                libc::AT_FDCWD,
                b.as_ptr(),
                flags,
            )
        })
        .map(|_| ());
        let f = match flags {
            libc::RENAME_NOREPLACE => "NOREPLACE",
            libc::RENAME_EXCHANGE => "EXCHANGE",
            libc::RENAME_WHITEOUT => "WHITEOUT",
            _ => "0",
        };
        rec(self, format!("renameat2 {from} {to} {f}"), r, unit)
    }

    fn utimens(&mut self, rel: &str, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let ts = [sec_nsec(atime.0, atime.1), sec_nsec(mtime.0, mtime.1)];
        let r = cvt(unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
        .map(|_| ());
        rec(
            self,
            format!("utimensat {rel} {atime:?} {mtime:?}"),
            r,
            unit,
        )
    }

    fn utime_now(&mut self, rel: &str) -> io::Result<()> {
        let c = cstr(self.p(rel));
        let ts = [sec_nsec(0, libc::UTIME_NOW), sec_nsec(0, libc::UTIME_NOW)];
        let r =
            cvt(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), 0) }).map(|_| ());
        rec(self, format!("utimensat {rel} UTIME_NOW"), r, unit)
    }

    fn times(&mut self, rel: &str) -> io::Result<fs::Metadata> {
        let r = fs::symlink_metadata(self.p(rel));
        rec(self, format!("times {rel}"), r, |m| {
            format!(
                "atime={}.{:09} mtime={}.{:09}",
                m.atime(),
                m.atime_nsec(),
                m.mtime(),
                m.mtime_nsec()
            )
        })
    }

    fn fallocate(&mut self, rel: &str, mode: i32, off: i64, len: i64) -> io::Result<()> {
        let r = open_raw(&self.p(rel), libc::O_RDWR, 0).and_then(|f| {
            cvt(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) }).map(|_| ())
        });
        rec(
            self,
            format!("fallocate {rel} mode={mode:#x} @{off}+{len}"),
            r,
            unit,
        )
    }

    fn copy_range(
        &mut self,
        src: &str,
        soff: u64,
        dst: &str,
        doff: u64,
        len: usize,
    ) -> io::Result<usize> {
        let r = (|| {
            let s = open_raw(&self.p(src), libc::O_RDONLY, 0)?;
            let d = open_raw(&self.p(dst), libc::O_WRONLY, 0)?;
            let (mut so, mut dof) = (soff as libc::loff_t, doff as libc::loff_t);
            let mut total = 0usize;
            while total < len {
                let n = unsafe {
                    libc::copy_file_range(
                        s.as_raw_fd(),
                        &mut so,
                        d.as_raw_fd(),
                        &mut dof,
                        len - total,
                        0,
                    )
                };
                if n < 0 {
                    return Err(io::Error::last_os_error());
                }
                if n == 0 {
                    break;
                }
                total += n as usize;
            }
            Ok(total)
        })();
        rec(
            self,
            format!("copy_file_range {src}@{soff} -> {dst}@{doff} len={len}"),
            r,
            |n| format!("copied={n}"),
        )
    }

    fn mmap_write(&mut self, rel: &str, off: usize, data: &[u8]) -> io::Result<()> {
        let r = (|| {
            let f = open_raw(&self.p(rel), libc::O_RDWR, 0)?;
            let len = f.metadata()?.len() as usize;
            assert!(off + data.len() <= len, "mmap_write past EOF");
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    f.as_raw_fd(),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            unsafe {
                std::ptr::copy_nonoverlapping(data.as_ptr(), (p as *mut u8).add(off), data.len())
            };
            let s = unsafe { libc::msync(p, len, libc::MS_SYNC) };
            let e = io::Error::last_os_error();
            unsafe { libc::munmap(p, len) };
            if s < 0 {
                return Err(e);
            }
            Ok(())
        })();
        rec(
            self,
            format!("mmap_write {rel} @{off} {}", data_desc(data)),
            r,
            unit,
        )
    }

    fn setxattr_flags(&mut self, rel: &str, name: &str, val: &[u8], flags: i32) -> io::Result<()> {
        let (c, n) = (cstr(self.p(rel)), cstr(name));
        let r = cvt(unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                n.as_ptr(),
                val.as_ptr() as *const libc::c_void,
                val.len(),
                flags,
            )
        })
        .map(|_| ());
        let f = match flags {
            libc::XATTR_CREATE => "CREATE",
            libc::XATTR_REPLACE => "REPLACE",
            _ => "0",
        };
        rec(self, format!("setxattr {rel} {name} {f}"), r, unit)
    }

    /// lstat plus content / listing / target, and the xattr names.
    fn show(&mut self, rel: &str) {
        let Ok(md) = self.lstat(rel) else { return };
        match kind_of(md.mode()) {
            Kind::File => {
                let _ = self.read(rel);
            }
            Kind::Dir => {
                let _ = self.readdir(rel);
            }
            Kind::Symlink => {
                let _ = self.readlink(rel);
            }
            _ => {}
        }
        if kind_of(md.mode()) != Kind::Symlink {
            let _ = self.listxattr(rel);
        }
    }

    /// Whether fewer blocks than half the size are allocated.
    fn blocks_sparse(&mut self, rel: &str) -> io::Result<bool> {
        let r = fs::symlink_metadata(self.p(rel)).map(|m| m.blocks() * 512 < m.size() / 2);
        rec(self, format!("is_sparse {rel}"), r, |b| format!("{b}"))
    }
}

// ---------------------------------------------------------------------------
// layer sets
// ---------------------------------------------------------------------------

/// The layer set most scenarios run on.  Names:
/// - lower-only files `lo`, `lo_exec`, `lo2` (bottom layer), `mid` (l0 over l2)
/// - shadowed `sh` (lower + upper), upper-only `uo`, `ulnk`
/// - `d/` merged (upper + lowers): `d/lf`, `d/lf2`, `d/top`, `d/hl2`, `d/uf`
/// - `m/` merged over three lowers with different modes, not in the upper
/// - `ld/` lower-only dir (0750, 1000:1000, user.dir) with `x`, `y`
/// - `emptyld/` empty lower dir; `ud/` upper-only dir with `f`; `uempty/`
/// - `wd/` lower dir whose entries are all whited out in the upper
/// - `gone` / `goned/` whited-out file / dir; `opq/` opaque upper dir over a
///   lower `opq/hidden`
/// - `xf` (user.a, trusted.t), `lnk` -> lo, `hl1` == `d/hl2`, `fifo`, `chr`
/// - `deep/a/b/c/f` lower-only chain with distinct modes/owners/xattrs
fn base(l: &Layers) {
    let (u, l0, l1, l2) = (l.up(), l.lower(0), l.lower(1), l.lower(2));
    l2.mkdir("m", 0o755)
        .write_file("m/bottom", b"bottom\n", 0o644)
        .write_file("mid", b"mid from l2\n", 0o644)
        .write_file("lo2", b"only in the bottom layer\n", 0o640)
        .mkdir("d", 0o755)
        .write_file("d/bottom", b"bottom of d\n", 0o644);
    l1.write_file("lo", b"lower only\n", 0o644)
        .write_file("lo_exec", b"#!/bin/sh\necho lower\n", 0o755)
        .write_file("sh", b"lower version of sh\n", 0o644)
        .write_file("d/lf", b"lower file in merged dir\n", 0o644)
        .write_file("d/lf2", b"second\n", 0o600)
        .mkdir("ld", 0o750)
        .write_file("ld/x", b"x in ld\n", 0o644)
        .write_file("ld/y", b"y in ld\n", 0o600)
        .chown("ld", 1000, 1000)
        .setxattr("ld", "user.dir", b"ld")
        .mkdir("emptyld", 0o705)
        .write_file("wd/a", b"a\n", 0o644)
        .write_file("wd/b", b"b\n", 0o644)
        .write_file("gone", b"whited out\n", 0o644)
        .write_file("goned/inner", b"hidden\n", 0o644)
        .write_file("opq/hidden", b"hidden by opaque\n", 0o644)
        .write_file("xf", b"has xattrs\n", 0o644)
        .setxattr("xf", "user.a", b"1")
        .setxattr("xf", "trusted.t", b"2")
        .symlink("lnk", "lo")
        .write_file("hl1", b"hard linked\n", 0o644)
        .hardlink("hl1", "d/hl2")
        .mkfifo("fifo", 0o640)
        .mknod_char("chr", 0o600, 1, 3)
        .mkdir("m", 0o711)
        .write_file("m/mid_layer", b"middle\n", 0o644)
        .mkdir("deep", 0o751)
        .chown("deep", 1, 1)
        .mkdir("deep/a", 0o711)
        .chown("deep/a", 2, 2)
        .mkdir("deep/a/b", 0o700)
        .chown("deep/a/b", 3, 3)
        .setxattr("deep/a/b", "user.lvl", b"b")
        .mkdir("deep/a/b/c", 0o755)
        .chown("deep/a/b/c", 4, 4)
        .write_file("deep/a/b/c/f", b"deep file\n", 0o644);
    l0.write_file("mid", b"mid from l0\n", 0o600)
        .mkdir("m", 0o775)
        .chown("m", 7, 8)
        .setxattr("m", "user.m", b"top")
        .write_file("m/top", b"top\n", 0o644)
        .write_file("d/top", b"top of d\n", 0o644);
    u.write_file("uo", b"upper only\n", 0o640)
        .write_file("sh", b"upper version of sh, longer\n", 0o600)
        .write_file("ud/f", b"upper dir file\n", 0o644)
        .mkdir("uempty", 0o755)
        .write_file("d/uf", b"upper file in merged dir\n", 0o644)
        .whiteout("gone")
        .whiteout("goned")
        .whiteout("wd/a")
        .whiteout("wd/b")
        .write_file("opq/vis", b"visible\n", 0o644)
        .opaque_dir("opq")
        .symlink("ulnk", "uo");
}

/// `run_differential` on the scenario; `OVLFUSE_WP_DUMP=1` also
/// prints the kernel's op log (run with `--nocapture` to see it).
fn run(name: &'static str, build: fn(&Layers), ops: fn(&Path) -> Vec<String>) {
    let sc = Scenario::new(name, build, ops);
    if std::env::var_os("OVLFUSE_WP_DUMP").is_some() {
        let out = run_differential_collect(&sc);
        eprintln!("=== {name}\n  {}", out.kernel_log.join("\n  "));
        let mut all = op_log_differences(&out.kernel_log, &out.ovlfuse_log);
        all.extend(out.problems.iter().cloned());
        assert!(all.is_empty(), "{name}: {}", all.join("\n  "));
    } else {
        run_differential(&sc);
    }
}

/// `#[test] fn NAME` running OPS (a block using the OpLog `o`) on BUILD.
macro_rules! scenario {
    ($name:ident, $build:expr, |$o:ident| $body:block) => {
        #[test]
        fn $name() {
            #[allow(unused_must_use, unused_mut)]
            fn ops(root: &Path) -> Vec<String> {
                let mut $o = OpLog::new(root);
                $body
                $o.into_log()
            }
            run(stringify!($name), $build, ops);
        }
    };
}

// ---------------------------------------------------------------------------
// create / open / write
// ---------------------------------------------------------------------------

scenario!(
    create_new_files_in_root_lower_dir_upper_dir_and_merged_dir,
    base,
    |o| {
        o.create_excl("new_root", 0o640);
        o.create_excl("ld/new_in_lower_dir", 0o600);
        o.create_excl("ud/new_in_upper_dir", 0o644);
        o.create_excl("d/new_in_merged_dir", 0o604);
        o.create_excl("m/new_in_three_lower_dir", 0o644);
        for p in [
            "new_root",
            "ld/new_in_lower_dir",
            "ud/new_in_upper_dir",
            "d/new_in_merged_dir",
        ] {
            o.show(p);
        }
        for p in ["ld", "m", "d", "ud"] {
            o.show(p);
        }
    }
);

scenario!(
    create_excl_on_lower_upper_shadowed_and_whiteout_names,
    base,
    |o| {
        o.create_excl("lo", 0o644);
        o.create_excl("uo", 0o644);
        o.create_excl("sh", 0o644);
        o.create_excl("d/lf", 0o644);
        o.create_excl("ld", 0o644);
        o.create_excl("lnk", 0o644);
        o.create_excl("gone", 0o600);
        o.create_excl("wd/a", 0o600);
        o.show("gone");
        o.show("wd");
        o.show("lo");
    }
);

/// `base`, plus whiteouts in directories no lower layer has (`ud`) or whose lower one is
/// hidden (`opq`): an upper layer used before over other lower layers, or an image layer,
/// may hold these. ovlfuse makes a new name there without looking it up first.
fn whiteouts_in_unmerged_dirs(l: &Layers) {
    base(l);
    l.up().whiteout("ud/w").whiteout("opq/w");
}

scenario!(
    making_names_in_unmerged_dirs_over_whiteouts_and_existing_names,
    whiteouts_in_unmerged_dirs,
    |o| {
        o.create_excl("ud/f", 0o644);
        o.create_excl("ud/w", 0o640);
        o.create_excl("ud/new", 0o600);
        o.mkdir("ud/f", 0o755);
        o.mkdir("ud/new", 0o755);
        o.symlink("x", "ud/new");
        o.mkfifo("ud/new", 0o644);
        o.create_excl("opq/vis", 0o644);
        o.create_excl("opq/hidden", 0o644);
        o.mkdir("opq/w", 0o750);
        o.create_excl("uempty/a", 0o644);
        o.create_excl("uempty/a", 0o644);
        for p in [
            "ud",
            "ud/w",
            "ud/new",
            "opq",
            "opq/w",
            "opq/hidden",
            "uempty",
        ] {
            o.show(p);
        }
    }
);

scenario!(
    open_creat_without_excl_on_existing_files_keeps_content,
    base,
    |o| {
        o.open_flags("lo", libc::O_WRONLY | libc::O_CREAT, 0o600);
        o.open_flags("uo", libc::O_WRONLY | libc::O_CREAT, 0o600);
        o.open_flags("sh", libc::O_RDWR | libc::O_CREAT, 0o600);
        o.open_flags("ld/x", libc::O_RDONLY | libc::O_CREAT, 0o600);
        o.open_flags("fresh", libc::O_RDONLY | libc::O_CREAT, 0o600);
        for p in ["lo", "uo", "sh", "ld/x", "fresh", "ld"] {
            o.show(p);
        }
    }
);

scenario!(open_rdonly_of_lower_file_does_not_copy_up, base, |o| {
    o.open_flags("lo", libc::O_RDONLY, 0);
    o.open_flags("ld/x", libc::O_RDONLY, 0);
    o.open_flags("deep/a/b/c/f", libc::O_RDONLY, 0);
    o.read("lo");
    o.read("ld/x");
    o.readdir("ld");
    o.stat("ld/y");
});

scenario!(open_for_write_without_writing_copies_up, base, |o| {
    o.open_flags("lo", libc::O_WRONLY, 0);
    o.open_flags("ld/x", libc::O_RDWR, 0);
    o.open_flags("m/bottom", libc::O_WRONLY, 0);
    o.show("lo");
    o.show("ld/x");
    o.show("m/bottom");
});

scenario!(open_trunc_on_lower_upper_and_shadowed_files, base, |o| {
    for p in ["lo", "uo", "sh", "d/lf", "mid", "xf"] {
        o.open_flags(p, libc::O_WRONLY | libc::O_TRUNC, 0);
        o.show(p);
    }
    o.open_flags("lo2", libc::O_RDONLY | libc::O_TRUNC, 0);
    o.show("lo2");
});

scenario!(open_append_on_lower_upper_and_shadowed_files, base, |o| {
    for p in ["lo", "uo", "sh", "m/bottom"] {
        if let Ok(mut f) = o.open_flags(p, libc::O_WRONLY | libc::O_APPEND, 0) {
            o.fd_append(p, &mut f, b"appended once\n");
            // O_APPEND ignores the offset of pwrite on Linux
            o.fd_write(p, &f, 0, b"appended twice\n");
        }
        o.show(p);
    }
    o.append("lo2", b"via OpLog::append\n");
    o.show("lo2");
});

scenario!(
    write_at_offsets_in_lower_upper_and_shadowed_files,
    base,
    |o| {
        o.pwrite("lo", 3, b"XYZ");
        o.pwrite("lo", 100, b"past eof");
        o.pwrite("uo", 0, b"UPPER");
        o.pwrite("uo", 4096 * 3 + 1, b"far");
        o.pwrite("sh", 5, b"----");
        o.pwrite("mid", 0, &noise(70000, 3));
        for p in ["lo", "uo", "sh", "mid"] {
            o.show(p);
            o.pread(p, 2, 10);
            o.pread(p, 95, 20);
        }
    }
);

scenario!(read_back_through_same_rdwr_fd_after_copy_up, base, |o| {
    if let Ok(f) = o.open_flags("d/lf", libc::O_RDWR, 0) {
        o.fd_read("d/lf", &f, 0, 64);
        o.fd_write("d/lf", &f, 6, b"FILE");
        o.fd_read("d/lf", &f, 0, 64);
        o.fd_write("d/lf", &f, 40, b"tail");
        o.fd_read("d/lf", &f, 0, 64);
    }
    o.show("d/lf");
    o.show("d");
});

scenario!(fs_write_replaces_content_of_every_kind_of_file, base, |o| {
    for p in [
        "lo",
        "uo",
        "sh",
        "lnk",
        "ulnk",
        "d/hl2",
        "ld/y",
        "gone",
        "goned/inner",
        "opq/hidden",
    ] {
        o.write_file(p, format!("rewritten {p}\n").as_bytes());
        o.show(p);
    }
    o.show("hl1");
    o.show("d");
    o.show("opq");
});

scenario!(
    write_to_directory_and_special_files_fails_or_passes_through,
    base,
    |o| {
        o.open_flags("ld", libc::O_WRONLY, 0);
        o.open_flags("ud", libc::O_RDWR, 0);
        o.open_flags("fifo", libc::O_RDWR | libc::O_NONBLOCK, 0);
        o.show("chr");
        o.show("fifo");
        o.open_flags("lnk", libc::O_WRONLY | libc::O_NOFOLLOW, 0);
        o.open_flags("missing/x", libc::O_WRONLY | libc::O_CREAT, 0o644);
        o.open_flags("lo/x", libc::O_WRONLY | libc::O_CREAT, 0o644);
    }
);

// ---------------------------------------------------------------------------
// mkdir
// ---------------------------------------------------------------------------

scenario!(
    mkdir_new_in_root_lower_dir_upper_dir_and_deep_lower_chain,
    base,
    |o| {
        o.mkdir("newdir", 0o750);
        o.mkdir("ld/sub", 0o700);
        o.mkdir("ud/sub", 0o755);
        o.mkdir("deep/a/b/c/sub", 0o777);
        o.mkdir("m/sub", 0o755);
        for p in [
            "newdir",
            "ld/sub",
            "ud/sub",
            "deep/a/b/c/sub",
            "ld",
            "deep",
            "deep/a",
            "deep/a/b",
            "m",
        ] {
            o.show(p);
        }
    }
);

scenario!(mkdir_on_existing_names_fails, base, |o| {
    for p in [
        "ld", "ud", "d", "lo", "uo", "sh", "lnk", "fifo", "emptyld", "opq",
    ] {
        o.mkdir(p, 0o755);
    }
    o.mkdir("nope/child", 0o755);
    o.mkdir("lo/child", 0o755);
});

scenario!(
    mkdir_over_whited_out_dir_is_opaque_and_hides_lower_content,
    base,
    |o| {
        o.mkdir("goned", 0o711);
        o.show("goned");
        o.stat("goned/inner");
        o.create_excl("goned/new", 0o644);
        o.show("goned");
        o.getxattr("goned", "trusted.overlay.opaque");
    }
);

scenario!(
    mkdir_over_whited_out_file_and_inside_all_whited_out_dir,
    base,
    |o| {
        o.mkdir("gone", 0o755);
        o.show("gone");
        o.mkdir("wd/a", 0o700);
        o.show("wd");
        o.show("wd/a");
    }
);

scenario!(rmdir_then_mkdir_same_name_makes_opaque_dir, base, |o| {
    o.unlink("ld/x");
    o.unlink("ld/y");
    o.rmdir("ld");
    o.stat("ld");
    o.mkdir("ld", 0o755);
    o.show("ld");
    o.stat("ld/x");
    o.rmdir("emptyld");
    o.mkdir("emptyld", 0o700);
    o.show("emptyld");
});

// ---------------------------------------------------------------------------
// mknod / sockets / symlinks / hard links
// ---------------------------------------------------------------------------

scenario!(mknod_fifo_char_and_block_devices, base, |o| {
    o.mkfifo("newfifo", 0o640);
    o.mknod("ld/fifo2", libc::S_IFIFO, 0o600, 0, 0);
    o.mknod("newchr", libc::S_IFCHR, 0o620, 1, 5);
    o.mknod("ud/newblk", libc::S_IFBLK, 0o640, 7, 42);
    o.mknod("d/regular_via_mknod", libc::S_IFREG, 0o644, 0, 0);
    o.mknod("gone", libc::S_IFCHR, 0o600, 1, 3);
    o.mknod("fifo", libc::S_IFIFO, 0o600, 0, 0);
    o.mknod("lo", libc::S_IFCHR, 0o600, 1, 3);
    for p in [
        "newfifo",
        "ld/fifo2",
        "newchr",
        "ud/newblk",
        "d/regular_via_mknod",
        "gone",
        "ld",
    ] {
        o.show(p);
    }
});

scenario!(mknod_char_0_0_through_the_merged_view, base, |o| {
    o.mknod("wh_lookalike", libc::S_IFCHR, 0o600, 0, 0);
    o.lstat("wh_lookalike");
    o.readdir("");
    o.mknod("lo", libc::S_IFCHR, 0o600, 0, 0);
});

scenario!(
    bind_unix_sockets_in_root_lower_dir_and_over_whiteout,
    base,
    |o| {
        o.bind_socket("sock");
        o.bind_socket("ld/sock");
        o.bind_socket("gone");
        o.bind_socket("lo");
        for p in ["sock", "ld/sock", "gone", "ld"] {
            o.show(p);
        }
    }
);

scenario!(
    symlink_creation_in_every_kind_of_dir_and_over_whiteout,
    base,
    |o| {
        o.symlink("lo", "s_root");
        o.symlink("../lo", "ld/s_lower_dir");
        o.symlink("/etc/passwd", "ud/s_abs");
        o.symlink("dangling/target", "d/s_dangling");
        o.symlink("x", "gone");
        o.symlink("x", "lo");
        o.symlink("x", "uo");
        for p in [
            "s_root",
            "ld/s_lower_dir",
            "ud/s_abs",
            "d/s_dangling",
            "gone",
            "ld",
        ] {
            o.show(p);
        }
        o.read("s_root");
        o.read("ld/s_lower_dir");
    }
);

scenario!(hard_link_of_lower_file_copies_it_up, base, |o| {
    o.link("lo", "lo_link");
    o.stat("lo");
    o.stat("lo_link");
    o.link("d/lf", "ld/lf_link");
    o.stat("d/lf");
    o.append("lo_link", b"through the link\n");
    o.show("lo");
    o.show("lo_link");
    o.show("ld/lf_link");
    o.show("ld");
});

scenario!(hard_link_of_upper_and_shadowed_files, base, |o| {
    o.link("uo", "uo_link");
    o.link("uo", "ud/uo_link2");
    o.link("sh", "d/sh_link");
    o.stat("uo");
    o.append("ud/uo_link2", b"more\n");
    for p in ["uo", "uo_link", "ud/uo_link2", "sh", "d/sh_link"] {
        o.show(p);
    }
});

scenario!(hard_link_of_lower_symlink_fifo_and_device, base, |o| {
    o.link("lnk", "lnk_link");
    o.link("fifo", "fifo_link");
    o.link("chr", "chr_link");
    for p in ["lnk", "lnk_link", "fifo", "fifo_link", "chr", "chr_link"] {
        o.lstat(p);
    }
});

scenario!(hard_link_errors, base, |o| {
    o.link("lo", "uo");
    o.link("lo", "sh");
    o.link("gone", "x");
    o.link("ld", "ld_link");
    o.link("nope", "x");
    o.link("lo", "nope/x");
    o.link("lo", "gone");
    o.show("gone");
});

scenario!(hard_link_of_already_linked_lower_file, base, |o| {
    o.link("hl1", "hl3");
    for p in ["hl1", "hl3", "d/hl2"] {
        o.stat(p);
        o.read(p);
    }
});

// ---------------------------------------------------------------------------
// unlink / rmdir
// ---------------------------------------------------------------------------

scenario!(unlink_lower_only_file_leaves_whiteout, base, |o| {
    o.unlink("lo");
    o.stat("lo");
    o.readdir("");
    o.unlink("d/lf");
    o.readdir("d");
    o.unlink("m/bottom");
    o.show("m");
    o.unlink("lo");
});

scenario!(unlink_upper_only_and_shadowed_files, base, |o| {
    o.unlink("uo");
    o.unlink("sh");
    o.unlink("d/uf");
    o.unlink("ud/f");
    for p in ["uo", "sh", "d/uf", "ud/f"] {
        o.lstat(p);
    }
    o.readdir("");
    o.readdir("d");
    o.readdir("ud");
});

scenario!(unlink_lower_symlink_fifo_device_and_hard_link, base, |o| {
    o.unlink("lnk");
    o.unlink("fifo");
    o.unlink("chr");
    o.unlink("d/hl2");
    o.stat("hl1");
    o.unlink("ulnk");
    o.stat("uo");
    o.readdir("");
});

scenario!(unlink_errors, base, |o| {
    o.unlink("gone");
    o.unlink("goned/inner");
    o.unlink("opq/hidden");
    o.unlink("ld");
    o.unlink("ud");
    o.unlink("nope");
    o.unlink("lo/x");
    o.unlink("wd/a");
});

scenario!(unlink_then_recreate_file_over_own_whiteout, base, |o| {
    o.unlink("lo");
    o.write_file("lo", b"recreated\n");
    o.show("lo");
    o.unlink("sh");
    o.mkdir("sh", 0o755);
    o.show("sh");
    o.unlink("d/lf");
    o.symlink("lf2", "d/lf");
    o.show("d/lf");
});

scenario!(rmdir_empty_lower_dir_leaves_whiteout, base, |o| {
    o.rmdir("emptyld");
    o.stat("emptyld");
    o.readdir("");
    o.rmdir("emptyld");
});

scenario!(
    rmdir_dir_whose_lower_entries_are_all_whited_out,
    base,
    |o| {
        o.readdir("wd");
        o.rmdir("wd");
        o.stat("wd");
        o.readdir("");
    }
);

scenario!(rmdir_non_empty_dirs_fails_enotempty, base, |o| {
    o.rmdir("ld");
    o.rmdir("d");
    o.rmdir("m");
    o.rmdir("ud");
    o.rmdir("opq");
    o.rmdir("deep/a/b");
    o.show("ld");
    o.show("d");
});

scenario!(rmdir_upper_only_dirs, base, |o| {
    o.rmdir("uempty");
    o.unlink("ud/f");
    o.rmdir("ud");
    o.stat("uempty");
    o.stat("ud");
    o.readdir("");
});

scenario!(rmdir_after_unlinking_every_lower_entry, base, |o| {
    o.unlink("ld/x");
    o.rmdir("ld");
    o.unlink("ld/y");
    o.readdir("ld");
    o.rmdir("ld");
    o.stat("ld");
    for p in ["bottom", "lf", "lf2", "top", "hl2", "uf"] {
        o.unlink(&format!("d/{p}"));
    }
    o.rmdir("d");
    o.readdir("");
});

scenario!(rmdir_opaque_dir_after_emptying_it, base, |o| {
    o.unlink("opq/vis");
    o.readdir("opq");
    o.rmdir("opq");
    o.stat("opq");
    o.mkdir("opq", 0o755);
    o.show("opq");
});

scenario!(rmdir_errors, base, |o| {
    o.rmdir("lo");
    o.rmdir("uo");
    o.rmdir("goned");
    o.rmdir("nope");
    o.rmdir("lnk");
    o.rmdir("");
    o.rmdir("ld/x/y");
});

scenario!(rmdir_deep_lower_chain_bottom_up, base, |o| {
    o.unlink("deep/a/b/c/f");
    o.rmdir("deep/a/b/c");
    o.rmdir("deep/a/b");
    o.rmdir("deep/a");
    o.show("deep");
    o.rmdir("deep");
    o.readdir("");
});

// ---------------------------------------------------------------------------
// rename
// ---------------------------------------------------------------------------

scenario!(rename_upper_file_within_dir_and_across_dirs, base, |o| {
    o.rename("uo", "uo_renamed");
    o.rename("ud/f", "d/from_ud");
    o.rename("d/uf", "ud/from_d");
    for p in ["uo", "uo_renamed", "ud/f", "d/from_ud", "d/uf", "ud/from_d"] {
        o.show(p);
    }
    o.readdir("d");
    o.readdir("ud");
});

scenario!(
    rename_lower_file_copies_up_and_whites_out_source,
    base,
    |o| {
        o.rename("lo", "lo_renamed");
        o.rename("d/lf", "ud/lf");
        o.rename("ld/x", "ld/x2");
        o.rename("m/bottom", "bottom_from_m");
        for p in [
            "lo",
            "lo_renamed",
            "d/lf",
            "ud/lf",
            "ld/x",
            "ld/x2",
            "bottom_from_m",
        ] {
            o.show(p);
        }
        o.readdir("");
        o.readdir("ld");
        o.readdir("m");
        o.readdir("d");
    }
);

scenario!(rename_shadowed_file_and_lower_symlink, base, |o| {
    o.rename("sh", "sh2");
    o.rename("lnk", "ud/lnk");
    o.rename("mid", "d/mid");
    for p in ["sh", "sh2", "lnk", "ud/lnk", "mid", "d/mid"] {
        o.show(p);
    }
    o.read("ud/lnk");
});

// The kernel keeps symlink targets (FUSE_CACHE_SYMLINKS): every replacement of a symlink,
// by rename, by unlink and symlink, or by renaming another over it, must show at once.
scenario!(replaced_symlinks_show_their_new_targets, base, |o| {
    o.readlink("lnk");
    o.readlink("ulnk");
    o.read("lnk");
    o.symlink("uo", "tmp_lnk");
    o.rename("tmp_lnk", "lnk");
    o.readlink("lnk");
    o.read("lnk");
    o.unlink("ulnk");
    o.symlink("lo", "ulnk");
    o.readlink("ulnk");
    o.read("ulnk");
    o.unlink("lnk");
    o.symlink("d/lf", "lnk");
    o.readlink("lnk");
    o.show("lnk");
    o.rename("ulnk", "lnk");
    o.readlink("lnk");
    o.read("lnk");
});

scenario!(
    rename_over_existing_lower_upper_and_shadowed_files,
    base,
    |o| {
        o.rename("uo", "lo");
        o.rename("lo2", "d/uf");
        o.rename("ld/x", "sh");
        o.rename("d/lf", "d/lf2");
        for p in ["uo", "lo", "lo2", "d/uf", "ld/x", "sh", "d/lf", "d/lf2"] {
            o.show(p);
        }
        o.readdir("");
        o.readdir("d");
        o.readdir("ld");
    }
);

scenario!(
    rename_lower_hard_link_name_and_lower_special_files,
    base,
    |o| {
        o.rename("hl1", "hl1_moved");
        o.rename("fifo", "ud/fifo");
        o.rename("chr", "chr2");
        for p in ["hl1_moved", "d/hl2", "ud/fifo", "chr2"] {
            o.lstat(p);
        }
        o.read("hl1_moved");
        o.read("d/hl2");
    }
);

scenario!(
    rename_noreplace_fails_on_existing_and_succeeds_on_whiteout,
    base,
    |o| {
        o.rename2("uo", "lo", libc::RENAME_NOREPLACE);
        o.rename2("lo", "uo", libc::RENAME_NOREPLACE);
        o.rename2("lo", "sh", libc::RENAME_NOREPLACE);
        o.rename2("lo", "gone", libc::RENAME_NOREPLACE);
        o.rename2("uo", "wd/a", libc::RENAME_NOREPLACE);
        o.rename2("ud", "goned", libc::RENAME_NOREPLACE);
        for p in ["lo", "gone", "uo", "wd/a", "goned", "ud"] {
            o.show(p);
        }
        o.stat("goned/inner");
    }
);

scenario!(rename_exchange_of_upper_entries, base, |o| {
    o.rename2("uo", "ud/f", libc::RENAME_EXCHANGE);
    o.rename2("ud", "uempty", libc::RENAME_EXCHANGE);
    o.rename2("ulnk", "d/uf", libc::RENAME_EXCHANGE);
    for p in ["uo", "ud", "uempty", "uempty/f", "ulnk", "d/uf"] {
        o.show(p);
    }
    o.rename2("uo", "missing", libc::RENAME_EXCHANGE);
});

scenario!(rename_exchange_involving_lower_entries, base, |o| {
    o.rename2("lo", "uo", libc::RENAME_EXCHANGE);
    o.rename2("sh", "d/lf", libc::RENAME_EXCHANGE);
    o.rename2("lo2", "mid", libc::RENAME_EXCHANGE);
    o.rename2("ud", "ld", libc::RENAME_EXCHANGE);
    o.rename2("lo", "gone", libc::RENAME_EXCHANGE);
    for p in ["lo", "uo", "sh", "d/lf", "lo2", "mid", "ud", "ld"] {
        o.show(p);
    }
});

scenario!(
    rename_of_lower_and_merged_dirs_without_redirect_dir,
    base,
    |o| {
        o.rename("ld", "ld2");
        o.rename("d", "d2");
        o.rename("emptyld", "emptyld2");
        o.rename("m", "ud/m");
        o.rename("wd", "wd2");
        o.rename("deep/a/b", "b2");
        for p in [
            "ld", "ld2", "d", "d2", "emptyld", "emptyld2", "m", "ud/m", "wd",
        ] {
            o.lstat(p);
        }
        o.readdir("");
    }
);

scenario!(
    rename_of_upper_only_dir_within_root_and_into_lower_dir,
    base,
    |o| {
        o.rename("ud", "ud2");
        o.rename("uempty", "ld/uempty");
        o.show("ud2");
        o.show("ud2/f");
        o.show("ld/uempty");
        o.show("ld");
        o.rename("ud2", "d/ud3");
        o.show("d/ud3");
        o.readdir("");
    }
);

scenario!(rename_onto_whiteout_names, base, |o| {
    o.rename("uo", "gone");
    o.rename("ud", "goned");
    o.rename("lo", "wd/b");
    o.rename("uempty", "wd/a");
    for p in ["gone", "goned", "goned/f", "wd", "wd/b", "wd/a", "lo", "uo"] {
        o.show(p);
    }
    o.stat("goned/inner");
    o.getxattr("goned", "trusted.overlay.opaque");
});

scenario!(
    rename_upper_dir_over_empty_lower_and_upper_dirs,
    base,
    |o| {
        o.rename("ud", "emptyld");
        o.show("emptyld");
        o.show("emptyld/f");
        o.rename("emptyld", "uempty");
        o.show("uempty");
        o.readdir("");
        o.rename("uempty", "ld");
    }
);

scenario!(rename_type_and_emptiness_errors, base, |o| {
    o.rename("lo", "ld");
    o.rename("uo", "ud");
    o.rename("ud", "uo");
    o.rename("ud", "lo");
    // inside a pure upper dir, so no opaque marking is involved
    o.mkdir("ud/e1", 0o755);
    o.mkdir("ud/e2", 0o755);
    o.create_excl("ud/e2/f", 0o644);
    o.rename("ud/e1", "ud/e2");
    o.rename("uempty", "d");
    o.rename("gone", "x");
    o.rename("nope", "x");
    o.rename("uempty", "uempty/sub");
    o.rename("lo", "nope/x");
    o.rename("lo", "lo");
    o.show("lo");
});

// The kernel marks a pure upper dir opaque before moving it into a merged
// parent; it does so even when the rename then fails (ENOTEMPTY from the
// upper fs), so the opaque xattr stays behind.
scenario!(
    failed_rename_of_upper_dir_over_non_empty_upper_dir,
    base,
    |o| {
        o.rename("uempty", "ud");
        o.show("uempty");
        o.show("ud");
    }
);

// Documented difference (README, "Differences from the kernel overlay"): the kernel gives
// each name of a lower hard link its own overlay inode (no index), so renaming one name onto
// the other is a real rename there. fuser makes the FUSE node id the inode number, so both
// names are one node in ovlfuse, and the kernel's VFS turns the rename into the POSIX
// same-file no-op before it reaches the daemon.
#[test]
fn documented_difference_rename_between_two_names_of_one_lower_hard_link_is_a_no_op() {
    let s = Scratch::new();
    let l = s.layers(3, true);
    base(&l);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let (renamed, a, b) = with_timeout(20, move || {
        let renamed = std::fs::rename(root.join("hl1"), root.join("d/hl2")).map_err(|e| e.kind());
        let a = std::fs::symlink_metadata(root.join("hl1")).map(|m| m.nlink());
        let b = std::fs::symlink_metadata(root.join("d/hl2")).map(|m| m.nlink());
        (renamed, a.ok(), b.ok())
    });
    assert_eq!(renamed, Ok(()));
    assert_eq!((a, b), (Some(2), Some(2)), "both names stay, one file");
    let upper = l.upper.clone().expect("upper");
    assert!(!upper.join("hl1").exists() && !upper.join("d/hl2").exists());
}

scenario!(rename_chain_lower_file_back_and_forth, base, |o| {
    o.rename("lo", "tmp1");
    o.rename("tmp1", "ld/tmp2");
    o.rename("ld/tmp2", "lo");
    o.show("lo");
    o.lstat("tmp1");
    o.lstat("ld/tmp2");
    o.readdir("ld");
    o.rename("d/lf", "x");
    o.write_file("d/lf", b"new one\n");
    o.show("d/lf");
    o.show("x");
});

// ---------------------------------------------------------------------------
// setattr
// ---------------------------------------------------------------------------

scenario!(chmod_lower_upper_shadowed_files_and_dirs, base, |o| {
    o.chmod("lo", 0o600);
    o.chmod("lo_exec", 0o4711);
    o.chmod("uo", 0o444);
    o.chmod("sh", 0o2755);
    o.chmod("ld", 0o1777);
    o.chmod("m", 0o700);
    o.chmod("deep/a/b/c", 0o750);
    o.chmod("gone", 0o644);
    for p in [
        "lo",
        "lo_exec",
        "uo",
        "sh",
        "ld",
        "m",
        "deep/a/b/c",
        "deep/a/b",
        "deep",
    ] {
        o.show(p);
    }
});

scenario!(chown_lower_upper_shadowed_and_symlink, base, |o| {
    o.chown("lo", 1000, 2000);
    o.chown("uo", 12, 34);
    o.chown("sh", 0, 5);
    o.chown("lnk", 77, 88);
    o.chown("ld", 0, 0);
    o.chown("d/lf", 5, 5);
    for p in ["lo", "uo", "sh", "lnk", "ld", "d/lf", "d"] {
        o.show(p);
    }
    o.stat("lnk");
});

scenario!(chown_clears_setuid_setgid_on_lower_file, base, |o| {
    o.chmod("lo_exec", 0o6755);
    o.stat("lo_exec");
    o.chown("lo_exec", 1, 1);
    o.stat("lo_exec");
});

scenario!(truncate_grow_and_shrink_lower_upper_shadowed, base, |o| {
    o.truncate("lo", 4);
    o.truncate("lo2", 10000);
    o.truncate("uo", 2);
    o.truncate("uo", 9000);
    o.truncate("sh", 0);
    o.truncate("mid", 3);
    o.truncate("d/hl2", 1);
    for p in ["lo", "lo2", "uo", "sh", "mid", "d/hl2", "hl1"] {
        o.show(p);
    }
    o.truncate("ld", 0);
    o.truncate("gone", 0);
});

scenario!(truncate_by_path_with_libc_truncate, base, |o| {
    let r = {
        let c = cstr(o.p("lo"));
        cvt(unsafe { libc::truncate(c.as_ptr(), 7) }).map(|_| ())
    };
    rec(&mut o, "truncate(2) lo 7".into(), r, unit);
    let r = {
        let c = cstr(o.p("ld/x"));
        cvt(unsafe { libc::truncate(c.as_ptr(), 100) }).map(|_| ())
    };
    rec(&mut o, "truncate(2) ld/x 100".into(), r, unit);
    o.show("lo");
    o.show("ld/x");
});

scenario!(
    utimensat_explicit_times_on_lower_upper_dir_and_symlink,
    base,
    |o| {
        o.utimens("lo", (1_000_000_000, 111), (1_100_000_000, 222_333_444));
        o.times("lo");
        o.utimens("uo", (1_200_000_000, 0), (1_300_000_000, 999_999_999));
        o.times("uo");
        o.utimens("ld", (1_400_000_000, 5), (1_500_000_000, 6));
        o.times("ld");
        o.utimens("lnk", (1_600_000_000, 7), (1_600_000_001, 8));
        o.times("lnk");
        o.utimens("sh", (0, libc::UTIME_OMIT), (1_234_567_890, 1));
        let r = fs::symlink_metadata(o.p("sh"));
        rec(&mut o, "mtime sh".into(), r, |m| {
            format!("{}.{:09}", m.mtime(), m.mtime_nsec())
        });
        o.stat("lo");
        o.show("ld");
    }
);

scenario!(utimensat_now_on_lower_file_and_dir, base, |o| {
    o.utime_now("lo");
    o.utime_now("emptyld");
    o.utime_now("gone");
    o.show("lo");
    o.show("emptyld");
});

// ---------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------

scenario!(
    setxattr_user_on_lower_file_copies_up_with_existing_xattrs,
    base,
    |o| {
        o.setxattr("xf", "user.b", b"new");
        o.listxattr("xf");
        o.getxattr("xf", "user.a");
        o.getxattr("xf", "user.b");
        o.getxattr("xf", "trusted.t");
        o.setxattr("lo", "user.fresh", b"");
        o.setxattr("uo", "user.on_upper", &[0, 1, 2, 255]);
        o.setxattr("sh", "user.on_shadowed", b"s");
        o.setxattr("lnk", "user.on_symlink", b"l");
        for p in ["xf", "lo", "uo", "sh"] {
            o.show(p);
        }
    }
);

scenario!(setxattr_on_lower_dirs_copies_up_dir, base, |o| {
    o.setxattr("ld", "user.more", b"m");
    o.setxattr("m", "user.m", b"replaced");
    o.setxattr("deep/a/b/c", "trusted.x", b"t");
    for p in ["ld", "m", "deep/a/b/c", "deep/a/b"] {
        o.show(p);
    }
    o.getxattr("ld", "user.dir");
    o.getxattr("m", "user.m");
});

scenario!(setxattr_trusted_non_overlay_names, base, |o| {
    o.setxattr("lo", "trusted.custom", b"c");
    o.setxattr("uo", "trusted.custom", b"u");
    o.setxattr("emptyld", "trusted.dir", b"d");
    for p in ["lo", "uo", "emptyld"] {
        o.listxattr(p);
        o.getxattr(p, "trusted.custom");
    }
});

scenario!(setxattr_create_and_replace_flags, base, |o| {
    o.setxattr_flags("xf", "user.a", b"again", libc::XATTR_CREATE);
    o.setxattr_flags("xf", "user.zz", b"z", libc::XATTR_REPLACE);
    o.setxattr_flags("xf", "user.a", b"replaced", libc::XATTR_REPLACE);
    o.setxattr_flags("lo", "user.new", b"n", libc::XATTR_CREATE);
    o.show("xf");
    o.show("lo");
});

scenario!(removexattr_of_lower_xattr_copies_up, base, |o| {
    o.removexattr("xf", "user.a");
    o.removexattr("xf", "user.a");
    o.removexattr("lo", "user.none");
    o.removexattr("ld", "user.dir");
    o.removexattr("deep/a/b", "user.lvl");
    o.show("xf");
    o.show("ld");
    o.show("deep/a/b");
    o.getxattr("xf", "trusted.t");
});

scenario!(
    trusted_overlay_xattrs_are_private_to_the_overlay,
    base,
    |o| {
        o.setxattr("lo", "trusted.overlay.foo", b"x");
        o.setxattr("uo", "trusted.overlay.opaque", b"y");
        o.setxattr("ud", "trusted.overlay.opaque", b"y");
        o.getxattr("opq", "trusted.overlay.opaque");
        o.listxattr("opq");
        o.removexattr("opq", "trusted.overlay.opaque");
        o.show("opq");
        o.show("lo");
        o.show("ud");
    }
);

// ---------------------------------------------------------------------------
// fallocate / copy_file_range / O_TMPFILE
// ---------------------------------------------------------------------------

scenario!(
    fallocate_mode0_and_punch_hole_on_lower_and_upper_files,
    base,
    |o| {
        o.fallocate("lo", 0, 0, 20000);
        o.fallocate(
            "lo2",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            2,
            5,
        );
        o.fallocate("uo", 0, 100, 100);
        o.fallocate(
            "sh",
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            4,
        );
        o.fallocate("d/lf", libc::FALLOC_FL_KEEP_SIZE, 0, 8192);
        for p in ["lo", "lo2", "uo", "sh", "d/lf"] {
            o.show(p);
        }
    }
);

scenario!(copy_file_range_between_lower_and_upper_files, base, |o| {
    o.copy_range("lo", 0, "uo", 4, 6);
    o.copy_range("uo", 0, "lo2", 0, 5);
    o.copy_range("d/lf", 6, "ld/x", 100, 1000);
    o.create_excl("cfr_new", 0o644);
    o.copy_range("mid", 0, "cfr_new", 0, 1 << 20);
    for p in ["lo", "uo", "lo2", "d/lf", "ld/x", "cfr_new"] {
        o.show(p);
    }
});

// Documented difference (README): the kernel overlay supports O_TMPFILE; fuser 0.18 cannot
// parse FUSE_TMPFILE and answers ENOSYS, which the kernel turns into EOPNOTSUPP — promptly,
// and without touching the upper layer.
#[test]
fn documented_difference_o_tmpfile_is_eopnotsupp() {
    let s = Scratch::new();
    let l = s.layers(3, true);
    base(&l);
    let upper = l.upper.clone().expect("upper");
    let before = upper_snapshot(&upper);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    let errnos = with_timeout(20, move || {
        ["", "ld", "ud"]
            .iter()
            .map(|d| {
                let dir = cstr(root.join(d));
                // SAFETY: valid path; a returned fd is closed at once.
                let fd = unsafe { libc::open(dir.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
                if fd >= 0 {
                    unsafe { libc::close(fd) };
                    0
                } else {
                    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                }
            })
            .collect::<Vec<_>>()
    });
    assert_eq!(errnos, vec![libc::EOPNOTSUPP; 3]);
    drop(m);
    assert!(
        diff_snapshots(&before, &upper_snapshot(&upper)).is_empty(),
        "a refused O_TMPFILE changed the upper layer"
    );
}

/// The descriptors of process `pid` that point at deleted files under `dir`.
fn deleted_files_held(pid: i32, dir: &Path) -> Vec<String> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    let dir = dir.canonicalize().unwrap();
    fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
        .map(|target| target.to_string_lossy().into_owned())
        .filter(|t| t.starts_with(dir.to_str().unwrap()) && t.ends_with(" (deleted)"))
        .collect()
}

/// The daemon lets an unlinked file's upper inode go off the unlink's own path, once the
/// kernel forgets the node; it must still let it go, or the space never comes back.
#[test]
fn removed_files_are_let_go_of_so_their_space_comes_back() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    let upper = l.upper.clone().expect("upper");
    let m = mount_ovlfuse(&l, "");
    let pid = m.daemon_pid().expect("daemon pid");
    let root = m.path().to_path_buf();
    with_timeout(30, move || {
        for i in 0..40 {
            fs::write(root.join(format!("f{i}")), vec![7u8; 64 * 1024]).unwrap();
        }
        for i in 0..40 {
            fs::remove_file(root.join(format!("f{i}"))).unwrap();
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let held = deleted_files_held(pid, &upper);
        if held.is_empty() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "5 s after the unlinks the daemon still holds {} deleted upper files: {:?}",
            held.len(),
            &held[..held.len().min(3)]
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    drop(m);
}

// ---------------------------------------------------------------------------
// copy-up details
// ---------------------------------------------------------------------------

/// A valid VFS_CAP_REVISION_2 security.capability value (cap_net_raw).
fn cap_value() -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&0x0200_0001u32.to_le_bytes()); // revision 2, effective
    v.extend_from_slice(&(1u32 << 13).to_le_bytes()); // permitted lo: CAP_NET_RAW
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable lo
    v.extend_from_slice(&0u32.to_le_bytes()); // permitted hi
    v.extend_from_slice(&0u32.to_le_bytes()); // inheritable hi
    v
}

fn caps_build(l: &Layers) {
    base(l);
    l.lower(1)
        .write_file("capbin", b"\x7fELF pretend binary", 0o755)
        .setxattr("capbin", "security.capability", &cap_value())
        .setxattr("capbin", "user.keep", b"k")
        .write_file("capbin2", b"second", 0o755)
        .setxattr("capbin2", "security.capability", &cap_value());
}

scenario!(
    copy_up_keeps_security_capability_on_open_for_write,
    caps_build,
    |o| {
        o.open_flags("capbin", libc::O_WRONLY, 0);
        o.listxattr("capbin");
        o.getxattr("capbin", "security.capability");
        o.getxattr("capbin", "user.keep");
        o.stat("capbin");
    }
);

scenario!(
    write_after_copy_up_of_file_with_security_capability,
    caps_build,
    |o| {
        o.pwrite("capbin2", 0, b"SECOND");
        o.listxattr("capbin2");
        o.show("capbin2");
        o.chmod("capbin", 0o700);
        o.listxattr("capbin");
    }
);

// A file made through the union has no capability, which ovlfuse answers the kernel's
// question before the first write from; one set afterwards must be seen, and stripped by
// the next write, as on the kernel overlay.
scenario!(
    capability_set_on_a_new_file_is_stripped_by_the_next_write,
    base,
    |o| {
        o.create_excl("newcap", 0o755);
        o.append("newcap", b"first");
        o.getxattr("newcap", "security.capability");
        o.setxattr("newcap", "security.capability", &cap_value());
        o.getxattr("newcap", "security.capability");
        o.append("newcap", b"second");
        o.getxattr("newcap", "security.capability");
        o.listxattr("newcap");
        o.show("newcap");
    }
);

fn sparse_build(l: &Layers) {
    l.lower(0)
        .sparse_file(
            "sparse",
            16 << 20,
            &[
                (0, b"head"),
                ((8 << 20) + 3, b"middle"),
                ((16 << 20) - 4, b"tail"),
            ],
            0o644,
        )
        .sparse_file("sparse2", 12 << 20, &[(5 << 20, b"only middle")], 0o600);
    l.up().write_file("small", b"s", 0o644);
}

scenario!(
    append_to_sparse_lower_file_keeps_content_and_holes,
    sparse_build,
    |o| {
        o.append("sparse", b"appended");
        o.stat("sparse");
        o.pread("sparse", 0, 8);
        o.pread("sparse", (8 << 20) + 3, 6);
        o.pread("sparse", (16 << 20) - 4, 100);
        o.blocks_sparse("sparse");
        o.pwrite("sparse2", 1, b"x");
        o.stat("sparse2");
        o.pread("sparse2", 5 << 20, 11);
        o.blocks_sparse("sparse2");
    }
);

scenario!(
    deep_create_copies_up_parents_with_their_modes_owners_xattrs,
    base,
    |o| {
        o.create_excl("deep/a/b/c/new", 0o644);
        o.write_file("deep/a/b/c/f", b"changed\n");
        for p in [
            "deep",
            "deep/a",
            "deep/a/b",
            "deep/a/b/c",
            "deep/a/b/c/new",
            "deep/a/b/c/f",
        ] {
            o.show(p);
        }
    }
);

scenario!(copy_up_of_dir_from_top_most_lower_of_three, base, |o| {
    o.create_excl("m/new", 0o644);
    o.show("m");
    o.getxattr("m", "user.m");
    o.show("m/bottom");
    o.show("m/mid_layer");
    o.show("m/top");
});

scenario!(write_through_one_name_of_lower_hard_link, base, |o| {
    o.append("hl1", b"changed through hl1\n");
    o.stat("hl1");
    o.stat("d/hl2");
    o.read("hl1");
    o.read("d/hl2");
    o.append("d/hl2", b"changed through hl2\n");
    o.stat("hl1");
    o.stat("d/hl2");
    o.read("hl1");
    o.read("d/hl2");
});

scenario!(chmod_through_one_name_of_lower_hard_link, base, |o| {
    o.chmod("d/hl2", 0o600);
    o.stat("hl1");
    o.stat("d/hl2");
});

scenario!(
    copy_up_preserves_mode_owner_of_special_files_and_symlinks,
    base,
    |o| {
        o.setxattr("fifo", "user.f", b"f");
        o.chown("chr", 3, 4);
        o.chown("lnk", 9, 9);
        for p in ["fifo", "chr", "lnk"] {
            o.lstat(p);
        }
        o.listxattr("fifo");
    }
);

// ---------------------------------------------------------------------------
// open-file coherence
// ---------------------------------------------------------------------------

scenario!(
    reopen_after_copy_up_by_another_fd_sees_new_data,
    base,
    |o| {
        let ro = o.open_flags("lo", libc::O_RDONLY, 0);
        if let Ok(ro) = &ro {
            o.fd_read("ro-before", ro, 0, 64);
        }
        if let Ok(w) = o.open_flags("lo", libc::O_WRONLY, 0) {
            o.fd_write("w", &w, 0, b"NEW DATA--");
        }
        if let Ok(ro2) = o.open_flags("lo", libc::O_RDONLY, 0) {
            o.fd_read("ro-reopened", &ro2, 0, 64);
        }
        o.read("lo");
        drop(ro);
    }
);

// The kernel overlay switches an fd opened on the lower file over to the
// upper copy after copy-up, so the old fd sees the new data too.
scenario!(rdonly_fd_opened_before_copy_up_sees_new_data, base, |o| {
    let ro = o.open_flags("d/lf", libc::O_RDONLY, 0);
    if let Ok(w) = o.open_flags("d/lf", libc::O_WRONLY, 0) {
        o.fd_write("w", &w, 0, b"NEW DATA--");
    }
    if let Ok(ro) = &ro {
        o.fd_read("ro-old-fd", ro, 0, 64);
    }
    o.read("d/lf");
});

scenario!(mmap_shared_write_to_lower_file_then_reread, base, |o| {
    o.mmap_write("lo", 2, b"MMAP");
    o.read("lo");
    o.mmap_write("d/lf", 0, b"mapped!");
    o.show("d/lf");
    o.mmap_write("uo", 1, b"UP");
    o.read("uo");
});

scenario!(
    fd_kept_open_across_unlink_and_rename_of_lower_file,
    base,
    |o| {
        if let Ok(f) = o.open_flags("ld/x", libc::O_RDWR, 0) {
            o.unlink("ld/x");
            o.fd_write("unlinked", &f, 0, b"still writable");
            o.fd_read("unlinked", &f, 0, 64);
            o.stat("ld/x");
        }
        if let Ok(f) = o.open_flags("ld/y", libc::O_RDWR, 0) {
            o.rename("ld/y", "y_moved");
            o.fd_write("renamed", &f, 0, b"after rename");
            o.read("y_moved");
        }
        o.readdir("ld");
    }
);

// ---------------------------------------------------------------------------
// a mixed scenario (also used for the interop tests)
// ---------------------------------------------------------------------------

fn rich_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    let _ = o.unlink("lo");
    let _ = o.rmdir("emptyld");
    let _ = o.mkdir("goned", 0o750);
    let _ = o.write_file("goned/n", b"new in opaque\n");
    let _ = o.rename("lo2", "ud/lo2");
    let _ = o.rename("ud", "ud_renamed");
    let _ = o.chmod("mid", 0o640);
    let _ = o.chown("ld", 55, 66);
    let _ = o.setxattr("xf", "user.c", b"3");
    let _ = o.removexattr("xf", "trusted.t");
    let _ = o.link("d/lf", "d/lf_hard");
    let _ = o.truncate("sh", 3);
    let _ = o.symlink("../lo_exec", "ld/sym");
    let _ = o.mkfifo("d/pipe", 0o600);
    let _ = o.unlink("ld/x");
    let _ = o.append("deep/a/b/c/f", b"more\n");
    let _ = o.unlink("opq/vis");
    let _ = o.rmdir("opq");
    let _ = o.rmdir("wd");
    let _ = o.mkdir("wd", 0o700);
    let _ = o.rename2("uo", "sh", libc::RENAME_EXCHANGE);
    let _ = o.pwrite("m/mid_layer", 3, b"MID");
    let _ = o.utimens("m/top", (1_000_000_000, 0), (1_000_000_001, 0));
    let _ = o.times("m/top");
    let _ = o.create_excl("gone", 0o600);
    let _ = o.mknod("newchr", libc::S_IFCHR, 0o600, 1, 7);
    let _ = o.readdir("");
    o.into_log()
}

scenario!(mixed_operations_over_every_kind_of_entry, base, |o| {
    o.log = rich_ops(&o.root);
});

fn hardlink_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    let _ = o.append("hl1", b"x");
    let _ = o.link("lo", "ld/lo_link");
    let _ = o.link("uo", "d/uo_link");
    let _ = o.rename("d/hl2", "hl2_moved");
    let _ = o.unlink("sh");
    let _ = o.link("lo_exec", "sh");
    o.into_log()
}

scenario!(hard_links_renames_and_relinks, base, |o| {
    o.log = hardlink_ops(&o.root);
    for p in [
        "hl1",
        "hl2_moved",
        "lo",
        "ld/lo_link",
        "uo",
        "d/uo_link",
        "sh",
        "lo_exec",
    ] {
        o.stat(p);
    }
});

// ---------------------------------------------------------------------------
// interop: an upper written by one implementation, mounted by the other
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq)]
enum Interop {
    /// ovlfuse's upper, mounted with the kernel overlay
    OvlfuseUpperOnKernel,
    /// the kernel's upper, mounted with ovlfuse
    KernelUpperOnOvlfuse,
}

/// Runs the scenario on both implementations, then compares the kernel's
/// merged view of its own result (freshly remounted) with the view `dir`
/// describes.
fn interop(name: &'static str, build: fn(&Layers), ops: fn(&Path) -> Vec<String>, dir: Interop) {
    let out = run_differential_collect(&Scenario::new(name, build, ops));
    let s = &out.scratch;
    let kupper = out.kernel.upper.as_ref().unwrap();
    let fupper = out.ovlfuse.upper.as_ref().unwrap();
    let reference = layers_with_upper_copy(&out.kernel.lowers, kupper, &s.mkdir("ref"));
    let rm = mount_kernel_overlay(&reference);
    let (label, tm) = match dir {
        Interop::OvlfuseUpperOnKernel => {
            let l = layers_with_upper_copy(&out.ovlfuse.lowers, fupper, &s.mkdir("x"));
            ("kernel on ovlfuse's upper", mount_kernel_overlay(&l))
        }
        Interop::KernelUpperOnOvlfuse => {
            let l = layers_with_upper_copy(&out.kernel.lowers, kupper, &s.mkdir("x"));
            ("ovlfuse on the kernel's upper", mount_ovlfuse(&l, ""))
        }
    };
    let (a, b) = (rm.mnt.clone(), tm.mnt.clone());
    let ra = with_timeout(300, move || snapshot(&a));
    let rb = with_timeout(300, move || snapshot(&b));
    let mut d = diff_snapshots_labeled(&ra, &rb, "kernel on its own upper", label);
    d.extend(
        snapshot_problems(&rb)
            .into_iter()
            .map(|p| format!("{label}: {p}")),
    );
    drop(tm);
    drop(rm);
    let mut context = op_log_differences(&out.kernel_log, &out.ovlfuse_log);
    context.extend(out.problems.iter().cloned());
    assert!(
        d.is_empty(),
        "interop {name:?} ({label}): {} differences:\n  {}\n\
         (differences of the plain run, for context: {})",
        d.len(),
        d.join("\n  "),
        if context.is_empty() {
            "none".to_string()
        } else {
            context.join("\n  ")
        }
    );
}

fn rich_ops_fn(root: &Path) -> Vec<String> {
    rich_ops(root)
}

fn copy_up_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    let _ = o.create_excl("deep/a/b/c/new", 0o600);
    let _ = o.setxattr("m", "user.x", b"x");
    let _ = o.pwrite("capbin", 0, b"W");
    let _ = o.open_flags("capbin2", libc::O_WRONLY, 0);
    let _ = o.chmod("lo_exec", 0o700);
    let _ = o.chown("lnk", 3, 3);
    let _ = o.truncate("mid", 100);
    o.into_log()
}

fn opaque_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    for p in ["x", "y"] {
        let _ = o.unlink(&format!("ld/{p}"));
    }
    let _ = o.rmdir("ld");
    let _ = o.mkdir("ld", 0o700);
    let _ = o.write_file("ld/only_new", b"n");
    let _ = o.rename("ud", "goned");
    let _ = o.rename("uempty", "emptyld");
    let _ = o.mkdir("gone", 0o755);
    let _ = o.rmdir("wd");
    o.into_log()
}

#[test]
fn interop_mixed_ovlfuse_upper_mounted_by_kernel() {
    interop("mixed", base, rich_ops_fn, Interop::OvlfuseUpperOnKernel);
}

#[test]
fn interop_mixed_kernel_upper_mounted_by_ovlfuse() {
    interop("mixed", base, rich_ops_fn, Interop::KernelUpperOnOvlfuse);
}

#[test]
fn interop_hard_links_ovlfuse_upper_mounted_by_kernel() {
    interop(
        "hard links",
        base,
        hardlink_ops,
        Interop::OvlfuseUpperOnKernel,
    );
}

#[test]
fn interop_hard_links_kernel_upper_mounted_by_ovlfuse() {
    interop(
        "hard links",
        base,
        hardlink_ops,
        Interop::KernelUpperOnOvlfuse,
    );
}

#[test]
fn interop_copy_up_ovlfuse_upper_mounted_by_kernel() {
    interop(
        "copy-up",
        caps_build,
        copy_up_ops,
        Interop::OvlfuseUpperOnKernel,
    );
}

#[test]
fn interop_copy_up_kernel_upper_mounted_by_ovlfuse() {
    interop(
        "copy-up",
        caps_build,
        copy_up_ops,
        Interop::KernelUpperOnOvlfuse,
    );
}

#[test]
fn interop_opaque_and_whiteouts_ovlfuse_upper_mounted_by_kernel() {
    interop("opaque", base, opaque_ops, Interop::OvlfuseUpperOnKernel);
}

#[test]
fn interop_opaque_and_whiteouts_kernel_upper_mounted_by_ovlfuse() {
    interop("opaque", base, opaque_ops, Interop::KernelUpperOnOvlfuse);
}

// ---------------------------------------------------------------------------
// random operation sequences
// ---------------------------------------------------------------------------

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
}

fn random_seed() -> u64 {
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| match std::env::var("OVLFUSE_SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = match s.strip_prefix("0x") {
                Some(h) => u64::from_str_radix(h, 16),
                None => s.parse(),
            };
            v.unwrap_or_else(|e| panic!("OVLFUSE_SEED={s:?}: {e}"))
        }
        Err(_) => 0x0f1f_5eed_2024_0001,
    })
}

fn random_op_count() -> usize {
    std::env::var("OVLFUSE_RANDOM_OPS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(3000)
}

const R_DIRS: [&str; 3] = ["", "p", "q"];
const R_NAMES: [&str; 8] = ["n0", "n1", "n2", "n3", "n4", "n5", "n6", "n7"];

/// Layers for the random test: the 8 names in 3 dirs are present in the
/// lowers and the upper in mixed ways (shadowed, whited out, opaque, lower
/// dirs with content, hard links, symlinks).
fn random_build(l: &Layers) {
    let (u, l0, l1, l2) = (l.up(), l.lower(0), l.lower(1), l.lower(2));
    l2.write_file("p/n0", b"p/n0 from l2\n", 0o644)
        .write_file("p/n1", b"p/n1 from l2\n", 0o644)
        .write_file("p/n2", b"p/n2 from l2\n", 0o644)
        .write_file("p/n3/n0", b"inside lower dir\n", 0o644)
        .write_file("q/n0/n1", b"q/n0/n1\n", 0o600)
        .write_file("n0", b"root n0\n", 0o644)
        .write_file("n4/n0", b"n4/n0\n", 0o644)
        .mkdir("n6", 0o755);
    l1.write_file("p/n1", b"p/n1 from l1, shadows l2\n", 0o640)
        .write_file("p/n4", b"p/n4\n", 0o644)
        .write_file("q/n2", b"q/n2 linked\n", 0o644)
        .hardlink("q/n2", "q/n5")
        .whiteout("p/n2")
        .write_file("n1", b"root n1 with xattr\n", 0o644)
        .setxattr("n1", "user.k0", b"lower")
        .symlink("n5", "p")
        .write_file("q/n4/n0", b"hidden by opaque\n", 0o644)
        .mkdir("p", 0o751)
        .chown("p", 10, 20);
    l0.write_file("p/n5", b"p/n5 top lower\n", 0o644)
        .write_file("q/n6", b"q/n6\n", 0o600)
        .chown("q/n6", 1000, 1000)
        .symlink("q/n7", "n2");
    u.write_file("p/n1", b"p/n1 upper\n", 0o644)
        .whiteout("p/n0")
        .write_file("q/n3/n7", b"upper-only dir\n", 0o644)
        .write_file("n2", b"root n2 upper\n", 0o644)
        .write_file("q/n4/n1", b"visible\n", 0o644)
        .opaque_dir("q/n4")
        .whiteout("n4/n0");
}

fn rand_path(r: &mut XorShift) -> String {
    match r.below(100) {
        0..=5 => r.pick(&["p", "q"]).to_string(),
        6..=15 => {
            let d = r.pick(&R_DIRS);
            let (a, b) = (r.pick(&R_NAMES), r.pick(&R_NAMES));
            if d.is_empty() {
                format!("{a}/{b}")
            } else {
                format!("{d}/{a}/{b}")
            }
        }
        _ => {
            let d = r.pick(&R_DIRS);
            let n = r.pick(&R_NAMES);
            if d.is_empty() {
                n.to_string()
            } else {
                format!("{d}/{n}")
            }
        }
    }
}

/// The operation sequence depends only on the seed, never on results.
/// Symlink targets are relative and never contain "..", so nothing can
/// resolve outside the mount.
fn random_ops(root: &Path) -> Vec<String> {
    let mut r = XorShift(random_seed() | 1);
    let mut o = OpLog::new(root);
    for i in 0..random_op_count() {
        let p = rand_path(&mut r);
        let data = noise(1 + r.below(40), i as u64 + 1);
        match r.below(17) {
            0 => {
                let excl = if r.below(2) == 0 { libc::O_EXCL } else { 0 };
                let mode = if r.below(2) == 0 { 0o644 } else { 0o600 };
                if let Ok(f) = o.open_flags(&p, libc::O_WRONLY | libc::O_CREAT | excl, mode) {
                    let _ = o.fd_write(&p, &f, 0, &data);
                }
            }
            1 | 2 => {
                let off = r.below(64) as u64;
                let _ = o.pwrite(&p, off, &data);
            }
            3 => {
                let _ = o.append(&p, &data);
            }
            4 => {
                let len = r.below(100) as u64;
                let _ = o.truncate(&p, len);
            }
            5 => {
                let _ = o.unlink(&p);
            }
            6 => {
                let mode = if r.below(2) == 0 { 0o755 } else { 0o700 };
                let _ = o.mkdir(&p, mode);
            }
            7 => {
                let _ = o.rmdir(&p);
            }
            8 | 9 => {
                let to = rand_path(&mut r);
                match r.below(10) {
                    0 | 1 => {
                        let _ = o.rename2(&p, &to, libc::RENAME_NOREPLACE);
                    }
                    2 => {
                        let _ = o.rename2(&p, &to, libc::RENAME_EXCHANGE);
                    }
                    _ => {
                        let _ = o.rename(&p, &to);
                    }
                }
            }
            10 => {
                let to = rand_path(&mut r);
                let _ = o.link(&p, &to);
            }
            11 => {
                let target = r.pick(&["n0", "n3", "p", "n1/n2", "x/y", "n5"]);
                let _ = o.symlink(target, &p);
            }
            12 => {
                let mode = [0o600, 0o644, 0o755, 0o700, 0o4755][r.below(5)];
                let _ = o.chmod(&p, mode);
            }
            13 => {
                let name = r.pick(&["user.k0", "user.k1", "user.k2"]);
                if r.below(4) == 0 {
                    let _ = o.removexattr(&p, name);
                } else {
                    let _ = o.setxattr(&p, name, format!("v{}", r.below(1000)).as_bytes());
                }
            }
            14 => {
                let _ = o.read(&p);
            }
            15 => {
                let _ = o.lstat(&p);
            }
            _ => {
                let d = if r.below(2) == 0 {
                    r.pick(&R_DIRS).to_string()
                } else {
                    p.clone()
                };
                let _ = o.readdir(&d);
            }
        }
    }
    o.into_log()
}

#[test]
fn random_ops_match_kernel() {
    let seed = random_seed();
    let n = random_op_count();
    eprintln!("random_ops_match_kernel: OVLFUSE_SEED={seed:#x} OVLFUSE_RANDOM_OPS={n}");
    let out = run_differential_collect(&Scenario::new("random ops", random_build, random_ops));
    let oks = out
        .kernel_log
        .iter()
        .filter(|l| l.contains(": Ok("))
        .count();
    eprintln!(
        "random_ops_match_kernel: {} logged ops, {oks} succeeded on the kernel",
        out.kernel_log.len()
    );
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
    }
    assert!(
        msg.is_empty(),
        "random ops (OVLFUSE_SEED={seed:#x} OVLFUSE_RANDOM_OPS={n}) differ:\n{msg}"
    );
}

/// The divergence report of the random test names the first differing op
/// and the ops before it (no mount needed).
#[test]
fn random_ops_divergence_report_shows_context() {
    let k: Vec<String> = (0..30).map(|i| format!("op{i}: Ok()")).collect();
    let mut f = k.clone();
    f[25] = "op25: Err(EIO)".into();
    let r = first_log_divergence(&k, &f, 20).expect("a divergence");
    assert!(r.contains("first divergence at op #25"), "{r}");
    assert!(r.contains("#5: op5: Ok()") && !r.contains("#4: op4"), "{r}");
    assert!(
        r.contains("kernel : op25: Ok()") && r.contains("ovlfuse: op25: Err(EIO)"),
        "{r}"
    );
    assert!(first_log_divergence(&k, &k, 20).is_none());
    f.truncate(25);
    let r = first_log_divergence(&k, &f, 3).unwrap();
    assert!(r.contains("ovlfuse: <none>"), "{r}");
}

// ---------------------------------------------------------------------------
// redirect_dir=on: renaming directories that lower layers take part in
// ---------------------------------------------------------------------------

/// `scenario!` with `-o redirect_dir=on` on both sides.
macro_rules! redirect_scenario {
    ($name:ident, $build:expr, |$o:ident| $body:block) => {
        #[test]
        fn $name() {
            #[allow(unused_must_use, unused_mut)]
            fn ops(root: &Path) -> Vec<String> {
                let mut $o = OpLog::new(root);
                $body
                $o.into_log()
            }
            let mut sc = Scenario::new(stringify!($name), $build, ops);
            sc.opts = "redirect_dir=on";
            run_differential(&sc);
        }
    };
}

redirect_scenario!(redirect_rename_merged_dir_within_its_parent, base, |o| {
    o.rename("d", "d_renamed");
    o.readdir("");
    o.readdir("d_renamed");
    o.show("d_renamed/lf");
    o.show("d_renamed/bottom");
    o.lstat("d");
});

redirect_scenario!(redirect_rename_lower_dir_across_parents, base, |o| {
    o.rename("ld", "m/ld_moved");
    o.readdir("m");
    o.readdir("m/ld_moved");
    o.show("m/ld_moved/x");
    o.lstat("ld");
    o.readdir("");
});

redirect_scenario!(redirect_rename_twice_keeps_the_origin, base, |o| {
    o.rename("ld", "ld_a");
    o.rename("ld_a", "d/ld_b");
    o.rename("d/ld_b", "d/ld_c");
    o.readdir("d/ld_c");
    o.show("d/ld_c/y");
    o.rename("d", "m/d2");
    o.readdir("m/d2/ld_c");
    o.show("m/d2/ld_c/x");
});

redirect_scenario!(redirect_rename_deep_lower_dir_and_its_parent, base, |o| {
    o.rename("deep/a/b", "deep/b_up");
    o.rename("deep", "deep_moved");
    o.readdir("deep_moved");
    o.readdir("deep_moved/b_up");
    o.readdir("deep_moved/a");
});

redirect_scenario!(redirect_exchange_two_merged_dirs, base, |o| {
    o.rename2("d", "m", libc::RENAME_EXCHANGE);
    o.readdir("d");
    o.readdir("m");
    o.show("m/lf");
    o.show("d/bottom");
});

redirect_scenario!(
    redirect_rename_onto_whiteout_and_empty_lower_dir,
    base,
    |o| {
        o.rename("ld", "goned");
        o.readdir("goned");
        o.rename("m", "emptyld");
        o.readdir("emptyld");
        o.readdir("");
    }
);

redirect_scenario!(redirect_moved_dir_takes_new_files_and_empties, base, |o| {
    o.rename("ld", "ld2");
    o.write_file("ld2/new", b"new in moved dir\n");
    o.unlink("ld2/x");
    o.unlink("ld2/y");
    o.readdir("ld2");
    o.unlink("ld2/new");
    o.rmdir("ld2");
    o.readdir("");
    o.mkdir("ld", 0o755);
    o.readdir("ld");
});

// ---------------------------------------------------------------------------
// whiteouts without CAP_MKNOD
// ---------------------------------------------------------------------------

fn mknod_fallback_build(l: &Layers) {
    l.lower(0)
        .write_file("f", b"lower f\n", 0o644)
        .write_file("g", b"lower g\n", 0o644)
        .write_file("shadowed", b"lower shadowed\n", 0o644)
        .mkdir("e", 0o755)
        .write_file("d/x", b"x\n", 0o644)
        .write_file("d/y", b"y\n", 0o644);
    l.up().write_file("shadowed", b"upper shadowed\n", 0o644);
}

fn mknod_fallback_ops(root: &Path) {
    fs::remove_file(root.join("f")).expect("unlink lower file");
    fs::remove_file(root.join("shadowed")).expect("unlink shadowed file");
    fs::remove_dir(root.join("e")).expect("rmdir lower dir");
    fs::rename(root.join("g"), root.join("h")).expect("rename lower file");
    fs::remove_file(root.join("d/x")).expect("unlink in merged dir");
    fs::create_dir(root.join("e")).expect("mkdir over the deleted dir");
}

/// A daemon that may not create whiteout devices (rootless on an upper it does not own; here
/// a seccomp filter answers EPERM to mknod and RENAME_WHITEOUT — dropping CAP_MKNOD is not
/// enough, Linux lets anyone make a 0/0 device) records
/// deletions as AUFS `.wh.NAME` files, and the union reads exactly as the kernel overlay's
/// does after the same operations.
#[test]
fn without_whiteout_devices_deletions_fall_back_to_aufs_whiteouts() {
    let s = Scratch::new();
    let orig = s.layers(1, true);
    mknod_fallback_build(&orig);
    let kl = copy_layers(&orig, &s.mkdir("kernel"));
    let fl = copy_layers(&orig, &s.mkdir("ovlfuse"));
    let k = mount_kernel_overlay(&kl);
    let f = mount_ovlfuse_denying_whiteout_devices(&fl, "");
    for root in [k.path().to_path_buf(), f.path().to_path_buf()] {
        with_timeout(30, move || mknod_fallback_ops(&root));
    }
    assert_same_tree(k.path(), f.path());
    drop(f);
    let upper = fl.upper.clone().expect("upper");
    for marker in [".wh.f", ".wh.shadowed", ".wh.g", "d/.wh.x"] {
        let meta = fs::symlink_metadata(upper.join(marker))
            .unwrap_or_else(|e| panic!("{marker} missing in the upper layer: {e}"));
        assert!(meta.is_file(), "{marker} is not a plain file");
    }
    let devices: Vec<String> = upper_snapshot(&upper)
        .iter()
        .filter(|(_, e)| e.kind == Kind::Char)
        .map(|(p, _)| p.display().to_string())
        .collect();
    assert!(
        devices.is_empty(),
        "whiteout devices were made: {devices:?}"
    );
}

// ---------------------------------------------------------------------------
// kernel caches (long TTLs for lower objects, kept page cache, cached listings) follow
// every change made through the union
// ---------------------------------------------------------------------------

scenario!(caches_follow_changes_made_through_the_union, base, |o| {
    // pages, entry and attributes of a lower file cached, then changed through the union
    o.read("lo");
    o.stat("lo");
    o.append("lo", b"appended through the union\n");
    o.read("lo");
    o.pread("lo", 4, 8);
    o.stat("lo");
    o.chmod("lo", 0o600);
    o.stat("lo");
    o.truncate("lo", 3);
    o.read("lo");
    o.stat("lo");
    // a cached listing of a merged and of a lower-only directory, then changed
    o.readdir("d");
    o.readdir("ld");
    o.write_file("d/new", b"new\n");
    o.unlink("d/lf");
    o.rename("ld/x", "ld/x2");
    o.readdir("d");
    o.readdir("ld");
    o.stat("d/lf");
    o.stat("ld/x");
    o.read("ld/x2");
    // a lower directory's attributes, after a child was created in it
    o.stat("emptyld");
    o.mkdir("emptyld/sub", 0o755);
    o.stat("emptyld");
    o.readdir("emptyld");
});
