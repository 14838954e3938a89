//! `ebs://REGION[/i-…|/snap-…]`: EC2 instances and their disks, read from
//! EBS snapshots through the EBS direct APIs, with no export task.
//!
//! The inventory comes from EC2: one directory per instance (its Name tag
//! and id) holding one file per attached volume, `DEVICE-vol-….img`, which
//! reads that volume's most recent completed snapshot; and `snapshots/`,
//! one file per completed snapshot the account owns. A file's version is
//! its snapshot id: a snapshot never changes, so no precondition is needed.
//!
//! At open ListSnapshotBlocks says which 512 KiB blocks the snapshot holds;
//! the others are holes (zeros, never fetched). The block tokens a read
//! needs are listed again per window of 512 MiB when first needed, so an
//! open file holds its data map and a few windows of tokens, not one token
//! per block of the volume. Every block is checked against the SHA-256
//! the answer carries.
//!
//! With `snapshot=on` the first open of an instance's file takes one
//! crash-consistent CreateSnapshots of all its volumes, waits for it to
//! complete, and reads every file of the instance from it until the last
//! close plus `snapshot_linger`; then the snapshots are deleted. They carry
//! the tag [`EXPORT_TAG`] naming the process that took them, so the next
//! mount deletes those a dead daemon left.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::future::Future;
use std::ops::Range;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_sdk_ebs::operation::get_snapshot_block::GetSnapshotBlockOutput;
use aws_sdk_ec2::error::ProvideErrorMetadata;
use aws_sdk_ec2::types::Filter;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::context::BeforeDeserializationInterceptorContextMut;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::orchestrator::HttpResponse;
use aws_smithy_runtime_api::client::result::SdkError;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::config_bag::ConfigBag;
use base64::Engine;
use bytes::{BufMut, Bytes};
use futures::StreamExt;
use sha2::{Digest, Sha256};

use super::buffer::FetchBuffer;
use super::export_snapshot::{remove_leftovers, Creator, Found, Holds, Snapshotter};
use super::{
    causes, is_transient_status, DiskEntry, Inventory, Pinned, Provider, ProviderError, Version,
};
use crate::options::MountOptions;

/// The EBS direct APIs' block size. ListSnapshotBlocks reports it too, but
/// moto reports 512 there while serving 512 KiB blocks; the blocks'
/// own lengths are checked instead.
pub const BLOCK: u64 = 512 << 10;
/// GetSnapshotBlock calls in flight for one read, as coldsnap's workers.
const BLOCKS_AT_ONCE: usize = 16;
/// Blocks whose tokens one ListSnapshotBlocks call brings for reading:
/// 512 MiB of volume per call.
const TOKEN_WINDOW: u32 = 1024;
/// Token windows an open file keeps (4 × 1024 tokens of ~100 bytes).
const TOKEN_WINDOWS_KEPT: usize = 4;
/// A token listed this close to its expiry is listed again first.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Fetches of one block before a checksum mismatch fails the read.
const CHECKSUM_ATTEMPTS: u32 = 3;
/// ListSnapshotBlocks page size at open (the API's maximum).
const LIST_PAGE: i32 = 10_000;
/// A ListSnapshotBlocks answer of 10,000 blocks is about 1 MiB.
const LIST_ANSWER_MAX: usize = 16 << 20;
const SNAPSHOTS_DIR: &str = "snapshots";
/// The tag on the snapshots `snapshot=on` takes: its value records who
/// took them. Such snapshots are the mount's own, never listed as disks.
pub const EXPORT_TAG: &str = "vmexportfs:export";
/// The tag naming the instance an export snapshot was taken of.
const INSTANCE_TAG: &str = "vmexportfs:instance";
/// The first wait between looks at a snapshot in progress; it doubles up
/// to [`POLL_MAX`]. `VMEXPORTFS_EBS_POLL` (seconds) sets it.
const POLL_FIRST: Duration = Duration::from_secs(2);
const POLL_MAX: Duration = Duration::from_secs(15);
const GIB: u64 = 1 << 30;

/// What the source names: the whole region, one instance or one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    All,
    Instance(String),
    Snapshot(String),
}

#[derive(Debug, PartialEq, Eq)]
struct Source {
    region: String,
    scope: Scope,
}

fn parse_source(source: &str) -> Result<Source, ProviderError> {
    let rest = source.strip_prefix("ebs://").unwrap_or(source);
    let rest = rest.trim_end_matches('/');
    let (region, scope) = rest.split_once('/').unwrap_or((rest, ""));
    if !is_region(region) {
        return Err(ProviderError::Config(format!(
            "'{source}' does not name a region: expected ebs://REGION[/INSTANCE-ID|/SNAPSHOT-ID], e.g. ebs://us-east-1"
        )));
    }
    let scope = match scope {
        "" => Scope::All,
        id if is_aws_id(id, "i-") => Scope::Instance(id.to_string()),
        id if is_aws_id(id, "snap-") => Scope::Snapshot(id.to_string()),
        other => {
            return Err(ProviderError::Config(format!(
                "'{source}': '{other}' is neither an instance id (i-…) nor a snapshot id (snap-…)"
            )))
        }
    };
    Ok(Source {
        region: region.to_string(),
        scope,
    })
}

/// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `cn-northwest-1`.
fn is_region(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let lower = |part: &&str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_lowercase());
    parts.len() >= 3
        && parts[0].len() == 2
        && parts[..parts.len() - 1].iter().all(lower)
        && parts[parts.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && !parts[parts.len() - 1].is_empty()
}

