//! Azurite, the Azure Blob stand-in, on a free loopback port, with SAS
//! tokens signed by the emulator's published well-known account key (the
//! SDK under test does no shared-key signing, so the fixture seeds through
//! SAS too).

use std::process::{Child, Command, Stdio};

use azure_core::http::{RequestContent, Url};
use azure_storage_blob::models::{BlobContainerClientCreateOptions, HttpRange, PublicAccessType};
use azure_storage_blob::BlobContainerClient;
use base64::Engine;
use hmac::{KeyInit, Mac};

use super::{block_on, free_port, require_tool, wait_for_port};

pub const ACCOUNT: &str = "devstoreaccount1";
/// Microsoft's published key for the storage emulators; not a secret.
const KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const SAS_VERSION: &str = "2020-12-06";
const EXPIRY: &str = "2099-01-01T00:00:00Z";
/// Put Page takes at most 4 MiB a call.
const MAX_PAGE_WRITE: usize = 4 << 20;

pub struct Azurite {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
    /// The account URL, as `endpoint=` takes it.
    pub endpoint: String,
}

fn sign(text: &str) -> String {
    let key = base64::engine::general_purpose::STANDARD
        .decode(KEY)
        .unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(text.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    url::form_urlencoded::byte_serialize(signature.as_bytes()).collect()
}

impl Azurite {
    pub fn start() -> Azurite {
        require_tool("azurite-blob");
        let dir = tempfile::Builder::new()
            .prefix("vmx-azurite-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let child = Command::new("azurite-blob")
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(dir.path())
            .args([
                "--loose",
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--silent",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting azurite-blob");
        wait_for_port(port);
        Azurite {
            child,
            _dir: dir,
            port,
            endpoint: format!("http://127.0.0.1:{port}/{ACCOUNT}"),
        }
    }

    /// An account SAS allowing everything on blobs and containers.
    pub fn account_sas(&self) -> String {
        self.account_sas_with("rwdlacup")
    }

    /// An account SAS with the given permissions (`rl` = read and list).
    pub fn account_sas_with(&self, permissions: &str) -> String {
        let to_sign = [
            ACCOUNT,
            permissions,
            "b",
            "sco",
            "",
            EXPIRY,
            "",
            "",
            SAS_VERSION,
            "",
            "",
        ]
        .join("\n");
        format!(
            "sv={SAS_VERSION}&ss=b&srt=sco&sp={permissions}&se={}&sig={}",
            EXPIRY.replace(':', "%3A"),
            sign(&to_sign)
        )
    }

    /// A read-only service SAS for one blob (`sr=b`), as a managed-disk
    /// export hands out.
    pub fn blob_sas(&self, container: &str, blob: &str) -> String {
        let to_sign = [
            "r",
            "",
            EXPIRY,
            &format!("/blob/{ACCOUNT}/{container}/{blob}"),
            "",
            "",
            "",
            SAS_VERSION,
            "b",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
        ]
        .join("\n");
        format!(
            "sv={SAS_VERSION}&sr=b&sp=r&se={}&sig={}",
            EXPIRY.replace(':', "%3A"),
            sign(&to_sign)
        )
    }

    fn container(&self, name: &str) -> BlobContainerClient {
        let url = Url::parse(&format!("{}/{name}?{}", self.endpoint, self.account_sas())).unwrap();
        BlobContainerClient::new(url, None, None).unwrap()
    }

    pub fn create_container(&self, name: &str, public: bool) {
        let container = self.container(name);
        let options = BlobContainerClientCreateOptions {
            access: public.then_some(PublicAccessType::Container),
            ..Default::default()
        };
        block_on(async {
            container
                .create(Some(options))
                .await
                .unwrap_or_else(|err| panic!("create container {name}: {err}"));
        });
    }

    /// Creates `container` and puts each (name, bytes) as a block blob.
    pub fn seed(&self, container: &str, blobs: &[(&str, Vec<u8>)]) {
        self.create_container(container, false);
        self.put_blobs(container, blobs);
    }

    pub fn put_blobs(&self, container: &str, blobs: &[(&str, Vec<u8>)]) {
        let client = self.container(container);
        block_on(async {
            for (name, bytes) in blobs {
                client
                    .blob_client(name)
                    .upload(RequestContent::from(bytes.clone()), None)
                    .await
                    .unwrap_or_else(|err| panic!("upload {name}: {err}"));
            }
        });
    }

    /// A page blob of `size` bytes with only `regions` (offset, bytes;
    /// 512-aligned) written; the rest was never written.
    pub fn put_page_blob(&self, container: &str, name: &str, size: u64, regions: &[(u64, &[u8])]) {
        let blob = self
            .container(container)
            .blob_client(name)
            .page_blob_client();
        block_on(async {
            blob.create(size, None)
                .await
                .unwrap_or_else(|err| panic!("create page blob {name}: {err}"));
            for (offset, bytes) in regions {
                for (i, piece) in bytes.chunks(MAX_PAGE_WRITE).enumerate() {
                    let at = offset + (i * MAX_PAGE_WRITE) as u64;
                    blob.upload_pages(
                        RequestContent::from(piece.to_vec()),
                        piece.len() as u64,
                        HttpRange::new(at, piece.len() as u64),
                        None,
                    )
                    .await
                    .unwrap_or_else(|err| panic!("put pages {name} at {at}: {err}"));
                }
            }
        });
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
