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

pub mod azure;
pub mod buffer;
pub mod demo;
pub mod dir;
pub mod ebs;
mod export_snapshot;
pub mod gcs;
pub mod http;
mod http_range;
pub mod hyperv;
mod local;
pub mod s3;
mod version;
pub mod vsphere;

pub use version::{FileIdentity, Strength, Version};

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

/// A disk pinned at open: its size and version then, and whatever the
/// provider keeps for this one open file (dir://: the descriptor every read
/// goes through, so that a path swapped later is never followed).
#[derive(Clone)]
pub struct Pinned {
    pub size: u64,
    pub version: Version,
    pub handle: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl Pinned {
    /// A pin that is only a size and a version (every remote provider).
    pub fn new(size: u64, version: Version) -> Self {
        Pinned {
            size,
            version,
            handle: None,
        }
    }
}

impl std::fmt::Debug for Pinned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pinned")
            .field("size", &self.size)
            .field("version", &self.version)
            .field("handle", &self.handle.is_some())
            .finish()
    }
}

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
    /// Not signed in, or the session expired (HTTP 401).
    #[error("not authenticated: {0}")]
    Unauthorized(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("bad answer from the provider: {0}")]
    Protocol(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Config(String),
    /// A bug of ours (a panic, contained): this call fails, the mount goes on.
    #[error("internal error: {0}")]
    Internal(String),
}

impl ProviderError {
    /// Every [`ProviderError::kind`], in a fixed order (metrics labels).
    pub const KINDS: [&'static str; 9] = [
        "changed",
        "not_found",
        "denied",
        "unauthorized",
        "unreachable",
        "protocol",
        "io",
        "config",
        "internal",
    ];

    /// A short label for the kind of failure, one of [`ProviderError::KINDS`].
    pub fn kind(&self) -> &'static str {
        let index = match self {
            ProviderError::Changed { .. } => 0,
            ProviderError::NotFound(_) => 1,
            ProviderError::Denied(_) => 2,
            ProviderError::Unauthorized(_) => 3,
            ProviderError::Unreachable(_) => 4,
            ProviderError::Protocol(_) => 5,
            ProviderError::Io(_) => 6,
            ProviderError::Config(_) => 7,
            ProviderError::Internal(_) => 8,
        };
        Self::KINDS[index]
    }

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

    /// Whether [`Provider::list_level`] lists one directory at a time (a
    /// delimiter listing, a directory read): then the mount lists only the
    /// root at mount time and each directory when it is first used.
    fn lists_levels(&self) -> bool {
        false
    }

    /// One directory level of the inventory: the disks directly in `dir`
    /// (raw path components, as this provider names them; each disk's
    /// `path` is `dir` and its name) and, in `empty_dirs`, every
    /// sub-directory of `dir`, empty or not, as a full path.
    async fn list_level(&self, dir: &[String]) -> Result<Inventory, ProviderError> {
        let _ = dir;
        Err(ProviderError::Internal(
            "this source lists its whole inventory only".into(),
        ))
    }

    /// Pins one disk at its current size and version; called at open.
    /// Every read of the open file carries what it returns.
    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError>;

    /// The byte ranges of the pinned disk that hold data, sorted and
    /// disjoint; the rest reads as zeros and is served without fetching.
    /// `None`: all of it is data (or the provider cannot tell).
    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        _pinned: &Pinned,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        Ok(None)
    }

    /// How large a request this provider wants for sequential read-ahead:
    /// object stores pay a fixed cost per request (latency, billing,
    /// emulator CPU), so they ask for more; 0 means the read path's default
    /// (2 MiB: over loopback HTTP larger requests measured no faster).
    fn preferred_request_size(&self) -> u64 {
        0
    }

    /// The unit this provider fetches in, when a request for part of one
    /// costs the whole (an EBS block is fetched whole); 0 when any range
    /// costs what it asks for. The read path fetches whole units where it
    /// can, so that what it charges to the throttle is what crosses the link.
    fn fetch_granule(&self) -> u64 {
        0
    }

    /// A file is being opened for reading, before its version is pinned
    /// (vSphere takes its snapshot here). Every `Ok` is matched by one
    /// [`Provider::end_read`].
    async fn begin_read(&self, _disk: &DiskEntry) -> Result<(), ProviderError> {
        Ok(())
    }

    /// A file opened with [`Provider::begin_read`] was closed.
    async fn end_read(&self, _disk: &DiskEntry) {}

    /// The mount is ending: undo whatever the provider left behind on the
    /// provider's side (snapshots) and sign out.
    async fn close(&self) {}

    /// Provider-side work in progress, one line each, for `status` (an
    /// EBS snapshot being taken for `snapshot=on`).
    fn activity(&self) -> Vec<String> {
        Vec::new()
    }

    /// Exactly `len` bytes at `offset` (the caller never reads past the size
    /// it pinned), failing with [`ProviderError::Changed`] if the disk is no
    /// longer at the pinned version.
    async fn read(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError>;
}

