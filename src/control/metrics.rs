//! `metrics=ADDR:PORT`: the mount's counters in Prometheus text format at
//! `GET /metrics`.
//!
//! A scrape is one small GET every few seconds, so a minimal HTTP/1.1
//! responder does (one request per connection, `Connection: close`); a
//! server framework would be most of the code it pulls in.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::Controller;
use crate::provider::ProviderError;
use crate::read::calls::{LATENCY_BUCKETS, OPERATIONS};

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics={addr}"))
}

pub async fn serve(listener: TcpListener, controller: Arc<Controller>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let controller = Arc::clone(&controller);
                tokio::spawn(async move {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), answer(stream, &controller))
                            .await;
                });
            }
            Err(err) => {
                tracing::warn!("metrics: accept: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, controller: &Controller) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 || head.len() > 16 << 10 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request_line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let mut parts = request_line.split(|&b| b == b' ');
    let (method, target) = (parts.next(), parts.next());
    let (status, content_type, body) = match (method, target) {
        (Some(b"GET"), Some(b"/metrics" | b"/")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(controller),
        ),
        (Some(b"GET"), _) => ("404 Not Found", "text/plain", "see /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

/// Writes `# HELP` and `# TYPE` once, then the samples.
struct Family<'a> {
    out: &'a mut String,
}

impl Family<'_> {
    fn head(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, value: f64) {
        let value = if value.is_infinite() {
            "+Inf".to_string()
        } else {
            format!("{value}")
        };
        if labels.is_empty() {
            let _ = writeln!(self.out, "{name} {value}");
        } else {
            let _ = writeln!(self.out, "{name}{{{labels}}} {value}");
        }
    }

    fn one(&mut self, name: &str, kind: &str, help: &str, value: f64) {
        self.head(name, kind, help);
        self.sample(name, "", value);
    }
}

/// The whole exposition.
pub fn render(controller: &Controller) -> String {
    let mut out = String::with_capacity(8 << 10);
    let mut m = Family { out: &mut out };
    let read_path = controller.core().read_path();
    let stats = &read_path.stats;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed) as f64;

    m.one(
        "vmexportfs_fetched_bytes_total",
        "counter",
        "Bytes fetched from the provider (each passed the throttle).",
        load(&stats.bytes_fetched),
    );
    m.one(
        "vmexportfs_served_bytes_total",
        "counter",
        "Bytes returned to readers.",
        load(&stats.bytes_served),
    );
    m.one(
        "vmexportfs_cache_hits_total",
        "counter",
        "Parts of reads found fetched or in flight.",
        load(&stats.cache_hits),
    );
    m.one(
        "vmexportfs_cache_misses_total",
        "counter",
        "Fetches started, for reads and ahead of them.",
        load(&stats.cache_misses),
    );
    m.one(
        "vmexportfs_cache_bytes",
        "gauge",
        "Memory reserved for fetched data (read, read ahead, or in flight), of cache=.",
        read_path.cache_bytes() as f64,
    );
    m.one(
        "vmexportfs_fetches_in_flight",
        "gauge",
        "Fetches under way (waiting for tokens or at the provider).",
        load(&stats.fetches_in_flight),
    );
    m.one(
        "vmexportfs_fetch_retries_total",
        "counter",
        "Provider requests retried after a transient fault.",
        load(&stats.retries),
    );
    m.one(
        "vmexportfs_open_files",
        "gauge",
        "Files open through the mount.",
        read_path.open_files() as f64,
    );
    let throttle = controller.throttle();
    m.one(
        "vmexportfs_throttle_wait_seconds_total",
        "counter",
        "Time fetches spent waiting for tokens, summed over fetches.",
        load(&throttle.stats().waited_nanos) / 1e9,
    );
    m.one(
        "vmexportfs_fetch_rate_bytes_per_second",
        "gauge",
        "Bytes per second fetched over the last five seconds.",
        controller.fetch_rate(),
    );
    let limit = throttle.limit();
    m.one(
        "vmexportfs_limit_bytes_per_second",
        "gauge",
        "The mount limit in force (+Inf: unlimited).",
        limit.map_or(f64::INFINITY, |l| l.rate as f64),
    );
    m.one(
        "vmexportfs_limit_burst_bytes",
        "gauge",
        "Depth of the mount's token bucket (0: unlimited).",
        limit.map_or(0.0, |l| l.burst as f64),
    );
    m.one(
        "vmexportfs_file_limit_bytes_per_second",
        "gauge",
        "The per-file cap in force (+Inf: none).",
        throttle
            .file_limit()
            .map_or(f64::INFINITY, |l| l.rate as f64),
    );

    m.head(
        "vmexportfs_provider_requests_total",
        "counter",
        "Provider requests by operation.",
    );
    for (op, calls) in OPERATIONS.iter().zip(&read_path.calls.operations) {
        m.sample(
            "vmexportfs_provider_requests_total",
            &format!("operation=\"{op}\""),
            load(&calls.requests),
        );
    }
    m.head(
        "vmexportfs_provider_errors_total",
        "counter",
        "Failed provider requests by operation and kind of failure.",
    );
    for (op, calls) in OPERATIONS.iter().zip(&read_path.calls.operations) {
        for (kind, count) in ProviderError::KINDS.iter().zip(&calls.errors) {
            m.sample(
                "vmexportfs_provider_errors_total",
                &format!("operation=\"{op}\",kind=\"{kind}\""),
                load(count),
            );
        }
    }
    let name = "vmexportfs_provider_request_duration_seconds";
    m.head(
        name,
        "histogram",
        "Latency of provider requests by operation.",
    );
    for (op, calls) in OPERATIONS.iter().zip(&read_path.calls.operations) {
        let mut cumulative = 0.0;
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&calls.latency) {
            cumulative += load(count);
            m.sample(
                &format!("{name}_bucket"),
                &format!("operation=\"{op}\",le=\"{bound}\""),
                cumulative,
            );
        }
        m.sample(
            &format!("{name}_bucket"),
            &format!("operation=\"{op}\",le=\"+Inf\""),
            load(&calls.requests),
        );
        m.sample(
            &format!("{name}_sum"),
            &format!("operation=\"{op}\""),
            load(&calls.latency_nanos) / 1e9,
        );
        m.sample(
            &format!("{name}_count"),
            &format!("operation=\"{op}\""),
            load(&calls.requests),
        );
    }

    if let Some(fleet) = controller.fleet() {
        let s = &fleet.stats;
        m.one(
            "vmexportfs_fleet_leases_total",
            "counter",
            "Leases taken from the fleet budget.",
            load(&s.leases),
        );
        m.one(
            "vmexportfs_fleet_leased_bytes_total",
            "counter",
            "Bytes leased from the fleet budget.",
            load(&s.leased_bytes),
        );
        m.one(
            "vmexportfs_fleet_lease_wait_seconds_total",
            "counter",
            "Time leases waited for their turn in the fleet budget.",
            load(&s.lease_wait_nanos) / 1e9,
        );
        m.one(
            "vmexportfs_fleet_redis_requests_total",
            "counter",
            "Calls of the fleet script in Redis.",
            load(&s.redis_calls),
        );
        m.one(
            "vmexportfs_fleet_redis_errors_total",
            "counter",
            "Fleet calls that failed or timed out.",
            load(&s.redis_errors),
        );
        m.one(
            "vmexportfs_fleet_fallbacks_total",
            "counter",
            "Times the mount fell back to its local rate.",
            load(&s.fallbacks),
        );
        m.one(
            "vmexportfs_fleet_fallback",
            "gauge",
            "1 while Redis is unreachable and the local fallback rate applies.",
            load(&s.in_fallback),
        );
        m.one(
            "vmexportfs_fleet_peers",
            "gauge",
            "Mounts sharing the fleet budget, this one included.",
            load(&s.peers),
        );
        m.one(
            "vmexportfs_fleet_rate_bytes_per_second",
            "gauge",
            "The fleet budget.",
            fleet.config().rate as f64,
        );
    }
    out
}
