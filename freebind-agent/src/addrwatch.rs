//! The address watch: rtnetlink `RTM_NEWADDR`/`RTM_DELADDR` in a served network
//! namespace, turned into the set of addresses `bind()` accepts there.
//!
//! The wire format is small and stable, so it is parsed here rather than through a
//! netlink crate.
use std::{
    collections::{BTreeSet, HashMap},
    ffi::CStr,
    io, mem,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _, Result};
use tokio::io::unix::AsyncFd;

use crate::netns::Netns;

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_GETADDR: u16 = 22;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_DUMP_INTR: u16 = 0x10;
const RTMGRP_IPV4_IFADDR: u32 = 0x10;
const RTMGRP_IPV6_IFADDR: u32 = 0x100;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_BROADCAST: u16 = 4;
const IFA_FLAGS: u16 = 8;
const IFA_F_OPTIMISTIC: u32 = 0x04;
const IFA_F_DADFAILED: u32 = 0x08;
const IFA_F_TENTATIVE: u32 = 0x40;

/// One address on one interface, as rtnetlink reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfAddr {
    pub ifindex: u32,
    pub addr: IpAddr,
    pub prefix_len: u8,
    /// The configured address this entry comes from: `addr` itself, or the address whose
    /// subnet broadcast `addr` is (two addresses of one subnet share a broadcast).
    pub owner: IpAddr,
    /// False while IPv6 DAD runs (tentative) or after it failed: the kernel refuses to
    /// bind such an address without freebind.
    pub usable: bool,
}

/// A change the watch saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrChange {
    New(IfAddr),
    Del(IfAddr),
}

/// What `LocalAddrs::apply` concluded about an address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    BecameLocal,
    NoLongerLocal,
}

/// The usable addresses per interface; an address is local while any interface holds it
/// usable.
#[derive(Debug, Default)]
pub struct LocalSet {
    holders: HashMap<IpAddr, BTreeSet<(u32, u8, IpAddr)>>,
}

impl LocalSet {
    pub fn apply(&mut self, change: AddrChange) -> Option<Transition> {
        let (a, keep) = match change {
            AddrChange::New(a) => (a, a.usable),
            AddrChange::Del(a) => (a, false),
        };
        let was = self.is_local(&a.addr);
        let holder = (a.ifindex, a.prefix_len, a.owner);
        if keep {
            self.holders.entry(a.addr).or_default().insert(holder);
        } else if let Some(set) = self.holders.get_mut(&a.addr) {
            set.remove(&holder);
            if set.is_empty() {
                self.holders.remove(&a.addr);
            }
        }
        match (was, self.is_local(&a.addr)) {
            (false, true) => Some(Transition::BecameLocal),
            (true, false) => Some(Transition::NoLongerLocal),
            _ => None,
        }
    }

    pub fn is_local(&self, addr: &IpAddr) -> bool {
        self.holders.contains_key(addr)
    }

    pub fn addrs(&self) -> impl Iterator<Item = &IpAddr> {
        self.holders.keys()
    }
}

/// Receive buffer of the subscription: room for tens of thousands of notifications.
const WATCH_RCVBUF: libc::c_int = 8 << 20;

/// An rtnetlink socket subscribed to address changes.
pub struct AddrWatch {
    fd: AsyncFd<OwnedFd>,
    buf: Vec<u8>,
}

pub(crate) fn netlink_socket(groups: u32, nonblocking: bool) -> Result<OwnedFd> {
    let flags =
        libc::SOCK_RAW | libc::SOCK_CLOEXEC | if nonblocking { libc::SOCK_NONBLOCK } else { 0 };
    // SAFETY: plain socket/bind syscalls; the fd is owned right away.
    unsafe {
        let fd = libc::socket(libc::AF_NETLINK, flags, libc::NETLINK_ROUTE);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening an rtnetlink socket");
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let mut sa: libc::sockaddr_nl = mem::zeroed();
        sa.nl_family = libc::AF_NETLINK as u16;
        sa.nl_groups = groups;
        if libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_nl).cast(),
            mem::size_of::<libc::sockaddr_nl>() as u32,
        ) != 0
        {
            return Err(io::Error::last_os_error())
                .context("subscribing to rtnetlink address changes");
        }
        Ok(fd)
    }
}

impl AddrWatch {
    /// Subscribes to the changes in `netns` (call it before the dump, so that nothing
    /// between the dump and the subscription is lost).
    pub fn open(netns: &Netns) -> Result<Self> {
        let fd = netns.run(|| netlink_socket(RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR, true))?;
        // The default receive buffer (about 200 KiB) overflows within a few thousand
        // changes in a burst (`ip -batch`), and each overflow costs a full dump. Root may
        // go past rmem_max; if it cannot, the default still works, with more resyncs.
        let size: libc::c_int = WATCH_RCVBUF;
        // SAFETY: setsockopt reads an int from our stack.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&size as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        // SAFETY: the OwnedFd stays open for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }.context("registering the rtnetlink socket")?;
        Ok(Self {
            fd,
            buf: vec![0; 64 * 1024],
        })
    }

