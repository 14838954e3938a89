//! `-o a=b,c` parsing: one table of options, their units and their errors.
//!
//! Options that belong to mount(8) or systemd (`_netdev`, `nofail`, `x-*`..)
//! are accepted and ignored, because mount(8) and fstab hand them to every
//! helper. `rw` is accepted with a warning: mount(8) passes it by default and
//! the mount is read-only either way. Anything else unknown is an error that
//! names the option.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::size::{parse_size, SizeError};
use crate::throttle::fleet::FleetConfig;
use crate::throttle::priority::Priorities;
use crate::throttle::schedule::Schedule;
use crate::throttle::Limit;

/// Default memory for cached and read-ahead data, all files together.
pub const DEFAULT_CACHE: u64 = 256 << 20;
pub use crate::throttle::MIN_AUTO_BURST;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("unknown option '{0}'")]
    Unknown(String),
    #[error("option '{0}' needs a value ({0}=...)")]
    MissingValue(String),
    #[error("option '{0}' takes no value")]
    UnexpectedValue(String),
    #[error("option '{name}': {reason}")]
    BadSize { name: String, reason: SizeError },
    #[error("option '{name}': '{value}' is not {expected}")]
    BadValue {
        name: String,
        value: String,
        expected: &'static str,
    },
    #[error("option '{name}': {reason}")]
    Invalid { name: String, reason: String },
    #[error("config file {path}: {reason}")]
    ConfigFile { path: String, reason: String },
    #[error("option '{0}' is refused: a password would show in /proc/mounts and ps; put it in credentials=FILE (mode 600) or VSPHERE_PASSWORD")]
    Secret(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Burst {
    Auto,
    Bytes(u64),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountOptions {
    /// Bytes per second for the whole mount; `None` = unlimited, no limiter.
    pub rate: Option<u64>,
    pub burst: Burst,
    pub cache: u64,
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub profile: Option<String>,
    pub credentials: Option<PathBuf>,
    pub anonymous: bool,
    pub user: Option<String>,
    pub cafile: Option<PathBuf>,
    pub insecure: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub umask: Option<u32>,
    pub allow_other: bool,
    pub allow_root: bool,
    pub default_permissions: bool,
    /// `rw` was asked for; the mount stays read-only and says so.
    pub rw_requested: bool,
    /// Where a daemonized mount writes its log.
    pub log: Option<PathBuf>,
    /// A provider answer that stops sending bytes this long is aborted and
    /// retried.
    pub stall_timeout: Duration,
    /// vSphere, EBS: read each VM's disks from a snapshot taken at first open.
    pub snapshot: bool,
    /// How long a VM's snapshot outlives the last close of its files, so
    /// that `cp -r` (one file at a time) reads every file from one snapshot.
    pub snapshot_linger: Duration,
    /// An open or a read whose provider has not delivered by then fails
    /// (retries included; waiting for tokens does not count).
    pub timeout: Duration,
    /// How old a listing may get before it is listed again; `None`: never
    /// (the inventory read at mount is kept).
    pub refresh: Option<Duration>,
    /// Timetable of mount rates (local time).
    pub schedule: Option<Schedule>,
    /// Cap of each open file, inside the mount's limit.
    pub file_rate: Option<u64>,
    /// Weights of readers under contention, by path pattern.
    pub priority: Priorities,
    /// The fleet budget shared through Redis.
    pub fleet: Option<FleetConfig>,
    /// Where the control socket goes; `None`: the default place.
    pub control: Control,
    /// Where the Prometheus endpoint listens; `None`: nowhere.
    pub metrics: Option<SocketAddr>,
    /// The config file the options came from (absolute), re-read on SIGHUP.
    pub config: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Control {
    /// Under /run/vmexportfs/ (root) or the user's runtime directory.
    #[default]
    Default,
    At(PathBuf),
    Off,
}

/// The fleet options as given, checked together once all are read.
#[derive(Debug, Default)]
struct FleetParts {
    url: Option<String>,
    key: Option<String>,
    rate: Option<u64>,
    fallback: Option<u64>,
}

/// Long enough for a congested WAN link to recover, short enough that a
/// dead connection is noticed well within a copy.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// A minute covers a backoff series over a flaky WAN link; past that a
/// backup agent is better told (EIO) than left hanging.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
/// `cp -r` and `rsync -a` open a VM's files one after another, with
/// seconds between them on a slow link: a minute keeps one snapshot.
pub const DEFAULT_SNAPSHOT_LINGER: Duration = Duration::from_secs(60);
/// Exports land nightly: a minute's delay is nothing to a backup job, and
/// re-listing a large bucket more often would cost requests.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(60);
/// The smallest `burst=`: below it every fetch is cut into pieces so small
/// that the pacer's wake-ups, not the rate, set the pace.
pub const MIN_BURST: u64 = 4 << 10;

impl Default for MountOptions {
    fn default() -> Self {
        MountOptions {
            rate: None,
            burst: Burst::Auto,
            cache: DEFAULT_CACHE,
            endpoint: None,
            region: None,
            profile: None,
            credentials: None,
            anonymous: false,
            user: None,
            cafile: None,
            insecure: false,
            uid: None,
            gid: None,
            umask: None,
            allow_other: false,
            allow_root: false,
            default_permissions: false,
            rw_requested: false,
            log: None,
            stall_timeout: DEFAULT_STALL_TIMEOUT,
            snapshot: false,
            snapshot_linger: DEFAULT_SNAPSHOT_LINGER,
            timeout: DEFAULT_TIMEOUT,
            refresh: Some(DEFAULT_REFRESH),
            schedule: None,
            file_rate: None,
            priority: Priorities::default(),
            fleet: None,
            control: Control::Default,
            metrics: None,
            config: None,
        }
    }
}

impl MountOptions {
    /// The token bucket depth in force: `auto` is max(rate/10, 64K).
    pub fn effective_burst(&self) -> Option<u64> {
        Some(self.limit_for(self.rate?).burst)
    }

    /// The mount limit for `rate` with this mount's `burst=`.
    pub fn limit_for(&self, rate: u64) -> Limit {
        match self.burst {
            Burst::Auto => Limit::auto(rate),
            Burst::Bytes(bytes) => Limit {
                rate: rate.max(1),
                burst: bytes.max(MIN_BURST),
            },
        }
    }

    /// The mount limit from `rate=` alone (`None`: unlimited).
    pub fn rate_limit(&self) -> Option<Limit> {
        self.rate.map(|rate| self.limit_for(rate))
    }

    /// The per-file cap from `file_rate=`.
    pub fn file_limit(&self) -> Option<Limit> {
        self.file_rate.map(Limit::auto)
    }

    /// Parses one or more `-o` strings (each comma-separated), later values
    /// overriding earlier ones as mount(8) does. With `config=FILE`, the
    /// file's options come first and the command line's override them.
    pub fn parse<'a>(groups: impl IntoIterator<Item = &'a str>) -> Result<Self, OptionError> {
        let items = split_items(groups);
        let mut options = MountOptions::default();
        let mut fleet = FleetParts::default();
        let config = items
            .iter()
            .rev()
            .find(|(name, _)| name == "config")
            .map(|(_, value)| value.clone());
        if let Some(config) = config {
            let path = match config.as_deref() {
                Some(path) if !path.is_empty() => absolute(Path::new(path)),
                _ => return Err(OptionError::MissingValue("config".into())),
            };
            for (name, value) in read_config_file(&path)? {
                options
                    .apply(&name, value.as_deref(), &mut fleet)
                    .map_err(|err| OptionError::ConfigFile {
                        path: path.display().to_string(),
                        reason: err.to_string(),
                    })?;
            }
            options.config = Some(path);
        }
        for (name, value) in &items {
            if name != "config" {
                options.apply(name, value.as_deref(), &mut fleet)?;
            }
        }
        options.fleet = fleet.finish()?;
        Ok(options)
    }

    fn apply(
        &mut self,
        name: &str,
        value: Option<&str>,
        fleet: &mut FleetParts,
    ) -> Result<(), OptionError> {
        let need = |value: Option<&str>| -> Result<String, OptionError> {
            match value {
                Some(v) if !v.is_empty() => Ok(v.to_string()),
                _ => Err(OptionError::MissingValue(name.to_string())),
            }
        };
        let flag = |value: Option<&str>| -> Result<bool, OptionError> {
            match value {
                None => Ok(true),
                Some(_) => Err(OptionError::UnexpectedValue(name.to_string())),
            }
        };
        let size = |value: Option<&str>| -> Result<u64, OptionError> {
            parse_size(&need(value)?).map_err(|reason| OptionError::BadSize {
                name: name.to_string(),
                reason,
            })
        };
        let invalid = |reason: String| OptionError::Invalid {
            name: name.to_string(),
            reason,
        };
        let number = |value: Option<&str>, radix: u32, expected: &'static str| {
            let text = need(value)?;
            u32::from_str_radix(&text, radix).map_err(|_| OptionError::BadValue {
                name: name.to_string(),
                value: text,
                expected,
            })
        };
        match name {
            "rate" => {
                self.rate = match need(value)?.as_str() {
                    "off" | "0" => None,
                    _ => Some(size(value)?).filter(|&r| r > 0),
                }
            }
            "burst" => {
                self.burst = match need(value)?.as_str() {
                    "auto" => Burst::Auto,
                    _ => {
                        let bytes = size(value)?;
                        if bytes < MIN_BURST {
                            return Err(OptionError::BadValue {
                                name: name.to_string(),
                                value: need(value)?,
                                expected: "auto or a size of at least 4K",
                            });
                        }
                        Burst::Bytes(bytes)
                    }
                }
            }
            "cache" => {
                let bytes = size(value)?;
                if bytes < (4 << 20) {
                    return Err(OptionError::BadValue {
                        name: name.to_string(),
                        value: need(value)?,
                        expected: "a size of at least 4M",
                    });
                }
                self.cache = bytes;
            }
            "endpoint" => self.endpoint = Some(need(value)?),
            "region" => self.region = Some(need(value)?),
            "profile" => self.profile = Some(need(value)?),
            "credentials" => self.credentials = Some(PathBuf::from(need(value)?)),
            "anonymous" => self.anonymous = flag(value)?,
            "user" if value.is_some() => self.user = Some(need(value)?),
            "cafile" => self.cafile = Some(PathBuf::from(need(value)?)),
            "insecure" => self.insecure = flag(value)?,
            "uid" => self.uid = Some(number(value, 10, "a numeric user id")?),
            "gid" => self.gid = Some(number(value, 10, "a numeric group id")?),
            "umask" => {
                let mask = number(value, 8, "an octal mask such as 022")?;
                if mask > 0o777 {
                    return Err(OptionError::BadValue {
                        name: name.to_string(),
                        value: need(value)?,
                        expected: "an octal mask such as 022",
                    });
                }
                self.umask = Some(mask);
            }
            "allow_other" => self.allow_other = flag(value)?,
            "allow_root" => self.allow_root = flag(value)?,
            "default_permissions" => self.default_permissions = flag(value)?,
            "ro" => {
                flag(value)?;
                self.rw_requested = false;
            }
            "rw" => self.rw_requested = flag(value)?,
            "log" => self.log = Some(PathBuf::from(need(value)?)),
            "stall_timeout" => {
                self.stall_timeout = seconds(
                    name,
                    &need(value)?,
                    0.1..=3600.0,
                    "a number of seconds between 0.1 and 3600, e.g. 30 or 2.5s",
                )?
            }
            "timeout" => {
                self.timeout = seconds(
                    name,
                    &need(value)?,
                    0.1..=86400.0,
                    "a number of seconds between 0.1 and 86400, e.g. 60",
                )?
            }
            "refresh" => {
                let value = need(value)?;
                self.refresh = match value.as_str() {
                    "off" => None,
                    text => Some(seconds(
                        name,
                        text,
                        1.0..=604800.0,
                        "off, or a number of seconds between 1 and 604800, e.g. 60",
                    )?),
                }
            }
            "snapshot_linger" => {
                self.snapshot_linger = seconds(
                    name,
                    &need(value)?,
                    0.0..=86400.0,
                    "a number of seconds between 0 and 86400, e.g. 60",
                )?
            }
            "snapshot" => {
                self.snapshot = match value {
                    None | Some("on") => true,
                    Some("off") => false,
                    Some(other) => {
                        return Err(OptionError::BadValue {
                            name: name.to_string(),
                            value: other.to_string(),
                            expected: "on or off",
                        })
                    }
                }
            }
            "password" | "pass" | "passwd" => return Err(OptionError::Secret(name.to_string())),
            "schedule" => {
                let text = need(value)?;
                self.schedule = match text.as_str() {
                    "off" | "none" => None,
                    _ => Some(Schedule::parse(&text).map_err(|err| invalid(err.to_string()))?),
                }
            }
            "file_rate" => {
                self.file_rate = match need(value)?.as_str() {
                    "off" | "0" => None,
                    _ => Some(size(value)?).filter(|&r| r > 0),
                }
            }
            "priority" => {
                let text = need(value)?;
                self.priority.add_list(&text).map_err(&invalid)?;
            }
            "fleet" => fleet.url = Some(need(value)?),
            "fleet_key" => {
                let key = need(value)?;
                if !key
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c))
                {
                    return Err(invalid(format!(
                        "'{key}' is not a key name: use letters, digits, '-', '_', '.', ':'"
                    )));
                }
                fleet.key = Some(key);
            }
            "fleet_rate" => fleet.rate = Some(size(value)?).filter(|&r| r > 0),
            "fleet_fallback" => fleet.fallback = Some(size(value)?).filter(|&r| r > 0),
            "control" => {
                self.control = match need(value)?.as_str() {
                    "off" | "none" => Control::Off,
                    path => Control::At(absolute(Path::new(path))),
                }
            }
            "metrics" => {
                let text = need(value)?;
                let with_host = if text.parse::<u16>().is_ok() {
                    format!("127.0.0.1:{text}")
                } else {
                    text.clone()
                };
                self.metrics = Some(with_host.parse().map_err(|_| OptionError::BadValue {
                    name: name.to_string(),
                    value: text,
                    expected: "ADDRESS:PORT, e.g. 127.0.0.1:9477",
                })?);
            }
            // mount(8) and systemd options: theirs, not ours.
            "defaults" | "auto" | "noauto" | "user" | "nouser" | "users" | "nousers"
            | "_netdev" | "nofail" | "owner" | "noowner" | "group" | "nogroup" | "comment"
            | "loop" | "helper" | "uhelper" => {}
            // Generic mount flags: the mount is always ro,nosuid,nodev and
            // keeps no atimes, so none of them changes anything.
            "dev" | "nodev" | "suid" | "nosuid" | "exec" | "noexec" | "noatime" | "atime"
            | "relatime" | "norelatime" | "nodiratime" | "diratime" | "strictatime"
            | "nostrictatime" | "lazytime" | "nolazytime" | "sync" | "async" | "dirsync"
            | "mand" | "nomand" | "silent" | "loud" | "nosymfollow" | "symfollow" => {}
            // SELinux labels: FUSE mounts take none.
            "context" | "fscontext" | "defcontext" | "rootcontext" => {}
            _ if name.starts_with("x-") || name.starts_with("X-") => {}
            _ => return Err(OptionError::Unknown(name.to_string())),
        }
        Ok(())
    }
}

