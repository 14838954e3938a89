//! Reading a local tree (`dir://`, `hyperv://`) without ever leaving it.
//!
//! The tree is held open as a directory descriptor. A disk is opened
//! relative to it with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)` —
//! or, where the kernel has no openat2, by walking the path one component
//! at a time with `O_NOFOLLOW` — so that a symlink anywhere on the path, or
//! a `..`, fails the open instead of being followed. The file found must be
//! the regular file that was listed (same device and inode): a path swapped
//! for another file is refused too. The open file's descriptor is then kept
//! for the life of the open file and every block is a `pread` on it; the
//! path is never resolved again.
//!
//! The version is the file's identity and times: device, inode, size, mtime
//! and ctime. Each read checks size and mtime on the descriptor after
//! reading (one `fstat`), so an in-place rewrite under a reader fails the
//! read instead of returning bytes of two versions, while a file renamed
//! away or unlinked under a reader (ctime only) reads on.

use std::ffi::{CString, OsStr};
use std::fs::{File, Metadata};
use std::io;
use std::ops::Range;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use percent_encoding::{percent_decode_str, percent_encode, AsciiSet, CONTROLS};

use super::{DiskEntry, FileIdentity, Pinned, ProviderError, Version};

/// Bytes escaped in a locator: `%` itself and everything not ASCII, so any
/// file name (UTF-8 or not) survives the trip through a `String`.
const LOCATOR_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// A file's identity and times, read off its metadata: what is pinned.
fn identity_of(meta: &Metadata) -> FileIdentity {
    FileIdentity {
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        ctime: (meta.ctime(), meta.ctime_nsec()),
    }
}

/// One open disk: the descriptor reads go through and what it was pinned at.
struct OpenFile {
    file: File,
    identity: FileIdentity,
    /// A change was already logged for this open file (once is enough).
    change_logged: AtomicBool,
}

/// A tree on the local machine (or an SMB/NFS mount), held by a directory
/// descriptor.
pub(super) struct LocalTree {
    root: PathBuf,
    root_fd: OwnedFd,
    /// Whether openat2 is there; learned at the first open.
    openat2: AtomicBool,
}

impl LocalTree {
    pub(super) fn open(root: PathBuf) -> Result<Self, ProviderError> {
        let meta = std::fs::metadata(&root).map_err(|err| {
            ProviderError::NotFound(format!("source directory {}: {err}", root.display()))
        })?;
        if !meta.is_dir() {
            return Err(ProviderError::Config(format!(
                "source {} is not a directory",
                root.display()
            )));
        }
        let path = c_path(root.as_os_str())?;
        // SAFETY: a valid NUL-terminated path; the fd returned is ours.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(ProviderError::Io(io::Error::other(format!(
                "opening source directory {}: {}",
                root.display(),
                io::Error::last_os_error()
            ))));
        }
        Ok(LocalTree {
            root,
            // SAFETY: `fd` was just opened and nothing else owns it.
            root_fd: unsafe { OwnedFd::from_raw_fd(fd) },
            openat2: AtomicBool::new(true),
        })
    }

    pub(super) fn root(&self) -> &Path {
        &self.root
    }

    /// The disk entry for a file listed at `relative` (below the root).
    pub(super) fn entry(&self, path: Vec<String>, relative: &Path, meta: &Metadata) -> DiskEntry {
        DiskEntry {
            path,
            size: meta.len(),
            mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
            version: Version::File(Box::new(identity_of(meta))),
            locator: percent_encode(relative.as_os_str().as_bytes(), LOCATOR_ESCAPES).to_string(),
            allocated: Some((meta.blocks() * 512).min(meta.len())),
        }
    }

    /// Opens the disk beneath the root, refusing symlinks and swapped
    /// files, and pins it.
    pub(super) fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let relative: Vec<u8> = percent_decode_str(&disk.locator).collect();
        let relative = Path::new(OsStr::from_bytes(&relative));
        let shown = || relative.display().to_string();
        let file = self
            .open_beneath(relative, 0)
            .map_err(|err| self.refusal(&shown(), err))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(ProviderError::Denied(format!(
                "{} is no longer a regular file, refused",
                shown()
            )));
        }
        let identity = identity_of(&meta);
        if let Some(listed) = disk.version.file() {
            if (listed.dev, listed.ino) != (identity.dev, identity.ino) {
                return Err(ProviderError::Changed {
                    pinned: format!(
                        "{} (the path now names another file than the one listed)",
                        disk.version
                    ),
                });
            }
        }
        Ok(Pinned {
            size: identity.size,
            version: Version::File(Box::new(identity)),
            handle: Some(Arc::new(OpenFile {
                file,
                identity,
                change_logged: AtomicBool::new(false),
            })),
        })
    }

    /// What a failed open beneath the root means, for `shown` (a path
    /// below the root).
    pub(super) fn refusal(&self, shown: &str, err: io::Error) -> ProviderError {
        match err.raw_os_error() {
            Some(libc::ENOENT) => ProviderError::NotFound(format!("{shown} is gone")),
            Some(libc::ELOOP | libc::EXDEV | libc::ENOTDIR) => ProviderError::Denied(format!(
                "{shown}: a symlink or '..' on the path, refused: nothing outside {} is served",
                self.root.display()
            )),
            _ => ProviderError::Io(io::Error::new(err.kind(), format!("{shown}: {err}"))),
        }
    }

    /// The directory at `relative`, opened as [`Self::open_beneath`] opens
    /// a disk: what a listing of it reads, so a symlink swapped in after
    /// its name was found is never followed.
    pub(super) fn open_dir_beneath(&self, relative: &Path) -> io::Result<File> {
        let relative = if relative.as_os_str().is_empty() {
            Path::new(".") // the root itself
        } else {
            relative
        };
        self.open_beneath(relative, libc::O_DIRECTORY)
    }

    fn open_beneath(&self, relative: &Path, extra_flags: i32) -> io::Result<File> {
        // O_NONBLOCK: a FIFO swapped in must not hang the open; regular
        // files ignore it.
        let flags =
            libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW | libc::O_NONBLOCK | extra_flags;
        if self.openat2.load(Ordering::Relaxed) {
            match openat2_beneath(self.root_fd.as_raw_fd(), relative, flags) {
                Err(err) if matches!(err.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    tracing::info!(
                        "openat2 is not available ({err}); opening with an O_NOFOLLOW walk"
                    );
                    self.openat2.store(false, Ordering::Relaxed);
                }
                result => return result,
            }
        }
        walk_nofollow(self.root_fd.as_raw_fd(), relative, flags)
    }
}

