//! A request/reply load generator for `cargo xtask bench` (steer mode):
//! `freebind-loadgen tcp|udp ADDR PORT (--seconds S | --count N) [--threads K] [--cpu C]`.
//!
//! - `tcp`: connect, write 8 bytes, read them back, close — in a loop. Each connection is
//!   a whole TCP lifetime (handshake, one exchange, FIN both ways), so the rate counts
//!   every per-connection cost on the server side: the lookup of the SYN, the accept, the
//!   connection's events. The client closes first and keeps the TIME_WAIT: at thousands
//!   of connections per second the run needs `net.ipv4.tcp_tw_reuse=1` and a wide
//!   `ip_local_port_range` in the client's namespace (the bench sets both).
//! - `udp`: on one unconnected socket per thread, send a datagram to ADDR:PORT and wait for
//!   its echo, in a loop (one request in flight per thread). A reply must come from
//!   exactly ADDR:PORT (steer mode rewrites the source of replies; a wrong one would be a
//!   bug, not noise) and carry the request's bytes: wrong replies are counted and fail the
//!   run at the end. So does any request unanswered within 2 s (one request in flight on
//!   a veth has no reason to be lost); the run stops after 3 of them.
//!
//! `--count N` does N operations in all (split over the threads); `--seconds S` runs for
//! S seconds; `--cpu C` pins the process (all its threads) to CPU C. Prints one line,
//! `RATE conn/s|req/s (N in T s, K threads)`, RATE first (the bench parses it). Exits 1
//! with a message on stderr when anything fails.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    process::exit,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Barrier, OnceLock,
    },
    time::{Duration, Instant},
};

const USAGE: &str =
    "usage: freebind-loadgen tcp|udp ADDR PORT (--seconds S | --count N) [--threads K] [--cpu C]";

/// How long a UDP request waits for its echo before it counts as lost.
const UDP_TIMEOUT: Duration = Duration::from_secs(2);

/// Lost UDP requests after which the run gives up instead of waiting 2 s for each.
const MAX_LOST: u64 = 3;

/// Whether the threads may do one more operation: a shared countdown (`--count`), or a
/// deadline set when the clock starts (`--seconds`).
enum Budget {
    Count(AtomicU64),
    Seconds(Duration, OnceLock<Instant>),
}

impl Budget {
    fn take(&self) -> bool {
        match self {
            Budget::Count(left) => left
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok(),
            Budget::Seconds(_, deadline) => deadline.get().is_some_and(|d| Instant::now() < *d),
        }
    }
}

fn die(msg: &str) -> ! {
    eprintln!("freebind-loadgen: {msg}");
    exit(1);
}

fn usage() -> ! {
    eprintln!("{USAGE}");
    exit(2);
}

/// What the threads report.
struct Shared {
    /// Operations that completed as expected.
    done: AtomicU64,
    /// Set by a thread that stopped on an error, so the others stop too.
    failed: AtomicBool,
    /// UDP requests with no reply within `UDP_TIMEOUT`.
    lost: AtomicU64,
    /// UDP replies from another address or port than the target, or with other bytes.
    mismatched: AtomicU64,
    first_mismatch: OnceLock<String>,
}

