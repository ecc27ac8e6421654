//! Long steps say what they do: building Kubernetes from source, apt,
//! `cargo install`, the images. [`long_step`] prints the step's name when it
//! starts, a line with the time so far every [`TICK`] while it runs (so a
//! person or a CI log sees it is alive, without a line per second), and how
//! long it took when it ends, failed or not.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Result;

/// How often a running step says it still runs: often enough that nothing
/// looks hung, rare enough that a 12-minute build adds under 50 lines.
pub const TICK: Duration = Duration::from_secs(15);

/// Runs `f` as the step `what` (a gerund phrase: "building kube-apiserver
/// 1.20.2"), narrated on stdout; see the module docs.
pub fn long_step<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    long_step_with(what, TICK, Arc::new(print_line), f)
}

fn print_line(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    // Piped into a CI log, stdout is block-buffered: the line must go now.
    let _ = out.flush();
}

/// Where a step's lines go.
type Say = Arc<dyn Fn(&str) + Send + Sync>;

fn long_step_with<T>(what: &str, every: Duration, say: Say, f: impl FnOnce() -> Result<T>) -> Result<T> {
    say(&format!("==> {what}"));
    let started = Instant::now();
    let ticker = Ticker::start(what, every, say.clone());
    let outcome = f();
    // Stopped (and joined) before the last line, so no tick follows it.
    drop(ticker);
    let took = elapsed(started.elapsed());
    match &outcome {
        Ok(_) => say(&format!("<== {what}: done in {took}")),
        Err(_) => say(&format!("<== {what}: FAILED after {took}")),
    }
    outcome
}

/// A thread saying `… still WHAT (ELAPSED)` every `every` until
/// dropped; dropping it wakes the thread at once and waits for it.
struct Ticker {
    stop: Arc<(Mutex<bool>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl Ticker {
    fn start(what: &str, every: Duration, say: Say) -> Self {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let thread = {
            let (stop, what) = (stop.clone(), what.to_string());
            std::thread::spawn(move || {
                let started = Instant::now();
                let (lock, wake) = &*stop;
                let mut stopped = lock.lock().unwrap_or_else(PoisonError::into_inner);
                let mut next = every;
                loop {
                    // Checked before every wait: a stop that came before
                    // this thread first took the lock sent its wake-up to
                    // nobody, and waiting would outlast the step.
                    if *stopped {
                        return;
                    }
                    // Measured against the start, so ticks do not drift
                    // and a spurious wake-up does not tick early.
                    let wait = next.saturating_sub(started.elapsed());
                    stopped = wake.wait_timeout(stopped, wait).unwrap_or_else(PoisonError::into_inner).0;
                    if *stopped {
                        return;
                    }
                    if started.elapsed() >= next {
                        say(&format!("… still {what} ({})", elapsed(started.elapsed())));
                        next += every;
                    }
                }
            })
        };
        Self { stop, thread: Some(thread) }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        wake.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A duration as people read it in a log: `0.4s`, `9.9s`, `42s`, `1m30s`,
/// `12m03s`, `1h02m03s`.
pub fn elapsed(d: Duration) -> String {
    let secs = d.as_secs_f64();
    if secs < 10.0 {
        // One decimal, rounded down: 9.96 s must not print as "10.0s".
        return format!("{:.1}s", (secs * 10.0).floor() / 10.0);
    }
    let whole = d.as_secs();
    let (h, m, s) = (whole / 3600, whole / 60 % 60, whole % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s:02}s"),
        _ => format!("{h}h{m:02}m{s:02}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        let cases = [
            (Duration::ZERO, "0.0s"),
            (Duration::from_millis(400), "0.4s"),
            (Duration::from_millis(9_960), "9.9s"),
            (Duration::from_secs(10), "10s"),
            (Duration::from_millis(42_900), "42s"),
            (Duration::from_secs(60), "1m00s"),
            (Duration::from_secs(90), "1m30s"),
            (Duration::from_secs(12 * 60 + 3), "12m03s"),
            (Duration::from_secs(3600 + 2 * 60 + 3), "1h02m03s"),
        ];
        for (duration, text) in cases {
            assert_eq!(elapsed(duration), text, "{duration:?}");
        }
    }

    fn recorder() -> (Say, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        (Arc::new(move |line: &str| sink.lock().unwrap().push(line.to_string())), lines)
    }

    #[test]
    fn a_long_step_ticks_while_it_runs_and_never_after() {
        let (say, lines) = recorder();
        let value = long_step_with("testing", Duration::from_millis(40), say, || {
            std::thread::sleep(Duration::from_millis(230));
            Ok(7)
        })
        .unwrap();
        assert_eq!(value, 7);
        let seen = lines.lock().unwrap().clone();
        assert_eq!(seen.first().map(String::as_str), Some("==> testing"), "{seen:?}");
        assert!(seen.last().is_some_and(|l| l.starts_with("<== testing: done in 0.")), "{seen:?}");
        let ticks = seen.iter().filter(|l| l.starts_with("… still testing (")).count();
        // 230 ms at one tick per 40 ms: 5 on an idle machine (6 if the
        // sleep overshoots past 240 ms); a loaded one may delay some.
        assert!((2..=6).contains(&ticks), "{ticks} ticks: {seen:?}");
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(lines.lock().unwrap().len(), seen.len(), "a tick came after the step ended");
    }

    #[test]
    fn a_short_step_prints_no_tick_and_a_failure_says_so() {
        let (say, lines) = recorder();
        let outcome: Result<()> =
            long_step_with("failing", Duration::from_secs(5), say, || Err(anyhow::anyhow!("it broke")));
        assert_eq!(outcome.unwrap_err().to_string(), "it broke");
        let seen = lines.lock().unwrap().clone();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert!(seen[1].starts_with("<== failing: FAILED after 0."), "{seen:?}");
    }

    #[test]
    fn a_stop_before_the_ticker_first_waits_is_not_lost() {
        // Dropped at once, the stop usually comes before the thread takes
        // the lock; a lost wake-up would hold that drop for a whole tick.
        let tick = Duration::from_secs(2);
        let started = Instant::now();
        for _ in 0..50 {
            let (say, _lines) = recorder();
            drop(Ticker::start("racing", tick, say));
        }
        assert!(started.elapsed() < tick, "50 stops took {:?}: a stop was lost", started.elapsed());
    }

    #[test]
    fn dropping_the_ticker_stops_it_at_once() {
        let (say, _lines) = recorder();
        let ticker = Ticker::start("waiting", Duration::from_secs(3600), say);
        let started = Instant::now();
        drop(ticker);
        assert!(started.elapsed() < Duration::from_secs(1), "the ticker took {:?} to stop", started.elapsed());
    }
}
