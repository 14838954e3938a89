//! `ebs://` against moto, which answers EC2 and the EBS direct APIs on one
//! port, through real mounts. Snapshots are written block by block with
//! StartSnapshot / PutSnapshotBlock / CompleteSnapshot (real 512 KiB
//! blocks, most of the volume never written) and attached to an instance
//! through the volume moto makes for each of them.

mod common;

use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;

use aws_sdk_ebs::primitives::ByteStream;
use aws_sdk_ebs::types::ChecksumAlgorithm;
use base64::Engine;
use common::faults::{Fault, FaultProxy, Plan};
use common::*;
use sha2::{Digest, Sha256};

const BLOCK: u64 = 512 << 10;
const GIB: u64 = 1 << 30;
/// The blocks the sparse snapshot holds; the rest of its 1 GiB is holes.
const WRITTEN: [u64; 11] = [0, 1, 2, 3, 4, 5, 6, 7, 100, 101, 2047];

fn ebs_options(endpoint: &str, extra: &str) -> String {
    with_options(format!("endpoint={endpoint}"), extra)
}

fn ec2_client(endpoint: &str) -> aws_sdk_ec2::Client {
    let config = aws_sdk_ec2::config::Builder::new()
        .behavior_version(aws_sdk_ec2::config::BehaviorVersion::latest())
        .region(aws_sdk_ec2::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ec2::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .build();
    aws_sdk_ec2::Client::from_conf(config)
}

fn ebs_client(endpoint: &str) -> aws_sdk_ebs::Client {
    let config = aws_sdk_ebs::config::Builder::new()
        .behavior_version(aws_sdk_ebs::config::BehaviorVersion::latest())
        .region(aws_sdk_ebs::config::Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .credentials_provider(aws_sdk_ebs::config::Credentials::new(
            "test", "test", None, None, "tests",
        ))
        .build();
    aws_sdk_ebs::Client::from_conf(config)
}

/// A snapshot written through the EBS direct APIs: (snapshot id, the
/// volume moto made for it).
async fn write_snapshot(
    ebs: &aws_sdk_ebs::Client,
    ec2: &aws_sdk_ec2::Client,
    gib: i64,
    blocks: &[(u64, Vec<u8>)],
) -> (String, String) {
    let started = ebs
        .start_snapshot()
        .volume_size(gib)
        .description("written by the ebs:// tests")
        .send()
        .await
        .expect("StartSnapshot");
    let id = started.snapshot_id().unwrap().to_string();
    for (index, data) in blocks {
        let checksum = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(data));
        ebs.put_snapshot_block()
            .snapshot_id(&id)
            .block_index(*index as i32)
            .data_length(data.len() as i32)
            .checksum(checksum)
            .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
            .block_data(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap_or_else(|err| panic!("PutSnapshotBlock {index}: {err:?}"));
    }
    ebs.complete_snapshot()
        .snapshot_id(&id)
        .changed_blocks_count(blocks.len() as i32)
        .send()
        .await
        .expect("CompleteSnapshot");
    let described = ec2
        .describe_snapshots()
        .snapshot_ids(&id)
        .send()
        .await
        .expect("DescribeSnapshots");
    let volume = described.snapshots()[0].volume_id().unwrap().to_string();
    (id, volume)
}

/// moto with an instance `web` whose /dev/sdf reads a 1 GiB snapshot of
/// [`WRITTEN`] blocks, and that snapshot's bytes as a sparse file.
struct Fixture {
    moto: Moto,
    instance: String,
    volume: String,
    snapshot: String,
    expected: tempfile::NamedTempFile,
}

impl Fixture {
    fn new() -> Fixture {
        let moto = Moto::start();
        let blocks: Vec<(u64, Vec<u8>)> = WRITTEN
            .iter()
            .map(|&index| (index, random_bytes(BLOCK as usize, index + 1)))
            .collect();
        let expected = tempfile::NamedTempFile::new().unwrap();
        expected.as_file().set_len(GIB).unwrap();
        for (index, data) in &blocks {
            expected
                .as_file()
                .write_all_at(data, index * BLOCK)
                .unwrap();
        }
        let (ec2, ebs) = (ec2_client(&moto.endpoint), ebs_client(&moto.endpoint));
        let (instance, volume, snapshot) = block_on(async {
            let (snapshot, volume) = write_snapshot(&ebs, &ec2, 1, &blocks).await;
            let image = ec2
                .describe_images()
                .owners("amazon")
                .send()
                .await
                .expect("DescribeImages");
            let image = image.images()[0].image_id().unwrap().to_string();
            let run = ec2
                .run_instances()
                .image_id(image)
                .min_count(1)
                .max_count(1)
                .tag_specifications(
                    aws_sdk_ec2::types::TagSpecification::builder()
                        .resource_type(aws_sdk_ec2::types::ResourceType::Instance)
                        .tags(
                            aws_sdk_ec2::types::Tag::builder()
                                .key("Name")
                                .value("web")
                                .build(),
                        )
                        .build(),
                )
                .send()
                .await
                .expect("RunInstances");
            let instance = run.instances()[0].instance_id().unwrap().to_string();
            ec2.attach_volume()
                .volume_id(&volume)
                .instance_id(&instance)
                .device("/dev/sdf")
                .send()
                .await
                .expect("AttachVolume");
            (instance, volume, snapshot)
        });
        Fixture {
            moto,
            instance,
            volume,
            snapshot,
            expected,
        }
    }

    fn disk(&self) -> String {
        format!("web-{}/sdf-{}.img", self.instance, self.volume)
    }

    /// A proxy in front of moto, to count or alter what passes.
    fn proxy(&self) -> FaultProxy {
        FaultProxy::start(
            self.moto
                .endpoint
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap(),
        )
    }
}

fn assert_same_bytes(copy: &Path, expected: &Path) {
    let output = Command::new("cmp")
        .arg(copy)
        .arg(expected)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{copy:?} differs: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

/// The requests that fetched a block (GetSnapshotBlock), by index.
fn block_fetches(proxy: &FaultProxy) -> Vec<u64> {
    proxy
        .heads
        .lock()
        .unwrap()
        .iter()
        .filter_map(|head| {
            let line = faults::text_line(head.as_bytes());
            let path = line.split(' ').nth(1)?;
            let (_, after) = path.split_once("/blocks/")?;
            after.split('?').next()?.parse().ok()
        })
        .collect()
}

fn seek(path: &Path, offset: u64, whence: i32) -> Option<u64> {
    let file = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as i64, whence) };
    (at >= 0).then_some(at as u64)
}

#[test]
fn an_instance_volume_copies_byte_identical_with_cp_rsync_and_qemu_img() {
    require_tool("qemu-img");
    let fixture = Fixture::new();
    let mount = Mount::try_new_with_env(
        "ebs://us-east-1",
        &ebs_options(&fixture.moto.endpoint, ""),
        S3_ENV,
    )
    .unwrap();
    let disk = mount.file(&fixture.disk());
    let metadata = std::fs::metadata(&disk).unwrap();
    assert_eq!(metadata.len(), GIB);

    let out = tempfile::tempdir().unwrap();
    let copy = out.path().join("cp.img");
    assert_succeeded(
        &Command::new("cp")
            .arg("--sparse=always")
            .arg(&disk)
            .arg(&copy)
            .output()
            .unwrap(),
    );
    assert_same_bytes(&copy, fixture.expected.path());
    let allocated = std::fs::metadata(&copy).unwrap().blocks() * 512;
    assert!(
        allocated <= (WRITTEN.len() as u64 + 4) * BLOCK,
        "cp --sparse=always wrote {allocated} bytes for {} blocks",
        WRITTEN.len()
    );

    let synced = out.path().join("rsync.img");
    assert_succeeded(
        &Command::new("rsync")
            .arg("--sparse")
            .arg(&disk)
            .arg(&synced)
            .output()
            .unwrap(),
    );
    assert_same_bytes(&synced, fixture.expected.path());

    let converted = out.path().join("qemu.raw");
    assert_succeeded(
        &Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(&disk)
            .arg(&converted)
            .output()
            .unwrap(),
    );
    assert_same_bytes(&converted, fixture.expected.path());
    // The root volume moto gives every instance has no snapshot: not shown,
    // and said once in the log.
    let log = mount.log_text();
    assert!(log.contains("has no completed snapshot to read"), "{log}");
}

#[test]
fn the_default_moto_inventory_lists_every_owned_snapshot() {
    // moto's default set-up: no instances, and a snapshot for each of its
    // AMIs, all owned by the default account.
    let moto = Moto::start();
    let ec2 = ec2_client(&moto.endpoint);
    let owned = block_on(async {
        let mut count = 0;
        let mut pages = ec2
            .describe_snapshots()
            .owner_ids("self")
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            count += page.unwrap().snapshots().len();
        }
        count
    });
    assert!(
        owned > 100,
        "moto's default inventory has {owned} snapshots"
    );
    let mount =
        Mount::try_new_with_env("ebs://us-east-1", &ebs_options(&moto.endpoint, ""), S3_ENV)
            .unwrap();
    let mut root: Vec<String> = std::fs::read_dir(&mount.path)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    root.sort();
    assert_eq!(root, ["snapshots"]);
    let listed = std::fs::read_dir(mount.file("snapshots")).unwrap().count();
    assert_eq!(listed, owned);
}

