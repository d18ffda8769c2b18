//! Attaching a FUSE connection to a mountpoint with a privileged mount(2).
//!
//! This module owns exactly two things: opening `/dev/fuse`, and the mount(2) /
//! umount2(2) calls that bind that device to (and detach it from) a directory.
//! It also owns the pre-flight check that the directory is usable.
//!
//! It must never read from or write to the device (the FUSE protocol, including
//! the INIT handshake, belongs to the relay and to fuser), never unmount anything
//! on its own initiative (dropping a [`FuseMount`] only closes the device, which
//! aborts the connection but leaves the mount for [`unmount`]), and never fall back
//! to `fusermount3` silently: rootless mounting is a separate, explicit path.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// What to mount, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    /// Directory to mount on.
    pub mountpoint: PathBuf,
    /// Shown as the mount source in /proc/self/mountinfo (e.g. `df`, `findmnt`).
    pub fsname: String,
    /// Filesystem subtype; the kernel type becomes `fuse.<subtype>`. Normally "ovlfuse".
    pub subtype: String,
    /// `libc::MS_*` flags (MS_NOSUID, MS_NODEV, ...). MS_RDONLY is added by `read_only`.
    pub ms_flags: u64,
    /// Let users other than the mounting one access the mount.
    pub allow_other: bool,
    /// Let the kernel check permissions from the file mode instead of asking us.
    pub default_permissions: bool,
    /// Mount read-only.
    pub read_only: bool,
    /// Mount as `fuseblk.<subtype>` with this block device as the source, so the kernel
    /// forwards syncfs(2) to the daemon (FUSE_SYNCFS). `None`: a plain `fuse.<subtype>` mount.
    pub block_device: Option<PathBuf>,
}

/// A live FUSE mount: the `/dev/fuse` descriptor the kernel will send requests on,
/// and where it is mounted.
///
/// Dropping it closes the device, which makes the kernel abort the connection
/// (callers get ENOTCONN); the mount itself stays until [`unmount`] is called.
#[derive(Debug)]
pub struct FuseMount {
    device: OwnedFd,
    mountpoint: PathBuf,
}

impl FuseMount {
    /// The `/dev/fuse` descriptor bound to this mount.
    pub fn device(&self) -> BorrowedFd<'_> {
        self.device.as_fd()
    }

    /// Hand the device over (to the relay, or to `fuser::Session::from_fd`).
    pub fn into_device(self) -> OwnedFd {
        self.device
    }

    /// Where the connection is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }
}

/// Check that `path` can be mounted on: it exists, is a directory, and is not
/// already the mountpoint of a live mount.
///
/// Mounting over an existing mount is legal for the kernel but is never what the
/// user wants (it hides the old mount, and a second ovlfuse on the same directory
/// usually means the first one was not cleaned up), so it is refused here.
///
/// The mount table is consulted *before* the directory itself is stat'ed: a stat
/// on a FUSE mount whose daemon has not answered INIT (or is stuck) blocks until
/// it answers, so only the parent is resolved until we know `path` is no mount.
pub fn check_mountpoint(path: &Path) -> Result<(), String> {
    let shown = path.display();
    let mountinfo = std::fs::read("/proc/self/mountinfo")
        .map_err(|e| format!("cannot read /proc/self/mountinfo to check {shown}: {e}"))?;
    let busy = |fstype: String| {
        format!("mountpoint {shown} is busy: already a mount point ({fstype}); unmount it first")
    };

    // mountinfo lists canonical paths: resolve the parent (relative paths,
    // symlinks, `..`) and append the last component without looking it up.
    let absolute =
        std::path::absolute(path).map_err(|e| format!("cannot resolve mountpoint {shown}: {e}"))?;
    let resolved = match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent)
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => format!("mountpoint {shown} does not exist"),
                _ => format!("cannot resolve mountpoint {shown}: {e}"),
            })?
            .join(name),
        // "/" or a path ending in "..": nothing safe to split off.
        _ => absolute.clone(),
    };
    if let Some(fstype) = mounted_fstype(&mountinfo, &resolved) {
        return Err(busy(fstype));
    }

    // Not a mountpoint itself, so lstat stays on the parent's filesystem.
    let mut target = resolved;
    match std::fs::symlink_metadata(&target) {
        Ok(meta) if meta.file_type().is_symlink() => {
            target = std::fs::canonicalize(&target).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => {
                    format!("mountpoint {shown} is a dangling symbolic link")
                }
                _ => format!("cannot resolve mountpoint {shown}: {e}"),
            })?;
            if let Some(fstype) = mounted_fstype(&mountinfo, &target) {
                return Err(busy(fstype));
            }
        }
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(format!("mountpoint {shown} does not exist"));
        }
        Err(e) => return Err(format!("cannot stat mountpoint {shown}: {e}")),
    }

    match std::fs::metadata(&target) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(format!("mountpoint {shown} is not a directory")),
        // A FUSE mount whose daemon died answers every stat with ENOTCONN (seen
        // when the mount table lists it under another path, e.g. after a bind).
        Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Err(format!(
            "mountpoint {shown} is busy: a FUSE mount whose daemon is gone \
             (transport endpoint is not connected); unmount it first"
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(format!("mountpoint {shown} does not exist"))
        }
        Err(e) => Err(format!("cannot stat mountpoint {shown}: {e}")),
    }
}

