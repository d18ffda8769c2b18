//! Changes to the union: where objects live and how names appear and disappear.
//!
//! Owns: copy-up orchestration (a node and, first, its parent directories move to the upper
//! layer), and create, unlink, rmdir, rename and link with the kernel overlay's on-disk
//! results — whiteouts (character device 0/0) where a lower layer still has the name, opaque
//! directories where a new or moved directory lands on a name a lower layer has, new objects
//! made in place as their creator (`creds`: owner and mode from the one call that makes them)
//! or, over a whiteout, staged in `workdir/work` and swapped into place, so no half-made object
//! is ever visible.
//! Must never: touch a lower layer, or reach anything but single components under held
//! handles.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::copy_up::{self, CopyUpOptions};
use crate::creds;
use crate::inodes::{InodeTable, Node, NodeState};
use crate::layers::LayerStack;
use crate::lookup::{self, LayerDir, Resolved};
use crate::readdir;
use crate::sys;
use crate::whiteout;

fn err(errno: i32) -> io::Error {
    io::Error::from_raw_os_error(errno)
}

/// What to create.
#[derive(Debug, Clone, Copy)]
pub enum NewObject<'a> {
    File,
    Dir,
    /// mknod: fifo, socket, character or block device (`S_IFMT` bits in `mode`).
    Node {
        rdev: u64,
    },
    Symlink {
        target: &'a [u8],
    },
}

/// How a renamed object lands at its target inside the upper layer.
#[derive(Debug, Clone, Copy)]
struct Placement {
    is_dir: bool,
    /// The target is a directory lower layers take part in (empty in the union).
    clear_target: bool,
    /// A lower layer has the source name: leave a whiteout there.
    leave_whiteout: bool,
}

/// What an unlink took away, as its lookup held it. Dropping it may let go of the last
/// reference to the deleted upper inode, which is the upper filesystem's eviction of it
/// (truncation, orphan list, journal): work the caller of the unlink need not wait for.
#[must_use = "dropping it may be an eviction; drop it where that cost does not matter"]
pub struct Removed {
    _held: Resolved,
}

/// Who creates: the new object gets this owner, like on a real filesystem.
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
}

/// The union: its layers and its nodes.
pub struct Union {
    pub stack: LayerStack,
    pub inodes: InodeTable,
    /// Whether copy-ups are flushed before they become visible (off with volatile/fsync=0).
    pub durable: bool,
    /// Set once the process has been refused a whiteout device (no CAP_MKNOD, e.g. in a
    /// user namespace): deletions are recorded as AUFS `.wh.NAME` files instead.
    aufs_whiteouts: AtomicBool,
}

impl Union {
    pub fn new(stack: LayerStack, durable: bool) -> io::Result<Union> {
        let root = root_of(&stack)?;
        Ok(Union {
            inodes: InodeTable::new(root),
            stack,
            durable,
            aufs_whiteouts: AtomicBool::new(false),
        })
    }

    pub fn node(&self, id: u64) -> io::Result<Arc<Node>> {
        self.inodes.get(id).ok_or_else(|| err(libc::ESTALE))
    }

    /// Resolves `name` in directory `dir`.
    pub fn resolve(&self, dir: &Node, name: &OsStr) -> io::Result<Option<Resolved>> {
        if !dir.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        lookup::resolve(&self.stack, &dir.state().merged, name)
    }

    /// [`Union::resolve`] for a name the kernel holds (see [`lookup::resolve_held`]).
    fn resolve_held(&self, dir: &Node, name: &OsStr) -> io::Result<Option<Resolved>> {
        if !dir.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        lookup::resolve_held(&self.stack, &dir.state().merged, name)
    }

    pub fn is_upper(&self, state: &NodeState) -> bool {
        self.stack.has_upper() && state.layer() == 0
    }

    fn require_upper(&self) -> io::Result<()> {
        if self.stack.has_upper() {
            Ok(())
        } else {
            Err(err(libc::EROFS))
        }
    }

