//! `az://account/container[/prefix]`: Azure Blob Storage, where a managed
//! disk is exported as a page blob behind a SAS URL.
//!
//! Built on the official `azure_storage_blob` 1.x crate (the older
//! `azure_storage_blobs` is frozen). Credentials, first match wins: a SAS
//! token in the source's query string, a SAS token in `credentials=FILE`,
//! `anonymous`, else Entra ID through azure_identity. Every block is one
//! ranged GET carrying `If-Match` with the ETag pinned at open. Page blobs
//! report their written page ranges; the rest is a hole, served as zeros
//! without a fetch. Only single `bytes=A-B` ranges are ever sent: Azurite
//! crashes on suffix ranges and answers multi-range requests with 500.

use std::num::NonZero;
use std::ops::Range;
use std::sync::Arc;
use std::time::SystemTime;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::{ClientOptions, RetryOptions, Transport, Url};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders,
    BlobContainerClientListBlobsOptions, BlobType, HttpRange, PageBlobClientListPageRangesOptions,
};
use azure_storage_blob::{BlobClient, BlobContainerClient, BlobContainerClientOptions};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};

use super::http_range::{Answer, Expected};
use super::KeyPlace;
use super::{http::build_client, normalize_prefix, place_key, read_secret_file, redact_queries};
use super::{DiskEntry, Inventory, Pinned, Provider, ProviderError, Version};
use crate::options::MountOptions;

/// Page ranges are asked for in segments of this size, as Azure advises for
/// large page blobs (one request over a fragmented multi-TiB blob can time
/// out); a few segments are in flight at once.
const PAGE_RANGE_SEGMENT: u64 = 1 << 30;
const PAGE_RANGE_PARALLEL: usize = 8;

/// Where and as whom: parsed from the SOURCE and the mount options.
#[derive(Debug, PartialEq, Eq)]
struct Location {
    account: String,
    container: String,
    /// Empty, or ends with `/`; for a blob-scoped SAS (`sr=b`) the blob name.
    prefix: String,
    /// The SAS query string (without `?`), if the source carried one.
    sas: Option<String>,
    /// An account URL given in the source (`https://ACCOUNT.blob.core.…`).
    account_url: Option<String>,
}

