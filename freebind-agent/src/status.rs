//! What `status` and the metrics report: every attachment (pinned or a foreground agent's),
//! and every socket of the managed processes bound to an address that was not local when it
//! was bound or is not local now — live while the address is there, dormant while not.
//!
//! Everything is read from the kernel and the pins, so it works with or without a daemon:
//! the attachments from their records and a walk of the cgroup tree (BPF_PROG_QUERY), the
//! sockets from `inet_diag` in each managed process's network namespace, with freebind's
//! `SOCK_STATE` of each.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs,
    net::IpAddr,
    os::fd::{AsFd as _, BorrowedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use freebind_common::{maps, parking, programs, sock_flags, SockState, Verdict, IPPROTO_UDP};
use serde::{Deserialize, Serialize};

use crate::{
    addrwatch::{AddrChange, AddrWatch, LocalSet},
    cgroup::Cgroup2,
    control::{self, Request},
    kernel, loader,
    manager::{collect_procs, walk_cgroups, Record},
    netns::Netns,
    paths::StateDirs,
    pin,
    pinned::PinnedAttachment,
    sockdiag,
};

/// A foreground agent's record in `RUN/foreground/PID` (JSON): its private maps are found
/// by id.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForegroundRecord {
    pub pid: u32,
    pub cgroup: PathBuf,
    pub allow: Vec<String>,
    /// Kernel ids of its cgroup programs, in `CGROUP_ATTACH_ORDER`.
    pub programs: Vec<u32>,
    pub sock_state: u32,
    pub decisions: u32,
    pub events_dropped: u32,
}

/// Removes the record when the foreground agent ends.
pub struct ForegroundGuard(PathBuf);

impl ForegroundRecord {
    pub fn write(&self, dirs: &StateDirs) -> Result<ForegroundGuard> {
        // Records of agents that were killed (their programs went with them).
        for (pid, stale) in pin::list_dir(&dirs.foreground()) {
            if !Path::new("/proc").join(&pid).exists() {
                let _ = fs::remove_file(stale);
            }
        }
        let path = dirs.foreground().join(self.pid.to_string());
        let text = serde_json::to_string(self).context("encoding the foreground record")?;
        pin::write_atomically(&path, &text, pin::PRIVATE)?;
        Ok(ForegroundGuard(path))
    }
}

