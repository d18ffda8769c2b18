//! Read-only behaviour of the merged view: one scenario per test, mounted
//! over 3 lower layers + an upper layer unless stated otherwise.

mod common;

use common::*;
use std::collections::{BTreeSet, HashMap};
use std::ffi::{CStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

const T: u64 = 60; // seconds allowed for the filesystem accesses of one test

fn setup() -> (Scratch, Layers) {
    let s = Scratch::new();
    let l = s.layers(3, true);
    (s, l)
}

fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[track_caller]
fn assert_enoent(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) => panic!(
            "{} should not exist, but lstat gives {}",
            p.display(),
            fmt_md(&m)
        ),
        Err(e) => assert_eq!(errno_of(&e), libc::ENOENT, "lstat {}: {e}", p.display()),
    }
}

fn names(p: &Path) -> Vec<String> {
    let raw = readdir_raw(p).unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()));
    let probs = readdir_problems(&raw);
    assert!(probs.is_empty(), "readdir {}: {probs:?}", p.display());
    list_names(p).unwrap()
}

fn sv(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------
// layer resolution
// ---------------------------------------------------------------------------

#[test]
fn file_only_in_one_layer_is_visible() {
    let (_s, l) = setup();
    l.lower(0).write_file("in_l0", b"zero", 0o644);
    l.lower(1).write_file("in_l1", b"one", 0o600);
    l.lower(2).write_file("deep/in_l2", b"two", 0o640);
    l.up().write_file("in_upper", b"upper", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(read(&r.join("in_l0")), b"zero");
        assert_eq!(read(&r.join("in_l1")), b"one");
        assert_eq!(read(&r.join("deep/in_l2")), b"two");
        assert_eq!(read(&r.join("in_upper")), b"upper");
        assert_eq!(
            fs::metadata(r.join("in_l1")).unwrap().mode() & 0o7777,
            0o600
        );
        assert_eq!(
            fs::metadata(r.join("deep/in_l2")).unwrap().mode() & 0o7777,
            0o640
        );
        assert_eq!(names(&r), sv(&["deep", "in_l0", "in_l1", "in_upper"]));
        assert_enoent(&r.join("nowhere"));
    });
}

#[test]
fn upper_shadows_lower_and_top_lower_shadows_bottom() {
    let (_s, l) = setup();
    l.lower(2).write_file("a", b"bottom-a", 0o644);
    l.lower(1).write_file("a", b"middle-a", 0o644);
    l.lower(0).write_file("a", b"top-a", 0o600);
    l.up().write_file("a", b"upper-a", 0o640);
    l.lower(2).write_file("b", b"bottom-b", 0o644);
    l.lower(0).write_file("b", b"top-b", 0o644);
    l.lower(2).write_file("c", b"bottom-c-long-long", 0o644);
    l.lower(1).write_file("c", b"mid", 0o644);
    // a directory merged across all layers, with shadowing inside it
    l.lower(2)
        .write_file("d/x", b"x2", 0o644)
        .write_file("d/only2", b"o2", 0o644);
    l.lower(1)
        .write_file("d/x", b"x1", 0o644)
        .write_file("d/only1", b"o1", 0o644);
    l.lower(0).write_file("d/only0", b"o0", 0o644);
    l.up().write_file("d/onlyu", b"ou", 0o644);
    // a non-directory on top hides a directory below, and vice versa
    l.lower(1).write_file("fileoverdir/inner", b"hidden", 0o644);
    l.lower(0).write_file("fileoverdir", b"file", 0o644);
    l.lower(1).write_file("diroverfile", b"hidden", 0o644);
    l.lower(0)
        .write_file("diroverfile/inner", b"visible", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(read(&r.join("a")), b"upper-a");
        let md = fs::metadata(r.join("a")).unwrap();
        assert_eq!(md.mode() & 0o7777, 0o640);
        assert_eq!(md.len(), 7);
        assert_eq!(read(&r.join("b")), b"top-b");
        assert_eq!(read(&r.join("c")), b"mid");
        assert_eq!(fs::metadata(r.join("c")).unwrap().len(), 3);
        assert_eq!(
            names(&r.join("d")),
            sv(&["only0", "only1", "only2", "onlyu", "x"])
        );
        assert_eq!(read(&r.join("d/x")), b"x1");
        assert_eq!(read(&r.join("d/only2")), b"o2");
        assert_eq!(read(&r.join("fileoverdir")), b"file");
        assert_eq!(
            expect_err(fs::metadata(r.join("fileoverdir/inner"))),
            libc::ENOTDIR
        );
        assert!(fs::metadata(r.join("diroverfile")).unwrap().is_dir());
        assert_eq!(names(&r.join("diroverfile")), sv(&["inner"]));
        assert_eq!(read(&r.join("diroverfile/inner")), b"visible");
    });
}

// ---------------------------------------------------------------------------
// whiteouts and opaque directories
// ---------------------------------------------------------------------------

#[test]
fn chardev_whiteout_hides_lower_file_and_directory() {
    let (_s, l) = setup();
    l.lower(2).write_file("f", b"lower file", 0o644);
    l.lower(1)
        .write_file("dir/x", b"x", 0o644)
        .write_file("dir/sub/y", b"y", 0o644);
    l.lower(2).write_file("dir/z", b"z", 0o644);
    l.up().whiteout("f").whiteout("dir");
    // whiteout in a middle lower hides only what is below it
    l.lower(2)
        .write_file("mid", b"bottom", 0o644)
        .write_file("again", b"bottom", 0o644);
    l.lower(1).whiteout("mid").whiteout("again");
    l.lower(0).write_file("again", b"recreated", 0o644);
    // whiteout inside a merged directory
    l.lower(2)
        .write_file("m/gone", b"g", 0o644)
        .write_file("m/kept", b"k", 0o644);
    l.up().whiteout("m/gone");
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_enoent(&r.join("f"));
        assert_enoent(&r.join("dir"));
        assert_eq!(expect_err(fs::metadata(r.join("dir/x"))), libc::ENOENT);
        assert_eq!(expect_err(fs::read_dir(r.join("dir"))), libc::ENOENT);
        assert_eq!(expect_err(File::open(r.join("f"))), libc::ENOENT);
        assert_enoent(&r.join("mid"));
        assert_eq!(read(&r.join("again")), b"recreated");
        assert_eq!(names(&r), sv(&["again", "m"]));
        assert_eq!(names(&r.join("m")), sv(&["kept"]));
        assert_enoent(&r.join("m/gone"));
    });
}

