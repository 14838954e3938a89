//! `gs://bucket[/prefix]`: Google Cloud Storage, where a GCP image export
//! lands.
//!
//! Bytes come through the official `google-cloud-storage` 1.x crate, each
//! read pinned to the object generation seen at open, so an object
//! overwritten under a reader fails that read (the old generation is gone:
//! 404) instead of mixing bytes. That crate lists objects only over gRPC,
//! which emulators do not serve, so listing and stat use the JSON API with
//! the same credentials: Application Default Credentials, or none at all
//! with `anonymous`.

use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use google_cloud_auth::credentials::{self, CacheableResource, Credentials};
use google_cloud_gax::retry_policy::{Aip194Strict, RetryPolicyExt};
use google_cloud_storage::client::Storage;
use google_cloud_storage::model_ext::ReadRange;
use google_cloud_storage::read_resume_policy::{ReadResumePolicyExt, Recommended};
use serde::Deserialize;

use super::http::build_client;
use super::http_range::Expected;
use super::{
    bucket_and_prefix, causes, is_transient_status, level_dir, level_object, level_prefix,
    place_key, DiskEntry, Inventory, KeyPlace, Pinned, Provider, ProviderError, Version,
};
use crate::options::MountOptions;

const DEFAULT_ENDPOINT: &str = "https://storage.googleapis.com";
/// One attempt per call (the crate's default retries transport errors for
/// 5 minutes): the read path's retries, within `timeout=`, are the only ones.
const SDK_ATTEMPTS: u32 = 1;

pub struct GcsProvider {
    storage: Storage,
    /// For the JSON API listing and stat.
    http: reqwest::Client,
    credentials: Credentials,
    endpoint: String,
    bucket: String,
    /// Empty, or ends with `/`.
    prefix: String,
    stall_timeout: Duration,
}

