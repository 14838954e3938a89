//! The buffers fetched bytes are received into.
//!
//! A large fetch (256 KiB and up) gets a mapping of its own, outside the
//! allocator's arenas, and when the last slice of its bytes is dropped the
//! mapping goes back to a small pool for the next fetch of the same size
//! (sequential read-ahead asks for the same size again and again), or to the
//! kernel when the pool is full. Measured before, with every buffer from
//! malloc: extents freed in reading order and hyper's read buffers churning
//! between them left the arenas 50 MiB larger than what was live (16
//! readers, `cache=64M`, gs://), and buffers freed back to the kernel cost a
//! page fault per 4 KiB when fetched into again (clear_page was 4% of the
//! machine during a 1.8 GB/s copy).

use std::ops::Deref;
use std::ptr::NonNull;
use std::sync::Mutex;

use bytes::buf::UninitSlice;
use bytes::{BufMut, Bytes, BytesMut};

/// Fetches this large are received into a mapping.
const MAPPED_FROM: usize = 256 << 10;
/// Mapping sizes are rounded up to this, so that nearby sizes share.
const GRAIN: usize = 64 << 10;
/// Idle mappings kept for reuse, in bytes (one is kept even when larger:
/// a single object-store reader's 16 MiB requests).
const POOL_BYTES: usize = 8 << 20;

static POOL: Mutex<Vec<Mapping>> = Mutex::new(Vec::new());

/// Room for exactly the bytes of one fetch.
pub enum FetchBuffer {
    Heap(BytesMut),
    Mapped(Mapping),
}

impl FetchBuffer {
    pub fn with_capacity(len: usize) -> Self {
        if len >= MAPPED_FROM {
            if let Some(mapping) = Mapping::take(len.div_ceil(GRAIN) * GRAIN) {
                return FetchBuffer::Mapped(mapping);
            }
        }
        FetchBuffer::Heap(BytesMut::with_capacity(len))
    }

    /// The bytes received, as one shared slice (no copy).
    pub fn freeze(self) -> Bytes {
        match self {
            FetchBuffer::Heap(bytes) => bytes.freeze(),
            FetchBuffer::Mapped(mapping) => Bytes::from_owner(Frozen(mapping)),
        }
    }
}

impl Deref for FetchBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            FetchBuffer::Heap(bytes) => bytes,
            FetchBuffer::Mapped(mapping) => mapping.filled(),
        }
    }
}

// SAFETY: chunk_mut hands out only the unfilled part of the mapping, and
// advance_mut is told how much of it was written.
unsafe impl BufMut for FetchBuffer {
    fn remaining_mut(&self) -> usize {
        match self {
            FetchBuffer::Heap(bytes) => bytes.remaining_mut(),
            FetchBuffer::Mapped(mapping) => mapping.cap - mapping.len,
        }
    }

    unsafe fn advance_mut(&mut self, cnt: usize) {
        match self {
            // SAFETY: the caller wrote `cnt` bytes of the chunk.
            FetchBuffer::Heap(bytes) => unsafe { bytes.advance_mut(cnt) },
            FetchBuffer::Mapped(mapping) => {
                assert!(cnt <= mapping.cap - mapping.len, "advanced past the buffer");
                mapping.len += cnt;
            }
        }
    }

    fn chunk_mut(&mut self) -> &mut UninitSlice {
        match self {
            FetchBuffer::Heap(bytes) => bytes.chunk_mut(),
            FetchBuffer::Mapped(mapping) => {
                // SAFETY: [len, cap) lies inside the mapping, which this
                // buffer alone holds.
                unsafe {
                    UninitSlice::from_raw_parts_mut(
                        mapping.ptr.as_ptr().add(mapping.len),
                        mapping.cap - mapping.len,
                    )
                }
            }
        }
    }
}

/// An anonymous private mapping of `cap` bytes, `len` of them filled.
pub struct Mapping {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value alone.
unsafe impl Send for Mapping {}
// SAFETY: shared access only reads the filled part.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// An idle mapping of exactly `cap` bytes from the pool, else a new one.
    fn take(cap: usize) -> Option<Mapping> {
        {
            let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if let Some(at) = pool.iter().position(|mapping| mapping.cap == cap) {
                let mut mapping = pool.swap_remove(at);
                mapping.len = 0;
                return Some(mapping);
            }
        }
        // SAFETY: a fresh anonymous mapping; no existing memory is touched.
        // MAP_POPULATE faults it in at once, cheaper than page by page.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                cap,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        Some(Mapping {
            ptr: NonNull::new(ptr.cast())?,
            cap,
            len: 0,
        })
    }

    fn filled(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written (advance_mut).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// Back to the pool if it has room, else to the kernel.
    fn release(self) {
        let mut pool = POOL.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let idle: usize = pool.iter().map(|mapping| mapping.cap).sum();
        if pool.is_empty() || idle + self.cap <= POOL_BYTES {
            pool.push(self);
        }
        // Otherwise dropped here: unmapped.
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.cap == 0 {
            return; // handed on (Frozen::drop)
        }
        // SAFETY: this value owns the mapping and nothing points into it
        // any more (its Bytes are all gone).
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.cap);
        }
    }
}

/// A mapping whose bytes are shared as [`Bytes`]; reused when they go.
struct Frozen(Mapping);

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        self.0.filled()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        let mapping = Mapping {
            ptr: self.0.ptr,
            cap: self.0.cap,
            len: 0,
        };
        // The old value must not unmap what the pool now holds.
        self.0.cap = 0;
        mapping.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, byte: u8) -> Bytes {
        let mut buffer = FetchBuffer::with_capacity(len);
        buffer.put_bytes(byte, len);
        buffer.freeze()
    }

    #[test]
    fn large_buffers_hold_exactly_what_was_written_and_are_reused() {
        // A size no other test asks for: the pool is the process's.
        let len = (1 << 20) + 3 * GRAIN;
        let first = filled(len, 7);
        assert_eq!(first.len(), len);
        assert!(first.iter().all(|&b| b == 7));
        let address = first.as_ptr();
        let slice = first.slice(100..200);
        drop(first);
        // A slice keeps the mapping alive and unchanged.
        assert!(slice.iter().all(|&b| b == 7));
        drop(slice);
        let second = filled(len, 9);
        assert!(second.iter().all(|&b| b == 9));
        assert_eq!(second.as_ptr(), address, "the idle mapping is reused");
    }

    #[test]
    fn small_buffers_come_from_the_heap() {
        let buffer = FetchBuffer::with_capacity(4096);
        assert!(matches!(buffer, FetchBuffer::Heap(_)));
        assert_eq!(filled(4096, 1).len(), 4096);
    }
}