#[test]
fn aufs_whiteout_file_hides_lower_entry() {
    let (_s, l) = setup();
    l.lower(2).write_file("f", b"lower", 0o644);
    l.lower(1).write_file("d/x", b"x", 0o644);
    l.up().aufs_whiteout("f").aufs_whiteout("d");
    l.lower(2)
        .write_file("m/gone", b"g", 0o644)
        .write_file("m/kept", b"k", 0o644);
    l.lower(0).aufs_whiteout("m/gone");
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_enoent(&r.join("f"));
        assert_enoent(&r.join("d"));
        assert_enoent(&r.join("m/gone"));
        assert_eq!(names(&r), sv(&["m"]));
        assert_eq!(names(&r.join("m")), sv(&["kept"]));
    });
}

#[test]
fn trusted_opaque_xattr_hides_lower_directory_contents() {
    let (_s, l) = setup();
    l.lower(0).write_file("od/theirs", b"t", 0o644);
    l.lower(2).write_file("od/deep/x", b"x", 0o644);
    l.up().write_file("od/mine", b"m", 0o644).opaque_dir("od");
    // opaque dir in the middle lower: hides the bottom lower only
    l.lower(0).write_file("md/top", b"t", 0o644);
    l.lower(1).write_file("md/m1", b"m", 0o644).opaque_dir("md");
    l.lower(2)
        .write_file("md/bottom", b"b", 0o644)
        .write_file("md/top", b"shadowed", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(names(&r.join("od")), sv(&["mine"]));
        assert_enoent(&r.join("od/theirs"));
        assert_enoent(&r.join("od/deep"));
        assert_eq!(names(&r.join("md")), sv(&["m1", "top"]));
        assert_enoent(&r.join("md/bottom"));
        assert_eq!(read(&r.join("md/top")), b"t");
    });
}

#[test]
fn aufs_opaque_marker_hides_lower_directory_contents() {
    let (_s, l) = setup();
    l.lower(1).write_file("od/theirs", b"t", 0o644);
    l.up()
        .write_file("od/mine", b"m", 0o644)
        .aufs_opaque_dir("od");
    l.lower(0)
        .write_file("md/top", b"t", 0o644)
        .aufs_opaque_dir("md");
    l.lower(2).write_file("md/bottom", b"b", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(names(&r.join("od")), sv(&["mine"]));
        assert_enoent(&r.join("od/theirs"));
        assert_eq!(names(&r.join("md")), sv(&["top"]));
        assert_enoent(&r.join("md/bottom"));
    });
}

#[test]
fn whiteout_and_opaque_markers_are_never_visible() {
    let (_s, l) = setup();
    l.lower(2)
        .write_file("f", b"x", 0o644)
        .write_file("g", b"x", 0o644);
    l.up().whiteout("f").aufs_whiteout("g");
    l.up().aufs_whiteout("never-existed"); // .wh. for a name no layer has
    l.lower(0).whiteout("lw"); // whiteout with nothing below it
    l.lower(1)
        .aufs_opaque_dir("ao")
        .write_file("ao/kept", b"k", 0o644);
    l.up().opaque_dir("to").write_file("to/kept", b"k", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        for n in [
            "f",
            "g",
            "lw",
            ".wh.g",
            ".wh.never-existed",
            "never-existed",
            "ao/.wh..wh..opq",
        ] {
            assert_enoent(&r.join(n));
        }
        assert_eq!(names(&r), sv(&["ao", "to"]));
        assert_eq!(names(&r.join("ao")), sv(&["kept"]));
        assert_eq!(names(&r.join("to")), sv(&["kept"]));
        for dir in [r.clone(), r.join("ao"), r.join("to")] {
            for e in fs::read_dir(&dir).unwrap() {
                let e = e.unwrap();
                let n = e.file_name();
                assert!(
                    !n.as_bytes().starts_with(b".wh."),
                    "marker {n:?} listed in {}",
                    dir.display()
                );
                let md = e.metadata().unwrap();
                if md.file_type().is_char_device() {
                    assert_ne!(
                        md.rdev(),
                        0,
                        "whiteout device {n:?} listed in {}",
                        dir.display()
                    );
                }
            }
        }
    });
}

use std::os::unix::fs::FileTypeExt;

// ---------------------------------------------------------------------------
// xattrs
// ---------------------------------------------------------------------------

fn is_no_such_xattr(e: i32) -> bool {
    e == libc::ENODATA || e == libc::EOPNOTSUPP
}

#[test]
fn overlay_private_xattrs_hidden_user_xattrs_visible() {
    let (_s, l) = setup();
    l.lower(1)
        .write_file("x", b"x", 0o644)
        .setxattr("x", "user.color", b"blue")
        .setxattr("x", "trusted.overlay.foo", b"bar");
    l.up()
        .write_file("y", b"y", 0o644)
        .setxattr("y", "user.a", b"1")
        .setxattr("y", "user.b", b"")
        .setxattr("y", "trusted.overlay.origin", b"zz");
    l.up().opaque_dir("od").setxattr("od", "user.dir", b"d");
    l.lower(0).mkdir("od", 0o755);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let mut lx = list_xattrs(&r.join("x")).unwrap();
        lx.sort();
        assert_eq!(lx, vec!["user.color".to_string()]);
        assert_eq!(get_xattr(&r.join("x"), "user.color").unwrap(), b"blue");
        let e = expect_err(get_xattr(&r.join("x"), "trusted.overlay.foo"));
        assert!(
            is_no_such_xattr(e),
            "getxattr trusted.overlay.foo: {}",
            errno_name(e)
        );
        let mut ly = list_xattrs(&r.join("y")).unwrap();
        ly.sort();
        assert_eq!(ly, vec!["user.a".to_string(), "user.b".to_string()]);
        assert_eq!(get_xattr(&r.join("y"), "user.b").unwrap(), b"");
        assert!(is_no_such_xattr(expect_err(get_xattr(
            &r.join("y"),
            "trusted.overlay.origin"
        ))));
        let lod = list_xattrs(&r.join("od")).unwrap();
        assert_eq!(lod, vec!["user.dir".to_string()]);
        let e = expect_err(get_xattr(&r.join("od"), "trusted.overlay.opaque"));
        assert!(
            is_no_such_xattr(e),
            "getxattr trusted.overlay.opaque: {}",
            errno_name(e)
        );
        assert_eq!(
            expect_err(get_xattr(&r.join("x"), "user.missing")),
            libc::ENODATA
        );
    });
}

