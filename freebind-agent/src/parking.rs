//! Steer mode's IPv6 parking addresses: `inet6_bind()` accepts only addresses assigned in
//! the namespace (a local route is not enough), so the agent assigns the pool on `lo` in
//! every namespace it serves, with `nodad` (usable at once) and host scope (never chosen as
//! a source for anything else), and removes it when it stops serving the namespace.
//! IPv4 needs nothing: all of 127.0.0.0/8 is local while `lo` is up.
use std::{
    io,
    net::{IpAddr, Ipv6Addr},
    os::fd::{AsFd as _, AsRawFd as _},
    sync::Arc,
};

use anyhow::{Context as _, Result};
use freebind_common::parking;

use crate::{addrwatch::netlink_socket, kernel, netns::Netns};

const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const IFA_FLAGS: u16 = 8;
const IFA_F_NODAD: u32 = 0x02;
const RT_SCOPE_HOST: u8 = 254;

/// Every IPv6 parking address, slot 1 first.
pub fn v6_pool() -> impl Iterator<Item = Ipv6Addr> {
    (1..=parking::V6_SLOTS).map(|slot| Ipv6Addr::from(parking::v6(slot)))
}

/// The parking address of a slot, for log lines.
pub fn address(is_v4: bool, slot: u32) -> IpAddr {
    if is_v4 {
        IpAddr::from(parking::v4(slot))
    } else {
        IpAddr::from(parking::v6(slot))
    }
}

/// Is `addr` one of freebind's parking addresses?
pub fn is_parking(addr: &IpAddr) -> bool {
    match addr.to_canonical() {
        IpAddr::V4(a) => parking::is_v4(&a.octets()),
        IpAddr::V6(a) => parking::is_v6(&a.octets()),
    }
}

/// The IPv6 pool on `lo` of one namespace, shared by every agent serving it; the last one
/// to stop removes it.
pub struct V6Pool {
    netns: Arc<Netns>,
}

/// What [`check_lo`] found.
pub struct LoState {
    pub up: bool,
    pub ipv6: bool,
}

/// Is `lo` up in the namespace (IPv4 parking needs it), and does it have IPv6?
pub fn check_lo(netns: &Netns) -> Result<LoState> {
    netns.run(|| {
        let up = lo_up_ioctl()?;
        // /proc/sys/net is the reading thread's namespace. IPv6 is off when the kernel has
        // none or when lo has it disabled (a common hardening), which refuses addresses.
        let ipv6 = std::fs::read_to_string("/proc/sys/net/ipv6/conf/lo/disable_ipv6")
            .is_ok_and(|v| v.trim() == "0");
        Ok(LoState { up, ipv6 })
    })
}

fn lo_up_ioctl() -> Result<bool> {
    // SAFETY: an ioctl on a socket this function owns, with an ifreq it owns.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a socket");
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        ifr.ifr_name[0] = b'l' as libc::c_char;
        ifr.ifr_name[1] = b'o' as libc::c_char;
        let rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err).context("reading the flags of lo (SIOCGIFFLAGS)");
        }
        Ok(ifr.ifr_ifru.ifru_flags & libc::IFF_UP as libc::c_short != 0)
    }
}

impl V6Pool {
    /// Removes a pool an earlier agent left on `lo` (it exited leaving its pins), unless an
    /// sk_lookup program still serves the namespace: `detach --all` with no daemon running.
    pub fn release(netns: Arc<Netns>) {
        drop(Self { netns });
    }

    /// Assigns the pool on `lo`; `None` when the namespace refuses IPv6 addresses there.
    /// An address already there (another agent serving the namespace) is shared. A failure
    /// halfway undoes the assignment, as a stop does.
    pub fn assign(netns: Arc<Netns>) -> Result<Option<Self>> {
        let pool = Self { netns };
        pool.netns
            .run(|| {
                let lo = lo_index()?;
                for addr in v6_pool() {
                    match request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, lo, addr) {
                        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                        // IPv6 disabled on lo after we looked.
                        Err(e) if e.raw_os_error() == Some(libc::EACCES) => return Ok(false),
                        r => r.with_context(|| format!("adding parking address {addr} to lo"))?,
                    }
                }
                Ok(true)
            })
            .context("assigning steer mode's IPv6 parking addresses")
            .map(|assigned| assigned.then_some(pool))
    }
}

