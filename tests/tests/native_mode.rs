//! Native mode end to end: real servers started in the managed cgroup before their address
//! exists, real traffic from a client namespace across address add / remove / re-add.
use std::time::Duration;

use freebind_e2e::{
    add_addr6, addr6_tentative, bpf_programs_attached, ensure_tools, http_get, require_root,
    run_in,
    scenario::{
        python_http_server, serves_across_address_flap, try_bind, wait_listening, NginxConf,
        EADDRNOTAVAIL, SETTLE,
    },
    spawn_in, tcp_request, udp_request, wait_until, Agent, Cgroup, Link,
};

const TOKIO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-tokio-server");

/// Cgroup programs one agent attaches: bind, connect, getsockname and sendmsg for both
/// families, sock_ops and setsockopt.
const PROGRAMS_PER_ATTACHMENT: usize = 10;

/// A link, a cgroup and an agent serving that cgroup in the server's namespace.
fn managed(extra_args: &[&str]) -> (Link, Cgroup, Agent) {
    ensure_tools();
    let link = Link::new();
    let cgroup = Cgroup::new("fb-native");
    let agent = Agent::run(&link.server, &cgroup, extra_args);
    (link, cgroup, agent)
}

/// DAD probes one second apart: the address stays tentative long enough for a python
/// server to start and bind during it, also under an emulated CPU on a busy host (five
/// were too few there).
const DAD_PROBES: u32 = 12;
/// How long DAD may take to end after those probes.
const DAD_DONE: std::time::Duration = std::time::Duration::from_secs(DAD_PROBES as u64 + 30);

#[test]
fn python_http_server_bound_before_its_ipv4_address_exists_serves_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let server = python_http_server(&link.server, Some(&cgroup), "192.0.2.10", 8080);
    serves_across_address_flap(&link, "192.0.2.10/24", &server, "Directory listing", || {
        http_get(&link.client, "192.0.2.10", 8080, "/").map(|(_, body)| body)
    });
    assert!(
        agent.log().contains("bind 192.0.2.10:8080/tcp by python3"),
        "{}",
        agent.log()
    );
    assert!(agent.log().contains("): freebind — "), "{}", agent.log());
}

#[test]
fn python_http_server_bound_before_its_ipv6_address_exists_serves_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    let server = python_http_server(&link.server, Some(&cgroup), "2001:db8::10", 8080);
    serves_across_address_flap(
        &link,
        "2001:db8::10/64",
        &server,
        "Directory listing",
        || http_get(&link.client, "2001:db8::10", 8080, "/").map(|(_, body)| body),
    );
}

#[test]
fn nginx_started_before_its_address_exists_serves_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    let nginx = NginxConf::new(&["192.0.2.10:8081", "[2001:db8::10]:8081"]);
    let server = spawn_in(&link.server, Some(&cgroup), &nginx.argv());
    wait_listening(&link.server, "tcp", "192.0.2.10:8081", &server);
    wait_listening(&link.server, "tcp", "[2001:db8::10]:8081", &server);
    serves_across_address_flap(&link, "192.0.2.10/24", &server, "nginx ok", || {
        http_get(&link.client, "192.0.2.10", 8081, "/").map(|(_, body)| body)
    });
    serves_across_address_flap(&link, "2001:db8::10/64", &server, "nginx ok", || {
        http_get(&link.client, "2001:db8::10", 8081, "/").map(|(_, body)| body)
    });
    drop(server);
}

#[test]
fn tokio_tcp_listener_under_exec_serves_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    // `exec` inside the server's namespace: the transient cgroup, the agent and the server
    // all come from one command, as an operator would try it.
    let agent = freebind_e2e::agent_path();
    let agent = agent.to_string_lossy();
    let server = spawn_in(
        &link.server,
        None,
        &[&agent, "exec", "--", TOKIO_SERVER, "192.0.2.10:8082"],
    );
    wait_listening(&link.server, "tcp", "192.0.2.10:8082", &server);
    serves_across_address_flap(&link, "192.0.2.10/24", &server, "tokio ok", || {
        tcp_request(&link.client, "192.0.2.10", 8082, b"")
            .map(|b| String::from_utf8_lossy(&b).into_owned())
    });
}

const UDP_ECHO_REUSEADDR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
"#;

#[test]
fn udp_server_setting_reuseaddr_before_bind_answers_from_its_address_across_remove_and_readd() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    let server = spawn_in(
        &link.server,
        Some(&cgroup),
        &["python3", "-c", UDP_ECHO_REUSEADDR, "192.0.2.10", "5300"],
    );
    wait_listening(&link.server, "udp", "192.0.2.10:5300", &server);
    serves_across_address_flap(
        &link,
        "192.0.2.10/24",
        &server,
        "echo:ping from 192.0.2.10",
        || {
            udp_request(&link.client, "192.0.2.10", 5300, b"ping")
                .map(|(reply, from)| format!("{} from {from}", String::from_utf8_lossy(&reply)))
        },
    );
}

