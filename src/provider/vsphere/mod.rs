//! `vsphere://[user@]host[:port]/Datacenter`: a vCenter or ESXi host.
//!
//! The inventory comes from the vSphere API (SOAP, through `vim_rs`): every
//! VM under the datacenter's VM folder, its virtual disks and their backing
//! files. Each disk shows as its descriptor `NAME.vmdk` and the extents the
//! descriptor names (`NAME-flat.vmdk`), so a copied VM directory is a valid
//! VMDK pair. Bytes come from the datastore endpoint
//! `/folder/<path>?dcPath=<dc>&dsName=<ds>` with Range GETs, authenticated by
//! the API session's cookie (one cookie jar serves both clients).
//!
//! The session is kept alive while the mount lives and logged in again when
//! the server lets it go (HTTP 401 on a GET, NotAuthenticated on a call);
//! the request that noticed is then repeated, so no read fails for it.
//!
//! With `snapshot=on` the first open of a VM's disk takes a VM snapshot, so
//! the files listed at mount stop changing. It is kept while any file of the
//! VM is open and for `snapshot_linger` after the last close, so a `cp -r`
//! of the VM directory (one file at a time) reads every file from the same
//! snapshot; then it is removed, and at the end of the mount at once.
//!
//! Each snapshot's description names the host, boot and process that took
//! it. At start the provider removes the snapshots that a vmexportfs on this
//! host left behind when it died (killed, OOM, power loss), and leaves alone
//! those of live processes and of other hosts.

mod api;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{HeaderMap, LAST_MODIFIED, RANGE};
use url::Url;

use self::api::{Api, BackingKind, BackingLink, DiskBacking, Login, SNAPSHOT_NAME};
use super::export_snapshot::{remove_leftovers, Creator, Found, Holds, Snapshotter};
use super::http::{check_status, content_length, ranged_get, transport_error, HttpProvider};
use super::{read_secret_file, DiskEntry, Inventory, Pinned, Provider, ProviderError, Version};
use crate::options::MountOptions;

/// Where the password comes from when no credentials file is given.
pub const PASSWORD_ENV: &str = "VSPHERE_PASSWORD";
/// Seconds between session keep-alive calls; vCenter drops a session after
/// about 30 idle minutes, so the default stays well inside that.
const KEEPALIVE_ENV: &str = "VMEXPORTFS_VSPHERE_KEEPALIVE";
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(10 * 60);
/// A descriptor is a few hundred bytes; a file that starts with more text
/// than this is not one.
const DESCRIPTOR_MAX: usize = 64 << 10;
const HEADS_AT_ONCE: usize = 16;
/// API calls include task waits that long-poll for 10 s.
const API_READ_TIMEOUT: Duration = Duration::from_secs(120);

/// What the provider remembers of a VM between listing and open.
struct VmMeta {
    name: String,
    powered_on: bool,
    tools_running: bool,
    /// A warning about reading a running VM without a snapshot was logged.
    warned: AtomicBool,
}

/// One logged-in API session, renewed when the server drops it.
struct Session {
    api: Api,
    host: String,
    /// Bumped by every renewal; a request that failed under generation N
    /// renews only if nobody has since.
    generation: AtomicU64,
    renewing: tokio::sync::Mutex<()>,
}

