//! Steer mode in one network namespace: the sk_lookup program that steers intended
//! addresses to parked sockets, its `STEER_SOCKS` entered in `STEER_MAPS` for the cgroup
//! programs, and the IPv6 parking addresses on `lo`.
use std::{path::Path, sync::Arc};

use anyhow::{Context as _, Result};
use aya::maps::{HashOfMaps, MapData};

use crate::{
    loader::SteerLookup,
    netns::Netns,
    parking::{self, V6Pool},
};

pub type SteerMaps = HashOfMaps<MapData, u64, MapData>;

pub struct Steering {
    // Field order is drop order: stop steering before the parking addresses go.
    lookup: SteerLookup,
    _pool: Option<V6Pool>,
}

impl Steering {
    /// Everything a parked socket in `netns` needs, in place before any bind can park. With
    /// `pin`, the sk_lookup program is pinned there (or adopted from there) so that it
    /// outlives the agent.
    pub fn start(
        netns: &Arc<Netns>,
        steer_maps: &mut SteerMaps,
        pin: Option<&Path>,
    ) -> Result<Self> {
        let lo = parking::check_lo(netns)?;
        if !lo.up {
            log::warn!(
                "lo is down in {}: steer mode cannot park sockets there \
                 (their binds fail with EADDRNOTAVAIL); bring it up with `ip link set lo up`",
                netns.label()
            );
        }
        let pool = if lo.ipv6 {
            V6Pool::assign(Arc::clone(netns))?
        } else {
            None
        };
        if pool.is_none() {
            log::info!(
                "{} has IPv6 off on lo: steer mode parks IPv4 only there",
                netns.label()
            );
        }
        let lookup = match pin {
            Some(dir) => SteerLookup::attach_pinned(netns, dir)?,
            None => SteerLookup::attach(netns)?,
        };
        steer_maps
            .insert(netns.cookie(), lookup.socks(), 0)
            .with_context(|| {
                format!(
                    "entering the steering map of {} in STEER_MAPS",
                    netns.label()
                )
            })?;
        Ok(Self {
            lookup,
            _pool: pool,
        })
    }

    /// Are the IPv6 parking addresses there (the bind hook parks IPv6 only then)?
    pub fn parks_ipv6(&self) -> bool {
        self._pool.is_some()
    }

    /// Takes the namespace's entry out of `STEER_MAPS` (the agent no longer serves it), and
    /// its pins when it had some.
    pub fn stop(self, netns: &Netns, steer_maps: &mut SteerMaps, pin: Option<&Path>) {
        let _ = steer_maps.remove(&netns.cookie());
        drop(self.lookup);
        if let Some(dir) = pin {
            crate::pin::remove_tree(dir);
        }
    }

    /// Leaves everything in place for the next agent (the daemon exits, its pins stay): the
    /// parking addresses included, which parked sockets still need.
    pub fn leave(self) {
        std::mem::forget(self._pool);
    }
}
