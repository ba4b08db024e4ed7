//! Steer mode's parking: the always-local address a parked socket is really bound to.
//!
//! Each intended address gets a slot per network namespace, kept for the life of the
//! loaded object: two intended addresses never share a parking address (so they never
//! collide on a port), and the same intended address always gets the same one (so two
//! binds of it on one port conflict exactly as they would natively).
use freebind_common::{parking, LocalAddrKey, SlotKey};

use crate::{
    addr::Addr,
    maps::{PARKING, PARK_OWNERS},
};

const BPF_NOEXIST: u64 = 1;

/// Slots tried from the address's hash onwards; covers the whole IPv6 pool.
const PROBES: u32 = parking::V6_SLOTS;

/// The slot this intended address already has in the namespace.
#[inline(always)]
pub fn existing(netns_cookie: u64, addr: &Addr) -> Option<u32> {
    // SAFETY: a u32 copied out at once; entries are never removed while programs run.
    unsafe { PARKING.get(addr.key(netns_cookie)) }.copied()
}

/// The address's slot, allocating the first free one from its hash when it has none.
/// `None` when every slot tried belongs to another address.
#[inline(always)]
pub fn allocate(netns_cookie: u64, addr: &Addr) -> Option<u32> {
    if let Some(slot) = existing(netns_cookie, addr) {
        return Some(slot);
    }
    let key = addr.key(netns_cookie);
    let slots = if addr.is_v4 {
        parking::V4_SLOTS
    } else {
        parking::V6_SLOTS
    };
    // Starting from a hash rather than a counter makes the slot of an address the same in
    // every freebind object on the host (stacked attachments, a restarted agent).
    let mut s = hash(&addr.bytes) % slots;
    let mut i = 0;
    while i < PROBES {
        let owner = SlotKey {
            netns_cookie,
            slot: s + 1,
            family: addr.family(),
            _pad: [0; 3],
        };
        // NOEXIST makes two CPUs racing for one slot agree on a single owner.
        let mine = PARK_OWNERS.insert(owner, key, BPF_NOEXIST).is_ok()
            // SAFETY: compared at once.
            || unsafe { PARK_OWNERS.get(owner) }.is_some_and(|k| same_key(k, &key));
        if mine {
            let _ = PARKING.insert(key, s + 1, 0);
            return Some(s + 1);
        }
        s += 1;
        if s == slots {
            s = 0;
        }
        i += 1;
    }
    None
}

/// Key equality as four 64-bit words (see [`Addr::same`] on derived comparisons).
#[inline(always)]
fn same_key(a: &LocalAddrKey, b: &LocalAddrKey) -> bool {
    // SAFETY: LocalAddrKey is 32 bytes of plain integers (freebind-common checks its size).
    let (a, b) = unsafe {
        (
            core::ptr::read_unaligned((a as *const LocalAddrKey).cast::<[u64; 4]>()),
            core::ptr::read_unaligned((b as *const LocalAddrKey).cast::<[u64; 4]>()),
        )
    };
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// FNV-1a over the address bytes.
#[inline(always)]
fn hash(bytes: &[u8; 16]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        h ^= bytes[i] as u32;
        h = h.wrapping_mul(0x0100_0193);
        i += 1;
    }
    h
}

/// The parking address of `slot` in `intended`'s family (IPv4 intended addresses of
/// AF_INET6 sockets park v4-mapped: [`Addr::ip6_words`] maps them).
#[inline(always)]
pub fn address(intended: &Addr, slot: u32) -> Addr {
    if intended.is_v4 {
        let mut bytes = [0u8; 16];
        let v4 = parking::v4(slot);
        bytes[0] = v4[0];
        bytes[1] = v4[1];
        bytes[2] = v4[2];
        bytes[3] = v4[3];
        Addr { bytes, is_v4: true }
    } else {
        Addr {
            bytes: parking::v6(slot),
            is_v4: false,
        }
    }
}
