//! Many threads binding at once, for the reliability suite:
//! `freebind-bindstorm THREADS BINDS_PER_THREAD ALLOWED4 REFUSED4 ALLOWED6 REFUSED6
//! [--until-signal]`.
//!
//! Every thread waits at a barrier, then runs iterations of socket() +
//! [setsockopt(SO_REUSEADDR)] + bind(ADDR:0) + [listen()], cycling through the cases below,
//! each with the outcome it must have under freebind with a policy that admits ALLOWED4
//! and ALLOWED6 but not REFUSED4 and REFUSED6 (none of them local): native-mode and
//! steer-mode binds of the allowed addresses succeed, every bind of a refused one
//! (including as a v4-mapped IPv6 address) fails with EADDRNOTAVAIL, a local bind
//! succeeds. A bound socket must read back the address it asked for (getsockname(), with
//! the port the kernel chose) and IP_FREEBIND (IPV6_FREEBIND) 1 in native mode, 0 in
//! steer mode and for a local bind: a native bind that was parked, or a steered one made
//! freebind, is a wrong outcome even though bind() succeeded. Each thread keeps the
//! sockets of its last [`HOLD`] iterations open, so that listening and steered UDP sockets
//! live long enough to enter the steering map while the storm runs.
//!
//! Without `--until-signal` each thread runs BINDS_PER_THREAD iterations. With it, the
//! threads bind until SIGINT, then run BINDS_PER_THREAD more each and stop, so the storm
//! is surely running whenever the caller acts on something meanwhile. Until then, SIGUSR1
//! stops judging the outcomes (they are counted as unjudged) and SIGUSR2 judges them
//! against the kernel's own answers with no freebind attached: only the local bind
//! succeeds, nothing is freebind. SIGHUP pauses every thread after its bind in progress,
//! with the sockets it holds still open, so that whatever enters them in the maps (the
//! agent's part, which a starved agent does late) can be awaited; a second SIGHUP lets
//! them go on. Each signal is acknowledged once every bind begun before it has ended:
//! `judging: none`, `judging: kernel`, `holding: N threads paused`, `going on`,
//! `finishing: after N binds`.
//!
//! Prints `started: …` when the threads are released, then one line of figures
//! (`binds=… ok=… refused=… wrong=… unjudged=… cases=… seconds=… binds_per_s=…`), and the
//! first wrong outcomes; exits 1 when any judged bind got the wrong outcome.
use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst},
        Arc, Barrier, Mutex,
    },
    time::{Duration, Instant},
};

/// Iterations whose sockets a thread keeps open (about two of each case).
const HOLD: usize = 32;

/// How outcomes are judged ([`JUDGE`]).
const BY_FREEBIND: u8 = 0;
const NOT_JUDGED: u8 = 1;
const BY_KERNEL: u8 = 2;

static JUDGE: AtomicU8 = AtomicU8::new(BY_FREEBIND);
static FINISH: AtomicBool = AtomicBool::new(false);
/// Set by the first SIGHUP, cleared by the next: threads wait before their next bind.
static HOLDING: AtomicBool = AtomicBool::new(false);
/// Threads waiting on [`HOLDING`].
static PAUSED: AtomicUsize = AtomicUsize::new(0);

/// One kind of bind and the outcome it must get under freebind.
#[derive(Clone, Copy)]
struct Case {
    name: &'static str,
    tcp: bool,
    /// setsockopt(SO_REUSEADDR) before bind: native mode; without it, steer mode.
    reuseaddr: bool,
    listen: bool,
    addr: IpAddr,
    /// 0 for success, else the errno.
    expect: i32,
}

impl Case {
    /// The errno and IP_FREEBIND a bound socket must get under judgement `judge`; `None`
    /// when not judged.
    fn expected(&self, judge: u8) -> Option<(i32, i32)> {
        let local = self.addr.is_loopback();
        match judge {
            BY_FREEBIND => Some((self.expect, i32::from(self.reuseaddr))),
            BY_KERNEL if local => Some((0, 0)),
            BY_KERNEL => Some((libc::EADDRNOTAVAIL, 0)),
            _ => None,
        }
    }
}

