use std::{env, ffi::OsString, process::Command};

use anyhow::{bail, Context as _, Result};

use crate::{cmd::run, paths::Paths, setup};

/// Builds the eBPF object (release) with nightly and bpf-linker.
pub fn build_ebpf(paths: &Paths) -> Result<setup::Toolchain> {
    let toolchain = setup::ensure(true)?;
    run(ebpf_cargo(paths, &toolchain)?.args(["build", "--release"]))
        .context("building the eBPF programs")?;
    if !paths.ebpf_object.is_file() {
        bail!(
            "the eBPF build succeeded but left no {}",
            paths.ebpf_object.display()
        );
    }
    println!("eBPF object: {}", paths.ebpf_object.display());
    Ok(toolchain)
}

/// Builds the eBPF object, then the release agent that embeds it.
pub fn build(paths: &Paths) -> Result<()> {
    build_ebpf(paths)?;
    run(workspace_cargo(paths).args(["build", "--release", "-p", "freebind-agent"]))
        .context("building the agent")?;
    if !paths.agent.is_file() {
        bail!(
            "the agent build succeeded but left no {}",
            paths.agent.display()
        );
    }
    println!("agent: {}", paths.agent.display());
    Ok(())
}

/// Clippy with `-D warnings`: the workspace (stable), then the eBPF crate (nightly).
/// Both passes run, so one report shows every finding.
pub fn clippy(paths: &Paths) -> Result<()> {
    // The agent's build script embeds the object, so it must exist first.
    let toolchain = build_ebpf(paths)?;
    let workspace = run(workspace_cargo(paths).args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))
    .context("clippy on the workspace");
    setup::ensure_component("clippy", true)?;
    let ebpf =
        run(ebpf_cargo(paths, &toolchain)?.args(["clippy", "--release", "--", "-D", "warnings"]))
            .context("clippy on the eBPF crate");
    workspace.and(ebpf)
}

/// cargo in the workspace, with the toolchain `cargo xtask` runs under, and the
/// eBPF object the agent's build script embeds.
pub fn workspace_cargo(paths: &Paths) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&paths.root)
        .env("FREEBIND_EBPF_OBJECT", &paths.ebpf_object);
    cmd
}

/// cargo in the eBPF crate, under that crate's own nightly pin.
fn ebpf_cargo(paths: &Paths, toolchain: &setup::Toolchain) -> Result<Command> {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&paths.ebpf_crate)
        // Cargo exports RUSTUP_TOOLCHAIN (stable) to `cargo xtask`; it would override
        // freebind-ebpf/rust-toolchain.toml, and so would an inherited RUSTC.
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        // The object must land where the agent's build script looks by default.
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("CARGO_BUILD_TARGET_DIR");
    // rustc finds the linker on PATH: make it the bpf-linker setup checked.
    if let Some(dir) = toolchain.bpf_linker.parent() {
        let path = env::var_os("PATH").unwrap_or_default();
        let dirs = [dir.to_path_buf()]
            .into_iter()
            .chain(env::split_paths(&path));
        let path: OsString = env::join_paths(dirs).context("joining PATH")?;
        cmd.env("PATH", path);
    }
    Ok(cmd)
}
