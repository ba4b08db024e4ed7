//! A foreground agent: one attachment, the network namespaces it serves (address watch and
//! steering in each) and its event stream, served until the caller's future completes.
use std::{
    collections::{BTreeSet, HashMap, HashSet},
    future::Future,
    net::IpAddr,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{HashMap as AyaHashMap, MapData, RingBuf};
use freebind_common::{served_flags, Verdict};
use tokio::{io::unix::AsyncFd, sync::mpsc, task::JoinHandle};

use crate::{
    addrwatch::{ifname, AddrChange, AddrWatch, Transition},
    cgroup::cgroup_id,
    events::{Broadcast, Event},
    kernel,
    loader::{Attachment, Logger, MapPins, Maps},
    locality::{LocalMap, Locality},
    netns::Netns,
    paths::StateDirs,
    pin,
    policy::Policy,
    status::{self, ForegroundRecord, ManagedCgroup},
    steer::{SteerMaps, Steering},
};

/// The bind hooks submit events without waking the agent (see sock.rs); it drains them
/// this often. 256 KiB of ring holds about 4,000 events: 80,000 binds/s before any drop.
const EVENT_DRAIN_PERIOD: Duration = Duration::from_millis(50);

/// The UDP iterator runs at most this often per namespace; what comes sooner waits for the
/// next drain.
const UDP_ITER_MIN_GAP: Duration = Duration::from_millis(10);

/// What a namespace's watch task reports: its cookie and the next batch of changes
/// (`None`: rtnetlink overran, resynchronise).
type WatchReport = (u64, Result<Option<Vec<AddrChange>>>);

/// A network namespace the agent serves.
struct Served {
    netns: Arc<Netns>,
    locality: Locality,
    steering: Option<Steering>,
    watch: JoinHandle<()>,
}

pub struct Agent {
    // An Option so that Drop can detach the cgroup programs before it stops serving the
    // namespaces (sk_lookup links, parking addresses): nothing may park with no steering.
    attachment: Option<Attachment>,
    /// Set for the daemon: steering is pinned, and everything stays when the agent goes.
    pins: Option<StateDirs>,
    drain: tokio::time::Interval,
    unserved: Vec<(u32, u64)>,
    served: Vec<Served>,
    local_addrs: LocalMap,
    served_netns: AyaHashMap<MapData, u64, u8>,
    steer_maps: SteerMaps,
    /// Namespaces with parked UDP sockets to enter, and when the iterator last ran in each.
    udp_pending: HashSet<u64>,
    udp_last: HashMap<u64, Instant>,
    events: AsyncFd<RingBuf<MapData>>,
    events_dropped: status::Counters,
    dropped_seen: u64,
    logger: Option<AsyncFd<Logger>>,
    changes_tx: mpsc::UnboundedSender<WatchReport>,
    changes: mpsc::UnboundedReceiver<WatchReport>,
    broadcast: Broadcast,
    /// The cgroups whose sockets address events name.
    managed: Vec<ManagedCgroup>,
    sock_state: MapData,
}

impl Agent {
    /// Loads, serves the agent's own network namespace and `extra` ones (locality from a
    /// dump of their addresses, steering), then attaches: a bind is never judged against an
    /// empty map nor parked where nothing steers.
    pub fn start(cgroup: &Path, policy: &Policy, extra: Vec<Netns>) -> Result<Self> {
        let (attachment, maps) = Attachment::load(policy, MapPins::Private)?;
        let mut agent = Self::new(attachment, maps, None)?;
        agent.serve(Netns::current()?)?;
        for ns in extra {
            agent.serve(ns)?;
        }
        let attachment = agent.attachment.as_mut().expect("loaded above");
        attachment.attach(cgroup)?;
        agent.managed = vec![ManagedCgroup {
            attachment: format!("cgroup {}", cgroup.display()),
            cgroup: cgroup.to_path_buf(),
        }];
        let id = cgroup_id(cgroup)?;
        log::info!(
            "attached to cgroup {} (id {id}); may bind while not local: {policy}",
            cgroup.display()
        );
        Ok(agent)
    }

    /// The daemon's agent over the installation's pinned shared maps, serving its own
    /// namespace. It attaches nothing itself: pinned attachments share its maps. Whatever
    /// it serves stays pinned when it is dropped.
    pub fn pinned(dirs: &StateDirs) -> Result<Self> {
        let (attachment, maps) = pin_shared_maps(dirs)?;
        let mut agent = Self::new(attachment, maps, Some(dirs.clone()))?;
        agent.serve(Netns::current()?)?;
        Ok(agent)
    }

    fn new(mut attachment: Attachment, maps: Maps, pins: Option<StateDirs>) -> Result<Self> {
        let logger = attachment
            .take_logger()
            // SAFETY: the logger owns its ring buffer's fd for as long as the AsyncFd lives.
            .map(|l| unsafe { AsyncFd::register(l) }.map_err(|e| e.into_parts().1))
            .transpose()
            .context("registering the eBPF log reader")?;
        // SAFETY: the ring buffer owns its fd for as long as the AsyncFd lives.
        let events = unsafe { AsyncFd::register(maps.events) }
            .map_err(|e| e.into_parts().1)
            .context("registering the event ring buffer")?;
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let mut drain = tokio::time::interval(EVENT_DRAIN_PERIOD);
        drain.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(Self {
            attachment: Some(attachment),
            pins,
            served: Vec::new(),
            local_addrs: maps.local_addrs,
            served_netns: maps.served_netns,
            steer_maps: maps.steer_maps,
            udp_pending: HashSet::new(),
            udp_last: HashMap::new(),
            events,
            events_dropped: maps.events_dropped,
            dropped_seen: 0,
            logger,
            changes_tx,
            changes,
            drain,
            unserved: Vec::new(),
            broadcast: Broadcast::default(),
            managed: Vec::new(),
            sock_state: maps.sock_state,
        })
    }

    /// What `status` needs to find a foreground agent's attachment and maps.
    pub fn foreground_record(&self, cgroup: &Path, allow: &[String]) -> ForegroundRecord {
        let attachment = self.attachment.as_ref().expect("until dropped");
        let ids = attachment.map_ids();
        ForegroundRecord {
            pid: std::process::id(),
            cgroup: cgroup.to_path_buf(),
            allow: allow.to_vec(),
            programs: attachment.program_ids(),
            sock_state: ids.sock_state,
            decisions: ids.decisions,
            events_dropped: ids.events_dropped,
        }
    }

    /// The event stream, for an `events` client.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Arc<str>> {
        self.broadcast.subscribe()
    }

    /// The cgroups whose sockets address events name (the daemon's attachments change).
    pub fn set_managed(&mut self, managed: Vec<ManagedCgroup>) {
        self.managed = managed;
    }

    fn steer_pin(&self, netns: &Netns) -> Option<PathBuf> {
        self.pins
            .as_ref()
            .map(|d| d.netns_dir().join(netns.ino().to_string()))
    }

    /// Is the namespace with this inode served?
    pub fn serves(&self, ino: u64) -> bool {
        self.served.iter().any(|s| s.netns.ino() == ino)
    }

    /// The inode of the agent's own namespace (served first, always).
    pub fn own_ino(&self) -> u64 {
        self.served.first().map_or(0, |s| s.netns.ino())
    }

    /// Forgets what an earlier daemon served that this one does not (namespaces gone, or
    /// no longer attached): their `SERVED_NETNS`, `LOCAL_ADDRS` and `STEER_MAPS` entries
    /// and their steering pins. Left alone they would be judged on frozen addresses.
    pub fn sweep_unserved(&mut self) {
        let ours: HashSet<u64> = self.served.iter().map(|s| s.netns.cookie()).collect();
        let stale: Vec<u64> = self
            .served_netns
            .keys()
            .filter_map(|k| k.ok())
            .filter(|c| !ours.contains(c))
            .collect();
        for cookie in &stale {
            let _ = self.served_netns.remove(cookie);
            let _ = self.steer_maps.remove(cookie);
        }
        let keys: Vec<freebind_common::LocalAddrKey> = self
            .local_addrs
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| stale.contains(&k.netns_cookie))
            .collect();
        for k in keys {
            let _ = self.local_addrs.remove(&k);
        }
        if let Some(dirs) = &self.pins {
            let inos: HashSet<String> = self
                .served
                .iter()
                .map(|s| s.netns.ino().to_string())
                .collect();
            for (name, path) in pin::list_dir(&dirs.netns_dir()) {
                if !inos.contains(&name) {
                    pin::remove_tree(&path);
                }
            }
        }
        if !stale.is_empty() {
            log::info!(
                "forgot {} network namespace(s) an earlier daemon served and no attached process uses",
                stale.len()
            );
        }
    }

    /// Inodes of the namespaces served, the agent's own first.
    pub fn served_inos(&self) -> Vec<u64> {
        self.served.iter().map(|s| s.netns.ino()).collect()
    }

    /// Binds seen from namespaces nobody serves, as (pid, cgroup id), since the last call:
    /// the daemon looks for the namespaces of attached processes there.
    pub fn take_unserved(&mut self) -> Vec<(u32, u64)> {
        std::mem::take(&mut self.unserved)
    }

    /// Starts serving a network namespace: its address watch, its steering, its locality.
    /// Returns false when it was served already.
    pub fn serve(&mut self, netns: Netns) -> Result<bool> {
        if self.served.iter().any(|s| s.netns.ino() == netns.ino()) {
            return Ok(false);
        }
        let netns = Arc::new(netns);
        let mut watch = AddrWatch::open(&netns)?;
        let modes = kernel::modes();
        let steering = if modes.steer {
            let pin = self.steer_pin(&netns);
            Some(Steering::start(
                &netns,
                &mut self.steer_maps,
                pin.as_deref(),
            )?)
        } else {
            None
        };
        let mut locality = Locality::new(netns.cookie());
        locality.resync(&mut self.local_addrs, &AddrWatch::dump(&netns)?)?;
        let mut flags = served_flags::SERVED;
        if let Some(steering) = &steering {
            flags |= served_flags::STEER;
            if modes.steer_udp {
                flags |= served_flags::STEER_UDP;
            }
            if steering.parks_ipv6() {
                flags |= served_flags::V6_PARKING;
            }
        }
        self.served_netns
            .insert(netns.cookie(), flags, 0)
            .with_context(|| format!("registering {} in SERVED_NETNS", netns.label()))?;
        let tx = self.changes_tx.clone();
        let cookie = netns.cookie();
        let watch = tokio::spawn(async move {
            loop {
                let r = watch.next().await;
                let failed = r.is_err();
                if tx.send((cookie, r)).is_err() || failed {
                    return;
                }
            }
        });
        let steered = match (modes.steer, modes.steer_udp) {
            (true, true) => "steering attached",
            (true, false) => "steering attached for TCP (this kernel cannot steer UDP)",
            (false, _) => "no steering (this kernel cannot steer)",
        };
        log::info!(
            "serving {} (cookie {cookie}): addresses watched, {steered}",
            netns.label()
        );
        self.served.push(Served {
            netns,
            locality,
            steering,
            watch,
        });
        // Parked UDP sockets from before (a daemon restart) enter the new steering map.
        self.udp_pending.insert(cookie);
        Ok(true)
    }

    /// Stops serving the namespace with inode `ino` for good (its processes are gone): its
    /// locality, its steering and their pins go.
    pub fn stop_serving(&mut self, ino: u64) {
        let Some(i) = self.served.iter().position(|s| s.netns.ino() == ino) else {
            return;
        };
        let mut s = self.served.remove(i);
        let pin = self.steer_pin(&s.netns);
        self.teardown(&mut s, pin.as_deref());
        log::info!(
            "no longer serving {}: no attached process lives there",
            s.netns.label()
        );
    }

    fn teardown(&mut self, s: &mut Served, pin: Option<&Path>) {
        s.watch.abort();
        s.locality.clear(&mut self.local_addrs);
        let _ = self.served_netns.remove(&s.netns.cookie());
        if let Some(steering) = s.steering.take() {
            steering.stop(&s.netns, &mut self.steer_maps, pin);
        }
    }

    /// Makes the drop tear everything down (after `detach --all`): steering, parking
    /// addresses and locality of every served namespace.
    pub fn unpin_on_drop(&mut self) {
        let Some(dirs) = self.pins.take() else {
            return;
        };
        for mut s in std::mem::take(&mut self.served) {
            let pin = dirs.netns_dir().join(s.netns.ino().to_string());
            self.teardown(&mut s, Some(&pin));
        }
    }

    /// Waits for one piece of work (events, address changes, the eBPF log) and does it.
    /// Cancel-safe: what is awaited is only ever a readiness or a channel receive.
    pub async fn step(&mut self) -> Result<()> {
        let logger_ready = async {
            match &self.logger {
                Some(l) => l.readable().await.map(|mut g| g.clear_ready()),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = self.drain.tick() => self.drain_events(),
            // Only steered UDP binds wake the agent (see sock.rs).
            ready = self.events.readable() => {
                ready.context("waiting on the event ring buffer")?.clear_ready();
                self.drain_events();
            }
            Some((cookie, changes)) = self.changes.recv() => self.on_addr_changes(cookie, changes?)?,
            _ = logger_ready => {
                if let Some(l) = self.logger.as_mut() {
                    l.get_mut().flush();
                }
            }
        }
        Ok(())
    }

    /// Serves until `stop` completes and returns its output.
    pub async fn serve_until<F: Future>(&mut self, stop: F) -> Result<F::Output> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                out = &mut stop => {
                    self.drain_events();
                    return Ok(out);
                }
                r = self.step() => r?,
            }
        }
    }

    fn drain_events(&mut self) {
        let mut udp_parked_in = Vec::new();
        let mut batch = Vec::new();
        while let Some(item) = self.events.get_mut().next() {
            match crate::report::decode(&item) {
                Some(ev) => batch.push(ev),
                None => log::warn!("undecodable bind event of {} bytes", item.len()),
            }
        }
        for ev in batch {
            let (level, event) = Event::bind(&ev);
            log::log!(level, "{}", event.line());
            self.broadcast.send(&event);
            match Verdict::from_u8(ev.verdict) {
                Some(Verdict::Steered) if ev.protocol == freebind_common::IPPROTO_UDP => {
                    udp_parked_in.push(ev.netns_cookie)
                }
                Some(Verdict::OtherNetns) => self.unserved.push((ev.pid, ev.cgroup_id)),
                _ => {}
            }
        }
        self.udp_pending.extend(udp_parked_in);
        let dropped = status::read_counter(&self.events_dropped, 0);
        if dropped > self.dropped_seen {
            let event = Event::dropped(dropped - self.dropped_seen, dropped);
            log::warn!("{}", event.line());
            self.broadcast.send(&event);
            self.dropped_seen = dropped;
            // A lost event may have been the only word of a parked UDP socket, which would
            // then never enter its steering map: look in every namespace that steers.
            self.udp_pending.extend(
                self.served
                    .iter()
                    .filter(|s| s.steering.is_some())
                    .map(|s| s.netns.cookie()),
            );
        }
        self.run_pending_udp();
    }

    /// Runs the UDP iterator where parked UDP sockets wait, at most once per
    /// [`UDP_ITER_MIN_GAP`] per namespace: each run walks every UDP socket there, and a
    /// process binding in a loop must not keep the agent from its other work.
    fn run_pending_udp(&mut self) {
        if !kernel::modes().steer_udp {
            // No iterator on this kernel, and no UDP socket is ever parked.
            self.udp_pending.clear();
            return;
        }
        let due: Vec<u64> = self
            .udp_pending
            .iter()
            .filter(|c| {
                self.udp_last
                    .get(c)
                    .is_none_or(|t| t.elapsed() >= UDP_ITER_MIN_GAP)
            })
            .copied()
            .collect();
        for cookie in due {
            self.udp_pending.remove(&cookie);
            self.enter_udp_sockets(cookie);
            self.udp_last.insert(cookie, Instant::now());
        }
    }

    /// Runs the UDP iterator in the namespace: parked UDP sockets enter its steering map.
    fn enter_udp_sockets(&mut self, cookie: u64) {
        let Some(served) = self.served.iter().find(|s| s.netns.cookie() == cookie) else {
            return;
        };
        let netns = Arc::clone(&served.netns);
        let Some(attachment) = self.attachment.as_mut() else {
            return;
        };
        if let Err(e) = attachment.enter_udp_sockets(&netns) {
            log::warn!(
                "entering parked UDP sockets of {} for steering: {e:#}",
                netns.label()
            );
        }
    }

    fn on_addr_changes(&mut self, cookie: u64, changes: Option<Vec<AddrChange>>) -> Result<()> {
        let Some(i) = self.served.iter().position(|s| s.netns.cookie() == cookie) else {
            return Ok(());
        };
        let netns = Arc::clone(&self.served[i].netns);
        let where_ = netns_suffix(&self.served[i], i);
        let Some(changes) = changes else {
            log::warn!("rtnetlink dropped address notifications{where_}; re-reading every address");
            let dump = AddrWatch::dump(&netns)?;
            let ts = self.served[i]
                .locality
                .resync(&mut self.local_addrs, &dump)?;
            let appeared = ts.iter().any(|(_, t)| *t == Transition::BecameLocal);
            for (addr, t) in ts {
                log_transition(addr, t, None, &where_);
            }
            if appeared {
                self.udp_pending.insert(cookie);
                self.run_pending_udp();
            }
            return Ok(());
        };
        let mut appeared = false;
        let mut touched = Vec::new();
        for change in changes {
            let (a, verb) = match change {
                AddrChange::New(a) => (a, "added to"),
                AddrChange::Del(a) => (a, "removed from"),
            };
            let t = self.served[i]
                .locality
                .apply(&mut self.local_addrs, change)?;
            appeared |= t == Some(Transition::BecameLocal);
            if crate::parking::is_parking(&a.addr) {
                continue;
            }
            match t {
                Some(t) => {
                    let name = ifname(&netns, a.ifindex);
                    log_transition(a.addr, t, Some((verb, &name)), &where_);
                    touched.push((a.addr, t, name));
                }
                None if matches!(change, AddrChange::New(_)) && !a.usable => log::info!(
                    "address {} on {}{where_} is tentative (IPv6 DAD running): not local yet",
                    a.addr,
                    ifname(&netns, a.ifindex)
                ),
                None => log::debug!(
                    "address {} {verb} {}{where_}: no change in locality",
                    a.addr,
                    ifname(&netns, a.ifindex)
                ),
            }
        }
        // A UDP socket parked while its address was away is entered again now: cheap, and it
        // covers any socket whose event was lost.
        if appeared {
            self.udp_pending.insert(cookie);
            self.run_pending_udp();
        }
        self.announce(&netns, &where_, touched);
        Ok(())
    }

    /// One line (and event) per address change that touches managed sockets, naming them.
    /// Costs a socket dump of the namespace, so only when an address's locality changed.
    fn announce(&self, netns: &Netns, where_: &str, touched: Vec<(IpAddr, Transition, String)>) {
        if touched.is_empty() || self.managed.is_empty() {
            return;
        }
        let addrs: BTreeSet<IpAddr> = touched.iter().map(|(a, ..)| a.to_canonical()).collect();
        let fds = [self.sock_state.fd().as_fd()];
        let sockets =
            match status::managed_sockets(&self.managed, &fds, Some((netns.ino(), &addrs))) {
                Ok(s) => s,
                Err(e) => {
                    log::debug!("listing the sockets of {}: {e:#}", netns.label());
                    return;
                }
            };
        for (addr, t, name) in touched {
            let addr = addr.to_canonical();
            let theirs: Vec<_> = sockets
                .iter()
                .filter(|s| s.address == addr)
                .cloned()
                .collect();
            if theirs.is_empty() {
                continue;
            }
            let event = Event::address(addr, t == Transition::BecameLocal, &name, where_, theirs);
            log::info!("{}", event.line());
            self.broadcast.send(&event);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        drop(self.attachment.take());
        let pinned = self.pins.is_some();
        for mut s in std::mem::take(&mut self.served) {
            if pinned {
                // The next daemon adopts it all; binds are judged meanwhile on the
                // addresses last seen.
                s.watch.abort();
                if let Some(steering) = s.steering.take() {
                    steering.leave();
                }
            } else {
                self.teardown(&mut s, None);
            }
        }
    }
}

