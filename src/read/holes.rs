//! Where a pinned disk holds data: hole arithmetic, pure and property-tested.
//!
//! A provider that knows a disk is sparse gives its data ranges at open
//! (sorted, disjoint, possibly touching: page lists are not merged). Every
//! byte outside them reads as zeros and is served without a fetch or a
//! token; `SEEK_DATA`/`SEEK_HOLE` answer from them.

use std::ops::Range;

/// The data ranges of one open file; `None`: all of it is data.
#[derive(Debug, Clone, Default)]
pub struct DataMap {
    ranges: Option<Vec<Range<u64>>>,
    size: u64,
}

impl DataMap {
    /// The map of a file of `size` bytes. Ranges from a provider are
    /// trusted for nothing: they are clipped to the size, sorted, and
    /// empty ones dropped.
    pub fn new(ranges: Option<Vec<Range<u64>>>, size: u64) -> Self {
        let ranges = ranges.map(|mut ranges| {
            for range in &mut ranges {
                range.end = range.end.min(size);
            }
            ranges.retain(|range| range.start < range.end);
            ranges.sort_by_key(|range| range.start);
            // Overlaps (a provider bug) would break the binary searches.
            let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
            for range in ranges {
                match merged.last_mut() {
                    Some(last) if range.start < last.end => last.end = last.end.max(range.end),
                    _ => merged.push(range),
                }
            }
            merged
        });
        DataMap { ranges, size }
    }

    /// Whether `[start, end)` holds no data at all.
    pub fn is_hole(&self, start: u64, end: u64) -> bool {
        let Some(ranges) = &self.ranges else {
            return false;
        };
        let first = ranges.partition_point(|range| range.end <= start);
        ranges.get(first).is_none_or(|range| range.start >= end)
    }

    /// The part of `[start, end)` from its first data byte to its last;
    /// the whole of it when the provider gave no data ranges, empty (at
    /// `start`) when it is all hole.
    pub fn data_span(&self, start: u64, end: u64) -> Range<u64> {
        let Some(ranges) = &self.ranges else {
            return start..end;
        };
        let first = ranges.partition_point(|range| range.end <= start);
        let last = ranges.partition_point(|range| range.start < end);
        match (
            ranges.get(first),
            last.checked_sub(1).and_then(|i| ranges.get(i)),
        ) {
            (Some(a), Some(b)) if first < last => a.start.max(start)..b.end.min(end),
            _ => start..start,
        }
    }

    /// The first stretch of `[from, end)` worth one request: from its
    /// first data byte on, across holes shorter than `merge` (two requests
    /// would cost more than fetching the zeros), to the data's end.
    pub fn next_run(&self, from: u64, end: u64, merge: u64) -> Option<Range<u64>> {
        let start = self.next_data(from).filter(|&at| at < end)?;
        let mut until = self.next_hole(start).unwrap_or(end).min(end);
        while until < end {
            match self.next_data(until) {
                Some(data) if data < end && data - until <= merge => {
                    until = self.next_hole(data).unwrap_or(end).min(end);
                }
                _ => break,
            }
        }
        Some(start..until)
    }

    /// SEEK_DATA: the first offset ≥ `offset` that holds data.
    pub fn next_data(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let Some(ranges) = &self.ranges else {
            return Some(offset);
        };
        let first = ranges.partition_point(|range| range.end <= offset);
        ranges.get(first).map(|range| range.start.max(offset))
    }

    /// SEEK_HOLE: the first offset ≥ `offset` in a hole; the end of the
    /// file counts as one.
    pub fn next_hole(&self, offset: u64) -> Option<u64> {
        if offset >= self.size {
            return None;
        }
        let Some(ranges) = &self.ranges else {
            return Some(self.size);
        };
        let mut at = offset;
        // Ranges may touch: walk across them.
        for range in &ranges[ranges.partition_point(|range| range.end <= offset)..] {
            if range.start > at {
                break;
            }
            at = range.end;
        }
        Some(at.min(self.size))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The slow truth: a byte map.
    fn is_data(ranges: &[Range<u64>], at: u64) -> bool {
        ranges.iter().any(|range| range.contains(&at))
    }

    fn ranges_and_size() -> impl Strategy<Value = (Vec<Range<u64>>, u64)> {
        (1u64..300).prop_flat_map(|size| {
            (
                prop::collection::vec((0..size + 20, 0u64..40), 0..8).prop_map(|pairs| {
                    pairs
                        .into_iter()
                        .map(|(start, len)| start..start + len)
                        .collect()
                }),
                Just(size),
            )
        })
    }

    proptest! {
        #[test]
        fn answers_match_a_byte_map((ranges, size) in ranges_and_size(), a in 0u64..320, b in 0u64..320) {
            let map = DataMap::new(Some(ranges.clone()), size);
            let (start, end) = (a.min(b), a.max(b).min(size));
            let truth: Vec<u64> = (start..end).filter(|&at| is_data(&ranges, at)).collect();
            if start < end {
                prop_assert_eq!(map.is_hole(start, end), truth.is_empty());
            }
            let span = map.data_span(start, end);
            if let (Some(first), Some(last)) = (truth.first(), truth.last()) {
                prop_assert_eq!(span, *first..*last + 1);
            } else {
                prop_assert!(span.is_empty());
            }
            let next_data = (a..size).find(|&at| is_data(&ranges, at));
            prop_assert_eq!(map.next_data(a), if a < size { next_data } else { None });
            let next_hole = (a..size).find(|&at| !is_data(&ranges, at)).unwrap_or(size);
            prop_assert_eq!(map.next_hole(a), (a < size).then_some(next_hole));
            // Runs cover every data byte of [start, end) once, in order,
            // and bridge only holes of at most `merge` bytes.
            let merge = 5;
            let mut covered = Vec::new();
            let mut at = start;
            while let Some(run) = map.next_run(at, end, merge) {
                prop_assert!(run.start >= at && run.end <= end && run.start < run.end);
                prop_assert!(is_data(&ranges, run.start) && is_data(&ranges, run.end - 1));
                let mut hole = 0;
                for byte in run.clone() {
                    hole = if is_data(&ranges, byte) { 0 } else { hole + 1 };
                    prop_assert!(hole <= merge);
                }
                covered.extend(run.clone().filter(|&byte| is_data(&ranges, byte)));
                at = run.end;
            }
            prop_assert_eq!(covered, truth);
        }
    }

    #[test]
    fn without_ranges_everything_is_data() {
        let map = DataMap::new(None, 100);
        assert!(!map.is_hole(0, 100));
        assert_eq!(map.data_span(10, 20), 10..20);
        assert_eq!(map.next_data(5), Some(5));
        assert_eq!(map.next_hole(5), Some(100));
        assert_eq!(map.next_data(100), None);
    }
}
