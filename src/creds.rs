//! Acting as the caller while making an object in the upper layer.
//!
//! Owns: the calling thread's fsuid/fsgid while one object is made. A new object then gets
//! the caller's owner from the upper filesystem itself, in the one system call that makes
//! it, as under the kernel overlay (which creates with the mounter's credentials but the
//! caller's fsuid/fsgid): nothing made in place ever shows the daemon's owner, even if the
//! daemon dies half-way, and no chown, rename or work-dir entry is needed. The thread keeps
//! its capabilities meanwhile (`SECBIT_NO_SETUID_FIXUP`), so what the daemon may do in the
//! upper layer does not change — only who owns what it makes.
//! Must never: leave a thread acting as a caller after the object is made (the guard puts
//! the ids back, also when unwinding), or change any credential but fsuid and fsgid.

use std::cell::Cell;

use crate::sys;

/// Whether this thread can act as a caller, probed once per thread: its own fsuid/fsgid to
/// go back to, or `None` if it cannot keep its capabilities across an fsuid change (no
/// CAP_SETPCAP).
#[derive(Clone, Copy)]
enum Ability {
    Unknown,
    Able { uid: u32, gid: u32 },
    Unable,
}

thread_local! {
    static ABILITY: Cell<Ability> = const { Cell::new(Ability::Unknown) };
}

fn ability() -> Ability {
    ABILITY.with(|cell| {
        if let Ability::Unknown = cell.get() {
            let found = match sys::keep_caps_across_fsuid() {
                Ok(()) => {
                    let (uid, gid) = sys::fs_ids();
                    Ability::Able { uid, gid }
                }
                Err(e) => {
                    log::debug!("objects are staged in the work dir: cannot keep capabilities across an fsuid change: {e}");
                    Ability::Unable
                }
            };
            cell.set(found);
        }
        cell.get()
    })
}

/// The thread acts as a caller until this is dropped.
#[must_use = "the thread acts as the caller only while the guard lives"]
pub struct ActingAs {
    /// The thread's own ids, put back on drop; `None` when they were the caller's already.
    home: Option<(u32, u32)>,
}

impl Drop for ActingAs {
    fn drop(&mut self) {
        if let Some((uid, gid)) = self.home {
            sys::restore_fs_ids(uid, gid);
        }
    }
}

/// Makes the calling thread act as `uid`/`gid` for file system access; `None` if it cannot
/// (then the object must be made another way: staged and chowned).
pub fn act_as(uid: u32, gid: u32) -> Option<ActingAs> {
    let Ability::Able {
        uid: home_uid,
        gid: home_gid,
    } = ability()
    else {
        return None;
    };
    if (uid, gid) == (home_uid, home_gid) {
        return Some(ActingAs { home: None });
    }
    // The thread is at home whenever no guard lives, so home is what it has now.
    match sys::set_fs_ids(uid, gid, (home_uid, home_gid)) {
        Ok(()) => Some(ActingAs {
            home: Some((home_uid, home_gid)),
        }),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acting_as_changes_only_this_thread_until_dropped() {
        // Root's own test threads can always keep capabilities; skip elsewhere.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let before = sys::fs_ids();
        // Another thread, started before (a thread started later would inherit the ids).
        let (ask, asked) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || {
            asked.recv().unwrap();
            sys::fs_ids()
        });
        let guard = act_as(4242, 4343).expect("root can act as a caller");
        assert_eq!(sys::fs_ids(), (4242, 4343));
        ask.send(()).unwrap();
        assert_eq!(other.join().unwrap(), before);
        drop(guard);
        assert_eq!(sys::fs_ids(), before);
    }

    #[test]
    fn an_id_the_kernel_refuses_leaves_the_thread_as_it_was() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let before = sys::fs_ids();
        // (uid_t)-1 is never a valid fsuid; the gid alone would have been taken.
        assert!(act_as(u32::MAX, 4343).is_none());
        assert_eq!(sys::fs_ids(), before);
    }

    #[test]
    fn acting_as_keeps_the_capabilities_to_write_anywhere() {
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = std::env::temp_dir().join(format!("ovlfuse-creds-{}", std::process::id()));
        std::fs::create_dir(&dir).unwrap();
        // A directory only root may write to, as an upper directory can be.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .unwrap();
        let made = {
            let _guard = act_as(4242, 4343).unwrap();
            std::fs::write(dir.join("f"), b"x")
        };
        let meta = std::fs::metadata(dir.join("f"));
        std::fs::remove_dir_all(&dir).unwrap();
        made.expect("created with CAP_DAC_OVERRIDE kept");
        let meta = meta.unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
    }
}
