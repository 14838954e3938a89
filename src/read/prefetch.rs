//! Sequential detection and the read-ahead window of one open file.
//!
//! The kernel already reads ahead in 1 MiB requests and sends several at
//! once, slightly out of order, so a read counts as sequential when it lands
//! within the window (or a few blocks) of where the last one ended. While
//! reads stay sequential the window doubles, up to a limit the read path sets
//! from memory and rate; a random read drops it to nothing, so random access
//! never pays for bytes it will not use.
//!
//! It also notices when the reader has read a block from its first byte to
//! its last in order: such a block is done with (copies read each byte
//! once), so the read path can free it at once instead of letting it age
//! out of the cache. The cache then holds what is ahead of readers, not
//! what is behind them, and memory is reused instead of touched anew.

use std::ops::Range;

#[derive(Debug, Default)]
pub struct Sequential {
    next_offset: u64,
    window: u64,
    /// Blocks below this index were already asked for.
    issued_until: u64,
    /// The block being read in order from its start, and how far.
    consuming: Option<(u64, u64)>,
    /// A seek left read-ahead behind since [`Sequential::take_seek`].
    seeked: bool,
}

/// Blocks of slack for reordered kernel requests.
const REORDER_BLOCKS: u64 = 16;

impl Sequential {
    /// Records a read of `[offset, offset+len)` and returns the blocks to
    /// fetch ahead of it.
    pub fn on_read(
        &mut self,
        offset: u64,
        len: u64,
        block_size: u64,
        max_window: u64,
        file_blocks: u64,
        max_run_blocks: u64,
    ) -> Range<u64> {
        let slack = self.window.max(REORDER_BLOCKS * block_size);
        let sequential = offset.abs_diff(self.next_offset) <= slack;
        let end = offset + len;
        if sequential {
            self.window = if self.window == 0 {
                2 * block_size
            } else {
                self.window.saturating_mul(2)
            }
            .min(max_window);
            self.next_offset = self.next_offset.max(end);
        } else {
            self.seeked |= self.window > 0;
            self.window = 0;
            self.issued_until = 0;
            self.next_offset = end;
        }
        let last_block = end.saturating_sub(1) / block_size;
        let target = (last_block + 1 + self.window / block_size).min(file_blocks);
        let from = self.issued_until.max(last_block + 1);
        // Read-ahead goes out in whole runs (few large requests) while
        // earlier ones are still ahead of the reader; a short run only when
        // nothing is ahead or at the end of the file.
        let ahead_in_flight = from > last_block + 1;
        let run_blocks = max_run_blocks.min(self.window / block_size / 2).max(1);
        if ahead_in_flight && target < file_blocks && target.saturating_sub(from) < run_blocks {
            return from..from;
        }
        self.issued_until = self.issued_until.max(target);
        from..target.max(from)
    }

    /// Whether a seek left read-ahead behind since the last call: that
    /// read-ahead is stale.
    pub fn take_seek(&mut self) -> bool {
        std::mem::take(&mut self.seeked)
    }

    /// Records that `[offset, offset+len)` is being served and returns the
    /// blocks it completes: read from their first byte to their last in
    /// order, by this reader.
    pub fn on_served(
        &mut self,
        offset: u64,
        len: u64,
        block_size: u64,
        file_size: u64,
    ) -> Range<u64> {
        let end = (offset + len).min(file_size);
        let mut pos = offset;
        let mut done = 0..0;
        while pos < end {
            let block = pos / block_size;
            let block_end = ((block + 1) * block_size).min(file_size);
            let upto = end.min(block_end);
            self.consuming = match self.consuming {
                Some((b, until)) if b == block && until == pos => Some((block, upto)),
                _ if pos == block * block_size => Some((block, upto)),
                _ => None,
            };
            if self.consuming == Some((block, block_end)) {
                done = if done.is_empty() {
                    block..block + 1
                } else {
                    done.start..block + 1
                };
            }
            pos = upto;
        }
        done
    }

