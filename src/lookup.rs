//! Lookup across layers: which layer's object a name in a merged directory stands for.
//!
//! Owns: the union rules of the kernel overlay for one name — the topmost layer that has the
//! name wins; a whiteout (kernel 0/0 device, kernel 6.7+ xattr whiteout, or AUFS `.wh.NAME`)
//! ends the search; a directory merges with same-named directories below it until one is
//! opaque; a non-directory hides everything below, and is refused if it is a metadata-only
//! copy (as the kernel refuses it with metacopy=off, the only mode ovlfuse has). Must never:
//! open anything but single components under held handles.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use crate::handles::ObjRef;
use std::os::unix::ffi::OsStrExt;

use crate::layers::{LayerIndex, LayerStack};
use crate::sys;
use crate::whiteout::{self, NameKind};

/// A directory of one layer that takes part in a merged directory.
#[derive(Debug, Clone)]
pub struct LayerDir {
    pub layer: LayerIndex,
    pub obj: ObjRef,
}

/// What a name resolves to in the union.
#[derive(Debug)]
pub struct Resolved {
    /// The layer that holds the visible object.
    pub layer: LayerIndex,
    /// The visible object (the link itself for a symlink).
    pub obj: ObjRef,
    pub stat: libc::stat,
    /// For a directory: every layer directory merged into it, top first (the visible one
    /// included). Empty for other types.
    pub merged: Vec<LayerDir>,
}

/// Where the layers below are searched for a directory's lower parts. A directory moved
/// with `redirect_dir=on` carries `<prefix>redirect`: a bare name (moved within its parent)
/// or an absolute path from the layer roots (moved elsewhere).
enum Target {
    /// This name in the parent's own directory of each layer.
    InParent(CString),
    /// This path from each layer's root.
    FromRoot(Vec<CString>),
}

/// One layer's candidate for the name, `None` if the layer does not have it; with the
/// layer's directory it was opened in when that is the parent's own (no redirect).
fn candidate(
    stack: &LayerStack,
    parent: &[LayerDir],
    layer: LayerIndex,
    target: &Target,
) -> io::Result<Option<(OwnedFd, Option<Arc<OwnedFd>>)>> {
    let found = match target {
        Target::InParent(name) => match parent.iter().find(|d| d.layer == layer) {
            Some(dir) => {
                let dir = dir.obj.fd()?;
                return match stack.fds.retry(|| sys::open_path_at(dir.as_fd(), name)) {
                    Ok(fd) => Ok(Some((fd, Some(dir)))),
                    Err(e) if not_there(&e) => Ok(None),
                    Err(e) => Err(e),
                };
            }
            None => return Ok(None),
        },
        Target::FromRoot(path) => {
            let Some((last, dirs)) = path.split_last() else {
                return Ok(None);
            };
            let mut here: Option<OwnedFd> = None;
            for component in dirs {
                let from = here.as_ref().map_or(stack.root(layer), |f| f.as_fd());
                let next = match sys::open_path_at(from, component) {
                    Ok(fd) => fd,
                    Err(e) if not_there(&e) => return Ok(None),
                    Err(e) => return Err(e),
                };
                if sys::stat_fd(next.as_fd())?.st_mode & libc::S_IFMT != libc::S_IFDIR {
                    return Ok(None);
                }
                here = Some(next);
            }
            let from = here.as_ref().map_or(stack.root(layer), |f| f.as_fd());
            sys::open_path_at(from, last)
        }
    };
    match found {
        Ok(fd) => Ok(Some((fd, None))),
        Err(e) if not_there(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn not_there(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR))
}

/// The redirect of a directory, if it has a valid one; a malformed value is an error (EIO),
/// never a path to follow.
fn redirect_of(stack: &LayerStack, dir: sys::XattrSource<'_>) -> io::Result<Option<Target>> {
    let Some(value) = dir.get(&stack.private.redirect)? else {
        return Ok(None);
    };
    // The kernel's rules (whiteout::parse_redirect): a value it would refuse makes the
    // directory unusable, as on the kernel overlay.
    match whiteout::parse_redirect(&value) {
        Ok(whiteout::Redirect::InParent(name)) => Ok(Some(Target::InParent(name))),
        Ok(whiteout::Redirect::FromRoot(path)) => Ok(Some(Target::FromRoot(path))),
        Err(why) => {
            log::warn!(
                "ignoring directory with a malformed {}redirect value {:?}: {why}",
                stack.xattr_prefix,
                String::from_utf8_lossy(&value)
            );
            Err(io::Error::from_raw_os_error(libc::EIO))
        }
    }
}

/// What a search does with a regular file that is a metadata-only copy (`<prefix>metacopy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Metacopy {
    /// Fail the lookup, as the kernel does with metacopy=off: following the copy to its data
    /// below would read a lower file without that file's permission checks.
    Refuse,
    /// Count it as there: only whether the name exists is asked.
    Present,
}

