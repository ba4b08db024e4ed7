//! Network namespaces the agent serves: its own, and others named by the operator (`ip
//! netns` names or paths) or followed from the managed processes.
use std::{
    fs::File,
    io,
    os::fd::{AsFd, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};

use crate::kernel;

/// Where `ip netns add NAME` puts its namespaces.
const IP_NETNS_DIR: &str = "/run/netns";

/// An open network namespace with its cookie (the value `bpf_get_netns_cookie()` returns for
/// sockets inside it).
pub struct Netns {
    file: File,
    cookie: u64,
    ino: u64,
    label: String,
}

impl Netns {
    /// The namespace of the calling thread.
    pub fn current() -> Result<Self> {
        Self::open(
            Path::new("/proc/thread-self/ns/net"),
            "the agent's network namespace".into(),
        )
    }

    /// A namespace by `ip netns` name or by path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    pub fn named(spec: &str) -> Result<Self> {
        let path = if spec.contains('/') {
            PathBuf::from(spec)
        } else {
            Path::new(IP_NETNS_DIR).join(spec)
        };
        Self::open(&path, format!("network namespace {spec}"))
    }

    /// The namespace of process `pid` (as seen in the agent's pid namespace).
    pub fn of_pid(pid: u32, label: String) -> Result<Self> {
        Self::open(Path::new(&format!("/proc/{pid}/ns/net")), label)
    }

    fn open(path: &Path, label: String) -> Result<Self> {
        let file = File::open(path)
            .with_context(|| format!("opening network namespace {}", path.display()))?;
        let ino = file
            .metadata()
            .with_context(|| format!("network namespace {}", path.display()))?
            .ino();
        let mut ns = Self {
            file,
            cookie: 0,
            ino,
            label,
        };
        ns.cookie = ns
            .run(|| {
                // SAFETY: a plain UDP socket, owned at once.
                let fd = unsafe {
                    libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0)
                };
                if fd < 0 {
                    return Err(io::Error::last_os_error()).context("opening a socket");
                }
                // SAFETY: fd was just created and is owned here.
                let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                kernel::netns_cookie(fd.as_raw_fd())
            })
            .with_context(|| {
                format!("reading the cookie of network namespace {}", path.display())
            })?;
        Ok(ns)
    }

    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The namespace's inode (`ls -l /proc/PID/ns/net`; what links to it report).
    pub fn ino(&self) -> u64 {
        self.ino
    }

    /// How log lines name it: "the agent's network namespace", "network namespace NAME".
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Runs `f` on a short-lived thread that has entered this namespace. Sockets `f`
    /// creates belong to the namespace for good and may be used from any thread after.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        let fd = self.file.as_raw_fd();
        std::thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: setns(CLONE_NEWNET) on an fd this Netns keeps open for the whole
                // scope; it changes only the calling thread, which ends with the scope.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    return Err(io::Error::last_os_error())
                        .context("entering the network namespace (setns)");
                }
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
        .with_context(|| format!("in {}", self.label))
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
