//! `demo://`: a built-in synthetic inventory, no network.
//!
//! Disk bytes are computed from the disk's name and the offset, so any range
//! can be produced on demand and checked independently ([`expected_bytes`]).
//! Every fourth 64 MiB region is all zeros, as unused space in a real disk is.

use std::ops::Range;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};

use super::{DiskEntry, Inventory, Pinned, Provider, ProviderError, Version};

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

pub struct DemoProvider;

impl DemoProvider {
    pub fn new(rest: &str) -> Result<Self, ProviderError> {
        if !rest.is_empty() && rest != "/" {
            return Err(ProviderError::Config(format!(
                "demo:// takes no path (got 'demo://{rest}')"
            )));
        }
        Ok(DemoProvider)
    }
}

fn demo_mtime() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

#[async_trait]
impl Provider for DemoProvider {
    async fn list(&self) -> Result<Inventory, ProviderError> {
        let disks = DEMO_DISKS
            .iter()
            .map(|&(vm, disk, size)| DiskEntry {
                path: vec![vm.to_string(), disk.to_string()],
                size,
                mtime: demo_mtime(),
                version: Version::Immutable,
                locator: disk.to_string(),
                allocated: Some(data_ranges_of(size).iter().map(|r| r.end - r.start).sum()),
            })
            .collect();
        Ok(Inventory {
            disks,
            empty_dirs: Vec::new(),
        })
    }

    async fn pin(&self, disk: &DiskEntry) -> Result<Pinned, ProviderError> {
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
