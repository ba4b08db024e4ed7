//! The sockets of one network namespace as the kernel lists them (NETLINK_SOCK_DIAG,
//! `inet_diag`): local address and port, inode, cgroup, and freebind's `SOCK_STATE` of
//! each, which `inet_diag` hands out for the sk_storage maps named in the request.
use std::{
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
};

use anyhow::{bail, Context as _, Result};
use freebind_common::{SockState, AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP};

// include/uapi/linux/{netlink,sock_diag,inet_diag}.h
const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLA_F_NESTED: u16 = 1 << 15;
const INET_DIAG_REQ_SK_BPF_STORAGES: u16 = 2;
const SK_DIAG_BPF_STORAGE_REQ_MAP_FD: u16 = 1;
const INET_DIAG_SK_BPF_STORAGES: u16 = 20;
const INET_DIAG_CGROUP_ID: u16 = 21;
const SK_DIAG_BPF_STORAGE: u16 = 1;
const SK_DIAG_BPF_STORAGE_MAP_ID: u16 = 2;
const SK_DIAG_BPF_STORAGE_MAP_VALUE: u16 = 3;
const TCP_CLOSE: u8 = 7;
const TCP_LISTEN: u8 = 10;

/// `struct inet_diag_sockid`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [u8; 16],
    dst: [u8; 16],
    ifindex: u32,
    cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    family: u8,
    protocol: u8,
    ext: u8,
    pad: u8,
    states: u32,
    id: SockId,
}

/// `struct inet_diag_msg`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
    expires: u32,
    rqueue: u32,
    wqueue: u32,
    uid: u32,
    inode: u32,
}

/// One socket of the namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Socket {
    /// [`IPPROTO_TCP`] or [`IPPROTO_UDP`].
    pub protocol: u8,
    /// The socket's family ([`AF_INET`] or [`AF_INET6`]).
    pub family: u8,
    /// The address it is bound to (for a v4-mapped bind on an IPv6 socket, the IPv4 one).
    pub addr: IpAddr,
    pub port: u16,
    pub inode: u64,
    /// The cgroup v2 id of the process that created it.
    pub cgroup_id: u64,
    /// Its `SOCK_STATE`, when freebind's programs gave it one.
    pub state: Option<SockState>,
}

/// Every TCP socket that listens or is bound without listening, and every UDP socket, of
/// the calling thread's network namespace. `sock_states` (`SOCK_STATE` maps) add each
/// socket's storage; reading it takes CAP_SYS_ADMIN (`bpf_sk_storage_diag_alloc`).
pub fn dump(sock_states: &[BorrowedFd<'_>]) -> Result<Vec<Socket>> {
    // SAFETY: plain socket(2); the fd is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error())
            .context("opening a NETLINK_SOCK_DIAG socket (CONFIG_INET_DIAG)");
    }
    // SAFETY: just created, owned here.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut out = Vec::new();
    for protocol in [IPPROTO_TCP, IPPROTO_UDP] {
        for family in [AF_INET, AF_INET6] {
            let states = if protocol == IPPROTO_TCP {
                (1u32 << TCP_LISTEN) | (1 << TCP_CLOSE)
            } else {
                u32::MAX
            };
            let req = Request {
                family,
                protocol,
                states,
                ..Default::default()
            };
            send(&sock, &req, sock_states).with_context(|| {
                format!("asking inet_diag for {} sockets", proto_name(protocol))
            })?;
            receive(&sock, protocol, &mut out).with_context(|| {
                format!(
                    "reading inet_diag's {} {} sockets (CONFIG_{}_DIAG)",
                    if family == AF_INET { "IPv4" } else { "IPv6" },
                    proto_name(protocol),
                    if protocol == IPPROTO_TCP {
                        "INET"
                    } else {
                        "INET_UDP"
                    }
                )
            })?;
        }
    }
    Ok(out)
}

/// The `SOCK_STATE` of a socket another process holds as descriptor `fd`.
///
/// `inet_diag` leaves the BPF storage of UDP sockets out (`inet_sk_diag_fill` adds it only
/// for connection sockets), so this takes a copy of the descriptor (pidfd_getfd, Linux 5.6,
/// which needs ptrace access to `pid`) and looks the storage up by it (an sk_storage map
/// takes a socket descriptor as its key from user space).
pub fn storage_of(pid: u32, fd: i32, sock_states: &[BorrowedFd<'_>]) -> Option<SockState> {
    // SAFETY: plain syscalls; every descriptor returned is owned at once.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return None;
    }
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let copy = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if copy < 0 {
        return None;
    }
    let copy = unsafe { OwnedFd::from_raw_fd(copy as i32) };
    let key: i32 = copy.as_raw_fd();
    sock_states.iter().find_map(|map| {
        let mut value = SockState::default();
        crate::kernel::map_lookup(*map, &key, &mut value)
            .ok()
            .map(|()| value)
    })
}

pub fn proto_name(protocol: u8) -> &'static str {
    if protocol == IPPROTO_TCP {
        "tcp"
    } else {
        "udp"
    }
}

fn push_attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(align4(buf.len()), 0);
}

const fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn as_bytes<T: Copy>(v: &T) -> &[u8] {
    // SAFETY: T is a repr(C) struct of integers without padding.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }
}

