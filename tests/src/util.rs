//! Unique names, polling, and running helper commands with their output in panics.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// Per-process counter: with the pid it makes names unique among parallel tests.
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// How often [`wait_until`] polls.
const POLL: Duration = Duration::from_millis(50);

/// A few random bits from std's per-process random hash keys (no extra crate): enough to
/// tell apart two processes that had the same pid at different times.
fn random_u32() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(COUNTER.load(Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as u32
}

fn next_count() -> u32 {
    COUNTER.fetch_add(1, Ordering::Relaxed)
}

/// A name unique among every test running on this machine: `{prefix}-{pid}-{n}-{rand}`,
/// e.g. `fb-srv-4242-3-9f1c`. Use it for anything that lives outside the test process
/// (network namespaces, cgroups, files).
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}-{}-{}-{:04x}",
        std::process::id(),
        next_count(),
        random_u32() & 0xffff
    )
}

/// A unique network interface name, at most 15 bytes (`IFNAMSIZ - 1`): up to 3 bytes of
/// `prefix`, the pid in hex, `-`, the counter in hex, then random hex up to the limit.
pub(crate) fn unique_ifname(prefix: &str) -> String {
    let p: String = prefix
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(3)
        .collect();
    let mut name = format!("{p}{:x}-{:x}", std::process::id(), next_count());
    name.truncate(15);
    let rand = format!("{:08x}", random_u32());
    for c in rand.chars().take(15usize.saturating_sub(name.len()).min(4)) {
        name.push(c);
    }
    name
}

/// A scratch directory with a unique name under the temp directory, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `$TMPDIR/<prefix>-<unique>`; panics when it cannot.
    pub fn new(prefix: &str) -> TempDir {
        let p = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        TempDir(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Polls `f` every 50 ms until it returns true; panics naming `what` after `timeout`.
///
/// The timeout is a generous bound for something that must happen, not a timed
/// assertion: pick it so a loaded CI machine never hits it.
pub fn wait_until(what: &str, timeout: Duration, f: impl FnMut() -> bool) {
    if !poll_until(timeout, f) {
        panic!("timed out after {timeout:?} waiting for {what}");
    }
}

/// Polls `f` every 50 ms until it returns true or `timeout` has passed; returns whether it
/// did, for callers whose failure message needs what `f` saw last.
pub fn poll_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if f() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Renders a command line for messages.
pub(crate) fn show_cmd(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Renders a finished command's status and output for messages.
pub fn show_output(out: &Output) -> String {
    format!(
        "{}\n--- stdout ---\n{}--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `cmd` to completion, capturing its output; panics if it cannot be started.
pub(crate) fn output_of(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", show_cmd(cmd)))
}

/// Runs `cmd` to completion; panics with its output unless it exits 0.
pub(crate) fn check_output(cmd: &mut Command) -> Output {
    let out = output_of(cmd);
    if !out.status.success() {
        panic!("`{}` failed: {}", show_cmd(cmd), show_output(&out));
    }
    out
}

/// Runs `cmd` to completion; prints (never panics) when it fails. For `Drop`.
pub(crate) fn run_quiet(cmd: &mut Command) {
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) => eprintln!(
            "freebind-e2e: `{}` failed: {}",
            show_cmd(cmd),
            show_output(&out)
        ),
        Err(e) => eprintln!("freebind-e2e: cannot run `{}`: {e}", show_cmd(cmd)),
    }
}

/// `addr` as the `sockaddr` bind(2) and connect(2) take, and its length: for the test
/// programs that make raw socket calls (to control exactly which syscalls they make).
pub fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: all-zero is a valid sockaddr_storage, large enough and aligned for both
    // families' views, one of which is filled below.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            // SAFETY: see above.
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.ip().octets());
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            // SAFETY: see above.
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn ifnames_fit_and_differ() {
        let a = unique_ifname("fbsrv");
        let b = unique_ifname("fbsrv");
        assert!(a.len() <= 15 && b.len() <= 15, "{a} {b}");
        assert!(a.starts_with("fbs"), "{a}");
        assert_ne!(a, b);
    }

    #[test]
    fn names_differ() {
        assert_ne!(unique_name("x"), unique_name("x"));
    }
}
