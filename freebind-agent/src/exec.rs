//! `exec`: CMD in a transient cgroup, with its stdio untouched and INT/TERM/HUP forwarded.
use std::{
    ffi::OsString,
    fs::OpenOptions,
    io,
    os::{fd::AsRawFd as _, unix::process::ExitStatusExt as _},
    path::Path,
};

use anyhow::{Context as _, Result};
use tokio::{
    process::Command,
    signal::unix::{signal, SignalKind},
};

/// Runs CMD in `cgroup` and returns the exit code a shell would report for it.
pub async fn run_in_cgroup(cmd: &[OsString], cgroup: &Path) -> Result<i32> {
    let procs_path = cgroup.join("cgroup.procs");
    let procs = OpenOptions::new()
        .write(true)
        .open(&procs_path)
        .with_context(|| format!("opening {}", procs_path.display()))?;
    let procs_fd = procs.as_raw_fd();
    let mut command = Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    // SAFETY: only write(2) runs between fork and exec. Joining here, before exec, means
    // CMD's very first socket is already under the attached programs.
    unsafe {
        command.pre_exec(move || {
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
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

    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    let status = loop {
        let sig = tokio::select! {
            status = child.wait() => break status.context("waiting for CMD")?,
            _ = sigint.recv() => libc::SIGINT,
            _ = sigterm.recv() => libc::SIGTERM,
            _ = sighup.recv() => libc::SIGHUP,
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
