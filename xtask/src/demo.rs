//! `cargo xtask demo`: the story freebind exists for, in namespaces made for the purpose.
use std::time::Duration;

use anyhow::{bail, ensure, Result};
use freebind_e2e::{
    del_addr, ensure_tools, http_get, require_root, run_in,
    scenario::{add_server_addr, python_http_server, try_bind, EADDRNOTAVAIL},
    wait_until, Agent, Cgroup, Link,
};

use crate::paths::Paths;

const ADDR: &str = "192.0.2.10";
const CIDR: &str = "192.0.2.10/24";
const PORT: u16 = 8080;

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
    let outside = try_bind(&link.server, None, "tcp", ADDR, PORT + 1, true);
    ensure!(
        outside == Err(EADDRNOTAVAIL),
        "a process outside the cgroup should get EADDRNOTAVAIL, got {outside:?}"
    );
    show("the same bind from a process outside the cgroup: EADDRNOTAVAIL, as without freebind");

    let fetch = || http_get(&link.client, ADDR, PORT, "/");
    step(4, &format!("The interface gets {CIDR} (an access point coming up, a VIP failing over); the client connects."));
    add_server_addr(&link, CIDR);
    wait_until("the server answers", Duration::from_secs(20), || {
        fetch().is_ok()
    });
    show(&format!(
        "client: GET http://{ADDR}:{PORT}/ -> HTTP {}",
        fetch().map(|(s, _)| s).unwrap_or(0)
    ));

    step(
        5,
        &format!("{ADDR} goes away; the server keeps running, its socket waits."),
    );
    del_addr(&link.server, &link.server_if, CIDR);
    show(&match fetch() {
        Ok((s, _)) => format!("client: unexpectedly answered HTTP {s}"),
        Err(e) => format!("client: {e}"),
    });
    ensure!(server.try_wait().is_none(), "the server died");

    step(
        6,
        &format!(
            "{ADDR} comes back; the same server (pid {}) answers again.",
            server.pid()
        ),
    );
    add_server_addr(&link, CIDR);
    wait_until("the server answers again", Duration::from_secs(20), || {
        fetch().is_ok()
    });
    show(&format!(
        "client: GET http://{ADDR}:{PORT}/ -> HTTP {}",
        fetch().map(|(s, _)| s).unwrap_or(0)
    ));

    step(7, "What the agent said:");
    show(&agent.log());
    drop(server);
    agent.stop();
    println!("\nDone: namespaces and cgroup removed.");
    Ok(())
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
