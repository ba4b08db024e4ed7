//! Loading the eBPF object and attaching its programs: the cgroup programs once per
//! attachment, the sk_lookup program once per served network namespace.
use std::{
    fs::File,
    io::Read as _,
    net::IpAddr,
    os::fd::{AsFd as _, OwnedFd},
    path::Path,
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{
        lpm_trie::Key, HashMap as AyaHashMap, HashOfMaps, LpmTrie, Map, MapData, PerCpuArray,
        RingBuf,
    },
    programs::{
        cgroup_sock_addr::CgroupSockAddrLinkId, cgroup_sockopt::CgroupSockoptLinkId, links::FdLink,
        sk_lookup::SkLookupLinkId, sock_ops::SockOpsLinkId, CgroupAttachMode, CgroupSockAddr,
        CgroupSockopt, Iter, SkLookup, SockOps,
    },
    util::KernelVersion,
    Btf, Ebpf, EbpfLoader,
};
use freebind_common::{maps, programs, LocalAddrKey};

use crate::{kernel, netns::Netns, policy::Policy};

/// The object `cargo xtask build-ebpf` produced, embedded by build.rs (empty when the
/// agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/freebind.bpf.o"));

/// An attachment's policy: the prefixes its programs let bind while not local.
pub struct AllowMaps {
    pub v4: LpmTrie<MapData, [u8; 4], u8>,
    pub v6: LpmTrie<MapData, [u8; 16], u8>,
}

impl AllowMaps {
    /// Makes the tries hold exactly `policy`: new prefixes first, then the old ones go, so
    /// a change never refuses, even for a moment, what both the old and new policy allow.
    pub fn set(&mut self, policy: &Policy) -> Result<()> {
        let want = policy.effective();
        for prefix in &want {
            let len = u32::from(prefix.len);
            match prefix.addr {
                IpAddr::V4(a) => self.v4.insert(&Key::new(len, a.octets()), 1, 0),
                IpAddr::V6(a) => self.v6.insert(&Key::new(len, a.octets()), 1, 0),
            }
            .with_context(|| format!("loading policy prefix {prefix}"))?;
        }
        let wanted = |addr: IpAddr, len: u32| {
            want.iter()
                .any(|p| p.addr == addr && u32::from(p.len) == len)
        };
        let old4: Vec<Key<[u8; 4]>> = self.v4.keys().filter_map(|k| k.ok()).collect();
        for k in old4 {
            if !wanted(IpAddr::from(k.data()), k.prefix_len()) {
                self.v4
                    .remove(&k)
                    .context("removing an IPv4 policy prefix")?;
            }
        }
        let old6: Vec<Key<[u8; 16]>> = self.v6.keys().filter_map(|k| k.ok()).collect();
        for k in old6 {
            if !wanted(IpAddr::from(k.data()), k.prefix_len()) {
                self.v6
                    .remove(&k)
                    .context("removing an IPv6 policy prefix")?;
            }
        }
        Ok(())
    }
}

/// Reader of the eBPF side's aya-log records.
pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The maps the agent drives, taken out of the loaded object.
pub struct Maps {
    pub local_addrs: AyaHashMap<MapData, LocalAddrKey, u8>,
    pub events: RingBuf<MapData>,
    pub events_dropped: PerCpuArray<MapData, u64>,
    pub served_netns: AyaHashMap<MapData, u64, u8>,
    pub steer_maps: HashOfMaps<MapData, u64, MapData>,
    /// `SOCK_STATE`, which `inet_diag` reads for the address events.
    pub sock_state: MapData,
}