/// What the object stores ask for: Azurite served 54 MiB/s with 2 MiB
/// requests and 266 MiB/s with 32 MiB ones; S3 bills per GET.
pub const OBJECT_STORE_REQUEST: u64 = 16 << 20;

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
    let kind = match scheme {
        "https" if azure::is_blob_sas_url(source) => "az",
        "http" | "https" => "http",
        other => other,
    };
    check_options_apply(kind, options)?;
    check_no_credentials(kind, source, rest)?;
    match kind {
        "demo" => Ok(Arc::new(demo::DemoProvider::new(rest)?)),
        "dir" => Ok(Arc::new(dir::DirProvider::new(local_path(source, rest)?)?)),
        "hyperv" => Ok(Arc::new(hyperv::HyperVProvider::new(local_path(
            source, rest,
        )?)?)),
        "http" => Ok(Arc::new(http::HttpProvider::new(source, options)?)),
        "s3" => Ok(Arc::new(s3::S3Provider::new(source, options).await?)),
        "ebs" => Ok(Arc::new(ebs::EbsProvider::new(source, options).await?)),
        "az" => Ok(Arc::new(azure::AzureProvider::new(source, options).await?)),
        "gs" => Ok(Arc::new(gcs::GcsProvider::new(source, options).await?)),
        "vsphere" => Ok(Arc::new(
            vsphere::VsphereProvider::new(source, options).await?,
        )),
        _ => Err(ProviderError::Config(format!(
            "unknown source scheme '{scheme}://' in '{source}': expected demo, dir, hyperv, http, https, s3, ebs, az, gs, vsphere"
        ))),
    }
}

/// A password in the source would show in /proc/mounts, `ps` and the log:
/// refused for every scheme. A bare `user@` is vSphere's user name; any
/// other source would silently ignore it, so it is refused too.
fn check_no_credentials(kind: &str, source: &str, rest: &str) -> Result<(), ProviderError> {
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let Some((userinfo, _)) = authority.rsplit_once('@') else {
        return Ok(());
    };
    let scheme = source.split("://").next().unwrap_or(kind);
    if userinfo.contains(':') {
        return Err(ProviderError::Config(format!(
            "{scheme}://: a password in the source would show in /proc/mounts and ps; \
             use the provider's credential options (credentials=FILE, the SDK chain) instead"
        )));
    }
    if kind != "vsphere" {
        return Err(ProviderError::Config(format!(
            "{scheme}://: a user name in the source ('{userinfo}@') is not used by {scheme}:// sources"
        )));
    }
    Ok(())
}

