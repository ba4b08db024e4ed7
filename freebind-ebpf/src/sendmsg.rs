//! `cgroup/sendmsg4` and `cgroup/sendmsg6`: where unconnected UDP datagrams leave from.
//!
//! Steer mode: a parked socket's replies must come from the address the client talked to,
//! not from the parking address, so its datagrams get the intended address as source.
//!
//! Native mode: a freebind AF_INET6 socket may name any source in an `IPV6_PKTINFO` control
//! message (`ip6_datagram_send_ctl()` skips its locality check when
//! `ipv6_can_nonlocal_bind()`). Native mode must not hand that to sockets whose policy
//! would refuse the address as a bind. IPv4 needs no such check: `IP_PKTINFO` sources stay
//! checked unless the socket is IP_TRANSPARENT.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::generated::bpf_get_netns_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use freebind_common::{sock_flags, Verdict, AF_INET6, IPPROTO_UDP};

use crate::{
    addr::{store_ip6, Addr},
    sock::{self, Report},
};

#[cgroup_sock_addr(sendmsg4)]
pub fn fb_sendmsg4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; fields copied to locals before use.
    let (src, sk) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.msg_src_ip4, sa.__bindgen_anon_1.sk.cast::<c_void>())
    };
    // The source starts out as the socket's own address (the parking address) unless an
    // IP_PKTINFO control message named another one, which is left alone. This hook also
    // sees AF_INET6 sockets parked on a v4-mapped address when they send to IPv4 peers.
    if let Some((_, intended)) = sock::parked(sk, &Addr::v4(src)) {
        // SAFETY: sendmsg hooks may set the source.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*ctx.sock_addr).msg_src_ip4),
                intended.ip4_word(),
            )
        };
    }
    1
}

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
    // The source is the socket's own address unless an IPV6_PKTINFO control message named
    // another; some kernels fill it in before this hook, others after, so an empty one
    // stands for the socket's address too. A parked socket's own address is its parking
    // address.
    let own = if src == [0; 4] {
        // SAFETY: `sk` of a sendmsg hook is a full socket; 4-byte reads.
        unsafe {
            let s = &*sk;
            [s.src_ip6[0], s.src_ip6[1], s.src_ip6[2], s.src_ip6[3]]
        }
    } else {
        src
    };
    if let Some((_, intended)) = sock::parked(sk.cast(), &Addr::v6(own)) {
        // SAFETY: sendmsg hooks may set the source.
        unsafe {
            store_ip6(
                ptr::addr_of_mut!((*ctx.sock_addr).msg_src_ip6),
                intended.ip6_words(),
            )
        };
        return 1;
    }
    if src == [0; 4] {
        // No source asked for: the kernel picks a local one.
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
    sock::report(Report {
        family: AF_INET6,
        protocol: IPPROTO_UDP,
        port: u16::from_be(port as u16),
        addr: &addr,
        verdict: Verdict::RefusedSource,
        slot: 0,
        netns_cookie,
    });
    // 0: the kernel fails sendmsg() with EPERM.
    0
}
