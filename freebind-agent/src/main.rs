use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use freebind_agent::{
    commands::{self, StateOptions, Target},
    paths, systemd,
};

/// Gives every socket of a cgroup's processes IP_FREEBIND semantics, so services can bind
/// addresses that are not (yet) configured.
#[derive(Debug, Parser)]
#[command(name = "freebind-agent", version, about)]
struct Cli {
    /// More detail in the logs (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Where pinned programs, maps and links live (on bpffs; mounted when missing).
    #[arg(long, global = true, env = "FREEBIND_PIN_DIR", value_name = "DIR", default_value = paths::DEFAULT_PIN_DIR)]
    pin_dir: PathBuf,
    /// Where the state lock, the daemon's control socket and attachment records live.
    #[arg(long, global = true, env = "FREEBIND_RUN_DIR", value_name = "DIR", default_value = paths::DEFAULT_RUN_DIR)]
    run_dir: PathBuf,
    /// systemd's private D-Bus socket, to resolve and configure units.
    #[arg(long, global = true, env = "FREEBIND_SYSTEMD_SOCKET", value_name = "PATH", default_value = systemd::DEFAULT_SYSTEMD_SOCKET)]
    systemd_socket: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Attach to an existing cgroup v2 directory and serve it in the foreground until
    /// SIGINT or SIGTERM, which detach.
    Run {
        /// The cgroup: relative to the cgroup v2 mount, or an absolute path below it.
        #[arg(long, env = "FREEBIND_CGROUP", value_name = "PATH")]
        cgroup: PathBuf,
        #[command(flatten)]
        policy: PolicyArgs,
        /// Also serve this network namespace (an `ip netns` name or a path such as
        /// /proc/PID/ns/net; repeatable). The agent's own is always served; binds in other
        /// namespaces are left to the kernel and logged as other-netns.
        #[arg(long = "netns", value_name = "NETNS")]
        netns: Vec<String>,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// The system-wide agent: attaches what its config and `attach` ask for, pinned so that
    /// it outlives the daemon, and watches addresses in every network namespace attached
    /// processes live in. SIGHUP reloads the config; SIGTERM exits leaving it all attached.
    Daemon {
        /// The TOML config (`[[attach]]` tables); a missing default file means none.
        #[arg(long, env = "FREEBIND_CONFIG", value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Attach to a unit, cgroup or process, pinned: enforcement outlives this command. Sent
    /// to the running daemon; done here when none runs.
    Attach {
        #[command(flatten)]
        target: TargetArgs,
        #[command(flatten)]
        policy: PolicyArgs,
    },
    /// Detach what `attach` (or the config) attached; `--all` removes everything pinned.
    Detach {
        #[command(flatten)]
        target: DetachArgs,
    },
    /// Run by a unit's ExecStartPre= (written by `attach --unit`): attaches the pinned
    /// programs to the unit's fresh cgroup where systemd did not.
    #[command(hide = true)]
    Hook {
        #[arg(long, value_name = "KEY")]
        key: String,
    },
    /// Every attachment, and every socket of the managed processes bound to an address
    /// that was not local at bind time or is not local now: live or dormant.
    Status {
        /// One JSON object instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// Follow the running daemon's bind decisions and the address changes that touch
    /// managed sockets, until interrupted.
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Whether this kernel and this process can run freebind: every program type, helper
    /// and map type it uses, BTF, cgroup v2, bpffs, capabilities; what to do about each ✘.
    Check,
    /// Print a shell completion script or a man page, generated from these definitions
    /// (used by `cargo xtask`).
    #[command(hide = true)]
    Generate {
        #[command(subcommand)]
        what: Generated,
    },
    /// Run CMD in a transient cgroup under freebind; exit with CMD's status.
    Exec {
        #[command(flatten)]
        policy: PolicyArgs,
        /// Run CMD in this network namespace (an `ip netns` name or a path), which the agent
        /// serves as well as its own.
        #[arg(long = "netns", value_name = "NETNS")]
        netns: Option<String>,
        /// The command and its arguments (after `--`).
        #[arg(required = true, trailing_var_arg = true, value_name = "CMD")]
        cmd: Vec<OsString>,
    },
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// A systemd unit: its cgroup at every start (a runtime drop-in with BPFProgram=).
    #[arg(long, value_name = "NAME")]
    unit: Option<String>,
    /// A cgroup, relative to the cgroup v2 mount or absolute below it; a glob follows the
    /// cgroups that match as they come and go.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// A process (a container's): its cgroup, and its network namespace served.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
}

#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
struct DetachArgs {
    /// The unit: its drop-in goes, and its running cgroup is detached.
    #[arg(long, value_name = "NAME")]
    unit: Option<String>,
    /// The cgroup path or glob, as attached.
    #[arg(long, value_name = "PATH")]
    cgroup: Option<PathBuf>,
    /// The process attached with `attach --pid`.
    #[arg(long, value_name = "PID")]
    pid: Option<u32>,
    /// Everything this installation pinned, and its records and drop-ins.
    #[arg(long)]
    all: bool,
}

fn target(unit: &Option<String>, cgroup: &Option<PathBuf>, pid: Option<u32>) -> Option<Target> {
    unit.clone()
        .map(Target::Unit)
        .or_else(|| cgroup.clone().map(Target::Cgroup))
        .or_else(|| pid.map(Target::Pid))
}

#[derive(Debug, Subcommand)]
enum Generated {
    /// A completion script for bash, zsh or fish.
    Completion {
        #[arg(value_name = "SHELL")]
        shell: String,
    },
    /// The man pages (freebind-agent.1 and one per subcommand) into DIR.
    Man {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct MetricsArgs {
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9797).
    #[arg(long, env = "FREEBIND_METRICS_ADDR", value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, clap::Args)]
struct PolicyArgs {
    /// A prefix that may be bound while not local (repeatable; default: any address).
    #[arg(
        long = "allow",
        env = "FREEBIND_ALLOW",
        value_delimiter = ',',
        value_name = "PREFIX"
    )]
    allow: Vec<String>,
}

/// Completion scripts and man pages come from the definitions above, so they never drift
/// from the parser.
fn generate(what: &Generated) -> anyhow::Result<()> {
    let _ = what;
    anyhow::bail!("not built yet")
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = match cli.verbose {
        0 => log::LevelFilter::Info,
        1 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    };
    let mut logger = env_logger::Builder::new();
    logger.filter_level(level);
    if cli.verbose < 2 {
        // aya's own debug lines (relocations, one per instruction patched) drown freebind's.
        logger.filter_module("aya", log::LevelFilter::Info);
    }
    logger.parse_env("FREEBIND_LOG").format_target(false).init();

    let state = StateOptions {
        dirs: paths::StateDirs::new(&cli.pin_dir, &cli.run_dir),
        systemd_socket: cli.systemd_socket.clone(),
    };
    let print = |r: anyhow::Result<String>| {
        r.map(|line| {
            println!("{line}");
            0
        })
    };
    let result = match &cli.command {
        Command::Daemon { config, metrics } => {
            commands::daemon(&state, config.as_deref(), metrics.metrics_addr).map(|()| 0)
        }
        Command::Attach { target: t, policy } => print(commands::attach(
            &state,
            &target(&t.unit, &t.cgroup, t.pid).expect("clap requires one"),
            &policy.allow,
        )),
        Command::Detach { target: t } => print(commands::detach(
            &state,
            target(&t.unit, &t.cgroup, t.pid).as_ref(),
        )),
        Command::Hook { key } => commands::hook(&state, key).map(|()| 0),
        Command::Run {
            cgroup,
            policy,
            netns,
            metrics,
        } => commands::run(cgroup, &policy.allow, netns, metrics.metrics_addr).map(|()| 0),
        Command::Status { json } => print(commands::status(&state, *json)),
        Command::Events { json } => commands::events(&state, *json).map(|()| 0),
        Command::Check => commands::check(),
        Command::Generate { what } => generate(what).map(|()| 0),
        Command::Exec { policy, netns, cmd } => {
            commands::exec(cmd, &policy.allow, netns.as_deref())
        }
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("freebind-agent: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn exec_takes_everything_after_the_separator() {
        let cli = Cli::try_parse_from([
            "freebind-agent",
            "exec",
            "--allow",
            "192.0.2.0/24",
            "--",
            "socat",
            "-v",
            "x",
        ])
        .unwrap();
        let Command::Exec { policy, cmd, .. } = cli.command else {
            panic!()
        };
        assert_eq!(policy.allow, ["192.0.2.0/24"]);
        assert_eq!(cmd, ["socat", "-v", "x"]);
    }

    #[test]
    fn exec_takes_a_network_namespace_for_cmd() {
        let cli = Cli::try_parse_from(["freebind-agent", "exec", "--netns", "ap", "--", "socat"])
            .unwrap();
        let Command::Exec { netns, cmd, .. } = cli.command else {
            panic!()
        };
        assert_eq!(netns.as_deref(), Some("ap"));
        assert_eq!(cmd, ["socat"]);
    }
}
