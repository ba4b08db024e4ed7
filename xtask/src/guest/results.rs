//! Reading how each test binary ended: the files the guest writes on the target share,
//! else its part of the serial console (where kernel messages may interleave mid-line).

use std::{fmt, fs, path::Path, time::Duration};

use super::TEST_MARKER;

/// libtest's summary of one binary: `running N tests` and `test result: …`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Summary {
    running: Option<u64>,
    passed: u64,
    failed: u64,
    ignored: u64,
    filtered_out: u64,
}

impl Summary {
    pub(super) fn ran(&self) -> u64 {
        self.passed + self.failed
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} passed, {} failed", self.passed, self.failed)?;
        if self.ignored > 0 {
            write!(f, ", {} ignored", self.ignored)?;
        }
        if self.filtered_out > 0 {
            write!(f, ", {} filtered out", self.filtered_out)?;
        }
        Ok(())
    }
}

/// Removes ANSI escape sequences (`ESC [ … final`), should a caller's `--color=always`
/// put them in.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `test result:` line of a binary's output (with the last `running N tests`),
/// found anywhere in a line. None without one: the binary did not get to its summary.
pub(super) fn libtest_summary(text: &str) -> Option<Summary> {
    let mut running = None;
    let mut summary = None;
    for line in text.lines() {
        let line = strip_ansi(line);
        if let Some(rest) = line.find("running ").map(|i| &line[i + "running ".len()..]) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [n, unit, ..] = words[..] {
                if let (Ok(n), true) = (n.parse::<u64>(), unit == "test" || unit == "tests") {
                    running = Some(n);
                }
            }
        }
        let Some(i) = line.find("test result: ") else {
            continue;
        };
        let mut found = Summary {
            running,
            ..Summary::default()
        };
        for field in line[i..].split(';') {
            let words: Vec<&str> = field.split_whitespace().collect();
            let Some(at) = words.iter().position(|w| w.parse::<u64>().is_ok()) else {
                continue;
            };
            let n: u64 = words[at].parse().unwrap_or(0);
            match words[at + 1..].join(" ").as_str() {
                "passed" => found.passed = n,
                "failed" => found.failed = n,
                "ignored" => found.ignored = n,
                "filtered out" => found.filtered_out = n,
                _ => {}
            }
        }
        summary = Some(found);
    }
    summary
}

/// The leading digits of a word as a number: `0[ 12.3] …` when a kernel message follows a
/// marker on its line.
pub(super) fn leading_number(word: &str) -> Option<i64> {
    let digits: String = word.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The words after `marker` in a line, wherever it starts.
pub(super) fn after_marker<'a>(line: &'a str, marker: &str) -> Option<Vec<&'a str>> {
    line.find(marker)
        .map(|i| line[i + marker.len()..].split_whitespace().collect())
}

/// How one test binary ended.
#[derive(Debug, Default)]
pub(super) struct Outcome {
    /// The guest got to it (its start marker or its log).
    pub(super) started: bool,
    pub(super) status: Option<i64>,
    pub(super) timed_out: bool,
    pub(super) seconds: Option<u64>,
    pub(super) summary: Option<Summary>,
}

/// One binary's outcome: from the files the guest wrote on the target share, else from
/// its part of the console.
pub(super) fn outcome(name: &str, out: &Path, console: &[String]) -> Outcome {
    let mut outcome = Outcome::default();
    if let Ok(result) = fs::read_to_string(out.join(format!("{name}.result"))) {
        let words: Vec<&str> = result.split_whitespace().collect();
        if let [status, timed_out, seconds] = words[..] {
            outcome.status = leading_number(status);
            outcome.timed_out = timed_out == "1";
            outcome.seconds = leading_number(seconds).and_then(|s| u64::try_from(s).ok());
        }
    }
    if let Ok(log) = fs::read(out.join(format!("{name}.log"))) {
        outcome.started = true;
        outcome.summary = libtest_summary(&String::from_utf8_lossy(&log));
    }
    if outcome.status.is_some() && outcome.summary.is_some() {
        return outcome;
    }
    // The console: the lines between this binary's start and end markers.
    let (mut inside, mut text, mut start) = (false, String::new(), None);
    for line in console {
        if let Some(words) = after_marker(line, TEST_MARKER) {
            match words[..] {
                [n, "start", at, ..] if n == name => {
                    inside = true;
                    outcome.started = true;
                    start = at.parse::<f64>().ok();
                    continue;
                }
                [n, "end", at, "status", rc, ..] if n == name => {
                    inside = false;
                    if outcome.status.is_none() {
                        outcome.status = leading_number(rc);
                        outcome.timed_out = words.get(6).is_some_and(|t| t.starts_with('1'));
                        if let (Some(start), Ok(end)) = (start, at.parse::<f64>()) {
                            outcome.seconds = Some((end - start).max(0.0) as u64);
                        }
                    }
                    continue;
                }
                _ => {}
            }
        }
        if inside {
            text += line;
            text.push('\n');
        }
    }
    if outcome.summary.is_none() {
        outcome.summary = libtest_summary(&text);
    }
    outcome
}

