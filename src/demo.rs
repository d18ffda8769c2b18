//! `ovlfuse demo`: builds a small layered tree in a temporary directory, mounts it with this
//! very binary, prints the union, and unmounts — a first look that needs no setup.
//!
//! Must never: leave the mount, the daemon or the temporary directory behind, even when a
//! step fails.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::mount;

/// Runs the demo; returns the process exit code.
pub fn run() -> i32 {
    let base = std::env::temp_dir().join(format!("ovlfuse-demo-{}", std::process::id()));
    let result = build(&base).and_then(|()| mount_and_show(&base));
    let _ = fs::remove_dir_all(&base);
    match result {
        Ok(()) => 0,
        Err(msg) => {
            eprintln!("ovlfuse demo: {msg}");
            1
        }
    }
}

fn write(path: PathBuf, text: &str) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))
}

/// A kernel-format whiteout (a 0/0 character device) where the process may create one, the
/// AUFS `.wh.` form otherwise: the union hides the name either way.
fn whiteout(dir: &Path, name: &str) -> Result<String, String> {
    let path = dir.join(name);
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: valid path; device 0/0.
    if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, 0) } == 0 {
        return Ok(format!("character device 0/0 {name}"));
    }
    write(dir.join(format!(".wh.{name}")), "")?;
    Ok(format!("AUFS file .wh.{name}"))
}

fn build(base: &Path) -> Result<(), String> {
    let (l1, l2, up) = (base.join("lower1"), base.join("lower2"), base.join("upper"));
    write(l2.join("etc/hostname"), "base-image\n")?;
    write(l2.join("etc/os-release"), "NAME=\"demo base\"\n")?;
    write(l2.join("docs/readme.txt"), "from the bottom layer\n")?;
    write(l2.join("docs/obsolete.txt"), "deleted by lower1\n")?;
    write(l1.join("etc/hostname"), "app-image\n")?;
    write(l1.join("app/run.sh"), "#!/bin/sh\necho hello\n")?;
    fs::create_dir_all(l1.join("docs")).map_err(|e| format!("lower1/docs: {e}"))?;
    let how = whiteout(&l1.join("docs"), "obsolete.txt")?;
    write(up.join("etc/motd"), "written by the container\n")?;
    for d in ["work", "merged"] {
        fs::create_dir_all(base.join(d)).map_err(|e| format!("{d}: {e}"))?;
    }
    println!("layers in {}:", base.display());
    println!("  lower2 (bottom): etc/hostname, etc/os-release, docs/readme.txt, docs/obsolete.txt");
    println!(
        "  lower1 (top lower): etc/hostname (shadows lower2), app/run.sh, whiteout of docs/obsolete.txt ({how})"
    );
    println!("  upper: etc/motd");
    Ok(())
}

fn mount_and_show(base: &Path) -> Result<(), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let merged = base.join("merged");
    let opts = format!(
        "lowerdir={}:{},upperdir={},workdir={}",
        base.join("lower1").display(),
        base.join("lower2").display(),
        base.join("upper").display(),
        base.join("work").display()
    );
    println!("\n$ ovlfuse -o {opts} {}", merged.display());
    let status = Command::new(&exe)
        .arg("-o")
        .arg(&opts)
        .arg(&merged)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", exe.display()))?;
    if !status.success() {
        return Err(format!("mount failed ({status})"));
    }
    let shown = show(&merged);
    let unmounted = unmount_and_wait(&merged);
    shown.and(unmounted)
}

fn show(merged: &Path) -> Result<(), String> {
    println!("\nthe union at {}:", merged.display());
    let mut stack = vec![merged.to_path_buf()];
    let mut files = Vec::new();
    while let Some(dir) = stack.pop() {
        let mut names: Vec<_> = fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for path in names.into_iter().rev() {
            if path.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
    }
    files.sort();
    for f in files {
        let rel = f.strip_prefix(merged).unwrap_or(&f);
        let text = fs::read_to_string(&f).unwrap_or_default();
        println!(
            "  {:<20} {}",
            rel.display(),
            text.lines().next().unwrap_or("")
        );
    }
    println!("\n(docs/obsolete.txt is whited out; etc/hostname comes from lower1)");
    Ok(())
}

fn unmount_and_wait(merged: &Path) -> Result<(), String> {
    mount::unmount(merged).map_err(|e| format!("cannot unmount {}: {e}", merged.display()))?;
    // The daemon exits once the kernel closes the connection; wait so nothing outlives us.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if !daemon_running(merged) {
            println!("\nunmounted; the daemon has exited.");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Err("the daemon did not exit after unmount".into())
}

fn daemon_running(merged: &Path) -> bool {
    let Ok(procs) = fs::read_dir("/proc") else {
        return false;
    };
    let needle = merged.as_os_str().as_bytes();
    procs.filter_map(|p| p.ok()).any(|p| {
        fs::read(p.path().join("cmdline")).is_ok_and(|cmd| {
            cmd.split(|b| *b == 0).any(|arg| arg == needle)
                && p.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                    != Some(std::process::id())
        })
    })
}
