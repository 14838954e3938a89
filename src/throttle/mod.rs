//! The mount's bandwidth control: one token bucket, a weighted fair queue in
//! front of it, per-file caps, and an optional fleet budget behind it.
//!
//! Every byte fetched from the provider is charged here before it is asked
//! for. A charge is taken in pieces of at most [`MAX_PIECE`] bytes (and at
//! most half the bucket depth), so that large fetches interleave with small
//! ones. Half, not all: a piece as deep as the bucket waits for it to fill
//! to the brim, and whatever the pacer's wake-up is late (a timer tick, a
//! busy worker) overflows it; measured at burst=1M, 48M: 1-2 ms lost per
//! piece, 5% of the rate.
//!
//! - **The bucket** is hand-written rather than governor's: its rate and
//!   depth change while copies run (`vmexportfs rate`, timetables, SIGHUP).
//!   On a change the tokens already in the bucket are kept, up to the new
//!   depth: a lower rate brings no burst, a higher one loses nothing.
//! - **The queue** is self-clocked fair queueing. Each reader charges
//!   through its own [`Flow`], which lets one of its pieces of each kind
//!   at a time into the queue; a piece's tag is where the flow's previous
//!   tag (or the queue's virtual time, if later) plus its bytes divided by
//!   the flow's weight, and the smallest tag goes first. Under contention
//!   readers get shares in proportion to their weights, whatever their
//!   read-ahead depth; a lone reader gets the whole rate.
//! - **Demand before speculation.** A charge is a demand (a read a process
//!   waits for, [`Throttle::acquire`]) or read-ahead
//!   ([`Throttle::acquire_ahead`]). A demand never
//!   waits behind its own reader's read-ahead: it takes the place of the
//!   flow's queued read-ahead piece, which moves to the demand's place.
//!   Both kinds advance the same tag, so the fair share stays per reader.
//! - **Per-file caps** (`file_rate=`) are a governor limiter per flow: a
//!   fixed quota that one waiter uses at a time is exactly what it does
//!   well. A piece passes its flow's cap before it joins the queue.
//! - **The fleet gate**: with `fleet=`, a piece also needs bytes leased
//!   from the shared budget ([`fleet`]); the lower of the two limits wins.
//!
//! A pacer task hands out pieces when the bucket can pay for them. A charge
//! that finds the queue empty and the tokens there passes without it; with
//! nothing limiting the mount, a charge is two atomic loads.

pub mod fleet;
pub mod priority;
pub mod schedule;

use std::collections::BTreeMap;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

/// Largest piece a charge is taken in: small enough that a 16 MiB fetch
/// does not hold the queue while others wait, large enough that the pacer
/// hands out few pieces per second even at gigabytes per second.
pub const MAX_PIECE: u64 = 1 << 20;
/// Smallest automatic bucket depth: small enough to keep the rate smooth,
/// large enough that one wait covers a useful fetch.
pub const MIN_AUTO_BURST: u64 = 64 << 10;
/// Fixed-point scale of fair-queue tags (bytes × scale / weight).
const TAG_SCALE: u64 = 64;
/// Weights run from 1 to this.
pub const MAX_WEIGHT: u32 = 1000;
/// The highest rate a limit may name, 1 TiB/s: above any link, so a
/// larger number is a mistake (or meant `off`), and far below where the
/// bucket's floating-point arithmetic loses bytes.
pub const MAX_RATE: u64 = 1 << 40;
/// The deepest bucket a limit may name, 1 TiB.
pub const MAX_BURST: u64 = 1 << 40;

/// A rate in bytes per second and the depth of its bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limit {
    pub rate: u64,
    pub burst: u64,
}

impl Limit {
    /// `rate` with the automatic depth, max(rate/10, 64K).
    pub fn auto(rate: u64) -> Limit {
        Limit {
            rate: rate.max(1),
            burst: (rate / 10).max(MIN_AUTO_BURST),
        }
    }

