//! `az://` against Azurite, the Azure Blob stand-in, through real mounts:
//! block and page blobs, SAS from a file or the source, anonymous, a
//! blob-scoped SAS, holes, throttle, overwrite, faults and bad inputs.

mod common;

use std::os::unix::fs::{FileExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use common::faults::{assert_copy_survives_faults, assert_permanent_fault_is_eio, FaultProxy};
use common::*;

const SOURCE: &str = "az://devstoreaccount1/vms";

/// A SAS token in a 0600 file, as `credentials=` takes it.
fn sas_file(azurite: &Azurite) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        file.path(),
        format!("?{}\n", azurite.account_sas_with("rl")),
    )
    .unwrap();
    std::fs::set_permissions(file.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    file
}

fn options(endpoint: &str, sas: &tempfile::NamedTempFile, extra: &str) -> String {
    with_options(
        format!("endpoint={endpoint},credentials={}", sas.path().display()),
        extra,
    )
}

#[test]
fn listing_and_rsync_match_the_container() {
    let azurite = Azurite::start();
    let blobs = object_store_fixture();
    azurite.seed("vms", &blobs);
    let page = random_bytes(MIB as usize, 5);
    azurite.put_page_blob("vms", "exports/db/os.vhd", 8 * MIB, &[(2 * MIB, &page)]);
    let sas = sas_file(&azurite);
    let mount = Mount::new(
        &format!("{SOURCE}/exports"),
        &options(&azurite.endpoint, &sas, ""),
    );

    assert_eq!(
        listing_with_sizes(&mount),
        object_store_listing(&["./db/os.vhd 8388608"])
    );
    let ls = sh(&format!("ls -lR '{}'", mount.path.display()));
    assert!(
        ls.contains("20983865") && ls.contains("disk 0.vmdk"),
        "{ls}"
    );

    let mut expected_page_blob = vec![0u8; 8 * MIB as usize];
    expected_page_blob[2 * MIB as usize..3 * MIB as usize].copy_from_slice(&page);
    let mut expected = blobs[..4].to_vec();
    expected.push(("exports/db/os.vhd", expected_page_blob));
    assert_rsync_copies(&mount, "exports/", &expected);
}

#[test]
fn a_sas_in_the_source_never_reaches_proc_mounts_or_the_log() {
    let azurite = Azurite::start();
    let original = random_bytes(3 * MIB as usize, 6);
    azurite.seed("vms", &[("disk.raw", original.clone())]);
    let sas = azurite.account_sas_with("rl");
    let signature = sas.split("sig=").nth(1).unwrap().to_string();
    let mount = Mount::try_new_with_env(
        "-",
        &format!("endpoint={}", azurite.endpoint),
        &[("VMEXPORTFS_SOURCE", &format!("{SOURCE}?{sas}"))],
    )
    .unwrap();
    assert!(std::fs::read(mount.file("disk.raw")).unwrap() == original);
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let line = mounts
        .lines()
        .find(|l| l.contains(&*mount.path.to_string_lossy()))
        .unwrap();
    assert!(line.starts_with(&format!("{SOURCE}?<redacted> ")), "{line}");
    assert!(!mounts.contains(&signature));
    assert!(
        !mount.log_text().contains(&signature),
        "{}",
        mount.log_text()
    );
}

#[test]
fn a_public_container_mounts_anonymously() {
    let azurite = Azurite::start();
    azurite.create_container("public", true);
    let original = random_bytes(MIB as usize + 7, 7);
    azurite.put_blobs("public", &[("vm/disk.raw", original.clone())]);
    let mount = Mount::new(
        "az://devstoreaccount1/public",
        &format!("endpoint={},anonymous", azurite.endpoint),
    );
    assert!(std::fs::read(mount.file("vm/disk.raw")).unwrap() == original);
}

