//! A live inventory: the provider is listed again when the listing is
//! older than `refresh=`, and the tree takes in what changed.
//!
//! A lookup or readdir that finds the listing stale starts a listing in a
//! tokio task and is answered from the tree as it is: listing never runs
//! on a FUSE thread, and reads never touch the tree. What the new listing
//! means for the tree is worked out under the read lock (every FUSE
//! request goes on meanwhile); only the changes are made under the write
//! lock. A disk found again at its path keeps its inode; one no longer
//! listed is marked gone (open files keep their own copy of it and read on
//! from their pinned version while the provider serves it).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::names::valid_name;
use super::tree::{NodeKind, Tree, ROOT_INO};
use super::Kind;
use crate::provider::{DiskEntry, Inventory, Provider, ProviderError};
use crate::read::retry::Budget;
use crate::read::ReadPath;

/// What one listing changed, in disks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Changes {
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
}

/// A kernel cache entry a listing made stale.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stale {
    /// The name `name` in directory `parent` (gone, or now another entry).
    Entry { parent: u64, name: Box<str> },
    /// The attributes (size, mtime, nlink) and listing of `ino`.
    Attrs(u64),
}

/// The kernel's caches of names and attributes (the FUSE adapter's
/// notifications), told what a listing changed so that nothing stale is
/// kept for the rest of its time to live.
pub trait KernelCache: Send + Sync {
    fn invalidate(&self, stale: &Stale);
}

/// Entries a listing found again.
enum Seen {
    /// A whole listing: by inode - 1.
    All(Vec<bool>),
    /// A listing of one directory (a handful of a large tree's entries).
    Some(HashSet<u64>),
}

impl Seen {
    fn mark(&mut self, ino: u64) {
        match self {
            Seen::All(seen) => seen[(ino - 1) as usize] = true,
            Seen::Some(seen) => {
                seen.insert(ino);
            }
        }
    }

    fn has(&self, ino: u64) -> bool {
        match self {
            Seen::All(seen) => seen[(ino - 1) as usize],
            Seen::Some(seen) => seen.contains(&ino),
        }
    }
}

/// What a listing means for the tree, worked out without changing it.
pub(super) struct Plan {
    /// The directory listed (its children only may go), or `None` for a
    /// whole listing.
    scope: Option<u64>,
    seen: Seen,
    /// Files listed again with another size, mtime, version or locator.
    changed: Vec<(u64, DiskEntry)>,
    /// Disks at paths the tree does not hold.
    added: Vec<DiskEntry>,
    /// Empty directories the tree does not hold.
    new_dirs: Vec<Vec<String>>,
}

/// What a whole listing means for the tree.
#[cfg(test)]
pub(super) fn plan(tree: &Tree, inventory: Inventory) -> Plan {
    plan_in(tree, inventory, None)
}

/// What `scope`'s listing (one level: its disks, its sub-directories in
/// `empty_dirs`) means for the tree, or a whole listing's (`None`).
pub(super) fn plan_in(tree: &Tree, inventory: Inventory, scope: Option<u64>) -> Plan {
    let Inventory {
        mut disks,
        empty_dirs,
    } = inventory;
    // As at build: of two disks at one path, the locator sorting first is
    // matched first.
    disks.sort_by(|a, b| (&a.path, &a.locator).cmp(&(&b.path, &b.locator)));
    let mut plan = Plan {
        scope,
        seen: match scope {
            None => Seen::All(vec![false; tree.len()]),
            Some(_) => Seen::Some(HashSet::new()),
        },
        changed: Vec::new(),
        added: Vec::new(),
        new_dirs: Vec::new(),
    };
    plan.seen.mark(ROOT_INO);
    // First every disk found with its own locator, then the rest: a disk
    // whose locator changed may take the file at its plain name only if
    // no disk of this listing is that file.
    let mut unmatched = Vec::new();
    for disk in disks {
        let Some((file_name, dir_path)) = disk.path.split_last() else {
            continue;
        };
        let found = existing_dir(tree, dir_path, &mut plan.seen).and_then(|parent| {
            let seen = &plan.seen;
            tree.find(parent, file_name, Kind::File, &disk.locator, |ino| {
                seen.has(ino)
            })
        });
        match found {
            Some(ino) => plan.matched(tree, ino, disk),
            None => unmatched.push(disk),
        }
    }
    for disk in unmatched {
        let Some((file_name, dir_path)) = disk.path.split_last() else {
            continue;
        };
        let plain = existing_dir(tree, dir_path, &mut plan.seen)
            .and_then(|parent| tree.child(parent, &valid_name(file_name)))
            .filter(|&ino| {
                !plan.seen.has(ino)
                    && matches!(
                        tree.get(ino).map(|node| &node.kind),
                        Some(NodeKind::File(_))
                    )
            });
        match plain {
            Some(ino) => plan.matched(tree, ino, disk),
            None => plan.added.push(disk),
        }
    }
    for dir in empty_dirs {
        if existing_dir(tree, &dir, &mut plan.seen).is_none() {
            plan.new_dirs.push(dir);
        }
    }
    plan
}

