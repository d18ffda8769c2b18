//! Differential tests: the same layers (kernel overlay formats only) are
//! mounted with the kernel overlay and with ovlfuse, and everything a user
//! can observe must be identical.

mod common;

use common::*;
use std::fs;
use std::path::Path;

const BIG: u64 = (4 << 30) + (1 << 20) + 5;

/// 3 lowers + upper using every feature in the kernel's on-disk format.
fn build_rich(l: &Layers) {
    let (u, l0, l1, l2) = (l.up(), l.lower(0), l.lower(1), l.lower(2));

    // --- bottom lower: a bit of everything
    l2.write_file("plain", b"bottom plain\n", 0o644)
        .write_file("private", b"secret-ish", 0o600)
        .write_file("script.sh", b"#!/bin/sh\necho hi\n", 0o755)
        .write_file("setuid", b"su", 0o4755)
        .write_file("setgid", b"sg", 0o2755)
        .mkdir("sticky", 0o1777)
        .write_file("sticky/t", b"t", 0o666)
        .write_file("owned", b"owned by 1000", 0o640)
        .chown("owned", 1000, 1001)
        .write_file("a/b/c/deep", b"deep", 0o644)
        .write_file("a/b/sibling", b"sib", 0o644)
        .mkdir("a/empty", 0o700)
        .write_file("hl1", b"hard linked", 0o644)
        .hardlink("hl1", "a/hl2")
        .mkfifo("fifo", 0o644)
        .mknod_char("chr", 0o660, 1, 7)
        .mknod_block("blk", 0o640, 7, 99)
        .symlink("rel_link", "plain")
        .symlink("abs_link", "/etc/hostname")
        .symlink("dangling", "does/not/exist")
        .symlink("dir_link", "a/b")
        .sparse_file(
            "sparse",
            BIG,
            &[
                (0, b"start"),
                ((4 << 30) + 7, b"past four gib"),
                (BIG - 4, b"tail"),
            ],
            0o644,
        )
        .write_file("xattrs", b"x", 0o644)
        .setxattr("xattrs", "user.one", b"1")
        .setxattr("xattrs", "user.empty", b"")
        .setxattr("xattrs", "user.bin", &[0, 1, 2, 255])
        .setxattr("xattrs", "trusted.other", b"root-only")
        .setxattr("a", "user.dirattr", b"d")
        .write_file("to_be_whited_out", b"gone", 0o644)
        .write_file("dir_to_be_whited_out/x", b"x", 0o644)
        .write_file("opaque_me/bottom_only", b"b", 0o644)
        .write_file("mid_opaque/bottom_only", b"b", 0o644)
        .write_file("file_then_dir", b"was a file", 0o644)
        .write_file("dir_then_file/inner", b"i", 0o644)
        .write_file("name with spaces", b"sp", 0o644)
        .write_file("ünïcødé-名前", b"u", 0o644)
        .write_file(&"L".repeat(255), b"long name", 0o644)
        .write_file("shadow_all", b"l2", 0o644)
        .write_file("symlink_over_file", b"file", 0o644);
    for i in 0..300 {
        l2.write_file(
            &format!("many/n{i:03}"),
            format!("l2-{i}").as_bytes(),
            0o644,
        );
    }

    // --- middle lower
    l1.write_file("plain", b"middle plain, longer\n", 0o640)
        .write_file("blob", &noise(1 << 20, 7), 0o644)
        .whiteout("to_be_whited_out")
        .whiteout("dir_to_be_whited_out")
        .write_file("mid_opaque/m1", b"m1", 0o644)
        .opaque_dir("mid_opaque")
        .write_file("a/b/mid", b"mid", 0o644)
        .write_file("shadow_all", b"l1", 0o600)
        .setxattr("shadow_all", "user.layer", b"l1")
        .mkdir("onlymid", 0o750)
        .chown("onlymid", 1234, 0)
        .write_file("onlymid/f", b"f", 0o444);
    for i in (0..300).step_by(3) {
        l1.write_file(
            &format!("many/n{i:03}"),
            format!("l1-{i}").as_bytes(),
            0o644,
        );
    }
    for i in (1..300).step_by(10).filter(|i| i % 3 != 0) {
        l1.whiteout(&format!("many/n{i:03}"));
    }
    for i in 300..400 {
        l1.write_file(&format!("many/n{i:03}"), b"new in l1", 0o644);
    }

    // --- top lower
    l0.write_file("file_then_dir/now_dir", b"d", 0o644)
        .write_file("dir_then_file", b"now a file", 0o644)
        .write_file("shadow_all", b"l0", 0o644)
        .symlink("symlink_over_file", "plain")
        .write_file("a/b/c/top", b"top", 0o644)
        .mknod_char("a/chr2", 0o600, 4, 64)
        .whiteout("a/b/sibling")
        .setxattr("a", "user.top", b"t");
    for i in (0..400).step_by(7) {
        l0.write_file(&format!("many/n{i:03}"), b"l0", 0o600);
    }

    // --- upper
    u.write_file("plain", b"upper plain", 0o644)
        .write_file("opaque_me/upper_only", b"u", 0o644)
        .opaque_dir("opaque_me")
        .whiteout("fifo")
        .whiteout("a/b/c/deep")
        .mkdir("a", 0o755)
        .setxattr("a", "user.upper", b"u")
        .write_file("upper_new", b"fresh", 0o664)
        .chown("upper_new", 42, 43)
        .symlink("link_over_dir", "plain")
        .mkfifo("upper_fifo", 0o600)
        .write_file("xattrs2", b"", 0o644)
        .setxattr("xattrs2", "user.long", &vec![b'v'; 3000]);
    l2.write_file("link_over_dir/inner", b"hidden by upper symlink", 0o644);
    for i in (0..400).step_by(11) {
        u.write_file(&format!("many/n{i:03}"), b"upper", 0o644);
    }
    for i in (2..400).step_by(13).filter(|i| i % 11 != 0) {
        u.whiteout(&format!("many/n{i:03}"));
    }
}