fn tcp_loop(target: SocketAddr, budget: &Budget, shared: &Shared, id: u64) -> Result<(), String> {
    let mut seq = id << 48;
    let mut back = [0u8; 8];
    while !shared.failed.load(Ordering::Relaxed) && budget.take() {
        seq += 1;
        let sent = seq.to_be_bytes();
        let mut conn = TcpStream::connect(target).map_err(|e| format!("connect {target}: {e}"))?;
        conn.write_all(&sent)
            .map_err(|e| format!("write to {target}: {e}"))?;
        conn.read_exact(&mut back)
            .map_err(|e| format!("read from {target}: {e}"))?;
        if back != sent {
            return Err(format!("{target} echoed {back:?} for {sent:?}"));
        }
        drop(conn);
        shared.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn udp_loop(target: SocketAddr, budget: &Budget, shared: &Shared, id: u64) -> Result<(), String> {
    let local: SocketAddr = match target.ip() {
        IpAddr::V4(_) => "0.0.0.0:0".parse().expect("literal"),
        IpAddr::V6(_) => "[::]:0".parse().expect("literal"),
    };
    let sock = UdpSocket::bind(local).map_err(|e| format!("bind {local}: {e}"))?;
    sock.set_read_timeout(Some(UDP_TIMEOUT))
        .map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let first = id << 48;
    let mut seq = first;
    let mut back = [0u8; 64];
    while !shared.failed.load(Ordering::Relaxed) && budget.take() {
        seq += 1;
        let sent = seq.to_be_bytes();
        sock.send_to(&sent, target)
            .map_err(|e| format!("send to {target}: {e}"))?;
        // Skips the late echo of a request that already timed out (and was counted lost).
        let reply = loop {
            match sock.recv_from(&mut back) {
                Ok((n, from)) if from == target && echo_of(&back[..n], first + 1..seq) => {}
                r => break r,
            }
        };
        match reply {
            Ok((n, from)) if from == target && echo_of(&back[..n], seq..seq + 1) => {
                shared.done.fetch_add(1, Ordering::Relaxed);
            }
            Ok((n, from)) => {
                shared.mismatched.fetch_add(1, Ordering::Relaxed);
                let _ = shared.first_mismatch.set(format!(
                    "request {seq:#x} to {target}: reply {:?} from {from}",
                    &back[..n]
                ));
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                let lost = shared.lost.fetch_add(1, Ordering::Relaxed) + 1;
                if lost >= MAX_LOST {
                    return Err(format!(
                        "{lost} requests to {target} got no reply within {UDP_TIMEOUT:?}"
                    ));
                }
            }
            Err(e) => return Err(format!("receive from {target}: {e}")),
        }
    }
    Ok(())
}

/// Whether `reply` is the 8-byte sequence number of a request in `seqs`.
fn echo_of(reply: &[u8], seqs: std::ops::Range<u64>) -> bool {
    <[u8; 8]>::try_from(reply).is_ok_and(|b| seqs.contains(&u64::from_be_bytes(b)))
}

/// Pins this process (and the threads it starts afterwards) to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (it bounds-checks `cpu`);
    // sched_setaffinity(0, ...) applies to the calling thread, which the later threads
    // inherit.
    let r = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if r != 0 {
        die(&format!(
            "pin to CPU {cpu}: {}",
            std::io::Error::last_os_error()
        ));
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [proto, addr, port, rest @ ..] = &args[..] else {
        usage()
    };
    let ip: IpAddr = addr
        .trim_matches(['[', ']'])
        .parse()
        .unwrap_or_else(|_| usage());
    let port: u16 = port.parse().unwrap_or_else(|_| usage());
    let target = SocketAddr::new(ip, port);
    let (mut seconds, mut count, mut threads) = (None, None, 1u64);
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--seconds" => seconds = Some(value.parse::<f64>().unwrap_or_else(|_| usage())),
            "--count" => count = Some(value.parse::<u64>().unwrap_or_else(|_| usage())),
            "--threads" => threads = value.parse().unwrap_or_else(|_| usage()),
            "--cpu" => pin(value.parse().unwrap_or_else(|_| usage())),
            _ => usage(),
        }
    }
    let tcp = match proto.as_str() {
        "tcp" => true,
        "udp" => false,
        _ => usage(),
    };
    if threads == 0 {
        usage();
    }
    let budget = match (seconds, count) {
        (Some(s), None) if s > 0.0 => Budget::Seconds(Duration::from_secs_f64(s), OnceLock::new()),
        (None, Some(n)) if n > 0 => Budget::Count(AtomicU64::new(n)),
        _ => usage(),
    };
    let shared = Shared {
        done: AtomicU64::new(0),
        failed: AtomicBool::new(false),
        lost: AtomicU64::new(0),
        mismatched: AtomicU64::new(0),
        first_mismatch: OnceLock::new(),
    };
    // Every thread is spawned and waiting before the clock starts.
    let barrier = Barrier::new(threads as usize + 1);
    let (errors, elapsed) = std::thread::scope(|s| {
        let (budget, shared, barrier) = (&budget, &shared, &barrier);
        let handles: Vec<_> = (0..threads)
            .map(|id| {
                s.spawn(move || {
                    barrier.wait();
                    let r = if tcp {
                        tcp_loop(target, budget, shared, id)
                    } else {
                        udp_loop(target, budget, shared, id)
                    };
                    if r.is_err() {
                        shared.failed.store(true, Ordering::Relaxed);
                    }
                    r
                })
            })
            .collect();
        let start = Instant::now();
        if let Budget::Seconds(d, deadline) = budget {
            let _ = deadline.set(start + *d);
        }
        barrier.wait();
        let errors: Vec<String> = handles
            .into_iter()
            .filter_map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("a thread panicked".into()))
                    .err()
            })
            .collect();
        (errors, start.elapsed())
    });
    if let Some(first) = errors.first() {
        die(first);
    }
    let done = shared.done.load(Ordering::Relaxed);
    let (lost, mismatched) = (
        shared.lost.load(Ordering::Relaxed),
        shared.mismatched.load(Ordering::Relaxed),
    );
    if lost + mismatched > 0 {
        die(&format!(
            "{mismatched} wrong replies and {lost} lost requests, {done} right; first wrong: {}",
            shared.first_mismatch.get().map_or("none", String::as_str)
        ));
    }
    let rate = done as f64 / elapsed.as_secs_f64();
    let unit = if tcp { "conn/s" } else { "req/s" };
    println!(
        "{rate:.1} {unit} ({done} in {:.3} s, {threads} threads)",
        elapsed.as_secs_f64()
    );
}