/// `i-0123abcd` or `snap-0123456789abcdef0`: 8 or 17 lowercase hex digits.
fn is_aws_id(text: &str, prefix: &str) -> bool {
    text.strip_prefix(prefix).is_some_and(|hex| {
        (8..=17).contains(&hex.len())
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// One instance as EC2 describes it.
#[derive(Debug, Clone)]
struct InstanceInfo {
    id: String,
    name: Option<String>,
    /// (device name, volume id) of each attached EBS volume.
    volumes: Vec<(String, String)>,
}

/// One completed snapshot as EC2 describes it.
#[derive(Debug, Clone)]
struct SnapshotInfo {
    id: String,
    volume: Option<String>,
    size: u64,
    start: SystemTime,
    name: Option<String>,
    /// Bytes the snapshot holds, where EC2 says (real AWS, not moto).
    full_size: Option<u64>,
}

/// An attached volume as EC2 describes it (for `snapshot=on`, which can
/// read volumes that have no snapshot yet).
#[derive(Debug, Clone)]
struct VolumeInfo {
    size: u64,
    created: SystemTime,
}

/// `web-i-0abc` (or `i-0abc` without a Name tag): the id keeps two
/// instances of the same name apart and the path stable across renames of
/// nothing but the tag.
fn instance_dir(instance: &InstanceInfo) -> String {
    match &instance.name {
        Some(name) if !name.is_empty() => format!("{name}-{}", instance.id),
        _ => instance.id.clone(),
    }
}

/// `sdf-vol-0abc.img`: the device and volume, never the snapshot, so the
/// path stays the same from one night's snapshot to the next.
fn volume_file(device: &str, volume: &str) -> String {
    let device = device.strip_prefix("/dev/").unwrap_or(device);
    format!("{device}-{volume}.img")
}

fn snapshot_file(snapshot: &SnapshotInfo) -> String {
    match &snapshot.name {
        Some(name) if !name.is_empty() => format!("{}-{name}.img", snapshot.id),
        _ => format!("{}.img", snapshot.id),
    }
}

/// The provider-private address of a disk: instance, volume and snapshot,
/// `-` where there is none (a file of `snapshots/`).
fn locator(instance: &str, volume: &str, snapshot: &str) -> String {
    format!("{instance} {volume} {snapshot}")
}

fn locator_parts(locator: &str) -> (&str, &str, &str) {
    let mut parts = locator.splitn(3, ' ');
    let mut next = || parts.next().unwrap_or("-");
    (next(), next(), next())
}

fn snapshot_disk(path: Vec<String>, instance: &str, snapshot: &SnapshotInfo) -> DiskEntry {
    DiskEntry {
        path,
        size: snapshot.size,
        mtime: snapshot.start,
        version: Version::Frozen(snapshot.id.clone()),
        locator: locator(
            instance,
            snapshot.volume.as_deref().unwrap_or("-"),
            &snapshot.id,
        ),
        allocated: snapshot.full_size,
    }
}

/// The inventory from EC2's answers: each instance's volumes at their
/// latest completed snapshot, and every snapshot under `snapshots/`
/// (`flat`: one instance's volumes at the root, no `snapshots/`). With
/// `live` (`snapshot=on`: the volumes, which open snapshots), a volume
/// with no snapshot yet is listed too. Returns the volumes left out for
/// want of a snapshot, as (instance, volume).
fn build_inventory(
    instances: &[InstanceInfo],
    snapshots: &[SnapshotInfo],
    live: Option<&HashMap<String, VolumeInfo>>,
    flat: bool,
) -> (Inventory, Vec<(String, String)>) {
    let mut latest: HashMap<&str, &SnapshotInfo> = HashMap::new();
    for snapshot in snapshots {
        let Some(volume) = snapshot.volume.as_deref() else {
            continue;
        };
        let newer = latest
            .get(volume)
            .is_none_or(|known| (snapshot.start, &snapshot.id) > (known.start, &known.id));
        if newer {
            latest.insert(volume, snapshot);
        }
    }
    let mut inventory = Inventory::default();
    let mut unsnapshotted = Vec::new();
    for instance in instances {
        let dir: Vec<String> = if flat {
            Vec::new()
        } else {
            vec![instance_dir(instance)]
        };
        let mut any = false;
        for (device, volume) in &instance.volumes {
            let mut path = dir.clone();
            path.push(volume_file(device, volume));
            match (
                latest.get(volume.as_str()),
                live.and_then(|l| l.get(volume)),
            ) {
                (Some(snapshot), _) => {
                    inventory
                        .disks
                        .push(snapshot_disk(path, &instance.id, snapshot))
                }
                (None, Some(info)) => inventory.disks.push(DiskEntry {
                    path,
                    size: info.size,
                    mtime: info.created,
                    version: Version::Size(info.size),
                    locator: locator(&instance.id, volume, "-"),
                    allocated: None,
                }),
                (None, None) => {
                    unsnapshotted.push((instance.id.clone(), volume.clone()));
                    continue;
                }
            }
            any = true;
        }
        if !any && !flat {
            inventory.empty_dirs.push(dir);
        }
    }
    if !flat {
        for snapshot in snapshots {
            let path = vec![SNAPSHOTS_DIR.to_string(), snapshot_file(snapshot)];
            inventory.disks.push(snapshot_disk(path, "-", snapshot));
        }
        if snapshots.is_empty() {
            inventory.empty_dirs.push(vec![SNAPSHOTS_DIR.to_string()]);
        }
    }
    (inventory, unsnapshotted)
}

pub struct EbsProvider {
    ec2: aws_sdk_ec2::Client,
    ebs: aws_sdk_ebs::Client,
    scope: Scope,
    /// The region, and the endpoint when one is given: named in messages.
    server: String,
    /// Volumes already logged as having no snapshot (each listing would
    /// say it again).
    told_unsnapshotted: Mutex<HashSet<String>>,
    /// `snapshot=on`: each instance's export snapshots.
    holds: Option<Holds<InstanceSnapshots>>,
    /// What `status` shows of snapshots in progress, by instance.
    progress: Arc<Mutex<BTreeMap<String, String>>>,
    /// Instance id → its directory name, for the log.
    names: Mutex<HashMap<String, String>>,
}

impl EbsProvider {
    pub async fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let Source { region, scope } = parse_source(source)?;
        let shared = super::s3::load_aws_config(options, Some(&region)).await?;
        let mut ec2 = aws_sdk_ec2::config::Builder::from(&shared);
        let mut ebs = aws_sdk_ebs::config::Builder::from(&shared);
        if let Some(endpoint) = &options.endpoint {
            ec2 = ec2.endpoint_url(endpoint);
            ebs = ebs.endpoint_url(endpoint);
        }
        let server = match &options.endpoint {
            Some(endpoint) => format!("{region} at {}", super::redact_url(endpoint)),
            None => region,
        };
        let ec2 = aws_sdk_ec2::Client::from_conf(ec2.build());
        let progress = Arc::new(Mutex::new(BTreeMap::new()));
        let holds = options.snapshot.then(|| {
            let taker = InstanceSnapshots {
                ec2: ec2.clone(),
                server: server.clone(),
                progress: progress.clone(),
                poll: poll_first(),
            };
            Holds::new(Arc::new(taker), options.snapshot_linger)
        });
        let provider = EbsProvider {
            ec2,
            ebs: aws_sdk_ebs::Client::from_conf(ebs.build()),
            scope,
            server,
            told_unsnapshotted: Mutex::new(HashSet::new()),
            holds,
            progress,
            names: Mutex::new(HashMap::new()),
        };
        // In the background: deleting them changes nothing the mount lists
        // (export snapshots are never listed), and a slow EC2 must not hold
        // up the mount.
        tokio::spawn(remove_leftover_snapshots(
            provider.ec2.clone(),
            provider.server.clone(),
        ));
        Ok(provider)
    }

    fn name_of(&self, instance: &str) -> String {
        self.names
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(instance)
            .cloned()
            .unwrap_or_else(|| instance.to_string())
    }

    /// Every volume (of the instance the source names), for `snapshot=on`.
    async fn volumes(&self) -> Result<HashMap<String, VolumeInfo>, ProviderError> {
        let mut request = self.ec2.describe_volumes();
        if let Scope::Instance(id) = &self.scope {
            request = request.filters(
                Filter::builder()
                    .name("attachment.instance-id")
                    .values(id)
                    .build(),
            );
        }
        let what = format!("DescribeVolumes in {}", self.server);
        let mut pages = request.into_paginator().send();
        let mut volumes = HashMap::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| map_error(&what, err))?;
            for volume in page.volumes() {
                let Some(id) = volume.volume_id() else {
                    continue;
                };
                let Ok(size) = gib_bytes(volume.size().map(i64::from)) else {
                    tracing::warn!(volume = %id, "left out: EC2 gives it no valid size");
                    continue;
                };
                volumes.insert(
                    id.to_string(),
                    VolumeInfo {
                        size,
                        created: to_system_time(volume.create_time()),
                    },
                );
            }
        }
        Ok(volumes)
    }

    async fn instances(&self) -> Result<Vec<InstanceInfo>, ProviderError> {
        let mut request = self.ec2.describe_instances();
        if let Scope::Instance(id) = &self.scope {
            request = request.instance_ids(id);
        }
        let what = format!("DescribeInstances in {}", self.server);
        let mut pages = request.into_paginator().send();
        let mut instances = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| map_error(&what, err))?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let Some(id) = instance.instance_id() else {
                    continue;
                };
                let terminated = instance.state().and_then(|state| state.name())
                    == Some(&aws_sdk_ec2::types::InstanceStateName::Terminated);
                if terminated {
                    continue;
                }
                let volumes = instance
                    .block_device_mappings()
                    .iter()
                    .filter_map(|mapping| {
                        Some((
                            mapping.device_name()?.to_string(),
                            mapping.ebs()?.volume_id()?.to_string(),
                        ))
                    })
                    .collect();
                instances.push(InstanceInfo {
                    id: id.to_string(),
                    name: name_tag(instance.tags()),
                    volumes,
                });
            }
        }
        Ok(instances)
    }

    /// The account's completed snapshots, or the one named.
    async fn snapshots(&self, only: Option<&str>) -> Result<Vec<SnapshotInfo>, ProviderError> {
        let mut request = self
            .ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(Filter::builder().name("status").values("completed").build());
        if let Some(id) = only {
            request = request.snapshot_ids(id);
        }
        let what = format!("DescribeSnapshots in {}", self.server);
        let mut pages = request.into_paginator().send();
        let mut snapshots = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| map_error(&what, err))?;
            for snapshot in page.snapshots() {
                let completed =
                    snapshot.state() == Some(&aws_sdk_ec2::types::SnapshotState::Completed);
                let (Some(id), true) = (snapshot.snapshot_id(), completed) else {
                    continue;
                };
                // The mount's own export snapshots come and go with opens.
                if tag(snapshot.tags(), EXPORT_TAG).is_some() {
                    continue;
                }
                let Ok(size) = gib_bytes(snapshot.volume_size().map(i64::from)) else {
                    tracing::warn!(snapshot = %id, "left out: EC2 gives it no valid volume size");
                    continue;
                };
                snapshots.push(SnapshotInfo {
                    id: id.to_string(),
                    volume: snapshot.volume_id().map(str::to_string),
                    size,
                    start: to_system_time(snapshot.start_time()),
                    name: name_tag(snapshot.tags()),
                    full_size: snapshot
                        .full_snapshot_size_in_bytes()
                        .and_then(|bytes| u64::try_from(bytes).ok()),
                });
            }
        }
        Ok(snapshots)
    }

    /// Every block the snapshot holds, as merged byte ranges, and its size.
    async fn block_map(&self, snapshot: &str) -> Result<BlockMap, ProviderError> {
        let what = format!("ListSnapshotBlocks {snapshot} in {}", self.server);
        let mut indexes: Vec<u32> = Vec::new();
        let mut size = None;
        let mut next: Option<String> = None;
        let mut seen_tokens = HashSet::new();
        loop {
            let page = self
                .ebs
                .list_snapshot_blocks()
                .snapshot_id(snapshot)
                .max_results(LIST_PAGE)
                .set_next_token(next.clone())
                .customize()
                .interceptor(NumericBlockIndexes)
                .send()
                .await
                .map_err(|err| map_error(&what, err))?;
            let volume = volume_bytes(page.volume_size(), &what)?;
            if *size.get_or_insert(volume) != volume {
                return Err(ProviderError::Protocol(format!(
                    "{what}: the volume size changed between pages"
                )));
            }
            note_block_size(page.block_size(), &what);
            for block in page.blocks() {
                indexes.push(block_index(block.block_index(), volume, &what)?);
            }
            match page.next_token() {
                Some(token) if !token.is_empty() => {
                    // A server repeating a token would page forever.
                    if !seen_tokens.insert(token.to_string()) {
                        return Err(ProviderError::Protocol(format!(
                            "{what}: the same page token came twice"
                        )));
                    }
                    next = Some(token.to_string());
                }
                _ => break,
            }
        }
        let size = size.unwrap_or(0);
        Ok(BlockMap {
            size,
            ranges: block_ranges(indexes),
        })
    }

    /// The tokens of the blocks in `window` (of [`TOKEN_WINDOW`] blocks).
    async fn token_window(
        &self,
        snapshot: &str,
        volume: u64,
        window: u32,
    ) -> Result<TokenWindow, ProviderError> {
        let first = window.saturating_mul(TOKEN_WINDOW);
        let end = first.saturating_add(TOKEN_WINDOW);
        let what = format!(
            "ListSnapshotBlocks {snapshot} from block {first} in {}",
            self.server
        );
        let mut tokens = Vec::new();
        let mut expires: Option<SystemTime> = None;
        let mut next: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            let page = self
                .ebs
                .list_snapshot_blocks()
                .snapshot_id(snapshot)
                .starting_block_index(first as i32)
                .max_results(TOKEN_WINDOW as i32)
                .set_next_token(next.take())
                .customize()
                .interceptor(NumericBlockIndexes)
                .send()
                .await
                .map_err(|err| map_error(&what, err))?;
            if let Some(at) = page
                .expiry_time()
                .and_then(|t| SystemTime::try_from(*t).ok())
            {
                expires = Some(expires.map_or(at, |known| known.min(at)));
            }
            let mut last = first;
            for block in page.blocks() {
                let index = block_index(block.block_index(), volume, &what)?;
                last = last.max(index);
                // moto ignores StartingBlockIndex and MaxResults and sends
                // every block: only this window's are kept.
                if (first..end).contains(&index) {
                    if let Some(token) = block.block_token() {
                        tokens.push((index, Box::<str>::from(token)));
                    }
                }
            }
            match page.next_token() {
                Some(token) if !token.is_empty() && last < end && pages < 16 => {
                    next = Some(token.to_string())
                }
                _ => break,
            }
        }
        tokens.sort_unstable_by_key(|(index, _)| *index);
        tokens.dedup_by_key(|(index, _)| *index);
        Ok(TokenWindow { tokens, expires })
    }

    /// One block's bytes, checked against its checksum; `None` for a hole.
    async fn block(&self, open: &OpenSnapshot, index: u64) -> Result<Option<Bytes>, ProviderError> {
        if !open.holds(index) {
            return Ok(None);
        }
        let index = u32::try_from(index)
            .map_err(|_| ProviderError::Internal(format!("block {index} out of range")))?;
        // Named only when something fails: a block read allocates nothing
        // but its buffer and the token the request carries.
        let what = || {
            format!(
                "GetSnapshotBlock {} block {index} in {}",
                open.id, self.server
            )
        };
        let mut renewed = false;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let token = open.token(self, index).await?.ok_or_else(|| {
                ProviderError::Protocol(format!(
                    "{}: ListSnapshotBlocks listed the block at open but gives no token for it now",
                    what()
                ))
            })?;
            let answer = self
                .ebs
                .get_snapshot_block()
                .snapshot_id(&open.id)
                .block_index(index as i32)
                .block_token(String::from(token))
                .send()
                .await;
            let answer = match answer {
                // A token past its expiry: list the window again, once.
                Err(err) if !renewed && token_rejected(&err) => {
                    renewed = true;
                    open.forget(index).await;
                    continue;
                }
                other => other.map_err(|err| map_error(&what(), err))?,
            };
            let GetSnapshotBlockOutput {
                data_length: declared,
                block_data,
                checksum,
                checksum_algorithm,
                ..
            } = answer;
            let data = receive_block(block_data, &what).await?;
            let algorithm = checksum_algorithm.as_ref().map(|a| a.as_str());
            match check_block(&data, declared, checksum.as_deref(), algorithm) {
                Ok(()) => return Ok(Some(data)),
                Err(BlockFault::Mismatch) if attempt < CHECKSUM_ATTEMPTS => {
                    tracing::warn!(snapshot = %open.id, block = index, attempt, "checksum mismatch: fetching the block again");
                }
                Err(BlockFault::Mismatch) => {
                    tracing::error!(snapshot = %open.id, block = index, "checksum mismatch on every one of {CHECKSUM_ATTEMPTS} fetches: the read fails");
                    return Err(ProviderError::Protocol(format!(
                        "{}: checksum mismatch ({CHECKSUM_ATTEMPTS} fetches, none matched its SHA-256)",
                        what()
                    )));
                }
                Err(fault) => return Err(ProviderError::Protocol(format!("{}: {fault}", what()))),
            }
        }
    }
}

