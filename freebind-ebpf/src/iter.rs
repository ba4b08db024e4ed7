//! `iter/udp`: enters parked UDP sockets in their namespace's steering map. UDP has no
//! listen to hook, and cgroup socket programs may not update a SOCKHASH; an iterator may.
//! The agent runs it in a namespace when a UDP socket is parked there and whenever an
//! address appears; it walks the UDP sockets of the namespace the reading task is in.
//!
//! aya-ebpf 0.2 has no iterator macro: the section name is what makes this an iterator.
use core::ffi::c_void;

use aya_ebpf::helpers::generated::bpf_map_update_elem;
use freebind_common::{SteerKey, IPPROTO_UDP};

use crate::{maps::STEER_MAPS, sock};

const BPF_ANY: u64 = 0;

/// `struct bpf_iter__udp` (net/ipv4/udp.c), the iterator's context.
#[repr(C)]
pub struct IterUdp {
    meta: *mut c_void,
    udp_sk: *mut c_void,
    uid: u32,
    bucket: i32,
}

/// Offset of `skc_num` (the bound port, host byte order) in `struct sock_common`, at the
/// start of every socket: after `skc_addrpair` (8), `skc_hash` (4) and `skc_dport` (2), a
/// layout unchanged since long before iterators existed (aya-ebpf 0.2 has no CO-RE field
/// relocations). The verifier only checks that the read stays inside a member.
const SKC_NUM: usize = 14;

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter/udp")]
pub extern "C" fn fb_iter_udp(ctx: *mut IterUdp) -> i32 {
    // SAFETY: the kernel hands the iterator a valid context; `udp_sk` is null at the end.
    let sk = unsafe { (*ctx).udp_sk };
    if sk.is_null() {
        return 0;
    }
    let Some(state) = sock::steered(sk) else {
        return 0;
    };
    // SAFETY: a BTF-checked read of `skc_num` (see SKC_NUM).
    let port = unsafe { core::ptr::read_volatile(sk.cast::<u8>().add(SKC_NUM).cast::<u16>()) };
    let key = SteerKey {
        addr: state.intended,
        port,
        family: if state.intended_is_v4 != 0 {
            freebind_common::AF_INET
        } else {
            freebind_common::AF_INET6
        },
        protocol: IPPROTO_UDP,
    };
    // SAFETY: the inner map pointer is only handed to the helper, with the socket itself as
    // the value (the verifier's rule for SOCKHASH updates from programs).
    if let Some(socks) = unsafe { STEER_MAPS.get(&state.netns_cookie) } {
        unsafe {
            bpf_map_update_elem(
                (socks as *const _ as *mut c_void).cast(),
                (&key as *const SteerKey).cast(),
                sk.cast_const(),
                BPF_ANY,
            )
        };
    }
    0
}