/// What one iteration got.
enum Got {
    /// bind() failed with this errno.
    Refused(i32),
    /// Bound (and listening, for a listening case): what it reads back.
    Bound {
        local: SocketAddr,
        freebind: i32,
        sock: OwnedFd,
    },
    /// Another call failed, which is never right.
    Broken(String),
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    refused: AtomicU64,
    wrong: AtomicU64,
    unjudged: AtomicU64,
    first_wrong: Mutex<Vec<String>>,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let until_signal = args.iter().any(|a| a == "--until-signal");
    let positional: Vec<&String> = args
        .iter()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let [threads, binds, a4, r4, a6, r6] = positional[..] else {
        eprintln!(
            "usage: freebind-bindstorm THREADS BINDS_PER_THREAD ALLOWED4 REFUSED4 ALLOWED6 REFUSED6 [--until-signal]"
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
    let case = |name, tcp, reuseaddr, listen, addr, expect| Case {
        name,
        tcp,
        reuseaddr,
        listen,
        addr,
        expect,
    };
    let cases = Arc::new(vec![
        case("native tcp4 allowed", true, true, false, a4, ok),
        case("steered tcp4 allowed", true, false, false, a4, ok),
        case("native udp6 allowed", false, true, false, a6, ok),
        case("steered tcp6 allowed", true, false, false, a6, ok),
        case("native tcp4 listening", true, true, true, a4, ok),
        case("steered tcp4 listening", true, false, true, a4, ok),
        case("steered tcp6 listening", true, false, true, a6, ok),
        case("steered udp4 allowed", false, false, false, a4, ok),
        case("steered udp6 allowed", false, false, false, a6, ok),
        case("native tcp4 refused", true, true, false, r4, no),
        case("steered udp4 refused", false, false, false, r4, no),
        case("native tcp6 refused", true, true, false, r6, no),
        case("v4-mapped refused", true, true, false, mapped, no),
        case(
            "local tcp4",
            true,
            false,
            true,
            "127.0.0.1".parse().unwrap(),
            ok,
        ),
    ]);
    raise_fd_limit(threads * HOLD + 64);
    FINISH.store(!until_signal, SeqCst);
    // Blocked before the threads exist, so they inherit the mask and only sigwait() below
    // takes these signals.
    let signals = blocked_signals();
    let tally = Arc::new(Tally::default());
    let done: Arc<Vec<AtomicU64>> = Arc::new((0..threads).map(|_| AtomicU64::new(0)).collect());
    let barrier = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (cases, barrier, tally, done) =
                (cases.clone(), barrier.clone(), tally.clone(), done.clone());
            std::thread::spawn(move || {
                barrier.wait();
                let mut held: Vec<Option<OwnedFd>> = (0..HOLD).map(|_| None).collect();
                let mut left: Option<u64> = None;
                let mut i = 0usize;
                while left != Some(0) {
                    if HOLDING.load(SeqCst) {
                        PAUSED.fetch_add(1, SeqCst);
                        while HOLDING.load(SeqCst) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        PAUSED.fetch_sub(1, SeqCst);
                    }
                    if left.is_none() && FINISH.load(SeqCst) {
                        left = Some(binds);
                    }
                    // Read before the bind starts: a bind is judged as things stood when
                    // it began.
                    let judge = JUDGE.load(SeqCst);
                    // Each thread starts at a different case, so all kinds run at once.
                    let c = cases[(t + i) % cases.len()];
                    held[i % HOLD] = tally.record(t, i, &c, judge, bind_once(&c));
                    i += 1;
                    done[t].fetch_add(1, SeqCst);
                    left = left.map(|n| n.saturating_sub(1));
                }
            })
        })
        .collect();
    // Timed from the release: the threads may finish before this one runs again.
    let start = Instant::now();
    barrier.wait();
    println!(
        "started: {threads} threads x {binds} binds{}",
        if until_signal { " after SIGINT" } else { "" }
    );
    while !FINISH.load(SeqCst) {
        match wait_signal(&signals) {
            libc::SIGINT => {
                HOLDING.store(false, SeqCst);
                FINISH.store(true, SeqCst);
                println!("finishing: after {} binds", ended(&done));
            }
            libc::SIGHUP if !HOLDING.load(SeqCst) => {
                HOLDING.store(true, SeqCst);
                while PAUSED.load(SeqCst) < threads {
                    std::thread::sleep(Duration::from_millis(1));
                }
                println!("holding: {threads} threads paused");
            }
            libc::SIGHUP => {
                HOLDING.store(false, SeqCst);
                println!("going on");
            }
            sig => {
                let (judge, what) = if sig == libc::SIGUSR1 {
                    (NOT_JUDGED, "none")
                } else {
                    (BY_KERNEL, "kernel")
                };
                JUDGE.store(judge, SeqCst);
                begun_before_now_have_ended(&done);
                println!("judging: {what}");
            }
        }
    }
    for h in handles {
        h.join().expect("a bind thread panicked");
    }
    let secs = start.elapsed().as_secs_f64();
    let total = ended(&done);
    let wrong_n = tally.wrong.load(SeqCst);
    println!(
        "binds={total} ok={} refused={} wrong={wrong_n} unjudged={} cases={} seconds={secs:.2} \
         binds_per_s={:.0}",
        tally.ok.load(SeqCst),
        tally.refused.load(SeqCst),
        tally.unjudged.load(SeqCst),
        cases.len(),
        total as f64 / secs.max(1e-9)
    );
    for w in tally.first_wrong.lock().unwrap().iter() {
        println!("wrong: {w}");
    }
    std::process::exit(i32::from(wrong_n > 0));
}

