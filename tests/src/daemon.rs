//! The agent as a system-wide daemon: an installation of its own per test (pin and run
//! directories with unique names), daemons started in a test's network namespace, and the
//! `attach`/`detach` commands pointed at that installation.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::agent::agent_command;
use crate::netns::Netns;
use crate::process::{wait_for_log, Proc};
use crate::sandbox::ensure_bpffs;
use crate::util::{output_of, unique_name};

/// How long a daemon may take to say "ready".
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// One freebind installation: `--pin-dir` under bpffs and `--run-dir` under /run, both
/// unique. Dropping it runs `detach --all` against it (no daemon may be running by then:
/// drop daemons first) and removes both directories.
#[derive(Debug)]
pub struct Installation {
    pin: PathBuf,
    run: PathBuf,
}

impl Installation {
    /// A fresh installation; nothing is created until an agent uses it.
    pub fn new(prefix: &str) -> Installation {
        // The agent mounts bpffs itself only when it can tell that it shares PID 1's mount
        // namespace; where it cannot (PID 1's namespace links unreadable), it refuses, and
        // every attach would fail for that reason instead of the one a test means.
        Installation::below(ensure_bpffs(), prefix)
    }

    /// [`Installation::new`] with its pin directory in the bpffs mounted at `bpffs` (a
    /// test's own mount).
    pub fn below(bpffs: &Path, prefix: &str) -> Installation {
        let name = unique_name(prefix);
        Installation {
            pin: bpffs.join(&name),
            run: Path::new("/run").join(&name),
        }
    }

    /// The pin directory (`--pin-dir`).
    pub fn pin_dir(&self) -> &Path {
        &self.pin
    }

    /// The run directory (`--run-dir`).
    pub fn run_dir(&self) -> &Path {
        &self.run
    }

    /// `freebind-agent --pin-dir … --run-dir … ARGS`, entering `ns` when given (setns only:
    /// the mounts stay the host's, so bpffs and the cgroup hierarchy are the real ones).
    pub fn command(&self, ns: Option<&Netns>, args: &[&str]) -> Command {
        let mut cmd = agent_command();
        cmd.arg("--pin-dir")
            .arg(&self.pin)
            .arg("--run-dir")
            .arg(&self.run)
            .args(args);
        if let Some(ns) = ns {
            ns.enter_on_exec(&mut cmd);
        }
        cmd
    }

    /// Runs a one-shot command (`attach`, `detach`) to completion.
    pub fn run(&self, args: &[&str]) -> Output {
        output_of(&mut self.command(None, args))
    }

    /// Runs a one-shot command and panics with its output unless it succeeds.
    pub fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "freebind-agent {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Attachment keys pinned now (directories under `PIN/attach`).
    pub fn pinned_attachments(&self) -> Vec<String> {
        let mut keys: Vec<String> = fs::read_dir(self.pin.join("attach"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        keys.sort();
        keys
    }
}

impl Drop for Installation {
    fn drop(&mut self) {
        if self.pin.exists() || self.run.exists() {
            let out = output_of(&mut self.command(None, &["detach", "--all"]));
            if !out.status.success() {
                eprintln!(
                    "freebind-e2e: detach --all for {}: {}",
                    self.pin.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        for dir in [&self.pin, &self.run] {
            if dir.exists() {
                if let Err(e) = fs::remove_dir_all(dir) {
                    eprintln!("freebind-e2e: cannot remove {}: {e}", dir.display());
                }
            }
        }
    }
}

/// A running `freebind-agent daemon` of an installation, in a test's network namespace.
/// Dropping it stops it with SIGTERM (the pins stay, as they would in production).
#[derive(Debug)]
pub struct Daemon {
    proc: Proc,
}

impl Daemon {
    /// Starts the daemon with `args` after `daemon` (e.g. `--config F`) and waits for
    /// "ready".
    pub fn start(inst: &Installation, ns: &Netns, args: &[&str]) -> Daemon {
        let mut full = vec!["daemon"];
        full.extend_from_slice(args);
        let daemon = Daemon {
            proc: Proc::spawn(inst.command(Some(ns), &full), "freebind-daemon"),
        };
        wait_for_log(&daemon.proc, "ready:", READY_TIMEOUT);
        daemon
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Everything it logged so far.
    pub fn log(&self) -> String {
        self.proc.log()
    }

    /// The process guard (signals, waits).
    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    /// SIGKILL, as an OOM kill or a crash would end it.
    pub fn kill_9(&self) {
        self.proc.signal(libc::SIGKILL);
        self.proc.wait_timeout(Duration::from_secs(10));
    }
}