/// The directory at `path` if the tree has all of it, marking each seen.
fn existing_dir(tree: &Tree, path: &[String], seen: &mut Seen) -> Option<u64> {
    let mut parent = ROOT_INO;
    for component in path {
        parent = tree.find(parent, component, Kind::Dir, "", |_| false)?;
        seen.mark(parent);
    }
    Some(parent)
}

impl Plan {
    /// `disk` is listed again as file `ino`.
    fn matched(&mut self, tree: &Tree, ino: u64, disk: DiskEntry) {
        self.seen.mark(ino);
        if let Some(NodeKind::File(listed)) = tree.get(ino).map(|node| &node.kind) {
            if !tree.lists(listed, &disk) {
                self.changed.push((ino, disk));
            }
        }
    }
}

pub(super) fn apply(tree: &mut Tree, plan: Plan, stale: &mut Vec<Stale>) -> Changes {
    let mut changes = Changes::default();
    for (ino, disk) in plan.changed {
        tree.replace_disk(ino, disk);
        changes.changed += 1;
        stale.push(Stale::Attrs(ino));
    }
    // A whole listing decides for every entry; one directory's, for its
    // children only.
    let candidates: Box<dyn Iterator<Item = u64>> = match (plan.scope, &plan.seen) {
        // Entries the plan did not know of are not its to hide.
        (None, Seen::All(seen)) => Box::new(1..=seen.len() as u64),
        (None, Seen::Some(_)) => Box::new(std::iter::empty()),
        (Some(dir), _) => Box::new(
            tree.dir(dir)
                .map(|dir| dir.entries.clone())
                .unwrap_or_default()
                .into_iter(),
        ),
    };
    for ino in candidates {
        let seen = plan.seen.has(ino);
        let is_file = matches!(
            tree.get(ino).map(|node| &node.kind),
            Some(NodeKind::File(_))
        );
        if tree.set_gone(ino, !seen) {
            let Some(node) = tree.get(ino) else { continue };
            if !seen {
                stale.push(Stale::Entry {
                    parent: node.parent,
                    name: tree.name(node).into(),
                });
            }
            stale.push(Stale::Attrs(node.parent));
            if is_file {
                if seen {
                    changes.added += 1;
                } else {
                    changes.removed += 1;
                }
            }
        }
    }
    for disk in plan.added {
        if let Some(ino) = tree.add_disk(disk) {
            changes.added += 1;
            if let Some(node) = tree.get(ino) {
                stale.push(Stale::Attrs(node.parent));
            }
        }
    }
    for dir in plan.new_dirs {
        tree.make_dirs(&dir, SystemTime::UNIX_EPOCH);
    }
    if let Some(dir) = plan.scope {
        tree.set_listed(dir);
        stale.push(Stale::Attrs(dir));
    }
    changes
}

