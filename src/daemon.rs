//! The process lifecycle of a mount: validate, mount, detach, serve, end cleanly.
//!
//! Owns: the order of mount-time steps (so every refusal happens before anything is
//! mounted, and nothing stays mounted when a later step fails), detaching from the terminal
//! only once the mount is live (the parent exits 0 only then, as container runtimes expect),
//! signals (SIGTERM/SIGINT unmount), and where logs go: stderr in the foreground, syslog
//! when detached. Must never: leave a mount behind on a failure path, or exit 0 before the
//! kernel can reach the filesystem.

use std::ffi::CString;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::fs::{FsSettings, OverlayFs};
use crate::layers::LayerStack;
use crate::mount::{self, MountSpec};
use crate::options::MountConfig;

/// Exit code when the mount could not be made (usage errors exit 2, from `main`).
pub const EXIT_MOUNT_FAILED: i32 = 1;

/// Runs a mount to its end; returns the process exit code.
pub fn run(config: MountConfig) -> i32 {
    // Detached, the daemon has no terminal: log to syslog from the start, so that what
    // mount-time checks log reaches the same place as what the daemon logs later.
    if config.foreground {
        init_stderr_logging(config.debug);
    } else {
        init_syslog(config.debug);
    }
    if let Err(msg) = refuse_unsupported(&config) {
        eprintln!("ovlfuse: {msg}");
        return EXIT_MOUNT_FAILED;
    }
    // Everything that can be checked without mounting is checked here, in the process the
    // caller waits for, so the message reaches the caller's terminal.
    let prepared = LayerStack::open(&config)
        .and_then(|stack| {
            match premounted_fd_number(&config.mountpoint) {
                Some(n) => check_premounted(n)?,
                None => mount::check_mountpoint(&config.mountpoint)?,
            }
            clean_work(&stack, &config)?;
            Ok(stack)
        })
        .and_then(|stack| {
            OverlayFs::new(stack, config.syncs_to_disk(), settings(&config))
                .map_err(|e| format!("cannot read the layers' root directories: {e}"))
        });
    let fs = match prepared {
        Ok(fs) => fs,
        Err(msg) => {
            eprintln!("ovlfuse: {msg}");
            return EXIT_MOUNT_FAILED;
        }
    };
    if config.foreground {
        return serve(config, fs, None);
    }
    match detach() {
        Ok(Detached::Parent(status)) => status,
        Ok(Detached::Child(ready)) => serve(config, fs, Some(ready)),
        Err(e) => {
            eprintln!("ovlfuse: cannot start the daemon process: {e}");
            EXIT_MOUNT_FAILED
        }
    }
}

/// Removes what interrupted copy-ups and namespace changes left in `workdir/work` (they were
/// never visible in the union, being only ever renamed into place when complete).
fn clean_work(stack: &LayerStack, config: &MountConfig) -> Result<(), String> {
    let Some(work) = &stack.work else {
        return Ok(());
    };
    let workdir = config
        .workdir
        .as_deref()
        .unwrap_or(std::path::Path::new("?"));
    match crate::copy_up::clean_work_dir(std::os::fd::AsFd::as_fd(work)) {
        Ok(0) => Ok(()),
        Ok(n) => {
            log::warn!(
                "removed {n} leftovers of interrupted operations from {}/work",
                workdir.display()
            );
            Ok(())
        }
        Err(e) => Err(format!(
            "workdir: cannot clean {}/work: {e}",
            workdir.display()
        )),
    }
}

fn refuse_unsupported(config: &MountConfig) -> Result<(), String> {
    let not_yet = |what: &str| {
        Err(format!(
            "{what}: not implemented by this version of ovlfuse"
        ))
    };
    if config.volatile {
        return not_yet("volatile");
    }
    Ok(())
}

fn settings(config: &MountConfig) -> FsSettings {
    FsSettings {
        ttl: Duration::from_secs_f64(config.timeout.unwrap_or(1.0).max(0.0)),
        max_write: None,
        ids: crate::idmap::IdMap::from_config(config),
        flush: config.syncs_to_disk(),
    }
}

