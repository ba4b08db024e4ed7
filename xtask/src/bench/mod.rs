//! `cargo xtask bench`: what freebind costs, as ratios against a baseline measured in the
//! same run, round by round (these machines are noisy; only same-run ratios mean anything).
//!
//! Bind path: `freebind-bindloop` (socket + setsockopt(SO_REUSEADDR) + bind(non-local) +
//! close) in the managed cgroup ÷ the same loop outside it setting IP_FREEBIND itself — the
//! kernel's own path, the limit. Bystanders: the baseline loop in an unmanaged process while
//! the agent serves another cgroup ÷ with no agent at all.
//!
//! Steer mode: connections per second (TCP: connect, 8 bytes each way, close) and
//! request/reply exchanges per second (UDP, unconnected client) from `freebind-loadgen` in
//! a client namespace to `freebind-echo-server` (socket() + bind(), no setsockopt) started
//! in the managed cgroup while its address was absent — parked and steered — ÷ the same
//! server, same cgroup and agent, bound to an address that was present (the kernel's own
//! lookup). Both servers run side by side on one veth; each round measures both back to
//! back, alternating which goes first. The baseline pays for the agent's programs too (the
//! sk_lookup program runs for every lookup in the namespace and finds nothing for it; the
//! sock_ops and sendmsg programs run for its sockets), so the ratio is the cost of steering
//! itself, not of having the agent. The servers and the load generator are pinned to one
//! CPU: a request then runs start to end on it (veth delivers in the sender's softirq), so
//! `1e9/rate` is the CPU time of one exchange and the Δ column the time steering adds to
//! it: Δ = 1e9/steered − 1e9/baseline per round, positive when steering costs. Unpinned,
//! the rate mostly measured where the scheduler woke the other side (UDP varied 3× between
//! runs of the same server on these 2-CPU machines; pinned, ±1%).
use std::{
    fs,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context as _, Result};
use freebind_e2e::{
    require_root, run_in, run_in_timeout, scenario, spawn_in, tcp_request, udp_request,
    wait_for_log, Agent, Cgroup, Link, Netns, Proc,
};
use serde_json::json;

use crate::{cmd, paths::Paths};

mod breakdown;
mod scale;
mod summary;

const DEFAULT_ROUNDS: usize = 7;
const DEFAULT_ITERATIONS: u64 = 20_000;
const DEFAULT_THREADS: u32 = 1;
/// How long a bystander round lets a freshly started agent settle before it measures.
const BYSTANDER_SETTLE: Duration = Duration::from_millis(500);

/// Which measurements `--only` may pick.
const PARTS: [&str; 4] = ["bind", "bystanders", "steer", "scale"];

/// The bind path's cases: protocol, a non-local address, label.
const BIND_CASES: [(&str, &str, &str); 4] = [
    ("tcp", "192.0.2.55", "tcp4"),
    ("udp", "192.0.2.55", "udp4"),
    ("tcp", "2001:db8::55", "tcp6"),
    ("udp", "2001:db8::55", "udp6"),
];

pub(crate) struct Stats {
    min: f64,
    median: f64,
    max: f64,
}

pub(crate) fn stats(mut v: Vec<f64>) -> Stats {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Stats {
        min: v[0],
        // An even number of rounds has two middle values: their mean, not the upper one.
        median: if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        },
        max: v[n - 1],
    }
}

impl Stats {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({"min": self.min, "median": self.median, "max": self.max})
    }

    /// `min median max` in columns of `width`, with `digits` decimals (`+` signed when
    /// `signed`: a difference).
    pub(crate) fn cols(&self, width: usize, digits: usize, signed: bool) -> String {
        let f = |v: f64| {
            if signed {
                format!("{v:>+width$.digits$}")
            } else {
                format!("{v:>width$.digits$}")
            }
        };
        format!("{} {} {}", f(self.min), f(self.median), f(self.max))
    }
}

/// A figure against its baseline over the same rounds: both, and their per-round ratio
/// and difference (measured − baseline), each as min/median/max over the rounds.
pub(crate) struct Comparison {
    pub(crate) measured: Stats,
    pub(crate) baseline: Stats,
    pub(crate) ratio: Stats,
    pub(crate) delta: Stats,
}

