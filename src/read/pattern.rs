//! One open file's access pattern: how much to fetch for a read, what to
//! fetch ahead of it, and what is behind it.
//!
//! Files are opened with direct I/O, so the kernel neither reads ahead nor
//! merges: reads arrive as the application made them, split into requests
//! of at most 1 MiB. A read is *in order* when it starts exactly where a
//! recent read ended (a split read's pieces may arrive a little out of
//! order, so the last few ends count). Reads near each other but not
//! contiguous — a grain-table walk, an MFT scan, a filesystem's metadata —
//! are not in order.
//!
//! Only after [`SEQUENTIAL_AFTER`] reads in order does read-ahead start,
//! and its window never exceeds what the run has read so far (doubling up
//! to a limit the read path sets from memory and rate): a run that stops
//! has fetched at most twice what it read. A read out of order ends the run
//! (its uncharged read-ahead is cancelled) and fetches only its own range,
//! rounded out to [`PAGE`]; reads that keep landing near the last one widen
//! that rounding, up to [`MAX_UNIT`], since such reads tend to come back
//! for their neighbours.

use std::ops::Range;

/// The alignment of every fetch, and what an isolated read fetches at
/// least: filesystems in disk images use 4 KiB blocks.
pub const PAGE: u64 = 4 << 10;
/// The widest rounding of reads that are near each other but not in order.
pub const MAX_UNIT: u64 = 256 << 10;
/// Reads in order before read-ahead starts.
pub const SEQUENTIAL_AFTER: u32 = 3;
/// How far from the last read a read counts as near.
const NEAR: u64 = 1 << 20;
/// Read-ahead stays this far behind the reader before it is dropped, for
/// pieces of a split read that arrive late.
pub const REORDER: u64 = 4 << 20;
/// Read ends remembered for reordered pieces.
const RECENT: usize = 4;

/// What to do for one read.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// A missing part of the read is fetched rounded out to this.
    pub unit: u64,
    /// Fetch this ahead of the reader (empty: nothing).
    pub ahead: Range<u64>,
    /// In requests of at most this.
    pub piece: u64,
    /// The reader is done with this: what lies wholly inside may go.
    pub behind: Range<u64>,
    /// A read out of order left read-ahead of the old run behind.
    pub seeked: bool,
}

#[derive(Debug, Default)]
pub struct Pattern {
    /// Where the current run of reads in order began.
    run_start: u64,
    /// The furthest end of the run's reads.
    next_offset: u64,
    recent_ends: [u64; RECENT],
    recent_at: usize,
    /// Reads in order in this run (0 before the first read).
    streak: u32,
    window: u64,
    /// Read-ahead has been issued up to here.
    issued_until: u64,
    /// The rounding of reads out of order.
    unit: u64,
    last_end: u64,
}

impl Pattern {
    /// Records a read of `[offset, offset + len)` of a file of
    /// `file_size` bytes and plans it. Read-ahead goes out in pieces of at
    /// most `max_piece`, within `max_window` ahead of the reader.
    pub fn on_read(
        &mut self,
        offset: u64,
        len: u64,
        max_window: u64,
        max_piece: u64,
        file_size: u64,
    ) -> Plan {
        let end = (offset + len).min(file_size);
        let first = self.streak == 0;
        let in_order = if first {
            offset == 0
        } else {
            offset == self.next_offset || self.recent_ends.contains(&offset)
        };
        let mut plan = Plan {
            unit: PAGE,
            ..Plan::default()
        };
        if in_order {
            self.streak = self.streak.saturating_add(1);
            self.next_offset = self.next_offset.max(end);
        } else if !first
            && self.streak >= SEQUENTIAL_AFTER
            && offset.abs_diff(self.next_offset) <= REORDER
        {
            // Near the front of an established run: a piece of a split
            // read arriving early or late, or a re-read. It neither counts
            // nor ends the run (the reads after it continue from its end).
            self.remember(end);
            return plan;
        } else {
            let near = !first && offset.abs_diff(self.last_end) <= NEAR;
            self.unit = if near {
                (self.unit * 2).clamp(PAGE, MAX_UNIT)
            } else {
                PAGE
            };
            plan.unit = self.unit;
            plan.seeked = self.window > 0;
            self.run_start = offset;
            self.next_offset = end;
            self.streak = 1;
            self.window = 0;
            self.issued_until = 0;
        }
        self.remember(end);
        self.last_end = end;
        if self.streak < SEQUENTIAL_AFTER {
            return plan;
        }
        let run = self.next_offset - self.run_start;
        self.window = (self.window * 2)
            .max(2 * len)
            .min(run)
            .min(max_window)
            .max(PAGE);
        let target = (self.next_offset + self.window).min(file_size);
        let from = self.issued_until.max(self.next_offset);
        plan.piece = (self.window / 2).clamp(PAGE, max_piece.max(PAGE));
        // Read-ahead goes out in whole pieces (few large requests) while
        // some is still ahead of the reader; a short one only when nothing
        // is ahead or at the end of the file.
        let nothing_ahead = from <= self.next_offset;
        if target > from && (nothing_ahead || target == file_size || target - from >= plan.piece) {
            self.issued_until = target;
            plan.ahead = from..target;
        }
        // From the run's start each time: what is dropped is gone, and an
        // extent still being fetched when the reader passed it goes later.
        let behind_end = offset.saturating_sub(REORDER);
        if behind_end > self.run_start {
            plan.behind = self.run_start..behind_end;
        }
        plan
    }