#[test]
fn userxattr_option_uses_user_overlay_namespace() {
    let (_s, l) = setup();
    l.lower(0).write_file("od/theirs", b"t", 0o644);
    l.up()
        .write_file("od/mine", b"m", 0o644)
        .user_opaque_dir("od")
        .setxattr("od", "user.keep", b"k");
    l.lower(1)
        .write_file("f", b"f", 0o644)
        .setxattr("f", "user.overlay.foo", b"x")
        .setxattr("f", "user.plain", b"p");
    let m = mount_ovlfuse(&l, "userxattr");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(names(&r.join("od")), sv(&["mine"]));
        assert_enoent(&r.join("od/theirs"));
        assert_eq!(
            list_xattrs(&r.join("od")).unwrap(),
            vec!["user.keep".to_string()]
        );
        let e = expect_err(get_xattr(&r.join("od"), "user.overlay.opaque"));
        assert!(
            is_no_such_xattr(e),
            "getxattr user.overlay.opaque: {}",
            errno_name(e)
        );
        assert_eq!(
            list_xattrs(&r.join("f")).unwrap(),
            vec!["user.plain".to_string()]
        );
        let e = expect_err(get_xattr(&r.join("f"), "user.overlay.foo"));
        assert!(
            is_no_such_xattr(e),
            "getxattr user.overlay.foo: {}",
            errno_name(e)
        );
    });
}

// ---------------------------------------------------------------------------
// file types
// ---------------------------------------------------------------------------

#[test]
fn symlinks_readlink_and_stat_vs_lstat() {
    let (_s, l) = setup();
    l.lower(1).write_file("target", b"T", 0o644);
    l.lower(0).symlink("rel", "target");
    l.up().symlink("dangling", "/nonexistent/ovlfuse/x");
    l.lower(2)
        .write_file("sub/inner", b"I", 0o644)
        .symlink("dirlink", "sub");
    l.lower(2).symlink("shadowed", "old-target");
    l.lower(1).symlink("shadowed", "new-target-longer");
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(
            fs::read_link(r.join("rel")).unwrap(),
            PathBuf::from("target")
        );
        let lm = fs::symlink_metadata(r.join("rel")).unwrap();
        assert!(lm.file_type().is_symlink());
        assert_eq!(lm.len(), "target".len() as u64);
        let sm = fs::metadata(r.join("rel")).unwrap();
        assert!(sm.is_file());
        assert_eq!(sm.len(), 1);
        assert_eq!(read(&r.join("rel")), b"T");
        assert_eq!(
            fs::read_link(r.join("dangling")).unwrap(),
            PathBuf::from("/nonexistent/ovlfuse/x")
        );
        assert_eq!(expect_err(fs::metadata(r.join("dangling"))), libc::ENOENT);
        assert!(
            fs::symlink_metadata(r.join("dangling"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(read(&r.join("dirlink/inner")), b"I");
        assert!(fs::metadata(r.join("dirlink")).unwrap().is_dir());
        assert_eq!(
            fs::read_link(r.join("shadowed")).unwrap(),
            PathBuf::from("new-target-longer")
        );
        assert_eq!(expect_err(fs::read_link(r.join("target"))), libc::EINVAL);
    });
}

#[test]
fn hardlinked_lower_files_share_inode_and_nlink() {
    let (_s, l) = setup();
    l.lower(1)
        .write_file("h1", b"shared", 0o644)
        .hardlink("h1", "sub/h2");
    l.lower(1).write_file("single", b"s", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let a = fs::symlink_metadata(r.join("h1")).unwrap();
        let b = fs::symlink_metadata(r.join("sub/h2")).unwrap();
        let c = fs::symlink_metadata(r.join("single")).unwrap();
        assert_eq!(a.ino(), b.ino(), "hard links must share st_ino");
        assert_ne!(a.ino(), c.ino());
        assert_eq!(a.nlink(), 2);
        assert_eq!(b.nlink(), 2);
        assert_eq!(c.nlink(), 1);
        assert_eq!(read(&r.join("sub/h2")), b"shared");
    });
}

#[test]
fn fifo_and_device_nodes_keep_type_mode_and_rdev() {
    let (_s, l) = setup();
    l.lower(1).mkfifo("fifo", 0o640);
    l.lower(0).mknod_char("null", 0o666, 1, 3);
    l.lower(2).mknod_block("blk", 0o660, 7, 200);
    l.up().mknod_char("big", 0o600, 259, 70000);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let f = fs::symlink_metadata(r.join("fifo")).unwrap();
        assert!(f.file_type().is_fifo());
        assert_eq!(f.mode() & 0o7777, 0o640);
        let c = fs::symlink_metadata(r.join("null")).unwrap();
        assert!(c.file_type().is_char_device());
        assert_eq!((libc::major(c.rdev()), libc::minor(c.rdev())), (1, 3));
        assert_eq!(c.mode() & 0o7777, 0o666);
        let b = fs::symlink_metadata(r.join("blk")).unwrap();
        assert!(b.file_type().is_block_device());
        assert_eq!((libc::major(b.rdev()), libc::minor(b.rdev())), (7, 200));
        let g = fs::symlink_metadata(r.join("big")).unwrap();
        assert!(g.file_type().is_char_device());
        assert_eq!((libc::major(g.rdev()), libc::minor(g.rdev())), (259, 70000));
        // d_type in readdir agrees
        let mut types = HashMap::new();
        for e in fs::read_dir(&r).unwrap() {
            let e = e.unwrap();
            types.insert(
                e.file_name().to_string_lossy().into_owned(),
                e.file_type().unwrap(),
            );
        }
        assert!(types["fifo"].is_fifo());
        assert!(types["null"].is_char_device());
        assert!(types["blk"].is_block_device());
    });
}