/// Options that only some sources use. Given to another source they would
/// be silently ignored (a key file or a CA the user counts on, never used),
/// so they are refused, saying why.
fn check_options_apply(kind: &str, options: &MountOptions) -> Result<(), ProviderError> {
    const STORES: &[&str] = &["s3", "ebs", "az", "gs"];
    let rules: [(&str, bool, &[&str]); 9] = [
        ("endpoint=", options.endpoint.is_some(), STORES),
        ("region=", options.region.is_some(), &["s3"]),
        ("profile=", options.profile.is_some(), &["s3", "ebs"]),
        (
            "credentials=",
            options.credentials.is_some(),
            &["az", "vsphere"],
        ),
        ("user=", options.user.is_some(), &["vsphere"]),
        ("anonymous", options.anonymous, STORES),
        (
            "cafile=",
            options.cafile.is_some(),
            &["http", "s3", "ebs", "az", "vsphere"],
        ),
        ("insecure", options.insecure, &["http", "az", "vsphere"]),
        ("snapshot=on", options.snapshot, &["vsphere", "ebs"]),
    ];
    let Some((option, _, applies_to)) = rules
        .iter()
        .find(|(_, given, applies_to)| *given && !applies_to.contains(&kind))
    else {
        return Ok(());
    };
    let why = match (*option, kind) {
        ("cafile=" | "insecure", "gs") => {
            "google-cloud-storage trusts the system roots only".to_string()
        }
        ("region=", "ebs") => "ebs://REGION names the region; give it there".to_string(),
        ("insecure", "s3" | "ebs") => {
            "the AWS SDK always verifies TLS; give the endpoint's CA with cafile=".to_string()
        }
        _ => format!(
            "it is for {} sources",
            applies_to
                .iter()
                .map(|kind| format!("{kind}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let shown = if kind == "http" { "http(s)" } else { kind };
    Err(ProviderError::Config(format!(
        "{option} is not supported for {shown}:// sources: {why}"
    )))
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

/// Where an object store's key lands in the mounted tree.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum KeyPlace {
    /// Not under the mounted prefix, or the prefix itself.
    Outside,
    /// A folder marker (`a/b/`): a directory even when empty.
    Folder(Vec<String>),
    Object(Vec<String>),
}

/// Places `key` relative to `prefix` (empty, or ending with `/`).
pub(crate) fn place_key(prefix: &str, key: &str) -> KeyPlace {
    let split = |path: &str| path.split('/').map(str::to_string).collect();
    match key.strip_prefix(prefix) {
        None | Some("") => KeyPlace::Outside,
        Some(relative) => match relative.strip_suffix('/') {
            Some(folder) => KeyPlace::Folder(split(folder)),
            None => KeyPlace::Object(split(relative)),
        },
    }
}

/// The key prefix of directory `dir` below the source's `prefix`, for a
/// delimiter listing: `prefix` + each component + `/`. An empty component
/// (the key `a//b`) stays empty, as [`place_key`] made it.
pub(crate) fn level_prefix(prefix: &str, dir: &[String]) -> String {
    let mut out = String::from(prefix);
    for component in dir {
        out.push_str(component);
        out.push('/');
    }
    out
}

/// A common prefix of the delimiter listing of `dir` as the path of a
/// sub-directory: only a prefix of exactly one more component is one
/// (anything else is a store's bad answer, left out).
pub(crate) fn level_dir(prefix: &str, dir: &[String], common: &str) -> Option<Vec<String>> {
    match place_key(prefix, common) {
        KeyPlace::Folder(path) if path.len() == dir.len() + 1 && path.starts_with(dir) => {
            Some(path)
        }
        _ => None,
    }
}

/// A key of the delimiter listing of `dir` as a disk's path: only a key
/// directly in `dir` (the folder marker `dir/` itself, and keys deeper
/// down, which a store should not send, are left out).
pub(crate) fn level_object(prefix: &str, dir: &[String], key: &str) -> Option<Vec<String>> {
    match place_key(prefix, key) {
        KeyPlace::Object(path) if path.len() == dir.len() + 1 && path.starts_with(dir) => {
            Some(path)
        }
        _ => None,
    }
}

/// Splits `SCHEME://bucket/some/prefix` into ("bucket", "some/prefix/").
pub(crate) fn bucket_and_prefix<'a>(source: &'a str, scheme: &str) -> (&'a str, String) {
    let rest = source
        .strip_prefix(scheme)
        .and_then(|rest| rest.strip_prefix("://"))
        .unwrap_or(source);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (bucket, normalize_prefix(prefix))
}

/// "" or "a/b/" from any of "a/b", "/a/b/", "".
pub(crate) fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("{trimmed}/")
    }
}

/// Hides every query string inside a free text (an error message quoting a
/// request URL): `…?sv=…&sig=…` becomes `…?<redacted>`.
pub fn redact_queries(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('?') {
        let (before, after) = rest.split_at(at);
        out.push_str(before);
        let query_len = after[1..]
            .find(|c: char| c.is_whitespace() || matches!(c, ')' | '"' | '\'' | '>' | ','))
            .map_or(after.len(), |end| end + 1);
        if query_len > 1 {
            out.push_str("?<redacted>");
        } else {
            out.push('?');
        }
        rest = &after[query_len..];
    }
    out.push_str(rest);
    out
}

/// Statuses worth another try after a pause: request timeout, throttling
/// (429, S3's 503 SlowDown, Azure's 503 ServerBusy) and server errors.
pub(crate) fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500..=599)
}

