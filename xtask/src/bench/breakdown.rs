//! Where the bind path's time goes: one more pass of each case with the kernel's per-program
//! run-time statistics on, read back per program attached to the bench cgroup, and the
//! loop with the same syscalls and no BPF (a namespace with `ip_nonlocal_bind=1`) right
//! after it. The statistics add two clock reads to every program run (tens of ns) and are
//! on for every BPF program of the host while the pass runs, so these passes are not part
//! of the ratios; they say which program costs what, and how much of the difference to
//! the kernel's own path is outside the programs (the hooks' own work, and freeing socket
//! storage at close; the statistics' clock reads land there too).
use std::{collections::BTreeMap, os::fd::FromRawFd, process::Command};

use anyhow::{ensure, Context as _, Result};
use freebind_e2e::{bpf_program_ids_at, tool, Cgroup, Netns};
use serde_json::json;

use super::{bindloop, BIND_CASES};

/// `BPF_ENABLE_STATS` and `BPF_STATS_RUN_TIME` (uapi/linux/bpf.h, Linux 5.8).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Keeps run-time statistics on while alive. An fd rather than the
/// `kernel.bpf_stats_enabled` sysctl: if the bench dies, closing it turns them off again.
fn enable_stats() -> Result<std::os::fd::OwnedFd> {
    let attr = [BPF_STATS_RUN_TIME, 0];
    // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of `attr`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    ensure!(
        fd >= 0,
        "bpf(BPF_ENABLE_STATS): {} (needs Linux 5.8 and CAP_SYS_ADMIN)",
        std::io::Error::last_os_error()
    );
    // SAFETY: a new descriptor the kernel just returned, owned by nobody else.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) })
}

/// (name, run_time_ns, run_cnt) of each program attached to `cgroup`.
fn program_stats(cgroup: &Cgroup) -> Result<BTreeMap<String, (u64, u64)>> {
    let mut out = BTreeMap::new();
    for id in bpf_program_ids_at(cgroup.path()) {
        let o = Command::new(tool("bpftool"))
            .args(["-j", "prog", "show", "id", &id.to_string()])
            .output()
            .context("bpftool prog show")?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)
            .with_context(|| format!("bpftool prog show id {id}"))?;
        let name = v["name"].as_str().unwrap_or("?").to_owned();
        let n = |k: &str| v[k].as_u64().unwrap_or(0);
        out.insert(name, (n("run_time_ns"), n("run_cnt")));
    }
    Ok(out)
}

/// One statistics pass per bind case: the managed loop in `ns` and `cgroup`, then the
/// same loop in `nonlocal` and `unmanaged` (same syscalls, no BPF).
pub(super) fn run(
    bin: &std::path::Path,
    ns: &Netns,
    nonlocal: &Netns,
    cgroup: &Cgroup,
    unmanaged: &Cgroup,
    iters: u64,
    results: &mut Vec<serde_json::Value>,
) -> Result<()> {
    println!(
        "\nwhere the difference goes: ns per bind in each program (kernel run-time statistics, \
         one extra pass; they add tens of ns per program run), against the same syscalls \
         without BPF"
    );
    println!(
        "{:<10} {:>14} {:>14} {:>14} {:>14} {:>22}",
        "case",
        "fb_setsockopt",
        "fb_bind4/6",
        "programs",
        "Δ same syscalls",
        "outside the programs"
    );
    let _stats = enable_stats()?;
    for (proto, addr, label) in BIND_CASES {
        let before = program_stats(cgroup)?;
        let managed = bindloop(bin, ns, Some(cgroup), proto, addr, iters, "plain")?;
        let after = program_stats(cgroup)?;
        let same = bindloop(bin, nonlocal, Some(unmanaged), proto, addr, iters, "plain")?;
        let delta = managed - same;
        let per_bind = |name: &str| {
            let (t0, _) = before.get(name).copied().unwrap_or_default();
            let (t1, _) = after.get(name).copied().unwrap_or_default();
            (t1 - t0) as f64 / iters as f64
        };
        let setsockopt = per_bind("fb_setsockopt");
        let bind = per_bind("fb_bind4") + per_bind("fb_bind6");
        let programs: f64 = after.keys().map(|name| per_bind(name)).sum();
        println!(
            "{label:<10} {setsockopt:>14.0} {bind:>14.0} {programs:>14.0} {delta:>14.0} {:>22.0}",
            delta - programs
        );
        results.push(json!({
            "benchmark": "bind_path_breakdown", "case": label, "unit": "ns/bind",
            "fb_setsockopt": setsockopt, "fb_bind": bind, "all_programs": programs,
            "managed_with_stats": managed, "same_syscalls": same,
            "delta_same_syscalls": delta, "outside_programs": delta - programs,
        }));
    }
    Ok(())
}