impl Comparison {
    /// From samples taken round by round: `measured[i]` and `baseline[i]` in round `i`.
    pub(crate) fn new(measured: &[f64], baseline: &[f64]) -> Comparison {
        let per_round = |f: fn(f64, f64) -> f64| {
            stats(
                measured
                    .iter()
                    .zip(baseline)
                    .map(|(&m, &b)| f(m, b))
                    .collect(),
            )
        };
        Comparison {
            measured: stats(measured.to_vec()),
            baseline: stats(baseline.to_vec()),
            ratio: per_round(|m, b| m / b),
            delta: per_round(|m, b| m - b),
        }
    }
}

/// `rounds` rounds of (measured, baseline), each pair taken back to back.
pub(crate) fn compare(
    rounds: usize,
    mut round: impl FnMut() -> Result<(f64, f64)>,
) -> Result<Comparison> {
    let (mut measured, mut base) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let (m, b) = round()?;
        measured.push(m);
        base.push(b);
    }
    Ok(Comparison::new(&measured, &base))
}

/// `rounds` rounds of every side, one after another, the side that goes first rotating
/// from round to round: a drift within a round (a neighbour waking up, frequency scaling,
/// a cache warmed by the previous side) then favours none of them. Each side's samples,
/// in round order.
pub(crate) fn rotate<const N: usize>(
    rounds: usize,
    sides: [&mut dyn FnMut() -> Result<f64>; N],
) -> Result<[Vec<f64>; N]> {
    let mut samples: [Vec<f64>; N] = std::array::from_fn(|_| Vec::with_capacity(rounds));
    for round in 0..rounds {
        for k in 0..N {
            let side = (round + k) % N;
            samples[side].push((sides[side])()?);
        }
    }
    Ok(samples)
}

pub(crate) fn row(label: &str, c: &Comparison) -> String {
    format!(
        "{label:<10} {}   {}   {}",
        c.measured.cols(8, 0, false),
        c.baseline.cols(8, 0, false),
        c.ratio.cols(6, 3, false)
    )
}

pub(crate) fn print_row(label: &str, c: &Comparison) {
    println!("{}", row(label, c));
}

