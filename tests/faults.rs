//! Fault injection between a mount and its stand-in: dropped connections,
//! 500/503 answers, bodies cut short and bodies that stall. Copies still
//! come out identical; a fault that never ends becomes EIO, not a hang.

mod common;

use std::os::unix::fs::FileExt;

use common::faults::{
    assert_copy_survives_faults, assert_permanent_fault_is_eio, FaultProxy, Plan,
};
use common::*;

#[test]
fn http_copies_survive_every_kind_of_transient_fault() {
    let (www, nginx) = serve_one_disk(40 * MIB, 11);
    let proxy = FaultProxy::start(nginx.port);
    let mount = Mount::new(&format!("{}/manifest.json", proxy.url()), "stall_timeout=2");
    assert_copy_survives_faults(
        &proxy,
        2,
        &mount.file("vm/disk.raw"),
        &std::fs::read(www.path().join("disk.raw")).unwrap(),
    );
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
    assert_copy_survives_faults(&proxy, 2, &mount.file("disk.raw"), &original);
}

#[test]
fn a_permanent_fault_becomes_eio_not_a_hang() {
    let (_www, nginx) = serve_one_disk(8 * MIB, 13);
    let proxy = FaultProxy::start(nginx.port);
    let mount = Mount::new(&format!("{}/manifest.json", proxy.url()), "stall_timeout=2");
    let elapsed = assert_permanent_fault_is_eio(&proxy, &mount.file("vm/disk.raw"), 4 * MIB);
    eprintln!("measured: permanent 503 → EIO after {elapsed:?}");
    let log = mount.log_text();
    assert!(log.contains("/vm/disk.raw") && log.contains("503"), "{log}");
    // The mount is still up and serves again once the fault clears.
    proxy.set(Plan::PassThrough);
    let mut buf = vec![0u8; 4096];
    std::fs::File::open(mount.file("vm/disk.raw"))
        .unwrap()
        .read_exact_at(&mut buf, 4 * MIB)
        .unwrap();
}
