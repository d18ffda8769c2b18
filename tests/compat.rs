//! The ways users and tools reach ovlfuse: containers/storage's `mount_program` call (quoted
//! SELinux context with commas, uid/gid mappings), `mount -t fuse.ovlfuse`, an fstab line,
//! the mount helper and its installer, and the `/dev/fd/N` convention xfstests uses — each
//! mounted for real and unmounted through the routes users take.

mod common;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs mount-helpers/install.sh into `prefix` (binary in prefix/bin, helper in
/// prefix/sbin) with `extra` arguments.
fn run_installer(prefix: &Path, extra: &[&str]) -> CmdOut {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/install.sh");
    let mut argv: Vec<OsString> = vec![
        script.into(),
        "--prefix".into(),
        prefix.into(),
        "--sbindir".into(),
        prefix.join("sbin").into(),
        "--binary".into(),
        ovlfuse_bin().into(),
    ];
    argv.extend(extra.iter().map(OsString::from));
    run_argv(&argv, Duration::from_secs(30))
}

fn helper_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("mount-helpers/mount.fuse.ovlfuse")
}

fn layers_with_owners(s: &Scratch) -> Layers {
    let l = s.layers(2, true);
    l.lower(1)
        .write_file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n", 0o644)
        .write_file("home/user/notes", b"user's\n", 0o644)
        .chown("home/user", 1000, 1000)
        .chown("home/user/notes", 1000, 1000);
    l.lower(0).write_file("etc/hostname", b"container\n", 0o644);
    l
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// What containers/storage runs as `mount_program`: `-o DATA MERGED`, DATA with a quoted
/// context holding commas and the container's id mappings.
#[test]
fn mount_program_call_like_containers_storage_maps_ids_both_ways() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let data = format!(
        "{},context=\"system_u:object_r:container_file_t:s0:c1,c2\",\
         uidmapping=0:100000:65536,gidmapping=0:100000:65536,xattr_permissions=2",
        l.mount_opts()
    );
    let m = mount_ovlfuse_with(&l, |mnt| {
        vec!["-o".into(), data.clone().into(), mnt.as_os_str().to_owned()]
    });
    let root = m.path().to_path_buf();
    let shown = with_timeout(20, move || {
        (
            owner(&root.join("etc/passwd")),
            owner(&root.join("home/user/notes")),
            owner(&root),
        )
    });
    assert_eq!(shown.0, (100000, 100000), "stored 0:0 is shown as 100000");
    assert_eq!(shown.1, (101000, 101000), "stored 1000 is shown as 101000");
    assert_eq!(shown.2, (100000, 100000));

    // A container process (host uid 100000 = container root) creates a file: the layer
    // stores the container's id.
    let target = m.p("created-by-container-root");
    let out = Command::new("setpriv")
        .args([
            "--reuid=100000",
            "--regid=100000",
            "--clear-groups",
            "sh",
            "-c",
        ])
        .arg(format!("echo hi > '{}'", target.display()))
        .output()
        .expect("run setpriv");
    assert!(
        out.status.success(),
        "create as uid 100000: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let upper = l.upper.clone().expect("upper");
    assert_eq!(owner(&upper.join("created-by-container-root")), (0, 0));

    // chown through the mount maps back; an id outside the mapping is refused.
    let notes = m.p("home/user/notes");
    let (mapped, unmapped) = with_timeout(20, move || {
        let mapped = std::os::unix::fs::lchown(&notes, Some(102000), Some(102000));
        let unmapped = std::os::unix::fs::lchown(&notes, Some(5), None);
        (
            mapped.map_err(|e| e.raw_os_error()),
            unmapped.map_err(|e| e.raw_os_error()),
        )
    });
    assert_eq!(mapped, Ok(()));
    assert_eq!(unmapped, Err(Some(libc::EINVAL)));
    assert_eq!(owner(&upper.join("home/user/notes")), (2000, 2000));
}

#[test]
fn squash_to_root_shows_every_file_as_root_and_stores_nothing_new() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let m = mount_ovlfuse(&l, "squash_to_root");
    let notes = m.p("home/user/notes");
    assert_eq!(with_timeout(20, move || owner(&notes)), (0, 0));
    let lower = l.lowers[1].join("home/user/notes");
    assert_eq!(owner(&lower), (1000, 1000), "the layer keeps its owner");
}