// ---------------------------------------------------------------------------
// file data
// ---------------------------------------------------------------------------

#[test]
fn sparse_file_larger_than_4gib_reads_correctly() {
    let (_s, l) = setup();
    let size: u64 = (5 << 30) + 4096 + 17;
    let at4g: u64 = (4 << 30) + 12345;
    l.lower(2).sparse_file(
        "sparse",
        size,
        &[
            (0, b"HEAD"),
            (at4g, b"HELLO-BEYOND-4GIB"),
            (size - 3, b"END"),
        ],
        0o644,
    );
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let p = r.join("sparse");
        assert_eq!(fs::metadata(&p).unwrap().len(), size);
        let f = File::open(&p).unwrap();
        let mut b = [0u8; 17];
        f.read_exact_at(&mut b, at4g).unwrap();
        assert_eq!(&b, b"HELLO-BEYOND-4GIB");
        let mut z = [1u8; 64];
        f.read_exact_at(&mut z, 1 << 30).unwrap();
        assert!(z.iter().all(|x| *x == 0), "hole must read as zeros");
        let mut e = [0u8; 8];
        let n = f.read_at(&mut e, size - 3).unwrap();
        assert_eq!(&e[..n], b"END");
        assert_eq!(f.read_at(&mut e, size).unwrap(), 0, "read at EOF");
        let mut h = [0u8; 4];
        f.read_exact_at(&mut h, 0).unwrap();
        assert_eq!(&h, b"HEAD");
    });
}

#[test]
fn one_mib_file_reads_byte_for_byte() {
    let (_s, l) = setup();
    let data = noise(1 << 20, 42);
    l.lower(1).write_file("blob", &data, 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let p = r.join("blob");
        let got = read(&p);
        assert_eq!(got.len(), data.len());
        assert!(
            got == data,
            "1 MiB content differs (first diff at {:?})",
            got.iter().zip(&data).position(|(a, b)| a != b)
        );
        // odd-sized, unaligned reads
        let mut f = File::open(&p).unwrap();
        let mut acc = Vec::new();
        let mut buf = vec![0u8; 4093];
        loop {
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            acc.extend_from_slice(&buf[..n]);
        }
        assert!(acc == data);
        let mut b = vec![0u8; 10000];
        f.read_exact_at(&mut b, 777_777).unwrap();
        assert_eq!(&b[..], &data[777_777..787_777]);
    });
}

// ---------------------------------------------------------------------------
// directories
// ---------------------------------------------------------------------------

struct Dir(*mut libc::DIR);
unsafe impl Send for Dir {}
impl Dir {
    fn open(p: &Path) -> Dir {
        let c = cstr(p);
        let d = unsafe { libc::opendir(c.as_ptr()) };
        assert!(
            !d.is_null(),
            "opendir {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        Dir(d)
    }
    fn next(&mut self) -> Option<OsString> {
        unsafe { *libc::__errno_location() = 0 };
        let e = unsafe { libc::readdir(self.0) };
        if e.is_null() {
            let err = std::io::Error::last_os_error();
            assert_eq!(err.raw_os_error(), Some(0), "readdir failed: {err}");
            return None;
        }
        Some(
            std::ffi::OsStr::from_bytes(unsafe { CStr::from_ptr((*e).d_name.as_ptr()) }.to_bytes())
                .to_os_string(),
        )
    }
    fn take(&mut self, n: usize) -> Vec<OsString> {
        let mut v = Vec::new();
        while v.len() < n {
            match self.next() {
                Some(x) => v.push(x),
                None => break,
            }
        }
        v
    }
    fn rest(&mut self) -> Vec<OsString> {
        self.take(usize::MAX)
    }
    fn tell(&mut self) -> libc::c_long {
        unsafe { libc::telldir(self.0) }
    }
    fn seek(&mut self, pos: libc::c_long) {
        unsafe { libc::seekdir(self.0, pos) }
    }
    fn rewind(&mut self) {
        unsafe { libc::rewinddir(self.0) }
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        unsafe { libc::closedir(self.0) };
    }
}

#[test]
fn directory_with_10000_entries_across_layers_lists_each_name_once() {
    let (_s, l) = setup();
    let mut visible = BTreeSet::new();
    for d in l.lowers.iter().chain(l.upper.iter()) {
        fs::create_dir(d.join("big")).unwrap();
    }
    for i in 0..10_000u32 {
        let name = format!("big/e{i:05}");
        let primary = match i % 4 {
            0 => l.up(),
            k => l.lower(k as usize - 1),
        };
        primary.write_file(&name, name.as_bytes(), 0o644);
        let mut shown = true;
        if i % 7 == 0 && i % 4 != 3 {
            l.lower(2).write_file(&name, b"shadowed", 0o600);
        }
        if i % 10 == 5 {
            l.up().whiteout(&name);
            shown = false;
        }
        if i % 4 == 3 && i % 9 == 0 {
            l.lower(0).whiteout(&name);
            shown = false;
        }
        if shown {
            visible.insert(format!("e{i:05}"));
        }
    }
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(180, move || {
        let big = r.join("big");
        let mut d = Dir::open(&big);
        let pass1 = d.rest();
        let probs = readdir_problems(&pass1);
        assert!(probs.is_empty(), "readdir of big: {probs:?}");
        let got: BTreeSet<String> = pass1
            .iter()
            .filter(|n| *n != "." && *n != "..")
            .map(|n| n.to_string_lossy().into_owned())
            .collect();
        let missing: Vec<_> = visible.difference(&got).take(10).collect();
        let extra: Vec<_> = got.difference(&visible).take(10).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "missing (first 10): {missing:?}; unexpected: {extra:?}"
        );
        assert_eq!(pass1.len(), visible.len() + 2);

        d.rewind();
        let pass2 = d.rest();
        assert!(
            pass2 == pass1,
            "rewinddir: second pass differs from the first"
        );

        for cut in [1usize, 2, 3777, pass1.len() - 1] {
            d.rewind();
            let head = d.take(cut);
            let pos = d.tell();
            let a = d.rest();
            d.seek(pos);
            let b = d.rest();
            assert_eq!(
                a.len(),
                b.len(),
                "seekdir to telldir after {cut} entries: lengths differ"
            );
            assert!(
                a == b,
                "seekdir to telldir after {cut} entries gives a different sequence"
            );
            let mut all = head.clone();
            all.extend(a);
            assert!(
                all == pass1,
                "telldir after {cut}: sequence differs from a plain pass"
            );
        }
        // content of shadowed names comes from the top-most layer
        assert_eq!(read(&big.join("e00007")), b"big/e00007");
        assert_eq!(read(&big.join("e00014")), b"big/e00014");
        assert_enoent(&big.join("e00005"));
        assert_enoent(&big.join("e00027"));
    });
}