fn c_path(path: &OsStr) -> io::Result<CString> {
    CString::new(path.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn openat2_beneath(dir: RawFd, relative: &Path, flags: i32) -> io::Result<File> {
    let path = c_path(relative.as_os_str())?;
    // SAFETY: open_how is plain data; zeroed is its documented default.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: the path and the struct outlive the call; the fd is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir,
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as RawFd) })
}

/// The fallback: each directory on the path opened with O_NOFOLLOW from the
/// one before, so no symlink is ever followed; `..` and absolute paths are
/// refused outright.
fn walk_nofollow(root: RawFd, relative: &Path, flags: i32) -> io::Result<File> {
    let mut components = Vec::new();
    for component in relative.components() {
        match component {
            Component::Normal(name) => components.push(c_path(name)?),
            Component::CurDir => {}
            _ => return Err(io::Error::from_raw_os_error(libc::EXDEV)),
        }
    }
    if components.is_empty() && relative.as_os_str() == "." {
        components.push(c".".to_owned());
    }
    let Some((last, dirs)) = components.split_last() else {
        return Err(io::Error::from_raw_os_error(libc::ENOENT));
    };
    let mut held: Option<OwnedFd> = None;
    for name in dirs {
        let at = held.as_ref().map_or(root, AsRawFd::as_raw_fd);
        // SAFETY: a valid name and directory fd; the new fd is ours.
        let fd = unsafe {
            libc::openat(
                at,
                name.as_ptr(),
                libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        held = Some(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let at = held.as_ref().map_or(root, AsRawFd::as_raw_fd);
    // SAFETY: as above.
    let fd = unsafe { libc::openat(at, last.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    Ok(unsafe { File::from_raw_fd(fd) })
}

fn open_file(pinned: &Pinned) -> Result<&OpenFile, ProviderError> {
    pinned
        .handle
        .as_ref()
        .and_then(|handle| handle.downcast_ref::<OpenFile>())
        .ok_or_else(|| ProviderError::Config("a local disk read without its open file".into()))
}

impl OpenFile {
    fn check(&self, pinned: &Pinned) -> Result<(), ProviderError> {
        let now = identity_of(&self.file.metadata()?);
        // Size and mtime, not ctime: writing and truncating change mtime,
        // while renaming the file away or unlinking it (an export replaced
        // by a new file) changes only ctime, and the bytes held are intact.
        if (now.size, now.mtime) == (self.identity.size, self.identity.mtime) {
            return Ok(());
        }
        if !self.change_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                pinned = %pinned.version, now = %Version::File(Box::new(now)),
                "the file was modified in place while open"
            );
        }
        Err(ProviderError::Changed {
            pinned: pinned.version.to_string(),
        })
    }
}

/// Exactly `len` bytes at `offset` from the pinned file, checked against
/// the pin after reading.
fn read_range(pinned: &Pinned, offset: u64, len: usize) -> Result<Bytes, ProviderError> {
    let open = open_file(pinned)?;
    let mut buf = BytesMut::zeroed(len);
    let mut done = 0;
    while done < len {
        match open.file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                // Shorter than pinned: truncated under the reader.
                return Err(ProviderError::Changed {
                    pinned: pinned.version.to_string(),
                });
            }
            Ok(n) => done += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    open.check(pinned)?;
    Ok(buf.freeze())
}

/// The data extents of the pinned file by SEEK_DATA/SEEK_HOLE on its
/// descriptor; `None` when the file system cannot tell: all data.
fn data_ranges(pinned: &Pinned) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
    let open = open_file(pinned)?;
    open.check(pinned)?;
    let size = i64::try_from(open.identity.size).unwrap_or(i64::MAX);
    // A duplicate: lseek moves the offset, which must not race a pread on
    // the shared description (pread ignores it, but be tidy).
    let file = open.file.try_clone()?;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut at: i64 = 0;
    while at < size {
        // SAFETY: lseek on a descriptor we own; it only moves the offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => break, // only a hole from `at` to the end
                Some(libc::EINVAL) => return Ok(None),
                _ => return Err(err.into()),
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { size } else { hole.min(size) };
        if end <= data {
            break;
        }
        ranges.push(data as u64..end as u64);
        at = end;
    }
    Ok(Some(ranges))
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ProviderError> + Send + 'static,
) -> Result<T, ProviderError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|err| ProviderError::Io(io::Error::other(err)))?
}

/// [`LocalTree::pin`] off the async threads (an SMB share can be slow).
pub(super) async fn pin_blocking(
    tree: &Arc<LocalTree>,
    disk: &DiskEntry,
) -> Result<Pinned, ProviderError> {
    let tree = Arc::clone(tree);
    let disk = disk.clone();
    blocking(move || tree.pin(&disk)).await
}

pub(super) async fn read_blocking(
    pinned: &Pinned,
    offset: u64,
    len: usize,
) -> Result<Bytes, ProviderError> {
    let pinned = pinned.clone();
    blocking(move || read_range(&pinned, offset, len)).await
}

pub(super) async fn data_ranges_blocking(
    pinned: &Pinned,
) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
    let pinned = pinned.clone();
    blocking(move || data_ranges(&pinned)).await
}

