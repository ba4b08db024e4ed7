//! Steer mode end to end: real programs that call `bind()` with no `setsockopt()` before it
//! (socat, python UDP servers, Rust std `UdpSocket`), started in the managed cgroup before
//! their address exists, parked on a loopback address and reached through `sk_lookup`;
//! real traffic from a client namespace across address add / remove / re-add.
use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use freebind_e2e::{
    agent_command, ensure_tools, require_root, run_in,
    scenario::{
        add_server_addr, addr_port, bind_decision, parked_sockets, serves_across_address_flap,
        try_bind, wait_bind_decision, wait_listening, wait_parked, NginxConf, EADDRINUSE,
        EADDRNOTAVAIL, PARKING_V4_PREFIX, PARKING_V6_PREFIX, SETTLE,
    },
    spawn_in, tcp_request, udp_request, wait_for_log, wait_until, Agent, Cgroup, Link, Netns, Proc,
};

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");
const TOKIO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-tokio-server");

/// What the scenarios send; the echo servers send it back.
const PING: &str = "steer ping";

/// A link, a cgroup and an agent serving that cgroup in the server's namespace.
fn managed(extra_args: &[&str]) -> (Link, Cgroup, Agent) {
    ensure_tools();
    let link = Link::new();
    let cgroup = Cgroup::new("fb-steer");
    let agent = Agent::run(&link.server, &cgroup, extra_args);
    (link, cgroup, agent)
}

/// `addr` with the prefix length the scenarios put it on the veth with.
fn cidr(addr: &str) -> String {
    if addr.contains(':') {
        format!("{addr}/64")
    } else {
        format!("{addr}/24")
    }
}

/// The IP of an `ss`-style `addr:port` (`"127.254.7.9"`, `"fd66:7265:6562:696e::1"`).
fn ip_of(addr_port: &str) -> String {
    let (ip, _port) = addr_port
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {addr_port:?}"));
    ip.trim_start_matches('[').trim_end_matches(']').to_owned()
}

/// One request to `addr:port` from the client namespace, rendered so a test can match
/// the answer and, for UDP, the address it came from: `"<reply> from <source ip>."`.
fn request(
    link: &Link,
    proto: &str,
    addr: &str,
    port: u16,
    payload: &str,
) -> Result<String, String> {
    request_from(&link.client, proto, addr, port, payload)
}

fn request_from(
    ns: &Netns,
    proto: &str,
    addr: &str,
    port: u16,
    payload: &str,
) -> Result<String, String> {
    if proto == "tcp" {
        tcp_request(ns, addr, port, payload.as_bytes())
            .map(|reply| String::from_utf8_lossy(&reply).trim_end().to_owned())
    } else {
        udp_request(ns, addr, port, payload.as_bytes()).map(|(reply, from)| {
            format!(
                "{} from {from}.",
                String::from_utf8_lossy(&reply).trim_end()
            )
        })
    }
}

/// What [`request`] returns when `answer` comes back from `addr` itself (for UDP, where
/// the source of the reply is what steer mode's sendmsg program sets).
fn answer_from(proto: &str, answer: &str, addr: &str) -> String {
    if proto == "tcp" {
        answer.to_owned()
    } else {
        format!("{answer} from {addr}.")
    }
}

/// The steer-mode story for `server`, already started in the cgroup and bound to `addr`
/// port `port` over `proto` before that address existed: its socket is parked (on a parking address of
/// the right family), the agent logs the bind as `steered` by `comm`, and the server
/// answers `reply` to [`PING`] across the address's add / remove / re-add — for UDP, from
/// `addr` itself.
fn steered_server_serves_across_address_flap(
    link: &Link,
    agent: &Agent,
    server: &Proc,
    (proto, addr, port): (&str, &str, u16),
    reply: &str,
    comm: &str,
) {
    let parked = wait_parked(&link.server, proto, port, 1, server);
    let parking_prefix = if addr.contains(':') {
        format!("[{PARKING_V6_PREFIX}")
    } else {
        PARKING_V4_PREFIX.to_owned()
    };
    assert!(
        parked[0].starts_with(&parking_prefix),
        "{addr} parked at {parked:?}"
    );
    let decision = wait_bind_decision(agent, server, &addr_port(addr, port), proto);
    assert_eq!(decision.verdict, "steered", "{}", decision.line);
    assert!(
        decision.comm.starts_with(comm),
        "expected a bind by {comm}: {}",
        decision.line
    );
    let expect = answer_from(proto, reply, addr);
    serves_across_address_flap(link, &cidr(addr), server, &expect, || {
        request(link, proto, addr, port, PING)
    });
}

/// A socat right-hand address that answers `name`, having read (part of) the request
/// first: `SYSTEM:echo` alone races socat writing the request into its stdin (EPIPE, and
/// socat drops the connection).
fn socat_answer(name: &str) -> String {
    format!("SYSTEM:head -c1 >/dev/null; echo {name}")
}

