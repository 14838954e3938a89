//! Weekly timetables of mount rates: `Mon-Fri 09:00 20M; 17:00 100M; Sat 00:00 off`.
//!
//! Every entry sets a rate from some days and a time of day on. The timetable
//! repeats each week, so the last change of the week stays in force until the
//! first one of the next: `Sat 00:00 off` holds through Sunday until Monday's
//! first entry. Times are local wall-clock times, as operators think of them:
//! "09:00" stays 09:00 across daylight saving changes.

use std::collections::btree_map::{BTreeMap, Entry as Slot};
use std::fmt;
use std::ops::RangeInclusive;
use std::time::Duration;

use chrono::{DateTime, Datelike, Local, NaiveDateTime, TimeDelta, TimeZone, Timelike};

use crate::size::parse_size;

const DAY: u32 = 24 * 60 * 60;
const WEEK: u32 = 7 * DAY;
const EVERY_DAY: u8 = 0x7f;
const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const FULL_DAY_NAMES: [&str; 7] = [
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
];

/// A schedule refused, with where and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ScheduleError {
    /// 1-based line of the error; 1 for one-line text.
    pub line: usize,
    /// 1-based character column within that line, at the start of the bad
    /// token, or just past the entry when a token is missing.
    pub column: usize,
    /// 1-based number of the entry; 0 when the schedule has no entries.
    pub entry: usize,
    /// The entry as written, trimmed.
    pub entry_text: String,
    pub reason: String,
    /// Whether the text has more than one line: only then does the message
    /// name the line.
    pub multiline: bool,
}

impl fmt::Display for ScheduleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // An empty schedule has no entry to point at.
        if self.entry == 0 {
            return f.write_str(&self.reason);
        }
        f.write_str("at ")?;
        if self.multiline {
            write!(f, "line {}, ", self.line)?;
        }
        write!(
            f,
            "column {} (entry {}, '{}'): {}",
            self.column, self.entry, self.entry_text, self.reason
        )
    }
}

/// One entry of the timetable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The days it applies to: bit 0 = Monday .. bit 6 = Sunday.
    pub days: u8,
    /// Seconds since midnight.
    pub at: u32,
    /// Bytes per second; `None` = unlimited.
    pub limit: Option<u64>,
    /// The entry as written, trimmed.
    pub text: String,
}

impl Entry {
    /// The entry as written, for logs and messages.
    pub fn describe(&self) -> String {
        self.text.clone()
    }

    /// The rate token as written. Parsing took exactly [DAYS] TIME RATE, so
    /// it is the last token.
    fn rate_text(&self) -> &str {
        self.text.split_whitespace().last().unwrap_or_default()
    }
}

/// A weekly timetable of rates.
#[derive(Debug, Clone)]
pub struct Schedule {
    entries: Vec<Entry>,
    /// Every change point of the week, sorted; never empty.
    points: Vec<Point>,
}

#[derive(Debug, Clone, Copy)]
struct Point {
    /// Seconds since Monday 00:00.
    at: u32,
    /// Index into `entries`.
    entry: usize,
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        // The points follow from the entries.
        self.entries == other.entries
    }
}

impl Eq for Schedule {}

impl Schedule {
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let multiline = text.lines().nth(1).is_some();
        let mut entries: Vec<Entry> = Vec::new();
        // Second of the week → index of the entry that set it.
        let mut taken: BTreeMap<u32, usize> = BTreeMap::new();
        // What an entry without DAYS gets: the previous entry's days.
        let mut days = EVERY_DAY;
        for (index, line) in text.lines().enumerate() {
            // A comment runs to the end of its line, `;` and all.
            let content = line.split_once('#').map_or(line, |(before, _)| before);
            let mut piece_start = 0;
            for piece in content.split(';') {
                let start = piece_start + (piece.len() - piece.trim_start().len());
                piece_start += piece.len() + 1;
                let entry_text = piece.trim();
                if entry_text.is_empty() {
                    continue;
                }
                let site = Site {
                    line,
                    line_number: index + 1,
                    start,
                    entry: entries.len() + 1,
                    text: entry_text,
                    multiline,
                };
                let parsed = parse_entry(entry_text, days).map_err(|p| site.error(p))?;
                days = parsed.days;
                for day in (0..7u32).filter(|day| parsed.days & (1 << day) != 0) {
                    match taken.entry(day * DAY + parsed.at) {
                        Slot::Vacant(slot) => {
                            slot.insert(entries.len());
                        }
                        Slot::Occupied(slot) => {
                            return Err(site.error(Problem {
                                offset: parsed.time_offset,
                                reason: format!(
                                    "{} {} is already set by entry {}",
                                    DAY_NAMES[day as usize],
                                    format_time(parsed.at),
                                    slot.get() + 1
                                ),
                            }));
                        }
                    }
                }
                entries.push(Entry {
                    days: parsed.days,
                    at: parsed.at,
                    limit: parsed.limit,
                    text: entry_text.to_string(),
                });
            }
        }
        if entries.is_empty() {
            return Err(ScheduleError {
                line: 1,
                column: 1,
                entry: 0,
                entry_text: String::new(),
                reason: "the schedule has no entries: expected entries like \
                         'Mon-Fri 09:00 20M; 17:00 100M'"
                    .to_string(),
                multiline,
            });
        }
        let points = taken
            .into_iter()
            .map(|(at, entry)| Point { at, entry })
            .collect();
        Ok(Schedule { entries, points })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The entry in force at a local wall-clock time.
    pub fn active_at(&self, now: NaiveDateTime) -> &Entry {
        &self.entries[self.points[self.point_at(week_second(now))].entry]
    }