// ---------------------------------------------------------------------------
// inode numbers, st_dev, statfs
// ---------------------------------------------------------------------------

#[test]
fn inode_numbers_stable_and_unique_and_st_dev_uniform() {
    let (_s, l) = setup();
    for (i, layer) in [l.up(), l.lower(0), l.lower(1), l.lower(2)]
        .iter()
        .enumerate()
    {
        for j in 0..20 {
            layer.write_file(&format!("d{j}/f{i}"), b"x", 0o644);
            layer.write_file(&format!("top{i}_{j}"), b"y", 0o644);
        }
        layer.write_file("common", format!("{i}").as_bytes(), 0o644);
        layer.symlink(&format!("s{i}"), "common");
        layer.mkfifo(&format!("p{i}"), 0o644);
    }
    l.lower(2).hardlink("top3_0", "hl");
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let snap = snapshot(&r);
        let root_dev = fs::symlink_metadata(&r).unwrap().dev();
        let mut seen: HashMap<u64, PathBuf> = HashMap::new();
        for rel in snap.keys() {
            let p = if rel.as_os_str().is_empty() {
                r.clone()
            } else {
                r.join(rel)
            };
            let a = fs::symlink_metadata(&p).unwrap();
            let b = fs::symlink_metadata(&p).unwrap();
            assert_eq!(
                a.ino(),
                b.ino(),
                "st_ino of {} changed between two lstat calls",
                rel.display()
            );
            assert_eq!(
                a.dev(),
                root_dev,
                "st_dev of {} differs from the mount root's",
                rel.display()
            );
            let linked = rel == Path::new("hl") || rel == Path::new("top3_0");
            if !linked && let Some(other) = seen.insert(a.ino(), rel.clone()) {
                panic!(
                    "{} and {} share st_ino {}",
                    other.display(),
                    rel.display(),
                    a.ino()
                );
            }
        }
        let a = fs::symlink_metadata(r.join("hl")).unwrap();
        let b = fs::symlink_metadata(r.join("top3_0")).unwrap();
        assert_eq!(a.ino(), b.ino());
        assert!(
            !seen.contains_key(&a.ino()),
            "hard-linked inode collides with another file"
        );
        // an open file keeps its inode number, and fstat agrees with lstat
        let f = File::open(r.join("d3/f1")).unwrap();
        assert_eq!(
            f.metadata().unwrap().ino(),
            fs::symlink_metadata(r.join("d3/f1")).unwrap().ino()
        );
        assert!(snap.len() > 100);
    });
}

#[test]
fn statfs_works() {
    let (_s, l) = setup();
    l.lower(0).write_file("f", b"x", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let c = cstr(&r);
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
        assert_eq!(rc, 0, "statvfs: {}", std::io::Error::last_os_error());
        assert!(st.f_bsize > 0);
        assert!(st.f_blocks > 0);
        assert!(st.f_bfree <= st.f_blocks && st.f_bavail <= st.f_blocks);
        assert!(
            st.f_namemax > 0 && st.f_namemax <= 255,
            "f_namemax = {}",
            st.f_namemax
        );
        let mut st2: libc::statfs = unsafe { std::mem::zeroed() };
        let c2 = cstr(r.join("f"));
        assert_eq!(unsafe { libc::statfs(c2.as_ptr(), &mut st2) }, 0);
        assert!(st2.f_blocks > 0);
    });
}

#[test]
fn lowerdir_only_mount_is_read_only() {
    let s = Scratch::new();
    let l = s.layers(2, false);
    l.lower(0)
        .write_file("f", b"data", 0o644)
        .mkdir("d", 0o755)
        .mkdir("empty", 0o755);
    l.lower(1).write_file("d/g", b"g", 0o644);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(read(&r.join("f")), b"data");
        assert_eq!(read(&r.join("d/g")), b"g");
        let erofs = |what: &str, res: std::io::Result<()>| {
            let e = expect_err(res);
            assert_eq!(
                e,
                libc::EROFS,
                "{what}: expected EROFS, got {}",
                errno_name(e)
            );
        };
        erofs(
            "create",
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(r.join("new"))
                .map(|_| ()),
        );
        erofs(
            "create in subdir",
            File::create(r.join("d/new")).map(|_| ()),
        );
        erofs("mkdir", fs::create_dir(r.join("nd")));
        erofs("unlink", fs::remove_file(r.join("f")));
        erofs("unlink lower-2 file", fs::remove_file(r.join("d/g")));
        erofs("rmdir", fs::remove_dir(r.join("empty")));
        erofs(
            "open for write",
            OpenOptions::new().write(true).open(r.join("f")).map(|_| ()),
        );
        erofs(
            "open O_RDWR",
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(r.join("d/g"))
                .map(|_| ()),
        );
        erofs(
            "chmod",
            fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o600)),
        );
        erofs("symlink", std::os::unix::fs::symlink("x", r.join("sl")));
        erofs("rename", fs::rename(r.join("f"), r.join("f2")));
        erofs("setxattr", set_xattr(&r.join("f"), "user.x", b"1"));
        assert_eq!(read(&r.join("f")), b"data");
        assert_eq!(fs::metadata(r.join("f")).unwrap().mode() & 0o7777, 0o644);
    });
}

