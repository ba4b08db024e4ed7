//! What the agent needs from the running kernel and process, checked before anything is
//! changed, so that a missing piece is named instead of surfacing as a verifier error.
//!
//! [`REQUIREMENTS`] and [`PRIVILEGES`] are written once for both readers: the agent refuses
//! to start at the first one missing ([`check_features`], [`check_privileges`]), and
//! `freebind-agent check` shows every one of them, with what to do.
use std::{
    fmt, fs, io, mem,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
    sync::OnceLock,
};

use anyhow::{anyhow, bail, Context as _, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// A capability freebind uses (or a choice of capabilities, any of which will do).
#[derive(Debug, Clone, Copy)]
pub struct Privilege {
    /// How the refusal to start and `check` name it.
    pub name: &'static str,
    any_of: &'static [u32],
    /// What freebind does with it.
    pub why: &'static str,
    /// What to grant instead of running as root.
    pub grant: &'static str,
    /// Without it the agent refuses to start; without the others it does less.
    pub required: bool,
}

// CAP_SYS_ADMIN stands for CAP_BPF and CAP_PERFMON: kernels before 5.8 know only it, and
// the agent needs it anyway (SETNS), so it is what to grant (README's privileges table).
const COVERED: &str = "CAP_SYS_ADMIN (it covers this, and setns() needs it anyway)";
const LOAD: Privilege = Privilege {
    name: "CAP_BPF (or CAP_SYS_ADMIN)",
    any_of: &[CAP_BPF, CAP_SYS_ADMIN],
    why: "loading programs and creating maps",
    grant: COVERED,
    required: true,
};
const PERFMON: Privilege = Privilege {
    name: "CAP_PERFMON (or CAP_SYS_ADMIN)",
    any_of: &[CAP_PERFMON, CAP_SYS_ADMIN],
    why: "loading iter/udp, a tracing program",
    grant: COVERED,
    required: true,
};
const NET_ADMIN: Privilege = Privilege {
    name: "CAP_NET_ADMIN",
    any_of: &[CAP_NET_ADMIN],
    why: "cgroup, sockops and sk_lookup programs, SOCKHASH maps, parking addresses on lo",
    grant: "CAP_NET_ADMIN",
    required: true,
};
// Netns::run enters even the agent's own namespace with setns(), which takes CAP_SYS_ADMIN
// whatever the namespace (measured: without it `exec` fails there).
const SETNS: Privilege = Privilege {
    name: "CAP_SYS_ADMIN",
    any_of: &[CAP_SYS_ADMIN],
    why: "setns() into the network namespaces the agent serves, its own included",
    grant: "CAP_SYS_ADMIN",
    required: true,
};
const PTRACE: Privilege = Privilege {
    name: "CAP_SYS_PTRACE",
    any_of: &[CAP_SYS_PTRACE],
    why: "/proc/PID/ns/net of other users' processes (without it, their namespaces are not \
          served)",
    grant: "CAP_SYS_PTRACE",
    required: false,
};

/// Every capability freebind uses, as README's privileges table explains them.
pub const PRIVILEGES: [Privilege; 5] = [LOAD, PERFMON, NET_ADMIN, SETNS, PTRACE];

/// A process's effective capability set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps(u64);

impl Caps {
    /// This process's (`CapEff:` in /proc/self/status).
    pub fn effective() -> Result<Self> {
        let status =
            fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
        Ok(Self::from_status(&status))
    }

    pub(crate) fn from_status(status: &str) -> Self {
        Self(
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .unwrap_or(0),
        )
    }

    pub fn has(self, p: &Privilege) -> bool {
        p.any_of.iter().any(|&cap| self.0 & (1u64 << cap) != 0)
    }
}

/// Refuses to go on without the capabilities that loading and attaching cgroup programs
/// take: CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN, which kernels before 5.8 require) and
/// CAP_NET_ADMIN; and CAP_SYS_ADMIN itself for setns().
pub fn check_privileges() -> Result<()> {
    let caps = Caps::effective()?;
    let missing: Vec<&str> = PRIVILEGES
        .iter()
        .filter(|p| p.required && !caps.has(p))
        .map(|p| p.name)
        .collect();
    if !missing.is_empty() {
        // SAFETY: geteuid cannot fail.
        let uid = unsafe { libc::geteuid() };
        bail!(
            "freebind-agent must run as root: uid {uid} lacks {}",
            missing.join(", ")
        );
    }
    Ok(())
}

/// In a container (a DaemonSet pod) the agent sees cgroup paths relative to its own cgroup
/// namespace (`/../../kubepods…` for the host's processes), which name nothing on the
/// host's cgroup2 mount. With the host's pids visible, it joins PID 1's cgroup namespace
/// (best effort: where that fails it is already there, or cannot be, and says so later).
pub fn enter_host_cgroup_namespace() {
    let own = fs::read_link("/proc/self/ns/cgroup").ok();
    let init = fs::read_link("/proc/1/ns/cgroup").ok();
    if own.is_none() || init.is_none() || own == init {
        return;
    }
    let Ok(f) = fs::File::open("/proc/1/ns/cgroup") else {
        return;
    };
    // SAFETY: setns on a namespace fd we hold.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWCGROUP) } == 0 {
        log::debug!("joined PID 1's cgroup namespace");
    } else {
        log::debug!(
            "joining PID 1's cgroup namespace: {}",
            io::Error::last_os_error()
        );
    }
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; lift it (best effort).
pub fn raise_memlock() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain setrlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        log::debug!("setrlimit(RLIMIT_MEMLOCK): {}", io::Error::last_os_error());
    }
}

// Kernel ABI numbers (include/uapi/linux/bpf.h).
const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_PROG_LOAD: libc::c_long = 5;
const PROG_SOCK_OPS: u32 = 13;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_CGROUP_SOCKOPT: u32 = 25;
const PROG_TRACING: u32 = 26;
const PROG_SK_LOOKUP: u32 = 30;
const ATTACH_SOCK_OPS: u32 = 3;
const ATTACH_INET4_BIND: u32 = 8;
const ATTACH_INET6_BIND: u32 = 9;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_INET6_CONNECT: u32 = 11;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_UDP6_SENDMSG: u32 = 15;
const ATTACH_SETSOCKOPT: u32 = 22;
const ATTACH_TRACE_ITER: u32 = 28;
const ATTACH_INET4_GETSOCKNAME: u32 = 31;
const ATTACH_INET6_GETSOCKNAME: u32 = 32;
const ATTACH_SK_LOOKUP: u32 = 36;
const MAP_HASH: u32 = 1;
const MAP_PERCPU_ARRAY: u32 = 6;
const MAP_LPM_TRIE: u32 = 11;
const MAP_HASH_OF_MAPS: u32 = 13;
const MAP_SOCKHASH: u32 = 18;
const MAP_SK_STORAGE: u32 = 24;
const MAP_RINGBUF: u32 = 27;
const BPF_F_NO_PREALLOC: u32 = 1;