fn socat_tcp_listen(link: &Link, cgroup: &Cgroup, addr: &str, port: u16, answer: &str) -> Proc {
    let listen = if addr.contains(':') {
        format!("TCP6-LISTEN:{port},bind=[{addr}],fork")
    } else {
        format!("TCP-LISTEN:{port},bind={addr},fork")
    };
    spawn_in(&link.server, Some(cgroup), &["socat", &listen, answer])
}

fn socat_udp_recvfrom(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    addr: &str,
    port: u16,
    answer: &str,
) -> Proc {
    let listen = if addr.contains(':') {
        format!("UDP6-RECVFROM:{port},bind=[{addr}],fork")
    } else {
        format!("UDP-RECVFROM:{port},bind={addr},fork")
    };
    spawn_in(ns, cgroup, &["socat", &listen, answer])
}

#[test]
fn socat_tcp_listen_started_before_its_ipv4_address_exists_is_steered_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = socat_tcp_listen(&link, &cgroup, "192.0.2.10", 7000, "EXEC:cat");
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("tcp", "192.0.2.10", 7000),
        PING,
        "socat",
    );
}

#[test]
fn socat_tcp_listen_started_before_its_ipv6_address_exists_is_steered_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = socat_tcp_listen(&link, &cgroup, "2001:db8::10", 7000, "EXEC:cat");
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("tcp", "2001:db8::10", 7000),
        PING,
        "socat",
    );
}

#[test]
fn socat_udp_recvfrom_before_its_ipv4_address_exists_answers_from_it_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = socat_udp_recvfrom(&link.server, Some(&cgroup), "192.0.2.10", 7001, "EXEC:cat");
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "192.0.2.10", 7001),
        PING,
        "socat",
    );
}

#[test]
fn socat_udp_recvfrom_before_its_ipv6_address_exists_answers_from_it_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = socat_udp_recvfrom(
        &link.server,
        Some(&cgroup),
        "2001:db8::10",
        7001,
        &socat_answer("reply"),
    );
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "2001:db8::10", 7001),
        "reply",
        "socat",
    );
}

/// A UDP echo server that binds with no setsockopt() before it.
const UDP_ECHO_PLAIN: &str = r#"
import socket, sys
addr, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, port))
print("listening on", s.getsockname())
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
"#;

fn python_udp_echo(link: &Link, cgroup: &Cgroup, addr: &str, port: u16) -> Proc {
    spawn_in(
        &link.server,
        Some(cgroup),
        &["python3", "-c", UDP_ECHO_PLAIN, addr, &port.to_string()],
    )
}

#[test]
fn python_udp_server_without_setsockopt_answers_from_its_ipv4_address_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = python_udp_echo(&link, &cgroup, "192.0.2.10", 7002);
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "192.0.2.10", 7002),
        &format!("echo:{PING}"),
        "python3",
    );
}

#[test]
fn python_udp_server_without_setsockopt_answers_from_its_ipv6_address_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = python_udp_echo(&link, &cgroup, "2001:db8::10", 7002);
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "2001:db8::10", 7002),
        &format!("echo:{PING}"),
        "python3",
    );
}

fn echo_server(link: &Link, cgroup: &Cgroup, proto: &str, addr: &str, port: u16) -> Proc {
    spawn_in(
        &link.server,
        Some(cgroup),
        &[ECHO_SERVER, proto, addr, &port.to_string()],
    )
}

#[test]
fn rust_std_udp_socket_answers_from_its_ipv4_address_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = echo_server(&link, &cgroup, "udp", "192.0.2.10", 7003);
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "192.0.2.10", 7003),
        PING,
        "freebind-echo",
    );
}

#[test]
fn rust_std_udp_socket_answers_from_its_ipv6_address_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = echo_server(&link, &cgroup, "udp", "2001:db8::10", 7003);
    steered_server_serves_across_address_flap(
        &link,
        &agent,
        &server,
        ("udp", "2001:db8::10", 7003),
        PING,
        "freebind-echo",
    );
}

#[test]
fn an_ipv6_socket_bound_v4_mapped_is_parked_v4_mapped_and_steered_ipv4_traffic() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    // AF_INET6 (the address has a colon), no setsockopt(), no IPV6_V6ONLY.
    let server = python_udp_echo(&link, &cgroup, "::ffff:192.0.2.10", 7004);
    let parked = wait_parked(&link.server, "udp", 7004, 1, &server);
    assert!(
        parked[0].starts_with(&format!("[::ffff:{PARKING_V4_PREFIX}")),
        "{parked:?}"
    );
    let expect = answer_from("udp", &format!("echo:{PING}"), "192.0.2.10");
    serves_across_address_flap(&link, "192.0.2.10/24", &server, &expect, || {
        request(&link, "udp", "192.0.2.10", 7004, PING)
    });
}

/// Binds each `proto,addr,port` argument with no setsockopt() before it, keeps every
/// socket open, and prints `proto addr port <getsockname addr> <getsockname port>` (or
/// `... errno N`).
const GETSOCKNAME_PY: &str = r#"
import socket, sys
keep = []
for spec in sys.argv[1:]:
    proto, addr, port = spec.split(",")
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    keep.append(s)
    try:
        s.bind((addr, int(port)))
        name = s.getsockname()
        print(proto, addr, port, name[0], name[1])
    except OSError as e:
        print(proto, addr, port, "errno", e.errno)
