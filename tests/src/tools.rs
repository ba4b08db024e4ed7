//! Privilege check, external tools (installed on demand), and the kernel's own view of
//! what is attached to a cgroup.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Once;

use crate::cgroup::Cgroup;
use crate::util::{check_output, show_cmd};

/// Tools the end-to-end tests use, with the Debian package that provides each.
const TOOLS: &[(&str, &str)] = &[
    ("ip", "iproute2"),
    ("bpftool", "bpftool"),
    ("nginx", "nginx-light"),
    ("socat", "socat"),
    ("curl", "curl"),
    ("python3", "python3"),
];

/// Where root's tools live even when the caller's PATH lacks the sbin directories.
const EXTRA_DIRS: &[&str] = &[
    "/usr/local/sbin",
    "/usr/local/bin",
    "/usr/sbin",
    "/usr/bin",
    "/sbin",
    "/bin",
];

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false")
}

/// True when running as root. Otherwise: panics in CI (env `CI` set, non-empty and not
/// `false`: there a privileged test that cannot run is a failure), else prints why the
/// test is skipped and returns false. Use as
/// `if !freebind_e2e::require_root() { return; }`.
pub fn require_root() -> bool {
    if is_root() {
        return true;
    }
    if in_ci() {
        panic!("privileged end-to-end tests must run in CI; run as root");
    }
    eprintln!(
        "freebind-e2e: skipped: needs root (cgroups, network namespaces, eBPF); \
         run `cargo xtask test` as root"
    );
    false
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(EXTRA_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Absolute path of tool `name` (searched in PATH, then the usual bin and sbin
/// directories); panics naming it when it is missing. Call [`ensure_tools`] first.
pub fn tool(name: &str) -> PathBuf {
    find_tool(name)
        .unwrap_or_else(|| panic!("{name} not found in PATH or {EXTRA_DIRS:?}; see ensure_tools()"))
}

/// Makes sure `ip`, `bpftool`, `nginx`, `socat`, `curl` and `python3` are present; when
/// some are missing and we are root, installs their Debian packages (`apt-get update`,
/// then `apt-get install -y`). Runs once per process; panics with a clear message when
/// something is still missing.
pub fn ensure_tools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| install_missing(TOOLS));
}

/// What the tests of the generated completion scripts and man pages run, with packages.
const DOC_TOOLS: &[(&str, &str)] = &[("zsh", "zsh"), ("fish", "fish"), ("groff", "groff-base")];

/// Makes sure `zsh`, `fish` and `groff` are present, as [`ensure_tools`] does for its
/// tools: installed as root, a panic naming the packages otherwise (never a skip). Runs
/// once per process.
pub fn ensure_doc_tools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| install_missing(DOC_TOOLS));
}

/// Makes sure `promtool` (Prometheus's own parser and linter of the exposition format) is
/// present, as [`ensure_tools`] does for its tools. Runs once per process.
pub fn ensure_metrics_tools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| install_missing(&[("promtool", "prometheus")]));
}

