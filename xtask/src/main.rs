//! `cargo xtask …`: the steps that plain cargo cannot do alone — building the eBPF
//! object with nightly and bpf-linker, embedding it in the agent, and running the
//! privileged end-to-end tests.

mod bench;
mod build_steps;
mod cmd;
mod demo;
mod docs;
mod guest;
mod install;
mod paths;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::paths::Paths;

#[derive(Parser)]
#[command(
    bin_name = "cargo xtask",
    about = "freebind build, lint and test tasks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check (and install where possible) nightly rust-src, LLVM and bpf-linker.
    Setup,
    /// Build the eBPF object with nightly and bpf-linker.
    BuildEbpf,
    /// Build the eBPF object, then the agent that embeds it (release).
    Build,
    /// Run clippy with `-D warnings` on the workspace and on the eBPF crate.
    Clippy,
    /// Run the unit tests and the privileged end-to-end tests (both by default).
    Test(test::Options),
    /// Build the agent and run the demo.
    Demo,
    /// Build the agent and write its shell completions and man pages (generated from its
    /// command line definitions) into target/docs.
    Docs(docs::Options),
    /// Build the agent and install it with its systemd unit, example configuration,
    /// shell completions and man pages.
    Install(install::Options),
    /// Build the agent and run the benchmarks.
    Bench {
        /// Arguments passed to the benchmark: --rounds N (default 7), --iterations N (binds,
        /// connections or exchanges per measurement; default 20000), --threads K (load
        /// generator threads), --cpu C (the CPU servers and clients share), --only
        /// bind|bystanders|steer (repeatable).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> ExitCode {
    // Printed by hand: returning the error would print anyhow's backtrace whenever
    // RUST_BACKTRACE is set (as CI often does for the tests), burying the message.
    match dispatch() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch() -> anyhow::Result<()> {
    let paths = Paths::new();
    match Cli::parse().command {
        Command::Setup => setup::ensure(false).map(drop),
        Command::BuildEbpf => build_steps::build_ebpf(&paths).map(drop),
        Command::Build => build_steps::build(&paths),
        Command::Clippy => build_steps::clippy(&paths),
        Command::Test(options) => test::run_tests(&paths, &options),
        Command::Demo => {
            build_steps::build(&paths)?;
            demo::run(&paths)
        }
        Command::Docs(options) => docs::run(&paths, &options),
        Command::Install(options) => install::run(&paths, &options),
        Command::Bench { args } => {
            build_steps::build(&paths)?;
            bench::run(&paths, &args)
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::{Cli, Command};

    #[test]
    fn cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn bench_takes_trailing_args() {
        for argv in [
            &["xtask", "bench", "--rounds", "3", "x"][..],
            &["xtask", "bench", "--", "--rounds", "3", "x"][..],
        ] {
            let Command::Bench { args } = Cli::parse_from(argv).command else {
                panic!("{argv:?} is not bench");
            };
            assert_eq!(args, ["--rounds", "3", "x"], "{argv:?}");
        }
    }
}
