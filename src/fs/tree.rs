//! The inode table: built once from the provider's inventory.
//!
//! Inode 1 is the root. Directories come from path components, files from
//! disks. Every name is mapped to a valid one ([`super::names`], one-to-one)
//! and made unique among its siblings, so a file and a directory of the
//! same name (an S3 key `a` beside the prefix `a/`) both appear. Who keeps
//! the plain name in such a clash does not depend on listing order: the
//! directory does (every path beneath it stays put), and the file gets a
//! suffix hashed from its own raw name and locator; of two disks listed
//! under one path, the one whose locator sorts first keeps it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use super::names::{unique_name, valid_name};
use crate::provider::{DiskEntry, Inventory};

pub const ROOT_INO: u64 = 1;

pub struct Node {
    pub parent: u64,
    pub name: String,
    pub mtime: SystemTime,
    pub kind: NodeKind,
}

pub enum NodeKind {
    Dir {
        children: BTreeMap<String, u64>,
    },
    File {
        disk: Arc<DiskEntry>,
        /// The size last seen, refreshed when a file is opened.
        size: AtomicU64,
    },
}

pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    pub fn build(inventory: &Inventory) -> Tree {
        let mut tree = Tree {
            nodes: vec![Node {
                parent: ROOT_INO,
                name: String::new(),
                mtime: SystemTime::UNIX_EPOCH,
                kind: NodeKind::Dir {
                    children: BTreeMap::new(),
                },
            }],
        };
        // (parent, raw name) → directory inode, to place siblings together.
        let mut dirs: HashMap<(u64, String), u64> = HashMap::new();
        let mut disks: Vec<&DiskEntry> = inventory.disks.iter().collect();
        disks.sort_by(|a, b| (&a.path, &a.locator).cmp(&(&b.path, &b.locator)));
        // Every directory first, so that a directory's name never depends
        // on whether a file of the same name was listed before it.
        for disk in &disks {
            if let Some((_, dir_path)) = disk.path.split_last() {
                tree.make_dirs(&mut dirs, dir_path, disk.mtime);
            }
        }
        let mut empty_dirs: Vec<&Vec<String>> = inventory.empty_dirs.iter().collect();
        empty_dirs.sort();
        for dir in empty_dirs {
            tree.make_dirs(&mut dirs, dir, SystemTime::UNIX_EPOCH);
        }
        for disk in disks {
            let Some((file_name, dir_path)) = disk.path.split_last() else {
                continue;
            };
            let parent = tree.make_dirs(&mut dirs, dir_path, disk.mtime);
            let key = clash_key("file", file_name, &disk.locator);
            tree.add_child(
                parent,
                file_name,
                &key,
                disk.mtime,
                NodeKind::File {
                    disk: Arc::new(disk.clone()),
                    size: AtomicU64::new(disk.size),
                },
            );
        }
        let newest = tree.nodes.iter().map(|node| node.mtime).max();
        tree.nodes[0].mtime = newest.unwrap_or(SystemTime::UNIX_EPOCH);
        tree
    }

    fn make_dirs(
        &mut self,
        dirs: &mut HashMap<(u64, String), u64>,
        path: &[String],
        mtime: SystemTime,
    ) -> u64 {
        let mut parent = ROOT_INO;
        for component in path {
            let key = (parent, component.clone());
            parent = match dirs.get(&key) {
                Some(&ino) => ino,
                None => {
                    let ino = self.add_child(
                        parent,
                        component,
                        &clash_key("dir", component, ""),
                        mtime,
                        NodeKind::Dir {
                            children: BTreeMap::new(),
                        },
                    );
                    dirs.insert(key, ino);
                    ino
                }
            };
            let node = &mut self.nodes[(parent - 1) as usize];
            node.mtime = node.mtime.max(mtime);
        }
        parent
    }

    fn add_child(
        &mut self,
        parent: u64,
        raw_name: &str,
        key: &[u8],
        mtime: SystemTime,
        kind: NodeKind,
    ) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        let NodeKind::Dir { children } = &mut self.nodes[(parent - 1) as usize].kind else {
            unreachable!("parents are directories");
        };
        let name = unique_name(children, &valid_name(raw_name), key);
        children.insert(name.clone(), ino);
        self.nodes.push(Node {
            parent,
            name,
            mtime,
            kind,
        });
        ino
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1)
            .and_then(|index| self.nodes.get(index as usize))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The path of `ino` inside the mount, for logs and status.
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut current = ino;
        while current != ROOT_INO {
            let Some(node) = self.get(current) else { break };
            parts.push(node.name.as_str());
            current = node.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    pub fn total_bytes(&self) -> u64 {
        self.nodes
            .iter()
            .map(|node| match &node.kind {
                NodeKind::File { size, .. } => size.load(Ordering::Relaxed),
                NodeKind::Dir { .. } => 0,
            })
            // Provider sizes are capped at i64::MAX, but a million of them
            // still overflow: saturate rather than wrap.
            .fold(0u64, u64::saturating_add)
    }
}

