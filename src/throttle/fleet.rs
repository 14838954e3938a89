//! The fleet budget: one rate shared by every mount, on any host, that
//! names the same `fleet_key` on the same Redis.
//!
//! The budget is a GCRA kept in Redis by one Lua script, so that checking
//! and advancing it is atomic. Its state is the theoretical arrival time
//! (TAT) of the next byte, on Redis's own clock (hosts' clocks never
//! matter). A mount asks for a lease of bytes; the script books the lease
//! at `max(TAT, now)`, moves TAT on by `lease / rate`, and answers how long
//! the mount must wait before spending it. Every mount keeps at most one
//! booking outstanding, so busy mounts' bookings alternate and the budget
//! splits evenly between them; an idle mount books nothing.
//!
//! A lease is a tenth of a second of the whole budget: small enough that
//! no mount runs ahead of the others by more than that, large enough that
//! Redis sees at most ten requests a second from a mount. Leased bytes open
//! the throttle's fleet gate ([`super::Throttle::credit_fleet`]); the
//! mount's own limit still applies, and the lower one wins.
//!
//! The script also keeps the set of mounts seen in the last few seconds (a
//! heartbeat every two seconds keeps idle ones in it). When Redis cannot be
//! reached, the mount falls back to a local rate: `fleet_fallback=`, or by
//! default the fleet rate divided by the number of peers last seen. It logs
//! the change, keeps serving at no more than that rate, tries Redis again
//! every second, and goes back to the shared budget when it answers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{Limit, Throttle, MAX_RATE};

/// Books a lease (or, with a lease of 0, only says the mount is alive).
/// KEYS: the TAT, the peer set. ARGV: rate (bytes/s), lease (bytes), this
/// mount's id, how long a peer counts after it was last seen (µs).
/// Returns the wait before the lease may be spent (µs) and the peer count.
const RESERVE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local rate = tonumber(ARGV[1])
local lease = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
redis.call('ZADD', KEYS[2], now, ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[2], math.floor(ttl / 1000) + 1000)
local peers = redis.call('ZCARD', KEYS[2])
if lease <= 0 or rate <= 0 then
  return {0, peers}
end
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then
  tat = now
end
local next_tat = tat + lease * 1000000 / rate
redis.call('SET', KEYS[1], string.format('%.0f', next_tat), 'PX', math.floor((next_tat - now) / 1000) + 60000)
return {math.floor(tat - now), peers}
"#;

/// How often an idle mount tells Redis it is there.
const HEARTBEAT: Duration = Duration::from_secs(2);
/// A mount not heard from for this long no longer counts as a peer.
const PEER_EXPIRY: Duration = Duration::from_secs(6);
/// A Redis call that takes longer than this counts as Redis unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
/// In fallback, Redis is tried again this often.
const RETRY: Duration = Duration::from_secs(1);
/// The environment variable a Redis password comes from (never the URL:
/// options show in `ps`).
pub const PASSWORD_ENV: &str = "VMEXPORTFS_REDIS_PASSWORD";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// `redis://host:port/db`, without a password.
    pub url: String,
    pub key: String,
    pub rate: u64,
    /// Local rate while Redis is unreachable; default rate / peers.
    pub fallback: Option<u64>,
}

impl FleetConfig {
    /// A tenth of a second of the budget, between 64 KiB and 16 MiB.
    pub fn lease(&self) -> u64 {
        (self.rate / 10).clamp(64 << 10, 16 << 20)
    }