fn valid_account(name: &str) -> bool {
    (3..=24).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

fn valid_container(name: &str) -> bool {
    name == "$root"
        || name == "$web"
        || ((3..=63).contains(&name.len())
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !name.starts_with('-')
            && !name.ends_with('-')
            && !name.contains("--"))
}

/// Whether an `https://…` source is an Azure blob SAS URL rather than an
/// HTTP manifest: a blob-service host and a signed query string.
pub fn is_blob_sas_url(source: &str) -> bool {
    let Ok(url) = Url::parse(source) else {
        return false;
    };
    let host = url.host_str().unwrap_or("");
    (host.contains(".blob.core.") || host.contains(".blob.storage.azure.net"))
        && url.query_pairs().any(|(key, _)| key == "sig")
        && !url.path().ends_with(".json")
}

fn parse_source(source: &str) -> Result<Location, ProviderError> {
    let bad = |why: &str| {
        ProviderError::Config(format!(
            "'{}' is not an Azure blob source ({why}): expected az://ACCOUNT/CONTAINER[/PREFIX]",
            super::redact_url(source)
        ))
    };
    let (without_query, sas) = match source.split_once('?') {
        Some((base, query)) => (base, Some(query.to_string()).filter(|q| !q.is_empty())),
        None => (source, None),
    };
    let (account, path, account_url) = if let Some(rest) = without_query.strip_prefix("az://") {
        let (account, path) = rest.split_once('/').unwrap_or((rest, ""));
        (account.to_string(), path.to_string(), None)
    } else {
        let url = Url::parse(without_query).map_err(|_| bad("not a URL"))?;
        let host = url.host_str().unwrap_or("");
        let account = host.split('.').next().unwrap_or("").to_string();
        let path = url.path().trim_start_matches('/');
        // Blob names in a URL are percent-encoded; the SDK encodes them again.
        let path = percent_encoding::percent_decode_str(path)
            .decode_utf8()
            .map_err(|_| bad("bad percent-encoding"))?
            .into_owned();
        (account, path, Some(format!("{}://{host}", url.scheme())))
    };
    // Managed-disk export hosts (md-….blob.storage.azure.net) are not
    // storage account names; only az:// names are checked.
    if account_url.is_none() && !valid_account(&account) {
        return Err(bad(
            "the account name must be 3-24 lowercase letters and digits",
        ));
    }
    let (container, prefix) = path.split_once('/').unwrap_or((&path, ""));
    if !valid_container(container) {
        return Err(bad(
            "the container name must be 3-63 lowercase letters, digits and single hyphens",
        ));
    }
    let blob_scoped = sas.as_deref().is_some_and(sas_is_blob_scoped);
    let prefix = if blob_scoped {
        if prefix.is_empty() {
            return Err(bad("a blob SAS (sr=b) needs the blob name in the path"));
        }
        prefix.to_string()
    } else {
        normalize_prefix(prefix)
    };
    Ok(Location {
        account,
        container: container.to_string(),
        prefix,
        sas,
        account_url,
    })
}

fn sas_is_blob_scoped(sas: &str) -> bool {
    url::form_urlencoded::parse(sas.as_bytes()).any(|(key, value)| key == "sr" && value == "b")
}

pub struct AzureProvider {
    container: BlobContainerClient,
    /// `az://account/container`, for log lines.
    display: String,
    prefix: String,
    /// A blob-scoped SAS can read its blob but not list the container.
    single_blob: bool,
    /// The SAS text, scrubbed from every error message.
    sas: Option<String>,
}

impl AzureProvider {
    pub async fn new(source: &str, options: &MountOptions) -> Result<Self, ProviderError> {
        let location = parse_source(source)?;
        let sas = match (&location.sas, &options.credentials) {
            (Some(sas), _) => Some(sas.clone()),
            (None, Some(path)) => {
                let token = read_secret_file(path)?;
                let token = token.trim().trim_start_matches('?').to_string();
                if token.is_empty() {
                    return Err(ProviderError::Config(format!(
                        "credentials file {} holds no SAS token",
                        path.display()
                    )));
                }
                Some(token)
            }
            (None, None) => None,
        };
        let single_blob = sas.as_deref().is_some_and(sas_is_blob_scoped);
        let account_url = options
            .endpoint
            .clone()
            .or(location.account_url.clone())
            .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", location.account));
        let mut url = Url::parse(account_url.trim_end_matches('/')).map_err(|err| {
            ProviderError::Config(format!("endpoint '{account_url}' is not a URL: {err}"))
        })?;
        url.path_segments_mut()
            .map_err(|_| {
                ProviderError::Config(format!("endpoint '{account_url}' is not a base URL"))
            })?
            .pop_if_empty()
            .push(&location.container);
        url.set_query(sas.as_deref());

        let credential: Option<Arc<dyn TokenCredential>> = if sas.is_some() || options.anonymous {
            None
        } else if url.scheme() != "https" {
            return Err(ProviderError::Config(format!(
                "az://{}: Entra ID needs an https endpoint; for an emulator give a SAS (credentials=FILE) or mount with anonymous",
                location.account
            )));
        } else {
            Some(entra_id_credential()?)
        };
        let client_options = BlobContainerClientOptions {
            client_options: ClientOptions {
                transport: Some(Transport::new(Arc::new(build_client(options)?))),
                // One attempt per call: the read path's retries, within
                // timeout=, are the only ones.
                retry: RetryOptions::none(),
                ..Default::default()
            },
            ..Default::default()
        };
        let container = BlobContainerClient::new(url, credential, Some(client_options))
            .map_err(|err| ProviderError::Config(format!("az://{}: {err}", location.account)))?;
        Ok(AzureProvider {
            container,
            display: format!("az://{}/{}", location.account, location.container),
            prefix: location.prefix,
            single_blob,
            sas,
        })
    }

    fn blob(&self, name: &str) -> BlobClient {
        self.container.blob_client(name)
    }

    fn error(&self, what: &str, err: azure_core::Error, pinned: Option<&Version>) -> ProviderError {
        map_error(what, err, pinned, self.sas.as_deref())
    }

    async fn properties(&self, name: &str) -> Result<Properties, ProviderError> {
        let what = format!("getting the properties of {}/{name}", self.display);
        let response = self
            .blob(name)
            .get_properties(None)
            .await
            .map_err(|err| self.error(&what, err, None))?;
        let bad = |err: azure_core::Error| ProviderError::Protocol(format!("{what}: {err}"));
        let size = response.content_length().map_err(bad)?.unwrap_or(0);
        let etag = response.etag().map_err(bad)?.map(|e| e.to_string());
        let kind = response.blob_type().map_err(bad)?;
        let mtime = response
            .last_modified()
            .map_err(bad)?
            .map(SystemTime::from)
            .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Properties {
            size,
            version: Version::from_etag(etag.as_deref()).unwrap_or(Version::Unpinned),
            mtime,
            page_blob: is_page_blob(kind.as_ref()),
        })
    }

    /// Written ranges of a page blob, merged, within `[0, size)`.
    async fn page_ranges(
        &self,
        name: &str,
        size: u64,
        version: &Version,
    ) -> Result<Vec<Range<u64>>, ProviderError> {
        let etag = version.etag();
        let segments = (0..size.div_ceil(PAGE_RANGE_SEGMENT)).map(|i| {
            let start = i * PAGE_RANGE_SEGMENT;
            start..(start + PAGE_RANGE_SEGMENT).min(size)
        });
        let per_segment: Vec<Vec<Range<u64>>> = futures::stream::iter(segments)
            .map(|segment| self.page_ranges_in(name, segment, etag, version))
            .buffered(PAGE_RANGE_PARALLEL)
            .try_collect()
            .await?;
        Ok(merge_ranges(per_segment.into_iter().flatten()))
    }

    async fn page_ranges_in(
        &self,
        name: &str,
        segment: Range<u64>,
        etag: Option<&str>,
        version: &Version,
    ) -> Result<Vec<Range<u64>>, ProviderError> {
        let what = format!(
            "listing the page ranges of {}/{name} bytes={}-{}",
            self.display,
            segment.start,
            segment.end - 1
        );
        let options = PageBlobClientListPageRangesOptions {
            range: Some(HttpRange::from(segment.clone())),
            if_match: etag.map(Into::into),
            ..Default::default()
        };
        let mut pages = self
            .blob(name)
            .page_blob_client()
            .list_page_ranges(Some(options))
            .map_err(|err| self.error(&what, err, Some(version)))?;
        let mut ranges = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| self.error(&what, err, Some(version)))?;
            let list = page
                .into_model()
                .map_err(|err| ProviderError::Protocol(format!("{what}: {err}")))?;
            for range in list.page_ranges {
                let (Some(start), Some(end)) = (range.start, range.end) else {
                    continue;
                };
                // Ends are inclusive; clip to the segment asked for.
                let start = (start.max(0) as u64).max(segment.start);
                let end = ((end.max(0) as u64) + 1).min(segment.end);
                if start < end {
                    ranges.push(start..end);
                }
            }
        }
        Ok(ranges)
    }
}