fn name_tag(tags: &[aws_sdk_ec2::types::Tag]) -> Option<String> {
    tag(tags, "Name").map(str::to_string)
}

fn tag<'a>(tags: &'a [aws_sdk_ec2::types::Tag], key: &str) -> Option<&'a str> {
    tags.iter()
        .find(|tag| tag.key() == Some(key))
        .and_then(|tag| tag.value())
}

/// A size in GiB as EC2 gives it, in bytes.
fn gib_bytes(gib: Option<i64>) -> Result<u64, ()> {
    gib.and_then(|gib| u64::try_from(gib).ok())
        .and_then(|gib| gib.checked_mul(GIB))
        .filter(|&bytes| bytes > 0 && i64::try_from(bytes).is_ok())
        .ok_or(())
}

fn to_system_time(time: Option<&aws_sdk_ec2::primitives::DateTime>) -> SystemTime {
    time.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// ListSnapshotBlocks' VolumeSize (GiB) in bytes.
fn volume_bytes(gib: Option<i64>, what: &str) -> Result<u64, ProviderError> {
    gib_bytes(gib)
        .map_err(|()| ProviderError::Protocol(format!("{what}: no valid VolumeSize ({gib:?} GiB)")))
}

fn note_block_size(reported: Option<i32>, what: &str) {
    if reported.is_some_and(|size| size as u64 != BLOCK) {
        // moto says 512; AWS says 524288. The blocks' lengths are checked.
        tracing::debug!(
            "{what}: BlockSize {reported:?} reported; blocks are read as {BLOCK} bytes"
        );
    }
}

/// A listed block index, inside the volume.
fn block_index(index: Option<i32>, volume: u64, what: &str) -> Result<u32, ProviderError> {
    index
        .and_then(|index| u32::try_from(index).ok())
        .filter(|&index| (index as u64 + 1) * BLOCK <= volume)
        .ok_or_else(|| {
            ProviderError::Protocol(format!(
                "{what}: block index {index:?} is outside the {volume}-byte volume"
            ))
        })
}

/// Sorted, merged byte ranges of the listed blocks.
fn block_ranges(mut indexes: Vec<u32>) -> Vec<Range<u64>> {
    indexes.sort_unstable();
    indexes.dedup();
    let mut ranges: Vec<Range<u64>> = Vec::new();
    for index in indexes {
        let start = index as u64 * BLOCK;
        match ranges.last_mut() {
            Some(last) if last.end == start => last.end = start + BLOCK,
            _ => ranges.push(start..start + BLOCK),
        }
    }
    ranges
}

/// Reads a block's body, refusing more than a block.
async fn receive_block(
    mut body: aws_sdk_ebs::primitives::ByteStream,
    what: &(dyn Fn() -> String + Sync),
) -> Result<Bytes, ProviderError> {
    let mut data = FetchBuffer::with_capacity(BLOCK as usize);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|err| {
            ProviderError::Unreachable(format!("{}: body: {}", what(), causes(&err)))
        })?;
        if data.len() + chunk.len() > BLOCK as usize {
            return Err(ProviderError::Protocol(format!(
                "{}: the body is longer than a {BLOCK}-byte block",
                what()
            )));
        }
        data.put_slice(&chunk);
    }
    Ok(data.freeze())
}

