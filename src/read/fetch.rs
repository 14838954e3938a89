//! Fetching: one provider request for one extent, charged to the
//! throttle for exactly the bytes asked for, retried within the time
//! budget, checked for length, and landed in the extent map.
//!
//! Each fetch runs in its own task under its file's cancellation token, so
//! a closed file or a killed reader stops its fetches, queued or running.
//! A fetch that panics fails only the reads waiting on it (EIO): its
//! extent leaves the map all the same ([`Landing`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::FutureExt;
use tokio_util::sync::CancellationToken;

use super::extents::{ExtentKey, Extents, FetchError, Inner, SharedFetch, State};
use super::retry::Budget;
use super::{AheadSlot, FileReader, InFlight, ReadPath};
use crate::provider::ProviderError;

/// Shared zeros for holes (in .bss: no memory until read).
static ZEROS: [u8; 4 << 20] = [0; 4 << 20];

pub(super) fn zeros(len: usize) -> Bytes {
    if len <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..len])
    } else {
        Bytes::from(vec![0; len])
    }
}

/// Lands a fetch's extent, or takes it out of the map however the task
/// ends without bytes (error, cancellation, panic): no read can find an
/// extent whose fetch is gone.
struct Landing<'a> {
    extents: &'a Extents,
    key: ExtentKey,
    id: u64,
    ahead: bool,
    landed: bool,
}

impl Landing<'_> {
    fn land(mut self, bytes: Bytes) {
        self.landed = true;
        self.extents
            .lock()
            .land(self.key, self.id, bytes, self.ahead);
    }
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        if !self.landed {
            self.extents.lock().abandon(self.key, self.id);
        }
    }
}

impl ReadPath {
    /// Starts one fetch of `[start, end)` and registers it in `map` (whose
    /// lock the caller holds, so the task's landing always comes after the
    /// registration); the caller has made room for it. Read-ahead passes
    /// its reader's run: a seek that cancels the run drops the fetch if no
    /// tokens were taken for it yet and no read waits for it.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        map: &mut Inner,
        reader: &Arc<FileReader>,
        start: u64,
        end: u64,
        run: Option<&CancellationToken>,
    ) -> SharedFetch {
        let this = Arc::clone(self);
        let owner = Arc::clone(reader);
        let demanded = Arc::new(AtomicBool::new(run.is_none()));
        let ahead = run.is_some();
        let run = run.cloned();
        let wanted = Arc::clone(&demanded);
        let key = ExtentKey {
            file: reader.key,
            start,
        };
        let id = map.allocate_id();
        let slot = ahead.then(|| AheadSlot::take(self));
        let task = tokio::spawn(async move {
            let _slot = slot;
            let landing = Landing {
                extents: &this.extents,
                key,
                id,
                ahead,
                landed: false,
            };
            let result = tokio::select! {
                biased;
                _ = owner.cancel.cancelled() => Err(FetchError::Cancelled),
                result = this.fetch_span(&owner, start, end - start, run.as_ref(), &wanted) => result,
            };
            if let Ok(bytes) = &result {
                landing.land(bytes.clone());
            }
            result
        });
        // The reader, not a copy of its path: no allocation per fetch for
        // a log line that a panic alone needs.
        let reader = Arc::clone(reader);
        let fetch = async move {
            match task.await {
                Ok(result) => result,
                Err(err) if err.is_panic() => {
                    // The panic hook has logged where; say which read.
                    tracing::error!(path = %reader.path, start, end, "a fetch panicked: its reads fail with EIO");
                    Err(FetchError::Failed(Arc::new(ProviderError::Internal(
                        "the fetch panicked (see the log)".into(),
                    ))))
                }
                Err(_) => Err(FetchError::Cancelled),
            }
        }
        .boxed()
        .shared();
        map.insert(
            key.file,
            start,
            end,
            id,
            State::Pending {
                fetch: fetch.clone(),
                demanded,
            },
        );
        fetch
    }

    /// `len` bytes at `start`, in one provider request; read-ahead (`run`
    /// given) is dropped when the run goes stale before it is charged,
    /// unless a read came to wait for it.
    async fn fetch_span(
        &self,
        reader: &FileReader,
        start: u64,
        len: u64,
        run: Option<&CancellationToken>,
        demanded: &AtomicBool,
    ) -> Result<Bytes, FetchError> {
        let charged = AtomicBool::new(false);
        let work = self.fetch_charged(reader, start, len, run.is_some(), demanded, &charged);
        let Some(run) = run else {
            return work.await;
        };
        let stale = async {
            run.cancelled().await;
            if charged.load(Ordering::Relaxed) || demanded.load(Ordering::Relaxed) {
                // Paid for or waited on: it runs to the end.
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            result = work => result,
            () = stale => Err(FetchError::Cancelled),
        }
    }

    async fn fetch_charged(
        &self,
        reader: &FileReader,
        start: u64,
        len: u64,
        ahead: bool,
        demanded: &AtomicBool,
        charged: &AtomicBool,
    ) -> Result<Bytes, FetchError> {
        self.stats.fetches_in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.stats.fetches_in_flight);
        let result = self
            .config
            .retry
            .run(
                &mut Budget::default(),
                &self.stats.retries,
                (&reader.path, "read"),
                || async {
                    match ahead {
                        true => {
                            self.throttle
                                .acquire_ahead(&reader.flow, len, demanded)
                                .await
                        }
                        false => self.throttle.acquire(&reader.flow, len).await,
                    }
                    charged.store(true, Ordering::Relaxed);
                },
                || async {
                    self.stats.fetches.fetch_add(1, Ordering::Relaxed);
                    let data = self
                        .calls
                        .timed(
                            "read",
                            self.provider
                                .read(&reader.disk, &reader.pinned, start, len as usize),
                        )
                        .await?;
                    if data.len() as u64 != len {
                        return Err(ProviderError::Protocol(format!(
                            "asked for {len} bytes at {start}, got {}",
                            data.len()
                        )));
                    }
                    Ok(data)
                },
            )
            .await;
        match result {
            Ok(data) => {
                self.stats.bytes_fetched.fetch_add(len, Ordering::Relaxed);
                Ok(data)
            }
            Err(err) => Err(self.failed(reader, start, len, err)),
        }
    }

    fn failed(&self, reader: &FileReader, offset: u64, len: u64, err: ProviderError) -> FetchError {
        self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %reader.path, offset, len, "read failed: {err}");
        FetchError::Failed(Arc::new(err))
    }
}
