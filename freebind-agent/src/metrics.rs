//! Prometheus metrics over HTTP (`--metrics-addr`), in the text exposition format 0.0.4.
//! Each scrape reads the kernel and the pins afresh (the same picture as `status`), so the
//! counters are the programs' own and keep counting while no agent runs.
use std::{fmt::Write as _, net::SocketAddr, time::Duration};

use anyhow::{Context as _, Result};
use freebind_common::Verdict;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};

use crate::{
    cgroup::Cgroup2,
    paths::StateDirs,
    status::{self, Mode, State, Status},
};

/// Verdicts that are not decisions about a bind, exported under names of their own.
const NOT_BINDS: [Verdict; 2] = [Verdict::ParkedConnect, Verdict::RefusedSource];

/// Binds `addr` now (so that a taken port fails the start) and serves scrapes from a task.
pub async fn serve(addr: SocketAddr, dirs: StateDirs, cg: Cgroup2) -> Result<JoinHandle<()>> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening for metrics scrapes on {addr}"))?;
    log::info!("serving Prometheus metrics on http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let (dirs, cg) = (dirs.clone(), cg.clone());
                    tokio::spawn(async move {
                        if let Err(e) = answer(stream, dirs, cg).await {
                            log::debug!("metrics scrape: {e:#}");
                        }
                    });
                }
                Err(e) => log::warn!("accepting a metrics scrape on {addr}: {e}"),
            }
        }
    }))
}

async fn answer(mut stream: TcpStream, dirs: StateDirs, cg: Cgroup2) -> Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    // The request head only; a scraper sends nothing else.
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .context("reading the request")??;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let request = String::from_utf8_lossy(&head);
    let path = request.split_whitespace().nth(1).unwrap_or("");
    let (status_line, body) = if !request.starts_with("GET ") {
        ("405 Method Not Allowed", "GET /metrics\n".to_owned())
    } else if path != "/metrics" && !path.starts_with("/metrics?") {
        ("404 Not Found", "metrics are at /metrics\n".to_owned())
    } else {
        // Dumps sockets in other namespaces and walks the cgroup tree: off the event loop.
        match tokio::task::spawn_blocking(move || status::collect(&dirs, &cg)).await? {
            Ok(s) => ("200 OK", render(&s)),
            Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
        }
    };
    let response = format!(
        "HTTP/1.1 {status_line}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    Ok(())
}

/// A label value, escaped as the exposition format wants.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

pub fn render(s: &Status) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "freebind_binds_total",
        "counter",
        "Bind decisions of each attachment's programs since they were loaded, by verdict.",
    );
    for a in &s.attachments {
        for v in Verdict::ALL.iter().filter(|v| !NOT_BINDS.contains(v)) {
            let n = a.decisions.get(v.as_str()).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "freebind_binds_total{{attachment=\"{}\",verdict=\"{}\"}} {n}",
                label(&a.selector),
                v.as_str()
            );
        }
    }
    for (v, name, help) in [
        (
            Verdict::ParkedConnect,
            "freebind_parked_connects_total",
            "connect() calls from parked (steered) sockets, which cannot reach other hosts.",
        ),
        (
            Verdict::RefusedSource,
            "freebind_refused_sources_total",
            "Datagrams refused for a non-local IPv6 source outside the policy.",
        ),
    ] {
        family(&mut out, name, "counter", help);
        for a in &s.attachments {
            let n = a.decisions.get(v.as_str()).copied().unwrap_or(0);
            let _ = writeln!(out, "{name}{{attachment=\"{}\"}} {n}", label(&a.selector));
        }
    }
    family(
        &mut out,
        "freebind_programs_attached",
        "gauge",
        "Programs of each attachment attached in the kernel, over all its cgroups.",
    );
    for a in &s.attachments {
        let _ = writeln!(
            out,
            "freebind_programs_attached{{attachment=\"{}\",pinned=\"{}\"}} {}",
            label(&a.selector),
            a.pinned,
            a.programs_attached
        );
    }
    family(
        &mut out,
        "freebind_attachment_cgroups",
        "gauge",
        "Cgroups each attachment is attached to.",
    );
    for a in &s.attachments {
        let _ = writeln!(
            out,
            "freebind_attachment_cgroups{{attachment=\"{}\"}} {}",
            label(&a.selector),
            a.cgroups.len()
        );
    }
    family(
        &mut out,
        "freebind_sockets",
        "gauge",
        "Sockets of managed processes bound to an address absent at bind time or now, by mode and state.",
    );
    for mode in [Mode::Native, Mode::Steered] {
        for state in [State::Live, State::Dormant] {
            let n = s
                .sockets
                .iter()
                .filter(|k| k.mode == mode && k.state == state)
                .count();
            let _ = writeln!(
                out,
                "freebind_sockets{{mode=\"{}\",state=\"{}\"}} {n}",
                match mode {
                    Mode::Native => "native",
                    Mode::Steered => "steered",
                },
                match state {
                    State::Live => "live",
                    State::Dormant => "dormant",
                }
            );
        }
    }
    family(
        &mut out,
        "freebind_events_dropped_total",
        "counter",
        "Bind events lost because the event ring buffer was full (the binds were decided as usual).",
    );
    let _ = writeln!(out, "freebind_events_dropped_total {}", s.events_dropped);
    family(
        &mut out,
        "freebind_daemon_up",
        "gauge",
        "1 while a freebind daemon answers on its control socket.",
    );
    let _ = writeln!(out, "freebind_daemon_up {}", u8::from(s.daemon.is_some()));
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::status::AttachmentStatus;

    #[test]
    fn every_family_is_declared_once_and_labels_are_escaped() {
        let s = Status {
            daemon: None,
            attachments: vec![AttachmentStatus {
                selector: "cgroup a\"b".into(),
                cgroup: None,
                cgroups: vec![],
                allow: vec![],
                pinned: true,
                origin: "cli".into(),
                pid: None,
                programs_attached: 10,
                decisions: BTreeMap::from([("freebind".into(), 3)]),
            }],
            sockets: vec![],
            events_dropped: 7,
        };
        let text = render(&s);
        assert!(text.contains(
            "freebind_binds_total{attachment=\"cgroup a\\\"b\",verdict=\"freebind\"} 3\n"
        ));
        assert!(text.contains("freebind_events_dropped_total 7\n"));
        assert!(!text.contains("verdict=\"parked-connect\""));
        let mut seen = std::collections::HashSet::new();
        for l in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            assert!(seen.insert(l.to_owned()), "{l} twice");
        }
    }
}
