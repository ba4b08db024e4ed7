//! `cgroup/setsockopt`: native mode.
//!
//! The kernel refuses `IP_FREEBIND` from `bpf_setsockopt()`, but lets this hook rewrite
//! the syscall it is looking at. So on a socket's first setsockopt() whose option
//! `bpf_setsockopt()` can apply, the program applies the application's option itself and
//! turns the syscall into `IP_FREEBIND` (`IPV6_FREEBIND` on AF_INET6) with a non-zero
//! argument, which the
//! kernel then performs through its normal path.
use core::{ffi::c_void, ptr};

use aya_ebpf::{
    helpers::generated::{bpf_get_netns_cookie, bpf_setsockopt},
    macros::cgroup_sockopt,
    programs::SockoptContext,
    EbpfContext,
};
use aya_log_ebpf::debug;
use freebind_common::{
    native_options::{can_apply, SOL_IP, SOL_IPV6},
    sock_flags, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, NATIVE_MARK,
};

use crate::sock;

const TCP_CLOSE: u32 = 7;

const IP_FREEBIND: i32 = 15;
const IP_TRANSPARENT: i32 = 19;
const IPV6_TRANSPARENT: i32 = 75;
const IPV6_FREEBIND: i32 = 78;

#[inline(always)]
fn is_freebind_option(level: i32, optname: i32) -> bool {
    (level == SOL_IP && (optname == IP_FREEBIND || optname == IP_TRANSPARENT))
        || (level == SOL_IPV6 && (optname == IPV6_FREEBIND || optname == IPV6_TRANSPARENT))
}

#[cgroup_sockopt(setsockopt)]
pub fn fb_setsockopt(ctx: SockoptContext) -> i32 {
    // 1 = let the (possibly rewritten) call proceed. This program never blocks a call.
    let _ = try_setsockopt(&ctx);
    1
}

fn try_setsockopt(ctx: &SockoptContext) -> Result<(), ()> {
    // SAFETY: the kernel hands the hook a valid `bpf_sockopt`.
    let so = unsafe { &mut *ctx.sockopt };
    let sk = unsafe { so.__bindgen_anon_1.sk };
    if sk.is_null() {
        return Err(());
    }
    // SAFETY: `sk` is a full socket checked non-null above.
    let (family, protocol) = unsafe { ((*sk).family, (*sk).protocol) };
    if (family != AF_INET as u32 && family != AF_INET6 as u32)
        || (protocol != IPPROTO_TCP as u32 && protocol != IPPROTO_UDP as u32)
    {
        return Err(());
    }
    // Only fresh sockets: an accepted or connected socket's setsockopt (TCP_NODELAY on
    // every accepted connection) must not pay for a storage entry it has no use for.
    // TCP_CLOSE (7) is also the state of an unconnected UDP socket.
    if unsafe { (*sk).state } != TCP_CLOSE {
        return Err(());
    }
    let level = so.level;
    let optname = so.optname;
    let optlen = so.optlen;

    // Only where the agent knows which addresses are local; elsewhere the socket stays
    // ordinary and the kernel decides its binds alone.
    if sock::served(unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }).is_none() {
        return Err(());
    }
    let state = sock::state(sk.cast(), true).ok_or(())?;
    if state.flags & (sock_flags::NATIVE | sock_flags::APP_FREEBIND) != 0 {
        return Ok(());
    }
    let optval = unsafe { so.__bindgen_anon_2.optval }.cast::<u8>();
    let optval_end = unsafe { so.__bindgen_anon_3.optval_end }.cast::<u8>();
    // The verifier only lets the program touch optval after this comparison.
    let int_arg = optlen == 4 && !optval.is_null() && (optval as usize + 4) <= optval_end as usize;

    if is_freebind_option(level, optname) {
        // Another freebind attachment on this syscall (a parent cgroup's, a second agent's)
        // has rewritten it: the socket is freebind by native mode, and this attachment's
        // policy applies too. Anything else is the application's own: never touched.
        // SAFETY: read only when `int_arg` proved the 4 bytes are there.
        let marked = int_arg && unsafe { ptr::read_unaligned(optval.cast::<i32>()) } == NATIVE_MARK;
        state.flags |= if marked {
            sock_flags::NATIVE
        } else {
            sock_flags::APP_FREEBIND
        };
        return Ok(());
    }
    if !int_arg || !can_apply(level, optname) {
        return Ok(());
    }
    // SAFETY: bounds checked above; the kernel's copy of the user buffer.
    let mut value: i32 = unsafe { ptr::read_unaligned(optval.cast::<i32>()) };
    let ret = unsafe {
        bpf_setsockopt(
            sk.cast(),
            level,
            optname,
            ptr::addr_of_mut!(value).cast::<c_void>(),
            4,
        )
    };
    if ret != 0 {
        // Not rewritten: the kernel runs the application's call and returns its own error.
        return Ok(());
    }

    let (new_level, new_optname) = if family == AF_INET6 as u32 {
        (SOL_IPV6, IPV6_FREEBIND)
    } else {
        (SOL_IP, IP_FREEBIND)
    };
    // Volatile: LLVM otherwise merges the two adjacent 32-bit stores into one 64-bit store
    // to the context, which the verifier rejects ("invalid bpf_context access").
    unsafe {
        ptr::write_volatile(ptr::addr_of_mut!(so.level), new_level);
        ptr::write_volatile(ptr::addr_of_mut!(so.optname), new_optname);
        ptr::write_unaligned(optval.cast::<i32>(), NATIVE_MARK);
    }
    state.flags |= sock_flags::NATIVE;
    debug!(
        ctx,
        "native mode: applied option {}/{} and turned the call into freebind", level, optname
    );
    Ok(())
}
