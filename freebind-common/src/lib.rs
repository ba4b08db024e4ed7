//! Everything that crosses the kernel boundary between freebind's eBPF programs and its
//! agent: map names, map keys and values, and the events the programs emit.
//!
//! Every type is `#[repr(C)]` and free of implicit padding, so that the kernel, the eBPF
//! object and the agent all agree on its layout byte for byte.
#![no_std]

/// `AF_INET`, as the kernel spells it in `bpf_sock_addr::user_family`.
pub const AF_INET: u8 = 2;
/// `AF_INET6`.
pub const AF_INET6: u8 = 10;
/// `IPPROTO_TCP`.
pub const IPPROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const IPPROTO_UDP: u8 = 17;

/// Map names, shared so that the agent looks up exactly what the object defines.
pub mod maps {
    /// `HashMap<LocalAddrKey, u8>`: addresses usable for `bind()` per network namespace.
    pub const LOCAL_ADDRS: &str = "LOCAL_ADDRS";
    /// `LpmTrie<[u8; 4], u8>`: IPv4 prefixes this attachment may bind while not local.
    pub const ALLOW_V4: &str = "ALLOW_V4";
    /// `LpmTrie<[u8; 16], u8>`: IPv6 prefixes this attachment may bind while not local.
    pub const ALLOW_V6: &str = "ALLOW_V6";
    /// `RingBuf` of [`crate::BindEvent`].
    pub const EVENTS: &str = "EVENTS";
    /// `PerCpuArray<u64>` with one slot: events lost because `EVENTS` was full.
    pub const EVENTS_DROPPED: &str = "EVENTS_DROPPED";
    /// `SkStorage<SockState>`: what freebind did to each socket.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// `HashMap<u64, u8>`: cookies of the network namespaces whose addresses the agent
    /// keeps in `LOCAL_ADDRS`. Sockets elsewhere are left to the kernel entirely.
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
}

/// Program names as the kernel shows them (`bpftool prog`); 15 characters at most.
pub mod programs {
    /// `cgroup/setsockopt`: native mode.
    pub const SETSOCKOPT: &str = "fb_setsockopt";
    /// `cgroup/bind4`: locality and policy decision for IPv4 binds.
    pub const BIND4: &str = "fb_bind4";
    /// `cgroup/bind6`: the same for IPv6 (and v4-mapped) binds.
    pub const BIND6: &str = "fb_bind6";
    /// `cgroup/sendmsg6`: the policy for IPv6 source addresses chosen per datagram.
    pub const SENDMSG6: &str = "fb_sendmsg6";
}

/// Capacity of `SERVED_NETNS`.
pub const SERVED_NETNS_CAPACITY: u32 = 1_024;

/// The value native mode writes as the rewritten `IP_FREEBIND`/`IPV6_FREEBIND` argument.
/// The kernel only tests it for non-zero; other freebind attachments running on the same
/// syscall (a second agent, or one on a parent cgroup) recognise it as freebind's own
/// rewrite rather than the application's, and still apply their own policy.
pub const NATIVE_MARK: i32 = 0x4642_4e44;

/// Capacity of `LOCAL_ADDRS`: addresses across every network namespace the agent serves.
pub const LOCAL_ADDRS_CAPACITY: u32 = 65_536;
/// Capacity of each policy trie.
pub const ALLOW_CAPACITY: u32 = 4_096;
/// Size of the `EVENTS` ring buffer in bytes (a power of two, a multiple of the page size).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Key of `LOCAL_ADDRS`: one address that `bind()` accepts without freebind in one network
/// namespace. The value is unused (`1`).
///
/// IPv4 addresses occupy `addr[..4]` with the rest zero; IPv4-mapped IPv6 addresses are
/// stored as IPv4 so that both bind hooks find them.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalAddrKey {
    /// The network namespace's cookie (`SO_NETNS_COOKIE`, `bpf_get_netns_cookie`).
    pub netns_cookie: u64,
    /// The address in network byte order.
    pub addr: [u8; 16],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// Always zero; makes the padding explicit.
    pub _pad: [u8; 7],
}

