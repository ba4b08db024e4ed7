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
    /// `PerCpuArray<u64>` with [`crate::VERDICT_SLOTS`] slots, indexed by
    /// [`crate::Verdict`]: this attachment's decisions, counted whether or not their event
    /// fitted in `EVENTS`.
    pub const DECISIONS: &str = "DECISIONS";
    /// `SkStorage<SockState>`: what freebind did to each socket.
    pub const SOCK_STATE: &str = "SOCK_STATE";
    /// `HashMap<u64, u8>`: cookies of the network namespaces whose addresses the agent
    /// keeps in `LOCAL_ADDRS`, with their `served_flags`. Sockets elsewhere are left to
    /// the kernel entirely.
    pub const SERVED_NETNS: &str = "SERVED_NETNS";
    /// `HashMap<LocalAddrKey, u32>`: the parking slot of each intended address that steer
    /// mode has parked, per network namespace.
    pub const PARKING: &str = "PARKING";
    /// `HashMap<SlotKey, LocalAddrKey>`: which intended address owns each parking slot.
    pub const PARK_OWNERS: &str = "PARK_OWNERS";
    /// `HashOfMaps<u64, SockHash<SteerKey>>`: per network namespace (by cookie), the
    /// `STEER_SOCKS` of the sk_lookup program the agent attached there.
    pub const STEER_MAPS: &str = "STEER_MAPS";
    /// `SockHash<SteerKey>`: parked sockets by the address and port they asked for; one per
    /// served network namespace, read by that namespace's sk_lookup program.
    pub const STEER_SOCKS: &str = "STEER_SOCKS";
}

/// Program names as the kernel shows them (`bpftool prog`); 15 characters at most.
pub mod programs {
    /// `cgroup/setsockopt`: native mode.
    pub const SETSOCKOPT: &str = "fb_setsockopt";
    /// `cgroup/bind4`: locality and policy decision for IPv4 binds.
    pub const BIND4: &str = "fb_bind4";
    /// `cgroup/bind6`: the same for IPv6 (and v4-mapped) binds.
    pub const BIND6: &str = "fb_bind6";
    /// `cgroup/sendmsg6`: the policy for IPv6 source addresses chosen per datagram, and the
    /// intended source of steered sockets' replies.
    pub const SENDMSG6: &str = "fb_sendmsg6";
    /// `cgroup/sendmsg4`: the intended source of steered IPv4 sockets' replies.
    pub const SENDMSG4: &str = "fb_sendmsg4";
    /// `cgroup/getsockname4`: steered sockets report the address they asked for.
    pub const GETSOCKNAME4: &str = "fb_getsockname4";
    /// `cgroup/getsockname6`.
    pub const GETSOCKNAME6: &str = "fb_getsockname6";
    /// `cgroup/connect4`: reports a `connect()` from a parked socket, which cannot work.
    pub const CONNECT4: &str = "fb_connect4";
    /// `cgroup/connect6`.
    pub const CONNECT6: &str = "fb_connect6";
    /// `sockops`: enters steered TCP sockets in `STEER_SOCKS` when they listen.
    pub const SOCK_OPS: &str = "fb_sock_ops";
    /// `iter/udp`: enters steered UDP sockets in `STEER_SOCKS`, run by the agent.
    pub const ITER_UDP: &str = "fb_iter_udp";
    /// `sk_lookup`: one per served network namespace; steers traffic for an intended
    /// address to its parked socket, and refuses traffic to parking addresses.
    pub const SK_LOOKUP: &str = "fb_sk_lookup";

    /// The cgroup programs, in the order the agent attaches them: everything a parked or
    /// freebind socket relies on before the bind hooks that create such sockets, native
    /// mode last.
    pub const CGROUP_ATTACH_ORDER: [&str; 10] = [
        GETSOCKNAME4,
        GETSOCKNAME6,
        SENDMSG4,
        SENDMSG6,
        CONNECT4,
        CONNECT6,
        SOCK_OPS,
        BIND4,
        BIND6,
        SETSOCKOPT,
    ];
}

