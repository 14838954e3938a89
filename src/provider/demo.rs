//! `demo://`: a built-in synthetic inventory, no network.
//!
//! Disk bytes are computed from the disk's name and the offset, so any range
//! can be produced on demand and checked independently ([`expected_bytes`]).
//! Every fourth 64 MiB region is all zeros, as unused space in a real disk is.
//!
//! Parameters make it a stand-in for scale and fault tests, no emulator
//! needed: `demo://?vms=1000&disks=1000` is a million disks,
//! `latency=20ms` delays every provider call, `faults=0.01` fails one read
//! in a hundred with a transient error (the read path retries it).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{DiskEntry, Inventory, Pinned, Provider, ProviderError, Version};
use crate::size::parse_size;

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;
const ZERO_REGION: u64 = 64 * MIB;

/// (VM, disk, size) of the demo inventory.
pub const DEMO_DISKS: &[(&str, &str, u64)] = &[
    ("web-01", "web-01-disk0.vmdk", 96 * MIB),
    ("web-01", "web-01-disk1.vmdk", GIB),
    ("db-01", "db-01-disk0.vmdk", 4 * GIB + 512 * MIB),
    ("db-01", "db-01-data.vhdx", 8 * GIB),
    ("app-01", "app-01-disk0.qcow2", 2 * GIB + 3 * MIB + 4321),
];

/// Bounds that keep a typo from asking for a billion entries.
const MAX_VMS: u64 = 10_000_000;
const MAX_DISKS_PER_VM: u64 = 100_000;
const MAX_DISKS: u64 = 10_000_000;
const MAX_LATENCY: Duration = Duration::from_secs(60);

/// A generated inventory: `vms` directories of `disks` disks of `size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Generated {
    vms: u64,
    disks: u64,
    size: u64,
}

pub struct DemoProvider {
    generated: Option<Generated>,
    latency: Duration,
    /// Chance of a transient failure per read, in parts of u64::MAX.
    fault_threshold: u64,
    calls: AtomicU64,
}

impl DemoProvider {
    /// `rest` is what follows `demo://`: nothing, `/`, or `?NAME=VALUE&..`.
    pub fn new(rest: &str) -> Result<Self, ProviderError> {
        let query = match rest.split_once('?') {
            Some(("" | "/", query)) => query,
            None if rest.is_empty() || rest == "/" => "",
            _ => {
                return Err(ProviderError::Config(format!(
                    "demo:// takes no path, only parameters such as demo://?vms=100&disks=10 (got 'demo://{rest}')"
                )))
            }
        };
        let mut vms = None;
        let mut disks = None;
        let mut size = None;
        let mut latency = Duration::ZERO;
        let mut faults = 0.0;
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let bad = |expected: &str| {
                ProviderError::Config(format!(
                    "demo:// parameter {name}='{value}': expected {expected}"
                ))
            };
            match name {
                "vms" => vms = Some(count(value, MAX_VMS).ok_or_else(|| bad(&format!("a count from 1 to {MAX_VMS}")))?),
                "disks" => disks = Some(count(value, MAX_DISKS_PER_VM).ok_or_else(|| bad(&format!("a count from 1 to {MAX_DISKS_PER_VM}")))?),
                "size" => {
                    let bytes = parse_size(value).map_err(|err| bad(&err.to_string()))?;
                    if bytes == 0 || i64::try_from(bytes).is_err() {
                        return Err(bad("a size above zero, such as 10G"));
                    }
                    size = Some(bytes);
                }
                "latency" => latency = duration(value).ok_or_else(|| bad("a delay up to 60s, such as 20ms or 0.5s"))?,
                "faults" => {
                    faults = value
                        .parse::<f64>()
                        .ok()
                        .filter(|p| (0.0..=1.0).contains(p))
                        .ok_or_else(|| bad("a fraction of reads from 0 to 1, such as 0.01"))?;
                }
                _ => {
                    return Err(ProviderError::Config(format!(
                        "unknown demo:// parameter '{name}': expected vms, disks, size, latency or faults"
                    )))
                }
            }
        }
        let generated = match (vms, disks, size) {
            (None, None, None) => None,
            (vms, disks, size) => {
                let generated = Generated {
                    vms: vms.unwrap_or(1),
                    disks: disks.unwrap_or(1),
                    size: size.unwrap_or(GIB),
                };
                if generated.vms * generated.disks > MAX_DISKS {
                    return Err(ProviderError::Config(format!(
                        "demo:// of {} VMs with {} disks each is {} disks: at most {MAX_DISKS}",
                        generated.vms,
                        generated.disks,
                        generated.vms * generated.disks
                    )));
                }
                Some(generated)
            }
        };
        Ok(DemoProvider {
            generated,
            latency,
            fault_threshold: (faults * u64::MAX as f64) as u64,
            calls: AtomicU64::new(0),
        })
    }

    async fn answer_delay(&self) {
        if !self.latency.is_zero() {
            tokio::time::sleep(self.latency).await;
        }
    }

    /// Whether this call fails, deterministically from the call count, so a
    /// run with the same reads sees the same faults.
    fn injected_fault(&self) -> bool {
        if self.fault_threshold == 0 {
            return false;
        }
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        word_at(0x6661_756c_7473, call) < self.fault_threshold
    }
}