#[test]
fn holes_are_never_fetched_and_seek_finds_the_data() {
    let fixture = Fixture::new();
    let proxy = fixture.proxy();
    let mount =
        Mount::try_new_with_env("ebs://us-east-1", &ebs_options(&proxy.url(), ""), S3_ENV).unwrap();
    let disk = mount.file(&fixture.disk());
    assert_eq!(seek(&disk, 0, libc::SEEK_DATA), Some(0));
    assert_eq!(seek(&disk, 0, libc::SEEK_HOLE), Some(8 * BLOCK));
    assert_eq!(seek(&disk, 8 * BLOCK, libc::SEEK_DATA), Some(100 * BLOCK));
    assert_eq!(seek(&disk, 100 * BLOCK, libc::SEEK_HOLE), Some(102 * BLOCK));
    assert_eq!(
        seek(&disk, 102 * BLOCK, libc::SEEK_DATA),
        Some(2047 * BLOCK)
    );
    assert_eq!(seek(&disk, 2047 * BLOCK, libc::SEEK_HOLE), Some(GIB));

    let (bytes, _) = timed_read(&disk);
    assert_eq!(bytes, GIB);
    let mut fetched = block_fetches(&proxy);
    fetched.sort();
    assert_eq!(fetched, WRITTEN, "GetSnapshotBlock calls, by block");
    eprintln!(
        "measured: ebs sparse read: fetched {} of {} bytes written ({} GetSnapshotBlock calls for a 1 GiB volume)",
        fetched.len() as u64 * BLOCK,
        WRITTEN.len() as u64 * BLOCK,
        fetched.len()
    );
}

