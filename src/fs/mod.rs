//! The filesystem core: inodes, directory listing, open files, reads.
//!
//! Nothing here knows about FUSE: the adapter in [`crate::fuse`] translates
//! kernel requests into these calls and the results back into replies, so
//! the core is tested without a mount. Metadata lives in memory (the tree is
//! built once from the inventory); only `open` and `read` await the provider.

pub mod names;
pub mod tree;

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use crate::error::FsError;
use crate::provider::{Inventory, Provider, ProviderError};
use crate::read::retry::Budget;
use crate::read::{FileReader, Opener, ReadPath, Started};
use crate::throttle::priority::Priorities;
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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
    /// Where the next listing call resumes after this entry.
    pub next_offset: u64,
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
fn refuse_impossible_sizes(mut inventory: Inventory) -> Inventory {
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
    tree: Tree,
    provider: Arc<dyn Provider>,
    read_path: Arc<ReadPath>,
    handles: RwLock<HashMap<u64, Arc<FileReader>>>,
    next_handle: AtomicU64,
    /// Disks whose weak pin was already logged.
    weakly_pinned: Mutex<HashSet<u64>>,
    owner: Ownership,
}

impl FsCore {
    /// Lists the provider's inventory and builds the tree.
    pub async fn new(
        provider: Arc<dyn Provider>,
        read_path: Arc<ReadPath>,
        owner: Ownership,
    ) -> Result<Self, ProviderError> {
        // The SDKs make one attempt each: listing gets the mount's retries.
        let inventory = read_path
            .retrying(&mut Budget::default(), "/", "list", || provider.list())
            .await?;
        let inventory = refuse_impossible_sizes(inventory);
        Ok(FsCore {
            tree: Tree::build(&inventory),
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

    pub fn attr(&self, ino: u64) -> Result<Attr, FsError> {
        let node = self.tree.get(ino).ok_or(FsError::NotFound)?;
        let (kind, size, perm, nlink) = match &node.kind {
            NodeKind::Dir { children } => {
                let subdirs = children
                    .values()
                    .filter(|&&child| {
                        matches!(
                            self.tree.get(child).map(|n| &n.kind),
                            Some(NodeKind::Dir { .. })
                        )
                    })
                    .count() as u32;
                (Kind::Dir, 0, 0o555, 2 + subdirs)
            }
            NodeKind::File { size, .. } => (Kind::File, size.load(Ordering::Relaxed), 0o444, 1),
        };
        let allocated = match &node.kind {
            NodeKind::File { disk, .. } => disk.allocated.map_or(size, |a| a.min(size)),
            NodeKind::Dir { .. } => 0,
        };
        Ok(Attr {
            ino,
            kind,
            size,
            blocks: allocated.div_ceil(512),
            mtime: node.mtime,
            perm: (perm & !self.owner.umask) as u16,
            nlink,
            uid: self.owner.uid,
            gid: self.owner.gid,
        })
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<Attr, FsError> {
        let node = self.tree.get(parent).ok_or(FsError::NotFound)?;
        let NodeKind::Dir { children } = &node.kind else {
            return Err(FsError::NotDirectory);
        };
        let name = name.to_str().ok_or(FsError::NotFound)?;
        let ino = *children.get(name).ok_or(FsError::NotFound)?;
        self.attr(ino)
    }

    /// Entries of a directory from `offset` on, `.` and `..` first.
    pub fn readdir(&self, ino: u64, offset: u64) -> Result<Vec<DirEntry>, FsError> {
        let node = self.tree.get(ino).ok_or(FsError::NotFound)?;
        let NodeKind::Dir { children } = &node.kind else {
            return Err(FsError::NotDirectory);
        };
        let dots = [(ino, Kind::Dir, "."), (node.parent, Kind::Dir, "..")];
        let entries = dots
            .into_iter()
            .map(|(ino, kind, name)| (ino, kind, name.to_string()))
            .chain(children.iter().map(|(name, &child)| {
                let kind = match self.tree.get(child).map(|n| &n.kind) {
                    Some(NodeKind::Dir { .. }) => Kind::Dir,
                    _ => Kind::File,
                };
                (child, kind, name.clone())
            }))
            .enumerate()
            .skip(offset as usize)
            .map(|(index, (ino, kind, name))| DirEntry {
                ino,
                kind,
                name,
                next_offset: index as u64 + 1,
            })
            .collect();
        Ok(entries)
    }

    /// Opens a file for reading, pinning the disk's current version.
    pub async fn open(&self, ino: u64, flags: i32, opener: Opener) -> Result<u64, FsError> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0 {
            return Err(FsError::ReadOnly);
        }
        let node = self.tree.get(ino).ok_or(FsError::NotFound)?;
        let NodeKind::File { disk, size } = &node.kind else {
            return Err(FsError::IsDirectory);
        };
        let path = self.tree.path_of(ino);
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
        let listed = size.swap(current_size, Ordering::Relaxed);
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
            blocks: self.tree.total_bytes().div_ceil(4096),
            files: self.tree.len() as u64,
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