/// The first console line where the guest's kernel reports it is in trouble.
pub(super) fn kernel_trouble(console: &[String]) -> Option<&str> {
    const SIGNS: &[&str] = &[
        "Kernel panic",
        "BUG:",
        "soft lockup",
        "hung_task",
        "rcu_preempt detected stalls",
        "self-detected stall",
        "Oops",
        "Out of memory",
    ];
    console
        .iter()
        .find(|line| SIGNS.iter().any(|sign| line.contains(sign)))
        .map(|line| line.trim())
}

/// How a binary's outcome counts.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Passed,
    /// It ran nothing because a filter excluded every test it has: fine on its own (a
    /// filter names tests of some files), not when no file runs anything.
    NoneMatched,
    Failed(String),
}

pub(super) fn judge(outcome: &Outcome, test_timeout: Duration) -> Verdict {
    let status = match outcome.status {
        None if !outcome.started => {
            return Verdict::Failed("not run: the guest stopped before it".into())
        }
        None => return Verdict::Failed("no status: the guest stopped during it".into()),
        Some(status) => status,
    };
    if outcome.timed_out {
        return Verdict::Failed(format!(
            "did not finish within {} s",
            test_timeout.as_secs()
        ));
    }
    let Some(summary) = &outcome.summary else {
        return Verdict::Failed(format!(
            "status {status}, no libtest summary (`test result:` line)"
        ));
    };
    if status != 0 {
        return Verdict::Failed(format!("status {status}: {summary}"));
    }
    if summary.ran() == 0 {
        if summary.filtered_out == 0 {
            return Verdict::Failed(format!("ran no test ({summary})"));
        }
        return Verdict::NoneMatched;
    }
    Verdict::Passed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest::EXIT_MARKER;

    #[test]
    fn libtest_summaries_are_read_through_colour_and_kernel_noise() {
        let text = "running 3 tests\ntest a ... \u{1b}[32mok\u{1b}[m\n\
                    test result: \u{1b}[32mok\u{1b}[m. 3 passed; 0 failed; 1 ignored; 0 measured; 2 filtered out; finished in 10.37s\n";
        assert_eq!(
            libtest_summary(text),
            Some(Summary {
                running: Some(3),
                passed: 3,
                failed: 0,
                ignored: 1,
                filtered_out: 2
            })
        );
        let noisy = "[  12.5] 9pnet: something running 1 test\n\
                     test result: FAILED. 0 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s";
        let summary = libtest_summary(noisy).unwrap();
        assert_eq!((summary.running, summary.failed), (Some(1), 1));
        assert_eq!(
            libtest_summary("running 1 test\nthread 'main' panicked"),
            None
        );
    }

    #[test]
    fn zero_tests_fail_unless_a_filter_excluded_them() {
        let timeout = Duration::from_secs(60);
        let with = |summary: Option<Summary>| Outcome {
            status: Some(0),
            summary,
            ..Outcome::default()
        };
        let none_run = Summary::default();
        assert!(matches!(
            judge(&with(Some(none_run)), timeout),
            Verdict::Failed(_)
        ));
        let filtered = Summary {
            filtered_out: 4,
            ..Summary::default()
        };
        assert_eq!(judge(&with(Some(filtered)), timeout), Verdict::NoneMatched);
        assert!(matches!(judge(&with(None), timeout), Verdict::Failed(_)));
        let ok = Summary {
            passed: 2,
            ..Summary::default()
        };
        assert_eq!(judge(&with(Some(ok)), timeout), Verdict::Passed);
        let timed_out = Outcome {
            status: Some(124),
            timed_out: true,
            ..Outcome::default()
        };
        assert!(matches!(judge(&timed_out, timeout), Verdict::Failed(w) if w.contains("60 s")));
    }

    #[test]
    fn console_markers_are_found_mid_line() {
        let console: Vec<String> = [
            "FREEBIND-GUEST-TEST check start 10.00",
            "running 1 test",
            "test result: ok. 1 passed; 0 failed; 0 ignored; 0 measured; 0 filtered out; finished in 1s",
            "[   20.1] random: crng init doneFREEBIND-GUEST-TEST check end 22.50 status 0[ 22.6] x timeout 0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let outcome = outcome("check", Path::new("/nonexistent"), &console);
        assert_eq!(outcome.status, Some(0));
        assert_eq!(outcome.seconds, Some(12));
        assert_eq!(outcome.summary.map(|s| s.passed), Some(1));
        assert_eq!(
            after_marker("xxFREEBIND-GUEST-EXIT 0", EXIT_MARKER).and_then(|w| leading_number(w[0])),
            Some(0)
        );
    }
}
