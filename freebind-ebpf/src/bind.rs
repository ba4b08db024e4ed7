//! `cgroup/bind4` and `cgroup/bind6`: one decision per bind, reported as an event.
use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use freebind_common::{sock_flags, Verdict, IPPROTO_TCP, IPPROTO_UDP};

use crate::{addr::Addr, sock};

const EADDRNOTAVAIL: i32 = 99;

#[cgroup_sock_addr(bind4)]
pub fn fb_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the hook a valid `bpf_sock_addr`.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    decide(&ctx, Addr::v4(ip))
}

#[cgroup_sock_addr(bind6)]
pub fn fb_bind6(ctx: SockAddrContext) -> i32 {
    // SAFETY: as above. Copied field by field: the verifier wants 4-byte context reads.
    let ip = unsafe {
        let sa = &*ctx.sock_addr;
        [
            sa.user_ip6[0],
            sa.user_ip6[1],
            sa.user_ip6[2],
            sa.user_ip6[3],
        ]
    };
    decide(&ctx, Addr::v6(ip))
}

/// Returns 1 to let the bind proceed, 0 to fail it with the retval set here.
#[inline(always)]
fn decide(ctx: &SockAddrContext, addr: Addr) -> i32 {
    // SAFETY: valid context, fields copied to locals before use.
    let (family, protocol, port) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.family, sa.protocol, sa.user_port)
    };
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return 1;
    }
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(port as u16);

    let verdict = verdict(ctx, &addr);
    let allow = verdict != Verdict::Refused;
    if !allow {
        // The error the kernel itself gives a non-local bind; without this a 0 return
        // becomes EPERM. Needs bpf_set_retval (Linux 5.18).
        unsafe { bpf_set_retval(-EADDRNOTAVAIL) };
    }
    debug!(ctx, "bind port {} verdict {}", port, verdict as u8);
    sock::report(family as u8, protocol as u8, port, &addr, verdict);
    allow as i32
}

#[inline(always)]
fn verdict(ctx: &SockAddrContext, addr: &Addr) -> Verdict {
    if addr.is_kernel_special() {
        return Verdict::Local;
    }
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if !sock::served(netns_cookie) {
        return Verdict::OtherNetns;
    }
    if addr.is_local(netns_cookie) {
        return Verdict::Local;
    }
    // SAFETY: `sk` of a bind hook is a full socket.
    let flags = sock::state_flags(unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }.cast());
    if flags & sock_flags::APP_FREEBIND != 0 {
        return Verdict::AppFreebind;
    }
    if !addr.is_allowed() {
        return Verdict::Refused;
    }
    if flags & sock_flags::NATIVE != 0 {
        Verdict::Freebind
    } else {
        Verdict::NotFreebind
    }
}
