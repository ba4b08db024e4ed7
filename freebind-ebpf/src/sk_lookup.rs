//! `sk_lookup`: attached once per served network namespace (each its own load of this
//! object, with its own `STEER_SOCKS`). Hands traffic for an intended address to the socket
//! parked for it, and refuses traffic to parking addresses: a parked service must not be
//! reachable through 127.254.x.y or the IPv6 parking prefix.
use aya_ebpf::{macros::sk_lookup, programs::SkLookupContext};
use freebind_common::{SteerKey, AF_INET};

use crate::{addr::Addr, maps::STEER_SOCKS};

const SK_DROP: u32 = 0;
const SK_PASS: u32 = 1;

#[sk_lookup]
pub fn fb_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: valid context; 4-byte reads copied to locals.
    let (family, protocol, port, ip4, ip6) = unsafe {
        let l = &*ctx.lookup;
        (
            l.family,
            l.protocol,
            l.local_port,
            l.local_ip4,
            [
                l.local_ip6[0],
                l.local_ip6[1],
                l.local_ip6[2],
                l.local_ip6[3],
            ],
        )
    };
    let dst = if family == AF_INET as u32 {
        Addr::v4(ip4)
    } else {
        Addr::v6(ip6)
    };
    if dst.is_parking() {
        // The lookup fails as if nothing listened: RST for TCP, port unreachable for UDP.
        return SK_DROP;
    }
    let key = SteerKey {
        addr: dst.bytes,
        // `local_port` is in host byte order.
        port: port as u16,
        family: dst.family(),
        protocol: protocol as u8,
    };
    // Not found, or not assignable (a TCP socket not listening yet, a UDP socket that
    // connected): the kernel's own lookup goes on.
    let _ = STEER_SOCKS.redirect_sk_lookup(&ctx, key, 0);
    SK_PASS
}
