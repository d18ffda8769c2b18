//! `ovlfuse sync PATH`: flushes the upper layer of the union PATH is on and says whether data
//! written through the union was lost — on both transports, with a real writeback failure
//! from the fault rig.

mod common;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use common::faultrig::{FaultyExt4, cachestat, with_rig};
use common::*;

const BODY_SECS: u64 = 120;
const NEW_DATA: usize = 64 << 10;

fn durable_union(rig: &FaultyExt4, opts: &str) -> (Mounted, PathBuf, Scratch) {
    let scratch = Scratch::new();
    let lower = scratch.mkdir("lower");
    let layers = rig.union_layers(lower);
    let (upper, _) = layers.upper_and_work();
    (mount_ovlfuse(&layers, opts), upper, scratch)
}

fn sync_cmd(path: &std::path::Path) -> CmdOut {
    run_argv(
        &[ovlfuse_bin().as_os_str(), "sync".as_ref(), path.as_os_str()],
        Duration::from_secs(30),
    )
}

fn scenario(opts: &'static str, fail: bool) {
    with_rig(BODY_SECS, move |rig| {
        let (m, upper, _scratch) = durable_union(rig, opts);
        let f = File::create(m.p("f")).unwrap();
        f.write_all_at(&noise(NEW_DATA, 5), 0).unwrap();
        let x = File::open(upper.join("f")).unwrap();
        assert!(
            cachestat(&x).unwrap().nr_dirty > 0,
            "nothing dirty to flush"
        );
        if fail {
            rig.fail_new_writes();
        }
        let out = sync_cmd(&m.p("f"));
        if fail {
            rig.heal();
        }
        let left = cachestat(&x).unwrap();
        assert_eq!(
            left.nr_dirty, 0,
            "ovlfuse sync left dirty pages in the upper file: {left:?}"
        );
        if fail {
            assert_eq!(out.code, Some(1), "{}{}", out.stdout, out.stderr);
            // whatever the upper's syncfs says: ENOSPC from the rig, or EIO when ext4's own
            // flush inside that syncfs hits the failure
            assert!(
                out.stderr.contains("reports a writeback error"),
                "{}",
                out.stderr
            );
        } else {
            assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
            // and a directory works as well as a file
            let out = sync_cmd(m.path());
            assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
        }
    })
}

#[test]
fn sync_flushes_and_succeeds_on_fuseblk() {
    scenario("", false)
}

#[test]
fn sync_reports_a_lost_write_on_fuseblk() {
    scenario("", true)
}

#[test]
fn sync_flushes_and_succeeds_on_plain_fuse() {
    scenario("nofuseblk", false)
}

#[test]
fn sync_reports_a_lost_write_on_plain_fuse() {
    scenario("nofuseblk", true)
}

#[test]
fn sync_refuses_a_path_outside_ovlfuse() {
    let s = Scratch::new();
    let out = sync_cmd(s.path());
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stderr.contains("not on an ovlfuse mount"),
        "{}",
        out.stderr
    );
    let out = sync_cmd(&s.path().join("missing"));
    assert_eq!(out.code, Some(2), "{}{}", out.stdout, out.stderr);
    assert!(out.stderr.contains("missing"), "{}", out.stderr);
}