/// `30`, `2.5` or `2.5s`, finite and within `range`.
fn seconds(
    name: &str,
    text: &str,
    range: std::ops::RangeInclusive<f64>,
    expected: &'static str,
) -> Result<Duration, OptionError> {
    text.strip_suffix('s')
        .unwrap_or(text)
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && range.contains(s))
        .map(Duration::from_secs_f64)
        .ok_or_else(|| OptionError::BadValue {
            name: name.to_string(),
            value: text.to_string(),
            expected,
        })
}

impl FleetParts {
    fn finish(self) -> Result<Option<FleetConfig>, OptionError> {
        let Some(url) = self.url else {
            for (given, name) in [
                (self.key.is_some(), "fleet_key"),
                (self.rate.is_some(), "fleet_rate"),
                (self.fallback.is_some(), "fleet_fallback"),
            ] {
                if given {
                    return Err(OptionError::Invalid {
                        name: name.into(),
                        reason: "needs fleet=redis://HOST:PORT/DB".into(),
                    });
                }
            }
            return Ok(None);
        };
        let rate = self.rate.ok_or_else(|| OptionError::Invalid {
            name: "fleet".into(),
            reason: "needs fleet_rate=SIZE, the budget all mounts of the key share".into(),
        })?;
        Ok(Some(FleetConfig {
            url,
            key: self.key.unwrap_or_else(|| "default".into()),
            rate,
            fallback: self.fallback,
        }))
    }
}