pub(crate) fn bindloop(
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

/// `cargo xtask bench [--rounds N] [--iterations N] [--threads K] [--cpu C] [--only PART]...`:
/// `--iterations` is the work of one measurement — binds for the bind path and the
/// bystanders, connections (TCP) or request/reply exchanges (UDP) for steer mode;
/// `--threads` is the number of load generator threads and `--cpu` the CPU that the
/// servers and the load generator share in steer mode (default: the highest this process
/// may use); `--only` (repeatable) runs only `bind`, `bystanders`, `steer` or `scale`.
pub fn run(paths: &Paths, args: &[String]) -> Result<()> {
    if !require_root() {
        bail!("the benchmark makes network namespaces and cgroups: run it as root");
    }
    let mut rounds = DEFAULT_ROUNDS;
    let mut iters = DEFAULT_ITERATIONS;
    let mut threads = DEFAULT_THREADS;
    let mut cpu = None;
    let mut only = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => rounds = it.next().context("--rounds N")?.parse()?,
            "--iterations" => iters = it.next().context("--iterations N")?.parse()?,
            "--threads" => threads = it.next().context("--threads K")?.parse()?,
            "--cpu" => cpu = Some(it.next().context("--cpu C")?.parse()?),
            "--only" => {
                let part = it.next().context("--only PART")?;
                ensure!(
                    PARTS.contains(&part.as_str()),
                    "--only {part:?}: one of {PARTS:?}"
                );
                only.push(part.clone());
            }
            other => bail!(
                "unknown bench argument {other:?} (--rounds N, --iterations N, --threads K, \
                 --cpu C, --only bind|bystanders|steer|scale)"
            ),
        }
    }
    ensure!(
        rounds > 0 && iters > 0 && threads > 0,
        "--rounds, --iterations and --threads must be positive"
    );
    let wanted = |part: &str| only.is_empty() || only.iter().any(|p| p == part);
    cmd::run(Command::new("cargo").current_dir(&paths.root).args([
        "build",
        "--release",
        "-p",
        "freebind-e2e",
        "--bins",
    ]))?;
    let bin = paths.agent.with_file_name("freebind-bindloop");

    let ns = Netns::new("fb-bench");
    // The kernel's permission path with the managed loop's own syscalls: a namespace where
    // any address may be bound (the sysctl is per namespace), no freebind, no setsockopt
    // of IP_FREEBIND. The baseline makes one setsockopt() more than the managed
    // loop (the application's IP_FREEBIND), so Δ against this one is what the programs
    // and hooks cost.
    let nonlocal = Netns::new("fb-bench-nonlocal");
    nonlocal.exec(&["sysctl", "-qw", "net.ipv4.ip_nonlocal_bind=1"]);
    nonlocal.exec(&["sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"]);
    let cgroup = Cgroup::new("fb-bench");
    let elsewhere = Cgroup::new("fb-bench-other");
    // Every unmanaged loop runs here rather than in whatever cgroup started the bench
    // (on a systemd host that one may carry programs of its own).
    let unmanaged = Cgroup::new("fb-bench-base");
    let mut results = Vec::new();
    if wanted("bind") {
        println!(
            "\nbind path: ns per socket+setsockopt+bind+close, {rounds} rounds × {iters} \
             iterations, the three loops of a round in rotating order"
        );
        println!(
            "{:<10} {:>28} {:>28} {:>24} {:>26} {:>24}",
            "case",
            "managed (min/med/max)",
            "IP_FREEBIND itself",
            "ratio (min/med/max)",
            "same syscalls, no BPF",
            "ratio (min/med/max)"
        );
        let _agent = Agent::run_binary(&paths.agent, &ns, &cgroup, &[]);
        for (proto, addr, label) in BIND_CASES {
            let run = |ns: &Netns, cgroup: &Cgroup, mode: &str| {
                bindloop(&bin, ns, Some(cgroup), proto, addr, iters, mode)
            };
            let [managed, freebind, same] = rotate(
                rounds,
                [
                    &mut || run(&ns, &cgroup, "plain"),
                    &mut || run(&ns, &unmanaged, "self-freebind"),
                    &mut || run(&nonlocal, &unmanaged, "plain"),
                ],
            )?;
            let limit = Comparison::new(&managed, &freebind);
            let syscalls = Comparison::new(&managed, &same);
            println!(
                "{}   {}   {}",
                row(label, &limit),
                syscalls.baseline.cols(8, 0, false),
                syscalls.ratio.cols(6, 3, false)
            );
            results.push(json!({
                "benchmark": "bind_path", "case": label, "unit": "ns/bind",
                "rounds": rounds, "iterations": iters,
                "managed": limit.measured.json(), "baseline_ip_freebind": limit.baseline.json(),
                "ratio": limit.ratio.json(), "delta_ns_per_bind": limit.delta.json(),
                "baseline_same_syscalls": syscalls.baseline.json(),
                "ratio_same_syscalls": syscalls.ratio.json(),
                "delta_same_syscalls_ns_per_bind": syscalls.delta.json(),
                "goal": "<= 1.05",
            }));
        }
        breakdown::run(
            &bin,
            &ns,
            &nonlocal,
            &cgroup,
            &unmanaged,
            iters,
            &mut results,
        )?;
    }

    if wanted("bystanders") {
        println!(
            "\nbystanders: the IP_FREEBIND loop outside any managed cgroup, the agent serving \
             another cgroup ÷ no agent, {rounds} rounds in alternating order"
        );
        println!(
            "{:<10} {:>28} {:>28} {:>24} {:>24}",
            "case", "agent elsewhere", "no agent", "ratio (min/med/max)", "Δ ns (min/med/max)"
        );
        for (proto, addr, label) in BIND_CASES {
            let bystander = || {
                bindloop(
                    &bin,
                    &ns,
                    Some(&unmanaged),
                    proto,
                    addr,
                    iters,
                    "self-freebind",
                )
            };
            let [with, without] = rotate(
                rounds,
                [
                    &mut || {
                        let agent = Agent::run_binary(&paths.agent, &ns, &elsewhere, &[]);
                        // Past "ready" the agent may still be reading its first address
                        // dumps: let that work finish before the loop shares the CPUs.
                        std::thread::sleep(BYSTANDER_SETTLE);
                        let with = bystander();
                        agent.stop();
                        with
                    },
                    &mut || bystander(),
                ],
            )?;
            let cmp = Comparison::new(&with, &without);
            println!("{}   {}", row(label, &cmp), cmp.delta.cols(7, 0, true));
            results.push(json!({
                "benchmark": "bystander", "case": label, "unit": "ns/bind",
                "rounds": rounds, "iterations": iters,
                "agent_elsewhere": cmp.measured.json(), "no_agent": cmp.baseline.json(),
                "ratio": cmp.ratio.json(), "delta_ns_per_bind": cmp.delta.json(),
                "goal": "<= 1.01",
            }));
        }
    }

    if wanted("steer") {
        let cpu = match cpu {
            Some(cpu) => cpu,
            None => last_allowed_cpu()?,
        };
        steer(paths, rounds, iters, threads, cpu, &mut results)?;
    }

    if wanted("scale") {
        scale::run(paths, rounds, &mut results)?;
    }

    let dir = paths
        .agent
        .parent()
        .and_then(Path::parent)
        .context("target dir")?
        .join("bench");
    fs::create_dir_all(&dir)?;
    let file = dir.join("results.json");
    let machine = machine();
    let commit = commit(&paths.root);
    let doc = json!({
        "rounds": rounds, "iterations": iters, "steer_threads": threads,
        "kernel": kernel_release(), "machine": machine, "commit": commit,
        "results": results,
    });
    fs::write(&file, serde_json::to_string_pretty(&doc)?)?;
    let summary = dir.join("results.md");
    fs::write(&summary, summary::markdown(&machine, &commit, &results))?;
    println!("\nwritten: {} and {}", file.display(), summary.display());
    Ok(())
}

