//! `sockops`: a parked TCP socket enters its namespace's steering map as it listens
//! (`BPF_SOCK_OPS_TCP_LISTEN_CB` fires for every listen, with no callback flags to set,
//! right after the kernel hashed the listener; before listen() returns). Entries leave the
//! map by themselves when the socket closes. A steered socket never has SO_REUSEPORT (that
//! setsockopt would have put it in native mode), so one entry per key is the whole group.
use aya_ebpf::{macros::sock_ops, programs::SockOpsContext};
use freebind_common::{SteerKey, IPPROTO_TCP};

use crate::{addr::Addr, maps::STEER_MAPS, sock};

const BPF_SOCK_OPS_TCP_LISTEN_CB: u32 = 11;
const BPF_ANY: u64 = 0;

// Not named `sockops`: that symbol clashes with aya-ebpf's own in bpf-linker.
#[sock_ops]
pub fn fb_sock_ops(ctx: SockOpsContext) -> u32 {
    // Every TCP event of the cgroup's sockets comes here; all but one leave at once.
    if ctx.op() != BPF_SOCK_OPS_TCP_LISTEN_CB {
        return 1;
    }
    // SAFETY: valid context; `sk` is a full socket at LISTEN_CB, checked for null.
    let (sk, family, port, ip4, ip6) = unsafe {
        let ops = &*ctx.ops;
        (
            ops.__bindgen_anon_2.sk,
            ops.family,
            ops.local_port,
            ops.local_ip4,
            [
                ops.local_ip6[0],
                ops.local_ip6[1],
                ops.local_ip6[2],
                ops.local_ip6[3],
            ],
        )
    };
    if sk.is_null() {
        return 1;
    }
    let bound = if family == freebind_common::AF_INET as u32 {
        Addr::v4(ip4)
    } else {
        Addr::v6(ip6)
    };
    let Some((state, intended)) = sock::parked(sk.cast(), &bound) else {
        return 1;
    };
    let netns_cookie = state.netns_cookie;
    let mut key = SteerKey {
        addr: intended.bytes,
        // `local_port` is in host byte order here, unlike `remote_port`.
        port: port as u16,
        family: intended.family(),
        protocol: IPPROTO_TCP,
    };
    // SAFETY: the inner map pointer is only handed to the helper.
    if let Some(socks) = unsafe { STEER_MAPS.get(&netns_cookie) } {
        // SAFETY: `ctx.ops` is the program's context.
        let _ = socks.update(&mut key, unsafe { &mut *ctx.ops }, BPF_ANY);
    }
    1
}