/// `a=b,c` groups into (name, value) items. A `priority=` list may go on
/// after commas (`priority=db-*:4,web-*:2`): an item without `=` that
/// follows it and looks like `PATTERN:WEIGHT` belongs to it.
fn split_items<'a>(groups: impl IntoIterator<Item = &'a str>) -> Vec<(String, Option<String>)> {
    let mut items: Vec<(String, Option<String>)> = Vec::new();
    for group in groups {
        for item in group.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            match item.split_once('=') {
                Some((name, value)) => {
                    items.push((name.trim().to_string(), Some(value.trim().to_string())))
                }
                None => {
                    if let Some((name, Some(list))) = items.last_mut() {
                        if name == "priority" && looks_like_priority(item) {
                            list.push(',');
                            list.push_str(item);
                            continue;
                        }
                    }
                    items.push((item.to_string(), None));
                }
            }
        }
    }
    items
}

fn looks_like_priority(item: &str) -> bool {
    item.rsplit_once(':')
        .is_some_and(|(pattern, weight)| !pattern.is_empty() && weight.parse::<u32>().is_ok())
}

/// Relative paths are taken from the directory the command ran in (the
/// daemon later moves to `/`).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf())
}

/// A config file: one option a line, `name = value` or `name`; `#` starts
/// a comment line. `schedule` lines add entries to one timetable.
fn read_config_file(path: &Path) -> Result<Vec<(String, Option<String>)>, OptionError> {
    let text = std::fs::read_to_string(path).map_err(|err| OptionError::ConfigFile {
        path: path.display().to_string(),
        reason: err.to_string(),
    })?;
    let mut items: Vec<(String, Option<String>)> = Vec::new();
    let mut schedule: Vec<String> = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((name, value)) => (name.trim(), Some(value.trim().to_string())),
            None => (line, None),
        };
        if name.is_empty() || name.contains(char::is_whitespace) {
            return Err(OptionError::ConfigFile {
                path: path.display().to_string(),
                reason: format!(
                    "line {}: expected 'name = value', found '{line}'",
                    number + 1
                ),
            });
        }
        if name == "config" {
            return Err(OptionError::ConfigFile {
                path: path.display().to_string(),
                reason: format!("line {}: a config file cannot name another", number + 1),
            });
        }
        if name == "schedule" {
            schedule.push(value.unwrap_or_default());
        } else {
            items.push((name.to_string(), value));
        }
    }
    if !schedule.is_empty() {
        items.push(("schedule".into(), Some(schedule.join("\n"))));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_unlimited_with_256m_cache() {
        let options = MountOptions::parse([""]).unwrap();
        assert_eq!(options.rate, None);
        assert_eq!(options.cache, 256 << 20);
        assert_eq!(options.effective_burst(), None);
    }

    #[test]
    fn rate_and_burst() {
        let options = MountOptions::parse(["rate=50M"]).unwrap();
        assert_eq!(options.rate, Some(52_428_800));
        assert_eq!(options.effective_burst(), Some(5_242_880));
        let options = MountOptions::parse(["rate=100K,burst=auto"]).unwrap();
        assert_eq!(options.effective_burst(), Some(64 << 10));
        let options = MountOptions::parse(["rate=10M,burst=1M"]).unwrap();
        assert_eq!(options.effective_burst(), Some(1 << 20));
        for off in ["rate=off", "rate=0", "rate=20M,rate=off"] {
            assert_eq!(MountOptions::parse([off]).unwrap().rate, None, "{off}");
        }
    }

    #[test]
    fn mount8_options_are_ignored_and_rw_is_noted() {
        let options =
            MountOptions::parse(["rw,rate=10M,_netdev", "nofail,x-systemd.automount,noauto"])
                .unwrap();
        assert!(options.rw_requested);
        assert_eq!(options.rate, Some(10 << 20));
    }

    #[test]
    fn unknown_options_name_themselves() {
        let err = MountOptions::parse(["rate=1M,bogus=3"]).unwrap_err();
        assert_eq!(err.to_string(), "unknown option 'bogus'");
        let err = MountOptions::parse(["rate=fast"]).unwrap_err();
        assert!(err.to_string().starts_with("option 'rate':"), "{err}");
        assert!(
            std::error::Error::source(&err).is_none(),
            "said once, not twice"
        );
        let err = MountOptions::parse(["rate"]).unwrap_err();
        assert_eq!(err, OptionError::MissingValue("rate".into()));
        let err = MountOptions::parse(["anonymous=yes"]).unwrap_err();
        assert_eq!(err, OptionError::UnexpectedValue("anonymous".into()));
        assert!(MountOptions::parse(["umask=999"]).is_err());
        assert!(MountOptions::parse(["stall_timeout=0"]).is_err());
        assert!(MountOptions::parse(["stall_timeout=soon"]).is_err());
        assert!(MountOptions::parse(["cache=1K"]).is_err());
    }

    #[test]
    fn ownership_and_flags() {
        let options =
            MountOptions::parse(["uid=1000,gid=100,umask=027,allow_other,insecure"]).unwrap();
        assert_eq!(options.uid, Some(1000));
        assert_eq!(options.gid, Some(100));
        assert_eq!(options.umask, Some(0o27));
        assert!(options.allow_other && options.insecure);
        let options = MountOptions::parse(["stall_timeout=2.5s"]).unwrap();
        assert_eq!(options.stall_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn timeouts_and_linger() {
        let options = MountOptions::parse([""]).unwrap();
        assert_eq!(options.timeout, Duration::from_secs(60));
        assert_eq!(options.snapshot_linger, Duration::from_secs(60));
        let options = MountOptions::parse(["timeout=5,snapshot_linger=0"]).unwrap();
        assert_eq!(options.timeout, Duration::from_secs(5));
        assert_eq!(options.snapshot_linger, Duration::ZERO);
        for bad in [
            "timeout=0",
            "timeout=-1",
            "timeout=nan",
            "timeout=inf",
            "timeout=1e400",
            "snapshot_linger=-5",
            "snapshot_linger=soon",
            "snapshot_linger=1e9",
        ] {
            let err = MountOptions::parse([bad]).unwrap_err().to_string();
            let name = bad.split('=').next().unwrap();
            assert!(err.starts_with(&format!("option '{name}'")), "{bad}: {err}");
        }
    }

    #[test]
    fn burst_has_a_floor() {
        for bad in ["burst=0", "burst=1", "burst=4095"] {
            let err = MountOptions::parse([bad]).unwrap_err().to_string();
            assert!(err.contains("at least 4K"), "{bad}: {err}");
        }
        let options = MountOptions::parse(["rate=1M,burst=4K"]).unwrap();
        assert_eq!(options.effective_burst(), Some(4096));
    }
}
