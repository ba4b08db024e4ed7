//! What an operator sees: `status` (which managed sockets are live or dormant), `events`
//! (the transitions as they happen), the Prometheus metrics, the program names bpftool
//! shows, and the event ring buffer overflowing without any bind noticing.
use std::{process::Command, time::Duration};

use freebind_e2e::{
    add_addr, bpf_programs_attached, del_addr, ensure_metrics_tools, ensure_tools, require_root,
    run_in,
    scenario::{python_http_server, try_bind, wait_listening, wait_parked, SETTLE},
    spawn_in, wait_for_log, wait_until, Agent, Cgroup, Daemon, Installation, Link, Proc, TempDir,
};
use serde_json::Value;

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");

/// `status --json` of an installation, parsed.
fn status(inst: &Installation) -> Value {
    let out = inst.run_ok(&["status", "--json"]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("status --json: {e}: {out}"))
}

/// The managed sockets `status` lists, as `(proto, address, port, mode, state)`, sorted.
fn sockets(status: &Value) -> Vec<(String, String, u64, String, String)> {
    let mut v: Vec<_> = status["sockets"]
        .as_array()
        .expect("a sockets array")
        .iter()
        .map(|s| {
            let text = |k: &str| {
                s[k].as_str()
                    .unwrap_or_else(|| panic!("{k} in {s}"))
                    .to_owned()
            };
            (
                text("proto"),
                text("address"),
                s["port"].as_u64().unwrap(),
                text("mode"),
                text("state"),
            )
        })
        .collect();
    v.sort();
    v
}

fn expected(state: &str) -> Vec<(String, String, u64, String, String)> {
    [
        ("tcp", 8080, "native"),
        ("tcp", 9000, "steered"),
        ("udp", 9053, "steered"),
    ]
    .iter()
    .map(|(proto, port, mode)| {
        (
            proto.to_string(),
            "192.0.2.10".to_string(),
            *port,
            mode.to_string(),
            state.to_string(),
        )
    })
    .collect()
}

fn wait_status(inst: &Installation, state: &str) {
    let want = expected(state);
    let mut last = Vec::new();
    let ok = (0..100).any(|_| {
        last = sockets(&status(inst));
        last == want || {
            std::thread::sleep(Duration::from_millis(100));
            false
        }
    });
    assert!(ok, "status never listed {want:?}; last: {last:?}");
}

/// The JSON events of kind `address` the `events --json` client printed so far.
fn address_events(client: &Proc) -> Vec<Value> {
    client
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "address")
        .collect()
}

fn wait_address_event(client: &Proc, change: &str, needle: &str) -> Value {
    let mut found = None;
    wait_until(
        &format!("an `{change}` event naming {needle}"),
        SETTLE,
        || {
            found = address_events(client)
                .into_iter()
                .find(|e| e["change"] == change && e["line"].as_str().unwrap().contains(needle));
            found.is_some()
        },
    );
    found.unwrap()
}

