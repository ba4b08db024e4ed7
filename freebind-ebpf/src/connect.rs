//! `cgroup/connect4` and `cgroup/connect6`: a parked socket cannot reach a peer on another
//! host. Its source is the parking address, and the kernel refuses a loopback source
//! towards anything but loopback (EINVAL) — socat's UDP-LISTEN, which connects back to its
//! first peer, and TCP clients bound to an absent address meet this. The connect goes on
//! untouched; the operator gets one event per socket saying why and what to do instead.
use core::ffi::c_void;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use freebind_common::{sock_flags, Verdict, AF_INET};

use crate::{
    addr::Addr,
    sock::{self, Report},
};

#[cgroup_sock_addr(connect4)]
pub fn fb_connect4(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn fb_connect6(ctx: SockAddrContext) -> i32 {
    on_connect(&ctx)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext) -> i32 {
    // SAFETY: valid context; `sk` of a connect hook is a full socket; 4-byte reads.
    let (sk, family, protocol, bound, port) = unsafe {
        let sa = &*ctx.sock_addr;
        let sk = &*sa.__bindgen_anon_1.sk;
        let bound = if sk.family == AF_INET as u32 {
            Addr::v4(sk.src_ip4)
        } else {
            Addr::v6([sk.src_ip6[0], sk.src_ip6[1], sk.src_ip6[2], sk.src_ip6[3]])
        };
        (
            sa.__bindgen_anon_1.sk.cast::<c_void>(),
            sa.family,
            sa.protocol,
            bound,
            sk.src_port,
        )
    };
    let Some((state, intended)) = sock::parked(sk, &bound) else {
        return 1;
    };
    if state.flags & sock_flags::CONNECT_REPORTED != 0 {
        return 1;
    }
    state.flags |= sock_flags::CONNECT_REPORTED;
    let (slot, netns_cookie) = (state.slot, state.netns_cookie);
    sock::report(Report {
        family: family as u8,
        protocol: protocol as u8,
        // `src_port` is in host byte order.
        port: port as u16,
        addr: &intended,
        verdict: Verdict::ParkedConnect,
        slot,
        netns_cookie,
    });
    1
}