"#;

#[test]
fn getsockname_reports_the_intended_address_and_for_port_zero_a_real_port() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let specs = [
        "tcp,192.0.2.10,7100",
        "udp,192.0.2.10,7100",
        "tcp,2001:db8::10,7100",
        "udp,2001:db8::10,7100",
        "tcp,192.0.2.11,0",
        "udp,192.0.2.11,0",
        "tcp,2001:db8::11,0",
        "udp,2001:db8::11,0",
    ];
    let mut argv = vec!["python3", "-c", GETSOCKNAME_PY];
    argv.extend(specs);
    let out = run_in(&link.server, Some(&cgroup), &argv);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for spec in specs {
        let want: Vec<&str> = spec.split(',').collect();
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().take(3).eq(want.iter().copied()))
            .unwrap_or_else(|| panic!("no line for {spec} in:\n{stdout}"));
        let got: Vec<&str> = line.split_whitespace().skip(3).collect();
        assert_eq!(got.len(), 2, "bind {spec} failed: {line}");
        assert_eq!(got[0], want[1], "getsockname address for {spec}: {line}");
        let port: u16 = got[1]
            .parse()
            .unwrap_or_else(|_| panic!("bad port in {line}"));
        if want[2] == "0" {
            assert_ne!(port, 0, "port 0 must read back the real port: {line}");
        } else {
            assert_eq!(port.to_string(), want[2], "{line}");
        }
    }
    for (proto, addr) in [("tcp", "192.0.2.10:7100"), ("udp", "[2001:db8::10]:7100")] {
        wait_until(
            &format!("the agent's decision on {addr}/{proto}"),
            SETTLE,
            || bind_decision(&agent.log(), addr, proto).is_some(),
        );
        let decision = bind_decision(&agent.log(), addr, proto).unwrap();
        assert_eq!(decision.verdict, "steered", "{}", decision.line);
    }
}

/// Binds `proto` to `addr` port 0 with no setsockopt() before it, prints `port N` (from
/// getsockname), then serves: TCP reads the request and answers it with a line (closing
/// with the request unread would reset the connection), UDP answers each datagram.
const PORT_ZERO_PY: &str = r#"
import socket, sys
proto, addr = sys.argv[1], sys.argv[2]
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
s.bind((addr, 0))
print("port", s.getsockname()[1])
if proto == "tcp":
    s.listen(8)
    while True:
        c, _ = s.accept()
        c.recv(2048)
        c.sendall(b"port zero ok\n")
        c.close()
else:
    while True:
        data, peer = s.recvfrom(2048)
        s.sendto(b"port zero ok", peer)
"#;

#[test]
fn a_server_bound_to_port_zero_is_steered_on_the_port_getsockname_reports() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    for (proto, addr) in [("tcp", "192.0.2.12"), ("udp", "2001:db8::12")] {
        let server = spawn_in(
            &link.server,
            Some(&cgroup),
            &["python3", "-c", PORT_ZERO_PY, proto, addr],
        );
        wait_for_log(&server, "port ", SETTLE);
        let log = server.log();
        let port: u16 = log
            .lines()
            .find_map(|l| l.strip_prefix("port "))
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no port printed: {log}"));
        assert_ne!(port, 0, "{log}");
        wait_parked(&link.server, proto, port, 1, &server);
        let expect = answer_from(proto, "port zero ok", addr);
        serves_across_address_flap(&link, &cidr(addr), &server, &expect, || {
            request(&link, proto, addr, port, PING)
        });
    }
}