impl Session {
    /// Logs in again unless someone already did since `seen`.
    async fn renew(&self, seen: u64) -> Result<(), ProviderError> {
        let _one_at_a_time = self.renewing.lock().await;
        if self.generation.load(Ordering::Acquire) != seen {
            return Ok(());
        }
        match self.api.login().await {
            Ok(()) => {
                tracing::info!(host = %self.host, "vSphere session expired: logged in again")
            }
            // Logging in over a live session fails (a 401 can have another
            // cause); only a dead session with a failed login is an error.
            Err(err) => {
                if !matches!(self.api.is_alive().await, Ok(true)) {
                    return Err(err);
                }
            }
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Runs `call`, and once more after renewing the session if the server
    /// says it is no longer signed in.
    async fn with_renewal<T, F, Fut>(&self, call: F) -> Result<T, ProviderError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, ProviderError>>,
    {
        let seen = self.generation.load(Ordering::Acquire);
        match call().await {
            Err(ProviderError::Unauthorized(what)) => {
                tracing::debug!(host = %self.host, "{what}: renewing the session");
                self.renew(seen).await?;
                call().await
            }
            other => other,
        }
    }
}

pub struct VsphereProvider {
    session: Arc<Session>,
    datacenter: String,
    base: Url,
    /// Datastore GETs: the mount's stall timeout applies.
    data: reqwest::Client,
    /// `snapshot=on`: each VM's export snapshot.
    holds: Option<Holds<VmSnapshots>>,
    vms: Arc<Mutex<HashMap<String, Arc<VmMeta>>>>,
    keepalive: tokio::task::JoinHandle<()>,
}

/// `vsphere://[user@]host[:port]/Datacenter`, split.
#[derive(Debug, PartialEq, Eq)]
struct Source {
    user: Option<String>,
    host: String,
    datacenter: String,
}

fn parse_source(source: &str) -> Result<Source, ProviderError> {
    let bad = |why: &str| {
        ProviderError::Config(format!(
            "'{source}' {why}: expected vsphere://[user@]host[:port]/Datacenter"
        ))
    };
    let url = Url::parse(source).map_err(|err| bad(&format!("is not a valid URL ({err})")))?;
    if url.password().is_some() {
        return Err(ProviderError::Config(format!(
            "vsphere://: a password in the source would show in /proc/mounts and ps; put it in credentials=FILE (mode 600) or {PASSWORD_ENV}"
        )));
    }
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| bad("has no host"))?;
    let host = match url.port() {
        Some(port) => format!("{host}:{port}"),
        None => host.to_string(),
    };
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("has a query or fragment"));
    }
    let decode = |text: &str| {
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned()
    };
    let datacenter = decode(url.path().trim_matches('/'));
    if datacenter.is_empty() {
        return Err(bad("names no datacenter"));
    }
    if datacenter.contains('/') {
        return Err(bad("has more than a datacenter name in its path"));
    }
    let user = Some(decode(url.username())).filter(|u| !u.is_empty());
    Ok(Source {
        user,
        host,
        datacenter,
    })
}

impl VsphereProvider {
    pub async fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let parsed = parse_source(source)?;
        let user = match (&parsed.user, &options.user) {
            (Some(a), Some(b)) if a != b => {
                return Err(ProviderError::Config(format!(
                    "vsphere://: the source names user '{a}' and user= says '{b}'"
                )))
            }
            (Some(user), _) | (None, Some(user)) => user.clone(),
            (None, None) => {
                return Err(ProviderError::Config(
                    "vsphere://: no user: write vsphere://USER@host/Datacenter or give user="
                        .into(),
                ))
            }
        };
        let password = match &options.credentials {
            Some(path) => read_secret_file(path)?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            None => std::env::var(PASSWORD_ENV).map_err(|_| {
                ProviderError::Config(format!(
                    "vsphere://: no password for '{user}': give credentials=FILE (mode 600, the password on its first line) or set {PASSWORD_ENV}"
                ))
            })?,
        };
        if password.is_empty() {
            return Err(ProviderError::Config(format!(
                "vsphere://: the password for '{user}' is empty"
            )));
        }

        let jar = Arc::new(reqwest::cookie::Jar::default());
        let api = super::http::client_builder(options)?
            .read_timeout(API_READ_TIMEOUT.max(options.stall_timeout))
            .cookie_provider(jar.clone())
            .build()
            .map_err(|err| ProviderError::Config(format!("HTTP client: {err}")))?;
        let data = super::http::client_builder(options)?
            .cookie_provider(jar)
            .build()
            .map_err(|err| ProviderError::Config(format!("HTTP client: {err}")))?;

