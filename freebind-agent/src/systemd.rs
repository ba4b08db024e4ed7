//! Talking to systemd: the host's PID 1, or a systemd booted in a container whose private
//! socket is reachable from here (`/proc/<leader>/root/run/systemd/private`).
//!
//! - [`Systemd`] speaks D-Bus to the manager's private peer-to-peer socket (root only, no
//!   dbus-daemon needed, up from early boot) to resolve units and reload the manager, and
//!   knows where the manager's filesystem and cgroup tree are as seen from this process.
//! - Runtime drop-ins under `/run/systemd/system/<unit>.d/` make systemd attach freebind's
//!   pinned programs at every start of a unit with `BPFProgram=`; they vanish at reboot,
//!   together with the bpffs pins they name.
//! - [`notify`] is `sd_notify()` for the agent's own service.
//!
//! What systemd does with `BPFProgram=TYPE:PATH` (src/core/bpf-foreign.c, systemd 252):
//! when it realizes the unit's cgroup it opens the pin (`BPF_OBJ_GET`) and attaches it
//! with `BPF_PROG_ATTACH` and `BPF_F_ALLOW_MULTI`, so it coexists with our own and
//! systemd's other programs. Programs are keyed per unit by (program id, attach type);
//! the key table lives as long as the unit object, so on a restart the second
//! `bpf_foreign_prepare` finds the key taken ("Foreign BPF program already exists,
//! ignoring: File exists") and the shortcut in `bpf_program_cgroup_attach` (same path,
//! type and flags) skips the attach to the new cgroup (systemd issue #26845, seen on 249;
//! a daemon-reload between stop and start clears it). It only works when the manager runs
//! on the unified hierarchy (`bpf_foreign_supported` → `cg_all_unified`).
mod connect;
pub mod dbus;

use std::{
    fs, io,
    os::unix::{fs::MetadataExt as _, net::UnixDatagram},
    path::{Component, Path, PathBuf},
    time::Duration,
};

use anyhow::{anyhow, bail, Context as _, Result};

use self::dbus::{Call, Connection, Value};

/// systemd's private peer-to-peer D-Bus socket.
pub const DEFAULT_SYSTEMD_SOCKET: &str = "/run/systemd/private";

/// The file name of freebind's drop-in in a unit's `.d` directory.
pub const DROPIN_NAME: &str = "50-freebind.conf";

/// Runtime unit configuration, relative to the manager's root: gone at reboot.
const RUNTIME_UNIT_DIR: &str = "run/systemd/system";

/// systemd 252's `BPFProgram=` attach type names (`bpf_cgroup_attach_type_table` in
/// src/shared/bpf-program.c; the same table is in current systemd). No
/// `getsockname4/6`, `getpeername4/6` or `sock_release`.
pub const SYSTEMD_BPF_PROGRAM_TYPES: [&str; 18] = [
    "ingress",
    "egress",
    "sock_create",
    "sock_ops",
    "device",
    "bind4",
    "bind6",
    "connect4",
    "connect6",
    "post_bind4",
    "post_bind6",
    "sendmsg4",
    "sendmsg6",
    "sysctl",
    "recvmsg4",
    "recvmsg6",
    "getsockopt",
    "setsockopt",
];

const BUS_NAME: &str = "org.freedesktop.systemd1";
const MANAGER_PATH: &str = "/org/freedesktop/systemd1";
const MANAGER_IFACE: &str = "org.freedesktop.systemd1.Manager";
const UNIT_IFACE: &str = "org.freedesktop.systemd1.Unit";
const PROPERTIES_IFACE: &str = "org.freedesktop.DBus.Properties";

/// D-Bus's customary reply timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(25);
/// A daemon-reload re-runs generators and reloads every unit.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(180);

/// The systemd `BPFProgram=` type for one of our program section kinds (`cgroup/bind4`,
/// `sockops`, … as libbpf and aya name them); `None` where systemd has none — systemd
/// cannot attach `cgroup/getsockname4/6`.
pub fn bpfprogram_type(section: &str) -> Option<&'static str> {
    Some(match section {
        "cgroup_skb/ingress" => "ingress",
        "cgroup_skb/egress" => "egress",
        "cgroup/sock" | "cgroup/sock_create" => "sock_create",
        "sockops" | "cgroup/sock_ops" => "sock_ops",
        "cgroup/dev" => "device",
        "cgroup/bind4" => "bind4",
        "cgroup/bind6" => "bind6",
        "cgroup/connect4" => "connect4",
        "cgroup/connect6" => "connect6",
        "cgroup/post_bind4" => "post_bind4",
        "cgroup/post_bind6" => "post_bind6",
        "cgroup/sendmsg4" => "sendmsg4",
        "cgroup/sendmsg6" => "sendmsg6",
        "cgroup/sysctl" => "sysctl",
        "cgroup/recvmsg4" => "recvmsg4",
        "cgroup/recvmsg6" => "recvmsg6",
        "cgroup/getsockopt" => "getsockopt",
        "cgroup/setsockopt" => "setsockopt",
        _ => return None,
    })
}

