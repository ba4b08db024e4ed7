//! A systemd service, for real: Debian 12's systemd (252) boots in a sandbox whose units'
//! cgroups appear on the host; the daemon runs on the host, talks to that systemd over its
//! private bus, and attaches to a unit by name. The unit restarts a hundred times and binds
//! its absent address every time.
use std::time::Duration;

use freebind_e2e::{
    add_addr, agent_path, bpf_programs_attached_at, del_addr, ensure_tools, require_root,
    scenario::{listening, SETTLE},
    tcp_request, wait_until, Daemon, Installation, Link, Netns, Sandbox,
};

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");

/// Cgroup programs of one attachment.
const PROGRAMS: usize = 10;

const UNIT: &str = "fb-web.service";
const RESTARTS: usize = 100;

/// Each program once on `cgroup`: nothing missing, nothing twice.
fn assert_attached_once(cgroup: &std::path::Path) {
    let mut names: Vec<String> = bpf_programs_attached_at(cgroup)
        .into_iter()
        .map(|(_, name)| name)
        .collect();
    names.sort();
    let n = names.len();
    names.dedup();
    assert_eq!(
        (n, names.len()),
        (PROGRAMS, PROGRAMS),
        "programs on {}: {names:?}",
        cgroup.display()
    );
}

#[test]
fn a_unit_attached_by_name_binds_its_absent_address_at_each_of_100_restarts_until_detached() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let agent = agent_path();
    let sandbox = Sandbox::builder("fb-sbx")
        .bind_ro(&agent)
        .bind_ro(ECHO_SERVER)
        .netns(&link.server)
        .boot();
    // A server that binds with SO_REUSEADDR first (native mode); it exits when bind fails.
    // No start rate limit: the test restarts it far more often than 5 times in 10 s.
    sandbox.install_unit(
        UNIT,
        &format!(
            "[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart={ECHO_SERVER} tcp 192.0.2.10 7000 --reuseaddr\n"
        ),
    );
    let host = Netns::new("fb-host");
    let inst = Installation::new("fb-daemon");
    let socket = sandbox.systemd_socket();
    let daemon = Daemon::start(
        &inst,
        &host,
        &["--systemd-socket", socket.to_str().unwrap()],
    );

    let reply = inst.run_ok(&["attach", "--unit", UNIT]);
    assert!(reply.contains("attached unit"), "{reply}");
    let dropin = sandbox.host_path(&format!("/run/systemd/system/{UNIT}.d/50-freebind.conf"));
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains("BPFProgram=bind4:"), "{text}");
    assert!(text.contains("ExecStartPre=+"), "{text}");

    let serving = |what: &str| {
        wait_until(what, SETTLE, || {
            listening(&link.server, "tcp", "192.0.2.10:7000")
        });
    };
    // The address comes for one exchange and goes again: later starts bind it absent.
    let answers_while_its_address_exists = |what: &str| {
        add_addr(&link.server, &link.server_if, "192.0.2.10/24");
        wait_until(what, SETTLE, || {
            tcp_request(&link.client, "192.0.2.10", 7000, b"ping").is_ok_and(|r| r == b"ping")
        });
        del_addr(&link.server, &link.server_if, "192.0.2.10/24");
    };
    sandbox.systemctl(&["start", UNIT]);
    serving("the unit listens on its absent address");
    assert_attached_once(&sandbox.unit_cgroup(UNIT));
    answers_while_its_address_exists("the unit answers");

    // systemd 252 skips BPFProgram= on `systemctl restart` ("Foreign BPF program already
    // exists, ignoring"): the drop-in's ExecStartPre= covers it.
    let mut last_pid = sandbox.unit_main_pid(UNIT);
    for i in 1..=RESTARTS {
        sandbox.systemctl(&["restart", UNIT]);
        wait_until(&format!("restart {i}: listening again"), SETTLE, || {
            let active = sandbox
                .exec(&["systemctl", "is-active", UNIT])
                .stdout
                .starts_with(b"active");
            if !active {
                panic!(
                    "restart {i}: {UNIT} is not active; journal:\n{}",
                    sandbox.journal(UNIT)
                );
            }
            listening(&link.server, "tcp", "192.0.2.10:7000")
        });
        let pid = sandbox.unit_main_pid(UNIT);
        assert_ne!(pid, last_pid, "restart {i} started a new process");
        last_pid = pid;
    }
    assert_attached_once(&sandbox.unit_cgroup(UNIT));
    // stop + start: systemd attaches BPFProgram= itself, the hook adds what it cannot
    // (getsockname), and nothing is doubled.
    sandbox.systemctl(&["stop", UNIT]);
    sandbox.systemctl(&["start", UNIT]);
    serving("listening after stop + start");
    assert_attached_once(&sandbox.unit_cgroup(UNIT));
    answers_while_its_address_exists("the unit answers after the restarts");

    // Detached: the drop-in goes, and the next start binds as the kernel alone decides.
    inst.run_ok(&["detach", "--unit", UNIT]);
    assert!(!dropin.exists(), "{} remains", dropin.display());
    let _ = sandbox.exec(&["systemctl", "restart", UNIT]);
    wait_until("the detached unit fails to bind", SETTLE, || {
        sandbox
            .exec(&["systemctl", "is-failed", UNIT])
            .stdout
            .starts_with(b"failed")
    });
    assert!(!listening(&link.server, "tcp", "192.0.2.10:7000"));
    drop(daemon);
}

