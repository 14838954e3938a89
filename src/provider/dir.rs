//! `dir:///path`: a local or network-mounted tree, read with positional reads.
//!
//! Every regular file below the root is a disk, at its relative path.
//! Symlinks are skipped while listing and refused at open; each open file
//! reads through the one descriptor it opened (see [`super::local`]), so
//! nothing outside the tree is ever served. An unreadable sub-directory is
//! skipped with a warning: one bad folder on a share must not fail the
//! mount.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;

use super::local::{component, data_ranges_blocking, pin_blocking, read_blocking, LocalTree};
use super::{DiskEntry, Inventory, Pinned, Provider, ProviderError};

pub struct DirProvider {
    tree: Arc<LocalTree>,
}

impl DirProvider {
    pub fn new(root: PathBuf) -> Result<Self, ProviderError> {
        Ok(DirProvider {
            tree: Arc::new(LocalTree::open(root)?),
        })
    }
}

/// Lists `relative` (below the tree's root) into `out`.
fn walk(
    tree: &LocalTree,
    relative: &Path,
    prefix: &[String],
    out: &mut Inventory,
) -> std::io::Result<()> {
    let dir = tree.root().join(relative);
    let mut entries: Vec<_> = std::fs::read_dir(&dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let mut any = false;
    for entry in entries {
        // The entry's own type: a symlink is a symlink, never its target.
        let file_type = entry.file_type()?;
        let name = entry.file_name();
        let mut path = prefix.to_vec();
        path.push(component(&name));
        let child = relative.join(&name);
        if file_type.is_dir() {
            match walk(tree, &child, &path, out) {
                Ok(()) => any = true,
                Err(err) => tracing::warn!(
                    directory = %dir.join(&name).display(),
                    "skipping an unreadable directory: {err}"
                ),
            }
        } else if file_type.is_file() {
            // DirEntry::metadata does not follow symlinks either.
            out.disks.push(tree.entry(path, &child, &entry.metadata()?));
            any = true;
        } else {
            tracing::debug!(path = %entry.path().display(), "skipping: not a regular file or directory");
        }
    }
    if !any && !prefix.is_empty() {
        out.empty_dirs.push(prefix.to_vec());
    }
    Ok(())
}

/// The directory below the root that `dir` (components as [`component`]
/// made them) names. A name that is plain UTF-8 without `%` is itself;
/// any other is found among its parent's entries. Only names are read
/// here: what is listed is opened beneath the root, refusing symlinks.
fn level_path(tree: &LocalTree, dir: &[String]) -> std::io::Result<PathBuf> {
    let mut relative = PathBuf::new();
    for wanted in dir {
        let name = if wanted.contains('%') || wanted.is_empty() || wanted == "." || wanted == ".." {
            std::fs::read_dir(tree.root().join(&relative))?
                .filter_map(Result::ok)
                .map(|entry| entry.file_name())
                .find(|name| component(name) == *wanted)
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?
        } else {
            std::ffi::OsString::from(wanted)
        };
        relative.push(&name);
    }
    Ok(relative)
}

/// One level of `dir`: its regular files, and its sub-directories.
fn list_one_level(tree: &LocalTree, dir: &[String]) -> Result<Inventory, ProviderError> {
    let shown = || dir.join("/");
    let relative = level_path(tree, dir).map_err(|err| tree.refusal(&shown(), err))?;
    let opened = tree
        .open_dir_beneath(&relative)
        .map_err(|err| tree.refusal(&shown(), err))?;
    // The descriptor's own entry: the directory opened, wherever its path
    // points by now.
    let listed = PathBuf::from(format!("/proc/self/fd/{}", opened.as_raw_fd()));
    let mut out = Inventory::default();
    let io = |err: std::io::Error| {
        ProviderError::Io(std::io::Error::new(
            err.kind(),
            format!("listing {}: {err}", shown()),
        ))
    };
    for entry in std::fs::read_dir(&listed).map_err(io)? {
        let entry = entry.map_err(io)?;
        let file_type = entry.file_type().map_err(io)?;
        let name = entry.file_name();
        let mut path = dir.to_vec();
        path.push(component(&name));
        if file_type.is_dir() {
            out.empty_dirs.push(path);
        } else if file_type.is_file() {
            let meta = entry.metadata().map_err(io)?;
            out.disks
                .push(tree.entry(path, &relative.join(&name), &meta));
        } else {
            tracing::debug!(path = %entry.path().display(), "skipping: not a regular file or directory");
        }
    }
    Ok(out)
}

#[async_trait]
impl Provider for DirProvider {
    fn lists_levels(&self) -> bool {
        true
    }

    async fn list_level(&self, dir: &[String]) -> Result<Inventory, ProviderError> {
        let tree = Arc::clone(&self.tree);
        let dir = dir.to_vec();
        tokio::task::spawn_blocking(move || list_one_level(&tree, &dir))
            .await
            .map_err(|err| ProviderError::Io(std::io::Error::other(err)))?
    }

    async fn list(&self) -> Result<Inventory, ProviderError> {
        let tree = Arc::clone(&self.tree);
        tokio::task::spawn_blocking(move || {
            let mut inventory = Inventory::default();
            walk(&tree, Path::new(""), &[], &mut inventory).map_err(|err| {
                ProviderError::Io(std::io::Error::new(
                    err.kind(),
                    format!("listing {}: {err}", tree.root().display()),
                ))
            })?;
            Ok(inventory)
        })
        .await
        .map_err(|err| ProviderError::Io(std::io::Error::other(err)))?
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        pin_blocking(&self.tree, disk).await
    }

    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
    ) -> Result<Option<Vec<std::ops::Range<u64>>>, ProviderError> {
        data_ranges_blocking(pinned).await
    }

    async fn read(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        read_blocking(pinned, offset, len).await
    }
}