/// A unit as the manager sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unit {
    /// The unit's primary name (an alias given to [`Systemd::unit`] resolves to it).
    pub name: String,
    pub load_state: String,
    pub active_state: String,
    pub sub_state: String,
    /// The unit's cgroup on our cgroup2 mount; `None` when it has none (inactive, or a
    /// unit type without cgroups such as targets and timers).
    pub cgroup: Option<PathBuf>,
    /// The main process of a service, as a pid in our pid namespace (systemd reports it
    /// in its own; translated through the unit's cgroup when the two differ).
    pub main_pid: Option<u32>,
    /// The drop-ins the manager has loaded, as paths in its own filesystem.
    pub drop_in_paths: Vec<PathBuf>,
    /// The unit's files changed since the manager last loaded them.
    pub need_daemon_reload: bool,
}

/// A connection to one systemd manager and where its world is as seen from here.
#[derive(Debug)]
pub struct Systemd {
    socket: PathBuf,
    pid: i32,
    root: PathBuf,
    cgroup_root: PathBuf,
    /// The manager's own name for its root cgroup (`""` on a host, and in a container
    /// with a cgroup namespace); unit cgroup paths it reports start with it.
    manager_cgroup_root: String,
    /// The manager's depth in the pid namespace tree, when it is not ours: the index of
    /// its pids in a `/proc/<pid>/status` `NSpid:` line.
    pidns_level: Option<usize>,
    version: String,
    conn: tokio::sync::Mutex<Option<Connection>>,
}

