//! Volatile mode at mount time: the marker a volatile mount leaves in the work directory, the
//! refusal every mount makes while such a marker is there, and the unseen-writeback-error check
//! of a volatile mount — the kernel overlayfs's rules, so that either can mount what the other
//! left, and neither mounts what the other would refuse.
//!
//! Owns: `workdir/work/incompat/` (read at every mount with a work directory; for a volatile
//! mount, `incompat/volatile/dirty` is created there) and the check of the upper filesystem's
//! writeback-error state before a volatile mount. Must never: remove or rename anything under
//! `incompat/` (only the user can decide that an upper layer written without flushes is
//! complete after a crash); reach the work directory by path (everything starts from the held
//! `workdir/work` handle, one name component at a time); or run once anything is mounted (each
//! refusal here has to leave nothing mounted). The runtime half of volatile mode (never
//! flushing, poisoning after a writeback error) is not here.
//!
//! # What the kernel does (measured on Linux 6.18: `mount -t overlay`, mount(2)'s errno, dmesg)
//!
//! - A volatile mount (`-o volatile`; the mount table shows `fsync=volatile`) creates
//!   `workdir/work/incompat/volatile/dirty`: the directories `incompat` and `volatile` with mode
//!   000, `dirty` an empty regular file with mode 000, all owned by the mounter. `ro,volatile`
//!   creates it too. Unmounting leaves it in place: the kernel never removes it.
//! - Every mount with an upper and a work directory — volatile or not, `rw` or `ro` — then
//!   fails with EINVAL while `work/incompat` holds any entry (file or directory) whose name does
//!   not start with `.`, logging `overlayfs: overlay with incompat feature 'NAME' cannot be
//!   mounted` for the first such entry in directory order. Removing only `dirty` is not enough:
//!   `incompat/volatile` itself has to go. Any other name (`incompat/foo`) refuses the same way,
//!   naming itself. Nothing is created or removed by a refused mount.
//! - An empty `incompat` directory, a non-directory named `incompat`, or only dot-names inside
//!   it refuse nothing. (The kernel then deletes them, as it empties all of `work` at every
//!   mount; ovlfuse leaves them alone: `copy_up::clean_work_dir` removes only ovlfuse's own
//!   temporary names, so never `incompat`.)
//! - A volatile mount of an upper whose filesystem has a writeback error nobody has seen yet
//!   fails with EIO: `overlayfs: Cannot mount volatile when upperdir has an unseen error. Sync
//!   upperdir fs to clear state.` The kernel checks this before it looks at the work directory
//!   (so this refusal wins over the incompat one) and without marking the error seen: a retry
//!   fails the same way until someone syncs the upper filesystem. Non-volatile mounts do not
//!   check.
//! - Without an upper layer `volatile` is ignored ("meaningless in a non-upper mount"):
//!   nothing is checked or created.
//!
//! # How ovlfuse matches it
//!
//! [`apply_at_mount`] runs the checks in the kernel's order, in the process the caller waits
//! for, before anything is mounted: a refusal is a message containing the kernel's sentence,
//! and the mount command exits 1. Where it differs, and why:
//! - Userspace cannot read the upper superblock's error sequence without advancing it. A
//!   freshly opened descriptor samples it as 0 while the error is unseen, so `syncfs(2)` on one
//!   reports exactly "an error nobody has seen" — but also flushes the whole upper filesystem
//!   once at mount (harmless: the volatile mount has written nothing yet) and marks the error
//!   seen. So ovlfuse refuses once, reporting the error, and a retry mounts, as after the sync
//!   the kernel's message asks for; the kernel refuses until someone syncs. A writeback error
//!   that this flush itself runs into refuses too (nobody had seen it either).
//! - The kernel makes the marker's directories mode 000 and creates inside them by its
//!   capability to override permissions. ovlfuse does the same when this process can (root,
//!   or root of a user namespace that owns the work directory); a daemon that cannot (an
//!   unprivileged `fusermount3` mount) gives the directories it creates mode 0700 instead,
//!   so that it can create the marker, and its user remove it.
//! - The marker is flushed (the file, then each directory up to `work`): a volatile mount
//!   flushes nothing else, and the marker is what has to survive a crash.
//! - As with the kernel, a marker created for a mount that fails at a later step stays.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::layers::{LayerRole, LayerStack};
use crate::options::MountConfig;
use crate::sys;

/// `workdir/work/incompat`: one entry per on-disk feature a mount must understand.
pub const INCOMPAT: &CStr = c"incompat";
/// The feature a volatile mount sets.
pub const VOLATILE: &CStr = c"volatile";
/// The file inside `incompat/volatile` a volatile mount creates.
pub const DIRTY: &CStr = c"dirty";