fn worker_threads(config: &MountConfig) -> usize {
    if config.single_threaded {
        return 1;
    }
    config.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
            .max(2)
    })
}

/// Mounts, tells the waiting parent (if any) how it went, serves until unmounted.
fn serve(config: MountConfig, fs: OverlayFs, ready: Option<ReadyPipe>) -> i32 {
    crate::sys::raise_nofile_limit();
    // New objects get exactly the mode the caller asked for (the kernel has already applied
    // the caller's umask); the daemon's own umask must not strip more.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    let signals = match block_termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(ready, format!("cannot set up signal handling: {e}")),
    };
    // The libfuse >= 3.3 convention (xfstests, some runtimes): a mountpoint of /dev/fd/N
    // means the caller already opened /dev/fuse as N and mounted it; serve that descriptor.
    let premounted = premounted_fd(&config.mountpoint);
    let device = match premounted {
        Some(fd) => fd,
        None => match mount::mount(&mount_spec(&config)) {
            Ok(m) => m.into_device(),
            Err(msg) => return fail(ready, msg),
        },
    };
    let owns_mount = premounted_fd_number(&config.mountpoint).is_none();
    // A handle on the upper root, kept to flush the upper filesystem after the session ends.
    let upper_root = if config.syncs_to_disk() {
        fs.upper_root()
    } else {
        None
    };
    let threads = worker_threads(&config);
    let mut session_config = fuser::Config::default();
    session_config.n_threads = Some(threads);
    // One /dev/fuse descriptor per worker: the kernel then queues requests per thread
    // instead of waking every worker for each one.
    session_config.clone_fd = true;
    // fuser answers ENOSYS to every opcode it cannot parse (FUSE_TMPFILE, FUSE_STATX, ...),
    // which the kernel turns into EOPNOTSUPP or a GETATTR fallback, so a plain `fuse` mount
    // needs no relay in front of fuser; `relay` is for the fuseblk mode, where FUSE_SYNCFS
    // must be answered by us. Session::from_fd performs the INIT handshake: once it returns,
    // the kernel has the mount's parameters and requests are being served.
    let session = match fuser::Session::from_fd(fs, device, fuser::SessionACL::All, session_config)
    {
        Ok(s) => s,
        Err(e) => {
            if owns_mount {
                let _ = mount::unmount(&config.mountpoint);
            }
            return fail(ready, format!("FUSE handshake failed: {e}"));
        }
    };
    log::info!(
        "mounted {} ({} layers, {} threads)",
        config.mountpoint.display(),
        config.lowerdirs.len() + usize::from(config.upperdir.is_some()),
        threads
    );
    for ignored in &config.ignored {
        log::info!("option {ignored}: accepted for compatibility, no effect");
    }
    if let Some(ready) = ready {
        ready.report(Ok(()));
    }
    spawn_signal_watcher(signals, owns_mount.then(|| config.mountpoint.clone()));
    let result = session.run();
    let flushed = flush_upper_at_exit(upper_root.as_ref());
    match result {
        Ok(()) if flushed => {
            log::info!("unmounted {}", config.mountpoint.display());
            0
        }
        Ok(()) => EXIT_MOUNT_FAILED,
        Err(e) => {
            log::error!("session ended with an error: {e}");
            EXIT_MOUNT_FAILED
        }
    }
}

/// Unmounting must not drop the last chance to hear that data written through the union
/// never reached the disk: the daemon syncs the upper filesystem before it exits, and a
/// failure is logged and turns into a non-zero exit. (Skipped with volatile/fsync=0, whose
/// point is to never flush.)
fn flush_upper_at_exit(upper_root: Option<&OwnedFd>) -> bool {
    let Some(root) = upper_root else {
        return true;
    };
    let result =
        crate::sys::reopen(root.as_fd(), libc::O_RDONLY | libc::O_DIRECTORY).and_then(|dir| {
            // SAFETY: valid descriptor.
            crate::sys::check(unsafe { libc::syncfs(dir.as_raw_fd()) })
        });
    match result {
        Ok(()) => true,
        Err(e) => {
            log::error!(
                "flushing the upper layer at unmount failed: {e}; data written through the union may be lost"
            );
            false
        }
    }
}