/// Values of `SERVED_NETNS`.
pub mod served_flags {
    /// The agent keeps this namespace's addresses in `LOCAL_ADDRS`.
    pub const SERVED: u8 = 1 << 0;
    /// The agent assigned the IPv6 parking addresses there (not when IPv6 is off).
    pub const V6_PARKING: u8 = 1 << 1;
    /// Steering is attached there (sk_lookup): TCP sockets may be parked.
    pub const STEER: u8 = 1 << 2;
    /// Parked UDP sockets are entered for steering there (the kernel has the UDP
    /// iterator): UDP sockets may be parked too.
    pub const STEER_UDP: u8 = 1 << 3;
}

/// The options native mode applies on the application's behalf before it turns the
/// syscall into `IP_FREEBIND`: integers that `bpf_setsockopt()` accepts from the
/// setsockopt hook (measured on 6.18; the end-to-end tests check each on every kernel they
/// run on) and whose kernel path has no capability check. `bpf_setsockopt()` skips
/// `ns_capable()` (`sockopt_ns_capable()` returns true in a BPF context), so SO_PRIORITY,
/// SO_MARK and SO_BINDTOIFINDEX are deliberately absent: applying them there would let an
/// unprivileged process do what the kernel refuses it.
pub mod native_options {
    pub const SOL_IP: i32 = 0;
    pub const SOL_SOCKET: i32 = 1;
    pub const SOL_TCP: i32 = 6;
    pub const SOL_IPV6: i32 = 41;

    /// Which sockets an option applies to: `bpf_setsockopt()` takes `SOL_IP` options on
    /// AF_INET sockets only and `SOL_IPV6` ones on AF_INET6 only, TCP ones on TCP only.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum On {
        Any,
        Tcp,
        Inet,
        Inet6,
    }

    /// (name, level, optname, which sockets).
    pub const OPTIONS: [(&str, i32, i32, On); 17] = [
        ("SO_REUSEADDR", SOL_SOCKET, 2, On::Any),
        ("SO_SNDBUF", SOL_SOCKET, 7, On::Any),
        ("SO_RCVBUF", SOL_SOCKET, 8, On::Any),
        ("SO_KEEPALIVE", SOL_SOCKET, 9, On::Any),
        ("SO_REUSEPORT", SOL_SOCKET, 15, On::Any),
        ("SO_RCVLOWAT", SOL_SOCKET, 18, On::Any),
        ("TCP_NODELAY", SOL_TCP, 1, On::Tcp),
        ("TCP_MAXSEG", SOL_TCP, 2, On::Tcp),
        ("TCP_KEEPIDLE", SOL_TCP, 4, On::Tcp),
        ("TCP_KEEPINTVL", SOL_TCP, 5, On::Tcp),
        ("TCP_KEEPCNT", SOL_TCP, 6, On::Tcp),
        ("TCP_SYNCNT", SOL_TCP, 7, On::Tcp),
        ("TCP_WINDOW_CLAMP", SOL_TCP, 10, On::Tcp),
        ("TCP_USER_TIMEOUT", SOL_TCP, 18, On::Tcp),
        ("TCP_NOTSENT_LOWAT", SOL_TCP, 25, On::Tcp),
        ("IP_TOS", SOL_IP, 1, On::Inet),
        ("IPV6_TCLASS", SOL_IPV6, 67, On::Inet6),
    ];

    /// Whether `level`/`optname` is one of [`OPTIONS`]: a match rather than a walk of the
    /// table, for the setsockopt hook, which runs on every setsockopt() of a fresh socket.
    #[inline(always)]
    pub fn can_apply(level: i32, optname: i32) -> bool {
        match level {
            SOL_SOCKET => matches!(optname, 2 | 7 | 8 | 9 | 15 | 18),
            SOL_TCP => matches!(optname, 1 | 2 | 4..=7 | 10 | 18 | 25),
            SOL_IP => optname == 1,
            SOL_IPV6 => optname == 67,
            _ => false,
        }
    }
}

/// Where steer mode parks sockets. Both sides derive parking addresses from slots with
/// these functions, so the agent can name them in its logs and assign them.
pub mod parking {
    /// IPv4 parking addresses are `127.254.0.0/16`: always local while `lo` is up (all of
    /// 127.0.0.0/8 is), and away from 127.0.0.1 and the 127.0.x.y addresses resolvers and
    /// hostnames use.
    pub const V4_NET: [u8; 2] = [127, 254];
    /// Slots 1..=V4_SLOTS.
    pub const V4_SLOTS: u32 = 65_534;
    /// IPv6 parking addresses are `fd66:7265:6562:696e::N/128` (a ULA prefix spelling
    /// "freebin"), assigned by the agent on `lo` with `nodad`: `inet6_bind()` accepts only
    /// assigned addresses, a local route is not enough.
    pub const V6_NET: [u8; 8] = [0xfd, 0x66, 0x72, 0x65, 0x65, 0x62, 0x69, 0x6e];
    /// Slots 1..=V6_SLOTS: distinct IPv6 intended addresses one network namespace can park.
    pub const V6_SLOTS: u32 = 32;

