//! One token bucket per mount, metering bytes fetched from the provider.
//!
//! Built on governor's GCRA limiter with 1 KiB cells (1-byte cells run
//! measurably fast from nanosecond rounding; 1 KiB cells hold the rate to a
//! few hundredths of a percent). Sub-cell remainders are carried to the next
//! charge, so every byte is paid for exactly once.
//!
//! governor does not queue waiters and refuses a charge larger than the
//! burst. Both are handled here: a FIFO mutex admits one waiter at a time, in
//! arrival order, and every charge is taken in pieces no larger than the
//! burst. Each piece queues again, so charges interleave piece by piece.
//!
//! Arrival order alone would share the rate by the number of fetches each
//! reader keeps queued, and read-ahead makes that differ from reader to
//! reader. So every reader charges through its own [`Flow`], which lets one
//! of its charges at a time into the queue: with N readers waiting the queue
//! holds one charge of each, and they are served round-robin.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

const CELL: u64 = 1024;

/// One reader's place in the throttle: at most one of its charges waits in
/// the shared queue at a time.
pub struct Flow {
    turn: tokio::sync::Mutex<()>,
}

impl Flow {
    pub fn new() -> Self {
        Flow {
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl Default for Flow {
    fn default() -> Self {
        Self::new()
    }
}

pub struct Throttle {
    limiter: DefaultDirectRateLimiter,
    /// Bytes charged but not yet a whole cell. The lock is the FIFO queue.
    carry: tokio::sync::Mutex<u64>,
    burst_cells: u32,
    rate: u64,
    burst: u64,
}

impl Throttle {
    /// `rate` bytes per second with a bucket `burst` bytes deep.
    pub fn new(rate: u64, burst: u64) -> Self {
        let rate = rate.max(1);
        let burst_cells = (burst / CELL).clamp(1, u64::from(u32::MAX)) as u32;
        let period_nanos = ((CELL as u128 * 1_000_000_000) / rate as u128).max(1);
        let period = Duration::from_nanos(period_nanos.min(u64::MAX as u128) as u64);
        let quota = Quota::with_period(period)
            .expect("period is at least one nanosecond")
            .allow_burst(NonZeroU32::new(burst_cells).expect("clamped to at least 1"));
        Throttle {
            limiter: RateLimiter::direct(quota),
            carry: tokio::sync::Mutex::new(0),
            burst_cells,
            rate,
            burst: u64::from(burst_cells) * CELL,
        }
    }

    pub fn rate(&self) -> u64 {
        self.rate
    }

    pub fn burst(&self) -> u64 {
        self.burst
    }

    /// Waits until `bytes` may be fetched. Cancel-safe: dropping the future
    /// gives up the place in the queue; pieces already taken stay spent.
    pub async fn acquire(&self, flow: &Flow, bytes: u64) {
        let _turn = flow.turn.lock().await;
        let mut remaining = bytes;
        while remaining > 0 {
            let mut carry = self.carry.lock().await;
            let room = u64::from(self.burst_cells) * CELL - *carry;
            let piece = remaining.min(room);
            let owed = *carry + piece;
            *carry = owed % CELL;
            if let Some(cells) = NonZeroU32::new((owed / CELL) as u32) {
                self.limiter
                    .until_n_ready(cells)
                    .await
                    .expect("a piece never exceeds the burst");
            }
            drop(carry);
            remaining -= piece;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::Instant;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_the_rate_after_the_burst() {
        let rate = 8 << 20;
        let throttle = Throttle::new(rate, 256 << 10);
        let flow = Flow::new();
        throttle.acquire(&flow, 256 << 10).await; // drain the initial bucket
        let started = Instant::now();
        let total = 4 << 20;
        for _ in 0..(total / (100 << 10)) {
            throttle.acquire(&flow, 100 << 10).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let expected = (total / (100 << 10) * (100 << 10)) as f64 / rate as f64;
        assert!(
            (elapsed / expected - 1.0).abs() < 0.05,
            "took {elapsed:.3}s, expected {expected:.3}s"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn charges_larger_than_the_burst_are_split() {
        let throttle = Throttle::new(4 << 20, 64 << 10);
        let started = Instant::now();
        throttle.acquire(&Flow::new(), 1 << 20).await;
        let elapsed = started.elapsed().as_secs_f64();
        // 64 KiB come from the full bucket, the rest at 4 MiB/s.
        let expected = ((1 << 20) - (64 << 10)) as f64 / (4 << 20) as f64;
        assert!(
            (elapsed - expected).abs() < 0.03,
            "took {elapsed:.3}s, expected {expected:.3}s"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn odd_sizes_are_charged_exactly() {
        let throttle = Throttle::new(1 << 20, 64 << 10);
        let flow = Flow::new();
        throttle.acquire(&flow, 64 << 10).await;
        let started = Instant::now();
        // 2000 charges of 333 bytes = 666,000 bytes ≈ 0.635 s at 1 MiB/s.
        for _ in 0..2000 {
            throttle.acquire(&flow, 333).await;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let expected = 666_000.0 / (1 << 20) as f64;
        assert!(
            (elapsed / expected - 1.0).abs() < 0.05,
            "took {elapsed:.3}s, expected {expected:.3}s"
        );
    }

    /// Readers that keep different numbers of charges queued (as read-ahead
    /// windows of different depths do) still get equal shares.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn readers_share_fairly_whatever_their_queue_depth() {
        let throttle = Arc::new(Throttle::new(4 << 20, 1 << 20));
        // Drain the initial bucket, so that the first task spawned does not
        // take the whole burst before the others run.
        throttle.acquire(&Flow::new(), 1 << 20).await;
        let deadline = Instant::now() + Duration::from_millis(1500);
        let got = Arc::new([(); 4].map(|_| AtomicU64::new(0)));
        let mut tasks = Vec::new();
        for reader in 0..4usize {
            let flow = Arc::new(Flow::new());
            for _ in 0..(1 + reader * 4) {
                let (throttle, flow, got) = (throttle.clone(), flow.clone(), got.clone());
                tasks.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        throttle.acquire(&flow, 128 << 10).await;
                        if Instant::now() < deadline {
                            got[reader].fetch_add(128 << 10, Ordering::Relaxed);
                        }
                    }
                }));
            }
        }
        for task in tasks {
            task.await.unwrap();
        }
        let shares: Vec<u64> = got.iter().map(|g| g.load(Ordering::Relaxed)).collect();
        let min = *shares.iter().min().unwrap() as f64;
        let max = *shares.iter().max().unwrap() as f64;
        assert!(max / min < 1.3, "unfair shares {shares:?}");
    }
}