/// Runs `script` with sh in a private mount namespace whose /usr/local/bin holds only the
/// binary under test (mount(8) is setuid and wipes PATH, so helpers find programs in the
/// default PATH only), and, if `helper` is given, with that file standing in for fuse3's
/// /sbin/mount.fuse3 — so mount(8) itself runs it. Everything the script mounts lives and
/// dies in that namespace; a daemon it left would be found by the caller.
fn in_private_namespace(s: &Scratch, script: &str, helper: Option<&Path>) -> CmdOut {
    let bin = s.mkdir("localbin");
    fs::copy(ovlfuse_bin(), bin.join("ovlfuse")).expect("copy binary");
    let mut setup = format!("mount --bind '{}' /usr/local/bin\n", bin.display());
    if let Some(h) = helper {
        setup.push_str(&format!(
            "mount --bind '{}' \"$(readlink -f /sbin/mount.fuse3)\"\n",
            h.display()
        ));
    }
    let full = format!("set -eu\n{setup}{script}");
    run_argv(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &full,
        ],
        Duration::from_secs(60),
    )
}

/// Runs the shell script `inner` as uid/gid 65534 (through `wrapper`, e.g. `unshare -Urm`)
/// in a private mount namespace whose /dev/fuse is usable by anyone (a device node made in
/// `base`): this machine kind's /dev/fuse is 0600, the host's stays untouched.
fn as_nobody(base: &Path, wrapper: &[&str], inner: &str) -> CmdOut {
    let device = base.join("fuse");
    let outer = format!(
        "set -eu\n\
         mknod {dev} c 10 229 && chmod 666 {dev} && mount --bind {dev} /dev/fuse\n\
         exec setpriv --reuid=65534 --regid=65534 --clear-groups {wrapper} sh -c '{inner}'\n",
        dev = device.display(),
        wrapper = wrapper.join(" "),
        inner = inner.replace('\'', "'\\''")
    );
    run_argv(
        &[
            "unshare",
            "-m",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &outer,
        ],
        Duration::from_secs(60),
    )
}

fn assert_no_daemon_left(mnt: &Path) {
    let left = find_daemons("ovlfuse".as_ref(), mnt);
    for pid in &left {
        // SAFETY: killing a daemon this test started.
        unsafe { libc::kill(*pid, libc::SIGKILL) };
    }
    assert!(left.is_empty(), "daemons left behind: {left:?}");
}

/// `mount -t fuse.ovlfuse overlay MNT -o ...` then `umount MNT`: mount(8) runs fuse3's
/// mount.fuse3, which runs `ovlfuse overlay MNT -o ...` from the default PATH.
#[test]
fn mount_dash_t_fuse_ovlfuse_then_umount() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let mnt = s.mkdir("mnt");
    let script = format!(
        "mount -t fuse.ovlfuse overlay '{m}' -o '{o}'\n\
         grep ' {m} ' /proc/mounts\n\
         timeout 20 cat '{m}/etc/hostname'\n\
         umount '{m}'\n\
         for i in $(seq 100); do pgrep -f '^[^ ]*ovlfuse overlay {m}' >/dev/null || exit 0; sleep 0.1; done\n\
         echo 'daemon still running after umount'; exit 1\n",
        m = mnt.display(),
        o = l.mount_opts()
    );
    let out = in_private_namespace(&s, &script, None);
    assert_no_daemon_left(&mnt);
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    // As root the union is fuseblk (syncfs reaches the daemon); the source is the fsname.
    assert!(
        out.stdout
            .contains(&format!("overlay {} fuseblk.ovlfuse ", mnt.display())),
        "mount table line: {}",
        out.stdout
    );
    assert!(out.stdout.contains("container\n"), "{}", out.stdout);
}

