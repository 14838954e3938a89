//! `http(s)://host/path/manifest.json`: disks listed in a JSON manifest and
//! read with Range GETs from any HTTP server (pre-signed URLs, SAS URLs,
//! nginx, object-store gateways).
//!
//! ```json
//! {"vms": [{"name": "web-01",
//!           "disks": [{"name": "disk-0.vmdk", "url": "web-01/disk-0.vmdk", "size": 1073741824}]}]}
//! ```
//!
//! `url` may be relative to the manifest and must be http or https; `size`
//! may be left out. Listing sends no request for a disk whose size the
//! manifest gives (its mtime is then the manifest's Last-Modified): S3 SigV4
//! and GCS signed URLs are bound to GET, and a HEAD of them gets 403. A disk
//! without a size, and every disk at open, is asked with HEAD; a HEAD
//! answered 403, 405 or 501 is followed by `GET Range: bytes=0-0` (size from
//! the Content-Range total, validators from its headers). The version is the
//! strong ETag when the server sends one (sent back as `If-Match`), else
//! Last-Modified (`If-Unmodified-Since`), else the size; every answer is
//! also checked against them and against the pinned size
//! ([`super::http_range`] holds the rule).

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::{StreamExt, TryStreamExt};
use reqwest::header::{
    HeaderMap, CONTENT_LENGTH, CONTENT_RANGE, ETAG, IF_MATCH, IF_UNMODIFIED_SINCE, LAST_MODIFIED,
    RANGE,
};
use reqwest::StatusCode;
use serde::Deserialize;
use url::Url;

use super::http_range::{Answer, Expected, RangeClient, Ranged};
use super::{
    causes, is_transient_status, redact_url, DiskEntry, Inventory, Pinned, Provider, ProviderError,
    Version,
};
use crate::options::MountOptions;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    vms: Vec<ManifestVm>,
}

#[derive(Debug, Deserialize)]
struct ManifestVm {
    name: String,
    #[serde(default)]
    disks: Vec<ManifestDisk>,
}

#[derive(Debug, Deserialize)]
struct ManifestDisk {
    name: String,
    url: String,
    /// Any JSON number, so that a negative, fractional or huge one gets a
    /// message naming the disk rather than serde's.
    #[serde(default)]
    size: Option<serde_json::Number>,
}

pub struct HttpProvider {
    manifest_url: Url,
    client: reqwest::Client,
    /// Block fetches of `http://` disks, straight into the block's buffer.
    ranges: RangeClient,
}

const MANIFEST_HEADS_AT_ONCE: usize = 16;
/// A manifest lists disks; one larger than this is not a manifest.
const MAX_MANIFEST: u64 = 64 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const USER_AGENT: &str = concat!("vmexportfs/", env!("CARGO_PKG_VERSION"));

