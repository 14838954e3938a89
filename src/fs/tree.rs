//! The inode table: built once from the provider's inventory.
//!
//! Inode 1 is the root. Directories come from path components, files from
//! disks. Every name is mapped to a valid one ([`super::names`]) and made
//! unique among its siblings, so a file and a directory of the same name
//! (an S3 key `a` beside the prefix `a/`) both appear.

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
        disks.sort_by(|a, b| a.path.cmp(&b.path));
        for disk in disks {
            let Some((file_name, dir_path)) = disk.path.split_last() else {
                continue;
            };
            let parent = tree.make_dirs(&mut dirs, dir_path, disk.mtime);
            tree.add_child(
                parent,
                file_name,
                disk.mtime,
                NodeKind::File {
                    disk: Arc::new(disk.clone()),
                    size: AtomicU64::new(disk.size),
                },
            );
        }
        for dir in &inventory.empty_dirs {
            tree.make_dirs(&mut dirs, dir, SystemTime::UNIX_EPOCH);
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

    fn add_child(&mut self, parent: u64, raw_name: &str, mtime: SystemTime, kind: NodeKind) -> u64 {
        let ino = self.nodes.len() as u64 + 1;
        let NodeKind::Dir { children } = &mut self.nodes[(parent - 1) as usize].kind else {
            unreachable!("parents are directories");
        };
        let name = unique_name(children, &valid_name(raw_name));
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
            .sum()
    }
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
            version: Version("v".into()),
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
            ],
            empty_dirs: vec![],
        };
        let tree = Tree::build(&inventory);
        let top = children(&tree, ROOT_INO);
        assert_eq!(top, ["%2E%2E", "a", "a~2", "v"]);
        let v = tree.nodes.iter().position(|n| n.name == "v").unwrap() as u64 + 1;
        assert_eq!(children(&tree, v), ["%00", "%00~2"]);
        let paths: Vec<String> = (1..=tree.len() as u64).map(|i| tree.path_of(i)).collect();
        assert!(paths.contains(&"/%2E%2E/x".to_string()));
    }
}