/// Where the kernel exposes its own BTF (Linux 5.4, CONFIG_DEBUG_INFO_BTF).
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

/// A Linux release as far as features go: major and minor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Release(pub u32, pub u32);

impl Release {
    /// The release a `uname -r` string starts with (`6.18.44-fc-v669` is 6.18).
    pub fn parse(uname: &str) -> Option<Self> {
        let mut numbers = uname.split(|c: char| !c.is_ascii_digit());
        Some(Self(
            numbers.next()?.parse().ok()?,
            numbers.next()?.parse().ok()?,
        ))
    }
}

impl fmt::Display for Release {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// The running kernel's release string (`uname -r`).
pub fn running_release() -> Result<String> {
    // SAFETY: uname fills the zeroed struct; its fields are NUL-terminated.
    let mut uts: libc::utsname = unsafe { mem::zeroed() };
    if unsafe { libc::uname(&mut uts) } != 0 {
        return Err(io::Error::last_os_error()).context("uname");
    }
    // SAFETY: see above.
    let release = unsafe { std::ffi::CStr::from_ptr(uts.release.as_ptr()) };
    Ok(release.to_string_lossy().into_owned())
}

/// A program type with the attach type freebind uses it with.
#[derive(Debug, Clone, Copy)]
struct Hook {
    /// The ELF section (libbpf's name for the pair).
    section: &'static str,
    prog_type_name: &'static str,
    attach_type_name: &'static str,
    prog_type: u32,
    attach_type: u32,
    /// The vmlinux function the program attaches to, for types that attach by BTF id.
    btf_func: Option<&'static str>,
    since: Release,
    /// What loading it takes.
    needs: &'static [Privilege],
}

impl Hook {
    fn full_name(&self) -> String {
        format!("{} ({})", self.section, self.prog_type_name)
    }
}

/// A `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` hook.
const fn sock_addr(
    section: &'static str,
    attach_type_name: &'static str,
    attach_type: u32,
    since: Release,
) -> Hook {
    Hook {
        section,
        prog_type_name: "BPF_PROG_TYPE_CGROUP_SOCK_ADDR",
        attach_type_name,
        prog_type: PROG_CGROUP_SOCK_ADDR,
        attach_type,
        btf_func: None,
        since,
        needs: &[LOAD, NET_ADMIN],
    }
}

const BIND4: Hook = sock_addr(
    "cgroup/bind4",
    "BPF_CGROUP_INET4_BIND",
    ATTACH_INET4_BIND,
    Release(4, 17),
);
const BIND6: Hook = sock_addr(
    "cgroup/bind6",
    "BPF_CGROUP_INET6_BIND",
    ATTACH_INET6_BIND,
    Release(4, 17),
);
const CONNECT4: Hook = sock_addr(
    "cgroup/connect4",
    "BPF_CGROUP_INET4_CONNECT",
    ATTACH_INET4_CONNECT,
    Release(4, 17),
);
const CONNECT6: Hook = sock_addr(
    "cgroup/connect6",
    "BPF_CGROUP_INET6_CONNECT",
    ATTACH_INET6_CONNECT,
    Release(4, 17),
);
const SENDMSG4: Hook = sock_addr(
    "cgroup/sendmsg4",
    "BPF_CGROUP_UDP4_SENDMSG",
    ATTACH_UDP4_SENDMSG,
    Release(4, 18),
);
const SENDMSG6: Hook = sock_addr(
    "cgroup/sendmsg6",
    "BPF_CGROUP_UDP6_SENDMSG",
    ATTACH_UDP6_SENDMSG,
    Release(4, 18),
);
const GETSOCKNAME4: Hook = sock_addr(
    "cgroup/getsockname4",
    "BPF_CGROUP_INET4_GETSOCKNAME",
    ATTACH_INET4_GETSOCKNAME,
    Release(5, 8),
);
const GETSOCKNAME6: Hook = sock_addr(
    "cgroup/getsockname6",
    "BPF_CGROUP_INET6_GETSOCKNAME",
    ATTACH_INET6_GETSOCKNAME,
    Release(5, 8),
);
const SETSOCKOPT: Hook = Hook {
    section: "cgroup/setsockopt",
    prog_type_name: "BPF_PROG_TYPE_CGROUP_SOCKOPT",
    attach_type_name: "BPF_CGROUP_SETSOCKOPT",
    prog_type: PROG_CGROUP_SOCKOPT,
    attach_type: ATTACH_SETSOCKOPT,
    btf_func: None,
    since: Release(5, 3),
    needs: &[LOAD, NET_ADMIN],
};
const SOCK_OPS: Hook = Hook {
    section: "sockops",
    prog_type_name: "BPF_PROG_TYPE_SOCK_OPS",
    attach_type_name: "BPF_CGROUP_SOCK_OPS",
    prog_type: PROG_SOCK_OPS,
    attach_type: ATTACH_SOCK_OPS,
    btf_func: None,
    since: Release(4, 13),
    needs: &[LOAD, NET_ADMIN],
};
const SK_LOOKUP: Hook = Hook {
    section: "sk_lookup",
    prog_type_name: "BPF_PROG_TYPE_SK_LOOKUP",
    attach_type_name: "BPF_SK_LOOKUP",
    prog_type: PROG_SK_LOOKUP,
    attach_type: ATTACH_SK_LOOKUP,
    btf_func: None,
    since: Release(5, 9),
    needs: &[LOAD, NET_ADMIN],
};
const ITER_UDP: Hook = Hook {
    section: "iter/udp",
    prog_type_name: "BPF_PROG_TYPE_TRACING",
    attach_type_name: "BPF_TRACE_ITER",
    prog_type: PROG_TRACING,
    attach_type: ATTACH_TRACE_ITER,
    btf_func: Some("bpf_iter_udp"),
    since: Release(5, 9),
    needs: &[LOAD, PERFMON],
};

/// Which part of `check`'s table a requirement is shown in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Kernel,
    Program,
    Helper,
    Map,
}

