//! Merged directory listings.
//!
//! Owns: turning the layer directories of one merged directory into the single listing a
//! user sees — top layer first, each name once, whited-out and shadowed names hidden, marker
//! entries never shown — taken as a snapshot so offsets stay stable while a reader walks it
//! (telldir/seekdir and a restarted readdir see the same sequence). Must never: stat every
//! entry when the layer's `d_type` already says what it is.

use std::collections::HashSet;
use std::ffi::OsString;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;

use crate::inodes::InodeTable;
use crate::layers::LayerStack;
use crate::lookup::LayerDir;
use crate::sys;
use crate::whiteout::{self, NameKind};

/// One entry of a merged listing.
#[derive(Debug, Clone)]
pub struct Entry {
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
            name: ".".into(),
            ino: dir_ino,
            file_type: libc::S_IFDIR,
        },
        Entry {
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
        let raw = sys::read_dir(layer_dir.obj.fd()?.as_fd())?;
        let mut hidden_here: Vec<OsString> = Vec::new();
        for e in raw {
            let bytes = e.name.as_bytes();
            if bytes == b"." || bytes == b".." {
                continue;
            }
            match whiteout::classify(&e.name) {
                NameKind::Visible => {}
                NameKind::AufsWhiteout(target) => {
                    hidden_here.push(OsString::from(std::ffi::OsStr::from_bytes(target)));
                    continue;
                }
                NameKind::AufsPrivate => continue,
            }
            if decided.contains(&e.name) {
                continue;
            }
            let (file_type, is_whiteout) = entry_type(layer_dir, &e)?;
            if is_whiteout {
                decided.insert(e.name);
                continue;
            }
            entries.push(Entry {
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
    Ok(entries)
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
