//! The `LOCAL_ADDRS` map the bind hooks consult, kept equal to what rtnetlink reports in
//! each served network namespace.
use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as AyaHashMap, MapData};
use freebind_common::{LocalAddrKey, AF_INET, AF_INET6};

use crate::addrwatch::{AddrChange, IfAddr, LocalSet, Transition};

pub type LocalMap = AyaHashMap<MapData, LocalAddrKey, u8>;

/// One namespace's share of `LOCAL_ADDRS`.
pub struct Locality {
    netns_cookie: u64,
    set: LocalSet,
}

/// The key the bind hooks build for `addr` (v4-mapped IPv6 is stored as IPv4, as the hooks
/// look it up).
pub fn key(netns_cookie: u64, addr: IpAddr) -> LocalAddrKey {
    let mut bytes = [0u8; 16];
    match addr.to_canonical() {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            LocalAddrKey::new(netns_cookie, AF_INET, bytes)
        }
        IpAddr::V6(a) => LocalAddrKey::new(netns_cookie, AF_INET6, a.octets()),
    }
}

impl Locality {
    pub fn new(netns_cookie: u64) -> Self {
        Self {
            netns_cookie,
            set: LocalSet::default(),
        }
    }

    /// Applies one change; returns what it meant for the address.
    pub fn apply(&mut self, map: &mut LocalMap, change: AddrChange) -> Result<Option<Transition>> {
        let t = self.set.apply(change);
        let addr = match change {
            AddrChange::New(a) | AddrChange::Del(a) => a.addr,
        };
        let k = key(self.netns_cookie, addr);
        match t {
            Some(Transition::BecameLocal) => map
                .insert(k, 1, 0)
                .with_context(|| format!("adding {addr} to the locality map"))?,
            Some(Transition::NoLongerLocal) => map
                .remove(&k)
                .with_context(|| format!("removing {addr} from the locality map"))?,
            None => {}
        }
        Ok(t)
    }

    /// Replaces everything with a fresh dump (at start, and after rtnetlink overran).
    /// Returns the transitions, so that what changed unseen is still reported.
    pub fn resync(
        &mut self,
        map: &mut LocalMap,
        now: &[IfAddr],
    ) -> Result<Vec<(IpAddr, Transition)>> {
        let mut fresh = LocalSet::default();
        for a in now {
            fresh.apply(AddrChange::New(*a));
        }
        let mut out = Vec::new();
        let gone: Vec<IpAddr> = self
            .set
            .addrs()
            .filter(|a| !fresh.is_local(a))
            .copied()
            .collect();
        let came: Vec<IpAddr> = fresh
            .addrs()
            .filter(|a| !self.set.is_local(a))
            .copied()
            .collect();
        for addr in gone {
            let _ = map.remove(&key(self.netns_cookie, addr));
            out.push((addr, Transition::NoLongerLocal));
        }
        if self.set.addrs().next().is_none() {
            // First sight of this namespace: entries an earlier agent left in a pinned map
            // (it was killed while an address went away) must not stay local.
            let wanted: Vec<LocalAddrKey> =
                fresh.addrs().map(|a| key(self.netns_cookie, *a)).collect();
            let stale: Vec<LocalAddrKey> = map
                .keys()
                .filter_map(|k| k.ok())
                .filter(|k| k.netns_cookie == self.netns_cookie && !wanted.contains(k))
                .collect();
            for k in stale {
                let _ = map.remove(&k);
            }
        }
        for addr in came {
            map.insert(key(self.netns_cookie, addr), 1, 0)
                .with_context(|| format!("adding {addr} to the locality map"))?;
            out.push((addr, Transition::BecameLocal));
        }
        self.set = fresh;
        Ok(out)
    }

    /// Removes this namespace's entries (it is no longer served).
    pub fn clear(&mut self, map: &mut LocalMap) {
        for addr in self.set.addrs() {
            let _ = map.remove(&key(self.netns_cookie, *addr));
        }
        self.set = LocalSet::default();
    }
}
