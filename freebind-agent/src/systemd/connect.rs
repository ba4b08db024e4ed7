//! Connecting to a systemd's private socket, from inside the manager's pid namespace when
//! it is not ours.
//!
//! systemd refuses a private connection whose peer pid it cannot see: `bus_check_peercred`
//! → `getpeercred()` gives `-ENODATA` when `SO_PEERCRED` reports pid 0, which the kernel
//! does for a peer outside the reader's pid namespace (measured with systemd 252 in a
//! systemd-nspawn sandbox: "Incoming private connection from unprivileged client,
//! refusing: No data available"). So the socket is connected by a short-lived child
//! forked into the manager's pid namespace, which hands the connected socket back over
//! `SCM_RIGHTS` and stays alive until the caller has authenticated (newer systemd may look
//! the peer up by pidfd).
use std::{
    ffi::CString,
    fs, io, mem,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
        unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    },
    path::Path,
    ptr,
};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::net::UnixStream;

/// A connected stream to the manager, and what must live until authentication is done.
pub struct Connected {
    pub stream: UnixStream,
    /// Set when a helper child connected for us: it exits once this is dropped.
    pub keepalive: Option<OwnedFd>,
}

/// The pid (in our pid namespace) and uid of the process that created the listening socket
/// `stream` is connected to: for systemd's private socket, the manager itself.
pub fn peer_cred(fd: RawFd) -> io::Result<libc::ucred> {
    // SAFETY: getsockopt writes at most `len` bytes into the ucred.
    unsafe {
        let mut cred: libc::ucred = mem::zeroed();
        let mut len = mem::size_of::<libc::ucred>() as libc::socklen_t;
        if libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            ptr::addr_of_mut!(cred).cast(),
            &mut len,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(cred)
    }
}

/// Identity of a pid namespace: `(st_dev, st_ino)` of its `/proc/<pid>/ns/pid` link.
pub fn pidns_id(pid: &str) -> io::Result<(u64, u64)> {
    let m = fs::metadata(format!("/proc/{pid}/ns/pid"))?;
    Ok((m.dev(), m.ino()))
}

/// The pid N of a socket path of the form `/proc/N/root/…`: the manager's namespaces can
/// then be known before connecting at all.
pub fn pid_of_proc_root_path(socket: &Path) -> Option<i32> {
    let rest = socket.to_str()?.strip_prefix("/proc/")?;
    let (pid, rest) = rest.split_once('/')?;
    rest.starts_with("root/").then_some(())?;
    pid.parse().ok().filter(|&p| p > 0)
}

/// Connects to `socket` from a child in the pid namespace of `pid`.
pub async fn connect_in_pidns_of(socket: &Path, pid: i32) -> Result<Connected> {
    let pidns = fs::File::open(format!("/proc/{pid}/ns/pid"))
        .with_context(|| format!("opening the pid namespace of pid {pid}"))?;
    let addr = sockaddr_un(socket)?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    // A thread of its own: setns(CLONE_NEWPID) changes the pid namespace of the children
    // the calling thread forks from then on, which must not happen to a runtime thread
    // (tokio::process would start children in the sandbox). The thread ends once it has
    // reaped its child.
    std::thread::Builder::new()
        .name("systemd-connect".into())
        .spawn(move || match fork_connector(&pidns, &addr) {
            Ok((fd, keepalive, child)) => {
                let _ = tx.send(Ok((fd, keepalive)));
                let mut status = 0;
                // SAFETY: waits for our own child.
                unsafe { libc::waitpid(child, &mut status, 0) };
            }
            Err(e) => {
                let _ = tx.send(Err(e));
            }
        })
        .context("starting a thread")?;
    let (fd, keepalive) = rx
        .await
        .map_err(|_| anyhow!("connector thread ended without an answer"))?
        .with_context(|| {
            format!(
                "connecting to {} from pid {pid}'s namespace",
                socket.display()
            )
        })?;
    let std = std::os::unix::net::UnixStream::from(fd);
    std.set_nonblocking(true)?;
    Ok(Connected {
        stream: UnixStream::from_std(std)?,
        keepalive: Some(keepalive),
    })
}

fn sockaddr_un(path: &Path) -> Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = CString::new(path.as_os_str().as_bytes())
        .with_context(|| format!("socket path {} contains a NUL", path.display()))?;
    let bytes = bytes.as_bytes_with_nul();
    // SAFETY: sockaddr_un is plain data.
    let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
    if bytes.len() > addr.sun_path.len() {
        bail!(
            "socket path {} is too long for a unix socket",
            path.display()
        );
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = src as libc::c_char;
    }
    let len = mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len();
    Ok((addr, len as libc::socklen_t))
}