#[derive(Debug, PartialEq, Eq)]
enum BlockFault {
    Length { got: usize, declared: Option<i32> },
    NoChecksum,
    Algorithm(String),
    Mismatch,
}

impl std::fmt::Display for BlockFault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BlockFault::Length { got, declared } => write!(
                f,
                "{got} bytes (DataLength {declared:?}), expected a {BLOCK}-byte block"
            ),
            BlockFault::NoChecksum => f.write_str("the answer carries no checksum"),
            BlockFault::Algorithm(name) => write!(f, "unknown checksum algorithm {name}"),
            BlockFault::Mismatch => f.write_str("checksum mismatch"),
        }
    }
}

/// A block is whole, of the length it declares, and hashes to its checksum.
fn check_block(
    data: &[u8],
    declared: Option<i32>,
    checksum: Option<&str>,
    algorithm: Option<&str>,
) -> Result<(), BlockFault> {
    let declared_ok = declared.is_none_or(|n| n as i64 == data.len() as i64);
    if data.len() as u64 != BLOCK || !declared_ok {
        return Err(BlockFault::Length {
            got: data.len(),
            declared,
        });
    }
    match algorithm {
        None | Some("SHA256") => {}
        Some(other) => return Err(BlockFault::Algorithm(other.to_string())),
    }
    let checksum = checksum.ok_or(BlockFault::NoChecksum)?;
    let digest = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data));
    if digest == checksum.trim() {
        Ok(())
    } else {
        Err(BlockFault::Mismatch)
    }
}

/// Whether GetSnapshotBlock refused the token (expired): worth listing the
/// tokens again.
fn token_rejected<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> bool {
    err.code() == Some("ValidationException")
        && err
            .message()
            .is_some_and(|message| message.to_ascii_lowercase().contains("token"))
}

/// SDK errors → provider errors, by what a caller can do about them.
fn map_error<E>(what: &str, err: SdkError<E, HttpResponse>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err
        .raw_response()
        .map(|response| response.status().as_u16());
    let code = err.code().unwrap_or("").to_string();
    let detail = match (code.as_str(), err.message()) {
        ("", _) => causes(&err),
        (code, Some(message)) if !message.is_empty() => format!("{code}: {message}"),
        (code, _) => code.to_string(),
    };
    let throttled = code.contains("Throttl")
        || matches!(
            code.as_str(),
            "RequestLimitExceeded"
                | "ServiceUnavailable"
                | "InternalError"
                | "InternalServerException"
        );
    let denied = matches!(
        code.as_str(),
        "AuthFailure"
            | "UnauthorizedOperation"
            | "AccessDenied"
            | "AccessDeniedException"
            | "InvalidClientTokenId"
            | "SignatureDoesNotMatch"
            | "UnrecognizedClientException"
    );
    match (&err, status) {
        (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_), _) => {
            ProviderError::Unreachable(format!("{what}: {}", causes(&err)))
        }
        _ if throttled => ProviderError::Unreachable(format!("{what}: {detail}")),
        _ if denied || matches!(status, Some(401 | 403)) => ProviderError::Denied(format!(
            "{what}: {detail} (reading needs ec2:DescribeInstances, ec2:DescribeSnapshots, ebs:ListSnapshotBlocks and ebs:GetSnapshotBlock)"
        )),
        _ if code.ends_with(".NotFound")
            || code == "ResourceNotFoundException"
            || status == Some(404) =>
        {
            ProviderError::NotFound(format!("{what}: {detail}"))
        }
        (_, Some(status)) if is_transient_status(status) => {
            ProviderError::Unreachable(format!("{what}: HTTP {status} {detail}"))
        }
        _ => ProviderError::Protocol(format!("{what}: {detail}")),
    }
}

/// Where a pinned snapshot holds data.
struct BlockMap {
    size: u64,
    ranges: Vec<Range<u64>>,
}

/// The tokens of one window of blocks, sorted by index.
struct TokenWindow {
    tokens: Vec<(u32, Box<str>)>,
    expires: Option<SystemTime>,
}

impl TokenWindow {
    fn token(&self, index: u32) -> Option<&str> {
        self.tokens
            .binary_search_by_key(&index, |(i, _)| *i)
            .ok()
            .map(|at| self.tokens[at].1.as_ref())
    }

    fn fresh(&self, now: SystemTime) -> bool {
        self.expires.is_none_or(|at| now + TOKEN_MARGIN < at)
    }
}

/// What an open file keeps: the snapshot, where it holds data, and the
/// token windows its reads used last.
struct OpenSnapshot {
    id: String,
    size: u64,
    ranges: Vec<Range<u64>>,
    /// One listing at a time: parallel block fetches of one window wait
    /// for the first one's listing instead of each listing it.
    tokens: tokio::sync::Mutex<lru::LruCache<u32, Arc<TokenWindow>>>,
}

