//! What freebind finds on the kernel it runs on, asserted per kernel series rather than
//! skipped: `cargo xtask test --kernel 6.1` (and 6.12) runs this file in a guest booting
//! Debian's kernel, the host run covers the host's (6.18 here).
//!
//! Measured: Debian 12's 6.1 (6.1.0-56, 6.1.192) and 6.12 (6.12.117) have every program
//! type, helper and map type freebind uses, so both modes run there; the oldest release
//! with all of it is [`kernel::oldest_release`] (5.18, for `bpf_set_retval` in the bind
//! hooks). A kernel series this file has no expectation for is a failure, so that a new
//! one is looked at instead of passing unseen.
use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use freebind_agent::kernel::{self, Mode, Release, REQUIREMENTS};
use freebind_common::native_options::{self, On};
use freebind_e2e::{
    agent_command, agent_path, ensure_tools, require_root, run_in,
    scenario::{self, EADDRNOTAVAIL},
    show_output, spawn_in, tcp_request, wait_until, Agent, Cgroup, Link, TempDir,
};
use serde_json::json;

/// What a kernel series is expected to lack of [`REQUIREMENTS`] (by row name), and so
/// which modes the agent runs there.
fn expected_missing(release: Release) -> Vec<&'static str> {
    match release {
        // Debian 12's own kernel, 6.12 LTS, and what these machines run: everything.
        Release(6, 1) | Release(6, 12) => vec![],
        r if r >= Release(6, 13) => vec![],
        r => panic!(
            "no expectation for Linux {r} in kernel_compat.rs: run `freebind-agent check` \
             there and add one"
        ),
    }
}

fn running() -> (String, Release) {
    let uname = kernel::running_release().expect("uname");
    let release = Release::parse(&uname).unwrap_or_else(|| panic!("release of {uname:?}"));
    (uname, release)
}

/// `  ✔ name  detail` rows of `check`, as (mark, name, detail).
fn rows(stdout: &str) -> Vec<(char, String, String)> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("  ")?;
            let mut chars = rest.chars();
            let mark = chars.next()?;
            let rest = chars.as_str().strip_prefix(' ')?;
            let (name, detail) = rest.split_once("  ").unwrap_or((rest, ""));
            Some((mark, name.to_string(), detail.trim().to_string()))
        })
        .collect()
}

fn check() -> Output {
    agent_command()
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .expect("run freebind-agent check")
}

/// `check`'s rows under "Modes", by the mode each stands for.
const MODE_ROWS: [(Mode, &str); 3] = [
    (Mode::Native, "native mode"),
    (Mode::Steer, "steer mode"),
    (Mode::SteerUdp, "steer mode for UDP"),
];

#[test]
fn check_reports_exactly_what_this_kernel_series_lacks_and_which_modes_remain() {
    if !require_root() {
        return;
    }
    let (uname, release) = running();
    let missing = expected_missing(release);
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = rows(&stdout);
    let mark = |name: &str| {
        rows.iter()
            .find(|(_, n, _)| n == name)
            .unwrap_or_else(|| panic!("no row {name:?} on {uname}:\n{}", show_output(&out)))
            .0
    };
    for r in REQUIREMENTS {
        let name = r.name();
        let want = if missing.contains(&name.as_str()) {
            '✘'
        } else {
            '✔'
        };
        assert_eq!(
            mark(&name),
            want,
            "{name} on {uname}:\n{}",
            show_output(&out)
        );
    }
    for name in &missing {
        assert!(
            REQUIREMENTS.iter().any(|r| r.name() == *name),
            "expected_missing names {name:?}, which is no requirement"
        );
    }
    let lacks = |mode: Mode| {
        REQUIREMENTS
            .iter()
            .any(|r| missing.contains(&r.name().as_str()) && mode.needs(r.mode()))
    };
    for (mode, row) in MODE_ROWS {
        let want = if lacks(mode) { '✘' } else { '✔' };
        assert_eq!(mark(row), want, "{row} on {uname}:\n{}", show_output(&out));
    }
    let release_row = rows
        .iter()
        .find(|(_, n, _)| n == "Linux release")
        .expect("Linux release row");
    assert!(
        release_row.2.starts_with(&uname),
        "the release row names {uname}: {release_row:?}"
    );
    assert_eq!(
        out.status.success(),
        missing.is_empty(),
        "check's exit status on {uname}:\n{}",
        show_output(&out)
    );
}

#[test]
fn the_agent_says_in_one_debug_line_which_modes_this_kernel_allows() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let (uname, release) = running();
    // With anything missing the line is a warning (and, for what every attachment loads,
    // the refusal itself); the test below covers that on a kernel without BTF.
    assert!(
        expected_missing(release).is_empty(),
        "no kernel series freebind is tested on lacks anything: update this test with the \
         refusal line when one does"
    );
    let link = Link::new();
    let cgroup = Cgroup::new("fb-compat");
    // Said at debug level when nothing is missing (-v), in the refusal itself otherwise.
    let agent = Agent::run(&link.server, &cgroup, &["-v"]);
    let log = agent.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("kernel {uname}:")))
        .collect();
    assert_eq!(lines.len(), 1, "one line about the kernel in:\n{log}");
    assert!(
        lines[0].ends_with(&format!(
            "every program type, helper and map freebind uses is here ({} probed): native and \
             steer mode",
            REQUIREMENTS.len()
        )),
        "{}",
        lines[0]
    );
}

