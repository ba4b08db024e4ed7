use std::{env, time::Duration};

use anyhow::{bail, Context as _, Result};

use crate::{
    build_steps::{build, build_ebpf, workspace_cargo},
    cmd::run,
    guest,
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
    /// Also run the long variants of the end-to-end tests (sets FREEBIND_LONG=1 for them).
    #[arg(long)]
    long: bool,
    /// Run the end-to-end tests in a QEMU guest booting Debian's kernel of this series
    /// (`6.1`, `6.12`) instead of on this machine's kernel. The package is downloaded once
    /// into /var/cache/freebind-kernels.
    #[arg(long, value_name = "VERSION")]
    kernel: Option<String>,
    /// With --kernel: the test files to run in the guest (repeatable; default: every file
    /// but those left to the host, see xtask/src/guest.rs).
    #[arg(long = "guest-test", value_name = "FILE", requires = "kernel")]
    guest_tests: Vec<String>,
    /// With --kernel: seconds after which the guest is stopped and the run fails.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 3600,
        requires = "kernel"
    )]
    guest_timeout: u64,
    /// With --kernel: seconds each test file (one binary) may take in the guest before it
    /// is stopped and counted as failed.
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 1200,
        requires = "kernel"
    )]
    guest_test_timeout: u64,
    /// Passed to the test harness: a test-name filter, `--nocapture`, … With --kernel, a
    /// file that runs no test fails, unless a filter excluded all of its tests; and the
    /// run fails when no test ran at all.
    #[arg(last = true)]
    args: Vec<String>,
}

pub fn run_tests(paths: &Paths, options: &Options) -> Result<()> {
    if let Some(kernel) = &options.kernel {
        return guest_tests(paths, options, kernel);
    }
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
        if options.long {
            cmd.env(LONG_ENV, "1");
        }
        // Each test runs real servers and its own agent: keep parallelism low. libtest
        // refuses the flag twice, so a caller's --test-threads wins.
        if !options.args.iter().any(|a| a.starts_with("--test-threads")) {
            cmd.arg("--test-threads=2");
        }
        run(cmd.args(&options.args)).context("end-to-end tests")?;
    }
    Ok(())
}

/// Read by the end-to-end tests: run the long variants too.
const LONG_ENV: &str = "FREEBIND_LONG";

/// The end-to-end tests in a guest booting another kernel: needs root (the kernel cache,
/// apt), and the systemd sandbox root for the files that boot systemd, built here because
/// the guest has no network.
fn guest_tests(paths: &Paths, options: &Options, kernel: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "testing another kernel needs root (apt-get, {}): run \
             `sudo -E env \"PATH=$PATH\" cargo xtask test --kernel {kernel}`",
            guest::KERNEL_CACHE
        );
    }
    if options.unit {
        bail!("--kernel runs the end-to-end tests only; drop --unit");
    }
    build(paths)?;
    let sandbox = options.guest_tests.is_empty()
        || options
            .guest_tests
            .iter()
            .any(|t| guest::NEED_SANDBOX_ROOT.contains(&t.as_str()));
    if sandbox {
        sandbox_root()?;
    }
    let mut env = Vec::new();
    if options.long {
        env.push((LONG_ENV.to_string(), "1".to_string()));
    }
    if in_ci() {
        env.push(("CI".to_string(), "true".to_string()));
    }
    guest::run(
        paths,
        &guest::Options {
            kernel,
            tests: options.guest_tests.clone(),
            env,
            args: &options.args,
            timeout: Duration::from_secs(options.guest_timeout),
            test_timeout: Duration::from_secs(options.guest_test_timeout),
        },
    )
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
