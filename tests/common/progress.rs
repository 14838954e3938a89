//! A reader in a thread of its own that notes how far it has read, so that
//! a test can measure its rate over any window while it runs.

use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub struct Progress {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<u64, String>>>,
    label: String,
}

impl Progress {
    /// Reads `path` in 1 MiB reads until the end or [`Progress::finish`].
    pub fn start(path: PathBuf) -> Progress {
        let samples = Arc::new(Mutex::new(vec![(Instant::now(), 0)]));
        let stop = Arc::new(AtomicBool::new(false));
        let label = path.display().to_string();
        let thread = {
            let (samples, stop) = (samples.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut file =
                    std::fs::File::open(&path).map_err(|err| format!("{path:?}: {err}"))?;
                let mut buf = vec![0u8; 1 << 20];
                let mut total = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let n = file
                        .read(&mut buf)
                        .map_err(|err| format!("read {path:?} at {total}: {err}"))?;
                    if n == 0 {
                        break;
                    }
                    total += n as u64;
                    samples.lock().unwrap().push((Instant::now(), total));
                }
                Ok(total)
            })
        };
        Progress {
            samples,
            stop,
            thread: Some(thread),
            label,
        }
    }

    /// Bytes read by `at`, interpolated between the samples around it: a
    /// count of whole 1 MiB reads would be off by up to one read per window
    /// (5.6% of a 3 s window at 6 MiB/s).
    pub fn bytes_at(&self, at: Instant) -> u64 {
        let samples = self.samples.lock().unwrap();
        let after = samples.partition_point(|(when, _)| *when <= at);
        let Some(&(before_at, before)) = after.checked_sub(1).and_then(|i| samples.get(i)) else {
            return 0;
        };
        match samples.get(after) {
            Some(&(next_at, next)) => {
                let span = next_at.duration_since(before_at).as_secs_f64();
                let part = at.duration_since(before_at).as_secs_f64() / span;
                before + ((next - before) as f64 * part) as u64
            }
            // Not read further yet: nothing more by then.
            None => before,
        }
    }

    /// Bytes per second over `[from, to]`.
    pub fn rate(&self, from: Instant, to: Instant) -> f64 {
        let bytes = self.bytes_at(to) - self.bytes_at(from);
        bytes as f64 / to.duration_since(from).as_secs_f64()
    }

    /// Waits for the reader to reach the end; returns when it did and the
    /// bytes it read.
    pub fn wait_for_end(&self, limit: Duration) -> (Instant, u64) {
        let deadline = Instant::now() + limit;
        while !self.thread.as_ref().is_some_and(|t| t.is_finished()) {
            assert!(Instant::now() < deadline, "{} did not finish", self.label);
            std::thread::sleep(Duration::from_millis(20));
        }
        *self.samples.lock().unwrap().last().unwrap()
    }

    /// Sleeps until `at`.
    pub fn wait_until(at: Instant) {
        if let Some(left) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(left);
        }
    }

    /// Rate over the next `seconds`, measured from now.
    pub fn measure(&self, seconds: f64) -> f64 {
        let from = Instant::now();
        let to = from + Duration::from_secs_f64(seconds);
        Self::wait_until(to);
        // Interpolating at `to` needs the read that ends after it.
        let deadline = to + Duration::from_secs(2);
        while self
            .samples
            .lock()
            .unwrap()
            .last()
            .is_some_and(|(when, _)| *when <= to)
            && !self.thread.as_ref().is_some_and(|t| t.is_finished())
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.rate(from, to)
    }

    /// Stops the reader; panics if any read failed.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let result = self.thread.take().unwrap().join().unwrap();
        result.unwrap_or_else(|err| panic!("reader of {} failed: {err}", self.label))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// `achieved` is `target` within `tolerance` (0.05 = ±5%); prints both.
pub fn assert_near(label: &str, achieved: f64, target: f64, tolerance: f64) {
    let ratio = achieved / target;
    eprintln!(
        "measured: {label}: {achieved:.0} B/s = {:.2}% of {target:.0}",
        ratio * 100.0
    );
    assert!(
        (ratio - 1.0).abs() <= tolerance,
        "{label}: {achieved:.0} B/s is {:.1}% of {target:.0} B/s (±{:.0}% allowed)",
        ratio * 100.0,
        tolerance * 100.0
    );
}
