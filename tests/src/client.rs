//! Clients that connect from inside a namespace, in-process (a thread that `setns()`s),
//! so no helper program or interpreter is involved and errors keep their errno.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use crate::netns::Netns;

/// Bound on each connect, read and write of the clients here. A failure within it is an
/// `Err`, so tests can poll with [`crate::wait_until`].
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);

fn socket_addr(addr: &str, port: u16) -> SocketAddr {
    let bare = addr.trim_start_matches('[').trim_end_matches(']');
    let ip: IpAddr = bare
        .parse()
        .unwrap_or_else(|e| panic!("not an IP address: {addr:?}: {e}"));
    SocketAddr::new(ip, port)
}

/// Connects to `addr` (`"192.0.2.10"` or `"2001:db8::10"`) port `port` from namespace
/// `ns`, sends `payload`, half-closes, and returns everything the server sent until it
/// closed. The `Err` says which step failed and the OS error (e.g. "connect ...:
/// Connection refused (os error 111)").
pub fn tcp_request(ns: &Netns, addr: &str, port: u16, payload: &[u8]) -> Result<Vec<u8>, String> {
    let sa = socket_addr(addr, port);
    let who = format!("tcp {sa} from netns {}", ns.name());
    ns.run_in_thread(|| {
        let mut s = connect(sa).map_err(|e| format!("{who}: connect: {e}"))?;
        s.write_all(payload)
            .map_err(|e| format!("{who}: write: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("{who}: shutdown(write): {e}"))?;
        let mut reply = Vec::new();
        s.read_to_end(&mut reply)
            .map_err(|e| format!("{who}: read: {e}"))?;
        Ok(reply)
    })
}

fn connect(sa: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect_timeout(&sa, CLIENT_TIMEOUT)?;
    s.set_read_timeout(Some(CLIENT_TIMEOUT))?;
    s.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    Ok(s)
}

/// `GET path` over HTTP/1.0 (`Connection: close`) to `addr:port` from namespace `ns`;
/// returns the status code and the body (lossy UTF-8).
pub fn http_get(ns: &Netns, addr: &str, port: u16, path: &str) -> Result<(u16, String), String> {
    let sa = socket_addr(addr, port);
    let who = format!("http://{sa}{path} from netns {}", ns.name());
    let host = match sa {
        SocketAddr::V4(_) => format!("{}:{port}", sa.ip()),
        SocketAddr::V6(_) => format!("[{}]:{port}", sa.ip()),
    };
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: freebind-e2e\r\nConnection: close\r\n\r\n");
    let raw = ns.run_in_thread(|| {
        let mut s = connect(sa).map_err(|e| format!("{who}: connect: {e}"))?;
        s.write_all(request.as_bytes())
            .map_err(|e| format!("{who}: write: {e}"))?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw)
            .map_err(|e| format!("{who}: read: {e}"))?;
        Ok::<_, String>(raw)
    })?;
    parse_http(&raw).map_err(|e| format!("{who}: {e}"))
}

fn parse_http(raw: &[u8]) -> Result<(u16, String), String> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in response {text:?}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    let status = match (words.next(), words.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => code
            .parse()
            .map_err(|_| format!("bad status line {status_line:?}"))?,
        _ => return Err(format!("bad status line {status_line:?}")),
    };
    Ok((status, body.to_owned()))
}

/// Sends one datagram with `payload` to `addr:port` from namespace `ns` on an
/// unconnected socket, waits for one reply, and returns it with the address it came from
/// (the IP only, e.g. `"192.0.2.10"`). The socket is deliberately not connected, so a
/// reply from an unexpected source address is returned (and visible) rather than dropped.
pub fn udp_request(
    ns: &Netns,
    addr: &str,
    port: u16,
    payload: &[u8],
) -> Result<(Vec<u8>, String), String> {
    let sa = socket_addr(addr, port);
    let who = format!("udp {sa} from netns {}", ns.name());
    ns.run_in_thread(|| {
        let local: IpAddr = match sa {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let s =
            UdpSocket::bind(SocketAddr::new(local, 0)).map_err(|e| format!("{who}: bind: {e}"))?;
        s.set_read_timeout(Some(CLIENT_TIMEOUT))
            .map_err(|e| format!("{who}: set timeout: {e}"))?;
        s.send_to(payload, sa)
            .map_err(|e| format!("{who}: send: {e}"))?;
        let mut buf = vec![0u8; 65536];
        let (n, from) = s
            .recv_from(&mut buf)
            .map_err(|e| format!("{who}: recv: {e}"))?;
        buf.truncate(n);
        Ok((buf, from.ip().to_string()))
    })
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\nhello\r\n\r\nworld";
        assert_eq!(parse_http(r), Ok((200, "hello\r\n\r\nworld".to_owned())));
        assert_eq!(
            parse_http(b"HTTP/1.1 404 Not Found\r\n\r\n"),
            Ok((404, String::new()))
        );
        assert!(parse_http(b"garbage").is_err());
        assert!(parse_http(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(
            socket_addr("[2001:db8::10]", 80).to_string(),
            "[2001:db8::10]:80"
        );
        assert_eq!(
            socket_addr("192.0.2.10", 8080).to_string(),
            "192.0.2.10:8080"
        );
    }
}
