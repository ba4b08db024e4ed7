//! Smoke test of the test bed itself (no eBPF involved): namespaces, veth, addresses,
//! processes in namespaces and cgroups, clients, the agent guard (with a stand-in), and
//! that every guard cleans up after itself.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use freebind_e2e::{
    add_addr, add_addr6, addr6_tentative, bpf_programs_attached, cgroup2_mount, ensure_tools,
    http_get, require_root, run_in, spawn_in, tcp_request, udp_request, unique_name, wait_until,
    Agent, Cgroup, Link, Netns, TempDir,
};

/// Names `ip netns list` shows.
fn netns_list() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn link_carries_http_tcp_udp_from_client_namespace() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let names = (link.server.name().to_owned(), link.client.name().to_owned());
    assert!(link.server_if.len() <= 15 && link.client_if.len() <= 15);

    let ip = String::from_utf8_lossy(&run_in(&link.client, None, &["ip", "-o", "addr"]).stdout)
        .into_owned();
    assert!(
        ip.contains("192.0.2.1/24") && ip.contains("2001:db8::1/64"),
        "{ip}"
    );

    // A process outside any test cgroup cannot bind an address that is not there.
    let err = link
        .server
        .run_in_thread(|| TcpListener::bind("192.0.2.10:8080").map(drop))
        .expect_err("bind to an absent address must fail");
    assert_eq!(err.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{err}");

    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    add_addr6(&link.server, &link.server_if, "2001:db8::10/64", true);

    let docroot = TempDir::new("freebind-smoke-www");
    let token = unique_name("hello");
    fs::write(docroot.path().join("hello.txt"), &token).expect("write hello.txt");
    let http = spawn_in(
        &link.server,
        None,
        &[
            "python3",
            "-m",
            "http.server",
            "8080",
            "--bind",
            "192.0.2.10",
            "--directory",
            docroot.path().to_str().expect("utf-8 temp dir"),
        ],
    );
    wait_until("http.server answers", Duration::from_secs(20), || {
        http_get(&link.client, "192.0.2.10", 8080, "/hello.txt").is_ok()
    });
    let (status, body) =
        http_get(&link.client, "192.0.2.10", 8080, "/hello.txt").unwrap_or_else(|e| {
            panic!("{e}\nserver log:\n{}", http.log());
        });
    assert_eq!((status, body.as_str()), (200, token.as_str()));
    let (status, _) = http_get(&link.client, "192.0.2.10", 8080, "/missing").expect("GET");
    assert_eq!(status, 404);
    // Nothing listens on the IPv6 address's port 8080: refused, reported as an Err.
    let err = http_get(&link.client, "2001:db8::10", 8080, "/").expect_err("no v6 server");
    assert!(err.contains("refused"), "{err}");

    // TCP echo over IPv6 (socat), UDP echo over IPv4 (python) with the reply's source.
    let echo6 = spawn_in(
        &link.server,
        None,
        &[
            "socat",
            "TCP6-LISTEN:9001,bind=[2001:db8::10],reuseaddr,fork",
            "EXEC:cat",
        ],
    );
    wait_until("socat echo answers", Duration::from_secs(20), || {
        tcp_request(&link.client, "2001:db8::10", 9001, b"ping").is_ok()
    });
    let reply = tcp_request(&link.client, "2001:db8::10", 9001, b"ping over v6")
        .unwrap_or_else(|e| panic!("{e}\n{}", echo6.log()));
    assert_eq!(reply, b"ping over v6");

    let udp = spawn_in(
        &link.server,
        None,
        &[
            "python3",
            "-c",
            "import socket\n\
             s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
             s.bind(('0.0.0.0', 9002))\n\
             print('udp echo up', flush=True)\n\
             while True:\n    d, a = s.recvfrom(65536)\n    s.sendto(d.upper(), a)\n",
        ],
    );
    freebind_e2e::wait_for_log(&udp, "udp echo up", Duration::from_secs(20));
    let (data, from) =
        udp_request(&link.client, "192.0.2.10", 9002, b"hi").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!((data.as_slice(), from.as_str()), (&b"HI"[..], "192.0.2.10"));

    // Without nodad a new IPv6 address is tentative until DAD is done.
    add_addr6(&link.server, &link.server_if, "2001:db8::20/64", false);
    assert!(addr6_tentative(
        &link.server,
        &link.server_if,
        "2001:db8::20"
    ));
    wait_until("2001:db8::20 leaves DAD", Duration::from_secs(20), || {
        !addr6_tentative(&link.server, &link.server_if, "2001:db8::20")
    });

    let status = http.kill();
    assert_eq!(status.signal(), Some(libc::SIGTERM), "{status}");
    drop((http, echo6, udp, link));
    let list = netns_list();
    assert!(
        !list.contains(&names.0) && !list.contains(&names.1),
        "{names:?} still in:\n{list}"
    );
}

