//! `s3://bucket[/prefix]`: AWS S3 and S3-compatible stores, where VM
//! Import/Export writes its `export-i-….vmdk|vhd|ova` files.
//!
//! The key hierarchy under the prefix becomes directories; every object is
//! a file (keys ending in `/` are folder markers and become directories).
//! Credentials come from the SDK's standard chain (environment, profile, web
//! identity, IMDS) unless `anonymous`; `endpoint=` selects an S3-compatible
//! store and implies path-style addressing. Each block is one ranged
//! GetObject carrying `If-Match` with the ETag pinned at open, so an object
//! overwritten under a reader fails that read (412) instead of mixing bytes.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use bytes::Bytes;

use super::http_range::{Answer, Expected};
use super::{
    bucket_and_prefix, causes, is_transient_status, level_dir, level_object, level_prefix,
    place_key, DiskEntry, Inventory, KeyPlace, Pinned, Provider, ProviderError, Version,
};
use crate::options::MountOptions;

/// One attempt per SDK call: the read path's retries, within `timeout=`,
/// are the only ones, so a dead endpoint fails a read in bounded time.
const SDK_ATTEMPTS: u32 = 1;

pub struct S3Provider {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    /// The endpoint, named in messages about a refused answer (the proxy
    /// or S3-compatible store that ignores Range, say).
    server: String,
}

/// Splits `s3://bucket/some/prefix` into ("bucket", "some/prefix/").
fn parse_source(source: &str) -> Result<(String, String), ProviderError> {
    let (bucket, prefix) = bucket_and_prefix(source, "s3");
    let valid_bucket = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_'
        });
    if !valid_bucket {
        return Err(ProviderError::Config(format!(
            "'{source}' does not name a bucket: expected s3://BUCKET[/PREFIX] with a 3-63 character bucket name"
        )));
    }
    Ok((bucket.to_string(), prefix))
}

impl S3Provider {
    pub async fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let (bucket, prefix) = parse_source(source)?;
        let shared = load_aws_config(options, options.region.as_deref()).await?;
        let mut config = aws_sdk_s3::config::Builder::from(&shared);
        if shared.region().is_none() {
            // S3 needs a region to sign with; us-east-1 answers for any
            // bucket with a redirect hint, and emulators ignore it.
            tracing::info!("no AWS region configured; using us-east-1 (set region= to choose)");
            config = config.region(Region::new("us-east-1"));
        }
        if let Some(endpoint) = &options.endpoint {
            config = config.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(S3Provider {
            client: aws_sdk_s3::Client::from_conf(config.build()),
            bucket,
            prefix,
            server: options
                .endpoint
                .as_deref()
                .map_or_else(|| "AWS S3".to_string(), super::redact_url),
        })
    }

    fn object(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }
}

/// The AWS SDK's shared configuration for a mount: the standard credential
/// chain (or none with `anonymous`), `profile=`, `cafile=`, and timeouts
/// and attempts that leave retrying to the read path.
pub(super) async fn load_aws_config(
    options: &MountOptions,
    region: Option<&str>,
) -> Result<aws_config::SdkConfig, ProviderError> {
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(options.stall_timeout)
                .operation_attempt_timeout(Duration::from_secs(120))
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(SDK_ATTEMPTS));
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(profile) = &options.profile {
        loader = loader.profile_name(profile);
    }
    if options.anonymous {
        loader = loader.no_credentials();
    }
    if let Some(cafile) = &options.cafile {
        loader = loader.http_client(https_client_trusting(cafile)?);
    }
    Ok(loader.load().await)
}

/// The SDK's HTTPS client, trusting the system roots and the CAs in
/// `cafile` (a private S3-compatible store).
fn https_client_trusting(
    cafile: &std::path::Path,
) -> Result<aws_smithy_runtime_api::client::http::SharedHttpClient, ProviderError> {
    use aws_smithy_http_client::tls::{self, TlsContext, TrustStore};
    let bad = |err: &dyn std::fmt::Display| {
        ProviderError::Config(format!("cafile {}: {err}", cafile.display()))
    };
    let pem = std::fs::read(cafile).map_err(|err| bad(&err))?;
    let context = TlsContext::builder()
        .with_trust_store(TrustStore::default().with_pem_certificate(pem))
        .build()
        .map_err(|err| bad(&err))?;
    Ok(aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::AwsLc,
        ))
        .tls_context(context)
        .build_https())
}

