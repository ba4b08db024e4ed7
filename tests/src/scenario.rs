//! Steps the scenarios share: is a socket listening, can a process bind, does a service
//! answer across an address's removal and return.
use std::{fs, path::PathBuf, time::Duration};

use crate::{
    add_addr, add_addr6, del_addr, run_in, spawn_in, unique_name, wait_until, Agent, Cgroup, Link,
    Netns, Proc,
};

/// Generous bound for a service to answer after its address appears (not a timing check).
pub const SETTLE: Duration = Duration::from_secs(20);

/// Whether `ss` in `ns` shows a socket of `proto` ("tcp"/"udp") bound to `addr_port`
/// ("192.0.2.10:8080" or "[2001:db8::10]:8080").
pub fn listening(ns: &Netns, proto: &str, addr_port: &str) -> bool {
    local_sockets(ns, proto).iter().any(|s| s == addr_port)
}

/// Panics with `server`'s log when it has exited; `when` says what it should have done.
fn still_running(server: &Proc, when: &str) {
    if let Some(status) = server.try_wait() {
        panic!(
            "{} exited ({status}){when}; log:\n{}",
            server.name(),
            server.log()
        );
    }
}

/// Waits until `server` has bound `addr_port`; panics with its log if it died first.
pub fn wait_listening(ns: &Netns, proto: &str, addr_port: &str, server: &Proc) {
    wait_until(
        &format!("{} listening on {addr_port}/{proto}", server.name()),
        SETTLE,
        || {
            still_running(server, " before binding");
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
    wait_listening(ns, "tcp", &addr_port(addr, port), &server);
    server
}

/// An nginx configuration in a directory of its own (removed on drop): no daemon, one
/// worker, errors to stderr, answering `nginx ok` on every `listen` address given.
pub struct NginxConf {
    dir: PathBuf,
    prefix: String,
    conf: String,
}

impl NginxConf {
    /// Writes the configuration for `listens` (`ADDR:PORT`, IPv6 in brackets).
    pub fn new(listens: &[&str]) -> Self {
        let dir = std::env::temp_dir().join(unique_name("fb-nginx"));
        fs::create_dir_all(dir.join("logs")).unwrap();
        let conf = dir.join("nginx.conf");
        let listen: String = listens.iter().map(|l| format!("listen {l}; ")).collect();
        fs::write(
            &conf,
            format!(
                "daemon off;\nmaster_process on;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr;\n\
                 events {{}}\nhttp {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
                 fastcgi_temp_path {d}/fastcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
                 server {{ {listen}location / {{ return 200 \"nginx ok\\n\"; }} }}\n}}\n",
                d = dir.display()
            ),
        )
        .unwrap();
        Self {
            prefix: format!("{}/", dir.display()),
            conf: conf.to_string_lossy().into_owned(),
            dir,
        }
    }

    /// The command line that runs nginx with this configuration.
    pub fn argv(&self) -> [&str; 5] {
        ["nginx", "-p", &self.prefix, "-c", &self.conf]
    }
}

impl Drop for NginxConf {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// `addr` and `port` written as `ss` and the agent's log write them: `"192.0.2.10:8080"`,
/// `"[2001:db8::10]:8080"`.
pub fn addr_port(addr: &str, port: u16) -> String {
    if addr.contains(':') {
        format!("[{addr}]:{port}")
    } else {
        format!("{addr}:{port}")
    }
}

/// Where steer mode parks IPv4 sockets: 127.254.0.0/16 (an address derived from the
/// intended one, so two intended addresses on one port do not collide).
pub const PARKING_V4_PREFIX: &str = "127.254.";

/// Steer mode's IPv6 parking addresses are `fd66:7265:6562:696e::1` to `::20`, which the
/// agent assigns on `lo` (nodad) in each namespace it serves and removes when it exits.
pub const PARKING_V6_PREFIX: &str = "fd66:7265:6562:696e::";

/// Whether an `ss`-style `addr:port` is on one of steer mode's parking addresses (an
/// `AF_INET6` socket bound v4-mapped shows as `[::ffff:127.254.x.y]:port`).
pub fn is_parking(addr_port: &str) -> bool {
    addr_port.starts_with(PARKING_V4_PREFIX)
        || addr_port.starts_with(&format!("[::ffff:{PARKING_V4_PREFIX}"))
        || addr_port.starts_with(&format!("[{PARKING_V6_PREFIX}"))
}

/// The local `addr:port` of every listening TCP (`ss -Hltn`) or bound UDP (`ss -Hlun`)
/// socket in `ns`, as `ss` writes it. A socket parked by steer mode shows its parking
/// address there, not the address the application asked for.
pub fn local_sockets(ns: &Netns, proto: &str) -> Vec<String> {
    let flag = if proto == "tcp" { "-Hltn" } else { "-Hlun" };
    let out = ns.try_exec(&["ss", flag]);
    // Columns: State Recv-Q Send-Q Local-Address:Port Peer-Address:Port [Process].
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().nth(3).map(str::to_owned))
        .collect()
}

/// The parked sockets of `proto` on `port` in `ns` (`"127.254.7.9:5000"`,
/// `"[fd66:7265:6562:696e::1]:5000"`).
pub fn parked_sockets(ns: &Netns, proto: &str, port: u16) -> Vec<String> {
    let suffix = format!(":{port}");
    local_sockets(ns, proto)
        .into_iter()
        .filter(|s| is_parking(s) && s.ends_with(&suffix))
        .collect()
}

/// Waits until `ns` has at least `count` sockets of `proto` parked on `port` (steer mode
/// bound them) and returns them; panics with `server`'s log if it exits first.
pub fn wait_parked(ns: &Netns, proto: &str, port: u16, count: usize, server: &Proc) -> Vec<String> {
    let mut found = Vec::new();
    wait_until(
        &format!(
            "{count} socket(s) of {} parked on port {port}/{proto}",
            server.name()
        ),
        SETTLE,
        || {
            still_running(server, " before binding");
            found = parked_sockets(ns, proto, port);
            found.len() >= count
        },
    );
    found
}

/// One bind decision from the agent's log:
/// `bind 192.0.2.10:5000/tcp by socat (pid 123, cgroup id 456): steered — …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindDecision {
    /// The process name the kernel reported (at most 15 bytes).
    pub comm: String,
    /// The word after `): `: `freebind` (native mode), `steered` (steer mode), `local`,
    /// `refused`, …
    pub verdict: String,
    /// The whole log line.
    pub line: String,
}

/// The first decision the agent logged for a bind of `addr_port` (`ss` style) over
/// `proto`, if any.
pub fn bind_decision(log: &str, addr_port: &str, proto: &str) -> Option<BindDecision> {
    let needle = format!("bind {addr_port}/{proto} by ");
    log.lines().find_map(|line| {
        let (_, rest) = line.split_once(&needle)?;
        let (comm, rest) = rest.split_once(" (pid ")?;
        let (_, rest) = rest.split_once("): ")?;
        let verdict = rest.split_whitespace().next()?;
        Some(BindDecision {
            comm: comm.to_owned(),
            verdict: verdict.to_owned(),
            line: line.to_owned(),
        })
    })
}

/// Waits until `agent` has logged a decision on `server`'s bind of `addr_port` over
/// `proto` and returns it; panics with both logs when it does not come.
pub fn wait_bind_decision(
    agent: &Agent,
    server: &Proc,
    addr_port: &str,
    proto: &str,
) -> BindDecision {
    let mut found = None;
    let start = std::time::Instant::now();
    while start.elapsed() < SETTLE {
        found = bind_decision(&agent.log(), addr_port, proto);
        if found.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    found.unwrap_or_else(|| {
        panic!(
            "the agent logged no decision for {}'s bind of {addr_port}/{proto} within \
             {SETTLE:?}\n----- agent log -----\n{}\n----- {} log -----\n{}",
            server.name(),
            agent.log(),
            server.name(),
            server.log()
        )
    })
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

/// `EADDRINUSE`.
pub const EADDRINUSE: i32 = libc::EADDRINUSE;

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
                still_running(server, "");
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

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn reads_bind_decisions() {
        let log = "[2026-11-23T07:00:00Z INFO  freebind_agent] ready\n\
            [2026-11-23T07:00:01Z INFO  freebind_agent] bind 192.0.2.10:5000/tcp by socat (pid 123, cgroup id 456): steered \u{2014} not local; parked at 127.254.7.9 and steered there (steer mode)\n\
            [2026-11-23T07:00:02Z INFO  freebind_agent] bind [2001:db8::10]:5000/udp by python3.11 (pid 7, cgroup id 456): freebind \u{2014} not local\n";
        let tcp = bind_decision(log, "192.0.2.10:5000", "tcp").unwrap();
        assert_eq!(tcp.comm, "socat");
        assert_eq!(tcp.verdict, "steered");
        assert!(tcp.line.contains("parked at 127.254.7.9"));
        let udp = bind_decision(log, "[2001:db8::10]:5000", "udp").unwrap();
        assert_eq!(
            (udp.comm.as_str(), udp.verdict.as_str()),
            ("python3.11", "freebind")
        );
        assert_eq!(bind_decision(log, "192.0.2.10:5000", "udp"), None);
        assert_eq!(bind_decision(log, "192.0.2.10:500", "tcp"), None);
    }

    #[test]
    fn knows_parking_addresses() {
        assert!(is_parking("127.254.7.9:5000"));
        assert!(is_parking("[fd66:7265:6562:696e::1]:5000"));
        assert!(is_parking("[::ffff:127.254.0.1]:5000"));
        assert!(!is_parking("127.0.0.1:5000"));
        assert!(!is_parking("192.0.2.10:5000"));
        assert!(!is_parking("[2001:db8::10]:5000"));
        assert_eq!(addr_port("2001:db8::10", 80), "[2001:db8::10]:80");
        assert_eq!(addr_port("192.0.2.10", 80), "192.0.2.10:80");
    }
}