#[derive(Debug, Clone, Copy)]
enum Probe {
    Btf,
    NetnsCookie,
    Program(Hook),
    /// (hook, helper name, helper id)
    Helper(Hook, &'static str, i32),
    Map(MapProbe),
}

#[derive(Debug, Clone, Copy)]
enum MapProbe {
    Plain {
        map_type: u32,
        key: u32,
        value: u32,
        flags: u32,
    },
    /// Its size must be a power-of-two multiple of the page size.
    RingBuf,
    /// Creating one takes BTF for its value.
    SkStorage,
    /// A hash of maps holding maps of `inner` type.
    HashOfMaps { inner: u32, key: u32, value: u32 },
}

/// One thing freebind uses from the kernel: what it is, the release that brought it, how
/// to find out whether this kernel has it, and what to do when it does not.
#[derive(Debug, Clone, Copy)]
pub struct Requirement {
    pub kind: Kind,
    /// The release that brought it (to the program type, for a helper).
    pub since: Release,
    /// The row's name for the kinds whose probe does not name them.
    name: &'static str,
    /// What it is or what freebind does with it, where the name does not say.
    about: &'static str,
    probe: Probe,
    /// What to do besides a recent enough kernel, where that is not all.
    remedy: Option<&'static str>,
    /// What probing it takes.
    needs: &'static [Privilege],
}

const fn program(hook: Hook) -> Requirement {
    Requirement {
        kind: Kind::Program,
        since: hook.since,
        name: "",
        about: "",
        probe: Probe::Program(hook),
        remedy: None,
        needs: hook.needs,
    }
}

const fn helper(hook: Hook, name: &'static str, id: i32, since: Release) -> Requirement {
    Requirement {
        kind: Kind::Helper,
        since,
        name: "",
        about: "",
        probe: Probe::Helper(hook, name, id),
        remedy: None,
        needs: hook.needs,
    }
}

const fn map(
    name: &'static str,
    about: &'static str,
    probe: MapProbe,
    since: Release,
    needs: &'static [Privilege],
) -> Requirement {
    Requirement {
        kind: Kind::Map,
        since,
        name,
        about,
        probe: Probe::Map(probe),
        remedy: None,
        needs,
    }
}

const fn plain(map_type: u32, key: u32, value: u32, flags: u32) -> MapProbe {
    MapProbe::Plain {
        map_type,
        key,
        value,
        flags,
    }
}

const NETNS_COOKIE: Requirement = Requirement {
    kind: Kind::Kernel,
    since: Release(5, 14),
    name: "SO_NETNS_COOKIE",
    about: "which network namespace a socket is in",
    probe: Probe::NetnsCookie,
    remedy: None,
    needs: &[],
};

/// Everything freebind uses from the kernel, in the order the agent checks it at start.
/// Helpers are listed per program type (availability is per type, and for the sockopt
/// hooks per attach type); a release in `since` is when the kernel allowed that helper
/// there, not when the helper first appeared.
pub const REQUIREMENTS: &[Requirement] = &[
    Requirement {
        kind: Kind::Kernel,
        since: Release(5, 4),
        name: "BTF",
        about: VMLINUX_BTF,
        probe: Probe::Btf,
        remedy: Some("a kernel built with CONFIG_DEBUG_INFO_BTF=y"),
        needs: &[],
    },
    NETNS_COOKIE,
    program(BIND4),
    program(BIND6),
    program(CONNECT4),
    program(CONNECT6),
    program(SENDMSG4),
    program(SENDMSG6),
    program(GETSOCKNAME4),
    program(GETSOCKNAME6),
    program(SETSOCKOPT),
    program(SOCK_OPS),
    program(SK_LOOKUP),
    program(ITER_UDP),
    helper(SETSOCKOPT, "bpf_setsockopt", 49, Release(5, 15)),
    helper(SETSOCKOPT, "bpf_sk_storage_get", 107, Release(5, 3)),
    helper(SETSOCKOPT, "bpf_get_netns_cookie", 122, Release(5, 15)),
    helper(BIND4, "bpf_sk_storage_get", 107, Release(5, 3)),
    helper(BIND4, "bpf_get_netns_cookie", 122, Release(5, 7)),
    helper(BIND4, "bpf_set_retval", 187, Release(5, 18)),
    helper(BIND4, "bpf_ringbuf_reserve", 131, Release(5, 8)),
    helper(BIND4, "bpf_get_current_comm", 16, Release(5, 7)),
    helper(BIND4, "bpf_get_current_pid_tgid", 14, Release(5, 7)),
    helper(BIND4, "bpf_get_current_cgroup_id", 80, Release(5, 7)),
    helper(BIND4, "bpf_sk_lookup_tcp", 84, Release(5, 2)),
    helper(BIND4, "bpf_sk_lookup_udp", 85, Release(5, 2)),
    helper(BIND4, "bpf_sk_release", 86, Release(5, 2)),
    helper(SENDMSG4, "bpf_sk_storage_get", 107, Release(5, 3)),
    helper(SENDMSG6, "bpf_sk_storage_get", 107, Release(5, 3)),
    helper(CONNECT4, "bpf_sk_storage_get", 107, Release(5, 3)),
    helper(GETSOCKNAME4, "bpf_sk_storage_get", 107, Release(5, 8)),
    helper(SOCK_OPS, "bpf_sk_storage_get", 107, Release(5, 11)),
    helper(SOCK_OPS, "bpf_sock_hash_update", 70, Release(4, 18)),
    helper(SK_LOOKUP, "bpf_sk_assign", 124, Release(5, 9)),
    helper(SK_LOOKUP, "bpf_sk_release", 86, Release(5, 9)),
    // Tracing programs may use socket storage since 5.11, and update a SOCKHASH from an
    // iterator since 5.10; the probe sees only the first (the helper is older).
    helper(ITER_UDP, "bpf_sk_storage_get", 107, Release(5, 11)),
    helper(ITER_UDP, "bpf_map_update_elem", 2, Release(5, 10)),
    map(
        "BPF_MAP_TYPE_HASH",
        "",
        plain(MAP_HASH, 8, 1, 0),
        Release(3, 19),
        &[LOAD],
    ),
    map(
        "BPF_MAP_TYPE_PERCPU_ARRAY",
        "",
        plain(MAP_PERCPU_ARRAY, 4, 8, 0),
        Release(4, 6),
        &[LOAD],
    ),
    map(
        "BPF_MAP_TYPE_LPM_TRIE",
        "",
        plain(MAP_LPM_TRIE, 8, 1, BPF_F_NO_PREALLOC),
        Release(4, 11),
        &[LOAD],
    ),
    map(
        "BPF_MAP_TYPE_HASH_OF_MAPS",
        "",
        MapProbe::HashOfMaps {
            inner: MAP_HASH,
            key: 8,
            value: 1,
        },
        Release(4, 12),
        &[LOAD],
    ),
    map(
        "BPF_MAP_TYPE_SOCKHASH",
        "",
        plain(MAP_SOCKHASH, 20, 8, 0),
        Release(4, 18),
        &[LOAD, NET_ADMIN],
    ),
    map(
        "BPF_MAP_TYPE_SK_STORAGE",
        "",
        MapProbe::SkStorage,
        Release(5, 2),
        &[LOAD],
    ),
    map(
        "BPF_MAP_TYPE_RINGBUF",
        "",
        MapProbe::RingBuf,
        Release(5, 8),
        &[LOAD],
    ),
    // Steer mode reaches each namespace's SOCKHASH through a hash of maps.
    map(
        "BPF_MAP_TYPE_SOCKHASH in a BPF_MAP_TYPE_HASH_OF_MAPS",
        "steer mode's per-namespace steering maps",
        MapProbe::HashOfMaps {
            inner: MAP_SOCKHASH,
            key: 20,
            value: 8,
        },
        Release(5, 10),
        &[LOAD, NET_ADMIN],
    ),
];

/// The oldest Linux release that has everything freebind uses.
pub fn oldest_release() -> Release {
    REQUIREMENTS
        .iter()
        .map(|r| r.since)
        .max()
        .expect("REQUIREMENTS is not empty")
}

impl Requirement {
    /// Its row in `check`: `cgroup/bind4`, `bpf_set_retval in cgroup/bind4`,
    /// `BPF_MAP_TYPE_LPM_TRIE`.
    pub fn name(&self) -> String {
        match self.probe {
            Probe::Program(hook) => hook.section.to_string(),
            Probe::Helper(hook, helper, _) => format!("{helper} in {}", hook.section),
            _ => self.name.to_string(),
        }
    }

