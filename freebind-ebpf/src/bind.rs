//! `cgroup/bind4` and `cgroup/bind6`: one decision per bind, reported as an event; steer
//! mode's parking happens here.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    bindings::bpf_sock_tuple,
    helpers::generated::{
        bpf_get_netns_cookie, bpf_set_retval, bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use freebind_common::{served_flags, sock_flags, Verdict, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    addr::{store_ip6, Addr},
    park,
    sock::{self, Report},
};

const EADDRINUSE: i32 = 98;
const EADDRNOTAVAIL: i32 = 99;
/// The namespace of the context's socket (`BPF_F_CURRENT_NETNS`, -1).
const BPF_F_CURRENT_NETNS: u64 = u64::MAX;
/// `sizeof(tuple->ipv4)` and `sizeof(tuple->ipv6)` of `struct bpf_sock_tuple`.
const IPV4_TUPLE: u32 = 12;
const IPV6_TUPLE: u32 = 36;

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
    // A socket that is already bound gets EINVAL from the kernel after this hook; it must
    // not be judged (nor its parked state overwritten) as if this were its bind.
    // SAFETY: `sk` of a bind hook is a full socket.
    if unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk.as_ref() }.is_some_and(|s| s.src_port != 0) {
        return 1;
    }
    // `user_port` holds the port in network byte order in its low 16 bits.
    let port = u16::from_be(port as u16);

    let netns_cookie = if addr.is_kernel_special() {
        0
    } else {
        unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
    };
    let (verdict, slot) = verdict(ctx, sk, &addr, netns_cookie, port, protocol);
    let allow = match verdict {
        Verdict::Steered => park(ctx, sk, &addr, netns_cookie, slot, hook6),
        Verdict::Refused | Verdict::NoParking | Verdict::InUse => false,
        _ => {
            // A socket whose earlier bind was parked (or freebind) but failed (EADDRINUSE)
            // and that now binds elsewhere is judged by this bind alone.
            if let Some(state) = sock::state(sk, false) {
                state.flags &= !(sock_flags::STEERED | sock_flags::BOUND_ABSENT);
                if matches!(verdict, Verdict::Freebind | Verdict::AppFreebind) {
                    state.flags |= sock_flags::BOUND_ABSENT;
                }
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
        // The errors the kernel itself gives; without this a 0 return becomes EPERM. Needs
        // bpf_set_retval (Linux 5.18).
        let errno = if verdict == Verdict::InUse {
            EADDRINUSE
        } else {
            EADDRNOTAVAIL
        };
        unsafe { bpf_set_retval(-errno) };
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
fn verdict(
    ctx: &SockAddrContext,
    sk: *mut c_void,
    addr: &Addr,
    netns_cookie: u64,
    port: u16,
    protocol: u32,
) -> (Verdict, u32) {
    if addr.is_kernel_special() {
        return (Verdict::Local, 0);
    }
    let Some(served) = sock::served(netns_cookie) else {
        return (Verdict::OtherNetns, 0);
    };
    // Local addresses are the kernel's to decide, whatever freebind did before: parking a
    // bind of a present address would let it slip past the kernel's EADDRINUSE check
    // against whoever holds that address and port.
    if addr.is_local(netns_cookie) {
        return (Verdict::Local, 0);
    }
    let flags = sock::state_flags(sk);
    if flags & sock_flags::APP_FREEBIND != 0 {
        return (Verdict::AppFreebind, 0);
    }
    if !addr.is_allowed() {
        return (Verdict::Refused, 0);
    }
    if flags & sock_flags::NATIVE != 0 {
        return (Verdict::Freebind, 0);
    }
    // Where the kernel lacks a steering piece the agent leaves the flag out: the bind
    // fails as it would without freebind rather than park where nothing steers.
    let steers = if protocol == IPPROTO_TCP as u32 {
        served_flags::STEER
    } else {
        served_flags::STEER_UDP
    };
    if served & steers == 0 {
        return (Verdict::NoParking, 0);
    }
    // A parked socket is bound to its parking address, so the kernel cannot see that the
    // address and port it asked for are taken (by another freebind socket, or a parked
    // one): ask the lookup, which our sk_lookup program answers for parked sockets too.
    if held(ctx, addr, port, protocol) {
        return (Verdict::InUse, 0);
    }
    if !addr.is_v4 && served & served_flags::V6_PARKING == 0 {
        return (Verdict::NoParking, 0);
    }
    match park::allocate(netns_cookie, addr) {
        Some(slot) => (Verdict::Steered, slot),
        None => (Verdict::NoParking, 0),
    }
}

/// Does a socket in the binding socket's namespace already receive for `addr:port`? A
/// steered socket never carries SO_REUSEADDR or SO_REUSEPORT (those would have put it in
/// native mode), so natively any such holder means EADDRINUSE.
#[inline(always)]
fn held(ctx: &SockAddrContext, addr: &Addr, port: u16, protocol: u32) -> bool {
    if port == 0 {
        return false;
    }
    // SAFETY: all-zero is a valid tuple (wildcard source).
    let mut tuple: bpf_sock_tuple = unsafe { core::mem::zeroed() };
    let size = if addr.is_v4 {
        tuple.__bindgen_anon_1.ipv4.daddr = addr.ip4_word();
        tuple.__bindgen_anon_1.ipv4.dport = port.to_be();
        IPV4_TUPLE
    } else {
        tuple.__bindgen_anon_1.ipv6.daddr = addr.ip6_words();
        tuple.__bindgen_anon_1.ipv6.dport = port.to_be();
        IPV6_TUPLE
    };
    let ctx = ctx.as_ptr();
    // SAFETY: helpers of cgroup/bind programs (Linux 5.2); the reference is released below.
    let sk = unsafe {
        if protocol == IPPROTO_TCP as u32 {
            bpf_sk_lookup_tcp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(ctx, &mut tuple, size, BPF_F_CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    // SAFETY: `sk` was acquired by the lookup above.
    unsafe { bpf_sk_release(sk.cast()) };
    true
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