/// Two servers in the cgroup on two intended addresses sharing one port, and on the same
/// port two neighbours on addresses that are there: one outside the cgroup, one inside it
/// (a local address: not parked). The port is taken as it would be natively.
fn two_intended_addresses_on_one_port_each_reach_their_own_server(proto: &str) {
    let (link, cgroup, agent) = managed(&[]);
    let port = 7200;
    let serve = |cg: Option<&Cgroup>, addr: &str, name: &str| {
        let answer = socat_answer(name);
        if proto == "tcp" {
            let listen = format!("TCP-LISTEN:{port},bind={addr},fork");
            spawn_in(&link.server, cg, &["socat", &listen, &answer])
        } else {
            socat_udp_recvfrom(&link.server, cg, addr, port, &answer)
        }
    };
    let a = serve(Some(&cgroup), "192.0.2.10", "server-a");
    let b = serve(Some(&cgroup), "192.0.2.11", "server-b");
    let parked = wait_parked(&link.server, proto, port, 2, &a);
    assert!(b.try_wait().is_none(), "server-b exited: {}", b.log());
    assert_ne!(parked[0], parked[1]);
    for (server, addr) in [(&a, "192.0.2.10"), (&b, "192.0.2.11")] {
        let decision = wait_bind_decision(&agent, server, &addr_port(addr, port), proto);
        assert_eq!(decision.verdict, "steered", "{}", decision.line);
    }

    // As natively, where these would be freebind sockets on 192.0.2.10/11:PORT: a
    // wildcard bind of the port without SO_REUSEADDR conflicts, and so does a second
    // bind of an intended address and port already taken.
    assert_eq!(
        try_bind(&link.server, Some(&cgroup), proto, "0.0.0.0", port, false),
        Err(EADDRINUSE),
        "wildcard bind in the cgroup"
    );
    assert_eq!(
        try_bind(
            &link.server,
            Some(&cgroup),
            proto,
            "192.0.2.10",
            port,
            false
        ),
        Err(EADDRINUSE),
        "second bind of 192.0.2.10:{port}"
    );

    // The neighbours, on addresses that are there, same port: outside the cgroup, and
    // inside it (a local address binds as ever, and is not parked).
    add_server_addr(&link, "192.0.2.50/24");
    add_server_addr(&link, "192.0.2.51/24");
    let neighbour = serve(None, "192.0.2.50", "neighbour");
    wait_listening(
        &link.server,
        proto,
        &addr_port("192.0.2.50", port),
        &neighbour,
    );
    let inside = serve(Some(&cgroup), "192.0.2.51", "inside-neighbour");
    wait_listening(&link.server, proto, &addr_port("192.0.2.51", port), &inside);
    let decision = wait_bind_decision(&agent, &inside, &addr_port("192.0.2.51", port), proto);
    assert_eq!(decision.verdict, "local", "{}", decision.line);
    assert_eq!(parked_sockets(&link.server, proto, port).len(), 2);
    let answers = |addr: &str, name: &str, server: &Proc| {
        let expect = answer_from(proto, name, addr);
        wait_until(&format!("{name} answering on {addr}"), SETTLE, || {
            if let Some(status) = server.try_wait() {
                panic!("{name} exited ({status}); log:\n{}", server.log());
            }
            request(&link, proto, addr, port, PING).is_ok_and(|r| r == expect)
        });
    };
    answers("192.0.2.50", "neighbour", &neighbour);
    answers("192.0.2.51", "inside-neighbour", &inside);
    add_server_addr(&link, "192.0.2.10/24");
    add_server_addr(&link, "192.0.2.11/24");
    answers("192.0.2.10", "server-a", &a);
    answers("192.0.2.11", "server-b", &b);
    answers("192.0.2.50", "neighbour", &neighbour);
    answers("192.0.2.51", "inside-neighbour", &inside);

    // One intended address goes away: only its server stops being reachable.
    freebind_e2e::del_addr(&link.server, &link.server_if, "192.0.2.10/24");
    if let Ok(reply) = request(&link, proto, "192.0.2.10", port, PING) {
        panic!("192.0.2.10 answered with its address removed: {reply:?}");
    }
    answers("192.0.2.11", "server-b", &b);
    answers("192.0.2.50", "neighbour", &neighbour);
    answers("192.0.2.51", "inside-neighbour", &inside);
    assert!(
        bind_decision(&agent.log(), &addr_port("192.0.2.50", port), proto).is_none(),
        "the agent judged a bind outside its cgroup:\n{}",
        agent.log()
    );
}

#[test]
fn two_intended_addresses_on_one_tcp_port_each_reach_their_own_server_beside_a_neighbour() {
    if !require_root() {
        return;
    }
    two_intended_addresses_on_one_port_each_reach_their_own_server("tcp");
}

#[test]
fn two_intended_addresses_on_one_udp_port_each_reach_their_own_server_beside_a_neighbour() {
    if !require_root() {
        return;
    }
    two_intended_addresses_on_one_port_each_reach_their_own_server("udp");
}

#[test]
fn the_parking_address_itself_does_not_answer() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let answer = &socat_answer("steered");
    let servers = [
        (
            "tcp",
            "192.0.2.10",
            socat_tcp_listen(&link, &cgroup, "192.0.2.10", 7300, answer),
        ),
        (
            "udp",
            "192.0.2.10",
            socat_udp_recvfrom(&link.server, Some(&cgroup), "192.0.2.10", 7300, answer),
        ),
        (
            "tcp",
            "2001:db8::10",
            socat_tcp_listen(&link, &cgroup, "2001:db8::10", 7301, answer),
        ),
    ];
    let mut parked = Vec::new();
    for (proto, addr, server) in &servers {
        let port = if addr.contains(':') { 7301 } else { 7300 };
        let parking = wait_parked(&link.server, proto, port, 1, server).remove(0);
        let decision = wait_bind_decision(&agent, server, &addr_port(addr, port), proto);
        assert_eq!(decision.verdict, "steered", "{}", decision.line);
        assert!(
            decision
                .line
                .contains(&format!("parked at {}", ip_of(&parking))),
            "ss shows {parking}, the agent says: {}",
            decision.line
        );
        parked.push((*proto, *addr, port, ip_of(&parking)));
    }
    add_server_addr(&link, "192.0.2.10/24");
    add_server_addr(&link, "2001:db8::10/64");
    for (proto, addr, port, parking) in &parked {
        // The intended address answers, from the client and from inside the namespace...
        let expect = answer_from(proto, "steered", addr);
        wait_until(&format!("{addr}:{port}/{proto} answering"), SETTLE, || {
            request(&link, proto, addr, *port, PING).is_ok_and(|r| r == expect)
        });
        let inside = request_from(&link.server, proto, addr, *port, PING);
        assert_eq!(
            inside.as_deref(),
            Ok(expect.as_str()),
            "from inside the namespace"
        );
        // ...while the parking address, the socket's real local address, does not.
        if let Ok(reply) = request_from(&link.server, proto, parking, *port, PING) {
            panic!(
                "{proto} socket parked at {parking}:{port} for {addr} answered there: {reply:?}"
            );
        }
    }
}

