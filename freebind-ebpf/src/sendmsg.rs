//! `cgroup/sendmsg6`: the policy for per-datagram IPv6 sources.
//!
//! A freebind AF_INET6 socket may name any source in an `IPV6_PKTINFO` control message
//! (`ip6_datagram_send_ctl()` skips its locality check when `ipv6_can_nonlocal_bind()`).
//! Native mode must not hand that to sockets whose policy would refuse the address as a
//! bind. IPv4 needs no such hook: `IP_PKTINFO` sources stay checked unless the socket is
//! IP_TRANSPARENT.
use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use freebind_common::{sock_flags, Verdict, AF_INET6, IPPROTO_UDP};

use crate::{addr::Addr, sock};

#[cgroup_sock_addr(sendmsg6)]
pub fn fb_sendmsg6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; fields copied to locals before use.
    let (src, port, sk) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            [
                sa.msg_src_ip6[0],
                sa.msg_src_ip6[1],
                sa.msg_src_ip6[2],
                sa.msg_src_ip6[3],
            ],
            sa.user_port,
            sa.__bindgen_anon_1.sk,
        )
    };
    // No source asked for: the kernel picks a local one.
    if src == [0; 4] {
        return 1;
    }
    // Only sockets native mode made freebind; everything else keeps the kernel's checks.
    if sock::state_flags(sk.cast()) & sock_flags::NATIVE == 0 {
        return 1;
    }
    let addr = Addr::v6(src);
    if addr.is_kernel_special() || addr.is_allowed() {
        return 1;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if addr.is_local(netns_cookie) {
        return 1;
    }
    sock::report(
        AF_INET6,
        IPPROTO_UDP,
        u16::from_be(port as u16),
        &addr,
        Verdict::RefusedSource,
    );
    // 0: the kernel fails sendmsg() with EPERM.
    0
}
