//! Progress output of a migration: a bar per disk and for RAM with bytes, rate and ETA when
//! stderr is a terminal; plain, timestamped log lines (at most one per bar every few
//! seconds) when it is not, so logs of unattended runs stay readable.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Where progress goes.
pub struct Progress {
    multi: Option<MultiProgress>,
    start: Instant,
}

impl Progress {
    /// Bars on a terminal, log lines otherwise.
    pub fn auto() -> Self {
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            Self::bars()
        } else {
            Self::lines()
        }
    }

    pub fn bars() -> Self {
        Progress {
            multi: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            start: Instant::now(),
        }
    }

    pub fn lines() -> Self {
        Progress {
            multi: None,
            start: Instant::now(),
        }
    }

    /// A log line, above the bars when there are bars.
    pub fn log(&self, msg: impl AsRef<str>) {
        let line = format!(
            "{:>7.1}s {}",
            self.start.elapsed().as_secs_f64(),
            msg.as_ref()
        );
        match &self.multi {
            Some(m) => {
                let _ = m.println(line);
            }
            None => eprintln!("{line}"),
        }
    }

    /// A byte counter for `name` with `total` bytes (0 if unknown).
    pub fn bar(&self, name: &str, total: u64) -> Bar<'_> {
        let bar = self.multi.as_ref().map(|m| {
            let b = m.add(ProgressBar::new(total));
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b.set_prefix(name.to_string());
            b
        });
        Bar {
            progress: self,
            name: name.to_string(),
            bar,
            total: Mutex::new(total),
            last_line: Mutex::new(None),
            started: Instant::now(),
            detail: Mutex::new(String::new()),
        }
    }
}

/// One progress bar (or its log-line stand-in).
pub struct Bar<'a> {
    progress: &'a Progress,
    name: String,
    bar: Option<ProgressBar>,
    total: Mutex<u64>,
    last_line: Mutex<Option<Instant>>,
    started: Instant,
    /// Shown after the counts (e.g. the RAM phase's remaining bytes and dirty rate).
    detail: Mutex<String>,
}

impl Bar<'_> {
    /// Text shown after the counts from the next update on (empty: none).
    pub fn set_detail(&self, detail: String) {
        if let Some(b) = &self.bar {
            b.set_message(detail.clone());
        }
        *self.detail.lock().unwrap_or_else(|e| e.into_inner()) = detail;
    }

    pub fn set(&self, done: u64, total: u64) {
        *self.total.lock().unwrap_or_else(|e| e.into_inner()) = total;
        match &self.bar {
            Some(b) => {
                b.set_length(total);
                b.set_position(done);
            }
            None => {
                let mut last = self.last_line.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
                    *last = Some(Instant::now());
                    let secs = self.started.elapsed().as_secs_f64().max(0.001);
                    let detail = self.detail.lock().unwrap_or_else(|e| e.into_inner());
                    let sep = if detail.is_empty() { "" } else { ", " };
                    self.progress.log(format!(
                        "{}: {} of {} ({}/s){sep}{detail}",
                        self.name,
                        human(done),
                        human(total),
                        human((done as f64 / secs) as u64)
                    ));
                }
            }
        }
    }

    pub fn finish(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.finish_with_message(msg.to_string()),
            None => self.progress.log(format!("{}: {msg}", self.name)),
        }
    }
}

/// `1.5 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
