//! Owner ids as the mount shows them, and as the layers store them.
//!
//! Owns: fuse-overlayfs's `uidmapping=`/`gidmapping=` (an id C..C+S-1 stored in the layers is
//! shown as H..H+S-1 in the mount, and mapped back when a caller creates or chowns) and
//! `squash_to_root`/`squash_to_uid=`/`squash_to_gid=` (every file shown as owned by one id).
//! Ids outside every mapping show as the overflow id 65534, like the kernel shows ids a user
//! namespace cannot map. Must never: change what is stored for an id it cannot map back
//! (a chown to such an id is refused with EINVAL, as in a user namespace).

use crate::options::{IdMapping, MountConfig};

/// The id shown for a stored id no mapping covers (the kernel's default overflowuid/gid).
pub const OVERFLOW_ID: u32 = 65534;

/// One direction-aware table for uids or gids.
#[derive(Debug, Clone, Default)]
struct Table {
    mappings: Vec<IdMapping>,
    squash: Option<u32>,
}

impl Table {
    fn shown(&self, stored: u32) -> u32 {
        if let Some(id) = self.squash {
            return id;
        }
        if self.mappings.is_empty() {
            return stored;
        }
        self.mappings
            .iter()
            .find(|m| stored >= m.container && stored - m.container < m.size)
            .map_or(OVERFLOW_ID, |m| m.host + (stored - m.container))
    }

    fn stored(&self, shown: u32) -> Option<u32> {
        if self.mappings.is_empty() {
            return Some(shown);
        }
        self.mappings
            .iter()
            .find(|m| shown >= m.host && shown - m.host < m.size)
            .map(|m| m.container + (shown - m.host))
    }
}

/// The id translation of one mount.
#[derive(Debug, Clone, Default)]
pub struct IdMap {
    uids: Table,
    gids: Table,
}

impl IdMap {
    pub fn from_config(config: &MountConfig) -> IdMap {
        let root = config.squash_to_root.then_some(0);
        IdMap {
            uids: Table {
                mappings: config.uid_mappings.clone(),
                squash: config.squash_to_uid.or(root),
            },
            gids: Table {
                mappings: config.gid_mappings.clone(),
                squash: config.squash_to_gid.or(root),
            },
        }
    }

    /// Whether ids are shown as stored (no mapping, no squashing).
    pub fn is_identity(&self) -> bool {
        self.uids.mappings.is_empty()
            && self.gids.mappings.is_empty()
            && self.uids.squash.is_none()
            && self.gids.squash.is_none()
    }

    pub fn shown_uid(&self, stored: u32) -> u32 {
        self.uids.shown(stored)
    }

    pub fn shown_gid(&self, stored: u32) -> u32 {
        self.gids.shown(stored)
    }

    /// The id to store for a uid a caller asked for (chown) or has (create); `None` if no
    /// mapping covers it.
    pub fn stored_uid(&self, shown: u32) -> Option<u32> {
        self.uids.stored(shown)
    }

    pub fn stored_gid(&self, shown: u32) -> Option<u32> {
        self.gids.stored(shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(c: u32, h: u32, s: u32) -> IdMapping {
        IdMapping {
            container: c,
            host: h,
            size: s,
        }
    }

    fn with(uid: Vec<IdMapping>, gid: Vec<IdMapping>) -> IdMap {
        IdMap {
            uids: Table {
                mappings: uid,
                squash: None,
            },
            gids: Table {
                mappings: gid,
                squash: None,
            },
        }
    }

    #[test]
    fn stored_ids_in_a_mapping_are_shown_shifted_and_map_back() {
        let m = with(vec![map(0, 100000, 65536)], vec![map(0, 200000, 10)]);
        assert_eq!(m.shown_uid(0), 100000);
        assert_eq!(m.shown_uid(1000), 101000);
        assert_eq!(m.stored_uid(101000), Some(1000));
        assert_eq!(m.shown_gid(9), 200009);
        assert_eq!(m.stored_gid(200009), Some(9));
    }

    #[test]
    fn ids_outside_every_mapping_show_as_overflow_and_cannot_be_stored() {
        let m = with(vec![map(0, 1000, 1), map(1, 100000, 65535)], vec![]);
        assert_eq!(m.shown_uid(0), 1000);
        assert_eq!(m.shown_uid(5), 100004);
        assert_eq!(m.shown_uid(70000), OVERFLOW_ID);
        assert_eq!(m.stored_uid(1000), Some(0));
        assert_eq!(m.stored_uid(42), None);
        assert_eq!(m.shown_gid(42), 42, "no gid mapping: gids pass through");
    }

    fn config(opts: &str) -> MountConfig {
        let args = ["-o", opts, "/mnt"].map(std::ffi::OsString::from);
        match crate::options::parse_args(args) {
            Ok(crate::options::Command::Mount(c)) => c,
            other => panic!("{opts}: {other:?}"),
        }
    }

    #[test]
    fn squash_shows_one_owner_but_stores_through_the_mapping() {
        let m = IdMap::from_config(&config("lowerdir=/l,squash_to_root,squash_to_gid=5"));
        assert_eq!(m.shown_uid(1234), 0);
        assert_eq!(m.shown_gid(1234), 5);
        assert_eq!(m.stored_uid(77), Some(77));
        assert!(!m.is_identity());
        assert!(IdMap::from_config(&config("lowerdir=/l")).is_identity());
    }
}