/// "dispatch failure: io error: ...: Connection refused (os error 111)":
/// each cause's own message once, without an SDK's debug dump.
pub(crate) fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

/// A secret kept in a file (a SAS token, a password): refused when the file
/// is readable by group or others, as ssh does with private keys.
pub fn read_secret_file(path: &std::path::Path) -> Result<String, ProviderError> {
    use std::os::unix::fs::MetadataExt;
    let shown = path.display();
    let metadata = std::fs::metadata(path)
        .map_err(|err| ProviderError::Config(format!("credentials file {shown}: {err}")))?;
    if metadata.mode() & 0o077 != 0 {
        return Err(ProviderError::Config(format!(
            "credentials file {shown} is readable by group or others (mode {:o}): chmod 600 it",
            metadata.mode() & 0o777
        )));
    }
    std::fs::read_to_string(path)
        .map_err(|err| ProviderError::Config(format!("credentials file {shown}: {err}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    /// What a store's delimiter listing of `prefix` answers: keys directly
    /// under it, and the common prefixes one level down.
    fn delimiter_listing(keys: &[String], prefix: &str) -> (Vec<String>, BTreeSet<String>) {
        let mut contents = Vec::new();
        let mut commons = BTreeSet::new();
        for key in keys {
            let Some(rest) = key.strip_prefix(prefix) else {
                continue;
            };
            match rest.find('/') {
                Some(at) => {
                    commons.insert(format!("{prefix}{}", &rest[..=at]));
                }
                None => contents.push(key.clone()),
            }
        }
        (contents, commons)
    }

    proptest::proptest! {
        /// Listing level by level finds every disk and folder the whole
        /// listing finds, at the same paths, and nothing else.
        #[test]
        fn level_listings_add_up_to_the_whole_listing(
            keys in proptest::collection::vec("(ex/)?([ab]{0,2}/){0,3}[ab]{0,2}/?", 0..24),
        ) {
            // A store holds each key once.
            let keys: Vec<String> = keys.into_iter().collect::<BTreeSet<_>>().into_iter().collect();
            let prefix = "ex/";
            let mut whole_disks = BTreeSet::new();
            let mut whole_dirs = BTreeSet::new();
            for key in &keys {
                match place_key(prefix, key) {
                    KeyPlace::Object(path) => { whole_disks.insert(path); }
                    KeyPlace::Folder(path) => { whole_dirs.insert(path); }
                    KeyPlace::Outside => {}
                }
            }
            let mut level_disks = BTreeSet::new();
            let mut level_dirs = BTreeSet::new();
            let mut pending: Vec<Vec<String>> = vec![vec![]];
            while let Some(dir) = pending.pop() {
                let (contents, commons) = delimiter_listing(&keys, &level_prefix(prefix, &dir));
                for key in contents {
                    if let Some(path) = level_object(prefix, &dir, &key) {
                        proptest::prop_assert!(level_disks.insert(path));
                    }
                }
                for common in commons {
                    let path = level_dir(prefix, &dir, &common).expect("one level down");
                    level_dirs.insert(path.clone());
                    pending.push(path);
                }
            }
            proptest::prop_assert_eq!(&level_disks, &whole_disks);
            // Every folder marker is a directory of the level listing; the
            // level listing's other directories hold disks or markers.
            proptest::prop_assert!(whole_dirs.is_subset(&level_dirs));
            for dir in &level_dirs {
                proptest::prop_assert!(
                    whole_dirs.contains(dir)
                        || whole_disks.iter().chain(&whole_dirs).any(|p| p.len() > dir.len() && p.starts_with(dir))
                );
            }
        }
    }

    #[test]
    fn options_for_other_sources_are_refused_not_ignored() {
        let given = |text: &str| MountOptions::parse([text]).unwrap();
        assert!(check_options_apply("s3", &given("endpoint=http://x,region=eu-west-1")).is_ok());
        assert!(check_options_apply("ebs", &given("endpoint=http://x,profile=backup")).is_ok());
        assert!(check_options_apply("az", &given("credentials=/k,insecure")).is_ok());
        assert!(check_options_apply("demo", &given("rate=10M,uid=0")).is_ok());
        for (kind, options, expected) in [
            (
                "gs",
                "credentials=/k",
                "credentials= is not supported for gs:// sources: it is for az://, vsphere://",
            ),
            (
                "http",
                "region=x",
                "region= is not supported for http(s):// sources: it is for s3://",
            ),
            (
                "dir",
                "anonymous",
                "anonymous is not supported for dir:// sources",
            ),
            ("s3", "user=root", "user= is not supported for s3://"),
            (
                "ebs",
                "region=eu-west-1",
                "region= is not supported for ebs:// sources: ebs://REGION names the region",
            ),
            (
                "ebs",
                "insecure",
                "insecure is not supported for ebs:// sources: the AWS SDK",
            ),
            (
                "gs",
                "cafile=/ca.pem",
                "not supported for gs:// sources: google-cloud-storage",
            ),
            (
                "s3",
                "insecure",
                "insecure is not supported for s3:// sources: the AWS SDK",
            ),
        ] {
            let err = check_options_apply(kind, &given(options))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{kind} {options}: {err}");
        }
    }

    #[test]
    fn credentials_in_the_source_are_refused() {
        for (kind, source) in [
            ("http", "http://user:secret@host/manifest.json"),
            ("http", "https://user@host/manifest.json"),
            ("s3", "s3://key:secret@bucket/prefix"),
            ("vsphere", "vsphere://root:pw@esx/DC0"),
            ("gs", "gs://a@bucket"),
        ] {
            let rest = source.split_once("://").unwrap().1;
            assert!(
                check_no_credentials(kind, source, rest).is_err(),
                "{source}"
            );
        }
        for (kind, source) in [
            ("vsphere", "vsphere://admin@vc.example/DC0"),
            ("http", "https://host/m.json?sig=a@b"),
            ("az", "az://account/container/x@y"),
        ] {
            let rest = source.split_once("://").unwrap().1;
            assert!(check_no_credentials(kind, source, rest).is_ok(), "{source}");
        }
    }

    #[test]
    fn keys_land_as_objects_and_folders_under_the_prefix() {
        assert_eq!(
            place_key("exports/", "exports/vm/disk 0.vmdk"),
            KeyPlace::Object(vec!["vm".into(), "disk 0.vmdk".into()])
        );
        assert_eq!(
            place_key("exports/", "exports/empty/"),
            KeyPlace::Folder(vec!["empty".into()])
        );
        assert_eq!(place_key("exports/", "exports/"), KeyPlace::Outside);
        assert_eq!(place_key("exports/", "elsewhere/x"), KeyPlace::Outside);
        assert_eq!(
            bucket_and_prefix("gs://b/images/2024/", "gs"),
            ("b", "images/2024/".to_string())
        );
        assert_eq!(bucket_and_prefix("s3://b", "s3"), ("b", String::new()));
    }

    #[test]
    fn query_strings_inside_messages_are_hidden() {
        let text =
            "error sending request for url (http://127.0.0.1:1/acct/c?sv=1&sig=SECRET): refused";
        let hidden = redact_queries(text);
        assert!(!hidden.contains("SECRET"), "{hidden}");
        assert_eq!(
            hidden,
            "error sending request for url (http://127.0.0.1:1/acct/c?<redacted>): refused"
        );
        assert_eq!(redact_queries("why? because"), "why? because");
    }

    #[test]
    fn secret_files_readable_by_others_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sas");
        std::fs::write(&path, "sv=1&sig=x\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_secret_file(&path).unwrap_err().to_string();
        assert!(err.contains("readable by group or others"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_secret_file(&path).unwrap(), "sv=1&sig=x\n");
    }
}