        let host = parsed.host;
        let api = Api::connect(Login {
            host: host.clone(),
            user,
            password,
            datacenter: parsed.datacenter.clone(),
            http: api,
        })
        .await?;
        let session = Arc::new(Session {
            api,
            host: host.clone(),
            generation: AtomicU64::new(0),
            renewing: tokio::sync::Mutex::new(()),
        });
        let base = Url::parse(&format!("https://{host}/folder/"))
            .map_err(|err| ProviderError::Config(format!("vsphere://{host}: {err}")))?;
        let keepalive = tokio::spawn(keep_alive(Arc::downgrade(&session), keepalive_period()));
        let vms = Arc::new(Mutex::new(HashMap::new()));
        let holds = options.snapshot.then(|| {
            let taker = VmSnapshots {
                session: session.clone(),
                vms: vms.clone(),
            };
            Holds::new(Arc::new(taker), options.snapshot_linger)
        });
        let provider = VsphereProvider {
            session,
            datacenter: parsed.datacenter,
            base,
            data,
            holds,
            vms,
            keepalive,
        };
        // Before the first listing: removing a snapshot consolidates its
        // delta, which changes the VM's backing files.
        provider.remove_leftover_snapshots().await;
        Ok(provider)
    }

    /// Removes the snapshots a dead vmexportfs on this host left behind.
    async fn remove_leftover_snapshots(&self) {
        let snapshots = match self
            .session
            .with_renewal(|| self.session.api.snapshots())
            .await
        {
            Ok(snapshots) => snapshots,
            Err(err) => {
                tracing::warn!(host = %self.host(), "looking for snapshots left by an earlier vmexportfs: {err}");
                return;
            }
        };
        let found = snapshots
            .into_iter()
            .filter(|snap| snap.name == SNAPSHOT_NAME)
            .map(|snap| Found {
                vm: snap.vm_name,
                snapshot: snap.id,
                record: snap.description,
            })
            .collect();
        let what = format!("snapshot '{SNAPSHOT_NAME}'");
        remove_leftovers(found, &what, |snapshot| async move {
            remove_snapshot(&self.session, &snapshot).await
        })
        .await;
    }

    fn host(&self) -> &str {
        &self.session.host
    }

    /// The datastore URL of `[datastore] dir/file.vmdk`.
    fn file_url(&self, datastore: &str, path: &str) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(path.split('/'));
        }
        url.query_pairs_mut()
            .append_pair("dcPath", &self.datacenter)
            .append_pair("dsName", datastore);
        url
    }

    async fn head(&self, url: &str) -> Result<HeaderMap, ProviderError> {
        self.session
            .with_renewal(|| async {
                let response = self
                    .data
                    .head(url)
                    .send()
                    .await
                    .map_err(|err| transport_error(url, err))?;
                check_status(url, response.status())?;
                Ok(response.headers().clone())
            })
            .await
    }

    /// The start of a descriptor file, or `None` when the file is binary
    /// (a sparse disk that embeds its descriptor).
    async fn descriptor_text(&self, url: &str) -> Result<Option<String>, ProviderError> {
        let body = self
            .session
            .with_renewal(|| async {
                let response = self
                    .data
                    .get(url)
                    .header(RANGE, format!("bytes=0-{}", DESCRIPTOR_MAX - 1))
                    .send()
                    .await
                    .map_err(|err| transport_error(url, err))?;
                if response.status() == reqwest::StatusCode::RANGE_NOT_SATISFIABLE {
                    // An empty file: nothing at byte 0.
                    return Ok(Bytes::new());
                }
                check_status(url, response.status())?;
                response
                    .bytes()
                    .await
                    .map_err(|err| transport_error(url, err))
            })
            .await?;
        Ok(String::from_utf8(body.to_vec()).ok().filter(|text| {
            // Sparse extents start with a binary magic ("KDMV", "COWD").
            !text.starts_with("KDMV") && !text.starts_with("COWD")
        }))
    }

    /// The files that make up one disk: each link of its backing chain's
    /// descriptor and the extents that descriptor names.
    async fn disk_files(&self, vm: &str, chain: &[BackingLink]) -> Vec<(String, String)> {
        let mut files = Vec::new();
        for link in chain {
            let Some((datastore, path)) = split_datastore_path(&link.file_name) else {
                tracing::warn!(vm = %vm, file = %link.file_name, "not a datastore path; disk skipped");
                continue;
            };
            let dir = path.rsplit_once('/').map_or("", |(dir, _)| dir);
            files.push((datastore.to_string(), path.to_string()));
            if link.kind == BackingKind::SparseVer2 {
                // Hosted sparse disks carry their descriptor inside.
                continue;
            }
            let url = self.file_url(datastore, path);
            match self.descriptor_text(url.as_str()).await {
                Ok(Some(text)) => {
                    let extents = descriptor_extents(&text);
                    if extents.is_empty() {
                        tracing::warn!(vm = %vm, file = %link.file_name, "the descriptor names no extent files");
                    }
                    for extent in extents {
                        let joined = if dir.is_empty() {
                            extent
                        } else {
                            format!("{dir}/{extent}")
                        };
                        files.push((datastore.to_string(), joined));
                    }
                }
                Ok(None) => {}
                Err(err) => {
                    tracing::warn!(vm = %vm, file = %link.file_name, "reading the descriptor: {err}")
                }
            }
        }
        files
    }

    async fn describe(
        &self,
        vm_dir: Vec<String>,
        vm_id: &str,
        datastore: &str,
        path: &str,
    ) -> Result<DiskEntry, ProviderError> {
        let url = self.file_url(datastore, path);
        let headers = self.head(url.as_str()).await.map_err(|err| match err {
            ProviderError::NotFound(_) => {
                ProviderError::NotFound(format!("[{datastore}] {path} on {}", self.host()))
            }
            other => other,
        })?;
        let size = content_length(&headers).unwrap_or(0);
        let mtime = headers
            .get(LAST_MODIFIED)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        let name = path.rsplit('/').next().unwrap_or(path).to_string();
        let mut entry_path = vm_dir;
        entry_path.push(name);
        Ok(DiskEntry {
            path: entry_path,
            size,
            mtime,
            version: HttpProvider::version_from(&headers, size),
            locator: format!("{vm_id} {url}"),
            allocated: None,
        })
    }

    fn name_of(&self, vm_id: &str) -> String {
        self.meta(vm_id)
            .map_or_else(|| vm_id.to_string(), |meta| meta.name.clone())
    }

    fn meta(&self, vm_id: &str) -> Option<Arc<VmMeta>> {
        self.vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(vm_id)
            .cloned()
    }
}

