//! Turning the programs' bind events into the lines an operator reads.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use freebind_common::{BindEvent, Verdict, IPPROTO_TCP};

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

fn comm(ev: &BindEvent) -> String {
    let end = ev
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(ev.comm.len());
    String::from_utf8_lossy(&ev.comm[..end]).into_owned()
}

/// `bind 192.0.2.10:8080/tcp by nginx (pid 812): freebind — not local; made freebind …`
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
    let (level, verdict, why) = match Verdict::from_u8(ev.verdict) {
        Some(Verdict::Local) => (log::Level::Info, "local", "the address is local; nothing to do"),
        Some(Verdict::Freebind) => (log::Level::Info, "freebind", "not local; the socket was made freebind (native mode)"),
        Some(Verdict::AppFreebind) => (log::Level::Info, "app-freebind", "not local; the application set IP_FREEBIND itself"),
        Some(Verdict::Refused) => (log::Level::Warn, "refused", "not local and outside the policy: EADDRNOTAVAIL"),
        Some(Verdict::NotFreebind) => (
            log::Level::Warn,
            "not-freebind",
            "not local, and no setsockopt() came before bind(), so native mode could not act: the kernel answers EADDRNOTAVAIL",
        ),
        None => (log::Level::Warn, "unknown", "verdict not known to this agent"),
    };
    (
        level,
        format!(
            "bind {addr}/{proto} by {} (pid {}, cgroup id {}): {verdict} — {why}",
            comm(ev),
            ev.pid,
            ev.cgroup_id
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
            _pad: [0; 6],
        };
        ev.addr[..4].copy_from_slice(&[192, 0, 2, 10]);
        ev.comm[..5].copy_from_slice(b"nginx");
        let (level, line) = describe(&ev);
        assert_eq!(level, log::Level::Info);
        assert!(
            line.starts_with("bind 192.0.2.10:8080/tcp by nginx (pid 812, cgroup id 42): freebind"),
            "{line}"
        );
    }
}