impl Tally {
    /// Counts iteration `i` of thread `t`; returns the socket to keep open, if bound.
    fn record(&self, t: usize, i: usize, c: &Case, judge: u8, got: Got) -> Option<OwnedFd> {
        let Some((errno, freebind)) = c.expected(judge) else {
            self.unjudged.fetch_add(1, SeqCst);
            return None;
        };
        let (verdict, sock) = match got {
            Got::Refused(e) if e == errno => (Ok(&self.refused), None),
            Got::Bound {
                local,
                freebind: f,
                sock,
            } if errno == 0 => {
                if local.ip() != c.addr || local.port() == 0 {
                    (Err(format!("bound, but getsockname() says {local}")), None)
                } else if f != freebind {
                    (
                        Err(format!("bound with IP_FREEBIND {f}, expected {freebind}")),
                        None,
                    )
                } else {
                    (Ok(&self.ok), Some(sock))
                }
            }
            Got::Refused(e) => (
                Err(format!("got {}, expected {}", show(e), show(errno))),
                None,
            ),
            Got::Bound { .. } => (Err(format!("bound, expected {}", show(errno))), None),
            Got::Broken(why) => (Err(why), None),
        };
        match verdict {
            Ok(counter) => {
                counter.fetch_add(1, SeqCst);
            }
            Err(why) => {
                self.wrong.fetch_add(1, SeqCst);
                let mut w = self.first_wrong.lock().unwrap();
                if w.len() < 10 {
                    w.push(format!(
                        "thread {t} bind {i}: {} ({}): {why}",
                        c.name, c.addr
                    ));
                }
            }
        }
        sock
    }
}

fn show(errno: i32) -> String {
    if errno == 0 {
        "success".to_owned()
    } else {
        std::io::Error::from_raw_os_error(errno).to_string()
    }
}

