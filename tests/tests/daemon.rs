//! The system-wide daemon end to end: attachments from a config file with globs, SIGHUP
//! reloads, pinned state that outlives a `kill -9`, `attach`/`detach` against a running
//! daemon or none. Each test has an installation of its own (pin and run directories) and
//! runs the daemon in a network namespace it made.
use std::{fs, path::PathBuf, thread, time::Duration};

use freebind_e2e::{
    add_addr, bpf_program_ids_at, bpf_programs_attached, ensure_tools, http_get, require_root,
    scenario::{
        python_http_server, serves_across_address_flap, try_bind, wait_listening, EADDRNOTAVAIL,
        SETTLE,
    },
    tcp_request, unique_name, wait_for_log, wait_until, Cgroup, Daemon, Installation, Link,
};

/// Cgroup programs of one attachment.
const PROGRAMS: usize = 10;

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");

/// A config file of the test's own, removed on drop.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("fb-config")));
        let f = ConfigFile(path);
        f.write(text);
        f
    }

    /// Replaces the contents atomically, as an editor saving the file would.
    fn write(&self, text: &str) {
        let tmp = self.0.with_extension("tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, &self.0).unwrap();
    }

    fn arg(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn attach_glob(glob: &str, allow: &[&str]) -> String {
    let mut text = format!("[[attach]]\ncgroup = \"{glob}\"\n");
    if !allow.is_empty() {
        let list: Vec<String> = allow.iter().map(|a| format!("\"{a}\"")).collect();
        text += &format!("allow = [{}]\n", list.join(", "));
    }
    text
}

fn wait_programs(cgroup: &Cgroup, n: usize) {
    wait_until(
        &format!("{n} programs on {}", cgroup.relative()),
        SETTLE,
        || bpf_programs_attached(cgroup).len() == n,
    );
}

#[test]
fn cgroups_created_after_start_that_match_a_glob_serve_absent_addresses_and_are_forgotten_when_removed(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let parent = Cgroup::new("fb-glob");
    let inst = Installation::new("fb-daemon");
    let config = ConfigFile::new(&attach_glob(
        &format!("{}/app-*", parent.relative()),
        &["192.0.2.0/24"],
    ));
    let daemon = Daemon::start(&inst, &link.server, &["--config", config.arg()]);

    let app = parent.child("app-1");
    let other = parent.child("db-1");
    wait_programs(&app, PROGRAMS);
    let server = python_http_server(&link.server, Some(&app), "192.0.2.10", 8080);
    serves_across_address_flap(&link, "192.0.2.10/24", &server, "Directory listing", || {
        http_get(&link.client, "192.0.2.10", 8080, "/").map(|(_, body)| body)
    });
    assert!(
        bpf_programs_attached(&other).is_empty(),
        "db-1 does not match the glob"
    );

    drop(server);
    drop(app);
    wait_for_log(daemon.proc(), "is gone: forgotten", SETTLE);
}

#[test]
fn sighup_applies_added_changed_and_removed_attachments_and_refuses_an_invalid_config_whole() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let parent = Cgroup::new("fb-reload");
    let (a, b, c, d) = (
        parent.child("a"),
        parent.child("b"),
        parent.child("c"),
        parent.child("d"),
    );
    let inst = Installation::new("fb-daemon");
    let config = ConfigFile::new(
        &[
            attach_glob(a.relative(), &["192.0.2.0/24"]),
            attach_glob(b.relative(), &[]),
            attach_glob(c.relative(), &[]),
        ]
        .concat(),
    );
    let daemon = Daemon::start(&inst, &link.server, &["--config", config.arg()]);
    for cg in [&a, &b, &c] {
        wait_programs(cg, PROGRAMS);
    }
    assert!(bpf_programs_attached(&d).is_empty());
    // Serving in c across the reload: c's programs must stay attached throughout.
    let server = python_http_server(&link.server, Some(&c), "192.0.2.30", 8080);
    wait_listening(&link.server, "tcp", "192.0.2.30:8080", &server);
    let c_programs = bpf_program_ids_at(c.path());

    config.write(
        &[
            attach_glob(a.relative(), &["198.51.100.0/24"]),
            attach_glob(c.relative(), &[]),
            attach_glob(d.relative(), &[]),
        ]
        .concat(),
    );
    daemon.proc().signal(libc::SIGHUP);
    wait_programs(&b, 0);
    wait_programs(&d, PROGRAMS);
    wait_programs(&a, PROGRAMS);
    wait_for_log(daemon.proc(), "policy changed", SETTLE);
    assert_eq!(
        try_bind(&link.server, Some(&a), "tcp", "198.51.100.7", 9000, true),
        Ok(()),
        "a's new prefix binds"
    );
    assert_eq!(
        try_bind(&link.server, Some(&a), "tcp", "192.0.2.7", 9000, true),
        Err(EADDRNOTAVAIL),
        "a's old prefix is refused once the policy changed"
    );
    assert_eq!(
        bpf_program_ids_at(c.path()),
        c_programs,
        "c's programs were never detached"
    );
    add_addr(&link.server, &link.server_if, "192.0.2.30/24");
    wait_until("c's server answers after the reload", SETTLE, || {
        http_get(&link.client, "192.0.2.30", 8080, "/").is_ok()
    });

    // An invalid config changes nothing, and says where it is wrong.
    config.write(
        &[
            attach_glob(a.relative(), &["198.51.100.0/24"]),
            format!(
                "[[attach]]\ncgroup = \"{}\"\nallow = [\"banana\"]\n",
                b.relative()
            ),
        ]
        .concat(),
    );
    daemon.proc().signal(libc::SIGHUP);
    wait_for_log(daemon.proc(), "config refused, nothing changed", SETTLE);
    let log = daemon.log();
    let line = log.lines().find(|l| l.contains("config refused")).unwrap();
    assert!(line.contains("line 6") && line.contains("banana"), "{line}");
    for (cg, n) in [(&a, PROGRAMS), (&b, 0), (&c, PROGRAMS), (&d, PROGRAMS)] {
        assert_eq!(bpf_programs_attached(cg).len(), n, "{}", cg.relative());
    }
    assert_eq!(bpf_program_ids_at(c.path()), c_programs);
}

#[test]
fn a_daemon_killed_with_sigkill_loses_no_enforcement_and_its_successor_adopts_without_attaching_twice(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let parent = Cgroup::new("fb-kill9");
    let app = parent.child("app");
    let inst = Installation::new("fb-daemon");
    let config = ConfigFile::new(&attach_glob(app.relative(), &["192.0.2.0/24"]));
    let daemon = Daemon::start(&inst, &link.server, &["--config", config.arg()]);
    wait_programs(&app, PROGRAMS);
    let before = python_http_server(&link.server, Some(&app), "192.0.2.10", 8080);
    wait_listening(&link.server, "tcp", "192.0.2.10:8080", &before);

    daemon.kill_9();
    assert_eq!(bpf_programs_attached(&app).len(), PROGRAMS);
    // With no daemon at all: native and steer mode binds of absent addresses still work,
    // and the steered one is reached once its address appears.
    let native = python_http_server(&link.server, Some(&app), "192.0.2.11", 8081);
    wait_listening(&link.server, "tcp", "192.0.2.11:8081", &native);
    let steered = freebind_e2e::spawn_in(
        &link.server,
        Some(&app),
        &[ECHO_SERVER, "tcp", "192.0.2.10", "7000"],
    );
    wait_until("the steered server parks", SETTLE, || {
        !freebind_e2e::scenario::parked_sockets(&link.server, "tcp", 7000).is_empty()
    });
    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_until("the steered server answers with no daemon", SETTLE, || {
        tcp_request(&link.client, "192.0.2.10", 7000, b"ping").is_ok_and(|r| r == b"ping")
    });

    add_addr(&link.server, &link.server_if, "192.0.2.11/24");
    let successor = Daemon::start(&inst, &link.server, &["--config", config.arg()]);
    assert!(
        successor.log().contains("adopted pinned attachment"),
        "{}",
        successor.log()
    );
    thread::sleep(Duration::from_secs(2));
    assert_eq!(
        bpf_programs_attached(&app).len(),
        PROGRAMS,
        "the successor attached nothing twice"
    );
    for (addr, port) in [("192.0.2.10", 8080), ("192.0.2.11", 8081)] {
        wait_until(&format!("{addr}:{port} answers"), SETTLE, || {
            http_get(&link.client, addr, port, "/").is_ok()
        });
    }
    drop(steered);
}

#[test]
fn attach_without_a_daemon_is_pinned_and_adopted_by_the_daemon_started_later() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cgroup = Cgroup::new("fb-direct");
    let inst = Installation::new("fb-daemon");
    let out = inst.run(&[
        "attach",
        "--cgroup",
        cgroup.relative(),
        "--allow",
        "192.0.2.0/24",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no freebind daemon is running"),
        "{out:?}"
    );
    assert_eq!(bpf_programs_attached(&cgroup).len(), PROGRAMS);
    assert_eq!(inst.pinned_attachments().len(), 1);

    let daemon = Daemon::start(&inst, &link.server, &[]);
    assert!(
        daemon.log().contains("adopted pinned attachment"),
        "{}",
        daemon.log()
    );
    let server = python_http_server(&link.server, Some(&cgroup), "192.0.2.10", 8080);
    serves_across_address_flap(&link, "192.0.2.10/24", &server, "Directory listing", || {
        http_get(&link.client, "192.0.2.10", 8080, "/").map(|(_, body)| body)
    });
    assert_eq!(bpf_programs_attached(&cgroup).len(), PROGRAMS);
}

#[test]
fn detach_all_removes_every_program_pin_and_record_and_ends_the_daemon() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let parent = Cgroup::new("fb-detach");
    let (a, b) = (parent.child("a"), parent.child("b"));
    let inst = Installation::new("fb-daemon");
    let config = ConfigFile::new(&attach_glob(a.relative(), &[]));
    let daemon = Daemon::start(&inst, &link.server, &["--config", config.arg()]);
    let reply = inst.run_ok(&["attach", "--cgroup", b.relative()]);
    assert!(reply.contains("attached"), "{reply}");
    wait_programs(&a, PROGRAMS);
    wait_programs(&b, PROGRAMS);
    // Detaching one leaves the other.
    inst.run_ok(&["detach", "--cgroup", b.relative()]);
    assert!(bpf_programs_attached(&b).is_empty());
    assert_eq!(bpf_programs_attached(&a).len(), PROGRAMS);

    inst.run_ok(&["detach", "--all"]);
    let status = daemon
        .proc()
        .wait_timeout(SETTLE)
        .expect("the daemon ends after detach --all");
    assert!(status.success(), "{status}");
    assert!(bpf_programs_attached(&a).is_empty());
    assert!(
        !inst.pin_dir().exists(),
        "{} remains",
        inst.pin_dir().display()
    );
    assert!(!inst.run_dir().join("attach").exists());
}

#[test]
fn bad_attach_requests_give_one_line_and_leave_nothing_pinned() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let inst = Installation::new("fb-daemon");
    let cgroup = Cgroup::new("fb-bad");
    for (args, needle) in [
        (
            vec!["attach", "--cgroup", "fb-no-such-cgroup-here"],
            "no such directory",
        ),
        (
            vec!["attach", "--cgroup", cgroup.relative(), "--allow", "banana"],
            "banana",
        ),
        (
            vec!["attach", "--unit", "no/such.service"],
            "no/such.service",
        ),
        (vec!["attach", "--pid", "999999999"], "999999999"),
        (
            vec!["detach", "--cgroup", cgroup.relative()],
            "nothing is attached",
        ),
    ] {
        let out = inst.run(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert!(lines[0].contains(needle), "{args:?}: {stderr}");
        assert!(inst.pinned_attachments().is_empty(), "{args:?} left a pin");
        assert!(
            !inst.pin_dir().join("maps").exists(),
            "{args:?} pinned the shared maps"
        );
        assert!(bpf_programs_attached(&cgroup).is_empty());
    }
}
