//! The filesystem core: inodes, directory listing, open files, reads.
//!
//! Nothing here knows about FUSE: the adapter in [`crate::fuse`] translates
//! kernel requests into these calls and the results back into replies, so
//! the core is tested without a mount. Metadata lives in memory (the tree is
//! built from the inventory and kept up to date in the background,
//! [`refresh`]); only `open` and `read` await the provider.

pub mod names;
pub mod refresh;
pub mod tree;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard};
use std::time::{Duration, SystemTime};

use crate::error::FsError;
use crate::provider::{Inventory, Provider, ProviderError};
use crate::read::retry::Budget;
use crate::read::{FileReader, Opener, ReadPath, Started};
use crate::throttle::priority::Priorities;
use refresh::{Changes, Refresher};
use tree::{NodeKind, Tree};

pub use tree::ROOT_INO;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    /// Allocated 512-byte blocks.
    pub blocks: u64,
    pub mtime: SystemTime,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: u64,
    pub kind: Kind,
    pub name: &'a str,
    /// Where the next listing call resumes after this entry.
    pub next_offset: u64,
    /// Its attributes, when asked for (readdirplus).
    pub attr: Option<Attr>,
}

#[derive(Debug, Clone, Copy)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub umask: u32,
}

impl Ownership {
    /// The mounting user, mode 0444/0555.
    pub fn current() -> Self {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        Ownership {
            uid,
            gid,
            umask: 0o022,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// A size above i64::MAX cannot be a file (`st_size` and `off_t` are
/// signed): such a disk is a provider's bad answer, left out with a log line.
pub(crate) fn refuse_impossible_sizes(mut inventory: Inventory) -> Inventory {
    inventory.disks.retain(|disk| {
        let fits = i64::try_from(disk.size).is_ok();
        if !fits {
            tracing::warn!(
                path = %disk.path.join("/"), size = disk.size,
                "left out: the provider gives a size above i64::MAX"
            );
        }
        fits
    });
    inventory
}

pub struct FsCore {
    tree: Arc<RwLock<Tree>>,
    refresher: Arc<Refresher>,
    provider: Arc<dyn Provider>,
    read_path: Arc<ReadPath>,
    handles: RwLock<HashMap<u64, Arc<FileReader>>>,
    next_handle: AtomicU64,
    /// Disks whose weak pin was already logged.
    weakly_pinned: Mutex<HashSet<u64>>,
    owner: Ownership,
}

impl FsCore {
    /// Lists the provider's inventory and builds the tree, to be listed
    /// again when older than `refresh` (`None`: never).
    pub async fn new(
        provider: Arc<dyn Provider>,
        read_path: Arc<ReadPath>,
        owner: Ownership,
        refresh: Option<Duration>,
    ) -> Result<Self, ProviderError> {
        // The SDKs make one attempt each: listing gets the mount's retries.
        // A provider that lists one level at a time lists the root only:
        // every other directory when it is first used.
        let lazy = provider.lists_levels();
        let inventory = read_path
            .retrying(&mut Budget::default(), "/", "list", || {
                let provider = Arc::clone(&provider);
                async move {
                    if lazy {
                        provider.list_level(&[]).await
                    } else {
                        provider.list().await
                    }
                }
            })
            .await?;
        let inventory = refuse_impossible_sizes(inventory);
        let tree = if lazy {
            Tree::build_levels(inventory)
        } else {
            Tree::build(inventory)
        };
        // Building freed the listing's many small strings: give them back.
        crate::read::trim::release_free_memory();
        let tree = Arc::new(RwLock::new(tree));
        Ok(FsCore {
            refresher: Refresher::new(
                refresh,
                Arc::clone(&provider),
                Arc::clone(&read_path),
                Arc::clone(&tree),
            ),
            tree,
            provider,
            read_path,
            handles: RwLock::new(HashMap::new()),
            next_handle: AtomicU64::new(1),
            weakly_pinned: Mutex::new(HashSet::new()),
            owner,
        })
    }

    pub fn read_path(&self) -> &Arc<ReadPath> {
        &self.read_path
    }

    fn tree(&self) -> RwLockReadGuard<'_, Tree> {
        self.tree
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        self.attr_in(&self.tree(), ino)
    }

    /// Attributes of any inode the kernel knows, gone ones included (a
    /// file open when its disk went is still `fstat`-able: nlink 0, as an
    /// unlinked file).
    fn attr_in(&self, tree: &Tree, ino: u64) -> Result<Attr, FsError> {
        let node = tree.get(ino).ok_or(FsError::NotFound)?;
        let gone = tree.present(ino).is_none();
        let (kind, size, blocks, perm, nlink) = match &node.kind {
            NodeKind::Dir(_) => {
                let dir = tree.dir(ino);
                let nlink = if gone {
                    0
                } else if dir.is_some_and(|dir| dir.unlisted) {
                    // Sub-directories unknown yet: 1 tells find(1) and fts
                    // not to count on nlink (as btrfs does).
                    1
                } else {
                    2u32.saturating_add(dir.map_or(0, |dir| dir.subdirs))
                };
                (Kind::Dir, 0, 0, 0o555, nlink)
            }
            NodeKind::File(file) => {
                let size = file.size.load(Ordering::Relaxed);
                let allocated = file.allocated.map_or(size, |a| a.min(size));
                (
                    Kind::File,
                    size,
                    allocated.div_ceil(512),
                    0o444,
                    u32::from(!gone),
                )
            }
        };
        Ok(Attr {
            ino,
            kind,
            size,
            blocks,
            mtime: tree.mtime(ino),
            perm: (perm & !self.owner.umask) as u16,
            nlink,
            uid: self.owner.uid,
            gid: self.owner.gid,
        })
    }

    /// Whether directory `ino` must be listed ([`FsCore::list_dir`]) before
    /// a lookup in it or its readdir can be answered.
    pub fn needs_listing(&self, ino: u64) -> bool {
        self.refresher.needs_listing(ino)
    }

    /// Lists directory `ino` if it was never listed (a provider listed one
    /// level at a time); concurrent callers share one listing.
    pub async fn list_dir(&self, ino: u64) -> Result<(), FsError> {
        self.refresher
            .list_dir(ino, true)
            .await
            .map(|_| ())
            .map_err(|source| {
                let path = self.tree().path_of(ino);
                tracing::warn!(directory = %path, "listing failed: {source}");
                FsError::Provider {
                    path,
                    source: Arc::new(source),
                }
            })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        self.refresher.poke(parent);
        let tree = self.tree();
        if tree.present(parent).is_none() {
            return Err(FsError::NotFound);
        }
        if tree.dir(parent).is_none() {
            return Err(FsError::NotDirectory);
        }
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let ino = tree.child(parent, name).ok_or(FsError::NotFound)?;
        tree.present(ino).ok_or(FsError::NotFound)?;
        self.attr_in(&tree, ino)
    }

    /// Opens a directory: whether the kernel may keep its cached listing
    /// (nothing changed since it last listed it).
    pub fn opendir(&self, ino: u64) -> Result<bool, FsError> {
        // The kernel may answer readdir from its cache: the listing's age
        // is checked here too.
        self.refresher.poke(ino);
        let tree = self.tree();
        tree.present(ino).ok_or(FsError::NotFound)?;
        let dir = tree.dir(ino).ok_or(FsError::NotDirectory)?;
        let listed = dir
            .listed_generation
            .swap(dir.generation, Ordering::Relaxed);
        Ok(listed == dir.generation)
    }

    /// Stale kernel entries go to `kernel` from now on.
    pub fn set_kernel_cache(&self, kernel: Box<dyn refresh::KernelCache>) {
        self.refresher.set_kernel_cache(kernel);
    }

    /// Lists the provider again now (`vmexportfs refresh`). `path`, inside
    /// the mount, must be a directory of it. A provider that lists its
    /// whole inventory refreshes every directory; one listed level by level
    /// lists again each directory under `path` that was listed.
    pub async fn refresh(&self, path: &str) -> Result<Changes, FsError> {
        let ino = self.resolve_dir(path).await?;
        self.refresher
            .list_now(ino)
            .await
            .map_err(|source| FsError::Provider {
                path: path.to_string(),
                source: Arc::new(source),
            })
    }

    /// The directory at `path` (`/a/b` or `a/b`, names as the mount shows
    /// them), listing the directories on the way that never were.
    async fn resolve_dir(&self, path: &str) -> Result<u64, FsError> {
        let mut ino = ROOT_INO;
        for name in path
            .split('/')
            .filter(|name| !name.is_empty() && *name != ".")
        {
            if self.needs_listing(ino) {
                self.list_dir(ino).await?;
            }
            let tree = self.tree();
            tree.dir(ino).ok_or(FsError::NotDirectory)?;
            ino = tree.child(ino, name).ok_or(FsError::NotFound)?;
            tree.present(ino).ok_or(FsError::NotFound)?;
        }
        self.tree().dir(ino).ok_or(FsError::NotDirectory)?;
        Ok(ino)
    }

    /// Lists a directory from `offset` on, `.` and `..` first, handing each
    /// entry to `add` until it says the reply is full (returns true).
    pub fn readdir(
        &self,
        ino: u64,
        offset: u64,
        with_attrs: bool,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<(), FsError> {
        self.refresher.poke(ino);
        let tree = self.tree();
        let node = tree.present(ino).ok_or(FsError::NotFound)?;
        let dir = tree.dir(ino).ok_or(FsError::NotDirectory)?;
        for (at, (dot_ino, name)) in [(ino, "."), (node.parent, "..")]
            .into_iter()
            .enumerate()
            .skip(offset as usize)
        {
            let entry = DirEntry {
                ino: dot_ino,
                kind: Kind::Dir,
                name,
                next_offset: at as u64 + 1,
                attr: with_attrs
                    .then(|| self.attr_in(&tree, dot_ino).ok())
                    .flatten(),
            };
            if add(entry) {
                return Ok(());
            }
        }
        let first = offset.saturating_sub(tree::FIRST_CHILD_OFFSET);
        let Some(rest) = usize::try_from(first)
            .ok()
            .and_then(|first| dir.entries.get(first..))
        else {
            return Ok(()); // past the end
        };
        for (at, &child) in rest.iter().enumerate() {
            let Some(node) = tree.present(child) else {
                continue; // gone: its offset stays its own
            };
            let entry = DirEntry {
                ino: child,
                kind: match node.kind {
                    NodeKind::Dir(_) => Kind::Dir,
                    NodeKind::File(_) => Kind::File,
                },
                name: tree.name(node),
                next_offset: tree::FIRST_CHILD_OFFSET + first + at as u64 + 1,
                attr: with_attrs
                    .then(|| self.attr_in(&tree, child).ok())
                    .flatten(),
            };
            if add(entry) {
                break;
            }
        }
        Ok(())
    }

    /// Opens a file for reading, pinning the disk's current version.
    pub async fn open(&self, ino: u64, flags: i32, opener: Opener) -> Result<u64, FsError> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        // Nothing of the tree is held across the provider's answers.
        let (disk, replaced, path) = {
            let tree = self.tree();
            let node = tree.present(ino).ok_or(FsError::NotFound)?;
            let NodeKind::File(file) = &node.kind else {
                return Err(FsError::IsDirectory);
            };
            (
                Arc::new(tree.disk_entry(file)),
                file.replaced,
                tree.path_of(ino),
            )
        };
        let disk = &disk;
        self.provider.begin_read(disk).await.map_err(|source| {
            tracing::warn!(%path, "open failed: {source}");
            FsError::Provider {
                path: path.clone(),
                source: Arc::new(source),
            }
        })?;
        // Pin the version, then learn where its data is (sparse disks).
        let pinned = async {
            // One time budget for the whole open: timeout= bounds it.
            let mut budget = Budget::default();
            let pinned = self
                .read_path
                .retrying(&mut budget, &path, "open", || {
                    self.read_path.calls.timed("stat", self.provider.pin(disk))
                })
                .await?;
            if i64::try_from(pinned.size).is_err() {
                return Err(ProviderError::Protocol(format!(
                    "the provider gives a size of {} bytes, above i64::MAX",
                    pinned.size
                )));
            }
            let data = self
                .read_path
                .retrying(&mut budget, &path, "open", || {
                    self.read_path
                        .calls
                        .timed("data_ranges", self.provider.data_ranges(disk, &pinned))
                })
                .await?;
            Ok::<_, ProviderError>((pinned, data))
        };
        let (pinned, data) = match pinned.await {
            Ok(pinned) => pinned,
            Err(source) => {
                tracing::warn!(%path, "open failed: {source}");
                self.provider.end_read(disk).await;
                return Err(FsError::Provider {
                    path: path.clone(),
                    source: Arc::new(source),
                });
            }
        };
        if let Some(weakness) = pinned.version.weakness() {
            // Once per disk: a backup agent opens a file many times.
            let first = self
                .weakly_pinned
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(ino);
            if first {
                tracing::warn!(%path, "weak pin: {weakness}");
            }
        }
        let current_size = pinned.size;
        let listed = {
            let tree = self.tree();
            match tree.get(ino).map(|node| &node.kind) {
                // Only while the node still lists the disk this open pinned:
                // a refresh that replaced it meanwhile brought its own size.
                Some(NodeKind::File(file)) if file.replaced == replaced => {
                    tree.set_size(&file.size, current_size)
                }
                _ => current_size,
            }
        };
        if listed != current_size {
            tracing::info!(%path, listed, current_size, "disk size changed since it was listed");
        }
        let reader = self
            .read_path
            .open(ino, Arc::clone(disk), pinned, path, data, opener);
        let fh = self.next_handle.fetch_add(1, Ordering::Relaxed);
        self.handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(fh, reader);
        Ok(fh)
    }

    fn reader(&self, fh: u64) -> Result<Arc<FileReader>, FsError> {
        self.handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)
    }

    /// Every open file, by handle.
    /// What the provider is busy with on its side, for `status`.
    pub fn provider_activity(&self) -> Vec<String> {
        self.provider.activity()
    }

    pub fn open_files(&self) -> Vec<(u64, Arc<FileReader>)> {
        let mut files: Vec<_> = self
            .handles
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(&fh, reader)| (fh, Arc::clone(reader)))
            .collect();
        files.sort_by_key(|(fh, _)| *fh);
        files
    }

