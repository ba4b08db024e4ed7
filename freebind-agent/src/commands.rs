//! The agent's verbs, each a short sequence over the library: check what can be checked
//! before anything changes, then act.
use std::{ffi::OsString, path::Path};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::Agent,
    cgroup::{Cgroup2, TransientCgroup},
    exec, kernel,
    netns::Netns,
    policy::Policy,
};

/// Everything that must hold before the agent touches the kernel. Runs before any thread
/// exists (see [`Cgroup2::locate_or_mount`]).
fn prepare(allow: &[String]) -> Result<(Policy, Cgroup2)> {
    let policy = Policy::parse(allow)?;
    kernel::check_privileges()?;
    let cg = Cgroup2::locate_or_mount()?;
    kernel::raise_memlock();
    kernel::check_features()?;
    Ok((policy, cg))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The namespaces named with `--netns`, opened before anything changes.
fn open_netns(names: &[String]) -> Result<Vec<Netns>> {
    names.iter().map(|n| Netns::named(n)).collect()
}

/// `run --cgroup PATH`: attach to an existing cgroup until SIGINT/SIGTERM.
pub fn run(cgroup: &Path, allow: &[String], netns: &[String]) -> Result<()> {
    let (policy, cg) = prepare(allow)?;
    let cgroup = cg.resolve(cgroup)?;
    let extra = open_netns(netns)?;
    runtime()?.block_on(async {
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut agent = Agent::start(&cgroup, &policy, extra)?;
        log::info!(
            "ready: serving {} until SIGINT or SIGTERM",
            cgroup.display()
        );
        let sig = agent
            .serve_until(async {
                tokio::select! {
                    _ = sigint.recv() => "SIGINT",
                    _ = sigterm.recv() => "SIGTERM",
                }
            })
            .await?;
        drop(agent);
        log::info!("{sig}: detached from {}", cgroup.display());
        Ok(())
    })
}

/// `exec [--netns NS] -- CMD`: a transient cgroup, attached, CMD in it (and in NS); returns
/// CMD's exit code.
pub fn exec(cmd: &[OsString], allow: &[String], netns: Option<&str>) -> Result<i32> {
    let (policy, cg) = prepare(allow)?;
    // CMD enters the namespace through a descriptor of its own, the agent serves it
    // through another.
    let cmd_netns = netns.map(Netns::named).transpose()?;
    let extra = netns.map(Netns::named).transpose()?.into_iter().collect();
    runtime()?.block_on(async {
        // Handlers first: a signal from here on is CMD's to receive, never a default
        // death of the agent that would leave the transient cgroup behind.
        let signals = exec::Signals::install()?;
        let transient = TransientCgroup::create(&cg)?;
        let mut agent = Agent::start(transient.path(), &policy, extra)?;
        log::info!("ready: running {} under freebind", cmd[0].to_string_lossy());
        let code = agent
            .serve_until(exec::run_in_cgroup(
                cmd,
                transient.path(),
                cmd_netns.as_ref(),
                signals,
            ))
            .await??;
        let left = transient.procs();
        if !left.is_empty() {
            log::warn!(
                "{} process(es) CMD left in {} (daemonized?) are being stopped: run daemons in the foreground under exec",
                left.len(),
                transient.path().display()
            );
            transient.kill_all();
        }
        drop(agent);
        drop(transient);
        Ok(code)
    })
}
