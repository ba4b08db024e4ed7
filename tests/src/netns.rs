//! Network namespaces (`ip netns`), veth pairs, dummy links and addresses.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Output};

use crate::util::{check_output, output_of, run_quiet, unique_ifname, unique_name};

/// Where `ip netns add` bind-mounts the namespaces it names.
const NETNS_RUN_DIR: &str = "/run/netns";

/// A named network namespace made with `ip netns add`, with `lo` up (the steer mode parks
/// sockets on loopback addresses, which needs `lo` up). Dropping it runs `ip netns del`;
/// the kernel then destroys the namespace and its virtual links once nothing holds it.
/// [`Netns::of_process`] is a handle of a namespace that may have no name.
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// `/run/netns/NAME` (or `/proc/PID/ns/net`), opened once so children and threads can
    /// `setns()` into it without opening anything after `fork()`.
    fd: File,
    /// Whether `name` is an `ip netns` name of ours (deleted on drop).
    named: bool,
}

impl Netns {
    /// Creates a namespace named `unique_name(prefix)` and brings its `lo` up.
    pub fn new(prefix: &str) -> Netns {
        let name = unique_name(prefix);
        check_output(Command::new("ip").args(["netns", "add", &name]));
        let path = format!("{NETNS_RUN_DIR}/{name}");
        let fd = match File::open(&path) {
            Ok(fd) => fd,
            Err(e) => {
                run_quiet(Command::new("ip").args(["netns", "del", &name]));
                panic!("cannot open {path} after `ip netns add`: {e}");
            }
        };
        let ns = Netns {
            name,
            fd,
            named: true,
        };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The network namespace process `pid` lives in, entered through `/proc/PID/ns/net`
    /// (opened now), also when it has no name any more (`ip netns del` removes only the
    /// name; the namespace lives while a process or a descriptor holds it). Commands run in
    /// it by `setns()` rather than through a name; dropping the handle only closes it.
    pub fn of_process(pid: u32) -> Netns {
        let path = format!("/proc/{pid}/ns/net");
        let fd = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        let ino = std::os::unix::fs::MetadataExt::ino(
            &fd.metadata()
                .unwrap_or_else(|e| panic!("cannot stat {path}: {e}")),
        );
        Netns {
            name: format!("net:[{ino}] of pid {pid}"),
            fd,
            named: false,
        }
    }

    /// The namespace's name (as `ip netns list` shows it); for [`Netns::of_process`], a
    /// label.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip netns exec NAME args...` and panics with its output unless it exits 0.
    pub fn exec(&self, args: &[&str]) -> Output {
        check_output(&mut self.exec_command(args))
    }

    /// Runs `ip netns exec NAME args...` and returns its output whatever the exit status.
    pub fn try_exec(&self, args: &[&str]) -> Output {
        output_of(&mut self.exec_command(args))
    }

    fn exec_command(&self, args: &[&str]) -> Command {
        if !self.named {
            let (program, rest) = args.split_first().expect("a command to run");
            let mut cmd = self.command(program);
            cmd.args(rest);
            return cmd;
        }
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }

    fn ip_command(&self, args: &[&str]) -> Command {
        let mut cmd = if self.named {
            let mut cmd = Command::new("ip");
            cmd.arg("-n").arg(&self.name);
            cmd
        } else {
            self.command("ip")
        };
        cmd.args(args);
        cmd
    }

    /// Runs `ip -n NAME args...` (no mount-namespace games, unlike `ip netns exec`),
    /// panics with its output unless it exits 0, returns its stdout.
    pub fn ip(&self, args: &[&str]) -> String {
        let out = check_output(&mut self.ip_command(args));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip -n NAME args...` and returns its output whatever the exit status.
    pub fn try_ip(&self, args: &[&str]) -> Output {
        output_of(&mut self.ip_command(args))
    }

    /// A `Command` for `program` that enters this namespace between `fork()` and `exec()`
    /// with `setns()` (not through `ip netns exec`: `/sys` and the cgroup mounts stay as
    /// the test sees them).
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        self.enter_on_exec(&mut cmd);
        cmd
    }

    /// Makes `cmd` enter this namespace between `fork()` and `exec()`.
    pub fn enter_on_exec(&self, cmd: &mut Command) {
        // The fd is duplicated (close-on-exec) here, before fork: the child only calls
        // setns(), which is async-signal-safe, as pre_exec requires.
        let fd = self
            .fd
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup the fd of netns {}: {e}", self.name));
        // SAFETY: the closure only calls setns(2) and reads errno.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }

    /// Runs `f` on a fresh thread that has entered this namespace and returns its result
    /// (a panic in `f` is propagated). Sockets `f` creates belong to the namespace; the
    /// thread stays in the test process's cgroup, so it is "a process outside the cgroup".
    pub fn run_in_thread<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let fd = self.fd.as_raw_fd();
        let name = &self.name;
        std::thread::scope(|s| {
            let handle = s.spawn(move || {
                // SAFETY: plain syscall on an fd this Netns keeps open for the whole scope;
                // setns(CLONE_NEWNET) changes only the calling thread.
                if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } != 0 {
                    panic!(
                        "setns into netns {name}: {}",
                        std::io::Error::last_os_error()
                    );
                }
                f()
            });
            handle
                .join()
                .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.named {
            run_quiet(Command::new("ip").args(["netns", "del", &self.name]));
        }
    }
}

/// The two interface names of a veth pair made by [`VethPair::new`]. The pair has no guard
/// of its own: it goes away with its namespaces.
#[derive(Debug, Clone)]
pub struct VethPair {
    /// The end in the server namespace.
    pub server_if: String,
    /// The end in the client namespace.
    pub client_if: String,
}

impl VethPair {
    /// Creates a veth pair with unique names (≤ 15 bytes), one end in each namespace, both
    /// up, no addresses. It is created directly inside `server_ns`, so no interface ever
    /// appears in the host's namespace.
    pub fn new(server_ns: &Netns, client_ns: &Netns) -> VethPair {
        let server_if = unique_ifname("fbs");
        let client_if = unique_ifname("fbc");
        server_ns.ip(&[
            "link",
            "add",
            &server_if,
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            client_ns.name(),
        ]);
        set_link_up(server_ns, &server_if, true);
        set_link_up(client_ns, &client_if, true);
        VethPair {
            server_if,
            client_if,
        }
    }
}

/// A server namespace and a client namespace joined by a veth pair.
///
/// The client end has `192.0.2.1/24` and `2001:db8::1/64` (nodad), and on-link routes to
/// `198.51.100.0/24` and `203.0.113.0/24` (Linux answers ARP for any local address on any
/// interface, so IPv4 addresses the server puts on a dummy link are reachable too). The
/// server end starts with no address: tests add and remove them. Dropping it deletes both
/// namespaces, which removes the veth.
#[derive(Debug)]
pub struct Link {
    /// Where servers (and the agent) run.
    pub server: Netns,
    /// Where clients run.
    pub client: Netns,
    /// The veth end in `server`.
    pub server_if: String,
    /// The veth end in `client`.
    pub client_if: String,
}

impl Link {
    /// Makes both namespaces, the veth, and the client's addresses and routes.
    pub fn new() -> Link {
        let server = Netns::new("fb-srv");
        let client = Netns::new("fb-cli");
        let VethPair {
            server_if,
            client_if,
        } = VethPair::new(&server, &client);
        add_addr(&client, &client_if, "192.0.2.1/24");
        add_addr6(&client, &client_if, "2001:db8::1/64", true);
        add_route(&client, "198.51.100.0/24", &client_if);
        add_route(&client, "203.0.113.0/24", &client_if);
        Link {
            server,
            client,
            server_if,
            client_if,
        }
    }
}

impl Default for Link {
    fn default() -> Self {
        Link::new()
    }
}

/// `ip -n NS addr add CIDR dev IFNAME` for an IPv4 address (`"192.0.2.10/24"`).
pub fn add_addr(ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&["addr", "add", cidr, "dev", ifname]);
}

/// `ip -n NS -6 addr add CIDR dev IFNAME [nodad]`. Without `nodad` the address stays
/// `tentative` while duplicate address detection runs (about a second), which is exactly
/// the boot-time case freebind is for; see [`addr6_tentative`].
pub fn add_addr6(ns: &Netns, ifname: &str, cidr: &str, nodad: bool) {
    let mut args = vec!["-6", "addr", "add", cidr, "dev", ifname];
    if nodad {
        args.push("nodad");
    }
    ns.ip(&args);
}

/// `ip -n NS addr del CIDR dev IFNAME` (either family).
pub fn del_addr(ns: &Netns, ifname: &str, cidr: &str) {
    ns.ip(&["addr", "del", cidr, "dev", ifname]);
}

/// Whether IPv6 address `addr` (no prefix length, e.g. `"2001:db8::10"`) on `ifname` is
/// still `tentative` (duplicate address detection running). False when it is absent.
pub fn addr6_tentative(ns: &Netns, ifname: &str, addr: &str) -> bool {
    let want: std::net::Ipv6Addr = addr
        .parse()
        .unwrap_or_else(|e| panic!("addr6_tentative: bad IPv6 address {addr:?}: {e}"));
    let out = ns.ip(&["-6", "-o", "addr", "show", "dev", ifname]);
    out.lines().any(|line| {
        let mut words = line.split_whitespace();
        let found = words.by_ref().skip_while(|w| *w != "inet6").nth(1);
        let matches = found
            .and_then(|cidr| cidr.split('/').next())
            .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
            == Some(want);
        matches && line.split_whitespace().any(|w| w == "tentative")
    })
}

/// Creates a dummy interface with a unique name (≤ 15 bytes) in `ns`, up, and returns its
/// name (it goes away with the namespace).
pub fn add_dummy(ns: &Netns, prefix: &str) -> String {
    let name = unique_ifname(prefix);
    ns.ip(&["link", "add", &name, "type", "dummy"]);
    set_link_up(ns, &name, true);
    name
}

/// `ip -n NS link set IFNAME up|down`.
pub fn set_link_up(ns: &Netns, ifname: &str, up: bool) {
    ns.ip(&["link", "set", ifname, if up { "up" } else { "down" }]);
}

/// `ip -n NS route add PREFIX dev IFNAME` (an on-link route; either family).
pub fn add_route(ns: &Netns, prefix: &str, ifname: &str) {
    ns.ip(&["route", "add", prefix, "dev", ifname]);
}
