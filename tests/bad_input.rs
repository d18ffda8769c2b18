//! Bad input: command lines, layer markers and a full upper filesystem.
//!
//! - The `ovlfuse` binary, given arbitrary command lines, exits 0, 1 or 2 (never a signal,
//!   never a hang), exits 2 exactly when the parser refuses the line, and never mounts
//!   anything (it runs under a seccomp filter that refuses every mount call, so a line that
//!   happens to name real directories cannot mount over them).
//! - Malformed overlay markers planted in layers (`trusted.overlay.redirect` and `.opaque`
//!   values, escaped and odd xattr names, devices named or numbered like whiteouts, AUFS
//!   markers of every file type, 64 KiB xattrs) never bring the daemon down: each entry reads
//!   as the kernel overlay reads it, or gives EIO with a log line naming the bad value.
//! - A full upper (a tiny tmpfs of our own) gives ENOSPC to the writer; a copy-up or a
//!   namespace change that cannot be made fails with ENOSPC, exactly where the kernel
//!   overlay fails, and leaves the tree, the upper layer and `workdir/work` as they were.
//!
//! Environment: `OVLFUSE_FULL=1` runs many more random cases; `OVLFUSE_BAD_ARGV_CASES=N`
//! and `OVLFUSE_BAD_XATTR_ROUNDS=N` set the counts of the two random tests outright.

mod common;

use common::bad_input::*;
use common::*;

use std::ffi::{OsStr, OsString};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ovlfuse::options::{self, Command as Parsed};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// Seconds any filesystem access may take before the test calls the daemon hung.
const T: u64 = 60;

fn full() -> bool {
    std::env::var_os("OVLFUSE_FULL").is_some()
}

fn env_count(name: &str, default: u32, full_default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full() { full_default } else { default })
}

fn errno_str(e: &io::Error) -> String {
    format!("Err({})", errno_name(errno_of(e)))
}

// ---------------------------------------------------------------------------
// the binary on random command lines
// ---------------------------------------------------------------------------

/// Why a run of the binary counts as a crash, if it does.
fn crash_verdict(out: &CmdOut) -> Option<String> {
    if out.timed_out {
        return Some("did not exit within the timeout".into());
    }
    match out.code {
        None => return Some("killed by a signal".into()),
        Some(0..=2) => {}
        Some(c) => return Some(format!("exit code {c}")),
    }
    if out.stderr.contains("panicked") || out.stderr.contains("RUST_BACKTRACE") {
        return Some("panicked".into());
    }
    None
}

/// Exit codes the binary may give for what the parser made of the line.
fn allowed_codes(parsed: &Result<Parsed, options::UsageError>) -> &'static [i32] {
    match parsed {
        Err(_) => &[2],
        Ok(Parsed::Help | Parsed::Version) => &[0],
        // Nothing can be mounted under the filter: a mount or the demo fails with 1.
        Ok(Parsed::Mount(_) | Parsed::Demo) => &[1],
        // `status`: 0 healthy, 1 poisoned, 2 not running; `sync`: 0 ok, 1 lost or failed.
        Ok(Parsed::Status(_) | Parsed::Sync(_)) => &[0, 1, 2],
    }
}

fn option_names() -> Vec<&'static str> {
    options::OPTIONS.iter().map(|o| o.name).collect()
}