    /// The directories of `dir` below the upper layer.
    fn lower_dirs<'a>(&self, merged: &'a [LayerDir]) -> &'a [LayerDir] {
        match merged.first() {
            Some(first) if self.stack.has_upper() && first.layer == 0 => &merged[1..],
            _ => merged,
        }
    }

    /// Whether a lower layer shows `name` in `dir`: removing or moving it away then needs a
    /// whiteout, and a directory landing there must be opaque.
    fn lower_has(&self, dir: &NodeState, name: &OsStr) -> io::Result<bool> {
        // A metacopy file below counts as there (its lookup is refused, but its name needs a
        // whiteout all the same, as on the kernel overlay).
        lookup::shows(&self.stack, self.lower_dirs(&dir.merged), name)
    }

    /// Moves `node` to the upper layer (parents first) unless it is there already; returns
    /// its new state. `with_data: false` gives an empty file (open with O_TRUNC).
    pub fn copy_up(&self, node: &Node, with_data: bool) -> io::Result<NodeState> {
        let state = node.state();
        if self.is_upper(&state) {
            return Ok(state);
        }
        self.require_upper()?;
        self.copy_up_ancestors(&state)?;
        let _serialised = node.copy_up.lock();
        let state = node.state();
        if self.is_upper(&state) {
            return Ok(state);
        }
        let parent = self.node(state.parent)?;
        let upper_parent = self.upper_dir(&parent)?;
        let name = sys::component(&state.name)?;
        let source = state.obj.fd()?;
        let from = sys::stat_fd(source.as_fd())?;
        let copied = copy_up::copy_up(
            source.as_fd(),
            self.stack.work()?,
            upper_parent.as_fd(),
            &name,
            &CopyUpOptions {
                private_xattr_prefix: self.stack.xattr_prefix,
                with_data,
                durable: self.durable,
            },
        );
        let fd = match copied {
            // The name holds another object now: a rename or create replaced this node's
            // object there after the caller looked it up. The node has no name left in the
            // union, as if it had been unlinked: ENOENT, what the caller gets when the
            // replacement comes first.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(io::Error::from_raw_os_error(libc::ENOENT));
            }
            other => other?,
        };
        let to = sys::stat_fd(fd.as_fd())?;
        let obj = self.stack.adopt(0, fd);
        let merged = if node.is_dir() {
            let mut merged = vec![LayerDir {
                layer: 0,
                obj: obj.clone(),
            }];
            merged.extend(state.merged.iter().cloned());
            merged
        } else {
            Vec::new()
        };
        let merged = crate::inodes::layer_dirs(merged);
        let new_state = NodeState {
            obj,
            merged,
            parent: state.parent,
            name: state.name.clone(),
        };
        self.inodes
            .copied_up(node, (from.st_dev, from.st_ino), (to.st_dev, to.st_ino));
        node.set_state(new_state.clone());
        node.name_unsynced.store(true, Ordering::Release);
        log::debug!("copied up {:?}", state.name);
        Ok(new_state)
    }

    /// The upper directory of `dir`, copying it up first if needed.
    /// Copies up the directories above `state` that are not in the upper layer yet, top
    /// down, so each one's parent is already there: a lower-only chain thousands of levels
    /// deep then costs a loop, not a recursion as deep as the chain (which overflowed a
    /// worker's stack at about 4,000 levels; the kernel overlay copies up 10,000 fine).
    fn copy_up_ancestors(&self, state: &NodeState) -> io::Result<()> {
        let mut missing = Vec::new();
        let mut parent_id = state.parent;
        loop {
            let parent = self.node(parent_id)?;
            let parent_state = parent.state();
            if self.is_upper(&parent_state) {
                break;
            }
            parent_id = parent_state.parent;
            missing.push(parent);
        }
        for dir in missing.iter().rev() {
            self.copy_up(dir, false)?;
        }
        Ok(())
    }

    pub fn upper_dir(&self, dir: &Node) -> io::Result<Arc<OwnedFd>> {
        if !dir.is_dir() {
            return Err(err(libc::ENOTDIR));
        }
        let state = self.copy_up(dir, false)?;
        state.merged.first().ok_or_else(|| err(libc::EIO))?.obj.fd()
    }

    /// Creates `name` in `parent`; returns what the name now resolves to.
    pub fn create(
        &self,
        parent: &Node,
        name: &OsStr,
        what: NewObject<'_>,
        mode: u32,
        creator: Creator,
    ) -> io::Result<Resolved> {
        Ok(self
            .make_visible(parent, name, what, mode, creator, None)?
            .0)
    }

    /// Creates the regular file `name` in `parent` and opens it with `flags` (open(2) flags
    /// without O_CREAT, O_EXCL and O_TRUNC): what the name now resolves to, and the open file.
    pub fn create_open(
        &self,
        parent: &Node,
        name: &OsStr,
        mode: u32,
        creator: Creator,
        flags: i32,
    ) -> io::Result<(Resolved, OwnedFd)> {
        let (resolved, file) =
            self.make_visible(parent, name, NewObject::File, mode, creator, Some(flags))?;
        let file = match file {
            Some(file) => file,
            None => resolved.obj.reopen(flags)?,
        };
        Ok((resolved, file))
    }

    /// Creates `name` in `parent`, opened with `open` if given and made in place (else the
    /// caller opens it).
    fn make_visible(
        &self,
        parent: &Node,
        name: &OsStr,
        what: NewObject<'_>,
        mode: u32,
        creator: Creator,
        open: Option<i32>,
    ) -> io::Result<(Resolved, Option<OwnedFd>)> {
        self.require_upper()?;
        // A `.wh.` name would act as an AUFS whiteout in this union, not as a file.
        if whiteout::classify(name) != whiteout::NameKind::Visible {
            return Err(err(libc::EINVAL));
        }
        // A 0/0 character device is how the union records deletions; like the kernel
        // overlay, refuse to make one that would be taken for a whiteout.
        if matches!(what, NewObject::Node { rdev: 0 }) && mode & libc::S_IFMT == libc::S_IFCHR {
            return Err(err(libc::EPERM));
        }
        // Only a lower directory can hold the name where the upper one shows nothing. Without
        // one (a directory made in the union, or an opaque one), the exclusive make below is
        // the whole test: it fails with EEXIST on anything there, and a whiteout found that
        // way is replaced. That saves a lookup per file created.
        let has_lower = !self.lower_dirs(&parent.state().merged).is_empty();
        if has_lower && self.resolve(parent, name)?.is_some() {
            return Err(err(libc::EEXIST));
        }
        let upper = self.upper_dir(parent)?;
        let cname = sys::component(name)?;
        // Where nothing has the name in the upper layer, the object is made in place with
        // the caller's owner, as the kernel overlay does, and needs no lookup afterwards:
        // nothing below can show through a new object that is not a directory, and no lower
        // layer has the name for a directory to merge with (resolved above).
        let over_whiteout = match make_in_place(upper.as_fd(), &cname, what, mode, creator, open) {
            Ok(Some((obj, stat, file))) => {
                let obj = self.stack.adopt(0, obj);
                let merged = if stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    vec![LayerDir {
                        layer: 0,
                        obj: obj.clone(),
                    }]
                } else {
                    Vec::new()
                };
                let resolved = Resolved {
                    layer: 0,
                    obj,
                    stat,
                    merged,
                };
                return Ok((resolved, file));
            }
            // This thread cannot act as the caller: staged below.
            Ok(None) => is_whiteout_at(upper.as_fd(), &cname)?,
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                if !is_whiteout_at(upper.as_fd(), &cname)? {
                    return Err(e);
                }
                true
            }
            Err(e) => return Err(e),
        };
        let (gid, mode) = inherit_group(upper.as_fd(), creator.gid, mode, &what)?;
        let work = self.stack.work()?;
        let tmp = copy_up::temp_name();
        make(work, &tmp, what, mode, creator.uid, gid)?;
        if over_whiteout {
            // Build it aside, then swap it with the whiteout in one rename, like the kernel:
            // a directory made where a lower one was deleted must hide the lower contents.
            let placed = (|| {
                if matches!(what, NewObject::Dir) {
                    self.set_opaque(work, &tmp)?;
                }
                sys::rename_at(work, &tmp, upper.as_fd(), &cname, libc::RENAME_EXCHANGE)
            })();
            match placed {
                Ok(()) => sys::remove_tree(work, &tmp)?,
                Err(e) => {
                    let _ = sys::remove_tree(work, &tmp);
                    return Err(e);
                }
            }
        } else {
            // A thread that cannot act as the caller builds it aside too, owner and mode set
            // there, then renames it into place: a daemon killed half-way leaves a leftover in
            // the work dir (removed at the next mount), never an object with the staging mode
            // or owner under the user's name.
            if let Err(e) =
                sys::rename_at(work, &tmp, upper.as_fd(), &cname, libc::RENAME_NOREPLACE)
            {
                let _ = sys::remove_tree(work, &tmp);
                return Err(e);
            }
        }
        let resolved = self.resolve(parent, name)?.ok_or_else(|| err(libc::EIO))?;
        Ok((resolved, None))
    }

    /// Removes the non-directory `name` from `parent`.
    pub fn unlink(&self, parent: &Node, name: &OsStr) -> io::Result<Removed> {
        self.require_upper()?;
        let found = self
            .resolve_held(parent, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        if found.stat.st_mode & libc::S_IFMT == libc::S_IFDIR {
            return Err(err(libc::EISDIR));
        }
        let needs_whiteout = self.lower_has(&parent.state(), name)?;
        let upper = self.upper_dir(parent)?;
        let cname = sys::component(name)?;
        if !(self.stack.has_upper() && found.layer == 0) {
            self.whiteout(upper.as_fd(), &cname)?;
        } else if needs_whiteout {
            self.replace_with_whiteout(upper.as_fd(), &cname)?;
        } else {
            sys::unlink_at(upper.as_fd(), &cname, 0)?;
        }
        Ok(Removed { _held: found })
    }

    /// Removes the empty directory `name` from `parent`.
    pub fn rmdir(&self, parent: &Node, name: &OsStr) -> io::Result<()> {
        self.require_upper()?;
        let found = self
            .resolve_held(parent, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        if found.stat.st_mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        if !readdir::is_empty(&self.stack, &self.inodes, &found.merged)? {
            return Err(err(libc::ENOTEMPTY));
        }
        let needs_whiteout = self.lower_has(&parent.state(), name)?;
        let upper = self.upper_dir(parent)?;
        let cname = sys::component(name)?;
        if !(self.stack.has_upper() && found.layer == 0) {
            return self.whiteout(upper.as_fd(), &cname);
        }
        // The upper directory may still hold whiteouts of lower entries: move it aside in
        // one rename (leaving a whiteout if a lower layer has the name), then clear it.
        let work = self.stack.work()?;
        let tmp = copy_up::temp_name();
        if needs_whiteout && !self.aufs_whiteouts.load(Ordering::Relaxed) {
            match self.whiteout_device(work, &tmp) {
                Ok(()) => {
                    if let Err(e) =
                        sys::rename_at(work, &tmp, upper.as_fd(), &cname, libc::RENAME_EXCHANGE)
                    {
                        let _ = sys::remove_tree(work, &tmp);
                        return Err(e);
                    }
                    return sys::remove_tree(work, &tmp);
                }
                Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
                Err(_) => {}
            }
        }
        sys::rename_at(upper.as_fd(), &cname, work, &tmp, libc::RENAME_NOREPLACE)?;
        if needs_whiteout {
            self.whiteout(upper.as_fd(), &cname)?;
        }
        sys::remove_tree(work, &tmp)
    }

    /// Renames `name` in `parent` to `newname` in `newparent`; `flags` are renameat2's
    /// RENAME_NOREPLACE / RENAME_EXCHANGE.
    pub fn rename(
        &self,
        parent: &Node,
        name: &OsStr,
        newparent: &Node,
        newname: &OsStr,
        flags: u32,
    ) -> io::Result<()> {
        self.require_upper()?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        if flags & !(libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE) != 0 || (exchange && noreplace)
        {
            return Err(err(libc::EINVAL));
        }
        if whiteout::classify(newname) != whiteout::NameKind::Visible {
            return Err(err(libc::EINVAL));
        }
        let src = self
            .resolve(parent, name)?
            .ok_or_else(|| err(libc::ENOENT))?;
        let dst = self.resolve(newparent, newname)?;
        let is_dir = |r: &Resolved| r.stat.st_mode & libc::S_IFMT == libc::S_IFDIR;
        // Moving a directory that lower layers take part in needs a redirect; without
        // redirect_dir=on answer like the kernel overlay does, so that `mv` falls back to
        // copying.
        let has_lower = |r: &Resolved| {
            is_dir(r)
                && r.merged
                    .iter()
                    .any(|d| !(self.stack.has_upper() && d.layer == 0))
        };
        let redirects = self.stack.write_redirects;
        if has_lower(&src) && !redirects {
            return Err(err(libc::EXDEV));
        }
        match &dst {
            None if exchange => return Err(err(libc::ENOENT)),
            Some(_) if noreplace => return Err(err(libc::EEXIST)),
            Some(d) if exchange && has_lower(d) && !redirects => return Err(err(libc::EXDEV)),
            Some(d) if !exchange && is_dir(d) && !is_dir(&src) => {
                return Err(err(libc::EISDIR));
            }
            Some(d) if !exchange && !is_dir(d) && is_dir(&src) => {
                return Err(err(libc::ENOTDIR));
            }
            // A directory lower layers take part in must be empty in the union; a purely
            // upper one is left to the upper filesystem's own rename to refuse.
            Some(d)
                if !exchange
                    && has_lower(d)
                    && !readdir::is_empty(&self.stack, &self.inodes, &d.merged)? =>
            {
                return Err(err(libc::ENOTEMPTY));
            }
            Some(d)
                if (d.stat.st_dev, d.stat.st_ino) == (src.stat.st_dev, src.stat.st_ino)
                    && self.stack.has_upper()
                    && d.layer == 0
                    && src.layer == 0 =>
            {
                // Two names of one upper object: POSIX says do nothing. (Two names of one
                // lower object are two files in the union, as in the kernel overlay without
                // index=on, and the rename proceeds.)
                return Ok(());
            }
            _ => {}
        }
        let src_dir = is_dir(&src);
        let dst_dir = dst.as_ref().is_some_and(is_dir);
        let src_redirect = has_lower(&src);
        let dst_redirect = dst.as_ref().is_some_and(has_lower);
        let samedir = parent.id == newparent.id;
        let clear_target = !exchange && dst.as_ref().is_some_and(has_lower);
        let src_needs_whiteout = self.lower_has(&parent.state(), name)?;
        // Like the kernel overlay: a directory (purely upper, see EXDEV above) moved into a
        // directory that lower layers take part in is made opaque, so that a same-named
        // lower directory can never merge into it.
        let into_merged = !self.lower_dirs(&newparent.state().merged).is_empty();
        let back_into_merged = !self.lower_dirs(&parent.state().merged).is_empty();
        let src_node = self.inodes.lookup(parent.id, name, src);
        let dst_node = dst.map(|d| self.inodes.lookup(newparent.id, newname, d));
        let result = (|| {
            self.copy_up(&src_node, true)?;
            if let Some(d) = &dst_node {
                self.copy_up(d, true)?;
            }
            let upper_p = self.upper_dir(parent)?;
            let upper_np = self.upper_dir(newparent)?;
            let (cname, cnew) = (sys::component(name)?, sys::component(newname)?);
            // Marked before the move, as the kernel does: a rename the upper filesystem then
            // refuses (a non-empty upper target) leaves the mark, on either side. A directory
            // that lower layers take part in records where they keep it (a redirect); a purely
            // upper one is made opaque instead.
            if src_redirect {
                self.set_redirect(&src_node, samedir)?;
            } else if src_dir && into_merged {
                self.set_opaque(upper_p.as_fd(), &cname)?;
            }
            if exchange {
                if let Some(d) = &dst_node
                    && dst_redirect
                {
                    self.set_redirect(d, samedir)?;
                } else if dst_dir && back_into_merged {
                    self.set_opaque(upper_np.as_fd(), &cnew)?;
                }
                return sys::rename_at(
                    upper_p.as_fd(),
                    &cname,
                    upper_np.as_fd(),
                    &cnew,
                    libc::RENAME_EXCHANGE,
                );
            }
            self.move_into_place(
                upper_p.as_fd(),
                &cname,
                upper_np.as_fd(),
                &cnew,
                Placement {
                    is_dir: src_dir,
                    clear_target,
                    leave_whiteout: src_needs_whiteout,
                },
            )
        })();
        if result.is_ok() {
            src_node.moved(newparent.id, newname);
            if let Some(d) = &dst_node
                && exchange
            {
                d.moved(parent.id, name);
            }
        }
        self.inodes.forget(src_node.id, 1);
        if let Some(d) = dst_node {
            self.inodes.forget(d.id, 1);
        }
        result
    }

    /// The non-exchange rename inside the upper layer, leaving a whiteout at the source when
    /// a lower layer has that name.
    fn move_into_place(
        &self,
        from_dir: BorrowedFd<'_>,
        from: &CStr,
        to_dir: BorrowedFd<'_>,
        to: &CStr,
        how: Placement,
    ) -> io::Result<()> {
        let Placement {
            is_dir,
            clear_target,
            leave_whiteout,
        } = how;
        let work = self.stack.work()?;
        match sys::stat_at(to_dir, to)? {
            // A whiteout at the target: a directory cannot replace it by rename, so swap
            // them; the whiteout then sits at the source, which is what a lower name needs.
            Some(st) if whiteout::is_whiteout(&st) && is_dir => {
                sys::rename_at(from_dir, from, to_dir, to, libc::RENAME_EXCHANGE)?;
                if !leave_whiteout {
                    sys::remove_tree(from_dir, from)?;
                }
                return Ok(());
            }
            // An upper directory at the target that lower layers take part in was found
            // empty in the union, but may still hold whiteouts of lower entries on disk:
            // clear it out of the way first.
            // Like the kernel (ovl_clear_empty), it is swapped in one exchange for an empty
            // opaque directory with its owner, mode and times, which the rename below then
            // replaces: a daemon killed in between leaves the target as the union showed it
            // (empty), never the name missing or the lower entries back.
            Some(st) if clear_target && st.st_mode & libc::S_IFMT == libc::S_IFDIR => {
                let tmp = copy_up::temp_name();
                make(work, &tmp, NewObject::Dir, st.st_mode, st.st_uid, st.st_gid)?;
                let swapped = self
                    .set_opaque(work, &tmp)
                    .and_then(|()| sys::set_times_at(work, &tmp, &st))
                    .and_then(|()| sys::rename_at(work, &tmp, to_dir, to, libc::RENAME_EXCHANGE));
                let cleared = sys::remove_tree(work, &tmp);
                swapped?;
                cleared?;
            }
            _ => {}
        }
        if !leave_whiteout {
            return sys::rename_at(from_dir, from, to_dir, to, 0);
        }
        let atomic = if self.aufs_whiteouts.load(Ordering::Relaxed) {
            Err(err(libc::EPERM))
        } else {
            sys::rename_at(from_dir, from, to_dir, to, libc::RENAME_WHITEOUT)
        };
        match atomic {
            // The upper filesystem cannot leave a whiteout atomically (EINVAL), or this
            // process may not make whiteout devices (EPERM): do it in two steps.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::EPERM)) => {
                sys::rename_at(from_dir, from, to_dir, to, 0)?;
                self.whiteout(from_dir, from)
            }
            other => other,
        }
    }

    /// Adds a hard link `newname` in `newparent` to `node`.
    pub fn link(&self, node: &Node, newparent: &Node, newname: &OsStr) -> io::Result<Resolved> {
        self.require_upper()?;
        if node.is_dir() {
            return Err(err(libc::EPERM));
        }
        if whiteout::classify(newname) != whiteout::NameKind::Visible {
            return Err(err(libc::EINVAL));
        }
        if self.resolve(newparent, newname)?.is_some() {
            return Err(err(libc::EEXIST));
        }
        let state = self.copy_up(node, true)?;
        let upper = self.upper_dir(newparent)?;
        let cnew = sys::component(newname)?;
        let over_whiteout =
            sys::stat_at(upper.as_fd(), &cnew)?.is_some_and(|st| whiteout::is_whiteout(&st));
        if over_whiteout {
            let work = self.stack.work()?;
            let tmp = copy_up::temp_name();
            sys::link_at(state.obj.fd()?.as_fd(), work, &tmp)?;
            if let Err(e) = sys::rename_at(work, &tmp, upper.as_fd(), &cnew, 0) {
                let _ = sys::remove_tree(work, &tmp);
                return Err(e);
            }
        } else {
            sys::link_at(state.obj.fd()?.as_fd(), upper.as_fd(), &cnew)?;
        }
        self.resolve(newparent, newname)?
            .ok_or_else(|| err(libc::EIO))
    }

    /// A kernel-format whiteout: a 0/0 character device (needs CAP_MKNOD).
    fn whiteout_device(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        sys::mknod_at(dir, name, libc::S_IFCHR, 0)
    }

    /// Makes the absent `name` in the upper directory `dir` read as deleted: a 0/0 device,
    /// or — once the process has been refused one — the AUFS `.wh.NAME` file, which this
    /// union (and container tools) honour the same way.
    fn whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        if !self.aufs_whiteouts.load(Ordering::Relaxed) {
            match self.whiteout_device(dir, name) {
                Err(e) if e.raw_os_error() == Some(libc::EPERM) => self.fall_back_to_aufs(),
                other => return other,
            }
        }
        match sys::create_file_at(dir, &aufs_marker(name)?, 0o600) {
            // Already marked (a `.wh.` file stays after the name is created again).
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            other => other.map(drop),
        }
    }

    /// Replaces the upper non-directory `name` in `dir` by a whiteout: in one rename of a
    /// device staged in the work dir, or, with AUFS whiteouts, marker first, then unlink.
    fn replace_with_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        if !self.aufs_whiteouts.load(Ordering::Relaxed) {
            let work = self.stack.work()?;
            let tmp = copy_up::temp_name();
            match self.whiteout_device(work, &tmp) {
                Ok(()) => {
                    return sys::rename_at(work, &tmp, dir, name, 0).inspect_err(|_| {
                        let _ = sys::remove_tree(work, &tmp);
                    });
                }
                Err(e) if e.raw_os_error() != Some(libc::EPERM) => return Err(e),
                Err(_) => self.fall_back_to_aufs(),
            }
        }
        self.whiteout(dir, name)?;
        sys::unlink_at(dir, name, 0)
    }

    fn fall_back_to_aufs(&self) {
        if !self.aufs_whiteouts.swap(true, Ordering::Relaxed) {
            log::warn!(
                "cannot create whiteout devices (mknod 0/0: permission denied); recording \
                 deletions as AUFS .wh.NAME files from now on"
            );
        }
    }

    fn set_opaque(&self, dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
        let fd = sys::open_path_at(dir, name)?;
        sys::set_xattr(fd.as_fd(), &self.stack.private.opaque, b"y", 0)
    }

    /// The redirect an upper directory already carries.
    fn redirect_of(&self, state: &NodeState) -> io::Result<Option<Vec<u8>>> {
        if !self.is_upper(state) {
            return Ok(None);
        }
        sys::get_xattr(state.obj.fd()?.as_fd(), &self.stack.private.redirect)
    }

    /// Records on the (copied-up) directory `node`, about to be renamed, where the lower
    /// layers keep it, as the kernel does with `redirect_dir=on`: within the same parent its
    /// current name; elsewhere the absolute path of its current place, built from each
    /// ancestor's own redirect where it has one. An existing redirect that still holds is
    /// kept.
    fn set_redirect(&self, node: &Node, samedir: bool) -> io::Result<()> {
        let state = node.state();
        if let Some(existing) = self.redirect_of(&state)?
            && (samedir || existing.starts_with(b"/"))
        {
            return Ok(());
        }
        let value = if samedir {
            state.name.as_bytes().to_vec()
        } else {
            self.origin_path(node)?
        };
        sys::set_xattr(
            state.obj.fd()?.as_fd(),
            &self.stack.private.redirect,
            &value,
            0,
        )
    }

    /// The absolute path at which the lower layers keep directory `node`.
    fn origin_path(&self, node: &Node) -> io::Result<Vec<u8>> {
        let mut parts: Vec<Vec<u8>> = Vec::new();
        let mut state = node.state();
        let mut id = node.id;
        while id != crate::inodes::ROOT_ID {
            let part = self
                .redirect_of(&state)?
                .unwrap_or_else(|| state.name.as_bytes().to_vec());
            let absolute = part.starts_with(b"/");
            parts.push(part);
            if absolute {
                break;
            }
            id = state.parent;
            state = self.node(id)?.state();
        }
        parts.reverse();
        let mut path = Vec::new();
        for part in parts {
            if !part.starts_with(b"/") {
                path.push(b'/');
            }
            path.extend_from_slice(&part);
        }
        Ok(path)
    }
}

