//! Loading the eBPF object and attaching its programs to a cgroup.
use std::{fs::File, net::IpAddr, path::Path};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, HashMap as AyaHashMap, LpmTrie, MapData, PerCpuArray, RingBuf},
    programs::{
        cgroup_sockopt::CgroupSockoptLinkId, CgroupAttachMode, CgroupSockAddr, CgroupSockopt,
    },
    util::KernelVersion,
    Ebpf, EbpfLoader,
};
use freebind_common::{maps, programs, LocalAddrKey};

use crate::policy::Policy;

/// The object `cargo xtask build-ebpf` produced, embedded by build.rs (empty when the
/// agent was built without it).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/freebind.bpf.o"));

/// Reader of the eBPF side's aya-log records.
pub type Logger = aya_log::EbpfLogger<&'static dyn log::Log>;

/// The maps the agent drives, taken out of the loaded object.
pub struct Maps {
    pub local_addrs: AyaHashMap<MapData, LocalAddrKey, u8>,
    pub events: RingBuf<MapData>,
    pub events_dropped: PerCpuArray<MapData, u64>,
    pub served_netns: AyaHashMap<MapData, u64, u8>,
}

/// A loaded copy of freebind's programs: one per attachment, so each carries its own
/// policy. Dropping it detaches every program it attached (the kernel also does so when
/// the agent dies: the links are file descriptors of this process).
pub struct Attachment {
    ebpf: Ebpf,
    logger: Option<Logger>,
    setsockopt_link: Option<CgroupSockoptLinkId>,
}

impl Attachment {
    /// Loads the object, verifies every program and fills the policy; attaches nothing.
    pub fn load(policy: &Policy) -> Result<(Self, Maps)> {
        if OBJECT.is_empty() {
            bail!("this freebind-agent was built without its eBPF object: build it with `cargo xtask build`");
        }
        // The eBPF side's aya-log statements cost microseconds each; the level global
        // skips them in the kernel unless the agent itself logs at that level (-v).
        let log_level = log::max_level() as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global(aya_log::LEVEL, &log_level, false)
            .load(OBJECT)
            .context("loading freebind's eBPF object (maps and BTF)")?;
        let logger = aya_log::EbpfLogger::init(&mut ebpf)
            .map_err(|e| log::debug!("eBPF debug log unavailable: {e}"))
            .ok();
        for name in [programs::BIND4, programs::BIND6, programs::SENDMSG6] {
            let prog: &mut CgroupSockAddr = program(&mut ebpf, name)?;
            prog.load().with_context(|| format!("verifying {name}"))?;
        }
        let prog: &mut CgroupSockopt = program(&mut ebpf, programs::SETSOCKOPT)?;
        prog.load()
            .with_context(|| format!("verifying {}", programs::SETSOCKOPT))?;

        let maps = Maps {
            local_addrs: take_map(&mut ebpf, maps::LOCAL_ADDRS)?,
            events: take_map(&mut ebpf, maps::EVENTS)?,
            events_dropped: take_map(&mut ebpf, maps::EVENTS_DROPPED)?,
            served_netns: take_map(&mut ebpf, maps::SERVED_NETNS)?,
        };
        let mut v4: LpmTrie<MapData, [u8; 4], u8> = take_map(&mut ebpf, maps::ALLOW_V4)?;
        let mut v6: LpmTrie<MapData, [u8; 16], u8> = take_map(&mut ebpf, maps::ALLOW_V6)?;
        for prefix in policy.effective() {
            let len = u32::from(prefix.len);
            match prefix.addr {
                IpAddr::V4(a) => v4.insert(&Key::new(len, a.octets()), 1, 0),
                IpAddr::V6(a) => v6.insert(&Key::new(len, a.octets()), 1, 0),
            }
            .with_context(|| format!("loading policy prefix {prefix}"))?;
        }
        // The tries live on in the kernel while the programs reference them.
        Ok((
            Self {
                ebpf,
                logger,
                setsockopt_link: None,
            },
            maps,
        ))
    }

    /// Attaches to the cgroup alongside whatever else is attached there (BPF_F_ALLOW_MULTI,
    /// so systemd's own programs keep working). The policy hooks go first: a socket must
    /// not become freebind before the policy check is in place.
    pub fn attach(&mut self, cgroup: &Path) -> Result<()> {
        let cg =
            File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))?;
        let mode = attach_mode();
        for name in [programs::BIND4, programs::BIND6, programs::SENDMSG6] {
            let prog: &mut CgroupSockAddr = program(&mut self.ebpf, name)?;
            prog.attach(&cg, mode)
                .with_context(|| format!("attaching {name} to cgroup {}", cgroup.display()))?;
        }
        let prog: &mut CgroupSockopt = program(&mut self.ebpf, programs::SETSOCKOPT)?;
        let link = prog.attach(&cg, mode).with_context(|| {
            format!(
                "attaching {} to cgroup {}",
                programs::SETSOCKOPT,
                cgroup.display()
            )
        })?;
        self.setsockopt_link = Some(link);
        Ok(())
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
    /// Native mode goes first, so that no socket becomes freebind after its bind hooks are
    /// gone (aya would drop the programs in hash order).
    fn drop(&mut self) {
        if let Some(link) = self.setsockopt_link.take() {
            if let Ok(prog) = program::<CgroupSockopt>(&mut self.ebpf, programs::SETSOCKOPT) {
                if let Err(e) = prog.detach(link) {
                    log::warn!("detaching {}: {e}", programs::SETSOCKOPT);
                }
            }
        }
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
