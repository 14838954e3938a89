//! A private test CA (openssl) and nginx terminating TLS in front of a
//! plain-HTTP stand-in, for `cafile=` and certificate errors.

use std::path::{Path, PathBuf};
use std::process::Child;

use super::{free_port, require_tool, sh, spawn_nginx};

/// A fresh test CA and a 2048-bit leaf for 127.0.0.1 it signed (CA:FALSE:
/// rustls refuses a CA certificate as a server's).
pub struct TestCa {
    dir: tempfile::TempDir,
}

impl TestCa {
    pub fn new() -> TestCa {
        require_tool("openssl");
        let dir = tempfile::Builder::new()
            .prefix("vmx-tls-")
            .tempdir()
            .unwrap();
        let d = dir.path().display();
        sh(&format!(
            "cd {d} && \
             openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj '/CN=vmexportfs test CA' \
               -keyout ca.key -out ca.pem 2>/dev/null && \
             openssl req -newkey rsa:2048 -nodes -subj '/CN=127.0.0.1' \
               -keyout leaf.key -out leaf.csr 2>/dev/null && \
             printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext && \
             openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
               -extfile ext -out leaf.pem 2>/dev/null"
        ));
        TestCa { dir }
    }

    /// The CA's certificate, as `cafile=` takes it.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn leaf_cert(&self) -> PathBuf {
        self.dir.path().join("leaf.pem")
    }

    pub fn leaf_key(&self) -> PathBuf {
        self.dir.path().join("leaf.key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

pub struct TlsFront {
    child: Child,
    ca: TestCa,
    pub port: u16,
}

impl TlsFront {
    /// `https://127.0.0.1:PORT` forwarding to `http://127.0.0.1:upstream`,
    /// with a leaf signed by a fresh test CA.
    pub fn start(upstream: u16) -> TlsFront {
        require_tool("nginx");
        let ca = TestCa::new();
        let d = ca.dir().display();
        let port = free_port();
        let config = format!(
            "daemon off; master_process off; user root; worker_processes 1;\n\
             pid {d}/nginx.pid; error_log {d}/error.log;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               server {{\n\
                 listen 127.0.0.1:{port} ssl;\n\
                 ssl_certificate {d}/leaf.pem; ssl_certificate_key {d}/leaf.key;\n\
                 client_max_body_size 0; proxy_buffering off; proxy_request_buffering off;\n\
                 location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_set_header Host $http_host; }}\n\
               }}\n\
             }}\n"
        );
        let child = spawn_nginx(ca.dir(), &config, port);
        TlsFront { child, ca, port }
    }

    /// The test CA's certificate, as `cafile=` takes it.
    pub fn ca_file(&self) -> PathBuf {
        self.ca.ca_file()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