/// Every option freebind's setsockopt hook applies itself ([`native_options::OPTIONS`],
/// measured accepted by `bpf_setsockopt()` on 6.18) must be accepted on this kernel too,
/// on every kind of socket it applies to: where `bpf_setsockopt()` refused one, the app
/// would keep its option but lose IP_FREEBIND, and its bind would be parked instead. Each
/// is the only option set before a bind to a non-local address; the socket must come out
/// freebind, bound where it asked, with the option's value read back.
const OPTIONS_PY: &str = r#"
import json, socket, sys
out = {}
for name, level, opt, val, family, kind, addr, port in json.loads(sys.argv[1]):
    v6 = family == 6
    s = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET,
                      socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.setsockopt(level, opt, val)
    fb = s.getsockopt(41, 78) if v6 else s.getsockopt(0, 15)
    try:
        s.bind((addr, port))
        bound = s.getsockname()[0]
    except OSError as e:
        bound = "errno %d" % e.errno
    out["%s %s%d" % (name, kind, family)] = {
        "freebind": fb, "bound": bound, "wanted": addr, "value": s.getsockopt(level, opt)}
    s.close()
print(json.dumps(out, sort_keys=True))
"#;

/// A value for each option that differs from the kernel's default (so reading it back
/// shows that the option, not only IP_FREEBIND, was applied).
fn option_value(name: &str) -> i64 {
    match name {
        "SO_REUSEADDR" | "SO_REUSEPORT" | "SO_KEEPALIVE" | "TCP_NODELAY" => 1,
        // The kernel doubles buffer sizes and reports the doubled value.
        "SO_SNDBUF" | "SO_RCVBUF" => 65536,
        "SO_RCVLOWAT" => 2,
        "TCP_MAXSEG" => 1200,
        "TCP_KEEPIDLE" => 30,
        "TCP_KEEPINTVL" => 10,
        "TCP_KEEPCNT" => 3,
        "TCP_SYNCNT" => 3,
        "TCP_WINDOW_CLAMP" => 65536,
        "TCP_USER_TIMEOUT" => 1000,
        "TCP_NOTSENT_LOWAT" => 16384,
        "IP_TOS" | "IPV6_TCLASS" => 0x10,
        other => panic!("no test value for {other}: add one to option_value()"),
    }
}

#[test]
fn every_option_the_setsockopt_hook_applies_turns_native_mode_on_with_this_kernel() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let (uname, _) = running();
    let link = Link::new();
    let cgroup = Cgroup::new("fb-compat-opts");
    let _agent = Agent::run(&link.server, &cgroup, &[]);
    let mut cases = Vec::new();
    for (i, (name, level, opt, on)) in native_options::OPTIONS.into_iter().enumerate() {
        for (family, kind) in [(4, "tcp"), (6, "tcp"), (4, "udp"), (6, "udp")] {
            let applies = match on {
                On::Any => true,
                On::Tcp => kind == "tcp",
                On::Inet => family == 4,
                On::Inet6 => family == 6,
            };
            if applies {
                let addr = if family == 4 {
                    format!("192.0.2.{}", 150 + i)
                } else {
                    format!("2001:db8::{:x}", 0x150 + i)
                };
                cases.push(json!([
                    name,
                    level,
                    opt,
                    option_value(name),
                    family,
                    kind,
                    addr,
                    7100
                ]));
            }
        }
    }
    let cases = serde_json::to_string(&cases).expect("json");
    let out = run_in(
        &link.server,
        Some(&cgroup),
        &["python3", "-c", OPTIONS_PY, &cases],
    );
    assert!(out.status.success(), "{}", show_output(&out));
    let json: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).expect("json");
    let results = json.as_object().expect("object");
    let mut wrong = Vec::new();
    for (case, v) in results {
        let name = case.split(' ').next().unwrap_or_default();
        let value = v["value"].as_i64().unwrap_or(-1);
        let applied = match name {
            "SO_SNDBUF" | "SO_RCVBUF" => value >= option_value(name),
            _ => value == option_value(name),
        };
        if v["freebind"] != 1 || v["bound"] != v["wanted"] || !applied {
            wrong.push(format!("{case}: {v}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "on {uname}, not native mode (or the option not applied) after the option alone:\n{}",
        wrong.join("\n")
    );
    assert_eq!(
        results.len(),
        serde_json::from_str::<Vec<serde_json::Value>>(&cases).map_or(0, |c| c.len()),
        "one result per case"
    );
}

/// The agent as it runs on a kernel built without BTF (`CONFIG_DEBUG_INFO_BTF` off), as
/// far as anything it does can tell: in a mount namespace of its own where
/// `/sys/kernel/btf` is an empty tmpfs. The UDP iterator attaches by a BTF id read from
/// there; nothing else freebind loads needs the kernel's BTF.
struct WithoutBtf {
    _dir: TempDir,
    wrapper: PathBuf,
}

impl WithoutBtf {
    fn new() -> Self {
        let dir = TempDir::new("fb-compat-nobtf");
        let wrapper = dir.path().join("freebind-agent-without-btf");
        // `unshare --mount` makes the new namespace's mounts private, so the tmpfs is
        // seen by the agent alone; `exec` keeps the agent's pid the one started.
        fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec unshare --mount sh -c 'mount -t tmpfs -o ro nobtf /sys/kernel/btf \
                 && exec \"$0\" \"$@\"' {} \"$@\"\n",
                agent_path().display()
            ),
        )
        .expect("write the wrapper");
        fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).expect("chmod");
        Self { _dir: dir, wrapper }
    }
}

