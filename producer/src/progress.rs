//! Progress on stderr: a bar on a terminal, a plain line every few seconds otherwise
//! (`published 12000/1000000`), so logs of unattended runs stay readable.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// A counter towards an (optionally known) total, with a free-form detail.
pub struct Progress {
    label: &'static str,
    bar: Option<ProgressBar>,
    total: Option<u64>,
    position: u64,
    detail: String,
    last_line: Instant,
}

impl Progress {
    /// Progress of `label` (`published`, `validated`...) towards `total`.
    pub fn new(label: &'static str, total: Option<u64>) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(total) => ProgressBar::new(total).with_style(
                    ProgressStyle::with_template(
                        "{prefix} {wide_bar} {pos}/{len} ({per_sec}, {eta}) {msg}",
                    )
                    .expect("valid template"),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {prefix} {pos} ({per_sec}) {msg}")
                        .expect("valid template"),
                ),
            };
            bar.set_prefix(label);
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            label,
            bar,
            total,
            position: 0,
            detail: String::new(),
            last_line: Instant::now(),
        }
    }

    /// Learn (or correct) the total.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        if let Some(bar) = &self.bar {
            bar.set_length(total);
        }
    }

    /// Move to `position`.
    pub fn set(&mut self, position: u64) {
        self.position = position;
        match &self.bar {
            Some(bar) => bar.set_position(position),
            None => self.maybe_print_line(),
        }
    }

    /// Replace the detail shown after the counter.
    pub fn set_detail(&mut self, detail: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(detail.clone());
        }
        self.detail = detail;
    }

    /// Print a plain line if one is due (call it now and then while waiting).
    pub fn maybe_print_line(&mut self) {
        if self.bar.is_none() && self.last_line.elapsed() >= PLAIN_EVERY {
            self.last_line = Instant::now();
            eprintln!("{}", self.line());
        }
    }

    /// Print a line on stderr above the bar (or just print it, without a bar).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{line}")),
            None => eprintln!("{line}"),
        }
    }

    /// Remove the bar (the final result is printed by the caller).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn line(&self) -> String {
        let total = self.total.map_or_else(String::new, |t| format!("/{t}"));
        let detail = if self.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", self.detail)
        };
        format!("{} {}{total}{detail}", self.label, self.position)
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.finish();
    }
}