impl Systemd {
    /// Connects to the manager listening on `socket`; `cgroup2_mount` is where this
    /// process sees the cgroup v2 hierarchy.
    pub async fn connect(socket: &Path, cgroup2_mount: &Path) -> Result<Self> {
        let (conn, pid) = open(socket).await?;
        let root = PathBuf::from(format!("/proc/{pid}/root"));
        let cgroup_file = format!("/proc/{pid}/cgroup");
        let text =
            fs::read_to_string(&cgroup_file).with_context(|| format!("reading {cgroup_file}"))?;
        let rel = manager_cgroup_root(&text).with_context(|| {
            format!(
                "systemd at {} (pid {pid}): unexpected {cgroup_file}",
                socket.display()
            )
        })?;
        let cgroup_root = join_relative(cgroup2_mount, &rel)?;
        if !cgroup_root.join("init.scope").is_dir() {
            bail!(
                "systemd at {} (pid {pid}): its cgroup {} is not under the cgroup2 mount {}",
                socket.display(),
                cgroup_root.join("init.scope").display(),
                cgroup2_mount.display()
            );
        }
        let this = Self {
            socket: socket.to_path_buf(),
            pid,
            root,
            cgroup_root,
            manager_cgroup_root: String::new(),
            pidns_level: None,
            version: String::new(),
            conn: tokio::sync::Mutex::new(Some(conn)),
        };
        let manager_cgroup_root = this
            .property(MANAGER_PATH, MANAGER_IFACE, "ControlGroup")
            .await?
            .into_string()
            .ok_or_else(|| anyhow!("Manager.ControlGroup is not a string"))?;
        let version = this
            .property(MANAGER_PATH, MANAGER_IFACE, "Version")
            .await?
            .into_string()
            .unwrap_or_default();
        log::debug!(
            "systemd {version} at {} (pid {pid}): cgroup root {} (its own name {:?})",
            socket.display(),
            this.cgroup_root.display(),
            manager_cgroup_root
        );
        let pidns_level = if same_pidns(pid) {
            None
        } else {
            let status = fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("reading /proc/{pid}/status"))?;
            let level = nspids(&status).len().checked_sub(1);
            if level.is_none() {
                bail!("/proc/{pid}/status has no NSpid line");
            }
            level
        };
        Ok(Self {
            manager_cgroup_root,
            pidns_level,
            version,
            ..this
        })
    }

    /// The socket this connects to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The manager's pid in our pid namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// The manager's root directory as seen from here (`/proc/<pid>/root`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The manager's root cgroup on our cgroup2 mount.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// The manager's version (`252.39-1~deb12u2`).
    pub fn version(&self) -> &str {
        &self.version
    }

    /// A path in the manager's filesystem (`/sys/fs/bpf/x`) as seen from here.
    pub fn host_path(&self, path: &Path) -> PathBuf {
        self.root.join(path.strip_prefix("/").unwrap_or(path))
    }

    /// Whether the manager runs on the unified cgroup hierarchy: `BPFProgram=` does nothing
    /// otherwise (systemd's `bpf_foreign_supported()`).
    pub fn supports_bpf_program(&self) -> Result<bool> {
        const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
        let path = self.host_path(Path::new("/sys/fs/cgroup"));
        Ok(fs_magic(&path)? == CGROUP2_SUPER_MAGIC)
    }

    /// Loads `name` (unlike `GetUnit`, this works for units not loaded yet) and reads its
    /// state; refuses units that are not found, masked or broken.
    pub async fn unit(&self, name: &str) -> Result<Unit> {
        check_unit_name(name)?;
        let path = self
            .call(MANAGER_PATH, MANAGER_IFACE, "LoadUnit", &[name])
            .await
            .with_context(|| format!("loading unit {name}"))?
            .into_iter()
            .next()
            .and_then(Value::into_string)
            .ok_or_else(|| anyhow!("LoadUnit({name}) gave no object path"))?;
        let string = |prop: &'static str| {
            let path = path.clone();
            async move {
                self.property(&path, UNIT_IFACE, prop)
                    .await?
                    .into_string()
                    .ok_or_else(|| anyhow!("{name}: {prop} is not a string"))
            }
        };
        let load_state = string("LoadState").await?;
        if matches!(
            load_state.as_str(),
            "not-found" | "bad-setting" | "error" | "masked"
        ) {
            let why = match self.property(&path, UNIT_IFACE, "LoadError").await {
                Ok(v) => v
                    .into_fields()
                    .and_then(|f| f.into_iter().nth(1))
                    .and_then(Value::into_string)
                    .unwrap_or_default(),
                Err(_) => String::new(),
            };
            let why = if why.is_empty() {
                format!("unit is {load_state}")
            } else {
                why
            };
            bail!("unit {name}: {why} (LoadState={load_state})");
        }
        let drop_in_paths = self
            .property(&path, UNIT_IFACE, "DropInPaths")
            .await?
            .into_strings()
            .unwrap_or_default()
            .into_iter()
            .map(PathBuf::from)
            .collect();
        let need_daemon_reload = self
            .property(&path, UNIT_IFACE, "NeedDaemonReload")
            .await?
            .as_bool()
            .unwrap_or(false);
        let id = string("Id").await?;
        let (mut cgroup, mut main_pid) = (None, None);
        if let Some(iface) = cgroup_interface(&id) {
            let cg = self
                .property(&path, iface, "ControlGroup")
                .await?
                .into_string()
                .unwrap_or_default();
            if !cg.is_empty() {
                let host = translate_cgroup(&self.cgroup_root, &self.manager_cgroup_root, &cg)
                    .with_context(|| format!("unit {name}: ControlGroup {cg:?}"))?;
                self.check_cgroup_id(&path, iface, &host).await?;
                cgroup = Some(host);
            }
            if iface.ends_with(".Service") {
                let pid = self
                    .property(&path, iface, "MainPID")
                    .await?
                    .as_u64()
                    .and_then(|p| u32::try_from(p).ok())
                    .filter(|&p| p != 0);
                main_pid = match (pid, self.pidns_level, &cgroup) {
                    (Some(pid), Some(level), Some(cg)) => pid_here(cg, level, pid),
                    (pid, None, _) => pid,
                    _ => None,
                };
            }
        }
        Ok(Unit {
            name: id,
            load_state,
            active_state: string("ActiveState").await?,
            sub_state: string("SubState").await?,
            cgroup,
            main_pid,
            drop_in_paths,
            need_daemon_reload,
        })
    }

    /// Guards the path translation: the directory we computed must be the cgroup systemd
    /// means (`ControlGroupId` is its inode number; systemd ≥ 250, 0 when unknown).
    async fn check_cgroup_id(&self, path: &str, iface: &str, host: &Path) -> Result<()> {
        let id = match self.property(path, iface, "ControlGroupId").await {
            Ok(v) => v.as_u64().unwrap_or(0),
            Err(e) if dbus::error_name(&e).is_some() => 0,
            Err(e) => return Err(e),
        };
        if id == 0 {
            return Ok(());
        }
        match fs::metadata(host) {
            Ok(m) if m.ino() != id => bail!(
                "cgroup {} is not the unit's (inode {} ≠ ControlGroupId {id}): \
                 is {} the cgroup2 mount the manager uses?",
                host.display(),
                m.ino(),
                self.cgroup_root.display()
            ),
            // Gone meanwhile (the unit stopped): nothing to check.
            Ok(_) | Err(_) => Ok(()),
        }
    }

    /// `systemctl daemon-reload`: returns once the manager has reloaded.
    ///
    /// systemd answers `Reload` only when the reload is done (it keeps the call in
    /// `m->pending_reload_message`), and systemd 252 keeps private connections open across
    /// it (measured). Should the connection be lost anyway (a stale one, or another
    /// version), this reconnects and reloads again: a reload is idempotent, and only a
    /// reply proves one ran after our files were written.
    pub async fn reload(&self) -> Result<()> {
        let reload = || self.call_with(MANAGER_PATH, MANAGER_IFACE, "Reload", &[], RELOAD_TIMEOUT);
        match reload().await {
            Ok(_) => Ok(()),
            Err(e) if dbus::is_disconnect(&e) => {
                log::debug!("systemd connection lost during Reload ({e:#}); reloading again");
                reload().await.context("reloading systemd")?;
                Ok(())
            }
            Err(e) => Err(e.context("reloading systemd")),
        }
    }

    /// Where freebind's runtime drop-in for `unit` lives, as seen from here.
    pub fn dropin_path(&self, unit: &str) -> PathBuf {
        self.root
            .join(RUNTIME_UNIT_DIR)
            .join(format!("{unit}.d"))
            .join(DROPIN_NAME)
    }

    /// Writes the drop-in atomically (a temporary file renamed into place, so the manager
    /// never reads half a file); the caller then [`reload`](Self::reload)s.
    pub fn write_dropin(&self, unit: &str, contents: &str) -> Result<PathBuf> {
        check_unit_name(unit)?;
        let path = self.dropin_path(unit);
        // systemd reads its own drop-ins as root, but `systemctl cat` shows them to anyone.
        crate::pin::write_atomically(&path, contents, 0o644)?;
        Ok(path)
    }

    /// Removes the drop-in, and its directory if that is left empty; `false` when there
    /// was none.
    pub fn remove_dropin(&self, unit: &str) -> Result<bool> {
        check_unit_name(unit)?;
        let path = self.dropin_path(unit);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
        let dir = path.parent().expect("drop-in path has a parent");
        match fs::remove_dir(dir) {
            Ok(()) => {}
            // ENOTEMPTY: someone else's drop-ins stay.
            Err(e) if e.raw_os_error() == Some(libc::ENOTEMPTY) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", dir.display())),
        }
        Ok(true)
    }

    async fn property(&self, path: &str, iface: &str, prop: &str) -> Result<Value> {
        let reply = self
            .call(path, PROPERTIES_IFACE, "Get", &[iface, prop])
            .await
            .with_context(|| format!("reading {iface}.{prop} of {path}"))?;
        reply
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("empty reply reading {prop}"))
    }

    async fn call(
        &self,
        path: &str,
        iface: &str,
        member: &str,
        args: &[&str],
    ) -> Result<Vec<Value>> {
        match self
            .call_with(path, iface, member, args, CALL_TIMEOUT)
            .await
        {
            // Reads are idempotent: one retry on a fresh connection.
            Err(e) if dbus::is_disconnect(&e) => {
                log::debug!("systemd connection lost ({e:#}); reconnecting");
                self.call_with(path, iface, member, args, CALL_TIMEOUT)
                    .await
            }
            other => other,
        }
    }

    /// One call; a lost or timed-out connection is dropped, and the next call reconnects.
    async fn call_with(
        &self,
        path: &str,
        iface: &str,
        member: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<Vec<Value>> {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            let (conn, pid) = open(&self.socket).await?;
            if pid != self.pid {
                bail!(
                    "systemd at {} is now pid {pid}, was {}: it restarted; start over",
                    self.socket.display(),
                    self.pid
                );
            }
            *guard = Some(conn);
        }
        let conn = guard.as_mut().expect("connection just set");
        let call = Call {
            destination: Some(BUS_NAME),
            path,
            interface: iface,
            member,
            args,
        };
        let result = conn.call(&call, timeout).await;
        if let Err(e) = &result {
            if dbus::error_name(e).is_none() {
                *guard = None;
            }
        }
        result
    }
}

