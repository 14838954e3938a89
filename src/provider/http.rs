//! `http(s)://host/path/manifest.json`: disks listed in a JSON manifest and
//! read with Range GETs from any HTTP server (pre-signed URLs, SAS URLs,
//! nginx, object-store gateways).
//!
//! ```json
//! {"vms": [{"name": "web-01",
//!           "disks": [{"name": "disk-0.vmdk", "url": "web-01/disk-0.vmdk", "size": 1073741824}]}]}
//! ```
//!
//! `url` may be relative to the manifest; `size` may be left out (HEAD finds
//! it). The version is the strong ETag when the server sends one (sent back as
//! `If-Match`), else Last-Modified (`If-Unmodified-Since`), else the size
//! (checked against each answer's Content-Range).

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

use super::http_range::{RangeClient, Ranged};
use super::{
    causes, is_transient_status, redact_url, DiskEntry, Inventory, Provider, ProviderError, Version,
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
    size: Option<u64>,
}

pub struct HttpProvider {
    manifest_url: Url,
    client: reqwest::Client,
    /// Block fetches of `http://` disks that carry a validator.
    ranges: RangeClient,
}

const MANIFEST_HEADS_AT_ONCE: usize = 16;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const USER_AGENT: &str = concat!("vmexportfs/", env!("CARGO_PKG_VERSION"));

const ETAG_PREFIX: &str = "etag:";
const MODIFIED_PREFIX: &str = "modified:";
const SIZE_PREFIX: &str = "size:";

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

    async fn head(&self, url: &str) -> Result<HeaderMap, ProviderError> {
        let response = self
            .client
            .head(url)
            .send()
            .await
            .map_err(|err| transport_error(url, err))?;
        check_status(url, response.status())?;
        Ok(response.headers().clone())
    }

    /// The disk entry for one manifest disk, from a HEAD of its URL.
    async fn describe(
        &self,
        path: Vec<String>,
        listed_size: Option<u64>,
        url: Url,
    ) -> Result<DiskEntry, ProviderError> {
        let headers = self.head(url.as_str()).await?;
        let size = match listed_size {
            Some(size) => size,
            None => content_length(&headers).ok_or_else(|| {
                ProviderError::Protocol(format!(
                    "{}: no size in the manifest and no Content-Length",
                    redact_url(url.as_str())
                ))
            })?,
        };
        let mtime = headers
            .get(LAST_MODIFIED)
            .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(DiskEntry {
            path,
            size,
            mtime,
            version: Self::version_from(&headers, size),
            locator: url.to_string(),
            allocated: None,
        })
    }

    pub(super) fn version_from(headers: &HeaderMap, size: u64) -> Version {
        let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
        match (text(ETAG), text(LAST_MODIFIED)) {
            (Some(etag), _) if !etag.starts_with("W/") => Version(format!("{ETAG_PREFIX}{etag}")),
            (_, Some(modified)) => Version(format!("{MODIFIED_PREFIX}{modified}")),
            _ => Version(format!("{SIZE_PREFIX}{size}")),
        }
    }
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
        let response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|err| transport_error(url, err))?;
        check_status(url, response.status())?;
        let body = response
            .bytes()
            .await
            .map_err(|err| transport_error(url, err))?;
        let manifest: Manifest = serde_json::from_slice(&body).map_err(|err| {
            ProviderError::Protocol(format!("manifest {}: {err}", redact_url(url)))
        })?;
        let mut inventory = Inventory::default();
        // Each disk needs a HEAD for its validators; a manifest of many
        // disks asks several at a time rather than one after another.
        let mut wanted = Vec::new();
        for vm in manifest.vms {
            if vm.disks.is_empty() {
                inventory.empty_dirs.push(vec![vm.name.clone()]);
            }
            for disk in vm.disks {
                let disk_url = self.manifest_url.join(&disk.url).map_err(|err| {
                    ProviderError::Protocol(format!(
                        "manifest: disk '{}' of VM '{}': bad url: {err}",
                        disk.name, vm.name
                    ))
                })?;
                wanted.push((vec![vm.name.clone(), disk.name], disk.size, disk_url));
            }
        }
        inventory.disks = futures::stream::iter(wanted)
            .map(|(path, size, url)| self.describe(path, size, url))
            .buffered(MANIFEST_HEADS_AT_ONCE)
            .try_collect()
            .await?;
        Ok(inventory)
    }

    async fn stat(&self, disk: &DiskEntry) -> Result<(u64, Version), ProviderError> {
        let headers = self.head(&disk.locator).await?;
        let size = content_length(&headers).unwrap_or(disk.size);
        Ok((size, Self::version_from(&headers, size)))
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        version: &Version,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        let url = disk.locator.as_str();
        let condition = if let Some(etag) = version.0.strip_prefix(ETAG_PREFIX) {
            Some(("If-Match", etag))
        } else {
            version
                .0
                .strip_prefix(MODIFIED_PREFIX)
                .map(|modified| ("If-Unmodified-Since", modified))
        };
        // Plain HTTP with a validator: straight from the socket into the
        // block. Anything unusual falls through to reqwest below.
        if let (Some(condition), Ok(parsed)) = (condition, Url::parse(url)) {
            match self.ranges.get(&parsed, offset, len, Some(condition)).await {
                Ok(Ranged::Data(body)) => return Ok(body.freeze()),
                Ok(Ranged::PreconditionFailed) => {
                    return Err(ProviderError::Changed {
                        pinned: version.0.clone(),
                    })
                }
                Ok(Ranged::Fallback) => {}
                Err(err) => {
                    return Err(ProviderError::Unreachable(format!(
                        "{}: {err}",
                        redact_url(url)
                    )))
                }
            }
        }
        ranged_get(&self.client, url, disk.size, version, offset, len).await
    }
}

