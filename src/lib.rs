//! ovlfuse: an overlay (union) filesystem in user space that never lies about durability.
//!
//! Module map (one concern each): `options` parses the command line; `layers` opens and
//! checks the layer directories; `whiteout` recognises whiteouts and opaque directories;
//! `lookup` resolves a name across layers; `readdir` merges listings; `inodes` keeps the FUSE
//! inode table; `handles` bounds the descriptors held on layer objects (file handles past a
//! budget); `copy_up` moves one object to the upper layer atomically; `creds` makes a thread act as the
//! caller while it makes an object in place; `namespace` makes
//! every change to the union (create, unlink, rmdir, rename, link, copy-up order); `attrs`
//! applies SETATTR; `idmap` translates owner ids (uidmapping, squash); `xattr` decides which attributes users see; `fs` is the thin fuser adapter;
//! `mount` and `relay` attach the FUSE connection; `daemon` runs the process lifecycle;
//! `errseq` tracks writeback errors so `fsync` and `syncfs` report each once per handle;
//! `health` finds upper writeback errors and passes them on (fsync, syncfs through the
//! `canary` file, volatile poisoning); `loopdev` makes the tiny block device a `fuseblk`
//! mount needs so the kernel forwards syncfs; `status` keeps the status file container
//! managers poll (and its registry) and runs `ovlfuse status`;
//! `volatile` keeps the mount-time rules of volatile mode (the `work/incompat` marker, the
//! unseen-upper-error refusal);
//! `demo` builds and shows an example union; `sys` wraps the system calls.

pub mod attrs;
pub mod canary;
pub mod copy_up;
pub mod creds;
pub mod daemon;
pub mod demo;
pub mod errseq;
pub mod fast_path;
pub mod fs;
pub mod handles;
pub mod health;
pub mod idmap;
pub mod inodes;
pub mod layers;
pub mod lookup;
pub mod loopdev;
pub mod mount;
pub mod namespace;
pub mod options;
pub mod passthrough;
pub mod readdir;
pub mod relay;
pub mod status;
pub mod sys;
pub mod uring;
pub mod volatile;
pub mod whiteout;
pub mod wire;
pub mod xattr;