/// How long after a failed background listing the next one may start.
const FAILED_LISTING_PAUSE: Duration = Duration::from_secs(10);

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Lists the provider when the listing is older than `every`: the whole
/// inventory, or for a provider listed one level at a time, each directory
/// by itself (listed first when first used, again when its own listing is
/// older than `every`).
pub struct Refresher {
    every: Option<Duration>,
    /// The provider lists one level at a time.
    lazy: bool,
    provider: Arc<dyn Provider>,
    read_path: Arc<ReadPath>,
    tree: Arc<RwLock<Tree>>,
    /// Base of every `due_ms`: the refresher's creation.
    epoch: Instant,
    /// When the next whole listing is due, in milliseconds from `epoch`: a
    /// load on every lookup, so an atomic rather than a lock.
    due_ms: AtomicU64,
    running: AtomicBool,
    /// One whole listing at a time; `vmexportfs refresh` waits its turn.
    turn: tokio::sync::Mutex<()>,
    /// One listing of a directory at a time: who comes second waits for
    /// the first and finds it listed.
    levels: std::sync::Mutex<HashMap<u64, Arc<tokio::sync::Mutex<()>>>>,
    runtime: tokio::runtime::Handle,
    kernel: OnceLock<Box<dyn KernelCache>>,
}

/// Clears a "listing running" flag however the task ends, a panic in a
/// provider's listing included: otherwise it would never list again.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Refresher {
    pub(super) fn new(
        every: Option<Duration>,
        provider: Arc<dyn Provider>,
        read_path: Arc<ReadPath>,
        tree: Arc<RwLock<Tree>>,
    ) -> Arc<Refresher> {
        let lazy = tree.read().unwrap_or_else(|p| p.into_inner()).is_lazy();
        let refresher = Arc::new(Refresher {
            every,
            lazy,
            provider,
            read_path,
            tree,
            epoch: Instant::now(),
            due_ms: AtomicU64::new(every.map_or(u64::MAX, millis)),
            running: AtomicBool::new(false),
            turn: tokio::sync::Mutex::new(()),
            levels: std::sync::Mutex::new(HashMap::new()),
            runtime: tokio::runtime::Handle::current(),
            kernel: OnceLock::new(),
        });
        // The root's level was listed to build the tree.
        let due = refresher.due_in(every.unwrap_or(Duration::MAX));
        if let Some(root) = refresher.read_tree().dir(ROOT_INO) {
            root.due_ms.store(due, Ordering::Relaxed);
        }
        refresher
    }

    fn read_tree(&self) -> std::sync::RwLockReadGuard<'_, Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    fn due_in(&self, pause: Duration) -> u64 {
        self.now_ms().saturating_add(millis(pause))
    }

    /// Where stale kernel entries are reported, once the mount is up.
    pub fn set_kernel_cache(&self, kernel: Box<dyn KernelCache>) {
        let _ = self.kernel.set(kernel);
    }

    /// Starts a listing in the background if the one `dir` was answered
    /// from is stale (the whole inventory's, or `dir`'s own); the caller
    /// answers from the tree as it is.
    pub fn poke(self: &Arc<Self>, dir: u64) {
        let Some(every) = self.every else { return };
        if self.lazy {
            {
                let tree = self.read_tree();
                let Some(listed) = tree.dir(dir) else { return };
                let due = listed.due_ms.load(Ordering::Relaxed);
                if listed.unlisted || self.now_ms() < due {
                    return;
                }
                // Not due again while this listing runs, or after it failed;
                // of two pokes at once, only the one that moved it lists.
                let next = self.due_in(every.min(FAILED_LISTING_PAUSE));
                if listed
                    .due_ms
                    .compare_exchange(due, next, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
                {
                    return;
                }
            }
            let refresher = Arc::clone(self);
            self.runtime.spawn(async move {
                if let Err(err) = refresher.list_dir(dir, false).await {
                    tracing::warn!(
                        operation = "refresh",
                        directory = %refresher.read_tree().path_of(dir),
                        "listing the directory again failed: {err}"
                    );
                }
            });
            return;
        }
        let stale = self.now_ms() >= self.due_ms.load(Ordering::Relaxed);
        if !stale || self.running.swap(true, Ordering::AcqRel) {
            return;
        }
        let refresher = Arc::clone(self);
        self.runtime.spawn(async move {
            let _running = Running(&refresher.running);
            if let Err(err) = refresher.list_all().await {
                // The tree stays as it was; a failing provider is asked again
                // after a short pause, not on every lookup.
                refresher.due_ms.store(
                    refresher.due_in(every.min(FAILED_LISTING_PAUSE)),
                    Ordering::Relaxed,
                );
                tracing::warn!(
                    operation = "refresh",
                    "listing the inventory again failed: {err}"
                );
            }
        });
    }

    /// Whether `dir` must be listed before it can be answered for.
    pub fn needs_listing(&self, dir: u64) -> bool {
        self.lazy && self.read_tree().dir(dir).is_some_and(|dir| dir.unlisted)
    }

    /// Lists `dir` now: its first listing (`only_if_unlisted`: unless another
    /// caller listed it meanwhile), or again.
    pub async fn list_dir(
        &self,
        dir: u64,
        only_if_unlisted: bool,
    ) -> Result<Changes, ProviderError> {
        let lock = Arc::clone(
            self.levels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(dir)
                .or_default(),
        );
        let _turn = lock.lock().await;
        let (raw, shown, first) = {
            let tree = self.read_tree();
            match tree.dir(dir) {
                Some(listed) if only_if_unlisted && !listed.unlisted => {
                    return Ok(Changes::default())
                }
                Some(listed) => (tree.raw_path(dir), tree.path_of(dir), listed.unlisted),
                None => return Ok(Changes::default()),
            }
        };
        let started = Instant::now();
        let level = self
            .read_path
            .retrying(&mut Budget::default(), &shown, "list", || {
                self.provider.list_level(&raw)
            })
            .await?;
        let level = super::refuse_impossible_sizes(level);
        let changes = self.take_in(level, Some(dir)).await?;
        if let (Some(every), Some(listed)) = (self.every, self.read_tree().dir(dir)) {
            listed.due_ms.store(self.due_in(every), Ordering::Relaxed);
        }
        let seconds = started.elapsed().as_secs_f64();
        if first || changes == Changes::default() {
            tracing::debug!(directory = %shown, disks = changes.added, seconds, "directory listed");
        } else {
            tracing::info!(
                directory = %shown,
                added = changes.added,
                removed = changes.removed,
                changed = changes.changed,
                seconds,
                "directory listed again"
            );
        }
        Ok(changes)
    }

    /// Lists the provider again now: everything under `dir` that was listed
    /// before (directories still unlisted stay so), or the whole inventory.
    pub async fn list_now(&self, dir: u64) -> Result<Changes, ProviderError> {
        if !self.lazy {
            return self.list_all().await;
        }
        let mut total = Changes::default();
        let mut pending = vec![dir];
        while let Some(next) = pending.pop() {
            let changes = self.list_dir(next, false).await?;
            total.added += changes.added;
            total.removed += changes.removed;
            total.changed += changes.changed;
            let tree = self.read_tree();
            if let Some(listed) = tree.dir(next) {
                pending.extend(listed.entries.iter().copied().filter(|&child| {
                    tree.present(child).is_some()
                        && tree.dir(child).is_some_and(|child| !child.unlisted)
                }));
            }
        }
        Ok(total)
    }

    /// Lists the whole inventory and takes the changes in.
    async fn list_all(&self) -> Result<Changes, ProviderError> {
        let _turn = self.turn.lock().await;
        let started = Instant::now();
        let inventory = self
            .read_path
            .retrying(&mut Budget::default(), "/", "list", || self.provider.list())
            .await?;
        let inventory = super::refuse_impossible_sizes(inventory);
        let changes = self.take_in(inventory, None).await?;
        if let Some(every) = self.every {
            self.due_ms.store(self.due_in(every), Ordering::Relaxed);
        }
        if changes != Changes::default() {
            tracing::info!(
                added = changes.added,
                removed = changes.removed,
                changed = changes.changed,
                seconds = started.elapsed().as_secs_f64(),
                "inventory listed again"
            );
        } else {
            tracing::debug!(
                seconds = started.elapsed().as_secs_f64(),
                "inventory listed again: no change"
            );
        }
        Ok(changes)
    }

    /// Matches a listing (of `scope`, or whole) against the tree under the
    /// read lock, applies the changes under the write lock, then tells the
    /// kernel what went stale.
    async fn take_in(
        &self,
        inventory: Inventory,
        scope: Option<u64>,
    ) -> Result<Changes, ProviderError> {
        let tree = Arc::clone(&self.tree);
        // Working out a million entries takes a while: not on a worker that
        // other tasks (reads) are queued behind.
        let (changes, stale) = tokio::task::spawn_blocking(move || {
            let plan = plan_in(
                &tree.read().unwrap_or_else(|p| p.into_inner()),
                inventory,
                scope,
            );
            let mut stale = Vec::new();
            let changes = apply(
                &mut tree.write().unwrap_or_else(|p| p.into_inner()),
                plan,
                &mut stale,
            );
            (changes, stale)
        })
        .await
        .map_err(|err| ProviderError::Internal(format!("refresh: {err}")))?;
        // Outside the tree's lock: the kernel may be waiting on a lookup
        // that needs it while it takes a notification.
        if let Some(kernel) = self.kernel.get() {
            let mut stale = stale;
            stale.dedup();
            for entry in &stale {
                kernel.invalidate(entry);
            }
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Version;
    use std::collections::BTreeMap;

    fn disk(path: &str, size: u64, locator: &str) -> DiskEntry {
        DiskEntry {
            path: path.split('/').map(str::to_string).collect(),
            size,
            mtime: SystemTime::UNIX_EPOCH + Duration::from_secs(size),
            version: Version::Size(size),
            locator: locator.into(),
            allocated: None,
        }
    }

    fn inventory(disks: Vec<DiskEntry>) -> Inventory {
        Inventory {
            disks,
            empty_dirs: vec![],
        }
    }

    fn counted(added: u64, removed: u64, changed: u64) -> Changes {
        Changes {
            added,
            removed,
            changed,
        }
    }

    /// All four disks of the first test, as listed at its end.
    fn all_four() -> Vec<DiskEntry> {
        vec![
            disk("vm1/a.vmdk", 10, "vm1/a"),
            disk("vm1/b.vmdk", 25, "vm1/b"),
            disk("vm2/c.vmdk", 30, "vm2/c"),
            disk("vm3/d.vmdk", 40, "vm3/d"),
        ]
    }

    fn refresh(tree: &mut Tree, disks: Vec<DiskEntry>) -> Changes {
        let plan = plan(tree, inventory(disks));
        apply(tree, plan, &mut Vec::new())
    }

    /// Every path listed now → (inode, size, locator).
    fn listed(tree: &Tree) -> BTreeMap<String, (u64, u64, String)> {
        (1..=tree.len() as u64)
            .filter_map(|ino| match &tree.present(ino)?.kind {
                NodeKind::File(file) => Some((
                    tree.path_of(ino),
                    (
                        ino,
                        file.size.load(Ordering::Relaxed),
                        tree.locator(file).to_owned(),
                    ),
                )),
                NodeKind::Dir(_) => None,
            })
            .filter(|(path, _)| {
                // Under a gone directory is gone too.
                let mut ino = tree_ino(tree, path);
                while ino != ROOT_INO {
                    if tree.present(ino).is_none() {
                        return false;
                    }
                    ino = tree.get(ino).unwrap().parent;
                }
                true
            })
            .collect()
    }

    fn tree_ino(tree: &Tree, path: &str) -> u64 {
        path.split('/')
            .filter(|name| !name.is_empty())
            .fold(ROOT_INO, |ino, name| tree.child(ino, name).unwrap())
    }

    fn level(disks: Vec<DiskEntry>, dirs: &[&str]) -> Inventory {
        Inventory {
            disks,
            empty_dirs: dirs
                .iter()
                .map(|dir| dir.split('/').map(str::to_string).collect())
                .collect(),
        }
    }

    fn list_level(tree: &mut Tree, dir: u64, listed: Inventory) -> Changes {
        let plan = plan_in(tree, listed, Some(dir));
        apply(tree, plan, &mut Vec::new())
    }

    #[test]
    fn levels_are_listed_one_directory_at_a_time() {
        // The root's level: a disk and two directories, not listed yet.
        let mut tree = Tree::build_levels(level(vec![disk("top.img", 5, "top")], &["vm1", "vm 2"]));
        let vm1 = tree_ino(&tree, "vm1");
        let vm2 = tree_ino(&tree, "vm 2");
        assert!(tree.dir(vm1).unwrap().unlisted && tree.dir(vm2).unwrap().unlisted);
        assert!(!tree.dir(ROOT_INO).unwrap().unlisted);
        assert_eq!(tree.raw_path(vm2), vec!["vm 2".to_string()]);

        // vm1's level: two disks and a sub-directory, which stays unlisted.
        let changes = list_level(
            &mut tree,
            vm1,
            level(
                vec![
                    disk("vm1/a.vmdk", 10, "vm1/a"),
                    disk("vm1/b.vmdk", 20, "vm1/b"),
                ],
                &["vm1/snapshots"],
            ),
        );
        assert_eq!(changes, counted(2, 0, 0));
        assert!(!tree.dir(vm1).unwrap().unlisted);
        let snapshots = tree_ino(&tree, "vm1/snapshots");
        assert!(tree.dir(snapshots).unwrap().unlisted);
        assert_eq!(
            tree.raw_path(snapshots),
            vec!["vm1".to_string(), "snapshots".to_string()]
        );
        let a = tree_ino(&tree, "vm1/a.vmdk");

        // vm1 again: b gone, a changed, c new; nothing outside vm1 moves
        // (the root's disk and vm 2 are no part of this listing).
        let changes = list_level(
            &mut tree,
            vm1,
            level(
                vec![
                    disk("vm1/a.vmdk", 11, "vm1/a"),
                    disk("vm1/c.vmdk", 30, "vm1/c"),
                ],
                &["vm1/snapshots"],
            ),
        );
        assert_eq!(changes, counted(1, 1, 1));
        assert_eq!(tree_ino(&tree, "vm1/a.vmdk"), a, "same path, same inode");
        let now = listed(&tree);
        assert!(now.contains_key("/top.img") && now.contains_key("/vm1/c.vmdk"));
        assert!(!now.contains_key("/vm1/b.vmdk"));
        assert!(tree.present(vm2).is_some() && tree.present(snapshots).is_some());

        // A sub-directory no longer listed goes; the root's level again
        // hides vm 2 but leaves what is inside vm1 alone.
        assert_eq!(
            list_level(&mut tree, vm1, level(vec![], &[])),
            counted(0, 2, 0)
        );
        assert!(tree.present(snapshots).is_none());
        assert_eq!(
            list_level(
                &mut tree,
                ROOT_INO,
                level(vec![disk("top.img", 5, "top")], &["vm1"])
            ),
            counted(0, 0, 0)
        );
        assert!(tree.present(vm2).is_none() && tree.present(vm1).is_some());
        assert_eq!(tree.dir(ROOT_INO).unwrap().subdirs, 1);
    }

    #[test]
    fn new_disks_appear_removed_ones_go_and_paths_keep_their_inodes() {
        let mut tree = Tree::build(inventory(vec![
            disk("vm1/a.vmdk", 10, "vm1/a"),
            disk("vm1/b.vmdk", 20, "vm1/b"),
            disk("vm2/c.vmdk", 30, "vm2/c"),
        ]));
        let before = listed(&tree);
        let vm2 = tree.child(ROOT_INO, "vm2").unwrap();
        assert_eq!(tree.dir(ROOT_INO).unwrap().subdirs, 2);
        let changes = refresh(
            &mut tree,
            vec![
                disk("vm1/a.vmdk", 10, "vm1/a"),
                // Replaced: new size and mtime, same path.
                disk("vm1/b.vmdk", 25, "vm1/b"),
                disk("vm3/d.vmdk", 40, "vm3/d"),
            ],
        );
        assert_eq!(changes, counted(1, 1, 1));
        let after = listed(&tree);
        assert_eq!(after.len(), 3);
        assert_eq!(after["/vm1/a.vmdk"], before["/vm1/a.vmdk"]);
        assert_eq!(
            after["/vm1/b.vmdk"].0, before["/vm1/b.vmdk"].0,
            "same inode"
        );
        assert_eq!(after["/vm1/b.vmdk"].1, 25);
        assert!(!after.contains_key("/vm2/c.vmdk"));
        // vm2 is gone with its only disk; vm3 came.
        assert!(tree.present(vm2).is_none());
        assert_eq!(tree.dir(ROOT_INO).unwrap().subdirs, 2);
        assert_eq!(tree.total_bytes(), 10 + 25 + 40);
        assert_eq!(tree.present_count(), 1 + 2 + 3);
        // It comes back: at its old inode, under its old directory.
        let changes = refresh(&mut tree, all_four());
        assert_eq!(changes, counted(1, 0, 0));
        assert_eq!(listed(&tree)["/vm2/c.vmdk"].0, before["/vm2/c.vmdk"].0);
        assert!(tree.present(vm2).is_some());
        assert_eq!(tree.dir(ROOT_INO).unwrap().subdirs, 3);
        // Listing the same again changes nothing.
        let same = refresh(&mut tree, all_four());
        assert_eq!(same, Changes::default());
    }

    #[test]
    fn a_disk_whose_locator_changes_keeps_its_path() {
        let mut tree = Tree::build(inventory(vec![disk("vm/a.vmdk", 1, "https://x/a?night=1")]));
        let ino = listed(&tree)["/vm/a.vmdk"].0;
        let changes = refresh(&mut tree, vec![disk("vm/a.vmdk", 1, "https://x/a?night=2")]);
        assert_eq!(changes, counted(0, 0, 1));
        let after = listed(&tree);
        assert_eq!(after["/vm/a.vmdk"], (ino, 1, "https://x/a?night=2".into()));
    }

    #[test]
    fn a_listed_directory_changes_generation_and_an_unchanged_one_does_not() {
        let mut tree = Tree::build(inventory(vec![
            disk("vm1/a.vmdk", 1, "a"),
            disk("vm2/b.vmdk", 1, "b"),
        ]));
        let (vm1, vm2) = (
            tree.child(ROOT_INO, "vm1").unwrap(),
            tree.child(ROOT_INO, "vm2").unwrap(),
        );
        let generations = |tree: &Tree| {
            (
                tree.dir(vm1).unwrap().generation,
                tree.dir(vm2).unwrap().generation,
            )
        };
        let before = generations(&tree);
        refresh(
            &mut tree,
            vec![
                disk("vm1/a.vmdk", 1, "a"),
                disk("vm2/b.vmdk", 1, "b"),
                disk("vm2/c.vmdk", 1, "c"),
            ],
        );
        let after = generations(&tree);
        assert_eq!(after.0, before.0);
        assert_ne!(after.1, before.1);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn listings() -> impl Strategy<Value = Vec<Vec<(String, u64, u8)>>> {
            let path = prop_oneof![
                Just("a/x"),
                Just("a/y"),
                Just("b/x"),
                Just("a"),
                Just("b"),
                Just("a/x/z"),
                Just("c/%"),
            ];
            let entry = (path.prop_map(str::to_string), 1u64..4, 0u8..2);
            proptest::collection::vec(proptest::collection::vec(entry, 0..8), 1..6)
        }

        proptest! {
            /// After each listing, what the tree lists is that listing: one
            /// file per disk, its size, and a disk also in the listing
            /// before (same path, same locator) keeps its inode.
            #[test]
            fn the_tree_follows_every_listing(listings in listings()) {
                let to_disks = |listing: &Vec<(String, u64, u8)>| -> Vec<DiskEntry> {
                    let mut seen = std::collections::BTreeSet::new();
                    listing
                        .iter()
                        .filter(|(path, _, locator)| seen.insert((path.clone(), *locator)))
                        .map(|(path, size, locator)| disk(path, *size, &format!("{path}#{locator}")))
                        .collect()
                };
                let mut tree = Tree::build(inventory(to_disks(&listings[0])));
                let mut inodes: BTreeMap<String, u64> = BTreeMap::new();
                for (round, listing) in listings.iter().enumerate() {
                    let disks = to_disks(listing);
                    if round > 0 {
                        refresh(&mut tree, disks.clone());
                    }
                    let now = listed(&tree);
                    prop_assert_eq!(now.len(), disks.len(), "{:?}", now);
                    let mut by_locator: BTreeMap<String, (u64, u64)> = BTreeMap::new();
                    for (ino, size, locator) in now.values() {
                        by_locator.insert(locator.clone(), (*ino, *size));
                    }
                    let mut now_inodes = BTreeMap::new();
                    for disk in &disks {
                        let (ino, size) = by_locator[&disk.locator];
                        prop_assert_eq!(size, disk.size);
                        if let Some(&before) = inodes.get(&disk.locator) {
                            prop_assert_eq!(ino, before, "{} moved", disk.locator);
                        }
                        now_inodes.insert(disk.locator.clone(), ino);
                    }
                    inodes = now_inodes;
                    let total: u64 = disks.iter().map(|d| d.size).sum();
                    prop_assert_eq!(tree.total_bytes(), total);
                }
            }
        }
    }
}