fn mount_spec(config: &MountConfig) -> MountSpec {
    MountSpec {
        mountpoint: config.mountpoint.clone(),
        fsname: config
            .fsname
            .clone()
            .or_else(|| config.source.clone())
            .unwrap_or_else(|| "ovlfuse".to_string()),
        subtype: "ovlfuse".to_string(),
        ms_flags: config.ms_flags,
        // As root the daemon serves every user of the container, like the kernel overlay.
        allow_other: config
            .allow_other
            // SAFETY: geteuid has no failure mode.
            .unwrap_or(unsafe { libc::geteuid() } == 0),
        default_permissions: config.default_permissions,
        // A union without an upper layer has nowhere to write.
        read_only: config.read_only || config.upperdir.is_none(),
    }
}

/// N, when `mountpoint` is `/dev/fd/N`.
fn premounted_fd_number(mountpoint: &std::path::Path) -> Option<i32> {
    mountpoint
        .to_str()?
        .strip_prefix("/dev/fd/")?
        .parse()
        .ok()
        .filter(|n| *n >= 0)
}

/// `/dev/fd/N` must name an open `/dev/fuse` descriptor.
fn check_premounted(n: i32) -> Result<(), String> {
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on a descriptor number, valid out-pointer.
    if unsafe { libc::fstat(n, &mut st) } != 0 {
        return Err(format!(
            "mountpoint /dev/fd/{n}: descriptor {n} is not open (the caller must open \
             /dev/fuse, mount it, and pass the descriptor)"
        ));
    }
    let is_fuse_device = st.st_mode & libc::S_IFMT == libc::S_IFCHR
        && libc::major(st.st_rdev) == 10
        && libc::minor(st.st_rdev) == 229;
    if !is_fuse_device {
        return Err(format!(
            "mountpoint /dev/fd/{n}: descriptor {n} is not /dev/fuse"
        ));
    }
    Ok(())
}

/// Takes ownership of descriptor N for `/dev/fd/N`, if it is open.
fn premounted_fd(mountpoint: &std::path::Path) -> Option<OwnedFd> {
    let n = premounted_fd_number(mountpoint)?;
    // SAFETY: fcntl only queries the descriptor.
    if unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        return None;
    }
    // SAFETY: the caller handed descriptor N over to us by naming it on the command line.
    Some(unsafe { OwnedFd::from_raw_fd(n) })
}

fn fail(ready: Option<ReadyPipe>, msg: String) -> i32 {
    match ready {
        Some(ready) => ready.report(Err(msg.clone())),
        None => eprintln!("ovlfuse: {msg}"),
    }
    log::error!("{msg}");
    EXIT_MOUNT_FAILED
}

/// The write end of the pipe the waiting parent reads: "ok", or the error message.
struct ReadyPipe(std::fs::File);

impl ReadyPipe {
    fn report(mut self, result: Result<(), String>) {
        let msg = match result {
            Ok(()) => "ok".to_string(),
            Err(m) => format!("error: {m}"),
        };
        let _ = self.0.write_all(msg.as_bytes());
    }
}

enum Detached {
    Parent(i32),
    Child(ReadyPipe),
}