// ---------------------------------------------------------------------------
// mount / daemon lifecycle (harness self-checks)
// ---------------------------------------------------------------------------

#[test]
fn daemon_exits_after_unmount() {
    let (_s, l) = setup();
    l.lower(0).write_file("f", b"x", 0o644);
    let mut m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || assert_eq!(read(&r.join("f")), b"x"));
    let pid = m.daemon_pid();
    m.unmount();
    assert!(!is_mounted(&m.mnt));
    if let (Some(pid), false) = (pid, testing_kernel_instead()) {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}/cmdline")).exists()
                || fs::read(format!("/proc/{pid}/cmdline")).unwrap().is_empty(),
            "daemon {pid} still running after unmount"
        );
    }
}

#[test]
fn foreground_mount_serves_requests() {
    let (_s, l) = setup();
    l.lower(2).write_file("f", b"fg", 0o644);
    let m = mount_ovlfuse_foreground(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || assert_eq!(read(&r.join("f")), b"fg"));
}

// ---------------------------------------------------------------------------
// symlink escapes: the daemon must never resolve a layer path through a
// symlink stored in a layer.  A canary directory outside the layers is
// watched with inotify; the daemon must not open or read anything in it
// while we only lstat/readlink/list the merged view.
// ---------------------------------------------------------------------------

struct Inotify(i32);
impl Inotify {
    fn watch(paths: &[&Path]) -> Inotify {
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        for p in paths {
            let c = cstr(p);
            let wd =
                unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN | libc::IN_ACCESS) };
            assert!(
                wd >= 0,
                "inotify_add_watch {}: {}",
                p.display(),
                std::io::Error::last_os_error()
            );
        }
        Inotify(fd)
    }
    fn events(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            let n = unsafe { libc::read(self.0, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
            if n <= 0 {
                break;
            }
            let mut off = 0usize;
            while off < n as usize {
                let ev: libc::inotify_event = unsafe {
                    std::ptr::read_unaligned(buf[off..].as_ptr() as *const libc::inotify_event)
                };
                let hdr = std::mem::size_of::<libc::inotify_event>();
                let name = &buf[off + hdr..off + hdr + ev.len as usize];
                let name = String::from_utf8_lossy(name.split(|b| *b == 0).next().unwrap_or(b""));
                out.push(format!("wd {} mask {:#x} name {:?}", ev.wd, ev.mask, name));
                off += hdr + ev.len as usize;
            }
        }
        out
    }
}
impl Drop for Inotify {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// Canary outside the layers: `outside/secret`, `outside/sub/leak`,
/// xattrs on all of them, an opaque marker and `.wh.` files.
fn make_canary(s: &Scratch) -> PathBuf {
    let c = s.path().join("outside");
    let cl = Layer(c.clone());
    cl.mkdir("", 0o755)
        .write_file("secret", b"SECRET", 0o644)
        .write_file("sub/leak", b"LEAK", 0o644)
        .write_file(".wh.mine", b"", 0o644)
        .setxattr("", "user.canary", b"leak")
        .setxattr("secret", "user.canary", b"leak")
        .setxattr("sub", "user.canary", b"leak")
        .setxattr("", "trusted.overlay.opaque", b"y");
    c
}

fn assert_quiet(ino: &Inotify, what: &str) {
    let ev = ino.events();
    assert!(
        ev.is_empty(),
        "{what}: something opened/read the canary outside the layers: {ev:?}"
    );
}

#[test]
fn symlinks_in_layers_are_not_followed_for_lstat_readlink_or_xattrs() {
    let (s, l) = setup();
    let canary = make_canary(&s);
    let abs = canary.display().to_string();
    let proc_path = format!("/proc/self/root{abs}");
    l.lower(0)
        .symlink("abs", &abs)
        .symlink("abs_secret", &format!("{abs}/secret"));
    // relative escape: from <set>/l1/rel, ../../outside is the canary
    l.lower(1)
        .symlink("rel", "../../outside")
        .symlink("deep_rel", "../../../../../../../../..");
    l.lower(2).symlink("proc", &proc_path);
    l.up().symlink("up_abs", &abs);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    let (canary2, abs2) = (canary.clone(), abs.clone());
    with_timeout(T, move || {
        let ino = Inotify::watch(&[&canary2, &canary2.join("sub"), &canary2.join("secret")]);
        let expect = [
            ("abs", abs2.clone()),
            ("abs_secret", format!("{abs2}/secret")),
            ("rel", "../../outside".to_string()),
            ("deep_rel", "../../../../../../../../..".to_string()),
            ("proc", proc_path.clone()),
            ("up_abs", abs2.clone()),
        ];
        names(&r);
        for (n, t) in &expect {
            let p = r.join(n);
            let md = fs::symlink_metadata(&p).unwrap();
            assert!(
                md.file_type().is_symlink(),
                "{n} must be a symlink, lstat says {}",
                fmt_md(&md)
            );
            assert_eq!(md.len(), t.len() as u64, "{n}: symlink size");
            assert_eq!(fs::read_link(&p).unwrap(), PathBuf::from(t));
            let xs = list_xattrs(&p).unwrap_or_default();
            assert!(
                !xs.iter().any(|x| x == "user.canary"),
                "{n}: llistxattr followed the symlink: {xs:?}"
            );
            match get_xattr(&p, "user.canary") {
                Ok(v) => panic!("{n}: lgetxattr followed the symlink and returned {v:?}"),
                Err(e) => assert!(
                    matches!(errno_of(&e), libc::ENODATA | libc::EOPNOTSUPP | libc::EPERM),
                    "{n}: {e}"
                ),
            }
        }
        assert_quiet(&ino, "lstat/readlink/llistxattr of layer symlinks");
        // A user-visible symlink *is* followed by the caller's kernel, like
        // on any filesystem; this also proves the inotify watch works.
        assert_eq!(read(&r.join("abs/secret")), b"SECRET");
        assert!(
            !ino.events().is_empty(),
            "inotify watch on the canary does not report opens"
        );
    });
    drop(m);
    assert_eq!(fs::read(canary.join("secret")).unwrap(), b"SECRET");
}

#[test]
fn lower_symlink_under_upper_directory_is_not_merged_or_traversed() {
    let (s, l) = setup();
    let canary = make_canary(&s);
    let abs = canary.display().to_string();
    // upper dir over a lower symlink to the canary (absolute, relative, /proc)
    l.up()
        .write_file("d/mine", b"m", 0o644)
        .mkdir("d/sub", 0o755);
    l.lower(0).symlink("d", &abs);
    l.up().mkdir("r/sub", 0o755);
    l.lower(1).symlink("r", "../../outside");
    l.up().mkdir("p/sub", 0o755);
    l.lower(2).symlink("p", &format!("/proc/self/root{abs}"));
    // symlink in the middle of a directory stack: stops the merge there
    l.up().mkdir("m", 0o755);
    l.lower(0).write_file("m/top", b"t", 0o644);
    l.lower(1).symlink("m", &abs);
    l.lower(2)
        .write_file("m/bottom", b"b", 0o644)
        .mkdir("m/sub", 0o755);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    let canary2 = canary.clone();
    with_timeout(T, move || {
        let ino = Inotify::watch(&[&canary2, &canary2.join("sub"), &canary2.join("secret")]);
        assert_eq!(names(&r.join("d")), sv(&["mine", "sub"]));
        assert_eq!(names(&r.join("r")), sv(&["sub"]));
        assert_eq!(names(&r.join("p")), sv(&["sub"]));
        assert_eq!(names(&r.join("m")), sv(&["top"]));
        for dir in ["d", "r", "p", "m"] {
            let md = fs::symlink_metadata(r.join(dir)).unwrap();
            assert!(md.is_dir(), "{dir} must be the upper directory");
            for leaked in ["secret", "sub/leak", "bottom", ".wh.mine"] {
                assert_enoent_or_notdir(&r.join(dir).join(leaked));
                assert_eq!(
                    expect_err(File::open(r.join(dir).join(leaked)).map(|_| ())),
                    fs::symlink_metadata(r.join(dir).join(leaked))
                        .map(|_| 0)
                        .unwrap_err()
                        .raw_os_error()
                        .unwrap()
                );
            }
            let xs = list_xattrs(&r.join(dir)).unwrap();
            assert!(
                !xs.iter().any(|x| x == "user.canary"),
                "{dir}: xattrs of the canary leaked: {xs:?}"
            );
            assert!(get_xattr(&r.join(dir), "user.canary").is_err());
        }
        for dir in ["d/sub", "r/sub", "p/sub"] {
            assert_eq!(names(&r.join(dir)), Vec::<String>::new(), "{dir}");
            assert!(
                list_xattrs(&r.join(dir)).unwrap().is_empty(),
                "{dir}: canary xattrs leaked"
            );
        }
        // "mine" is not hidden by the canary's `.wh.mine`
        assert_eq!(read(&r.join("d/mine")), b"m");
        assert_quiet(&ino, "listing/looking up merged dirs over a lower symlink");
    });
}

#[track_caller]
fn assert_enoent_or_notdir(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) => panic!(
            "{} must not exist (escape through a layer symlink?), lstat gives {}",
            p.display(),
            fmt_md(&m)
        ),
        Err(e) => assert!(
            matches!(errno_of(&e), libc::ENOENT | libc::ENOTDIR),
            "lstat {}: {e}",
            p.display()
        ),
    }
}