/// Takes and removes the VM snapshots of `snapshot=on`.
struct VmSnapshots {
    session: Arc<Session>,
    vms: Arc<Mutex<HashMap<String, Arc<VmMeta>>>>,
}

#[async_trait]
impl Snapshotter for VmSnapshots {
    type Snapshot = String;

    async fn take(&self, vm_id: &str, name: &str) -> Result<String, ProviderError> {
        let description = Creator::this_process().description();
        let quiesce = self
            .vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(vm_id)
            .is_some_and(|meta| meta.powered_on && meta.tools_running);
        let description = &description;
        let attempt = |quiesce: bool| {
            self.session.with_renewal(move || {
                self.session
                    .api
                    .create_snapshot(vm_id, description.clone(), quiesce)
            })
        };
        match attempt(quiesce).await {
            Err(err) if quiesce => {
                tracing::warn!(vm = %name, "quiesced snapshot failed ({err}); taking a crash-consistent one");
                attempt(false).await
            }
            other => other,
        }
    }

    async fn remove(&self, _vm: &str, snapshot: &String) -> Result<(), ProviderError> {
        remove_snapshot(&self.session, snapshot).await
    }

    fn by_hand(&self, _snapshot: &String) -> String {
        format!("remove snapshot '{SNAPSHOT_NAME}' by hand")
    }
}

