//! Checks what the eBPF build needs and installs what can be installed without
//! surprising the user: rustup components, LLVM from apt (as root), bpf-linker.
//! Toolchains themselves are never installed or updated here.

use std::{
    env, fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{display, output, step};

/// What the eBPF build needs from this machine, once [`ensure`] has checked it.
pub struct Toolchain {
    /// The bpf-linker to use; the eBPF build puts its directory first on PATH.
    pub bpf_linker: PathBuf,
}

/// Checks every prerequisite, installing what is missing. Fast when all is there:
/// no network and no apt unless something has to be installed.
pub fn ensure(quiet_if_ok: bool) -> Result<Toolchain> {
    let ok = |what: String| {
        if !quiet_if_ok {
            println!("✔ {what}");
        }
    };
    ensure_nightly()?;
    ok("nightly toolchain present".into());
    ensure_component("rust-src", quiet_if_ok)?;
    let major = nightly_llvm_major()?;
    ok(format!("nightly rustc uses LLVM {major}"));
    ensure_llvm(major)?;
    ok(format!("LLVM {major} at {}", llvm_prefix(major).display()));
    let (bpf_linker, version) = ensure_bpf_linker(major)?;
    // An undetermined LLVM was already reported as a warning, not a ✔.
    if let Some(version) = version {
        ok(format!(
            "{version} built against LLVM {major} ({})",
            bpf_linker.display()
        ));
    }
    Ok(Toolchain { bpf_linker })
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn ensure_nightly() -> Result<()> {
    let list = output(Command::new("rustup").args(["toolchain", "list"]))
        .context("rustup is needed to build the eBPF programs (https://rustup.rs)")?;
    // `nightly-<host>` is what freebind-ebpf/rust-toolchain.toml pins; a dated
    // `nightly-2026-…` toolchain does not satisfy it.
    let present = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| {
            name == "nightly"
                || name
                    .strip_prefix("nightly-")
                    .is_some_and(|rest| !rest.starts_with(|c: char| c.is_ascii_digit()))
        });
    if !present {
        bail!(
            "no nightly toolchain: the eBPF programs build with nightly \
             (freebind-ebpf/rust-toolchain.toml); install it with `rustup toolchain install nightly`"
        );
    }
    Ok(())
}

/// Adds a nightly rustup component if it is missing (`rust-src` for build-std,
/// `clippy` for the eBPF lint pass).
pub fn ensure_component(component: &str, quiet_if_ok: bool) -> Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    let present = installed
        .lines()
        .map(str::trim)
        .any(|line| line == component || line.starts_with(&format!("{component}-")));
    if present {
        if !quiet_if_ok {
            println!("✔ nightly {component} present");
        }
        return Ok(());
    }
    step(
        &format!("installing nightly {component}"),
        Command::new("rustup").args(["component", "add", component, "--toolchain", "nightly"]),
    )
}

fn nightly_llvm_major() -> Result<u32> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    parse_llvm_major(&version).context("no `LLVM version: N.…` line in `rustc +nightly -vV`")
}

fn parse_llvm_major(rustc_version: &str) -> Option<u32> {
    rustc_version
        .lines()
        .find_map(|line| line.strip_prefix("LLVM version:"))?
        .trim()
        .split('.')
        .next()?
        .parse()
        .ok()
}

fn llvm_prefix(major: u32) -> PathBuf {
    PathBuf::from(format!("/usr/lib/llvm-{major}"))
}

