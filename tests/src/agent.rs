//! The binary under test, `freebind-agent`, run as the tests (and a user) would run it.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::netns::Netns;
use crate::process::Proc;
use crate::util::unique_name;

/// Environment variable naming the agent binary; `cargo xtask test` sets it.
pub const AGENT_ENV: &str = "FREEBIND_AGENT";

/// How long [`Agent::run`] waits for the agent to say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Grace period between SIGTERM and SIGKILL when stopping the agent: it detaches its
/// programs on the way out.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The agent binary, from `FREEBIND_AGENT` (made absolute). Panics when it is unset or
/// does not exist: these tests are meant to run through `cargo xtask test`, which builds
/// the eBPF object and the agent first.
pub fn agent_path() -> PathBuf {
    let raw = std::env::var_os(AGENT_ENV)
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| {
            panic!(
                "{AGENT_ENV} is not set: run through `cargo xtask test`, which builds the agent \
             and points {AGENT_ENV} at it"
            )
        });
    let path = PathBuf::from(&raw);
    std::fs::canonicalize(&path).unwrap_or_else(|e| {
        panic!(
            "{AGENT_ENV}={} cannot be used: {e}; run through `cargo xtask test`",
            path.display()
        )
    })
}

/// A `Command` for a one-off run of the agent binary (e.g. `--help`, bad input), in the
/// test's own namespaces.
pub fn agent_command() -> Command {
    let mut cmd = Command::new(agent_path());
    default_log_level(&mut cmd);
    cmd
}

/// Lets the agent's info-level lines (including "ready") reach the log unless the
/// caller chose a level with RUST_LOG.
fn default_log_level(cmd: &mut Command) {
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
}

/// Whether `log` has a line with the word `ready` in it ("already" does not count).
fn says_ready(log: &str) -> bool {
    log.lines().any(|line| {
        line.match_indices("ready").any(|(i, _)| {
            let before = line[..i].chars().next_back();
            let after = line[i + "ready".len()..].chars().next();
            !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                && !after.is_some_and(|c| c.is_alphanumeric() || c == '_')
        })
    })
}

/// A running `freebind-agent run` managing one cgroup, started through
/// `ip netns exec <ns>` (which remounts `/sys`, hiding the host's cgroup mounts: the
/// agent must cope, as it would under a unit with its own namespaces).
///
/// `ip netns exec` execs the agent without forking, so the pid is the agent's. Dropping
/// the guard sends SIGTERM, waits up to 10 s, then SIGKILL; if the thread is panicking,
/// the agent's log is printed.
#[derive(Debug)]
pub struct Agent {
    proc: Proc,
    /// The run directory made for it (its foreground record goes there, not into the
    /// host's /run/freebind), when the caller named none.
    run_dir: Option<PathBuf>,
}

impl Agent {
    /// Starts `ip netns exec NS $FREEBIND_AGENT run --cgroup <cgroup.relative()>
    /// extra_args...` and waits (up to 30 s) until its output has a line with the word
    /// "ready"; panics with the log if it exits first or never says so.
    pub fn run(ns: &Netns, cgroup: &Cgroup, extra_args: &[&str]) -> Agent {
        Agent::run_binary(&agent_path(), ns, cgroup, extra_args)
    }

    /// [`Agent::run`] with an explicit binary instead of `FREEBIND_AGENT` (for testing the
    /// test bed itself with a stand-in).
    pub fn run_binary(binary: &Path, ns: &Netns, cgroup: &Cgroup, extra_args: &[&str]) -> Agent {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name()])
            .arg(binary)
            .args(["run", "--cgroup", cgroup.relative()])
            .args(extra_args);
        let run_dir = (!extra_args.contains(&"--run-dir"))
            .then(|| Path::new("/run").join(unique_name("fb-agent-run")));
        if let Some(dir) = &run_dir {
            cmd.arg("--run-dir").arg(dir);
        }
        default_log_level(&mut cmd);
        let agent = Agent {
            run_dir,
            proc: Proc::spawn(cmd, "freebind-agent"),
        };
        agent.wait_ready(READY_TIMEOUT);
        agent
    }

    fn wait_ready(&self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if says_ready(&self.proc.log()) {
                return;
            }
            if let Some(status) = self.proc.try_wait() {
                let log = self.proc.log();
                if says_ready(&log) {
                    return;
                }
                panic!("freebind-agent exited ({status}) before it was ready; log:\n{log}");
            }
            if start.elapsed() >= timeout {
                panic!(
                    "freebind-agent (pid {}) not ready after {timeout:?}; log:\n{}",
                    self.proc.pid(),
                    self.proc.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything the agent wrote to stdout and stderr so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The underlying process guard (for [`crate::wait_for_log`], `try_wait`, signals).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// Sends SIGTERM and waits (SIGKILL after 10 s); returns the exit status. Safe to call
    /// more than once; the log stays readable afterwards.
    pub fn stop(&self) -> ExitStatus {
        self.proc.terminate(STOP_GRACE)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        // Stop it first so the log printed by Proc's Drop (when panicking) includes the
        // agent's shutdown lines.
        self.proc.terminate_quiet(STOP_GRACE);
        if let Some(dir) = &self.run_dir {
            if let Err(e) = std::fs::remove_dir_all(dir) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("freebind-e2e: cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

#[cfg(test)]
mod unit {
    use super::says_ready;

    #[test]
    fn ready_is_a_word() {
        assert!(says_ready("[INFO freebind] ready: attached 9 programs\n"));
        assert!(says_ready("x\nready\n"));
        assert!(says_ready("agent is ready."));
        assert!(!says_ready("program already attached\n"));
        assert!(!says_ready("not_ready_yet"));
        assert!(!says_ready(""));
    }
}