    /// Whether the throttle can enforce this limit as it is: a rate from
    /// 1 B/s to [`MAX_RATE`], a depth from [`crate::options::MIN_BURST`] to
    /// [`MAX_BURST`]. Every limit from outside is checked with this where
    /// it comes in, so that a bad one is refused and changes nothing.
    pub fn check(&self) -> Result<(), LimitError> {
        let min_burst = crate::options::MIN_BURST;
        if self.rate == 0 {
            return Err(LimitError::ZeroRate);
        }
        if self.rate > MAX_RATE {
            return Err(LimitError::RateTooHigh(self.rate));
        }
        if self.burst < min_burst {
            return Err(LimitError::BurstTooSmall(self.burst));
        }
        if self.burst > MAX_BURST {
            return Err(LimitError::BurstTooLarge(self.burst));
        }
        Ok(())
    }

    /// The nearest limit that passes [`Limit::check`]: the throttle's own
    /// guard, so that no value can make its arithmetic divide by zero,
    /// overflow or spin on empty pieces.
    pub fn clamped(self) -> Limit {
        Limit {
            rate: self.rate.clamp(1, MAX_RATE),
            burst: self.burst.clamp(crate::options::MIN_BURST, MAX_BURST),
        }
    }
}

/// Why a limit was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    #[error("rate 0 B/s would stop every read: give a rate above 0, or off (null) for no limit")]
    ZeroRate,
    #[error("rate {0} B/s is above the maximum {max} B/s (1 TiB/s); use off (null) for no limit", max = MAX_RATE)]
    RateTooHigh(u64),
    #[error("burst {0} B is below the minimum {min} B (4 KiB)", min = crate::options::MIN_BURST)]
    BurstTooSmall(u64),
    #[error("burst {0} B is above the maximum {max} B (1 TiB)", max = MAX_BURST)]
    BurstTooLarge(u64),
}

/// What a piece is for: a read a process waits for, or read-ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Urgency {
    Demand,
    Ahead,
}

/// One reader's place in the throttle: its weight, its fair-queue tag and
/// its cap. At most one of its pieces of each urgency waits in the queue at
/// a time.
pub struct Flow {
    demand_turn: tokio::sync::Mutex<()>,
    ahead_turn: tokio::sync::Mutex<()>,
    cap: Mutex<Option<Arc<FileCap>>>,
    /// The queue key of this flow's read-ahead piece, while it waits
    /// (touched under the queue's lock only).
    queued_ahead: Mutex<Option<(u64, u64)>>,
    weight: AtomicU32,
    /// Tag of this flow's last piece (written under the queue's lock).
    finish: AtomicU64,
}

impl Flow {
    pub fn new(weight: u32) -> Self {
        Flow {
            demand_turn: tokio::sync::Mutex::new(()),
            ahead_turn: tokio::sync::Mutex::new(()),
            cap: Mutex::new(None),
            queued_ahead: Mutex::new(None),
            weight: AtomicU32::new(weight.clamp(1, MAX_WEIGHT)),
            finish: AtomicU64::new(0),
        }
    }

    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    pub fn set_weight(&self, weight: u32) {
        self.weight
            .store(weight.clamp(1, MAX_WEIGHT), Ordering::Relaxed);
    }
}

impl Default for Flow {
    fn default() -> Self {
        Self::new(1)
    }
}

/// A per-file cap: governor with 1 KiB cells (1-byte cells run measurably
/// fast from nanosecond rounding); sub-cell remainders carry over, so
/// every byte is paid for exactly once.
struct FileCap {
    limiter: DefaultDirectRateLimiter,
    burst_cells: u32,
    carry: Mutex<u64>,
    generation: u64,
}

const CELL: u64 = 1024;

impl FileCap {
    fn new(limit: Limit, generation: u64) -> Self {
        let limit = limit.clamped();
        let burst_cells = (limit.burst / CELL).clamp(1, u64::from(u32::MAX)) as u32;
        let period_nanos = ((CELL as u128 * 1_000_000_000) / limit.rate.max(1) as u128).max(1);
        let period = Duration::from_nanos(period_nanos.min(u64::MAX as u128) as u64);
        let quota = Quota::with_period(period)
            .expect("period is at least one nanosecond")
            .allow_burst(NonZeroU32::new(burst_cells).expect("clamped to at least 1"));
        FileCap {
            limiter: RateLimiter::direct(quota),
            burst_cells,
            carry: Mutex::new(0),
            generation,
        }
    }

