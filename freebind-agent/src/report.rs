//! Turning the programs' bind events into the lines an operator reads.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use freebind_common::{BindEvent, Verdict, IPPROTO_TCP};

use crate::parking;

/// Decodes a ring-buffer record; `None` when it is not a `BindEvent` of this build.
pub fn decode(bytes: &[u8]) -> Option<BindEvent> {
    if bytes.len() < std::mem::size_of::<BindEvent>() {
        return None;
    }
    // SAFETY: BindEvent is Pod (`aya::Pod`): any bytes of the right length are a valid value.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<BindEvent>()) })
}

pub fn event_addr(ev: &BindEvent) -> IpAddr {
    if ev.addr_is_v4 != 0 {
        IpAddr::V4(Ipv4Addr::new(
            ev.addr[0], ev.addr[1], ev.addr[2], ev.addr[3],
        ))
    } else {
        IpAddr::V6(Ipv6Addr::from(ev.addr))
    }
}

pub fn comm(ev: &BindEvent) -> String {
    let end = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    String::from_utf8_lossy(&ev.comm[..end]).into_owned()
}

/// `bind 192.0.2.10:8080/tcp by nginx (pid 812): freebind — not local; made freebind …`.
pub fn describe(ev: &BindEvent) -> (log::Level, String) {
    let proto = if ev.protocol == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    };
    let addr = match event_addr(ev) {
        IpAddr::V4(a) => format!("{a}:{}", ev.port),
        IpAddr::V6(a) => format!("[{a}]:{}", ev.port),
    };
    use log::Level::{Info, Warn};
    let Some(verdict) = Verdict::from_u8(ev.verdict) else {
        return (
            Warn,
            format!(
                "event with a verdict ({}) unknown to this agent",
                ev.verdict
            ),
        );
    };
    let parked_at = parking::address(ev.addr_is_v4 != 0, ev.slot);
    let steered;
    let parked_connect;
    let (level, why) = match verdict {
        Verdict::Local => (Info, "the address is local; nothing to do"),
        Verdict::Freebind => (Info, "not local; the socket was made freebind (native mode)"),
        Verdict::AppFreebind => (Info, "not local; the application set IP_FREEBIND itself"),
        Verdict::Refused => (Warn, "not local and outside the policy: EADDRNOTAVAIL"),
        Verdict::NotFreebind => (
            Warn,
            "not local, and native mode did not make the socket freebind (no eligible setsockopt() before bind(), \
             or a 32-bit process, whose setsockopt() cgroup programs do not see): the kernel answers EADDRNOTAVAIL",
        ),
        Verdict::OtherNetns => (
            Info,
            "in a network namespace this agent does not serve: left to the kernel (name it with \
             --netns, or run the agent inside it)",
        ),
        Verdict::RefusedSource => (
            Warn,
            "a datagram asked for this non-local source (IPV6_PKTINFO) outside the policy: EPERM",
        ),
        Verdict::Steered => {
            steered = format!(
                "not local (or already parked here), and no setsockopt() came before bind(): \
                 parked at {parked_at} and steered there (steer mode)"
            );
            (Info, steered.as_str())
        }
        Verdict::NoParking if !crate::kernel::modes().steers(ev.protocol) => (
            Warn,
            "not local, and no setsockopt() came before bind(); steer mode would take it, but \
             this kernel cannot steer these sockets (see `freebind-agent check`): \
             EADDRNOTAVAIL, as without freebind",
        ),
        Verdict::NoParking => (
            Warn,
            "not local, and steer mode has no parking address left for it in this network \
             namespace (or the namespace has no IPv6): EADDRNOTAVAIL",
        ),
        Verdict::ParkedConnect => {
            parked_connect = format!(
                "this socket is parked at {parked_at}, and a parked socket cannot connect to a \
                 peer on another host (steer mode is for servers; the kernel refuses a loopback \
                 source there). Have the program call setsockopt() before bind() so that native \
                 mode takes it (socat: add the reuseaddr option), or start it once its address \
                 exists"
            );
            (Warn, parked_connect.as_str())
        }
        Verdict::InUse => (
            Warn,
            "not local, and a socket already receives for this address and port: EADDRINUSE, \
             as without freebind",
        ),
    };
    let what = match verdict {
        Verdict::RefusedSource => format!(
            "sendmsg/{proto} from {} to port {}",
            event_addr(ev),
            ev.port
        ),
        Verdict::ParkedConnect => format!("connect from {addr}/{proto}"),
        _ => format!("bind {addr}/{proto}"),
    };
    (
        level,
        format!(
            "{what} by {} (pid {}, cgroup id {}): {} — {why}",
            comm(ev),
            ev.pid,
            ev.cgroup_id,
            verdict.as_str()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_freebind_decision() {
        let mut ev = BindEvent {
            cgroup_id: 42,
            pid: 812,
            port: 8080,
            family: 2,
            protocol: 6,
            addr: [0; 16],
            comm: [0; 16],
            verdict: Verdict::Freebind as u8,
            addr_is_v4: 1,
            _pad: [0; 2],
            slot: 0,
            netns_cookie: 1,
        };
        ev.addr[..4].copy_from_slice(&[192, 0, 2, 10]);
        ev.comm[..5].copy_from_slice(b"nginx");
        let (level, line) = describe(&ev);
        assert_eq!(level, log::Level::Info);
        assert!(
            line.starts_with("bind 192.0.2.10:8080/tcp by nginx (pid 812, cgroup id 42): freebind"),
            "{line}"
        );

        ev.verdict = Verdict::Steered as u8;
        ev.slot = 0x0102;
        let (_, line) = describe(&ev);
        assert!(line.contains(": steered — "), "{line}");
        assert!(line.contains("parked at 127.254.1.2 "), "{line}");

        ev.verdict = Verdict::ParkedConnect as u8;
        let (level, line) = describe(&ev);
        assert_eq!(level, log::Level::Warn);
        assert!(
            line.starts_with("connect from 192.0.2.10:8080/tcp by nginx"),
            "{line}"
        );
        assert!(line.contains("parked at 127.254.1.2,"), "{line}");
        assert!(line.contains("reuseaddr"), "{line}");
    }
}
