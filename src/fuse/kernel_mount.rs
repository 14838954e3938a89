//! The FUSE mount made with mount(2) ourselves rather than by fuser.
//!
//! fuser opens the mountpoint before mounting. When the mountpoint is an
//! autofs trigger (`x-systemd.automount`), that open fires the automount
//! again and waits for the mount we are in the middle of making, until
//! systemd's mount timeout. mount(2) looks the path up without firing it
//! and stacks our mount on the autofs one, which is what systemd waits for.
//! So as root we open /dev/fuse, mount it ourselves and hand the descriptor
//! to fuser; without the right to mount (EPERM) the caller falls back to
//! fuser's own mount through fusermount3.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// What the mount shows and allows.
pub struct MountRequest<'a> {
    pub mountpoint: &'a Path,
    /// The source column of /proc/mounts (the redacted source URL).
    pub fsname: &'a str,
    pub subtype: &'a str,
    pub allow_other: bool,
    pub default_permissions: bool,
}

/// Our mount of /dev/fuse on a mountpoint; detached lazily if dropped
/// while still mounted, so no error path leaves it behind.
pub struct KernelMount {
    mountpoint: CString,
    shown: PathBuf,
    mounted: bool,
}

/// How [`KernelMount::unmount`] went.
#[derive(Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone: the session sees ENODEV and ends.
    Clean,
    /// Busy, so detached: it goes when its last user lets go.
    Detached,
}

/// Mounts FUSE on `request.mountpoint`: the /dev/fuse descriptor for
/// fuser's session, and the mount. `None` when this process may not open
/// /dev/fuse or mount (not root): fusermount3 has to do it.
pub fn mount(request: &MountRequest) -> io::Result<Option<(OwnedFd, KernelMount)>> {
    let mountpoint = c_string(request.mountpoint.as_os_str().as_encoded_bytes())?;
    let fsname = c_string(request.fsname.as_bytes())?;
    let dev_fuse = c"/dev/fuse";
    // SAFETY: a valid NUL-terminated path; the descriptor is owned below.
    let fd = unsafe { libc::open(dev_fuse.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            // fusermount3 is setuid root and opens it itself.
            Some(libc::EACCES | libc::EPERM) => Ok(None),
            Some(libc::ENOENT | libc::ENODEV | libc::ENXIO) => Err(io::Error::new(
                err.kind(),
                format!("opening /dev/fuse: {err} (is the fuse module loaded?)"),
            )),
            _ => Err(io::Error::new(
                err.kind(),
                format!("opening /dev/fuse: {err}"),
            )),
        };
    }
    // SAFETY: `fd` was just opened and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let data = c_string(mount_data(request, fd.as_raw_fd(), real_ids()).as_bytes())?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
    // SAFETY: every pointer is a valid NUL-terminated string that outlives
    // the call; mount(2) reads them and keeps nothing.
    let result = unsafe {
        libc::mount(
            fsname.as_ptr(),
            mountpoint.as_ptr(),
            c"fuse".as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if result != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EPERM) {
            return Ok(None);
        }
        return Err(err);
    }
    Ok(Some((
        fd,
        KernelMount {
            mountpoint,
            shown: request.mountpoint.to_path_buf(),
            mounted: true,
        },
    )))
}

/// The caller's real ids: the kernel lets only this user (and, with
/// allow_other, everyone) into the mount.
fn real_ids() -> (u32, u32) {
    // SAFETY: getuid and getgid cannot fail and touch no memory.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// The fuse filesystem's option string. rootmode only needs the root's
/// file type: the daemon answers the attributes.
fn mount_data(request: &MountRequest, fd: i32, (uid, gid): (u32, u32)) -> String {
    let mut data = format!(
        "fd={fd},rootmode=40000,user_id={uid},group_id={gid},subtype={}",
        request.subtype
    );
    if request.default_permissions {
        data.push_str(",default_permissions");
    }
    if request.allow_other {
        data.push_str(",allow_other");
    }
    data
}

fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "a NUL byte in a mount argument",
        )
    })
}

impl KernelMount {
    /// Unmounts; a busy mount (an open file, a shell's working directory)
    /// is detached instead.
    pub fn unmount(mut self) -> io::Result<Unmounted> {
        self.mounted = false;
        match umount(&self.mountpoint, libc::UMOUNT_NOFOLLOW) {
            Ok(()) => Ok(Unmounted::Clean),
            // Already gone: someone else unmounted it.
            Err(err) if err.raw_os_error() == Some(libc::EINVAL) => Ok(Unmounted::Clean),
            Err(err) if err.raw_os_error() == Some(libc::EBUSY) => {
                umount(&self.mountpoint, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW)
                    .map(|()| Unmounted::Detached)
            }
            Err(err) => Err(io::Error::new(
                err.kind(),
                format!("unmounting {}: {err}", self.shown.display()),
            )),
        }
    }

    /// The mount went on its own (`umount` from outside): unmounting again
    /// could take down whatever is mounted there next.
    pub fn forget(mut self) {
        self.mounted = false;
    }
}

fn umount(mountpoint: &CString, flags: i32) -> io::Result<()> {
    // SAFETY: a valid NUL-terminated path; umount2 touches nothing else.
    if unsafe { libc::umount2(mountpoint.as_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for KernelMount {
    fn drop(&mut self) {
        if self.mounted {
            if let Err(err) = umount(&self.mountpoint, libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) {
                tracing::warn!(mountpoint = %self.shown.display(), "detaching the mount: {err}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(allow_other: bool, default_permissions: bool) -> MountRequest<'static> {
        MountRequest {
            mountpoint: Path::new("/mnt/x"),
            fsname: "demo://",
            subtype: "vmexportfs",
            allow_other,
            default_permissions,
        }
    }

    #[test]
    fn mount_data_names_the_descriptor_owner_and_access() {
        assert_eq!(
            mount_data(&request(false, false), 7, (1000, 100)),
            "fd=7,rootmode=40000,user_id=1000,group_id=100,subtype=vmexportfs"
        );
        assert_eq!(
            mount_data(&request(true, true), 3, (0, 0)),
            "fd=3,rootmode=40000,user_id=0,group_id=0,subtype=vmexportfs,default_permissions,allow_other"
        );
    }

    #[test]
    fn a_nul_in_an_argument_is_refused_before_any_syscall() {
        let bad = MountRequest {
            fsname: "demo://\0x",
            ..request(false, false)
        };
        let err = mount(&bad).err().expect("a NUL byte must be refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }
}
