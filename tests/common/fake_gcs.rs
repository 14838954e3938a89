//! fake-gcs-server, the GCS stand-in, on a free loopback port; seeded over
//! its JSON API.

use std::process::{Child, Command, Stdio};

use super::{block_on, free_port, require_tool, wait_for_port};

pub struct FakeGcs {
    child: Child,
    _dir: tempfile::TempDir,
    pub port: u16,
    pub endpoint: String,
}

impl FakeGcs {
    pub fn start() -> FakeGcs {
        require_tool("fake-gcs-server");
        let dir = tempfile::Builder::new()
            .prefix("vmx-fake-gcs-")
            .tempdir()
            .unwrap();
        let port = free_port();
        let endpoint = format!("http://127.0.0.1:{port}");
        let child = Command::new("fake-gcs-server")
            .args(["-scheme", "http", "-host", "127.0.0.1"])
            .args(["-port", &port.to_string()])
            .args(["-backend", "filesystem", "-filesystem-root"])
            .arg(dir.path())
            .args(["-external-url", &endpoint, "-log-level", "error"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting fake-gcs-server");
        wait_for_port(port);
        FakeGcs {
            child,
            _dir: dir,
            port,
            endpoint,
        }
    }

    pub fn create_bucket(&self, bucket: &str) {
        let url = format!("{}/storage/v1/b", self.endpoint);
        block_on(async {
            let response = reqwest::Client::new()
                .post(url)
                .body(format!("{{\"name\":\"{bucket}\"}}"))
                .header("content-type", "application/json")
                .send()
                .await
                .unwrap();
            assert!(
                response.status().is_success(),
                "create bucket: {response:?}"
            );
        });
    }

    /// Creates `bucket` and puts each (name, bytes).
    pub fn seed(&self, bucket: &str, objects: &[(&str, Vec<u8>)]) {
        self.create_bucket(bucket);
        self.put_objects(bucket, objects);
    }

    pub fn put_objects(&self, bucket: &str, objects: &[(&str, Vec<u8>)]) {
        let client = reqwest::Client::new();
        block_on(async {
            for (name, bytes) in objects {
                let mut url =
                    url::Url::parse(&format!("{}/upload/storage/v1/b/{bucket}/o", self.endpoint))
                        .unwrap();
                url.query_pairs_mut()
                    .append_pair("uploadType", "media")
                    .append_pair("name", name);
                let response = client
                    .post(url)
                    .header("content-type", "application/octet-stream")
                    .body(bytes.clone())
                    .send()
                    .await
                    .unwrap();
                assert!(
                    response.status().is_success(),
                    "upload {name}: {response:?}"
                );
            }
        });
    }
}

impl Drop for FakeGcs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