    /// Read-ahead was issued only up to `until` (memory was short): the
    /// rest is asked for again on a later read.
    pub fn issued_only(&mut self, until: u64) {
        self.issued_until = self.issued_until.min(until);
    }

    fn remember(&mut self, end: u64) {
        self.recent_ends[self.recent_at] = end;
        self.recent_at = (self.recent_at + 1) % RECENT;
    }

    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn read_ahead_starts_only_after_reads_in_order() {
        let mut pattern = Pattern::default();
        for i in 0..SEQUENTIAL_AFTER as u64 - 1 {
            let plan = pattern.on_read(i * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
            assert!(plan.ahead.is_empty(), "read {i}: {plan:?}");
        }
        let plan = pattern.on_read(2 * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        assert_eq!(plan.ahead, 3 * MIB..5 * MIB);
    }

    #[test]
    fn reads_near_each_other_but_not_in_order_get_no_read_ahead() {
        // A grain-table walk: 4 KiB reads with gaps between them.
        let mut pattern = Pattern::default();
        let mut units = Vec::new();
        for i in 0..100u64 {
            let plan = pattern.on_read(10 * MIB + i * 12288, 4096, 32 * MIB, 16 * MIB, GIB);
            assert!(plan.ahead.is_empty(), "read {i}: {plan:?}");
            units.push(plan.unit);
        }
        assert_eq!(units[0], PAGE);
        assert_eq!(
            *units.last().unwrap(),
            MAX_UNIT,
            "near reads widen the rounding"
        );
        // A far read is isolated again.
        let plan = pattern.on_read(900 * MIB, 4096, 32 * MIB, 16 * MIB, GIB);
        assert_eq!(plan.unit, PAGE);
    }

    #[test]
    fn split_pieces_that_arrive_out_of_order_stay_in_the_run() {
        let mut pattern = Pattern::default();
        for i in 0..4 {
            pattern.on_read(i * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        }
        let window = pattern.window();
        // 4 MiB read split in four; piece 5 before 4.
        pattern.on_read(5 * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        pattern.on_read(4 * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        let plan = pattern.on_read(6 * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        assert!(!plan.seeked);
        assert!(pattern.window() > window, "{} ≤ {window}", pattern.window());
    }

    #[test]
    fn a_seek_is_told_once_and_drops_the_window() {
        let mut pattern = Pattern::default();
        for i in 0..4 {
            pattern.on_read(i * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
        }
        assert!(
            pattern
                .on_read(500 * MIB, 4096, 32 * MIB, 16 * MIB, GIB)
                .seeked
        );
        assert_eq!(pattern.window(), 0);
        assert!(
            !pattern
                .on_read(100 * MIB, 4096, 32 * MIB, 16 * MIB, GIB)
                .seeked
        );
    }

    #[test]
    fn what_is_read_through_is_behind_with_reorder_slack() {
        let mut pattern = Pattern::default();
        let mut behind = Vec::new();
        for i in 0..20 {
            let plan = pattern.on_read(i * MIB, MIB, 32 * MIB, 16 * MIB, GIB);
            if !plan.behind.is_empty() {
                behind.push(plan.behind);
            }
        }
        assert!(behind.iter().all(|range| range.start == 0));
        assert_eq!(behind.last().unwrap().end, 19 * MIB - REORDER);
        for pair in behind.windows(2) {
            assert!(pair[0].end < pair[1].end);
        }
    }

    proptest! {
        /// Whatever a run in order reads, read-ahead never fetched more
        /// than as much again; and never past the end of the file.
        #[test]
        fn a_run_that_stops_fetched_at_most_twice_what_it_read(
            reads in 1usize..200,
            len in prop::sample::select(vec![4096u64, 65536, 131072, 1 << 20]),
            size in (1u64 << 20)..(64u64 << 20),
        ) {
            let mut pattern = Pattern::default();
            let mut ahead_end = 0;
            let mut read_end = 0;
            for i in 0..reads as u64 {
                let offset = i * len;
                if offset >= size {
                    break;
                }
                let plan = pattern.on_read(offset, len, 32 << 20, 16 << 20, size);
                prop_assert!(plan.ahead.end <= size);
                ahead_end = ahead_end.max(plan.ahead.end);
                read_end = (offset + len).min(size);
            }
            prop_assert!(ahead_end <= 2 * read_end, "{} > 2 × {}", ahead_end, read_end);
        }
    }
}