impl Drop for ForegroundGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Bound where it asked, by the kernel (freebind, or local at the time).
    Native,
    /// Parked; the sk_lookup program steers its address's traffic to it.
    Steered,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Its address is local now: traffic reaches it.
    Live,
    /// Its address is not local now: it waits for it.
    Dormant,
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachmentStatus {
    /// `cgroup PATH|GLOB` or `unit NAME`, as attached.
    pub selector: String,
    /// The cgroup it is attached to (the first, for a glob); null when none is now.
    pub cgroup: Option<String>,
    pub cgroups: Vec<String>,
    pub allow: Vec<String>,
    /// Pinned (outlives the agent) or a foreground agent's.
    pub pinned: bool,
    /// `config`, `cli` or `foreground`.
    pub origin: String,
    /// The foreground agent's pid, or the process of `attach --pid`.
    pub pid: Option<u32>,
    /// Programs of this attachment attached in the kernel, over all its cgroups.
    pub programs_attached: u32,
    /// Decisions of its programs since they were loaded, by verdict.
    pub decisions: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct SocketStatus {
    /// The lowest pid holding it (the parent, for forked workers).
    pub pid: u32,
    pub comm: String,
    pub proto: &'static str,
    pub address: IpAddr,
    pub port: u16,
    pub mode: Mode,
    pub state: State,
    /// Every pid holding it.
    pub pids: Vec<u32>,
    /// Where a steered socket is parked.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parked_at: Option<IpAddr>,
    /// Its network namespace's inode.
    pub netns: u64,
    pub inode: u64,
    /// The attachment (selector) whose cgroup it was created in.
    pub attachment: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// The running daemon's pid; null when none runs (addresses are then not watched).
    pub daemon: Option<u32>,
    pub attachments: Vec<AttachmentStatus>,
    pub sockets: Vec<SocketStatus>,
    /// Events the programs could not queue (the ring buffer was full).
    pub events_dropped: u64,
}

/// An attachment found, with what is needed to look further.
struct Found {
    status: AttachmentStatus,
    /// (attach type, program id) of its cgroup programs.
    programs: Vec<(u32, u32)>,
    decisions: Option<Counters>,
}

/// The whole picture. Needs root (maps are read by pin and id).
pub fn collect(dirs: &StateDirs, cg: &Cgroup2) -> Result<Status> {
    let mut found = pinned_attachments(dirs);
    let mut sock_states = Vec::new();
    let mut events_dropped = 0;
    if dirs.shared_maps().exists() {
        let shared = dirs.shared_maps();
        sock_states.push(open_pin(&shared.join(maps::SOCK_STATE))?);
        let dropped = open_pin(&shared.join(maps::EVENTS_DROPPED))?;
        events_dropped += counters(dropped).map_or(0, |c| read_counter(&c, 0));
    }
    for (rec, dropped, sock_state) in foreground_agents(dirs) {
        events_dropped += dropped;
        sock_states.extend(sock_state);
        found.push(rec);
    }
    find_cgroups(cg.mount(), &mut found);
    for f in &mut found {
        f.status.cgroup = f.status.cgroups.first().cloned();
        f.status.programs_attached = count_attached(&f.status.cgroups, &f.programs);
        if let Some(d) = &f.decisions {
            f.status.decisions = Verdict::ALL
                .iter()
                .map(|v| (v.as_str().to_owned(), read_counter(d, *v as u32)))
                .collect();
        }
    }
    let attachments: Vec<AttachmentStatus> = found.into_iter().map(|f| f.status).collect();
    let fds: Vec<BorrowedFd<'_>> = sock_states.iter().map(|m| m.fd().as_fd()).collect();
    let sockets = managed_sockets(&ManagedCgroup::of(&attachments), &fds, None)?;
    Ok(Status {
        daemon: daemon_pid(dirs),
        attachments,
        sockets,
        events_dropped,
    })
}

/// The running daemon's pid, asked over its control socket.
pub fn daemon_pid(dirs: &StateDirs) -> Option<u32> {
    match control::send(&dirs.control_socket(), &Request::Ping) {
        Ok(Some(Ok(reply))) => reply.strip_prefix("pid ")?.parse().ok(),
        _ => None,
    }
}

fn open_pin(path: &Path) -> Result<MapData> {
    MapData::from_pin(path).with_context(|| format!("opening pinned map {}", path.display()))
}

/// A per-CPU counter array (`DECISIONS`, `EVENTS_DROPPED`).
pub type Counters = PerCpuArray<MapData, u64>;

pub fn counters(map: MapData) -> Option<Counters> {
    Counters::try_from(Map::PerCpuArray(map)).ok()
}

/// The sum over CPUs of one slot (0 when unreadable).
pub fn read_counter(counters: &Counters, slot: u32) -> u64 {
    counters.get(&slot, 0).map_or(0, |v| v.iter().sum())
}

fn pinned_attachments(dirs: &StateDirs) -> Vec<Found> {
    let mut out = Vec::new();
    for (key, path) in pin::list_dir(&dirs.records()) {
        let record = match Record::read(&path) {
            Ok(r) => r,
            Err(e) => {
                log::warn!("skipping record {}: {e:#}", path.display());
                continue;
            }
        };
        let selector = record
            .selector(&key)
            .map(|s| s.to_string())
            .unwrap_or_else(|_| key.clone());
        let programs = match PinnedAttachment::open(dirs, &key) {
            Ok(p) => p.programs.iter().map(|p| (p.attach_type, p.id)).collect(),
            Err(e) => {
                log::warn!("{selector}: {e:#}");
                Vec::new()
            }
        };
        let decisions = MapData::from_pin(dirs.attachment(&key).join(maps::DECISIONS))
            .ok()
            .and_then(counters);
        out.push(Found {
            status: AttachmentStatus {
                selector,
                cgroup: None,
                cgroups: Vec::new(),
                allow: record.allow,
                pinned: true,
                origin: record.origin,
                pid: record.pid,
                programs_attached: 0,
                decisions: BTreeMap::new(),
            },
            programs,
            decisions,
        });
    }
    out
}

/// Live foreground agents, with their dropped-event count and `SOCK_STATE`.
fn foreground_agents(dirs: &StateDirs) -> Vec<(Found, u64, Option<MapData>)> {
    let mut out = Vec::new();
    for (_, path) in pin::list_dir(&dirs.foreground()) {
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        let Ok(r) = serde_json::from_str::<ForegroundRecord>(&text) else {
            log::warn!("skipping unreadable record {}", path.display());
            continue;
        };
        // A record of an agent that was killed: its programs went with it.
        if !Path::new(&format!("/proc/{}", r.pid)).exists() {
            continue;
        }
        let dropped = MapData::from_id(r.events_dropped)
            .ok()
            .and_then(counters)
            .map_or(0, |c| read_counter(&c, 0));
        let programs = programs::CGROUP_ATTACH_ORDER
            .iter()
            .zip(&r.programs)
            .filter_map(|(name, id)| Some((loader::attach_type(name)?, *id)))
            .collect();
        out.push((
            Found {
                status: AttachmentStatus {
                    selector: format!("cgroup {}", r.cgroup.display()),
                    cgroup: None,
                    cgroups: Vec::new(),
                    allow: r.allow,
                    pinned: false,
                    origin: "foreground".into(),
                    pid: Some(r.pid),
                    programs_attached: 0,
                    decisions: BTreeMap::new(),
                },
                programs,
                decisions: MapData::from_id(r.decisions).ok().and_then(counters),
            },
            dropped,
            MapData::from_id(r.sock_state).ok(),
        ));
    }
    out
}

/// Where each attachment's bind4 program is attached, by a walk of the whole tree: links,
/// systemd's `BPFProgram=` and the start hook's BPF_PROG_ATTACH alike.
fn find_cgroups(mount: &Path, found: &mut [Found]) {
    let bind4 = loader::attach_type(programs::BIND4).expect("a cgroup program");
    let by_id: HashMap<u32, usize> = found
        .iter()
        .enumerate()
        .flat_map(|(i, f)| {
            f.programs
                .iter()
                .filter(move |(t, _)| *t == bind4)
                .map(move |(_, id)| (*id, i))
        })
        .collect();
    if by_id.is_empty() {
        return;
    }
    walk_cgroups(mount, &mut |path, dir| {
        for id in kernel::attached_programs(dir.as_fd(), bind4).unwrap_or_default() {
            if let Some(&i) = by_id.get(&id) {
                found[i].status.cgroups.push(path.display().to_string());
            }
        }
    });
}

fn count_attached(cgroups: &[String], programs: &[(u32, u32)]) -> u32 {
    let mut n = 0;
    for cgroup in cgroups {
        let Ok(dir) = fs::File::open(cgroup) else {
            continue;
        };
        for &(attach_type, id) in programs {
            if kernel::attached_programs(dir.as_fd(), attach_type)
                .is_ok_and(|ids| ids.contains(&id))
            {
                n += 1;
            }
        }
    }
    n
}

/// A cgroup whose processes' sockets are managed, and the attachment that manages it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedCgroup {
    pub attachment: String,
    pub cgroup: PathBuf,
}

