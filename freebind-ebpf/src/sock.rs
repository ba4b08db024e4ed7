//! What the hooks share about a socket: freebind's per-socket state, whether its network
//! namespace is served, and the decision events.
use core::{ffi::c_void, ptr};

use aya_ebpf::btf_maps::PerCpuArray;
use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid,
    generated::{bpf_get_current_cgroup_id, bpf_sk_storage_get},
};
use freebind_common::{sock_flags, BindEvent, SockState, Verdict, IPPROTO_UDP};

use crate::{
    addr::Addr,
    maps::{DECISIONS, EVENTS, EVENTS_DROPPED, SERVED_NETNS, SOCK_STATE},
    park,
};

const BPF_RB_NO_WAKEUP: u64 = 1;
const BPF_RB_FORCE_WAKEUP: u64 = 2;

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

/// The state of a socket steer mode parked, if it is one.
#[inline(always)]
pub fn steered(sk: *mut c_void) -> Option<&'static mut SockState> {
    state(sk, false).filter(|s| s.flags & sock_flags::STEERED != 0)
}

/// A steered socket still on its parking address: its state, the address it asked for
/// and the parking address. `bound` is the socket's current address as the hook sees it;
/// a socket whose parked bind failed and that the kernel later bound elsewhere (autobind
/// on listen or sendto) is not treated as parked.
#[inline(always)]
pub fn parked(sk: *mut c_void, bound: &Addr) -> Option<(&'static mut SockState, Addr)> {
    // The range test first: it spares the storage lookup for every socket not parked
    // (these hooks see all of the cgroup's getsockname, sendmsg and listen calls).
    if !bound.is_parking() {
        return None;
    }
    let state = steered(sk)?;
    let intended = Addr {
        bytes: state.intended,
        is_v4: state.intended_is_v4 != 0,
    };
    park::address(&intended, state.slot)
        .same(bound)
        .then_some((state, intended))
}

/// The namespace's `served_flags` when the agent keeps its addresses.
#[inline(always)]
pub fn served(netns_cookie: u64) -> Option<u8> {
    // SAFETY: a byte copied out at once.
    unsafe { SERVED_NETNS.get(netns_cookie) }.copied()
}

/// What one event says; [`report`] adds who and where from the current task.
pub struct Report<'a> {
    pub family: u8,
    pub protocol: u8,
    pub port: u16,
    pub addr: &'a Addr,
    pub verdict: Verdict,
    pub slot: u32,
    pub netns_cookie: u64,
}

/// Adds one to a per-CPU counter slot.
#[inline(always)]
fn count<const N: usize>(map: &PerCpuArray<u64, N>, slot: u32) {
    if let Some(n) = map.get_ptr_mut(slot) {
        // SAFETY: per-CPU slot, this CPU only.
        unsafe { *n += 1 };
    }
}

/// One count and one event per decision. A full ring buffer never delays the syscall: the
/// event is counted in EVENTS_DROPPED instead.
#[inline(always)]
pub fn report(r: Report) {
    count(&DECISIONS, r.verdict as u32);
    let Some(mut entry) = EVENTS.reserve(0) else {
        count(&EVENTS_DROPPED, 0);
        return;
    };
    let comm = bpf_get_current_comm().unwrap_or([0; 16]);
    entry.write(BindEvent {
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        pid: (bpf_get_current_pid_tgid() >> 32) as u32,
        port: r.port,
        family: r.family,
        protocol: r.protocol,
        addr: r.addr.bytes,
        comm,
        verdict: r.verdict as u8,
        addr_is_v4: r.addr.is_v4 as u8,
        _pad: [0; 2],
        slot: r.slot,
        netns_cookie: r.netns_cookie,
    });
    // No wakeup as a rule: waking the agent on every bind costs the binding task an
    // irq_work and the agent a context switch per event; the agent drains the buffer on a
    // short timer. A steered UDP socket is the exception: the agent enters it in the steering
    // map when it hears of it, and it should hear at once.
    let wake = r.verdict == Verdict::Steered && r.protocol == IPPROTO_UDP;
    entry.submit(if wake {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    });
}
