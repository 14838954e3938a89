//! The running mount's control plane: the limit in force and where it
//! comes from, the timetable, SIGHUP, live rates, the control socket and
//! the metrics endpoint.
//!
//! The limit in force is, first to last: a `vmexportfs rate` change (it
//! holds until the timetable's next change, or until SIGHUP), the
//! timetable entry in force, then `rate=`. A task re-checks it every second
//! and at each timetable boundary, so a change of entry takes effect within
//! a second of the wall-clock time it names.

pub mod metrics;
pub mod socket;
pub mod status;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use chrono::NaiveDateTime;

use crate::fs::FsCore;
use crate::options::MountOptions;
use crate::throttle::fleet::Fleet;
use crate::throttle::schedule::{local_now, until_local};
use crate::throttle::{Limit, LimitError, Throttle};
use status::{FileStatus, RateWindow, ScheduleStatus, Status, Totals};

/// How far back the MB/s figures look.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// A limit set with `vmexportfs rate`.
#[derive(Debug, Clone)]
struct Manual {
    limit: Option<Limit>,
    /// When the timetable takes over again (`None`: no timetable).
    until: Option<NaiveDateTime>,
}

struct Settings {
    options: MountOptions,
    manual: Option<Manual>,
    applied: Option<Limit>,
    origin: String,
}

#[derive(Default)]
struct Rates {
    fetched: RateWindow,
    served: RateWindow,
    files: HashMap<u64, RateWindow>,
}

pub struct Controller {
    source: String,
    mountpoint: PathBuf,
    started: Instant,
    core: Arc<FsCore>,
    throttle: Arc<Throttle>,
    fleet: Option<Arc<Fleet>>,
    /// The `-o` groups as given, for SIGHUP to parse again with the file.
    option_groups: Vec<String>,
    settings: Mutex<Settings>,
    rates: Mutex<Rates>,
}

impl Controller {
    pub fn new(
        source: String,
        mountpoint: PathBuf,
        core: Arc<FsCore>,
        fleet: Option<Arc<Fleet>>,
        options: MountOptions,
        option_groups: Vec<String>,
    ) -> Arc<Self> {
        if let Err(err) = check_options(&options) {
            // The throttle clamps what it cannot enforce; say so.
            tracing::warn!("{err}; the limit is clamped to the range the throttle enforces");
        }
        let throttle = Arc::clone(core.read_path().throttle());
        let controller = Arc::new(Controller {
            source,
            mountpoint,
            started: Instant::now(),
            core,
            throttle,
            fleet,
            option_groups,
            settings: Mutex::new(Settings {
                applied: options.rate_limit(),
                options,
                manual: None,
                origin: String::new(),
            }),
            rates: Mutex::new(Rates::default()),
        });
        {
            let settings = controller.settings();
            controller
                .throttle
                .set_file_limit(settings.options.file_limit());
            controller
                .core
                .set_priorities(settings.options.priority.clone());
        }
        controller.apply();
        controller
    }

