//! The requests a fuseblk mount serves on the relay's own threads.
//!
//! On fuseblk the relay owns `/dev/fuse` (fuser cannot answer FUSE_SYNCFS), so a request that
//! goes through fuser crosses two more threads, which on a small machine costs more than the
//! work itself. The requests that dominate metadata work — LOOKUP, GETATTR, SETATTR, the
//! FORGETs, READLINK, OPEN, CREATE, MKDIR, SYMLINK, LINK, RENAME, GETXATTR, UNLINK, RMDIR,
//! RELEASE, READDIR(PLUS) of directories the kernel did not open, IOCTL (isatty on every
//! opened file) — and READ (lower files are read through the daemon) are decoded here
//! (`wire`), answered by the same [`Core`] functions fuser's adapter calls, and encoded as
//! fuser would encode them. A SETATTR, OPEN or LINK that would first copy a lower file's data
//! up (a copy and an fsync, which would hold up a thread that reads every request) is
//! offloaded: the same `Core` call, on one of the relay's workers, which replies without
//! crossing fuser's threads. Everything else, and anything that concerns the canary or does
//! not parse, goes on to the health hook and fuser unchanged.
//!
//! Must never: decide anything itself (the union's modules do), answer differently from
//! fuser's path for the same request, or serve a request that touches the canary (its
//! injection relies on fuser's adapter).

use std::sync::Arc;

use crate::canary::{CANARY_FH, CANARY_ID};
use crate::fs::Core;
use crate::health::RelayHook;
use crate::relay::{DeferredAnswer, InHeader, LocalAnswer, OffloadedAnswer, Served};
use crate::wire;

const LOOKUP: u32 = 1;
const FORGET: u32 = 2;
const GETATTR: u32 = 3;
const SETATTR: u32 = 4;
const READLINK: u32 = 5;
const READ: u32 = 15;
const SYMLINK: u32 = 6;
const MKDIR: u32 = 9;
const UNLINK: u32 = 10;
const RMDIR: u32 = 11;
const RENAME: u32 = 12;
const LINK: u32 = 13;
const OPEN: u32 = 14;
const RELEASE: u32 = 18;
const GETXATTR: u32 = 22;
const READDIR: u32 = 28;
const CREATE: u32 = 35;
const IOCTL: u32 = 39;
const BATCH_FORGET: u32 = 42;
const READDIRPLUS: u32 = 44;

pub struct FastPath {
    core: Arc<Core>,
    rest: RelayHook,
}

impl FastPath {
    pub fn new(core: Arc<Core>, rest: RelayHook) -> FastPath {
        FastPath { core, rest }
    }
}

/// The relay's answer for a request's result.
fn served(outcome: Result<(), fuser::Errno>) -> Option<Served> {
    Some(Served::Reply(result(outcome)))
}

/// A request's result as the reply carries it: 0 or a negative errno.
fn result(outcome: Result<(), fuser::Errno>) -> i32 {
    match outcome {
        Ok(()) => 0,
        Err(e) => -e.code(),
    }
}

/// The relay's answer for a request that made a name: the new entry, encoded as LOOKUP's.
fn served_entry(
    core: &Core,
    made: Result<(fuser::FileAttr, fuser::Generation), fuser::Errno>,
    out: &mut Vec<u8>,
) -> Option<Served> {
    served(made.map(|(attr, generation)| wire::put_entry_out(out, &core.ttl(), &attr, generation)))
}

