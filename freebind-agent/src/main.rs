use std::{ffi::OsString, path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};
use freebind_agent::{
    commands::{self, StateOptions, Target},
    logging, paths, systemd,
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
        serve: ServeArgs,
    },
    /// The system-wide agent: attaches what its config and `attach` ask for, pinned so that
    /// it outlives the daemon, and watches addresses in every network namespace attached
    /// processes live in. SIGHUP reloads the config; SIGTERM exits leaving it all attached.
    Daemon {
        /// The TOML config (`[[attach]]` tables); a missing default file means none.
        #[arg(long, env = "FREEBIND_CONFIG", value_name = "PATH")]
        config: Option<PathBuf>,
        #[command(flatten)]
        serve: ServeArgs,
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
        #[command(flatten)]
        serve: ServeArgs,
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
struct ServeArgs {
    /// Serve Prometheus metrics over HTTP on this address (e.g. 127.0.0.1:9797).
    #[arg(long, env = "FREEBIND_METRICS_ADDR", value_name = "ADDR:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Size of the bind-event ring buffer (a power of two, at least a page). When it is
    /// full, events are counted as dropped; binds are never slowed.
    #[arg(long, env = "FREEBIND_EVENT_RING_BYTES", value_name = "BYTES", default_value_t = freebind_common::EVENTS_BYTES)]
    event_ring_bytes: u32,
}

impl ServeArgs {
    fn options(&self) -> commands::ServeOptions {
        commands::ServeOptions {
            metrics: self.metrics_addr,
            event_ring_bytes: Some(self.event_ring_bytes),
        }
    }
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
    use anyhow::Context as _;
    let cli = Cli::command();
    match what {
        Generated::Completion { shell } => {
            let shell = match shell.as_str() {
                "bash" => clap_complete::Shell::Bash,
                "zsh" => clap_complete::Shell::Zsh,
                "fish" => clap_complete::Shell::Fish,
                other => anyhow::bail!("unknown shell {other:?} (bash, zsh or fish)"),
            };
            // clap_complete offers hidden subcommands too (clap-rs/clap#1335) and a Command
            // cannot drop one: the root is re-assembled from the same arguments and the
            // visible subcommands, so `hook` and `generate` stay unadvertised.
            let mut visible = clap::Command::new("freebind-agent")
                .version(env!("CARGO_PKG_VERSION"))
                .about(cli.get_about().cloned().unwrap_or_default())
                .subcommand_required(true)
                .args(cli.get_arguments().cloned())
                .subcommands(cli.get_subcommands().filter(|s| !s.is_hide_set()).cloned());
            // Into memory first: clap_complete panics when a write fails (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut visible, "freebind-agent", &mut script);
            let mut script = String::from_utf8(script).context("the script is not UTF-8")?;
            if shell == clap_complete::Shell::Bash {
                // The bash script's dispatch loop spells a subcommand's state
                // freebind__agent__subcmd__status, its case arms
                // freebind__subcmd__agent__subcmd__status: no subcommand option ever
                // completes for a binary with a hyphen (clap-rs/clap#6421, open).
                script = script.replace("freebind__subcmd__agent__", "freebind__agent__");
            }
            std::io::Write::write_all(&mut std::io::stdout(), script.as_bytes())
                .context("writing the completion script to stdout")?;
        }
        Generated::Man { dir } => {
            /// The command and its visible subcommands, depth first: one page each.
            fn pages(cmd: &clap::Command, out: &mut Vec<clap::Command>) {
                out.push(cmd.clone());
                for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                    pages(sub, out);
                }
            }
            /// Non-ASCII as groff's `\[uXXXX]`: without preconv (`groff -k`, which man-db
            /// runs but plain groff does not) troff reads its input as Latin-1, and the
            /// UTF-8 of `✘` would be invalid input characters.
            fn ascii(roff: &str) -> String {
                roff.chars()
                    .map(|c| match c {
                        c if c.is_ascii() => c.to_string(),
                        c => format!("\\[u{:04X}]", u32::from(c)),
                    })
                    .collect()
            }
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            // As clap_mangen::generate_to does: built (so subcommands are named
            // freebind-agent-SUB), without the `help` subcommand and hidden ones.
            let mut cli = cli.disable_help_subcommand(true);
            cli.build();
            let mut all = Vec::new();
            pages(&cli, &mut all);
            for cmd in all {
                let man = clap_mangen::Man::new(cmd);
                let path = dir.join(man.get_filename());
                let mut roff = Vec::new();
                man.render(&mut roff)
                    .with_context(|| format!("rendering {}", path.display()))?;
                std::fs::write(&path, ascii(&String::from_utf8_lossy(&roff)))
                    .with_context(|| format!("writing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.verbose);

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
        Command::Daemon { config, serve } => {
            commands::daemon(&state, config.as_deref(), &serve.options()).map(|()| 0)
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
            serve,
        } => commands::run(&state, cgroup, &policy.allow, netns, &serve.options()).map(|()| 0),
        Command::Status { json } => print(commands::status(&state, *json)),
        Command::Events { json } => commands::events(&state, *json).map(|()| 0),
        Command::Check => commands::check(),
        Command::Generate { what } => generate(what).map(|()| 0),
        Command::Exec {
            policy,
            netns,
            serve,
            cmd,
        } => commands::exec(
            &state,
            cmd,
            &policy.allow,
            netns.as_deref(),
            &serve.options(),
        ),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!(
                "{}freebind-agent: error: {e:#}",
                logging::stderr_prefix(log::Level::Error)
            );
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