/// Splits `gs://bucket/some/prefix` into ("bucket", "some/prefix/").
fn parse_source(source: &str) -> Result<(String, String), ProviderError> {
    let (bucket, prefix) = bucket_and_prefix(source, "gs");
    let edge_ok = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    let valid_bucket = (3..=222).contains(&bucket.len())
        && bucket.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && edge_ok(bucket.bytes().next())
        && edge_ok(bucket.bytes().last());
    if !valid_bucket || source.contains('?') {
        return Err(ProviderError::Config(format!(
            "'{}' does not name a bucket: expected gs://BUCKET[/PREFIX] with a 3-63 character bucket name",
            super::redact_url(source)
        )));
    }
    Ok((bucket.to_string(), prefix))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ObjectList {
    #[serde(default)]
    items: Vec<ObjectResource>,
    /// With `delimiter=/`: the sub-directories of the level listed.
    #[serde(default)]
    prefixes: Vec<String>,
    next_page_token: Option<String>,
}

/// The JSON API sends 64-bit numbers as strings.
#[derive(Deserialize)]
struct ObjectResource {
    name: String,
    #[serde(default)]
    size: Option<String>,
    #[serde(default)]
    generation: Option<String>,
    #[serde(default)]
    updated: Option<String>,
}

impl ObjectResource {
    fn size(&self) -> Result<u64, ProviderError> {
        self.size.as_deref().unwrap_or("0").parse().map_err(|_| {
            ProviderError::Protocol(format!("object {}: size is not a number", self.name))
        })
    }

    /// The generation pins the bytes; an object listed without one (never
    /// seen from GCS itself) can not be pinned.
    fn version(&self) -> Version {
        self.generation
            .as_deref()
            .and_then(|text| text.trim().parse().ok())
            .map_or(Version::Unpinned, Version::Generation)
    }

    fn mtime(&self) -> SystemTime {
        self.updated
            .as_deref()
            .and_then(|text| {
                time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .map(SystemTime::from)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The disk this object is, at `path` in the mount.
    fn disk(&self, path: Vec<String>) -> Result<DiskEntry, ProviderError> {
        Ok(DiskEntry {
            path,
            size: self.size()?,
            mtime: self.mtime(),
            version: self.version(),
            locator: self.name.clone(),
            allocated: None,
        })
    }
}

impl GcsProvider {
    pub async fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let (bucket, prefix) = parse_source(source)?;
        let credentials = if options.anonymous {
            credentials::anonymous::Builder::new().build()
        } else {
            credentials::Builder::default().build().map_err(|err| {
                ProviderError::Config(format!(
                    "no Google Application Default Credentials ({err}); set GOOGLE_APPLICATION_CREDENTIALS, or mount with anonymous for a public bucket or an emulator"
                ))
            })?
        };
        let endpoint = options
            .endpoint
            .clone()
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string())
            .trim_end_matches('/')
            .to_string();
        url::Url::parse(&endpoint).map_err(|err| {
            ProviderError::Config(format!("endpoint '{endpoint}' is not a URL: {err}"))
        })?;
        let storage = Storage::builder()
            .with_endpoint(endpoint.clone())
            .with_credentials(credentials.clone())
            .with_retry_policy(Aip194Strict.with_attempt_limit(SDK_ATTEMPTS))
            .with_read_resume_policy(Recommended.with_attempt_limit(SDK_ATTEMPTS))
            .build()
            .await
            .map_err(|err| ProviderError::Config(format!("gs://{bucket}: {}", causes(&err))))?;
        Ok(GcsProvider {
            storage,
            http: build_client(options)?,
            credentials,
            endpoint,
            bucket,
            prefix,
            stall_timeout: options.stall_timeout,
        })
    }

    fn object(&self, name: &str) -> String {
        format!("gs://{}/{name}", self.bucket)
    }

    /// Every page of the objects under `prefix` (with `one_level`, only
    /// those directly in it, and the prefixes of those deeper), each handed
    /// to `take` as it comes.
    async fn list_pages(
        &self,
        prefix: &str,
        one_level: bool,
        mut take: impl FnMut(ObjectList) -> Result<(), ProviderError>,
    ) -> Result<(), ProviderError> {
        let what = format!("listing gs://{}/{prefix}", self.bucket);
        let mut page_token: Option<String> = None;
        loop {
            let mut url = self.api_url(&[])?;
            {
                let mut query = url.query_pairs_mut();
                query.append_pair("prefix", prefix);
                if one_level {
                    query.append_pair("delimiter", "/");
                }
                query.append_pair(
                    "fields",
                    "items(name,size,generation,updated),prefixes,nextPageToken",
                );
                if let Some(token) = &page_token {
                    query.append_pair("pageToken", token);
                }
            }
            let mut page: ObjectList = self
                .get_json(&what, url, "the bucket does not exist")
                .await?;
            let next = page.next_page_token.take().filter(|t| !t.is_empty());
            take(page)?;
            match next {
                Some(token) if Some(&token) != page_token.as_ref() => page_token = Some(token),
                _ => return Ok(()),
            }
        }
    }

    /// GET on the JSON API with the mount's credentials.
    async fn get_json<T: for<'de> Deserialize<'de>>(
        &self,
        what: &str,
        url: url::Url,
        not_found: &str,
    ) -> Result<T, ProviderError> {
        let headers = match self.credentials.headers(http::Extensions::new()).await {
            Ok(CacheableResource::New { data, .. }) => data,
            Ok(CacheableResource::NotModified) => http::HeaderMap::new(),
            Err(err) => {
                return Err(ProviderError::Denied(format!(
                    "{what}: getting a token: {}",
                    causes(&err)
                )))
            }
        };
        let response = self
            .http
            .get(url)
            .headers(headers)
            .send()
            .await
            .map_err(|err| {
                ProviderError::Unreachable(format!("{what}: {}", causes(&err.without_url())))
            })?;
        let status = response.status().as_u16();
        match status {
            200 => {}
            404 => return Err(ProviderError::NotFound(format!("{what}: {not_found}"))),
            401 | 403 => {
                return Err(ProviderError::Denied(format!(
                    "{what}: HTTP {status} (check the credentials and the bucket's IAM)"
                )))
            }
            _ if is_transient_status(status) => {
                return Err(ProviderError::Unreachable(format!("{what}: HTTP {status}")))
            }
            _ => return Err(ProviderError::Protocol(format!("{what}: HTTP {status}"))),
        }
        let body = response.bytes().await.map_err(|err| {
            ProviderError::Unreachable(format!("{what}: body: {}", causes(&err.without_url())))
        })?;
        serde_json::from_slice(&body)
            .map_err(|err| ProviderError::Protocol(format!("{what}: {err}")))
    }

    fn api_url(&self, segments: &[&str]) -> Result<url::Url, ProviderError> {
        let mut url = url::Url::parse(&self.endpoint)
            .map_err(|err| ProviderError::Config(format!("endpoint: {err}")))?;
        url.path_segments_mut()
            .map_err(|_| {
                ProviderError::Config(format!("endpoint '{}' is not a base URL", self.endpoint))
            })?
            .pop_if_empty()
            .extend(["storage", "v1", "b", &self.bucket, "o"])
            .extend(segments);
        Ok(url)
    }

    fn map_error(
        &self,
        what: &str,
        err: &google_cloud_storage::Error,
        pinned: &Version,
    ) -> ProviderError {
        let detail = causes(err);
        match err.http_status_code() {
            // The pinned generation is gone: the object was overwritten.
            Some(404 | 412) => ProviderError::Changed {
                pinned: pinned.to_string(),
            },
            Some(401 | 403) => ProviderError::Denied(format!("{what}: {detail}")),
            Some(status) if is_transient_status(status) => {
                ProviderError::Unreachable(format!("{what}: {detail}"))
            }
            Some(_) => ProviderError::Protocol(format!("{what}: {detail}")),
            None if err.is_authentication() => ProviderError::Denied(format!("{what}: {detail}")),
            None if err.is_deserialization() || err.is_serialization() || err.is_binding() => {
                ProviderError::Protocol(format!("{what}: {detail}"))
            }
            None => ProviderError::Unreachable(format!("{what}: {detail}")),
        }
    }
}

#[async_trait]
impl Provider for GcsProvider {
    fn preferred_request_size(&self) -> u64 {
        super::OBJECT_STORE_REQUEST
    }

    async fn list(&self) -> Result<Inventory, ProviderError> {
        let mut inventory = Inventory::default();
        self.list_pages(&self.prefix, false, |page| {
            for object in &page.items {
                let path = match place_key(&self.prefix, &object.name) {
                    KeyPlace::Outside => continue,
                    KeyPlace::Folder(path) => {
                        inventory.empty_dirs.push(path);
                        continue;
                    }
                    KeyPlace::Object(path) => path,
                };
                inventory.disks.push(object.disk(path)?);
            }
            Ok(())
        })
        .await?;
        Ok(inventory)
    }

    fn lists_levels(&self) -> bool {
        true
    }

    async fn list_level(&self, dir: &[String]) -> Result<Inventory, ProviderError> {
        let prefix = level_prefix(&self.prefix, dir);
        let mut inventory = Inventory::default();
        self.list_pages(&prefix, true, |page| {
            for sub in &page.prefixes {
                if let Some(path) = level_dir(&self.prefix, dir, sub) {
                    inventory.empty_dirs.push(path);
                }
            }
            for object in &page.items {
                if let Some(path) = level_object(&self.prefix, dir, &object.name) {
                    inventory.disks.push(object.disk(path)?);
                }
            }
            Ok(())
        })
        .await?;
        // The same directory may come on several pages.
        inventory.empty_dirs.sort();
        inventory.empty_dirs.dedup();
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let what = format!("getting the metadata of {}", self.object(&disk.locator));
        let object: ObjectResource = self
            .get_json(&what, self.api_url(&[&disk.locator])?, "no such object")
            .await?;
        Ok(Pinned::new(object.size()?, object.version()))
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
            self.endpoint
        );
        let expected = Expected {
            what: &what,
            offset,
            len,
            size: Some(pinned.size),
            etag: None,
            modified: None,
            pinned: version,
        };
        let mut request = self
            .storage
            .read_object(format!("projects/_/buckets/{}", self.bucket), &disk.locator)
            .set_read_range(ReadRange::segment(offset, len as u64))
            .with_automatic_decompression(false);
        let pinned_generation = version.generation();
        if let Some(generation) = pinned_generation {
            request = request.set_generation(generation);
        }
        let stalled =
            || ProviderError::Unreachable(format!("{what}: no bytes for {:?}", self.stall_timeout));
        let mut response = tokio::time::timeout(self.stall_timeout, request.send())
            .await
            .map_err(|_| stalled())?
            .map_err(|err| self.map_error(&what, &err, version))?;
        // The crate hides the status and the Content-Range (it checks the
        // body against the range the server says it sent, not the one asked
        // for), so what can be checked is: the generation it reports (from
        // x-goog-generation), the stored size when sent, and the body's
        // length, strictly — a server that ignores Range sends more than
        // asked and is refused at the first byte past `len`. A 206 of the
        // right length at the wrong offset cannot be told apart here.
        let object = response.object();
        if let Some(pinned_generation) = pinned_generation {
            if object.generation != 0 && object.generation != pinned_generation {
                return Err(expected.changed());
            }
        }
        // fake-gcs-server does not send x-goog-stored-content-length (0 then).
        if object.size > 0 && object.size as u64 != pinned.size {
            return Err(expected.changed());
        }
        let mut body = expected.body();
        loop {
            let chunk = tokio::time::timeout(self.stall_timeout, response.next())
                .await
                .map_err(|_| stalled())?;
            let Some(chunk) = chunk else { break };
            body.push(chunk.map_err(|err| self.map_error(&what, &err, version))?)?;
        }
        body.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(parse_source("gs://vms").unwrap(), ("vms".into(), "".into()));
        assert_eq!(
            parse_source("gs://my-exports/images/2024/").unwrap(),
            ("my-exports".into(), "images/2024/".into())
        );
        for bad in [
            "gs://",
            "gs:///x",
            "gs://UPPER",
            "gs://ab",
            "gs://-vms",
            "gs://vms?x=1",
        ] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("does not name a bucket"), "{bad}: {err}");
        }
    }

    #[test]
    fn listing_numbers_come_as_strings() {
        let page: ObjectList = serde_json::from_str(
            r#"{"items":[{"name":"vm/disk.raw","size":"5368709120","generation":"1700000000123456","updated":"2024-05-01T10:00:00.5Z"}],"nextPageToken":"abc"}"#,
        )
        .unwrap();
        let object = &page.items[0];
        assert_eq!(object.size().unwrap(), 5 << 30);
        assert_eq!(object.version().generation(), Some(1_700_000_000_123_456));
        assert!(object.mtime() > SystemTime::UNIX_EPOCH);
        assert_eq!(page.next_page_token.as_deref(), Some("abc"));
        let empty: ObjectList = serde_json::from_str("{}").unwrap();
        assert!(empty.items.is_empty());
    }
}