#[test]
fn a_block_corrupted_in_flight_fails_its_read_with_eio() {
    let fixture = Fixture::new();
    let proxy = fixture.proxy();
    proxy.set(Plan::WhenPath {
        contains: "/blocks/100?".into(),
        fault: Fault::CorruptBody,
    });
    let mount =
        Mount::try_new_with_env("ebs://us-east-1", &ebs_options(&proxy.url(), ""), S3_ENV).unwrap();
    let file = std::fs::File::open(mount.file(&fixture.disk())).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, random_bytes(BLOCK as usize, 1)[..4096]);

    let mut buf = vec![0u8; 4096];
    let err = file
        .read_exact_at(&mut buf, 100 * BLOCK)
        .expect_err("a corrupted block must not be served");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let tries = block_fetches(&proxy).iter().filter(|&&b| b == 100).count();
    assert_eq!(tries, 3, "fetches of the corrupted block");
    let log = mount.log_text();
    assert!(
        log.contains("checksum mismatch") && log.contains(&fixture.snapshot),
        "{log}"
    );
    // The rest of the disk still reads.
    file.read_exact_at(&mut buf, 101 * BLOCK).unwrap();
    assert_eq!(buf, random_bytes(BLOCK as usize, 102)[..4096]);
}

#[test]
fn the_throttle_holds_against_ebs() {
    let moto = Moto::start();
    let (ec2, ebs) = (ec2_client(&moto.endpoint), ebs_client(&moto.endpoint));
    let blocks: Vec<(u64, Vec<u8>)> = (0..80)
        .map(|index| (index, random_bytes(BLOCK as usize, 1000 + index)))
        .collect();
    let (snapshot, _) = block_on(write_snapshot(&ebs, &ec2, 1, &blocks));
    let mount = Mount::try_new_with_env(
        &format!("ebs://us-east-1/{snapshot}"),
        &ebs_options(&moto.endpoint, "rate=10M"),
        S3_ENV,
    )
    .unwrap();
    let file = mount.file(&format!("{snapshot}.img"));
    let reader = std::fs::File::open(&file).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let started = std::time::Instant::now();
    let mut read = 0u64;
    while read < 80 * BLOCK {
        read += reader.read_at(&mut buf, read).unwrap() as u64;
    }
    assert_rate_within("ebs", read, started.elapsed().as_secs_f64(), 10);
}

