//! Scale: what the agent costs as what it serves grows.
//!
//! - Attach: a daemon attaches one glob to 1, 10, 100 and 1,000 cgroups; the time of the
//!   `attach` command (it replies once every match has its programs) per cgroup, and the
//!   daemon's RSS after it ÷ before it.
//! - Address watch: 10,000 IPv6 addresses added and removed with one `ip -batch` each in a
//!   namespace the agent serves ÷ the same in a namespace no agent serves, and the agent's
//!   CPU time per address change.
//! - Events: a bind loop in the managed cgroup as fast as it goes; how many events per
//!   second the agent logs, how many it counts as lost past that, and the loop's speed
//!   while the agent logs ÷ while it is stopped (nothing drained: every event is lost),
//!   which shows the binds never wait for the agent.
use std::{
    fs,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{ensure, Context as _, Result};
use freebind_e2e::{bpf_program_ids_at, Agent, Cgroup, Daemon, Installation, Netns};
use serde_json::json;

use super::{bindloop, compare, print_row, rotate, row, stats, Comparison};
use crate::paths::Paths;

/// Programs one attachment puts on a cgroup.
const PROGRAMS: usize = 10;
const CGROUP_COUNTS: [usize; 4] = [1, 10, 100, 1_000];
const CHURN_ADDRESSES: usize = 10_000;
const EVENT_BINDS: u64 = 100_000;

pub(super) fn run(
    paths: &Paths,
    rounds: usize,
    results: &mut Vec<serde_json::Value>,
) -> Result<()> {
    // The test bed's installation guards run the agent named there (detach --all on drop).
    std::env::set_var(freebind_e2e::AGENT_ENV, &paths.agent);
    attach(rounds, results)?;
    churn(paths, rounds, results)?;
    events(paths, rounds, results)
}

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> Result<f64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// User + system CPU time of `pid` so far, in seconds.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').context("/proc/PID/stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    // SAFETY: sysconf has no preconditions.
    Ok(ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64)
}

/// Waits until `pid` has used no CPU for 200 ms (at most 30 s); its CPU seconds then.
fn wait_idle(pid: u32) -> Result<f64> {
    let start = Instant::now();
    let mut last = cpu_seconds(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = cpu_seconds(pid)?;
        if now == last || start.elapsed() > Duration::from_secs(30) {
            return Ok(now);
        }
        last = now;
    }
}

fn attach(rounds: usize, results: &mut Vec<serde_json::Value>) -> Result<()> {
    let rounds = rounds.min(3);
    println!(
        "\nscale: one glob attached by the daemon to N cgroups, {rounds} rounds \
         (ms per cgroup; daemon RSS after ÷ before)"
    );
    println!(
        "{:<10} {:>26} {:>26} {:>20}",
        "cgroups",
        "ms/cgroup (min/med/max)",
        "RSS MiB after (min/med/max)",
        "RSS ratio (min/med/max)"
    );
    let ns = Netns::new("fb-bench-scale");
    let inst = Installation::new("fb-bench-scale");
    let daemon = Daemon::start(&inst, &ns, &[]);
    // The median time of attaching to one cgroup: loading and verifying the programs is
    // in it, so (T(n) − T(1)) / (n − 1) is what each further cgroup costs.
    let mut one_ms = None;
    for n in CGROUP_COUNTS {
        let mut per_cgroup = Vec::new();
        let cmp = compare(rounds, || {
            let parent = Cgroup::new("fb-bench-scale");
            let children: Vec<Cgroup> = (0..n).map(|i| parent.child(&format!("c{i}"))).collect();
            let glob = format!("{}/*", parent.relative());
            let before = rss_kib(daemon.pid())?;
            let start = Instant::now();
            inst.run_ok(&["attach", "--cgroup", &glob]);
            per_cgroup.push(start.elapsed().as_secs_f64() * 1e3 / n as f64);
            let after = rss_kib(daemon.pid())?;
            for c in [&children[0], &children[n / 2], &children[n - 1]] {
                let attached = bpf_program_ids_at(c.path()).len();
                ensure!(
                    attached == PROGRAMS,
                    "{}: {attached} programs attached, not {PROGRAMS}",
                    c.path().display()
                );
            }
            inst.run_ok(&["detach", "--cgroup", &glob]);
            drop(children);
            Ok((after / 1024.0, before / 1024.0))
        })?;
        let per = stats(per_cgroup);
        let total_ms = per.median * n as f64;
        let further_ms = match one_ms {
            Some(one) if n > 1 => Some((total_ms - one) / (n - 1) as f64),
            _ => None,
        };
        one_ms.get_or_insert(total_ms);
        let (after, before, ratio) = (&cmp.measured, &cmp.baseline, &cmp.ratio);
        println!(
            "{n:<10} {} {}   {}",
            per.cols(8, 2, false),
            after.cols(8, 1, false),
            ratio.cols(6, 3, false)
        );
        results.push(json!({
            "benchmark": "scale_attach", "case": format!("{n} cgroups"),
            "rounds": rounds, "ms_per_cgroup": per.json(),
            "ms_per_further_cgroup": further_ms, "rss_mib_after": after.json(),
            "rss_mib_before": before.json(), "rss_ratio": ratio.json(),
        }));
    }
    drop(daemon);
    Ok(())
}

