//! Fetching: one provider request for a run of blocks, charged to the
//! throttle for exactly the bytes asked for, retried within the time
//! budget, checked for length, and landed in the cache.
//!
//! Each fetch runs in its own task under its file's cancellation token, so
//! a closed file or a killed reader stops its fetches, queued or running.
//! A fetch that panics fails only the reads waiting on it (EIO): its
//! blocks leave the in-flight map all the same ([`super::flight::Landing`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::future::FutureExt;
use tokio_util::sync::CancellationToken;

use super::cache::BlockKey;
use super::flight::{FetchError, Flight, Landing, SharedFetch};
use super::retry::Budget;
use super::{FileReader, InFlight, ReadPath};
use crate::provider::ProviderError;

/// Block `i` of a span fetched from a block boundary (a slice, no copy).
pub(super) fn block_of(span: &Bytes, i: u64, block_size: u64) -> Bytes {
    let start = ((i * block_size) as usize).min(span.len());
    let end = (((i + 1) * block_size) as usize).min(span.len());
    span.slice(start..end)
}

/// Shared zeros for blocks in holes (in .bss: no memory until read).
static ZEROS: [u8; 4 << 20] = [0; 4 << 20];

pub(super) fn zeros(len: usize) -> Bytes {
    if len <= ZEROS.len() {
        Bytes::from_static(&ZEROS[..len])
    } else {
        Bytes::from(vec![0; len])
    }
}

impl ReadPath {
    /// Starts one fetch of `count` blocks from `first` and registers each
    /// block's share of it as in flight (under the caller's lock, so that
    /// the task's own removal always comes after the insertion); returns
    /// the first block's. Read-ahead passes its reader's run: a seek that
    /// cancels the run drops the fetch if no tokens were taken for it yet
    /// and no read waits for it.
    pub(super) fn start_fetch(
        self: &Arc<Self>,
        inflight: &mut HashMap<BlockKey, Flight>,
        reader: &Arc<FileReader>,
        first: u64,
        count: u64,
        run: Option<&CancellationToken>,
    ) -> SharedFetch {
        let this = Arc::clone(self);
        let owner = Arc::clone(reader);
        let demanded = Arc::new(AtomicBool::new(run.is_none()));
        let run = run.cloned();
        let wanted = Arc::clone(&demanded);
        let block_size = self.config.block_size;
        let file = reader.key;
        let task = tokio::spawn(async move {
            // Dropped last, after the cache holds the blocks: a miss never
            // finds neither.
            let _landing = Landing {
                flights: &this.inflight,
                file,
                first,
                count,
            };
            let result = tokio::select! {
                biased;
                _ = owner.cancel.cancelled() => Err(FetchError::Cancelled),
                result = this.fetch_span(&owner, first, count, run.as_ref(), &wanted) => result,
            };
            if let Ok(span) = &result {
                for i in 0..count {
                    this.cache.insert(
                        BlockKey {
                            file,
                            index: first + i,
                        },
                        block_of(span, i, block_size),
                    );
                }
            }
            result
        });
        // The reader, not a copy of its path: no allocation per fetch for
        // a log line that a panic alone needs.
        let reader = Arc::clone(reader);
        let whole = async move {
            match task.await {
                Ok(result) => result,
                Err(err) if err.is_panic() => {
                    // The panic hook has logged where; say which read.
                    tracing::error!(path = %reader.path, first, count, "a fetch panicked: its reads fail with EIO");
                    Err(FetchError::Failed(Arc::new(ProviderError::Internal(
                        "the fetch panicked (see the log)".into(),
                    ))))
                }
                Err(_) => Err(FetchError::Cancelled),
            }
        }
        .boxed();
        let flight = |fetch: SharedFetch| Flight {
            fetch,
            demanded: Arc::clone(&demanded),
        };
        if count == 1 {
            let fetch = whole.shared();
            inflight.insert(BlockKey { file, index: first }, flight(fetch.clone()));
            return fetch;
        }
        let whole = whole.shared();
        let share = |i: u64| {
            whole
                .clone()
                .map(move |result| result.map(|span| block_of(&span, i, block_size)))
                .boxed()
                .shared()
        };
        for i in 1..count {
            inflight.insert(
                BlockKey {
                    file,
                    index: first + i,
                },
                flight(share(i)),
            );
        }
        let fetch = share(0);
        inflight.insert(BlockKey { file, index: first }, flight(fetch.clone()));
        fetch
    }

    /// `count` blocks from `first`, in one provider request; read-ahead
    /// (`run` given) is dropped when the run goes stale before it is
    /// charged, unless a read came to wait for it.
    async fn fetch_span(
        &self,
        reader: &FileReader,
        first: u64,
        count: u64,
        run: Option<&CancellationToken>,
        demanded: &AtomicBool,
    ) -> Result<Bytes, FetchError> {
        let charged = AtomicBool::new(false);
        let work = self.fetch_charged(reader, first, count, run.is_some(), demanded, &charged);
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
        first: u64,
        count: u64,
        ahead: bool,
        demanded: &AtomicBool,
        charged: &AtomicBool,
    ) -> Result<Bytes, FetchError> {
        let offset = first * self.config.block_size;
        let block_len = (count * self.config.block_size).min(reader.size - offset);
        // A span that is partly hole: only from its first data byte to its
        // last is fetched and charged; the rest is zeros.
        let span = reader.data.data_span(offset, offset + block_len);
        let len = span.end - span.start;
        // Read-ahead buffers come from the slots. A run is at most half the
        // window, which is at most half the cache (three quarters of
        // `memory`), so it never asks for more slots than the `memory / 4`
        // there are. A demand never waits behind read-ahead for a slot: its
        // buffer is one read's, and the kernel bounds the reads in flight.
        let _slots = match ahead {
            true => Some(
                self.fetch_slots
                    .acquire_many(count as u32)
                    .await
                    .map_err(|_| FetchError::Cancelled)?,
            ),
            false => None,
        };
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
                            self.provider.read(
                                &reader.disk,
                                &reader.pinned,
                                span.start,
                                len as usize,
                            ),
                        )
                        .await?;
                    if data.len() as u64 != len {
                        return Err(ProviderError::Protocol(format!(
                            "asked for {len} bytes at {}, got {}",
                            span.start,
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
                if len == block_len {
                    return Ok(data);
                }
                let mut block = vec![0u8; block_len as usize];
                let at = (span.start - offset) as usize;
                block[at..at + data.len()].copy_from_slice(&data);
                Ok(Bytes::from(block))
            }
            Err(err) => Err(self.failed(reader, span.start, len, err)),
        }
    }

    fn failed(&self, reader: &FileReader, offset: u64, len: u64, err: ProviderError) -> FetchError {
        self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(path = %reader.path, offset, len, "read failed: {err}");
        FetchError::Failed(Arc::new(err))
    }
}
