//! Provider requests by operation: how many, how long, how they failed.
//! Fixed arrays of atomics: recording one is a few relaxed adds, no lock.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use crate::provider::ProviderError;

/// The operations counted, in a fixed order (metrics labels).
pub const OPERATIONS: [&str; 3] = ["read", "stat", "data_ranges"];

/// Upper bounds of the latency histogram, in seconds: from a loopback
/// answer to a WAN request that is about to time out.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

#[derive(Debug, Default)]
pub struct OperationCalls {
    pub requests: AtomicU64,
    pub errors: [AtomicU64; ProviderError::KINDS.len()],
    /// Requests that took at most each bound (not cumulative; summed when
    /// rendered).
    pub latency: [AtomicU64; LATENCY_BUCKETS.len()],
    pub latency_nanos: AtomicU64,
}

#[derive(Debug, Default)]
pub struct ProviderCalls {
    pub operations: [OperationCalls; OPERATIONS.len()],
}

impl ProviderCalls {
    /// Runs one provider request and records it under `operation`.
    pub async fn timed<T>(
        &self,
        operation: &str,
        call: impl Future<Output = Result<T, ProviderError>>,
    ) -> Result<T, ProviderError> {
        let started = Instant::now();
        let result = call.await;
        if let Some(index) = OPERATIONS.iter().position(|op| *op == operation) {
            self.record(
                index,
                started.elapsed().as_secs_f64(),
                result.as_ref().err(),
            );
        }
        result
    }

    fn record(&self, operation: usize, seconds: f64, error: Option<&ProviderError>) {
        let calls = &self.operations[operation];
        calls.requests.fetch_add(1, Ordering::Relaxed);
        calls
            .latency_nanos
            .fetch_add((seconds * 1e9) as u64, Ordering::Relaxed);
        if let Some(bucket) = LATENCY_BUCKETS.iter().position(|&bound| seconds <= bound) {
            calls.latency[bucket].fetch_add(1, Ordering::Relaxed);
        }
        if let Some(error) = error {
            if let Some(kind) = ProviderError::KINDS.iter().position(|k| *k == error.kind()) {
                calls.errors[kind].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn counts_latencies_and_errors_by_kind() {
        let calls = ProviderCalls::default();
        let _ = calls
            .timed("stat", async { Ok::<_, ProviderError>(()) })
            .await;
        let _ = calls
            .timed("stat", async {
                Err::<(), _>(ProviderError::NotFound("gone".into()))
            })
            .await;
        let _ = calls
            .timed("unknown", async { Ok::<_, ProviderError>(()) })
            .await;
        let stat = &calls.operations[1];
        assert_eq!(stat.requests.load(Ordering::Relaxed), 2);
        assert_eq!(stat.errors[1].load(Ordering::Relaxed), 1);
        let counted: u64 = stat.latency.iter().map(|b| b.load(Ordering::Relaxed)).sum();
        assert_eq!(counted, 2);
        assert_eq!(calls.operations[0].requests.load(Ordering::Relaxed), 0);
    }
}