    fn settings(&self) -> MutexGuard<'_, Settings> {
        self.settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Starts the tasks that keep the limit and the rates current.
    pub fn spawn_tasks(self: &Arc<Self>) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            loop {
                let wait = this.apply();
                tokio::time::sleep(wait).await;
            }
        });
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                this.sample();
            }
        });
    }

    /// Puts the limit that should be in force in force; returns how long
    /// until it should be checked again.
    fn apply(&self) -> Duration {
        let now = local_now();
        let mut settings = self.settings();
        if let Some(until) = settings.manual.as_ref().and_then(|m| m.until) {
            if now >= until {
                settings.manual = None;
                tracing::info!("the limit set by 'vmexportfs rate' ends: the timetable takes over");
            }
        }
        let (limit, origin) = if let Some(manual) = &settings.manual {
            let origin = match manual.until {
                Some(until) => format!("vmexportfs rate, until {}", until.format("%a %H:%M:%S")),
                None => "vmexportfs rate".to_string(),
            };
            (manual.limit, origin)
        } else if let Some(schedule) = &settings.options.schedule {
            let entry = schedule.active_at(now);
            (
                entry.limit.map(|rate| settings.options.limit_for(rate)),
                format!("timetable entry '{}'", entry.describe()),
            )
        } else {
            let origin = match settings.options.rate {
                Some(_) => "rate= option",
                None => "no limit set",
            };
            (settings.options.rate_limit(), origin.to_string())
        };
        if limit != settings.applied || origin != settings.origin {
            if !settings.origin.is_empty() {
                tracing::info!("mount limit now {} ({origin})", describe_limit(limit));
            }
            self.throttle.set_limit(limit);
            settings.applied = limit;
            settings.origin = origin;
        }
        let next = settings
            .options
            .schedule
            .as_ref()
            .and_then(|schedule| schedule.next_change_after(now))
            .map(|(at, _)| until_local(at))
            .into_iter()
            .chain(
                settings
                    .manual
                    .as_ref()
                    .and_then(|m| m.until)
                    .map(until_local),
            )
            .min()
            .unwrap_or(Duration::MAX);
        // Wall clocks jump (NTP, DST, suspend): look again within a second.
        next.clamp(Duration::from_millis(10), Duration::from_secs(1))
    }

    /// `vmexportfs rate`: a new mount limit now (`None`: unlimited). A
    /// limit the throttle cannot enforce is refused and changes nothing.
    pub fn set_rate(&self, limit: Option<Limit>) -> Result<(Option<Limit>, String), LimitError> {
        if let Some(limit) = &limit {
            limit.check()?;
        }
        let now = local_now();
        {
            let mut settings = self.settings();
            let until = settings
                .options
                .schedule
                .as_ref()
                .and_then(|schedule| schedule.next_change_after(now))
                .map(|(at, _)| at);
            settings.manual = Some(Manual { limit, until });
        }
        tracing::info!(
            "vmexportfs rate: mount limit set to {}",
            describe_limit(limit)
        );
        self.apply();
        let settings = self.settings();
        Ok((settings.applied, settings.origin.clone()))
    }

    /// SIGHUP: reads the config file again and applies what can change
    /// while mounted; a `vmexportfs rate` change ends.
    pub fn reload(&self) {
        let Some(path) = self.settings().options.config.clone() else {
            tracing::info!("SIGHUP: mounted without config=, nothing to re-read");
            return;
        };
        let fresh = match MountOptions::parse(self.option_groups.iter().map(String::as_str)) {
            Ok(fresh) => fresh,
            Err(err) => {
                tracing::error!("SIGHUP: {err}; keeping the settings in force");
                return;
            }
        };
        if let Err(err) = check_options(&fresh) {
            tracing::error!(
                "SIGHUP: {}: {err}; keeping the settings in force",
                path.display()
            );
            return;
        }
        {
            let mut settings = self.settings();
            let mut merged = settings.options.clone();
            merged.rate = fresh.rate;
            merged.burst = fresh.burst.clone();
            merged.schedule = fresh.schedule.clone();
            merged.file_rate = fresh.file_rate;
            merged.priority = fresh.priority.clone();
            if let (Some(old), Some(new)) = (&mut merged.fleet, &fresh.fleet) {
                old.rate = new.rate;
                old.fallback = new.fallback;
            }
            if merged != fresh {
                tracing::warn!(
                    "SIGHUP: {} changed options that take effect only at the next mount; \
                     applied: rate, burst, schedule, file_rate, priority, fleet_rate, fleet_fallback",
                    path.display()
                );
            }
            self.throttle.set_file_limit(merged.file_limit());
            self.core.set_priorities(merged.priority.clone());
            if let (Some(fleet), Some(config)) = (&self.fleet, &merged.fleet) {
                fleet.set_rates(config.rate, config.fallback);
            }
            settings.options = merged;
            settings.manual = None;
        }
        tracing::info!("SIGHUP: re-read {}", path.display());
        self.apply();
    }

    /// Takes the once-a-second samples behind the MB/s figures.
    fn sample(&self) {
        let now = Instant::now();
        let stats = &self.core.read_path().stats;
        let files = self.core.open_files();
        let mut rates = self
            .rates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        rates
            .fetched
            .push(now, stats.bytes_fetched.load(Ordering::Relaxed));
        rates
            .served
            .push(now, stats.bytes_served.load(Ordering::Relaxed));
        rates
            .files
            .retain(|fh, _| files.iter().any(|(open, _)| open == fh));
        for (fh, reader) in files {
            rates
                .files
                .entry(fh)
                .or_insert_with(|| RateWindow::starting(reader.opened(), 0))
                .push(now, reader.served());
        }
    }

    /// Bytes per second fetched from the provider over the last seconds.
    pub fn fetch_rate(&self) -> f64 {
        let stats = &self.core.read_path().stats;
        self.rates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .fetched
            .rate(
                Instant::now(),
                stats.bytes_fetched.load(Ordering::Relaxed),
                RATE_WINDOW,
            )
    }

    pub fn core(&self) -> &Arc<FsCore> {
        &self.core
    }

    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    pub fn fleet(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref()
    }

    pub fn status(&self) -> Status {
        let now = Instant::now();
        let local = local_now();
        let read_path = self.core.read_path();
        let stats = &read_path.stats;
        let (limit, origin, options) = {
            let settings = self.settings();
            (
                settings.applied,
                settings.origin.clone(),
                settings.options.clone(),
            )
        };
        let fetched = stats.bytes_fetched.load(Ordering::Relaxed);
        let served = stats.bytes_served.load(Ordering::Relaxed);
        let files = self.core.open_files();
        let rates = self
            .rates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let fetch_rate = rates.fetched.rate(now, fetched, RATE_WINDOW);
        let files = files
            .into_iter()
            .map(|(fh, reader)| {
                let read = reader.served();
                let rate = match rates.files.get(&fh) {
                    Some(window) => window.rate(now, read, RATE_WINDOW),
                    None => RateWindow::starting(reader.opened(), 0).rate(now, read, RATE_WINDOW),
                };
                let left = reader.size().saturating_sub(read);
                FileStatus {
                    path: reader.path().to_string(),
                    pid: reader.opener().pid,
                    command: reader.opener().command.clone(),
                    bytes_read: read,
                    size: reader.size(),
                    rate,
                    eta_seconds: (rate > 0.0).then(|| left as f64 / rate),
                    weight: reader.weight(),
                    pinned: reader.pinned_version().to_string(),
                    snapshot: reader.pinned_version().snapshot_id().map(str::to_string),
                    weak_pin: reader.pinned_version().weakness().map(str::to_string),
                }
            })
            .collect();
        let schedule = options.schedule.as_ref().map(|schedule| {
            let active = schedule.active_at(local);
            let next = schedule.next_change_after(local);
            ScheduleStatus {
                active: active.describe(),
                active_rate: active.limit,
                next_change: next.map(|(at, _)| at.format("%a %Y-%m-%d %H:%M:%S").to_string()),
                next_entry: next.map(|(_, entry)| entry.describe()),
                next_rate: next.and_then(|(_, entry)| entry.limit),
                seconds_to_next: next.map(|(at, _)| until_local(at).as_secs_f64()),
            }
        });
        let fleet = self.fleet.as_ref().map(|fleet| {
            let status = fleet.status();
            let share = fetch_rate / status.rate.max(1) as f64;
            status::FleetView { status, share }
        });
        Status {
            source: self.source.clone(),
            mountpoint: self.mountpoint.display().to_string(),
            pid: std::process::id(),
            uptime_seconds: now.duration_since(self.started).as_secs_f64(),
            limit,
            limit_origin: origin,
            file_rate: options.file_rate,
            priority: options.priority.to_string(),
            schedule,
            fleet,
            provider: self.core.provider_activity(),
            totals: Totals {
                bytes_fetched: fetched,
                bytes_served: served,
                cache_hits: stats.cache_hits.load(Ordering::Relaxed),
                cache_misses: stats.cache_misses.load(Ordering::Relaxed),
                fetch_rate,
                serve_rate: rates.served.rate(now, served, RATE_WINDOW),
                throttle_wait_seconds: self.throttle.stats().waited_nanos.load(Ordering::Relaxed)
                    as f64
                    / 1e9,
                open_files: read_path.open_files() as u64,
                fetches_in_flight: stats.fetches_in_flight.load(Ordering::Relaxed),
                cache_bytes: read_path.cache_bytes(),
            },
            files,
        }
    }
}