impl OpenSnapshot {
    fn new(id: String, map: BlockMap) -> Self {
        OpenSnapshot {
            id,
            size: map.size,
            ranges: map.ranges,
            tokens: tokio::sync::Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(TOKEN_WINDOWS_KEPT).expect("non-zero"),
            )),
        }
    }

    fn holds(&self, index: u64) -> bool {
        let start = index * BLOCK;
        let at = self.ranges.partition_point(|range| range.end <= start);
        self.ranges
            .get(at)
            .is_some_and(|range| range.start <= start)
    }

    async fn token(
        &self,
        provider: &EbsProvider,
        index: u32,
    ) -> Result<Option<Box<str>>, ProviderError> {
        let window = index / TOKEN_WINDOW;
        let mut windows = self.tokens.lock().await;
        let now = SystemTime::now();
        if let Some(known) = windows.get(&window).filter(|known| known.fresh(now)) {
            return Ok(known.token(index).map(Box::from));
        }
        let listed = Arc::new(provider.token_window(&self.id, self.size, window).await?);
        let token = listed.token(index).map(Box::from);
        windows.put(window, listed);
        Ok(token)
    }

    async fn forget(&self, index: u32) {
        self.tokens.lock().await.pop(&(index / TOKEN_WINDOW));
    }
}

fn open_of(pinned: &Pinned) -> Result<&OpenSnapshot, ProviderError> {
    pinned
        .handle
        .as_ref()
        .and_then(|handle| handle.downcast_ref::<OpenSnapshot>())
        .ok_or_else(|| ProviderError::Internal("an ebs:// read without its open snapshot".into()))
}

#[async_trait]
impl Provider for EbsProvider {
    fn preferred_request_size(&self) -> u64 {
        // 16 blocks: one read keeps BLOCKS_AT_ONCE fetches in flight.
        BLOCK * BLOCKS_AT_ONCE as u64
    }

    fn fetch_granule(&self) -> u64 {
        BLOCK
    }

    async fn list(&self) -> Result<Inventory, ProviderError> {
        let (instances, snapshots, flat) = match &self.scope {
            Scope::Snapshot(id) => {
                let snapshots = self.snapshots(Some(id)).await?;
                if snapshots.is_empty() {
                    return Err(ProviderError::NotFound(format!(
                        "snapshot {id} in {}: no such completed snapshot owned by this account",
                        self.server
                    )));
                }
                let mut inventory = Inventory::default();
                for snapshot in &snapshots {
                    inventory.disks.push(snapshot_disk(
                        vec![snapshot_file(snapshot)],
                        "-",
                        snapshot,
                    ));
                }
                return Ok(inventory);
            }
            Scope::Instance(_) => (self.instances().await?, self.snapshots(None).await?, true),
            Scope::All => (self.instances().await?, self.snapshots(None).await?, false),
        };
        let live = match self.holds {
            Some(_) => Some(self.volumes().await?),
            None => None,
        };
        *self
            .names
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = instances
            .iter()
            .map(|instance| (instance.id.clone(), instance_dir(instance)))
            .collect();
        let (inventory, unsnapshotted) =
            build_inventory(&instances, &snapshots, live.as_ref(), flat);
        let mut told = self
            .told_unsnapshotted
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (instance, volume) in unsnapshotted {
            if told.insert(volume.clone()) {
                tracing::warn!(%instance, %volume, "volume not shown: it has no completed snapshot to read (snapshot=on takes one at open)");
            }
        }
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let (instance, volume, listed) = locator_parts(&disk.locator);
        let snapshot = match &self.holds {
            Some(holds) if instance != "-" => {
                let export = holds.held(instance).await.ok_or_else(|| {
                    ProviderError::Internal(format!(
                        "snapshot=on: no export snapshot is held for {instance}"
                    ))
                })?;
                export.of_volume(volume).map(str::to_string).ok_or_else(|| {
                    ProviderError::NotFound(format!(
                        "snapshot=on: the export snapshot of {instance} ({export}) holds no snapshot of {volume} (attached since?)"
                    ))
                })?
            }
            _ if listed == "-" => {
                return Err(ProviderError::NotFound(format!(
                    "{volume} has no completed snapshot to read"
                )))
            }
            _ => listed.to_string(),
        };
        let map = self.block_map(&snapshot).await?;
        Ok(Pinned {
            size: map.size,
            version: Version::Frozen(snapshot.clone()),
            handle: Some(Arc::new(OpenSnapshot::new(snapshot, map))),
        })
    }

    async fn begin_read(&self, disk: &DiskEntry) -> Result<(), ProviderError> {
        let (instance, _, _) = locator_parts(&disk.locator);
        match &self.holds {
            Some(holds) if instance != "-" => holds.open(instance, &self.name_of(instance)).await,
            _ => Ok(()),
        }
    }

    async fn end_read(&self, disk: &DiskEntry) {
        let (instance, _, _) = locator_parts(&disk.locator);
        if let Some(holds) = &self.holds {
            if instance != "-" {
                holds.close(instance, &self.name_of(instance)).await;
            }
        }
    }

    async fn close(&self) {
        if let Some(holds) = &self.holds {
            holds.release_all(|instance| self.name_of(instance)).await;
        }
    }

    fn activity(&self) -> Vec<String> {
        self.progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .values()
            .cloned()
            .collect()
    }

    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        Ok(Some(open_of(pinned)?.ranges.clone()))
    }

    async fn read(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let open = open_of(pinned)?;
        let end = offset + len as u64;
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        if offset.is_multiple_of(BLOCK) && len as u64 == BLOCK {
            // One whole block: its own buffer, no copy.
            return Ok(self
                .block(open, first)
                .await?
                .unwrap_or_else(|| Bytes::from(vec![0; len])));
        }
        let mut blocks = futures::stream::iter(first..=last)
            .map(|index| async move { (index, self.block(open, index).await) })
            .buffered(BLOCKS_AT_ONCE);
        let mut out = FetchBuffer::with_capacity(len);
        while let Some((index, block)) = blocks.next().await {
            let start = index * BLOCK;
            let from = (offset.max(start) - start) as usize;
            let to = (end.min(start + BLOCK) - start) as usize;
            match block? {
                Some(data) => out.put_slice(&data[from..to]),
                None => out.put_bytes(0, to - from),
            }
        }
        Ok(out.freeze())
    }
}

/// One instance's export: the snapshot of each of its volumes, taken at
/// once, as (volume, snapshot).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ExportSnapshots(Vec<(String, String)>);

impl ExportSnapshots {
    fn of_volume(&self, volume: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(of, _)| of == volume)
            .map(|(_, snapshot)| snapshot.as_str())
    }
}

impl fmt::Display for ExportSnapshots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (at, (_, snapshot)) in self.0.iter().enumerate() {
            if at > 0 {
                f.write_str(", ")?;
            }
            f.write_str(snapshot)?;
        }
        Ok(())
    }
}

/// Takes and deletes the snapshots of `snapshot=on`.
struct InstanceSnapshots {
    ec2: aws_sdk_ec2::Client,
    server: String,
    progress: Arc<Mutex<BTreeMap<String, String>>>,
    poll: Duration,
}

impl InstanceSnapshots {
    fn set_progress(&self, instance: &str, line: Option<String>) {
        let mut progress = self
            .progress
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        match line {
            Some(line) => progress.insert(instance.to_string(), line),
            None => progress.remove(instance),
        };
    }

