//! `cgroup/connect4` and `cgroup/connect6`: a parked socket cannot reach a peer off the
//! host. Its source is the parking address, and the kernel refuses a loopback source
//! towards anything but loopback (EINVAL) — socat's UDP-LISTEN, which connects back to its
//! first peer, and TCP clients bound to an absent address meet this. The connect goes on
//! to that error untouched; the operator gets one event per socket saying why and what to
//! do instead.
use core::ffi::c_void;

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use freebind_common::{sock_flags, Verdict};

use crate::{
    addr::Addr,
    sock::{self, Report},
};

#[cgroup_sock_addr(connect4)]
pub fn fb_connect4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; fields copied to locals before use.
    let peer = unsafe { Addr::v4((*ctx.sock_addr).user_ip4) };
    on_connect(&ctx, peer)
}

#[cgroup_sock_addr(connect6)]
pub fn fb_connect6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above; 4-byte reads.
    let peer = unsafe {
        let sa = &*ctx.sock_addr;
        Addr::v6([
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ])
    };
    on_connect(&ctx, peer)
}

#[inline(always)]
fn on_connect(ctx: &SockAddrContext, peer: Addr) -> i32 {
    // SAFETY: valid context.
    let (sk, family, protocol, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.__bindgen_anon_1.sk.cast::<c_void>(),
            sa.family,
            sa.protocol,
            sa.user_port,
        )
    };
    let Some(state) = sock::steered(sk) else {
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
        port: u16::from_be(port as u16),
        addr: &peer,
        verdict: Verdict::ParkedConnect,
        slot,
        netns_cookie,
    });
    1
}