#[test]
fn outside_the_cgroup_or_the_policy_binds_fail_with_eaddrnotavail_as_without_the_agent() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&["--allow", "192.0.2.0/24"]);
    for proto in ["tcp", "udp"] {
        for reuseaddr in [false, true] {
            let mode = if reuseaddr {
                "SO_REUSEADDR first"
            } else {
                "bare bind()"
            };
            let bind = |cg, addr| try_bind(&link.server, cg, proto, addr, 7400, reuseaddr);
            // What the kernel answers without the agent (the test runs no agent for the
            // process outside the cgroup): EADDRNOTAVAIL.
            assert_eq!(
                bind(None, "192.0.2.10"),
                Err(EADDRNOTAVAIL),
                "{proto}, {mode}, outside the cgroup"
            );
            assert_eq!(
                bind(None, "198.51.100.7"),
                Err(EADDRNOTAVAIL),
                "{proto}, {mode}, outside the cgroup"
            );
            assert_eq!(
                bind(Some(&cgroup), "198.51.100.7"),
                Err(EADDRNOTAVAIL),
                "{proto}, {mode}, outside the policy"
            );
            assert_eq!(
                bind(Some(&cgroup), "2001:db8::7"),
                Err(EADDRNOTAVAIL),
                "{proto}, {mode}, outside the policy"
            );
            // The control: inside the cgroup and the policy, either mode binds.
            assert_eq!(
                bind(Some(&cgroup), "192.0.2.10"),
                Ok(()),
                "{proto}, {mode}, allowed"
            );
        }
        wait_until("the refusals are logged", Duration::from_secs(5), || {
            bind_decision(&agent.log(), "198.51.100.7:7400", proto)
                .is_some_and(|d| d.verdict == "refused")
        });
    }
}

#[test]
fn socat_udp_listen_connecting_back_from_a_parked_socket_is_reported_with_the_reuseaddr_advice() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    // UDP-LISTEN receives the first datagram, then connect()s its socket to the peer:
    // from a parked socket that cannot work.
    let parked = spawn_in(
        &link.server,
        Some(&cgroup),
        &["socat", "UDP-LISTEN:7500,bind=192.0.2.10", "EXEC:cat"],
    );
    wait_parked(&link.server, "udp", 7500, 1, &parked);
    let decision = wait_bind_decision(&agent, &parked, "192.0.2.10:7500", "udp");
    assert_eq!(decision.verdict, "steered", "{}", decision.line);
    add_server_addr(&link, "192.0.2.10/24");
    let report = || {
        agent
            .log()
            .lines()
            .find(|l| l.contains("parked-connect"))
            .map(str::to_owned)
    };
    let mut replies = Vec::new();
    wait_until(
        "the agent reports the connect from a parked socket",
        SETTLE,
        || {
            if report().is_some() {
                return true;
            }
            if let Ok(reply) = request(&link, "udp", "192.0.2.10", 7500, PING) {
                replies.push(reply);
            }
            report().is_some()
        },
    );
    let line = report().unwrap_or_default();
    assert!(
        line.contains("socat") && line.contains("reuseaddr"),
        "{line}"
    );
    let status = parked
        .wait_timeout(SETTLE)
        .unwrap_or_else(|| panic!("socat still runs after its connect; log:\n{}", parked.log()));
    assert!(
        !status.success(),
        "socat's connect back succeeded? log:\n{}",
        parked.log()
    );
    assert_eq!(
        replies,
        Vec::<String>::new(),
        "socat answered from a parked socket"
    );

    // With reuseaddr socat calls setsockopt() first: native mode, and it answers.
    let native = spawn_in(
        &link.server,
        Some(&cgroup),
        &[
            "socat",
            "UDP-LISTEN:7501,bind=192.0.2.11,reuseaddr",
            "EXEC:cat",
        ],
    );
    wait_listening(&link.server, "udp", "192.0.2.11:7501", &native);
    let decision = wait_bind_decision(&agent, &native, "192.0.2.11:7501", "udp");
    assert_eq!(decision.verdict, "freebind", "{}", decision.line);
    add_server_addr(&link, "192.0.2.11/24");
    // UDP-LISTEN serves its first peer only, so one request must do.
    let reply = request(&link, "udp", "192.0.2.11", 7501, PING);
    assert_eq!(
        reply,
        Ok(answer_from("udp", PING, "192.0.2.11")),
        "socat log:\n{}",
        native.log()
    );
}