    /// Where each snapshot is now.
    async fn look(&self, snapshots: &[String]) -> Result<Vec<Progress>, ProviderError> {
        let what = format!(
            "DescribeSnapshots {} in {}",
            snapshots.join(","),
            self.server
        );
        let answer = self
            .ec2
            .describe_snapshots()
            .set_snapshot_ids(Some(snapshots.to_vec()))
            .send()
            .await
            .map_err(|err| map_error(&what, err))?;
        Ok(answer
            .snapshots()
            .iter()
            .filter_map(|snapshot| {
                use aws_sdk_ec2::types::SnapshotState;
                Some(Progress {
                    id: snapshot.snapshot_id()?.to_string(),
                    stage: match snapshot.state()? {
                        SnapshotState::Completed => Stage::Completed,
                        SnapshotState::Error | SnapshotState::Recoverable => Stage::Failed,
                        _ => Stage::Pending,
                    },
                    percent: snapshot.progress().unwrap_or("?").to_string(),
                    message: snapshot.state_message().map(str::to_string),
                })
            })
            .collect())
    }
}

#[async_trait]
impl Snapshotter for InstanceSnapshots {
    type Snapshot = ExportSnapshots;

    async fn take(&self, instance: &str, name: &str) -> Result<ExportSnapshots, ProviderError> {
        use aws_sdk_ec2::types::{InstanceSpecification, ResourceType, Tag, TagSpecification};
        let creator = Creator::this_process();
        let what = format!("CreateSnapshots of {instance} in {}", self.server);
        let tagged = |key: &str, value: String| Tag::builder().key(key).value(value).build();
        let answer = self
            .ec2
            .create_snapshots()
            .instance_specification(
                InstanceSpecification::builder()
                    .instance_id(instance)
                    .exclude_boot_volume(false)
                    .build(),
            )
            .description(creator.description())
            .tag_specifications(
                TagSpecification::builder()
                    .resource_type(ResourceType::Snapshot)
                    .tags(tagged(EXPORT_TAG, creator.record()))
                    .tags(tagged(INSTANCE_TAG, instance.to_string()))
                    .tags(tagged("Name", format!("vmexportfs export of {name}")))
                    .build(),
            )
            .send()
            .await
            .map_err(|err| map_error(&what, err))?;
        let export = ExportSnapshots(
            answer
                .snapshots()
                .iter()
                .filter_map(|taken| {
                    Some((
                        taken.volume_id()?.to_string(),
                        taken.snapshot_id()?.to_string(),
                    ))
                })
                .collect(),
        );
        if export.0.is_empty() {
            return Err(ProviderError::NotFound(format!(
                "{what}: the instance has no EBS volume to snapshot"
            )));
        }
        tracing::info!(vm = %name, snapshot = %export, "snapshot=on: snapshots started; waiting for them to complete");
        let ids: Vec<String> = export.0.iter().map(|(_, id)| id.clone()).collect();
        let waited = wait_completed(
            name,
            self.poll,
            |line| self.set_progress(instance, Some(line)),
            || self.look(&ids),
        )
        .await;
        self.set_progress(instance, None);
        if let Err(err) = waited {
            if let Err(cleanup) = self.remove(instance, &export).await {
                tracing::error!(vm = %name, snapshot = %export, "deleting the snapshots of a failed export: {cleanup}");
            }
            return Err(err);
        }
        Ok(export)
    }

    async fn remove(&self, _instance: &str, export: &ExportSnapshots) -> Result<(), ProviderError> {
        let mut failed = None;
        for (_, snapshot) in &export.0 {
            if let Err(err) = delete_snapshot(&self.ec2, &self.server, snapshot).await {
                failed.get_or_insert(err);
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn by_hand(&self, export: &ExportSnapshots) -> String {
        format!("delete {export} by hand (aws ec2 delete-snapshot --snapshot-id ID)")
    }
}

/// Deletes the export snapshots a dead vmexportfs on this host left.
async fn remove_leftover_snapshots(ec2: aws_sdk_ec2::Client, server: String) {
    let what = format!("DescribeSnapshots tagged {EXPORT_TAG} in {server}");
    let mut pages = ec2
        .describe_snapshots()
        .owner_ids("self")
        .filters(Filter::builder().name("tag-key").values(EXPORT_TAG).build())
        .into_paginator()
        .send();
    let mut found = Vec::new();
    while let Some(page) = pages.next().await {
        let page = match page {
            Ok(page) => page,
            Err(err) => {
                let err = map_error(&what, err);
                tracing::warn!("looking for snapshots left by an earlier vmexportfs: {err}");
                return;
            }
        };
        for snapshot in page.snapshots() {
            let (Some(id), Some(record)) =
                (snapshot.snapshot_id(), tag(snapshot.tags(), EXPORT_TAG))
            else {
                continue;
            };
            found.push(Found {
                vm: tag(snapshot.tags(), INSTANCE_TAG)
                    .or(snapshot.volume_id())
                    .unwrap_or("-")
                    .to_string(),
                snapshot: id.to_string(),
                record: record.to_string(),
            });
        }
    }
    let what = format!("export snapshot (tag {EXPORT_TAG})");
    remove_leftovers(found, &what, |snapshot| {
        let (ec2, server) = (&ec2, &server);
        async move { delete_snapshot(ec2, server, &snapshot).await }
    })
    .await;
}

/// Deletes one snapshot; one already gone counts as deleted.
async fn delete_snapshot(
    ec2: &aws_sdk_ec2::Client,
    server: &str,
    snapshot: &str,
) -> Result<(), ProviderError> {
    let what = format!("DeleteSnapshot {snapshot} in {server}");
    match ec2.delete_snapshot().snapshot_id(snapshot).send().await {
        Ok(_) => Ok(()),
        Err(err) => match map_error(&what, err) {
            ProviderError::NotFound(_) => Ok(()),
            err => Err(err),
        },
    }
}

/// A snapshot in progress, as DescribeSnapshots tells.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    id: String,
    stage: Stage,
    /// `45%`, as EC2 writes it.
    percent: String,
    message: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    Completed,
    Failed,
}

/// Looks that may fail in a row (throttling, a snapshot not yet visible)
/// before the wait gives up.
const LOOKS_FAILING: u32 = 10;

/// Waits until every snapshot `look` reports is completed, reporting each
/// change of progress (log and `report`); a failed snapshot fails it.
async fn wait_completed<L, Fut>(
    name: &str,
    first: Duration,
    mut report: impl FnMut(String),
    look: L,
) -> Result<(), ProviderError>
where
    L: Fn() -> Fut,
    Fut: Future<Output = Result<Vec<Progress>, ProviderError>>,
{
    let mut wait = first;
    let mut failing = 0;
    let mut told = String::new();
    loop {
        match look().await {
            Ok(now) => {
                failing = 0;
                if let Some(failed) = now.iter().find(|p| p.stage == Stage::Failed) {
                    return Err(ProviderError::Protocol(format!(
                        "snapshot=on: snapshot {} of {name} failed: {}",
                        failed.id,
                        failed.message.as_deref().unwrap_or("EC2 gives no reason")
                    )));
                }
                if !now.is_empty() && now.iter().all(|p| p.stage == Stage::Completed) {
                    return Ok(());
                }
                let line = format!(
                    "snapshot=on: {name}: waiting for {}",
                    now.iter()
                        .map(|p| format!("{} {}", p.id, p.percent))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                if line != told {
                    tracing::info!(vm = %name, "{line}");
                    report(line.clone());
                    told = line;
                }
            }
            Err(err @ (ProviderError::Unreachable(_) | ProviderError::NotFound(_)))
                if failing + 1 < LOOKS_FAILING =>
            {
                failing += 1;
                tracing::debug!(vm = %name, "snapshot=on: looking at the snapshots: {err}");
            }
            Err(err) => return Err(err),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(POLL_MAX);
    }
}

/// The first wait between looks at snapshots in progress.
fn poll_first() -> Duration {
    std::env::var("VMEXPORTFS_EBS_POLL")
        .ok()
        .and_then(|text| text.parse::<f64>().ok())
        .filter(|seconds| seconds.is_finite() && *seconds > 0.0 && *seconds < 3600.0)
        .map_or(POLL_FIRST, Duration::from_secs_f64)
}

/// Reads a ListSnapshotBlocks answer whole and writes block indexes given
/// as strings (moto: `"BlockIndex": "7"`) as the numbers AWS sends, which
/// the SDK's parser insists on.
#[derive(Debug)]
struct NumericBlockIndexes;

impl Intercept for NumericBlockIndexes {
    fn name(&self) -> &'static str {
        "NumericBlockIndexes"
    }

    fn modify_before_deserialization(
        &self,
        context: &mut BeforeDeserializationInterceptorContextMut<'_>,
        _components: &RuntimeComponents,
        _cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let body = context.response_mut().body_mut();
        let raw = std::mem::replace(body, SdkBody::taken());
        *body = SdkBody::from_body_1_x(WholeBody {
            inner: Box::pin(raw),
            buffer: Vec::new(),
            done: false,
        });
        Ok(())
    }
}

/// A body read to its end, then given as one rewritten chunk.
struct WholeBody {
    inner: Pin<Box<SdkBody>>,
    buffer: Vec<u8>,
    done: bool,
}

impl http_body::Body for WholeBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        loop {
            match ready!(this.inner.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        if this.buffer.len() + data.len() > LIST_ANSWER_MAX {
                            return Poll::Ready(Some(Err(format!(
                                "a ListSnapshotBlocks answer larger than {LIST_ANSWER_MAX} bytes"
                            )
                            .into())));
                        }
                        this.buffer.extend_from_slice(&data);
                    }
                }
                Some(Err(err)) => return Poll::Ready(Some(Err(err))),
                None => {
                    this.done = true;
                    let body = numeric_block_indexes(std::mem::take(&mut this.buffer));
                    return Poll::Ready(Some(Ok(http_body::Frame::data(body))));
                }
            }
        }
    }
}