impl HttpProvider {
    pub fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let manifest_url = Url::parse(source).map_err(|err| {
            ProviderError::Config(format!(
                "'{}' is not a valid URL: {err}",
                redact_url(source)
            ))
        })?;
        if manifest_url.host_str().is_none_or(str::is_empty) {
            return Err(ProviderError::Config(format!(
                "'{}' has no host",
                redact_url(source)
            )));
        }
        Ok(HttpProvider {
            manifest_url,
            client: build_client(options)?,
            ranges: RangeClient::new(CONNECT_TIMEOUT, options.stall_timeout, USER_AGENT),
        })
    }

    /// The size (when the server tells it) and the headers of `url`: HEAD,
    /// or, when HEAD is refused (pre-signed URLs are bound to GET), a
    /// one-byte ranged GET.
    async fn stat(&self, url: &str) -> Result<(Option<u64>, HeaderMap), ProviderError> {
        let response = self
            .client
            .head(url)
            .send()
            .await
            .map_err(|err| transport_error(url, err))?;
        match response.status() {
            status @ (StatusCode::FORBIDDEN
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED) => self.probe(url, status).await,
            status => {
                check_status(url, status)?;
                Ok((
                    content_length(response.headers()),
                    response.headers().clone(),
                ))
            }
        }
    }

    /// `GET Range: bytes=0-0`, after HEAD answered `head_status`.
    async fn probe(
        &self,
        url: &str,
        head_status: StatusCode,
    ) -> Result<(Option<u64>, HeaderMap), ProviderError> {
        tracing::debug!(url = %redact_url(url), "HEAD answered {head_status}; probing with GET bytes=0-0");
        let mut response = self
            .client
            .get(url)
            .header(RANGE, "bytes=0-0")
            .send()
            .await
            .map_err(|err| transport_error(url, err))?;
        let status = response.status();
        let headers = response.headers().clone();
        let total = headers
            .get(CONTENT_RANGE)
            .and_then(|v| content_range_total(v.to_str().ok()?));
        match status {
            StatusCode::PARTIAL_CONTENT => {
                // One byte, read and discarded; a longer body is not read on.
                let mut got = 0;
                while got <= 1 {
                    match response.chunk().await {
                        Ok(Some(chunk)) => got += chunk.len(),
                        _ => break,
                    }
                }
                Ok((total, headers))
            }
            // Ignores Range: the size is the whole body's, which is left
            // unread (reads will then say the server ignores Range).
            StatusCode::OK => Ok((content_length(&headers), headers)),
            // An empty object has no byte 0: `Content-Range: bytes */0`.
            StatusCode::RANGE_NOT_SATISFIABLE if total.is_some() => Ok((total, headers)),
            status => Err(status_error(
                url,
                status,
                &format!("HEAD answered {head_status} and GET bytes=0-0 answered {status}"),
            )),
        }
    }

    /// The disk entry for one manifest disk whose size the manifest leaves
    /// out: asked of the server.
    async fn describe(&self, path: Vec<String>, url: Url) -> Result<DiskEntry, ProviderError> {
        let (size, headers) = self.stat(url.as_str()).await?;
        let size = size.ok_or_else(|| {
            ProviderError::Protocol(format!(
                "{}: no size in the manifest, and the server tells none (no Content-Length or Content-Range total)",
                redact_url(url.as_str())
            ))
        })?;
        check_size(size, || redact_url(url.as_str()))?;
        Ok(DiskEntry {
            path,
            size,
            mtime: http_date(&headers, LAST_MODIFIED).unwrap_or(SystemTime::UNIX_EPOCH),
            version: Self::version_from(&headers, size),
            locator: url.to_string(),
            allocated: None,
        })
    }

    /// The manifest's bytes (at most [`MAX_MANIFEST`]) and Last-Modified.
    async fn fetch_manifest(&self) -> Result<(BytesMut, Option<SystemTime>), ProviderError> {
        let url = self.manifest_url.as_str();
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|err| transport_error(url, err))?;
        check_status(url, response.status())?;
        let too_big = || {
            ProviderError::Protocol(format!(
                "manifest {}: larger than {} MiB, refused",
                redact_url(url),
                MAX_MANIFEST >> 20
            ))
        };
        if content_length(response.headers()).is_some_and(|n| n > MAX_MANIFEST) {
            return Err(too_big());
        }
        let mtime = http_date(response.headers(), LAST_MODIFIED);
        let mut body = BytesMut::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|err| transport_error(url, err))?
        {
            if (body.len() + chunk.len()) as u64 > MAX_MANIFEST {
                return Err(too_big());
            }
            body.extend_from_slice(&chunk);
        }
        Ok((body, mtime))
    }

    /// The URL of one manifest disk, which must be http(s) without
    /// credentials (they would reach logs and `status`).
    fn disk_url(&self, vm: &str, disk: &ManifestDisk) -> Result<Url, ProviderError> {
        let bad = |why: String| {
            ProviderError::Protocol(format!(
                "manifest {}: disk {:?} of VM {vm:?}: {why}",
                redact_url(self.manifest_url.as_str()),
                disk.name
            ))
        };
        let url = self
            .manifest_url
            .join(&disk.url)
            .map_err(|err| bad(format!("bad url: {err}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "url scheme '{}:' is not http or https",
                url.scheme()
            )));
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(bad("the url has no host".to_string()));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(bad(
                "credentials in the url (user@ or user:password@) are refused; use a pre-signed url"
                    .to_string(),
            ));
        }
        Ok(url)
    }

    pub(super) fn version_from(headers: &HeaderMap, size: u64) -> Version {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        Version::from_etag(text(ETAG))
            .or_else(|| Some(Version::Modified(text(LAST_MODIFIED)?.trim().to_string())))
            .unwrap_or(Version::Size(size))
    }
}