#[test]
fn cgroup_holds_processes_and_is_removed_with_them() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let ns = Netns::new("fb-smoke");
    let ns_name = ns.name().to_owned();
    let cg = Cgroup::new("freebind-smoke");
    let path = cg.path().to_owned();
    assert_eq!(path, cgroup2_mount().join(cg.relative()));
    assert!(!cg.relative().starts_with('/'));
    assert!(cg.procs().is_empty());

    let sleeper = spawn_in(&ns, Some(&cg), &["sleep", "30"]);
    wait_until("sleep joins the cgroup", Duration::from_secs(10), || {
        cg.procs().contains(&sleeper.pid())
    });
    // It is in the namespace too.
    let ns_of = |pid: u32| fs::read_link(format!("/proc/{pid}/ns/net")).expect("readlink ns");
    let probe = spawn_in(&ns, None, &["sleep", "30"]);
    assert_eq!(ns_of(sleeper.pid()), ns_of(probe.pid()));
    assert_ne!(ns_of(sleeper.pid()), ns_of(std::process::id()));
    drop(probe);

    // A short-lived command in the cgroup sees itself there.
    let out = run_in(&ns, Some(&cg), &["cat", "/proc/self/cgroup"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(cg.relative()), "{text}");

    assert_eq!(bpf_programs_attached(&cg), vec![]);

    // Dropping the cgroup kills what is inside and removes the directory.
    drop(cg);
    assert!(!path.exists(), "{} still exists", path.display());
    let status = sleeper
        .wait_timeout(Duration::from_secs(5))
        .expect("sleep was killed with its cgroup");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    drop(sleeper);
    drop(ns);
    assert!(!netns_list().contains(&ns_name));
}

#[test]
fn agent_guard_runs_through_ip_netns_exec() {
    if !require_root() {
        return;
    }
    ensure_tools();
    // A stand-in for freebind-agent: says what it was given and where it runs, then
    // "ready", and exits 0 on SIGTERM.
    let dir = TempDir::new("freebind-smoke-agent");
    let script = dir.path().join("fake-agent");
    fs::write(
        &script,
        "#!/bin/sh\n\
         echo \"args: $*\" >&2\n\
         echo \"netns: $(readlink /proc/self/ns/net)\" >&2\n\
         echo \"program already attached? no\" >&2\n\
         trap 'echo stopping >&2; exit 0' TERM\n\
         echo '[INFO] ready' >&2\n\
         while :; do sleep 0.1; done\n",
    )
    .expect("write stand-in");
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).expect("chmod");

    let ns = Netns::new("fb-smoke-agent");
    let cg = Cgroup::new("freebind-smoke-agent");
    let agent = Agent::run_binary(&script, &ns, &cg, &["--policy", "192.0.2.0/24"]);
    let log = agent.log();
    assert!(
        log.contains(&format!(
            "args: run --cgroup {} --policy 192.0.2.0/24",
            cg.relative()
        )),
        "{log}"
    );
    let agent_ns = fs::read_link(format!("/proc/{}/ns/net", agent.pid())).expect("agent ns");
    let probe = spawn_in(&ns, None, &["sleep", "30"]);
    let probe_ns = fs::read_link(format!("/proc/{}/ns/net", probe.pid())).expect("probe ns");
    assert_eq!(
        agent_ns, probe_ns,
        "the agent's pid is the process in the netns"
    );
    let status = agent.stop();
    assert!(status.success(), "{status}\n{}", agent.log());
    assert!(agent.log().contains("stopping"));
    // Stopping twice is harmless.
    assert!(agent.stop().success());
}
