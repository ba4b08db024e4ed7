//! Steps the scenarios share: is a socket listening, can a process bind, does a service
//! answer across an address's removal and return.
use std::time::Duration;

use crate::{
    add_addr, add_addr6, del_addr, run_in, spawn_in, wait_until, Cgroup, Link, Netns, Proc,
};

/// Generous bound for a service to answer after its address appears (not a timing check).
pub const SETTLE: Duration = Duration::from_secs(20);

/// Whether `ss` in `ns` shows a socket of `proto` ("tcp"/"udp") bound to `addr_port`
/// ("192.0.2.10:8080" or "[2001:db8::10]:8080").
pub fn listening(ns: &Netns, proto: &str, addr_port: &str) -> bool {
    let flag = if proto == "tcp" { "-Htln" } else { "-Huln" };
    let out = ns.try_exec(&["ss", flag]);
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|w| w == addr_port)
}

/// Waits until `server` has bound `addr_port`; panics with its log if it died first.
pub fn wait_listening(ns: &Netns, proto: &str, addr_port: &str, server: &Proc) {
    wait_until(
        &format!("{} listening on {addr_port}/{proto}", server.name()),
        SETTLE,
        || {
            if let Some(status) = server.try_wait() {
                panic!(
                    "{} exited ({status}) before binding; log:\n{}",
                    server.name(),
                    server.log()
                );
            }
            listening(ns, proto, addr_port)
        },
    );
}

/// `python3 -m http.server PORT --bind ADDR` in `ns` (and `cgroup`), returned once it
/// listens (which, for an address not yet there, only freebind makes possible).
pub fn python_http_server(ns: &Netns, cgroup: Option<&Cgroup>, addr: &str, port: u16) -> Proc {
    let server = spawn_in(
        ns,
        cgroup,
        &[
            "python3",
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            addr,
        ],
    );
    let shown = if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    };
    wait_listening(ns, "tcp", &shown, &server);
    server
}

const BIND_PY: &str = r#"
import socket, sys
proto, addr, port, reuse = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
s = socket.socket(fam, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
if reuse:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((addr, port))
    print("ok")
except OSError as e:
    print(e.errno)
"#;

/// Binds once from a fresh python3 process in `ns` (and `cgroup`), with SO_REUSEADDR set
/// first when `reuseaddr`; `Err(errno)` when bind fails.
pub fn try_bind(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    proto: &str,
    addr: &str,
    port: u16,
    reuseaddr: bool,
) -> Result<(), i32> {
    let port = port.to_string();
    let out = run_in(
        ns,
        cgroup,
        &[
            "python3",
            "-c",
            BIND_PY,
            proto,
            addr,
            &port,
            if reuseaddr { "1" } else { "0" },
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match text.as_str() {
        "ok" => Ok(()),
        n => Err(n.parse().unwrap_or_else(|_| {
            panic!(
                "bind probe printed {text:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })),
    }
}

/// `EADDRNOTAVAIL`.
pub const EADDRNOTAVAIL: i32 = libc::EADDRNOTAVAIL;

/// Adds `cidr` on the server side of `link` (IPv6 without DAD).
pub fn add_server_addr(link: &Link, cidr: &str) {
    if cidr.contains(':') {
        add_addr6(&link.server, &link.server_if, cidr, true);
    } else {
        add_addr(&link.server, &link.server_if, cidr);
    }
}

/// The story freebind exists for, on an already running `server` bound to `cidr`'s address
/// before it existed: the address appears and `probe` gets `expect`; the address goes away
/// and the service is unreachable while `server` keeps running; it comes back and the same
/// server answers again.
pub fn serves_across_address_flap(
    link: &Link,
    cidr: &str,
    server: &Proc,
    expect: &str,
    probe: impl Fn() -> Result<String, String>,
) {
    let answers = |phase: &str| {
        wait_until(
            &format!("{} answering {expect:?} {phase}", server.name()),
            SETTLE,
            || {
                if let Some(status) = server.try_wait() {
                    panic!(
                        "{} exited ({status}); log:\n{}",
                        server.name(),
                        server.log()
                    );
                }
                matches!(probe(), Ok(body) if body.contains(expect))
            },
        )
    };
    add_server_addr(link, cidr);
    answers("once its address exists");
    del_addr(&link.server, &link.server_if, cidr);
    if let Ok(body) = probe() {
        panic!(
            "{} still answered with its address removed: {body:?}",
            server.name()
        );
    }
    assert!(
        server.try_wait().is_none(),
        "{} died while its address was gone; log:\n{}",
        server.name(),
        server.log()
    );
    add_server_addr(link, cidr);
    answers("after its address came back");
}