    /// What `check` says of it besides its name.
    pub fn detail(&self) -> String {
        let about = match self.probe {
            Probe::Program(hook) => format!("{}, {}", hook.prog_type_name, hook.attach_type_name),
            _ => self.about.to_string(),
        };
        if about.is_empty() {
            format!("Linux {}", self.since)
        } else {
            format!("{about}; Linux {}", self.since)
        }
    }

    /// What a kernel needs to have it.
    pub fn remedy(&self) -> String {
        match self.remedy {
            Some(r) => format!("{r}, Linux {} or later", self.since),
            None => format!("Linux {} or later", self.since),
        }
    }

    /// The refusal to start when this kernel lacks it: one line naming it.
    pub fn missing(&self) -> String {
        let remedy = self.remedy();
        match self.probe {
            Probe::Btf => format!(
                "this kernel exposes no BTF at {VMLINUX_BTF} (iter/udp attaches by BTF id; \
                 needs {remedy})"
            ),
            Probe::NetnsCookie => format!("this kernel lacks SO_NETNS_COOKIE ({remedy})"),
            Probe::Program(hook) => format!(
                "this kernel lacks the {} program type ({remedy})",
                hook.full_name()
            ),
            Probe::Helper(hook, helper, _) => format!(
                "this kernel does not allow {helper} in {} programs (needs {remedy})",
                hook.full_name()
            ),
            Probe::Map(MapProbe::HashOfMaps {
                inner: MAP_SOCKHASH,
                ..
            }) => format!(
                "this kernel does not take a BPF_MAP_TYPE_SOCKHASH inside a \
                 BPF_MAP_TYPE_HASH_OF_MAPS (steer mode needs it; {remedy})"
            ),
            Probe::Map(_) => format!("this kernel lacks {} maps ({remedy})", self.name),
        }
    }

    /// The privileges probing it takes that `caps` lacks: it cannot be probed without them.
    pub fn unprobeable(&self, caps: Caps) -> Vec<Privilege> {
        self.needs
            .iter()
            .filter(|p| !caps.has(p))
            .copied()
            .collect()
    }

    /// Whether this kernel has it.
    pub fn probe(&self) -> Result<bool> {
        Ok(match self.probe {
            Probe::Btf => std::path::Path::new(VMLINUX_BTF).exists(),
            Probe::NetnsCookie => probe_netns_cookie()?,
            Probe::Program(hook) => probe_program(hook, None)?,
            Probe::Helper(hook, _, id) => probe_program(hook, Some(id))?,
            Probe::Map(m) => probe_map(m),
        })
    }
}

/// What a requirement is for, which says what the agent does without it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// What every attachment loads: the cgroup programs (the object's cgroup programs load
    /// as one set, the bind hooks hold both modes' code), their helpers, the maps the
    /// object creates. Without one the agent does not start.
    Both,
    /// Native mode: the setsockopt hook and what it calls. Without it the agent does not
    /// start either.
    Native,
    /// Steer mode: the sk_lookup program that delivers traffic for an intended address to
    /// its parked socket. Without it nothing is parked: binds that steer mode would take
    /// fail with EADDRNOTAVAIL, as they do without freebind.
    Steer,
    /// Steer mode for UDP: the UDP socket iterator that enters parked UDP sockets in the
    /// steering map (it attaches by BTF id, so it needs the kernel's BTF too). Without it,
    /// UDP binds that steer mode would take are left to the kernel; TCP is still steered.
    SteerUdp,
}

impl Mode {
    /// Whether this mode cannot work when a requirement of mode `of` is missing.
    pub fn needs(self, of: Mode) -> bool {
        match self {
            Mode::Both => of == Mode::Both,
            Mode::Native => matches!(of, Mode::Both | Mode::Native),
            Mode::Steer => matches!(of, Mode::Both | Mode::Steer),
            Mode::SteerUdp => matches!(of, Mode::Both | Mode::Steer | Mode::SteerUdp),
        }
    }
}

