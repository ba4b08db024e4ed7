//! The maps, named as in `freebind_common::maps`.
use aya_ebpf::{
    btf_maps::{HashMap, HashOfMaps, LpmTrie, PerCpuArray, RingBuf, SkStorage, SockHash},
    macros::btf_map,
};
use freebind_common::{
    BindEvent, LocalAddrKey, SlotKey, SockState, SteerKey, ALLOW_CAPACITY, EVENTS_BYTES,
    LOCAL_ADDRS_CAPACITY, PARKING_CAPACITY, SERVED_NETNS_CAPACITY, STEER_SOCKS_CAPACITY,
    VERDICT_SLOTS,
};

const LOCAL_CAP: usize = LOCAL_ADDRS_CAPACITY as usize;
const ALLOW_CAP: usize = ALLOW_CAPACITY as usize;
const EVENTS_SIZE: usize = EVENTS_BYTES as usize;
const SERVED_CAP: usize = SERVED_NETNS_CAPACITY as usize;
const PARKING_CAP: usize = PARKING_CAPACITY as usize;
const STEER_CAP: usize = STEER_SOCKS_CAPACITY as usize;

#[btf_map]
pub static LOCAL_ADDRS: HashMap<LocalAddrKey, u8, LOCAL_CAP> = HashMap::new();

#[btf_map]
pub static ALLOW_V4: LpmTrie<[u8; 4], u8, ALLOW_CAP> = LpmTrie::new();

#[btf_map]
pub static ALLOW_V6: LpmTrie<[u8; 16], u8, ALLOW_CAP> = LpmTrie::new();

#[btf_map]
pub static EVENTS: RingBuf<BindEvent, EVENTS_SIZE> = RingBuf::new();

#[btf_map]
pub static EVENTS_DROPPED: PerCpuArray<u64, 1> = PerCpuArray::new();

/// Per attachment (pinned with its policy), unlike the event ring: metrics by attachment
/// come from here, and stay exact when events are dropped.
#[btf_map]
pub static DECISIONS: PerCpuArray<u64, { VERDICT_SLOTS as usize }> = PerCpuArray::new();

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

#[btf_map]
pub static SERVED_NETNS: HashMap<u64, u8, SERVED_CAP> = HashMap::new();

#[btf_map]
pub static PARKING: HashMap<LocalAddrKey, u32, PARKING_CAP> = HashMap::new();

#[btf_map]
pub static PARK_OWNERS: HashMap<SlotKey, LocalAddrKey, PARKING_CAP> = HashMap::new();

/// The sk_lookup program of each namespace reads its own copy (a separate load of this
/// object, see the agent's steer module); the cgroup programs reach the right one through
/// `STEER_MAPS`. sk_lookup programs cannot call bpf_get_netns_cookie (Linux 6.18 still
/// refuses it), so a single shared map could not tell namespaces apart.
#[btf_map]
pub static STEER_SOCKS: SockHash<SteerKey, STEER_CAP> = SockHash::new();

#[btf_map]
pub static STEER_MAPS: HashOfMaps<u64, SockHash<SteerKey, STEER_CAP>, SERVED_CAP> =
    HashOfMaps::new();
