//! The inode table FUSE needs: node ids handed to the kernel, what each stands for, and the
//! inode numbers users see.
//!
//! Owns: node ids (FUSE `nodeid`, counted by LOOKUP and released by FORGET), the map from a
//! layer object's identity (st_dev, st_ino) to its node — so hard links share one node and a
//! second lookup of the same object returns the same node — and the `st_ino` numbering, which
//! is stable for the life of the mount and unique within it even across layers on different
//! filesystems. Must never: hand out a node id twice for live nodes, or reuse one.
//!
//! Locking: `table` is one `RwLock`; it is never held while doing I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Mutex, RwLock};

use crate::layers::LayerIndex;
use crate::lookup::{LayerDir, Resolved};

pub const ROOT_ID: u64 = 1;

/// Identity of a layer object: its filesystem and inode number there.
pub type ObjectKey = (u64, u64);

/// One object of the union, as the kernel knows it.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// The inode number shown to users.
    pub ino: u64,
    pub key: ObjectKey,
    pub layer: LayerIndex,
    /// `S_IFMT` bits of the object.
    pub file_type: u32,
    /// `O_PATH` handle on the visible object.
    pub fd: std::os::fd::OwnedFd,
    /// Layer directories merged into this directory, top first (empty for non-directories).
    pub merged: Vec<LayerDir>,
    /// Node id of the directory this one was found in (for `..`; the root is its own parent).
    pub parent: u64,
    lookups: AtomicU64,
}

impl Node {
    pub fn is_dir(&self) -> bool {
        self.file_type == libc::S_IFDIR
    }
}

/// All live nodes of one mount.
///
/// fuser sends `FileAttr::ino` as the FUSE node id, so a node's id IS its user-visible inode
/// number (the root excepted, whose id is always 1). That makes the id a pure function of the
/// layer object: a hard-linked file gets one node, and a node forgotten and looked up again
/// comes back under the same id.
pub struct InodeTable {
    nodes: RwLock<HashMap<u64, Arc<Node>>>,
    root_key: ObjectKey,
    inos: InoSpace,
}

impl InodeTable {
    /// A table whose root node stands for `root`.
    pub fn new(root: Resolved) -> InodeTable {
        let inos = InoSpace::default();
        let key = (root.stat.st_dev, root.stat.st_ino);
        let node = Arc::new(Node {
            id: ROOT_ID,
            ino: inos.ino(key),
            key,
            layer: root.layer,
            file_type: libc::S_IFDIR,
            fd: root.fd,
            merged: root.merged,
            parent: ROOT_ID,
            // The kernel never forgets the root.
            lookups: AtomicU64::new(1 << 62),
        });
        let mut nodes = HashMap::new();
        nodes.insert(ROOT_ID, node);
        InodeTable {
            nodes: RwLock::new(nodes),
            root_key: key,
            inos,
        }
    }

    pub fn get(&self, id: u64) -> Option<Arc<Node>> {
        self.nodes.read().get(&id).cloned()
    }

    /// Records one kernel lookup of `resolved` found in directory `parent`, returning its node
    /// (the existing one if the same layer object is already known).
    pub fn lookup(&self, parent: u64, resolved: Resolved) -> Arc<Node> {
        let key = (resolved.stat.st_dev, resolved.stat.st_ino);
        let id = if key == self.root_key {
            ROOT_ID
        } else {
            self.ino_of(key)
        };
        if let Some(node) = self.nodes.read().get(&id) {
            node.lookups.fetch_add(1, Ordering::Relaxed);
            return node.clone();
        }
        let mut nodes = self.nodes.write();
        // Another thread may have inserted it between the two locks.
        let node = nodes.entry(id).or_insert_with(|| {
            Arc::new(Node {
                id,
                ino: id,
                key,
                layer: resolved.layer,
                file_type: resolved.stat.st_mode & libc::S_IFMT,
                fd: resolved.fd,
                merged: resolved.merged,
                parent,
                lookups: AtomicU64::new(0),
            })
        });
        node.lookups.fetch_add(1, Ordering::Relaxed);
        node.clone()
    }

    /// The kernel dropped `count` lookups of node `id`; the node goes when none remain.
    pub fn forget(&self, id: u64, count: u64) {
        if id == ROOT_ID {
            return;
        }
        let mut nodes = self.nodes.write();
        let Some(node) = nodes.get(&id) else {
            return;
        };
        let before = node.lookups.load(Ordering::Relaxed);
        let after = before.saturating_sub(count);
        node.lookups.store(after, Ordering::Relaxed);
        if after == 0 {
            nodes.remove(&id);
        }
    }

    /// The user-visible inode number of a layer object (also its node id, root excepted).
    pub fn ino_of(&self, key: ObjectKey) -> u64 {
        self.inos.ino(key)
    }

    pub fn len(&self) -> usize {
        self.nodes.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Inode numbers for the union: the filesystem of the first layer object seen keeps its own
/// numbers; every other filesystem gets an index in the top 8 bits (like the kernel's xino),
/// so numbers stay unique across layers on different filesystems without any per-file state.
/// Objects whose own number already uses the top bits get numbers from a counter, remembered
/// for the life of the mount so they stay stable.
#[derive(Default)]
struct InoSpace {
    devs: Mutex<Vec<u64>>,
    overflow: Mutex<HashMap<ObjectKey, u64>>,
}

const DEV_SHIFT: u32 = 56;
const OVERFLOW_BASE: u64 = 0xff << DEV_SHIFT;

impl InoSpace {
    fn ino(&self, (dev, ino): ObjectKey) -> u64 {
        let index = {
            let mut devs = self.devs.lock();
            match devs.iter().position(|d| *d == dev) {
                Some(i) => i as u64,
                None => {
                    devs.push(dev);
                    (devs.len() - 1) as u64
                }
            }
        };
        let composed = (index << DEV_SHIFT) | ino;
        // Id 1 is the FUSE root's; any other object numbered 1 takes a counter number.
        if ino >> DEV_SHIFT == 0 && index < 0xff && composed != ROOT_ID {
            return composed;
        }
        let mut overflow = self.overflow.lock();
        let next = OVERFLOW_BASE + overflow.len() as u64 + 1;
        *overflow.entry((dev, ino)).or_insert(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_are_unique_across_filesystems_and_stable() {
        let space = InoSpace::default();
        let a = space.ino((10, 5));
        let b = space.ino((11, 5));
        assert_ne!(a, b);
        assert_eq!(a, 5, "the first filesystem keeps its own numbers");
        assert_eq!(space.ino((11, 5)), b);
        let big = space.ino((10, u64::MAX - 3));
        assert!(big >= OVERFLOW_BASE);
        assert_eq!(space.ino((10, u64::MAX - 3)), big);
        assert_ne!(space.ino((10, u64::MAX - 4)), big);
    }
}
