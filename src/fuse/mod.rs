//! The thin fuser adapter: translate each kernel request into a call on the
//! filesystem core and its result into a reply. No logic lives here.
//!
//! Metadata answers come from memory and are replied inline, and so are
//! reads whose blocks are all cached. `open` and reads that must fetch
//! await the provider, so they move into tokio tasks and the fuser thread
//! goes back for the next request at once: many reads are in flight
//! together, and a slow read never holds up a `stat` or `ls`.

pub mod kernel_mount;

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
};

use crate::error::FsError;
use crate::fs::refresh::{KernelCache, Stale};
use crate::fs::{Attr, FsCore, Kind};
use crate::read::{Opener, Started};

/// How long the kernel may keep names and attributes: a disk the provider
/// replaced or removed shows so within this of the listing that saw it
/// (sizes are refreshed at open anyway).
const TTL: Duration = Duration::from_secs(10);

pub struct FuseAdapter {
    core: Arc<FsCore>,
    runtime: tokio::runtime::Handle,
}

impl FuseAdapter {
    pub fn new(core: Arc<FsCore>, runtime: tokio::runtime::Handle) -> Self {
        FuseAdapter { core, runtime }
    }

    /// Answers a directory read once the directory is listed: at once if it
    /// is, else after listing it on the runtime, never on a FUSE thread.
    fn when_listed<R: Send + 'static>(
        &self,
        ino: INodeNo,
        operation: &'static str,
        reply: R,
        fail: fn(R, Errno),
        answer: impl FnOnce(&FsCore, R) + Send + 'static,
    ) {
        if !self.core.needs_listing(ino.0) {
            return contained(operation, || answer(&self.core, reply));
        }
        let core = Arc::clone(&self.core);
        self.runtime.spawn(async move {
            match core.list_dir(ino.0).await {
                Ok(()) => contained(operation, || answer(&core, reply)),
                Err(err) => fail(reply, listing_errno(&err)),
            }
        });
    }
}

/// The kernel's name and attribute caches, told what a listing changed.
pub struct KernelNotifier(pub fuser::Notifier);

impl KernelCache for KernelNotifier {
    fn invalidate(&self, stale: &Stale) {
        let result = match stale {
            Stale::Entry { parent, name } => {
                self.0.inval_entry(INodeNo(*parent), OsStr::new(&**name))
            }
            Stale::Attrs(ino) => self.0.inval_inode(INodeNo(*ino), 0, 0),
        };
        // The kernel not knowing the entry is no error (fuser says so); any
        // other leaves the entry to its time to live.
        if let Err(err) = result {
            tracing::debug!(?stale, "kernel cache invalidation failed: {err}");
        }
    }
}

/// Runs a handler on the fuser thread. A panic in it (a bug) fails this
/// request only: the reply, dropped while unwinding, answers EIO, and the
/// thread goes on serving instead of ending the session.
fn contained(operation: &'static str, handler: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(handler)).is_err() {
        tracing::error!(
            operation,
            "a request panicked; it failed with EIO and the mount goes on"
        );
    }
}

// Answers for requests about a directory's children, which a directory
// never listed (a provider listed one level at a time) gets only after its
// listing, from a task: the FUSE thread never waits for a provider.

fn answer_lookup(core: &FsCore, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
    match core.lookup(parent.0, name) {
        Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
        Err(err) => reply.error(errno(&err)),
    }
}

fn answer_readdir(core: &FsCore, ino: INodeNo, offset: u64, mut reply: ReplyDirectory) {
    let listed = core.readdir(ino.0, offset, false, |entry| {
        reply.add(
            INodeNo(entry.ino),
            entry.next_offset,
            file_type(entry.kind),
            entry.name,
        )
    });
    match listed {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(errno(&err)),
    }
}

fn answer_readdirplus(core: &FsCore, ino: INodeNo, offset: u64, mut reply: ReplyDirectoryPlus) {
    let listed = core.readdir(ino.0, offset, true, |entry| {
        let Some(attr) = entry.attr else {
            return false; // every listed entry has them
        };
        reply.add(
            INodeNo(entry.ino),
            entry.next_offset,
            entry.name,
            &TTL,
            &file_attr(&attr),
            Generation(0),
        )
    });
    match listed {
        Ok(()) => reply.ok(),
        Err(err) => reply.error(errno(&err)),
    }
}

/// A directory's listing failed, for readdir: the kernel reads ENOENT
/// from readdir as the end of the listing, and an empty directory must
/// never stand for one that could not be listed.
fn listing_errno(err: &FsError) -> Errno {
    match err.errno() {
        libc::ENOENT => Errno::EIO,
        errno => Errno::from_i32(errno),
    }
}