/// An fstab line (a private fstab file, so /etc/fstab is left alone) mounted with
/// `mount MOUNTPOINT` through our installed helper, unmounted with `fusermount -u`.
#[test]
fn fstab_line_mounts_through_the_installed_helper() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let mnt = s.mkdir("mnt");
    let prefix = s.mkdir("prefix");
    let install = run_installer(&prefix, &[]);
    assert!(install.ok(), "install: {}", install.stderr);
    let fstab = s.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# test fstab\nrootfs-42 {} fuse.ovlfuse {},nofail,noatime 0 0\n",
            mnt.display(),
            l.mount_opts()
        ),
    )
    .expect("write fstab");
    let script = format!(
        "mount -T '{f}' '{m}'\n\
         grep ' {m} ' /proc/mounts\n\
         timeout 20 cat '{m}/etc/hostname'\n\
         fusermount -u '{m}'\n\
         for i in $(seq 100); do pgrep -f '^[^ ]*ovlfuse rootfs-42 {m}' >/dev/null || exit 0; sleep 0.1; done\n\
         echo 'daemon still running after fusermount -u'; exit 1\n",
        f = fstab.display(),
        m = mnt.display()
    );
    let helper = prefix.join("sbin/mount.fuse.ovlfuse");
    let out = in_private_namespace(&s, &script, Some(&helper));
    assert_no_daemon_left(&mnt);
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    assert!(
        out.stdout
            .contains(&format!("rootfs-42 {} fuseblk.ovlfuse ", mnt.display())),
        "mount table line: {}",
        out.stdout
    );
    assert!(out.stdout.contains("container\n"), "{}", out.stdout);
}

/// The helper as mount(8) calls it (its own flags, fstab-only words in the options).
#[test]
fn mount_helper_drops_mount8_flags_and_fstab_words() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let opts = format!("rw,defaults,_netdev,{}", l.mount_opts());
    let m = mount_ovlfuse_command(&l, |mnt| {
        let mut c = Command::new(helper_script());
        c.arg("overlay")
            .arg(mnt)
            .args(["-n", "-s", "-o", &opts])
            .env("OVLFUSE", ovlfuse_bin());
        c
    });
    let hostname = m.p("etc/hostname");
    assert!(with_timeout(20, move || hostname.exists()));
}

#[test]
fn install_script_installs_and_uninstalls_into_a_prefix() {
    let s = Scratch::new();
    let prefix = s.mkdir("prefix");
    let sbin = prefix.join("sbin");
    let install = run_installer(&prefix, &[]);
    assert!(
        install.ok(),
        "install: {}{}",
        install.stdout,
        install.stderr
    );
    let helper = sbin.join("mount.fuse.ovlfuse");
    let installed = prefix.join("bin/ovlfuse");
    assert!(installed.is_file() && helper.is_file());
    let text = fs::read_to_string(&helper).expect("read helper");
    assert!(
        text.contains(&format!("bin=${{OVLFUSE:-{}}}", installed.display())),
        "the installed helper must call the installed binary"
    );
    // The installed helper mounts with the installed binary.
    let l = layers_with_owners(&s);
    let opts = l.mount_opts();
    let m = mount_ovlfuse_command(&l, |mnt| {
        let mut c = Command::new(&helper);
        c.arg("overlay").arg(mnt).args(["-o", &opts]);
        c
    });
    drop(m);
    let uninstall = run_installer(&prefix, &["--uninstall"]);
    assert!(uninstall.ok(), "uninstall: {}", uninstall.stderr);
    assert!(!installed.exists() && !helper.exists());
}

/// Unmounts lazily on drop and kills the daemon: for the `/dev/fd/N` test, whose mount the
/// test makes itself.
struct CallerMount {
    mnt: PathBuf,
    daemon: Option<std::process::Child>,
}