fn ensure_llvm(major: u32) -> Result<()> {
    let llvm_config = llvm_prefix(major).join("bin/llvm-config");
    if llvm_config.is_file() {
        return Ok(());
    }
    let package = format!("llvm-{major}-dev");
    if !is_root() {
        bail!(
            "{} is missing: bpf-linker must be built against nightly rustc's LLVM ({major}). \
             Install it as root: `apt-get update && apt-get install -y {package}`",
            llvm_config.display()
        );
    }
    let policy = output(Command::new("apt-cache").args(["policy", &package]))
        .context("installing LLVM needs apt (Debian/Ubuntu)")?;
    if !has_candidate(&policy) {
        step(
            &format!("refreshing package lists (apt has no {package})"),
            Command::new("apt-get").arg("update"),
        )?;
    }
    step(
        &format!("installing LLVM {major}"),
        Command::new("apt-get")
            .args(["install", "-y", &package])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .with_context(|| {
        format!("if apt has no {package}, add the repository from https://apt.llvm.org")
    })?;
    if !llvm_config.is_file() {
        bail!(
            "{package} is installed but {} is missing",
            llvm_config.display()
        );
    }
    Ok(())
}

fn has_candidate(apt_cache_policy: &str) -> bool {
    apt_cache_policy
        .lines()
        .filter_map(|line| line.trim().strip_prefix("Candidate:"))
        .any(|candidate| candidate.trim() != "(none)")
}

/// Returns the bpf-linker to use and, when its LLVM is known to match, its
/// `--version` line; installs it with cargo when it is missing, broken or built
/// against another LLVM than nightly rustc's.
fn ensure_bpf_linker(major: u32) -> Result<(PathBuf, Option<String>)> {
    let cargo_installed = cargo_home().join("bin/bpf-linker");
    let reason = match find_bpf_linker(&cargo_installed) {
        None => "not found".to_owned(),
        Some(path) => match inspect_bpf_linker(&path)? {
            Linker::Llvm(version, found) if found == major => return Ok((path, Some(version))),
            Linker::Llvm(_, found) => format!("{} uses LLVM {found}", path.display()),
            Linker::Broken(why) => why,
            Linker::Unknown(version) => {
                println!(
                    "? cannot tell which LLVM {version} ({}) was built against \
                     (statically linked?); if linking the eBPF object fails, run: {}",
                    path.display(),
                    display(&install_command(major, false))
                );
                return Ok((path, None));
            }
        },
    };
    step(
        &format!("installing bpf-linker for LLVM {major} ({reason})"),
        &mut install_command(major, cargo_installed.exists()),
    )?;
    match inspect_bpf_linker(&cargo_installed)? {
        Linker::Llvm(version, found) if found == major => Ok((cargo_installed, Some(version))),
        _ => bail!(
            "{} still does not use LLVM {major} after installing it",
            cargo_installed.display()
        ),
    }
}

fn install_command(major: u32, replace: bool) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.env("LLVM_PREFIX", llvm_prefix(major)).args([
        "install",
        "bpf-linker",
        "--no-default-features",
        "--features",
        &format!("llvm-{major}"),
        "--locked",
    ]);
    // A bpf-linker that cargo did not install (binstall, a copy) is only replaced
    // with --force.
    if replace {
        cmd.arg("--force");
    }
    cmd
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| Path::new(&home).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from(".cargo"))
}

