//! `cgroup/getsockname4` and `cgroup/getsockname6`: a parked socket reports the address it
//! asked for, with its real port (a `bind(addr, 0)` learns the port the kernel chose).
use core::{ffi::c_void, ptr};

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    addr::{store_ip6, Addr},
    sock,
};

#[cgroup_sock_addr(getsockname4)]
pub fn fb_getsockname4(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; fields copied to locals before use.
    let (sk, ip) = unsafe {
        let sa = &*ctx.sock_addr;
        (sa.__bindgen_anon_1.sk.cast::<c_void>(), sa.user_ip4)
    };
    if let Some((_, intended)) = sock::parked(sk, &Addr::v4(ip)) {
        // SAFETY: getsockname hooks may rewrite the address they report.
        unsafe {
            ptr::write_volatile(
                ptr::addr_of_mut!((*ctx.sock_addr).user_ip4),
                intended.ip4_word(),
            )
        };
    }
    1
}

#[cgroup_sock_addr(getsockname6)]
pub fn fb_getsockname6(ctx: SockAddrContext) -> i32 {
    // SAFETY: valid context; 4-byte reads, copied to locals.
    let (sk, ip) = unsafe {
        let sa = &*ctx.sock_addr;
        (
            sa.__bindgen_anon_1.sk.cast::<c_void>(),
            [
                sa.user_ip6[0],
                sa.user_ip6[1],
                sa.user_ip6[2],
                sa.user_ip6[3],
            ],
        )
    };
    if let Some((_, intended)) = sock::parked(sk, &Addr::v6(ip)) {
        // SAFETY: as above.
        unsafe {
            store_ip6(
                ptr::addr_of_mut!((*ctx.sock_addr).user_ip6),
                intended.ip6_words(),
            )
        };
    }
    1
}