/// `len` bytes at `offset` through reqwest, sending the pinned version as a
/// precondition (`If-Match`, `If-Unmodified-Since`, or a size check against
/// the answer's Content-Range). `whole_size` allows a `200` to a range that
/// covers the whole file.
pub(super) async fn ranged_get(
    client: &reqwest::Client,
    url: &str,
    whole_size: u64,
    version: &Version,
    offset: u64,
    len: usize,
) -> Result<Bytes, ProviderError> {
    let last = offset + len as u64 - 1;
    let mut request = client
        .get(url)
        .header(RANGE, format!("bytes={offset}-{last}"));
    if let Some(etag) = version.0.strip_prefix(ETAG_PREFIX) {
        request = request.header(IF_MATCH, etag);
    } else if let Some(modified) = version.0.strip_prefix(MODIFIED_PREFIX) {
        request = request.header(IF_UNMODIFIED_SINCE, modified);
    }
    let mut response = request
        .send()
        .await
        .map_err(|err| transport_error(url, err))?;
    let changed = || ProviderError::Changed {
        pinned: version.0.clone(),
    };
    match response.status() {
        StatusCode::PRECONDITION_FAILED => return Err(changed()),
        StatusCode::PARTIAL_CONTENT => {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| parse_content_range(v.to_str().ok()?));
            match range {
                Some((start, end, total)) if start == offset && end == last => {
                    if let (Some(total), Some(size)) = (total, version.0.strip_prefix(SIZE_PREFIX))
                    {
                        if size != total.to_string() {
                            return Err(changed());
                        }
                    }
                }
                _ => {
                    return Err(ProviderError::Protocol(format!(
                        "{}: answered bytes={offset}-{last} with Content-Range {:?}",
                        redact_url(url),
                        response.headers().get(CONTENT_RANGE)
                    )))
                }
            }
        }
        StatusCode::OK if offset == 0 && len as u64 == whole_size => {}
        StatusCode::OK => {
            return Err(ProviderError::Protocol(format!(
                "{}: the server ignores Range requests",
                redact_url(url)
            )))
        }
        StatusCode::RANGE_NOT_SATISFIABLE => return Err(changed()),
        status => check_status(url, status)?,
    }
    let mut buf = BytesMut::with_capacity(len);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| transport_error(url, err))?
    {
        if buf.len() + chunk.len() > len {
            return Err(ProviderError::Protocol(format!(
                "{}: more bytes than asked for",
                redact_url(url)
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    if buf.len() != len {
        // A body cut short is a transport fault: worth a retry.
        return Err(ProviderError::Unreachable(format!(
            "{}: body ended after {} of {len} bytes",
            redact_url(url),
            buf.len()
        )));
    }
    Ok(buf.freeze())
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
        assert_eq!(manifest.vms[0].disks[0].size, Some(5));
        assert_eq!(manifest.vms[0].disks[1].size, None);
        assert!(serde_json::from_str::<Manifest>(r#"{"vm":[]}"#).is_err());
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
            HttpProvider::version_from(&headers, 1).0,
            "modified:Wed, 21 Oct 2015 07:28:00 GMT"
        );
        headers.insert(ETAG, "\"abc\"".parse().unwrap());
        assert_eq!(HttpProvider::version_from(&headers, 1).0, "etag:\"abc\"");
        assert_eq!(HttpProvider::version_from(&HeaderMap::new(), 7).0, "size:7");
    }
}