/// `ip -n NS -batch -` of `commands`; its wall time in seconds.
fn ip_batch(ns: &Netns, commands: &str) -> Result<f64> {
    let start = Instant::now();
    let mut child = Command::new("ip")
        .args(["-n", ns.name(), "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("ip -batch")?;
    std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, commands.as_bytes())?;
    drop(child.stdin.take());
    let status = child.wait()?;
    ensure!(status.success(), "ip -n {} -batch failed", ns.name());
    Ok(start.elapsed().as_secs_f64())
}

fn churn(paths: &Paths, rounds: usize, results: &mut Vec<serde_json::Value>) -> Result<()> {
    // Each round adds and removes 20,000 addresses twice: about a minute here.
    let rounds = rounds.min(3);
    println!(
        "\naddress watch: {CHURN_ADDRESSES} IPv6 addresses added then removed (ip -batch), \
         in a served namespace ÷ an unserved one, {rounds} rounds"
    );
    println!(
        "{:<10} {:>26} {:>26} {:>20} {:>22}",
        "case",
        "served ms (min/med/max)",
        "unserved ms (min/med/max)",
        "ratio (min/med/max)",
        "agent µs CPU/change"
    );
    let served = Netns::new("fb-bench-churn");
    let plain = Netns::new("fb-bench-churn-plain");
    let cgroup = Cgroup::new("fb-bench-churn");
    let agent = Agent::run_binary(&paths.agent, &served, &cgroup, &[]);
    let add: String = (0..CHURN_ADDRESSES)
        .map(|i| format!("address add 2001:db8:c::{:x}/128 dev lo nodad\n", i + 1))
        .collect();
    let del = add.replace("address add", "address del");
    let churn = |ns: &Netns| -> Result<f64> { Ok(ip_batch(ns, &add)? + ip_batch(ns, &del)?) };
    let mut cpu = Vec::new();
    let [s, p] = rotate(
        rounds,
        [
            &mut || {
                let cpu0 = cpu_seconds(agent.pid())?;
                let s = churn(&served)?;
                // The agent may still be working through the last notifications: let it
                // finish before the other half shares the CPUs, and count all of it.
                let cpu1 = wait_idle(agent.pid())?;
                cpu.push((cpu1 - cpu0) * 1e6 / (2 * CHURN_ADDRESSES) as f64);
                Ok(s * 1e3)
            },
            &mut || Ok(churn(&plain)? * 1e3),
        ],
    )?;
    let cmp = Comparison::new(&s, &p);
    ensure!(
        agent.proc().try_wait().is_none(),
        "the agent stopped during the address churn:\n{}",
        agent.log()
    );
    let cpu = stats(cpu);
    let overruns = agent.log().matches("rtnetlink dropped").count();
    let (s, p, r) = (&cmp.measured, &cmp.baseline, &cmp.ratio);
    println!("{}   {}", row("churn", &cmp), cpu.cols(6, 1, false));
    println!("rtnetlink overruns (the agent re-read every address): {overruns}");
    results.push(json!({
        "benchmark": "address_churn", "addresses": CHURN_ADDRESSES, "unit": "ms",
        "rounds": rounds,
        "served": s.json(), "unserved": p.json(), "ratio": r.json(),
        "agent_cpu_us_per_change": cpu.json(), "rtnetlink_overruns": overruns,
    }));
    Ok(())
}

fn events(paths: &Paths, rounds: usize, results: &mut Vec<serde_json::Value>) -> Result<()> {
    let bin = paths.agent.with_file_name("freebind-bindloop");
    println!(
        "\nevents: {EVENT_BINDS} binds (tcp4, native) as fast as one process goes, {rounds} rounds; \
         events the agent logged per second and lost; bind time with the agent logging ÷ \
         with the agent stopped (every event lost)"
    );
    println!(
        "{:<10} {:>26} {:>26} {:>20}",
        "case", "logging ns/bind", "stopped ns/bind", "ratio (min/med/max)"
    );
    let ns = Netns::new("fb-bench-events");
    let cgroup = Cgroup::new("fb-bench-events");
    let agent = Agent::run_binary(&paths.agent, &ns, &cgroup, &[]);
    let (mut logged_rate, mut lost) = (Vec::new(), Vec::new());
    let bind_line = "bind 192.0.2.55:0/tcp";
    let cmp = compare(rounds, || {
        let logged0 = agent.log().matches(bind_line).count();
        let lost0 = lost_in_all(&agent.log());
        let with = bindloop(
            &bin,
            &ns,
            Some(&cgroup),
            "tcp",
            "192.0.2.55",
            EVENT_BINDS,
            "plain",
        )?;
        // The rate is what the agent logged while the loop ran; what the ring still holds
        // when it ends (up to the ring's size in events) is drained afterwards, within a
        // few of the agent's 50 ms ticks, and only counted for the books.
        let during = agent.log().matches(bind_line).count() - logged0;
        std::thread::sleep(Duration::from_secs(2));
        let log = agent.log();
        let logged = log.matches(bind_line).count() - logged0;
        let dropped = lost_in_all(&log) - lost0;
        ensure!(
            logged as u64 + dropped == EVENT_BINDS,
            "{logged} events logged and {dropped} lost for {EVENT_BINDS} binds"
        );
        logged_rate.push(during as f64 / (with * EVENT_BINDS as f64 / 1e9));
        lost.push(dropped as f64);

        agent.proc().signal(libc::SIGSTOP);
        let stopped = bindloop(
            &bin,
            &ns,
            Some(&cgroup),
            "tcp",
            "192.0.2.55",
            EVENT_BINDS,
            "plain",
        );
        agent.proc().signal(libc::SIGCONT);
        std::thread::sleep(Duration::from_secs(2));
        Ok((with, stopped?))
    })?;
    print_row("tcp4", &cmp);
    let (rate, lost) = (stats(logged_rate), stats(lost));
    println!(
        "events logged per second while binding (min/med/max): {}; lost per {EVENT_BINDS} \
         binds: {}",
        rate.cols(0, 0, false),
        lost.cols(0, 0, false)
    );
    let (w, s, r) = (&cmp.measured, &cmp.baseline, &cmp.ratio);
    results.push(json!({
        "benchmark": "events", "binds": EVENT_BINDS, "unit": "ns/bind", "rounds": rounds,
        "agent_logging": w.json(), "agent_stopped": s.json(), "ratio": r.json(),
        "logged_per_second": rate.json(), "lost_per_run": lost.json(),
    }));
    Ok(())
}

/// The agent's running total of lost events: the last "(N lost in all)" it logged.
fn lost_in_all(log: &str) -> u64 {
    log.rmatch_indices(" lost in all)")
        .next()
        .and_then(|(i, _)| {
            log[..i]
                .rsplit(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}
