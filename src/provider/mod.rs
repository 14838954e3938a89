//! The provider interface: list an inventory of disks, read byte ranges of a
//! disk under a version precondition.
//!
//! A provider knows nothing of inodes, handles, caches or tokens: it answers
//! "what disks are there" and "give me bytes `[offset, offset+len)` of this
//! disk, as long as it is still the version I pinned".

use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use bytes::Bytes;

use crate::options::MountOptions;

pub mod demo;
pub mod dir;
pub mod http;
mod http_range;
pub mod hyperv;
pub mod s3;

/// One disk as the provider lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskEntry {
    /// Path components below the mount root, as the provider names them;
    /// the filesystem core maps them to valid file names.
    pub path: Vec<String>,
    pub size: u64,
    pub mtime: SystemTime,
    pub version: Version,
    /// Provider-private address of the bytes (file path, URL, key).
    pub locator: String,
    /// Bytes that hold data, when the provider knows the disk is sparse;
    /// it becomes `st_blocks`, which tells `cp` to look for holes.
    pub allocated: Option<u64>,
}

/// The identity of one version of a disk's bytes: an ETag, a generation,
/// or size+mtime. Every ranged read carries it as a precondition.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Version(pub String);

#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub disks: Vec<DiskEntry>,
    /// Directories to show even when they hold no disks (an exported VM
    /// without disks is still an exported VM).
    pub empty_dirs: Vec<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("the disk changed since it was opened (version {pinned} is gone)")]
    Changed { pinned: String },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("access denied: {0}")]
    Denied(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("bad answer from the provider: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
}

impl ProviderError {
    /// Worth another try after a pause: timeouts, resets, 5xx, throttling.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Unreachable(_) => true,
            ProviderError::Io(err) => matches!(
                err.kind(),
                std::io::ErrorKind::Interrupted
                    | std::io::ErrorKind::TimedOut
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

#[async_trait]
pub trait Provider: Send + Sync + 'static {
    /// The whole inventory under the source.
    async fn list(&self) -> Result<Inventory, ProviderError>;

    /// The current size and version of one disk; called at open to pin it.
    async fn stat(&self, disk: &DiskEntry) -> Result<(u64, Version), ProviderError>;

    /// The byte ranges that hold data, sorted and disjoint; the rest reads
    /// as zeros and is served without fetching. `None`: all of it is data
    /// (or the provider cannot tell).
    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        _version: &Version,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        Ok(None)
    }

    /// Exactly `len` bytes at `offset` (the caller never reads past the size
    /// it pinned), failing with [`ProviderError::Changed`] if the disk is no
    /// longer at `version`.
    async fn read(
        &self,
        disk: &DiskEntry,
        version: &Version,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError>;
}

/// Builds the provider for a SOURCE string such as `dir:///srv/vms`.
pub async fn open_source(
    source: &str,
    options: &MountOptions,
) -> Result<Arc<dyn Provider>, ProviderError> {
    let (scheme, rest) = source.split_once("://").ok_or_else(|| {
        ProviderError::Config(format!(
            "'{source}' is not a source: expected SCHEME://..., e.g. demo://, dir:///path, http://host/manifest.json"
        ))
    })?;
    match scheme {
        "demo" => Ok(Arc::new(demo::DemoProvider::new(rest)?)),
        "dir" => Ok(Arc::new(dir::DirProvider::new(local_path(source, rest)?)?)),
        "hyperv" => Ok(Arc::new(hyperv::HyperVProvider::new(local_path(
            source, rest,
        )?)?)),
        "http" | "https" => Ok(Arc::new(http::HttpProvider::new(source, options)?)),
        "s3" => Ok(Arc::new(s3::S3Provider::new(source, options).await?)),
        "az" | "gs" | "vsphere" => Err(ProviderError::Config(format!(
            "{scheme}:// sources are not supported by this version of vmexportfs yet"
        ))),
        _ => Err(ProviderError::Config(format!(
            "unknown source scheme '{scheme}://' in '{source}': expected demo, dir, hyperv, http, https, s3"
        ))),
    }
}

fn local_path(source: &str, rest: &str) -> Result<std::path::PathBuf, ProviderError> {
    if !rest.starts_with('/') {
        return Err(ProviderError::Config(format!(
            "'{source}' needs an absolute path, e.g. dir:///srv/vms"
        )));
    }
    Ok(std::path::PathBuf::from(rest))
}

/// Hides the query string of a URL (SAS tokens, pre-signed signatures) so it
/// never reaches a log line or /proc/mounts.
pub fn redact_url(url: &str) -> String {
    match url.split_once('?') {
        Some((base, _)) => format!("{base}?<redacted>"),
        None => url.to_string(),
    }
}
