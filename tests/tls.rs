//! TLS to a private endpoint: `cafile=` makes a certificate from a private
//! CA trusted, an untrusted one fails the mount with one line, `insecure`
//! works (with a warning) where the transport allows it and is refused
//! where it does not.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::tls::TlsFront;
use common::*;

#[test]
fn an_https_manifest_needs_its_private_ca() {
    let (www, nginx) = serve_one_disk(3 * MIB, 21);
    let front = TlsFront::start(nginx.port);
    let source = format!("{}/manifest.json", front.url());
    assert_mount_fails(&source, "", &[], "certificate");
    let mount = Mount::new(&source, &format!("cafile={}", front.ca_file().display()));
    assert!(
        std::fs::read(mount.file("vm/disk.raw")).unwrap()
            == std::fs::read(www.path().join("disk.raw")).unwrap()
    );
    drop(mount);
    let mount = Mount::new(&source, "insecure");
    assert!(std::fs::metadata(mount.file("vm/disk.raw")).is_ok());
    assert!(
        mount.log_text().contains("verification is off"),
        "{}",
        mount.log_text()
    );
}

#[test]
fn s3_trusts_a_private_ca_given_with_cafile() {
    let moto = Moto::start();
    let original = random_bytes(5 * MIB as usize, 22);
    moto.seed("vms", &[("disk.raw", original.clone())]);
    let moto_port: u16 = moto.endpoint.rsplit(':').next().unwrap().parse().unwrap();
    let front = TlsFront::start(moto_port);
    let endpoint = format!("endpoint={}", front.url());
    assert_mount_fails("s3://vms", &endpoint, S3_ENV, "certificate");
    assert_mount_fails(
        "s3://vms",
        &format!("{endpoint},insecure"),
        S3_ENV,
        "insecure is not supported for s3://",
    );
    let mount = Mount::try_new_with_env(
        "s3://vms",
        &format!("{endpoint},cafile={}", front.ca_file().display()),
        S3_ENV,
    )
    .unwrap();
    assert!(std::fs::read(mount.file("disk.raw")).unwrap() == original);
}

#[test]
fn azure_trusts_a_private_ca_given_with_cafile() {
    let azurite = Azurite::start();
    let original = random_bytes(5 * MIB as usize, 23);
    azurite.seed("vms", &[("disk.raw", original.clone())]);
    let front = TlsFront::start(azurite.port);
    let sas = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(sas.path(), azurite.account_sas_with("rl")).unwrap();
    std::fs::set_permissions(sas.path(), std::fs::Permissions::from_mode(0o600)).unwrap();
    let options = format!(
        "endpoint={}/devstoreaccount1,credentials={}",
        front.url(),
        sas.path().display()
    );
    let source = "az://devstoreaccount1/vms";
    assert_mount_fails(source, &options, &[], "certificate");
    let mount = Mount::new(
        source,
        &format!("{options},cafile={}", front.ca_file().display()),
    );
    assert!(std::fs::read(mount.file("disk.raw")).unwrap() == original);
    drop(mount);
    let mount = Mount::new(source, &format!("{options},insecure"));
    assert!(std::fs::read(mount.file("disk.raw")).unwrap() == original);
    assert!(mount.log_text().contains("verification is off"));
}

#[test]
fn gcs_refuses_tls_options_it_cannot_honour() {
    let gcs = FakeGcs::start();
    for option in ["cafile=/etc/ssl/certs/ca-certificates.crt", "insecure"] {
        assert_mount_fails(
            "gs://exports",
            &format!("endpoint={},anonymous,{option}", gcs.endpoint),
            &[],
            "not supported for gs://",
        );
    }
}