impl ManagedCgroup {
    pub fn of(attachments: &[AttachmentStatus]) -> Vec<Self> {
        attachments
            .iter()
            .flat_map(|a| {
                a.cgroups.iter().map(|c| Self {
                    attachment: a.selector.clone(),
                    cgroup: PathBuf::from(c),
                })
            })
            .collect()
    }
}

/// A process of a managed cgroup.
struct Proc {
    comm: String,
    netns: u64,
}

/// The managed sockets, in every namespace the attachments' processes live in (or only in
/// `only`: a namespace's inode and the addresses of interest, for the events).
pub fn managed_sockets(
    managed: &[ManagedCgroup],
    sock_states: &[BorrowedFd<'_>],
    only: Option<(u64, &BTreeSet<IpAddr>)>,
) -> Result<Vec<SocketStatus>> {
    // Each cgroup id below an attachment, the deepest attachment winning.
    let mut owner: HashMap<u64, &str> = HashMap::new();
    let mut roots: Vec<&ManagedCgroup> = managed.iter().collect();
    roots.sort_by_key(|m| std::cmp::Reverse(m.cgroup.as_os_str().len()));
    let mut pids = Vec::new();
    for m in roots {
        walk_cgroups(&m.cgroup, &mut |_, dir| {
            if let Ok(meta) = dir.metadata() {
                owner.entry(meta.ino()).or_insert(&m.attachment);
            }
        });
        collect_procs(&m.cgroup, &mut pids);
    }
    pids.sort_unstable();
    pids.dedup();
    let mut procs: BTreeMap<u32, Proc> = BTreeMap::new();
    // Socket inode -> (pid, descriptor) of each holder.
    let mut holders: HashMap<u64, Vec<(u32, i32)>> = HashMap::new();
    for pid in pids {
        let Ok(ns) = fs::metadata(format!("/proc/{pid}/ns/net")) else {
            continue;
        };
        if only.is_some_and(|(ino, _)| ino != ns.ino()) {
            continue;
        }
        for (inode, fd) in socket_inodes(pid) {
            holders.entry(inode).or_default().push((pid, fd));
        }
        let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        procs.insert(
            pid,
            Proc {
                comm: comm.trim_end().to_owned(),
                netns: ns.ino(),
            },
        );
    }
    let mut netns_of: BTreeMap<u64, u32> = BTreeMap::new();
    for (pid, p) in &procs {
        netns_of.entry(p.netns).or_insert(*pid);
    }
    let mut out = Vec::new();
    for (ino, pid) in netns_of {
        let netns = match Netns::of_pid(pid, format!("network namespace net:[{ino}]")) {
            Ok(n) => n,
            // The process ended meanwhile.
            Err(_) => continue,
        };
        let sockets = netns.run(|| sockdiag::dump(sock_states))?;
        let mut local = LocalSet::default();
        for a in AddrWatch::dump(&netns)? {
            local.apply(AddrChange::New(a));
        }
        for mut s in sockets {
            let Some(&attachment) = owner.get(&s.cgroup_id) else {
                continue;
            };
            let Some(held) = holders.get(&s.inode) else {
                continue;
            };
            if s.state.is_none() && s.protocol == IPPROTO_UDP && !s.addr.is_unspecified() {
                let (pid, fd) = held[0];
                s.state = sockdiag::storage_of(pid, fd, sock_states);
            }
            log::trace!("{}: {s:?}", netns.label());
            let mut held_by: Vec<u32> = held.iter().map(|(pid, _)| *pid).collect();
            held_by.dedup();
            let Some((mode, address, parked_at)) = judge(&s, &local) else {
                continue;
            };
            if only.is_some_and(|(_, addrs)| !addrs.contains(&address)) {
                continue;
            }
            held_by.sort_unstable();
            let first = held_by[0];
            out.push(SocketStatus {
                pid: first,
                comm: procs
                    .get(&first)
                    .map(|p| p.comm.clone())
                    .unwrap_or_default(),
                proto: sockdiag::proto_name(s.protocol),
                address,
                port: s.port,
                mode,
                state: if local.is_local(&address) {
                    State::Live
                } else {
                    State::Dormant
                },
                pids: held_by,
                parked_at,
                netns: ino,
                inode: s.inode,
                attachment: attachment.to_owned(),
            });
        }
    }
    out.sort();
    Ok(out)
}

/// Whether a socket is one `status` lists: its mode, the address it serves, and where it is
/// parked.
fn judge(s: &sockdiag::Socket, local: &LocalSet) -> Option<(Mode, IpAddr, Option<IpAddr>)> {
    let flags = s.state.map_or(0, |st| st.flags);
    if let Some(intended) = s.state.as_ref().and_then(|st| parked_for(st, &s.addr)) {
        return Some((Mode::Steered, intended, Some(s.addr)));
    }
    let specific = !(s.addr.is_unspecified()
        || s.addr.is_loopback()
        || s.addr.is_multicast()
        || crate::parking::is_parking(&s.addr));
    let listed = flags & sock_flags::BOUND_ABSENT != 0 || (specific && !local.is_local(&s.addr));
    listed.then_some((Mode::Native, s.addr, None))
}

/// The address a steered socket asked for, when it is still on its parking address.
fn parked_for(st: &SockState, bound: &IpAddr) -> Option<IpAddr> {
    if st.flags & sock_flags::STEERED == 0 {
        return None;
    }
    let intended = if st.intended_is_v4 != 0 {
        IpAddr::from([
            st.intended[0],
            st.intended[1],
            st.intended[2],
            st.intended[3],
        ])
    } else {
        IpAddr::from(st.intended)
    };
    let parked = match intended {
        IpAddr::V4(_) => IpAddr::from(parking::v4(st.slot)),
        IpAddr::V6(_) => IpAddr::from(parking::v6(st.slot)),
    };
    (parked == *bound).then_some(intended)
}

/// (inode, descriptor) of the sockets process `pid` holds.
fn socket_inodes(pid: u32) -> Vec<(u64, i32)> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let target = fs::read_link(e.path()).ok()?;
            let t = target.to_str()?;
            let inode = t
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()?;
            Some((inode, fd))
        })
        .collect()
}

