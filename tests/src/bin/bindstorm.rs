//! Many threads binding at once, for the reliability suite:
//! `freebind-bindstorm THREADS BINDS_PER_THREAD ALLOWED4 REFUSED4 ALLOWED6 REFUSED6`.
//!
//! Every thread waits at a barrier, then runs BINDS_PER_THREAD iterations of socket() +
//! [setsockopt(SO_REUSEADDR)] + bind(ADDR:0) + close(), cycling through the cases below,
//! each with the outcome it must have under freebind with a policy that admits ALLOWED4
//! and ALLOWED6 but not REFUSED4 and REFUSED6 (none of them local): native-mode and
//! steer-mode binds of the allowed addresses succeed, every bind of a refused one
//! (including as a v4-mapped IPv6 address) fails with EADDRNOTAVAIL, a local bind
//! succeeds. Prints `started` when the threads are released, then one line of figures
//! (`binds=… ok=… refused=… wrong=… seconds=… binds_per_s=…`), and the first wrong
//! outcomes; exits 1 when any bind got the wrong outcome.
use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Barrier, Mutex,
    },
    time::Instant,
};

/// One kind of bind and the outcome it must get.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    tcp: bool,
    /// setsockopt(SO_REUSEADDR) before bind: native mode; without it, steer mode.
    reuseaddr: bool,
    addr: IpAddr,
    /// 0 for success, else the errno.
    expect: i32,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, threads, binds, a4, r4, a6, r6] = &args[..] else {
        eprintln!(
            "usage: freebind-bindstorm THREADS BINDS_PER_THREAD ALLOWED4 REFUSED4 ALLOWED6 REFUSED6"
        );
        std::process::exit(2);
    };
    let threads: usize = threads.parse().expect("THREADS");
    let binds: u64 = binds.parse().expect("BINDS_PER_THREAD");
    let ip = |s: &str| -> IpAddr { s.parse().unwrap_or_else(|e| panic!("{s}: {e}")) };
    let (a4, r4, a6, r6) = (ip(a4), ip(r4), ip(a6), ip(r6));
    let IpAddr::V4(r4_v4) = r4 else {
        panic!("REFUSED4 must be IPv4")
    };
    let mapped = IpAddr::V6(r4_v4.to_ipv6_mapped());
    let ok = 0;
    let no = libc::EADDRNOTAVAIL;
    let case = |name, tcp, reuseaddr, addr, expect| Case {
        name,
        tcp,
        reuseaddr,
        addr,
        expect,
    };
    let cases = Arc::new(vec![
        case("native tcp4 allowed", true, true, a4, ok),
        case("steered tcp4 allowed", true, false, a4, ok),
        case("native udp6 allowed", false, true, a6, ok),
        case("steered tcp6 allowed", true, false, a6, ok),
        case("native tcp4 refused", true, true, r4, no),
        case("steered udp4 refused", false, false, r4, no),
        case("native tcp6 refused", true, true, r6, no),
        case("v4-mapped refused", true, true, mapped, no),
        case("local tcp4", true, false, "127.0.0.1".parse().unwrap(), ok),
    ]);
    let ok_count = Arc::new(AtomicU64::new(0));
    let refused_count = Arc::new(AtomicU64::new(0));
    let wrong: Arc<Mutex<Vec<String>>> = Arc::default();
    let wrong_count = Arc::new(AtomicU64::new(0));
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cases, barrier) = (cases.clone(), barrier.clone());
            let (ok_count, refused_count) = (ok_count.clone(), refused_count.clone());
            let (wrong, wrong_count) = (wrong.clone(), wrong_count.clone());
            std::thread::spawn(move || {
                barrier.wait();
                for i in 0..binds {
                    // Each thread starts at a different case, so all kinds run at once.
                    let c = cases[(t + i as usize) % cases.len()];
                    let got = bind_once(&c);
                    if got == c.expect {
                        if got == 0 { &ok_count } else { &refused_count }
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        wrong_count.fetch_add(1, Ordering::Relaxed);
                        let mut w = wrong.lock().unwrap();
                        if w.len() < 10 {
                            w.push(format!(
                                "thread {t} bind {i}: {} ({}): got {}, expected {}",
                                c.name,
                                c.addr,
                                show(got),
                                show(c.expect)
                            ));
                        }
                    }
                }
            })
        })
        .collect();
    // Timed from the release: the threads may finish before this one runs again.
    let start = Instant::now();
    barrier.wait();
    println!("started: {threads} threads x {binds} binds");
    for h in handles {
        h.join().expect("a bind thread panicked");
    }
    let secs = start.elapsed().as_secs_f64();
    let total = threads as u64 * binds;
    let wrong_n = wrong_count.load(Ordering::Relaxed);
    println!(
        "binds={total} ok={} refused={} wrong={wrong_n} seconds={secs:.2} binds_per_s={:.0}",
        ok_count.load(Ordering::Relaxed),
        refused_count.load(Ordering::Relaxed),
        total as f64 / secs.max(1e-9)
    );
    for w in wrong.lock().unwrap().iter() {
        println!("wrong: {w}");
    }
    std::process::exit(i32::from(wrong_n > 0));
}

fn show(errno: i32) -> String {
    if errno == 0 {
        "success".to_owned()
    } else {
        std::io::Error::from_raw_os_error(errno).to_string()
    }
}

/// One socket() + [setsockopt] + bind() + close(); 0 or the errno of the failing call.
fn bind_once(c: &Case) -> i32 {
    let sa = SocketAddr::new(c.addr, 0);
    let family = match c.addr {
        IpAddr::V4(_) => libc::AF_INET,
        IpAddr::V6(_) => libc::AF_INET6,
    };
    let ty = if c.tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    // SAFETY: plain socket syscalls on a descriptor this function owns and closes.
    unsafe {
        let fd = libc::socket(family, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return errno();
        }
        let one: libc::c_int = 1;
        let mut r = 0;
        if c.reuseaddr
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            ) != 0
        {
            r = errno();
        }
        if r == 0 {
            let (ss, len) = freebind_e2e::sockaddr(sa);
            if libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) != 0 {
                r = errno();
            }
        }
        libc::close(fd);
        r
    }
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}
