//! The inode table, built from the provider's inventory and kept up to
//! date by [`super::refresh`].
//!
//! Inode 1 is the root. Directories come from path components, files from
//! disks. Every name is mapped to a valid one ([`super::names`], one-to-one)
//! and made unique among its siblings, so a file and a directory of the
//! same name (an S3 key `a` beside the prefix `a/`) both appear. Who keeps
//! the plain name in such a clash does not depend on listing order: the
//! directory does (every path beneath it stays put), and the file gets a
//! suffix hashed from its own raw name and locator; of two disks listed
//! under one path, the one whose locator sorts first keeps it. An entry
//! that appears later never takes a name already given.
//!
//! Sized for millions of disks: lookup, getattr and the next readdir entry
//! are O(1). A directory keeps its children in listing order (a readdir
//! offset is a position in it, so resuming costs nothing) and a hash index
//! of them that stores inode numbers only, hashing the child's own name,
//! so no name is held twice; the count of sub-directories (`nlink`) and
//! the total of all sizes (`statfs`) are kept, not counted.
//!
//! Sized for memory too: every name and locator lives in one string of
//! the tree's (no small allocation per disk, and no holes left among them
//! when the listing that brought them is freed), and a file's node holds
//! its disk's fields inline.
//!
//! Nothing is ever taken out: an entry the provider no longer lists is
//! marked gone (hidden from lookup and listing), so that the same path
//! keeps its inode number and its place in the listing if it comes back.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use hashbrown::HashTable;

use super::names::{candidate_names, unique_name, valid_name};
use super::Kind;
use crate::provider::{DiskEntry, Inventory, Version};

pub const ROOT_INO: u64 = 1;

/// readdir offsets 0 and 1 are `.` and `..`; child `i` is at `i + 2`.
pub const FIRST_CHILD_OFFSET: u64 = 2;

pub struct Node {
    pub parent: u64,
    name: Span,
    pub kind: NodeKind,
}

pub enum NodeKind {
    /// Index into the tree's directories.
    Dir(u32),
    File(FileNode),
}

/// A disk as listed, less its path (the tree is the path).
pub struct FileNode {
    /// The size last seen, refreshed when a file is opened.
    pub size: AtomicU64,
    /// The size listed, which a refresh compares with.
    listed_size: u64,
    pub mtime: SystemTime,
    pub version: Version,
    locator: Span,
    pub allocated: Option<u64>,
    /// Bumped whenever a refresh replaces the listed disk.
    pub replaced: u32,
    /// No longer listed by the provider.
    pub gone: bool,
}

/// Where a string is in the tree's [`Tree::strings`].
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Span {
    start: u32,
    len: u32,
}

/// What the tree's strings can hold: offsets are 32 bits.
const STRINGS_MAX: usize = u32::MAX as usize;

pub struct Dir {
    /// The name the provider gives it (the node's name may be mapped):
    /// what a listing of this one directory asks for.
    pub raw: Box<str>,
    /// Not listed yet (a provider listed one level at a time): its
    /// children are unknown until its first lookup or readdir.
    pub unlisted: bool,
    /// When its next listing is due, in the refresher's milliseconds (a
    /// provider listed one level at a time).
    pub due_ms: AtomicU64,
    /// The newest mtime beneath it.
    pub mtime: SystemTime,
    /// Children in listing order, gone ones included.
    pub entries: Vec<u64>,
    /// The same children, found by name.
    index: HashTable<u64>,
    /// Sub-directories not gone.
    pub subdirs: u32,
    pub gone: bool,
    /// Bumped whenever an entry is added, goes or comes back: the kernel's
    /// cached listing of the directory is kept only while it is unchanged.
    pub generation: u64,
    /// The generation the kernel last listed.
    pub listed_generation: AtomicU64,
}

impl Dir {
    fn new(raw: &str, unlisted: bool, mtime: SystemTime) -> Dir {
        Dir {
            raw: raw.into(),
            unlisted,
            due_ms: AtomicU64::new(0),
            mtime,
            entries: Vec::new(),
            index: HashTable::new(),
            subdirs: 0,
            gone: false,
            generation: 0,
            listed_generation: AtomicU64::new(0),
        }
    }
}