/// A blob's properties at listing or open.
struct Properties {
    size: u64,
    version: Version,
    mtime: SystemTime,
    /// Page blobs (VHDs) are sparse: their written ranges are listed.
    page_blob: bool,
}

/// What an open blob keeps beside its version: its type, which can not
/// change without a new ETag.
struct PageBlob;

fn is_page_blob(kind: Option<&BlobType>) -> bool {
    matches!(kind, Some(BlobType::PageBlob))
}

/// Sorts and merges touching or overlapping ranges (Azurite does not merge
/// adjacent page ranges; neither do segment boundaries).
fn merge_ranges(ranges: impl Iterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = ranges.collect();
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for range in ranges {
        match merged.last_mut() {
            Some(last) if range.start <= last.end => last.end = last.end.max(range.end),
            _ => merged.push(range),
        }
    }
    merged
}

/// Entra ID for a mount without SAS: workload identity (AKS) or a service
/// principal secret when the environment names one, else the developer
/// tools' login (az / azd), else the VM's managed identity.
fn entra_id_credential() -> Result<Arc<dyn TokenCredential>, ProviderError> {
    let config = |err: azure_core::Error| ProviderError::Config(format!("Entra ID: {err}"));
    let env = |name| std::env::var(name).ok().filter(|v: &String| !v.is_empty());
    if env("AZURE_FEDERATED_TOKEN_FILE").is_some() {
        return Ok(azure_identity::WorkloadIdentityCredential::new(None).map_err(config)?);
    }
    if let (Some(tenant), Some(client), Some(secret)) = (
        env("AZURE_TENANT_ID"),
        env("AZURE_CLIENT_ID"),
        env("AZURE_CLIENT_SECRET"),
    ) {
        return Ok(azure_identity::ClientSecretCredential::new(
            &tenant,
            client,
            secret.into(),
            None,
        )
        .map_err(config)?);
    }
    Ok(Arc::new(FirstThatWorks {
        sources: vec![
            azure_identity::DeveloperToolsCredential::new(None).map_err(config)?,
            azure_identity::ManagedIdentityCredential::new(None).map_err(config)?,
        ],
    }))
}