impl Requirement {
    /// What it is for (see [`Mode`]).
    pub fn mode(&self) -> Mode {
        let hook = match self.probe {
            Probe::Btf => return Mode::SteerUdp,
            Probe::Program(hook) | Probe::Helper(hook, ..) => hook,
            Probe::NetnsCookie | Probe::Map(_) => return Mode::Both,
        };
        match hook.section {
            "cgroup/setsockopt" => Mode::Native,
            "sk_lookup" => Mode::Steer,
            "iter/udp" => Mode::SteerUdp,
            _ => Mode::Both,
        }
    }
}

/// What the agent does on this kernel: native mode always (it does not start without
/// it), steering where the kernel has what it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Modes {
    /// sk_lookup steering, and so parking at all.
    pub steer: bool,
    /// Parked UDP sockets entered for steering (implies `steer`).
    pub steer_udp: bool,
}

impl Modes {
    /// Everything: what the agent assumes where it has not probed (`status`, unit tests).
    pub const ALL: Modes = Modes {
        steer: true,
        steer_udp: true,
    };

    /// Whether sockets of `protocol` (`IPPROTO_TCP`/`IPPROTO_UDP`) may be parked.
    pub fn steers(&self, protocol: u8) -> bool {
        if protocol == freebind_common::IPPROTO_UDP {
            self.steer_udp
        } else {
            self.steer
        }
    }
}

/// Set once by [`check_features`] at start.
static MODES: std::sync::OnceLock<Modes> = std::sync::OnceLock::new();

/// What this kernel lets the agent do, as [`check_features`] found it.
pub fn modes() -> Modes {
    MODES.get().copied().unwrap_or(Modes::ALL)
}

/// What this kernel has of what freebind uses: the requirements it lacks.
#[derive(Debug, Default)]
pub struct Features {
    pub missing: Vec<&'static Requirement>,
}

impl Features {
    /// Probes every requirement (it takes the privileges [`PRIVILEGES`] lists).
    pub fn probe() -> Result<Self> {
        let mut missing = Vec::new();
        for r in REQUIREMENTS {
            let present = match r.probe() {
                Ok(present) => present,
                // A probe that cannot run (the iterator's BTF id cannot be read without
                // the kernel's BTF) fails what it probes, and the agent can go on without
                // a steering piece; without anything else it cannot.
                Err(e) if !Mode::Native.needs(r.mode()) => {
                    log::debug!("probing {}: {e:#}", r.name());
                    false
                }
                Err(e) => return Err(e),
            };
            if !present {
                missing.push(r);
            }
        }
        Ok(Self { missing })
    }

    /// Whether `mode` can work here: nothing it needs is missing.
    pub fn has(&self, mode: Mode) -> bool {
        self.missing.iter().all(|r| !mode.needs(r.mode()))
    }

    /// What the agent does here.
    pub fn modes(&self) -> Modes {
        Modes {
            steer: self.has(Mode::Steer),
            steer_udp: self.has(Mode::SteerUdp),
        }
    }

    /// The missing requirements that `mode` needs, by name.
    fn missing_for(&self, mode: Mode) -> String {
        self.missing
            .iter()
            .filter(|r| mode.needs(r.mode()))
            .map(|r| r.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// One line for the agent's log and `check`: which modes this kernel allows, and why
    /// not the others.
    pub fn summary(&self, release: &str) -> String {
        if !self.has(Mode::Native) {
            return format!(
                "kernel {release}: freebind cannot run here; missing {}",
                self.missing_for(Mode::Native)
            );
        }
        match (self.has(Mode::Steer), self.has(Mode::SteerUdp)) {
            (true, true) => format!(
                "kernel {release}: every program type, helper and map freebind uses is here \
                 ({} probed): native and steer mode",
                REQUIREMENTS.len()
            ),
            (true, false) => format!(
                "kernel {release}: native mode, and steer mode for TCP only; steering UDP \
                 needs {}: UDP binds that steer mode would take fail with EADDRNOTAVAIL, as \
                 without freebind",
                self.missing_for(Mode::SteerUdp)
            ),
            (false, _) => format!(
                "kernel {release}: native mode only; steer mode needs {}: binds that steer \
                 mode would take fail with EADDRNOTAVAIL, as without freebind",
                self.missing_for(Mode::Steer)
            ),
        }
    }
}

/// Checks every program type, helper and map type freebind loads, and says in one line
/// what this kernel allows. Refuses to go on without what every attachment loads or
/// native mode needs, naming the first missing piece; without what steering needs it goes
/// on with less, saying so, and [`modes`] tells the rest of the agent.
pub fn check_features() -> Result<Features> {
    let features = Features::probe()?;
    let release = running_release().unwrap_or_else(|_| "?".to_string());
    let summary = features.summary(&release);
    if let Some(first) = features
        .missing
        .iter()
        .find(|r| Mode::Native.needs(r.mode()))
    {
        bail!("{}; {summary}", first.missing());
    }
    if features.missing.is_empty() {
        // Debug only: with nothing missing there is no degradation to report, and a
        // refusal for another reason must stay one line on stderr.
        log::debug!("{summary}");
    } else {
        log::warn!("{summary}");
    }
    let _ = MODES.set(features.modes());
    Ok(features)
}

#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
    prog_btf_fd: u32,
    func_info_rec_size: u32,
    func_info: u64,
    func_info_cnt: u32,
    line_info_rec_size: u32,
    line_info: u64,
    line_info_cnt: u32,
    attach_btf_id: u32,
}

#[repr(C)]
#[derive(Default)]
struct MapCreateAttr {
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner_map_fd: u32,
    numa_node: u32,
    map_name: [u8; 16],
    map_ifindex: u32,
    btf_fd: u32,
    btf_key_type_id: u32,
    btf_value_type_id: u32,
}

/// BPF_MAP_LOOKUP_ELEM: the value of `key` in `map`, written into `value`. For an
/// sk_storage map the key is a socket descriptor of this process.
pub fn map_lookup<K, V>(map: BorrowedFd<'_>, key: &K, value: &mut V) -> io::Result<()> {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    #[repr(C)]
    struct LookupAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = LookupAttr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: (key as *const K) as u64,
        value: (value as *mut V) as u64,
        flags: 0,
    };
    bpf(
        BPF_MAP_LOOKUP_ELEM,
        (&attr as *const LookupAttr).cast(),
        mem::size_of::<LookupAttr>(),
    )
    .map(drop)
}