#[test]
fn exec_with_netns_runs_cmd_in_that_namespace_and_steers_its_binds_there() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    // Started from the test's own namespace: CMD, the cgroup's only member, runs in the
    // server's namespace, and that is where its binds must be judged and steered.
    let mut cmd = agent_command();
    cmd.args([
        "exec",
        "--netns",
        link.server.name(),
        "--",
        "socat",
        "TCP-LISTEN:7600,bind=192.0.2.10,fork",
        &socat_answer("exec-steered"),
    ]);
    let exec = Proc::spawn(cmd, "freebind-agent exec");
    wait_parked(&link.server, "tcp", 7600, 1, &exec);
    serves_across_address_flap(&link, "192.0.2.10/24", &exec, "exec-steered", || {
        request(&link, "tcp", "192.0.2.10", 7600, PING)
    });
    let decision = bind_decision(&exec.log(), "192.0.2.10:7600", "tcp")
        .unwrap_or_else(|| panic!("no bind decision logged:\n{}", exec.log()));
    assert_eq!(decision.verdict, "steered", "{}", decision.line);
    assert_eq!(decision.comm, "socat", "{}", decision.line);
    exec.kill();
    assert_eq!(
        v6_parking_on_lo(&link.server),
        Vec::<String>::new(),
        "left behind in the served namespace"
    );
}

/// The steer-mode parking addresses on `lo` in `ns`.
fn v6_parking_on_lo(ns: &Netns) -> Vec<String> {
    ns.ip(&["-6", "-o", "addr", "show", "dev", "lo"])
        .lines()
        .filter_map(|l| l.split_whitespace().skip_while(|w| *w != "inet6").nth(1))
        .filter(|a| a.starts_with(PARKING_V6_PREFIX))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_agent_removes_its_ipv6_parking_addresses_when_it_stops() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = python_udp_echo(&link, &cgroup, "2001:db8::10", 7700);
    wait_parked(&link.server, "udp", 7700, 1, &server);
    assert_ne!(v6_parking_on_lo(&link.server), Vec::<String>::new());
    assert!(agent.stop().success(), "{}", agent.log());
    assert_eq!(
        v6_parking_on_lo(&link.server),
        Vec::<String>::new(),
        "left on lo after the agent stopped; agent log:\n{}",
        agent.log()
    );
}

#[test]
fn two_agents_in_one_namespace_share_the_ipv6_parking_addresses_and_the_last_removes_them() {
    if !require_root() {
        return;
    }
    let (link, _cgroup, first) = managed(&[]);
    let other_cgroup = Cgroup::new("fb-steer");
    let second = Agent::run(&link.server, &other_cgroup, &[]);
    let server = python_udp_echo(&link, &other_cgroup, "2001:db8::10", 7701);
    wait_parked(&link.server, "udp", 7701, 1, &server);

    // The first agent added the pool; the second shares it and has a socket parked there.
    assert!(first.stop().success(), "{}", first.log());
    assert_eq!(
        v6_parking_on_lo(&link.server).len(),
        32,
        "the pool must stay while another agent serves the namespace; first agent's log:\n{}",
        first.log()
    );

    assert!(second.stop().success(), "{}", second.log());
    assert_eq!(
        v6_parking_on_lo(&link.server),
        Vec::<String>::new(),
        "the last agent to stop leaves no parking address; its log:\n{}",
        second.log()
    );
}

// ---------------------------------------------------------------------------------------
// The README's table of which program takes which mode, measured.

const README_BEGIN: &str = "<!-- program-modes:begin -->";
const README_END: &str = "<!-- program-modes:end -->";
const UPDATE_README_ENV: &str = "FREEBIND_UPDATE_README";

const REUSEADDR_THEN_BIND: &str = "`setsockopt(SO_REUSEADDR)`, then `bind()`";
const BARE_BIND: &str = "`bind()` with no `setsockopt()` before it";

/// The mode a verdict word of the agent's log stands for.
fn mode_of(verdict: &str) -> String {
    match verdict {
        "freebind" => "native".to_owned(),
        "steered" => "steer".to_owned(),
        other => format!("none (`{other}`)"),
    }
}

/// `| program | how it binds | mode |` rows, ending with a newline.
fn render_table(rows: &[(&str, &str, String)]) -> String {
    let mut table = String::from("| program | how it binds | mode |\n|---|---|---|\n");
    for (program, how, mode) in rows {
        table.push_str(&format!("| {program} | {how} | {mode} |\n"));
    }
    table
}

/// What is between the README's marker lines, without the newlines around it.
fn readme_table(readme: &str) -> Option<&str> {
    let start = readme.find(&format!("{README_BEGIN}\n"))? + README_BEGIN.len() + 1;
    let len = readme[start..].find(README_END)?;
    Some(readme[start..start + len].trim_matches('\n'))
}