#[test]
fn a_process_outside_the_cgroup_still_gets_eaddrnotavail() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    assert_eq!(
        try_bind(&link.server, Some(&cgroup), "tcp", "192.0.2.10", 8080, true),
        Ok(())
    );
    assert_eq!(
        try_bind(&link.server, None, "tcp", "192.0.2.10", 8080, true),
        Err(EADDRNOTAVAIL)
    );
    assert_eq!(
        try_bind(&link.server, None, "udp", "2001:db8::10", 8080, true),
        Err(EADDRNOTAVAIL)
    );
}

#[test]
fn allow_policy_admits_its_prefix_and_refuses_others_with_eaddrnotavail() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&["--allow", "192.0.2.0/24"]);
    let bind = |proto, addr, port| try_bind(&link.server, Some(&cgroup), proto, addr, port, true);
    assert_eq!(bind("tcp", "192.0.2.20", 8080), Ok(()));
    assert_eq!(bind("udp", "192.0.2.21", 8080), Ok(()));
    assert_eq!(bind("tcp", "203.0.113.5", 8080), Err(EADDRNOTAVAIL));
    assert_eq!(bind("tcp", "2001:db8::5", 8080), Err(EADDRNOTAVAIL));
    // The same address written v4-mapped on an AF_INET6 socket is judged as IPv4.
    assert_eq!(bind("tcp", "::ffff:203.0.113.5", 8080), Err(EADDRNOTAVAIL));
    assert_eq!(bind("tcp", "::ffff:192.0.2.22", 8080), Ok(()));
    // Addresses that are local bind as ever, policy or not.
    assert_eq!(bind("tcp", "127.0.0.1", 0), Ok(()));
    wait_until("the refusal is logged", Duration::from_secs(5), || {
        agent.log().contains("bind 203.0.113.5:8080/tcp by python3")
    });
    assert!(agent.log().contains("refused"), "{}", agent.log());
}

const OPTIONS_PY: &str = r#"
import json, socket
T, IP, SOL = socket.IPPROTO_TCP, socket.SOL_IP, socket.SOL_SOCKET
IP_FREEBIND, TCP_MAXSEG = 15, socket.TCP_MAXSEG
r = {}
s = socket.socket()
s.setsockopt(SOL, socket.SO_REUSEADDR, 1)
s.setsockopt(SOL, socket.SO_REUSEPORT, 1)
s.setsockopt(T, socket.TCP_NODELAY, 1)
r["reuseaddr"] = s.getsockopt(SOL, socket.SO_REUSEADDR)
r["reuseport"] = s.getsockopt(SOL, socket.SO_REUSEPORT)
r["nodelay"] = s.getsockopt(T, socket.TCP_NODELAY)
r["freebind"] = s.getsockopt(IP, IP_FREEBIND)
t = socket.socket()
try:
    t.setsockopt(T, TCP_MAXSEG, 1)
    r["invalid_errno"] = 0
except OSError as e:
    r["invalid_errno"] = e.errno
r["freebind_after_invalid"] = t.getsockopt(IP, IP_FREEBIND)
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u.setsockopt(SOL, socket.SO_REUSEADDR, 0)
r["v6_udp_reuseaddr_zero"] = u.getsockopt(SOL, socket.SO_REUSEADDR)
r["v6_udp_freebind"] = u.getsockopt(socket.IPPROTO_IPV6, 78)
v = socket.socket()
v.setsockopt(IP, IP_FREEBIND, 0)
v.setsockopt(SOL, socket.SO_REUSEADDR, 1)
r["app_freebind_off_stays_off"] = v.getsockopt(IP, IP_FREEBIND)
print(json.dumps(r, sort_keys=True))
"#;

