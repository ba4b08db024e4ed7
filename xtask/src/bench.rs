//! `cargo xtask bench`: what freebind costs, as ratios against a baseline measured in the
//! same run, round by round (these machines are noisy; only same-run ratios mean anything).
//!
//! Bind path: `freebind-bindloop` (socket + setsockopt(SO_REUSEADDR) + bind(non-local) +
//! close) in the managed cgroup ÷ the same loop outside it setting IP_FREEBIND itself — the
//! kernel's own path, the limit. Bystanders: the baseline loop in an unmanaged process while
//! the agent serves another cgroup ÷ with no agent at all.
use std::{fs, path::Path, process::Command};

use anyhow::{bail, ensure, Context as _, Result};
use freebind_e2e::{require_root, run_in, Agent, Cgroup, Netns};
use serde_json::json;

use crate::{cmd, paths::Paths};

const DEFAULT_ROUNDS: usize = 7;
const DEFAULT_ITERATIONS: u64 = 20_000;

struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    Stats {
        min: v[0],
        median: v[v.len() / 2],
        max: v[v.len() - 1],
    }
}

impl Stats {
    fn json(&self) -> serde_json::Value {
        json!({"min": self.min, "median": self.median, "max": self.max})
    }
}

/// `rounds` rounds of (measured, baseline), each pair taken back to back: the stats of
/// both and of their per-round ratio.
fn compare(rounds: usize, mut round: impl FnMut() -> Result<(f64, f64)>) -> Result<[Stats; 3]> {
    let (mut measured, mut base, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (m, b) = round()?;
        measured.push(m);
        base.push(b);
        ratio.push(m / b);
    }
    Ok([stats(measured), stats(base), stats(ratio)])
}

fn print_row(label: &str, [m, b, r]: &[Stats; 3]) {
    println!(
        "{label:<10} {:>8.0} {:>8.0} {:>8.0}   {:>8.0} {:>8.0} {:>8.0}   {:>6.3} {:>6.3} {:>6.3}",
        m.min, m.median, m.max, b.min, b.median, b.max, r.min, r.median, r.max
    );
}

fn bindloop(
    bin: &Path,
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    proto: &str,
    addr: &str,
    iters: u64,
    mode: &str,
) -> Result<f64> {
    let iters = iters.to_string();
    let bin = bin.to_string_lossy();
    let out = run_in(ns, cgroup, &[&bin, proto, addr, &iters, mode]);
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "bind loop {proto} {addr} {mode} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.trim()
        .parse()
        .with_context(|| format!("bind loop printed {text:?}"))
}

pub fn run(paths: &Paths, args: &[String]) -> Result<()> {
    if !require_root() {
        bail!("the benchmark makes network namespaces and cgroups: run it as root");
    }
    let mut rounds = DEFAULT_ROUNDS;
    let mut iters = DEFAULT_ITERATIONS;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--iterations" => iters = it.next().context("--iterations N")?.parse()?,
            other => bail!("unknown bench argument {other:?} (--rounds N, --iterations N)"),
        }
    }
    cmd::run(Command::new("cargo").current_dir(&paths.root).args([
        "build",
        "--release",
        "-p",
        "freebind-e2e",
        "--bins",
    ]))?;
    let bin = paths.agent.with_file_name("freebind-bindloop");

    let ns = Netns::new("fb-bench");
    let cgroup = Cgroup::new("fb-bench");
    let elsewhere = Cgroup::new("fb-bench-other");
    let mut results = Vec::new();
    println!(
        "\nbind path: ns per socket+setsockopt+bind+close, {rounds} rounds × {iters} iterations"
    );
    println!(
        "{:<10} {:>28} {:>28} {:>24}",
        "case", "managed (min/med/max)", "IP_FREEBIND itself", "ratio (min/med/max)"
    );
    {
        let _agent = Agent::run_binary(&paths.agent, &ns, &cgroup, &[]);
        for (proto, addr, label) in [
            ("tcp", "192.0.2.55", "tcp4"),
            ("udp", "192.0.2.55", "udp4"),
            ("tcp", "2001:db8::55", "tcp6"),
            ("udp", "2001:db8::55", "udp6"),
        ] {
            let cmp = compare(rounds, || {
                Ok((
                    bindloop(&bin, &ns, Some(&cgroup), proto, addr, iters, "plain")?,
                    bindloop(&bin, &ns, None, proto, addr, iters, "self-freebind")?,
                ))
            })?;
            print_row(label, &cmp);
            let [m, b, r] = &cmp;
            results.push(json!({
                "benchmark": "bind_path", "case": label, "unit": "ns/bind",
                "managed": m.json(), "baseline_ip_freebind": b.json(), "ratio": r.json(),
                "goal": "<= 1.05",
            }));
        }
    }

    println!("\nbystanders: the IP_FREEBIND loop (tcp4) outside any managed cgroup, agent serving another cgroup ÷ no agent");
    let cmp = compare(rounds, || {
        let agent = Agent::run_binary(&paths.agent, &ns, &elsewhere, &[]);
        let with = bindloop(&bin, &ns, None, "tcp", "192.0.2.55", iters, "self-freebind")?;
        agent.stop();
        let without = bindloop(&bin, &ns, None, "tcp", "192.0.2.55", iters, "self-freebind")?;
        Ok((with, without))
    })?;
    print_row("tcp4", &cmp);
    let [w, n, r] = &cmp;
    results.push(json!({
        "benchmark": "bystander", "case": "tcp4", "unit": "ns/bind",
        "agent_elsewhere": w.json(), "no_agent": n.json(), "ratio": r.json(),
        "goal": "<= 1.01",
    }));

    let dir = paths
        .agent
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .join("bench");
    fs::create_dir_all(&dir)?;
    let file = dir.join("results.json");
    let doc = json!({"rounds": rounds, "iterations": iters, "kernel": kernel_release(), "results": results});
    fs::write(&file, serde_json::to_string_pretty(&doc)?)?;
    println!("\nwritten: {}", file.display());
    Ok(())
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