/// Enters the pid namespace for this thread's children, forks a child that connects and
/// sends the socket back; gives the socket, our end of the control pair, the child's pid.
fn fork_connector(
    pidns: &fs::File,
    addr: &(libc::sockaddr_un, libc::socklen_t),
) -> io::Result<(OwnedFd, OwnedFd, libc::pid_t)> {
    // SAFETY: setns on an fd we own; affects only this thread's future children.
    if unsafe { libc::setns(pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pair = [0; 2];
    // SAFETY: socketpair fills two fds that we then own.
    if unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    let (ours, theirs) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    // SAFETY: the child runs only async-signal-safe system calls on data prepared before
    // the fork (no allocation, no locks), then _exit()s.
    let child = unsafe { libc::fork() };
    if child < 0 {
        return Err(io::Error::last_os_error());
    }
    if child == 0 {
        // SAFETY: see above.
        unsafe { connector_child(ours.as_raw_fd(), theirs.as_raw_fd(), addr) }
    }
    drop(theirs);
    match receive_fd(ours.as_raw_fd()) {
        Ok(fd) => Ok((fd, ours, child)),
        Err(e) => {
            drop(ours);
            let mut status = 0;
            // SAFETY: reaps our own child, which exits on seeing `ours` closed.
            unsafe { libc::waitpid(child, &mut status, 0) };
            Err(e)
        }
    }
}

/// The forked child: connect, send `[errno]` (+ the socket when errno is 0), wait for the
/// parent to close its end, exit.
unsafe fn connector_child(
    ours: RawFd,
    theirs: RawFd,
    addr: &(libc::sockaddr_un, libc::socklen_t),
) -> ! {
    libc::close(ours);
    let sock = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
    let errno = if sock < 0 || libc::connect(sock, ptr::addr_of!(addr.0).cast(), addr.1) != 0 {
        *libc::__errno_location()
    } else {
        0
    };
    let mut data = errno.to_ne_bytes();
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // Room for one cmsghdr carrying one int, u64-aligned.
    let mut cbuf = [0u64; 4];
    let mut msg: libc::msghdr = mem::zeroed();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    if errno == 0 {
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(mem::size_of::<RawFd>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(mem::size_of::<RawFd>() as u32) as usize;
        ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), sock);
    }
    if libc::sendmsg(theirs, &msg, libc::MSG_NOSIGNAL) >= 0 {
        let mut byte = 0u8;
        loop {
            let n = libc::read(theirs, ptr::addr_of_mut!(byte).cast(), 1);
            if n == 0 || (n < 0 && *libc::__errno_location() != libc::EINTR) {
                break;
            }
        }
    }
    libc::_exit(0)
}

fn receive_fd(sock: RawFd) -> io::Result<OwnedFd> {
    let mut data = [0u8; 4];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    let mut cbuf = [0u64; 4];
    // SAFETY: recvmsg into buffers we own; the cmsg walk stays within msg_controllen.
    unsafe {
        let mut msg: libc::msghdr = mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = cbuf.as_mut_ptr().cast();
        msg.msg_controllen = mem::size_of_val(&cbuf);
        let n = loop {
            let n = libc::recvmsg(sock, &mut msg, libc::MSG_CMSG_CLOEXEC);
            if n >= 0 || io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                break n;
            }
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if n != 4 {
            return Err(io::Error::other("connector child ended without an answer"));
        }
        let errno = i32::from_ne_bytes(data);
        if errno != 0 {
            return Err(io::Error::from_raw_os_error(errno));
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(io::Error::other("connector child sent no socket"));
        }
        let fd = ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>());
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_root_paths_name_their_pid() {
        assert_eq!(
            pid_of_proc_root_path(Path::new("/proc/4242/root/run/systemd/private")),
            Some(4242)
        );
        assert_eq!(
            pid_of_proc_root_path(Path::new("/run/systemd/private")),
            None
        );
        assert_eq!(
            pid_of_proc_root_path(Path::new("/proc/self/root/run/x")),
            None
        );
        assert_eq!(pid_of_proc_root_path(Path::new("/proc/12/cwd/x")), None);
    }

    #[test]
    fn long_socket_paths_are_refused() {
        let long = format!("/{}", "x".repeat(200));
        assert!(sockaddr_un(Path::new(&long)).is_err());
        let (_, len) = sockaddr_un(Path::new("/run/systemd/private")).unwrap();
        assert_eq!(len as usize, 2 + "/run/systemd/private".len() + 1);
    }

    /// The fork-and-pass path, in our own pid namespace (entering it again is allowed):
    /// the stream arrives connected, and its peer credentials name the listener (us).
    #[tokio::test]
    async fn connects_through_a_child() {
        let dir = std::env::temp_dir().join(format!("fb-sd-connect-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s");
        let _ = fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let me = std::process::id() as i32;
        let connected = match connect_in_pidns_of(&path, me).await {
            Ok(c) => c,
            // Unprivileged runs cannot setns(CLONE_NEWPID).
            Err(e)
                if e.chain()
                    .any(|c| c.to_string().contains("Operation not permitted")) =>
            {
                eprintln!("skipping: {e:#}");
                fs::remove_dir_all(&dir).unwrap();
                return;
            }
            Err(e) => panic!("{e:#}"),
        };
        let (mut server, _) = listener.accept().await.unwrap();
        let cred = peer_cred(connected.stream.as_raw_fd()).unwrap();
        assert_eq!(cred.pid, me);
        // The server sees the child as its peer, alive until the keepalive goes.
        let child = peer_cred(server.as_raw_fd()).unwrap().pid;
        assert_ne!(child, me);
        assert!(Path::new(&format!("/proc/{child}")).exists());
        drop(connected.keepalive);
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = connected.stream;
        stream.write_all(b"hi").await.unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hi");
        fs::remove_dir_all(&dir).unwrap();
    }
}