async fn remove_snapshot(session: &Session, snapshot: &str) -> Result<(), ProviderError> {
    session
        .with_renewal(|| session.api.remove_snapshot(snapshot))
        .await
}

impl Drop for VsphereProvider {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// Calls the API now and then so the server does not end an idle session
/// (vCenter does after about 30 minutes), and logs in again if it did.
async fn keep_alive(session: Weak<Session>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        let Some(session) = session.upgrade() else {
            return;
        };
        let seen = session.generation.load(Ordering::Acquire);
        match session.api.is_alive().await {
            Ok(true) => tracing::debug!(host = %session.host, "vSphere session kept alive"),
            // Not signed in, or an answer too broken to tell: log in again.
            answer => {
                if let Err(err) = answer {
                    tracing::debug!(host = %session.host, "vSphere keep-alive: {err}");
                }
                if let Err(err) = session.renew(seen).await {
                    tracing::warn!(host = %session.host, "renewing the vSphere session: {err}");
                }
            }
        }
    }
}

fn keepalive_period() -> Duration {
    std::env::var(KEEPALIVE_ENV)
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.1)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs_f64)
}

/// `[datastore] dir/file.vmdk` → (`datastore`, `dir/file.vmdk`).
fn split_datastore_path(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix('[')?;
    // The datastore name may itself hold brackets; the path starts after
    // the first "] ".
    let (datastore, path) = match rest.split_once("] ") {
        Some(split) => split,
        None => rest.split_once(']')?,
    };
    let path = path.trim_start();
    (!datastore.is_empty() && !path.is_empty()).then_some((datastore, path))
}

/// The files a text descriptor's extent lines name, such as
/// `RW 2097152 VMFS "web-flat.vmdk"`; ZERO extents have none.
fn descriptor_extents(text: &str) -> Vec<String> {
    let mut extents = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let mut words = line.split_whitespace();
        let (Some(access), Some(_sectors), Some(kind)) = (words.next(), words.next(), words.next())
        else {
            continue;
        };
        if !matches!(access, "RW" | "RDONLY" | "NOACCESS") || kind == "ZERO" {
            continue;
        }
        let Some(start) = line.find('"') else {
            continue;
        };
        let Some(len) = line[start + 1..].find('"') else {
            continue;
        };
        let name = &line[start + 1..start + 1 + len];
        // Extents sit beside their descriptor; anything else is not ours
        // to follow.
        if !name.is_empty() && !name.contains('/') && !extents.iter().any(|e| e == name) {
            extents.push(name.to_string());
        }
    }
    extents
}

/// Directory of each VM below the mount: its name, or where another VM of
/// the datacenter has the same name, its inventory folder path too.
fn vm_directories(vms: &[(String, Vec<String>)]) -> Vec<Vec<String>> {
    let mut count: HashMap<&str, usize> = HashMap::new();
    for (name, _) in vms {
        *count.entry(name).or_default() += 1;
    }
    let mut taken: HashMap<Vec<String>, usize> = HashMap::new();
    vms.iter()
        .map(|(name, folders)| {
            let mut dir = if count[name.as_str()] > 1 {
                folders.clone()
            } else {
                Vec::new()
            };
            dir.push(name.clone());
            let seen = taken.entry(dir.clone()).or_default();
            *seen += 1;
            if *seen > 1 {
                // Same name in the same folder cannot happen in vCenter,
                // but two hosts' inventories can meet on one ESXi.
                if let Some(last) = dir.last_mut() {
                    *last = format!("{name} ({})", seen);
                }
            }
            dir
        })
        .collect()
}

