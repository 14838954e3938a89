//! Snapshots taken for a consistent export (`snapshot=on`), for the
//! providers that take them (vSphere, EBS).
//!
//! A VM's snapshot is taken at the first open of any of its files and held
//! while any is open and for `snapshot_linger` after the last close, so a
//! `cp -r` of the VM directory (one file at a time) reads every file from
//! the same point in time; then it is removed, and at unmount at once.
//!
//! Each snapshot records the host, boot and process that took it. At start
//! a provider removes the snapshots that a vmexportfs on this host left
//! behind when it died (killed, OOM, power loss), and leaves alone those of
//! live processes and of other hosts.

use std::collections::HashMap;
use std::fmt::Display;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;

use super::ProviderError;

/// What a provider does to take and remove one VM's export snapshot.
#[async_trait]
pub(crate) trait Snapshotter: Send + Sync + 'static {
    /// What one VM's export snapshot is (a snapshot id, or one per volume).
    type Snapshot: Clone + Display + Send + Sync + 'static;

    /// Takes the snapshot of VM `vm` (the provider's id; `name` in logs),
    /// returning once it can be read.
    async fn take(&self, vm: &str, name: &str) -> Result<Self::Snapshot, ProviderError>;

    async fn remove(&self, vm: &str, snapshot: &Self::Snapshot) -> Result<(), ProviderError>;

    /// What an operator should remove when the mount could not.
    fn by_hand(&self, snapshot: &Self::Snapshot) -> String;
}

/// The snapshot held for one VM while any of its files is open, and for
/// the linger after the last close.
struct Hold<S> {
    handles: usize,
    snapshot: Option<S>,
    /// The removal waiting out the linger; a re-open cancels it.
    pending: Option<tokio::task::JoinHandle<()>>,
}

impl<S> Default for Hold<S> {
    fn default() -> Self {
        Hold {
            handles: 0,
            snapshot: None,
            pending: None,
        }
    }
}

type SharedHold<S> = Arc<tokio::sync::Mutex<Hold<S>>>;

/// Every VM's export snapshot of one mount.
pub(crate) struct Holds<T: Snapshotter> {
    taker: Arc<T>,
    linger: Duration,
    vms: Mutex<HashMap<String, SharedHold<T::Snapshot>>>,
}

impl<T: Snapshotter> Holds<T> {
    pub(crate) fn new(taker: Arc<T>, linger: Duration) -> Self {
        Holds {
            taker,
            linger,
            vms: Mutex::new(HashMap::new()),
        }
    }

    fn hold_of(&self, vm: &str) -> SharedHold<T::Snapshot> {
        self.vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(vm.to_string())
            .or_default()
            .clone()
    }

    /// The snapshot held for the VM, if any.
    pub(crate) async fn held(&self, vm: &str) -> Option<T::Snapshot> {
        let hold = self
            .vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .get(vm)
            .cloned()?;
        let snapshot = hold.lock().await.snapshot.clone();
        snapshot
    }

    /// A file of the VM opens: the first takes the snapshot. Every `Ok` is
    /// matched by one [`Holds::close`].
    pub(crate) async fn open(&self, vm: &str, name: &str) -> Result<(), ProviderError> {
        let hold = self.hold_of(vm);
        let mut hold = hold.lock().await;
        if let Some(pending) = hold.pending.take() {
            pending.abort();
            if let Some(snapshot) = &hold.snapshot {
                tracing::info!(vm = %name, %snapshot, "reopened within snapshot_linger: the same snapshot serves");
            }
        }
        if hold.snapshot.is_none() {
            let snapshot = self.taker.take(vm, name).await.inspect_err(|err| {
                tracing::error!(vm = %name, "snapshot=on: cannot take a snapshot: {err}");
            })?;
            tracing::info!(vm = %name, %snapshot, "snapshot taken for the export");
            hold.snapshot = Some(snapshot);
        }
        hold.handles += 1;
        tracing::debug!(vm = %name, open = hold.handles, "disk opened");
        Ok(())
    }