fn root_of(stack: &LayerStack) -> io::Result<Resolved> {
    let mut merged = Vec::new();
    for (i, layer) in stack.layers.iter().enumerate() {
        let opaque = whiteout::is_opaque(
            sys::XattrSource::Handle(layer.root.as_fd()),
            &stack.private.opaque,
        )?;
        merged.push(LayerDir {
            layer: i as u16,
            obj: stack.adopt(i as u16, layer.root.try_clone()?),
        });
        if opaque {
            break;
        }
    }
    let top = merged[0].obj.clone();
    Ok(Resolved {
        layer: 0,
        stat: sys::stat_fd(stack.root(0))?,
        obj: top,
        merged,
    })
}

/// A new object's group and mode, with the set-group-id directory rule a real filesystem
/// applies (FUSE leaves it to us): in a setgid directory new objects take the directory's
/// group, and new directories stay setgid.
fn inherit_group(
    parent: BorrowedFd<'_>,
    gid: u32,
    mode: u32,
    what: &NewObject<'_>,
) -> io::Result<(u32, u32)> {
    let st = sys::stat_fd(parent)?;
    if st.st_mode & libc::S_ISGID == 0 {
        return Ok((gid, mode));
    }
    let mode = if matches!(what, NewObject::Dir) {
        mode | libc::S_ISGID
    } else {
        mode
    };
    Ok((st.st_gid, mode))
}