#[test]
fn a_blob_scoped_sas_mounts_that_one_blob() {
    let azurite = Azurite::start();
    let original = random_bytes(5 * MIB as usize, 8);
    azurite.seed(
        "vhds",
        &[("abcd.vhd", original.clone()), ("other.vhd", vec![1; 512])],
    );
    let sas = azurite.blob_sas("vhds", "abcd.vhd");
    let mount = Mount::try_new_with_env(
        "-",
        &format!("endpoint={}", azurite.endpoint),
        &[(
            "VMEXPORTFS_SOURCE",
            &format!("az://devstoreaccount1/vhds/abcd.vhd?{sas}"),
        )],
    )
    .unwrap();
    let names = sh(&format!("ls '{}'", mount.path.display()));
    assert_eq!(names.trim(), "abcd.vhd");
    assert!(std::fs::read(mount.file("abcd.vhd")).unwrap() == original);
}

#[test]
fn a_blob_overwritten_under_a_reader_fails_with_eio() {
    let azurite = Azurite::start();
    let original = random_bytes(24 * MIB as usize, 9);
    azurite.seed("vms", &[("disk.raw", original.clone())]);
    let sas = sas_file(&azurite);
    let mount = Mount::new(SOURCE, &options(&azurite.endpoint, &sas, ""));
    let file = std::fs::File::open(mount.file("disk.raw")).unwrap();
    let mut head = vec![0u8; 4096];
    file.read_exact_at(&mut head, 0).unwrap();
    assert_eq!(head, original[..4096]);

    azurite.put_blobs("vms", &[("disk.raw", random_bytes(24 * MIB as usize, 10))]);
    assert_changed_read_is_eio(&mount, &file, "disk.raw", 20 * MIB);
}

#[test]
fn the_throttle_holds_against_azure() {
    let azurite = Azurite::start();
    azurite.seed("vms", &[("disk.raw", random_bytes(48 * MIB as usize, 11))]);
    let sas = sas_file(&azurite);
    let mount = Mount::new(SOURCE, &options(&azurite.endpoint, &sas, "rate=10M"));
    assert_rate_holds("azure", &mount.file("disk.raw"), 48 * MIB, 10);
}

fn seek(fd: i32, offset: u64, whence: i32) -> Option<u64> {
    let at = unsafe { libc::lseek(fd, offset as libc::off_t, whence) };
    (at >= 0).then_some(at as u64)
}

/// (start, end) of each data extent, walked with SEEK_DATA/SEEK_HOLE.
fn data_extents(path: &std::path::Path) -> Vec<(u64, u64)> {
    let file = std::fs::File::open(path).unwrap();
    let fd = file.as_raw_fd();
    let mut extents = Vec::new();
    let mut at = 0;
    while let Some(start) = seek(fd, at, libc::SEEK_DATA) {
        let end = seek(fd, start, libc::SEEK_HOLE).unwrap();
        extents.push((start, end));
        at = end;
    }
    extents
}