#[test]
fn status_and_events_follow_native_and_steered_sockets_dormant_live_dormant_with_a_daemon_and_from_the_pins_alone(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let app = Cgroup::new("fb-status");
    let inst = Installation::new("fb-status");
    let daemon = Daemon::start(&inst, &link.server, &[]);
    inst.run_ok(&[
        "attach",
        "--cgroup",
        app.relative(),
        "--allow",
        "192.0.2.0/24",
    ]);
    let events = Proc::spawn(inst.command(None, &["events", "--json"]), "events");
    // Subscribed before anything binds: the bind events below must reach it.
    wait_for_log(daemon.proc(), "an `events` client subscribed", SETTLE);

    let native = python_http_server(&link.server, Some(&app), "192.0.2.10", 8080);
    let tcp = spawn_in(
        &link.server,
        Some(&app),
        &[ECHO_SERVER, "tcp", "192.0.2.10", "9000"],
    );
    let udp = spawn_in(
        &link.server,
        Some(&app),
        &[ECHO_SERVER, "udp", "192.0.2.10", "9053"],
    );
    wait_listening(&link.server, "tcp", "192.0.2.10:8080", &native);
    wait_parked(&link.server, "tcp", 9000, 1, &tcp);
    wait_parked(&link.server, "udp", 9053, 1, &udp);

    wait_status(&inst, "dormant");
    let s = status(&inst);
    assert_eq!(s["daemon"].as_u64(), Some(u64::from(daemon.pid())));
    let a = &s["attachments"][0];
    assert_eq!(
        a["cgroup"].as_str(),
        Some(app.path().to_str().unwrap()),
        "{a}"
    );
    assert_eq!(a["allow"], serde_json::json!(["192.0.2.0/24"]));
    assert_eq!(a["pinned"], true);
    assert_eq!(a["programs_attached"], 10);
    assert_eq!(a["decisions"]["freebind"], 1, "{a}");
    assert_eq!(a["decisions"]["steered"], 2, "{a}");
    let parked = s["sockets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["port"] == 9000)
        .unwrap();
    assert!(
        parked["parked_at"]
            .as_str()
            .unwrap()
            .starts_with("127.254."),
        "{parked}"
    );
    assert_eq!(parked["pid"].as_u64(), Some(u64::from(tcp.pid())));

    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_status(&inst, "live");
    let added = wait_address_event(&events, "added", "192.0.2.10 added to");
    let line = added["line"].as_str().unwrap();
    assert!(line.ends_with("live again"), "{line}");
    assert!(
        line.contains(&format!("1 socket of python3 (pid {})", native.pid())),
        "{line}"
    );
    assert_eq!(added["sockets"].as_array().unwrap().len(), 3, "{added}");

    del_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_status(&inst, "dormant");
    let removed = wait_address_event(&events, "removed", "192.0.2.10 removed from");
    assert!(
        removed["line"].as_str().unwrap().ends_with("now dormant"),
        "{removed}"
    );
    assert_eq!(removed["state"], "dormant");
    // The same lines reach the daemon's log (the journal).
    assert!(
        daemon.log().contains("192.0.2.10 removed from"),
        "{}",
        daemon.log()
    );
    let binds: Vec<Value> = events
        .log()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["kind"] == "bind" && v["address"] == "192.0.2.10")
        .collect();
    let verdicts: Vec<&str> = binds
        .iter()
        .map(|b| b["verdict"].as_str().unwrap())
        .collect();
    assert!(
        verdicts.contains(&"freebind") && verdicts.iter().filter(|v| **v == "steered").count() == 2,
        "bind events: {verdicts:?}"
    );

    // Without a daemon, from the pins alone: still listed, and locality read afresh.
    drop(events);
    drop(daemon);
    let s = status(&inst);
    assert!(s["daemon"].is_null(), "{s}");
    assert_eq!(sockets(&s), expected("dormant"));
    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_status(&inst, "live");
    let text = inst.run_ok(&["status"]);
    assert!(text.starts_with("daemon: not running"), "{text}");
    assert!(
        text.lines().any(|l| l.contains("192.0.2.10")
            && l.contains("9000")
            && l.contains("steered (parked at 127.254.")
            && l.ends_with("live")),
        "{text}"
    );
}

/// One scrape of `/metrics` from inside `ns`, checked by promtool.
fn scrape(link: &Link, port: u16) -> String {
    let url = format!("http://127.0.0.1:{port}/metrics");
    let out = run_in(
        &link.server,
        None,
        &["curl", "-sS", "--max-time", "5", &url],
    );
    assert!(
        out.status.success(),
        "curl {url}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body = String::from_utf8(out.stdout).unwrap();
    let mut check = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool");
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), body.as_bytes()).unwrap();
    let res = check.wait_with_output().unwrap();
    assert!(
        res.status.success(),
        "promtool check metrics refused the scrape:\n{}{}\n--- scrape ---\n{body}",
        String::from_utf8_lossy(&res.stdout),
        String::from_utf8_lossy(&res.stderr)
    );
    body
}

