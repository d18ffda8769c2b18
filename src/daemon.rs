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
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use crate::canary::Canary;
use crate::fs::{FsSettings, OverlayFs};
use crate::health::{Health, Mode};
use crate::layers::LayerStack;
use crate::mount::{self, MountSpec};
use crate::options::MountConfig;
use crate::status::Transport;

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
    // Everything that can be checked without mounting is checked here, in the process the
    // caller waits for, so the message reaches the caller's terminal.
    let prepared = LayerStack::open(&config)
        .and_then(|stack| {
            match premounted_fd_number(&config.mountpoint) {
                Some(n) => check_premounted(n)?,
                None => mount::check_mountpoint(&config.mountpoint)?,
            }
            clean_work(&stack, &config)?;
            // The kernel's volatile rules, in its order: a volatile mount refuses an upper
            // with an unseen writeback error, every mount a marked work dir; then a volatile
            // mount marks it.
            crate::volatile::apply_at_mount(&stack, &config)?;
            Ok(stack)
        })
        .and_then(|stack| build_fs(stack, &config));
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

/// The filesystem with its health tracking. Creates no thread: the process may still fork.
fn build_fs(stack: LayerStack, config: &MountConfig) -> Result<OverlayFs, String> {
    let mode = if config.volatile {
        Mode::Volatile
    } else if !config.fsync {
        Mode::NoSync
    } else {
        Mode::Durable
    };
    // The canary is reached by path through the mount; a mount the caller made (/dev/fd/N)
    // has no path the daemon knows.
    let canary = match premounted_fd_number(&config.mountpoint) {
        Some(_) => None,
        None => std::path::absolute(&config.mountpoint)
            .ok()
            .map(|mnt| Arc::new(Canary::new(mnt))),
    };
    let upper_root = stack.has_upper().then(|| &stack.layers[0].root);
    let health = Health::new(mode, upper_root, canary.clone())
        .map_err(|e| format!("upperdir: cannot open its root for error tracking: {e}"))?;
    OverlayFs::new(
        stack,
        config.syncs_to_disk(),
        settings(config),
        health,
        canary,
    )
    .map_err(|e| format!("cannot read the layers' root directories: {e}"))
}

/// How long the kernel may cache entries and attributes unless `timeout=` says otherwise:
/// every change to a layer object goes through the union, which tells the kernel (each
/// request the kernel sends updates or invalidates what it cached for the objects it
/// touches; a copy-up keeps the inode number and attributes), so nothing it caches can go
/// stale behind its back — changing the layer directories under a mounted union is not
/// supported, as on the kernel overlay.
const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// The entry and attribute timeout of a volatile mount without `timeout=`: short, so that a
/// poisoned mount's refusals are not hidden by the kernel's caches.
const VOLATILE_TTL: Duration = Duration::from_secs(1);