/// The filesystem type of the topmost mount at `target`, if any, from the bytes of
/// a mountinfo file.
///
/// Line format (proc(5)): `id parent major:minor root mountpoint options
/// [optional fields...] - fstype source super_options`; the mountpoint is field 5.
fn mounted_fstype(mountinfo: &[u8], target: &Path) -> Option<String> {
    let mut found = None;
    for line in mountinfo.split(|&b| b == b'\n') {
        let fields: Vec<&[u8]> = line.split(|&b| b == b' ').collect();
        let Some(mount_point) = fields.get(4) else {
            continue;
        };
        if unescape_mountinfo(mount_point) != target.as_os_str() {
            continue;
        }
        let fstype = fields
            .iter()
            .position(|f| *f == b"-")
            .and_then(|sep| fields.get(sep + 1))
            .map(|f| String::from_utf8_lossy(&unescape_mountinfo(f).into_vec()).into_owned())
            .unwrap_or_else(|| "unknown type".to_string());
        // Later lines are mounted later, so the last match is the visible mount.
        found = Some(fstype);
    }
    found
}

/// Undo the kernel's octal escaping of mountinfo fields (`\040` for space, `\011`
/// tab, `\012` newline, `\134` backslash); anything else is kept verbatim.
fn unescape_mountinfo(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\'
            && i + 4 <= field.len()
            && field[i + 1..i + 4]
                .iter()
                .all(|d| (b'0'..=b'7').contains(d))
        {
            let value = field[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
            if let Ok(byte) = u8::try_from(value) {
                out.push(byte);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    OsString::from_vec(out)
}

/// Open `/dev/fuse` and mount a new FUSE connection on `spec.mountpoint`.
///
/// Runs [`check_mountpoint`] first, so an existing mount is never shadowed.
/// Requires the privilege to call mount(2) (root, or CAP_SYS_ADMIN in the mount
/// namespace's owning user namespace). The kernel queues FUSE_INIT on the device
/// immediately; whoever reads the device next (relay or fuser) must answer it.
pub fn mount(spec: &MountSpec) -> Result<FuseMount, String> {
    check_mountpoint(&spec.mountpoint)?;
    match mount_directly(spec) {
        // fusermount3 cannot make a fuseblk mount; the caller decides what to do instead.
        Err(Refused::NotPermitted(why)) if spec.block_device.is_some() => Err(why),
        Err(Refused::NotPermitted(why)) => {
            log::info!("{why}; mounting through fusermount3");
            mount_with_fusermount(spec).map_err(|e| format!("{why}; and through fusermount3: {e}"))
        }
        Err(Refused::Failed(msg)) => Err(msg),
        Ok(m) => Ok(m),
    }
}

/// Why a direct mount(2) did not happen.
enum Refused {
    /// This process may not mount (EPERM) or open /dev/fuse (EACCES): an unprivileged
    /// user, for whom the setuid fusermount3 mounts instead.
    NotPermitted(String),
    Failed(String),
}

fn mount_directly(spec: &MountSpec) -> Result<FuseMount, Refused> {
    let target = &spec.mountpoint;
    let shown = target.display();

    let failed = Refused::Failed;
    let c_target = cstring(target.as_os_str(), "mountpoint", target).map_err(failed)?;
    let fstype = match &spec.block_device {
        Some(_) => format!("fuseblk.{}", spec.subtype),
        None => format!("fuse.{}", spec.subtype),
    };
    let c_fstype = cstring(OsStr::new(&fstype), "subtype", target).map_err(failed)?;

    let device = open_fuse_device().map_err(|(errno, msg)| {
        if errno == libc::EACCES {
            Refused::NotPermitted(msg)
        } else {
            Refused::Failed(msg)
        }
    })?;

    // The kernel parses these options itself (fs/fuse/inode.c). `rootmode` is the
    // S_IFMT|perm of the root inode before the first GETATTR (octal 40000 =
    // directory); fd/user_id/group_id are mandatory for a FUSE mount.
    // SAFETY: geteuid/getegid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let mut data = format!(
        "fd={},rootmode=40000,user_id={uid},group_id={gid}",
        std::os::fd::AsRawFd::as_raw_fd(&device)
    );
    if spec.allow_other {
        data.push_str(",allow_other");
    }
    if spec.default_permissions {
        data.push_str(",default_permissions");
    }
    let c_data = cstring(OsStr::new(&data), "mount options", target).map_err(failed)?;

    let mut flags = spec.ms_flags;
    if spec.read_only {
        flags |= libc::MS_RDONLY;
    }

    let mount_from = |source: &OsStr| -> Result<(), io::Error> {
        let c_source = CString::new(source.as_bytes())
            .map_err(|_| io::Error::other("the fsname contains a NUL byte"))?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c_source.as_ptr(),
                c_target.as_ptr(),
                c_fstype.as_ptr(),
                flags as libc::c_ulong,
                c_data.as_ptr().cast(),
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    };
    // A fuseblk mount's source must name its block device (the kernel opens it by path).
    let mounted = match &spec.block_device {
        Some(dev) => crate::loopdev::with_source_named(dev, &spec.fsname, mount_from),
        None => mount_from(OsStr::new(&spec.fsname)),
    };
    if let Err(err) = mounted {
        return Err(match err.raw_os_error() {
            Some(libc::EPERM) => {
                Refused::NotPermitted(format!("cannot mount {fstype} at {shown}: {err}"))
            }
            // mount(2) says ENODEV when the filesystem type is not registered.
            Some(libc::ENODEV) => Refused::Failed(format!(
                "cannot mount {fstype} at {shown}: {err} (is the fuse module loaded?)"
            )),
            _ => Refused::Failed(format!("cannot mount {fstype} at {shown}: {err}")),
        });
    }
    log::debug!("mounted {fstype} ({}) at {shown}", spec.fsname);
    Ok(FuseMount {
        device,
        mountpoint: target.clone(),
    })
}

fn open_fuse_device() -> Result<OwnedFd, (i32, String)> {
    // O_CLOEXEC: a child we spawn must not keep the connection alive (an open
    // device fd keeps the kernel from aborting it when we exit).
    // SAFETY: the path is a valid NUL-terminated string.
    let fd = unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        let errno = err.raw_os_error().unwrap_or(libc::EIO);
        return Err(match errno {
            libc::ENOENT | libc::ENODEV | libc::ENXIO => (
                errno,
                format!("cannot open /dev/fuse: {err} (is the fuse module loaded?)"),
            ),
            _ => (errno, format!("cannot open /dev/fuse: {err}")),
        });
    }
    // SAFETY: `fd` was just returned by open(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstring(value: &OsStr, what: &str, mountpoint: &Path) -> Result<CString, String> {
    CString::new(value.as_bytes()).map_err(|_| {
        format!(
            "cannot mount at {}: the {what} contains a NUL byte",
            mountpoint.display()
        )
    })
}

/// Unmount `path`. If it is busy (open files, a process's cwd), detach it lazily:
/// it disappears from the namespace now and is torn down when the last user goes.
///
/// Either way the kernel then ends the FUSE connection, so the device reader sees
/// ENODEV and the daemon can shut down.
pub fn unmount(path: &Path) -> io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "cannot unmount {}: path contains a NUL byte",
                path.display()
            ),
        )
    })?;
    // SAFETY: valid NUL-terminated path.
    if unsafe { libc::umount2(c_path.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EPERM) {
        // An unprivileged daemon's mount was made by fusermount3; it unmounts it too.
        return unmount_with_fusermount(path);
    }
    if err.raw_os_error() != Some(libc::EBUSY) {
        return Err(annotate(err, path));
    }
    log::warn!("{} is busy; detaching it lazily", path.display());
    // SAFETY: as above.
    if unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) } == 0 {
        return Ok(());
    }
    Err(annotate(io::Error::last_os_error(), path))
}