/// Checks every limit the options would put in force (`rate=` with
/// `burst=`, each timetable entry, `file_rate=`, the fleet rates), naming
/// the first one the throttle could not enforce. Run where options come
/// in: at mount and on SIGHUP.
pub fn check_options(options: &MountOptions) -> Result<(), String> {
    if let Some(rate) = options.rate {
        options
            .limit_for(rate)
            .check()
            .map_err(|err| format!("rate=/burst=: {err}"))?;
    }
    if let Some(schedule) = &options.schedule {
        for entry in schedule.entries() {
            if let Some(rate) = entry.limit {
                options
                    .limit_for(rate)
                    .check()
                    .map_err(|err| format!("schedule entry '{}': {err}", entry.describe()))?;
            }
        }
    }
    if let Some(rate) = options.file_rate {
        Limit::auto(rate)
            .check()
            .map_err(|err| format!("file_rate=: {err}"))?;
    }
    if let Some(fleet) = &options.fleet {
        fleet.check()?;
    }
    Ok(())
}

/// `52428800 B/s (50.0 MiB/s), burst 5242880 B` or `unlimited`.
pub fn describe_limit(limit: Option<Limit>) -> String {
    match limit {
        Some(limit) => format!(
            "{} B/s ({}/s), burst {} B",
            limit.rate,
            crate::size::HumanBytes(limit.rate),
            limit.burst
        ),
        None => "unlimited".into(),
    }
}