/// Forks; the parent waits on a pipe for the child's verdict and returns the exit code the
/// caller should see; the child leaves the session and the terminal.
fn detach() -> std::io::Result<Detached> {
    let mut fds = [0; 2];
    // SAFETY: valid out-array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: pipe2 returned two fresh descriptors we now own.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: no other threads exist yet (nothing has been spawned before this point), so
    // the child may keep running Rust code.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        0 => {
            drop(read_end);
            // SAFETY: plain syscalls in the child.
            unsafe {
                libc::setsid();
            }
            redirect_stdio_to_null();
            let _ = std::env::set_current_dir("/");
            Ok(Detached::Child(ReadyPipe(std::fs::File::from(write_end))))
        }
        child => {
            drop(write_end);
            let mut msg = String::new();
            let _ = std::fs::File::from(read_end).read_to_string(&mut msg);
            if msg == "ok" {
                return Ok(Detached::Parent(0));
            }
            let msg = match msg.strip_prefix("error: ") {
                Some(m) => m.to_string(),
                None => {
                    let mut status = 0;
                    // SAFETY: waiting for our own child.
                    unsafe { libc::waitpid(child, &mut status, 0) };
                    format!("the daemon exited before the mount was ready (status {status})")
                }
            };
            eprintln!("ovlfuse: {msg}");
            Ok(Detached::Parent(EXIT_MOUNT_FAILED))
        }
    }
}

fn redirect_stdio_to_null() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for target in 0..3 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(null.as_raw_fd(), target) };
        }
    }
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread — and so in every thread spawned after —
/// so that only the watcher thread receives them.
fn block_termination_signals() -> std::io::Result<libc::sigset_t> {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        let ret = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(ret));
        }
        Ok(set)
    }
}

/// SIGTERM/SIGINT end the mount the same way `umount` does: the kernel then closes the
/// connection and the session returns. For a mount the caller made (`/dev/fd/N`) there is
/// no mountpoint to unmount: the daemon exits, and the caller's mount reports ENOTCONN
/// until the caller unmounts it. SIGHUP (a closed terminal) is ignored.
fn spawn_signal_watcher(set: libc::sigset_t, mountpoint: Option<std::path::PathBuf>) {
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            loop {
                let mut sig = 0;
                // SAFETY: set is a valid, blocked signal set.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    continue;
                }
                if sig == libc::SIGHUP {
                    log::info!("SIGHUP ignored");
                    continue;
                }
                let Some(mountpoint) = &mountpoint else {
                    log::info!("signal {sig}: exiting (the caller owns the mount)");
                    std::process::exit(0);
                };
                log::info!("signal {sig}: unmounting {}", mountpoint.display());
                if let Err(e) = mount::unmount(mountpoint) {
                    log::error!("cannot unmount {}: {e}", mountpoint.display());
                }
            }
        });
}

fn init_stderr_logging(debug: bool) {
    let default = if debug { "debug" } else { "warn" };
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(default))
        .format_timestamp_millis()
        .try_init();
}

/// Logs to syslog (facility daemon, ident "ovlfuse", with the pid) once detached: there is
/// no terminal any more. Level: `-d` gives debug, else RUST_LOG if it is a bare level, else
/// warnings and errors.
fn init_syslog(debug: bool) {
    let level = if debug {
        log::LevelFilter::Debug
    } else {
        std::env::var("RUST_LOG")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(log::LevelFilter::Warn)
    };
    // SAFETY: the ident is a static C string, as openlog requires.
    unsafe { libc::openlog(c"ovlfuse".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
    if log::set_boxed_logger(Box::new(Syslog)).is_ok() {
        log::set_max_level(level);
    }
}

struct Syslog;

impl log::Log for Syslog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record<'_>) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let priority = match record.level() {
            log::Level::Error => libc::LOG_ERR,
            log::Level::Warn => libc::LOG_WARNING,
            log::Level::Info => libc::LOG_INFO,
            log::Level::Debug | log::Level::Trace => libc::LOG_DEBUG,
        };
        let text = format!("{}", record.args()).replace('\0', " ");
        if let Ok(c) = CString::new(text) {
            // SAFETY: "%s" with one valid C string argument.
            unsafe { libc::syslog(priority, c"%s".as_ptr(), c.as_ptr()) };
        }
    }

    fn flush(&self) {}
}