/// A manifest size: a whole number of bytes that a file size (`off_t`) holds.
fn manifest_size(
    number: &serde_json::Number,
    disk: impl FnOnce() -> String,
) -> Result<u64, ProviderError> {
    match number.as_u64() {
        Some(size) => check_size(size, disk).map(|()| size),
        None => Err(ProviderError::Protocol(format!(
            "{}: size {number} is not a byte count from 0 to {}",
            disk(),
            i64::MAX
        ))),
    }
}

/// Sizes above i64::MAX do not fit a file size.
fn check_size(size: u64, disk: impl FnOnce() -> String) -> Result<(), ProviderError> {
    if size > i64::MAX as u64 {
        return Err(ProviderError::Protocol(format!(
            "{}: size {size} is above the largest file size ({})",
            disk(),
            i64::MAX
        )));
    }
    Ok(())
}

fn http_date(headers: &HeaderMap, name: reqwest::header::HeaderName) -> Option<SystemTime> {
    httpdate::parse_http_date(headers.get(name)?.to_str().ok()?).ok()
}

/// The total of `bytes A-B/TOTAL` or `bytes */TOTAL`.
fn content_range_total(value: &str) -> Option<u64> {
    let (_, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    total.parse().ok()
}

/// One reqwest client per mount: connection pooling, timeouts, and TLS trust
/// from `cafile=` / `insecure`.
pub fn build_client(options: &MountOptions) -> Result<reqwest::Client, ProviderError> {
    client_builder(options)?
        .build()
        .map_err(|err| ProviderError::Config(format!("HTTP client: {err}")))
}

/// The settings of [`build_client`], for providers that add their own.
pub fn client_builder(options: &MountOptions) -> Result<reqwest::ClientBuilder, ProviderError> {
    let mut builder = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .read_timeout(options.stall_timeout)
        .pool_max_idle_per_host(64)
        .user_agent(USER_AGENT);
    if let Some(cafile) = &options.cafile {
        let pem = std::fs::read(cafile)
            .map_err(|err| ProviderError::Config(format!("cafile {}: {err}", cafile.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|err| ProviderError::Config(format!("cafile {}: {err}", cafile.display())))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    if options.insecure {
        tracing::warn!("TLS certificate verification is off (option 'insecure')");
        builder = builder.tls_danger_accept_invalid_certs(true);
    }
    Ok(builder)
}

pub(super) fn transport_error(url: &str, err: reqwest::Error) -> ProviderError {
    // The chain holds the useful part ("Connection refused"); reqwest's own
    // message alone does not. The URL is shown once, redacted.
    ProviderError::Unreachable(format!(
        "{}: {}",
        redact_url(url),
        causes(&err.without_url())
    ))
}

pub(super) fn check_status(url: &str, status: StatusCode) -> Result<(), ProviderError> {
    let url = redact_url(url);
    match status {
        s if s.is_success() => Ok(()),
        StatusCode::NOT_FOUND | StatusCode::GONE => Err(ProviderError::NotFound(url)),
        StatusCode::UNAUTHORIZED => {
            Err(ProviderError::Unauthorized(format!("{url}: HTTP {status}")))
        }
        StatusCode::FORBIDDEN => Err(ProviderError::Denied(format!("{url}: HTTP {status}"))),
        s if is_transient_status(s.as_u16()) => {
            Err(ProviderError::Unreachable(format!("{url}: HTTP {status}")))
        }
        _ => Err(ProviderError::Protocol(format!("{url}: HTTP {status}"))),
    }
}

/// The error for a failed `status`, with `detail` in place of "HTTP …".
fn status_error(url: &str, status: StatusCode, detail: &str) -> ProviderError {
    let url = redact_url(url);
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => {
            ProviderError::NotFound(format!("{url}: {detail}"))
        }
        StatusCode::UNAUTHORIZED => ProviderError::Unauthorized(format!("{url}: {detail}")),
        StatusCode::FORBIDDEN => ProviderError::Denied(format!("{url}: {detail}")),
        s if is_transient_status(s.as_u16()) => {
            ProviderError::Unreachable(format!("{url}: {detail}"))
        }
        _ => ProviderError::Protocol(format!("{url}: {detail}")),
    }
}

pub(super) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

/// Parses `bytes START-END/TOTAL`.
pub(super) fn parse_content_range(value: &str) -> Option<(u64, u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let total = match total {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.parse().ok()?, end.parse().ok()?, total))
}

#[async_trait]
impl Provider for HttpProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let url = self.manifest_url.as_str();
        let (body, manifest_mtime) = self.fetch_manifest().await?;
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|err| {
            ProviderError::Protocol(format!("manifest {}: {err}", redact_url(url)))
        })?;
        if manifest.vms.is_empty() {
            return Err(ProviderError::Protocol(format!(
                "manifest {}: \"vms\" lists no VM",
                redact_url(url)
            )));
        }
        let mut inventory = Inventory::default();
        // Disks with a size in the manifest are listed without a request
        // (a pre-signed URL refuses HEAD); the others are asked, several at
        // a time rather than one after another.
        let mut wanted = Vec::new();
        for vm in manifest.vms {
            if vm.disks.is_empty() {
                inventory.empty_dirs.push(vec![vm.name.clone()]);
            }
            for disk in &vm.disks {
                let disk_url = self.disk_url(&vm.name, disk)?;
                let named = || {
                    format!(
                        "manifest {}: disk {:?} of VM {:?}",
                        redact_url(url),
                        disk.name,
                        vm.name
                    )
                };
                let size = disk
                    .size
                    .as_ref()
                    .map(|number| manifest_size(number, named))
                    .transpose()?;
                wanted.push((vec![vm.name.clone(), disk.name.clone()], size, disk_url));
            }
        }
        inventory.disks = futures::stream::iter(wanted)
            .map(|(path, size, disk_url)| async move {
                match size {
                    Some(size) => Ok(DiskEntry {
                        path,
                        size,
                        mtime: manifest_mtime.unwrap_or(SystemTime::UNIX_EPOCH),
                        version: Version::Size(size),
                        locator: disk_url.to_string(),
                        allocated: None,
                    }),
                    None => self.describe(path, disk_url).await,
                }
            })
            .buffered(MANIFEST_HEADS_AT_ONCE)
            .try_collect()
            .await?;
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let (size, headers) = self.stat(&disk.locator).await?;
        let size = size.unwrap_or(disk.size);
        check_size(size, || redact_url(&disk.locator))?;
        Ok(Pinned::new(size, Self::version_from(&headers, size)))
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = disk.locator.as_str();
        let what = describe_get(url, offset, len);
        let expected = expected(&what, Some(pinned.size), &pinned.version, offset, len);
        // Plain HTTP: straight from the socket into the block. Anything
        // unusual falls through to reqwest below.
        if let Ok(parsed) = Url::parse(url) {
            match self
                .ranges
                .get(&parsed, &expected, condition(&expected))
                .await
            {
                Ok(Ranged::Data(body)) => return Ok(body.freeze()),
                Ok(Ranged::PreconditionFailed) => return Err(expected.changed()),
                Ok(Ranged::Refused(err)) => return Err(err),
                Ok(Ranged::Fallback) => {}
                Err(err) => {
                    return Err(ProviderError::Unreachable(format!(
                        "{}: {err}",
                        redact_url(url)
                    )))
                }
            }
        }
        fetch(&self.client, url, &expected).await
    }
}