fn count(text: &str, max: u64) -> Option<u64> {
    text.parse::<u64>().ok().filter(|n| (1..=max).contains(n))
}

/// `20ms`, `0.5s` or `2` (seconds).
fn duration(text: &str) -> Option<Duration> {
    let (number, scale) = match text.strip_suffix("ms") {
        Some(ms) => (ms, 1e-3),
        None => (text.strip_suffix('s').unwrap_or(text), 1.0),
    };
    let seconds = number.parse::<f64>().ok()? * scale;
    (seconds.is_finite() && seconds >= 0.0)
        .then(|| Duration::from_secs_f64(seconds))
        .filter(|delay| *delay <= MAX_LATENCY)
}

fn demo_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn disk_entry(vm: String, name: String, size: u64) -> DiskEntry {
    DiskEntry {
        locator: name.clone(),
        path: vec![vm, name],
        size,
        mtime: demo_mtime(),
        version: Version::Immutable,
        allocated: Some(data_ranges_of(size).iter().map(|r| r.end - r.start).sum()),
    }
}

/// `vm-0042`: zero-padded to the widest number, so names sort in order.
fn numbered(prefix: &str, index: u64, of: u64) -> String {
    let width = of.saturating_sub(1).max(1).ilog10() as usize + 1;
    format!("{prefix}{index:0width$}")
}

#[async_trait]
impl Provider for DemoProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        self.answer_delay().await;
        let disks = match self.generated {
            None => DEMO_DISKS
                .iter()
                .map(|&(vm, disk, size)| disk_entry(vm.to_string(), disk.to_string(), size))
                .collect(),
            Some(Generated { vms, disks, size }) => {
                let mut entries = Vec::with_capacity((vms * disks) as usize);
                for vm in 0..vms {
                    let vm_name = numbered("vm-", vm, vms);
                    for disk in 0..disks {
                        let disk_name =
                            format!("{}.vmdk", numbered(&format!("{vm_name}-disk"), disk, disks));
                        entries.push(disk_entry(vm_name.clone(), disk_name, size));
                    }
                }
                entries
            }
        };
        Ok(Inventory {
            disks,
            empty_dirs: Vec::new(),
        })
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
        self.answer_delay().await;
        Ok(Pinned::new(disk.size, disk.version.clone()))
    }

    async fn data_ranges(
        &self,
        _disk: &DiskEntry,
        pinned: &Pinned,
    ) -> Result<Option<Vec<Range<u64>>>, ProviderError> {
        Ok(Some(data_ranges_of(pinned.size)))
    }

    async fn read(
        &self,
        disk: &DiskEntry,
        _pinned: &Pinned,
        offset: u64,
        len: usize,
    ) -> Result<Bytes, ProviderError> {
        self.answer_delay().await;
        if self.injected_fault() {
            return Err(ProviderError::Unreachable(format!(
                "demo: injected fault reading {} at {offset} (faults=)",
                disk.locator
            )));
        }
        let mut buf = BytesMut::zeroed(len);
        fill(&disk.locator, offset, &mut buf);
        Ok(buf.freeze())
    }
}

fn is_zero_region(index: u64) -> bool {
    index % 4 == 3
}

/// Everything but the zero regions.
fn data_ranges_of(size: u64) -> Vec<Range<u64>> {
    (0..size.div_ceil(ZERO_REGION))
        .filter(|&index| !is_zero_region(index))
        .map(|index| index * ZERO_REGION..((index + 1) * ZERO_REGION).min(size))
        .collect()
}

/// The demo bytes of disk `name` at `offset`, for checking copies.
pub fn expected_bytes(name: &str, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    fill(name, offset, &mut buf);
    buf
}