#[test]
fn a_unit_named_in_the_config_is_attached_at_daemon_start_and_released_when_removed_on_sighup() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let sandbox = Sandbox::builder("fb-sbx")
        .bind_ro(agent_path())
        .bind_ro(ECHO_SERVER)
        .netns(&link.server)
        .boot();
    // Steer mode this time: no setsockopt() before bind().
    sandbox.install_unit(
        UNIT,
        &format!("[Unit]\nStartLimitIntervalSec=0\n[Service]\nExecStart={ECHO_SERVER} tcp 192.0.2.20 7000\n"),
    );
    let config =
        std::env::temp_dir().join(format!("{}.toml", freebind_e2e::unique_name("fb-config")));
    std::fs::write(
        &config,
        format!("[[attach]]\nunit = \"{UNIT}\"\nallow = [\"192.0.2.0/24\"]\n"),
    )
    .unwrap();
    let host = Netns::new("fb-host");
    let inst = Installation::new("fb-daemon");
    let socket = sandbox.systemd_socket();
    let daemon = Daemon::start(
        &inst,
        &host,
        &[
            "--config",
            config.to_str().unwrap(),
            "--systemd-socket",
            socket.to_str().unwrap(),
        ],
    );
    let dropin = sandbox.host_path(&format!("/run/systemd/system/{UNIT}.d/50-freebind.conf"));
    assert!(dropin.exists(), "{}", daemon.log());
    sandbox.systemctl(&["start", UNIT]);
    sandbox.systemctl(&["restart", UNIT]);
    wait_until("the steered unit is parked", SETTLE, || {
        !freebind_e2e::scenario::parked_sockets(&link.server, "tcp", 7000).is_empty()
    });
    assert_attached_once(&sandbox.unit_cgroup(UNIT));
    add_addr(&link.server, &link.server_if, "192.0.2.20/24");
    wait_until("the steered unit answers", SETTLE, || {
        tcp_request(&link.client, "192.0.2.20", 7000, b"ping").is_ok_and(|r| r == b"ping")
    });

    std::fs::write(&config, "").unwrap();
    daemon.proc().signal(libc::SIGHUP);
    wait_until("the drop-in is removed on reload", SETTLE, || {
        !dropin.exists()
    });
    let cgroup = sandbox.unit_cgroup(UNIT);
    wait_until("the running unit is detached", SETTLE, || {
        bpf_programs_attached_at(&cgroup).is_empty()
    });

    // Attached again while it runs: systemd applies BPFProgram= at the reload, the daemon
    // adds the rest, and nothing is doubled.
    std::fs::write(&config, format!("[[attach]]\nunit = \"{UNIT}\"\n")).unwrap();
    daemon.proc().signal(libc::SIGHUP);
    wait_until("the drop-in is back", SETTLE, || dropin.exists());
    wait_until("the running unit is attached again", SETTLE, || {
        bpf_programs_attached_at(&cgroup).len() >= PROGRAMS
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_attached_once(&cgroup);
    let _ = std::fs::remove_file(&config);
}