/// `GET URL bytes=A-B`, the query string hidden: names the server and the
/// object in every message about one fetch.
fn describe_get(url: &str, offset: u64, len: usize) -> String {
    format!(
        "GET {} bytes={offset}-{}",
        redact_url(url),
        offset + len as u64 - 1
    )
}

/// What a fetch under an HTTP-style version (ETag, Last-Modified or size)
/// must get back.
fn expected<'a>(
    what: &'a str,
    size: Option<u64>,
    version: &'a Version,
    offset: u64,
    len: usize,
) -> Expected<'a> {
    Expected {
        what,
        offset,
        len,
        size,
        etag: version.etag(),
        modified: version.modified(),
        pinned: version,
    }
}

/// The precondition header sent with a fetch.
fn condition<'a>(expected: &Expected<'a>) -> Option<(&'static str, &'a str)> {
    match (expected.etag, expected.modified) {
        (Some(etag), _) => Some(("If-Match", etag)),
        (None, Some(modified)) => Some(("If-Unmodified-Since", modified)),
        (None, None) => None,
    }
}

/// `len` bytes at `offset` through reqwest, sending the pinned version as a
/// precondition (`If-Match`, `If-Unmodified-Since`) and checking the answer
/// against it and against `whole_size` (the pinned size; a `200` is taken
/// only for a range that covers all of it). vSphere reads through here.
pub(super) async fn ranged_get(
    client: &reqwest::Client,
    url: &str,
    whole_size: u64,
    version: &Version,
    offset: u64,
    len: usize,
) -> Result<Bytes, ProviderError> {
    if len == 0 {
        return Ok(Bytes::new());
    }
    let what = describe_get(url, offset, len);
    fetch(
        client,
        url,
        &expected(&what, Some(whole_size), version, offset, len),
    )
    .await
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    expected: &Expected<'_>,
) -> Result<Bytes, ProviderError> {
    let mut request = client.get(url).header(
        RANGE,
        format!("bytes={}-{}", expected.offset, expected.last()),
    );
    match condition(expected) {
        Some(("If-Match", etag)) => request = request.header(IF_MATCH, etag),
        Some((_, modified)) => request = request.header(IF_UNMODIFIED_SINCE, modified),
        None => {}
    }
    let mut response = request
        .send()
        .await
        .map_err(|err| transport_error(url, err))?;
    let status = response.status();
    match status {
        StatusCode::PRECONDITION_FAILED | StatusCode::RANGE_NOT_SATISFIABLE => {
            return Err(expected.changed())
        }
        s if s.is_success() => {}
        s => return Err(status_error(url, s, &format!("HTTP {s}"))),
    }
    let headers = response.headers();
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    expected.check(&Answer {
        status: Some(status.as_u16()),
        content_range: text(CONTENT_RANGE),
        content_length: content_length(headers),
        etag: text(ETAG),
        last_modified: text(LAST_MODIFIED),
    })?;
    let mut body = expected.body();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| transport_error(url, err))?
    {
        body.push(chunk)?;
    }
    body.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 0-99/1000"),
            Some((0, 99, Some(1000)))
        );
        assert_eq!(parse_content_range("bytes 5-9/*"), Some((5, 9, None)));
        assert_eq!(parse_content_range("bytes */1000"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn manifest_shape() {
        let manifest: Manifest = serde_json::from_str(
            r#"{"vms":[{"name":"a","disks":[{"name":"d","url":"a/d","size":5},{"name":"e","url":"http://x/e"}]}]}"#,
        )
        .unwrap();
        let named = || "d".to_string();
        let size = manifest.vms[0].disks[0].size.as_ref().unwrap();
        assert_eq!(manifest_size(size, named).unwrap(), 5);
        assert!(manifest.vms[0].disks[1].size.is_none());
        assert!(serde_json::from_str::<Manifest>(r#"{"vm":[]}"#).is_err());
    }

    #[test]
    fn manifest_sizes_must_fit_a_file_size() {
        let size = |text: &str| {
            let number: serde_json::Number = serde_json::from_str(text).unwrap();
            manifest_size(&number, || "disk \"x\"".to_string()).map_err(|e| e.to_string())
        };
        assert_eq!(size("0"), Ok(0));
        assert_eq!(size("9223372036854775807"), Ok(i64::MAX as u64));
        for bad in [
            "-1",
            "1.5",
            "9223372036854775808",
            "18446744073709551615",
            "1e30",
        ] {
            let err = size(bad).unwrap_err();
            assert!(
                err.contains("disk \"x\"") && err.contains("size"),
                "{bad}: {err}"
            );
        }
        assert_eq!(content_range_total("bytes */0"), Some(0));
        assert_eq!(content_range_total("bytes 0-0/77"), Some(77));
        assert_eq!(content_range_total("bytes 0-0/*"), None);
    }

    #[test]
    fn weak_etags_fall_back_to_last_modified() {
        let mut headers = HeaderMap::new();
        headers.insert(ETAG, "W/\"abc\"".parse().unwrap());
        headers.insert(
            LAST_MODIFIED,
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(
            HttpProvider::version_from(&headers, 1),
            Version::Modified("Wed, 21 Oct 2015 07:28:00 GMT".into())
        );
        headers.insert(ETAG, "\"abc\"".parse().unwrap());
        assert_eq!(
            HttpProvider::version_from(&headers, 1),
            Version::ETag("\"abc\"".into())
        );
        assert_eq!(
            HttpProvider::version_from(&HeaderMap::new(), 7),
            Version::Size(7)
        );
    }
}
