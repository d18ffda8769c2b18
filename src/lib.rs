//! ovlfuse: an overlay (union) filesystem in user space that never lies about durability.
//!
//! Module map (one concern each): `options` parses the command line; `layers` opens and
//! checks the layer directories; `whiteout` recognises whiteouts and opaque directories;
//! `lookup` resolves a name across layers; `readdir` merges listings; `inodes` keeps the FUSE
//! inode table; `copy_up` moves one object to the upper layer atomically; `namespace` makes
//! every change to the union (create, unlink, rmdir, rename, link, copy-up order); `attrs`
//! applies SETATTR; `idmap` translates owner ids (uidmapping, squash); `xattr` decides which attributes users see; `fs` is the thin fuser adapter;
//! `mount` and `relay` attach the FUSE connection; `daemon` runs the process lifecycle;
//! `errseq` tracks writeback errors so `fsync` and `syncfs` report each once per handle;
//! `demo` builds and shows an example union; `sys` wraps the system calls.

pub mod attrs;
pub mod copy_up;
pub mod daemon;
pub mod demo;
pub mod errseq;
pub mod fs;
pub mod idmap;
pub mod inodes;
pub mod layers;
pub mod lookup;
pub mod mount;
pub mod namespace;
pub mod options;
pub mod readdir;
pub mod relay;
pub mod sys;
pub mod whiteout;
pub mod xattr;