    /// The IPv4 parking address of `slot`, network byte order.
    pub const fn v4(slot: u32) -> [u8; 4] {
        [V4_NET[0], V4_NET[1], (slot >> 8) as u8, slot as u8]
    }

    /// The IPv6 parking address of `slot`.
    pub const fn v6(slot: u32) -> [u8; 16] {
        let mut a = [0u8; 16];
        let mut i = 0;
        while i < 8 {
            a[i] = V6_NET[i];
            i += 1;
        }
        a[14] = (slot >> 8) as u8;
        a[15] = slot as u8;
        a
    }

    pub const fn is_v4(a: &[u8]) -> bool {
        a[0] == V4_NET[0] && a[1] == V4_NET[1]
    }

    pub const fn is_v6(a: &[u8; 16]) -> bool {
        let mut i = 0;
        while i < 8 {
            if a[i] != V6_NET[i] {
                return false;
            }
            i += 1;
        }
        true
    }
}

/// Capacity of `SERVED_NETNS` and `STEER_MAPS`.
pub const SERVED_NETNS_CAPACITY: u32 = 1_024;
/// Capacity of `PARKING` and `PARK_OWNERS`: intended addresses parked over the agent's life.
pub const PARKING_CAPACITY: u32 = 16_384;
/// Capacity of each `STEER_SOCKS`: parked sockets in one network namespace.
pub const STEER_SOCKS_CAPACITY: u32 = 16_384;

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
    /// Steer mode parked the socket; [`SockState::intended`] holds what it asked for.
    pub const STEERED: u32 = 1 << 2;
    /// A `connect()` from this parked socket was reported once already.
    pub const CONNECT_REPORTED: u32 = 1 << 3;
    /// The socket was bound to an address that was not local then (natively freebind, by
    /// freebind or by the application): `status` lists it whether or not the address has
    /// come since.
    pub const BOUND_ABSENT: u32 = 1 << 4;
}

/// Value of `SOCK_STATE`, the per-socket storage.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockState {
    /// [`sock_flags`] bits.
    pub flags: u32,
    /// The parking slot of a steered socket (see [`parking`]).
    pub slot: u32,
    /// The cookie of the network namespace a steered socket was parked in.
    pub netns_cookie: u64,
    /// The address a steered socket asked for, network byte order; IPv4 (also v4-mapped)
    /// in `intended[..4]`.
    pub intended: [u8; 16],
    /// 1 when `intended` is IPv4.
    pub intended_is_v4: u8,
    /// Always zero.
    pub _pad: [u8; 7],
}

/// Key of `STEER_SOCKS`: what a packet's destination must be for the sk_lookup program to
/// hand it to the parked socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SteerKey {
    /// The intended address, network byte order; IPv4 in `addr[..4]`, the rest zero.
    pub addr: [u8; 16],
    /// The socket's actual local port (not the one asked for, which is 0 for `bind(addr, 0)`),
    /// host byte order.
    pub port: u16,
    /// [`AF_INET`] or [`AF_INET6`]: the family of `addr` (IPv4 for a v4-mapped bind), which
    /// is the family of the packets that reach it.
    pub family: u8,
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
}

