//! `cgroup/bind4` and `cgroup/bind6`: one decision per bind, reported as an event; steer
//! mode's parking happens here.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use freebind_common::{sock_flags, Verdict, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    addr::{store_ip6, Addr},
    park,
    sock::{self, Report},
};

const EADDRNOTAVAIL: i32 = 99;

#[cgroup_sock_addr(bind4)]
pub fn fb_bind4(ctx: SockAddrContext) -> i32 {
    // SAFETY: the kernel hands the hook a valid `bpf_sock_addr`.
    let ip = unsafe { (*ctx.sock_addr).user_ip4 };
    decide(&ctx, Addr::v4(ip), false)
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
    decide(&ctx, Addr::v6(ip), true)
}

/// Returns 1 to let the bind proceed, 0 to fail it with the retval set here. `hook6` is
/// a constant per hook: each may only touch its own family's context fields, and the
/// verifier checks every branch it cannot prove dead.
#[inline(always)]
fn decide(ctx: &SockAddrContext, addr: Addr, hook6: bool) -> i32 {
    // SAFETY: valid context, fields copied to locals before use.
    let (family, protocol, port, sk) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.family,
            sa.protocol,
            sa.user_port,
            sa.__bindgen_anon_1.sk.cast::<c_void>(),
        )
    };
    if protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32 {
        return 1;
    }
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(port as u16);

    let netns_cookie = if addr.is_kernel_special() {
        0
    } else {
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    };
    let (verdict, slot) = verdict(sk, &addr, netns_cookie);
    let allow = match verdict {
        Verdict::Steered => park(ctx, sk, &addr, netns_cookie, slot, hook6),
        Verdict::Refused | Verdict::NoParking => false,
        _ => {
            // A socket whose earlier bind was parked but failed (EADDRINUSE) and that now
            // binds elsewhere is no longer steered.
            if let Some(state) = sock::steered(sk) {
                state.flags &= !sock_flags::STEERED;
            }
            true
        }
    };
    let verdict = if allow || verdict != Verdict::Steered {
        verdict
    } else {
        Verdict::NoParking
    };
    if !allow {
        // The error the kernel itself gives a non-local bind; without this a 0 return
        // becomes EPERM. Needs bpf_set_retval (Linux 5.18).
        unsafe { bpf_set_retval(-EADDRNOTAVAIL) };
    }
    debug!(ctx, "bind port {} verdict {}", port, verdict as u8);
    sock::report(Report {
        family: family as u8,
        protocol: protocol as u8,
        port,
        addr: &addr,
        verdict,
        slot,
        netns_cookie,
    });
    allow as i32
}

/// The verdict, and the parking slot when it is [`Verdict::Steered`].
#[inline(always)]
fn verdict(sk: *mut c_void, addr: &Addr, netns_cookie: u64) -> (Verdict, u32) {
    if addr.is_kernel_special() {
        return (Verdict::Local, 0);
    }
    if !sock::served(netns_cookie) {
        return (Verdict::OtherNetns, 0);
    }
    let local = addr.is_local(netns_cookie);
    let flags = sock::state_flags(sk);
    if flags & sock_flags::APP_FREEBIND != 0 {
        return (
            if local {
                Verdict::Local
            } else {
                Verdict::AppFreebind
            },
            0,
        );
    }
    if !local && !addr.is_allowed() {
        return (Verdict::Refused, 0);
    }
    // Once an address is parked in this namespace every bind of it parks, present or not,
    // native or not: a second server on the same address and port must meet the first
    // one's socket (EADDRINUSE) as it would without freebind, and traffic for the address
    // must reach whichever socket holds it.
    if let Some(slot) = park::existing(netns_cookie, addr) {
        return (Verdict::Steered, slot);
    }
    if local {
        return (Verdict::Local, 0);
    }
    if flags & sock_flags::NATIVE != 0 {
        return (Verdict::Freebind, 0);
    }
    match park::allocate(netns_cookie, addr) {
        Some(slot) => (Verdict::Steered, slot),
        None => (Verdict::NoParking, 0),
    }
}

/// Rewrites the bind to the parking address (same port) and records what the socket asked
/// for. False when the socket's storage cannot be had (memory): the bind is refused.
#[inline(always)]
fn park(
    ctx: &SockAddrContext,
    sk: *mut c_void,
    addr: &Addr,
    netns_cookie: u64,
    slot: u32,
    hook6: bool,
) -> bool {
    let Some(state) = sock::state(sk, true) else {
        return false;
    };
    state.flags |= sock_flags::STEERED;
    state.slot = slot;
    state.netns_cookie = netns_cookie;
    state.intended = addr.bytes;
    state.intended_is_v4 = addr.is_v4 as u8;
    let parked = park::address(addr, slot);
    // SAFETY: valid context; bind hooks may rewrite the address.
    unsafe {
        let sa = &mut *ctx.sock_addr;
        if hook6 {
            store_ip6(ptr::addr_of_mut!(sa.user_ip6), parked.ip6_words());
        } else {
            ptr::write_volatile(ptr::addr_of_mut!(sa.user_ip4), parked.ip4_word());
        }
    }
    true
}