#[async_trait]
impl Provider for VsphereProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let (folders, vms) = self
            .session
            .with_renewal(|| self.session.api.inventory())
            .await?;
        let folder_of: HashMap<&str, &api::FolderInfo> =
            folders.iter().map(|f| (f.id.as_str(), f)).collect();
        // Folder names from the datacenter's VM folder down to the VM; the
        // VM folder itself is not in the listing, so the walk stops there.
        let folder_path = |parent: Option<&str>| -> Vec<String> {
            let mut path = Vec::new();
            let mut next = parent;
            while let Some(folder) = next.and_then(|id| folder_of.get(id)) {
                path.push(folder.name.clone());
                next = folder.parent.as_deref();
            }
            path.reverse();
            path
        };
        let named: Vec<(String, Vec<String>)> = vms
            .iter()
            .map(|vm| (vm.name.clone(), folder_path(vm.parent.as_deref())))
            .collect();
        let dirs = vm_directories(&named);

        let mut inventory = Inventory::default();
        let mut wanted = Vec::new();
        let mut metas = HashMap::new();
        for (vm, dir) in vms.iter().zip(dirs) {
            metas.insert(
                vm.id.clone(),
                Arc::new(VmMeta {
                    name: dir.join("/"),
                    powered_on: vm.powered_on,
                    tools_running: vm.tools_running,
                    warned: AtomicBool::new(false),
                }),
            );
            let mut files = Vec::new();
            for disk in &vm.disks {
                match disk {
                    DiskBacking::Chain(chain) => {
                        files.extend(self.disk_files(&vm.name, chain).await)
                    }
                    DiskBacking::Skipped { label, why } => {
                        tracing::warn!(vm = %vm.name, disk = %label, "not exported: {why}");
                    }
                }
            }
            files.sort();
            files.dedup();
            if files.is_empty() {
                inventory.empty_dirs.push(dir.clone());
            }
            for (datastore, path) in files {
                wanted.push((dir.clone(), vm.id.clone(), datastore, path));
            }
        }
        *self
            .vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = metas;
        inventory.disks = futures::stream::iter(wanted)
            .map(|(dir, vm_id, datastore, path)| async move {
                self.describe(dir, &vm_id, &datastore, &path).await
            })
            .buffered(HEADS_AT_ONCE)
            .try_collect()
            .await?;
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let url = url_of(disk);
        let headers = self.head(url).await?;
        let size = content_length(&headers).unwrap_or(disk.size);
        let file = HttpProvider::version_from(&headers, size);
        // Under a held snapshot the file is a frozen parent: its bytes stay
        // as they are until the snapshot is removed, whatever the datastore
        // says of its validators.
        let held = match &self.holds {
            Some(holds) => holds.held(vm_of(disk)).await,
            None => None,
        };
        let version = match held {
            Some(id) => Version::Snapshot {
                id,
                file: Box::new(file),
            },
            None => file,
        };
        Ok(Pinned::new(size, version))
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        let version = &pinned.version;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = url_of(disk);
        self.session
            .with_renewal(|| ranged_get(&self.data, url, pinned.size, version, offset, len))
            .await
    }

    async fn begin_read(&self, disk: &DiskEntry) -> Result<(), ProviderError> {
        let vm_id = vm_of(disk);
        let Some(meta) = self.meta(vm_id) else {
            return Ok(());
        };
        match &self.holds {
            Some(holds) => holds.open(vm_id, &meta.name).await,
            None => {
                if meta.powered_on && !meta.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        vm = %meta.name,
                        "the VM is powered on: its disks may change while they are read; snapshot=on reads a consistent copy"
                    );
                }
                Ok(())
            }
        }
    }

    async fn end_read(&self, disk: &DiskEntry) {
        let Some(holds) = &self.holds else {
            return;
        };
        let vm_id = vm_of(disk);
        holds.close(vm_id, &self.name_of(vm_id)).await;
    }

    async fn close(&self) {
        if let Some(holds) = &self.holds {
            holds.release_all(|vm_id| self.name_of(vm_id)).await;
        }
        self.keepalive.abort();
        self.session.api.close().await;
    }
}

fn vm_of(disk: &DiskEntry) -> &str {
    disk.locator.split_once(' ').map_or("", |(vm, _)| vm)
}