/// [`bpf`] for the commands that return a new descriptor (a map, a program, a link),
/// owned at once so that every path closes it.
fn bpf_new_fd<A>(cmd: libc::c_long, attr: &A) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, (attr as *const A).cast(), mem::size_of::<A>())?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn bpf(cmd: libc::c_long, attr: *const u8, size: usize) -> io::Result<RawFd> {
    // SAFETY: attr points to a live, correctly sized bpf_attr prefix.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size as u32) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc as RawFd)
    }
}

/// The vmlinux BTF id of function `name`; None when this kernel has no such function.
/// Megabytes of BTF are parsed once per process, however many probes ask.
fn vmlinux_func_id(name: &str) -> Result<Option<u32>> {
    static VMLINUX: OnceLock<std::result::Result<aya::Btf, String>> = OnceLock::new();
    let btf = VMLINUX
        .get_or_init(|| aya::Btf::from_sys_fs().map_err(|e| format!("{e:#}")))
        .as_ref()
        .map_err(|e| anyhow!("reading {VMLINUX_BTF}: {e}"))?;
    // aya 0.14 re-exports Btf but not BtfKind, which converts from its number.
    const BTF_KIND_FUNC: u32 = 12;
    match btf.id_by_type_name_kind(name, BTF_KIND_FUNC.try_into()?) {
        Ok(id) => Ok(Some(id)),
        Err(aya::BtfError::UnknownBtfTypeName { .. }) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("looking up {name} in {VMLINUX_BTF}")),
    }
}

/// Loads `r0 = 1; exit` (or `call helper; r0 = 1; exit`) for the hook. The same strategy as
/// libbpf: a verifier message about the helper's id means it is unknown there; any other
/// verifier complaint (the probe passes no valid arguments) means it is known.
fn probe_program(hook: Hook, helper: Option<i32>) -> Result<bool> {
    let attach_btf_id = match hook.btf_func {
        Some(func) => match vmlinux_func_id(func)
            .with_context(|| format!("{} attaches by BTF id", hook.section))?
        {
            Some(id) => id,
            // The kernel has no such attach point, so no such program.
            None => return Ok(false),
        },
        None => 0,
    };
    // BPF_JMP|BPF_CALL = 0x85, BPF_ALU64|BPF_MOV|BPF_K = 0xb7 (dst r0), BPF_JMP|BPF_EXIT = 0x95.
    let mut insns: Vec<u64> = Vec::new();
    if let Some(id) = helper {
        insns.push(0x85 | (u64::from(id as u32) << 32));
    }
    insns.push(0xb7 | (1u64 << 32));
    insns.push(0x95);
    let mut log = vec![0u8; 4096];
    let attr = ProgLoadAttr {
        prog_type: hook.prog_type,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        expected_attach_type: hook.attach_type,
        attach_btf_id,
        ..Default::default()
    };
    match bpf_new_fd(BPF_PROG_LOAD, &attr) {
        Ok(_) => Ok(true),
        Err(e) => {
            let text = String::from_utf8_lossy(&log);
            if helper.is_some()
                && ["invalid func ", "unknown func ", "cannot use helper "]
                    .iter()
                    .any(|m| text.contains(m))
            {
                return Ok(false);
            }
            match e.raw_os_error() {
                Some(libc::EINVAL | libc::E2BIG) if text.trim_matches('\0').is_empty() => Ok(false),
                Some(libc::EPERM) => Err(e).context(
                    "probing the kernel's BPF support (bpf() refused: missing privileges?)",
                ),
                _ if helper.is_some() => Ok(true),
                _ => Err(e).with_context(|| format!("probing {}", hook.full_name())),
            }
        }
    }
}

fn probe_map(m: MapProbe) -> bool {
    match m {
        MapProbe::Plain {
            map_type,
            key,
            value,
            flags,
        } => exists(create_map(map_type, key, value, 1, flags, None)),
        MapProbe::RingBuf => {
            // SAFETY: sysconf has no preconditions.
            let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
            exists(create_map(MAP_RINGBUF, 0, 0, page, 0, None))
        }
        MapProbe::SkStorage => probe_sk_storage(),
        MapProbe::HashOfMaps { inner, key, value } => {
            let Ok(inner) = create_map(inner, key, value, 1, 0, None) else {
                return false;
            };
            exists(create_map(
                MAP_HASH_OF_MAPS,
                8,
                4,
                1,
                0,
                Some(inner.as_fd()),
            ))
        }
    }
}

/// An sk_storage map needs BTF for its value, checked only once the map type is known:
/// given a descriptor that is no BTF object, a kernel that has the type fails with EBADF,
/// one that lacks it with EINVAL (aya's probe, after libbpf's).
fn probe_sk_storage() -> bool {
    let attr = MapCreateAttr {
        map_type: MAP_SK_STORAGE,
        key_size: 4,
        value_size: 1,
        map_flags: BPF_F_NO_PREALLOC,
        btf_fd: u32::MAX,
        btf_key_type_id: 1,
        btf_value_type_id: 1,
        ..Default::default()
    };
    match bpf_new_fd(BPF_MAP_CREATE, &attr) {
        Ok(_) => true,
        Err(e) => !matches!(e.raw_os_error(), Some(libc::EINVAL | libc::E2BIG)),
    }
}

/// A map type exists when creating one works, or fails for another reason than EINVAL
/// (ENOMEM, EPERM under a memlock limit).
fn exists(created: io::Result<OwnedFd>) -> bool {
    match created {
        Ok(_) => true,
        Err(e) => e.raw_os_error() != Some(libc::EINVAL),
    }
}

fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
    inner: Option<BorrowedFd<'_>>,
) -> io::Result<OwnedFd> {
    let attr = MapCreateAttr {
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        inner_map_fd: inner.map_or(0, |fd| fd.as_raw_fd() as u32),
        ..Default::default()
    };
    bpf_new_fd(BPF_MAP_CREATE, &attr)
}