fn errno(err: &FsError) -> Errno {
    Errno::from_i32(err.errno())
}

fn file_type(kind: Kind) -> FileType {
    match kind {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

fn file_attr(attr: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(attr.ino),
        size: attr.size,
        blocks: attr.blocks,
        atime: attr.mtime,
        mtime: attr.mtime,
        ctime: attr.mtime,
        crtime: attr.mtime,
        kind: file_type(attr.kind),
        perm: attr.perm,
        nlink: attr.nlink,
        uid: attr.uid,
        gid: attr.gid,
        rdev: 0,
        blksize: 1 << 20,
        flags: 0,
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Enough background requests for the kernel's read-ahead to keep
        // many fetches in flight.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        // Files are opened with FOPEN_DIRECT_IO: replies go straight into
        // the reader's buffer instead of through the page cache, which
        // measured 1.5-2x faster here; our own cache and read-ahead take
        // the page cache's place. Let mmap work on such files too (6.6+),
        // and let the kernel split large direct reads into parallel requests.
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.add_capabilities(InitFlags::FUSE_ASYNC_DIO);
        // Attributes come with the listing when the kernel sees them used
        // (`ls -l`); `find` keeps plain readdir, so a million entries walked
        // do not become a million kernel inodes.
        let _ = config
            .add_capabilities(InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO);
        Ok(())
    }

    fn destroy(&mut self) {
        self.core.shutdown();
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if self.core.needs_listing(parent.0) {
            let core = Arc::clone(&self.core);
            let name = name.to_owned();
            self.runtime.spawn(async move {
                match core.list_dir(parent.0).await {
                    Ok(()) => contained("lookup", || answer_lookup(&core, parent, &name, reply)),
                    Err(err) => reply.error(errno(&err)),
                }
            });
            return;
        }
        contained("lookup", || answer_lookup(&self.core, parent, name, reply))
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        contained("getattr", || match self.core.attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _link_name: &OsStr,
        _target: &std::path::Path,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _newparent: INodeNo,
        _newname: &OsStr,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EROFS);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let core = Arc::clone(&self.core);
        let pid = req.pid();
        self.runtime.spawn(async move {
            match core.open(ino.0, flags.0, Opener::of_pid(pid)).await {
                Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
                Err(err) => reply.error(errno(&err)),
            }
        });
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let _context = self.runtime.enter();
        contained("read", || match self.core.start_read(fh.0, offset, size) {
            Ok(Started::Ready(data)) => reply.data(&data),
            Ok(Started::Pending(pending)) => {
                // A panic in the task drops the reply: EIO, as above.
                self.runtime.spawn(async move {
                    match pending.finish().await {
                        Ok(data) => reply.data(&data),
                        Err(err) => reply.error(errno(&err)),
                    }
                });
            }
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let core = Arc::clone(&self.core);
        self.runtime.spawn(async move { core.release(fh.0).await });
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel caches listings; it keeps its copy across opens only
        // while the directory is unchanged (a refresh may have changed it).
        contained("opendir", || match self.core.opendir(ino.0) {
            Ok(unchanged) => {
                let mut flags = FopenFlags::FOPEN_CACHE_DIR;
                if unchanged {
                    flags |= FopenFlags::FOPEN_KEEP_CACHE;
                }
                reply.opened(FileHandle(0), flags)
            }
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        self.when_listed(
            ino,
            "readdir",
            reply,
            ReplyDirectory::error,
            move |core, reply| answer_readdir(core, ino, offset, reply),
        )
    }

    /// readdir with each entry's attributes, so that `ls -l` needs no
    /// lookup per entry.
    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        self.when_listed(
            ino,
            "readdirplus",
            reply,
            ReplyDirectoryPlus::error,
            move |core, reply| answer_readdirplus(core, ino, offset, reply),
        )
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let stat = self.core.statfs();
        reply.statfs(
            stat.blocks,
            0,
            0,
            stat.files,
            0,
            stat.block_size,
            stat.name_max,
            stat.block_size,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes at all: ENOSYS makes the kernel answer
        // every later getxattr itself (EOPNOTSUPP) instead of asking us.
        // `ls -l` asks for two per file (ACL, SELinux label), each a round
        // trip of ~100 us here: 2 s of a 10,000-file listing.
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn create(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        reply.error(Errno::EROFS);
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: fuser::ReplyLseek,
    ) {
        contained("lseek", || match self.core.seek(fh.0, offset, whence) {
            Ok(found) => reply.offset(found as i64),
            Err(err) => reply.error(errno(&err)),
        })
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }
}