impl LocalAddrKey {
    pub const fn new(netns_cookie: u64, family: u8, addr: [u8; 16]) -> Self {
        Self {
            netns_cookie,
            addr,
            family,
            _pad: [0; 7],
        }
    }
}

/// Bits of [`SockState::flags`].
pub mod sock_flags {
    /// The `cgroup/setsockopt` program has made this socket freebind (native mode).
    pub const NATIVE: u32 = 1 << 0;
    /// The application set `IP_FREEBIND`/`IPV6_FREEBIND`/`IP_TRANSPARENT`/`IPV6_TRANSPARENT`
    /// itself: freebind leaves the socket alone.
    pub const APP_FREEBIND: u32 = 1 << 1;
}

/// Value of `SOCK_STATE`, the per-socket storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// [`sock_flags`] bits.
    pub flags: u32,
    /// Always zero; reserved.
    pub _reserved: u32,
}

/// What a bind hook decided; [`BindEvent::verdict`].
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The address is local (or the wildcard, loopback, multicast): the kernel decides as
    /// usual.
    Local = 1,
    /// Not local, allowed, and the socket is freebind: the bind proceeds.
    Freebind = 2,
    /// Not local and outside the attachment's policy: `EADDRNOTAVAIL`.
    Refused = 3,
    /// Not local, allowed, but the socket is not freebind (no `setsockopt()` came before
    /// `bind()`): the kernel will refuse it with `EADDRNOTAVAIL`.
    NotFreebind = 4,
    /// Not local, and the application made the socket freebind itself: not ours to judge.
    AppFreebind = 5,
    /// The socket's network namespace is not one the agent watches: left to the kernel,
    /// and native mode leaves such sockets alone.
    OtherNetns = 6,
    /// A datagram asked for a non-local IPv6 source (`IPV6_PKTINFO`) outside the policy on a
    /// socket native mode made freebind: refused. `port` is then the destination's port.
    RefusedSource = 7,
}

impl Verdict {
    pub const fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Local,
            2 => Self::Freebind,
            3 => Self::Refused,
            4 => Self::NotFreebind,
            5 => Self::AppFreebind,
            6 => Self::OtherNetns,
            7 => Self::RefusedSource,
            _ => return None,
        })
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Freebind => "freebind",
            Self::Refused => "refused",
            Self::NotFreebind => "not-freebind",
            Self::AppFreebind => "app-freebind",
            Self::OtherNetns => "other-netns",
            Self::RefusedSource => "refused-source",
        }
    }
}

/// One bind decision, written to the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct BindEvent {
    /// The cgroup v2 id of the binding process.
    pub cgroup_id: u64,
    /// Process id (the kernel's tgid).
    pub pid: u32,
    /// Port in host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the socket's family.
    pub family: u8,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// The address asked for, network byte order; IPv4 in `addr[..4]`.
    pub addr: [u8; 16],
    /// The process's command name, NUL-padded.
    pub comm: [u8; 16],
    /// A [`Verdict`] as `u8`.
    pub verdict: u8,
    /// 1 when `addr` is IPv4 (an `AF_INET` socket, or a v4-mapped bind on `AF_INET6`).
    pub addr_is_v4: u8,
    /// Always zero.
    pub _pad: [u8; 6],
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all three are `#[repr(C)]`, made of integers and byte arrays with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for LocalAddrKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for BindEvent {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<LocalAddrKey>(), 8 + 16 + 1 + 7);
        assert_eq!(size_of::<SockState>(), 8);
        assert_eq!(
            size_of::<BindEvent>(),
            8 + 4 + 2 + 1 + 1 + 16 + 16 + 1 + 1 + 6
        );
    }

    #[test]
    fn verdicts_round_trip() {
        for v in 1..=7 {
            assert_eq!(Verdict::from_u8(v).unwrap() as u8, v);
        }
        assert!(Verdict::from_u8(0).is_none());
    }

    #[test]
    fn program_names_fit_the_kernel_limit() {
        for name in [
            programs::SETSOCKOPT,
            programs::BIND4,
            programs::BIND6,
            programs::SENDMSG6,
        ] {
            assert!(name.len() <= 15, "{name}");
        }
    }
}
