//! The agent's event stream (`freebind-agent events`): bind decisions, address changes
//! that touch managed sockets, and lost events. Each event carries the line the agent logs
//! for it, so the stream and the journal say the same thing.
use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use freebind_common::{BindEvent, Verdict, IPPROTO_TCP};
use serde::Serialize;
use tokio::sync::broadcast;

use crate::{
    report,
    status::{SocketStatus, State},
};

/// Events a slow `events` client may fall behind by before it is told it missed some.
const BACKLOG: usize = 4_096;

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// One decision of a bind hook (or a connect/sendmsg one).
    Bind {
        verdict: &'static str,
        pid: u32,
        comm: String,
        proto: &'static str,
        address: IpAddr,
        port: u16,
        cgroup_id: u64,
        line: String,
    },
    /// An address became local, or stopped being local, and managed sockets serve it.
    Address {
        address: IpAddr,
        /// `added` or `removed`.
        change: &'static str,
        interface: String,
        state: State,
        sockets: Vec<SocketStatus>,
        line: String,
    },
    /// Events the programs could not queue: the ring buffer was full.
    Dropped {
        count: u64,
        total: u64,
        line: String,
    },
}

impl Event {
    pub fn bind(ev: &BindEvent) -> (log::Level, Self) {
        let (level, line) = report::describe(ev);
        let event = Event::Bind {
            verdict: Verdict::from_u8(ev.verdict).map_or("unknown", Verdict::as_str),
            pid: ev.pid,
            comm: report::comm(ev),
            proto: if ev.protocol == IPPROTO_TCP {
                "tcp"
            } else {
                "udp"
            },
            address: report::event_addr(ev),
            port: ev.port,
            cgroup_id: ev.cgroup_id,
            line,
        };
        (level, event)
    }

    /// `192.0.2.10 removed from ap0: 2 sockets of nginx (pid 812) now dormant`.
    pub fn address(
        address: IpAddr,
        added: bool,
        interface: &str,
        where_: &str,
        sockets: Vec<SocketStatus>,
    ) -> Self {
        let (change, verb, state, now) = if added {
            ("added", "added to", State::Live, "live again")
        } else {
            ("removed", "removed from", State::Dormant, "now dormant")
        };
        let mut by_process: BTreeMap<(u32, &str), usize> = BTreeMap::new();
        for s in &sockets {
            *by_process.entry((s.pid, s.comm.as_str())).or_default() += 1;
        }
        let who: Vec<String> = by_process
            .iter()
            .map(|((pid, comm), n)| {
                let plural = if *n == 1 { "socket" } else { "sockets" };
                format!("{n} {plural} of {comm} (pid {pid})")
            })
            .collect();
        let line = format!(
            "{address} {verb} {interface}{where_}: {} {now}",
            who.join(", ")
        );
        Event::Address {
            address,
            change,
            interface: interface.to_owned(),
            state,
            sockets,
            line,
        }
    }

    pub fn dropped(count: u64, total: u64) -> Self {
        Event::Dropped {
            count,
            total,
            line: format!(
                "{count} bind events lost: the event ring buffer was full (the binds themselves \
                 were decided as usual; {total} lost in all)"
            ),
        }
    }

    pub fn line(&self) -> &str {
        match self {
            Event::Bind { line, .. }
            | Event::Address { line, .. }
            | Event::Dropped { line, .. } => line,
        }
    }
}

/// Where events go: to every `events` client subscribed. Serialised once, and only when
/// someone listens.
#[derive(Clone)]
pub struct Broadcast(broadcast::Sender<Arc<str>>);

impl Default for Broadcast {
    fn default() -> Self {
        Self(broadcast::channel(BACKLOG).0)
    }
}

impl Broadcast {
    pub fn send(&self, event: &Event) {
        if self.0.receiver_count() == 0 {
            return;
        }
        let mut json = serde_json::to_string(event).expect("plain data serialises");
        json.push('\n');
        let _ = self.0.send(json.into());
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<str>> {
        self.0.subscribe()
    }
}

/// What the `events` command prints for one line of the stream.
pub fn render(json_line: &str) -> String {
    serde_json::from_str::<serde_json::Value>(json_line)
        .ok()
        .and_then(|v| v.get("line")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| json_line.trim_end().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::Mode;

    fn socket(pid: u32, comm: &str, port: u16) -> SocketStatus {
        SocketStatus {
            pid,
            comm: comm.into(),
            proto: "tcp",
            address: "192.0.2.10".parse().unwrap(),
            port,
            mode: Mode::Native,
            state: State::Dormant,
            pids: vec![pid],
            parked_at: None,
            netns: 1,
            inode: u64::from(port),
            attachment: "cgroup x".into(),
        }
    }

    #[test]
    fn an_address_event_says_whose_sockets_it_touched() {
        let e = Event::address(
            "192.0.2.10".parse().unwrap(),
            false,
            "ap0",
            "",
            vec![socket(812, "nginx", 80), socket(812, "nginx", 443)],
        );
        assert_eq!(
            e.line(),
            "192.0.2.10 removed from ap0: 2 sockets of nginx (pid 812) now dormant"
        );
        let e = Event::address(
            "192.0.2.10".parse().unwrap(),
            true,
            "ap0",
            " in network namespace ap",
            vec![socket(812, "nginx", 80), socket(900, "python3", 8080)],
        );
        assert_eq!(
            e.line(),
            "192.0.2.10 added to ap0 in network namespace ap: 1 socket of nginx (pid 812), \
             1 socket of python3 (pid 900) live again"
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["kind"], "address");
        assert_eq!(json["change"], "added");
        assert_eq!(json["state"], "live");
        assert_eq!(json["sockets"][1]["comm"], "python3");
        assert_eq!(render(&serde_json::to_string(&e).unwrap()), e.line());
    }
}