/// Resolves `name` inside the merged directory whose layer directories are `parent`.
/// `Ok(None)` means the name does not exist in the union (absent or whited out). A
/// metadata-only copy is refused with EPERM (EIO if its value is malformed), and logged.
pub fn resolve(
    stack: &LayerStack,
    parent: &[LayerDir],
    name: &OsStr,
) -> io::Result<Option<Resolved>> {
    search(stack, parent, name, Metacopy::Refuse)
}

/// [`resolve`] for a name the kernel has looked up already (it removes or moves only names it
/// holds): a metadata-only copy was refused then, so its attribute is not read again.
pub fn resolve_held(
    stack: &LayerStack,
    parent: &[LayerDir],
    name: &OsStr,
) -> io::Result<Option<Resolved>> {
    search(stack, parent, name, Metacopy::Present)
}

/// Whether the layer directories `parent` show `name` at all: what removing or moving a name
/// needs to know (a whiteout must then stay in its place). Like the kernel's check
/// (`ovl_lower_positive`), a metadata-only copy counts as there; only its lookup is refused.
pub fn shows(stack: &LayerStack, parent: &[LayerDir], name: &OsStr) -> io::Result<bool> {
    Ok(search(stack, parent, name, Metacopy::Present)?.is_some())
}

fn search(
    stack: &LayerStack,
    parent: &[LayerDir],
    name: &OsStr,
    metacopy: Metacopy,
) -> io::Result<Option<Resolved>> {
    // Marker names are an on-disk detail of the layers, never names in the union.
    if classify_hidden(name) {
        return Ok(None);
    }
    let (Some(first), Some(bottom)) = (parent.first(), parent.last()) else {
        return Ok(None);
    };
    let mut target = Target::InParent(sys::component(name)?);
    let mut found: Option<Resolved> = None;
    let mut redirected = false;
    for layer in first.layer..stack.layers.len() as LayerIndex {
        // Without a redirect, only the layers the parent merges can hold the name.
        if matches!(target, Target::InParent(_)) && layer > bottom.layer {
            break;
        }
        let found_here = match candidate(stack, parent, layer, &target) {
            // A redirect naming something no layer can hold leads nowhere (the kernel's
            // rule); the looked-up name itself being too long stays ENAMETOOLONG.
            Err(e) if redirected && e.raw_os_error() == Some(libc::ENAMETOOLONG) => None,
            other => other?,
        };
        if let Some((fd, opened_in)) = found_here {
            let st = sys::stat_fd(fd.as_fd())?;
            // A lower layer's attributes are read by name: nothing renames there.
            let xattrs = match (&opened_in, &target) {
                (Some(dir), Target::InParent(cname)) if !(layer == 0 && stack.has_upper()) => {
                    sys::XattrSource::LowerEntry {
                        dir: dir.as_fd(),
                        name: cname,
                        handle: fd.as_fd(),
                    }
                }
                _ => sys::XattrSource::Handle(fd.as_fd()),
            };
            if whiteout::is_whiteout(&st) {
                break;
            }
            let is_dir = st.st_mode & libc::S_IFMT == libc::S_IFDIR;
            // A non-directory below a directory is hidden by it, and so is all below.
            if !is_dir && found.is_some() {
                break;
            }
            // Past here a non-directory is what the name stands for. The kernel reads both
            // markers in every layer, the upper included, whatever its directory's "x" mark.
            if !is_dir {
                if whiteout::is_xattr_whiteout(xattrs, &st, &stack.private.whiteout)? {
                    break;
                }
                if metacopy == Metacopy::Refuse {
                    refuse_metacopy(stack, layer, name, xattrs, &st)?;
                }
            }
            // Tested before the descriptor goes under management (which may close it).
            let opaque = is_dir && whiteout::is_opaque(xattrs, &stack.private.opaque)?;
            let searched_below = (layer == 0 && stack.has_upper())
                || match &target {
                    Target::InParent(_) => layer < bottom.layer,
                    Target::FromRoot(_) => (layer as usize) + 1 < stack.layers.len(),
                };
            // Like the kernel (ovl_lookup's d.last): a lower directory's redirect is not read
            // where no layer below it would be searched; the upper's always is.
            let redirect = if is_dir && !opaque && stack.follow_redirects && searched_below {
                redirect_of(stack, xattrs)?
            } else {
                None
            };
            let obj = stack.adopt(layer, fd);
            match &mut found {
                None if !is_dir => {
                    found = Some(Resolved {
                        layer,
                        obj,
                        stat: st,
                        merged: Vec::new(),
                    });
                    break;
                }
                None => {
                    found = Some(Resolved {
                        layer,
                        obj: obj.clone(),
                        stat: st,
                        merged: vec![LayerDir { layer, obj }],
                    })
                }
                Some(top) => top.merged.push(LayerDir { layer, obj }),
            }
            if opaque {
                break;
            }
            if let Some(redirect) = redirect {
                target = redirect;
                redirected = true;
            }
        }
        // An AUFS whiteout next to (or instead of) the name hides the layers below this one.
        if let Target::InParent(n) = &target
            && let Some(dir) = parent.iter().find(|d| d.layer == layer)
            && layer < bottom.layer
            && whiteout::has_aufs_whiteout(dir.obj.fd()?.as_fd(), OsStr::from_bytes(n.as_bytes()))?
        {
            break;
        }
    }
    Ok(found)
}