#[test]
fn upper_symlink_shadows_lower_directory() {
    let (s, l) = setup();
    let canary = make_canary(&s);
    let abs = canary.display().to_string();
    l.up().symlink("d", &abs);
    l.lower(0).write_file("d/f", b"lower f", 0o644).write_file(
        "d/secret",
        b"not the secret",
        0o644,
    );
    l.lower(1).write_file("d/g", b"g", 0o644);
    // a lower-only directory next to it that the upper does not touch
    l.lower(1).write_file("lower-only/dir/x", b"x", 0o644);
    l.up().symlink("lower-only/dir/y", &abs);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    let canary2 = canary.clone();
    with_timeout(T, move || {
        let ino = Inotify::watch(&[&canary2, &canary2.join("sub"), &canary2.join("secret")]);
        let md = fs::symlink_metadata(r.join("d")).unwrap();
        assert!(
            md.file_type().is_symlink(),
            "upper symlink must win over the lower directory"
        );
        assert_eq!(fs::read_link(r.join("d")).unwrap(), PathBuf::from(&abs));
        assert_eq!(names(&r), sv(&["d", "lower-only"]));
        assert_eq!(names(&r.join("lower-only/dir")), sv(&["x", "y"]));
        assert!(
            fs::symlink_metadata(r.join("lower-only/dir/y"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_quiet(&ino, "lstat/readdir next to an upper symlink");
        // the caller's kernel follows the symlink: it reaches the canary, not
        // the lower directory's entries
        assert_eq!(read(&r.join("d/secret")), b"SECRET");
        assert_eq!(expect_err(fs::metadata(r.join("d/f"))), libc::ENOENT);
        assert_eq!(expect_err(fs::metadata(r.join("d/g"))), libc::ENOENT);
    });
}

#[test]
fn layer_root_given_through_a_symlink_works() {
    let (s, mut l) = setup();
    l.lower(1).write_file("via-link", b"ok", 0o644);
    let link = s.path().join("lower1-link");
    std::os::unix::fs::symlink(&l.lowers[1], &link).unwrap();
    l.lowers[1] = link;
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        assert_eq!(read(&r.join("via-link")), b"ok");
        assert!(fs::symlink_metadata(&r).unwrap().is_dir());
    });
}

#[test]
fn reading_never_modifies_lower_layers() {
    // sanity for the read path: opening a lower file read-only never
    // modifies the lower layer
    let (_s, l) = setup();
    l.lower(2).write_file("f", b"orig", 0o644);
    let before = snapshot(&l.lowers[2]);
    let m = mount_ovlfuse(&l, "");
    let r = m.mnt.clone();
    with_timeout(T, move || {
        let mut s = String::new();
        File::open(r.join("f"))
            .unwrap()
            .read_to_string(&mut s)
            .unwrap();
        assert_eq!(s, "orig");
        let _ = snapshot(&r);
    });
    drop(m);
    let after = snapshot(&l.lowers[2]);
    let d = diff_snapshots(&before, &after);
    assert!(d.is_empty(), "reading modified the lower layer: {d:?}");
    let _ = std::io::stdout().flush();
}

// ---------------------------------------------------------------------------
// listings the kernel keeps between opens
// ---------------------------------------------------------------------------

/// The kernel keeps a directory's listing across opens (FOPEN_CACHE_DIR): every change made
/// through the union — create, unlink of a lower name (a whiteout), rename in, out and
/// within, mkdir, rmdir, a hard link, a change in a subdirectory that copies the directory
/// up — shows in the next listing, which is read completely from the start each time.
#[test]
fn a_listing_kept_by_the_kernel_shows_every_change_made_through_the_union() {
    let (_s, l) = setup();
    for i in 0..300 {
        l.lower(1).write_file(&format!("d/lower{i}"), b"x", 0o644);
    }
    l.lower(0).write_file("other/incoming", b"x", 0o644);
    let m = mount_ovlfuse(&l, "");
    let root = m.path().to_path_buf();
    with_timeout(T, move || {
        let d = root.join("d");
        let mut expected: BTreeSet<String> = (0..300).map(|i| format!("lower{i}")).collect();
        let check = |expected: &BTreeSet<String>, after: &str| {
            // Twice: once to fill the kernel's cache, once served from it.
            for round in 0..2 {
                let got: BTreeSet<String> = names(&d).into_iter().collect();
                assert_eq!(&got, expected, "listing {round} after {after}");
            }
        };
        check(&expected, "mount");
        fs::write(d.join("new"), b"n").unwrap();
        expected.insert("new".into());
        check(&expected, "create");
        fs::remove_file(d.join("lower7")).unwrap();
        expected.remove("lower7");
        check(&expected, "unlink of a lower file");
        fs::rename(root.join("other/incoming"), d.join("incoming")).unwrap();
        expected.insert("incoming".into());
        check(&expected, "rename into the directory");
        fs::rename(d.join("lower8"), root.join("other/outgoing")).unwrap();
        expected.remove("lower8");
        check(&expected, "rename out of the directory");
        fs::rename(d.join("lower9"), d.join("renamed")).unwrap();
        expected.remove("lower9");
        expected.insert("renamed".into());
        check(&expected, "rename within the directory");
        fs::create_dir(d.join("sub")).unwrap();
        expected.insert("sub".into());
        check(&expected, "mkdir");
        fs::write(d.join("sub/inner"), b"i").unwrap();
        check(&expected, "a create in a subdirectory");
        fs::hard_link(d.join("new"), d.join("link")).unwrap();
        expected.insert("link".into());
        check(&expected, "link");
        fs::remove_file(d.join("sub/inner")).unwrap();
        fs::remove_dir(d.join("sub")).unwrap();
        expected.remove("sub");
        check(&expected, "rmdir");
        let other: BTreeSet<String> = names(&root.join("other")).into_iter().collect();
        assert_eq!(other, sv(&["outgoing"]).into_iter().collect());
    });
}

/// What the fuseblk relay answers itself and plain fuse answers through fuser: a terminal
/// ioctl on a file is ENOTTY (isatty is false), and a name that was missing is kept by the
/// kernel as missing only until the union makes it (negative entries).
#[test]
fn isatty_is_enotty_and_missing_names_appear_once_made() {
    if testing_kernel_instead() {
        return;
    }
    for transport in ["", "nouring", "nofuseblk"] {
        let (_s, l) = setup();
        l.lower(0).write_file("lf", b"lower\n", 0o644);
        let m = mount_ovlfuse(&l, transport);
        let r = m.mnt.clone();
        with_timeout(T, move || {
            let f = File::open(r.join("lf")).unwrap();
            // SAFETY: isatty on an open descriptor.
            let tty = unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(&f)) };
            let err = std::io::Error::last_os_error().raw_os_error();
            assert_eq!((tty, err), (0, Some(libc::ENOTTY)), "[{transport}] isatty");
            let p = r.join("later");
            for _ in 0..2 {
                assert_enoent(&p);
            }
            fs::write(&p, b"made\n").unwrap();
            assert_eq!(
                read(&p),
                b"made\n",
                "[{transport}] a name made after a miss"
            );
            fs::remove_file(&p).unwrap();
            assert_enoent(&p);
            fs::create_dir(&p).unwrap();
            assert!(fs::metadata(&p).unwrap().is_dir(), "[{transport}]");
        });
        drop(m);
    }
}