fn annotate(err: io::Error, path: &Path) -> io::Error {
    io::Error::new(
        err.kind(),
        format!("cannot unmount {}: {err}", path.display()),
    )
}

/// The setuid helper that mounts and unmounts FUSE for unprivileged users.
fn fusermount_program() -> &'static str {
    let on_path = |name: &str| {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
            .unwrap_or(false)
    };
    if on_path("fusermount3") || !on_path("fusermount") {
        "fusermount3"
    } else {
        "fusermount"
    }
}

/// Mounts through fusermount3, which opens /dev/fuse and mounts as root, then hands the
/// device descriptor back over a socket (`_FUSE_COMMFD`, SCM_RIGHTS) — the protocol libfuse
/// uses. fusermount3 adds nosuid,nodev for users itself.
fn mount_with_fusermount(spec: &MountSpec) -> Result<FuseMount, String> {
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;

    let (ours, theirs) =
        UnixStream::pair().map_err(|e| format!("cannot create a socket pair: {e}"))?;
    let mut options = vec![
        if spec.read_only { "ro" } else { "rw" }.to_string(),
        format!("fsname={}", spec.fsname.replace(',', "_")),
        format!("subtype={}", spec.subtype),
    ];
    if spec.default_permissions {
        options.push("default_permissions".into());
    }
    if spec.allow_other {
        options.push("allow_other".into());
    }
    for (bit, word) in [
        (libc::MS_NOEXEC, "noexec"),
        (libc::MS_NOATIME, "noatime"),
        (libc::MS_NODIRATIME, "nodiratime"),
        (libc::MS_SYNCHRONOUS, "sync"),
        (libc::MS_DIRSYNC, "dirsync"),
    ] {
        if spec.ms_flags & bit != 0 {
            options.push(word.into());
        }
    }
    let program = fusermount_program();
    let their_fd = std::os::fd::AsRawFd::as_raw_fd(&theirs);
    let mut command = std::process::Command::new(program);
    command
        .arg("-o")
        .arg(options.join(","))
        .arg("--")
        .arg(&spec.mountpoint)
        .env("_FUSE_COMMFD", their_fd.to_string())
        .stdin(std::process::Stdio::null());
    // SAFETY: only fcntl between fork and exec: the socket end must survive the exec.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(their_fd, libc::F_SETFD, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command
        .output()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    drop(theirs);
    if !output.status.success() {
        return Err(format!(
            "{program} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let device = receive_fd(&ours).map_err(|e| format!("{program} sent no descriptor: {e}"))?;
    log::debug!("mounted through {program} at {}", spec.mountpoint.display());
    Ok(FuseMount {
        device,
        mountpoint: spec.mountpoint.clone(),
    })
}

/// Receives one descriptor passed with SCM_RIGHTS.
fn receive_fd(socket: &std::os::unix::net::UnixStream) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one control message carrying one int, aligned like cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: zeroed msghdr, then every pointer set to a live buffer of the stated size.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: valid socket and message buffers.
    let n = unsafe { libc::recvmsg(socket.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: CMSG_* walk the control buffer recvmsg filled in.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(&msg);
        while !cmsg.is_null() {
            if (*cmsg).cmsg_level == libc::SOL_SOCKET && (*cmsg).cmsg_type == libc::SCM_RIGHTS {
                let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<libc::c_int>());
                return Ok(OwnedFd::from_raw_fd(fd));
            }
            cmsg = libc::CMSG_NXTHDR(&msg, cmsg);
        }
    }
    Err(io::Error::from_raw_os_error(libc::EPROTO))
}

fn unmount_with_fusermount(path: &Path) -> io::Result<()> {
    let program = fusermount_program();
    let status = std::process::Command::new(program)
        .args(["-u", "-z", "--"])
        .arg(path)
        .stdin(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "cannot unmount {}: {program} -u failed ({status})",
            path.display()
        )))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fresh empty directory under the system temp dir, removed on drop.
    pub(crate) struct TempDir(pub(crate) PathBuf);

    impl TempDir {
        pub(crate) fn new(tag: &str) -> TempDir {
            static COUNTER: AtomicUsize = AtomicUsize::new(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path =
                std::env::temp_dir().join(format!("ovlfuse-test-{}-{n}-{tag}", std::process::id()));
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Unmounts lazily on drop so a failing (panicking) test never leaves a mount
    /// behind. Declare it after the TempDir so it drops first.
    pub(crate) struct MountGuard(pub(crate) PathBuf);

    impl Drop for MountGuard {
        fn drop(&mut self) {
            let Ok(c) = CString::new(self.0.as_os_str().as_bytes()) else {
                return;
            };
            // Only detach if it is still mounted; EINVAL (not mounted) is fine.
            // SAFETY: valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }

    /// Run `f` on its own thread and fail the test instead of hanging with it
    /// (a FUSE request nobody answers blocks its caller forever).
    pub(crate) fn within<T: Send + 'static>(
        what: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let limit = std::time::Duration::from_secs(10);
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(limit)
            .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
    }

    pub(crate) fn is_root() -> bool {
        // SAFETY: trivial syscall.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn unescapes_mountinfo_octal() {
        assert_eq!(unescape_mountinfo(b"/a\\040b"), OsStr::new("/a b"));
        assert_eq!(
            unescape_mountinfo(b"/t\\011\\012\\134x"),
            OsStr::new("/t\t\n\\x")
        );
        // Not an escape: kept as is.
        assert_eq!(unescape_mountinfo(b"/a\\9b\\04"), OsStr::new("/a\\9b\\04"));
    }

    #[test]
    fn finds_mount_in_mountinfo() {
        let info = b"22 1 0:21 / /proc rw,nosuid - proc proc rw\n\
            99 22 0:50 / /mnt/my\\040dir rw shared:5 - fuse.ovlfuse src rw,user_id=0\n";
        assert_eq!(
            mounted_fstype(info, Path::new("/mnt/my dir")).as_deref(),
            Some("fuse.ovlfuse")
        );
        assert_eq!(mounted_fstype(info, Path::new("/mnt/my")), None);
    }

    #[test]
    fn check_mountpoint_rejects_bad_paths() {
        let dir = TempDir::new("check");
        assert_eq!(check_mountpoint(&dir.0), Ok(()));
        let missing = dir.0.join("missing");
        let err = check_mountpoint(&missing).unwrap_err();
        assert!(err.contains("does not exist"), "{err}");
        let file = dir.0.join("file");
        std::fs::write(&file, b"x").unwrap();
        let err = check_mountpoint(&file).unwrap_err();
        assert!(err.contains("is not a directory"), "{err}");
        let err = check_mountpoint(Path::new("/proc")).unwrap_err();
        assert_eq!(
            err,
            "mountpoint /proc is busy: already a mount point (proc); unmount it first"
        );
        let err = check_mountpoint(Path::new("/proc/../proc")).unwrap_err();
        assert!(err.contains("busy"), "{err}");
        let link = dir.0.join("link-to-proc");
        std::os::unix::fs::symlink("/proc", &link).unwrap();
        let err = check_mountpoint(&link).unwrap_err();
        assert!(
            err.ends_with("is busy: already a mount point (proc); unmount it first"),
            "{err}"
        );
        let sub = dir.0.join("sub");
        std::fs::create_dir(&sub).unwrap();
        let link = dir.0.join("link-to-sub");
        std::os::unix::fs::symlink(&sub, &link).unwrap();
        assert_eq!(check_mountpoint(&link), Ok(()));
        let dangling = dir.0.join("dangling");
        std::os::unix::fs::symlink(dir.0.join("nowhere"), &dangling).unwrap();
        let err = check_mountpoint(&dangling).unwrap_err();
        assert!(err.contains("dangling"), "{err}");
    }

    /// Mount a minimal fuser filesystem directly on the device (no relay), list
    /// it, and unmount; fuser's loop must see ENODEV and return Ok.
    #[test]
    fn mount_and_unmount_with_fuser() {
        if !is_root() {
            eprintln!("skipping: needs root for mount(2)");
            return;
        }
        struct Empty;
        impl fuser::Filesystem for Empty {
            fn getattr(
                &self,
                _req: &fuser::Request,
                _ino: fuser::INodeNo,
                _fh: Option<fuser::FileHandle>,
                reply: fuser::ReplyAttr,
            ) {
                let t = std::time::UNIX_EPOCH;
                reply.attr(
                    &std::time::Duration::ZERO,
                    &fuser::FileAttr {
                        ino: fuser::INodeNo::ROOT,
                        size: 0,
                        blocks: 0,
                        atime: t,
                        mtime: t,
                        ctime: t,
                        crtime: t,
                        kind: fuser::FileType::Directory,
                        perm: 0o755,
                        nlink: 2,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        blksize: 4096,
                        flags: 0,
                    },
                );
            }
        }

        let dir = TempDir::new("mount");
        let spec = MountSpec {
            mountpoint: dir.0.clone(),
            fsname: "ovlfuse-test".into(),
            subtype: "ovlfuse".into(),
            ms_flags: libc::MS_NOSUID | libc::MS_NODEV,
            allow_other: true,
            default_permissions: true,
            read_only: false,
            block_device: None,
        };
        let mounted = mount(&spec).unwrap();
        let _guard = MountGuard(dir.0.clone());
        assert_eq!(mounted.mountpoint(), dir.0.as_path());

        // Before anyone answered INIT: the check must not touch the mount.
        let err = within("check_mountpoint", {
            let dir = dir.0.clone();
            move || check_mountpoint(&dir).unwrap_err()
        });
        assert!(
            err.contains("is busy: already a mount point (fuse.ovlfuse)"),
            "{err}"
        );
        let err = within("second mount", {
            let spec = spec.clone();
            move || mount(&spec).unwrap_err()
        });
        assert!(err.contains("busy"), "{err}");

        let session = fuser::Session::from_fd(
            Empty,
            mounted.into_device(),
            fuser::SessionACL::All,
            fuser::Config::default(),
        )
        .unwrap();
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(session.run());
        });

        let meta = within("stat", {
            let dir = dir.0.clone();
            move || std::fs::metadata(dir).unwrap()
        });
        assert!(meta.is_dir());
        assert_eq!(std::os::unix::fs::MetadataExt::mode(&meta) & 0o7777, 0o755);

        within("umount", {
            let dir = dir.0.clone();
            move || unmount(&dir)
        })
        .unwrap();
        let result = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("fuser session did not end after unmount");
        result.unwrap();
        assert_eq!(check_mountpoint(&dir.0), Ok(()));
    }
}