    /// The next moment strictly after `now` at which the limit in force
    /// changes to a different value, and the entry that takes over; None
    /// when every entry has the same limit.
    pub fn next_change_after(&self, now: NaiveDateTime) -> Option<(NaiveDateTime, &Entry)> {
        let second = week_second(now);
        let current = self.point_at(second);
        let limit = self.entries[self.points[current].entry].limit;
        let count = self.points.len();
        // Walk the week from the point in force, wrapping, to the first point
        // that changes the limit: the same rate set again is no change.
        let next = (1..count)
            .map(|step| self.points[(current + step) % count])
            .find(|point| self.entries[point.entry].limit != limit)?;
        // Never 0: the point at `second` itself is the one in force.
        let ahead = (next.at + WEEK - second) % WEEK;
        let at = now
            .with_nanosecond(0)?
            .checked_add_signed(TimeDelta::seconds(ahead.into()))?;
        Some((at, &self.entries[next.entry]))
    }

    /// Index of the latest point at or before `second` of the week.
    fn point_at(&self, second: u32) -> usize {
        // Before the week's first point, the last one of last week holds.
        self.points
            .partition_point(|point| point.at <= second)
            .checked_sub(1)
            .unwrap_or(self.points.len() - 1)
    }
}

/// The normalized form, one entry per `;` with its days spelled out. Day
/// lists use `+`, never `,`, so the text also fits in a mount option.
impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, entry) in self.entries.iter().enumerate() {
            if index > 0 {
                f.write_str("; ")?;
            }
            write!(
                f,
                "{} {} {}",
                format_days(entry.days),
                format_time(entry.at),
                entry.rate_text()
            )?;
        }
        Ok(())
    }
}

/// Local wall-clock now.
pub fn local_now() -> NaiveDateTime {
    Local::now().naive_local()
}

/// How long from now until the local wall-clock time `at`; zero if it is
/// already past. A time in a spring-forward gap counts as the first instant
/// after the gap, an ambiguous one as the earlier of the two.
pub fn until_local(at: NaiveDateTime) -> Duration {
    // Cannot fail in a real time zone; zero then just means "re-check now".
    let Some(target) = resolve_local(&Local, at) else {
        return Duration::ZERO;
    };
    (target - Local::now()).to_std().unwrap_or(Duration::ZERO)
}

/// The instant of a wall-clock time in `zone`, see [`until_local`].
fn resolve_local<Tz: TimeZone>(zone: &Tz, at: NaiveDateTime) -> Option<DateTime<Tz>> {
    let earliest = |wall: &NaiveDateTime| zone.from_local_datetime(wall).earliest();
    if let Some(instant) = earliest(&at) {
        return Some(instant);
    }
    // In a gap. Gaps are whole seconds and at most hours long: step forward
    // by hours to a valid wall time, then narrow down to the gap's end.
    let mut missing = at.with_nanosecond(0)?;
    let mut valid = missing;
    for _ in 0..48 {
        valid = valid.checked_add_signed(TimeDelta::hours(1))?;
        if earliest(&valid).is_some() {
            break;
        }
        missing = valid;
    }
    // Halve in whole seconds, so the result stays on a second.
    while (valid - missing).num_seconds() > 1 {
        let middle = missing + TimeDelta::seconds((valid - missing).num_seconds() / 2);
        if earliest(&middle).is_some() {
            valid = middle;
        } else {
            missing = middle;
        }
    }
    earliest(&valid)
}

fn week_second(time: NaiveDateTime) -> u32 {
    time.weekday().num_days_from_monday() * DAY + time.num_seconds_from_midnight()
}

/// Where an entry sits in the text, to turn a problem into an error.
struct Site<'a> {
    line: &'a str,
    line_number: usize,
    /// Byte offset of the entry in `line`.
    start: usize,
    entry: usize,
    text: &'a str,
    multiline: bool,
}

impl Site<'_> {
    fn error(&self, problem: Problem) -> ScheduleError {
        let byte = self.start + problem.offset;
        ScheduleError {
            line: self.line_number,
            column: self.line[..byte].chars().count() + 1,
            entry: self.entry,
            entry_text: self.text.to_string(),
            reason: problem.reason,
            multiline: self.multiline,
        }
    }
}

/// What is wrong, at a byte offset within the entry.
struct Problem {
    offset: usize,
    reason: String,
}

struct ParsedEntry {
    days: u8,
    at: u32,
    limit: Option<u64>,
    /// Byte offset of the TIME token: duplicates are reported there, since
    /// the days may be inherited and not written at all.
    time_offset: usize,
}

