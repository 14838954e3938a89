//! The fleet budget: mounts in separate processes sharing one rate through
//! a real Redis, and what they do when Redis goes away and comes back.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::progress::{assert_near, Progress};
use common::redis::Redis;
use common::*;

const M: f64 = MIB as f64;

fn status_json(mount: &Mount) -> serde_json::Value {
    let output = Command::new(bin())
        .args(["status", mount.path.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// Rates of two readers over the same `seconds`, from now.
fn measure_both(a: &Progress, b: &Progress, seconds: f64) -> (f64, f64) {
    let from = Instant::now();
    let to = from + Duration::from_secs_f64(seconds);
    Progress::wait_until(to);
    (a.rate(from, to), b.rate(from, to))
}

#[test]
fn two_mounts_share_one_budget_and_fall_back_when_redis_goes() {
    let mut redis = Redis::start();
    let src_a = tempfile::tempdir().unwrap();
    let src_b = tempfile::tempdir().unwrap();
    write_random_file(&src_a.path().join("disk.raw"), 320 * MIB, 1);
    write_random_file(&src_b.path().join("disk.raw"), 320 * MIB, 2);
    let fleet = format!("fleet={},fleet_key=site-a,fleet_rate=20M", redis.url());
    let a = Mount::new(&format!("dir://{}", src_a.path().display()), &fleet);
    // b has a fallback of its own; a falls back to the fleet rate / peers.
    let b = Mount::new(
        &format!("dir://{}", src_b.path().display()),
        &format!("{fleet},fleet_fallback=4M"),
    );
    assert_ne!(a.pid, b.pid, "two processes");

    let ra = Progress::start(a.file("disk.raw"));
    let rb = Progress::start(b.file("disk.raw"));
    std::thread::sleep(Duration::from_secs(2));
    let (rate_a, rate_b) = measure_both(&ra, &rb, 5.0);
    assert_near(
        "fleet 20M: both mounts together",
        rate_a + rate_b,
        20.0 * M,
        0.05,
    );
    assert_near("fleet 20M: mount a's half", rate_a, 10.0 * M, 0.10);
    assert_near("fleet 20M: mount b's half", rate_b, 10.0 * M, 0.10);
    let status = status_json(&a);
    assert_eq!(status["fleet"]["mode"], "shared", "{status}");
    assert_eq!(status["fleet"]["peers"], 2, "{status}");
    assert_eq!(status["fleet"]["key"], "site-a");
    let share = status["fleet"]["share"].as_f64().unwrap();
    assert!((0.4..0.6).contains(&share), "share {share}");

    // Redis dies mid-copy: reads go on, each mount at its fallback.
    redis.kill();
    std::thread::sleep(Duration::from_millis(1500));
    let (rate_a, rate_b) = measure_both(&ra, &rb, 4.0);
    eprintln!("measured: fallback: a {rate_a:.0} B/s, b {rate_b:.0} B/s");
    assert!(
        rate_a <= 10.0 * M * 1.05,
        "a exceeds its fallback of 20M/2 peers: {rate_a:.0}"
    );
    assert!(
        rate_b <= 4.0 * M * 1.05,
        "b exceeds fleet_fallback=4M: {rate_b:.0}"
    );
    assert_near("fallback: mount a at 20M / 2 peers", rate_a, 10.0 * M, 0.10);
    assert_near(
        "fallback: mount b at fleet_fallback=4M",
        rate_b,
        4.0 * M,
        0.10,
    );
    let status = status_json(&b);
    assert_eq!(status["fleet"]["mode"], "fallback", "{status}");
    assert!(a
        .log_text()
        .contains("falling back to the local rate 10485760 B/s"));
    assert!(b
        .log_text()
        .contains("falling back to the local rate 4194304 B/s"));

    // Redis is back: the shared budget again.
    redis.restart();
    std::thread::sleep(Duration::from_millis(2500));
    let (rate_a, rate_b) = measure_both(&ra, &rb, 4.0);
    assert_near("restored: both together", rate_a + rate_b, 20.0 * M, 0.05);
    assert!(a.log_text().contains("back on the shared budget"));
    assert_eq!(status_json(&b)["fleet"]["mode"], "shared");

    // Not a single read failed throughout.
    let read_a = ra.finish();
    let read_b = rb.finish();
    eprintln!("read {read_a} and {read_b} bytes");
    assert!(!a.log_text().contains("read failed"));
}

#[test]
fn a_lone_mount_gets_the_whole_budget_and_the_lower_limit_wins() {
    let redis = Redis::start();
    let src = tempfile::tempdir().unwrap();
    write_random_file(&src.path().join("disk.raw"), 200 * MIB, 3);
    let port = free_port();
    let mount = Mount::new(
        &format!("dir://{}", src.path().display()),
        &format!(
            "fleet={},fleet_rate=16M,metrics=127.0.0.1:{port}",
            redis.url()
        ),
    );
    let copy = Progress::start(mount.file("disk.raw"));
    std::thread::sleep(Duration::from_secs(1));
    assert_near("lone mount, fleet 16M", copy.measure(3.0), 16.0 * M, 0.05);
    // A local limit below the fleet's share wins.
    let output = Command::new(bin())
        .args(["rate", mount.path.to_str().unwrap(), "6M"])
        .output()
        .unwrap();
    assert!(output.status.success());
    std::thread::sleep(Duration::from_secs(1));
    // Bytes arrive a read-ahead piece (~1.5 MiB at 6M) at a time: over 3 s
    // one piece more or less is ±8%, over 6 s ±4%.
    assert_near("local 6M under fleet 16M", copy.measure(6.0), 6.0 * M, 0.05);
    copy.finish();
    let metrics = sh(&format!("curl -sf http://127.0.0.1:{port}/metrics"));
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(name).filter(|r| r.starts_with(' ')))
            .unwrap_or_else(|| panic!("no {name}"))
            .trim()
            .parse()
            .unwrap()
    };
    let leases = value("vmexportfs_fleet_leases_total");
    let leased = value("vmexportfs_fleet_leased_bytes_total");
    let fetched = value("vmexportfs_fetched_bytes_total");
    eprintln!("measured: {leases} leases, {leased} bytes leased, {fetched} fetched");
    // Every fetched byte was leased (at most two leases ahead).
    assert!(leased >= fetched && leased <= fetched + 3.0 * 1677721.0);
    // Few requests per second: a lease is a tenth of a second of budget.
    let seconds = 11.0;
    assert!(leases / seconds <= 12.0, "{leases} leases in ~{seconds}s");
    assert_eq!(value("vmexportfs_fleet_peers"), 1.0);
    assert_eq!(value("vmexportfs_fleet_fallback"), 0.0);
}

#[test]
fn an_unreachable_redis_fails_the_mount_unless_a_fallback_is_set() {
    let port = free_port();
    let url = format!("redis://127.0.0.1:{port}/0");
    assert_mount_fails(
        "demo://",
        &format!("fleet={url},fleet_rate=10M"),
        &[],
        "set fleet_fallback=",
    );
    assert_mount_fails(
        "demo://",
        "fleet=redis://:secret@127.0.0.1:1/0,fleet_rate=10M",
        &[],
        "VMEXPORTFS_REDIS_PASSWORD",
    );
    assert_mount_fails("demo://", "fleet=http://x/,fleet_rate=1M", &[], "redis://");
    let mount = Mount::new(
        "demo://",
        &format!("fleet={url},fleet_rate=10M,fleet_fallback=2M"),
    );
    assert_eq!(status_json(&mount)["fleet"]["mode"], "fallback");
    assert!(mount
        .log_text()
        .contains("starting on the local fallback rate 2097152 B/s"));
    // Redis comes up later: the mount joins the budget.
    let mut redis = Redis::not_started(port);
    redis.restart();
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(status_json(&mount)["fleet"]["mode"], "shared");
}
