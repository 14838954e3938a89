//! `dir:///path`: a local or network-mounted tree, read with positional reads.
//!
//! Every regular file below the root is a disk, at its relative path. The
//! version is size+mtime: checked before and after each read, so a file
//! rewritten under a reader gives an error instead of mixed bytes. Symlinks
//! are skipped so that nothing outside the tree is ever served.

use std::fs::{File, Metadata};
use std::ops::Range;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{DiskEntry, Inventory, Provider, ProviderError, Version};

pub struct DirProvider {
    root: PathBuf,
}

impl DirProvider {
    pub fn new(root: PathBuf) -> Result<Self, ProviderError> {
        check_root(&root)?;
        Ok(DirProvider { root })
    }
}

pub(super) fn check_root(root: &Path) -> Result<(), ProviderError> {
    let meta = std::fs::metadata(root).map_err(|err| {
        ProviderError::NotFound(format!("source directory {}: {err}", root.display()))
    })?;
    if !meta.is_dir() {
        return Err(ProviderError::Config(format!(
            "source {} is not a directory",
            root.display()
        )));
    }
    Ok(())
}

pub(super) fn version_of(meta: &Metadata) -> Version {
    Version(format!(
        "{}:{}.{}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    ))
}

pub(super) fn entry_for(path: Vec<String>, file: &Path, meta: &Metadata) -> DiskEntry {
    DiskEntry {
        path,
        size: meta.len(),
        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        version: version_of(meta),
        locator: file.to_string_lossy().into_owned(),
        allocated: Some((meta.blocks() * 512).min(meta.len())),
    }
}

fn walk(dir: &Path, prefix: &[String], out: &mut Inventory) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|entry| entry.file_name());
    let mut any = false;
    for entry in entries {
        let file_type = entry.file_type()?;
        let mut path = prefix.to_vec();
        path.push(entry.file_name().to_string_lossy().into_owned());
        if file_type.is_dir() {
            walk(&entry.path(), &path, out)?;
            any = true;
        } else if file_type.is_file() {
            out.disks
                .push(entry_for(path, &entry.path(), &entry.metadata()?));
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

/// Positional read of exactly `len` bytes, with the size+mtime precondition
/// checked on the same open file before and after.
pub(super) fn read_file_range(
    locator: &str,
    version: &Version,
    offset: u64,
    len: usize,
) -> Result<Bytes, ProviderError> {
    let file = File::open(locator).map_err(|err| match err.kind() {
        std::io::ErrorKind::NotFound => ProviderError::Changed {
            pinned: version.0.clone(),
        },
        _ => ProviderError::Io(err),
    })?;
    let check = |file: &File| -> Result<(), ProviderError> {
        if &version_of(&file.metadata()?) != version {
            return Err(ProviderError::Changed {
                pinned: version.0.clone(),
            });
        }
        Ok(())
    };
    check(&file)?;
    let mut buf = BytesMut::zeroed(len);
    let mut done = 0;
    while done < len {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                return Err(ProviderError::Changed {
                    pinned: version.0.clone(),
                })
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    check(&file)?;
    Ok(buf.freeze())
}

pub(super) async fn read_blocking(
    locator: &str,
    version: &Version,
    offset: u64,
    len: usize,
) -> Result<Bytes, ProviderError> {
    let locator = locator.to_string();
    let version = version.clone();
    tokio::task::spawn_blocking(move || read_file_range(&locator, &version, offset, len))
        .await
        .map_err(|err| ProviderError::Io(std::io::Error::other(err)))?
}

/// The data extents of a (possibly sparse) file, by SEEK_DATA/SEEK_HOLE on
/// the file itself, under the same size+mtime precondition as reads;
/// `None` when the file system cannot tell (no SEEK_DATA): all data.
pub(super) fn file_data_ranges(
    locator: &str,
    version: &Version,
) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
    use std::os::fd::AsRawFd;
    let file = File::open(locator)?;
    let meta = file.metadata()?;
    if &version_of(&meta) != version {
        return Err(ProviderError::Changed {
            pinned: version.0.clone(),
        });
    }
    let size = meta.len() as i64;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at: i64 = 0;
    while at < size {
        // SAFETY: lseek on a descriptor we own; it only moves the offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ENXIO) {
                break; // only a hole from `at` to the end
            }
            if err.raw_os_error() == Some(libc::EINVAL) {
                return Ok(None);
            }
            return Err(err.into());
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        ranges.push(data as u64..end as u64);
        at = end;
    }
    Ok(Some(ranges))
}

pub(super) async fn data_ranges_blocking(
    locator: &str,
    version: &Version,
) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
    let locator = locator.to_string();
    let version = version.clone();
    tokio::task::spawn_blocking(move || file_data_ranges(&locator, &version))
        .await
        .map_err(|err| ProviderError::Io(std::io::Error::other(err)))?
}

pub(super) async fn stat_file(locator: &str) -> Result<(u64, Version), ProviderError> {
    let meta = tokio::fs::metadata(locator)
        .await
        .map_err(|err| ProviderError::NotFound(format!("{locator}: {err}")))?;
    Ok((meta.len(), version_of(&meta)))
}

#[async_trait]
impl Provider for DirProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut inventory = Inventory::default();
            walk(&root, &[], &mut inventory).map_err(|err| {
                ProviderError::Io(std::io::Error::new(
                    err.kind(),
                    format!("listing {}: {err}", root.display()),
                ))
            })?;
            Ok(inventory)
        })
        .await
        .map_err(|err| ProviderError::Io(std::io::Error::other(err)))?
    }

    async fn stat(&self, disk: &DiskEntry) -> Result<(u64, Version), ProviderError> {
        stat_file(&disk.locator).await
    }

    async fn data_ranges(
        &self,
        disk: &DiskEntry,
        version: &Version,
        _size: u64,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        data_ranges_blocking(&disk.locator, version).await
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        version: &Version,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        read_blocking(&disk.locator, version, offset, len).await
    }
}
