//! Progress of `roster import` and `roster export` on stderr: a live bar (count, rate, ETA) on a
//! terminal, plain periodic lines otherwise (logs and CI keep a readable record), and one summary
//! line at the end either way.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_REPORT_INTERVAL: Duration = Duration::from_secs(5);

pub struct Progress {
    /// `import` or `export`, the start of every plain line.
    command: &'static str,
    /// What is counted (`lines`, `profiles`), for the rate.
    unit: &'static str,
    started: Instant,
    /// Bytes of input in all, when known (a file, not a pipe): the bar and the ETA follow bytes.
    total_bytes: Option<u64>,
    bar: Option<ProgressBar>,
    last_plain_report: Instant,
}

impl Progress {
    pub fn new(command: &'static str, unit: &'static str, total_bytes: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| live_bar(total_bytes));
        let started = Instant::now();
        Progress { command, unit, started, total_bytes, bar, last_plain_report: started }
    }

    /// Reports `count` units done, `bytes_done` of the input read, and `details` (counts by
    /// outcome). Cheap enough to call after every batch.
    pub fn update(&mut self, count: u64, bytes_done: Option<u64>, details: &str) {
        let rate = per_second(count, self.started.elapsed());
        if let Some(bar) = &self.bar {
            if let Some(bytes_done) = bytes_done {
                bar.set_position(bytes_done);
            } else {
                bar.set_position(count);
            }
            bar.set_message(format!("{count} {} ({rate:.0}/s) {details}", self.unit));
            return;
        }
        if self.last_plain_report.elapsed() < PLAIN_REPORT_INTERVAL {
            return;
        }
        self.last_plain_report = Instant::now();
        let share = match (bytes_done, self.total_bytes) {
            (Some(done), Some(total)) if total > 0 && done <= total => {
                let fraction = done as f64 / total as f64;
                let elapsed = self.started.elapsed().as_secs_f64();
                let remaining = if fraction > 0.0 { elapsed / fraction - elapsed } else { 0.0 };
                format!(", {:.0}% done, about {remaining:.0}s left", fraction * 100.0)
            }
            _ => String::new(),
        };
        eprintln!("roster {}: {count} {} ({rate:.0}/s){share} {details}", self.command, self.unit);
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Clears the bar and prints the summary line.
    pub fn finish(&self, summary: &str) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
        eprintln!("roster {}: {summary}", self.command);
    }
}

/// Units per second over `elapsed` (0 before any time has passed).
pub fn per_second(count: u64, elapsed: Duration) -> f64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 { 0.0 } else { count as f64 / seconds }
}

fn live_bar(total_bytes: Option<u64>) -> ProgressBar {
    let bar = match total_bytes {
        Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} [{wide_bar}] {percent:>3}% eta {eta} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}