/// The kernel's words for a volatile mount refused for an unseen upper writeback error.
pub const UNSEEN_ERROR_REFUSAL: &str =
    "Cannot mount volatile when upperdir has an unseen error. Sync upperdir fs to clear state.";

/// The kernel's words for a mount refused for a feature marked in `work/incompat`.
pub fn incompat_refusal(feature: &str) -> String {
    format!("overlay with incompat feature '{feature}' cannot be mounted")
}

/// Every volatile-related mount-time rule for `config`, in the kernel's order: a volatile
/// mount refuses an upper with an unseen writeback error; every mount with a work directory
/// refuses a marked one; a volatile mount then marks it. No-op without an upper layer.
pub fn apply_at_mount(stack: &LayerStack, config: &MountConfig) -> Result<(), String> {
    let upper = stack.layers.first().filter(|l| l.role == LayerRole::Upper);
    let (Some(upper), Some(work)) = (upper, &stack.work) else {
        return Ok(());
    };
    let workdir = config.workdir.as_deref().unwrap_or(Path::new("workdir"));
    if config.volatile {
        check_no_unseen_upper_error(upper.root.as_fd(), &upper.path)?;
    }
    check_incompat(work.as_fd(), workdir)?;
    if config.volatile {
        mark_dirty(work.as_fd(), workdir)?;
    }
    Ok(())
}

/// Refuses the mount while `work/incompat` names a feature (an entry not starting with `.`),
/// as the kernel does, whether this mount is volatile or not. `work` is the held
/// `workdir/work` handle; `workdir` is only used in the message.
pub fn check_incompat(work: BorrowedFd<'_>, workdir: &Path) -> Result<(), String> {
    let dir = format!("{}/work/incompat", workdir.display());
    let features =
        incompat_features(work).map_err(|e| format!("workdir: cannot read {dir}: {e}"))?;
    let Some(first) = features.first() else {
        return Ok(());
    };
    let why = if first == "volatile" {
        "a volatile mount of this upper layer left it there: what that mount wrote was never \
         flushed, so after a crash the upper layer may be incomplete"
    } else {
        "an on-disk feature ovlfuse does not support"
    };
    let also: String = features[1..]
        .iter()
        .map(|f| format!("; then also {dir}/{f}"))
        .collect();
    Err(format!(
        "workdir: {}: remove {dir}/{first} to mount again ({why}){also}",
        incompat_refusal(first)
    ))
}

/// The names under `work/incompat` the kernel counts as features, in directory order (the
/// kernel names the first one).
fn incompat_features(work: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let dir = match sys::open_at(work, INCOMPAT, libc::O_PATH | libc::O_DIRECTORY) {
        Ok(d) => d,
        // No `incompat`, or not a directory (not followed if a symlink): no feature.
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ENOTDIR)) => {
            return Ok(Vec::new());
        }
        Err(e) => return Err(e),
    };
    Ok(sys::read_dir(dir.as_fd())?
        .into_iter()
        .filter(|e| !e.name.as_bytes().starts_with(b"."))
        .map(|e| e.name.to_string_lossy().into_owned())
        .collect())
}

/// Refuses a volatile mount while the upper filesystem has a writeback error nobody has seen,
/// as the kernel does. The only userspace probe is `syncfs(2)` on a freshly opened descriptor
/// (whose sample of the error sequence is 0 while the error is unseen): it flushes the upper
/// filesystem once, and marks the error seen — so a retry mounts (see the module doc).
pub fn check_no_unseen_upper_error(
    upper_root: BorrowedFd<'_>,
    upperdir: &Path,
) -> Result<(), String> {
    let fresh = sys::reopen(upper_root, libc::O_RDONLY | libc::O_DIRECTORY)
        .map_err(|e| format!("upperdir: cannot open {}: {e}", upperdir.display()))?;
    sys::syncfs(fresh.as_fd()).map_err(|e| {
        format!(
            "upperdir {}: {UNSEEN_ERROR_REFUSAL} (syncfs reports: {e}: data written to this \
             filesystem earlier did not reach the disk; this check was itself that sync, so the \
             next mount will not be refused for this error)",
            upperdir.display()
        )
    })
}

