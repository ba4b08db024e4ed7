//! freebind's agent: gives every socket of a cgroup's processes `IP_FREEBIND` semantics
//! with eBPF programs it loads, attaches, configures and watches.
//!
//! The binary is a thin CLI over [`commands`].
pub mod addrwatch;
pub mod agent;
pub mod cgroup;
pub mod check;
pub mod commands;
pub mod config;
pub mod control;
pub mod daemon;
pub mod events;
pub mod exec;
pub mod kernel;
pub mod loader;
pub mod locality;
pub mod logging;
pub mod manager;
pub mod metrics;
pub mod netns;
pub mod parking;
pub mod paths;
pub mod pin;
pub mod pinned;
pub mod policy;
pub mod report;
pub mod selector;
pub mod sockdiag;
pub mod status;
pub mod steer;
pub mod systemd;