/// Connects and authenticates; gives the connection and the manager's pid in our pid
/// namespace.
async fn open(socket: &Path) -> Result<(Connection, i32)> {
    use std::os::fd::AsRawFd as _;

    let hint = connect::pid_of_proc_root_path(socket).filter(|&pid| !same_pidns(pid));
    let mut connected = match hint {
        Some(pid) => connect::connect_in_pidns_of(socket, pid).await,
        None => tokio::net::UnixStream::connect(socket)
            .await
            .map(|stream| connect::Connected {
                stream,
                keepalive: None,
            })
            .map_err(anyhow::Error::from),
    }
    .with_context(|| format!("connecting to {}: is systemd running?", socket.display()))?;
    let mut pid = connect::peer_cred(connected.stream.as_raw_fd())?.pid;
    if pid <= 0 {
        bail!(
            "systemd at {} runs in a pid namespace this process cannot see",
            socket.display()
        );
    }
    if connected.keepalive.is_none() && !same_pidns(pid) {
        // The manager would refuse us (peer pid 0 in its view): connect from inside.
        drop(connected);
        connected = connect::connect_in_pidns_of(socket, pid)
            .await
            .with_context(|| format!("connecting to {}", socket.display()))?;
        pid = connect::peer_cred(connected.stream.as_raw_fd())?.pid;
    }
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    let mut conn = Connection::authenticate(connected.stream, uid)
        .await
        .with_context(|| {
            format!(
                "systemd at {} refused us (it admits root only)",
                socket.display()
            )
        })?;
    // The manager checks the peer when it accepts, asynchronously: one call proves it
    // took us, and lets the helper child (if any) go.
    conn.call(
        &Call {
            destination: Some(BUS_NAME),
            path: MANAGER_PATH,
            interface: "org.freedesktop.DBus.Peer",
            member: "Ping",
            args: &[],
        },
        CALL_TIMEOUT,
    )
    .await
    .with_context(|| {
        format!(
            "systemd at {} (pid {pid}) closed the connection: not root, or a pid \
             namespace it cannot see? (its journal says why)",
            socket.display()
        )
    })?;
    drop(connected.keepalive);
    Ok((conn, pid))
}

