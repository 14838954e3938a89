//! The one place where failures become errnos.
//!
//! Handlers never pick an errno ad hoc: they return [`FsError`], which knows
//! its errno and whether it deserves a log line.

use std::sync::Arc;

use crate::provider::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDirectory,
    #[error("is a directory")]
    IsDirectory,
    #[error("read-only file system")]
    ReadOnly,
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid argument")]
    InvalidArgument,
    #[error("no data past this offset")]
    NoMoreData,
    #[error("{path}: {source}")]
    Provider {
        path: String,
        /// Shared: every reader waiting on one failed fetch gets it.
        source: Arc<ProviderError>,
    },
    #[error("operation cancelled")]
    Cancelled,
}

impl FsError {
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDirectory => libc::ENOTDIR,
            FsError::IsDirectory => libc::EISDIR,
            FsError::ReadOnly => libc::EROFS,
            FsError::BadHandle => libc::EBADF,
            FsError::InvalidArgument => libc::EINVAL,
            FsError::NoMoreData => libc::ENXIO,
            // What a backup tool can act on: gone since listing, access
            // refused, and everything else (changed under the reader,
            // unreachable, a bad answer) as an I/O error.
            FsError::Provider { source, .. } => match **source {
                ProviderError::NotFound(_) => libc::ENOENT,
                ProviderError::Denied(_) | ProviderError::Unauthorized(_) => libc::EACCES,
                _ => libc::EIO,
            },
            FsError::Cancelled => libc::EINTR,
        }
    }
}