    /// A file of the VM closed: after the last, the snapshot goes once
    /// `snapshot_linger` passes with no new open.
    pub(crate) async fn close(&self, vm: &str, name: &str) {
        let shared = self.hold_of(vm);
        let mut hold = shared.lock().await;
        hold.handles = hold.handles.saturating_sub(1);
        tracing::debug!(vm = %name, open = hold.handles, "disk closed");
        if hold.handles > 0 {
            return;
        }
        let Some(snapshot) = hold.snapshot.clone() else {
            return;
        };
        if let Some(pending) = hold.pending.take() {
            pending.abort();
        }
        if self.linger.is_zero() {
            expire(&*self.taker, vm, name, &snapshot, &mut hold).await;
            return;
        }
        tracing::info!(
            vm = %name,
            %snapshot,
            "last file of the VM closed: the snapshot stays {:?} (snapshot_linger) for the next file",
            self.linger
        );
        let (taker, vm, name, linger) = (
            self.taker.clone(),
            vm.to_string(),
            name.to_string(),
            self.linger,
        );
        let hold_of_vm = shared.clone();
        hold.pending = Some(tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            let mut hold = hold_of_vm.lock().await;
            // A re-open aborts this task while holding the lock, so this
            // only guards against a missed abort.
            if hold.handles > 0 {
                return;
            }
            hold.pending = None;
            expire(&*taker, &vm, &name, &snapshot, &mut hold).await;
        }));
    }

    /// The mount ends: every snapshot goes now. `name_of` names a VM by id.
    pub(crate) async fn release_all(&self, name_of: impl Fn(&str) -> String) {
        let holds: Vec<(String, SharedHold<T::Snapshot>)> = self
            .vms
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .iter()
            .map(|(vm, hold)| (vm.clone(), hold.clone()))
            .collect();
        for (vm, hold) in holds {
            let mut hold = hold.lock().await;
            if let Some(pending) = hold.pending.take() {
                pending.abort();
            }
            if let Some(snapshot) = hold.snapshot.clone() {
                let name = name_of(&vm);
                match self.taker.remove(&vm, &snapshot).await {
                    Ok(()) => {
                        tracing::info!(vm = %name, %snapshot, "snapshot removed");
                        hold.snapshot = None;
                    }
                    Err(err) => tracing::error!(
                        vm = %name,
                        %snapshot,
                        "the export snapshot could not be removed; {}: {err}",
                        self.taker.by_hand(&snapshot)
                    ),
                }
            }
            hold.handles = 0;
        }
    }
}

/// Removes a VM's snapshot once no file of it is open; a failure keeps it,
/// to be tried again at unmount.
async fn expire<T: Snapshotter>(
    taker: &T,
    vm: &str,
    name: &str,
    snapshot: &T::Snapshot,
    hold: &mut Hold<T::Snapshot>,
) {
    match taker.remove(vm, snapshot).await {
        Ok(()) => {
            tracing::info!(vm = %name, %snapshot, "snapshot removed");
            hold.snapshot = None;
        }
        Err(err) => {
            tracing::error!(vm = %name, %snapshot, "removing the export snapshot: {err}")
        }
    }
}

/// A snapshot found at start that may be a dead vmexportfs's.
pub(crate) struct Found {
    /// The VM, by name, for the log.
    pub vm: String,
    pub snapshot: String,
    /// Where the creator is recorded (a description or a tag).
    pub record: String,
}

/// Removes the snapshots that a dead vmexportfs on this host left behind;
/// `what` names them in the log (`snapshot 'vmexportfs-export'`).
pub(crate) async fn remove_leftovers<F, Fut>(found: Vec<Found>, what: &str, remove: F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Result<(), ProviderError>>,
{
    let here = Creator::this_process();
    for snap in found {
        let (vm, snapshot) = (&snap.vm, &snap.snapshot);
        match leftover_verdict(&snap.record, &here, process_is_vmexportfs) {
            Verdict::NotOurs => {}
            Verdict::Legacy => tracing::warn!(
                %vm, %snapshot,
                "{what} names no host (an older vmexportfs took it): left alone; remove it by hand if no export is running"
            ),
            Verdict::OtherHost(host) => tracing::info!(
                %vm, %snapshot,
                "{what} belongs to vmexportfs on host {host}: left alone"
            ),
            Verdict::Live(pid) => tracing::info!(
                %vm, %snapshot,
                "{what} belongs to vmexportfs pid {pid}, which is running: left alone"
            ),
            Verdict::Leftover(pid) => match remove(snapshot.clone()).await {
                Ok(()) => tracing::info!(
                    %vm, %snapshot,
                    "removed the snapshot left behind by vmexportfs pid {pid}, which is no longer running"
                ),
                Err(err) => tracing::warn!(
                    %vm, %snapshot,
                    "cannot remove the snapshot left behind by vmexportfs pid {pid}: {err}"
                ),
            },
        }
    }
}

/// Who took a snapshot: recorded with it, read back at the next start to
/// tell a dead daemon's leftovers from a live one's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Creator {
    host: String,
    pid: u32,
    /// /proc/sys/kernel/random/boot_id: a snapshot from an earlier boot
    /// outlived its process, whatever its pid is now.
    boot: String,
}

const MARKER: &str = "[vmexportfs ";

impl Creator {
    pub(crate) fn this_process() -> Creator {
        let read = |path: &str| {
            std::fs::read_to_string(path)
                .ok()
                .map(|text| text.trim().to_string())
                .filter(|text| !text.is_empty() && !text.contains(char::is_whitespace))
                .unwrap_or_else(|| "unknown".to_string())
        };
        Creator {
            host: read("/proc/sys/kernel/hostname"),
            pid: std::process::id(),
            boot: read("/proc/sys/kernel/random/boot_id"),
        }
    }

    /// The text a snapshot's description carries, ending in the record.
    pub(crate) fn description(&self) -> String {
        format!(
            "Taken by vmexportfs for a consistent export of the disks; removed when the export ends. {}",
            self.record()
        )
    }

    /// `[vmexportfs host=… pid=… boot=…]`, also usable alone as a tag value.
    pub(crate) fn record(&self) -> String {
        format!(
            "{MARKER}host={} pid={} boot={}]",
            self.host, self.pid, self.boot
        )
    }