#[derive(Debug)]
struct FirstThatWorks {
    sources: Vec<Arc<dyn TokenCredential>>,
}

#[async_trait]
impl TokenCredential for FirstThatWorks {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let mut failures = Vec::new();
        for source in &self.sources {
            match source.get_token(scopes, options.clone()).await {
                Ok(token) => return Ok(token),
                Err(err) => failures.push(one_line(&err.to_string())),
            }
        }
        Err(azure_core::Error::with_message(
            ErrorKind::Credential,
            format!(
                "no Entra ID credential worked (give a SAS with credentials=, or use anonymous): {}",
                failures.join("; ")
            ),
        ))
    }
}

/// The SDK's multi-line messages on one line, without its "To troubleshoot,
/// visit …" links: a failed mount prints one line.
fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("To troubleshoot"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// SDK errors → provider errors, by what a caller can do about them. The
/// text never carries the SAS: transport errors quote the request URL.
fn map_error(
    what: &str,
    err: azure_core::Error,
    pinned: Option<&Version>,
    sas: Option<&str>,
) -> ProviderError {
    let mut detail = one_line(&redact_queries(&super::causes(&err)));
    if let Some(sas) = sas.filter(|s| !s.is_empty()) {
        detail = detail.replace(sas, "<redacted>");
    }
    match err.kind() {
        ErrorKind::HttpResponse {
            status, error_code, ..
        } => {
            let status = u16::from(*status);
            let code = error_code.clone().unwrap_or_default();
            match status {
                412 => ProviderError::Changed {
                    pinned: pinned.map(|v| v.to_string()).unwrap_or_default(),
                },
                404 if code == "ContainerNotFound" => {
                    ProviderError::NotFound(format!("{what}: the container does not exist"))
                }
                404 => ProviderError::NotFound(format!("{what}: {code}")),
                401 | 403 => ProviderError::Denied(format!(
                    "{what}: {code} (check the SAS token or the Entra ID role)"
                )),
                _ if super::is_transient_status(status) => {
                    ProviderError::Unreachable(format!("{what}: HTTP {status} {code}"))
                }
                _ => ProviderError::Protocol(format!("{what}: HTTP {status} {code}")),
            }
        }
        ErrorKind::Connection | ErrorKind::Io => {
            ProviderError::Unreachable(format!("{what}: {detail}"))
        }
        ErrorKind::Credential => ProviderError::Denied(format!("{what}: {detail}")),
        _ => ProviderError::Protocol(format!("{what}: {detail}")),
    }
}

#[async_trait]
impl Provider for AzureProvider {
    fn preferred_request_size(&self) -> u64 {
        super::OBJECT_STORE_REQUEST
    }

    async fn list(&self) -> Result<Inventory, ProviderError> {
        let mut inventory = Inventory::default();
        if self.single_blob {
            let name = &self.prefix;
            let blob = self.properties(name).await?;
            inventory.disks.push(DiskEntry {
                path: vec![name.rsplit('/').next().unwrap_or(name).to_string()],
                size: blob.size,
                mtime: blob.mtime,
                allocated: match blob.page_blob {
                    true => Some(self.allocated(name, blob.size, &blob.version).await?),
                    false => None,
                },
                version: blob.version,
                locator: name.clone(),
            });
            return Ok(inventory);
        }
        let what = format!("listing {}/{}", self.display, self.prefix);
        let options = BlobContainerClientListBlobsOptions {
            prefix: Some(self.prefix.clone()).filter(|p| !p.is_empty()),
            ..Default::default()
        };
        let mut pages = self
            .container
            .list_blobs(Some(options))
            .map_err(|err| self.error(&what, err, None))?
            .into_pages();
        let mut page_blobs = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|err| self.error(&what, err, None))?;
            let listing = page
                .into_model()
                .map_err(|err| ProviderError::Protocol(format!("{what}: {err}")))?;
            for item in listing.blob_items {
                let Some(name) = item.name else { continue };
                let path = match place_key(&self.prefix, &name) {
                    KeyPlace::Outside => continue,
                    KeyPlace::Folder(path) => {
                        inventory.empty_dirs.push(path);
                        continue;
                    }
                    KeyPlace::Object(path) => path,
                };
                let properties = item.properties.unwrap_or_default();
                let version = Version::from_etag(properties.etag.map(|e| e.to_string()).as_deref())
                    .unwrap_or(Version::Unpinned);
                if is_page_blob(properties.blob_type.as_ref()) {
                    page_blobs.push(inventory.disks.len());
                }
                inventory.disks.push(DiskEntry {
                    path,
                    size: properties.content_length.unwrap_or(0),
                    mtime: properties
                        .last_modified
                        .map(SystemTime::from)
                        .unwrap_or(SystemTime::UNIX_EPOCH),
                    version,
                    locator: name.clone(),
                    allocated: None,
                });
            }
        }
        // st_blocks below the size tells cp and rsync to look for holes.
        let wanted: Vec<(usize, String, u64, Version)> = page_blobs
            .into_iter()
            .map(|i| {
                let disk = &inventory.disks[i];
                (i, disk.locator.clone(), disk.size, disk.version.clone())
            })
            .collect();
        let allocated: Vec<(usize, u64)> = futures::stream::iter(wanted)
            .map(|(i, name, size, version)| async move {
                self.allocated(&name, size, &version)
                    .await
                    .map(|allocated| (i, allocated))
            })
            .buffered(PAGE_RANGE_PARALLEL)
            .try_collect()
            .await?;
        for (i, allocated) in allocated {
            inventory.disks[i].allocated = Some(allocated);
        }
        Ok(inventory)
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        let blob = self.properties(&disk.locator).await?;
        let mut pinned = Pinned::new(blob.size, blob.version);
        if blob.page_blob {
            pinned.handle = Some(Arc::new(PageBlob));
        }
        Ok(pinned)
    }

    async fn data_ranges(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        let page_blob = pinned
            .handle
            .as_ref()
            .is_some_and(|handle| handle.is::<PageBlob>());
        if !page_blob {
            return Ok(None);
        }
        self.page_ranges(&disk.locator, pinned.size, &pinned.version)
            .await
            .map(Some)
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        let version = &pinned.version;
        let Some(partition) = NonZero::new(len) else {
            return Ok(Bytes::new());
        };
        let what = format!(
            "GET {}/{} bytes={offset}-{}",
            self.display,
            disk.locator,
            offset + len as u64 - 1
        );
        let expected = Expected {
            what: &what,
            offset,
            len,
            size: Some(pinned.size),
            etag: version.etag(),
            modified: None,
            pinned: version,
        };
        // One GET per fetch: the SDK's managed download would otherwise
        // split it into parallel 4 MiB parts. With one partition of the
        // range's length it sends one ranged GET and hands its body over as
        // a stream, unread, with the answer's headers.
        let options = BlobClientDownloadOptions {
            range: Some(HttpRange::new(offset, len as u64)),
            if_match: version.etag().map(Into::into),
            partition_size: Some(partition),
            parallel: NonZero::new(1),
            ..Default::default()
        };
        let result = self
            .blob(&disk.locator)
            .download(Some(options))
            .await
            .map_err(|err| self.error(&what, err, Some(version)))?;
        // The status is hidden (the SDK takes 200 and 206 alike): a
        // Content-Range stands for 206, none for 200. A Content-Range
        // shorter than asked would make the SDK fetch the rest itself
        // before this check sees it; it is refused all the same.
        let header = |name: &'static str| result.headers.get_optional_str(&name.into());
        expected.check(&Answer {
            status: None,
            content_range: header("content-range"),
            content_length: header("content-length").and_then(|v| v.trim().parse().ok()),
            etag: header("etag"),
            last_modified: None,
        })?;
        let mut stream = result.body;
        let mut body = expected.body();
        while let Some(chunk) = stream.next().await {
            body.push(chunk.map_err(|err| self.error(&what, err, Some(version)))?)?;
        }
        body.finish()
    }
}