    /// New weights, for open files too.
    pub fn set_priorities(&self, priorities: Priorities) {
        for (_, reader) in self.open_files() {
            reader.set_weight(priorities.weight_for(reader.path()));
        }
        self.read_path.set_priorities(priorities);
    }

    /// Starts a read; see [`ReadPath::start`].
    pub fn start_read(&self, fh: u64, offset: u64, size: u32) -> Result<Started, FsError> {
        let reader = self.reader(fh)?;
        Ok(self.read_path.start(&reader, offset, size))
    }

    /// `lseek` with SEEK_DATA or SEEK_HOLE (the kernel does the others).
    pub fn seek(&self, fh: u64, offset: i64, whence: i32) -> Result<u64, FsError> {
        let reader = self.reader(fh)?;
        let offset = u64::try_from(offset).map_err(|_| FsError::InvalidArgument)?;
        let found = match whence {
            libc::SEEK_DATA => reader.next_data(offset),
            libc::SEEK_HOLE => reader.next_hole(offset),
            _ => return Err(FsError::InvalidArgument),
        };
        found.ok_or(FsError::NoMoreData)
    }

    /// Closes a file: its fetches stop, and the provider hears of it.
    pub async fn release(&self, fh: u64) {
        let reader = self
            .handles
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(&fh);
        if let Some(reader) = reader {
            self.read_path.release(&reader);
            self.provider.end_read(reader.disk()).await;
        }
    }

    pub fn statfs(&self) -> StatFs {
        StatFs {
            blocks: self.tree().total_bytes().div_ceil(4096),
            files: self.tree().present_count(),
            block_size: 4096,
            name_max: names::NAME_MAX as u32,
        }
    }

    /// The mount is going away: every fetch stops.
    pub fn shutdown(&self) {
        self.read_path.shutdown();
    }

    /// The mount is gone: the provider cleans up on its side (snapshots,
    /// sessions), whatever files were still open.
    pub async fn finish(&self) {
        self.shutdown();
        self.provider.close().await;
    }
}
