use std::env;

use anyhow::{bail, Context as _, Result};

use crate::{
    build_steps::{build, build_ebpf, workspace_cargo},
    cmd::run,
    paths::Paths,
    setup::is_root,
};

#[derive(clap::Args)]
pub struct Options {
    /// Run the unprivileged unit tests (with neither flag: both kinds).
    #[arg(long)]
    unit: bool,
    /// Run the privileged end-to-end tests, as root (with neither flag: both kinds).
    #[arg(long)]
    e2e: bool,
    /// Passed to the test harness: a test-name filter, `--nocapture`, …
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run_tests(paths: &Paths, options: &Options) -> Result<()> {
    let both = !options.unit && !options.e2e;
    let (unit, e2e) = (both || options.unit, both || options.e2e);
    // Refuse before building anything: `cargo xtask test` promises the end-to-end
    // tests, and in CI a privileged test that cannot run is a failure, not a skip.
    if e2e && !is_root() {
        if in_ci() {
            bail!(
                "the privileged end-to-end tests must run in CI: run as root \
                 (they create cgroups and network namespaces and attach eBPF programs)"
            );
        }
        bail!(
            "the end-to-end tests need root (they create cgroups and network namespaces and \
             attach eBPF programs): run `sudo -E env \"PATH=$PATH\" cargo xtask test`, \
             or `cargo xtask test --unit` for the unprivileged tests alone"
        );
    }
    // Unit tests need only the object the agent embeds; e2e tests run the release agent.
    if e2e {
        build(paths)?;
        sandbox_root()?;
    } else {
        build_ebpf(paths)?;
    }
    if unit {
        let mut cmd = workspace_cargo(paths);
        cmd.args(["test", "--workspace", "--exclude", "freebind-e2e"]);
        if !options.args.is_empty() {
            cmd.arg("--").args(&options.args);
        }
        run(&mut cmd).context("unit tests")?;
    }
    if e2e {
        let mut cmd = workspace_cargo(paths);
        // --tests: the test bed has no doctests, and an empty doctest run would be the
        // last "test result" line CI reads.
        cmd.args(["test", "--release", "-p", "freebind-e2e", "--tests", "--"])
            .env("FREEBIND_AGENT", &paths.agent);
        // Each test runs real servers and its own agent: keep parallelism low. libtest
        // refuses the flag twice, so a caller's --test-threads wins.
        if !options.args.iter().any(|a| a.starts_with("--test-threads")) {
            cmd.arg("--test-threads=2");
        }
        run(cmd.args(&options.args)).context("end-to-end tests")?;
    }
    Ok(())
}

/// The systemd sandbox tests boot Debian from a cached root made by debootstrap (about
/// a minute, once, network needed): made here, with its own message, rather than
/// silently inside the first test that needs it. Offline, the other end-to-end tests can
/// still run, so outside CI a failure is only a warning (the sandbox tests then fail).
fn sandbox_root() -> Result<()> {
    match std::panic::catch_unwind(freebind_e2e::sandbox_root) {
        Ok(_) => Ok(()),
        Err(_) if !in_ci() => {
            eprintln!(
                "warning: no systemd sandbox root (see the message above); \
                 the sandbox tests will fail"
            );
            Ok(())
        }
        Err(_) => bail!("cannot build the systemd sandbox root (see the message above)"),
    }
}

fn in_ci() -> bool {
    env::var("CI").is_ok_and(|ci| !ci.is_empty() && ci != "false" && ci != "0")
}
