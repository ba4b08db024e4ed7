//! An echo server for the steer-mode scenarios and `cargo xtask bench`:
//! `freebind-echo-server tcp|udp ADDR PORT [--reuseaddr]`.
//!
//! Without `--reuseaddr` it calls `socket()` then `bind()` with no `setsockopt()` in
//! between — the shape of socat, Rust's `UdpSocket::bind` and most small C servers, which
//! native mode cannot help (steer mode does). With it, `SO_REUSEADDR` comes first, as
//! nginx, python and tokio's `TcpListener` do (native mode). UDP is served with
//! `std::net::UdpSocket`, TCP with one thread per connection; both echo what they get.
//! Prints `listening on <getsockname()>` once bound.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, UdpSocket},
    os::fd::FromRawFd as _,
};

fn fail(what: &str) -> ! {
    eprintln!("{what}: {}", std::io::Error::last_os_error());
    std::process::exit(1);
}

/// socket(), optionally SO_REUSEADDR, bind(); returns the raw fd.
fn bound_socket(kind: libc::c_int, addr: SocketAddr, reuseaddr: bool) -> libc::c_int {
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket syscalls on a fd this function owns.
    unsafe {
        let fd = libc::socket(family, kind | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            fail("socket");
        }
        if reuseaddr {
            let one: libc::c_int = 1;
            if libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            ) != 0
            {
                fail("setsockopt(SO_REUSEADDR)");
            }
        }
        let (storage, len) = freebind_e2e::sockaddr(addr);
        if libc::bind(fd, (&storage as *const libc::sockaddr_storage).cast(), len) != 0 {
            fail(&format!("bind {addr}"));
        }
        fd
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: freebind-echo-server tcp|udp ADDR PORT [--reuseaddr]");
        std::process::exit(2);
    }
    let ip: std::net::IpAddr = args[2].trim_matches(['[', ']']).parse().expect("ADDR");
    let port: u16 = args[3].parse().expect("PORT");
    let reuseaddr = args.iter().any(|a| a == "--reuseaddr");
    let addr = SocketAddr::new(ip, port);
    match args[1].as_str() {
        "udp" => {
            let fd = bound_socket(libc::SOCK_DGRAM, addr, reuseaddr);
            // SAFETY: a bound UDP socket this process owns.
            let sock = unsafe { UdpSocket::from_raw_fd(fd) };
            println!("listening on {}", sock.local_addr().expect("getsockname"));
            let mut buf = vec![0u8; 65536];
            loop {
                if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                    let _ = sock.send_to(&buf[..n], peer);
                }
            }
        }
        "tcp" => {
            let fd = bound_socket(libc::SOCK_STREAM, addr, reuseaddr);
            // SAFETY: listen on the socket just bound.
            if unsafe { libc::listen(fd, 1024) } != 0 {
                fail("listen");
            }
            // SAFETY: a listening TCP socket this process owns.
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            println!(
                "listening on {}",
                listener.local_addr().expect("getsockname")
            );
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 || conn.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        }
        other => {
            eprintln!("unknown protocol {other}: tcp or udp");
            std::process::exit(2);
        }
    }
}