    fn parse(description: &str) -> Option<Creator> {
        let start = description.rfind(MARKER)?;
        let inner = description[start + MARKER.len()..].strip_suffix(']')?;
        let (mut host, mut pid, mut boot) = (None, None, None);
        for field in inner.split(' ') {
            match field.split_once('=')? {
                ("host", value) => host = Some(value.to_string()),
                ("pid", value) => pid = Some(value.parse().ok()?),
                ("boot", value) => boot = Some(value.to_string()),
                _ => return None,
            }
        }
        Some(Creator {
            host: host?,
            pid: pid?,
            boot: boot?,
        })
    }
}

/// What to do with a snapshot found at start.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// No record: someone else's snapshot.
    NotOurs,
    /// Written by a vmexportfs that did not record its host.
    Legacy,
    OtherHost(String),
    Live(u32),
    Leftover(u32),
}

fn leftover_verdict(record: &str, here: &Creator, alive: impl Fn(u32) -> bool) -> Verdict {
    let Some(creator) = Creator::parse(record) else {
        return if record.starts_with("Taken by vmexportfs") {
            Verdict::Legacy
        } else {
            Verdict::NotOurs
        };
    };
    if creator.host != here.host || creator.host == "unknown" {
        return Verdict::OtherHost(creator.host);
    }
    let boots_known = creator.boot != "unknown" && here.boot != "unknown";
    if boots_known && creator.boot != here.boot {
        // The host rebooted since: its process is gone.
        return Verdict::Leftover(creator.pid);
    }
    if creator.pid == here.pid && boots_known {
        // This process has taken no snapshot yet: an earlier process of
        // this boot had the same pid.
        return Verdict::Leftover(creator.pid);
    }
    if alive(creator.pid) {
        Verdict::Live(creator.pid)
    } else {
        Verdict::Leftover(creator.pid)
    }
}

/// Whether `pid` is a running vmexportfs. When unsure, yes: a snapshot left
/// alone costs disk space, a snapshot removed under a live export costs the
/// export its consistency.
fn process_is_vmexportfs(pid: u32) -> bool {
    let Ok(comm) = std::fs::read_to_string(format!("/proc/{pid}/comm")) else {
        // Gone, or /proc cannot tell: only a missing process is dead.
        return std::fs::metadata(format!("/proc/{pid}")).is_ok()
            || std::fs::metadata("/proc/self").is_err();
    };
    let argv0 = std::fs::read(format!("/proc/{pid}/cmdline"))
        .ok()
        .and_then(|line| line.split(|&b| b == 0).next().map(<[u8]>::to_vec))
        .unwrap_or_default();
    comm.contains("vmexportfs") || String::from_utf8_lossy(&argv0).contains("vmexportfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_local_daemons_snapshots_are_leftovers() {
        let here = Creator {
            host: "backup-01".into(),
            pid: 4242,
            boot: "b0".into(),
        };
        let taken_by = |host: &str, pid: u32, boot: &str| {
            Creator {
                host: host.into(),
                pid,
                boot: boot.into(),
            }
            .description()
        };
        let alive = |pid: u32| pid == 77;
        let verdict = |description: &str| leftover_verdict(description, &here, alive);
        assert_eq!(
            Creator::parse(&taken_by("backup-01", 77, "b0")),
            Some(Creator {
                host: "backup-01".into(),
                pid: 77,
                boot: "b0".into()
            })
        );
        assert_eq!(
            verdict(&taken_by("backup-01", 99, "b0")),
            Verdict::Leftover(99)
        );
        assert_eq!(verdict(&taken_by("backup-01", 77, "b0")), Verdict::Live(77));
        // Rebooted since: pid 77 now is someone else.
        assert_eq!(
            verdict(&taken_by("backup-01", 77, "old")),
            Verdict::Leftover(77)
        );
        // This process has taken nothing yet.
        assert_eq!(
            verdict(&taken_by("backup-01", 4242, "b0")),
            Verdict::Leftover(4242)
        );
        assert_eq!(
            verdict(&taken_by("backup-02", 99, "b0")),
            Verdict::OtherHost("backup-02".into())
        );
        // Unknown boot ids: only the pid tells.
        assert_eq!(
            verdict(&taken_by("backup-01", 77, "unknown")),
            Verdict::Live(77)
        );
        assert_eq!(
            verdict(&taken_by("backup-01", 99, "unknown")),
            Verdict::Leftover(99)
        );
        assert_eq!(
            verdict("Taken by vmexportfs (pid 12) for a consistent export of the disks; removed when the export ends."),
            Verdict::Legacy
        );
        for foreign in [
            "",
            "nightly backup",
            "copied: [vmexportfs host=backup-01 pid=99 boot=b0] and more",
            "[vmexportfs host=backup-01 pid=x boot=b0]",
            "[vmexportfs host=backup-01 pid=99]",
            "[vmexportfs host=backup-01 pid=99 boot=b0 extra=1]",
        ] {
            assert_eq!(verdict(foreign), Verdict::NotOurs, "{foreign:?}");
        }
    }
}