fn send(sock: &OwnedFd, req: &Request, sock_states: &[BorrowedFd<'_>]) -> Result<()> {
    let mut body = as_bytes(req).to_vec();
    if !sock_states.is_empty() {
        let mut nested = Vec::new();
        for map in sock_states {
            push_attr(
                &mut nested,
                SK_DIAG_BPF_STORAGE_REQ_MAP_FD,
                &(map.as_raw_fd() as u32).to_ne_bytes(),
            );
        }
        push_attr(
            &mut body,
            INET_DIAG_REQ_SK_BPF_STORAGES | NLA_F_NESTED,
            &nested,
        );
    }
    let mut msg = Vec::with_capacity(16 + body.len());
    msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
    msg.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    msg.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes());
    msg.extend_from_slice(&0u32.to_ne_bytes());
    msg.extend_from_slice(&body);
    // SAFETY: sends our own buffer on our own socket (to the kernel: no address needed).
    let n = unsafe { libc::send(sock.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error().into());
    }
    Ok(())
}

fn receive(sock: &OwnedFd, protocol: u8, out: &mut Vec<Socket>) -> Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // SAFETY: reads into our own buffer.
        let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error().into());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= 16 {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let ty = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < 16 || len > rest.len() {
                bail!("a truncated netlink message");
            }
            let payload = &rest[16..len];
            match ty {
                NLMSG_DONE => return Ok(()),
                NLMSG_ERROR => {
                    let errno = i32::from_ne_bytes(payload[0..4].try_into().unwrap());
                    if errno == 0 {
                        return Ok(());
                    }
                    let e = io::Error::from_raw_os_error(-errno);
                    if -errno == libc::EPERM {
                        bail!("{e}: reading sockets' BPF storage takes CAP_SYS_ADMIN");
                    }
                    return Err(e.into());
                }
                SOCK_DIAG_BY_FAMILY => {
                    if let Some(s) = parse(payload, protocol) {
                        out.push(s);
                    }
                }
                _ => {}
            }
            rest = &rest[align4(len).min(rest.len())..];
        }
    }
}

fn parse(payload: &[u8], protocol: u8) -> Option<Socket> {
    if payload.len() < size_of::<Msg>() {
        return None;
    }
    // SAFETY: Msg is plain integers; the length was checked.
    let msg: Msg = unsafe { std::ptr::read_unaligned(payload.as_ptr().cast()) };
    let addr = match msg.family {
        AF_INET => IpAddr::V4(Ipv4Addr::new(
            msg.id.src[0],
            msg.id.src[1],
            msg.id.src[2],
            msg.id.src[3],
        )),
        AF_INET6 => {
            let a = Ipv6Addr::from(msg.id.src);
            a.to_ipv4_mapped().map_or(IpAddr::V6(a), IpAddr::V4)
        }
        _ => return None,
    };
    let mut s = Socket {
        protocol,
        family: msg.family,
        addr,
        port: u16::from_be_bytes(msg.id.sport),
        inode: u64::from(msg.inode),
        cgroup_id: 0,
        state: None,
    };
    for (ty, value) in attrs(&payload[align4(size_of::<Msg>())..]) {
        match ty {
            INET_DIAG_CGROUP_ID if value.len() >= 8 => {
                s.cgroup_id = u64::from_ne_bytes(value[..8].try_into().unwrap());
            }
            INET_DIAG_SK_BPF_STORAGES => {
                for (ty, storage) in attrs(value) {
                    if ty != SK_DIAG_BPF_STORAGE {
                        continue;
                    }
                    let has_id = attrs(storage).any(|(t, _)| t == SK_DIAG_BPF_STORAGE_MAP_ID);
                    let value = attrs(storage).find(|(t, _)| *t == SK_DIAG_BPF_STORAGE_MAP_VALUE);
                    if let (true, Some((_, v))) = (has_id, value) {
                        if v.len() >= size_of::<SockState>() {
                            // SAFETY: SockState is Pod; the length was checked.
                            s.state = Some(unsafe { std::ptr::read_unaligned(v.as_ptr().cast()) });
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(s)
}

/// The (type, payload) of each netlink attribute in `buf`, NLA_F_NESTED and
/// NLA_F_NET_BYTEORDER masked off.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let ty = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff;
        if len < 4 || len > buf.len() {
            return None;
        }
        let value = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((ty, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_and_reply_layouts_are_the_kernels() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<Request>(), 56);
        assert_eq!(size_of::<Msg>(), 72);
    }

    #[test]
    fn attributes_are_walked_with_their_padding() {
        let mut buf = Vec::new();
        push_attr(&mut buf, 21, &7u64.to_ne_bytes());
        push_attr(&mut buf, 5 | NLA_F_NESTED, &[1, 2, 3]);
        push_attr(&mut buf, 6, &[]);
        let got: Vec<(u16, Vec<u8>)> = attrs(&buf).map(|(t, v)| (t, v.to_vec())).collect();
        assert_eq!(
            got,
            [
                (21, 7u64.to_ne_bytes().to_vec()),
                (5, vec![1, 2, 3]),
                (6, vec![])
            ]
        );
    }

    #[test]
    fn a_v4_mapped_bind_reads_as_ipv4() {
        let mut msg = Msg {
            family: AF_INET6,
            inode: 9,
            ..Default::default()
        };
        msg.id.src[10] = 0xff;
        msg.id.src[11] = 0xff;
        msg.id.src[12..].copy_from_slice(&[192, 0, 2, 10]);
        msg.id.sport = 8080u16.to_be_bytes();
        let mut payload = as_bytes(&msg).to_vec();
        push_attr(&mut payload, INET_DIAG_CGROUP_ID, &42u64.to_ne_bytes());
        let s = parse(&payload, IPPROTO_TCP).unwrap();
        assert_eq!(s.addr, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)));
        assert_eq!((s.port, s.inode, s.cgroup_id), (8080, 9, 42));
        assert_eq!(s.state, None);
    }
}