/// `{"Blocks":[{"BlockIndex":"7",…}]}` → `{"Blocks":[{"BlockIndex":7,…}]}`;
/// anything else as it came (the SDK judges it).
fn numeric_block_indexes(body: Vec<u8>) -> Bytes {
    let Ok(mut value) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return Bytes::from(body);
    };
    let mut changed = false;
    if let Some(blocks) = value
        .get_mut("Blocks")
        .and_then(serde_json::Value::as_array_mut)
    {
        for block in blocks {
            let Some(index) = block.get_mut("BlockIndex") else {
                continue;
            };
            if let Some(number) = index.as_str().and_then(|text| text.parse::<u32>().ok()) {
                *index = number.into();
                changed = true;
            }
        }
    }
    if !changed {
        return Bytes::from(body);
    }
    tracing::debug!(
        "ListSnapshotBlocks gave block indexes as strings (moto does): read as numbers"
    );
    match serde_json::to_vec(&value) {
        Ok(rewritten) => Bytes::from(rewritten),
        Err(_) => Bytes::from(body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_a_region_and_optionally_an_instance_or_snapshot() {
        assert_eq!(
            parse_source("ebs://us-east-1").unwrap(),
            Source {
                region: "us-east-1".into(),
                scope: Scope::All
            }
        );
        assert_eq!(
            parse_source("ebs://us-gov-west-1/i-0123456789abcdef0")
                .unwrap()
                .scope,
            Scope::Instance("i-0123456789abcdef0".into())
        );
        assert_eq!(
            parse_source("ebs://eu-central-2/snap-0123abcd/")
                .unwrap()
                .scope,
            Scope::Snapshot("snap-0123abcd".into())
        );
        for bad in [
            "ebs://",
            "ebs://Nowhere",
            "ebs://us-east",
            "ebs://US-EAST-1",
            "ebs://us-east-1a",
        ] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("does not name a region"), "{bad}: {err}");
        }
        for bad in [
            "ebs://us-east-1/vol-0123abcd",
            "ebs://us-east-1/i-XYZ",
            "ebs://us-east-1/a/b",
        ] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("neither an instance id"), "{bad}: {err}");
        }
    }

    fn snapshot(id: &str, volume: &str, start: u64) -> SnapshotInfo {
        SnapshotInfo {
            id: id.into(),
            volume: Some(volume.into()),
            size: 8 * GIB,
            start: SystemTime::UNIX_EPOCH + Duration::from_secs(start),
            name: None,
            full_size: None,
        }
    }

    #[test]
    fn each_volume_reads_its_latest_snapshot_under_a_stable_path() {
        let instances = vec![
            InstanceInfo {
                id: "i-0aaa0aaa".into(),
                name: Some("web".into()),
                volumes: vec![
                    ("/dev/xvda".into(), "vol-01".into()),
                    ("/dev/sdf".into(), "vol-02".into()),
                ],
            },
            InstanceInfo {
                id: "i-0bbb0bbb".into(),
                name: None,
                volumes: vec![("/dev/xvda".into(), "vol-03".into())],
            },
        ];
        let mut old = snapshot("snap-old", "vol-01", 100);
        old.name = Some("nightly".into());
        let snapshots = vec![
            old,
            snapshot("snap-new", "vol-01", 200),
            snapshot("snap-f", "vol-02", 50),
        ];
        let (inventory, unsnapshotted) = build_inventory(&instances, &snapshots, None, false);
        let found: Vec<(String, String)> = inventory
            .disks
            .iter()
            .map(|disk| (disk.path.join("/"), disk.version.to_string()))
            .collect();
        assert_eq!(
            found,
            [
                (
                    "web-i-0aaa0aaa/xvda-vol-01.img",
                    "snapshot snap-new (immutable)"
                ),
                (
                    "web-i-0aaa0aaa/sdf-vol-02.img",
                    "snapshot snap-f (immutable)"
                ),
                (
                    "snapshots/snap-old-nightly.img",
                    "snapshot snap-old (immutable)"
                ),
                ("snapshots/snap-new.img", "snapshot snap-new (immutable)"),
                ("snapshots/snap-f.img", "snapshot snap-f (immutable)"),
            ]
            .map(|(path, version)| (path.to_string(), version.to_string()))
        );
        // An instance whose volumes have no snapshot is still shown, empty.
        assert_eq!(inventory.empty_dirs, vec![vec!["i-0bbb0bbb".to_string()]]);
        assert_eq!(unsnapshotted, vec![("i-0bbb0bbb".into(), "vol-03".into())]);
        assert_eq!(
            locator_parts(&inventory.disks[0].locator),
            ("i-0aaa0aaa", "vol-01", "snap-new")
        );
        assert_eq!(inventory.disks[0].size, 8 * GIB);

        let (flat, _) = build_inventory(&instances[..1], &snapshots, None, true);
        let paths: Vec<String> = flat.disks.iter().map(|d| d.path.join("/")).collect();
        assert_eq!(paths, ["xvda-vol-01.img", "sdf-vol-02.img"]);

        // snapshot=on reads volumes through a snapshot taken at open: one
        // with no snapshot yet is listed at its volume size.
        let live = HashMap::from([(
            "vol-03".to_string(),
            VolumeInfo {
                size: 30 * GIB,
                created: SystemTime::UNIX_EPOCH,
            },
        )]);
        let (inventory, unsnapshotted) =
            build_inventory(&instances, &snapshots, Some(&live), false);
        let disk = inventory
            .disks
            .iter()
            .find(|disk| disk.path.join("/") == "i-0bbb0bbb/xvda-vol-03.img")
            .expect("the unsnapshotted volume is listed");
        assert_eq!(disk.size, 30 * GIB);
        assert_eq!(locator_parts(&disk.locator), ("i-0bbb0bbb", "vol-03", "-"));
        assert!(unsnapshotted.is_empty());
        assert!(inventory.empty_dirs.is_empty());
    }

    fn progress(id: &str, stage: Stage, percent: &str) -> Progress {
        Progress {
            id: id.into(),
            stage,
            percent: percent.into(),
            message: Some("volume busy".into()),
        }
    }

    type Look = Result<Vec<Progress>, ProviderError>;
    type Answers = Arc<Mutex<std::collections::VecDeque<Look>>>;

    /// Looks that answer `answers` in turn; what is left shows how many
    /// were asked for.
    fn looks(answers: Vec<Look>) -> (Answers, impl Fn() -> std::future::Ready<Look>) {
        let queue: Answers = Arc::new(Mutex::new(answers.into_iter().collect()));
        let shared = queue.clone();
        let look =
            move || {
                std::future::ready(shared.lock().unwrap().pop_front().unwrap_or_else(|| {
                    Err(ProviderError::Internal("looked once too often".into()))
                }))
            };
        (queue, look)
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_reports_each_change_of_progress_and_ends_when_all_complete() {
        let (left, look) = looks(vec![
            Ok(vec![
                progress("snap-a", Stage::Pending, "0%"),
                progress("snap-b", Stage::Pending, "0%"),
            ]),
            Ok(vec![
                progress("snap-a", Stage::Pending, "0%"),
                progress("snap-b", Stage::Pending, "0%"),
            ]),
            Err(ProviderError::Unreachable("RequestLimitExceeded".into())),
            Ok(vec![
                progress("snap-a", Stage::Pending, "45%"),
                progress("snap-b", Stage::Completed, "100%"),
            ]),
            Ok(vec![
                progress("snap-a", Stage::Completed, "100%"),
                progress("snap-b", Stage::Completed, "100%"),
            ]),
        ]);
        let mut reported = Vec::new();
        let started = tokio::time::Instant::now();
        wait_completed(
            "web",
            Duration::from_secs(2),
            |line| reported.push(line),
            look,
        )
        .await
        .unwrap();
        assert_eq!(
            reported,
            [
                "snapshot=on: web: waiting for snap-a 0%, snap-b 0%",
                "snapshot=on: web: waiting for snap-a 45%, snap-b 100%",
            ]
        );
        assert!(left.lock().unwrap().is_empty());
        // Waits of 2, 4, 8 and 15 s between the five looks.
        assert_eq!(started.elapsed(), Duration::from_secs(2 + 4 + 8 + 15));
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_snapshot_or_a_denied_look_ends_the_wait_with_its_reason() {
        let (_, look) = looks(vec![Ok(vec![
            progress("snap-a", Stage::Completed, "100%"),
            progress("snap-b", Stage::Failed, "12%"),
        ])]);
        let err = wait_completed("web", Duration::from_secs(1), |_| {}, look)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("snap-b of web failed: volume busy"), "{err}");

        let (_, look) = looks(vec![Err(ProviderError::Denied(
            "UnauthorizedOperation".into(),
        ))]);
        let err = wait_completed("web", Duration::from_secs(1), |_| {}, look)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Denied(_)), "{err}");

        // An answer naming no snapshot never counts as complete.
        let mut answers: Vec<Result<Vec<Progress>, ProviderError>> = vec![Ok(Vec::new())];
        answers.extend(
            (0..LOOKS_FAILING)
                .map(|_| Err(ProviderError::NotFound("InvalidSnapshot.NotFound".into()))),
        );
        let (_, look) = looks(answers);
        let err = wait_completed("web", Duration::from_secs(1), |_| {}, look)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::NotFound(_)), "{err}");
    }

    #[test]
    fn an_export_names_each_volumes_snapshot() {
        let export = ExportSnapshots(vec![
            ("vol-01".into(), "snap-a".into()),
            ("vol-02".into(), "snap-b".into()),
        ]);
        assert_eq!(export.to_string(), "snap-a, snap-b");
        assert_eq!(export.of_volume("vol-02"), Some("snap-b"));
        assert_eq!(export.of_volume("vol-03"), None);
    }

    #[test]
    fn listed_blocks_become_merged_ranges() {
        let ranges = block_ranges(vec![7, 0, 1, 2, 100, 101, 2047, 1]);
        assert_eq!(
            ranges,
            vec![
                0..3 * BLOCK,
                7 * BLOCK..8 * BLOCK,
                100 * BLOCK..102 * BLOCK,
                2047 * BLOCK..2048 * BLOCK
            ]
        );
        let open = OpenSnapshot::new("snap-1".into(), BlockMap { size: GIB, ranges });
        let held: Vec<u64> = (0..2048).filter(|&i| open.holds(i)).collect();
        assert_eq!(held, [0, 1, 2, 7, 100, 101, 2047]);
        assert!(block_index(Some(2048), GIB, "x").is_err());
        assert!(block_index(Some(-1), GIB, "x").is_err());
        assert_eq!(block_index(Some(2047), GIB, "x").unwrap(), 2047);
    }

    #[test]
    fn blocks_are_checked_against_their_length_and_sha256() {
        let data = vec![7u8; BLOCK as usize];
        let good = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&data));
        assert_eq!(
            check_block(&data, Some(BLOCK as i32), Some(&good), Some("SHA256")),
            Ok(())
        );
        let mut flipped = data.clone();
        flipped[1000] ^= 1;
        assert_eq!(
            check_block(&flipped, None, Some(&good), Some("SHA256")),
            Err(BlockFault::Mismatch)
        );
        assert_eq!(
            check_block(&data, None, None, None),
            Err(BlockFault::NoChecksum)
        );
        assert!(matches!(
            check_block(&data[..1000], None, Some(&good), None),
            Err(BlockFault::Length { got: 1000, .. })
        ));
        assert!(matches!(
            check_block(&data, Some(512), Some(&good), None),
            Err(BlockFault::Length { .. })
        ));
        assert_eq!(
            check_block(&data, None, Some(&good), Some("MD5")),
            Err(BlockFault::Algorithm("MD5".into()))
        );
    }

    #[test]
    fn string_block_indexes_are_read_as_numbers_and_nothing_else_changes() {
        let moto = br#"{"Blocks": [{"BlockIndex": "7", "BlockToken": "t7"}], "VolumeSize": 1, "BlockSize": 512}"#;
        let fixed: serde_json::Value =
            serde_json::from_slice(&numeric_block_indexes(moto.to_vec())).unwrap();
        assert_eq!(fixed["Blocks"][0]["BlockIndex"], 7);
        assert_eq!(fixed["Blocks"][0]["BlockToken"], "t7");
        assert_eq!(fixed["BlockSize"], 512);
        let aws = br#"{"Blocks":[{"BlockIndex":7,"BlockToken":"t7"}],"VolumeSize":1}"#;
        assert_eq!(&numeric_block_indexes(aws.to_vec())[..], &aws[..]);
        let html = b"<html>500</html>";
        assert_eq!(&numeric_block_indexes(html.to_vec())[..], &html[..]);
    }

    proptest::proptest! {
        /// Whatever a server sends as a listing, the rewrite never panics
        /// and leaves a body it did not change byte for byte as it came.
        #[test]
        fn the_listing_rewrite_never_panics(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let out = numeric_block_indexes(body.clone());
            if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                proptest::prop_assert_eq!(&out[..], &body[..]);
            }
        }

        /// Every block index a listing gives lands in exactly one range,
        /// and nothing else does.
        #[test]
        fn ranges_hold_exactly_the_listed_blocks(indexes in proptest::collection::vec(0u32..512, 0..64)) {
            let open = OpenSnapshot::new("s".into(), BlockMap { size: GIB, ranges: block_ranges(indexes.clone()) });
            for index in 0..512u64 {
                proptest::prop_assert_eq!(open.holds(index), indexes.contains(&(index as u32)));
            }
        }
    }
}
