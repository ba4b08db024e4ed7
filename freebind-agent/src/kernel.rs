//! What the agent needs from the running kernel and process, checked before anything is
//! changed, so that a missing piece is named instead of surfacing as a verifier error.
use std::{
    fs, io, mem,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd, RawFd},
};

use anyhow::{bail, Context as _, Result};

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Refuses to go on without the capabilities that loading and attaching cgroup programs
/// take: CAP_BPF + CAP_PERFMON (or CAP_SYS_ADMIN, which kernels before 5.8 require) and
/// CAP_NET_ADMIN.
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_SYS_ADMIN) && !has(CAP_BPF) {
        missing.push("CAP_BPF (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_SYS_ADMIN) && !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON (or CAP_SYS_ADMIN)");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
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
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_CREATE: libc::c_long = 0;
const PROG_CGROUP_SOCK_ADDR: u32 = 18;
const PROG_CGROUP_SOCKOPT: u32 = 25;
const PROG_SOCK_OPS: u32 = 13;
const PROG_SK_LOOKUP: u32 = 30;
const ATTACH_SOCK_OPS: u32 = 3;
const ATTACH_INET4_BIND: u32 = 8;
const ATTACH_INET4_CONNECT: u32 = 10;
const ATTACH_UDP4_SENDMSG: u32 = 14;
const ATTACH_UDP6_SENDMSG: u32 = 15;
const ATTACH_SETSOCKOPT: u32 = 22;
const ATTACH_INET4_GETSOCKNAME: u32 = 31;
const ATTACH_SK_LOOKUP: u32 = 36;
const MAP_HASH_OF_MAPS: u32 = 13;
const MAP_SOCKHASH: u32 = 18;
const MAP_LPM_TRIE: u32 = 11;
const MAP_RINGBUF: u32 = 27;

/// A `BPF_PROG_TYPE_CGROUP_SOCK_ADDR` hook.
const fn sock_addr(section: &'static str, attach_type: u32, since: &'static str) -> Hook {
    Hook {
        name: section,
        prog_type: PROG_CGROUP_SOCK_ADDR,
        attach_type,
        since,
    }
}

/// A program type with the attach type freebind uses it with.
#[derive(Clone, Copy)]
struct Hook {
    name: &'static str,
    prog_type: u32,
    attach_type: u32,
    since: &'static str,
}

const BIND4: Hook = sock_addr(
    "cgroup/bind4 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
    ATTACH_INET4_BIND,
    "4.17",
);
const SENDMSG6: Hook = sock_addr(
    "cgroup/sendmsg6 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
    ATTACH_UDP6_SENDMSG,
    "4.18",
);
const SETSOCKOPT: Hook = Hook {
    name: "cgroup/setsockopt (BPF_PROG_TYPE_CGROUP_SOCKOPT)",
    prog_type: PROG_CGROUP_SOCKOPT,
    attach_type: ATTACH_SETSOCKOPT,
    since: "5.3",
};
const SENDMSG4: Hook = sock_addr(
    "cgroup/sendmsg4 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
    ATTACH_UDP4_SENDMSG,
    "4.18",
);
const CONNECT4: Hook = sock_addr(
    "cgroup/connect4 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
    ATTACH_INET4_CONNECT,
    "4.17",
);
const GETSOCKNAME4: Hook = sock_addr(
    "cgroup/getsockname4 (BPF_PROG_TYPE_CGROUP_SOCK_ADDR)",
    ATTACH_INET4_GETSOCKNAME,
    "5.8",
);
const SOCK_OPS: Hook = Hook {
    name: "sockops (BPF_PROG_TYPE_SOCK_OPS)",
    prog_type: PROG_SOCK_OPS,
    attach_type: ATTACH_SOCK_OPS,
    since: "4.13",
};
const SK_LOOKUP: Hook = Hook {
    name: "sk_lookup (BPF_PROG_TYPE_SK_LOOKUP)",
    prog_type: PROG_SK_LOOKUP,
    attach_type: ATTACH_SK_LOOKUP,
    since: "5.9",
};

/// (hook, helper name, helper id, the Linux release that brought it there when known)
const HELPERS: &[(Hook, &str, i32, &str)] = &[
    (SETSOCKOPT, "bpf_setsockopt", 49, "a newer kernel"),
    (SETSOCKOPT, "bpf_sk_storage_get", 107, "a newer kernel"),
    (SETSOCKOPT, "bpf_get_netns_cookie", 122, "a newer kernel"),
    (SENDMSG6, "bpf_sk_storage_get", 107, "a newer kernel"),
    (BIND4, "bpf_sk_storage_get", 107, "a newer kernel"),
    (BIND4, "bpf_get_netns_cookie", 122, "Linux 5.7 or later"),
    (BIND4, "bpf_set_retval", 187, "Linux 5.18 or later"),
    (BIND4, "bpf_ringbuf_reserve", 131, "Linux 5.8 or later"),
    (BIND4, "bpf_get_current_comm", 16, "a newer kernel"),
    (BIND4, "bpf_get_current_cgroup_id", 80, "a newer kernel"),
    (BIND4, "bpf_sk_lookup_tcp", 84, "Linux 5.2 or later"),
    (BIND4, "bpf_sk_lookup_udp", 85, "Linux 5.2 or later"),
    (SENDMSG4, "bpf_sk_storage_get", 107, "a newer kernel"),
    (CONNECT4, "bpf_sk_storage_get", 107, "a newer kernel"),
    (GETSOCKNAME4, "bpf_sk_storage_get", 107, "a newer kernel"),
    (SOCK_OPS, "bpf_sk_storage_get", 107, "Linux 5.11 or later"),
    (SOCK_OPS, "bpf_sock_hash_update", 70, "a newer kernel"),
    (SK_LOOKUP, "bpf_sk_assign", 124, "Linux 5.9 or later"),
    (SK_LOOKUP, "bpf_sk_release", 86, "Linux 5.9 or later"),
];

/// (map type name, type, key size, value size, max entries, flags, Linux release)
const MAPS: &[(&str, u32, u32, u32, u32, u32, &str)] = &[
    // LPM tries must be BPF_F_NO_PREALLOC (1).
    ("BPF_MAP_TYPE_LPM_TRIE", MAP_LPM_TRIE, 8, 1, 1, 1, "4.11"),
    ("BPF_MAP_TYPE_SOCKHASH", MAP_SOCKHASH, 20, 8, 1, 0, "4.18"),
];

/// Checks every program type, helper and map type freebind loads, naming the first one
/// this kernel lacks.
pub fn check_features() -> Result<()> {
    for hook in [
        BIND4,
        SENDMSG6,
        SETSOCKOPT,
        SENDMSG4,
        CONNECT4,
        GETSOCKNAME4,
        SOCK_OPS,
        SK_LOOKUP,
    ] {
        if !probe_program(hook, None)? {
            bail!(
                "this kernel lacks the {} program type (Linux {} or later)",
                hook.name,
                hook.since
            );
        }
    }
    for &(hook, helper, id, since) in HELPERS {
        if !probe_program(hook, Some(id))? {
            bail!(
                "this kernel does not allow {helper} in {} programs (needs {since})",
                hook.name
            );
        }
    }
    for &(name, ty, key, value, max, flags, since) in MAPS {
        if !probe_map(ty, key, value, max, flags) {
            bail!("this kernel lacks {name} maps (Linux {since} or later)");
        }
    }
    // A ring buffer's size must be a power-of-two multiple of the page size.
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    if !probe_map(MAP_RINGBUF, 0, 0, page, 0) {
        bail!("this kernel lacks BPF_MAP_TYPE_RINGBUF maps (Linux 5.8 or later)");
    }
    if !probe_sockhash_in_hash_of_maps() {
        bail!("this kernel does not take a BPF_MAP_TYPE_SOCKHASH inside a BPF_MAP_TYPE_HASH_OF_MAPS (steer mode needs it; Linux 5.10 or later)");
    }
    Ok(())
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

/// Loads `r0 = 1; exit` (or `call helper; r0 = 1; exit`) for the hook. The same strategy as
/// libbpf: a verifier message about the helper's id means it is unknown there; any other
/// verifier complaint (the probe passes no valid arguments) means it is known.
fn probe_program(hook: Hook, helper: Option<i32>) -> Result<bool> {
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
        ..Default::default()
    };
    match bpf(
        BPF_PROG_LOAD,
        (&attr as *const ProgLoadAttr).cast(),
        mem::size_of::<ProgLoadAttr>(),
    ) {
        Ok(fd) => {
            // SAFETY: we own the fd just returned.
            unsafe { libc::close(fd) };
            Ok(true)
        }
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
                _ => Err(e).with_context(|| format!("probing {}", hook.name)),
            }
        }
    }
}

fn probe_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    max_entries: u32,
    map_flags: u32,
) -> bool {
    exists(create_map(
        map_type,
        key_size,
        value_size,
        max_entries,
        map_flags,
        None,
    ))
}

/// Steer mode reaches each namespace's SOCKHASH through a hash of maps: the kernel must
/// take a SOCKHASH as an inner map.
fn probe_sockhash_in_hash_of_maps() -> bool {
    let Ok(inner) = create_map(MAP_SOCKHASH, 20, 8, 1, 0, None) else {
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
    };
    let fd = bpf(
        BPF_MAP_CREATE,
        (&attr as *const MapCreateAttr).cast(),
        mem::size_of::<MapCreateAttr>(),
    )?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
    let fd = bpf(
        BPF_LINK_CREATE,
        (&attr as *const LinkAttr).cast(),
        mem::size_of::<LinkAttr>(),
    )?;
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOPROTOOPT) {
            bail!("this kernel lacks SO_NETNS_COOKIE (Linux 5.14 or later)");
        }
        return Err(e).context("getsockopt(SO_NETNS_COOKIE)");
    }
    Ok(cookie)
}