/// Parses `[DAYS] TIME RATE`; `inherited` are the days when DAYS is left out.
fn parse_entry(text: &str, inherited: u8) -> Result<ParsedEntry, Problem> {
    let mut tokens = tokens(text).into_iter().peekable();
    // A time starts with a digit and a day never does, so the first token
    // tells whether DAYS was written.
    let days = match tokens.next_if(|(_, token)| !token.starts_with(|c: char| c.is_ascii_digit())) {
        Some((offset, token)) => parse_days(token).map_err(|(at, reason)| Problem {
            offset: offset + at,
            reason,
        })?,
        None => inherited,
    };
    let (time_offset, time) = tokens.next().ok_or_else(|| Problem {
        offset: text.len(),
        reason: format!("missing time after '{text}': expected HH:MM or HH:MM:SS"),
    })?;
    let at = parse_time(time).map_err(|reason| Problem {
        offset: time_offset,
        reason,
    })?;
    let (rate_offset, rate) = tokens.next().ok_or_else(|| Problem {
        offset: text.len(),
        reason: format!("missing rate after '{time}': expected a size like 20M, or off"),
    })?;
    let limit = parse_rate(rate).map_err(|reason| Problem {
        offset: rate_offset,
        reason,
    })?;
    if let Some((offset, extra)) = tokens.next() {
        return Err(Problem {
            offset,
            reason: format!("unexpected '{extra}' after the rate: an entry is [DAYS] TIME RATE"),
        });
    }
    Ok(ParsedEntry {
        days,
        at,
        limit,
        time_offset,
    })
}

/// Whitespace-separated tokens with their byte offsets.
fn tokens(text: &str) -> Vec<(usize, &str)> {
    let mut found = Vec::new();
    let mut start = None;
    // A trailing space closes the last token.
    for (index, c) in text.char_indices().chain([(text.len(), ' ')]) {
        match (start, c.is_whitespace()) {
            (None, false) => start = Some(index),
            (Some(from), true) => {
                found.push((from, &text[from..index]));
                start = None;
            }
            _ => {}
        }
    }
    found
}

/// Parses DAYS into a day mask; errors carry a byte offset within `token`.
fn parse_days(token: &str) -> Result<u8, (usize, String)> {
    let mut days = 0;
    let mut start = 0;
    for item in token.split(['+', ',']) {
        let offset = start;
        start += item.len() + 1;
        if item.is_empty() {
            let reason =
                format!("'{token}' has an empty item: join days with + or , like Mon+Wed+Fri");
            return Err((offset, reason));
        }
        days |= parse_day_item(item).map_err(|(at, reason)| (offset + at, reason))?;
    }
    Ok(days)
}

/// One day, range or `daily` of a day list.
fn parse_day_item(item: &str) -> Result<u8, (usize, String)> {
    if item.eq_ignore_ascii_case("daily") || item == "*" {
        return Ok(EVERY_DAY);
    }
    let Some((first, last)) = item.split_once('-') else {
        return day_index(item)
            .map(|day| 1 << day)
            .ok_or_else(|| (0, unknown_day(item)));
    };
    if first.is_empty() || last.is_empty() || last.contains('-') {
        return Err((
            0,
            format!("'{item}' is not a day range: expected two days like Mon-Fri"),
        ));
    }
    let from = day_index(first).ok_or_else(|| (0, unknown_day(first)))?;
    let to = day_index(last).ok_or_else(|| (first.len() + 1, unknown_day(last)))?;
    if from == to {
        // One day or the whole week? Refuse rather than guess.
        return Err((
            0,
            format!(
                "'{item}' is not a day range: it starts and ends on the same day; \
                 write {first} or daily"
            ),
        ));
    }
    // A range may wrap past Sunday: Fri-Mon is Fri, Sat, Sun, Mon.
    let mut days = 0;
    let mut day = from;
    loop {
        days |= 1 << day;
        if day == to {
            return Ok(days);
        }
        day = (day + 1) % 7;
    }
}

fn day_index(name: &str) -> Option<usize> {
    DAY_NAMES
        .iter()
        .zip(FULL_DAY_NAMES)
        .position(|(short, full)| {
            name.eq_ignore_ascii_case(short) || name.eq_ignore_ascii_case(full)
        })
}

fn unknown_day(name: &str) -> String {
    format!(
        "'{name}' is not a day: expected Mon, Tue, Wed, Thu, Fri, Sat, Sun, \
         a range like Mon-Fri, or daily"
    )
}

/// Parses `H:MM`, `HH:MM` or `HH:MM:SS` into seconds since midnight.
fn parse_time(token: &str) -> Result<u32, String> {
    let malformed = || format!("'{token}' is not a time: expected HH:MM or HH:MM:SS");
    let fields: Vec<&str> = token.split(':').collect();
    let (hours, minutes, seconds) = match fields[..] {
        [hours, minutes] => (hours, minutes, "00"),
        [hours, minutes, seconds] => (hours, minutes, seconds),
        _ => return Err(malformed()),
    };
    let (Some(hours), Some(minutes), Some(seconds)) = (
        digits(hours, 1..=2),
        digits(minutes, 2..=2),
        digits(seconds, 2..=2),
    ) else {
        return Err(malformed());
    };
    if hours > 23 || minutes > 59 || seconds > 59 {
        return Err(format!(
            "'{token}' is out of range: times run from 00:00 to 23:59:59"
        ));
    }
    Ok(hours * 3600 + minutes * 60 + seconds)
}