fn url_of(disk: &DiskEntry) -> &str {
    disk.locator
        .split_once(' ')
        .map_or(&disk.locator, |(_, url)| url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(
            parse_source("vsphere://administrator%40vsphere.local@vc.example.com:8443/DC%201")
                .unwrap(),
            Source {
                user: Some("administrator@vsphere.local".into()),
                host: "vc.example.com:8443".into(),
                datacenter: "DC 1".into(),
            }
        );
        assert_eq!(
            parse_source("vsphere://esx01/ha-datacenter/").unwrap().user,
            None
        );
        for (bad, expected) in [
            (
                "vsphere://root:hunter2@esx01/ha-datacenter",
                "password in the source",
            ),
            ("vsphere://esx01", "names no datacenter"),
            ("vsphere://esx01/", "names no datacenter"),
            ("vsphere://esx01/a/b", "more than a datacenter"),
            ("vsphere://esx01/dc?x=1", "query"),
        ] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains(expected), "{bad}: {err}");
            assert!(!err.contains("hunter2"), "{err}");
        }
    }

    #[test]
    fn datastore_paths() {
        assert_eq!(
            split_datastore_path("[LocalDS_0] DC0_H0_VM0/disk1.vmdk"),
            Some(("LocalDS_0", "DC0_H0_VM0/disk1.vmdk"))
        );
        assert_eq!(
            split_datastore_path("[ds [1]] a b/c.vmdk"),
            Some(("ds [1]", "a b/c.vmdk"))
        );
        assert_eq!(split_datastore_path("/vmfs/volumes/x/y.vmdk"), None);
        assert_eq!(split_datastore_path("[ds]"), None);
    }

    #[test]
    fn extents_of_descriptors() {
        let flat = "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n\
                    createType=\"vmfs\"\n\n# Extent description\nRW 16384 VMFS \"web-01-flat.vmdk\"\n\n\
                    ddb.adapterType = \"lsilogic\"\n";
        assert_eq!(descriptor_extents(flat), vec!["web-01-flat.vmdk"]);
        let split =
            "RW 4192256 SPARSE \"d-s001.vmdk\"\nRW 4192256 SPARSE \"d-s002.vmdk\"\nRW 1 ZERO\n\
                     RDONLY 10 FLAT \"../elsewhere/x.vmdk\" 0\n";
        assert_eq!(
            descriptor_extents(split),
            vec!["d-s001.vmdk", "d-s002.vmdk"]
        );
        let delta = "parentFileNameHint=\"web-01.vmdk\"\nRW 16384 SESPARSE \"web-01-000001-sesparse.vmdk\"\n";
        assert_eq!(
            descriptor_extents(delta),
            vec!["web-01-000001-sesparse.vmdk"]
        );
        assert!(descriptor_extents("").is_empty());
        assert!(descriptor_extents("ddb.uuid = \"60 00\"\nRW\n").is_empty());
    }

    #[test]
    fn colliding_vm_names_get_their_folders() {
        let vms = vec![
            ("web".to_string(), vec![]),
            ("db".to_string(), vec!["prod".to_string()]),
            (
                "web".to_string(),
                vec!["team-b".to_string(), "x".to_string()],
            ),
            (
                "web".to_string(),
                vec!["team-b".to_string(), "x".to_string()],
            ),
        ];
        assert_eq!(
            vm_directories(&vms),
            vec![
                vec!["web".to_string()],
                vec!["db".to_string()],
                vec!["team-b".to_string(), "x".to_string(), "web".to_string()],
                vec!["team-b".to_string(), "x".to_string(), "web (2)".to_string()],
            ]
        );
    }

    #[test]
    fn locators() {
        let disk = DiskEntry {
            path: vec!["vm".into(), "d.vmdk".into()],
            size: 1,
            mtime: SystemTime::UNIX_EPOCH,
            version: Version::Size(1),
            locator: "vm-42 https://vc/folder/a%20b/d.vmdk?dcPath=DC&dsName=ds".into(),
            allocated: None,
        };
        assert_eq!(vm_of(&disk), "vm-42");
        assert_eq!(
            url_of(&disk),
            "https://vc/folder/a%20b/d.vmdk?dcPath=DC&dsName=ds"
        );
    }
}