#[test]
fn a_sparse_page_blob_copies_fast_with_no_fetch_for_its_holes() {
    let azurite = Azurite::start();
    azurite.create_container("disks", false);
    const SIZE: u64 = 6 << 30;
    // A VHD-like layout: data at the start, two islands, the footer.
    let regions: Vec<(u64, Vec<u8>)> = vec![
        (0, random_bytes(4 * MIB as usize, 12)),
        ((1 << 30) + 512 * 1024, random_bytes(3 * MIB as usize, 13)),
        (5 << 30, random_bytes(MIB as usize, 14)),
        (SIZE - 512, random_bytes(512, 15)),
    ];
    let borrowed: Vec<(u64, &[u8])> = regions.iter().map(|(at, b)| (*at, b.as_slice())).collect();
    azurite.put_page_blob("disks", "export.vhd", SIZE, &borrowed);
    let proxy = FaultProxy::start(azurite.port);
    let sas = sas_file(&azurite);
    let endpoint = format!("{}/devstoreaccount1", proxy.url());
    let mount = Mount::new("az://devstoreaccount1/disks", &options(&endpoint, &sas, ""));
    let on_mount = mount.file("export.vhd");
    let meta = std::fs::metadata(&on_mount).unwrap();
    assert_eq!(meta.len(), SIZE);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < SIZE / 100,
        "st_blocks {} should show the holes",
        meta.blocks()
    );

    let written: Vec<(u64, u64)> = regions
        .iter()
        .map(|(at, bytes)| (*at, at + bytes.len() as u64))
        .collect();
    assert_eq!(
        data_extents(&on_mount),
        written,
        "SEEK_DATA/SEEK_HOLE on the mount"
    );

    let out = tempfile::tempdir().unwrap();
    let started = Instant::now();
    sh(&format!(
        "cp --sparse=always '{}' '{}/'",
        on_mount.display(),
        out.path().display()
    ));
    let elapsed = started.elapsed();
    eprintln!("measured: cp --sparse=always of a 6 GiB page blob with 8 MiB written: {elapsed:?}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    let data: u64 = written.iter().map(|(s, e)| e - s).sum();
    let fetched = fetched_bytes(&proxy, &written);
    eprintln!("measured: cp fetched {fetched} bytes for {data} bytes of data in a 6 GiB blob");
    assert_eq!(fetched, data, "cp fetched exactly the written bytes");

    let copy = out.path().join("export.vhd");
    let copy_meta = std::fs::metadata(&copy).unwrap();
    assert_eq!(copy_meta.len(), SIZE);
    assert!(
        copy_meta.blocks() * 512 < 64 * MIB,
        "the copy is not sparse"
    );
    let copied = std::fs::File::open(&copy).unwrap();
    for (at, bytes) in &regions {
        let mut back = vec![0u8; bytes.len()];
        copied.read_exact_at(&mut back, *at).unwrap();
        assert!(&back == bytes, "region at {at} differs");
    }
    // Everything outside the regions is zeros in the copy: its own data
    // extents lie within the written regions.
    for (start, end) in data_extents(&copy) {
        assert!(
            written
                .iter()
                .any(|(s, e)| *s <= start + 4096 && end <= e + 4096),
            "copy has data at {start}..{end} outside the written regions"
        );
    }
    // A hole read through the mount is zeros.
    let file = std::fs::File::open(&on_mount).unwrap();
    let mut hole = vec![1u8; MIB as usize];
    file.read_exact_at(&mut hole, 3 << 30).unwrap();
    assert!(hole.iter().all(|&b| b == 0));

    // qemu-img finds the holes with lseek too: the qcow2 holds the data only.
    require_tool("qemu-img");
    let started = Instant::now();
    let qcow2 = out.path().join("export.qcow2");
    sh(&format!(
        "qemu-img convert -f raw -O qcow2 '{}' '{}'",
        on_mount.display(),
        qcow2.display()
    ));
    eprintln!(
        "measured: qemu-img convert to qcow2: {:?}",
        started.elapsed()
    );
    let qcow2_size = std::fs::metadata(&qcow2).unwrap().len();
    assert!(qcow2_size < 32 * MIB, "qcow2 is {qcow2_size} bytes");
    let info = sh(&format!("qemu-img info '{}'", qcow2.display()));
    assert!(info.contains("virtual size: 6 GiB"), "{info}");

    // rsync --sparse reads the holes (as zeros, with no fetch) and writes
    // them back as holes.
    require_tool("rsync");
    let started = Instant::now();
    let synced = out.path().join("rsynced.vhd");
    sh(&format!(
        "rsync --sparse '{}' '{}'",
        on_mount.display(),
        synced.display()
    ));
    eprintln!("measured: rsync --sparse: {:?}", started.elapsed());
    let synced_meta = std::fs::metadata(&synced).unwrap();
    assert_eq!(synced_meta.len(), SIZE);
    assert!(
        synced_meta.blocks() * 512 < 64 * MIB,
        "rsync's copy is not sparse"
    );

    // Every ranged GET touched only written regions; the data was fetched
    // once by cp, and the later readers re-fetched at most the data again
    // (cp's blocks were freed behind it as it read them).
    let data: u64 = written.iter().map(|(s, e)| e - s).sum();
    let fetched = fetched_bytes(&proxy, &written);
    eprintln!("measured: cp, qemu-img and rsync fetched {fetched} bytes for {data} bytes of data");
    assert!(fetched <= 3 * data, "fetched {fetched} bytes");
}

