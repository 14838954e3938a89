//! Fault injection between a mount and its stand-in: dropped connections,
//! 500/503 answers, bodies cut short and bodies that stall. Copies still
//! come out identical; a fault that never ends becomes EIO, not a hang.

mod common;

use std::time::{Duration, Instant};

use common::faults::{Fault, FaultProxy, Plan};
use common::*;

const EVERY_KIND: [Fault; 5] = [
    Fault::Drop,
    Fault::Status(503),
    Fault::Status(500),
    Fault::CutBody,
    Fault::Stall,
];

fn assert_identical(copy: &std::path::Path, original: &[u8]) {
    let bytes = std::fs::read(copy).unwrap();
    assert!(bytes == original, "{copy:?} differs from the source");
}

#[test]
fn http_copies_survive_every_kind_of_transient_fault() {
    let (www, nginx) = serve_one_disk(30 * MIB, 11);
    let proxy = FaultProxy::start(nginx.port);
    let mount = Mount::new(&format!("{}/manifest.json", proxy.url()), "stall_timeout=2");
    proxy.set(Plan::Every {
        every: 3,
        faults: EVERY_KIND.to_vec(),
    });
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "cp '{}' '{}/'",
        mount.file("vm/disk.raw").display(),
        out.path().display()
    ));
    assert_identical(
        &out.path().join("disk.raw"),
        &std::fs::read(www.path().join("disk.raw")).unwrap(),
    );
    let injected = proxy
        .faults_injected
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(injected >= 5, "only {injected} faults injected");
    assert!(
        mount.log_text().contains("retrying"),
        "{}",
        mount.log_text()
    );
}

#[test]
fn s3_copies_survive_every_kind_of_transient_fault() {
    let moto = Moto::start();
    let original = random_bytes(24 * MIB as usize, 12);
    moto.seed("vms", &[("disk.raw", original.clone())]);
    let moto_port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let proxy = FaultProxy::start(moto_port);
    let mount = Mount::try_new_with_env(
        "s3://vms",
        &format!("endpoint={},stall_timeout=2", proxy.url()),
        S3_ENV,
    )
    .unwrap();
    proxy.set(Plan::Every {
        every: 2,
        faults: EVERY_KIND.to_vec(),
    });
    let out = tempfile::tempdir().unwrap();
    sh(&format!(
        "cp '{}' '{}/'",
        mount.file("disk.raw").display(),
        out.path().display()
    ));
    assert_identical(&out.path().join("disk.raw"), &original);
    let injected = proxy
        .faults_injected
        .load(std::sync::atomic::Ordering::SeqCst);
    assert!(injected >= 5, "only {injected} faults injected");
}

#[test]
fn a_permanent_fault_becomes_eio_not_a_hang() {
    let (_www, nginx) = serve_one_disk(8 * MIB, 13);
    let proxy = FaultProxy::start(nginx.port);
    let mount = Mount::new(&format!("{}/manifest.json", proxy.url()), "stall_timeout=2");
    let file = std::fs::File::open(mount.file("vm/disk.raw")).unwrap();
    proxy.set(Plan::Always(Fault::Status(503)));
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    use std::os::unix::fs::FileExt;
    let err = file
        .read_exact_at(&mut buf, 4 * MIB)
        .expect_err("every request fails");
    let elapsed = started.elapsed();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert!(
        elapsed < Duration::from_secs(40),
        "gave up only after {elapsed:?}"
    );
    eprintln!("measured: permanent 503 → EIO after {elapsed:?}");
    let log = mount.log_text();
    assert!(log.contains("/vm/disk.raw") && log.contains("503"), "{log}");
    // The mount is still up and serves again once the fault clears.
    proxy.set(Plan::PassThrough);
    file.read_exact_at(&mut buf, 4 * MIB).unwrap();
}