    /// Every address in `netns` now (a blocking dump on a socket of its own), repeated
    /// while the kernel reports it was interrupted by a change.
    pub fn dump(netns: &Netns) -> Result<Vec<IfAddr>> {
        netns.run(|| {
            let mut last = Vec::new();
            for _ in 0..DUMP_TRIES {
                let (addrs, interrupted) = dump_once()?;
                if !interrupted {
                    return Ok(addrs);
                }
                last = addrs;
            }
            // Under sustained churn (thousands of changes a second, measured with
            // `cargo xtask bench`) every dump is interrupted. Failing here once stopped the
            // agent; the last dump is close, and the changes that made it inexact were also
            // sent to the subscription opened before it, which corrects the view (or
            // overruns again and brings another resync).
            log::warn!(
                "the rtnetlink address dump was interrupted by address changes {DUMP_TRIES} \
                 times in a row; using the last one until the next changes correct it"
            );
            Ok(last)
        })
    }

    /// The next batch of changes. `Ok(None)` means the kernel dropped notifications
    /// (ENOBUFS): the caller must resynchronise from a fresh dump.
    pub async fn next(&mut self) -> Result<Option<Vec<AddrChange>>> {
        loop {
            let mut guard = self.fd.readable().await.context("waiting on rtnetlink")?;
            let buf = &mut self.buf;
            match guard.try_io(|fd| {
                // SAFETY: receiving into a buffer we own.
                let n =
                    unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => return Ok(Some(parse(&self.buf[..n])?.changes)),
                Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => return Ok(None),
                Ok(Err(e)) => return Err(e).context("reading rtnetlink"),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Dumps tried before an interrupted one is used.
const DUMP_TRIES: usize = 10;

/// The address dump, and whether the kernel says it was interrupted by a change
/// (`NLM_F_DUMP_INTR`: it may have skipped or repeated addresses).
fn dump_once() -> Result<(Vec<IfAddr>, bool)> {
    let fd = netlink_socket(0, false)?;
    // nlmsghdr (16) + ifaddrmsg (8), family AF_UNSPEC: both families.
    let mut req = [0u8; 24];
    req[0..4].copy_from_slice(&24u32.to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETADDR.to_ne_bytes());
    req[6..8].copy_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    // SAFETY: sending a buffer we own on a socket we own.
    if unsafe { libc::send(fd.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error()).context("requesting the rtnetlink address dump");
    }
    let mut out = Vec::new();
    let mut interrupted = false;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: receiving into a buffer we own.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error()).context("reading the rtnetlink address dump");
        }
        let parsed = parse(&buf[..n as usize])?;
        interrupted |= parsed.interrupted;
        out.extend(parsed.changes.into_iter().filter_map(|c| match c {
            AddrChange::New(a) => Some(a),
            AddrChange::Del(_) => None,
        }));
        if parsed.done {
            return Ok((out, interrupted));
        }
    }
}

/// A datagram's worth of netlink messages.
struct Parsed {
    changes: Vec<AddrChange>,
    /// NLMSG_DONE was seen: the dump is complete.
    done: bool,
    /// NLM_F_DUMP_INTR: addresses changed while the kernel dumped; the dump may have
    /// skipped some and must be repeated.
    interrupted: bool,
}

fn parse(mut data: &[u8]) -> Result<Parsed> {
    let mut parsed = Parsed {
        changes: Vec::new(),
        done: false,
        interrupted: false,
    };
    while data.len() >= 16 {
        let len = u32::from_ne_bytes(data[0..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(data[4..6].try_into().unwrap());
        let flags = u16::from_ne_bytes(data[6..8].try_into().unwrap());
        parsed.interrupted |= flags & NLM_F_DUMP_INTR != 0;
        if len < 16 || len > data.len() {
            bail!("malformed rtnetlink message (length {len})");
        }
        let body = &data[16..len];
        match ty {
            NLMSG_DONE | NLMSG_ERROR => {
                let errno = body
                    .get(0..4)
                    .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                    .unwrap_or(0);
                if errno != 0 {
                    return Err(io::Error::from_raw_os_error(-errno))
                        .context("rtnetlink address dump");
                }
                if ty == NLMSG_DONE {
                    parsed.done = true;
                    return Ok(parsed);
                }
            }
            RTM_NEWADDR | RTM_DELADDR => {
                parsed
                    .changes
                    .extend(parse_ifaddr(body).into_iter().map(|a| {
                        if ty == RTM_NEWADDR {
                            AddrChange::New(a)
                        } else {
                            AddrChange::Del(a)
                        }
                    }));
            }
            _ => {}
        }
        data = data.get((len + 3) & !3..).unwrap_or(&[]);
        if data.is_empty() {
            break;
        }
    }
    Ok(parsed)
}

fn parse_ifaddr(body: &[u8]) -> Vec<IfAddr> {
    if body.len() < 8 {
        return Vec::new();
    }
    let family = body[0];
    let prefix_len = body[1];
    let mut flags = u32::from(body[2]);
    let ifindex = u32::from_ne_bytes(body[4..8].try_into().unwrap());
    let (mut address, mut local, mut broadcast) = (None, None, None);
    let mut attrs = &body[8..];
    while attrs.len() >= 4 {
        let alen = u16::from_ne_bytes(attrs[0..2].try_into().unwrap()) as usize;
        let aty = u16::from_ne_bytes(attrs[2..4].try_into().unwrap());
        if alen < 4 || alen > attrs.len() {
            break;
        }
        let val = &attrs[4..alen];
        let ip = match (family as i32, val.len()) {
            (libc::AF_INET, 4) => Some(IpAddr::V4(Ipv4Addr::new(val[0], val[1], val[2], val[3]))),
            (libc::AF_INET6, 16) => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(val).unwrap(),
            ))),
            _ => None,
        };
        match aty {
            IFA_ADDRESS => address = ip,
            IFA_LOCAL => local = ip,
            IFA_BROADCAST => broadcast = ip,
            // IFA_FLAGS supersedes the 8-bit ifa_flags (which cannot hold every flag).
            IFA_FLAGS if val.len() == 4 => flags = u32::from_ne_bytes(val.try_into().unwrap()),
            _ => {}
        }
        attrs = attrs.get((alen + 3) & !3..).unwrap_or(&[]);
    }
    // IPv4: IFA_LOCAL is the interface's own address (IFA_ADDRESS is the peer on
    // point-to-point links). IPv6 only sends IFA_ADDRESS (or IFA_LOCAL with a peer).
    let Some(addr) = local.or(address) else {
        return Vec::new();
    };
    let tentative = flags & IFA_F_TENTATIVE != 0 && flags & IFA_F_OPTIMISTIC == 0;
    let usable = !tentative && flags & IFA_F_DADFAILED == 0;
    let mut out = vec![IfAddr {
        ifindex,
        addr,
        prefix_len,
        owner: addr,
        usable,
    }];
    // inet_bind() also accepts a subnet's broadcast address.
    if let Some(b) = broadcast.filter(|b| *b != addr) {
        out.push(IfAddr {
            ifindex,
            addr: b,
            prefix_len,
            owner: addr,
            usable: true,
        });
    }
    out
}

/// The interface's name in `netns` for log lines, or its index when it is already gone.
pub fn ifname(netns: &Netns, ifindex: u32) -> String {
    netns
        .run(|| Ok(ifname_here(ifindex)))
        .unwrap_or_else(|_| format!("ifindex {ifindex}"))
}

fn ifname_here(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buffer of IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("ifindex {ifindex}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name.
    unsafe { CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u16, family: u8, flags32: Option<u32>, attrs: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = vec![family, 24, 0, 0];
        body.extend_from_slice(&7u32.to_ne_bytes());
        let mut all: Vec<(u16, Vec<u8>)> = attrs.iter().map(|(t, v)| (*t, v.to_vec())).collect();
        if let Some(f) = flags32 {
            all.push((IFA_FLAGS, f.to_ne_bytes().to_vec()));
        }
        for (t, v) in all {
            body.extend_from_slice(&((4 + v.len()) as u16).to_ne_bytes());
            body.extend_from_slice(&t.to_ne_bytes());
            body.extend_from_slice(&v);
            while body.len() % 4 != 0 {
                body.push(0);
            }
        }
        let mut m = Vec::new();
        m.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&body);
        m
    }

    fn ifaddr(ifindex: u32, addr: &str, prefix_len: u8, owner: &str) -> IfAddr {
        IfAddr {
            ifindex,
            addr: addr.parse().unwrap(),
            prefix_len,
            owner: owner.parse().unwrap(),
            usable: true,
        }
    }

    #[test]
    fn ipv4_uses_the_local_address_and_its_broadcast() {
        let m = msg(
            RTM_NEWADDR,
            2,
            None,
            &[
                (IFA_ADDRESS, &[192, 0, 2, 10]),
                (IFA_LOCAL, &[192, 0, 2, 10]),
                (IFA_BROADCAST, &[192, 0, 2, 255]),
            ],
        );
        let p = parse(&m).unwrap();
        assert!(!p.done && !p.interrupted);
        assert_eq!(
            p.changes,
            [
                AddrChange::New(ifaddr(7, "192.0.2.10", 24, "192.0.2.10")),
                AddrChange::New(ifaddr(7, "192.0.2.255", 24, "192.0.2.10")),
            ]
        );
    }

    #[test]
    fn tentative_ipv6_is_not_usable_until_dad_completes() {
        let a: Ipv6Addr = "2001:db8::10".parse().unwrap();
        let c = parse(&msg(
            RTM_NEWADDR,
            10,
            Some(IFA_F_TENTATIVE),
            &[(IFA_ADDRESS, &a.octets())],
        ))
        .unwrap()
        .changes;
        let AddrChange::New(ifa) = c[0] else { panic!() };
        assert!(!ifa.usable);
        let mut set = LocalSet::default();
        assert_eq!(set.apply(c[0]), None);
        let optimistic = parse(&msg(
            RTM_NEWADDR,
            10,
            Some(IFA_F_TENTATIVE | IFA_F_OPTIMISTIC),
            &[(IFA_ADDRESS, &a.octets())],
        ))
        .unwrap()
        .changes;
        assert_eq!(
            set.apply(optimistic[0]),
            Some(Transition::BecameLocal),
            "optimistic DAD binds"
        );
        let c = parse(&msg(
            RTM_NEWADDR,
            10,
            Some(IFA_F_DADFAILED),
            &[(IFA_ADDRESS, &a.octets())],
        ))
        .unwrap()
        .changes;
        assert_eq!(
            set.apply(c[0]),
            Some(Transition::NoLongerLocal),
            "DAD failed"
        );
    }

    #[test]
    fn an_address_stays_local_until_its_last_holder_drops_it() {
        let mut set = LocalSet::default();
        let on1 = ifaddr(1, "192.0.2.10", 24, "192.0.2.10");
        let on2 = ifaddr(2, "192.0.2.10", 24, "192.0.2.10");
        let other_prefix = ifaddr(1, "192.0.2.10", 32, "192.0.2.10");
        assert_eq!(
            set.apply(AddrChange::New(on1)),
            Some(Transition::BecameLocal)
        );
        assert_eq!(
            set.apply(AddrChange::New(on1)),
            None,
            "a repeated RTM_NEWADDR changes nothing"
        );
        assert_eq!(set.apply(AddrChange::New(on2)), None);
        assert_eq!(set.apply(AddrChange::New(other_prefix)), None);
        assert_eq!(set.apply(AddrChange::Del(on1)), None);
        assert_eq!(set.apply(AddrChange::Del(other_prefix)), None);
        assert_eq!(
            set.apply(AddrChange::Del(on2)),
            Some(Transition::NoLongerLocal)
        );
    }

    #[test]
    fn a_broadcast_shared_by_two_addresses_stays_until_both_go() {
        let mut set = LocalSet::default();
        let b10 = ifaddr(1, "192.0.2.255", 24, "192.0.2.10");
        let b11 = ifaddr(1, "192.0.2.255", 24, "192.0.2.11");
        assert_eq!(
            set.apply(AddrChange::New(b10)),
            Some(Transition::BecameLocal)
        );
        assert_eq!(set.apply(AddrChange::New(b11)), None);
        assert_eq!(set.apply(AddrChange::Del(b10)), None);
        assert_eq!(
            set.apply(AddrChange::Del(b11)),
            Some(Transition::NoLongerLocal)
        );
    }

    fn done(flags: u16, errno: i32) -> Vec<u8> {
        let mut d = vec![0u8; 20];
        d[0..4].copy_from_slice(&20u32.to_ne_bytes());
        d[4..6].copy_from_slice(&NLMSG_DONE.to_ne_bytes());
        d[6..8].copy_from_slice(&flags.to_ne_bytes());
        d[16..20].copy_from_slice(&errno.to_ne_bytes());
        d
    }

    #[test]
    fn dump_end_interruption_and_errors_are_recognised() {
        let mut m = msg(RTM_NEWADDR, 2, None, &[(IFA_LOCAL, &[198, 51, 100, 1])]);
        m.extend_from_slice(&done(0, 0));
        let p = parse(&m).unwrap();
        assert_eq!(p.changes.len(), 1);
        assert!(p.done && !p.interrupted);
        assert!(parse(&done(NLM_F_DUMP_INTR, 0)).unwrap().interrupted);
        assert!(parse(&done(0, -libc::EBUSY)).is_err());
    }
}