#[test]
fn bad_ebs_sources_are_one_clear_line_and_nothing_is_mounted() {
    assert_mount_fails("ebs://", "", S3_ENV, "does not name a region");
    assert_mount_fails("ebs://Nowhere", "", S3_ENV, "does not name a region");
    assert_mount_fails(
        "ebs://us-east-1",
        "region=eu-west-1",
        S3_ENV,
        "ebs://REGION names the region",
    );
    assert_mount_fails(
        "ebs://us-east-1",
        "endpoint=http://127.0.0.1:1,timeout=2",
        S3_ENV,
        "DescribeInstances in us-east-1",
    );
    let moto = Moto::start();
    assert_mount_fails(
        "ebs://us-east-1/i-0123456789abcdef0",
        &ebs_options(&moto.endpoint, ""),
        S3_ENV,
        "InvalidInstanceID.NotFound",
    );
    assert_mount_fails(
        "ebs://us-east-1/snap-0123456789abcdef0",
        &ebs_options(&moto.endpoint, ""),
        S3_ENV,
        "snap-0123456789abcdef0",
    );
}

/// The snapshots vmexportfs tagged as its own: (snapshot, instance tag,
/// description).
fn export_snapshots(ec2: &aws_sdk_ec2::Client) -> Vec<(String, String, String)> {
    block_on(async {
        let answer = ec2
            .describe_snapshots()
            .owner_ids("self")
            .filters(
                aws_sdk_ec2::types::Filter::builder()
                    .name("tag-key")
                    .values("vmexportfs:export")
                    .build(),
            )
            .send()
            .await
            .expect("DescribeSnapshots");
        answer
            .snapshots()
            .iter()
            .map(|snapshot| {
                let instance = snapshot
                    .tags()
                    .iter()
                    .find(|tag| tag.key() == Some("vmexportfs:instance"))
                    .and_then(|tag| tag.value())
                    .unwrap_or("")
                    .to_string();
                (
                    snapshot.snapshot_id().unwrap().to_string(),
                    instance,
                    snapshot.description().unwrap_or("").to_string(),
                )
            })
            .collect()
    })
}

/// The volumes attached to `instance`.
fn attached_volumes(ec2: &aws_sdk_ec2::Client, instance: &str) -> Vec<String> {
    block_on(async {
        let answer = ec2
            .describe_instances()
            .instance_ids(instance)
            .send()
            .await
            .expect("DescribeInstances");
        let mut volumes: Vec<String> = answer.reservations()[0].instances()[0]
            .block_device_mappings()
            .iter()
            .filter_map(|mapping| Some(mapping.ebs()?.volume_id()?.to_string()))
            .collect();
        volumes.sort();
        volumes
    })
}

const SNAPSHOT_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "test"),
    ("AWS_SECRET_ACCESS_KEY", "test"),
    ("AWS_REGION", "us-east-1"),
    ("VMEXPORTFS_EBS_POLL", "0.2"),
];