/// Fails (EPERM) the lookup of a regular file that is a metadata-only copy, whose data the
/// kernel would take from a lower file only with metacopy=on; a value too short to be one is
/// EIO, as on the kernel. Both are logged. Any other file passes.
fn refuse_metacopy(
    stack: &LayerStack,
    layer: LayerIndex,
    name: &OsStr,
    file: sys::XattrSource<'_>,
    st: &libc::stat,
) -> io::Result<()> {
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Ok(());
    }
    let value = match file.get(&stack.private.metacopy) {
        Ok(Some(value)) => value,
        Ok(None) => return Ok(()),
        // A `user.*` attribute of a file this process may not read: the kernel takes the
        // file as an ordinary one too.
        Err(e) if e.raw_os_error() == Some(libc::EACCES) => return Ok(()),
        Err(e) => return Err(e),
    };
    let layer_path = stack.layers[layer as usize].path.display();
    if whiteout::is_valid_metacopy(&value) {
        log::warn!(
            "refusing to follow metacopy origin for {name:?} in layer {layer_path}: it is a \
             metadata-only copy ({}metacopy) and metacopy=off",
            stack.xattr_prefix
        );
        Err(io::Error::from_raw_os_error(libc::EPERM))
    } else {
        log::warn!(
            "refusing {name:?} in layer {layer_path}: malformed {}metacopy value {:?}: \
             shorter than the {}-byte header",
            stack.xattr_prefix,
            String::from_utf8_lossy(&value),
            whiteout::METACOPY_HEADER_LEN
        );
        Err(io::Error::from_raw_os_error(libc::EIO))
    }
}

fn classify_hidden(name: &OsStr) -> bool {
    whiteout::classify(name) != NameKind::Visible
}
