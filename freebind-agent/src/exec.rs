//! `exec`: CMD in a transient cgroup, with its stdio untouched and INT/TERM/HUP forwarded.
use std::{
    ffi::OsString,
    fs::OpenOptions,
    io,
    os::{
        fd::{AsFd as _, AsRawFd as _},
        unix::process::ExitStatusExt as _,
    },
    path::Path,
};

use anyhow::{Context as _, Result};

use crate::netns::Netns;
use tokio::{
    process::Command,
    signal::unix::{signal, Signal, SignalKind},
};

/// The signals `exec` relays to CMD.
pub struct Signals {
    int: Signal,
    term: Signal,
    hup: Signal,
    /// The agent is in the terminal's foreground process group, which CMD shares: the
    /// terminal's own SIGINT/SIGHUP reach CMD directly and must not arrive twice.
    on_terminal: bool,
}

impl Signals {
    pub fn install() -> Result<Self> {
        // SAFETY: plain queries of our own stdin and process group.
        let on_terminal = unsafe { libc::isatty(0) == 1 && libc::tcgetpgrp(0) == libc::getpgrp() };
        Ok(Self {
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            hup: signal(SignalKind::hangup()).context("installing the SIGHUP handler")?,
            on_terminal,
        })
    }

    /// The next signal to pass on to CMD.
    async fn next(&mut self) -> i32 {
        loop {
            let sig = tokio::select! {
                _ = self.int.recv() => libc::SIGINT,
                _ = self.term.recv() => libc::SIGTERM,
                _ = self.hup.recv() => libc::SIGHUP,
            };
            if sig == libc::SIGTERM || !self.on_terminal {
                return sig;
            }
            log::debug!("signal {sig} came from the terminal, which delivered it to CMD too");
        }
    }
}

/// Runs CMD in `cgroup` (and in `netns` when given) and returns the exit code a shell would
/// report for it.
pub async fn run_in_cgroup(
    cmd: &[OsString],
    cgroup: &Path,
    netns: Option<&Netns>,
    mut signals: Signals,
) -> Result<i32> {
    let netns_fd = netns.map(|n| n.as_fd().as_raw_fd());
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let procs_fd = procs.as_raw_fd();
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: only write(2) and setns(2) run between fork and exec. Joining here, before
    // exec, means CMD's very first socket is already under the attached programs, and in
    // the namespace the agent already serves.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            if let Some(fd) = netns_fd {
                if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let name = cmd[0].to_string_lossy().into_owned();
    let mut child = match command.spawn() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.kind() == io::ErrorKind::NotFound {
                127
            } else {
                126
            };
            log::error!("cannot run {name}: {e}");
            return Ok(code);
        }
    };
    drop(procs);
    let pid = child.id().context("child pid")? as i32;
    log::info!("started {name} (pid {pid}) in cgroup {}", cgroup.display());

    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status.context("waiting for CMD")?,
            sig = signals.next() => sig,
        };
        log::debug!("forwarding signal {sig} to pid {pid}");
        // SAFETY: kill(2) on our own child's pid, which we have not reaped yet.
        unsafe { libc::kill(pid, sig) };
    };
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    log::info!("{name} (pid {pid}) exited: {status}");
    Ok(code)
}
