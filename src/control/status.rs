//! What `vmexportfs status` and `top` show, as sent over the control socket
//! (JSON), and how it reads on a terminal.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::size::HumanBytes;
use crate::throttle::fleet::FleetStatus;
use crate::throttle::Limit;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub source: String,
    pub mountpoint: String,
    /// The mount's process.
    pub pid: u32,
    pub uptime_seconds: f64,
    /// The mount limit in force; `None`: unlimited.
    pub limit: Option<Limit>,
    /// Where it comes from: `rate= option`, a timetable entry, `vmexportfs rate`.
    pub limit_origin: String,
    pub file_rate: Option<u64>,
    /// `PATTERN:WEIGHT,...`, empty without priorities.
    pub priority: String,
    pub schedule: Option<ScheduleStatus>,
    pub fleet: Option<FleetView>,
    pub totals: Totals,
    /// Provider-side work in progress (snapshots being taken).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub provider: Vec<String>,
    pub files: Vec<FileStatus>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ScheduleStatus {
    /// The entry in force, as written.
    pub active: String,
    pub active_rate: Option<u64>,
    /// Local time of the next change, `Mon 2026-11-30 09:00:00`.
    pub next_change: Option<String>,
    pub next_entry: Option<String>,
    pub next_rate: Option<u64>,
    pub seconds_to_next: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetView {
    #[serde(flatten)]
    pub status: FleetStatus,
    /// This mount's fetch rate over the last seconds / the fleet rate.
    pub share: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub bytes_fetched: u64,
    pub bytes_served: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Bytes per second fetched, over the last seconds.
    pub fetch_rate: f64,
    pub serve_rate: f64,
    pub throttle_wait_seconds: f64,
    pub open_files: u64,
    pub fetches_in_flight: u64,
    /// Memory reserved for fetched data now, of `cache=`.
    #[serde(default)]
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileStatus {
    /// Path inside the mount.
    pub path: String,
    /// The process that opened it, and its command name.
    pub pid: u32,
    pub command: String,
    pub bytes_read: u64,
    pub size: u64,
    /// Bytes per second read over the last seconds.
    pub rate: f64,
    pub eta_seconds: Option<f64>,
    pub weight: u32,
    /// The version the file is pinned to (an ETag, a generation, a
    /// snapshot, a file identity, a Last-Modified date or a size).
    #[serde(default)]
    pub pinned: String,
    /// The provider snapshot the file is read from (vSphere snapshot=on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Why the file's pinned version is weak; absent for a strong pin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weak_pin: Option<String>,
}

/// Samples of a growing byte count, a second apart, for a rate over the
/// last few seconds.
#[derive(Debug, Default)]
pub struct RateWindow {
    samples: VecDeque<(Instant, u64)>,
}

impl RateWindow {
    pub fn starting(at: Instant, count: u64) -> Self {
        let mut window = RateWindow::default();
        window.samples.push_back((at, count));
        window
    }

    pub fn push(&mut self, at: Instant, count: u64) {
        self.samples.push_back((at, count));
        while self.samples.len() > 8 {
            self.samples.pop_front();
        }
    }

    /// Bytes per second from the oldest sample within `span` of `now` to
    /// `count` now.
    pub fn rate(&self, now: Instant, count: u64, span: Duration) -> f64 {
        let oldest = self
            .samples
            .iter()
            .find(|(at, _)| now.duration_since(*at) <= span + Duration::from_millis(500))
            .or(self.samples.back());
        match oldest {
            Some(&(at, then)) => {
                let seconds = now.duration_since(at).as_secs_f64();
                if seconds < 0.2 {
                    0.0
                } else {
                    count.saturating_sub(then) as f64 / seconds
                }
            }
            None => 0.0,
        }
    }
}

fn rate_text(rate: Option<u64>) -> String {
    match rate {
        Some(rate) => format!("{}/s", HumanBytes(rate)),
        None => "unlimited".into(),
    }
}

/// `12s`, `3m05s`, `1h02m`.
pub fn eta_text(seconds: Option<f64>) -> String {
    let Some(seconds) = seconds.filter(|s| s.is_finite()) else {
        return "-".into();
    };
    let s = seconds.round() as u64;
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `500 MB / 1.0 GB • 49.8 MB/s • ETA: 10s` for one file.
pub fn progress_line(file: &FileStatus) -> String {
    format!(
        "{} / {} • {}/s • ETA: {}",
        HumanBytes(file.bytes_read),
        HumanBytes(file.size),
        HumanBytes(file.rate as u64),
        eta_text(file.eta_seconds)
    )
}

impl Status {
    /// The text `vmexportfs status` prints and `top` redraws.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{} on {} (pid {}, up {})",
            self.source,
            self.mountpoint,
            self.pid,
            eta_text(Some(self.uptime_seconds))
        );
        let limit = match self.limit {
            Some(limit) => format!(
                "{} ({} B/s, burst {} B)",
                rate_text(Some(limit.rate)),
                limit.rate,
                limit.burst
            ),
            None => "unlimited".into(),
        };
        let _ = writeln!(out, "limit:     {limit} — {}", self.limit_origin);
        if let Some(file_rate) = self.file_rate {
            let _ = writeln!(out, "per file:  {}", rate_text(Some(file_rate)));
        }
        if !self.priority.is_empty() {
            let _ = writeln!(out, "priority:  {}", self.priority);
        }
        if let Some(schedule) = &self.schedule {
            let _ = write!(out, "schedule:  now '{}'", schedule.active);
            match (&schedule.next_change, &schedule.next_entry) {
                (Some(at), Some(entry)) => {
                    let _ = writeln!(
                        out,
                        "; next {} at {at} (in {}) by '{entry}'",
                        rate_text(schedule.next_rate),
                        eta_text(schedule.seconds_to_next)
                    );
                }
                _ => {
                    let _ = writeln!(out, "; no change ahead");
                }
            }
        }
        if let Some(fleet) = &self.fleet {
            let s = &fleet.status;
            let _ = writeln!(
                out,
                "fleet:     {} key '{}' {} shared by {} mount(s); this mount {}/s = {:.1}% of it; {}{}",
                s.url,
                s.key,
                rate_text(Some(s.rate)),
                s.peers,
                HumanBytes(self.totals.fetch_rate as u64),
                fleet.share * 100.0,
                if s.mode == "fallback" {
                    format!("FALLBACK at {}", rate_text(Some(s.fallback_rate)))
                } else {
                    format!("shared (fallback would be {})", rate_text(Some(s.fallback_rate)))
                },
                match &s.last_error {
                    Some(err) if s.mode == "fallback" => format!(": {err}"),
                    _ => String::new(),
                }
            );
        }
        let t = &self.totals;
        let _ = writeln!(
            out,
            "totals:    fetched {} ({}/s now), served {}, cache hits {} misses {}, waited {:.1}s for tokens, {} open file(s)",
            HumanBytes(t.bytes_fetched),
            HumanBytes(t.fetch_rate as u64),
            HumanBytes(t.bytes_served),
            t.cache_hits,
            t.cache_misses,
            t.throttle_wait_seconds,
            t.open_files
        );
        for line in &self.provider {
            let _ = writeln!(out, "  {line}");
        }
        for file in &self.files {
            let _ = writeln!(
                out,
                "  {}  [pid {} {}{}]  {}",
                file.path,
                file.pid,
                if file.command.is_empty() {
                    "?"
                } else {
                    &file.command
                },
                if file.weight == 1 {
                    String::new()
                } else {
                    format!(", weight {}", file.weight)
                },
                progress_line(file)
            );
            if let Some(snapshot) = &file.snapshot {
                let _ = writeln!(out, "    read from snapshot {snapshot}");
            }
            if let Some(weakness) = &file.weak_pin {
                let _ = writeln!(out, "    weak pin: {weakness}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_over_the_last_seconds() {
        let start = Instant::now();
        let mut window = RateWindow::starting(start, 0);
        for i in 1..=10u64 {
            window.push(start + Duration::from_secs(i), i * 1000);
        }
        // Constant 1000 B/s, whatever the window.
        let now = start + Duration::from_secs(10);
        let rate = window.rate(now, 10_000, Duration::from_secs(5));
        assert!((rate - 1000.0).abs() < 1.0, "{rate}");
        // A stall shows within the window.
        let later = start + Duration::from_secs(15);
        assert!(window.rate(later, 10_000, Duration::from_secs(5)) < 1000.0);
    }

    #[test]
    fn provider_work_in_progress_shows_in_the_text_and_the_json() {
        let mut status: Status = serde_json::from_value(serde_json::json!({
            "source": "ebs://us-east-1", "mountpoint": "/mnt/ec2", "pid": 7,
            "uptime_seconds": 3.0, "limit": null, "limit_origin": "rate= option",
            "file_rate": null, "priority": "", "schedule": null, "fleet": null,
            "totals": {
                "bytes_fetched": 0, "bytes_served": 0, "cache_hits": 0, "cache_misses": 0,
                "fetch_rate": 0.0, "serve_rate": 0.0, "throttle_wait_seconds": 0.0,
                "open_files": 0, "fetches_in_flight": 0
            },
            "files": []
        }))
        .expect("a status without provider lines still reads");
        assert!(status.provider.is_empty());
        assert!(!serde_json::to_string(&status).unwrap().contains("provider"));
        status.provider = vec!["snapshot=on: web-i-0abc: waiting for snap-a 45%".into()];
        let text = status.render();
        assert!(
            text.contains("\n  snapshot=on: web-i-0abc: waiting for snap-a 45%\n"),
            "{text}"
        );
        let json: Status = serde_json::from_str(&serde_json::to_string(&status).unwrap()).unwrap();
        assert_eq!(json.provider, status.provider);
    }

    #[test]
    fn eta_reads_like_a_clock() {
        assert_eq!(eta_text(Some(9.6)), "10s");
        assert_eq!(eta_text(Some(185.0)), "3m05s");
        assert_eq!(eta_text(Some(3720.0)), "1h02m");
        assert_eq!(eta_text(None), "-");
    }
}
