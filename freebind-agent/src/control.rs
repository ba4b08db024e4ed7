//! The daemon's control socket: `attach` and `detach` run by an operator while the daemon
//! holds the state lock are sent there, one request and one reply per connection, each a
//! single line of tab-separated fields; `events` gets a stream of JSON lines instead.
use std::{
    io::{self, BufRead as _, BufReader, Write as _},
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use crate::{config::Selector, selector::CgroupGlob};

/// How long a CLI waits for the daemon's reply: attaching a unit includes a systemd
/// reload.
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

/// What an operator asks of the pinned state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Attach (or change the policy of) `selector`; `pid` names a process whose network
    /// namespace is served (`attach --pid`).
    Attach {
        selector: Selector,
        allow: Vec<String>,
        pid: Option<u32>,
    },
    Detach {
        selector: Selector,
    },
    DetachAll,
    /// Is a daemon there? Answered with `pid N`.
    Ping,
    /// Follow the daemon's events: the reply is a stream of JSON lines, one per event,
    /// until the client goes.
    Events,
}

impl Request {
    pub fn encode(&self) -> String {
        match self {
            Request::Attach {
                selector,
                allow,
                pid,
            } => format!(
                "attach\t{}\t{}\t{}\n",
                encode_selector(selector),
                allow.join(","),
                pid.map(|p| p.to_string()).unwrap_or_default()
            ),
            Request::Detach { selector } => format!("detach\t{}\n", encode_selector(selector)),
            Request::DetachAll => "detach-all\n".into(),
            Request::Ping => "ping\n".into(),
            Request::Events => "events\n".into(),
        }
    }

    pub fn decode(line: &str) -> Result<Self> {
        let fields: Vec<&str> = line.trim_end_matches('\n').split('\t').collect();
        Ok(match fields.as_slice() {
            ["attach", sel, allow, pid] => Request::Attach {
                selector: decode_selector(sel)?,
                allow: allow
                    .split(',')
                    .filter(|a| !a.is_empty())
                    .map(str::to_owned)
                    .collect(),
                pid: match *pid {
                    "" => None,
                    p => Some(p.parse().context("pid")?),
                },
            },
            ["detach", sel] => Request::Detach {
                selector: decode_selector(sel)?,
            },
            ["detach-all"] => Request::DetachAll,
            ["ping"] => Request::Ping,
            ["events"] => Request::Events,
            _ => bail!("malformed control request"),
        })
    }
}

fn encode_selector(s: &Selector) -> String {
    match s {
        Selector::Unit(u) => format!("unit={u}"),
        Selector::Cgroup(g) => format!("cgroup={}", g.as_str()),
    }
}

fn decode_selector(s: &str) -> Result<Selector> {
    match s.split_once('=') {
        Some(("unit", u)) => {
            crate::config::check_unit_name(u)?;
            Ok(Selector::Unit(u.to_owned()))
        }
        Some(("cgroup", g)) => Ok(Selector::Cgroup(CgroupGlob::parse(g)?)),
        _ => Err(anyhow!("malformed selector {s:?}")),
    }
}

/// The reply line: `ok MESSAGE` or `error MESSAGE`.
pub fn encode_reply(r: &Result<String>) -> String {
    match r {
        Ok(m) => format!("ok\t{}\n", m.replace('\n', " ")),
        Err(e) => format!("error\t{}\n", format!("{e:#}").replace('\n', " ")),
    }
}

/// Connects and sends `req`; `None` when no daemon listens on `socket`.
fn connect(socket: &Path, req: &Request) -> Result<Option<UnixStream>> {
    let mut stream = match UnixStream::connect(socket) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e).with_context(|| format!("connecting to {}", socket.display())),
    };
    stream
        .write_all(req.encode().as_bytes())
        .with_context(|| format!("writing to {}", socket.display()))?;
    Ok(Some(stream))
}

/// Asks the daemon on `socket` for its event stream: JSON lines until either side goes.
pub fn subscribe(socket: &Path) -> Result<Option<UnixStream>> {
    connect(socket, &Request::Events)
}

/// Sends `req` to the daemon listening on `socket`; `None` when no daemon listens there.
pub fn send(socket: &Path, req: &Request) -> Result<Option<Result<String>>> {
    let Some(stream) = connect(socket, req)? else {
        return Ok(None);
    };
    stream.set_read_timeout(Some(REPLY_TIMEOUT))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .with_context(|| format!("reading the daemon's reply on {}", socket.display()))?;
    Ok(Some(match line.trim_end().split_once('\t') {
        Some(("ok", m)) => Ok(m.to_owned()),
        Some(("error", m)) => Err(anyhow!("{m}")),
        _ => bail!(
            "the daemon on {} closed the connection without a reply",
            socket.display()
        ),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_survive_the_wire() {
        for req in [
            Request::Attach {
                selector: Selector::Unit("nginx.service".into()),
                allow: vec!["192.0.2.0/24".into(), "2001:db8::/32".into()],
                pid: None,
            },
            Request::Attach {
                selector: Selector::Cgroup(
                    CgroupGlob::parse("system.slice/docker-*.scope").unwrap(),
                ),
                allow: vec![],
                pid: Some(42),
            },
            Request::Detach {
                selector: Selector::Unit("a.service".into()),
            },
            Request::DetachAll,
            Request::Ping,
            Request::Events,
        ] {
            assert_eq!(Request::decode(&req.encode()).unwrap(), req);
        }
    }
}