pub struct Tree {
    nodes: Vec<Node>,
    dirs: Vec<Dir>,
    /// Every node's name and every file's locator, end to end.
    strings: String,
    hasher: RandomState,
    total_bytes: AtomicU64,
    gone: u64,
    /// Directories made from now on are unlisted (the provider lists one
    /// level at a time).
    lazy: bool,
}

impl Tree {
    fn empty(capacity: usize) -> Tree {
        let mut tree = Tree {
            nodes: Vec::with_capacity(capacity + 1),
            dirs: vec![Dir::new("", false, SystemTime::UNIX_EPOCH)],
            strings: String::new(),
            hasher: RandomState::new(),
            total_bytes: AtomicU64::new(0),
            gone: 0,
            lazy: false,
        };
        tree.nodes.push(Node {
            parent: ROOT_INO,
            name: Span::default(),
            kind: NodeKind::Dir(0),
        });
        tree
    }

    /// Takes the inventory.
    pub fn build(inventory: Inventory) -> Tree {
        Self::build_from(inventory, false)
    }

    /// Takes the root's level of a provider listed one level at a time:
    /// the directories in it stay unlisted until used.
    pub fn build_levels(root: Inventory) -> Tree {
        Self::build_from(root, true)
    }

    fn build_from(inventory: Inventory, lazy: bool) -> Tree {
        let Inventory {
            mut disks,
            mut empty_dirs,
        } = inventory;
        let mut tree = Tree::empty(disks.len());
        tree.lazy = lazy;
        disks.sort_by(|a, b| (&a.path, &a.locator).cmp(&(&b.path, &b.locator)));
        // Every directory first, so that a directory's name never depends
        // on whether a file of the same name was listed before it.
        for disk in &disks {
            if let Some((_, dir_path)) = disk.path.split_last() {
                tree.make_dirs(dir_path, disk.mtime);
            }
        }
        empty_dirs.sort();
        for dir in &empty_dirs {
            tree.make_dirs(dir, SystemTime::UNIX_EPOCH);
        }
        drop(empty_dirs);
        for disk in disks {
            tree.add_disk(disk);
        }
        let newest = (1..=tree.nodes.len() as u64)
            .map(|ino| tree.mtime(ino))
            .max();
        tree.dirs[0].mtime = newest.unwrap_or(SystemTime::UNIX_EPOCH);
        // Listings come out sorted by name whatever order they were made in.
        let (nodes, strings, hasher) = (&tree.nodes, &tree.strings, &tree.hasher);
        let name = |ino: u64| span_str(strings, nodes[(ino - 1) as usize].name);
        for dir in &mut tree.dirs {
            dir.entries.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
            dir.entries.shrink_to_fit();
            dir.index.shrink_to_fit(|&ino| hasher.hash_one(name(ino)));
        }
        tree.nodes.shrink_to_fit();
        tree.dirs.shrink_to_fit();
        tree.strings.shrink_to_fit();
        tree
    }

    /// Keeps `text` in the tree's strings, unless they are full.
    fn store(&mut self, text: &str) -> Option<Span> {
        let start = self.strings.len();
        if STRINGS_MAX - start < text.len() {
            tracing::warn!(
                "left out of the inventory: its names and locators pass {STRINGS_MAX} bytes"
            );
            return None;
        }
        self.strings.push_str(text);
        Some(Span {
            start: start as u32,
            len: text.len() as u32,
        })
    }

    /// Puts `text` (no longer than `span`) where `span` was, for a string
    /// that only one entry points at; the rest of `span` is left unused.
    fn overwrite(&mut self, span: Span, text: &str) -> Span {
        let start = span.start as usize;
        let end = start + span.len as usize;
        // Same length in and out, so nothing after it moves; the padding
        // keeps the whole range valid UTF-8.
        let padding = "\0".repeat(span.len as usize - text.len());
        self.strings
            .replace_range(start..end, &format!("{text}{padding}"));
        Span {
            start: span.start,
            len: text.len() as u32,
        }
    }