/// A file name as a path component: UTF-8 as is; otherwise each byte that
/// is not part of valid UTF-8 as `%XX`, so distinct names stay distinct.
pub(super) fn component(name: &OsStr) -> String {
    let bytes = name.as_bytes();
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => {
            let mut out = String::with_capacity(bytes.len() + 8);
            for chunk in bytes.utf8_chunks() {
                out.push_str(chunk.valid());
                for byte in chunk.invalid() {
                    out.push_str(&format!("%{byte:02X}"));
                }
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn listed(tree: &LocalTree, relative: &str) -> DiskEntry {
        let meta = std::fs::symlink_metadata(tree.root().join(relative)).unwrap();
        tree.entry(vec![relative.into()], Path::new(relative), &meta)
    }

    fn both_ways(tree: &LocalTree, test: impl Fn(&LocalTree)) {
        test(tree);
        tree.openat2.store(false, Ordering::Relaxed);
        test(tree);
        tree.openat2.store(true, Ordering::Relaxed);
    }

    #[test]
    fn a_file_swapped_for_a_symlink_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"secret").unwrap();
        std::fs::create_dir(root.path().join("vm")).unwrap();
        std::fs::write(root.path().join("vm/disk.raw"), b"disk bytes").unwrap();
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let disk = listed(&tree, "vm/disk.raw");
        both_ways(&tree, |tree| {
            let pinned = tree.pin(&disk).unwrap();
            assert_eq!(&read_range(&pinned, 0, 10).unwrap()[..], b"disk bytes");
        });
        std::fs::remove_file(root.path().join("vm/disk.raw")).unwrap();
        symlink(
            outside.path().join("secret"),
            root.path().join("vm/disk.raw"),
        )
        .unwrap();
        both_ways(&tree, |tree| {
            let err = tree.pin(&disk).unwrap_err();
            assert!(matches!(err, ProviderError::Denied(_)), "{err}");
        });
    }

    #[test]
    fn a_directory_swapped_for_a_symlink_is_refused() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("disk.raw"), b"outside!").unwrap();
        std::fs::create_dir(root.path().join("vm")).unwrap();
        std::fs::write(root.path().join("vm/disk.raw"), b"inside!!").unwrap();
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let disk = listed(&tree, "vm/disk.raw");
        std::fs::rename(root.path().join("vm"), root.path().join("old")).unwrap();
        symlink(outside.path(), root.path().join("vm")).unwrap();
        both_ways(&tree, |tree| {
            let err = tree.pin(&disk).unwrap_err();
            assert!(matches!(err, ProviderError::Denied(_)), "{err}");
        });
    }

    #[test]
    fn a_file_replaced_by_another_is_refused_and_an_open_one_reads_on() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("disk.raw"), b"version one").unwrap();
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let disk = listed(&tree, "disk.raw");
        let pinned = tree.pin(&disk).unwrap();
        // Replaced the way exports are: a new file renamed over the old.
        std::fs::write(root.path().join("new"), b"version two").unwrap();
        std::fs::rename(root.path().join("new"), root.path().join("disk.raw")).unwrap();
        let err = tree.pin(&disk).unwrap_err();
        assert!(matches!(err, ProviderError::Changed { .. }), "{err}");
        // The open file keeps the inode it pinned.
        assert_eq!(&read_range(&pinned, 0, 11).unwrap()[..], b"version one");
    }

    #[test]
    fn an_in_place_rewrite_fails_the_read() {
        let root = tempfile::tempdir().unwrap();
        let path = root.path().join("disk.raw");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let pinned = tree.pin(&listed(&tree, "disk.raw")).unwrap();
        assert!(read_range(&pinned, 0, 4096).is_ok());
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .write_at(&[2u8; 16], 0)
            .unwrap();
        let err = read_range(&pinned, 0, 4096).unwrap_err();
        assert!(matches!(err, ProviderError::Changed { .. }), "{err}");
        // Gone since listing: its own error (ENOENT at the mount).
        std::fs::remove_file(&path).unwrap();
        let err = tree.pin(&listed_gone()).unwrap_err();
        assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    }

    fn listed_gone() -> DiskEntry {
        DiskEntry {
            path: vec!["disk.raw".into()],
            size: 0,
            mtime: SystemTime::UNIX_EPOCH,
            version: Version::File(Box::new(FileIdentity {
                dev: 0,
                ino: 0,
                size: 0,
                mtime: (0, 0),
                ctime: (0, 0),
            })),
            locator: "disk.raw".into(),
            allocated: None,
        }
    }

    #[test]
    fn dot_dot_and_fifos_are_refused() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("vm")).unwrap();
        let tree = LocalTree::open(root.path().join("vm")).unwrap();
        std::fs::write(root.path().join("above"), b"x").unwrap();
        let mut disk = listed_gone();
        disk.locator = "../above".into();
        both_ways(&tree, |tree| {
            assert!(matches!(
                tree.pin(&disk).unwrap_err(),
                ProviderError::Denied(_)
            ));
        });
        let fifo = CString::new(root.path().join("vm/fifo").as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        disk.locator = "fifo".into();
        both_ways(&tree, |tree| {
            assert!(matches!(
                tree.pin(&disk).unwrap_err(),
                ProviderError::Denied(_)
            ));
        });
    }

    #[test]
    fn non_utf8_names_survive_the_locator() {
        let root = tempfile::tempdir().unwrap();
        let name = OsStr::from_bytes(b"disk-\xff\xfe%.raw");
        std::fs::write(root.path().join(name), b"bytes").unwrap();
        let tree = LocalTree::open(root.path().to_path_buf()).unwrap();
        let meta = std::fs::metadata(root.path().join(name)).unwrap();
        let disk = tree.entry(vec![component(name)], Path::new(name), &meta);
        assert_eq!(disk.path, vec!["disk-%FF%FE%.raw"]);
        let pinned = tree.pin(&disk).unwrap();
        assert_eq!(&read_range(&pinned, 0, 5).unwrap()[..], b"bytes");
    }
}