/// The date, CPU model, CPU count and kernel the figures were taken on.
fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or("unknown CPU", |(_, m)| m.trim())
        .to_owned();
    let date = Command::new("date")
        .arg("+%F")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!(
        "{date}, {model}, {} CPUs, Linux {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel_release()
    )
}

/// The port every steer-mode server listens on (each on its own address).
const STEER_PORT: u16 = 7000;

/// Steer mode, per IP version: (version, steered address — absent when its servers bind,
/// added to the server's veth afterwards —, baseline address — on the veth from the start).
const STEER_FAMILIES: [(&str, &str, &str); 2] = [
    ("4", "192.0.2.20", "192.0.2.21"),
    ("6", "2001:db8::20", "2001:db8::21"),
];

/// The prefix length of the addresses on the veth: the client's subnet.
fn prefix_len(family: &str) -> u8 {
    if family == "4" {
        24
    } else {
        64
    }
}

/// The local address `ss` shows for a socket of `proto` parked on `port` in `ns` (one of
/// the parking addresses, of IPv6 when `v6`), if any.
fn parked_on(ns: &Netns, proto: &str, port: u16, v6: bool) -> Option<String> {
    let suffix = format!(":{port}");
    scenario::parked_sockets(ns, proto, port)
        .into_iter()
        .find(|s| s.starts_with('[') == v6)
        .map(|s| {
            s.trim_end_matches(&suffix)
                .trim_matches(['[', ']'])
                .to_owned()
        })
}

/// Starts `freebind-echo-server proto addr STEER_PORT` (socket() + bind(), no setsockopt)
/// in `ns` and `cgroup`, waits until it says it is bound and pins it to `cpu` (its
/// per-connection threads, started later, inherit that).
fn echo_server(
    bin: &Path,
    ns: &Netns,
    cgroup: &Cgroup,
    proto: &str,
    addr: &str,
    cpu: usize,
) -> Result<Proc> {
    let server = spawn_in(
        ns,
        Some(cgroup),
        &[&bin.to_string_lossy(), proto, addr, &STEER_PORT.to_string()],
    );
    wait_for_log(
        &server,
        &format!("listening on {}", scenario::addr_port(addr, STEER_PORT)),
        scenario::SETTLE,
    );
    pin(server.pid(), cpu)?;
    Ok(server)
}