/// Bytes of all ranged blob GETs seen by `proxy`; each must lie inside one
/// of the `written` regions.
fn fetched_bytes(proxy: &FaultProxy, written: &[(u64, u64)]) -> u64 {
    let heads = proxy.heads.lock().unwrap().clone();
    let mut fetched = 0;
    for head in heads
        .iter()
        .filter(|h| h.starts_with("GET ") && !h.contains("comp="))
    {
        let Some(range) = head.lines().find_map(|line| {
            let line = line.to_ascii_lowercase();
            line.strip_prefix("x-ms-range: bytes=")
                .or_else(|| line.strip_prefix("range: bytes="))
                .map(str::to_string)
        }) else {
            continue;
        };
        let (a, b) = range.trim().split_once('-').unwrap();
        let (a, b): (u64, u64) = (a.parse().unwrap(), b.parse().unwrap());
        fetched += b + 1 - a;
        assert!(
            written.iter().any(|(s, e)| *s <= a && b < *e),
            "fetched {a}-{b}, beyond the written regions"
        );
    }
    fetched
}

#[test]
fn azure_copies_survive_every_kind_of_transient_fault() {
    let azurite = Azurite::start();
    let original = random_bytes(24 * MIB as usize, 16);
    azurite.seed("vms", &[("disk.raw", original.clone())]);
    let proxy = FaultProxy::start(azurite.port);
    let sas = sas_file(&azurite);
    let endpoint = format!("{}/devstoreaccount1", proxy.url());
    let mount = Mount::new(SOURCE, &options(&endpoint, &sas, "stall_timeout=2"));
    assert_copy_survives_faults(&proxy, 2, &mount.file("disk.raw"), &original);
    assert_permanent_fault_is_eio(&proxy, &mount.file("disk.raw"), 12 * MIB + 5);
}

#[test]
fn bad_azure_sources_are_one_clear_line_and_nothing_is_mounted() {
    let azurite = Azurite::start();
    azurite.seed("vms", &[("x.raw", vec![1, 2, 3])]);
    let sas = sas_file(&azurite);
    let wrong_key = tempfile::NamedTempFile::new().unwrap();
    let forged = azurite.account_sas_with("rl").replace("sig=", "sig=AAAA");
    std::fs::write(wrong_key.path(), forged).unwrap();
    std::fs::set_permissions(wrong_key.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let open_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(open_file.path(), azurite.account_sas_with("rl")).unwrap();
    std::fs::set_permissions(open_file.path(), std::fs::Permissions::from_mode(0o644)).unwrap();
    let dead = format!("http://127.0.0.1:{}/devstoreaccount1", free_port());
    let cases = [
        (
            "az://devstoreaccount1/nosuch".to_string(),
            options(&azurite.endpoint, &sas, ""),
            "container does not exist",
        ),
        (
            SOURCE.to_string(),
            options(&azurite.endpoint, &wrong_key, ""),
            "access denied",
        ),
        (
            SOURCE.to_string(),
            options(&azurite.endpoint, &open_file, ""),
            "readable by group or others",
        ),
        (SOURCE.to_string(), options(&dead, &sas, ""), "refused"),
        (
            SOURCE.to_string(),
            format!("endpoint={}", azurite.endpoint),
            "Entra ID needs an https endpoint",
        ),
        (
            "az://devstoreaccount1".to_string(),
            options(&azurite.endpoint, &sas, ""),
            "not an Azure blob source",
        ),
        (
            "az://Dev_Store/vms".to_string(),
            options(&azurite.endpoint, &sas, ""),
            "not an Azure blob source",
        ),
    ];
    for (source, options, expected) in cases {
        assert_mount_fails(&source, &options, &[], expected);
    }
}