/// A field of only ASCII digits (`parse` alone would take a sign).
fn digits(field: &str, widths: RangeInclusive<usize>) -> Option<u32> {
    if widths.contains(&field.len()) && field.bytes().all(|b| b.is_ascii_digit()) {
        field.parse().ok()
    } else {
        None
    }
}

fn parse_rate(token: &str) -> Result<Option<u64>, String> {
    if token.eq_ignore_ascii_case("off") || token.eq_ignore_ascii_case("unlimited") {
        return Ok(None);
    }
    // As with rate=, zero (0, 0M) means no limit rather than a stalled mount.
    let bytes = parse_size(token).map_err(|err| format!("bad rate: {err}"))?;
    if bytes > super::MAX_RATE {
        // Refused here, where the column is known, not clamped at the switch.
        return Err(format!(
            "bad rate: '{token}' is above the maximum 1T (1 TiB/s); write off for no limit"
        ));
    }
    Ok(Some(bytes).filter(|&bytes| bytes > 0))
}

/// `HH:MM`, with `:SS` only when there are seconds.
fn format_time(at: u32) -> String {
    let (hours, minutes, seconds) = (at / 3600, at / 60 % 60, at % 60);
    if seconds == 0 {
        format!("{hours:02}:{minutes:02}")
    } else {
        format!("{hours:02}:{minutes:02}:{seconds:02}")
    }
}

