//! The bind path as a loop, for `cargo xtask bench`:
//! `freebind-bindloop tcp|udp ADDR ITERATIONS self-freebind|plain` runs socket() +
//! [setsockopt(IP_FREEBIND)] + setsockopt(SO_REUSEADDR) + bind(ADDR:0) + close() and prints
//! the mean nanoseconds per iteration. Every bind must succeed.
use std::{net::IpAddr, time::Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, proto, addr, iters, mode] = &args[..] else {
        eprintln!("usage: freebind-bindloop tcp|udp ADDR ITERATIONS self-freebind|plain");
        std::process::exit(2);
    };
    let addr: IpAddr = addr.parse().expect("address");
    let iters: u64 = iters.parse().expect("iterations");
    let ty = if proto == "tcp" {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let self_freebind = mode == "self-freebind";
    let (family, sa, len) = sockaddr(addr);
    let one: libc::c_int = 1;
    let optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let start = Instant::now();
    for i in 0..iters {
        // SAFETY: plain socket syscalls on an fd this loop owns and closes.
        unsafe {
            let fd = libc::socket(family, ty | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            if self_freebind {
                let (level, opt) = if family == libc::AF_INET {
                    (libc::SOL_IP, libc::IP_FREEBIND)
                } else {
                    (libc::SOL_IPV6, 78)
                };
                libc::setsockopt(fd, level, opt, (&one as *const libc::c_int).cast(), optlen);
            }
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                optlen,
            );
            if libc::bind(fd, (&sa as *const libc::sockaddr_storage).cast(), len) != 0 {
                eprintln!(
                    "bind {addr} failed at iteration {i}: {}",
                    std::io::Error::last_os_error()
                );
                std::process::exit(1);
            }
            libc::close(fd);
        }
    }
    println!("{}", start.elapsed().as_nanos() as u64 / iters.max(1));
}

fn sockaddr(addr: IpAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: zeroed sockaddr_storage is valid; we fill one family's view of it.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        IpAddr::V4(a) => {
            let sin = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>()
            };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_addr.s_addr = u32::from_ne_bytes(a.octets());
            (
                libc::AF_INET,
                ss,
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        }
        IpAddr::V6(a) => {
            let sin6 = unsafe {
                &mut *(&mut ss as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
            };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_addr.s6_addr = a.octets();
            (
                libc::AF_INET6,
                ss,
                std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t,
            )
        }
    }
}