    #[cfg(test)]
    pub fn window(&self) -> u64 {
        self.window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = 1 << 20;

    #[test]
    fn read_ahead_goes_out_in_whole_runs_while_some_is_ahead() {
        let mut seq = Sequential::default();
        let mut issued = Vec::new();
        for i in 0..200 {
            let ahead = seq.on_read(i * B, B, B, 16 * B, 210, 4);
            if !ahead.is_empty() {
                issued.push(ahead);
            }
        }
        // Past the ramp-up (window below 8 blocks) and before the end of
        // the file, every batch is at least a run of 4 blocks; none
        // repeats a block.
        for batch in issued.iter().filter(|r| r.start > 16 && r.end < 210) {
            assert!(batch.end - batch.start >= 4, "{issued:?}");
        }
        for pair in issued.windows(2) {
            assert!(pair[0].end <= pair[1].start, "{issued:?}");
        }
        assert_eq!(issued.last().unwrap().end, 210);
    }

    #[test]
    fn window_grows_while_sequential_and_never_repeats_blocks() {
        let mut seq = Sequential::default();
        let mut asked = Vec::new();
        for i in 0..8 {
            asked.extend(seq.on_read(i * B, B, B, 16 * B, 1000, 1));
        }
        assert_eq!(seq.window(), 16 * B);
        let mut sorted = asked.clone();
        sorted.dedup();
        assert_eq!(asked, sorted, "no block is asked for twice");
        assert_eq!(*asked.first().unwrap(), 1);
        assert_eq!(*asked.last().unwrap(), 7 + 16);
    }

    #[test]
    fn a_seek_away_from_read_ahead_is_told_once() {
        let mut seq = Sequential::default();
        for i in 0..4 {
            seq.on_read(i * B, B, B, 16 * B, 1000, 1);
        }
        assert!(!seq.take_seek());
        seq.on_read(500 * B, 4096, B, 16 * B, 1000, 1);
        assert!(seq.take_seek());
        assert!(!seq.take_seek());
        // A second random read has no read-ahead to leave behind.
        seq.on_read(100 * B, 4096, B, 16 * B, 1000, 1);
        assert!(!seq.take_seek());
    }

    #[test]
    fn random_reads_fetch_nothing_ahead() {
        let mut seq = Sequential::default();
        seq.on_read(0, B, B, 16 * B, 1000, 1);
        assert!(seq.on_read(500 * B, 4096, B, 16 * B, 1000, 1).is_empty());
        assert!(seq.on_read(100 * B, 4096, B, 16 * B, 1000, 1).is_empty());
        assert_eq!(seq.window(), 0);
    }

    #[test]
    fn slightly_reordered_reads_stay_sequential() {
        let mut seq = Sequential::default();
        seq.on_read(0, B, B, 8 * B, 1000, 1);
        seq.on_read(2 * B, B, B, 8 * B, 1000, 1);
        seq.on_read(B, B, B, 8 * B, 1000, 1);
        assert!(seq.window() >= 4 * B);
    }

    #[test]
    fn blocks_read_whole_in_order_are_done() {
        let mut seq = Sequential::default();
        assert!(seq.on_served(0, B / 2, B, 10 * B).is_empty());
        assert_eq!(seq.on_served(B / 2, B / 2, B, 10 * B), 0..1);
        // One read across blocks completes the ones it covers to their end.
        assert_eq!(seq.on_served(B, 2 * B + 7, B, 10 * B), 1..3);
        assert!(seq.on_served(3 * B + 7, B - 7, B, 10 * B) == (3..4));
        // The short last block is done at the end of the file.
        assert_eq!(seq.on_served(9 * B, 2 * B, B, 9 * B + 100), 9..10);
    }

    #[test]
    fn out_of_order_or_partial_reads_complete_nothing() {
        let mut seq = Sequential::default();
        seq.on_served(B / 2, B / 2, B, 10 * B); // started mid-block
        assert!(seq.on_served(B / 2, B / 2, B, 10 * B).is_empty());
        seq.on_served(2 * B, B / 2, B, 10 * B);
        seq.on_served(5 * B, B / 2, B, 10 * B); // jumped away
        assert!(seq.on_served(2 * B + B / 2, B / 2, B, 10 * B).is_empty());
    }

    #[test]
    fn never_past_the_end_of_the_file() {
        let mut seq = Sequential::default();
        for i in 0..5 {
            let ahead = seq.on_read(i * B, B, B, 64 * B, 6, 1);
            assert!(ahead.end <= 6);
        }
    }
}