#[test]
fn the_apps_own_options_keep_their_values_and_an_invalid_one_still_fails() {
    if !require_root() {
        return;
    }
    let (link, cgroup, _agent) = managed(&[]);
    let run = |cg| {
        let out = run_in(&link.server, cg, &["python3", "-c", OPTIONS_PY]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let managed = run(Some(&cgroup));
    let plain = run(None);
    let get = |json: &str, key: &str| -> i64 {
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v[key]
            .as_i64()
            .unwrap_or_else(|| panic!("{key} missing in {json}"))
    };
    for key in ["reuseaddr", "reuseport", "nodelay"] {
        assert_eq!(get(&managed, key), 1, "{key}: {managed}");
    }
    assert_eq!(get(&managed, "freebind"), 1, "{managed}");
    assert_eq!(get(&plain, "freebind"), 0, "{plain}");
    // The kernel's own error, exactly as without freebind, and the socket left alone.
    assert_eq!(
        get(&managed, "invalid_errno"),
        libc::EINVAL as i64,
        "{managed}"
    );
    assert_eq!(get(&managed, "invalid_errno"), get(&plain, "invalid_errno"));
    assert_eq!(get(&managed, "freebind_after_invalid"), 0, "{managed}");
    assert_eq!(get(&managed, "v6_udp_reuseaddr_zero"), 0, "{managed}");
    assert_eq!(get(&managed, "v6_udp_freebind"), 1, "{managed}");
    assert_eq!(get(&managed, "app_freebind_off_stays_off"), 0, "{managed}");
}

#[test]
fn an_ipv6_address_still_in_dad_binds_under_the_agent_and_serves_once_dad_completes() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let sysctl = format!(
        "net.ipv6.conf.{}.dad_transmits={DAD_PROBES}",
        link.server_if
    );
    link.server.exec(&["sysctl", "-qw", &sysctl]);
    add_addr6(&link.server, &link.server_if, "2001:db8::20/64", false);
    assert!(addr6_tentative(
        &link.server,
        &link.server_if,
        "2001:db8::20"
    ));
    assert_eq!(
        try_bind(&link.server, None, "tcp", "2001:db8::20", 8080, true),
        Err(EADDRNOTAVAIL),
        "tentative is not local"
    );
    let _server = python_http_server(&link.server, Some(&cgroup), "2001:db8::20", 8080);
    assert!(
        addr6_tentative(&link.server, &link.server_if, "2001:db8::20"),
        "DAD ended before the test could bind during it"
    );
    assert!(agent.log().contains("tentative"), "{}", agent.log());
    wait_until("DAD completes", DAD_DONE, || {
        !addr6_tentative(&link.server, &link.server_if, "2001:db8::20")
    });
    wait_until(
        "the server answers on its formerly tentative address",
        SETTLE,
        || http_get(&link.client, "2001:db8::20", 8080, "/").is_ok(),
    );
    assert!(
        agent.log().contains("address 2001:db8::20 is now local"),
        "{}",
        agent.log()
    );
}

#[test]
fn after_the_agent_stops_new_sockets_are_ordinary_and_existing_ones_keep_serving() {
    if !require_root() {
        return;
    }
    let (link, cgroup, agent) = managed(&[]);
    let _server = python_http_server(&link.server, Some(&cgroup), "192.0.2.10", 8080);
    assert_eq!(
        bpf_programs_attached(&cgroup).len(),
        PROGRAMS_PER_ATTACHMENT
    );
    assert!(agent.stop().success(), "{}", agent.log());
    assert!(agent.log().contains("detached"), "{}", agent.log());
    assert_eq!(
        bpf_programs_attached(&cgroup),
        vec![],
        "the kernel still lists programs"
    );
    assert_eq!(
        try_bind(&link.server, Some(&cgroup), "tcp", "192.0.2.11", 8080, true),
        Err(EADDRNOTAVAIL)
    );
    freebind_e2e::scenario::add_server_addr(&link, "192.0.2.10/24");
    wait_until(
        "the server bound under the agent still serves",
        SETTLE,
        || http_get(&link.client, "192.0.2.10", 8080, "/").is_ok(),
    );
}

#[test]
fn a_second_attachment_on_the_same_cgroup_coexists_and_outlives_the_first() {
    if !require_root() {
        return;
    }
    let (link, cgroup, first) = managed(&[]);
    let second = Agent::run(&link.server, &cgroup, &[]);
    let attached = bpf_programs_attached(&cgroup);
    assert_eq!(attached.len(), 2 * PROGRAMS_PER_ATTACHMENT, "{attached:?}");
    assert!(first.stop().success());
    let attached = bpf_programs_attached(&cgroup);
    assert_eq!(attached.len(), PROGRAMS_PER_ATTACHMENT, "{attached:?}");
    for name in [
        "fb_bind4",
        "fb_bind6",
        "fb_sendmsg4",
        "fb_sendmsg6",
        "fb_getsockname4",
        "fb_getsockname6",
        "fb_connect4",
        "fb_connect6",
        "fb_sock_ops",
        "fb_setsockopt",
    ] {
        assert!(
            attached.iter().any(|(_, n)| n == name),
            "{name} missing: {attached:?}"
        );
    }
    assert_eq!(
        try_bind(&link.server, Some(&cgroup), "tcp", "192.0.2.10", 8080, true),
        Ok(())
    );
    drop(second);
}

#[test]
fn under_a_policy_the_servers_own_address_binds_exactly_while_it_is_local() {
    if !require_root() {
        return;
    }
    // 192.0.2.0/24 and 2001:db8::/32 are outside this policy: they may only be bound while
    // local, which is what the agent's locality map (rtnetlink) must get right.
    let (link, cgroup, _agent) = managed(&["--allow", "198.51.100.0/24"]);
    let bind = |addr: &str| try_bind(&link.server, Some(&cgroup), "tcp", addr, 8080, true);
    assert_eq!(bind("192.0.2.10"), Err(EADDRNOTAVAIL));
    assert_eq!(
        bind("198.51.100.7"),
        Ok(()),
        "inside the policy while not local"
    );
    freebind_e2e::scenario::add_server_addr(&link, "192.0.2.10/24");
    wait_until("192.0.2.10 binds once it is local", SETTLE, || {
        bind("192.0.2.10").is_ok()
    });
    assert_eq!(bind("::ffff:192.0.2.10"), Ok(()), "v4-mapped, local");
    freebind_e2e::del_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_until(
        "192.0.2.10 is refused again once it is gone",
        SETTLE,
        || bind("192.0.2.10") == Err(EADDRNOTAVAIL),
    );

    let sysctl = format!(
        "net.ipv6.conf.{}.dad_transmits={DAD_PROBES}",
        link.server_if
    );
    link.server.exec(&["sysctl", "-qw", &sysctl]);
    add_addr6(&link.server, &link.server_if, "2001:db8::30/64", false);
    assert!(addr6_tentative(
        &link.server,
        &link.server_if,
        "2001:db8::30"
    ));
    assert_eq!(
        bind("2001:db8::30"),
        Err(EADDRNOTAVAIL),
        "tentative is not local"
    );
    wait_until("DAD completes", DAD_DONE, || {
        !addr6_tentative(&link.server, &link.server_if, "2001:db8::30")
    });
    wait_until("2001:db8::30 binds once DAD is done", SETTLE, || {
        bind("2001:db8::30").is_ok()
    });
}

#[test]
fn stacked_attachments_each_enforce_their_own_policy() {
    if !require_root() {
        return;
    }
    // The first attachment rewrites the syscall; the second must still see the socket as
    // made freebind by native mode (not by the application) and apply its own policy.
    let (link, cgroup, _any) = managed(&[]);
    let _strict = Agent::run(&link.server, &cgroup, &["--allow", "192.0.2.0/24"]);
    let bind = |proto, addr, port| try_bind(&link.server, Some(&cgroup), proto, addr, port, true);
    assert_eq!(bind("tcp", "192.0.2.20", 8080), Ok(()));
    assert_eq!(bind("tcp", "203.0.113.5", 8080), Err(EADDRNOTAVAIL));
    assert_eq!(bind("udp", "2001:db8::5", 8080), Err(EADDRNOTAVAIL));
}

const PKTINFO_PY: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("::", 0))
for src in sys.argv[1:]:
    info = struct.pack("16sI", socket.inet_pton(socket.AF_INET6, src), 0)
    try:
        s.sendmsg([b"x"], [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, info)], 0, ("::1", 9))
        print(src, 0)
    except OSError as e:
        print(src, e.errno)