    fn depth(&self) -> u64 {
        u64::from(self.burst_cells) * CELL
    }

    async fn acquire(&self, bytes: u64) {
        let mut cells = {
            let mut carry = self
                .carry
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let owed = *carry + bytes;
            *carry = owed % CELL;
            owed / CELL
        };
        while cells > 0 {
            let now = cells.min(u64::from(self.burst_cells));
            if let Some(n) = NonZeroU32::new(now as u32) {
                // `now` is at most the burst, so this cannot fail; if it
                // ever did, the cells would go uncharged rather than panic.
                let _ = self.limiter.until_n_ready(n).await;
            }
            cells -= now;
        }
    }
}

/// Counters of the throttle, for status and metrics.
#[derive(Debug, Default)]
pub struct ThrottleStats {
    /// Time charges spent waiting, summed over charges.
    pub waited_nanos: AtomicU64,
    /// Bytes that went through a limit (mount, fleet or file cap).
    pub limited_bytes: AtomicU64,
}

struct Waiter {
    bytes: u64,
    grant: oneshot::Sender<()>,
}

/// The shared-budget side of the bucket: bytes leased and not yet spent.
struct FleetGate {
    level: f64,
    lease: u64,
    /// The share of the fleet budget this mount can expect.
    rate: u64,
}

struct State {
    limit: Option<Limit>,
    /// Bytes that may be fetched now; below zero after a piece larger than
    /// the bucket (a depth lowered under a waiting piece).
    level: f64,
    refilled: Instant,
    /// Virtual time of the fair queue: the tag of the last piece let through.
    vtime: u64,
    queue: BTreeMap<(u64, u64), Waiter>,
    arrivals: u64,
    fleet: Option<FleetGate>,
}

impl State {
    fn refill(&mut self, now: Instant) {
        if let Some(limit) = self.limit {
            let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
            self.level = (self.level + elapsed * limit.rate as f64).min(limit.burst as f64);
        }
        self.refilled = now;
    }

    /// What stops `bytes` from passing now: the bucket (with the time it
    /// will have refilled enough), the fleet budget, or nothing.
    fn blocker(&self, bytes: u64, now: Instant) -> Option<Blocked> {
        if let Some(limit) = self.limit {
            let need = bytes.min(limit.burst) as f64;
            if self.level < need {
                // The limit is clamped (rate ≥ 1), so `secs` is finite and
                // positive; a far-off instant still must not panic.
                let secs = (need - self.level) / limit.rate.max(1) as f64;
                let wait = Duration::try_from_secs_f64(secs).unwrap_or(FAR_FUTURE);
                let at = now.checked_add(wait).unwrap_or(now + FAR_FUTURE);
                return Some(Blocked::Until(at));
            }
        }
        if let Some(fleet) = &self.fleet {
            // Pieces are at most half a lease, so a piece is only ever
            // blocked while the gate is low: when the fleet task leases.
            if fleet.level < bytes as f64 {
                return Some(Blocked::Fleet);
            }
        }
        None
    }

    /// Pays for `bytes`; true when the fleet gate runs low.
    fn spend(&mut self, bytes: u64) -> bool {
        if self.limit.is_some() {
            self.level -= bytes as f64;
        }
        match &mut self.fleet {
            Some(fleet) => {
                fleet.level -= bytes as f64;
                fleet.level < fleet.lease as f64 / 2.0
            }
            None => false,
        }
    }
}

enum Blocked {
    Until(Instant),
    Fleet,
}

/// A wait too long to compute is a wait this long: a day, so the pacer
/// still wakes up now and then (a limit change wakes it at once anyway).
const FAR_FUTURE: Duration = Duration::from_secs(86_400);