/// SDK errors → provider errors, by what a caller can do about them.
fn map_error<E>(
    what: &str,
    err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
    pinned: Option<&Version>,
) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let status = err
        .raw_response()
        .map(|response| response.status().as_u16());
    let code = err.code().unwrap_or("").to_string();
    let detail = causes(&err);
    match (&err, status) {
        (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_), _) => {
            ProviderError::Unreachable(format!("{what}: {detail}"))
        }
        (_, Some(412)) => ProviderError::Changed {
            pinned: pinned.map(|v| v.to_string()).unwrap_or_default(),
        },
        (_, Some(404)) if code == "NoSuchBucket" => {
            ProviderError::NotFound(format!("{what}: the bucket does not exist"))
        }
        (_, Some(404)) => ProviderError::NotFound(format!("{what}: {code}")),
        (_, Some(401 | 403)) => ProviderError::Denied(format!(
            "{what}: {code} (check the credentials and the bucket policy)"
        )),
        (_, Some(status)) if is_transient_status(status) => {
            ProviderError::Unreachable(format!("{what}: HTTP {status} {code}"))
        }
        (SdkError::ResponseError(_), _) => ProviderError::Unreachable(format!("{what}: {detail}")),
        _ => ProviderError::Protocol(format!("{what}: {detail}")),
    }
}

fn to_system_time(time: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    time.and_then(|t| SystemTime::try_from(*t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The disk a listed object is, at `path` in the mount.
fn object_disk(path: Vec<String>, key: &str, object: &aws_sdk_s3::types::Object) -> DiskEntry {
    DiskEntry {
        path,
        size: object.size().unwrap_or(0).max(0) as u64,
        mtime: to_system_time(object.last_modified()),
        version: Version::from_etag(object.e_tag()).unwrap_or(Version::Unpinned),
        locator: key.to_string(),
        allocated: None,
    }
}

#[async_trait]
impl Provider for S3Provider {
    fn preferred_request_size(&self) -> u64 {
        super::OBJECT_STORE_REQUEST
    }

    async fn list(&self) -> Result<Inventory, ProviderError> {
        let mut inventory = Inventory::default();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.prefix)
            .into_paginator()
            .send();
        let listing = format!("listing s3://{}/{}", self.bucket, self.prefix);
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| map_error(&listing, err, None))?;
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let path = match place_key(&self.prefix, key) {
                    KeyPlace::Outside => continue,
                    KeyPlace::Folder(path) => {
                        inventory.empty_dirs.push(path);
                        continue;
                    }
                    KeyPlace::Object(path) => path,
                };
                inventory.disks.push(object_disk(path, key, object));
            }
        }
        Ok(inventory)
    }

    fn lists_levels(&self) -> bool {
        true
    }

    async fn list_level(&self, dir: &[String]) -> Result<Inventory, ProviderError> {
        let prefix = level_prefix(&self.prefix, dir);
        let mut inventory = Inventory::default();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .delimiter("/")
            .into_paginator()
            .send();
        let listing = format!("listing s3://{}/{prefix}", self.bucket);
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| map_error(&listing, err, None))?;
            for common in page.common_prefixes() {
                let Some(sub) = common.prefix() else { continue };
                if let Some(path) = level_dir(&self.prefix, dir, sub) {
                    inventory.empty_dirs.push(path);
                }
            }
            for object in page.contents() {
                let Some(key) = object.key() else { continue };
                let Some(path) = level_object(&self.prefix, dir, key) else {
                    continue;
                };
                inventory.disks.push(object_disk(path, key, object));
            }
        }
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&disk.locator)
            .send()
            .await
            .map_err(|err| map_error(&format!("HEAD {}", self.object(&disk.locator)), err, None))?;
        let size = head.content_length().unwrap_or(0).max(0) as u64;
        let version = Version::from_etag(head.e_tag()).unwrap_or(Version::Unpinned);
        Ok(Pinned::new(size, version))
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        let version = &pinned.version;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let what = format!(
            "GET {} bytes={offset}-{} at {}",
            self.object(&disk.locator),
            offset + len as u64 - 1,
            self.server
        );
        let etag = version.etag();
        let expected = Expected {
            what: &what,
            offset,
            len,
            size: Some(pinned.size),
            etag,
            modified: None,
            pinned: version,
        };
        let mut request = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&disk.locator)
            .range(format!("bytes={offset}-{}", expected.last()));
        if let Some(etag) = etag {
            request = request.if_match(etag);
        }
        let response = request
            .send()
            .await
            .map_err(|err| map_error(&what, err, Some(version)))?;
        // The SDK takes 200 and 206 alike as success and hides the status:
        // a Content-Range stands for 206, none for 200. Judged before a
        // byte of the body is read; an unread body is dropped with its
        // connection.
        expected.check(&Answer {
            status: None,
            content_range: response.content_range(),
            content_length: response
                .content_length()
                .and_then(|n| u64::try_from(n).ok()),
            etag: response.e_tag(),
            last_modified: None,
        })?;
        let mut stream = response.body;
        let mut body = expected.body();
        while let Some(chunk) = stream.next().await {
            body.push(chunk.map_err(|err| {
                ProviderError::Unreachable(format!("{what}: body: {}", causes(&err)))
            })?)?;
        }
        body.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(parse_source("s3://vms").unwrap(), ("vms".into(), "".into()));
        assert_eq!(
            parse_source("s3://vms/exports/2024/").unwrap(),
            ("vms".into(), "exports/2024/".into())
        );
        for bad in ["s3://", "s3:///x", "s3://UPPER", "s3://ab", "s3://a b/c"] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("does not name a bucket"), "{bad}: {err}");
        }
    }
}