/// Whether getsockopt(SO_NETNS_COOKIE) works here: on any socket, so a Unix one, which
/// needs no network stack.
fn probe_netns_cookie() -> Result<bool> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error()).context("socket(AF_UNIX)");
    }
    // SAFETY: a descriptor just returned to us.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    match so_netns_cookie(sock.as_raw_fd()) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => Ok(false),
        Err(e) => Err(e).context("getsockopt(SO_NETNS_COOKIE)"),
    }
}

fn so_netns_cookie(fd: RawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let mut cookie: u64 = 0;
    let mut len = mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: getsockopt into a u64 of the stated size.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// How many sk_lookup programs are attached to the network namespace `netns`
/// (BPF_PROG_QUERY).
pub fn sk_lookup_programs(netns: BorrowedFd<'_>) -> io::Result<u32> {
    Ok(attached_programs(netns, ATTACH_SK_LOOKUP)?.len() as u32)
}

/// The ids of the programs attached to `target` (a cgroup or network namespace directory
/// fd) for `attach_type`, in the order they run: links and BPF_PROG_ATTACH alike, whoever
/// attached them (BPF_PROG_QUERY, Linux 4.15).
pub fn attached_programs(target: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    const BPF_PROG_QUERY: libc::c_long = 16;
    #[repr(C)]
    #[derive(Default)]
    struct QueryAttr {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    // 64 is the kernel's own limit of programs per cgroup and attach type.
    let mut ids = vec![0u32; 64];
    let mut attr = QueryAttr {
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        prog_ids: ids.as_mut_ptr() as u64,
        prog_cnt: ids.len() as u32,
        ..Default::default()
    };
    // The kernel writes the count back into the attribute.
    let p = &mut attr as *mut QueryAttr;
    bpf(
        BPF_PROG_QUERY,
        p.cast_const().cast(),
        mem::size_of::<QueryAttr>(),
    )?;
    // SAFETY: `p` points to `attr`, alive and written by the kernel.
    let n = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*p).prog_cnt)) };
    ids.truncate(n as usize);
    Ok(ids)
}

#[repr(C)]
#[derive(Default)]
struct ProgAttachAttr {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Attaches `prog` to the cgroup `cgroup` the way systemd's `BPFProgram=` does:
/// BPF_PROG_ATTACH with BPF_F_ALLOW_MULTI, which holds no file descriptor, so the program
/// stays until the cgroup is removed or [`prog_detach`] takes it off.
pub fn prog_attach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    const BPF_PROG_ATTACH: libc::c_long = 8;
    const BPF_F_ALLOW_MULTI: u32 = 2;
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        attach_flags: BPF_F_ALLOW_MULTI,
        ..Default::default()
    };
    bpf(
        BPF_PROG_ATTACH,
        (&attr as *const ProgAttachAttr).cast(),
        mem::size_of::<ProgAttachAttr>(),
    )
    .map(drop)
}

/// Takes off `prog` where BPF_PROG_ATTACH put it (not a link: links go when their last
/// reference, a pin or a descriptor, does).
pub fn prog_detach(
    cgroup: BorrowedFd<'_>,
    prog: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<()> {
    const BPF_PROG_DETACH: libc::c_long = 9;
    let attr = ProgAttachAttr {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf(
        BPF_PROG_DETACH,
        (&attr as *const ProgAttachAttr).cast(),
        mem::size_of::<ProgAttachAttr>(),
    )
    .map(drop)
}

/// Opens a pinned object (BPF_OBJ_GET): a program, map or link.
pub fn obj_get(path: &std::path::Path) -> Result<OwnedFd> {
    const BPF_OBJ_GET: libc::c_long = 7;
    let fd = obj_call(BPF_OBJ_GET, path, 0)
        .with_context(|| format!("opening pinned {}", path.display()))?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Pins a program, map or link at `path` on bpffs (BPF_OBJ_PIN).
pub fn obj_pin(fd: BorrowedFd<'_>, path: &std::path::Path) -> Result<()> {
    const BPF_OBJ_PIN: libc::c_long = 6;
    obj_call(BPF_OBJ_PIN, path, fd.as_raw_fd() as u32)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(())
}

/// BPF_OBJ_GET and BPF_OBJ_PIN share their attribute: a path and (to pin) a descriptor.
fn obj_call(cmd: libc::c_long, path: &std::path::Path, fd: u32) -> Result<RawFd> {
    #[repr(C)]
    struct ObjAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let c = std::ffi::CString::new(std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()))?;
    let attr = ObjAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: fd,
        file_flags: 0,
    };
    Ok(bpf(
        cmd,
        (&attr as *const ObjAttr).cast(),
        mem::size_of::<ObjAttr>(),
    )?)
}

/// Attaches `prog` to the cgroup through a BPF link (BPF_LINK_CREATE, Linux 5.7): links are
/// always multi-attach, and the program stays attached as long as the link has a reference
/// (a descriptor or a pin).
pub fn link_create(
    prog: BorrowedFd<'_>,
    cgroup: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    #[repr(C)]
    #[derive(Default)]
    struct LinkAttr {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 4],
    }
    let attr = LinkAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: cgroup.as_raw_fd() as u32,
        attach_type,
        ..Default::default()
    };
    bpf_new_fd(BPF_LINK_CREATE, &attr)
}

/// What the kernel says of a link: its program, and the cgroup id or network namespace
/// inode it is attached to (0 once that is gone: the link is then defunct).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTarget {
    pub prog_id: u32,
    pub cgroup_id: u64,
    pub netns_ino: u32,
}