#[test]
fn rich_layer_set_merged_trees_identical() {
    let s = Scratch::new();
    let orig = s.layers(3, true);
    build_rich(&orig);
    let kl = copy_layers(&orig, &s.mkdir("kernel"));
    let fl = copy_layers(&orig, &s.mkdir("ovlfuse"));
    // the copies are faithful (incl. trusted xattrs, devices, whiteouts)
    for (i, o) in orig.lowers.iter().enumerate() {
        let d = diff_snapshots(&snapshot(o), &snapshot(&kl.lowers[i]));
        assert!(d.is_empty(), "cp -a copy of lower {i} differs: {d:?}");
    }
    let km = mount_kernel_overlay(&kl);
    let fm = mount_ovlfuse(&fl, "");
    assert_same_tree(&km.mnt, &fm.mnt);
}

fn read_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    for p in [
        "plain",
        "private",
        "blob",
        "shadow_all",
        "setuid",
        "owned",
        "to_be_whited_out",
        "dir_to_be_whited_out",
        "dir_to_be_whited_out/x",
        "fifo",
        "upper_fifo",
        "a",
        "a/b",
        "a/b/c",
        "a/b/c/deep",
        "a/b/sibling",
        "hl1",
        "a/hl2",
        "opaque_me",
        "opaque_me/bottom_only",
        "mid_opaque/bottom_only",
        "file_then_dir",
        "file_then_dir/now_dir",
        "dir_then_file",
        "dir_then_file/inner",
        "rel_link",
        "abs_link",
        "dangling",
        "dir_link",
        "dir_link/mid",
        "symlink_over_file",
        "link_over_dir",
        "link_over_dir/inner",
        "chr",
        "blk",
        "a/chr2",
        "missing",
        "plain/child",
        "many/n000",
        "many/n001",
        "many/n002",
        "many/n033",
        "many/n350",
        ".wh.fifo",
        "sparse",
    ] {
        let _ = o.lstat(p);
        let _ = o.stat(p);
    }
    for p in [
        "plain",
        "private",
        "blob",
        "shadow_all",
        "dir_then_file",
        "rel_link",
        "dir_link/mid",
        "a",
        "missing",
        "a/b/c/deep",
        "many/n330",
        "onlymid/f",
    ] {
        let _ = o.read(p);
    }
    let _ = o.pread("sparse", (4 << 30) + 7, 13);
    let _ = o.pread("sparse", BIG - 4, 100);
    let _ = o.pread("sparse", 3 << 30, 4096);
    let _ = o.pread("blob", 123_457, 65_536);
    for p in [
        "rel_link",
        "abs_link",
        "dangling",
        "dir_link",
        "symlink_over_file",
        "link_over_dir",
        "plain",
        "missing",
    ] {
        let _ = o.readlink(p);
    }
    for p in [
        "xattrs",
        "xattrs2",
        "a",
        "shadow_all",
        "opaque_me",
        "mid_opaque",
        "plain",
        "fifo",
        "missing",
    ] {
        let _ = o.listxattr(p);
    }
    for (p, n) in [
        ("xattrs", "user.one"),
        ("xattrs", "user.bin"),
        ("xattrs", "user.nope"),
        ("xattrs", "trusted.other"),
        ("a", "user.upper"),
        ("a", "user.top"),
        ("opaque_me", "trusted.overlay.opaque"),
        ("mid_opaque", "trusted.overlay.opaque"),
        ("xattrs2", "user.long"),
    ] {
        let _ = o.getxattr(p, n);
    }
    for p in [
        "",
        "a",
        "a/b",
        "a/b/c",
        "many",
        "opaque_me",
        "mid_opaque",
        "file_then_dir",
        "sticky",
        "plain",
        "missing",
    ] {
        let _ = o.readdir(p);
    }
    for (p, m) in [
        ("plain", libc::R_OK),
        ("script.sh", libc::X_OK),
        ("private", libc::W_OK),
        ("missing", libc::F_OK),
    ] {
        let _ = o.access(p, m);
    }
    o.into_log()
}