/// Command lines made of real option names with real, missing, odd or random values, real
/// directories (so that some lines get past the parser into the mount checks, and a few
/// all the way to the mount call), and noise.
fn argv_strategy(real: Vec<OsString>) -> impl Strategy<Value = Vec<OsString>> {
    let byte = prop_oneof![
        3 => prop::sample::select(b",\"\\=:+/-. ".to_vec()),
        2 => prop::sample::select(b"abcdelorwxyz019".to_vec()),
        1 => 1u8..=255,
    ];
    let noise = prop::collection::vec(byte, 0..20);
    let real_bytes: Vec<Vec<u8>> = real.iter().map(|p| p.as_bytes().to_vec()).collect();
    let path = prop_oneof![
        3 => prop::sample::select(real_bytes.clone()),
        1 => prop::collection::vec(prop::sample::select(real_bytes.clone()), 1..4)
            .prop_map(|v| v.join(&b":"[..])),
        1 => noise.clone(),
    ];
    let value = prop_oneof![
        3 => path.clone(),
        1 => prop::sample::select(vec![
            "on", "off", "0", "1", "auto", "follow", "y", "0:0:1", "volatile", "",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        2 => noise.clone(),
        1 => prop::collection::vec(1u8..=255, 2000..5000),
    ];
    let item = prop_oneof![
        4 => (prop::sample::select(option_names()), value)
            .prop_map(|(n, v)| [n.as_bytes(), b"=", &v].concat()),
        2 => prop::sample::select(option_names()).prop_map(|n| n.as_bytes().to_vec()),
        1 => noise.clone(),
    ];
    let option_string = prop::collection::vec(item, 0..6).prop_map(|v| v.join(&b","[..]));
    let arg = prop_oneof![
        3 => Just(b"-o".to_vec()),
        4 => option_string,
        3 => path,
        1 => prop::sample::select(vec!["-f", "-d", "-s", "--", "-", "--debug", "-x"])
            .prop_map(|s| s.as_bytes().to_vec()),
        1 => noise,
    ];
    let first = prop_oneof![
        12 => Just(None),
        1 => prop::sample::select(vec!["status", "sync", "demo", "--help", "-V"]).prop_map(Some),
    ];
    (first, prop::collection::vec(arg, 0..8)).prop_map(|(first, rest)| {
        first
            .map(OsString::from)
            .into_iter()
            .chain(rest.into_iter().map(OsString::from_vec))
            .collect()
    })
}

#[test]
fn the_crash_check_and_the_no_mount_sandbox_have_teeth() {
    let s = Scratch::new();
    let sh = |script: &str| {
        run_argv(
            &["sh", "-c", script],
            Duration::from_millis(if script.contains("sleep") { 300 } else { 5000 }),
        )
    };
    assert!(crash_verdict(&sh("exit 0")).is_none());
    assert!(crash_verdict(&sh("exit 2")).is_none());
    assert!(crash_verdict(&sh("kill -SEGV $$")).is_some());
    assert!(crash_verdict(&sh("kill -ABRT $$")).is_some());
    assert!(crash_verdict(&sh("exit 101")).is_some());
    assert!(crash_verdict(&sh("echo \"thread 'main' panicked at x\" >&2; exit 1")).is_some());
    assert!(crash_verdict(&sh("sleep 5")).is_some());

    // Inside the sandbox neither a mount nor a loop device can be made.
    let dir = s.mkdir("target");
    let img = s.path().join("img");
    fs::write(&img, vec![0u8; 1 << 20]).unwrap();
    let tries: [Vec<OsString>; 3] = [
        vec![
            "mount".into(),
            "-t".into(),
            "tmpfs".into(),
            "none".into(),
            dir.clone().into(),
        ],
        vec!["losetup".into(), "-f".into(), img.clone().into()],
        vec![
            "unshare".into(),
            "-m".into(),
            "mount".into(),
            "-t".into(),
            "tmpfs".into(),
            "none".into(),
            dir.clone().into(),
        ],
    ];
    for argv in tries {
        let out = run_unable_to_mount(&argv, s.path(), Duration::from_secs(10));
        assert!(
            !out.ok(),
            "{argv:?} succeeded in the sandbox: {}",
            out.stderr
        );
        assert!(!is_mounted(&dir), "{argv:?} mounted in the sandbox");
    }
    let loops = run_argv(
        &["losetup", "-j", img.to_str().unwrap()],
        Duration::from_secs(10),
    );
    assert!(loops.stdout.trim().is_empty(), "{}", loops.stdout);
}

/// Random command lines: the binary exits 0, 1 or 2 as the parser decided, never crashes,
/// hangs or mounts.
#[test]
fn the_binary_survives_random_command_lines_without_mounting() {
    let s = Scratch::new();
    let layers = s.layers(2, true);
    layers.lower(0).write_file("f", b"x", 0o644);
    let (upper, work) = layers.upper_and_work();
    let mnt = s.mkdir("mnt");
    let file = s.path().join("a-file");
    fs::write(&file, b"not a directory").unwrap();
    let real: Vec<OsString> = [
        layers.lowers[0].clone(),
        layers.lowers[1].clone(),
        upper,
        work,
        mnt.clone(),
        file,
        s.path().join("missing"),
        PathBuf::from("relative-missing"),
    ]
    .into_iter()
    .map(PathBuf::into_os_string)
    .collect();
    let cases = env_count("OVLFUSE_BAD_ARGV_CASES", 80, 2000);
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let bin = ovlfuse_bin().into_os_string();
    let cwd = s.path().to_path_buf();
    let started = Instant::now();
    let result = runner.run(&argv_strategy(real), |args| {
        let parsed = options::parse_args(args.clone());
        let mut argv = vec![bin.clone()];
        argv.extend(args.iter().cloned());
        let out = run_unable_to_mount(&argv, &cwd, Duration::from_secs(20));
        if let Some(why) = crash_verdict(&out) {
            return Err(TestCaseError::fail(format!(
                "{why}: {args:?}\nstdout: {}\nstderr: {}",
                out.stdout, out.stderr
            )));
        }
        let code = out.code.unwrap_or(-1);
        prop_assert!(
            allowed_codes(&parsed).contains(&code),
            "exit {} for {:?} parsed as {:?}\nstderr: {}",
            code,
            args,
            parsed,
            out.stderr
        );
        if code != 0 {
            prop_assert!(
                !out.stderr.trim().is_empty(),
                "exit {} without a message",
                code
            );
        }
        let ours: Vec<_> = mounts()
            .into_iter()
            .filter(|(m, t)| m.starts_with(&cwd) || t.contains("ovlfuse") && m == &mnt)
            .collect();
        prop_assert!(ours.is_empty(), "{:?} mounted {:?}", args, ours);
        Ok(())
    });
    eprintln!(
        "[bad_input] {cases} command lines in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// malformed markers in layers
// ---------------------------------------------------------------------------

/// What one entry looks like through a mount: errno, or type, mode, contents (listing,
/// data hash, link target, device number) and xattr names with their values.
fn outcome(root: &Path, rel: &str) -> String {
    let p = root.join(rel);
    let md = match fs::symlink_metadata(&p) {
        Ok(m) => m,
        Err(e) => return errno_str(&e),
    };
    let kind = kind_of(md.mode());
    let what = match kind {
        Kind::Dir => list_names(&p).map_or_else(|e| errno_str(&e), |v| format!("{v:?}")),
        Kind::File => fs::read(&p).map_or_else(
            |e| errno_str(&e),
            |b| format!("len={} hash={:x}", b.len(), hash_bytes(&b)),
        ),
        Kind::Symlink => fs::read_link(&p).map_or_else(|e| errno_str(&e), |t| format!("{t:?}")),
        Kind::Char | Kind::Block => {
            format!("{}:{}", libc::major(md.rdev()), libc::minor(md.rdev()))
        }
        _ => String::new(),
    };
    let xattrs = match list_xattrs(&p) {
        Ok(mut names) => {
            names.sort();
            names
                .iter()
                .map(|n| {
                    let v = get_xattr(&p, n).map_or_else(
                        |e| errno_str(&e),
                        |v| format!("len={} hash={:x}", v.len(), hash_bytes(&v)),
                    );
                    format!("{n}={v}")
                })
                .collect::<Vec<_>>()
        }
        Err(e) => vec![errno_str(&e)],
    };
    format!("{kind:?} {:o} {what} xattrs={xattrs:?}", md.mode() & 0o7777)
}

/// The same entries read through the kernel overlay and through ovlfuse.
struct Compared {
    names: Vec<String>,
    kernel: Vec<String>,
    ovlfuse: Vec<String>,
    /// The root listings (kernel, ovlfuse).
    roots: (String, String),
    log: String,
}

impl Compared {
    fn get(&self, name: &str) -> (&str, &str) {
        let i = self
            .names
            .iter()
            .position(|n| n == name)
            .unwrap_or_else(|| panic!("{name} was not probed"));
        (&self.kernel[i], &self.ovlfuse[i])
    }

    fn table(&self) -> String {
        let mut s = String::new();
        for (i, n) in self.names.iter().enumerate() {
            s += &format!(
                "  {n:?}\n    kernel:  {}\n    ovlfuse: {}\n",
                self.kernel[i], self.ovlfuse[i]
            );
        }
        s + &format!("ovlfuse log:\n{}", self.log)
    }

    #[track_caller]
    fn assert_same(&self, name: &str) {
        let (k, f) = self.get(name);
        assert_eq!(
            f,
            k,
            "{name:?} differs from the kernel overlay\n{}",
            self.table()
        );
    }

    /// ovlfuse gives EIO for the entry and logged the value that made it so.
    #[track_caller]
    fn assert_eio_logged(&self, name: &str, value: &[u8]) {
        let (_, f) = self.get(name);
        assert_eq!(f, "Err(EIO)", "{name:?}\n{}", self.table());
        assert!(
            logged(&self.log, value),
            "no log line names {:?}\n{}",
            String::from_utf8_lossy(value),
            self.table()
        );
    }

    /// The brief's rule: as the kernel reads it, or EIO with a log line.
    #[track_caller]
    fn assert_same_or_eio_logged(&self, name: &str, value: &[u8]) {
        let (k, f) = self.get(name);
        if f != k {
            self.assert_eio_logged(name, value);
        }
    }
}

fn logged(log: &str, value: &[u8]) -> bool {
    let shown = format!("{:?}", String::from_utf8_lossy(value));
    log.lines().any(|l| l.contains(&shown))
}

/// Builds two lower layers (and an upper) with `build`, mounts the kernel overlay on a copy
/// and ovlfuse (foreground, log captured) on the original, and reads `names` through both.
/// Also checks the daemon survived and its mount still answers.
fn compare_with_kernel(build: impl FnOnce(&Layers), names: &[&str], opts: &str) -> Compared {
    let s = Scratch::new();
    let layers = s.layers(2, true);
    build(&layers);
    let copy = copy_layers(&layers, &s.path().join("kernel-copy"));
    let k = mount_kernel_overlay_opts(&copy, opts);
    let f = mount_ovlfuse_logged(&layers, opts);
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let (kroot, froot, list) = (k.path().to_path_buf(), f.p(""), names.clone());
    let (kernel, ovlfuse, roots) = with_timeout(T, move || {
        let kernel: Vec<String> = list.iter().map(|n| outcome(&kroot, n)).collect();
        let ovlfuse: Vec<String> = list.iter().map(|n| outcome(&froot, n)).collect();
        let roots = (outcome(&kroot, ""), outcome(&froot, ""));
        (kernel, ovlfuse, roots)
    });
    assert!(
        f.daemon_alive(),
        "the daemon died reading the layers\n{}",
        f.log_text()
    );
    assert!(
        !roots.1.starts_with("Err"),
        "the mount stopped answering: {}\n{}",
        roots.1,
        f.log_text()
    );
    let log = f.log_text();
    assert!(
        !log.contains("panicked"),
        "the daemon panicked (and survived?)\n{log}"
    );
    Compared {
        names,
        kernel,
        ovlfuse,
        roots,
        log,
    }
}

const REDIRECT: &str = "trusted.overlay.redirect";
const OPAQUE: &str = "trusted.overlay.opaque";

/// `name` in both lowers, the top one carrying `xattr=value`, the bottom one holding a
/// file `below` (visible only if the top directory does not hide or redirect it away).
fn dir_over_dir(layers: &Layers, name: &str, xattr: &str, value: &[u8]) {
    layers
        .lower(0)
        .mkdir(name, 0o755)
        .setxattr(name, xattr, value);
    layers
        .lower(1)
        .write_file(&format!("{name}/below"), b"below", 0o644);
}

/// A redirect target in the bottom layer, and a file at its top.
fn redirect_targets(layers: &Layers) {
    layers
        .lower(1)
        .write_file("target/t_file", b"t", 0o644)
        .write_file("t_file_top", b"t", 0o644);
}

#[test]
fn redirects_the_kernel_refuses_give_eio_and_a_log_line() {
    let cases: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("relative_with_slash", b"a/b"),
        ("dot", b"."),
        ("dotdot", b".."),
        ("absolute_dotdot", b"/../target"),
        ("absolute_dot", b"/./target"),
    ];
    let c = compare_with_kernel(
        |l| {
            redirect_targets(l);
            for (name, value) in cases {
                dir_over_dir(l, name, REDIRECT, value);
            }
            // A malformed redirect on an upper directory.
            l.up()
                .mkdir("upper_empty", 0o755)
                .setxattr("upper_empty", REDIRECT, b"");
            l.lower(0).write_file("upper_empty/below", b"b", 0o644);
        },
        &[
            "empty",
            "relative_with_slash",
            "dot",
            "dotdot",
            "absolute_dotdot",
            "absolute_dot",
            "upper_empty",
            "target",
        ],
        "",
    );
    for (name, value) in cases {
        let (k, _) = c.get(name);
        assert!(k.starts_with("Err("), "the kernel follows {name}: {k}");
        c.assert_eio_logged(name, value);
    }
    c.assert_eio_logged("upper_empty", b"");
    c.assert_same("target");
    // The listing still shows the entries (the kernel's does too).
    assert_eq!(c.roots.0, c.roots.1);
}

#[test]
fn redirects_with_a_nul_give_eio_and_a_log_line_or_the_kernel_reading() {
    let cases: &[(&str, &[u8])] = &[
        ("nul_inside", b"a\0b"),
        ("nul_after_absolute", b"/target\0zz"),
        ("nul_at_end", b"target\0"),
        ("nul_first", b"\0target"),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let c = compare_with_kernel(
        |l| {
            redirect_targets(l);
            for (name, value) in cases {
                dir_over_dir(l, name, REDIRECT, value);
            }
        },
        &names,
        "",
    );
    for (name, value) in cases {
        c.assert_same_or_eio_logged(name, value);
    }
}

#[test]
fn valid_and_huge_redirects_are_read_like_the_kernel() {
    // The longest value ext4 stores in one xattr block: components that exist nowhere.
    let huge: Vec<u8> = [&b"/"[..], &vec![&[b'z'; 200][..]; 18].join(&b"/"[..])].concat();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("absolute", b"/target".to_vec()),
        ("relative", b"target".to_vec()),
        ("to_itself", b"to_itself".to_vec()),
        ("to_a_file", b"/t_file_top".to_vec()),
        ("to_nothing", b"/no/such/dir".to_vec()),
        ("huge", huge),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let c = compare_with_kernel(
        |l| {
            redirect_targets(l);
            for (name, value) in &cases {
                dir_over_dir(l, name, REDIRECT, value);
            }
        },
        &names,
        "",
    );
    for name in &names {
        c.assert_same(name);
    }
    // Teeth: a followed redirect shows the target's contents, not the directory's own.
    assert!(c.get("absolute").1.contains("t_file"), "{}", c.table());
    assert!(!c.get("absolute").1.contains("below"), "{}", c.table());
}

#[test]
fn redirects_with_empty_components_give_eio_like_the_kernel_refuses_them() {
    let cases: &[(&str, &[u8])] = &[
        ("root_only", b"/"),
        ("double_slash", b"//target"),
        ("trailing_slash", b"/target/"),
        ("inner_double_slash", b"/target//x"),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let c = compare_with_kernel(
        |l| {
            redirect_targets(l);
            for (name, value) in cases {
                dir_over_dir(l, name, REDIRECT, value);
            }
        },
        &names,
        "",
    );
    for (name, value) in cases {
        assert!(c.get(name).0.starts_with("Err("), "{}", c.table());
        c.assert_eio_logged(name, value);
    }
}

#[test]
fn redirect_to_a_name_longer_than_name_max_leads_nowhere_like_the_kernel() {
    let long_relative = vec![b'a'; 300];
    let long_absolute = [&b"/"[..], &[b'a'; 300][..]].concat();
    let c = compare_with_kernel(
        |l| {
            dir_over_dir(l, "long_relative", REDIRECT, &long_relative);
            dir_over_dir(l, "long_absolute", REDIRECT, &long_absolute);
        },
        &["long_relative", "long_absolute"],
        "",
    );
    c.assert_same_or_eio_logged("long_relative", &long_relative);
    c.assert_same_or_eio_logged("long_absolute", &long_absolute);
}

#[test]
fn malformed_redirect_on_the_lowest_layer_is_ignored_like_the_kernel() {
    let c = compare_with_kernel(
        |l| {
            l.lower(1)
                .write_file("bottom/f", b"f", 0o644)
                .setxattr("bottom", REDIRECT, b"");
            l.lower(1)
                .mkdir("bottom_nul", 0o755)
                .setxattr("bottom_nul", REDIRECT, b"a/b");
        },
        &["bottom", "bottom_nul"],
        "",
    );
    c.assert_same("bottom");
    c.assert_same("bottom_nul");
}

#[test]
fn opaque_values_other_than_y_leave_the_directory_transparent_like_the_kernel() {
    let big = vec![b'y'; 3000];
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("y", b"y".to_vec()),
        ("yes", b"yes".to_vec()),
        ("capital_y", b"Y".to_vec()),
        ("empty", b"".to_vec()),
        ("x", b"x".to_vec()),
        ("y_nul", b"y\0".to_vec()),
        ("nul", b"\0".to_vec()),
        ("n", b"n".to_vec()),
        ("big", big),
    ];
    let names: Vec<&str> = cases.iter().map(|(n, _)| *n).collect();
    let c = compare_with_kernel(
        |l| {
            for (name, value) in &cases {
                dir_over_dir(l, name, OPAQUE, value);
            }
        },
        &names,
        "",
    );
    for name in &names {
        c.assert_same(name);
    }
    // Teeth: "y" hides the lower entry, "yes" does not.
    assert!(!c.get("y").1.contains("below"), "{}", c.table());
    assert!(c.get("yes").1.contains("below"), "{}", c.table());
}

#[test]
fn overlay_markers_on_non_directories_are_ignored_like_the_kernel() {
    let c = compare_with_kernel(
        |l| {
            let top = l.lower(0);
            top.write_file("f_opaque", b"f", 0o644)
                .setxattr("f_opaque", OPAQUE, b"y")
                .write_file("f_redirect", b"f", 0o644)
                .setxattr("f_redirect", REDIRECT, b"/target")
                .write_file("f_bad_redirect", b"f", 0o644)
                .setxattr("f_bad_redirect", REDIRECT, b"//a/../")
                .write_file("f_origin", b"f", 0o644)
                .setxattr("f_origin", "trusted.overlay.origin", b"garbage")
                .write_file("f_impure", b"f", 0o644)
                .setxattr("f_impure", "trusted.overlay.impure", b"?")
                .symlink("l_opaque", "nowhere")
                .setxattr("l_opaque", OPAQUE, b"y")
                .mkfifo("p_redirect", 0o644)
                .setxattr("p_redirect", REDIRECT, b"");
            redirect_targets(l);
            l.lower(1)
                .write_file("f_opaque", b"lower", 0o644)
                .write_file("f_redirect", b"lower", 0o644)
                .write_file("f_bad_redirect", b"lower", 0o644);
            // A directory with "impure"/"origin" markers of garbage.
            dir_over_dir(l, "d_origin", "trusted.overlay.origin", b"\x00\xff garbage");
            l.lower(0)
                .setxattr("d_origin", "trusted.overlay.impure", b"maybe");
        },
        &[
            "f_opaque",
            "f_redirect",
            "f_bad_redirect",
            "f_origin",
            "f_impure",
            "l_opaque",
            "p_redirect",
            "d_origin",
        ],
        "",
    );
    for name in &c.names {
        c.assert_same(name);
    }
}

#[test]
fn devices_numbered_or_typed_unlike_a_whiteout_are_ordinary_entries_like_the_kernel() {
    let c = compare_with_kernel(
        |l| {
            let top = l.lower(0);
            top.mknod_char("chr_1_3", 0o644, 1, 3)
                .mknod_char("chr_0_1", 0o644, 0, 1)
                .mknod_char("chr_1_0", 0o644, 1, 0)
                .mknod_block("blk_0_0", 0o644, 0, 0)
                .mkfifo("fifo", 0o644)
                .whiteout("real_whiteout")
                .whiteout("whiteout_over_dir");
            // A 0/0 device with odd permission bits is still a whiteout.
            top.mknod_char("whiteout_0600", 0o600, 0, 0);
            for n in [
                "chr_1_3",
                "chr_0_1",
                "chr_1_0",
                "blk_0_0",
                "fifo",
                "real_whiteout",
                "whiteout_0600",
            ] {
                l.lower(1).write_file(n, b"lower", 0o644);
            }
            l.lower(1).write_file("whiteout_over_dir/x", b"x", 0o644);
        },
        &[
            "chr_1_3",
            "chr_0_1",
            "chr_1_0",
            "blk_0_0",
            "fifo",
            "real_whiteout",
            "whiteout_0600",
            "whiteout_over_dir",
        ],
        "",
    );
    for name in &c.names {
        c.assert_same(name);
    }
    assert_eq!(c.roots.0, c.roots.1, "{}", c.table());
    // Teeth: the whiteout really hides, the 1/3 device really shows.
    assert_eq!(c.get("real_whiteout").1, "Err(ENOENT)");
    assert!(c.get("chr_1_3").1.starts_with("Char"), "{}", c.table());
}

/// The kernel does not know AUFS markers (it shows them as plain entries), so there is no
/// oracle here: ovlfuse's rule is that any entry named `.wh.NAME`, whatever its type, hides
/// NAME below and is never shown, and any `.wh..wh..opq` makes its directory opaque.
#[test]
fn aufs_markers_of_any_file_type_hide_their_targets_and_never_show() {
    let s = Scratch::new();
    let layers = s.layers(2, true);
    let top = layers.lower(0);
    let below = layers.lower(1);
    top.mkdir(".wh.by_dir", 0o755)
        .write_file(".wh.by_dir/inside", b"i", 0o644)
        .mknod_char(".wh.by_chr", 0o644, 1, 3)
        .mknod_char(".wh.by_whiteout", 0o644, 0, 0)
        .symlink(".wh.by_symlink", "/nowhere")
        .mkfifo(".wh.by_fifo", 0o644)
        .write_file(".wh.", b"", 0o644)
        .write_file(".wh..wh.", b"", 0o644)
        .write_file(".wh..wh.plnk", b"", 0o644)
        .mkdir("opq_dir/.wh..wh..opq", 0o755)
        .symlink("opq_symlink/.wh..wh..opq", "/nowhere")
        .mknod_char("opq_chr/.wh..wh..opq", 0o644, 1, 3);
    for n in ["by_dir", "by_chr", "by_whiteout", "by_symlink", "by_fifo"] {
        below.write_file(n, b"lower", 0o644);
    }
    for d in ["opq_dir", "opq_symlink", "opq_chr"] {
        below.write_file(&format!("{d}/below"), b"b", 0o644);
        top.write_file(&format!("{d}/top"), b"t", 0o644);
    }
    let f = mount_ovlfuse_logged(&layers, "");
    let root = f.p("");
    let (names, opq, hidden, create) = with_timeout(T, move || {
        let names = list_names(&root).unwrap();
        let opq: Vec<_> = ["opq_dir", "opq_symlink", "opq_chr"]
            .iter()
            .map(|d| list_names(&root.join(d)).unwrap())
            .collect();
        let hidden: Vec<_> = [
            "by_dir",
            "by_chr",
            "by_whiteout",
            "by_symlink",
            "by_fifo",
            ".wh.by_dir",
            ".wh.",
            ".wh..wh.plnk",
        ]
        .iter()
        .map(|n| outcome(&root, n))
        .collect();
        // Making a marker through the union is refused, never a panic.
        let create = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(root.join(".wh.new"))
            .map(|_| ());
        let create = fmt_res(&create, |_| String::new());
        (names, opq, hidden, create)
    });
    assert_eq!(names, vec!["opq_chr", "opq_dir", "opq_symlink"]);
    for listing in opq {
        assert_eq!(listing, vec!["top"]);
    }
    for h in hidden {
        assert_eq!(h, "Err(ENOENT)");
    }
    assert!(create.starts_with("Err("), "created a .wh. name: {create}");
    assert!(f.daemon_alive(), "{}", f.log_text());
}

#[test]
fn private_and_escaped_xattr_names_in_layers_read_like_the_kernel() {
    let names = [
        "trusted.overlay.overlay.x",
        "trusted.overlay.overlay.overlay.y",
        "trusted.overlay.overlay.",
        "trusted.overlay.",
        "trusted.overlay.opaque",
        "trusted.overlay.origin",
        "user.overlay.opaque",
        "user.overlay.overlay.z",
        "user.overlay.redirect",
        "user.plain",
        "trusted.other",
    ];
    let build = |l: &Layers| {
        l.lower(0).write_file("f", b"f", 0o644);
        l.lower(0).mkdir("d", 0o755);
        for (i, n) in names.iter().enumerate() {
            l.lower(0).setxattr("f", n, format!("v{i}").as_bytes());
        }
        for n in [
            "trusted.overlay.overlay.x",
            "user.overlay.overlay.z",
            "user.plain",
        ] {
            l.lower(0).setxattr("d", n, b"dir");
        }
    };
    for opts in ["", "userxattr"] {
        let c = compare_with_kernel(build, &["f", "d"], opts);
        c.assert_same("f");
        c.assert_same("d");
        // Teeth: the escaped name is listed unescaped, the private ones not at all.
        let (_, f) = c.get("f");
        if opts.is_empty() {
            assert!(f.contains("\"trusted.overlay.x="), "{}", c.table());
            assert!(!f.contains("trusted.overlay.opaque"), "{}", c.table());
        } else {
            assert!(f.contains("\"user.overlay.z="), "{}", c.table());
            assert!(!f.contains("user.overlay.opaque"), "{}", c.table());
        }
    }
}

/// Results of set/get/remove of `name` on `p`.
fn xattr_ops(p: &Path, name: &str) -> String {
    let set = fmt_res(&set_xattr(p, name, b"v"), |_| String::new());
    let get = fmt_res(&get_xattr(p, name), |v| format!("{v:?}"));
    let remove = fmt_res(&remove_xattr(p, name), |_| String::new());
    format!("set {set} get {get} remove {remove}")
}

#[test]
fn private_names_too_long_once_escaped_give_eopnotsupp_like_the_kernel() {
    let s = Scratch::new();
    let layers = s.layers(1, true);
    layers.lower(0).write_file("f", b"f", 0o644);
    let copy = copy_layers(&layers, &s.path().join("kernel-copy"));
    let k = mount_kernel_overlay(&copy);
    let f = mount_ovlfuse_logged(&layers, "");
    let (kroot, froot) = (k.path().to_path_buf(), f.p(""));
    let results = with_timeout(T, move || {
        [225usize, 231, 232, 239]
            .iter()
            .map(|&n| {
                let name = format!("trusted.overlay.{}", "a".repeat(n));
                (
                    n,
                    xattr_ops(&kroot.join("f"), &name),
                    xattr_ops(&froot.join("f"), &name),
                )
            })
            .collect::<Vec<_>>()
    });
    for (n, kernel, ovlfuse) in &results {
        assert_eq!(ovlfuse, kernel, "trusted.overlay. + {n} bytes");
    }
    // Teeth: the limit is where the kernel has it.
    assert!(results[1].2.starts_with("set Ok"), "{results:?}");
    assert!(results[2].2.contains("EOPNOTSUPP"), "{results:?}");
    assert!(f.daemon_alive());
}

#[test]
fn xattrs_of_64_kib_read_and_copy_up_like_the_kernel() {
    let s = Scratch::new();
    // tmpfs keeps 64 KiB values (ext4 without ea_inode does not).
    let fs_f = TinyTmpfs::new(s.path().join("fs-ovlfuse"), 16 << 20, 0);
    let fs_k = TinyTmpfs::new(s.path().join("fs-kernel"), 16 << 20, 0);
    let big = noise(64 << 10, 7);
    let make = |t: &TinyTmpfs| -> Layers {
        let l0 = t.p("l0");
        let l1 = t.p("l1");
        let layers = layers_on(t, vec![l0.clone(), l1.clone()]);
        let (top, below) = (Layer(l0), Layer(l1));
        top.write_file("f", b"f", 0o644)
            .setxattr("f", "user.big", &big)
            .setxattr("f", "trusted.big", &big)
            .setxattr("f", "trusted.overlay.overlay.big", &big);
        top.mkdir("opaque_big", 0o755)
            .setxattr("opaque_big", OPAQUE, &big);
        below.write_file("opaque_big/below", b"b", 0o644);
        let redirect: Vec<u8> = [&b"/"[..], &vec![&[b'r'; 250][..]; 300].join(&b"/"[..])].concat();
        top.mkdir("redirect_big", 0o755)
            .setxattr("redirect_big", REDIRECT, &redirect[..65_000]);
        below.write_file("redirect_big/below", b"b", 0o644);
        layers
    };
    let (lf, lk) = (make(&fs_f), make(&fs_k));
    let k = mount_kernel_overlay(&lk);
    let f = mount_ovlfuse_logged(&lf, "");
    let (kroot, froot) = (k.path().to_path_buf(), f.p(""));
    let (before, after) = with_timeout(T, move || {
        let probe = |r: &Path| {
            ["f", "opaque_big", "redirect_big"]
                .iter()
                .map(|n| outcome(r, n))
                .collect::<Vec<_>>()
        };
        let before = (probe(&kroot), probe(&froot));
        // A copy-up carries the 64 KiB values to the upper layer.
        let chmod = |r: &Path| {
            fmt_res(
                &fs::set_permissions(r.join("f"), fs::Permissions::from_mode(0o600)),
                |_| String::new(),
            )
        };
        let set = |r: &Path| {
            fmt_res(
                &set_xattr(&r.join("f"), "user.another", &vec![1u8; 65536]),
                |_| String::new(),
            )
        };
        let after = (
            (chmod(&kroot), set(&kroot), probe(&kroot)),
            (chmod(&froot), set(&froot), probe(&froot)),
        );
        (before, after)
    });
    assert_eq!(before.1, before.0, "before copy-up");
    assert_eq!(after.1, after.0, "after copy-up");
    assert!(before.1[0].contains("user.big=len=65536"), "{before:?}");
    let upper_value = get_xattr(&fs_f.p("upper/f"), "user.big").unwrap();
    assert_eq!(upper_value, big, "the copied-up value");
    assert!(f.daemon_alive(), "{}", f.log_text());
}

/// A metacopy file below still counts as a name when one above it is removed: the kernel
/// leaves a whiteout (the name must not come back as the refused metacopy file), and so
/// must ovlfuse — whose own lookup refuses such a file.
#[test]
fn removing_a_name_over_a_lower_metacopy_file_leaves_a_whiteout_like_the_kernel() {
    let s = Scratch::new();
    let l = s.layers(1, true);
    l.lower(0)
        .sparse_file("f", 5, &[], 0o644)
        .setxattr("f", "trusted.overlay.metacopy", b"");
    l.up().write_file("f", b"upper", 0o644);
    let kl = copy_layers(&l, &s.mkdir("kernel"));
    let remove = |root: PathBuf| {
        with_timeout(30, move || {
            let removed = fs::remove_file(root.join("f")).map_err(|e| errno_of(&e));
            let after = fs::symlink_metadata(root.join("f")).map_err(|e| errno_of(&e));
            (removed, after.map(|_| ()))
        })
    };
    let k = mount_kernel_overlay(&kl);
    let kernel = remove(k.path().to_path_buf());
    drop(k);
    let m = mount_ovlfuse(&l, "");
    let ours = remove(m.path().to_path_buf());
    drop(m);
    assert_eq!(ours, kernel, "(rm f, then lstat f): ovlfuse vs kernel");
    assert_eq!(kernel, (Ok(()), Err(libc::ENOENT)));
    for upper in [&kl.upper, &l.upper] {
        let upper = upper.as_ref().expect("an upper layer");
        let st = fs::symlink_metadata(upper.join("f")).expect("a whiteout at f");
        assert!(
            st.file_type().is_char_device() && st.rdev() == 0,
            "{}: not a whiteout",
            upper.display()
        );
    }
}

#[test]
fn metacopy_files_are_refused_like_the_kernel() {
    // struct ovl_metacopy: version 0, length 36, a flag, digest algorithm 1, 32 digest bytes.
    let with_digest: Vec<u8> = [&[0u8, 36, 1, 1][..], &[0xab; 32]].concat();
    for (opts, prefix) in [("", "trusted.overlay."), ("userxattr", "user.overlay.")] {
        let m = format!("{prefix}metacopy");
        let m = m.as_str();
        let other_namespace = if prefix.starts_with("user.") {
            "trusted.overlay.metacopy"
        } else {
            "user.overlay.metacopy"
        };
        let c = compare_with_kernel(
            |l| {
                // A metadata-only copy over its data, and copies with nothing below.
                l.lower(0)
                    .sparse_file("meta", 5, &[], 0o644)
                    .setxattr("meta", m, b"");
                l.lower(1).write_file("meta", b"data!", 0o644);
                l.lower(0)
                    .write_file("meta_garbage", b"stub", 0o644)
                    .setxattr("meta_garbage", m, b"garbage")
                    .write_file("meta_digest", b"stub", 0o644)
                    .setxattr("meta_digest", m, &with_digest);
                // Too short for the header: EIO on the kernel.
                l.lower(0)
                    .write_file("meta_short", b"stub", 0o644)
                    .setxattr("meta_short", m, b"ab");
                l.lower(1).write_file("meta_short", b"below", 0o644);
                // The bottom and the upper layer are no exception.
                l.lower(1)
                    .write_file("meta_bottom", b"stub", 0o644)
                    .setxattr("meta_bottom", m, b"");
                l.up()
                    .write_file("meta_upper", b"stub", 0o644)
                    .setxattr("meta_upper", m, b"");
                l.lower(0).write_file("meta_upper", b"below", 0o644);
                // In a directory only one layer has.
                l.lower(0)
                    .write_file("only/meta", b"stub", 0o644)
                    .setxattr("only/meta", m, b"");
                // Only the object the name stands for is read: a copy hidden below an
                // ordinary file or a directory changes nothing.
                l.lower(0).write_file("meta_below", b"top", 0o644);
                l.lower(1)
                    .write_file("meta_below", b"stub", 0o644)
                    .setxattr("meta_below", m, b"ab");
                l.lower(0).mkdir("meta_under_dir", 0o755);
                l.lower(1)
                    .write_file("meta_under_dir", b"stub", 0o644)
                    .setxattr("meta_under_dir", m, b"");
                // On a directory, or under the other namespace's name, it means nothing.
                dir_over_dir(l, "meta_dir", m, b"");
                l.lower(0)
                    .write_file("meta_other_namespace", b"stub", 0o644)
                    .setxattr("meta_other_namespace", other_namespace, b"");
            },
            &[
                "meta",
                "meta_garbage",
                "meta_digest",
                "meta_short",
                "meta_bottom",
                "meta_upper",
                "only/meta",
                "meta_below",
                "meta_under_dir",
                "meta_dir",
                "meta_other_namespace",
            ],
            opts,
        );
        for name in &c.names {
            c.assert_same(name);
        }
        // Teeth: refused where the kernel refuses, with the log naming the file, or the
        // malformed value; read through where it is not the visible object.
        for refused in [
            "meta",
            "meta_garbage",
            "meta_bottom",
            "meta_upper",
            "only/meta",
        ] {
            assert_eq!(c.get(refused).1, "Err(EPERM)", "{opts}\n{}", c.table());
        }
        assert_eq!(c.get("meta_short").1, "Err(EIO)", "{opts}\n{}", c.table());
        assert!(
            c.log
                .contains("refusing to follow metacopy origin for \"meta\""),
            "{opts}\n{}",
            c.table()
        );
        assert!(logged(&c.log, b"ab"), "{opts}\n{}", c.table());
        assert!(c.get("meta_below").1.starts_with("File"), "{}", c.table());
        assert!(c.get("meta_dir").1.contains("below"), "{}", c.table());
    }
}

#[test]
fn xattr_whiteouts_hide_lower_entries_like_the_kernel() {
    for (opts, prefix) in [("", "trusted.overlay."), ("userxattr", "user.overlay.")] {
        let (w, opaque) = (format!("{prefix}whiteout"), format!("{prefix}opaque"));
        let (w, opaque) = (w.as_str(), opaque.as_str());
        let c = compare_with_kernel(
            |l| {
                // A lower directory marked "x": its empty regular files carrying the
                // attribute (any value) are whiteouts, in lookups and in the listing.
                l.lower(0)
                    .write_file("xd/gone", b"", 0o644)
                    .setxattr("xd/gone", w, b"y")
                    .write_file("xd/plain", b"", 0o644)
                    .write_file("xd/empty_value", b"", 0o644)
                    .setxattr("xd/empty_value", w, b"")
                    .write_file("xd/not_empty", b"data", 0o644)
                    .setxattr("xd/not_empty", w, b"y")
                    .write_file("xd/over_dir", b"", 0o644)
                    .setxattr("xd/over_dir", w, b"y")
                    .setxattr("xd", opaque, b"x");
                l.lower(1)
                    .write_file("xd/gone", b"below", 0o644)
                    .write_file("xd/other", b"o", 0o644)
                    .write_file("xd/empty_value", b"below", 0o644)
                    .write_file("xd/not_empty", b"below", 0o644)
                    .write_file("xd/over_dir/inside", b"i", 0o644);
                // An upper file of the same name is not hidden by it.
                l.up().write_file("xu/kept", b"upper", 0o644);
                l.lower(0)
                    .write_file("xu/kept", b"", 0o644)
                    .setxattr("xu/kept", w, b"y")
                    .setxattr("xu", opaque, b"x");
                l.lower(1).write_file("xu/kept", b"below", 0o644);
                // Unmarked ("xx" is no mark either): lookups still take it for a whiteout,
                // listings show the name (the kernel reads entries' xattrs in marked
                // directories only).
                for d in ["ud", "xxd"] {
                    l.lower(0)
                        .write_file(&format!("{d}/gone"), b"", 0o644)
                        .setxattr(&format!("{d}/gone"), w, b"y");
                    l.lower(1)
                        .write_file(&format!("{d}/gone"), b"below", 0o644)
                        .write_file(&format!("{d}/other"), b"o", 0o644);
                }
                l.lower(0).setxattr("xxd", opaque, b"xx");
                // Marked in the upper or in the bottom layer, where the kernel does not look
                // for the mark: the same.
                l.up()
                    .write_file("upd/gone", b"", 0o644)
                    .setxattr("upd/gone", w, b"y")
                    .setxattr("upd", opaque, b"x");
                l.lower(0).write_file("upd/gone", b"below", 0o644);
                l.lower(1)
                    .write_file("bd/gone", b"", 0o644)
                    .setxattr("bd/gone", w, b"y")
                    .setxattr("bd", opaque, b"x");
                l.lower(0).write_file("bd/top", b"t", 0o644);
            },
            &[
                "xd",
                "xd/gone",
                "xd/plain",
                "xd/empty_value",
                "xd/not_empty",
                "xd/over_dir",
                "xd/other",
                "xu",
                "xu/kept",
                "ud",
                "ud/gone",
                "xxd",
                "xxd/gone",
                "upd",
                "upd/gone",
                "bd",
                "bd/gone",
            ],
            opts,
        );
        for name in &c.names {
            c.assert_same(name);
        }
        assert_eq!(c.roots.0, c.roots.1, "{opts}\n{}", c.table());
        // Teeth: hidden in the marked directory, shown in the unmarked one, data intact.
        let (_, xd) = c.get("xd");
        assert!(
            xd.contains("[\"not_empty\", \"other\", \"plain\"]"),
            "{opts}\n{}",
            c.table()
        );
        assert_eq!(c.get("xd/gone").1, "Err(ENOENT)", "{opts}\n{}", c.table());
        assert!(c.get("ud").1.contains("\"gone\""), "{opts}\n{}", c.table());
        assert_eq!(c.get("ud/gone").1, "Err(ENOENT)", "{opts}\n{}", c.table());
        assert!(
            c.get("xu/kept").1.starts_with("File 644 len=5 "),
            "{opts}\n{}",
            c.table()
        );
    }
}

/// A random redirect value: mostly the bytes that matter, sometimes anything.
fn random_redirect() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![
        6 => prop::sample::select(b"/./atrge".to_vec()),
        1 => Just(0u8),
        1 => 1u8..=255,
    ];
    prop::collection::vec(byte, 0..24)
}

fn random_opaque() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop_oneof![4 => prop::sample::select(b"yYx\0".to_vec()), 1 => any::<u8>()],
        0..4,
    )
}

/// Random redirect and opaque values planted on many directories at once: every entry
/// reads as the kernel reads it, or gives EIO with a log line; the daemon survives.
#[test]
fn random_redirect_and_opaque_values_never_bring_the_daemon_down() {
    let rounds = env_count("OVLFUSE_BAD_XATTR_ROUNDS", 2, 30);
    let per_round = 24;
    let mut runner = TestRunner::new(Config {
        cases: rounds,
        failure_persistence: None,
        ..Config::default()
    });
    let strategy = (
        prop::collection::vec(random_redirect(), per_round),
        prop::collection::vec(random_opaque(), per_round),
    );
    let result = runner.run(&strategy, |(redirects, opaques)| {
        let names: Vec<String> = (0..per_round)
            .flat_map(|i| [format!("r{i}"), format!("o{i}")])
            .chain(["target".to_string()])
            .collect();
        let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let (r2, o2) = (redirects.clone(), opaques.clone());
        let c = compare_with_kernel(
            move |l| {
                redirect_targets(l);
                for (i, v) in r2.iter().enumerate() {
                    dir_over_dir(l, &format!("r{i}"), REDIRECT, v);
                }
                for (i, v) in o2.iter().enumerate() {
                    dir_over_dir(l, &format!("o{i}"), OPAQUE, v);
                }
            },
            &name_refs,
            "",
        );
        for (i, v) in redirects.iter().enumerate() {
            let name = format!("r{i}");
            let (k, f) = c.get(&name);
            prop_assert!(
                f == k || (f == "Err(EIO)" && logged(&c.log, v)),
                "redirect {:?}: kernel {} ovlfuse {}\n{}",
                String::from_utf8_lossy(v),
                k,
                f,
                c.log
            );
        }
        for (i, v) in opaques.iter().enumerate() {
            let name = format!("o{i}");
            let (k, f) = c.get(&name);
            prop_assert_eq!(f, k, "opaque {:?}", v);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

// ---------------------------------------------------------------------------
// a full upper filesystem
// ---------------------------------------------------------------------------

/// Names in `workdir/work` (where copy-up stages objects): must be empty after any failure.
fn work_leftovers(work: &Path) -> Vec<String> {
    list_names(&work.join("work")).unwrap_or_else(|e| vec![format!("cannot list: {e}")])
}

#[test]
fn the_leftover_check_has_teeth() {
    let s = Scratch::new();
    let w = s.mkdir("w");
    fs::create_dir(w.join("work")).unwrap();
    assert!(work_leftovers(&w).is_empty());
    fs::write(w.join("work/#ovlfuse-cu-1"), b"half").unwrap();
    assert_eq!(work_leftovers(&w), vec!["#ovlfuse-cu-1"]);
}

/// Writes 64 KiB pieces of noise to a new file until a write fails; returns the bytes
/// acknowledged, the failing write's result, then fsync's.
fn fill(path: &Path) -> (usize, String, String) {
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => return (0, format!("create {}", errno_str(&e)), String::new()),
    };
    let data = noise(8 << 20, 3);
    let mut done = 0;
    let failed = loop {
        let end = (done + (64 << 10)).min(data.len());
        match f.write(&data[done..end]) {
            Ok(0) => break "Ok(0)".to_string(),
            Ok(n) => done += n,
            Err(e) => break errno_str(&e),
        }
        if done == data.len() {
            break "no error".to_string();
        }
    };
    let fsync = fmt_res(&f.sync_all(), |_| String::new());
    (done, failed, fsync)
}

/// The union holds exactly the first `len` bytes of the fill pattern in `rel`.
fn holds_prefix(root: &Path, rel: &str, len: usize) -> bool {
    fs::read(root.join(rel)).is_ok_and(|b| b == noise(8 << 20, 3)[..len])
}

#[test]
fn writing_into_a_full_upper_gives_enospc_and_keeps_every_acknowledged_byte() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    let tf = TinyTmpfs::new(s.path().join("tiny-ovlfuse"), 2 << 20, 0);
    let tk = TinyTmpfs::new(s.path().join("tiny-kernel"), 2 << 20, 0);
    let k = mount_kernel_overlay(&layers_on(&tk, vec![lower.clone()]));
    let f = mount_ovlfuse_logged(&layers_on(&tf, vec![lower]), "");
    let (kroot, froot) = (k.path().to_path_buf(), f.p(""));
    let (kfill, ffill, kfull, ffull, again) = with_timeout(T, move || {
        let kfill = fill(&kroot.join("filler"));
        let ffill = fill(&froot.join("filler"));
        let kfull = holds_prefix(&kroot, "filler", kfill.0);
        let ffull = holds_prefix(&froot, "filler", ffill.0);
        // Free the space: writing works again.
        fs::remove_file(froot.join("filler")).unwrap();
        let again = fs::write(froot.join("after"), noise(1 << 20, 5))
            .and_then(|_| fs::read(froot.join("after")))
            .map(|b| b == noise(1 << 20, 5));
        (
            kfill,
            ffill,
            kfull,
            ffull,
            fmt_res(&again, |b| b.to_string()),
        )
    });
    assert_eq!(kfill.1, "Err(ENOSPC)", "kernel: {kfill:?}");
    assert_eq!(
        (&ffill.1, &ffill.2),
        (&kfill.1, &kfill.2),
        "write/fsync results: ovlfuse {ffill:?}, kernel {kfill:?}"
    );
    assert!(ffill.0 > (1 << 20), "ovlfuse filled only {} bytes", ffill.0);
    assert!(kfull, "the kernel overlay lost acknowledged bytes");
    assert!(
        ffull,
        "ovlfuse does not hold exactly the {} acknowledged bytes",
        ffill.0
    );
    assert_eq!(again, "Ok(true)", "writing after freeing space");
    assert!(f.daemon_alive(), "{}", f.log_text());
    assert!(work_leftovers(&tf.p("work")).is_empty());
}

/// Result of each operation that needs a copy-up of `big`, with the union and upper state
/// after it.
fn copy_up_ops(root: &Path) -> Vec<(String, String)> {
    let p = |n: &str| root.join(n);
    let open_append = OpenOptions::new().append(true).open(p("big")).map(|_| ());
    let ops: Vec<(&str, io::Result<()>)> = vec![
        ("open(O_APPEND)", open_append),
        (
            "chmod",
            fs::set_permissions(p("big"), fs::Permissions::from_mode(0o600)),
        ),
        ("setxattr", set_xattr(&p("big"), "user.x", b"v")),
        ("chown", lchown(&p("big"), 1, 1)),
        ("truncate(+1)", {
            let len = fs::metadata(p("big")).map(|m| m.len()).unwrap_or(0);
            OpenOptions::new()
                .write(true)
                .open(p("big"))
                .and_then(|f| f.set_len(len + 1))
        }),
        ("rename", fs::rename(p("big"), p("big2"))),
        ("link", fs::hard_link(p("big"), p("big_link"))),
    ];
    ops.into_iter()
        .map(|(what, r)| (what.to_string(), fmt_res(&r, |_| String::new())))
        .collect()
}

#[test]
fn copy_up_into_a_full_upper_fails_with_enospc_and_leaves_the_lower_file() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    let big = noise(3 << 20, 11);
    Layer(lower.clone()).write_file("big", &big, 0o644);
    let tf = TinyTmpfs::new(s.path().join("tiny-ovlfuse"), 2 << 20, 0);
    let tk = TinyTmpfs::new(s.path().join("tiny-kernel"), 2 << 20, 0);
    let lf = layers_on(&tf, vec![lower.clone()]);
    let k = mount_kernel_overlay(&layers_on(&tk, vec![lower.clone()]));
    let mut f = mount_ovlfuse_logged(&lf, "");
    let (kroot, froot) = (k.path().to_path_buf(), f.p(""));
    let (kops, fops, fbig) = with_timeout(T, move || {
        let kops = copy_up_ops(&kroot);
        let fops = copy_up_ops(&froot);
        let fbig = fs::read(froot.join("big")).map(|b| hash_bytes(&b));
        (kops, fops, fmt_res(&fbig, |h| format!("{h:x}")))
    });
    assert_eq!(fops, kops, "ovlfuse against the kernel overlay");
    assert!(
        kops.iter().all(|(_, r)| r == "Err(ENOSPC)"),
        "the kernel overlay did not fail every copy-up: {kops:?}"
    );
    assert_eq!(
        fbig,
        format!("Ok({:x})", hash_bytes(&big)),
        "the lower file"
    );
    assert_eq!(
        list_names(&tf.p("upper")).unwrap(),
        Vec::<String>::new(),
        "upper"
    );
    assert_eq!(work_leftovers(&tf.p("work")), Vec::<String>::new());
    assert!(f.daemon_alive(), "{}", f.log_text());

    // The next mount finds everything as it was; with room again, the copy-up works.
    f.m.unmount();
    drop(f);
    let r = run_argv(
        &[
            OsStr::new("mount"),
            OsStr::new("-o"),
            OsStr::new("remount,size=16m"),
            tf.dir.as_os_str(),
        ],
        Duration::from_secs(10),
    );
    assert!(r.ok(), "grow the tmpfs: {}", r.stderr);
    let f = mount_ovlfuse_logged(&lf, "");
    let froot = f.p("");
    let (appended, content) = with_timeout(T, move || {
        let appended = OpenOptions::new()
            .append(true)
            .open(froot.join("big"))
            .and_then(|mut h| h.write_all(b"!"));
        (
            fmt_res(&appended, |_| String::new()),
            fs::read(froot.join("big")).unwrap(),
        )
    });
    assert_eq!(appended, "Ok()");
    assert_eq!(content, [&big[..], b"!"].concat());
    assert_eq!(
        fs::read(lower.join("big")).unwrap(),
        big,
        "the lower layer changed"
    );
    assert_eq!(work_leftovers(&tf.p("work")), Vec::<String>::new());
}

/// Each namespace operation on a union whose upper has no free inode left: result, and
/// whether the union's tree changed.
fn namespace_ops(root: &Path) -> Vec<(String, String, bool)> {
    let p = |n: &str| root.join(n);
    type Op<'a> = (&'a str, Box<dyn Fn() -> io::Result<()> + 'a>);
    let ops: Vec<Op> = vec![
        (
            "create",
            Box::new(|| {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(p("new_file"))
                    .map(|_| ())
            }),
        ),
        ("mkdir", Box::new(|| fs::create_dir(p("new_dir")))),
        (
            "symlink",
            Box::new(|| std::os::unix::fs::symlink("t", p("new_link"))),
        ),
        ("mkfifo", Box::new(|| mkfifo(&p("new_fifo"), 0o644))),
        (
            "rename lower file",
            Box::new(|| fs::rename(p("lower_file"), p("renamed"))),
        ),
        (
            "rename lower dir",
            Box::new(|| fs::rename(p("lower_dir"), p("renamed_dir"))),
        ),
        (
            "unlink in lower dir",
            Box::new(|| fs::remove_file(p("lower_dir/x"))),
        ),
        (
            "create in lower dir",
            Box::new(|| fs::write(p("lower_dir/y"), b"y")),
        ),
        (
            "rename upper file",
            Box::new(|| fs::rename(p("fill0"), p("fill0b"))),
        ),
        (
            "link upper file",
            Box::new(|| fs::hard_link(p("fill1"), p("fill1_link"))),
        ),
    ];
    ops.into_iter()
        .map(|(what, op)| {
            let before = snapshot(root);
            let r = fmt_res(&op(), |_| String::new());
            let changed = snapshot(root) != before;
            (what.to_string(), r, changed)
        })
        .collect()
}

/// Creates files `fill0..` until the upper runs out of inodes; returns how many, and the
/// error that stopped it.
fn use_up_inodes(root: &Path) -> (usize, String) {
    for i in 0..10_000 {
        if let Err(e) = fs::write(root.join(format!("fill{i}")), b"") {
            return (i, errno_str(&e));
        }
    }
    (10_000, "no error".into())
}

#[test]
fn namespace_changes_without_free_inodes_fail_with_enospc_and_change_nothing() {
    let s = Scratch::new();
    let lower = s.mkdir("lower");
    Layer(lower.clone())
        .write_file("lower_file", b"lf", 0o644)
        .write_file("lower_dir/x", b"x", 0o644);
    let tf = TinyTmpfs::new(s.path().join("tiny-ovlfuse"), 8 << 20, 48);
    let tk = TinyTmpfs::new(s.path().join("tiny-kernel"), 8 << 20, 48);
    let k = mount_kernel_overlay(&layers_on(&tk, vec![lower.clone()]));
    let f = mount_ovlfuse_logged(&layers_on(&tf, vec![lower]), "");
    let (kroot, froot) = (k.path().to_path_buf(), f.p(""));
    let upper_fs = tf.p("");
    let (kfill, ffill, kops, fops, freed) = with_timeout(T, move || {
        let kfill = use_up_inodes(&kroot);
        let ffill = use_up_inodes(&froot);
        let kops = namespace_ops(&kroot);
        let fops = namespace_ops(&froot);
        // Free the inodes: everything works again.
        for i in 2..ffill.0 {
            fs::remove_file(froot.join(format!("fill{i}"))).unwrap();
        }
        // A removed file's inode is released when the kernel forgets it (the daemon holds
        // the object until then), which comes a moment later on a busy machine: wait for
        // the four inodes the changes below take (a file, a directory, a copy-up and its
        // whiteout), but not forever.
        let deadline = Instant::now() + Duration::from_secs(10);
        while free_inodes_at(&upper_fs) < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let freed = [
            fmt_res(&fs::write(froot.join("after"), b"a"), |_| String::new()),
            fmt_res(&fs::create_dir(froot.join("after_dir")), |_| String::new()),
            fmt_res(
                &fs::rename(froot.join("lower_file"), froot.join("moved")),
                |_| String::new(),
            ),
        ];
        (kfill, ffill, kops, fops, freed)
    });
    assert_eq!(kfill.1, "Err(ENOSPC)");
    assert_eq!(ffill.1, "Err(ENOSPC)");
    assert!(ffill.0 >= 2 && kfill.0 >= 2, "{ffill:?} {kfill:?}");
    let table: String = kops
        .iter()
        .zip(&fops)
        .map(|(k, f)| format!("  {:<22} kernel {:<14} ovlfuse {}\n", k.0, k.1, f.1))
        .collect();
    for ((what, kr, kchanged), (_, fr, fchanged)) in kops.iter().zip(&fops) {
        assert_eq!(
            fr, kr,
            "{what}: ovlfuse against the kernel overlay\n{table}"
        );
        if fr.starts_with("Err") {
            assert!(!fchanged, "{what} failed but changed the tree\n{table}");
        }
        assert_eq!(fchanged, kchanged, "{what}\n{table}");
    }
    // Teeth: the full upper really refused something, and allowed what needs no inode.
    assert!(fops.iter().any(|(_, r, _)| r == "Err(ENOSPC)"), "{table}");
    assert!(fops.iter().any(|(_, r, _)| r == "Ok()"), "{table}");
    assert_eq!(freed, ["Ok()", "Ok()", "Ok()"], "after freeing inodes");
    assert!(f.daemon_alive(), "{}", f.log_text());
    assert_eq!(work_leftovers(&tf.p("work")), Vec::<String>::new());
}