impl LocalAnswer for FastPath {
    fn serve(&self, header: &InHeader, body: &[u8], out: &mut Vec<u8>) -> Option<Served> {
        let core = &self.core;
        let node = header.nodeid;
        match header.opcode {
            LOOKUP => {
                let name = wire::parse_name(body)?;
                if core.is_canary_lookup(node, name, header.pid) {
                    return None;
                }
                served(match core.lookup_entry(node, name) {
                    Ok((attr, generation)) => {
                        wire::put_entry_out(out, &core.ttl(), &attr, generation);
                        Ok(())
                    }
                    Err(fuser::Errno::ENOENT) if let Some(ttl) = core.negative_ttl(node, name) => {
                        let attr = crate::fs::no_entry_attr();
                        wire::put_entry_out(out, &ttl, &attr, fuser::Generation(0));
                        Ok(())
                    }
                    Err(e) => Err(e),
                })
            }
            GETATTR if node != CANARY_ID => {
                wire::parse_getattr(body)?;
                served(
                    core.getattr_of(node)
                        .map(|attr| wire::put_attr_out(out, &core.ttl(), &attr)),
                )
            }
            // utime/chmod/chown/truncate of an object already in the upper layer. A lower
            // file's would copy its data up first (and fsync it): that one is offloaded, so
            // this thread never waits on a copy.
            SETATTR if node != CANARY_ID && !core.copies_file_up(node) => {
                let set = wire::parse_setattr(body)?;
                served(
                    core.setattr_of(node, &set, header.uid, header.gid, header.pid)
                        .map(|attr| wire::put_attr_out(out, &core.ttl(), &attr)),
                )
            }
            FORGET => {
                core.forget_node(node, wire::parse_forget(body)?);
                Some(Served::NoReply)
            }
            BATCH_FORGET => {
                for (node, nlookup) in wire::parse_batch_forget(body)? {
                    core.forget_node(node, nlookup);
                }
                Some(Served::NoReply)
            }
            MKDIR => {
                let (mode, name) = wire::parse_mkdir(body)?;
                let made = core.mkdir_entry(node, name, mode, header.uid, header.gid);
                served_entry(core, made, out)
            }
            SYMLINK => {
                let (name, target) = wire::parse_symlink(body)?;
                let made = core.symlink_entry(node, name, target, header.uid, header.gid);
                served_entry(core, made, out)
            }
            LINK => {
                let (old, name) = wire::parse_link(body)?;
                // A link to a lower file copies it up first: offloaded, as for SETATTR.
                if core.copies_file_up(old) {
                    return None;
                }
                served_entry(core, core.link_entry(old, node, name), out)
            }
            RENAME => {
                let (newdir, name, newname) = wire::parse_rename(body)?;
                served(core.rename_entry(node, name, newdir, newname, 0))
            }
            UNLINK => served(core.unlink_entry(node, wire::parse_name(body)?)),
            RMDIR => served(core.rmdir_entry(node, wire::parse_name(body)?)),
            RELEASE => {
                let release = wire::parse_release(body)?;
                if release.fh == CANARY_FH {
                    return None;
                }
                core.release_file(release.fh);
                served(Ok(()))
            }
            READDIR => {
                let read = wire::parse_read(body)?;
                if core.is_open_dir(read.fh) {
                    return None;
                }
                let mut list = wire::DirentList::new(out, read.size);
                served(
                    core.readdir_unopened(node, read.offset, |ino, cookie, kind, name| {
                        list.add_if_fits(ino, cookie, kind, name)
                    }),
                )
            }
            READ => {
                let read = wire::parse_read(body)?;
                if read.fh == CANARY_FH {
                    return None;
                }
                served(core.read_file(read.fh, read.offset, read.size, out))
            }
            READLINK if node != CANARY_ID => served(core.read_link(node).map(|target| {
                out.extend_from_slice(&target);
            })),
            OPEN if node != CANARY_ID => {
                let open = wire::parse_open(body)?;
                // Writing to a lower file copies it up first: offloaded, as for SETATTR.
                if core.open_copies_file_up(node, open.flags as i32) {
                    return None;
                }
                served(
                    core.open_file_of(node, open.flags as i32)
                        .map(|o| wire::put_open_out(out, o.fh, o.flags, o.io.backing_id())),
                )
            }
            // Every open file is asked isatty(3) (TCGETS) by stdio and Python's open(): no
            // ioctl but `ovlfuse sync`'s means anything on the union, and that one flushes
            // the upper layer, which is fuser's to run.
            IOCTL => {
                let cmd = wire::parse_ioctl_cmd(body)?;
                (cmd != crate::health::SYNC_IOCTL).then_some(Served::Reply(-libc::ENOTTY))
            }
            CREATE => {
                let (create, name) = wire::parse_create(body)?;
                let created = core.create_file(
                    node,
                    name,
                    create.mode,
                    create.flags as i32,
                    header.uid,
                    header.gid,
                );
                served(created.map(|c| {
                    let o = c.open;
                    let backing = o.io.backing_id();
                    let ttl = core.ttl();
                    wire::put_create_out(out, &ttl, &c.attr, c.generation, o.fh, o.flags, backing)
                }))
            }
            GETXATTR if node != CANARY_ID => {
                let (size, name) = wire::parse_getxattr(body)?;
                served(core.getxattr_of(node, name, header.uid).and_then(|value| {
                    if size == 0 {
                        wire::put_getxattr_out(out, value.len() as u32);
                    } else if value.len() > size as usize {
                        return Err(fuser::Errno::ERANGE);
                    } else {
                        out.extend_from_slice(&value);
                    }
                    Ok(())
                }))
            }
            READDIRPLUS => {
                let read = wire::parse_read(body)?;
                let ttl = core.ttl();
                let mut list = wire::DirentPlusList::new(out, read.size);
                served(core.readdirplus_unopened(
                    node,
                    read.offset,
                    true,
                    |entry| match entry.attr {
                        Some((attr, generation)) => {
                            list.add_if_fits(&ttl, attr, generation, entry.cookie, entry.name)
                        }
                        None => {
                            list.add_bare_if_fits(entry.ino, entry.cookie, entry.kind, entry.name)
                        }
                    },
                ))
            }
            _ => None,
        }
    }