    /// The name of `node` in its directory.
    pub fn name<'a>(&'a self, node: &Node) -> &'a str {
        span_str(&self.strings, node.name)
    }

    /// Where the provider finds the file's bytes.
    pub fn locator<'a>(&'a self, file: &FileNode) -> &'a str {
        span_str(&self.strings, file.locator)
    }

    /// Entry `ino`'s mtime (a directory's: the newest beneath it).
    pub fn mtime(&self, ino: u64) -> SystemTime {
        match self.get(ino).map(|node| &node.kind) {
            Some(NodeKind::File(file)) => file.mtime,
            Some(NodeKind::Dir(dir)) => self.dirs[*dir as usize].mtime,
            None => SystemTime::UNIX_EPOCH,
        }
    }

    /// The disk a file was listed as, for the provider to read (its path
    /// is the tree's business, left empty).
    pub fn disk_entry(&self, file: &FileNode) -> DiskEntry {
        DiskEntry {
            path: Vec::new(),
            size: file.listed_size,
            mtime: file.mtime,
            version: file.version.clone(),
            locator: self.locator(file).to_owned(),
            allocated: file.allocated,
        }
    }

    /// Whether `disk` is what file `file` was listed as (its path aside).
    pub fn lists(&self, file: &FileNode, disk: &DiskEntry) -> bool {
        file.listed_size == disk.size
            && file.mtime == disk.mtime
            && file.allocated == disk.allocated
            && file.version == disk.version
            && self.locator(file) == disk.locator
    }

    /// The directories of `path`, made where missing (or back if gone);
    /// `None` when the tree's strings are full.
    pub(super) fn make_dirs(&mut self, path: &[String], mtime: SystemTime) -> Option<u64> {
        let mut parent = ROOT_INO;
        for component in path {
            parent = match self.find(parent, component, Kind::Dir, "", |_| false) {
                Some(ino) => {
                    let _ = self.set_gone(ino, false);
                    ino
                }
                None => {
                    let dir = self.dirs.len() as u32;
                    let key = clash_key("dir", component, "");
                    let ino = self.add_child(parent, component, &key, NodeKind::Dir(dir))?;
                    self.dirs.push(Dir::new(component, self.lazy, mtime));
                    ino
                }
            };
            let dir = self.dir_index(parent);
            let newest = &mut self.dirs[dir].mtime;
            *newest = (*newest).max(mtime);
        }
        Some(parent)
    }

    /// Places a disk not in the tree (its directories made as needed).
    pub(super) fn add_disk(&mut self, disk: DiskEntry) -> Option<u64> {
        let (file_name, dir_path) = disk.path.split_last()?;
        let parent = self.make_dirs(dir_path, disk.mtime)?;
        let key = clash_key("file", file_name, &disk.locator);
        let locator = self.store(&disk.locator)?;
        let file = FileNode {
            size: AtomicU64::new(disk.size),
            listed_size: disk.size,
            mtime: disk.mtime,
            version: disk.version,
            locator,
            allocated: disk.allocated,
            replaced: 0,
            gone: false,
        };
        let ino = self.add_child(parent, file_name, &key, NodeKind::File(file))?;
        self.add_total(0, disk.size);
        Some(ino)
    }

    /// `kind` as a new child of `parent`: a directory's [`Dir`] is pushed
    /// right after.
    fn add_child(
        &mut self,
        parent: u64,
        raw_name: &str,
        key: &[u8],
        kind: NodeKind,
    ) -> Option<u64> {
        let ino = self.nodes.len() as u64 + 1;
        let dir = self.dir_index(parent);
        let valid = valid_name(raw_name);
        let name = if self.child(parent, &valid).is_none() {
            self.store(&valid)?
        } else {
            let unique = unique_name(|name| self.child(parent, name).is_some(), &valid, key);
            self.store(&unique)?
        };
        let is_dir = matches!(kind, NodeKind::Dir(_));
        let hash = self.hasher.hash_one(span_str(&self.strings, name));
        self.nodes.push(Node { parent, name, kind });
        let (nodes, strings, hasher) = (&self.nodes, &self.strings, &self.hasher);
        let dir = &mut self.dirs[dir];
        dir.index.insert_unique(hash, ino, |&child| {
            hasher.hash_one(span_str(strings, nodes[(child - 1) as usize].name))
        });
        dir.entries.push(ino);
        dir.generation += 1;
        if is_dir {
            dir.subdirs += 1;
        }
        Some(ino)
    }

    /// The entry placed for `raw_name` under `parent` (gone or not): a
    /// directory, or the file with `locator` that is not `claimed` (two
    /// disks listed at one path with one locator are two files). Walks the
    /// names it could have been given until one is its own or free.
    pub(super) fn find(
        &self,
        parent: u64,
        raw_name: &str,
        kind: Kind,
        locator: &str,
        claimed: impl Fn(u64) -> bool,
    ) -> Option<u64> {
        let key = match kind {
            Kind::Dir => clash_key("dir", raw_name, ""),
            Kind::File => clash_key("file", raw_name, locator),
        };
        for name in candidate_names(&valid_name(raw_name), &key) {
            let ino = self.child(parent, &name)?;
            let ours = match &self.nodes[(ino - 1) as usize].kind {
                NodeKind::Dir(_) => kind == Kind::Dir,
                NodeKind::File(file) => {
                    kind == Kind::File && self.locator(file) == locator && !claimed(ino)
                }
            };
            if ours {
                return Some(ino);
            }
        }
        None
    }

    /// Marks an entry gone or back, keeping the counts; whether it was not
    /// so already.
    pub(super) fn set_gone(&mut self, ino: u64, gone: bool) -> bool {
        let index = (ino - 1) as usize;
        let parent = self.nodes[index].parent;
        let was = match &mut self.nodes[index].kind {
            NodeKind::File(FileNode {
                gone: was, size, ..
            }) => {
                let size = size.load(Ordering::Relaxed);
                let before = std::mem::replace(was, gone);
                if before != gone {
                    if gone {
                        self.add_total(size, 0);
                    } else {
                        self.add_total(0, size);
                    }
                }
                before
            }
            NodeKind::Dir(dir) => {
                let dir = &mut self.dirs[*dir as usize];
                let before = std::mem::replace(&mut dir.gone, gone);
                if before != gone && ino != ROOT_INO {
                    let parent_dir = self.dir_index(parent);
                    let subdirs = &mut self.dirs[parent_dir].subdirs;
                    *subdirs = if gone { *subdirs - 1 } else { *subdirs + 1 };
                }
                before
            }
        };
        if was != gone {
            self.gone = if gone { self.gone + 1 } else { self.gone - 1 };
            let parent_dir = self.dir_index(parent);
            self.dirs[parent_dir].generation += 1;
        }
        was != gone
    }

    /// A listed file's new size, mtime, version or locator.
    pub(super) fn replace_disk(&mut self, ino: u64, disk: DiskEntry) {
        let Some(NodeKind::File(old)) = self.get(ino).map(|node| &node.kind) else {
            return;
        };
        let old_locator = old.locator;
        let locator = if self.locator(old) == disk.locator {
            Some(old_locator)
        } else if disk.locator.len() <= old_locator.len as usize {
            // In the old one's place: a URL signed anew at every listing
            // must not grow the strings by its length each time.
            Some(self.overwrite(old_locator, &disk.locator))
        } else {
            self.store(&disk.locator)
        };
        let Some(locator) = locator else { return };
        let NodeKind::File(file) = &mut self.nodes[(ino - 1) as usize].kind else {
            return;
        };
        let before = file.size.swap(disk.size, Ordering::Relaxed);
        file.listed_size = disk.size;
        file.mtime = disk.mtime;
        file.version = disk.version;
        file.locator = locator;
        file.allocated = disk.allocated;
        file.replaced = file.replaced.wrapping_add(1);
        if !file.gone {
            self.add_total(before, disk.size);
        }
    }

    fn dir_index(&self, ino: u64) -> usize {
        match self.nodes[(ino - 1) as usize].kind {
            NodeKind::Dir(dir) => dir as usize,
            NodeKind::File(_) => unreachable!("parents are directories"),
        }
    }

    fn add_total(&self, minus: u64, plus: u64) {
        // Sizes fit in i64 (checked where they entered), but a million of
        // them still overflow: saturate rather than wrap.
        let _ = self
            .total_bytes
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |total| {
                Some(total.saturating_sub(minus).saturating_add(plus))
            });
    }

    pub fn get(&self, ino: u64) -> Option<&Node> {
        ino.checked_sub(1)
            .and_then(|index| self.nodes.get(index as usize))
    }

    /// The entry `ino`, if it is listed now (not gone).
    pub fn present(&self, ino: u64) -> Option<&Node> {
        let node = self.get(ino)?;
        let gone = match &node.kind {
            NodeKind::Dir(dir) => self.dirs[*dir as usize].gone,
            NodeKind::File(file) => file.gone,
        };
        (!gone).then_some(node)
    }

    /// The directory `ino` is, if it is one.
    pub fn dir(&self, ino: u64) -> Option<&Dir> {
        match self.get(ino)?.kind {
            NodeKind::Dir(dir) => self.dirs.get(dir as usize),
            NodeKind::File(_) => None,
        }
    }

    /// The child of directory `parent` called `name`, gone or not.
    pub fn child(&self, parent: u64, name: &str) -> Option<u64> {
        let dir = self.dir(parent)?;
        let hash = self.hasher.hash_one(name);
        dir.index
            .find(hash, |&child| {
                span_str(&self.strings, self.nodes[(child - 1) as usize].name) == name
            })
            .copied()
    }

    /// Whether directories are listed one level at a time.
    pub fn is_lazy(&self) -> bool {
        self.lazy
    }

    /// The raw path of directory `ino` (the provider's names), for a
    /// listing of that one directory.
    pub fn raw_path(&self, ino: u64) -> Vec<String> {
        let mut parts = Vec::new();
        let mut current = ino;
        while current != ROOT_INO {
            let Some(node) = self.get(current) else { break };
            if let Some(dir) = self.dir(current) {
                parts.push(dir.raw.to_string());
            }
            current = node.parent;
        }
        parts.reverse();
        parts
    }

    /// Directory `ino`'s children are listed now.
    pub(super) fn set_listed(&mut self, ino: u64) {
        let index = self.dir_index(ino);
        let dir = &mut self.dirs[index];
        if dir.unlisted {
            dir.unlisted = false;
            dir.generation += 1;
        }
    }

    /// Inode numbers given out, gone entries included.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Entries listed now.
    pub fn present_count(&self) -> u64 {
        self.nodes.len() as u64 - self.gone
    }

    /// The path of `ino` inside the mount, for logs and status.
    pub fn path_of(&self, ino: u64) -> String {
        let mut parts = Vec::new();
        let mut current = ino;
        while current != ROOT_INO {
            let Some(node) = self.get(current) else { break };
            parts.push(self.name(node));
            current = node.parent;
        }
        parts.reverse();
        format!("/{}", parts.join("/"))
    }

    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Records a file's size as found at open; returns the size listed.
    pub fn set_size(&self, size: &AtomicU64, current: u64) -> u64 {
        let listed = size.swap(current, Ordering::Relaxed);
        if listed != current {
            self.add_total(listed, current);
        }
        listed
    }
}

