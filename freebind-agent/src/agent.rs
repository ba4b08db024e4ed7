//! A foreground agent: one attachment, its address watch and its event stream, served
//! until the caller's future completes.
use std::{future::Future, path::Path, time::Duration};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, PerCpuArray, RingBuf};
use tokio::io::unix::AsyncFd;

use crate::{
    addrwatch::{ifname, AddrChange, AddrWatch, Transition},
    cgroup::cgroup_id,
    kernel,
    loader::{Attachment, Logger},
    locality::Locality,
    policy::Policy,
    report,
};

/// The bind hooks submit events without waking the agent (see bind.rs); it drains them
/// this often. 256 KiB of ring holds about 4,000 events: 80,000 binds/s before any drop.
const EVENT_DRAIN_PERIOD: Duration = Duration::from_millis(50);

pub struct Agent {
    // Field order is drop order: detach the programs first.
    _attachment: Attachment,
    events: RingBuf<MapData>,
    events_dropped: PerCpuArray<MapData, u64>,
    dropped_seen: u64,
    logger: Option<AsyncFd<Logger>>,
    watch: AddrWatch,
    locality: Locality,
}

impl Agent {
    /// Loads, fills the locality map from a dump of the namespace's addresses, then
    /// attaches: a bind is never judged against an empty map.
    pub fn start(cgroup: &Path, policy: &Policy) -> Result<Self> {
        let (mut attachment, maps) = Attachment::load(policy)?;
        let watch = AddrWatch::open()?;
        let netns_cookie = kernel::netns_cookie(watch.raw_fd())?;
        let mut locality = Locality::new(maps.local_addrs, netns_cookie);
        locality.resync(&AddrWatch::dump()?)?;
        let mut served = maps.served_netns;
        served
            .insert(netns_cookie, 1, 0)
            .context("registering the agent's network namespace in SERVED_NETNS")?;
        attachment.attach(cgroup)?;
        let id = cgroup_id(cgroup)?;
        log::info!(
            "attached to cgroup {} (id {id}); may bind while not local: {policy}",
            cgroup.display()
        );
        let logger = attachment
            .take_logger()
            // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd lives.
            .map(|l| unsafe { AsyncFd::register(l) }.map_err(|e| e.into_parts().1))
            .transpose()
            .context("registering the eBPF log reader")?;
        Ok(Self {
            _attachment: attachment,
            events: maps.events,
            events_dropped: maps.events_dropped,
            dropped_seen: 0,
            logger,
            watch,
            locality,
        })
    }

    /// Serves until `stop` completes and returns its output.
    pub async fn serve_until<F: Future>(&mut self, stop: F) -> Result<F::Output> {
        tokio::pin!(stop);
        let mut drain = tokio::time::interval(EVENT_DRAIN_PERIOD);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let logger_ready = async {
                match &self.logger {
                    Some(l) => l.readable().await.map(|mut g| g.clear_ready()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                out = &mut stop => {
                    self.drain_events();
                    return Ok(out);
                }
                _ = drain.tick() => self.drain_events(),
                changes = self.watch.next() => self.on_addr_changes(changes?)?,
                _ = logger_ready => {
                    if let Some(l) = self.logger.as_mut() {
                        l.get_mut().flush();
                    }
                }
            }
        }
    }

    fn drain_events(&mut self) {
        while let Some(item) = self.events.next() {
            match report::decode(&item) {
                Some(ev) => {
                    let (level, line) = report::describe(&ev);
                    log::log!(level, "{line}");
                }
                None => log::warn!("undecodable bind event of {} bytes", item.len()),
            }
        }
        let dropped: u64 = self
            .events_dropped
            .get(&0, 0)
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0);
        if dropped > self.dropped_seen {
            log::warn!(
                "{} bind events lost: the event ring buffer was full (the binds themselves were decided as usual)",
                dropped - self.dropped_seen
            );
            self.dropped_seen = dropped;
        }
    }

    fn on_addr_changes(&mut self, changes: Option<Vec<AddrChange>>) -> Result<()> {
        let Some(changes) = changes else {
            log::warn!("rtnetlink dropped address notifications; re-reading every address");
            for (addr, t) in self.locality.resync(&AddrWatch::dump()?)? {
                log_transition(addr, t, None);
            }
            return Ok(());
        };
        for change in changes {
            let (a, verb) = match change {
                AddrChange::New(a) => (a, "added to"),
                AddrChange::Del(a) => (a, "removed from"),
            };
            match self.locality.apply(change)? {
                Some(t) => log_transition(a.addr, t, Some((verb, &ifname(a.ifindex)))),
                None if matches!(change, AddrChange::New(_)) && !a.usable => log::info!(
                    "address {} on {} is tentative (IPv6 DAD running): not local yet",
                    a.addr,
                    ifname(a.ifindex)
                ),
                None => log::debug!(
                    "address {} {verb} {}: no change in locality",
                    a.addr,
                    ifname(a.ifindex)
                ),
            }
        }
        Ok(())
    }
}

fn log_transition(addr: std::net::IpAddr, t: Transition, how: Option<(&str, &str)>) {
    let how = how
        .map(|(verb, ifname)| format!(" ({verb} {ifname})"))
        .unwrap_or_default();
    match t {
        Transition::BecameLocal => log::info!("address {addr} is now local{how}"),
        Transition::NoLongerLocal => log::info!("address {addr} is no longer local{how}"),
    }
}