/// `readme` with `table` between its marker lines; when it has none, with a section
/// holding them inserted before the first `## ` heading that mentions cost, or at the end.
fn readme_with_table(readme: &str, table: &str) -> String {
    let block = format!("{README_BEGIN}\n{}\n{README_END}", table.trim_matches('\n'));
    if let Some(begin) = readme.find(&format!("{README_BEGIN}\n")) {
        if let Some(len) = readme[begin..].find(README_END) {
            let end = begin + len + README_END.len();
            return format!("{}{block}{}", &readme[..begin], &readme[end..]);
        }
    }
    let section = format!(
        "## Which programs take which mode\n\
         Measured by the end-to-end test `the_readme_table_of_program_modes_is_what_the_agent_logs` \
         (`tests/tests/steer_mode.rs`): each program binds an address that is not there yet, in \
         a cgroup the agent serves, and the agent's log says which mode took the bind.\n\n\
         {block}\n"
    );
    let mut offset = 0;
    for line in readme.split_inclusive('\n') {
        if line.starts_with("## ") && line.to_lowercase().contains("cost") {
            return format!("{}{section}\n{}", &readme[..offset], &readme[offset..]);
        }
        offset += line.len();
    }
    let sep = if readme.ends_with("\n\n") || readme.is_empty() {
        ""
    } else if readme.ends_with('\n') {
        "\n"
    } else {
        "\n\n"
    };
    format!("{readme}{sep}{section}")
}

/// A directory removed when dropped.
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("workspace root")
}

#[test]
fn the_readme_table_of_program_modes_is_what_the_agent_logs() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let ns = Netns::new("fb-srv");
    let cgroup = Cgroup::new("fb-steer");
    let agent = Agent::run(&ns, &cgroup, &[]);
    let port = 8080;
    let nginx = NginxConf::new(&["192.0.2.101:8080"]);
    let socat_tcp = format!("TCP-LISTEN:{port},bind=192.0.2.104,fork");
    let socat_tcp_reuse = format!("TCP-LISTEN:{port},bind=192.0.2.105,reuseaddr,fork");
    let socat_udp = format!("UDP-RECVFROM:{port},bind=192.0.2.106,fork");
    let port_s = port.to_string();
    // (program, how it binds, protocol, address it binds, argv)
    let programs: Vec<(&str, &str, &str, &str, Vec<&str>)> =
        vec![
        (
            "nginx",
            REUSEADDR_THEN_BIND,
            "tcp",
            "192.0.2.101",
            nginx.argv().to_vec(),
        ),
        (
            "python3 `-m http.server`",
            REUSEADDR_THEN_BIND,
            "tcp",
            "192.0.2.102",
            vec!["python3", "-m", "http.server", &port_s, "--bind", "192.0.2.102"],
        ),
        (
            "tokio `TcpListener::bind`",
            REUSEADDR_THEN_BIND,
            "tcp",
            "192.0.2.103",
            vec![TOKIO_SERVER, "192.0.2.103:8080"],
        ),
        (
            "socat `TCP-LISTEN`",
            BARE_BIND,
            "tcp",
            "192.0.2.104",
            vec!["socat", &socat_tcp, "EXEC:cat"],
        ),
        (
            "socat `TCP-LISTEN,reuseaddr`",
            REUSEADDR_THEN_BIND,
            "tcp",
            "192.0.2.105",
            vec!["socat", &socat_tcp_reuse, "EXEC:cat"],
        ),
        (
            "socat `UDP-RECVFROM`",
            BARE_BIND,
            "udp",
            "192.0.2.106",
            vec!["socat", &socat_udp, "EXEC:cat"],
        ),
        (
            "python3 UDP socket, no `setsockopt()`",
            BARE_BIND,
            "udp",
            "192.0.2.107",
            vec!["python3", "-c", UDP_ECHO_PLAIN, "192.0.2.107", &port_s],
        ),
        (
            "Rust std `UdpSocket::bind` (`freebind-echo-server udp`)",
            BARE_BIND,
            "udp",
            "192.0.2.108",
            vec![ECHO_SERVER, "udp", "192.0.2.108", &port_s],
        ),
        (
            "`socket()`, `bind()`, `listen()` as small C servers do (`freebind-echo-server tcp`)",
            BARE_BIND,
            "tcp",
            "192.0.2.109",
            vec![ECHO_SERVER, "tcp", "192.0.2.109", &port_s],
        ),
    ];
    let mut rows = Vec::new();
    let mut servers = Vec::new();
    for (program, how, proto, addr, argv) in &programs {
        let server = spawn_in(&ns, Some(&cgroup), argv);
        let decision = wait_bind_decision(&agent, &server, &addr_port(addr, port), proto);
        rows.push((*program, *how, mode_of(&decision.verdict)));
        servers.push(server);
    }
    let table = render_table(&rows);
    let target = workspace_root().join("target");
    fs::create_dir_all(&target).unwrap();
    let written = target.join("program-modes.md");
    fs::write(&written, &table).unwrap();

    let readme_path = workspace_root().join("README.md");
    let readme = fs::read_to_string(&readme_path).unwrap();
    if readme_table(&readme) == Some(table.trim_matches('\n')) {
        return;
    }
    if std::env::var(UPDATE_README_ENV).is_ok_and(|v| v == "1") {
        fs::write(&readme_path, readme_with_table(&readme, &table)).unwrap();
        eprintln!(
            "updated the program-modes table in {}",
            readme_path.display()
        );
        return;
    }
    panic!(
        "{} does not hold the measured table (written to {}) between {README_BEGIN} and \
         {README_END}.\nMeasured:\n{table}\nREADME has:\n{}\n\
         To update it, run as root: cd {} && cargo xtask build && {UPDATE_README_ENV}=1 \
         FREEBIND_AGENT=$PWD/target/release/freebind-agent cargo test --release -p freebind-e2e \
         --test steer_mode the_readme_table_of_program_modes",
        readme_path.display(),
        written.display(),
        readme_table(&readme).unwrap_or("<no markers>"),
        workspace_root().display()
    );
}