fn span_str(strings: &str, span: Span) -> &str {
    let start = span.start as usize;
    strings
        .get(start..start + span.len as usize)
        .unwrap_or_default()
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
    use std::collections::BTreeMap;

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
        let dir = tree.dir(ino).expect("a directory");
        let names: Vec<String> = dir
            .entries
            .iter()
            .map(|&child| tree.name(tree.get(child).unwrap()).to_string())
            .collect();
        for (name, &child) in names.iter().zip(&dir.entries) {
            assert_eq!(
                tree.child(ino, name),
                Some(child),
                "{name} is found by name"
            );
        }
        names
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
        let tree = Tree::build(inventory);
        assert_eq!(children(&tree, ROOT_INO), ["vm1", "vm2", "vm3"]);
        assert_eq!(tree.total_bytes(), 60);
        assert_eq!(tree.len(), 1 + 3 + 2 + 1 + 1);
        assert_eq!(tree.dir(ROOT_INO).unwrap().subdirs, 3);
        let vm2 = tree.child(ROOT_INO, "vm2").unwrap();
        assert_eq!(tree.dir(vm2).unwrap().subdirs, 1);
        assert!(tree.child(ROOT_INO, "vm4").is_none());
        let file = tree
            .child(tree.child(vm2, "sub").unwrap(), "c.vmdk")
            .unwrap();
        assert!(tree.dir(file).is_none());
        let NodeKind::File(FileNode { size, .. }) = &tree.get(file).unwrap().kind else {
            panic!("a file");
        };
        // A size found at open moves the total with it.
        assert_eq!(tree.set_size(size, 35), 30);
        assert_eq!(tree.total_bytes(), 65);
    }

    #[test]
    fn a_disk_costs_one_node_and_its_strings() {
        // The per-disk figure in docs/design.md rests on this.
        assert!(
            std::mem::size_of::<Node>() <= 112,
            "{}",
            std::mem::size_of::<Node>()
        );
        let mut tree = Tree::build(Inventory {
            disks: vec![disk(&["vm", "a.vmdk"], 10)],
            empty_dirs: vec![],
        });
        assert_eq!(tree.strings, "vmvm/a.vmdka.vmdk");
        let file = tree
            .child(tree.child(ROOT_INO, "vm").unwrap(), "a.vmdk")
            .unwrap();
        let NodeKind::File(node) = &tree.get(file).unwrap().kind else {
            panic!("a file");
        };
        let listed = tree.disk_entry(node);
        assert!(tree.lists(node, &listed));
        assert_eq!((listed.size, listed.locator.as_str()), (10, "vm/a.vmdk"));
        // A replacement with the same locator stores nothing again.
        let mut bigger = disk(&["vm", "a.vmdk"], 20);
        tree.replace_disk(file, bigger.clone());
        assert_eq!(tree.strings.len(), 17);
        let NodeKind::File(node) = &tree.get(file).unwrap().kind else {
            panic!("a file");
        };
        assert!(tree.lists(node, &bigger) && !tree.lists(node, &listed));
        assert_eq!((node.replaced, tree.total_bytes()), (1, 20));
        // A new locator no longer than the old takes its place; a longer
        // one is stored anew.
        for (locator, stored) in [("vm/b.raw", 17), ("vm/c.raw", 17), ("a/longer/place", 31)] {
            bigger.locator = locator.into();
            tree.replace_disk(file, bigger.clone());
            let NodeKind::File(node) = &tree.get(file).unwrap().kind else {
                panic!("a file");
            };
            assert_eq!(tree.locator(node), locator);
            assert_eq!(tree.strings.len(), stored, "{:?}", tree.strings);
        }
        assert_eq!(tree.name(tree.get(file).unwrap()), "a.vmdk");
        assert_eq!(tree.path_of(file), "/vm/a.vmdk");
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
        let tree = Tree::build(inventory);
        let top = children(&tree, ROOT_INO);
        assert_eq!(top.len(), 4, "{top:?}");
        assert_eq!(&top[..2], ["%2E%2E", "a"]);
        // The directory keeps `a`; the file is told apart by a hash.
        assert!(top[2].starts_with("a%~"), "{top:?}");
        assert_eq!(top[3], "v");
        let a = tree.child(ROOT_INO, "a").unwrap();
        assert!(tree.dir(a).is_some());
        let v = tree.child(ROOT_INO, "v").unwrap();
        // One-to-one: no clash among these three, no suffix needed.
        assert_eq!(children(&tree, v), ["%", "%00", "%2500"]);
        let paths: Vec<String> = (1..=tree.len() as u64).map(|i| tree.path_of(i)).collect();
        assert!(paths.contains(&"/%2E%2E/x".to_string()));
    }

    /// Each disk (by locator, which these tests make unique) → its path
    /// in the mount.
    fn placed(tree: &Tree) -> BTreeMap<String, String> {
        (1..=tree.len() as u64)
            .filter_map(|ino| match &tree.get(ino)?.kind {
                NodeKind::File(file) => Some((tree.locator(file).to_owned(), tree.path_of(ino))),
                NodeKind::Dir { .. } => None,
            })
            .collect()
    }

    #[test]
    fn a_new_sibling_renames_nothing() {
        let mut disks = vec![disk(&["vm", "dup"], 1), disk(&["vm", "a/b"], 1)];
        disks[0].locator = "one".into();
        let before = placed(&Tree::build(Inventory {
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
        let after = placed(&Tree::build(Inventory {
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
                        // The components' debug form keeps `a/b` and `a`,`b` apart.
                        entry.locator = format!("{path:?}#{locator}");
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
                let tree = Tree::build(inventory(&disks));
                let paths = placed(&tree);
                let mut files: Vec<String> = (1..=tree.len() as u64)
                    .filter(|&ino| matches!(tree.get(ino).unwrap().kind, NodeKind::File(_)))
                    .map(|ino| tree.path_of(ino))
                    .collect();
                files.sort();
                files.dedup();
                // One file per disk listed, each at its own path.
                prop_assert_eq!(files.len(), disks.len());
                for ino in 1..=tree.len() as u64 {
                    let node = tree.get(ino).unwrap();
                    let name = tree.name(node);
                    prop_assert!(ino == ROOT_INO || crate::fs::names::is_valid(name), "{:?}", name);
                }
                prop_assert_eq!(placed(&Tree::build(inventory(&shuffled))), paths);
            }
        }
    }
}