struct Inner {
    state: Mutex<State>,
    /// Neither a mount limit nor a fleet budget: pieces pass untouched.
    open: AtomicBool,
    /// The size pieces are cut to ([`piece_for`]).
    piece: AtomicU64,
    /// With a fleet budget, pieces are at most half a lease.
    fleet_piece: AtomicU64,
    /// The rate read-ahead plans with: the lowest limit in force.
    planning_rate: AtomicU64,
    file_cap: Mutex<(u64, Option<Limit>)>,
    capped: AtomicBool,
    pacer: Notify,
    fleet_wanted: Notify,
    closed: AtomicBool,
    stats: ThrottleStats,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Lets through every waiting piece the bucket and the fleet budget
    /// can pay for, best tag first; says when to look again.
    fn dispatch(&self) -> Option<Instant> {
        let mut state = self.lock();
        let now = Instant::now();
        state.refill(now);
        let mut fleet_low = false;
        let next = loop {
            let Some((&key, waiter)) = state.queue.first_key_value() else {
                break None;
            };
            if waiter.grant.is_closed() {
                // The reader went away while it waited.
                state.queue.remove(&key);
                continue;
            }
            match state.blocker(waiter.bytes, now) {
                Some(Blocked::Until(at)) => break Some(at),
                Some(Blocked::Fleet) => {
                    fleet_low = true;
                    break None;
                }
                None => {}
            }
            let Some(waiter) = state.queue.remove(&key) else {
                continue;
            };
            if waiter.grant.send(()).is_ok() {
                fleet_low |= state.spend(waiter.bytes);
                state.vtime = state.vtime.max(key.0);
            }
        };
        drop(state);
        if fleet_low {
            self.fleet_wanted.notify_one();
        }
        next
    }