fn seed_of(name: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn word_at(seed: u64, index: u64) -> u64 {
    // splitmix64 of (seed, word index): any word is computable on its own.
    let mut z = seed.wrapping_add(index.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(name: &str, offset: u64, buf: &mut [u8]) {
    let seed = seed_of(name);
    let mut pos = 0usize;
    while pos < buf.len() {
        let at = offset + pos as u64;
        let region_end = (at / ZERO_REGION + 1) * ZERO_REGION;
        let chunk = ((region_end - at) as usize).min(buf.len() - pos);
        let out = &mut buf[pos..pos + chunk];
        if is_zero_region(at / ZERO_REGION) {
            out.fill(0);
        } else {
            fill_words(seed, at, out);
        }
        pos += chunk;
    }
}

fn fill_words(seed: u64, offset: u64, out: &mut [u8]) {
    let mut index = offset / 8;
    let mut skip = (offset % 8) as usize;
    let mut pos = 0;
    while pos < out.len() {
        let word = word_at(seed, index).to_le_bytes();
        let take = (8 - skip).min(out.len() - pos);
        out[pos..pos + take].copy_from_slice(&word[skip..skip + take]);
        pos += take;
        skip = 0;
        index += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_make_a_generated_inventory_and_bad_ones_are_refused() {
        let plain = DemoProvider::new("").unwrap();
        assert_eq!(plain.generated, None);
        assert!(DemoProvider::new("/").unwrap().generated.is_none());
        let big =
            DemoProvider::new("?vms=1000&disks=1000&size=1M&latency=20ms&faults=0.5").unwrap();
        assert_eq!(
            big.generated,
            Some(Generated {
                vms: 1000,
                disks: 1000,
                size: MIB
            })
        );
        assert_eq!(big.latency, Duration::from_millis(20));
        let faults = (0..1000).filter(|_| big.injected_fault()).count();
        assert!(
            (400..600).contains(&faults),
            "{faults} of 1000 at faults=0.5"
        );
        assert!(!plain.injected_fault());
        for bad in [
            "bucket",
            "?vms=0",
            "?vms=x",
            "?disks=100001",
            "?vms=10000&disks=10000",
            "?size=0",
            "?size=1Mb",
            "?latency=-1s",
            "?latency=61s",
            "?faults=1.5",
            "?faults=nan",
            "?colour=red",
        ] {
            let err = DemoProvider::new(bad)
                .err()
                .unwrap_or_else(|| panic!("{bad} accepted"));
            assert!(matches!(err, ProviderError::Config(_)), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn a_generated_inventory_has_every_disk_once_named_in_order() {
        let demo = DemoProvider::new("?vms=12&disks=3&size=100M").unwrap();
        let inventory = demo.list().await.unwrap();
        assert_eq!(inventory.disks.len(), 36);
        let paths: Vec<String> = inventory.disks.iter().map(|d| d.path.join("/")).collect();
        assert_eq!(paths[0], "vm-00/vm-00-disk0.vmdk");
        assert_eq!(paths[35], "vm-11/vm-11-disk2.vmdk");
        let mut sorted = paths.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted, paths, "unique and already in order");
        assert!(inventory.disks.iter().all(|d| d.size == 100 * MIB));
    }

    #[test]
    fn any_range_equals_the_same_bytes_of_a_larger_read() {
        let whole = expected_bytes("x", 0, 4096);
        for (offset, len) in [(0, 1), (3, 17), (8, 8), (1001, 2000), (4095, 1)] {
            assert_eq!(
                expected_bytes("x", offset as u64, len),
                &whole[offset..offset + len]
            );
        }
        assert_ne!(expected_bytes("y", 0, 64), whole[..64]);
    }

    #[test]
    fn data_ranges_skip_exactly_the_zero_regions() {
        let ranges = data_ranges_of(4 * ZERO_REGION + 10);
        assert_eq!(
            ranges,
            [
                0..ZERO_REGION,
                ZERO_REGION..2 * ZERO_REGION,
                2 * ZERO_REGION..3 * ZERO_REGION,
                4 * ZERO_REGION..4 * ZERO_REGION + 10
            ]
        );
    }

    #[test]
    fn every_fourth_region_is_zero() {
        let zero = expected_bytes("x", 3 * ZERO_REGION + 12345, 4096);
        assert!(zero.iter().all(|&b| b == 0));
        let data = expected_bytes("x", 2 * ZERO_REGION, 4096);
        assert!(data.iter().any(|&b| b != 0));
        let across = expected_bytes("x", 4 * ZERO_REGION - 4, 8);
        assert_eq!(&across[..4], &[0; 4]);
        assert_ne!(&across[4..], &[0; 4]);
    }
}
