//! Merged directory listings.
//!
//! Owns: turning the layer directories of one merged directory into the single listing a
//! user sees — top layer first, each name once, whited-out and shadowed names hidden, marker
//! entries never shown — taken as a snapshot, in the order of each name's cookie. A cookie is
//! a keyed hash of the name (as ext4's hashed directories do), so it is the same in every
//! snapshot of the directory for the life of the daemon: an offset handed out by one open
//! (telldir, or the kernel's directory cache resuming where its cached part ends) means the
//! same place in any other, and a name added or removed meanwhile never makes a reader see
//! another name twice or miss one. Must never: stat every entry when the layer's `d_type`
//! already says what it is — only the regular files of a directory marked as holding xattr
//! whiteouts are looked at more closely.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::sync::OnceLock;

use crate::inodes::InodeTable;
use crate::layers::LayerStack;
use crate::lookup::LayerDir;
use crate::sys;
use crate::whiteout::{self, NameKind};

/// One entry of a merged listing.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Where a reader continues after this entry (readdir's `d_off`).
    pub cookie: u64,
    pub name: OsString,
    pub ino: u64,
    /// `S_IFMT` bits.
    pub file_type: u32,
}

/// Builds the listing of the merged directory made of `merged` (`.` and `..` first).
pub fn list(
    stack: &LayerStack,
    inodes: &InodeTable,
    merged: &[LayerDir],
    dir_ino: u64,
    parent_ino: u64,
) -> io::Result<Vec<Entry>> {
    let mut entries = vec![
        Entry {
            cookie: DOT_COOKIE,
            name: ".".into(),
            ino: dir_ino,
            file_type: libc::S_IFDIR,
        },
        Entry {
            cookie: DOTDOT_COOKIE,
            name: "..".into(),
            ino: parent_ino,
            file_type: libc::S_IFDIR,
        },
    ];
    // Names decided by a higher layer: shown, whited out, or hidden by a non-directory.
    let mut decided: HashSet<OsString> = HashSet::new();
    let layers = merged.len();
    for (position, layer_dir) in merged.iter().enumerate() {
        let dev = stack.layers[layer_dir.layer as usize].dev;
        let dir = layer_dir.obj.fd()?;
        let raw = sys::read_dir(dir.as_fd())?;
        let xwhiteouts = may_hold_xwhiteouts(stack, layer_dir)
            && whiteout::holds_xwhiteouts(dir.as_fd(), &stack.private.opaque)?;
        let mut hidden_here: Vec<OsString> = Vec::new();
        for e in raw {
            let bytes = e.name.as_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            match whiteout::classify(&e.name) {
                NameKind::Visible => {}
                NameKind::AufsWhiteout(target) => {
                    hidden_here.push(OsString::from(OsStr::from_bytes(target)));
                    continue;
                }
                NameKind::AufsPrivate => continue,
            }
            if decided.contains(&e.name) {
                continue;
            }
            let (file_type, is_whiteout) = entry_type(layer_dir, &e)?;
            let is_whiteout = is_whiteout
                || (xwhiteouts
                    && file_type == libc::S_IFREG
                    && whiteout::is_xattr_whiteout_at(
                        dir.as_fd(),
                        &sys::component(&e.name)?,
                        &stack.private.whiteout,
                    )?);
            if is_whiteout {
                decided.insert(e.name);
                continue;
            }
            entries.push(Entry {
                cookie: cookie_of(&e.name),
                name: e.name.clone(),
                ino: inodes.ino_of((dev, e.ino)),
                file_type,
            });
            decided.insert(e.name);
        }
        // An AUFS whiteout hides the name only in the layers below its own.
        if position + 1 < layers {
            decided.extend(hidden_here);
        }
    }
    order_by_cookie(&mut entries);
    Ok(entries)
}

/// Whether the kernel looks for the "x" mark (xattr whiteouts inside) on this layer's
/// directory: not in the upper layer, nor in the bottom layer of the mount, where it expects
/// none. Elsewhere the mark costs one xattr read per listing of each such layer directory,
/// and only a marked directory has its regular files' xattrs read.
fn may_hold_xwhiteouts(stack: &LayerStack, dir: &LayerDir) -> bool {
    let upper = dir.layer == 0 && stack.has_upper();
    let bottom = dir.layer as usize + 1 >= stack.layers.len();
    !upper && !bottom
}

const DOT_COOKIE: u64 = 1;
const DOTDOT_COOKIE: u64 = 2;