/// A listing read again after the kernel dropped its cached copy (page cache only, so the
/// kernel still holds every entry it stat'ed): every name, with the inode number stat gives,
/// on both transports (fuseblk then lists held entries without attributes).
#[test]
fn listing_read_again_after_a_page_cache_drop_keeps_every_name_and_inode() {
    if testing_kernel_instead() {
        return;
    }
    for transport in ["", "nouring", "nofuseblk"] {
        let (_s, l) = setup();
        for i in 0..300 {
            l.lower(0).write_file(&format!("d/f{i:03}"), b"x", 0o644);
        }
        l.up().write_file("d/upper", b"u", 0o644);
        let m = mount_ovlfuse(&l, transport);
        let r = m.mnt.join("d");
        with_timeout(T, move || {
            let list = |r: &Path| -> std::collections::BTreeMap<OsString, u64> {
                use std::os::unix::fs::DirEntryExt;
                fs::read_dir(r)
                    .unwrap()
                    .map(|e| e.map(|e| (e.file_name(), e.ino())).unwrap())
                    .collect()
            };
            let first = list(&r);
            assert_eq!(first.len(), 301, "[{transport}]");
            for (name, ino) in &first {
                let st = fs::symlink_metadata(r.join(name)).unwrap();
                assert_eq!(st.ino(), *ino, "[{transport}] {name:?}");
            }
            fs::write("/proc/sys/vm/drop_caches", b"1").unwrap();
            assert_eq!(list(&r), first, "[{transport}] read again");
        });
        drop(m);
    }
}