fn same_pidns(pid: i32) -> bool {
    match (
        connect::pidns_id("self"),
        connect::pidns_id(&pid.to_string()),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => true,
    }
}

/// The pids of a `/proc/<pid>/status`'s `NSpid:` line, outermost namespace first.
fn nspids(status: &str) -> Vec<u32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Our pid for the process that is `pid` at depth `level` of the pid namespace tree,
/// looked for in the cgroup subtree `cgroup` (the unit's: its main process is there).
fn pid_here(cgroup: &Path, level: usize, pid: u32) -> Option<u32> {
    let mut dirs = vec![cgroup.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        for ours in procs.lines().filter_map(|l| l.parse::<u32>().ok()) {
            let status = fs::read_to_string(format!("/proc/{ours}/status")).unwrap_or_default();
            if nspids(&status).get(level) == Some(&pid) {
                return Some(ours);
            }
        }
        if let Ok(entries) = fs::read_dir(&dir) {
            dirs.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    None
}

fn fs_magic(path: &Path) -> Result<i64> {
    use std::os::unix::ffi::OsStrExt as _;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs writes into the struct we pass.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        if libc::statfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("statfs {}", path.display()));
        }
        Ok(st.f_type as i64)
    }
}

/// The manager's root cgroup relative to the hierarchy root of `/proc/<pid>/cgroup` (as
/// read by us): a systemd running as PID 1 lives in `<root>/init.scope`.
fn manager_cgroup_root(proc_cgroup: &str) -> Result<String> {
    let path = proc_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| anyhow!("no cgroup v2 entry (0::…)"))?;
    if path.starts_with("/..") {
        bail!("its cgroup {path} is outside this process's cgroup namespace");
    }
    let root = path.strip_suffix("/init.scope").ok_or_else(|| {
        anyhow!(
            "its cgroup is {path}, not …/init.scope: not a systemd running as PID 1 on a \
             cgroup2 hierarchy"
        )
    })?;
    Ok(root.to_string())
}

/// `mount` + a `/`-rooted cgroup path, refusing `..`.
fn join_relative(mount: &Path, rel: &str) -> Result<PathBuf> {
    let rel = Path::new(rel.trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("cgroup path {} is not a plain relative path", rel.display());
    }
    Ok(mount.join(rel))
}

/// A unit's `ControlGroup` as the manager reports it (starting with the manager's own
/// name for its root, `""` under a cgroup namespace) → the directory on our cgroup2 mount,
/// given the manager's root there.
fn translate_cgroup(cgroup_root: &Path, manager_root: &str, unit_cgroup: &str) -> Result<PathBuf> {
    let manager_root = manager_root.trim_end_matches('/');
    let rel = unit_cgroup
        .strip_prefix(manager_root)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'))
        .ok_or_else(|| anyhow!("not under the manager's root cgroup {manager_root:?}"))?;
    if rel.trim_matches('/').is_empty() {
        // The root slice.
        return Ok(cgroup_root.to_path_buf());
    }
    join_relative(cgroup_root, rel)
}