/// BPF_OBJ_GET_INFO_BY_FD on a link (Linux 5.8); aya 0.14 exposes only the program id.
pub fn link_target(link: BorrowedFd<'_>) -> io::Result<LinkTarget> {
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    const LINK_TYPE_CGROUP: u32 = 3;
    const LINK_TYPE_NETNS: u32 = 5;
    #[repr(C)]
    struct InfoAttr {
        bpf_fd: u32,
        info_len: u32,
        info: u64,
    }
    // struct bpf_link_info: type, id, prog_id, then a union aligned to 8 bytes whose
    // cgroup member starts with the u64 cgroup_id and whose netns member with the u32 inode.
    let mut info = [0u64; 8];
    let attr = InfoAttr {
        bpf_fd: link.as_raw_fd() as u32,
        info_len: mem::size_of_val(&info) as u32,
        info: info.as_mut_ptr() as u64,
    };
    bpf(
        BPF_OBJ_GET_INFO_BY_FD,
        (&attr as *const InfoAttr).cast(),
        mem::size_of::<InfoAttr>(),
    )?;
    // SAFETY: the kernel wrote up to 64 bytes into `info` behind the pointer it was given.
    let info = unsafe { std::ptr::read_volatile(&info) };
    let link_type = info[0] as u32;
    let prog_id = (info[1] & 0xffff_ffff) as u32;
    Ok(LinkTarget {
        prog_id,
        cgroup_id: if link_type == LINK_TYPE_CGROUP {
            info[2]
        } else {
            0
        },
        netns_ino: if link_type == LINK_TYPE_NETNS {
            (info[2] & 0xffff_ffff) as u32
        } else {
            0
        },
    })
}

/// The cookie of the network namespace `fd` lives in (`SO_NETNS_COOKIE`, Linux 5.14); the
/// bind hooks key locality with `bpf_get_netns_cookie()`, which returns the same value.
pub fn netns_cookie(fd: RawFd) -> Result<u64> {
    match so_netns_cookie(fd) {
        Ok(cookie) => Ok(cookie),
        Err(e) if e.raw_os_error() == Some(libc::ENOPROTOOPT) => {
            bail!("{}", NETNS_COOKIE.missing())
        }
        Err(e) => Err(e).context("getsockopt(SO_NETNS_COOKIE)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lacking(names: &[&str]) -> Features {
        Features {
            missing: names
                .iter()
                .map(|n| {
                    REQUIREMENTS
                        .iter()
                        .find(|r| r.name() == *n)
                        .unwrap_or_else(|| panic!("no requirement {n}"))
                })
                .collect(),
        }
    }

    #[test]
    fn what_a_kernel_lacks_decides_what_the_agent_does_there() {
        let all = lacking(&[]);
        assert_eq!(all.modes(), Modes::ALL);
        assert!(all.summary("6.1").ends_with("native and steer mode"));

        let no_btf = lacking(&["BTF", "iter/udp"]);
        assert!(no_btf.has(Mode::Native) && no_btf.has(Mode::Steer));
        assert_eq!(
            no_btf.modes(),
            Modes {
                steer: true,
                steer_udp: false
            }
        );
        assert!(no_btf
            .summary("x")
            .contains("steer mode for TCP only; steering UDP needs BTF, iter/udp:"));

        let no_lookup = lacking(&["sk_lookup"]);
        assert_eq!(
            no_lookup.modes(),
            Modes {
                steer: false,
                steer_udp: false
            }
        );
        assert!(no_lookup
            .summary("x")
            .contains("native mode only; steer mode needs sk_lookup:"));

        // What every attachment loads, or native mode, cannot be done without.
        for name in [
            "cgroup/getsockname4",
            "cgroup/setsockopt",
            "BPF_MAP_TYPE_RINGBUF",
        ] {
            let f = lacking(&[name]);
            assert!(!f.has(Mode::Native), "{name}");
            assert!(
                f.summary("x").contains("freebind cannot run here"),
                "{name}"
            );
        }
        assert!(Modes {
            steer: true,
            steer_udp: false
        }
        .steers(freebind_common::IPPROTO_TCP));
        assert!(!Modes {
            steer: true,
            steer_udp: false
        }
        .steers(freebind_common::IPPROTO_UDP));
    }

    #[test]
    fn releases_are_read_from_uname_strings() {
        assert_eq!(Release::parse("6.18.44-fc-v669"), Some(Release(6, 18)));
        assert_eq!(Release::parse("5.4.0-150-generic"), Some(Release(5, 4)));
        assert_eq!(Release::parse("4.19"), Some(Release(4, 19)));
        assert_eq!(Release::parse("6"), None);
        assert_eq!(Release::parse("linux"), None);
        assert!(Release(5, 18) > Release(5, 4));
        assert_eq!(Release(5, 18).to_string(), "5.18");
    }

    #[test]
    fn the_oldest_release_is_the_newest_requirement() {
        let oldest = oldest_release();
        assert!(REQUIREMENTS.iter().all(|r| r.since <= oldest));
        assert!(REQUIREMENTS.iter().any(|r| r.since == oldest));
    }

    #[test]
    fn capabilities_are_read_from_proc_status() {
        let root = Caps::from_status("Name:\tx\nCapEff:\t000001ffffffffff\n");
        assert!(PRIVILEGES.iter().all(|p| root.has(p)));
        let none = Caps::from_status("CapEff:\t0000000000000000\n");
        assert!(PRIVILEGES.iter().all(|p| !none.has(p)));
        // CAP_SYS_ADMIN alone stands for CAP_BPF and CAP_PERFMON.
        let sys_admin = Caps::from_status("CapEff:\t0000000000200000\n");
        assert!(sys_admin.has(&LOAD) && sys_admin.has(&PERFMON) && !sys_admin.has(&NET_ADMIN));
        assert_eq!(
            program(BIND4)
                .unprobeable(sys_admin)
                .iter()
                .map(|p| p.name)
                .collect::<Vec<_>>(),
            ["CAP_NET_ADMIN"]
        );
        assert!(NETNS_COOKIE.unprobeable(none).is_empty());
    }

    #[test]
    fn a_missing_requirement_is_named_in_one_line() {
        let names: Vec<String> = REQUIREMENTS.iter().map(Requirement::name).collect();
        for r in REQUIREMENTS {
            let line = r.missing();
            assert!(!line.contains('\n'), "{line}");
            assert!(
                line.contains(&format!("Linux {} or later", r.since)),
                "{line}"
            );
            let name = r.name();
            assert_eq!(
                names.iter().filter(|n| **n == name).count(),
                1,
                "{name} twice"
            );
        }
        assert_eq!(
            helper(BIND4, "bpf_set_retval", 187, Release(5, 18)).missing(),
            "this kernel does not allow bpf_set_retval in cgroup/bind4 \
             (BPF_PROG_TYPE_CGROUP_SOCK_ADDR) programs (needs Linux 5.18 or later)"
        );
        assert_eq!(
            NETNS_COOKIE.missing(),
            "this kernel lacks SO_NETNS_COOKIE (Linux 5.14 or later)"
        );
    }
}