/// A program attached to the cgroup, kept so that [`Attachment`]'s drop can detach in a
/// chosen order.
enum CgroupLink {
    SockAddr(&'static str, CgroupSockAddrLinkId),
    Sockopt(&'static str, CgroupSockoptLinkId),
    SockOps(&'static str, SockOpsLinkId),
}

/// A loaded copy of freebind's programs: one per attachment, so each carries its own
/// policy. Dropping it detaches every program it attached (the kernel also does so when
/// the agent dies: the links are file descriptors of this process).
pub struct Attachment {
    ebpf: Ebpf,
    logger: Option<Logger>,
    links: Vec<CgroupLink>,
    map_ids: MapIds,
}

/// Where a load's maps come from.
#[derive(Debug, Clone, Copy)]
pub enum MapPins<'a> {
    /// Maps of its own, gone with the load (`run`, `exec`).
    Private,
    /// The installation's shared maps pinned in `shared` (opened, or created and pinned
    /// there), and this load's policy maps pinned in `policy` when given.
    Pinned {
        shared: &'a Path,
        policy: Option<&'a Path>,
    },
}

/// The maps each attachment has of its own (pinned with its programs): the policy and
/// its decision counters.
pub const POLICY_MAPS: [&str; 3] = [maps::ALLOW_V4, maps::ALLOW_V6, maps::DECISIONS];

/// The size of `EVENTS` when the operator chose one (`--event-ring-bytes`).
static EVENT_RING_BYTES: std::sync::OnceLock<u32> = std::sync::OnceLock::new();

/// Sizes the event ring buffer of every later load; a power of two, a multiple of the page
/// size (the kernel's rule for BPF_MAP_TYPE_RINGBUF).
pub fn set_event_ring_bytes(bytes: u32) -> Result<()> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
    if !bytes.is_power_of_two() || bytes < page {
        bail!(
            "--event-ring-bytes {bytes}: must be a power of two of at least {page} (the page size)"
        );
    }
    let _ = EVENT_RING_BYTES.set(bytes);
    Ok(())
}

/// Ids of the maps `status` and the metrics read through a foreground agent's record.
#[derive(Debug, Clone, Copy, Default)]
pub struct MapIds {
    pub sock_state: u32,
    pub decisions: u32,
    pub events_dropped: u32,
}

fn map_id(ebpf: &Ebpf, name: &str) -> u32 {
    match ebpf.map(name) {
        Some(Map::PerCpuArray(m) | Map::SkStorage(m)) => m.info().map_or(0, |i| i.id()),
        _ => 0,
    }
}

/// `AYA_LOG_LEVEL` for a load: the eBPF side's aya-log statements cost microseconds each;
/// the level global skips them in the kernel unless the agent itself logs at that level.
fn loader(pins: MapPins<'_>) -> EbpfLoader<'static> {
    static LEVEL: std::sync::OnceLock<u8> = std::sync::OnceLock::new();
    let level = LEVEL.get_or_init(|| log::max_level() as u8);
    let mut l = EbpfLoader::new();
    l.override_global(aya_log::LEVEL, level, false);
    if let Some(&bytes) = EVENT_RING_BYTES.get() {
        l.map_max_entries(maps::EVENTS, bytes);
    }
    if let MapPins::Pinned { shared, policy } = pins {
        for name in crate::pin::SHARED_MAPS {
            l.map_pin_path(name, shared.join(name));
        }
        if let Some(dir) = policy {
            for name in POLICY_MAPS {
                l.map_pin_path(name, dir.join(name));
            }
        }
    }
    l
}

/// The ELF section (libbpf's name for the hook) of each cgroup program.
pub fn section(name: &str) -> Option<&'static str> {
    Some(match name {
        programs::SETSOCKOPT => "cgroup/setsockopt",
        programs::BIND4 => "cgroup/bind4",
        programs::BIND6 => "cgroup/bind6",
        programs::SENDMSG4 => "cgroup/sendmsg4",
        programs::SENDMSG6 => "cgroup/sendmsg6",
        programs::GETSOCKNAME4 => "cgroup/getsockname4",
        programs::GETSOCKNAME6 => "cgroup/getsockname6",
        programs::CONNECT4 => "cgroup/connect4",
        programs::CONNECT6 => "cgroup/connect6",
        programs::SOCK_OPS => "sockops",
        _ => return None,
    })
}

/// The kernel's attach type (`enum bpf_attach_type`) of each cgroup program.
pub fn attach_type(name: &str) -> Option<u32> {
    Some(match name {
        programs::SETSOCKOPT => 22,
        programs::BIND4 => 8,
        programs::BIND6 => 9,
        programs::SENDMSG4 => 14,
        programs::SENDMSG6 => 15,
        programs::GETSOCKNAME4 => 31,
        programs::GETSOCKNAME6 => 32,
        programs::CONNECT4 => 10,
        programs::CONNECT6 => 11,
        programs::SOCK_OPS => 3,
        _ => return None,
    })
}

fn check_object() -> Result<()> {
    if OBJECT.is_empty() {
        bail!("this freebind-agent was built without its eBPF object: build it with `cargo xtask build`");
    }
    Ok(())
}

impl Attachment {
    /// Loads the object, verifies every cgroup program and the UDP iterator (where the
    /// kernel can steer UDP), and fills the policy; attaches nothing.
    pub fn load(policy: &Policy, pins: MapPins<'_>) -> Result<(Self, Maps)> {
        check_object()?;
        let mut ebpf = loader(pins)
            .load(OBJECT)
            .context("loading freebind's eBPF object (maps and BTF)")?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| log::debug!("eBPF debug log unavailable: {e}"))
            .ok();
        for &name in &programs::CGROUP_ATTACH_ORDER {
            let prog = ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
            let loaded = match prog {
                aya::programs::Program::CgroupSockAddr(p) => p.load(),
                aya::programs::Program::CgroupSockopt(p) => p.load(),
                aya::programs::Program::SockOps(p) => p.load(),
                _ => bail!("program {name} has an unexpected type"),
            };
            loaded.with_context(|| format!("verifying {name}"))?;
        }
        // Without the iterator (no BTF to attach it by) nothing parks UDP sockets: the
        // agent tells the bind hooks so through SERVED_NETNS.
        if kernel::modes().steer_udp {
            let btf = Btf::from_sys_fs().context(
                "reading the kernel's BTF (/sys/kernel/btf/vmlinux; CONFIG_DEBUG_INFO_BTF)",
            )?;
            let iter: &mut Iter = program(&mut ebpf, programs::ITER_UDP)?;
            iter.load("udp", &btf).with_context(|| {
                format!(
                    "verifying {} (a UDP socket iterator, Linux 5.9)",
                    programs::ITER_UDP
                )
            })?;
        }

