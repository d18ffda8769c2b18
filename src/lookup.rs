//! Lookup across layers: which layer's object a name in a merged directory stands for.
//!
//! Owns: the union rules of the kernel overlay for one name — the topmost layer that has the
//! name wins; a whiteout (kernel 0/0 device or AUFS `.wh.NAME`) ends the search; a directory
//! merges with same-named directories below it until one is opaque; a non-directory hides
//! everything below. Must never: open anything but single components under held handles.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::layers::{LayerIndex, LayerStack};
use crate::sys;
use crate::whiteout::{self, NameKind};

/// A directory of one layer that takes part in a merged directory.
#[derive(Debug, Clone)]
pub struct LayerDir {
    pub layer: LayerIndex,
    pub fd: Arc<OwnedFd>,
}

/// What a name resolves to in the union.
#[derive(Debug)]
pub struct Resolved {
    /// The layer that holds the visible object.
    pub layer: LayerIndex,
    /// `O_PATH` handle on the visible object (the link itself for a symlink).
    pub fd: Arc<OwnedFd>,
    pub stat: libc::stat,
    /// For a directory: every layer directory merged into it, top first (the visible one
    /// included). Empty for other types.
    pub merged: Vec<LayerDir>,
}

/// Resolves `name` inside the merged directory whose layer directories are `parent`.
/// `Ok(None)` means the name does not exist in the union (absent or whited out).
pub fn resolve(
    stack: &LayerStack,
    parent: &[LayerDir],
    name: &OsStr,
) -> io::Result<Option<Resolved>> {
    // Marker names are an on-disk detail of the layers, never names in the union.
    if classify_hidden(name) {
        return Ok(None);
    }
    let cname = sys::component(name)?;
    let mut found: Option<Resolved> = None;
    let last = parent.len().saturating_sub(1);
    for (position, dir) in parent.iter().enumerate() {
        let entry = match sys::open_path_at(dir.fd.as_fd(), &cname) {
            Ok(fd) => Some(fd),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => None,
            Err(e) => return Err(e),
        };
        if let Some(fd) = entry {
            let st = sys::stat_fd(fd.as_fd())?;
            if whiteout::is_whiteout(&st) {
                break;
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            match &mut found {
                None if !is_dir => {
                    found = Some(Resolved {
                        layer: dir.layer,
                        fd: Arc::new(fd),
                        stat: st,
                        merged: Vec::new(),
                    });
                    break;
                }
                None => {
                    let opaque = whiteout::is_opaque(fd.as_fd(), stack.xattr_prefix)?;
                    let fd = Arc::new(fd);
                    found = Some(Resolved {
                        layer: dir.layer,
                        fd: fd.clone(),
                        stat: st,
                        merged: vec![LayerDir {
                            layer: dir.layer,
                            fd,
                        }],
                    });
                    if opaque {
                        break;
                    }
                }
                // A non-directory below a directory is hidden by it, and so is all below.
                Some(_) if !is_dir => break,
                Some(top) => {
                    let opaque = whiteout::is_opaque(fd.as_fd(), stack.xattr_prefix)?;
                    top.merged.push(LayerDir {
                        layer: dir.layer,
                        fd: Arc::new(fd),
                    });
                    if opaque {
                        break;
                    }
                }
            }
        }
        // An AUFS whiteout next to (or instead of) the name hides the layers below this one.
        if position < last && whiteout::has_aufs_whiteout(dir.fd.as_fd(), name)? {
            break;
        }
    }
    Ok(found)
}

fn classify_hidden(name: &OsStr) -> bool {
    whiteout::classify(name) != NameKind::Visible
}