/// The value of the sample `name{labels}` (labels exactly as rendered).
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[test]
fn metrics_pass_promtool_and_count_binds_by_attachment_and_verdict_as_they_happen() {
    if !require_root() {
        return;
    }
    ensure_tools();
    ensure_metrics_tools();
    let link = Link::new();
    let app = Cgroup::new("fb-metrics");
    let inst = Installation::new("fb-metrics");
    let port = 9797;
    let _daemon = Daemon::start(
        &inst,
        &link.server,
        &["--metrics-addr", &format!("127.0.0.1:{port}")],
    );
    inst.run_ok(&[
        "attach",
        "--cgroup",
        app.relative(),
        "--allow",
        "192.0.2.0/24",
    ]);
    let attachment = format!("cgroup {}", app.relative());
    let series = |verdict: &str| {
        format!("freebind_binds_total{{attachment=\"{attachment}\",verdict=\"{verdict}\"}}")
    };

    let before = scrape(&link, port);
    assert_eq!(
        sample(
            &before,
            &format!("freebind_programs_attached{{attachment=\"{attachment}\",pinned=\"true\"}}")
        ),
        10.0
    );
    assert_eq!(sample(&before, "freebind_daemon_up"), 1.0);
    let refused = Err(libc::EADDRNOTAVAIL);
    for (proto, addr, want) in [
        ("tcp", "192.0.2.20", Ok(())),
        ("tcp", "192.0.2.21", Ok(())),
        ("udp", "192.0.2.22", Ok(())),
        ("udp", "198.51.100.20", refused),
        ("tcp", "198.51.100.21", refused),
    ] {
        let got = try_bind(&link.server, Some(&app), proto, addr, 7000, true);
        assert_eq!(got, want, "bind {addr}:7000/{proto}");
    }
    let server = python_http_server(&link.server, Some(&app), "192.0.2.10", 8080);
    wait_listening(&link.server, "tcp", "192.0.2.10:8080", &server);
    let after = scrape(&link, port);
    assert_eq!(
        sample(&after, &series("freebind")) - sample(&before, &series("freebind")),
        4.0
    );
    assert_eq!(
        sample(&after, &series("refused")) - sample(&before, &series("refused")),
        2.0
    );
    assert_eq!(
        sample(
            &after,
            "freebind_sockets{mode=\"native\",state=\"dormant\"}"
        ),
        1.0
    );
    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_until("the socket counted live", SETTLE, || {
        sample(
            &scrape(&link, port),
            "freebind_sockets{mode=\"native\",state=\"live\"}",
        ) == 1.0
    });

    let out = run_in(
        &link.server,
        None,
        &[
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://127.0.0.1:{port}/"),
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");

    // What bpftool shows on the cgroup names freebind and the hook.
    let mut shown = bpf_programs_attached(&app);
    shown.sort();
    let names: Vec<&str> = shown.iter().map(|(_, name)| name.as_str()).collect();
    for want in [
        "fb_bind4",
        "fb_bind6",
        "fb_setsockopt",
        "fb_sock_ops",
        "fb_getsockname4",
    ] {
        assert!(names.contains(&want), "bpftool cgroup show: {shown:?}");
    }
    assert!(
        shown.contains(&("cgroup_inet4_bind".into(), "fb_bind4".into())),
        "{shown:?}"
    );
}

/// A process in the cgroup that binds `n` times as fast as it can, alternating an allowed
/// absent address (must succeed) and one outside the policy (must fail with
/// EADDRNOTAVAIL), and prints how many results were not the expected one.
const FLOOD_PY: &str = r#"
import errno, socket, sys
n = int(sys.argv[1]); wrong = 0
for i in range(n):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    allowed = i % 2 == 0
    addr = "192.0.2.%d" % (10 + i % 200) if allowed else "198.51.100.%d" % (10 + i % 200)
    try:
        s.bind((addr, 0))
        wrong += not allowed
    except OSError as e:
        wrong += allowed or e.errno != errno.EADDRNOTAVAIL
    s.close()
print(wrong)
"#;

#[test]
fn a_flood_of_binds_through_a_one_page_ring_buffer_decides_every_bind_right_and_counts_the_drops() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let app = Cgroup::new("fb-flood");
    let run_dir = TempDir::new("fb-flood-run");
    let run_arg = run_dir.path().to_str().unwrap().to_owned();
    let agent = Agent::run(
        &link.server,
        &app,
        &[
            "--allow",
            "192.0.2.0/24",
            "--event-ring-bytes",
            "4096",
            "--run-dir",
            &run_arg,
        ],
    );
    // The agent reads nothing while stopped: the ring fills after a few dozen events.
    agent.proc().signal(libc::SIGSTOP);
    let n = 4000;
    let out = run_in(
        &link.server,
        Some(&app),
        &["python3", "-c", FLOOD_PY, &n.to_string()],
    );
    agent.proc().signal(libc::SIGCONT);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "binds with the wrong result; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for_log(agent.proc(), "bind events lost", SETTLE);

    let status = freebind_e2e::agent_command()
        .args(["--run-dir", &run_arg, "status", "--json"])
        .output()
        .unwrap();
    let s: Value = serde_json::from_slice(&status.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&status.stderr)));
    let a = &s["attachments"][0];
    assert_eq!(a["pinned"], false, "{a}");
    assert_eq!(a["pid"].as_u64(), Some(u64::from(agent.pid())));
    // The counters are the programs' own: exact, whatever the ring buffer lost.
    assert_eq!(a["decisions"]["freebind"], n / 2, "{a}");
    assert_eq!(a["decisions"]["refused"], n / 2, "{a}");
    let dropped = s["events_dropped"].as_u64().unwrap();
    let log = agent.log();
    let logged = log
        .lines()
        .filter(|l| {
            l.contains("by python3") && (l.contains(": freebind —") || l.contains(": refused —"))
        })
        .count() as u64;
    eprintln!("{n} binds through a one-page ring with the agent stopped: {logged} logged, {dropped} dropped");
    assert!(dropped > 0, "nothing dropped with a one-page ring");
    assert_eq!(
        logged + dropped,
        n,
        "every decision is either logged or counted as dropped"
    );
}
