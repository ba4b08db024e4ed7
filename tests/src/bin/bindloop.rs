//! The bind path as a loop, for `cargo xtask bench`:
//! `freebind-bindloop tcp|udp ADDR ITERATIONS self-freebind|plain` runs socket() +
//! [setsockopt(IP_FREEBIND)] + setsockopt(SO_REUSEADDR) + bind(ADDR:0) + close() and prints
//! the mean nanoseconds per iteration. Every bind must succeed.
use std::{
    net::{IpAddr, SocketAddr},
    time::Instant,
};

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
    let (sa, len) = freebind_e2e::sockaddr(SocketAddr::new(addr, 0));
    let family = libc::c_int::from(sa.ss_family);
    let one: libc::c_int = 1;
    let optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    let start = Instant::now();
    for i in 0..iters {
        // SAFETY: plain socket syscalls on an fd this loop owns and closes.
        unsafe {
            let fd = libc::socket(family, ty | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
            let set = |level, opt| {
                let r =
                    libc::setsockopt(fd, level, opt, (&one as *const libc::c_int).cast(), optlen);
                assert!(
                    r == 0,
                    "setsockopt {level}/{opt}: {}",
                    std::io::Error::last_os_error()
                );
            };
            if self_freebind {
                if family == libc::AF_INET {
                    set(libc::SOL_IP, libc::IP_FREEBIND);
                } else {
                    set(libc::SOL_IPV6, libc::IPV6_FREEBIND);
                }
            }
            set(libc::SOL_SOCKET, libc::SO_REUSEADDR);
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
