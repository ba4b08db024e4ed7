//! The agent's log lines, on stderr: env_logger's usual format on a terminal or in a file;
//! when stderr is connected to the journal (a systemd unit's default), each line starts
//! with its syslog priority instead (`<3>`, `<4>`, `<6>`, `<7>`, as sd-daemon(3) defines
//! them), which journald strips and stores as the entry's PRIORITY= — the journal keeps
//! its own timestamps and `journalctl -p` can filter.
use std::{
    io::Write as _,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    sync::atomic::{AtomicBool, Ordering},
};

use log::{Level, LevelFilter};

/// Set by [`init`] when stderr is the journal, for [`stderr_prefix`].
static TO_JOURNAL: AtomicBool = AtomicBool::new(false);

/// Installs the logger: info and above, `-v` debug, `-vv` trace (aya's own debug lines
/// only then); `FREEBIND_LOG` (env_logger's syntax, e.g. `freebind_agent::agent=trace`)
/// refines that.
pub fn init(verbose: u8) {
    let level = match verbose {
        0 => LevelFilter::Info,
        1 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    };
    let mut logger = env_logger::Builder::new();
    logger.filter_level(level);
    if verbose < 2 {
        // aya's own debug lines (relocations, one per instruction patched) drown freebind's.
        logger.filter_module("aya", LevelFilter::Info);
    }
    logger.parse_env("FREEBIND_LOG").format_target(false);
    if stderr_is_journal() {
        TO_JOURNAL.store(true, Ordering::Relaxed);
        logger
            .write_style(env_logger::WriteStyle::Never)
            .format(|buf, record| {
                buf.write_all(journal_lines(record.level(), &record.args().to_string()).as_bytes())
            });
    }
    logger.init();
}

/// The prefix a line written straight to stderr (not through `log`) needs at `level`:
/// its syslog priority when stderr is the journal, else nothing. Valid after [`init`].
pub fn stderr_prefix(level: Level) -> &'static str {
    if TO_JOURNAL.load(Ordering::Relaxed) {
        priority_prefix(level)
    } else {
        ""
    }
}

/// The syslog priority journald reads at the start of a line (sd-daemon.h: `SD_ERR`,
/// `SD_WARNING`, `SD_INFO`, `SD_DEBUG`); syslog has nothing below debug.
pub fn priority_prefix(level: Level) -> &'static str {
    match level {
        Level::Error => "<3>",
        Level::Warn => "<4>",
        Level::Info => "<6>",
        Level::Debug | Level::Trace => "<7>",
    }
}

/// One record for the journal: journald makes an entry of every line of the stream and
/// reads each line's own prefix, so a multi-line message carries it on every line.
fn journal_lines(level: Level, message: &str) -> String {
    let prefix = priority_prefix(level);
    let message = message.strip_suffix('\n').unwrap_or(message);
    message
        .split('\n')
        .map(|line| format!("{prefix}{line}\n"))
        .collect()
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` names
/// its device and inode (`DEV:INODE`, decimal), and only a descriptor with both is it —
/// a child that inherited the variable with its stderr redirected to a file is not
/// connected. systemd's own log.c (`stderr_is_journal()`) decides the same way.
pub fn stderr_is_journal() -> bool {
    let Ok(value) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(fd) = std::io::stderr().as_fd().try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| parse_journal_stream(&value) == Some((m.dev(), m.ino())))
}

/// `DEV:INODE` in decimal, as systemd sets `JOURNAL_STREAM`.
fn parse_journal_stream(value: &str) -> Option<(u64, u64)> {
    let (dev, ino) = value.split_once(':')?;
    Some((dev.parse().ok()?, ino.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_map_to_sd_daemon_priorities() {
        assert_eq!(priority_prefix(Level::Error), "<3>");
        assert_eq!(priority_prefix(Level::Warn), "<4>");
        assert_eq!(priority_prefix(Level::Info), "<6>");
        assert_eq!(priority_prefix(Level::Debug), "<7>");
        assert_eq!(priority_prefix(Level::Trace), "<7>");
    }

    #[test]
    fn every_line_of_a_record_carries_the_prefix() {
        assert_eq!(
            journal_lines(Level::Info, "address 192.0.2.10 is now local"),
            "<6>address 192.0.2.10 is now local\n"
        );
        assert_eq!(journal_lines(Level::Error, "a\nb\n"), "<3>a\n<3>b\n");
        assert_eq!(journal_lines(Level::Warn, ""), "<4>\n");
    }

    #[test]
    fn journal_stream_is_dev_colon_inode() {
        assert_eq!(parse_journal_stream("8:123456"), Some((8, 123456)));
        assert_eq!(
            parse_journal_stream("18446744073709551615:1"),
            Some((u64::MAX, 1))
        );
        for bad in ["", "8", "8:", ":1", "8:x", "-1:2", "8:1:2", " 8:1"] {
            assert_eq!(parse_journal_stream(bad), None, "{bad:?}");
        }
    }
}