/// snapshot=on's EC2 calls against moto. moto keeps the snapshots EC2
/// CreateSnapshots makes apart from the EBS direct ones: ListSnapshotBlocks
/// on them answers HTTP 500, so the open that took them fails here, where
/// AWS would read them.
#[test]
fn snapshot_on_snapshots_every_volume_at_once_and_deletes_them_after_the_linger() {
    let fixture = Fixture::new();
    let ec2 = ec2_client(&fixture.moto.endpoint);
    let volumes = attached_volumes(&ec2, &fixture.instance);
    assert_eq!(
        volumes.len(),
        2,
        "the root volume and /dev/sdf: {volumes:?}"
    );
    let mount = Mount::try_new_with_env(
        "ebs://us-east-1",
        &ebs_options(
            &fixture.moto.endpoint,
            "snapshot=on,snapshot_linger=2,timeout=3",
        ),
        SNAPSHOT_ENV,
    )
    .unwrap();
    // The root volume has no snapshot, but snapshot=on takes one at open:
    // it is listed.
    let mut files: Vec<String> =
        std::fs::read_dir(mount.file(&format!("web-{}", fixture.instance)))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().into_string().unwrap())
            .collect();
    files.sort();
    assert_eq!(files.len(), 2, "{files:?}");
    let listed_snapshots = std::fs::read_dir(mount.file("snapshots")).unwrap().count();

    let disk = mount.file(&fixture.disk());
    let opened = std::thread::spawn(move || std::fs::File::open(disk).map(|_| ()));
    let mut taken = Vec::new();
    eventually("the export snapshots are taken", || {
        taken = export_snapshots(&ec2);
        !taken.is_empty()
    });
    // One CreateSnapshots for the instance: a snapshot of each volume,
    // tagged with the instance and recording this mount's process.
    assert_eq!(taken.len(), 2, "{taken:?}");
    let record = creator_record(mount.pid);
    for (snapshot, instance, description) in &taken {
        assert_eq!(instance, &fixture.instance, "{snapshot}");
        assert!(description.ends_with(&record), "{snapshot}: {description}");
    }
    let err = opened
        .join()
        .unwrap()
        .expect_err("moto cannot serve blocks of an EC2 snapshot");
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    let log = mount.log_text();
    let announced = log_lines(&mount, &["snapshot taken for the export"]);
    assert_eq!(announced.len(), 1, "{log}");
    for (snapshot, _, _) in &taken {
        assert!(announced[0].contains(snapshot.as_str()), "{announced:?}");
    }
    // The export snapshots are the mount's own, never listed as disks.
    assert_succeeded(
        &Command::new(bin())
            .arg("refresh")
            .arg(&mount.path)
            .output()
            .unwrap(),
    );
    assert_eq!(
        std::fs::read_dir(mount.file("snapshots")).unwrap().count(),
        listed_snapshots
    );

    // Closed (the open failed): deleted once snapshot_linger has passed.
    eventually("the export snapshots are deleted", || {
        export_snapshots(&ec2).is_empty()
    });
    assert_eq!(
        log_lines(&mount, &["snapshot removed", "web-"]).len(),
        1,
        "{}",
        mount.log_text()
    );
}

#[test]
fn snapshot_on_deletes_its_snapshots_at_unmount_and_a_dead_mounts_at_the_next_mount() {
    let fixture = Fixture::new();
    let ec2 = ec2_client(&fixture.moto.endpoint);
    let mount = Mount::try_new_with_env(
        "ebs://us-east-1",
        &ebs_options(
            &fixture.moto.endpoint,
            "snapshot=on,snapshot_linger=600,timeout=2",
        ),
        SNAPSHOT_ENV,
    )
    .unwrap();
    assert!(std::fs::File::open(mount.file(&fixture.disk())).is_err());
    assert_eq!(export_snapshots(&ec2).len(), 2);
    drop(mount);
    assert!(
        export_snapshots(&ec2).is_empty(),
        "unmount deletes the export snapshots"
    );

    // A snapshot recorded as taken by a process that is gone, and one by a
    // vmexportfs on another host.
    let mut exited = Command::new("true").spawn().unwrap();
    let dead = exited.id();
    exited.wait().unwrap();
    let take = |record: String| {
        block_on(async {
            let tags = aws_sdk_ec2::types::TagSpecification::builder()
                .resource_type(aws_sdk_ec2::types::ResourceType::Snapshot)
                .tags(
                    aws_sdk_ec2::types::Tag::builder()
                        .key("vmexportfs:export")
                        .value(record)
                        .build(),
                )
                .build();
            ec2.create_snapshot()
                .volume_id(&fixture.volume)
                .tag_specifications(tags)
                .send()
                .await
                .expect("CreateSnapshot")
                .snapshot_id()
                .unwrap()
                .to_string()
        })
    };
    let leftover = take(creator_record(dead));
    let elsewhere = take(creator_record(dead).replace("host=", "host=elsewhere-"));
    let mount = Mount::try_new_with_env(
        "ebs://us-east-1",
        &ebs_options(&fixture.moto.endpoint, ""),
        SNAPSHOT_ENV,
    )
    .unwrap();
    // The clean-up runs beside the mount, which does not wait for it.
    let mut removed = Vec::new();
    eventually("the leftover is deleted", || {
        removed = log_lines(&mount, &["left behind", &format!("pid {dead}")]);
        !removed.is_empty()
    });
    assert_eq!(removed.len(), 1, "{}", mount.log_text());
    assert!(removed[0].contains(&leftover), "{removed:?}");
    let left: Vec<String> = export_snapshots(&ec2)
        .into_iter()
        .map(|(id, _, _)| id)
        .collect();
    assert_eq!(left, std::slice::from_ref(&elsewhere));
    assert_eq!(
        log_lines(&mount, &["left alone", "elsewhere-", &elsewhere]).len(),
        1
    );
}