        let map_ids = MapIds {
            sock_state: map_id(&ebpf, maps::SOCK_STATE),
            decisions: map_id(&ebpf, maps::DECISIONS),
            events_dropped: map_id(&ebpf, maps::EVENTS_DROPPED),
        };
        let maps = Maps {
            local_addrs: take_map(&mut ebpf, maps::LOCAL_ADDRS)?,
            events: take_map(&mut ebpf, maps::EVENTS)?,
            events_dropped: take_map(&mut ebpf, maps::EVENTS_DROPPED)?,
            served_netns: take_map(&mut ebpf, maps::SERVED_NETNS)?,
            steer_maps: take_map(&mut ebpf, maps::STEER_MAPS)?,
            sock_state: match ebpf.take_map(maps::SOCK_STATE) {
                Some(Map::SkStorage(m)) => m,
                _ => bail!("the eBPF object has no sk_storage map {}", maps::SOCK_STATE),
            },
        };
        let mut allow = AllowMaps {
            v4: take_map(&mut ebpf, maps::ALLOW_V4)?,
            v6: take_map(&mut ebpf, maps::ALLOW_V6)?,
        };
        allow.set(policy)?;
        // The tries live on in the kernel while the programs reference them.
        Ok((
            Self {
                ebpf,
                logger,
                links: Vec::new(),
                map_ids,
            },
            maps,
        ))
    }

