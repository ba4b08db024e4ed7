//! The container path without a container engine: a "container" is a process with a network
//! namespace, a cgroup and a mount namespace of its own, as runc makes them; the daemon runs
//! in another namespace, as a DaemonSet pod with the host's would.
use std::{fs, process::Command};

use freebind_e2e::{
    add_addr, bpf_programs_attached, ensure_tools, http_get, require_root,
    scenario::{wait_listening, SETTLE},
    spawn_in, tcp_request, unique_name, wait_for_log, wait_until, Cgroup, Daemon, Installation,
    Link, Netns,
};

const ECHO_SERVER: &str = env!("CARGO_BIN_EXE_freebind-echo-server");

/// A fifo the container's entry point waits on before starting its servers.
struct Gate(std::path::PathBuf);

impl Gate {
    fn new() -> Self {
        let path = std::env::temp_dir().join(unique_name("fb-gate"));
        let status = Command::new("mkfifo").arg(&path).status().unwrap();
        assert!(status.success());
        Gate(path)
    }

    fn open(&self) {
        fs::write(&self.0, b"go\n").unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_container_started_before_its_address_exists_is_reachable_after_attach_by_pid() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let host = Netns::new("fb-host");
    let scope = Cgroup::new("fb-ctr");
    let inst = Installation::new("fb-daemon");
    let daemon = Daemon::start(&inst, &host, &[]);

    // The entry point waits for the gate, then starts a native-mode server (python sets
    // SO_REUSEADDR before bind) and a steer-mode one (bind with no setsockopt before it).
    let gate = Gate::new();
    let script = format!(
        "read go < {gate}; {echo} tcp 192.0.2.10 7000 & exec python3 -m http.server --bind 192.0.2.10 8080",
        gate = gate.0.display(),
        echo = ECHO_SERVER
    );
    let container = spawn_in(
        &link.server,
        Some(&scope),
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
    );
    let own_mnt = fs::read_link("/proc/self/ns/mnt").unwrap();
    wait_until("the container has its own mount namespace", SETTLE, || {
        fs::read_link(format!("/proc/{}/ns/mnt", container.pid())).is_ok_and(|m| m != own_mnt)
    });

    let reply = inst.run_ok(&["attach", "--pid", &container.pid().to_string()]);
    assert!(reply.contains("attached"), "{reply}");
    assert_eq!(bpf_programs_attached(&scope).len(), 10);
    let ino = fs::metadata(format!("/proc/{}/ns/net", container.pid()))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    wait_for_log(
        daemon.proc(),
        &format!("serving network namespace net:[{ino}]"),
        SETTLE,
    );

    gate.open();
    wait_listening(&link.server, "tcp", "192.0.2.10:8080", &container);
    add_addr(&link.server, &link.server_if, "192.0.2.10/24");
    wait_until("the container's native server answers", SETTLE, || {
        http_get(&link.client, "192.0.2.10", 8080, "/").is_ok()
    });
    wait_until("the container's steered server answers", SETTLE, || {
        tcp_request(&link.client, "192.0.2.10", 7000, b"ping").is_ok_and(|r| r == b"ping")
    });

    // The container goes; the daemon stops serving its namespace (its pins go too).
    drop(container);
    drop(scope);
    wait_for_log(daemon.proc(), "no longer serving network namespace", SETTLE);
    drop(daemon);
}