impl Drop for CallerMount {
    fn drop(&mut self) {
        if is_mounted(&self.mnt) {
            let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
        }
        if let Some(mut d) = self.daemon.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            while d.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = d.kill();
            let _ = d.wait();
        }
    }
}

/// xfstests' FSTYP=fuse: the caller opens /dev/fuse, mounts it itself and hands the
/// descriptor over as the mountpoint `/dev/fd/N`.
#[test]
fn dev_fd_mountpoint_serves_a_mount_the_caller_made() {
    let s = Scratch::new();
    let l = layers_with_owners(&s);
    let mnt = s.mkdir("mnt");
    // SAFETY: plain open; the descriptor is deliberately inheritable.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR) };
    assert!(
        fd >= 0,
        "open /dev/fuse: {}",
        std::io::Error::last_os_error()
    );
    let data = cstr(format!(
        "fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions"
    ));
    let target = cstr(&mnt);
    // SAFETY: valid strings.
    let ret = unsafe {
        libc::mount(
            c"xfstests-dev".as_ptr(),
            target.as_ptr(),
            c"fuse.ovlfuse".as_ptr(),
            0,
            data.as_ptr().cast(),
        )
    };
    assert_eq!(ret, 0, "mount: {}", std::io::Error::last_os_error());
    let mut guard = CallerMount {
        mnt: mnt.clone(),
        daemon: None,
    };
    let mut cmd = Command::new(ovlfuse_bin());
    cmd.args(["-f", "-o", &l.mount_opts()])
        .arg(format!("/dev/fd/{fd}"))
        .stdin(Stdio::null());
    // SAFETY: close the test's copy only in the parent; the child keeps the inherited one.
    let child = unsafe { cmd.pre_exec(|| Ok(())).spawn().expect("spawn ovlfuse") };
    // SAFETY: our copy of the descriptor is no longer needed once the child has it.
    unsafe { libc::close(fd) };
    guard.daemon = Some(child);
    let hostname = mnt.join("etc/hostname");
    assert_eq!(
        with_timeout(20, move || fs::read_to_string(hostname)
            .expect("read through /dev/fd")),
        "container\n"
    );
    // The caller unmounts; the daemon sees the connection end and exits 0.
    let out = run_argv(
        &["umount".as_ref(), mnt.as_os_str()],
        Duration::from_secs(10),
    );
    assert!(out.ok(), "umount: {}", out.stderr);
    let mut daemon = guard.daemon.take().expect("daemon");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(st) = daemon.try_wait().expect("wait") {
            break Some(st);
        }
        if Instant::now() > deadline {
            let _ = daemon.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "daemon exit after umount"
    );
}