    /// Attaches to the cgroup alongside whatever else is attached there (multi-attach, so
    /// systemd's own programs keep working), in [`programs::CGROUP_ATTACH_ORDER`]: what
    /// parked and freebind sockets rely on first, the hooks that make them after.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mode = attach_mode();
        for &name in &programs::CGROUP_ATTACH_ORDER {
            let prog = self
                .ebpf
                .program_mut(name)
                .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
            let link = match prog {
                aya::programs::Program::CgroupSockAddr(p) => {
                    p.attach(&cg, mode).map(|l| CgroupLink::SockAddr(name, l))
                }
                aya::programs::Program::CgroupSockopt(p) => {
                    p.attach(&cg, mode).map(|l| CgroupLink::Sockopt(name, l))
                }
                aya::programs::Program::SockOps(p) => {
                    p.attach(&cg, mode).map(|l| CgroupLink::SockOps(name, l))
                }
                _ => bail!("program {name} has an unexpected type"),
            }
            .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
            self.links.push(link);
        }
        Ok(())
    }

    /// Runs the UDP iterator in `netns`: every parked UDP socket there enters the
    /// namespace's steering map (again: entries are replaced, never duplicated).
    pub fn enter_udp_sockets(&mut self, netns: &Netns) -> Result<()> {
        let iter: &mut Iter = program(&mut self.ebpf, programs::ITER_UDP)?;
        let id = iter
            .attach()
            .with_context(|| format!("creating a link for {}", programs::ITER_UDP))?;
        let link = iter.take_link(id)?;
        // The iterator walks the namespace of the task that creates it.
        let mut file = netns.run(move || {
            link.into_file()
                .context("creating the UDP socket iterator (bpf_iter_create)")
        })?;
        let mut sink = Vec::new();
        file.read_to_end(&mut sink)
            .context("running the UDP socket iterator")?;
        Ok(())
    }

    /// Pins a loaded program at `path` (systemd's `BPFProgram=` and the start hook attach
    /// it from there).
    pub fn pin_program(&mut self, name: &str, path: &Path) -> Result<()> {
        let prog = self
            .ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
        prog.pin(path)
            .with_context(|| format!("pinning {name} at {}", path.display()))
    }

    pub fn map_ids(&self) -> MapIds {
        self.map_ids
    }

    /// Kernel ids of the cgroup programs, in attach order.
    pub fn program_ids(&self) -> Vec<u32> {
        programs::CGROUP_ATTACH_ORDER
            .iter()
            .filter_map(|&name| Some(self.ebpf.program(name)?.info().ok()?.id()))
            .collect()
    }

    /// The aya-log reader, for the eBPF side's debug lines.
    pub fn take_logger(&mut self) -> Option<Logger> {
        self.logger.take()
    }
}

/// From Linux 5.7 aya attaches through BPF links, which the kernel always adds as
/// multi-attach and which refuse any flag (EINVAL); before that it uses BPF_PROG_ATTACH,
/// where BPF_F_ALLOW_MULTI must be asked for explicitly.
fn attach_mode() -> CgroupAttachMode {
    match KernelVersion::current() {
        Ok(v) if v >= KernelVersion::new(5, 7, 0) => CgroupAttachMode::Single,
        _ => CgroupAttachMode::AllowMultiple,
    }
}

impl Drop for Attachment {
    /// In reverse attach order: native mode first and the bind hooks next, so that no
    /// socket becomes freebind or parked after what serves it is gone (aya would drop the
    /// programs in hash order).
    fn drop(&mut self) {
        while let Some(link) = self.links.pop() {
            let (name, result) = match link {
                CgroupLink::SockAddr(name, id) => (
                    name,
                    program::<CgroupSockAddr>(&mut self.ebpf, name).and_then(|p| Ok(p.detach(id)?)),
                ),
                CgroupLink::Sockopt(name, id) => (
                    name,
                    program::<CgroupSockopt>(&mut self.ebpf, name).and_then(|p| Ok(p.detach(id)?)),
                ),
                CgroupLink::SockOps(name, id) => (
                    name,
                    program::<SockOps>(&mut self.ebpf, name).and_then(|p| Ok(p.detach(id)?)),
                ),
            };
            if let Err(e) = result {
                log::warn!("detaching {name}: {e:#}");
            }
        }
    }
}

/// The sk_lookup program of one network namespace: a separate load of the object, because
/// an sk_lookup program cannot learn which namespace it runs in (no bpf_get_netns_cookie
/// there), so each namespace's copy reads its own `STEER_SOCKS`. Dropping it detaches,
/// unless it is pinned.
pub struct SteerLookup {
    _ebpf: Option<Ebpf>,
    _link: Option<OwnedFd>,
    socks: MapData,
}