/// Pins process `pid` (its main thread, which later threads inherit) to `cpu`.
fn pin(pid: u32, cpu: usize) -> Result<()> {
    // SAFETY: cpu_set_t is plain data; CPU_SET bounds-checks `cpu`; the pid is a child we
    // have not reaped (its guard is alive).
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &set,
        )
    };
    ensure!(
        r == 0,
        "pin pid {pid} to CPU {cpu}: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// The highest-numbered CPU this process may run on (CPU 0 tends to take more of the
/// machine's interrupts and housekeeping).
fn last_allowed_cpu() -> Result<usize> {
    // SAFETY: sched_getaffinity fills the plain-data set; CPU_ISSET reads inside it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        ensure!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0,
            "sched_getaffinity: {}",
            std::io::Error::last_os_error()
        );
        (0..libc::CPU_SETSIZE as usize)
            .rev()
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .context("no CPU in this process's affinity mask")
    }
}

/// One `freebind-loadgen` run of `count` operations from the client namespace; the rate.
fn loadgen(
    bin: &Path,
    ns: &Netns,
    proto: &str,
    addr: &str,
    count: u64,
    threads: u32,
    cpu: usize,
) -> Result<f64> {
    let argv = [
        bin.to_string_lossy().into_owned(),
        proto.to_owned(),
        addr.to_owned(),
        STEER_PORT.to_string(),
        "--count".to_owned(),
        count.to_string(),
        "--threads".to_owned(),
        threads.to_string(),
        "--cpu".to_owned(),
        cpu.to_string(),
    ];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    // A generous bound: a few hundred operations per second would already be a failure.
    let timeout = Duration::from_secs(60 + count / 200);
    let out = run_in_timeout(ns, None, &argv, timeout);
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "load generator {proto} {addr} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    text.split_whitespace()
        .next()
        .and_then(|rate| rate.parse().ok())
        .with_context(|| format!("load generator printed {text:?}"))
}

