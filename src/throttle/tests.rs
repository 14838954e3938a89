use super::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn limit(rate: u64, burst: u64) -> Option<Limit> {
    Some(Limit { rate, burst })
}

fn assert_near(label: &str, got: f64, expected: f64, tolerance: f64) {
    assert!(
        (got / expected - 1.0).abs() < tolerance,
        "{label}: got {got:.3}, expected {expected:.3} (±{:.0}%)",
        tolerance * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_the_rate_after_the_burst() {
    let rate = 8 << 20;
    let throttle = Throttle::new(limit(rate, 256 << 10));
    let flow = Flow::default();
    throttle.acquire(&flow, 256 << 10).await; // drain the initial bucket
    let started = Instant::now();
    let total = 4 << 20;
    for _ in 0..(total / (100 << 10)) {
        throttle.acquire(&flow, 100 << 10).await;
    }
    let expected = (total / (100 << 10) * (100 << 10)) as f64 / rate as f64;
    assert_near("seconds", started.elapsed().as_secs_f64(), expected, 0.05);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_larger_than_the_burst_are_split() {
    let throttle = Throttle::new(limit(4 << 20, 64 << 10));
    let started = Instant::now();
    throttle.acquire(&Flow::default(), 1 << 20).await;
    // 64 KiB come from the full bucket, the rest at 4 MiB/s.
    let expected = ((1 << 20) - (64 << 10)) as f64 / (4 << 20) as f64;
    let elapsed = started.elapsed().as_secs_f64();
    assert!(
        (elapsed - expected).abs() < 0.03,
        "took {elapsed:.3}s, expected {expected:.3}s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_sizes_are_charged_exactly() {
    let throttle = Throttle::new(limit(1 << 20, 64 << 10));
    let flow = Flow::default();
    throttle.acquire(&flow, 64 << 10).await;
    let started = Instant::now();
    // 2000 charges of 333 bytes = 666,000 bytes ≈ 0.635 s at 1 MiB/s.
    for _ in 0..2000 {
        throttle.acquire(&flow, 333).await;
    }
    let expected = 666_000.0 / (1 << 20) as f64;
    assert_near("seconds", started.elapsed().as_secs_f64(), expected, 0.05);
}

/// Runs `readers` flows (with these weights and queue depths) against the
/// throttle for `seconds`; returns the bytes each got.
async fn contend(throttle: &Arc<Throttle>, readers: &[(u32, usize)], seconds: f64) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let got: Arc<Vec<AtomicU64>> = Arc::new(readers.iter().map(|_| AtomicU64::new(0)).collect());
    let mut tasks = Vec::new();
    for (reader, &(weight, depth)) in readers.iter().enumerate() {
        let flow = Arc::new(Flow::new(weight));
        for _ in 0..depth {
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
    got.iter().map(|g| g.load(Ordering::Relaxed)).collect()
}

/// Readers that keep different numbers of charges queued (as read-ahead
/// windows of different depths do) still get equal shares.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readers_share_fairly_whatever_their_queue_depth() {
    let throttle = Throttle::new(limit(4 << 20, 1 << 20));
    // Drain the initial bucket, so that the first task spawned does not
    // take the whole burst before the others run.
    throttle.acquire(&Flow::default(), 1 << 20).await;
    let shares = contend(&throttle, &[(1, 1), (1, 5), (1, 9), (1, 13)], 1.5).await;
    let min = *shares.iter().min().unwrap() as f64;
    let max = *shares.iter().max().unwrap() as f64;
    assert!(max / min < 1.3, "unfair shares {shares:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_set_the_shares_under_contention() {
    let rate = 8 << 20;
    let throttle = Throttle::new(limit(rate, 256 << 10));
    throttle.acquire(&Flow::default(), 256 << 10).await;
    let shares = contend(&throttle, &[(3, 2), (1, 6)], 2.0).await;
    assert_near("3:1 share", shares[0] as f64 / shares[1] as f64, 3.0, 0.10);
    let total = (shares[0] + shares[1]) as f64 / 2.0;
    assert_near("total rate", total, rate as f64, 0.05);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_heavy_or_light_reader_gets_the_whole_rate() {
    let rate = 8 << 20;
    for weight in [1, 10] {
        let throttle = Throttle::new(limit(rate, 256 << 10));
        throttle.acquire(&Flow::default(), 256 << 10).await;
        let shares = contend(&throttle, &[(weight, 2)], 1.0).await;
        assert_near("lone reader", shares[0] as f64, rate as f64, 0.05);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lower_limit_applies_to_waiting_charges_without_a_burst() {
    let throttle = Throttle::new(limit(32 << 20, 4 << 20));
    let flow = Flow::default();
    throttle.acquire(&flow, 4 << 20).await;
    throttle.set_limit(limit(2 << 20, 256 << 10));
    let started = Instant::now();
    // The bucket was empty: nothing passes faster than the new rate.
    throttle.acquire(&flow, 1 << 20).await;
    assert_near("seconds", started.elapsed().as_secs_f64(), 0.5, 0.05);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_higher_limit_frees_a_waiting_charge_at_once() {
    let throttle = Throttle::new(limit(1 << 20, 64 << 10));
    let flow = Arc::new(Flow::default());
    throttle.acquire(&flow, 64 << 10).await;
    let started = Instant::now();
    let waiting = {
        let (throttle, flow) = (throttle.clone(), flow.clone());
        tokio::spawn(async move { throttle.acquire(&flow, 4 << 20).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    throttle.set_limit(limit(64 << 20, 4 << 20));
    waiting.await.unwrap();
    // ~200 KiB at the old rate, the rest at 64 MiB/s: well under the 4 s
    // the old rate would have taken.
    let elapsed = started.elapsed().as_secs_f64();
    assert!(elapsed < 0.4, "took {elapsed:.3}s");
    throttle.set_limit(None);
    let started = Instant::now();
    throttle.acquire(&flow, 1 << 30).await;
    assert!(started.elapsed() < Duration::from_millis(50), "off is off");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_file_is_capped_inside_the_mount_rate() {
    let throttle = Throttle::new(limit(16 << 20, 1 << 20));
    throttle.set_file_limit(Some(Limit::auto(2 << 20)));
    throttle.acquire(&Flow::default(), 1 << 20).await;
    let shares = contend(&throttle, &[(1, 2), (5, 2)], 1.5).await;
    for share in shares {
        // Each at most its cap (plus its first bucket), not the mount's.
        assert_near("capped", share as f64 / 1.5, (2 << 20) as f64, 0.12);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_charge_gives_its_place_away() {
    let throttle = Throttle::new(limit(1 << 20, 64 << 10));
    throttle.acquire(&Flow::default(), 64 << 10).await;
    let hog = Flow::default();
    let cancelled =
        tokio::time::timeout(Duration::from_millis(100), throttle.acquire(&hog, 8 << 20)).await;
    assert!(cancelled.is_err());
    let started = Instant::now();
    throttle.acquire(&Flow::default(), 128 << 10).await;
    // Only what the hog took before it gave up is owed: ~0.1 s of pieces.
    assert!(started.elapsed() < Duration::from_millis(300));
}

/// Leases like the fleet task does: whenever the gate runs low, one more,
/// at most `rate` bytes per second.
fn fake_fleet(throttle: &Arc<Throttle>, lease: u64, rate: u64) -> tokio::task::JoinHandle<()> {
    throttle.attach_fleet(lease, rate);
    let throttle = Arc::clone(throttle);
    tokio::spawn(async move {
        let mut next = tokio::time::Instant::now();
        loop {
            throttle.fleet_wanted().await;
            while throttle.fleet_low() {
                next = next.max(tokio::time::Instant::now());
                tokio::time::sleep_until(next).await;
                next += Duration::from_secs_f64(lease as f64 / rate as f64);
                throttle.credit_fleet(lease);
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_gate_meters_pieces_larger_than_a_lease() {
    // Unlimited locally: pieces are 1 MiB, leases 100 KiB.
    let throttle = Throttle::new(None);
    let leaser = fake_fleet(&throttle, 100 << 10, 8 << 20);
    let started = Instant::now();
    let flow = Flow::default();
    for _ in 0..8 {
        throttle.acquire(&flow, 1 << 20).await;
    }
    leaser.abort();
    assert_near("seconds", started.elapsed().as_secs_f64(), 1.0, 0.08);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lower_of_the_local_and_fleet_limits_wins() {
    let throttle = Throttle::new(limit(2 << 20, 64 << 10));
    let leaser = fake_fleet(&throttle, 256 << 10, 8 << 20);
    throttle.acquire(&Flow::default(), 64 << 10).await;
    let started = Instant::now();
    throttle.acquire(&Flow::default(), 1 << 20).await;
    assert_near(
        "local 2M under fleet 8M",
        started.elapsed().as_secs_f64(),
        0.5,
        0.08,
    );
    throttle.set_limit(limit(32 << 20, 1 << 20));
    let started = Instant::now();
    throttle.acquire(&Flow::default(), 4 << 20).await;
    leaser.abort();
    assert_near(
        "fleet 8M under local 32M",
        started.elapsed().as_secs_f64(),
        0.5,
        0.10,
    );
}

// Limits from outside: checked where they come in, clamped in here, so no
// value can panic the arithmetic or spin the pacer.

#[test]
fn limits_are_checked_by_name() {
    let check = |rate, burst| Limit { rate, burst }.check();
    assert_eq!(check(0, 0), Err(LimitError::ZeroRate));
    assert_eq!(check(1 << 20, 0), Err(LimitError::BurstTooSmall(0)));
    assert_eq!(check(1 << 20, 4095), Err(LimitError::BurstTooSmall(4095)));
    assert_eq!(
        check(MAX_RATE + 1, 4096),
        Err(LimitError::RateTooHigh(MAX_RATE + 1))
    );
    assert_eq!(
        check(1, MAX_BURST + 1),
        Err(LimitError::BurstTooLarge(MAX_BURST + 1))
    );
    assert_eq!(check(1, 4096), Ok(()));
    assert_eq!(check(MAX_RATE, MAX_BURST), Ok(()));
    let message = LimitError::BurstTooSmall(0).to_string();
    assert!(
        message.contains("burst 0 B is below the minimum 4096 B"),
        "{message}"
    );
    assert_eq!(
        Limit { rate: 0, burst: 0 }.clamped(),
        Limit {
            rate: 1,
            burst: 4096
        }
    );
    assert_eq!(
        Limit {
            rate: u64::MAX,
            burst: u64::MAX
        }
        .clamped(),
        Limit {
            rate: MAX_RATE,
            burst: MAX_BURST
        }
    );
}

// Paused clock: tokio's time jumps to the pacer's next deadline, so the
// timing is the bucket's arithmetic, not the machine's load.
#[tokio::test(start_paused = true)]
async fn the_request_that_wedged_the_daemon_is_clamped_and_bytes_flow() {
    // rate 0, burst 0: once a divide by zero in the pacer, and 1-byte
    // pieces that a bucket of depth 0 could never pay for.
    let throttle = Throttle::new(limit(8 << 20, 64 << 10));
    let flow = Flow::default();
    throttle.set_limit(limit(0, 0));
    assert_eq!(throttle.limit(), limit(1, 4096));
    // At 1 B/s a charge waits (and is cancelled): it must not panic.
    let waited =
        tokio::time::timeout(Duration::from_millis(50), throttle.acquire(&flow, 1 << 20)).await;
    assert!(waited.is_err(), "1 MiB passed at 1 B/s");
    // The pacer is alive: a usable limit serves at its rate.
    throttle.set_limit(limit(32 << 20, 64 << 10));
    let started = tokio::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), throttle.acquire(&flow, 4 << 20))
        .await
        .expect("bytes flow again");
    // 4 MiB at 32 MiB/s from an empty bucket (timer ticks are 1 ms).
    assert_near("seconds", started.elapsed().as_secs_f64(), 0.125, 0.05);
}

#[tokio::test(start_paused = true)]
async fn huge_limits_do_not_overflow_and_unlimited_frees_every_waiter() {
    let throttle = Throttle::new(limit(u64::MAX, u64::MAX));
    assert_eq!(throttle.limit(), limit(MAX_RATE, MAX_BURST));
    let flow = Arc::new(Flow::default());
    tokio::time::timeout(Duration::from_secs(1), throttle.acquire(&flow, 64 << 20))
        .await
        .expect("a 1 TiB bucket pays at once");
    // The slowest limit there is (the bucket keeps 4 KiB of its tokens),
    // with a waiter behind it...
    throttle.set_limit(limit(1, 0));
    let waiter = {
        let (throttle, flow) = (Arc::clone(&throttle), Arc::clone(&flow));
        tokio::spawn(async move { throttle.acquire(&flow, 1 << 20).await })
    };
    // An hour of (paused) time: 3600 bytes' worth.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert!(!waiter.is_finished(), "1 MiB passed at 1 B/s");
    // ...is freed at once by `rate off`.
    throttle.set_limit(None);
    tokio::time::timeout(Duration::from_secs(1), waiter)
        .await
        .expect("freed by rate off")
        .expect("no panic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_caps_out_of_range_are_clamped() {
    let throttle = Throttle::new(None);
    let flow = Flow::default();
    throttle.set_file_limit(Some(Limit { rate: 0, burst: 0 }));
    assert_eq!(throttle.file_limit(), limit(1, 4096));
    // The clamped depth, 4 KiB, is there at once; more waits at 1 B/s.
    tokio::time::timeout(Duration::from_millis(500), throttle.acquire(&flow, 4096))
        .await
        .expect("the first 4 KiB");
    let more = tokio::time::timeout(Duration::from_millis(50), throttle.acquire(&flow, 4096)).await;
    assert!(more.is_err());
    throttle.set_file_limit(Some(Limit {
        rate: u64::MAX,
        burst: u64::MAX,
    }));
    tokio::time::timeout(Duration::from_secs(1), throttle.acquire(&flow, 64 << 20))
        .await
        .expect("a 1 TiB/s cap");
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Edge values and then anything.
    fn value() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(4095),
            Just(4096),
            Just(MAX_RATE),
            Just(MAX_RATE + 1),
            Just(u64::MAX),
            0..(1u64 << 24),
            any::<u64>(),
        ]
    }

    fn any_limit() -> impl Strategy<Value = Limit> {
        (value(), value()).prop_map(|(rate, burst)| Limit { rate, burst })
    }

    fn charge() -> impl Strategy<Value = u64> {
        prop_oneof![
            Just(0u64),
            Just(1),
            Just(4096),
            Just(1 << 20),
            0..(64u64 << 20)
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn no_limit_value_panics_or_stops_the_throttle(
            first in any_limit(),
            second in any_limit(),
            cap in proptest::option::of(any_limit()),
            bytes in charge(),
        ) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .unwrap();
            runtime.block_on(async {
                let throttle = Throttle::new(Some(first));
                let flow = Flow::default();
                let short = Duration::from_millis(5);
                // Whatever the limit, a charge passes or waits; a panic
                // here fails the case.
                let _ = tokio::time::timeout(short, throttle.acquire(&flow, bytes)).await;
                throttle.set_limit(Some(second));
                throttle.set_file_limit(cap);
                let _ = tokio::time::timeout(short, throttle.acquire(&flow, bytes)).await;
                let in_force = throttle.limit().unwrap();
                prop_assert!(in_force.check().is_ok(), "{:?} in force", in_force);
                if second.check().is_ok() {
                    // A valid limit is put in force as it is.
                    prop_assert_eq!(in_force, second);
                }
                // A valid limit lets bytes through at its rate: 4 MiB at
                // 256 MiB/s needs the pacer, so it is still alive.
                throttle.set_file_limit(None);
                throttle.set_limit(Some(Limit { rate: 256 << 20, burst: 64 << 10 }));
                let passed = tokio::time::timeout(
                    Duration::from_secs(2),
                    throttle.acquire(&flow, 4 << 20),
                )
                .await;
                prop_assert!(passed.is_ok(), "4 MiB did not pass after {:?}, {:?}", first, second);
                Ok(())
            })?;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_demand_never_waits_behind_read_ahead_its_own_or_another_readers() {
    let rate = 1 << 20;
    let limit = Limit::auto(rate);
    let throttle = Throttle::new(Some(limit));
    let reader = Arc::new(Flow::default());
    throttle.acquire(&reader, limit.burst).await; // drain the bucket
    let ahead = {
        let (throttle, reader) = (Arc::clone(&throttle), Arc::clone(&reader));
        let never = AtomicBool::new(false);
        tokio::spawn(async move { throttle.acquire_ahead(&reader, 8 << 20, &never).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // One piece of the bucket (100 KiB at 1 MiB/s) plus its own 64 KiB at
    // most: not the 8 s of read-ahead queued before it.
    let most = Duration::from_millis(200);
    for demand in [&*reader, &Flow::default()] {
        let started = tokio::time::Instant::now();
        throttle.acquire(demand, 64 << 10).await;
        let waited = started.elapsed();
        assert!(
            waited <= most,
            "a demand waited {waited:?} behind read-ahead"
        );
    }
    assert!(!ahead.is_finished(), "the read-ahead cannot be done yet");
    let started = tokio::time::Instant::now();
    ahead.await.unwrap();
    // Every byte is still paid for: the read-ahead ends at the rate.
    let rest = started.elapsed().as_secs_f64();
    assert!(rest > 7.0 && rest < 8.5, "read-ahead took {rest:.2}s more");
}

#[tokio::test(start_paused = true)]
async fn read_ahead_runs_when_no_demand_waits() {
    let rate = 4 << 20;
    let throttle = Throttle::new(Some(Limit::auto(rate)));
    let flow = Flow::default();
    throttle.acquire(&flow, Limit::auto(rate).burst).await;
    let started = tokio::time::Instant::now();
    throttle
        .acquire_ahead(&flow, 4 << 20, &AtomicBool::new(false))
        .await;
    let took = started.elapsed().as_secs_f64();
    assert!(
        (took - 1.0).abs() < 0.05,
        "4 MiB at 4 MiB/s took {took:.3}s"
    );
}