#[test]
fn the_readme_table_goes_between_its_markers_or_in_a_new_section_before_cost() {
    let table = render_table(&[
        ("socat `TCP-LISTEN`", BARE_BIND, mode_of("steered")),
        ("nginx", REUSEADDR_THEN_BIND, mode_of("freebind")),
        ("x", BARE_BIND, mode_of("not-freebind")),
    ]);
    assert!(table
        .contains("| socat `TCP-LISTEN` | `bind()` with no `setsockopt()` before it | steer |\n"));
    assert!(table.contains("| nginx | `setsockopt(SO_REUSEADDR)`, then `bind()` | native |\n"));
    assert!(table.contains("| none (`not-freebind`) |\n"));

    let readme = "# freebind\n\nintro\n\n## How: native mode\ntext\n\n## Cost\nbench\n";
    let inserted = readme_with_table(readme, &table);
    assert_eq!(readme_table(&inserted), Some(table.trim_matches('\n')));
    let section = inserted.find("## Which programs take which mode").unwrap();
    assert!(section > inserted.find("## How: native mode").unwrap());
    assert!(section < inserted.find("## Cost").unwrap());
    assert!(inserted.ends_with("## Cost\nbench\n"), "{inserted}");
    assert_eq!(readme_with_table(&inserted, &table), inserted, "idempotent");

    let other = render_table(&[("nginx", REUSEADDR_THEN_BIND, mode_of("steered"))]);
    let replaced = readme_with_table(&inserted, &other);
    assert_eq!(readme_table(&replaced), Some(other.trim_matches('\n')));
    assert_eq!(replaced.matches(README_BEGIN).count(), 1);
    assert_eq!(replaced.matches("## Which programs").count(), 1);

    let no_cost = readme_with_table("# x\n\n## Use\nu\n", &table);
    assert!(
        no_cost.starts_with("# x\n\n## Use\nu\n\n## Which programs"),
        "{no_cost}"
    );
    assert_eq!(readme_table(&no_cost), Some(table.trim_matches('\n')));
    assert_eq!(readme_table("# x\n"), None);
    // The real README (read only): the block lands in it, and nothing else changes.
    let real = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let updated = readme_with_table(&real, &table);
    assert_eq!(readme_table(&updated), Some(table.trim_matches('\n')));
    if readme_table(&real).is_none() {
        let begin = updated.find("## Which programs take which mode").unwrap();
        let end = updated.find(README_END).unwrap() + README_END.len() + "\n\n".len();
        assert_eq!(format!("{}{}", &updated[..begin], &updated[end..]), real);
    }
}

#[test]
fn a_steered_bind_cannot_take_an_address_and_port_another_socket_already_holds() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let bind = |addr, port, cg| try_bind(&link.server, cg, "tcp", addr, port, false);

    // A freebind socket (native mode) holds 192.0.2.10:7100 while the address is absent:
    // natively a second bind of it fails, and so must a parked one, which the kernel alone
    // would not see (it lands on a parking address).
    let holder = spawn_in(
        &link.server,
        Some(&cgroup),
        &[ECHO_SERVER, "tcp", "192.0.2.10", "7100", "--reuseaddr"],
    );
    wait_listening(&link.server, "tcp", "192.0.2.10:7100", &holder);
    assert_eq!(bind("192.0.2.10", 7100, Some(&cgroup)), Err(EADDRINUSE));
    wait_until("the conflict is logged", SETTLE, || {
        agent.log().contains("bind 192.0.2.10:7100/tcp by python3")
            && agent.log().contains("in-use")
    });

    // Once the address is present, binds of it are the kernel's to judge, even after
    // freebind parked something there: a service outside the cgroup on 192.0.2.10:7101
    // keeps its port against a process inside.
    let parked = echo_server(&link, &cgroup, "tcp", "192.0.2.10", 7102);
    wait_parked(&link.server, "tcp", 7102, 1, &parked);
    add_server_addr(&link, "192.0.2.10/24");
    let outside = spawn_in(
        &link.server,
        None,
        &[ECHO_SERVER, "tcp", "192.0.2.10", "7101"],
    );
    wait_listening(&link.server, "tcp", "192.0.2.10:7101", &outside);
    assert_eq!(bind("192.0.2.10", 7101, Some(&cgroup)), Err(EADDRINUSE));
    assert_eq!(
        tcp_request(&link.client, "192.0.2.10", 7101, PING.as_bytes())
            .map(|b| b == PING.as_bytes()),
        Ok(true),
        "the outside service must still get its connections"
    );
    // A local address binds natively (no parking) for a client too: bind, then connect.
    assert_eq!(bind("192.0.2.10", 0, Some(&cgroup)), Ok(()));
}