    /// Whether the rates can be enforced: each from 1 B/s to
    /// [`super::MAX_RATE`], the same range as a mount limit.
    pub fn check(&self) -> Result<(), String> {
        let named = [
            ("fleet_rate", Some(self.rate)),
            ("fleet_fallback", self.fallback),
        ];
        for (name, rate) in named {
            if let Some(rate) = rate {
                let burst = crate::options::MIN_BURST;
                Limit { rate, burst }
                    .check()
                    .map_err(|err| format!("{name}: {err}"))?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("fleet={url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("fleet={url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("{0}")]
    BadRate(String),
}

/// What status shows of the fleet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FleetStatus {
    pub url: String,
    pub key: String,
    pub rate: u64,
    /// `shared` or `fallback`.
    pub mode: String,
    /// Mounts seen on this key in the last few seconds, this one included.
    pub peers: u64,
    /// The local rate in fallback (what it would be, in shared mode).
    pub fallback_rate: u64,
    pub leases: u64,
    pub leased_bytes: u64,
    pub last_error: Option<String>,
}

/// Counters of the fleet, for metrics.
#[derive(Debug, Default)]
pub struct FleetStats {
    pub leases: AtomicU64,
    pub leased_bytes: AtomicU64,
    /// Time leases waited for their turn in the budget.
    pub lease_wait_nanos: AtomicU64,
    pub redis_calls: AtomicU64,
    pub redis_errors: AtomicU64,
    pub fallbacks: AtomicU64,
    pub peers: AtomicU64,
    /// 1 while in fallback.
    pub in_fallback: AtomicU64,
}

pub struct Fleet {
    config: Mutex<FleetConfig>,
    client: redis::Client,
    script: redis::Script,
    member: String,
    last_error: Mutex<Option<String>>,
    pub stats: FleetStats,
}

impl Fleet {
    /// Connects to Redis and joins the budget. Redis unreachable at mount
    /// time is an error, unless `fleet_fallback=` says what to do then.
    pub async fn start(
        config: FleetConfig,
        throttle: &Arc<Throttle>,
    ) -> Result<Arc<Fleet>, FleetError> {
        config.check().map_err(FleetError::BadRate)?;
        let client = open_client(&config.url)?;
        let member = format!(
            "{}/{}/{}",
            hostname(),
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let fleet = Arc::new(Fleet {
            client,
            script: redis::Script::new(RESERVE),
            member,
            last_error: Mutex::new(None),
            stats: FleetStats::default(),
            config: Mutex::new(config.clone()),
        });
        let mut connection = None;
        let first = fleet.call(&mut connection, 0).await;
        let in_fallback = match first {
            Ok(_) => false,
            Err(reason) if config.fallback.is_some() => {
                tracing::warn!(
                    "fleet: Redis at {} unreachable ({reason}); starting on the local fallback rate {} B/s",
                    config.url,
                    fleet.fallback_rate()
                );
                fleet.enter_fallback(&reason);
                true
            }
            Err(reason) => {
                return Err(FleetError::Unreachable {
                    url: config.url,
                    reason: format!(
                        "{reason} (set fleet_fallback=RATE to mount anyway at a local rate)"
                    ),
                })
            }
        };
        throttle.attach_fleet(config.lease(), fleet.planning_share());
        let task = FleetTask {
            fleet: Arc::clone(&fleet),
            throttle: Arc::downgrade(throttle),
            connection,
            in_fallback,
        };
        tokio::spawn(task.run());
        Ok(fleet)
    }

    pub fn config(&self) -> FleetConfig {
        self.config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// New rate or fallback (SIGHUP); the URL and key stay. Callers check
    /// them first ([`FleetConfig::check`]); out of range they are clamped,
    /// so that no value can stall or break the lease arithmetic.
    pub fn set_rates(&self, rate: u64, fallback: Option<u64>) {
        let mut config = self
            .config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        config.rate = rate.clamp(1, MAX_RATE);
        config.fallback = fallback.map(|rate| rate.clamp(1, MAX_RATE));
    }

    /// The local rate while Redis is unreachable.
    pub fn fallback_rate(&self) -> u64 {
        let config = self.config();
        config.fallback.unwrap_or_else(|| {
            let peers = self.stats.peers.load(Ordering::Relaxed).max(1);
            (config.rate / peers).max(1)
        })
    }

    pub fn in_fallback(&self) -> bool {
        self.stats.in_fallback.load(Ordering::Relaxed) == 1
    }

    /// This mount's expected share, for planning read-ahead.
    fn planning_share(&self) -> u64 {
        let peers = self.stats.peers.load(Ordering::Relaxed).max(1);
        if self.in_fallback() {
            self.fallback_rate()
        } else {
            (self.config().rate / peers).max(1)
        }
    }

    pub fn status(&self) -> FleetStatus {
        let config = self.config();
        FleetStatus {
            mode: if self.in_fallback() {
                "fallback"
            } else {
                "shared"
            }
            .into(),
            peers: self.stats.peers.load(Ordering::Relaxed),
            fallback_rate: self.fallback_rate(),
            leases: self.stats.leases.load(Ordering::Relaxed),
            leased_bytes: self.stats.leased_bytes.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
            url: config.url,
            key: config.key,
            rate: config.rate,
        }
    }

    fn enter_fallback(&self, reason: &str) {
        self.stats.in_fallback.store(1, Ordering::Relaxed);
        self.stats.fallbacks.fetch_add(1, Ordering::Relaxed);
        *self
            .last_error
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(reason.to_string());
    }

    /// One run of the script: (wait before spending, peers).
    async fn call(
        &self,
        connection: &mut Option<redis::aio::MultiplexedConnection>,
        lease: u64,
    ) -> Result<(Duration, u64), String> {
        self.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
        let result = tokio::time::timeout(CALL_TIMEOUT, self.try_call(connection, lease)).await;
        let result = match result {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err(format!("no answer within {CALL_TIMEOUT:?}")),
        };
        if result.is_err() {
            self.stats.redis_errors.fetch_add(1, Ordering::Relaxed);
            // A broken connection is not reused.
            *connection = None;
        }
        result
    }

    async fn try_call(
        &self,
        connection: &mut Option<redis::aio::MultiplexedConnection>,
        lease: u64,
    ) -> redis::RedisResult<(Duration, u64)> {
        if connection.is_none() {
            *connection = Some(self.client.get_multiplexed_async_connection().await?);
        }
        let Some(connection) = connection.as_mut() else {
            unreachable!("just connected");
        };
        let config = self.config();
        let key = &config.key;
        let (wait_us, peers): (i64, u64) = self
            .script
            .key(format!("vmexportfs:fleet:{{{key}}}:tat"))
            .key(format!("vmexportfs:fleet:{{{key}}}:peers"))
            .arg(config.rate)
            .arg(lease)
            .arg(&self.member)
            .arg(PEER_EXPIRY.as_micros() as u64)
            .invoke_async(connection)
            .await?;
        Ok((Duration::from_micros(wait_us.max(0) as u64), peers))
    }
}

struct FleetTask {
    fleet: Arc<Fleet>,
    throttle: std::sync::Weak<Throttle>,
    connection: Option<redis::aio::MultiplexedConnection>,
    in_fallback: bool,
}

impl FleetTask {
    /// Leases bytes when the mount needs them, heartbeats when it does not;
    /// ends with the mount.
    async fn run(mut self) {
        let mut next_local_credit = Instant::now();
        let mut last_try = Instant::now();
        loop {
            let Some(throttle) = self.throttle.upgrade() else {
                return;
            };
            let wanted = tokio::select! {
                _ = throttle.fleet_wanted() => true,
                _ = tokio::time::sleep(HEARTBEAT) => false,
            };
            let lease = if wanted && throttle.fleet_low() {
                self.fleet.config().lease()
            } else {
                0
            };
            if self.in_fallback && last_try.elapsed() < RETRY {
                if lease > 0 {
                    self.credit_locally(&throttle, &mut next_local_credit).await;
                }
                continue;
            }
            last_try = Instant::now();
            match self.fleet.call(&mut self.connection, lease).await {
                Ok((wait, peers)) => {
                    self.fleet.stats.peers.store(peers, Ordering::Relaxed);
                    if self.in_fallback {
                        self.in_fallback = false;
                        self.fleet.stats.in_fallback.store(0, Ordering::Relaxed);
                        tracing::info!(
                            "fleet: Redis answers again; back on the shared budget ({} peers)",
                            peers
                        );
                    }
                    throttle.set_fleet_share(self.fleet.planning_share());
                    if lease > 0 {
                        let stats = &self.fleet.stats;
                        stats.leases.fetch_add(1, Ordering::Relaxed);
                        stats.leased_bytes.fetch_add(lease, Ordering::Relaxed);
                        stats
                            .lease_wait_nanos
                            .fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
                        drop(throttle);
                        tokio::time::sleep(wait).await;
                        let Some(throttle) = self.throttle.upgrade() else {
                            return;
                        };
                        throttle.credit_fleet(lease);
                    }
                }
                Err(reason) => {
                    if !self.in_fallback {
                        self.in_fallback = true;
                        self.fleet.enter_fallback(&reason);
                        tracing::warn!(
                            "fleet: Redis at {} unreachable ({reason}); falling back to the local rate {} B/s until it answers",
                            self.fleet.config().url,
                            self.fleet.fallback_rate()
                        );
                        throttle.set_fleet_share(self.fleet.planning_share());
                        next_local_credit = Instant::now();
                    }
                    if lease > 0 {
                        self.credit_locally(&throttle, &mut next_local_credit).await;
                    }
                }
            }
        }
    }

    /// In fallback, leases come from the local clock at the fallback rate:
    /// one lease per lease-length of time, never ahead of it. A lease is a
    /// tenth of a second at that rate (at most the shared lease), so a low
    /// fallback rate is not served in coarse steps: 2 MiB leases at a 4M
    /// fallback came every half second, and 4 s windows saw as little as 82%.
    async fn credit_locally(&self, throttle: &Throttle, next: &mut Instant) {
        let rate = self.fleet.fallback_rate().max(1);
        let lease = (rate / 10).clamp(64 << 10, self.fleet.config().lease().max(64 << 10));
        *next = (*next).max(Instant::now());
        tokio::time::sleep_until(*next).await;
        // At least 64 KiB / 1 TiB/s and at most 16 MiB / 1 B/s: finite.
        let step = Duration::try_from_secs_f64(lease as f64 / rate as f64)
            .unwrap_or(Duration::from_secs(86_400));
        *next += step;
        throttle.credit_fleet(lease);
    }
}

fn open_client(url: &str) -> Result<redis::Client, FleetError> {
    let bad = |reason: String| FleetError::BadUrl {
        url: url.to_string(),
        reason,
    };
    let mut parsed = url::Url::parse(url).map_err(|err| bad(err.to_string()))?;
    if parsed.scheme() != "redis" {
        return Err(bad("expected redis://host[:port][/db]".into()));
    }
    if parsed.password().is_some() {
        return Err(bad(format!(
            "a password in the URL would show in ps; put it in ${PASSWORD_ENV}"
        )));
    }
    if let Ok(password) = std::env::var(PASSWORD_ENV) {
        parsed
            .set_password(Some(&password))
            .map_err(|()| bad("cannot carry a password".into()))?;
    }
    redis::Client::open(parsed.as_str()).map_err(|err| bad(err.to_string()))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}