/// Loads the object over the installation's shared maps: pinned at once when missing
/// (atomically), checked when found. The load's own cgroup programs are never attached.
pub fn pin_shared_maps(dirs: &StateDirs) -> Result<(Attachment, Maps)> {
    let shared = dirs.shared_maps();
    let any = Policy::parse::<&str>(&[])?;
    let load = |dir: &Path| {
        Attachment::load(
            &any,
            MapPins::Pinned {
                shared: dir,
                policy: None,
            },
        )
    };
    if shared.exists() {
        pin::check_shared_maps(&shared)?;
        return load(&shared);
    }
    let mut loaded = None;
    pin::create_dir_atomically(&shared, |tmp| {
        loaded = Some(load(tmp)?);
        Ok(())
    })
    .with_context(|| format!("pinning the shared maps in {}", shared.display()))?;
    Ok(loaded.expect("filled by the closure"))
}

/// " in network namespace NAME" for every namespace but the agent's own (the first).
fn netns_suffix(s: &Served, index: usize) -> String {
    if index == 0 {
        String::new()
    } else {
        format!(" in {}", s.netns.label())
    }
}

fn log_transition(addr: IpAddr, t: Transition, how: Option<(&str, &str)>, where_: &str) {
    let how = how
        .map(|(verb, ifname)| format!(" ({verb} {ifname}{where_})"))
        .unwrap_or_else(|| where_.to_owned());
    match t {
        Transition::BecameLocal => log::info!("address {addr} is now local{how}"),
        Transition::NoLongerLocal => log::info!("address {addr} is no longer local{how}"),
    }
}