impl Status {
    /// The operator's view: the daemon, the attachments, the sockets.
    pub fn render(&self) -> String {
        let mut out = String::new();
        match self.daemon {
            Some(pid) => out.push_str(&format!("daemon: running (pid {pid})\n")),
            None => out.push_str(
                "daemon: not running (pinned programs judge binds on the addresses last seen)\n",
            ),
        }
        out.push_str(&format!("\nattachments ({}):\n", self.attachments.len()));
        let rows: Vec<Vec<String>> = self
            .attachments
            .iter()
            .map(|a| {
                let decided: Vec<String> = a
                    .decisions
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(v, n)| format!("{v} {n}"))
                    .collect();
                vec![
                    a.selector.clone(),
                    if a.cgroups.is_empty() {
                        "-".into()
                    } else {
                        a.cgroups.join(" ")
                    },
                    if a.allow.is_empty() {
                        "any".into()
                    } else {
                        a.allow.join(",")
                    },
                    match (a.pinned, a.pid) {
                        (true, _) => format!("pinned ({})", a.origin),
                        (false, Some(pid)) => format!("foreground (pid {pid})"),
                        (false, None) => "foreground".into(),
                    },
                    a.programs_attached.to_string(),
                    if decided.is_empty() {
                        "-".into()
                    } else {
                        decided.join(", ")
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["ATTACHMENT", "CGROUP", "ALLOW", "KIND", "PROGRAMS", "BINDS"],
            &rows,
        ));
        out.push_str(&format!(
            "\nsockets bound to an absent address, or whose address is gone ({}):\n",
            self.sockets.len()
        ));
        let rows: Vec<Vec<String>> = self
            .sockets
            .iter()
            .map(|s| {
                vec![
                    s.pid.to_string(),
                    s.comm.clone(),
                    s.proto.to_owned(),
                    s.address.to_string(),
                    s.port.to_string(),
                    match s.parked_at {
                        Some(p) => format!("steered (parked at {p})"),
                        None => "native".into(),
                    },
                    match s.state {
                        State::Live => "live".into(),
                        State::Dormant => "dormant".into(),
                    },
                ]
            })
            .collect();
        out.push_str(&table(
            &["PID", "COMM", "PROTO", "ADDRESS", "PORT", "MODE", "STATE"],
            &rows,
        ));
        if self.events_dropped > 0 {
            out.push_str(&format!(
                "\n{} bind events dropped (the event ring buffer was full; the binds were decided as usual)\n",
                self.events_dropped
            ));
        }
        out.trim_end().to_owned()
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("plain data serialises")
    }
}

/// Left-aligned columns, two spaces apart; "(none)" for no rows.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    if rows.is_empty() {
        return "  (none)\n".into();
    }
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (c, w) in cells.iter().zip(&width) {
            l.push(' ');
            l.push_str(c);
            l.push_str(&" ".repeat(w - c.chars().count() + 1));
        }
        l.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use freebind_common::{AF_INET, IPPROTO_TCP};

    fn socket(addr: &str, state: Option<SockState>) -> sockdiag::Socket {
        sockdiag::Socket {
            protocol: IPPROTO_TCP,
            family: AF_INET,
            addr: addr.parse().unwrap(),
            port: 8080,
            inode: 1,
            cgroup_id: 1,
            state,
        }
    }

    fn local(addrs: &[&str]) -> LocalSet {
        let mut set = LocalSet::default();
        for a in addrs {
            let addr = a.parse().unwrap();
            set.apply(AddrChange::New(crate::addrwatch::IfAddr {
                ifindex: 2,
                addr,
                prefix_len: 24,
                owner: addr,
                usable: true,
            }));
        }
        set
    }

    #[test]
    fn a_parked_socket_serves_the_address_it_asked_for() {
        let st = SockState {
            flags: sock_flags::STEERED,
            slot: 3,
            intended: [192, 0, 2, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            intended_is_v4: 1,
            ..Default::default()
        };
        let got = judge(&socket("127.254.0.3", Some(st)), &local(&[]));
        assert_eq!(
            got,
            Some((
                Mode::Steered,
                "192.0.2.10".parse().unwrap(),
                Some("127.254.0.3".parse().unwrap())
            ))
        );
        // Parked once, bound elsewhere since (a failed parked bind, then an autobind).
        assert_eq!(judge(&socket("127.0.0.1", Some(st)), &local(&[])), None);
    }

    #[test]
    fn native_sockets_are_listed_when_bound_absent_or_absent_now() {
        let absent_at_bind = SockState {
            flags: sock_flags::NATIVE | sock_flags::BOUND_ABSENT,
            ..Default::default()
        };
        let here = local(&["192.0.2.10"]);
        let native = Some((Mode::Native, "192.0.2.10".parse().unwrap(), None));
        assert_eq!(
            judge(&socket("192.0.2.10", Some(absent_at_bind)), &here),
            native
        );
        assert_eq!(judge(&socket("192.0.2.10", None), &local(&[])), native);
        assert_eq!(judge(&socket("192.0.2.10", None), &here), None);
        assert_eq!(judge(&socket("0.0.0.0", None), &local(&[])), None);
        assert_eq!(judge(&socket("127.0.0.1", None), &local(&[])), None);
    }

    #[test]
    fn tables_align_their_columns() {
        let t = table(
            &["PID", "COMM"],
            &[
                vec!["1".into(), "nginx".into()],
                vec!["812".into(), "a".into()],
            ],
        );
        assert_eq!(t, "  PID  COMM\n  1    nginx\n  812  a\n");
        assert_eq!(table(&["PID"], &[]), "  (none)\n");
    }
}
