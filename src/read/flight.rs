//! Single flight: concurrent misses on one block share one fetch.
//!
//! A fetch registers each of its blocks here when it starts (under the
//! map's lock, so a second miss finds it) and a [`Landing`] guard removes
//! them when its task ends — with bytes, an error, a cancellation or a
//! panic. No waiter can ever find an entry whose fetch is gone, so nothing
//! spins on a dead fetch.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use futures::future::{BoxFuture, Shared};

use super::cache::BlockKey;
use crate::provider::ProviderError;

#[derive(Debug, Clone)]
pub enum FetchError {
    /// The file that started the fetch was closed (or the mount is going).
    Cancelled,
    Failed(Arc<ProviderError>),
}

pub type SharedFetch = Shared<BoxFuture<'static, Result<Bytes, FetchError>>>;

/// One block's share of a fetch in flight.
#[derive(Clone)]
pub struct Flight {
    pub fetch: SharedFetch,
    /// Set when a read waits for the fetch: read-ahead then charges as
    /// demand and is no longer cancelled by a seek.
    pub demanded: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Flights {
    map: Mutex<HashMap<BlockKey, Flight>>,
}

impl Flights {
    pub fn lock(&self) -> MutexGuard<'_, HashMap<BlockKey, Flight>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Removes a fetch's blocks `[first, first + count)` of `file` from the
/// map when dropped: the fetch's task holds it, so it runs however the task
/// ends.
pub struct Landing<'a> {
    pub flights: &'a Flights,
    pub file: u64,
    pub first: u64,
    pub count: u64,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        let mut map = self.flights.lock();
        for index in self.first..self.first + self.count {
            map.remove(&BlockKey {
                file: self.file,
                index,
            });
        }
    }
}
