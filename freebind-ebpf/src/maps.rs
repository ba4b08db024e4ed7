//! The maps, named as in `freebind_common::maps`.
use aya_ebpf::{
    btf_maps::{HashMap, LpmTrie, PerCpuArray, RingBuf, SkStorage},
    macros::btf_map,
};
use freebind_common::{
    BindEvent, LocalAddrKey, SockState, ALLOW_CAPACITY, EVENTS_BYTES, LOCAL_ADDRS_CAPACITY,
    SERVED_NETNS_CAPACITY,
};

const LOCAL_CAP: usize = LOCAL_ADDRS_CAPACITY as usize;
const ALLOW_CAP: usize = ALLOW_CAPACITY as usize;
const EVENTS_SIZE: usize = EVENTS_BYTES as usize;
const SERVED_CAP: usize = SERVED_NETNS_CAPACITY as usize;

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

#[btf_map]
pub static SOCK_STATE: SkStorage<SockState> = SkStorage::new();

#[btf_map]
pub static SERVED_NETNS: HashMap<u64, u8, SERVED_CAP> = HashMap::new();