/// Rootless: a non-root user in a user namespace (`unshare -Urm`) mounts with plain
/// mount(2), which FUSE allows there. trusted.* cannot be written, so the union falls back
/// to user.overlay.* and says so once in the log. (/dev/fuse is 0600 on this machine kind:
/// the test makes it usable only inside its own private mount namespace.)
#[test]
fn rootless_mount_in_a_user_namespace_falls_back_to_user_xattrs() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0)
        .write_file("f", b"hi\n", 0o644)
        .write_file("d/x", b"x\n", 0o644)
        .write_file("g", b"g\n", 0o644);
    let base = s.mkdir("rootless");
    let bin = base.join("ovlfuse");
    fs::copy(ovlfuse_bin(), &bin).expect("copy binary");
    let mnt = base.join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let log = base.join("log");
    let chown = run_argv(
        &[
            "chown".as_ref(),
            "-R".as_ref(),
            "65534:65534".as_ref(),
            s.path().as_os_str(),
        ],
        Duration::from_secs(30),
    );
    assert!(chown.ok(), "chown: {}", chown.stderr);
    let inner = format!(
        "{bin} -f -o {opts} {m} 2>{log} &\n\
         for i in $(seq 100); do grep -q ' {m} ' /proc/mounts && break; sleep 0.1; done\n\
         timeout 20 cat {m}/f\n\
         rm {m}/f && rm -r {m}/d && mkdir {m}/d && mv {m}/g {m}/h\n\
         ls {m}\n\
         umount {m}\n\
         wait; echo daemon-exit=$?\n",
        bin = bin.display(),
        opts = l.mount_opts(),
        m = mnt.display(),
        log = log.display()
    );
    let out = as_nobody(&base, &["unshare", "-Urm"], &inner);
    let daemon_log = fs::read_to_string(&log).unwrap_or_default();
    assert_no_daemon_left(&mnt);
    assert!(out.ok(), "{}{}\nlog: {daemon_log}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["hi", "d", "h", "daemon-exit=0"],
        "log: {daemon_log}"
    );
    assert_eq!(
        daemon_log.matches("cannot set trusted.* xattrs").count(),
        1,
        "the fallback is announced once: {daemon_log}"
    );
    let upper = l.upper.clone().expect("upper");
    assert_eq!(
        get_xattr(&upper.join("d"), "user.overlay.opaque").ok(),
        Some(b"y".to_vec())
    );
    let f = fs::symlink_metadata(upper.join("f")).ok();
    let deleted = f.is_some_and(|m| {
        use std::os::unix::fs::FileTypeExt;
        m.file_type().is_char_device() && m.rdev() == 0
    }) || upper.join(".wh.f").exists();
    assert!(deleted, "f is not whited out in the upper layer");
}

/// An unprivileged user outside any user namespace: mount(2) is refused, so the daemon
/// mounts through the setuid fusermount3 (descriptor passed back over a socket), and
/// `fusermount3 -u` ends it. (fusermount3 opens /dev/fuse as the user; the test makes a
/// 0666 /dev/fuse inside its own private mount namespace, where the mount also lives.)
#[test]
fn unprivileged_user_mounts_through_fusermount3() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0)
        .write_file("f", b"hi\n", 0o644)
        .write_file("d/x", b"x\n", 0o644);
    let base = s.mkdir("user");
    let bin = base.join("ovlfuse");
    fs::copy(ovlfuse_bin(), &bin).expect("copy binary");
    let mnt = base.join("mnt");
    fs::create_dir(&mnt).expect("mkdir mnt");
    let chown = run_argv(
        &[
            "chown".as_ref(),
            "-R".as_ref(),
            "65534:65534".as_ref(),
            s.path().as_os_str(),
        ],
        Duration::from_secs(30),
    );
    assert!(chown.ok(), "chown: {}", chown.stderr);
    let inner = format!(
        "cd /\n\
         {bin} -o {opts} {m}; echo mount-exit=$?\n\
         grep ' {m} ' /proc/mounts | cut -d' ' -f3\n\
         timeout 20 cat {m}/f\n\
         rm {m}/f && rm -r {m}/d && mkdir {m}/d\n\
         ls {m}\n\
         fusermount3 -u {m}\n\
         for i in $(seq 100); do pgrep -f '^{bin} ' >/dev/null || {{ echo daemon-gone; exit 0; }}; sleep 0.1; done\n\
         echo daemon-still-running\n",
        bin = bin.display(),
        opts = l.mount_opts(),
        m = mnt.display(),
    );
    let out = as_nobody(&base, &[], &inner);
    assert_no_daemon_left(&mnt);
    assert!(out.ok(), "{}{}", out.stdout, out.stderr);
    assert_eq!(
        out.stdout.lines().collect::<Vec<_>>(),
        ["mount-exit=0", "fuse.ovlfuse", "hi", "d", "daemon-gone"],
        "stderr: {}",
        out.stderr
    );
    let upper = l.upper.clone().expect("upper");
    assert_eq!(
        get_xattr(&upper.join("d"), "user.overlay.opaque").ok(),
        Some(b"y".to_vec()),
        "unprivileged: opaque recorded in user.overlay.*"
    );
}
