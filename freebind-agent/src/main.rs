use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Gives every socket of a cgroup's processes IP_FREEBIND semantics, so services can bind
/// addresses that are not (yet) configured.
#[derive(Debug, Parser)]
#[command(name = "freebind-agent", version, about)]
struct Cli {
    /// More detail in the logs (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
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

    let result = match &cli.command {
        Command::Run {
            cgroup,
            policy,
            netns,
        } => freebind_agent::commands::run(cgroup, &policy.allow, netns).map(|()| 0),
        Command::Exec { policy, netns, cmd } => {
            freebind_agent::commands::exec(cmd, &policy.allow, netns.as_deref())
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