/// A day mask as runs of days: `Mon-Fri`, `Mon+Wed+Fri`, `Fri-Mon`, `daily`.
fn format_days(days: u8) -> String {
    if days == EVERY_DAY {
        return "daily".to_string();
    }
    let set = |day: usize| days & (1 << (day % 7)) != 0;
    // Start at a day that begins a run, so a run wrapping past Sunday prints
    // as one range.
    let first = (0..7).find(|&day| set(day) && !set(day + 6)).unwrap_or(0);
    let mut runs = Vec::new();
    let mut step = 0;
    while step < 7 {
        if !set(first + step) {
            step += 1;
            continue;
        }
        let mut length = 1;
        while step + length < 7 && set(first + step + length) {
            length += 1;
        }
        let from = DAY_NAMES[(first + step) % 7];
        runs.push(if length == 1 {
            from.to_string()
        } else {
            format!("{from}-{}", DAY_NAMES[(first + step + length - 1) % 7])
        });
        step += length;
    }
    runs.join("+")
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{FixedOffset, MappedLocalTime, NaiveDate, NaiveTime, Weekday};

    const ISSUE: &str = "Mon-Fri 09:00 20M; 17:00 100M; Sat 00:00 off";
    const MIB: u64 = 1 << 20;

    /// A time in the week of Monday 2026-11-30.
    fn at(day: Weekday, hours: u32, minutes: u32, seconds: u32) -> NaiveDateTime {
        NaiveDate::from_isoywd_opt(2026, 49, day)
            .and_then(|date| date.and_hms_opt(hours, minutes, seconds))
            .expect("valid test time")
    }

    fn parse(text: &str) -> Schedule {
        Schedule::parse(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    fn error(text: &str) -> ScheduleError {
        Schedule::parse(text).expect_err(text)
    }

    /// Asserts column and entry of an error and a piece of its reason.
    fn refused(text: &str, column: usize, entry: usize, reason: &str) -> ScheduleError {
        let err = error(text);
        assert_eq!((err.column, err.entry), (column, entry), "{text}: {err}");
        assert!(err.reason.contains(reason), "{text}: {err}");
        err
    }

    fn days(names: &[Weekday]) -> u8 {
        names
            .iter()
            .fold(0, |mask, day| mask | 1 << day.num_days_from_monday())
    }

    #[test]
    fn issue_example() {
        let schedule = parse(ISSUE);
        let texts: Vec<_> = schedule.entries().iter().map(Entry::describe).collect();
        assert_eq!(texts, ["Mon-Fri 09:00 20M", "17:00 100M", "Sat 00:00 off"]);
        let cases = [
            (at(Weekday::Tue, 8, 0, 0), "17:00 100M"),
            (at(Weekday::Tue, 12, 0, 0), "Mon-Fri 09:00 20M"),
            (at(Weekday::Fri, 23, 59, 59), "17:00 100M"),
            (at(Weekday::Sat, 0, 0, 0), "Sat 00:00 off"),
            (at(Weekday::Sat, 10, 0, 0), "Sat 00:00 off"),
            (at(Weekday::Sun, 23, 0, 0), "Sat 00:00 off"),
            (at(Weekday::Mon, 0, 0, 0), "Sat 00:00 off"),
            (at(Weekday::Mon, 8, 59, 59), "Sat 00:00 off"),
            (at(Weekday::Mon, 9, 0, 0), "Mon-Fri 09:00 20M"),
        ];
        for (time, expected) in cases {
            assert_eq!(schedule.active_at(time).text, expected, "{time}");
        }
        assert_eq!(
            schedule.active_at(at(Weekday::Tue, 12, 0, 0)).limit,
            Some(20 * MIB)
        );
        assert_eq!(
            schedule.active_at(at(Weekday::Tue, 8, 0, 0)).limit,
            Some(100 * MIB)
        );
        assert_eq!(schedule.active_at(at(Weekday::Sun, 23, 0, 0)).limit, None);
    }

    #[test]
    fn next_change_wraps_past_the_end_of_the_week() {
        let schedule = parse(ISSUE);
        let (when, entry) = schedule
            .next_change_after(at(Weekday::Sun, 12, 0, 0))
            .expect("a change");
        let monday = NaiveDate::from_ymd_opt(2026, 12, 7).and_then(|d| d.and_hms_opt(9, 0, 0));
        assert_eq!(Some(when), monday);
        assert_eq!(entry.text, "Mon-Fri 09:00 20M");

        let next = |time| schedule.next_change_after(time).map(|(when, _)| when);
        assert_eq!(
            next(at(Weekday::Tue, 12, 0, 0)),
            Some(at(Weekday::Tue, 17, 0, 0))
        );
        assert_eq!(
            next(at(Weekday::Fri, 18, 0, 0)),
            Some(at(Weekday::Sat, 0, 0, 0))
        );
        // Strictly after: at a change point the next one is reported.
        assert_eq!(
            next(at(Weekday::Mon, 9, 0, 0)),
            Some(at(Weekday::Mon, 17, 0, 0))
        );
        let just_before = at(Weekday::Mon, 8, 59, 59) + TimeDelta::milliseconds(500);
        assert_eq!(next(just_before), Some(at(Weekday::Mon, 9, 0, 0)));
    }

    #[test]
    fn next_change_skips_points_that_keep_the_limit() {
        let schedule = parse("Mon-Fri 09:00 20M; 12:00 20M; 17:00 100M");
        let next = |time| {
            schedule
                .next_change_after(time)
                .map(|(when, e)| (when, e.text.clone()))
        };
        assert_eq!(
            next(at(Weekday::Mon, 10, 0, 0)),
            Some((at(Weekday::Mon, 17, 0, 0), "17:00 100M".to_string()))
        );
        assert_eq!(
            next(at(Weekday::Mon, 17, 30, 0)),
            Some((at(Weekday::Tue, 9, 0, 0), "Mon-Fri 09:00 20M".to_string()))
        );
        // Off and 0 are both no limit: no change between them.
        let schedule = parse("Mon 09:00 off; Tue 09:00 0; Wed 09:00 5M");
        assert_eq!(
            schedule
                .next_change_after(at(Weekday::Mon, 10, 0, 0))
                .map(|(when, _)| when),
            Some(at(Weekday::Wed, 9, 0, 0))
        );
    }

    #[test]
    fn one_limit_never_changes() {
        let schedule = parse("daily 00:00 50M");
        assert_eq!(schedule.entries().len(), 1);
        assert_eq!(
            schedule.active_at(at(Weekday::Thu, 3, 0, 0)).limit,
            Some(50 * MIB)
        );
        assert_eq!(schedule.next_change_after(at(Weekday::Thu, 3, 0, 0)), None);
        let schedule = parse("Mon 09:00 off; Tue 09:00 unlimited; 10:00 0M");
        assert_eq!(schedule.next_change_after(at(Weekday::Mon, 9, 0, 0)), None);
    }

    #[test]
    fn day_ranges_may_wrap() {
        use Weekday::*;
        let schedule = parse("Fri-Mon 22:00 off; Tue-Thu 22:00 10M; sun-MON 06:00 1M");
        let masks: Vec<u8> = schedule.entries().iter().map(|e| e.days).collect();
        assert_eq!(
            masks,
            [
                days(&[Fri, Sat, Sun, Mon]),
                days(&[Tue, Wed, Thu]),
                days(&[Sun, Mon])
            ]
        );
        assert_eq!(
            schedule.active_at(at(Sun, 5, 0, 0)).text,
            "Fri-Mon 22:00 off"
        );
        assert_eq!(
            schedule.active_at(at(Mon, 7, 0, 0)).text,
            "sun-MON 06:00 1M"
        );
        assert_eq!(
            schedule.active_at(at(Mon, 23, 0, 0)).text,
            "Fri-Mon 22:00 off"
        );
        assert_eq!(
            schedule.active_at(at(Tue, 7, 0, 0)).text,
            "Fri-Mon 22:00 off"
        );
    }

    #[test]
    fn day_lists_and_names() {
        use Weekday::*;
        let cases = [
            ("Mon+Wed+Fri 09:00 1M", days(&[Mon, Wed, Fri])),
            ("Sat-Sun,Wed 09:00 1M", days(&[Wed, Sat, Sun])),
            ("mon,WED+friday 09:00 1M", days(&[Mon, Wed, Fri])),
            ("Tuesday-thursday 09:00 1M", days(&[Tue, Wed, Thu])),
            ("Mon+Mon 09:00 1M", days(&[Mon])),
            ("daily 09:00 1M", EVERY_DAY),
            ("DAILY 09:00 1M", EVERY_DAY),
            ("* 09:00 1M", EVERY_DAY),
            ("09:00 1M", EVERY_DAY),
        ];
        for (text, expected) in cases {
            assert_eq!(parse(text).entries()[0].days, expected, "{text}");
        }
    }

    #[test]
    fn entries_without_days_take_the_previous_days() {
        use Weekday::*;
        let schedule = parse("07:00 1M; Sat 10:00 5M; 12:00 off; Mon-Fri 08:00 2M; 18:00 3M");
        let masks: Vec<u8> = schedule.entries().iter().map(|e| e.days).collect();
        let weekdays = days(&[Mon, Tue, Wed, Thu, Fri]);
        assert_eq!(
            masks,
            [EVERY_DAY, days(&[Sat]), days(&[Sat]), weekdays, weekdays]
        );
        assert_eq!(schedule.active_at(at(Sat, 13, 0, 0)).text, "12:00 off");
        assert_eq!(schedule.active_at(at(Sun, 8, 0, 0)).text, "07:00 1M");
    }

    #[test]
    fn times_with_seconds() {
        let schedule = parse("07:30:15 1M; 9:05 2M; 23:59:59 3M");
        let times: Vec<u32> = schedule.entries().iter().map(|e| e.at).collect();
        assert_eq!(times, [7 * 3600 + 30 * 60 + 15, 9 * 3600 + 5 * 60, DAY - 1]);
        let active = |h, m, s| schedule.active_at(at(Weekday::Wed, h, m, s)).limit;
        assert_eq!(active(7, 30, 14), Some(3 * MIB));
        assert_eq!(active(7, 30, 15), Some(MIB));
        assert_eq!(active(23, 59, 58), Some(2 * MIB));
        assert_eq!(active(23, 59, 59), Some(3 * MIB));
    }

    #[test]
    fn rates() {
        let limit = |rate: &str| parse(&format!("00:00 {rate}")).entries()[0].limit;
        assert_eq!(limit("20M"), Some(20 * MIB));
        assert_eq!(limit("1.5GiB"), Some(3 << 29));
        assert_eq!(limit("800Mbit"), Some(100_000_000));
        for none in ["off", "OFF", "unlimited", "Unlimited", "0", "0M"] {
            assert_eq!(limit(none), None, "{none}");
        }
    }

    #[test]
    fn unknown_days_are_refused_where_they_are() {
        refused(
            "Mon-Fri 09:00 20M; Mnu 17:00 100M",
            20,
            2,
            "'Mnu' is not a day: expected Mon",
        );
        refused("Mon+Xyz 09:00 1M", 5, 1, "'Xyz' is not a day");
        refused("Mon-Fir 09:00 1M", 5, 1, "'Fir' is not a day");
        refused("Sat,Sun,Mo 09:00 1M", 9, 1, "'Mo' is not a day");
        // Not a digit, so a day: the time was probably meant.
        refused("O9:00 1M", 1, 1, "'O9:00' is not a day");
    }

    #[test]
    fn bad_day_ranges_and_lists_are_refused() {
        refused("Mon- 09:00 1M", 1, 1, "'Mon-' is not a day range");
        refused("-Fri 09:00 1M", 1, 1, "'-Fri' is not a day range");
        refused(
            "Sat+Mon-Wed-Fri 09:00 1M",
            5,
            1,
            "'Mon-Wed-Fri' is not a day range",
        );
        refused("Tue-Tue 09:00 1M", 1, 1, "starts and ends on the same day");
        refused("Mon++Wed 09:00 1M", 5, 1, "'Mon++Wed' has an empty item");
        refused("Sat, 09:00 1M", 5, 1, "'Sat,' has an empty item");
    }

    #[test]
    fn missing_time_and_rate_are_refused_after_the_entry() {
        refused("Mon-Fri", 8, 1, "missing time after 'Mon-Fri'");
        refused("Mon 09:00 1M; Tue ;", 18, 2, "missing time after 'Tue'");
        refused("Mon 09:00", 10, 1, "missing rate after '09:00'");
        refused("Mon 09:00 1M;   10:00  # no rate", 22, 2, "missing rate");
    }

    #[test]
    fn bad_times_are_refused() {
        let err = refused(
            "Mon-Fri 09:00 20M; 17:0O 100M",
            20,
            2,
            "'17:0O' is not a time: expected HH:MM or HH:MM:SS",
        );
        assert_eq!(err.entry_text, "17:0O 100M");
        for bad in [
            "9:5",
            "0900",
            "09:00:0",
            "09:00:00:00",
            "123:00",
            "9:+5",
            "09:",
        ] {
            refused(&format!("Mon {bad} 1M"), 5, 1, "is not a time");
        }
        refused("Mon 20M", 5, 1, "'20M' is not a time");
        refused("Mon 09:00 1M; 24:00 off", 15, 2, "'24:00' is out of range");
        refused("09:60 1M", 1, 1, "'09:60' is out of range");
        refused(
            "09:00:60 1M",
            1,
            1,
            "out of range: times run from 00:00 to 23:59:59",
        );
    }

    #[test]
    fn bad_rates_carry_the_size_parsers_message() {
        refused(
            "Mon 09:00 20X",
            11,
            1,
            "bad rate: '20X' is not a size: expected a number",
        );
        refused(
            "Mon 09:00 5Mb",
            11,
            1,
            "write Mbit for bits or MB for bytes",
        );
        refused("09:00 99999999999T", 7, 1, "'99999999999T' is too large");
        refused("Mon 09:00 2T", 11, 1, "'2T' is above the maximum 1T");
        // The maximum itself is a rate.
        assert_eq!(parse("00:00 1T").entries()[0].limit, Some(1 << 40));
    }

    #[test]
    fn extra_tokens_are_refused() {
        refused(
            "Mon 09:00 20M now",
            15,
            1,
            "unexpected 'now' after the rate: an entry is [DAYS] TIME RATE",
        );
        // A space in a rate splits it.
        refused("09:00 20 M", 10, 1, "unexpected 'M'");
    }

    #[test]
    fn duplicate_change_points_are_refused_at_the_second() {
        refused(
            "Mon-Fri 09:00 20M; Mon 09:00 off",
            24,
            2,
            "Mon 09:00 is already set by entry 1",
        );
        refused(
            "Mon-Fri 09:00 1M; Sat 10:00 2M; Fri-Sun 09:00 2M",
            41,
            3,
            "Fri 09:00 is already set by entry 1",
        );
        // Inherited days collide too; the time is what is pointed at.
        refused(
            "Sat 07:30:05 1M; 07:30:05 2M",
            18,
            2,
            "Sat 07:30:05 is already set by entry 1",
        );
        // The same time on other days is fine.
        parse("Mon 09:00 1M; Tue 09:00 2M");
    }

    #[test]
    fn empty_schedules_are_refused() {
        for empty in [
            "",
            "   ",
            " ; ;",
            "# nothing yet\n\n  # still nothing; really\n",
        ] {
            let err = error(empty);
            assert_eq!(err.entry, 0, "{empty:?}");
            assert_eq!(
                err.to_string(),
                "the schedule has no entries: expected entries like 'Mon-Fri 09:00 20M; 17:00 100M'"
            );
        }
    }

    #[test]
    fn config_text_with_comments_and_lines() {
        let config = "\
# office hours
Mon-Fri 09:00 20M   # slow during the day; fast at night
        17:00 100M
Sat 00:00 off; Sun 12:00 1M # two on one line

\t# indented comment
";
        let schedule = parse(config);
        let texts: Vec<_> = schedule.entries().iter().map(|e| e.text.as_str()).collect();
        assert_eq!(
            texts,
            [
                "Mon-Fri 09:00 20M",
                "17:00 100M",
                "Sat 00:00 off",
                "Sun 12:00 1M"
            ]
        );
        assert_eq!(
            schedule.active_at(at(Weekday::Sun, 13, 0, 0)).limit,
            Some(MIB)
        );

        let err = error(&format!("{config}Wed 25:00 1M # late\n"));
        assert_eq!((err.line, err.column, err.entry), (7, 5, 5));
        assert_eq!(
            err.to_string(),
            "at line 7, column 5 (entry 5, 'Wed 25:00 1M'): \
             '25:00' is out of range: times run from 00:00 to 23:59:59"
        );
        let err = error("Mon 09:00 1M\r\nTue 10:00 1M; Mon 09:00 2M\r\n");
        assert_eq!((err.line, err.column, err.entry), (2, 19, 3));
    }

    #[test]
    fn one_line_messages_leave_out_the_line() {
        let err = error("Mon-Fri 09:00 20M; 17:0O 100M");
        assert_eq!(err.line, 1);
        assert_eq!(
            err.to_string(),
            "at column 20 (entry 2, '17:0O 100M'): \
             '17:0O' is not a time: expected HH:MM or HH:MM:SS"
        );
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // A no-break space is whitespace of two bytes.
        refused("Mon\u{a0}09:00 1M; Tue 25:00 2M", 19, 2, "out of range");
    }

    #[test]
    fn display_is_normalized_and_parses_back() {
        assert_eq!(
            parse(ISSUE).to_string(),
            "Mon-Fri 09:00 20M; Mon-Fri 17:00 100M; Sat 00:00 off"
        );
        let text = "friday-mon 07:30:15 1.5GiB; 12:00 unlimited; Sat-Sun,Wed 9:00 800Mbit; \
                    * 23:00 OFF; Mon+Wed+Fri 01:00 1M; Sun-Sat 02:00 2M";
        let shown = parse(text).to_string();
        assert_eq!(
            shown,
            "Fri-Mon 07:30:15 1.5GiB; Fri-Mon 12:00 unlimited; Wed+Sat-Sun 09:00 800Mbit; \
             daily 23:00 OFF; Mon+Wed+Fri 01:00 1M; daily 02:00 2M"
        );
        let meaning = |s: &Schedule| -> Vec<(u8, u32, Option<u64>)> {
            s.entries()
                .iter()
                .map(|e| (e.days, e.at, e.limit))
                .collect()
        };
        assert_eq!(meaning(&parse(&shown)), meaning(&parse(text)));
    }

    #[test]
    fn equality_compares_entries() {
        let schedule = parse(ISSUE);
        assert_eq!(schedule.clone(), schedule);
        assert_ne!(
            parse(ISSUE),
            parse("Mon-Fri 09:00 20M; 17:00 100M; Sat 00:00 0")
        );
    }

    /// Central European time in 2026: +01:00, and +02:00 from 29 March
    /// 01:00 UTC to 25 October 01:00 UTC.
    #[derive(Debug, Clone, Copy)]
    struct Berlin;

    impl Berlin {
        fn offsets() -> (FixedOffset, FixedOffset) {
            let hour = 3600;
            (
                FixedOffset::east_opt(hour).expect("winter"),
                FixedOffset::east_opt(2 * hour).expect("summer"),
            )
        }
    }

    impl TimeZone for Berlin {
        type Offset = FixedOffset;

        fn from_offset(_: &FixedOffset) -> Self {
            Berlin
        }

        fn offset_from_local_date(&self, local: &NaiveDate) -> MappedLocalTime<FixedOffset> {
            self.offset_from_local_datetime(&local.and_time(NaiveTime::MIN))
        }

        fn offset_from_local_datetime(
            &self,
            local: &NaiveDateTime,
        ) -> MappedLocalTime<FixedOffset> {
            let (winter, summer) = Self::offsets();
            // An offset fits if the instant it gives has that offset. The
            // summer reading of a wall time is the earlier instant.
            let fits = |offset: FixedOffset| {
                let utc = *local - TimeDelta::seconds(offset.local_minus_utc().into());
                self.offset_from_utc_datetime(&utc) == offset
            };
            match (fits(summer), fits(winter)) {
                (true, true) => MappedLocalTime::Ambiguous(summer, winter),
                (true, false) => MappedLocalTime::Single(summer),
                (false, true) => MappedLocalTime::Single(winter),
                (false, false) => MappedLocalTime::None,
            }
        }

        fn offset_from_utc_date(&self, utc: &NaiveDate) -> FixedOffset {
            self.offset_from_utc_datetime(&utc.and_time(NaiveTime::MIN))
        }

        fn offset_from_utc_datetime(&self, utc: &NaiveDateTime) -> FixedOffset {
            let (winter, summer) = Self::offsets();
            let utc_at = |month, day| {
                NaiveDate::from_ymd_opt(2026, month, day)
                    .and_then(|date| date.and_hms_opt(1, 0, 0))
                    .expect("transition")
            };
            if (utc_at(3, 29)..utc_at(10, 25)).contains(utc) {
                summer
            } else {
                winter
            }
        }
    }

    /// The UTC instant of a 2026 Berlin wall time.
    fn utc_of(
        month: u32,
        day: u32,
        hours: u32,
        minutes: u32,
        seconds: u32,
    ) -> Option<NaiveDateTime> {
        let local =
            NaiveDate::from_ymd_opt(2026, month, day)?.and_hms_opt(hours, minutes, seconds)?;
        resolve_local(&Berlin, local).map(|instant| instant.naive_utc())
    }

    fn utc(month: u32, day: u32, hours: u32, minutes: u32, seconds: u32) -> Option<NaiveDateTime> {
        NaiveDate::from_ymd_opt(2026, month, day)?.and_hms_opt(hours, minutes, seconds)
    }

    #[test]
    fn wall_times_resolve_across_daylight_saving() {
        // Plain times.
        assert_eq!(utc_of(1, 5, 9, 0, 0), utc(1, 5, 8, 0, 0));
        assert_eq!(utc_of(7, 5, 9, 0, 0), utc(7, 5, 7, 0, 0));
        // 02:00-03:00 on 29 March does not exist: the first instant after the
        // gap is 03:00 summer time, the moment of the change.
        assert_eq!(utc_of(3, 29, 2, 0, 0), utc(3, 29, 1, 0, 0));
        assert_eq!(utc_of(3, 29, 2, 30, 0), utc(3, 29, 1, 0, 0));
        assert_eq!(utc_of(3, 29, 2, 59, 59), utc(3, 29, 1, 0, 0));
        assert_eq!(utc_of(3, 29, 3, 0, 0), utc(3, 29, 1, 0, 0));
        assert_eq!(utc_of(3, 29, 1, 59, 59), utc(3, 29, 0, 59, 59));
        // 02:00-03:00 on 25 October happens twice: the earlier is taken.
        assert_eq!(utc_of(10, 25, 2, 30, 0), utc(10, 25, 0, 30, 0));
        assert_eq!(utc_of(10, 25, 3, 0, 0), utc(10, 25, 2, 0, 0));
    }

    #[test]
    fn until_local_counts_down_and_stops_at_zero() {
        let now = local_now();
        assert_eq!(until_local(now - TimeDelta::days(1)), Duration::ZERO);
        let ahead = until_local(now + TimeDelta::minutes(10));
        // Up to an hour more or less if daylight saving changes meanwhile.
        assert!(ahead > Duration::ZERO, "{ahead:?}");
        assert!(ahead <= Duration::from_secs(70 * 60), "{ahead:?}");
    }
}