/// PATH first, as rustc will look there; then cargo's bin directory, which the
/// eBPF build adds to PATH.
fn find_bpf_linker(cargo_installed: &Path) -> Option<PathBuf> {
    let is_executable = |path: &Path| {
        fs::metadata(path)
            .is_ok_and(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
    };
    env::var_os("PATH")
        .iter()
        .flat_map(env::split_paths)
        .map(|dir| dir.join("bpf-linker"))
        .chain([cargo_installed.to_path_buf()])
        .find(|path| is_executable(path))
}

enum Linker {
    /// `--version` line and the LLVM major it uses.
    Llvm(String, u32),
    /// `--version` line; the LLVM could not be determined.
    Unknown(String),
    Broken(String),
}

/// bpf-linker 0.13 prints no LLVM version of its own. Built against a shared
/// libLLVM (what `LLVM_PREFIX=… --features llvm-N` produces from Debian's packages),
/// its dynamic dependencies name the library it really loads; for a static build
/// that cargo installed, the `llvm-N` feature it recorded in .crates2.json says it.
fn inspect_bpf_linker(path: &Path) -> Result<Linker> {
    let version = match output(Command::new(path).arg("--version")) {
        Ok(version) => version.trim().to_owned(),
        Err(error) => return Ok(Linker::Broken(format!("{error:#}"))),
    };
    // ldd exits non-zero for a static executable: then there is no libLLVM to find.
    if let Ok(deps) = output(Command::new("ldd").arg(path)) {
        if let Some(line) = deps.lines().find(|l| l.trim_start().starts_with("libLLVM")) {
            if line.contains("not found") {
                return Ok(Linker::Broken(format!(
                    "{}: {}",
                    path.display(),
                    line.trim()
                )));
            }
            if let Some(major) = parse_libllvm_major(line) {
                return Ok(Linker::Llvm(version, major));
            }
        }
    }
    if path == cargo_home().join("bin/bpf-linker") {
        if let Some(major) = cargo_recorded_llvm_major()? {
            return Ok(Linker::Llvm(version, major));
        }
    }
    Ok(Linker::Unknown(version))
}

/// `libLLVM.so.22.1 => …` or `libLLVM-22.so => …` → 22.
fn parse_libllvm_major(ldd_line: &str) -> Option<u32> {
    let rest = ldd_line.trim_start().strip_prefix("libLLVM")?;
    let digits: String = rest
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

fn cargo_recorded_llvm_major() -> Result<Option<u32>> {
    let path = cargo_home().join(".crates2.json");
    let Ok(text) = fs::read_to_string(&path) else {
        return Ok(None);
    };
    let json: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    Ok(parse_crates2_llvm_major(&json))
}

fn parse_crates2_llvm_major(crates2: &serde_json::Value) -> Option<u32> {
    let (_, install) = crates2["installs"]
        .as_object()?
        .iter()
        .find(|(package, _)| package.starts_with("bpf-linker "))?;
    install["features"]
        .as_array()?
        .iter()
        .filter_map(|feature| feature.as_str()?.strip_prefix("llvm-")?.parse().ok())
        .next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llvm_major_of_rustc() {
        let vv = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)\nbinary: rustc\n\
                  host: x86_64-unknown-linux-gnu\nrelease: 1.97.0-nightly\nLLVM version: 22.1.4\n";
        assert_eq!(parse_llvm_major(vv), Some(22));
        assert_eq!(parse_llvm_major("rustc 1.0.0\n"), None);
    }

    #[test]
    fn apt_candidate() {
        assert!(has_candidate(
            "llvm-22-dev:\n  Installed: (none)\n  Candidate: 1:22.1.8-1~deb12u1\n"
        ));
        assert!(!has_candidate(
            "llvm-22-dev:\n  Installed: (none)\n  Candidate: (none)\n"
        ));
        assert!(!has_candidate(""));
    }

    #[test]
    fn libllvm_major() {
        let line = "\tlibLLVM.so.22.1 => /usr/lib/llvm-22/lib/libLLVM.so.22.1 (0x00007f5a3a600000)";
        assert_eq!(parse_libllvm_major(line), Some(22));
        assert_eq!(
            parse_libllvm_major("\tlibLLVM-21.so => not found"),
            Some(21)
        );
        assert_eq!(parse_libllvm_major("\tlibc.so.6 => /lib/libc.so.6"), None);
    }

    #[test]
    fn crates2_llvm_major() {
        let json = serde_json::json!({"installs": {
            "bpf-linker 0.13.0 (registry+https://github.com/rust-lang/crates.io-index)":
                {"features": ["llvm-link-static", "llvm-22"], "no_default_features": true}
        }});
        assert_eq!(parse_crates2_llvm_major(&json), Some(22));
        assert_eq!(
            parse_crates2_llvm_major(&serde_json::json!({"installs": {}})),
            None
        );
    }
}
