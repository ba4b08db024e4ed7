//! What the hooks share about a socket: freebind's per-socket state, whether its network
//! namespace is served, and the decision events.
use core::{ffi::c_void, ptr};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid,
    generated::{bpf_get_current_cgroup_id, bpf_sk_storage_get},
};
use freebind_common::{BindEvent, SockState, Verdict};

use crate::{
    addr::Addr,
    maps::{EVENTS, EVENTS_DROPPED, SERVED_NETNS, SOCK_STATE},
};

const BPF_RB_NO_WAKEUP: u64 = 1;

/// The socket's `SOCK_STATE`, created when `create` (setsockopt) and only looked up
/// otherwise. `sk` must be a full socket from the hook's context.
#[inline(always)]
pub fn state(sk: *mut c_void, create: bool) -> Option<&'static mut SockState> {
    let flags = if create {
        aya_ebpf::bindings::BPF_SK_STORAGE_GET_F_CREATE as u64
    } else {
        0
    };
    // SAFETY: SOCK_STATE is an sk_storage map and `sk` a full socket.
    let p = unsafe {
        bpf_sk_storage_get(
            ptr::addr_of!(SOCK_STATE).cast_mut().cast(),
            sk,
            ptr::null_mut(),
            flags,
        )
    };
    // SAFETY: non-null storage returned by the kernel, sized for SockState, lives with `sk`.
    unsafe { p.cast::<SockState>().as_mut() }
}

/// Flags of the socket's state, 0 when it has none.
#[inline(always)]
pub fn state_flags(sk: *mut c_void) -> u32 {
    state(sk, false).map_or(0, |s| s.flags)
}

/// Does the agent keep the addresses of this network namespace?
#[inline(always)]
pub fn served(netns_cookie: u64) -> bool {
    // SAFETY: presence test only.
    unsafe { SERVED_NETNS.get(netns_cookie) }.is_some()
}

/// One event per decision. A full ring buffer never delays the syscall: the event is
/// counted in EVENTS_DROPPED instead.
#[inline(always)]
pub fn report(family: u8, protocol: u8, port: u16, addr: &Addr, verdict: Verdict) {
    let Some(mut entry) = EVENTS.reserve(0) else {
        if let Some(dropped) = EVENTS_DROPPED.get_ptr_mut(0) {
            // SAFETY: per-CPU slot, this CPU only.
            unsafe { *dropped += 1 };
        }
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    entry.write(BindEvent {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        port,
        family,
        protocol,
        addr: addr.bytes,
        comm,
        verdict: verdict as u8,
        addr_is_v4: addr.is_v4 as u8,
        _pad: [0; 6],
    });
    // No wakeup: waking the agent on every bind costs the binding task an irq_work and the
    // agent a context switch per event; the agent drains the buffer on a short timer.
    entry.submit(BPF_RB_NO_WAKEUP);
}