    fn may_wait_for_disk(&self, header: &InHeader, body: &[u8]) -> bool {
        header.opcode == READ
            && wire::parse_read(body).is_some_and(|r| {
                r.fh != CANARY_FH && self.core.read_may_wait(r.fh, r.offset, r.size)
            })
    }

    fn answer(&self, opcode: u32, header: &InHeader, body: &[u8]) -> Option<i32> {
        self.rest.answer(opcode, header, body)
    }

    /// The changes `serve` leaves because they copy a lower file up first (a copy and an
    /// fsync): the same work, on one of the relay's workers.
    fn offload(&self, header: &InHeader, body: &[u8]) -> Option<OffloadedAnswer> {
        let node = header.nodeid;
        let copies_up = |ino: u64| ino != CANARY_ID && self.core.copies_file_up(ino);
        let core = || Arc::clone(&self.core);
        match header.opcode {
            SETATTR if copies_up(node) => {
                let core = core();
                let set = wire::parse_setattr(body)?;
                let (uid, gid, pid) = (header.uid, header.gid, header.pid);
                Some(Box::new(move |out| {
                    result(
                        core.setattr_of(node, &set, uid, gid, pid)
                            .map(|attr| wire::put_attr_out(out, &core.ttl(), &attr)),
                    )
                }))
            }
            OPEN if copies_up(node) => {
                let core = core();
                let open = wire::parse_open(body)?;
                Some(Box::new(move |out| {
                    result(
                        core.open_file_of(node, open.flags as i32)
                            .map(|o| wire::put_open_out(out, o.fh, o.flags, o.io.backing_id())),
                    )
                }))
            }
            LINK => {
                let (old, name) = wire::parse_link(body)?;
                if !copies_up(old) {
                    return None;
                }
                let core = core();
                let name = name.to_os_string();
                Some(Box::new(move |out| {
                    result(core.link_entry(old, node, &name).map(|(attr, generation)| {
                        wire::put_entry_out(out, &core.ttl(), &attr, generation)
                    }))
                }))
            }
            _ => None,
        }
    }

    fn defer(&self, header: &InHeader, body: &[u8]) -> Option<DeferredAnswer> {
        self.rest.defer(header, body)
    }

    fn before_destroy(&self) {
        self.rest.before_destroy()
    }
}