/// Installs the Debian packages of the `(tool, package)` pairs whose tool is missing
/// (`apt-get update`, then `apt-get install -y`, as root); panics with a clear message
/// when something is still missing. Callers run it once per process.
pub(crate) fn install_missing(tools: &[(&str, &str)]) {
    let missing: Vec<(&str, &str)> = tools
        .iter()
        .copied()
        .filter(|(t, _)| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    let names: Vec<&str> = missing.iter().map(|(t, _)| *t).collect();
    let packages: Vec<&str> = missing.iter().map(|(_, p)| *p).collect();
    if !is_root() {
        panic!(
            "missing tools {names:?}; install the Debian packages {packages:?} \
             (or run the tests as root, which installs them)"
        );
    }
    eprintln!("freebind-e2e: installing {packages:?} for missing tools {names:?}");
    apt(&["update"]);
    let mut args = vec!["install", "-y", "--no-install-recommends"];
    args.extend(&packages);
    apt(&args);
    let still: Vec<&str> = names
        .into_iter()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if !still.is_empty() {
        panic!("tools {still:?} still missing after installing {packages:?}");
    }
}

fn apt(args: &[&str]) {
    let mut cmd = Command::new("apt-get");
    cmd.args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null());
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{}` to install test tools: {e}", show_cmd(&cmd)));
    if !out.status.success() {
        panic!(
            "`{}` failed ({}), cannot install the tools the end-to-end tests need:\n{}{}",
            show_cmd(&cmd),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The programs attached directly to `cgroup`, as the kernel reports them
/// (`bpftool -j cgroup show <path>`, i.e. BPF_PROG_QUERY): `(attach type, program name)`
/// pairs such as `("cgroup_inet4_bind", "freebind_bind4")`, in the kernel's order.
///
/// Attach types use libbpf's names (`cgroup_inet4_bind`, `cgroup_inet6_bind`,
/// `cgroup_inet4_getsockname`, `cgroup_udp4_sendmsg`, `cgroup_setsockopt`,
/// `cgroup_sock_ops`, …). Program names are the kernel's, at most 15 bytes, unless the
/// program carries BTF with its full function name. Programs attached with bpf links are
/// included.
pub fn bpf_programs_attached(cgroup: &Cgroup) -> Vec<(String, String)> {
    bpf_programs_attached_at(cgroup.path())
}

/// [`bpf_programs_attached`] for any cgroup directory (one a systemd made, say).
pub fn bpf_programs_attached_at(cgroup: &std::path::Path) -> Vec<(String, String)> {
    let out = check_output(
        Command::new(tool("bpftool"))
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    );
    parse_cgroup_show(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("bpftool cgroup show {}: {e}", cgroup.display()))
}

/// The kernel's ids of the programs attached to a cgroup directory, sorted: the same ids
/// before and after something means nothing was detached and attached again meanwhile.
pub fn bpf_program_ids_at(cgroup: &std::path::Path) -> Vec<u64> {
    let out = check_output(
        Command::new(tool("bpftool"))
            .args(["-j", "cgroup", "show"])
            .arg(cgroup),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let mut ids: Vec<u64> = match serde_json::from_str::<serde_json::Value>(text.trim()) {
        Ok(serde_json::Value::Array(items)) => items
            .iter()
            .filter_map(|i| i.get("id").and_then(|v| v.as_u64()))
            .collect(),
        _ => Vec::new(),
    };
    ids.sort();
    ids
}

/// Parses `bpftool -j cgroup show`: a JSON array of objects, or nothing at all when no
/// program is attached (bpftool 7.1 prints no `[]` then).
fn parse_cgroup_show(stdout: &str) -> Result<Vec<(String, String)>, String> {
    let text = stdout.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("bad JSON {text:?}: {e}"))?;
    let items = v
        .as_array()
        .ok_or_else(|| format!("expected a JSON array, got {text:?}"))?;
    items
        .iter()
        .map(|item| {
            let field = |k: &str| match item.get(k) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                // Unknown attach types are printed as numbers.
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                _ => Err(format!("no {k:?} in {item}")),
            };
            Ok((field("attach_type")?, field("name")?))
        })
        .collect()
}

#[cfg(test)]
mod unit {
    use super::parse_cgroup_show;

    #[test]
    fn parses_bpftool_output() {
        assert_eq!(parse_cgroup_show(""), Ok(vec![]));
        assert_eq!(parse_cgroup_show("[]\n"), Ok(vec![]));
        // Captured from bpftool 7.1.0 on Linux 6.18.
        let out = r#"[{"id":102,"attach_type":"cgroup_inet_egress","attach_flags":"multi","name":"fb_smoke_egress","attach_btf_name":"","attach_btf_obj_id":0,"attach_btf_id":0},{"id":103,"attach_type":"cgroup_inet4_bind","attach_flags":"multi","name":"fb_bind4","attach_btf_name":"","attach_btf_obj_id":0,"attach_btf_id":0}]"#;
        assert_eq!(
            parse_cgroup_show(out),
            Ok(vec![
                (
                    "cgroup_inet_egress".to_owned(),
                    "fb_smoke_egress".to_owned()
                ),
                ("cgroup_inet4_bind".to_owned(), "fb_bind4".to_owned()),
            ])
        );
        assert_eq!(
            parse_cgroup_show(r#"[{"attach_type":99,"name":"x"}]"#),
            Ok(vec![("99".to_owned(), "x".to_owned())])
        );
        assert!(parse_cgroup_show("Error: x").is_err());
    }
}