/// The interface carrying `ControlGroup` (and, for services, `MainPID`) for a unit type;
/// `None` for types without a cgroup.
fn cgroup_interface(unit: &str) -> Option<&'static str> {
    Some(match unit.rsplit_once('.')?.1 {
        "service" => "org.freedesktop.systemd1.Service",
        "socket" => "org.freedesktop.systemd1.Socket",
        "scope" => "org.freedesktop.systemd1.Scope",
        "slice" => "org.freedesktop.systemd1.Slice",
        "mount" => "org.freedesktop.systemd1.Mount",
        "swap" => "org.freedesktop.systemd1.Swap",
        _ => return None,
    })
}

/// The `[Section]` of a unit file for a unit type that takes `BPFProgram=`.
fn unit_section(unit: &str) -> Option<&'static str> {
    Some(match unit.rsplit_once('.')?.1 {
        "service" => "Service",
        "socket" => "Socket",
        "scope" => "Scope",
        "slice" => "Slice",
        "mount" => "Mount",
        "swap" => "Swap",
        _ => return None,
    })
}

/// A unit name safe to use as a path component.
fn check_unit_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name.contains('.')
        && name.chars().all(|c| c.is_ascii_graphic() && c != '/');
    if !ok {
        bail!("{name:?} is not a valid unit name");
    }
    Ok(())
}

/// The text of freebind's drop-in for `unit`: one `BPFProgram=TYPE:PATH` per program
/// (`programs` holds systemd type names, see [`bpfprogram_type`], and pin paths as the
/// manager sees them), and an optional `ExecStartPre=` command line, written as given
/// (systemd's `%` specifiers apply; services only). The section follows the unit's type.
/// Refuses what cannot be written safely: a type systemd lacks, a path that is not one
/// absolute line, a multi-line command.
pub fn dropin_text(
    unit: &str,
    programs: &[(&str, PathBuf)],
    exec_start_pre: Option<&str>,
) -> Result<String> {
    check_unit_name(unit)?;
    let section = unit_section(unit)
        .ok_or_else(|| anyhow!("unit {unit}: systemd has no BPFProgram= for this unit type"))?;
    let mut text = format!(
        "# Written by freebind-agent: systemd attaches freebind's pinned eBPF programs to\n\
         # this unit's cgroup at every start. Remove with: freebind-agent detach --unit {unit}\n\
         # Runtime configuration: it vanishes at reboot, as do the pins it names.\n\
         [{section}]\n"
    );
    for (kind, pin) in programs {
        if !SYSTEMD_BPF_PROGRAM_TYPES.contains(kind) {
            bail!("systemd has no BPFProgram= type {kind:?}");
        }
        let pin = pin
            .to_str()
            .filter(|p| p.starts_with('/') && !p.contains(['\n', '\r']))
            .ok_or_else(|| anyhow!("pin path {} is not usable in a unit file", pin.display()))?;
        // '%' starts a systemd specifier in BPFProgram= paths.
        text.push_str(&format!("BPFProgram={kind}:{}\n", pin.replace('%', "%%")));
    }
    if let Some(cmd) = exec_start_pre {
        if section != "Service" {
            bail!("unit {unit}: ExecStartPre= exists for services only");
        }
        if cmd.contains(['\n', '\r']) || cmd.trim().is_empty() {
            bail!("ExecStartPre= command {cmd:?} is not a single line");
        }
        text.push_str(&format!("ExecStartPre={cmd}\n"));
    }
    Ok(text)
}

/// `sd_notify(state)`: sends `state` (`READY=1`, `STATUS=…`, newline-separated
/// assignments) to `$NOTIFY_SOCKET`; `false` when that is unset (not run by systemd with
/// `Type=notify`).
pub fn notify(state: &str) -> Result<bool> {
    let Some(socket) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = socket
        .into_string()
        .map_err(|s| anyhow!("NOTIFY_SOCKET {s:?} is not UTF-8"))?;
    notify_to(&socket, state)?;
    Ok(true)
}