/// The cookie of a name: a hash keyed once per process (so names cannot be chosen to
/// collide), in 62 bits above the two cookies of `.` and `..` (offsets are signed 64-bit in
/// the kernel, and 0 means the start).
fn cookie_of(name: &OsStr) -> u64 {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    let hash = KEY.get_or_init(RandomState::new).hash_one(name.as_bytes());
    (hash >> 2) + DOTDOT_COOKIE + 1
}

/// Sorts a listing by cookie. Two names of one directory with the same hash (about one
/// chance in 2^62 per pair) get consecutive cookies in name order: still distinct, and
/// stable as long as no third name lands between them.
fn order_by_cookie(entries: &mut [Entry]) {
    entries.sort_unstable_by(|a, b| (a.cookie, &a.name).cmp(&(b.cookie, &b.name)));
    for i in 1..entries.len() {
        if entries[i].cookie <= entries[i - 1].cookie {
            entries[i].cookie = entries[i - 1].cookie + 1;
        }
    }
}

/// The index of the first entry a reader at `offset` has not seen yet.
pub fn resume_at(entries: &[Entry], offset: u64) -> usize {
    entries.partition_point(|e| e.cookie <= offset)
}

/// The type of a raw entry, and whether it is a kernel-format whiteout. Only character
/// devices (and filesystems that do not fill `d_type`) need a stat.
fn entry_type(dir: &LayerDir, e: &sys::RawDirEntry) -> io::Result<(u32, bool)> {
    let from_dtype = match e.d_type {
        libc::DT_REG => Some(libc::S_IFREG),
        libc::DT_DIR => Some(libc::S_IFDIR),
        libc::DT_LNK => Some(libc::S_IFLNK),
        libc::DT_FIFO => Some(libc::S_IFIFO),
        libc::DT_SOCK => Some(libc::S_IFSOCK),
        libc::DT_BLK => Some(libc::S_IFBLK),
        _ => None,
    };
    if let Some(t) = from_dtype {
        return Ok((t, false));
    }
    let name = sys::component(&e.name)?;
    match sys::stat_at(dir.obj.fd()?.as_fd(), &name)? {
        Some(st) => Ok((st.st_mode & libc::S_IFMT, whiteout::is_whiteout(&st))),
        // Vanished between listing and stat: treat as not there.
        None => Ok((0, true)),
    }
}

/// Whether the merged directory made of `merged` shows no entries besides `.` and `..`
/// (rmdir, and rename over a directory, need it empty).
pub fn is_empty(stack: &LayerStack, inodes: &InodeTable, merged: &[LayerDir]) -> io::Result<bool> {
    Ok(list(stack, inodes, merged, 0, 0)?.len() <= 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str) -> Entry {
        Entry {
            cookie: cookie_of(name.as_ref()),
            name: name.into(),
            ino: 0,
            file_type: libc::S_IFREG,
        }
    }

    /// A reader that stopped after some entry of one snapshot continues in another snapshot
    /// (with names added and removed) right after that entry's cookie: every name present in
    /// both is seen exactly once.
    #[test]
    fn offsets_mean_the_same_place_in_every_snapshot() {
        let mut first: Vec<Entry> = (0..500).map(|i| entry(&format!("n{i}"))).collect();
        order_by_cookie(&mut first);
        let mut second: Vec<Entry> = (0..500)
            .filter(|i| i % 7 != 0)
            .chain(500..600)
            .map(|i| entry(&format!("n{i}")))
            .collect();
        order_by_cookie(&mut second);
        for stop in [0, 1, 123, 499] {
            let seen: Vec<&OsString> = first[..=stop].iter().map(|e| &e.name).collect();
            let rest = &second[resume_at(&second, first[stop].cookie)..];
            for i in (0..500).filter(|i| i % 7 != 0) {
                let name = OsString::from(format!("n{i}"));
                let times = seen.iter().filter(|n| ***n == name).count()
                    + rest.iter().filter(|e| e.name == name).count();
                assert_eq!(times, 1, "{name:?} seen {times} times (stopped at {stop})");
            }
        }
        assert!(first.iter().all(|e| e.cookie > DOTDOT_COOKIE));
        assert!(first.windows(2).all(|w| w[0].cookie < w[1].cookie));
    }

    #[test]
    fn colliding_hashes_still_get_distinct_increasing_cookies() {
        let mut entries: Vec<Entry> = ["b", "a", "c"]
            .iter()
            .map(|n| Entry {
                cookie: 10,
                ..entry(n)
            })
            .collect();
        order_by_cookie(&mut entries);
        let got: Vec<(u64, &str)> = entries
            .iter()
            .map(|e| (e.cookie, e.name.to_str().unwrap_or("")))
            .collect();
        assert_eq!(got, vec![(10, "a"), (11, "b"), (12, "c")]);
    }
}