/// Waits until `addr` answers over `proto` from the client namespace (a UDP reply from
/// `addr` itself), or fails with the last error.
fn wait_answers(link: &Link, proto: &str, addr: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        let last = if proto == "tcp" {
            match tcp_request(&link.client, addr, STEER_PORT, b"ping") {
                Ok(reply) if reply == b"ping" => return Ok(()),
                Ok(reply) => format!("reply {reply:?}"),
                Err(e) => e,
            }
        } else {
            match udp_request(&link.client, addr, STEER_PORT, b"ping") {
                Ok((reply, from)) if reply == b"ping" && from == addr => return Ok(()),
                Ok((reply, from)) => format!("reply {reply:?} from {from}"),
                Err(e) => e,
            }
        };
        ensure!(
            start.elapsed() < scenario::SETTLE,
            "{proto} {} does not answer after {:?}: {last}",
            scenario::addr_port(addr, STEER_PORT),
            scenario::SETTLE
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Steer mode: TCP connections per second and UDP exchanges per second to a steered server
/// ÷ the same server natively bound, `rounds` rounds of `iters` operations each.
fn steer(
    paths: &Paths,
    rounds: usize,
    iters: u64,
    threads: u32,
    cpu: usize,
    results: &mut Vec<serde_json::Value>,
) -> Result<()> {
    let echo = paths.agent.with_file_name("freebind-echo-server");
    let gen = paths.agent.with_file_name("freebind-loadgen");
    let cgroup = Cgroup::new("fb-bench-steer");
    let link = Link::new();
    // The client closes first and keeps the TIME_WAITs: tens of thousands of connections to
    // one address within seconds need its ports back after 1 s (tcp_tw_reuse=1, with the
    // timestamps Linux sends by default) and all of them. Both are per network namespace.
    link.client
        .exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"]);
    link.client
        .exec(&["sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"]);
    // The baseline addresses are there before the agent starts, so its first view of
    // what is local already has them and their servers bind natively.
    for (family, _, baseline) in STEER_FAMILIES {
        scenario::add_server_addr(&link, &format!("{baseline}/{}", prefix_len(family)));
    }
    let _agent = Agent::run_binary(&paths.agent, &link.server, &cgroup, &[]);
    let mut servers = Vec::new();
    let mut parking = Vec::new();
    for (family, steered, baseline) in STEER_FAMILIES {
        for proto in ["tcp", "udp"] {
            servers.push(echo_server(
                &echo,
                &link.server,
                &cgroup,
                proto,
                steered,
                cpu,
            )?);
            let parked =
                parked_on(&link.server, proto, STEER_PORT, family == "6").with_context(|| {
                    format!(
                    "the {proto} server bound to {steered} (absent) is not on a parking address: \
                     is steer mode there? ss shows:\n{}",
                    String::from_utf8_lossy(&link.server.try_exec(&["ss", "-Htuln"]).stdout)
                )
                })?;
            servers.push(echo_server(
                &echo,
                &link.server,
                &cgroup,
                proto,
                baseline,
                cpu,
            )?);
            ensure!(
                scenario::listening(
                    &link.server,
                    proto,
                    &scenario::addr_port(baseline, STEER_PORT)
                ),
                "the {proto} server bound to {baseline} (present) is not bound to it natively"
            );
            parking.push(((family, proto), parked));
        }
    }
    for (family, steered, _) in STEER_FAMILIES {
        scenario::add_server_addr(&link, &format!("{steered}/{}", prefix_len(family)));
    }
    println!(
        "\nsteer mode: tcp conn/s and udp req/s, steered ÷ natively bound, {rounds} rounds × \
         {iters} connections or exchanges, {threads} client thread(s), all on CPU {cpu}"
    );
    println!(
        "{:<10} {:>26}   {:>26}   {:>20}   {:>23}",
        "case",
        "steered (min/med/max)",
        "native bind (min/med/max)",
        "ratio (min/med/max)",
        "Δ ns/call (min/med/max)"
    );
    for (family, steered, baseline) in STEER_FAMILIES {
        for proto in ["tcp", "udp"] {
            let label = format!("steer {proto}{family}");
            wait_answers(&link, proto, steered)?;
            wait_answers(&link, proto, baseline)?;
            // Warm-up: neighbour entries, the first thread stacks, page faults.
            let warm = (iters / 20).max(100);
            loadgen(&gen, &link.client, proto, steered, warm, threads, cpu)?;
            loadgen(&gen, &link.client, proto, baseline, warm, threads, cpu)?;
            let mut deltas = Vec::new();
            let mut round = 0;
            let cmp = compare(rounds, || {
                let run = |addr| loadgen(&gen, &link.client, proto, addr, iters, threads, cpu);
                // Alternate which goes first: a drift within a round (a neighbour waking
                // up, frequency scaling) then favours neither side.
                let (s, b) = if round % 2 == 0 {
                    let s = run(steered)?;
                    (s, run(baseline)?)
                } else {
                    let b = run(baseline)?;
                    (run(steered)?, b)
                };
                round += 1;
                deltas.push(1e9 / s - 1e9 / b);
                Ok((s, b))
            })?;
            let delta = stats(deltas);
            println!("{}   {}", row(&label, &cmp), delta.cols(7, 0, true));
            let (s, b, r) = (&cmp.measured, &cmp.baseline, &cmp.ratio);
            let parked = parking
                .iter()
                .find(|(k, _)| *k == (family, proto))
                .map(|(_, p)| p.clone());
            results.push(json!({
                "benchmark": "steer", "case": format!("{proto}{family}"),
                "unit": if proto == "tcp" { "conn/s" } else { "req/s" },
                "rounds": rounds, "iterations": iters,
                "steered": s.json(), "baseline_native_bind": b.json(), "ratio": r.json(),
                "delta_ns_per_call": delta.json(), "goal": ">= 0.95",
                "client_threads": threads, "cpu": cpu, "parking_address": parked,
            }));
        }
    }
    Ok(())
}

/// The commit the figures were taken at (with `-dirty` for uncommitted changes).
fn commit(root: &Path) -> String {
    Command::new("git")
        .current_dir(root)
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        )
}

fn kernel_release() -> String {
    fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_owned()
}