    fn update_planning_rate(&self, state: &State) {
        let rate = [
            state.limit.map(|l| l.rate),
            state.fleet.as_ref().map(|f| f.rate),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(u64::MAX);
        self.planning_rate.store(rate, Ordering::Relaxed);
    }
}

/// The mount's throttle. Needs a tokio runtime: its pacer is a task.
pub struct Throttle {
    inner: Arc<Inner>,
}

impl Throttle {
    /// A throttle with `limit` in force (`None`: unlimited, until changed).
    /// A limit out of range is clamped into it ([`Limit::clamped`]).
    pub fn new(limit: Option<Limit>) -> Arc<Self> {
        let limit = limit.map(Limit::clamped);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                limit,
                level: limit.map_or(0.0, |l| l.burst as f64),
                refilled: Instant::now(),
                vtime: 0,
                queue: BTreeMap::new(),
                arrivals: 0,
                fleet: None,
            }),
            open: AtomicBool::new(limit.is_none()),
            piece: AtomicU64::new(piece_for(limit)),
            fleet_piece: AtomicU64::new(u64::MAX),
            planning_rate: AtomicU64::new(limit.map_or(u64::MAX, |l| l.rate)),
            file_cap: Mutex::new((0, None)),
            capped: AtomicBool::new(false),
            pacer: Notify::new(),
            fleet_wanted: Notify::new(),
            closed: AtomicBool::new(false),
            stats: ThrottleStats::default(),
        });
        tokio::spawn(pace(Arc::clone(&inner)));
        Arc::new(Throttle { inner })
    }

    /// The mount limit in force (`None`: unlimited).
    pub fn limit(&self) -> Option<Limit> {
        self.inner.lock().limit
    }

    /// The lowest rate in force, for planning read-ahead (`u64::MAX`: none).
    pub fn planning_rate(&self) -> u64 {
        self.inner.planning_rate.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &ThrottleStats {
        &self.inner.stats
    }

    /// Changes the mount limit now, for charges already waiting too. Tokens
    /// in the bucket are kept up to the new depth; from unlimited, the
    /// bucket starts empty, so a limit never starts with a burst. A limit
    /// out of range is clamped into it: callers check limits from outside
    /// first ([`Limit::check`]), this is the guard behind them.
    pub fn set_limit(&self, limit: Option<Limit>) {
        let limit = limit.map(Limit::clamped);
        let mut state = self.inner.lock();
        state.refill(Instant::now());
        match (state.limit, limit) {
            (None, Some(_)) => state.level = 0.0,
            (Some(_), Some(new)) => state.level = state.level.min(new.burst as f64),
            (_, None) => state.level = 0.0,
        }
        state.limit = limit;
        self.inner
            .open
            .store(limit.is_none() && state.fleet.is_none(), Ordering::Relaxed);
        self.inner.piece.store(piece_for(limit), Ordering::Relaxed);
        self.inner.update_planning_rate(&state);
        drop(state);
        self.inner.pacer.notify_one();
    }

    /// Caps every open file at `limit` (`None`: no cap), from each file's
    /// next charge on. A limit out of range is clamped into it.
    pub fn set_file_limit(&self, limit: Option<Limit>) {
        let limit = limit.map(Limit::clamped);
        let mut cap = self
            .inner
            .file_cap
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *cap = (cap.0 + 1, limit);
        self.inner.capped.store(limit.is_some(), Ordering::Relaxed);
    }

    pub fn file_limit(&self) -> Option<Limit> {
        self.inner
            .file_cap
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .1
    }

    /// Waits until `bytes` a reader waits for may be fetched. Cancel-safe:
    /// dropping the future gives up the place in the queue; pieces already
    /// taken stay spent.
    pub async fn acquire(&self, flow: &Flow, bytes: u64) {
        self.charge(flow, bytes, None).await
    }

    /// A read-ahead charge, whose pieces go as demand from the moment
    /// `demanded` is set (a reader came to wait for the bytes).
    pub async fn acquire_ahead(&self, flow: &Flow, bytes: u64, demanded: &AtomicBool) {
        self.charge(flow, bytes, Some(demanded)).await
    }

    /// A demand charge, or read-ahead (`ahead` given: its `demanded` flag).
    async fn charge(&self, flow: &Flow, bytes: u64, ahead: Option<&AtomicBool>) {
        let inner = &*self.inner;
        let capped = inner.capped.load(Ordering::Relaxed);
        if bytes == 0 || (!capped && inner.open.load(Ordering::Relaxed)) {
            return;
        }
        let started = Instant::now();
        let _turn = match ahead {
            None => flow.demand_turn.lock().await,
            Some(_) => flow.ahead_turn.lock().await,
        };
        let cap = self.refresh_cap(flow);
        let mut remaining = bytes;
        while remaining > 0 {
            let mut piece = remaining
                .min(inner.piece.load(Ordering::Relaxed))
                .min(inner.fleet_piece.load(Ordering::Relaxed));
            if let Some(cap) = &cap {
                piece = piece.min(cap.depth());
                cap.acquire(piece).await;
            }
            let urgency = match ahead {
                Some(demanded) if !demanded.load(Ordering::Relaxed) => Urgency::Ahead,
                _ => Urgency::Demand,
            };
            self.take(flow, piece, urgency).await;
            remaining -= piece;
        }
        inner
            .stats
            .waited_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        inner
            .stats
            .limited_bytes
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// The flow's cap under the `file_rate=` in force, made anew when it
    /// changed; both urgencies of a flow share it.
    fn refresh_cap(&self, flow: &Flow) -> Option<Arc<FileCap>> {
        let (generation, limit) = *self
            .inner
            .file_cap
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut cap = flow
            .cap
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if cap.as_ref().map(|c| c.generation) != Some(generation) || limit.is_none() {
            *cap = limit.map(|limit| Arc::new(FileCap::new(limit, generation)));
        }
        cap.clone()
    }

    /// One piece through the mount's bucket and the fleet gate.
    async fn take(&self, flow: &Flow, bytes: u64, urgency: Urgency) {
        let inner = &*self.inner;
        let granted = {
            let mut state = inner.lock();
            if state.limit.is_none() && state.fleet.is_none() {
                return;
            }
            let now = Instant::now();
            state.refill(now);
            if state.queue.is_empty() && state.blocker(bytes, now).is_none() {
                let fleet_low = state.spend(bytes);
                drop(state);
                if fleet_low {
                    inner.fleet_wanted.notify_one();
                }
                return;
            }
            let weight = u64::from(flow.weight().max(1));
            let start = state.vtime.max(flow.finish.load(Ordering::Relaxed));
            let tag = start.saturating_add(bytes.saturating_mul(TAG_SCALE) / weight);
            flow.finish.store(tag, Ordering::Relaxed);
            let (grant, granted) = oneshot::channel();
            state.arrivals += 1;
            let arrival = state.arrivals;
            let key = (tag, arrival);
            let waiter = Waiter { bytes, grant };
            let mut queued_ahead = flow
                .queued_ahead
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match urgency {
                Urgency::Ahead => {
                    state.queue.insert(key, waiter);
                    *queued_ahead = Some(key);
                }
                Urgency::Demand => {
                    // The demand goes where the flow's read-ahead piece
                    // waits, and that piece where the demand would have.
                    let ahead = queued_ahead
                        .and_then(|ahead_key| Some((ahead_key, state.queue.remove(&ahead_key)?)));
                    match ahead {
                        Some((ahead_key, ahead)) => {
                            state.queue.insert(ahead_key, waiter);
                            state.queue.insert(key, ahead);
                            *queued_ahead = Some(key);
                        }
                        None => {
                            state.queue.insert(key, waiter);
                            *queued_ahead = None;
                        }
                    }
                }
            }
            granted
        };
        inner.pacer.notify_one();
        // An error means the pacer is gone with the mount: nothing to wait for.
        let _ = granted.await;
    }

    /// Puts the fleet gate in front of the bucket; leases of `lease` bytes
    /// will be credited by [`Throttle::credit_fleet`].
    pub(crate) fn attach_fleet(&self, lease: u64, fleet_rate: u64) {
        let mut state = self.inner.lock();
        state.fleet = Some(FleetGate {
            level: 0.0,
            lease: lease.max(1),
            rate: fleet_rate,
        });
        self.inner
            .fleet_piece
            .store((lease / 2).max(1), Ordering::Relaxed);
        self.inner.open.store(false, Ordering::Relaxed);
        self.inner.update_planning_rate(&state);
    }

    /// Adds leased bytes to the fleet gate.
    pub(crate) fn credit_fleet(&self, bytes: u64) {
        let mut state = self.inner.lock();
        if let Some(fleet) = &mut state.fleet {
            // Unspent leases do not pile up into a burst.
            fleet.level = (fleet.level + bytes as f64).min(2.0 * fleet.lease as f64);
        }
        drop(state);
        self.inner.pacer.notify_one();
    }

    /// Whether the fleet gate is below half a lease.
    pub(crate) fn fleet_low(&self) -> bool {
        let state = self.inner.lock();
        state
            .fleet
            .as_ref()
            .is_some_and(|fleet| fleet.level < fleet.lease as f64 / 2.0)
    }

    /// Waits until a charge finds the fleet gate low.
    pub(crate) async fn fleet_wanted(&self) {
        self.inner.fleet_wanted.notified().await;
    }

    /// The share of the fleet budget read-ahead should plan with.
    pub(crate) fn set_fleet_share(&self, rate: u64) {
        let mut state = self.inner.lock();
        if let Some(fleet) = &mut state.fleet {
            fleet.rate = rate;
        }
        self.inner.update_planning_rate(&state);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        self.inner.pacer.notify_one();
    }
}

/// The pacer: lets waiting pieces through as tokens come, and sleeps until
/// the next one can go or something changes.
/// Pieces of half the bucket's depth, at most [`MAX_PIECE`]: the other
/// half takes in the tokens that arrive while the pacer wakes up.
fn piece_for(limit: Option<Limit>) -> u64 {
    limit.map_or(MAX_PIECE, |l| (l.burst / 2).clamp(1, MAX_PIECE))
}

async fn pace(inner: Arc<Inner>) {
    while !inner.closed.load(Ordering::Relaxed) {
        match inner.dispatch() {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = inner.pacer.notified() => {}
                }
            }
            None => inner.pacer.notified().await,
        }
    }
}

#[cfg(test)]
mod tests;
