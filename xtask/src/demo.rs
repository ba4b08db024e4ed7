//! `cargo xtask demo`: the story freebind exists for, in namespaces made for the purpose.
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use freebind_e2e::{
    del_addr, ensure_tools, http_get, require_root, run_in,
    scenario::{add_server_addr, python_http_server, try_bind, EADDRNOTAVAIL},
    spawn_in, tcp_request, wait_until, Agent, Cgroup, Link,
};

use crate::paths::Paths;

const ADDR: &str = "192.0.2.10";
const CIDR: &str = "192.0.2.10/24";
const PORT: u16 = 8080;
/// socat listens here: it calls bind() with no setsockopt() before it, so native mode
/// cannot help it and steer mode does.
const SOCAT_PORT: u16 = 7000;

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn show(text: &str) {
    for line in text.lines() {
        println!("    {line}");
    }
}

pub fn run(paths: &Paths) -> Result<()> {
    if !require_root() {
        bail!("the demo makes network namespaces and cgroups: run it as root");
    }
    ensure_tools();
    println!("freebind demo: a server that binds an address its interface does not have yet.");

    step(1, "Two network namespaces joined by a veth: a server side (no address yet) and a client (192.0.2.1).");
    let link = Link::new();
    show(&format!(
        "server namespace {} ({}), client namespace {}",
        link.server.name(),
        link.server_if,
        link.client.name()
    ));

    step(2, "A cgroup for the service, and freebind-agent attached to it (run in the server's namespace).");
    let cgroup = Cgroup::new("fb-demo");
    let agent = Agent::run_binary(&paths.agent, &link.server, &cgroup, &[]);
    show(&format!(
        "$ freebind-agent run --cgroup {}",
        cgroup.relative()
    ));

    step(
        3,
        &format!(
            "python3 -m http.server binds {ADDR}:{PORT} inside the cgroup, before {ADDR} exists."
        ),
    );
    let server = python_http_server(&link.server, Some(&cgroup), ADDR, PORT);
    show(&format!(
        "listening (pid {}); the interface holds: {}",
        server.pid(),
        addrs(&link)
    ));
    step(
        4,
        &format!("socat TCP-LISTEN:{SOCAT_PORT},bind={ADDR},fork joins it: no setsockopt() before its bind(), so steer mode parks it."),
    );
    let listen = format!("TCP-LISTEN:{SOCAT_PORT},bind={ADDR},fork");
    let socat = spawn_in(
        &link.server,
        Some(&cgroup),
        &["socat", &listen, "SYSTEM:echo hello from socat"],
    );
    wait_until("socat is parked", Duration::from_secs(20), || {
        agent
            .log()
            .contains(&format!("bind {ADDR}:{SOCAT_PORT}/tcp by socat"))
    });
    show(&format!(
        "socat (pid {}) is bound to a parking address; `ss` in the namespace shows it:",
        socat.pid()
    ));
    show(&ss_line(&link, SOCAT_PORT));

    let outside = try_bind(&link.server, None, "tcp", ADDR, PORT + 1, true);
    ensure!(
        outside == Err(EADDRNOTAVAIL),
        "a process outside the cgroup should get EADDRNOTAVAIL, got {outside:?}"
    );
    show("the same bind from a process outside the cgroup: EADDRNOTAVAIL, as without freebind");

    let fetch = || http_get(&link.client, ADDR, PORT, "/");
    let greet = || tcp_request(&link.client, ADDR, SOCAT_PORT, b"");
    let both = || {
        let http = fetch().map(|(s, _)| format!("HTTP {s}"));
        let socat = greet().map(|b| String::from_utf8_lossy(&b).trim().to_owned());
        (http, socat)
    };
    let report = |(http, socat): (Result<String, String>, Result<String, String>)| {
        show(&format!(
            "client: GET http://{ADDR}:{PORT}/ -> {}",
            http.unwrap_or_else(|e| e)
        ));
        show(&format!(
            "client: connect {ADDR}:{SOCAT_PORT} -> {}",
            socat.unwrap_or_else(|e| e)
        ));
    };
    step(5, &format!("The interface gets {CIDR} (an access point coming up, a VIP failing over); the client connects to both."));
    add_server_addr(&link, CIDR);
    wait_until("both servers answer", Duration::from_secs(20), || {
        let (h, s) = both();
        h.is_ok() && s.is_ok()
    });
    report(both());

    step(
        6,
        &format!("{ADDR} goes away; the servers keep running, their sockets wait."),
    );
    del_addr(&link.server, &link.server_if, CIDR);
    report(both());
    ensure!(server.try_wait().is_none(), "the python server died");
    ensure!(socat.try_wait().is_none(), "socat died");

    step(
        7,
        &format!(
            "{ADDR} comes back; the same servers (pids {} and {}) answer again.",
            server.pid(),
            socat.pid()
        ),
    );
    add_server_addr(&link, CIDR);
    wait_until("both servers answer again", Duration::from_secs(20), || {
        let (h, s) = both();
        h.is_ok() && s.is_ok()
    });
    report(both());

    step(8, "What the agent said:");
    show(&agent.log());
    drop(server);
    drop(socat);
    agent.stop();
    println!("\nDone: namespaces and cgroup removed.");
    Ok(())
}

/// The `ss` line of the TCP listener on `port` in the server's namespace.
fn ss_line(link: &Link, port: u16) -> String {
    let out = run_in(
        &link.server,
        None,
        &["ss", "-Hltn", &format!("sport = :{port}")],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn addrs(link: &Link) -> String {
    let out = run_in(
        &link.server,
        None,
        &["ip", "-brief", "addr", "show", "dev", &link.server_if],
    );
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .skip(2)
        .collect::<Vec<_>>()
        .join(" ")
}