"#;

#[test]
fn a_datagram_cannot_take_an_ipv6_source_outside_the_policy() {
    if !require_root() {
        return;
    }
    // A freebind AF_INET6 socket may name any source with IPV6_PKTINFO; the policy that
    // limits its binds must limit those sources too.
    let (link, cgroup, agent) = managed(&["--allow", "2001:db8:1::/48"]);
    let sends = |cg| {
        let out = run_in(
            &link.server,
            cg,
            &["python3", "-c", PKTINFO_PY, "2001:db8::99", "2001:db8:1::5"],
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let managed = sends(Some(&cgroup));
    assert!(
        managed.contains(&format!("2001:db8::99 {}", libc::EPERM)),
        "{managed}"
    );
    assert!(managed.contains("2001:db8:1::5 0"), "{managed}");
    let plain = sends(None);
    assert!(
        plain.contains(&format!("2001:db8::99 {}", libc::EINVAL)),
        "without freebind: {plain}"
    );
    wait_until("the refusal is logged", Duration::from_secs(5), || {
        agent.log().contains("refused-source")
    });
}

#[test]
fn a_cgroup_member_in_another_network_namespace_is_left_to_the_kernel() {
    if !require_root() {
        return;
    }
    // The agent watches the server's namespace only; in the client's, its map knows no
    // address, so it must neither refuse the client's own address nor make sockets freebind.
    let (link, cgroup, agent) = managed(&["--allow", "198.51.100.0/24"]);
    assert_eq!(
        try_bind(&link.client, Some(&cgroup), "tcp", "192.0.2.1", 8080, true),
        Ok(())
    );
    assert_eq!(
        try_bind(
            &link.client,
            Some(&cgroup),
            "tcp",
            "198.51.100.7",
            8080,
            true
        ),
        Err(EADDRNOTAVAIL)
    );
    wait_until("the decision is logged", Duration::from_secs(5), || {
        agent.log().contains("other-netns")
    });
}