/// One socket() + [setsockopt] + bind() + [listen()], then what the socket reads back.
fn bind_once(c: &Case) -> Got {
    let sa = SocketAddr::new(c.addr, 0);
    let (family, level, freebind_opt) = match c.addr {
        IpAddr::V4(_) => (libc::AF_INET, libc::SOL_IP, libc::IP_FREEBIND),
        IpAddr::V6(_) => (libc::AF_INET6, libc::SOL_IPV6, libc::IPV6_FREEBIND),
    };
    let ty = if c.tcp {
        libc::SOCK_STREAM
    } else {
        libc::SOCK_DGRAM
    };
    let broken = |call: &str| Got::Broken(format!("{call}: {}", std::io::Error::last_os_error()));
    // SAFETY: plain socket syscalls on a descriptor owned from its creation on.
    unsafe {
        let fd = libc::socket(family, ty | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return broken("socket");
        }
        let sock = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if c.reuseaddr
            && libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_REUSEADDR,
                (&one as *const libc::c_int).cast(),
                4,
            ) != 0
        {
            return broken("setsockopt(SO_REUSEADDR)");
        }
        let (ss, len) = freebind_e2e::sockaddr(sa);
        if libc::bind(fd, (&ss as *const libc::sockaddr_storage).cast(), len) != 0 {
            return Got::Refused(errno());
        }
        if c.listen && libc::listen(fd, 16) != 0 {
            return broken("listen");
        }
        let mut freebind: libc::c_int = -1;
        let mut optlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            level,
            freebind_opt,
            (&mut freebind as *mut libc::c_int).cast(),
            &mut optlen,
        ) != 0
        {
            return broken("getsockopt(FREEBIND)");
        }
        match local_addr(&sock) {
            Ok(local) => Got::Bound {
                local,
                freebind,
                sock,
            },
            Err(e) => Got::Broken(format!("getsockname: {e}")),
        }
    }
}

/// getsockname(), parsed by std (the call is the same for every socket type).
fn local_addr(sock: &OwnedFd) -> std::io::Result<SocketAddr> {
    // SAFETY: a view of a descriptor `sock` owns, never closed through the view.
    let view = std::mem::ManuallyDrop::new(unsafe { UdpSocket::from_raw_fd(sock.as_raw_fd()) });
    view.local_addr()
}

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
}

/// Lets this process hold every thread's open sockets (the soft limit is often 1,024).
fn raise_fd_limit(want: usize) {
    // SAFETY: getrlimit/setrlimit on a struct this function owns.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && (lim.rlim_cur as usize) < want {
            lim.rlim_cur = lim.rlim_max.min(want as libc::rlim_t);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// SIGUSR1, SIGUSR2, SIGINT and SIGHUP, blocked in the calling thread (and the threads it starts).
fn blocked_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data, filled by sigemptyset before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGUSR1, libc::SIGUSR2, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        let r = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        assert_eq!(r, 0, "pthread_sigmask");
        set
    }
}

fn wait_signal(set: &libc::sigset_t) -> libc::c_int {
    let mut sig = 0;
    // SAFETY: a valid, initialised set and out pointer.
    let r = unsafe { libc::sigwait(set, &mut sig) };
    assert_eq!(r, 0, "sigwait");
    sig
}

/// Waits until every thread has ended the iteration it was in when called (a thread reads
/// [`JUDGE`] at the start of each, and none stops before [`FINISH`]).
fn begun_before_now_have_ended(done: &[AtomicU64]) {
    let seen: Vec<u64> = done.iter().map(|d| d.load(SeqCst)).collect();
    for (d, s) in done.iter().zip(seen) {
        while d.load(SeqCst) == s {
            std::thread::sleep(Duration::from_micros(100));
        }
    }
}

/// Binds ended so far, by all threads.
fn ended(done: &[AtomicU64]) -> u64 {
    done.iter().map(|d| d.load(SeqCst)).sum()
}