impl AzureProvider {
    async fn allocated(
        &self,
        name: &str,
        size: u64,
        version: &Version,
    ) -> Result<u64, ProviderError> {
        let ranges = self.page_ranges(name, size, version).await?;
        Ok(ranges.iter().map(|r| r.end - r.start).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_name_an_account_a_container_and_an_optional_prefix() {
        let at = parse_source("az://acct01/disks/exports/2024/").unwrap();
        assert_eq!(
            (
                at.account.as_str(),
                at.container.as_str(),
                at.prefix.as_str()
            ),
            ("acct01", "disks", "exports/2024/")
        );
        assert_eq!(at.sas, None);
        let at = parse_source("az://acct01/disks?sv=2020&sig=abc").unwrap();
        assert_eq!(at.sas.as_deref(), Some("sv=2020&sig=abc"));
        assert_eq!(at.prefix, "");
        for bad in [
            "az://",
            "az://acct01",
            "az://Acct/disks",
            "az://ab/disks",
            "az://acct01/Disks",
            "az://acct01/-disks",
            "az://acct01/di--sks",
        ] {
            let err = parse_source(bad).unwrap_err().to_string();
            assert!(err.contains("not an Azure blob source"), "{bad}: {err}");
        }
    }

    #[test]
    fn a_blob_sas_url_names_one_blob_and_never_echoes_the_token() {
        let url = "https://md-abc123.blob.core.windows.net/vhds/my%20disk.vhd?sv=2022-11-02&sr=b&sig=SECRET";
        assert!(is_blob_sas_url(url));
        assert!(!is_blob_sas_url("https://host.example/manifest.json?sig=x"));
        assert!(!is_blob_sas_url(
            "https://a.blob.core.windows.net/c/manifest.json?sig=x"
        ));
        let at = parse_source(url).unwrap();
        assert_eq!(at.account, "md-abc123");
        assert_eq!(at.container, "vhds");
        assert_eq!(at.prefix, "my disk.vhd");
        assert_eq!(
            at.account_url.as_deref(),
            Some("https://md-abc123.blob.core.windows.net")
        );
        let err = parse_source("https://acct.blob.core.windows.net/C?sig=SECRET")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn sdk_messages_become_one_line_without_troubleshooting_links() {
        let text = "Multiple errors:\nAzureCliCredential failed. az not found\nTo troubleshoot, visit https://aka.ms/x\n\nManagedIdentityCredential failed.";
        assert_eq!(
            one_line(text),
            "Multiple errors: AzureCliCredential failed. az not found ManagedIdentityCredential failed."
        );
    }

    #[test]
    fn page_ranges_merge_when_they_touch() {
        let merged = merge_ranges([4096..8192, 0..512, 512..1024, 8000..9000].into_iter());
        assert_eq!(merged, vec![0..1024, 4096..9000]);
    }
}