#[test]
fn without_the_kernels_btf_the_agent_keeps_native_mode_and_tcp_steering_and_leaves_udp_to_the_kernel(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let (uname, _) = running();
    let no_btf = WithoutBtf::new();

    let out = Command::new(&no_btf.wrapper)
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .expect("run check without BTF");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = rows(&stdout);
    let mark = |name: &str| {
        rows.iter()
            .find(|(_, n, _)| n == name)
            .unwrap_or_else(|| panic!("no row {name:?}:\n{}", show_output(&out)))
            .0
    };
    for (row, want) in [
        ("BTF", '✘'),
        ("iter/udp", '✘'),
        ("sk_lookup", '✔'),
        ("native mode", '✔'),
        ("steer mode", '✔'),
        ("steer mode for UDP", '✘'),
    ] {
        assert_eq!(mark(row), want, "{row} without BTF:\n{}", show_output(&out));
    }
    assert!(
        !out.status.success(),
        "check passes without BTF:\n{}",
        show_output(&out)
    );
    assert!(
        stdout.contains("Runs with less: 5 ✘ missing (see Modes for what is left)."),
        "{}",
        show_output(&out)
    );

    let link = Link::new();
    let cgroup = Cgroup::new("fb-compat-nobtf");
    let agent = Agent::run_binary(&no_btf.wrapper, &link.server, &cgroup, &[]);
    let log = agent.log();
    let kernel_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("kernel {uname}:")))
        .collect();
    assert_eq!(
        kernel_lines.len(),
        1,
        "one line about the kernel in:\n{log}"
    );
    assert!(
        kernel_lines[0].contains("WARN")
            && kernel_lines[0].contains(
                "native mode, and steer mode for TCP only; steering UDP needs BTF, iter/udp"
            ),
        "{}",
        kernel_lines[0]
    );
    assert!(
        log.contains("steering attached for TCP (this kernel cannot steer UDP)"),
        "{log}"
    );

    // A UDP server that binds with no setsockopt() first, as steer mode would take it:
    // left to the kernel, which refuses the absent address.
    let udp = spawn_in(
        &link.server,
        Some(&cgroup),
        &[ECHO_SERVER, "udp", "192.0.2.40", "7200"],
    );
    let status = udp.wait_timeout(scenario::SETTLE).unwrap_or_else(|| {
        panic!(
            "the UDP server bound 192.0.2.40 without BTF:\n{}",
            udp.log()
        )
    });
    assert!(!status.success(), "{}", udp.log());
    assert!(
        udp.log().contains(&format!("os error {EADDRNOTAVAIL}")),
        "the UDP server's bind must fail with EADDRNOTAVAIL:\n{}",
        udp.log()
    );
    let decision = scenario::wait_bind_decision(&agent, &udp, "192.0.2.40:7200", "udp");
    assert_eq!(decision.verdict, "no-parking", "{}", decision.line);
    assert!(
        decision.line.contains("this kernel cannot steer"),
        "{}",
        decision.line
    );
    assert!(
        scenario::parked_sockets(&link.server, "udp", 7200).is_empty(),
        "nothing may be parked for UDP"
    );

    // Native mode is untouched: the same bind after SO_REUSEADDR succeeds.
    assert_eq!(
        scenario::try_bind(&link.server, Some(&cgroup), "udp", "192.0.2.40", 7201, true),
        Ok(())
    );

    // TCP is still steered: parked before its address exists, reached once it does.
    let tcp = spawn_in(
        &link.server,
        Some(&cgroup),
        &[ECHO_SERVER, "tcp", "192.0.2.41", "7202"],
    );
    scenario::wait_parked(&link.server, "tcp", 7202, 1, &tcp);
    scenario::add_server_addr(&link, "192.0.2.41/24");
    wait_until("the steered TCP server answers", scenario::SETTLE, || {
        tcp_request(&link.client, "192.0.2.41", 7202, b"ping").as_deref() == Ok(b"ping".as_slice())
    });
}

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");