impl Drop for V6Pool {
    /// Removes the pool unless another sk_lookup program (another agent's) still serves the
    /// namespace and may have parked sockets there. The caller detaches its own sk_lookup
    /// program first, so of two agents stopping together the second to look always sees
    /// none left and removes the pool: whoever added the addresses, the last one out
    /// removes them.
    fn drop(&mut self) {
        match kernel::sk_lookup_programs(self.netns.as_fd()) {
            Ok(0) => {}
            Ok(n) => {
                log::info!(
                    "leaving the IPv6 parking addresses on lo in {}: {n} other sk_lookup program(s) still serve it",
                    self.netns.label()
                );
                return;
            }
            Err(e) => log::debug!("querying sk_lookup programs in {}: {e}", self.netns.label()),
        }
        let result = self.netns.run(|| {
            let lo = lo_index()?;
            for addr in v6_pool() {
                match request(RTM_DELADDR, 0, lo, addr) {
                    Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => {}
                    r => r.with_context(|| format!("removing parking address {addr} from lo"))?,
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            log::warn!("{e:#}");
        }
    }
}

fn lo_index() -> Result<u32> {
    // SAFETY: a NUL-terminated name.
    match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => Err(io::Error::last_os_error()).context("finding lo"),
        i => Ok(i),
    }
}

/// One RTM_NEWADDR/RTM_DELADDR for `addr`/128 on `ifindex`, acknowledged.
fn request(ty: u16, flags: u16, ifindex: u32, addr: Ipv6Addr) -> io::Result<()> {
    let fd = netlink_socket(0, false).map_err(io::Error::other)?;
    let mut msg = Vec::with_capacity(80);
    msg.extend_from_slice(&0u32.to_ne_bytes()); // length, set below
    msg.extend_from_slice(&ty.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK | flags).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    msg.extend_from_slice(&0u32.to_ne_bytes()); // port id
                                                // struct ifaddrmsg
    msg.extend_from_slice(&[libc::AF_INET6 as u8, 128, IFA_F_NODAD as u8, RT_SCOPE_HOST]);
    msg.extend_from_slice(&ifindex.to_ne_bytes());
    for attr in [IFA_LOCAL, IFA_ADDRESS] {
        msg.extend_from_slice(&20u16.to_ne_bytes());
        msg.extend_from_slice(&attr.to_ne_bytes());
        msg.extend_from_slice(&addr.octets());
    }
    msg.extend_from_slice(&8u16.to_ne_bytes());
    msg.extend_from_slice(&IFA_FLAGS.to_ne_bytes());
    msg.extend_from_slice(&IFA_F_NODAD.to_ne_bytes());
    let len = msg.len() as u32;
    msg[0..4].copy_from_slice(&len.to_ne_bytes());
    // SAFETY: send and recv on a socket we own, with buffers we own.
    unsafe {
        if libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = [0u8; 1024];
        let n = libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        ack(&buf[..n as usize])
    }
}

fn ack(reply: &[u8]) -> io::Result<()> {
    if reply.len() < 20 || u16::from_ne_bytes([reply[4], reply[5]]) != NLMSG_ERROR {
        return Err(io::Error::other("unexpected rtnetlink reply"));
    }
    match i32::from_ne_bytes(reply[16..20].try_into().unwrap()) {
        0 => Ok(()),
        e => Err(io::Error::from_raw_os_error(-e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parking_addresses_are_recognised_in_both_families() {
        assert_eq!(address(true, 258), "127.254.1.2".parse::<IpAddr>().unwrap());
        assert_eq!(
            address(false, 32),
            "fd66:7265:6562:696e::20".parse::<IpAddr>().unwrap()
        );
        for a in [
            "127.254.0.9",
            "::ffff:127.254.3.4",
            "fd66:7265:6562:696e::1",
        ] {
            assert!(is_parking(&a.parse().unwrap()), "{a}");
        }
        for a in [
            "127.0.0.1",
            "192.0.2.10",
            "fd66:7265:6562:696f::1",
            "2001:db8::1",
        ] {
            assert!(!is_parking(&a.parse().unwrap()), "{a}");
        }
        assert_eq!(v6_pool().count(), 32);
    }
}