/// Key of `PARK_OWNERS`: one parking slot in one network namespace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SlotKey {
    pub netns_cookie: u64,
    pub slot: u32,
    /// [`AF_INET`] or [`AF_INET6`]: IPv4 and IPv6 slots are separate pools.
    pub family: u8,
    /// Always zero.
    pub _pad: [u8; 3],
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
    /// Not local (or already parked in this namespace), allowed, and the socket is not
    /// freebind: steer mode bound it to the parking address of [`BindEvent::slot`] and
    /// steers the intended address's traffic to it.
    Steered = 8,
    /// Steer mode would park the socket but has no parking slot left for its address (or
    /// the namespace has no IPv6 parking addresses): `EADDRNOTAVAIL`.
    NoParking = 9,
    /// A parked socket called `connect()`; `addr`/`port` are what it is parked for. The
    /// kernel refuses a parking source towards another host: steer mode is for servers.
    ParkedConnect = 10,
    /// Steer mode would park the socket, but a socket already receives for that address
    /// and port (a parked one, or another freebind socket): `EADDRINUSE`, as natively.
    InUse = 11,
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
            8 => Self::Steered,
            9 => Self::NoParking,
            10 => Self::ParkedConnect,
            11 => Self::InUse,
            _ => return None,
        })
    }

    /// Every verdict, in value order.
    pub const ALL: [Self; 11] = [
        Self::Local,
        Self::Freebind,
        Self::Refused,
        Self::NotFreebind,
        Self::AppFreebind,
        Self::OtherNetns,
        Self::RefusedSource,
        Self::Steered,
        Self::NoParking,
        Self::ParkedConnect,
        Self::InUse,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Freebind => "freebind",
            Self::Refused => "refused",
            Self::NotFreebind => "not-freebind",
            Self::AppFreebind => "app-freebind",
            Self::OtherNetns => "other-netns",
            Self::RefusedSource => "refused-source",
            Self::Steered => "steered",
            Self::NoParking => "no-parking",
            Self::ParkedConnect => "parked-connect",
            Self::InUse => "in-use",
        }
    }
}

/// Slots of `DECISIONS`: one per [`Verdict`] value (slot 0 unused).
pub const VERDICT_SLOTS: u32 = 16;

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
    pub _pad: [u8; 2],
    /// For [`Verdict::Steered`] and [`Verdict::ParkedConnect`]: the parking slot.
    pub slot: u32,
    /// The cookie of the socket's network namespace.
    pub netns_cookie: u64,
}

#[cfg(feature = "user")]
mod user {
    use super::*;

    // SAFETY: all three are `#[repr(C)]`, made of integers and byte arrays with explicit
    // padding, so every bit pattern is valid.
    unsafe impl aya::Pod for LocalAddrKey {}
    unsafe impl aya::Pod for SockState {}
    unsafe impl aya::Pod for BindEvent {}
    unsafe impl aya::Pod for SteerKey {}
    unsafe impl aya::Pod for SlotKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<LocalAddrKey>(), 8 + 16 + 1 + 7);
        assert_eq!(size_of::<SockState>(), 4 + 4 + 8 + 16 + 1 + 7);
        assert_eq!(size_of::<SteerKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<SlotKey>(), 8 + 4 + 1 + 3);
        assert_eq!(
            size_of::<BindEvent>(),
            8 + 4 + 2 + 1 + 1 + 16 + 16 + 1 + 1 + 2 + 4 + 8
        );
    }

    #[test]
    fn verdicts_round_trip() {
        for v in 1..=11 {
            assert_eq!(Verdict::from_u8(v).unwrap() as u8, v);
            assert_eq!(Verdict::ALL[v as usize - 1] as u8, v);
        }
        assert!((Verdict::ALL.len() as u32) < VERDICT_SLOTS);
        assert!(Verdict::from_u8(0).is_none());
    }

    #[test]
    fn the_setsockopt_hooks_match_is_exactly_the_option_table() {
        use native_options::{can_apply, OPTIONS};
        for level in [0, 1, 6, 17, 41, 255, 263] {
            for optname in 0..128 {
                assert_eq!(
                    can_apply(level, optname),
                    OPTIONS
                        .iter()
                        .any(|&(_, l, o, _)| l == level && o == optname),
                    "level {level}, optname {optname}"
                );
            }
        }
    }

    #[test]
    fn program_names_fit_the_kernel_limit() {
        for name in programs::CGROUP_ATTACH_ORDER
            .iter()
            .chain(&[programs::ITER_UDP, programs::SK_LOOKUP])
        {
            assert!(name.len() <= 15, "{name}");
        }
    }

    #[test]
    fn parking_addresses_round_trip_their_ranges() {
        assert_eq!(parking::v4(1), [127, 254, 0, 1]);
        assert_eq!(parking::v4(parking::V4_SLOTS), [127, 254, 255, 254]);
        assert!(parking::is_v4(&parking::v4(300)));
        let a = parking::v6(32);
        assert!(parking::is_v6(&a));
        assert_eq!(a[15], 32);
        assert!(!parking::is_v6(&[0; 16]));
    }
}