#[test]
fn differential_reads_stats_readlinks_and_xattrs() {
    run_differential(&Scenario::new(
        "reads, stats, readlinks, xattrs over the rich layer set",
        build_rich,
        read_ops,
    ));
}

fn small_build(l: &Layers) {
    l.lower(1)
        .write_file("d/x", b"x", 0o644)
        .write_file("d/y", b"y", 0o644)
        .write_file("f", b"f", 0o644);
    l.lower(0)
        .whiteout("d/y")
        .write_file("d/z", b"z", 0o644)
        .symlink("s", "d/x");
}

fn small_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    for p in ["", "d", "d/x", "d/y", "d/z", "f", "s", "f/x", "nope"] {
        let _ = o.lstat(p);
        let _ = o.read(p);
    }
    let _ = o.readdir("d");
    let _ = o.readlink("s");
    let _ = o.listxattr("d");
    o.into_log()
}

#[test]
fn differential_lowerdir_only_mount() {
    let mut sc = Scenario::new("two lowers, no upper", small_build, small_ops);
    sc.lowers = 2;
    sc.upper = false;
    run_differential(&sc);
}

fn userxattr_build(l: &Layers) {
    l.lower(1)
        .write_file("od/theirs", b"t", 0o644)
        .write_file("f", b"f", 0o644)
        .setxattr("f", "user.overlay.private", b"p");
    l.up()
        .write_file("od/mine", b"m", 0o644)
        .user_opaque_dir("od")
        .setxattr("od", "user.visible", b"v");
    l.lower(0)
        .write_file("g", b"g", 0o644)
        .setxattr("g", "user.keep", b"k");
}

fn userxattr_ops(root: &Path) -> Vec<String> {
    let mut o = OpLog::new(root);
    let _ = o.readdir("od");
    let _ = o.lstat("od/theirs");
    for p in ["od", "f", "g"] {
        let _ = o.listxattr(p);
    }
    let _ = o.getxattr("od", "user.overlay.opaque");
    let _ = o.getxattr("f", "user.overlay.private");
    let _ = o.getxattr("g", "user.keep");
    o.into_log()
}

#[test]
fn differential_userxattr_mount_option() {
    let mut sc = Scenario::new(
        "-o userxattr with user.overlay.opaque",
        userxattr_build,
        userxattr_ops,
    );
    sc.opts = "userxattr";
    run_differential(&sc);
}

/// Layers written by the kernel overlay with `redirect_dir=on` (directories renamed within
/// their parent and across parents) read the same through ovlfuse as through the kernel.
#[test]
fn redirects_written_by_the_kernel_are_followed() {
    let s = Scratch::new();
    let l = s.layers(2, true);
    l.lower(1)
        .write_file("a/x", b"x in bottom\n", 0o644)
        .write_file("a/sub/y", b"y\n", 0o644)
        .write_file("c/d/z", b"z\n", 0o644)
        .write_file("c/d/deep/q", b"q\n", 0o644);
    l.lower(0)
        .write_file("a/w", b"w in top lower\n", 0o644)
        .write_file("c/d/t", b"t\n", 0o644);
    {
        let k = mount_kernel_overlay_opts(&l, "redirect_dir=on");
        let root = k.path().to_path_buf();
        with_timeout(30, move || {
            fs::rename(root.join("a"), root.join("b")).expect("rename within parent");
            fs::create_dir(root.join("e")).expect("mkdir e");
            fs::rename(root.join("c/d"), root.join("e/f")).expect("rename across parents");
            fs::write(root.join("e/f/added"), b"new\n").expect("write into moved dir");
        });
    }
    let upper = l.upper.clone().expect("upper");
    let redirect = get_xattr(&upper.join("e/f"), "trusted.overlay.redirect")
        .expect("the kernel wrote a redirect");
    assert_eq!(redirect, b"/c/d");
    let kl = copy_layers(&l, &s.mkdir("kernel"));
    let fl = copy_layers(&l, &s.mkdir("ovlfuse"));
    let k = mount_kernel_overlay(&kl);
    let f = mount_ovlfuse(&fl, "");
    assert_same_tree(k.path(), f.path());
    let names = list_names(&f.p("e/f")).expect("list e/f");
    assert_eq!(names, ["added", "deep", "t", "z"]);
}