/// Maps of the copy that only the cgroup programs use, shrunk to their minimum: hash maps
/// are preallocated, and this copy exists once per namespace.
const SK_LOOKUP_SHRUNK: &[(&str, u32)] = &[
    (maps::LOCAL_ADDRS, 1),
    (maps::SERVED_NETNS, 1),
    (maps::PARKING, 1),
    (maps::PARK_OWNERS, 1),
    (maps::STEER_MAPS, 1),
    (maps::ALLOW_V4, 1),
    (maps::ALLOW_V6, 1),
];

/// Pin names in a namespace's pin directory.
const PIN_LINK: &str = "link";

impl SteerLookup {
    /// Loads the sk_lookup program and attaches it to `netns`.
    pub fn attach(netns: &Netns) -> Result<Self> {
        let (ebpf, id, socks) = Self::load_and_attach(netns)?;
        let _ = id;
        Ok(Self {
            _ebpf: Some(ebpf),
            _link: None,
            socks,
        })
    }

    /// The same, pinned in `dir` so that it outlives the agent; a program already pinned
    /// there for this namespace is adopted instead (after a restart of the daemon).
    pub fn attach_pinned(netns: &Netns, dir: &Path) -> Result<Self> {
        if dir.exists() {
            match Self::adopt(netns, dir) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    log::info!(
                        "replacing the pinned sk_lookup program of {}: {e:#}",
                        netns.label()
                    );
                    crate::pin::remove_tree(dir);
                }
            }
        }
        let (mut ebpf, id, socks) = Self::load_and_attach(netns)?;
        crate::pin::create_dir_atomically(dir, |tmp| {
            let prog: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
            let link: FdLink = prog.take_link(id)?.into();
            link.pin(tmp.join(PIN_LINK))
                .context("pinning the sk_lookup link")?;
            socks
                .pin(tmp.join(maps::STEER_SOCKS))
                .context("pinning the steering map")?;
            Ok(())
        })?;
        drop(ebpf);
        Self::adopt(netns, dir)
    }

    fn adopt(netns: &Netns, dir: &Path) -> Result<Self> {
        let link = kernel::obj_get(&dir.join(PIN_LINK))?;
        let target = kernel::link_target(link.as_fd())
            .context("reading the pinned sk_lookup link (BPF_OBJ_GET_INFO_BY_FD, Linux 5.8)")?;
        if u64::from(target.netns_ino) != netns.ino() {
            bail!(
                "{} is attached to network namespace inode {}, not {}",
                dir.display(),
                target.netns_ino,
                netns.ino()
            );
        }
        let socks = MapData::from_pin(dir.join(maps::STEER_SOCKS))
            .with_context(|| format!("opening {}", dir.join(maps::STEER_SOCKS).display()))?;
        Ok(Self {
            _ebpf: None,
            _link: Some(link),
            socks,
        })
    }

    fn load_and_attach(netns: &Netns) -> Result<(Ebpf, SkLookupLinkId, MapData)> {
        check_object()?;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u32;
        let mut l = loader(MapPins::Private);
        for &(name, n) in SK_LOOKUP_SHRUNK {
            l.map_max_entries(name, n);
        }
        // Ring buffers are at least a page.
        l.map_max_entries(maps::EVENTS, page);
        let mut ebpf = l
            .load(OBJECT)
            .context("loading freebind's eBPF object for an sk_lookup program")?;
        let prog: &mut SkLookup = program(&mut ebpf, programs::SK_LOOKUP)?;
        prog.load()
            .with_context(|| format!("verifying {} (sk_lookup, Linux 5.9)", programs::SK_LOOKUP))?;
        let id = prog
            .attach(netns)
            .with_context(|| format!("attaching {} to {}", programs::SK_LOOKUP, netns.label()))?;
        let socks = match ebpf.take_map(maps::STEER_SOCKS) {
            Some(Map::SockHash(m)) => m,
            _ => bail!("the eBPF object has no SOCKHASH {}", maps::STEER_SOCKS),
        };
        Ok((ebpf, id, socks))
    }

    /// The namespace's steering map, for `STEER_MAPS`.
    pub fn socks(&self) -> &MapData {
        &self.socks
    }
}

fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}