/// Creates `work/incompat/volatile/dirty` as the kernel does (mode 000 throughout; see the
/// module doc for a daemon that cannot override permissions) and flushes it, so that every
/// later mount of this work directory, by ovlfuse or the kernel, is refused until the user
/// removes `incompat/volatile`.
pub fn mark_dirty(work: BorrowedFd<'_>, workdir: &Path) -> Result<(), String> {
    let fail = |rel: &str, e: io::Error| {
        let why = match e.raw_os_error() {
            Some(libc::ENOTDIR) => "exists and is not a directory".to_string(),
            _ => e.to_string(),
        };
        format!(
            "workdir: cannot create {}/work/{rel} for the volatile mount: {why}",
            workdir.display()
        )
    };
    let incompat = make_dir(work, INCOMPAT).map_err(|e| fail("incompat", e))?;
    let volatile =
        make_dir(incompat.as_fd(), VOLATILE).map_err(|e| fail("incompat/volatile", e))?;
    match sys::create_file_at(volatile.as_fd(), DIRTY, 0) {
        Ok(file) => sys::sync_fd(file.as_fd(), false),
        // A marker already there (a race with another mount) is the same marker.
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
    .map_err(|e| fail("incompat/volatile/dirty", e))?;
    for (dir, rel) in [
        (volatile.as_fd(), "incompat/volatile"),
        (incompat.as_fd(), "incompat"),
        (work, "."),
    ] {
        sys::open_at(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY)
            .and_then(|d| sys::sync_fd(d.as_fd(), false))
            .map_err(|e| {
                format!(
                    "workdir: cannot flush {}/work/{rel} for the volatile mount: {e}",
                    workdir.display()
                )
            })?;
    }
    Ok(())
}

/// `name` in `parent` as a directory, created with the kernel's mode 000 if missing; returns
/// an `O_PATH` handle. A process that cannot override permissions gets mode 0700 instead, or
/// it could not create anything inside.
fn make_dir(parent: BorrowedFd<'_>, name: &CStr) -> io::Result<OwnedFd> {
    let created = match sys::mkdir_at(parent, name, 0) {
        Ok(()) => true,
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => false,
        Err(e) => return Err(e),
    };
    if created && sys::access_at(parent, name, libc::R_OK | libc::W_OK | libc::X_OK).is_err() {
        sys::chmod_at(parent, name, 0o700)?;
    }
    // O_DIRECTORY with the O_NOFOLLOW open_at adds: a non-directory, or a symlink, under this
    // name is an error (ENOTDIR), never followed.
    sys::open_at(parent, name, libc::O_PATH | libc::O_DIRECTORY)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    /// A temporary `workdir` with its `work` directory, and the held handle on `work`.
    struct Env {
        _dir: tempfile::TempDir,
        workdir: PathBuf,
        work: OwnedFd,
    }

    impl Env {
        fn new() -> Env {
            let dir = tempfile::tempdir().unwrap();
            let workdir = dir.path().join("w");
            std::fs::create_dir_all(workdir.join("work")).unwrap();
            let work = sys::open_dir_path(&workdir.join("work")).unwrap();
            Env {
                _dir: dir,
                workdir,
                work,
            }
        }

        fn p(&self, rel: &str) -> PathBuf {
            self.workdir.join("work").join(rel)
        }

        fn check(&self) -> Result<(), String> {
            check_incompat(self.work.as_fd(), &self.workdir)
        }

        fn mark(&self) -> Result<(), String> {
            mark_dirty(self.work.as_fd(), &self.workdir)
        }
    }

    fn mode_of(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode()
    }

    fn is_root() -> bool {
        // SAFETY: geteuid cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    #[test]
    fn mark_dirty_creates_the_kernels_marker_with_mode_000() {
        let e = Env::new();
        e.mark().unwrap();
        assert_eq!(mode_of(&e.p("incompat")), libc::S_IFDIR); // mode 000
        assert_eq!(mode_of(&e.p("incompat/volatile")), libc::S_IFDIR); // mode 000
        let dirty = std::fs::symlink_metadata(e.p("incompat/volatile/dirty")).unwrap();
        assert_eq!(dirty.mode(), libc::S_IFREG); // mode 000
        assert_eq!(dirty.len(), 0);
    }

    #[test]
    fn marked_work_dir_is_refused_naming_the_feature_and_the_path() {
        let e = Env::new();
        e.mark().unwrap();
        let msg = e.check().unwrap_err();
        assert!(
            msg.contains("overlay with incompat feature 'volatile' cannot be mounted"),
            "{msg}"
        );
        let path = format!("remove {}/work/incompat/volatile ", e.workdir.display());
        assert!(msg.contains(&path), "{msg}");
    }

    #[test]
    fn removing_only_dirty_still_refuses_removing_volatile_allows() {
        let e = Env::new();
        e.mark().unwrap();
        std::fs::remove_file(e.p("incompat/volatile/dirty")).unwrap();
        assert!(e.check().is_err());
        std::fs::remove_dir(e.p("incompat/volatile")).unwrap();
        e.check().unwrap();
    }

    #[test]
    fn any_feature_name_refuses_dot_names_and_empty_incompat_do_not() {
        let e = Env::new();
        e.check().unwrap(); // no incompat at all
        std::fs::create_dir(e.p("incompat")).unwrap();
        e.check().unwrap();
        std::fs::write(e.p("incompat/.hidden"), b"").unwrap();
        std::fs::create_dir(e.p("incompat/.h")).unwrap();
        e.check().unwrap();
        std::fs::write(e.p("incompat/foo"), b"").unwrap();
        let msg = e.check().unwrap_err();
        assert!(
            msg.contains("overlay with incompat feature 'foo' cannot be mounted"),
            "{msg}"
        );
    }

    #[test]
    fn every_feature_is_named_in_the_refusal() {
        let e = Env::new();
        std::fs::create_dir_all(e.p("incompat/a")).unwrap();
        std::fs::create_dir_all(e.p("incompat/b")).unwrap();
        let msg = e.check().unwrap_err();
        let a = format!("{}/work/incompat/a", e.workdir.display());
        let b = format!("{}/work/incompat/b", e.workdir.display());
        assert!(msg.contains(&a) && msg.contains(&b), "{msg}");
    }

    #[test]
    fn incompat_that_is_not_a_directory_refuses_nothing() {
        let e = Env::new();
        std::fs::write(e.p("incompat"), b"").unwrap();
        e.check().unwrap();
        std::fs::remove_file(e.p("incompat")).unwrap();
        // A symlink to a marked directory elsewhere is not followed.
        let elsewhere = e.workdir.join("elsewhere");
        std::fs::create_dir_all(elsewhere.join("volatile")).unwrap();
        std::os::unix::fs::symlink(&elsewhere, e.p("incompat")).unwrap();
        e.check().unwrap();
        // ... and a volatile mount cannot mark through it.
        let msg = e.mark().unwrap_err();
        assert!(msg.contains("exists and is not a directory"), "{msg}");
        assert!(!elsewhere.join("volatile/dirty").exists());
    }

    #[test]
    fn mark_dirty_reuses_an_existing_incompat_directory() {
        let e = Env::new();
        std::fs::create_dir(e.p("incompat")).unwrap();
        std::fs::set_permissions(e.p("incompat"), std::fs::Permissions::from_mode(0o755)).unwrap();
        e.mark().unwrap();
        assert_eq!(mode_of(&e.p("incompat")), libc::S_IFDIR | 0o755);
        assert!(e.p("incompat/volatile/dirty").exists());
    }

    #[test]
    fn clean_work_dir_never_removes_incompat() {
        let e = Env::new();
        e.mark().unwrap();
        // a leftover of an interrupted copy-up next to it
        let leftover = crate::copy_up::temp_name();
        sys::mkdir_at(e.work.as_fd(), &leftover, 0o700).unwrap();
        assert_eq!(crate::copy_up::clean_work_dir(e.work.as_fd()).unwrap(), 1);
        assert!(e.p("incompat/volatile/dirty").exists());
        assert!(e.check().is_err());
    }

    #[test]
    fn healthy_upper_passes_the_unseen_error_check() {
        let e = Env::new();
        let upper = sys::open_dir_path(&e.workdir).unwrap();
        check_no_unseen_upper_error(upper.as_fd(), &e.workdir).unwrap();
    }

    /// Without the capability to override permissions (here: a child process that dropped
    /// to nobody), the marker's directories get 0700, or nothing could be created inside.
    #[test]
    fn unprivileged_mark_dirty_uses_0700_directories() {
        if !is_root() {
            eprintln!("skipped: needs root to switch to an unprivileged user");
            return;
        }
        let e = Env::new();
        let nobody = 65534;
        std::os::unix::fs::chown(e.p(""), Some(nobody), Some(nobody)).unwrap();
        std::fs::set_permissions(
            e.workdir.parent().unwrap(),
            PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        std::fs::set_permissions(&e.workdir, PermissionsExt::from_mode(0o755)).unwrap();
        let work = e.work.try_clone().unwrap();
        let workdir = e.workdir.clone();
        // SAFETY: the child only makes system calls and exits without unwinding.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            // SAFETY: plain system calls in the child.
            let ok = unsafe {
                libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(nobody, nobody, nobody) == 0
                    && libc::setresuid(nobody, nobody, nobody) == 0
            } && mark_dirty(work.as_fd(), &workdir).is_ok();
            // SAFETY: leaving the child without running the parent's destructors.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        assert_eq!(mode_of(&e.p("incompat")), libc::S_IFDIR | 0o700);
        assert_eq!(mode_of(&e.p("incompat/volatile")), libc::S_IFDIR | 0o700);
        assert_eq!(
            mode_of(&e.p("incompat/volatile/dirty")),
            libc::S_IFREG // mode 000
        );
        assert_eq!(
            std::fs::metadata(e.p("incompat/volatile")).unwrap().uid(),
            nobody
        );
    }
}