/// Whether `name` in the upper directory `dir` is a whiteout.
fn is_whiteout_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<bool> {
    Ok(sys::stat_at(dir, name)?.is_some_and(|st| whiteout::is_whiteout(&st)))
}

/// Makes `name` in the upper directory `dir` as the caller (`creator`), opening a regular
/// file with `open` if given: its `O_PATH` descriptor, attributes and open file. `Ok(None)`
/// if this thread cannot act as the caller; EEXIST if anything (a whiteout, say) has the name.
fn make_in_place(
    dir: BorrowedFd<'_>,
    name: &CStr,
    what: NewObject<'_>,
    mode: u32,
    creator: Creator,
    open: Option<i32>,
) -> io::Result<Option<(OwnedFd, libc::stat, Option<OwnedFd>)>> {
    let Some(acting) = creds::act_as(creator.uid, creator.gid) else {
        return Ok(None);
    };
    let perm = mode & 0o7777;
    let mut file = None;
    match what {
        NewObject::File => match open {
            Some(flags) => file = Some(sys::create_open_at(dir, name, flags, perm)?),
            None => sys::mknod_at(dir, name, libc::S_IFREG | perm, 0)?,
        },
        NewObject::Dir => sys::mkdir_at(dir, name, perm)?,
        NewObject::Node { rdev } => sys::mknod_at(dir, name, mode, rdev)?,
        NewObject::Symlink { target } => {
            let target = CString::new(target).map_err(|_| err(libc::EINVAL))?;
            sys::symlink_at(&target, dir, name)?;
        }
    }
    drop(acting);
    let finished = (|| {
        let obj = sys::open_path_at(dir, name)?;
        let mut stat = sys::stat_fd(obj.as_fd())?;
        if !matches!(what, NewObject::Symlink { .. }) {
            // The upper filesystem may have narrowed the mode (a default ACL of the upper
            // directory) or, for a directory, added set-group-ID after its parent's, as every
            // filesystem does: the rest is set to what the caller asked for.
            let is_dir = matches!(what, NewObject::Dir);
            let inherited = if is_dir {
                stat.st_mode & libc::S_ISGID
            } else {
                0
            };
            let want = perm | inherited;
            if stat.st_mode & 0o7777 != want {
                // Not a symlink (excluded above), so the stat taken needs no repeating.
                sys::chmod_handle(obj.as_fd(), want)?;
                stat.st_mode = (stat.st_mode & libc::S_IFMT) | want;
            }
        }
        Ok((obj, stat))
    })();
    match finished {
        Ok((obj, stat)) => Ok(Some((obj, stat, file))),
        Err(e) => {
            drop(file);
            let _ = sys::remove_tree(dir, name);
            Err(e)
        }
    }
}