/// `RELOADING=1` with the `MONOTONIC_USEC=` systemd ≥ 253 wants for `Type=notify-reload`.
pub fn notify_reloading() -> Result<bool> {
    notify(&format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec()))
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
pub fn monotonic_usec() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// Sends one notification datagram to `socket`: a path, or an abstract name written with
/// a leading `@`.
fn notify_to(socket: &str, state: &str) -> Result<()> {
    let sock = UnixDatagram::unbound().context("creating a datagram socket")?;
    let sent = if let Some(name) = socket.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt as _;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
        sock.send_to_addr(state.as_bytes(), &addr)
    } else if socket.starts_with('/') {
        sock.send_to(state.as_bytes(), socket)
    } else {
        bail!("NOTIFY_SOCKET {socket:?} is neither a path nor an abstract name");
    };
    let n = sent.with_context(|| format!("notifying {socket}"))?;
    if n != state.len() {
        bail!("notifying {socket}: short send");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_managers_cgroup() {
        assert_eq!(manager_cgroup_root("0::/init.scope\n").unwrap(), "");
        let sandbox = "9:name=systemd:/x\n1:cpu:/\n0::/freebind-e2e-sbx-123/payload/init.scope\n";
        assert_eq!(
            manager_cgroup_root(sandbox).unwrap(),
            "/freebind-e2e-sbx-123/payload"
        );
        let err = manager_cgroup_root("0::/system.slice/foo.service\n").unwrap_err();
        assert!(err.to_string().contains("not …/init.scope"), "{err}");
        assert!(manager_cgroup_root("1:cpu:/\n").is_err());
        assert!(manager_cgroup_root("0::/../../init.scope\n").is_err());
    }

    #[test]
    fn translates_unit_cgroups() {
        let root = Path::new("/sys/fs/cgroup/unified/sbx");
        // A cgroup-namespaced manager names its root "".
        assert_eq!(
            translate_cgroup(root, "", "/system.slice/x.service").unwrap(),
            Path::new("/sys/fs/cgroup/unified/sbx/system.slice/x.service")
        );
        // Without a cgroup namespace it names it by its full path.
        assert_eq!(
            translate_cgroup(root, "/sbx", "/sbx/system.slice/x.service").unwrap(),
            Path::new("/sys/fs/cgroup/unified/sbx/system.slice/x.service")
        );
        assert_eq!(
            translate_cgroup(
                Path::new("/sys/fs/cgroup"),
                "",
                "/system.slice/a\\x2db.service"
            )
            .unwrap(),
            Path::new("/sys/fs/cgroup/system.slice/a\\x2db.service")
        );
        assert_eq!(translate_cgroup(root, "", "/").unwrap(), root);
        assert_eq!(translate_cgroup(root, "/sbx", "/sbx").unwrap(), root);
        assert!(translate_cgroup(root, "/sbx", "/sbxy/system.slice").is_err());
        assert!(translate_cgroup(root, "", "/system.slice/../../etc").is_err());
    }

    #[test]
    fn maps_section_kinds_to_systemd_types() {
        for (ours, theirs) in [
            ("cgroup/setsockopt", Some("setsockopt")),
            ("cgroup/bind4", Some("bind4")),
            ("cgroup/bind6", Some("bind6")),
            ("cgroup/sendmsg4", Some("sendmsg4")),
            ("cgroup/sendmsg6", Some("sendmsg6")),
            ("cgroup/connect4", Some("connect4")),
            ("cgroup/connect6", Some("connect6")),
            ("sockops", Some("sock_ops")),
            ("cgroup/getsockname4", None),
            ("cgroup/getsockname6", None),
            ("sk_lookup", None),
        ] {
            assert_eq!(bpfprogram_type(ours), theirs, "{ours}");
            if let Some(t) = theirs {
                assert!(SYSTEMD_BPF_PROGRAM_TYPES.contains(&t));
            }
        }
    }

    #[test]
    fn writes_a_dropin() {
        let programs = [
            ("bind4", PathBuf::from("/sys/fs/bpf/freebind/web/bind4")),
            (
                "setsockopt",
                PathBuf::from("/sys/fs/bpf/freebind/100%/setsockopt"),
            ),
        ];
        let text = dropin_text(
            "web.service",
            &programs,
            Some("+/usr/bin/freebind-agent hook --unit %n"),
        )
        .unwrap();
        assert!(text.starts_with("# Written by freebind-agent"), "{text}");
        assert!(
            text.contains("freebind-agent detach --unit web.service\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "[Service]\n\
                 BPFProgram=bind4:/sys/fs/bpf/freebind/web/bind4\n\
                 BPFProgram=setsockopt:/sys/fs/bpf/freebind/100%%/setsockopt\n\
                 ExecStartPre=+/usr/bin/freebind-agent hook --unit %n\n"
            ),
            "{text}"
        );
        let scope = dropin_text("x.scope", &[("bind6", "/sys/fs/bpf/b".into())], None).unwrap();
        assert!(
            scope.ends_with("[Scope]\nBPFProgram=bind6:/sys/fs/bpf/b\n"),
            "{scope}"
        );

        assert!(dropin_text("x.target", &[], None).is_err());
        assert!(dropin_text("x.socket", &[], Some("/bin/true")).is_err());
        assert!(dropin_text("../x.service", &[], None).is_err());
        assert!(dropin_text("x.service", &[("getsockname4", "/p".into())], None).is_err());
        assert!(dropin_text("x.service", &[("bind4", "rel/p".into())], None).is_err());
        assert!(dropin_text("x.service", &[("bind4", "/p\nExecStart=/x".into())], None).is_err());
        assert!(dropin_text("x.service", &[], Some("/bin/a\nExecStartPost=/x")).is_err());
    }

    #[test]
    fn unit_names_are_checked() {
        for ok in [
            "a.service",
            "getty@tty1.service",
            "a\\x2db.service",
            "-.slice",
        ] {
            check_unit_name(ok).unwrap();
        }
        for bad in [
            "",
            "a",
            "../a.service",
            "a/b.service",
            ".service",
            "a b.service",
        ] {
            assert!(check_unit_name(bad).is_err(), "{bad:?}");
        }
    }

    /// A `Systemd` with no connection, for the filesystem parts.
    fn offline(root: &Path) -> Systemd {
        Systemd {
            socket: PathBuf::from(DEFAULT_SYSTEMD_SOCKET),
            pid: 1,
            root: root.to_path_buf(),
            cgroup_root: PathBuf::from("/sys/fs/cgroup"),
            manager_cgroup_root: String::new(),
            pidns_level: None,
            version: String::new(),
            conn: tokio::sync::Mutex::new(None),
        }
    }

    #[test]
    fn writes_and_removes_dropins_atomically() {
        let root = std::env::temp_dir().join(format!("fb-sd-dropin-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let sd = offline(&root);
        let path = sd.write_dropin("web.service", "[Service]\n").unwrap();
        assert_eq!(
            path,
            root.join("run/systemd/system/web.service.d/50-freebind.conf")
        );
        assert_eq!(fs::read_to_string(&path).unwrap(), "[Service]\n");
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o644);
        sd.write_dropin("web.service", "[Service]\nX=1\n").unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "[Service]\nX=1\n");
        // No temporary file left behind.
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);

        assert!(sd.remove_dropin("web.service").unwrap());
        assert!(!path.parent().unwrap().exists());
        assert!(!sd.remove_dropin("web.service").unwrap());

        // Someone else's drop-in keeps the directory.
        sd.write_dropin("db.service", "[Service]\n").unwrap();
        let other = root.join("run/systemd/system/db.service.d/10-other.conf");
        fs::write(&other, "[Service]\n").unwrap();
        assert!(sd.remove_dropin("db.service").unwrap());
        assert!(other.exists());
        assert!(sd.write_dropin("../x.service", "").is_err());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn host_paths_are_under_the_managers_root() {
        let sd = offline(Path::new("/proc/42/root"));
        assert_eq!(
            sd.host_path(Path::new("/sys/fs/bpf/x")),
            Path::new("/proc/42/root/sys/fs/bpf/x")
        );
    }

    #[test]
    fn notifies_path_and_abstract_sockets() {
        let dir = std::env::temp_dir().join(format!("fb-sd-notify-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = fs::remove_file(&path);
        let server = UnixDatagram::bind(&path).unwrap();
        notify_to(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");

        use std::os::linux::net::SocketAddrExt as _;
        let name = format!("fb-sd-notify-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        notify_to(&format!("@{name}"), "STATUS=hello\nSTOPPING=1").unwrap();
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=hello\nSTOPPING=1");

        assert!(notify_to("relative", "READY=1").is_err());
        assert!(notify_to(dir.join("absent").to_str().unwrap(), "READY=1").is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_nspid_lines() {
        let status = "Name:\tsleep\nNSpid:\t27195\t63\nNSsid:\t1\n";
        assert_eq!(nspids(status), vec![27195, 63]);
        assert_eq!(nspids("Name:\tx\n"), Vec::<u32>::new());
        // Our own process, found through our own cgroup at our own depth.
        let me = std::process::id();
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let level = nspids(&status).len() - 1;
        let cgroup = fs::read_to_string("/proc/self/cgroup").unwrap();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mount = mounts.lines().find_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            (post.starts_with("cgroup2 ") && pre.split(' ').nth(3) == Some("/"))
                .then(|| pre.split(' ').nth(4).unwrap().to_string())
        });
        let (Some(mount), Some(rel)) = (mount, cgroup.lines().find_map(|l| l.strip_prefix("0::")))
        else {
            eprintln!("skipping the lookup: no cgroup2 mount visible");
            return;
        };
        let dir = Path::new(&mount).join(rel.trim_start_matches('/'));
        assert_eq!(pid_here(&dir, level, nspids(&status)[level]), Some(me));
    }

    #[test]
    fn monotonic_usec_moves_forward() {
        let a = monotonic_usec();
        std::thread::sleep(Duration::from_millis(2));
        assert!(monotonic_usec() >= a + 1_000);
    }
}
