//! Test bed for freebind's privileged end-to-end tests (and `cargo xtask demo`).
//!
//! Everything here is real: network namespaces made with `ip netns`, veth and dummy links,
//! cgroup v2 directories, server programs started inside them, the agent binary under test.
//! Every resource is a guard that removes what it made when dropped, and every name is
//! unique (pid + counter + a short random part) because tests run in parallel.
//!
//! Failures panic with context (tests want the stack trace and the message, not a
//! `Result`). Guards never panic in `Drop`; they print what they could not clean up. When a
//! test is already panicking, process guards print their captured output as they drop, so
//! the failing test's output shows what the servers and the agent said.
//!
//! Traffic only ever goes to addresses inside namespaces made here (192.0.2.0/24,
//! 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32); nothing touches the host's own
//! network namespace.

#![warn(missing_docs)]

mod agent;
mod cgroup;
mod client;
mod daemon;
mod netns;
mod process;
mod sandbox;
pub mod scenario;
mod tools;
mod util;

pub use agent::{agent_command, agent_path, Agent, AGENT_ENV};
pub use cgroup::{cgroup2_mount, Cgroup};
pub use client::{http_get, tcp_request, udp_request, CLIENT_TIMEOUT};
pub use daemon::{Daemon, Installation};
pub use netns::{
    add_addr, add_addr6, add_dummy, add_route, addr6_tentative, del_addr, set_link_up, Link, Netns,
    VethPair,
};
pub use process::{run_in, run_in_timeout, spawn_in, wait_for_log, Proc};
pub use sandbox::{ensure_bpffs, sandbox_root, Sandbox, SandboxBuilder, MIRROR_ENV, SANDBOX_ROOT};
pub use tools::{
    bpf_program_ids_at, bpf_programs_attached, bpf_programs_attached_at, ensure_doc_tools,
    ensure_metrics_tools, ensure_tools, require_root, tool,
};
pub use util::{poll_until, show_output, sockaddr, unique_name, wait_until, TempDir};