fn settings(config: &MountConfig) -> FsSettings {
    let ttl = match config.timeout {
        Some(t) => Duration::from_secs_f64(t.max(0.0)),
        None if config.volatile => VOLATILE_TTL,
        None => DEFAULT_TTL,
    };
    FsSettings {
        ttl,
        cache: !config.volatile,
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
    if let Err(e) = crate::sys::reserve_descriptor_slots(crate::sys::DESCRIPTOR_SLOTS) {
        log::debug!("cannot size the descriptor table ahead: {e}");
    }
    // New objects get exactly the mode the caller asked for (the kernel has already applied
    // the caller's umask); the daemon's own umask must not strip more.
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(0) };
    let signals = match block_termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(ready, format!("cannot set up signal handling: {e}")),
    };
    let health = fs.health();
    // Canonical now, before anything is mounted on it: `ovlfuse status MOUNTPOINT` finds the
    // mount under this name without entering it.
    let status_mountpoint = match premounted_fd_number(&config.mountpoint) {
        Some(_) => config.mountpoint.clone(),
        None => crate::status::canonical_mountpoint(&config.mountpoint),
    };
    // The libfuse >= 3.3 convention (xfstests, some runtimes): a mountpoint of /dev/fd/N
    // means the caller already opened /dev/fuse as N and mounted it; serve that descriptor.
    let premounted = premounted_fd(&config.mountpoint);
    let (device, transport) = match premounted {
        Some(fd) => (fd, Transport::Fuse),
        None => match mount_union(&config) {
            Ok(m) => m,
            Err(msg) => return fail(ready, msg),
        },
    };
    health.set_syncfs_forwarded(transport == Transport::Fuseblk);
    let owns_mount = premounted_fd_number(&config.mountpoint).is_none();
    let unmount_on_failure = || {
        if owns_mount {
            let _ = mount::unmount(&config.mountpoint);
        }
    };
    let threads = worker_threads(&config);
    let mut session_config = fuser::Config::default();
    session_config.n_threads = Some(threads);
    // fuser answers ENOSYS to every opcode it cannot parse (FUSE_TMPFILE, FUSE_STATX, ...),
    // which the kernel turns into EOPNOTSUPP or a GETATTR fallback, so a plain `fuse` mount
    // needs no relay in front of fuser. A fuseblk mount does: its FUSE_SYNCFS must get a
    // real answer, which fuser cannot give.
    let (channel, relay) = match transport {
        Transport::Fuse => {
            // One /dev/fuse descriptor per worker: the kernel then queues requests per
            // thread instead of waking every worker for each one.
            session_config.clone_fd = true;
            (device, None)
        }
        Transport::Fuseblk => {
            let hook = fs.relay_hook(crate::health::RelayHook {
                health: Arc::clone(&health),
            });
            match crate::relay::start(device, threads, hook, !config.no_uring) {
                Ok((relay, fuser_end, max_write)) => {
                    fs.limit_max_write(max_write);
                    session_config.clone_fd = false;
                    (fuser_end, Some(relay))
                }
                Err(e) => {
                    unmount_on_failure();
                    return fail(ready, format!("cannot start the FUSE relay: {e}"));
                }
            }
        }
    };
    // Passthrough's backing files are registered on the connection with ioctls on a
    // descriptor of it: fuser's own is out of reach, so a duplicate.
    let connection = match &relay {
        Some(relay) => relay.device().try_clone_to_owned(),
        None => channel.try_clone(),
    };
    match connection {
        Ok(fd) => fs.use_passthrough(fd),
        Err(e) => log::warn!("passthrough off: cannot duplicate the FUSE descriptor: {e}"),
    }
    // Session::from_fd performs the INIT handshake: once it returns, the kernel has the
    // mount's parameters and requests are being served.
    let session = match fuser::Session::from_fd(fs, channel, fuser::SessionACL::All, session_config)
    {
        Ok(s) => s,
        Err(e) => {
            unmount_on_failure();
            return fail(ready, format!("FUSE handshake failed: {e}"));
        }
    };
    if let Err(e) = health.start_checker() {
        unmount_on_failure();
        return fail(ready, format!("cannot start the health checker: {e}"));
    }
    let status = start_status(&config, &status_mountpoint, &health, transport);
    log::info!(
        "mounted {} as {} ({} layers, {} threads, {}; syncfs {})",
        config.mountpoint.display(),
        transport.fstype(),
        config.lowerdirs.len() + usize::from(config.upperdir.is_some()),
        threads,
        health.mode().name(),
        match transport {
            Transport::Fuseblk => "flushes the upper layer and reports its errors",
            Transport::Fuse => "reports upper errors found by the periodic check",
        }
    );
    for ignored in &config.ignored {
        log::info!("option {ignored}: accepted for compatibility, no effect");
    }
    if let Some(ready) = ready {
        ready.report(Ok(()));
    }
    spawn_signal_watcher(signals, owns_mount.then(|| config.mountpoint.clone()));
    let result = session.run();
    if let Some(relay) = relay {
        relay.join();
    }
    // Normally done in destroy(), while a fuseblk umount waits; this returns that result.
    let flushed = health.flush_at_unmount();
    if let Some(status) = &status {
        status.set_unmounted(flushed);
    }
    if let Some(poison) = health.poison() {
        log::error!(
            "unmounted {}: the mount was poisoned by a lost write ({})",
            config.mountpoint.display(),
            crate::health::errno_name(poison.errno)
        );
        return EXIT_MOUNT_FAILED;
    }
    match result {
        Ok(()) if flushed.is_ok() => {
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

/// Publishes the status file container managers poll (`ovlfuse status`, see `status`) once
/// the kernel can reach the union, and has the health tracker record a poison in it. Only a
/// union with a workdir has one; if the workdir cannot be opened, that is logged and the
/// mount goes on without. The returned handle is shared: `StatusFile::set_poisoned` is
/// callable from any thread.
fn start_status(
    config: &MountConfig,
    mountpoint: &std::path::Path,
    health: &Arc<Health>,
    transport: Transport,
) -> Option<Arc<crate::status::StatusFile>> {
    let workdir = config.workdir.as_deref()?;
    let status =
        match crate::status::StatusFile::create(workdir, mountpoint, health.mode(), transport) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                log::error!(
                    "cannot open the workdir {} for the status file: {e}; `ovlfuse status` \
                     will report this mount as not running",
                    workdir.display()
                );
                return None;
            }
        };
    status.set_ok();
    let hook = Arc::clone(&status);
    health.on_poison(Box::new(move |errno| hook.set_poisoned(errno)));
    // A poison found before the hook was in place (the checker is already running).
    if let Some(errno) = health.poisoned() {
        status.set_poisoned(errno);
    }
    Some(status)
}

/// Mounts the union: as fuseblk when privileged (and not refused with `-o nofuseblk`), so
/// syncfs(2) is durable; else, or when that fails, as plain fuse, saying why.
fn mount_union(config: &MountConfig) -> Result<(OwnedFd, Transport), String> {
    let mut spec = mount_spec(config);
    // SAFETY: geteuid cannot fail.
    let privileged = unsafe { libc::geteuid() } == 0;
    let wanted = config.upperdir.is_some() && !config.no_fuseblk;
    if wanted && privileged {
        match crate::loopdev::LoopDevice::attach_tiny() {
            Ok(loopdev) => {
                spec.block_device = Some(loopdev.path().to_path_buf());
                match mount::mount(&spec) {
                    // The mount now holds the device open; dropping ours lets autoclear
                    // detach it when the mount goes.
                    Ok(m) => return Ok((m.into_device(), Transport::Fuseblk)),
                    Err(msg) => log::warn!(
                        "cannot mount as fuseblk ({msg}); mounting as plain fuse: syncfs(2) on \
                         the union will not flush the upper layer"
                    ),
                }
                spec.block_device = None;
            }
            Err(e) => log::warn!(
                "cannot set up a loop device for a fuseblk mount ({e}); mounting as plain \
                 fuse: syncfs(2) on the union will not flush the upper layer"
            ),
        }
    } else if wanted {
        log::info!(
            "unprivileged: mounting as plain fuse; syncfs(2) on the union does not flush the \
             upper layer (use `ovlfuse sync`); upper errors reach it within {:?}",
            crate::health::CHECK_INTERVAL
        );
    }
    mount::mount(&spec).map(|m| (m.into_device(), Transport::Fuse))
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
        block_device: None,
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