/// Creates one object under `dir` with exact owner and mode (the daemon runs with umask 0;
/// the kernel already applied the caller's umask to `mode`).
fn make(
    dir: BorrowedFd<'_>,
    name: &CStr,
    what: NewObject<'_>,
    mode: u32,
    uid: u32,
    gid: u32,
) -> io::Result<()> {
    let owned = match what {
        // Owner and mode through the descriptor it was made with: the name is not looked up
        // again (create is the hottest path of a build or an unpack).
        NewObject::File => {
            let fd = sys::create_file_at(dir, name, 0o600)?;
            sys::chown_open_fd(fd.as_fd(), uid, gid)
                .and_then(|()| sys::chmod_open_fd(fd.as_fd(), mode & 0o7777))
        }
        NewObject::Dir => {
            sys::mkdir_at(dir, name, 0o700)?;
            set_owner_and_mode(dir, name, mode, uid, gid, true)
        }
        NewObject::Node { rdev } => {
            sys::mknod_at(dir, name, (mode & libc::S_IFMT) | 0o600, rdev)?;
            set_owner_and_mode(dir, name, mode, uid, gid, true)
        }
        NewObject::Symlink { target } => {
            let target = CString::new(target).map_err(|_| err(libc::EINVAL))?;
            sys::symlink_at(&target, dir, name)?;
            set_owner_and_mode(dir, name, mode, uid, gid, false)
        }
    };
    if owned.is_err() {
        let _ = sys::remove_tree(dir, name);
    }
    owned
}

/// Owner, then mode (`with_mode`: not for a symlink) of the object `name` just made in `dir`:
/// after chown, which clears set-id bits, the mode exactly as asked.
fn set_owner_and_mode(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: u32,
    uid: u32,
    gid: u32,
    with_mode: bool,
) -> io::Result<()> {
    sys::chown_at(dir, name, uid, gid)?;
    if with_mode {
        sys::chmod_at(dir, name, mode & 0o7777)?;
    }
    Ok(())
}

/// `.wh.NAME` for `name`.
fn aufs_marker(name: &CStr) -> io::Result<CString> {
    let mut marker = whiteout::AUFS_PREFIX.to_vec();
    marker.extend_from_slice(name.to_bytes());
    if marker.len() > 255 {
        return Err(err(libc::ENAMETOOLONG));
    }
    CString::new(marker).map_err(|_| err(libc::EINVAL))
}