/// What tells an entry apart from a sibling of the same name: its kind,
/// raw name and locator, each length-prefixed so that no two different
/// triples make one key.
fn clash_key(kind: &str, raw_name: &str, locator: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(kind.len() + raw_name.len() + locator.len() + 2);
    for part in [kind, raw_name, locator] {
        key.extend_from_slice(&(part.len() as u64).to_le_bytes());
        key.extend_from_slice(part.as_bytes());
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Version;

    fn disk(path: &[&str], size: u64) -> DiskEntry {
        DiskEntry {
            path: path.iter().map(|s| s.to_string()).collect(),
            size,
            mtime: SystemTime::UNIX_EPOCH,
            version: Version::Immutable,
            locator: path.join("/"),
            allocated: None,
        }
    }

    fn children(tree: &Tree, ino: u64) -> Vec<String> {
        match &tree.get(ino).unwrap().kind {
            NodeKind::Dir { children } => children.keys().cloned().collect(),
            NodeKind::File { .. } => panic!("not a dir"),
        }
    }

    #[test]
    fn builds_directories_from_paths() {
        let inventory = Inventory {
            disks: vec![
                disk(&["vm1", "a.vmdk"], 10),
                disk(&["vm1", "b.vmdk"], 20),
                disk(&["vm2", "sub", "c.vmdk"], 30),
            ],
            empty_dirs: vec![vec!["vm3".into()]],
        };
        let tree = Tree::build(&inventory);
        assert_eq!(children(&tree, ROOT_INO), ["vm1", "vm2", "vm3"]);
        assert_eq!(tree.total_bytes(), 60);
        assert_eq!(tree.len(), 1 + 3 + 2 + 1 + 1);
    }

    #[test]
    fn file_and_directory_of_one_name_both_appear_and_bad_names_are_mapped() {
        let inventory = Inventory {
            disks: vec![
                disk(&["a"], 1),
                disk(&["a", "b"], 2),
                disk(&["..", "x"], 3),
                disk(&["v", ""], 4),
                disk(&["v", "%00"], 5),
                disk(&["v", "\0"], 6),
            ],
            empty_dirs: vec![],
        };
        let tree = Tree::build(&inventory);
        let top = children(&tree, ROOT_INO);
        assert_eq!(top.len(), 4, "{top:?}");
        assert_eq!(&top[..2], ["%2E%2E", "a"]);
        // The directory keeps `a`; the file is told apart by a hash.
        assert!(top[2].starts_with("a%~"), "{top:?}");
        assert_eq!(top[3], "v");
        let a = tree.nodes.iter().position(|n| n.name == "a").unwrap();
        assert!(matches!(tree.nodes[a].kind, NodeKind::Dir { .. }));
        let v = tree.nodes.iter().position(|n| n.name == "v").unwrap() as u64 + 1;
        // One-to-one: no clash among these three, no suffix needed.
        assert_eq!(children(&tree, v), ["%", "%00", "%2500"]);
        let paths: Vec<String> = (1..=tree.len() as u64).map(|i| tree.path_of(i)).collect();
        assert!(paths.contains(&"/%2E%2E/x".to_string()));
    }

    /// Each disk (by path and locator) → its path in the mount.
    fn placed(tree: &Tree) -> BTreeMap<(Vec<String>, String), String> {
        (1..=tree.len() as u64)
            .filter_map(|ino| match &tree.get(ino)?.kind {
                NodeKind::File { disk, .. } => {
                    Some(((disk.path.clone(), disk.locator.clone()), tree.path_of(ino)))
                }
                NodeKind::Dir { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_new_sibling_renames_nothing() {
        let mut disks = vec![disk(&["vm", "dup"], 1), disk(&["vm", "a/b"], 1)];
        disks[0].locator = "one".into();
        let before = placed(&Tree::build(&Inventory {
            disks: disks.clone(),
            empty_dirs: vec![],
        }));
        // Today's `~2` numbering renamed on such additions; the escaped
        // twin of a name and a second `dup` now leave the others alone.
        let mut more = disks.clone();
        more.insert(0, disk(&["vm", "a%2Fb"], 1));
        let mut second = disk(&["vm", "dup"], 1);
        second.locator = "two".into();
        more.push(second);
        let after = placed(&Tree::build(&Inventory {
            disks: more,
            empty_dirs: vec![],
        }));
        for (disk, path) in &before {
            assert_eq!(after.get(disk), Some(path), "{disk:?} moved");
        }
        assert_eq!(after.len(), 4);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        /// Short paths over few names, so clashes (file and directory of
        /// one name, one path listed twice, escapes and their text) are common.
        fn inventories() -> impl Strategy<Value = Vec<DiskEntry>> {
            let name = prop_oneof![
                Just("a"),
                Just("a/b"),
                Just("a%2Fb"),
                Just(""),
                Just("%"),
                Just(".."),
                Just("\0"),
                Just("%00"),
            ];
            let path = proptest::collection::vec(name, 1..4);
            proptest::collection::vec((path, 0u8..3), 1..12).prop_map(|entries| {
                entries
                    .into_iter()
                    .map(|(path, locator)| {
                        let mut entry = disk(&path, 1);
                        entry.locator = format!("{}#{locator}", entry.locator);
                        entry
                    })
                    .collect()
            })
        }

        proptest! {
            #[test]
            fn siblings_stay_distinct_and_order_does_not_matter(
                (disks, shuffled) in inventories().prop_flat_map(|disks| {
                    let shuffled = Just(disks.clone()).prop_shuffle();
                    (Just(disks), shuffled)
                })
            ) {
                let inventory = |disks: &Vec<DiskEntry>| Inventory { disks: disks.clone(), empty_dirs: vec![] };
                let tree = Tree::build(&inventory(&disks));
                let paths = placed(&tree);
                let mut files: Vec<String> = (1..=tree.len() as u64)
                    .filter(|&ino| matches!(tree.get(ino).unwrap().kind, NodeKind::File { .. }))
                    .map(|ino| tree.path_of(ino))
                    .collect();
                files.sort();
                files.dedup();
                // One file per disk listed, each at its own path.
                prop_assert_eq!(files.len(), disks.len());
                for ino in 1..=tree.len() as u64 {
                    let node = tree.get(ino).unwrap();
                    prop_assert!(ino == ROOT_INO || crate::fs::names::is_valid(&node.name), "{:?}", node.name);
                }
                prop_assert_eq!(placed(&Tree::build(&inventory(&shuffled))), paths);
            }
        }
    }
}
