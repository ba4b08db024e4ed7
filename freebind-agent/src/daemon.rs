//! The system-wide daemon: attachments from a config file and from `attach`, followed as
//! cgroups come and go, and every network namespace their processes live in served. One
//! tokio `select!` over signals, the control socket, cgroup watches, a rescan tick and the
//! agent's own work; one shutdown path, which leaves everything pinned.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::PermissionsExt as _},
    },
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use tokio::{
    io::{unix::AsyncFd, AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    signal::unix::{signal, SignalKind},
};

use crate::{
    agent::Agent,
    config::{Config, DEFAULT_CONFIG},
    control::{self, Request},
    manager::{Manager, Origin},
    netns::Netns,
    systemd,
};

/// How often the daemon looks for new processes' namespaces and for cgroups that a watch
/// could not report (deeper levels of a glob).
const RESCAN_PERIOD: Duration = Duration::from_secs(1);

/// A namespace in which no attached process has been seen for this long is no longer
/// served (its pins go): a unit between two starts has no process for a moment.
const NETNS_GRACE: Duration = Duration::from_secs(5);

/// Where the daemon's configuration comes from.
pub struct ConfigSource {
    pub path: PathBuf,
    /// Given on the command line: its absence is an error, not an empty config.
    pub explicit: bool,
}

impl ConfigSource {
    pub fn new(path: Option<&Path>) -> Self {
        match path {
            Some(p) => Self {
                path: p.to_path_buf(),
                explicit: true,
            },
            None => Self {
                path: PathBuf::from(DEFAULT_CONFIG),
                explicit: false,
            },
        }
    }

    pub fn load(&self) -> Result<Config> {
        if !self.explicit && !self.path.exists() {
            return Ok(Config::default());
        }
        Config::load_trusted(&self.path)
    }
}

pub struct Daemon {
    manager: Manager,
    agent: Agent,
    config: ConfigSource,
    /// When each served namespace (by inode) last had an attached process in it.
    netns_seen: HashMap<u64, Instant>,
    /// When the namespaces a previous daemon served but this one does not are swept.
    sweep_at: Option<Instant>,
    inotify: AsyncFd<OwnedFd>,
    watches: BTreeMap<PathBuf, i32>,
}

impl Daemon {
    /// Adopts the pinned state, serves, applies the config. An invalid config fails the
    /// start; an attachment that cannot be made (a unit that does not exist) is logged and
    /// retried at the next reload.
    pub async fn start(manager: Manager, config: ConfigSource) -> Result<Self> {
        let cfg = config.load()?;
        let agent = Agent::pinned(&manager.dirs)?;
        // SAFETY: plain syscall; the fd is owned at once.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("inotify_init1 (CONFIG_INOTIFY_USER)");
        }
        // SAFETY: just created, owned here.
        // SAFETY: the descriptor is owned by the AsyncFd for as long as it is registered.
        let inotify = unsafe { AsyncFd::register(OwnedFd::from_raw_fd(fd)) }
            .map_err(|e| e.into_parts().1)
            .context("registering the inotify descriptor")?;
        let mut d = Self {
            manager,
            agent,
            config,
            netns_seen: HashMap::new(),
            sweep_at: Some(Instant::now() + NETNS_GRACE),
            inotify,
            watches: BTreeMap::new(),
        };
        if !d.config.explicit && !d.config.path.exists() {
            log::info!(
                "no config at {}: attachments come from `freebind-agent attach`",
                d.config.path.display()
            );
        }
        d.apply(cfg).await;
        // Adopted attachments learn again where they point (a unit's systemd and cgroup).
        d.manager.attach_all_targets().await;
        d.rescan().await;
        Ok(d)
    }

    /// Serves until SIGTERM or SIGINT; the pins stay for the next daemon.
    pub async fn run(mut self) -> Result<()> {
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sighup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        let socket = self.manager.dirs.control_socket();
        let _ = std::fs::remove_file(&socket);
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("listening on {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod {}", socket.display()))?;
        let mut tick = tokio::time::interval(RESCAN_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let served = self.agent.served_inos().len();
        log::info!(
            "ready: {} attachment(s), serving {served} network namespace(s); control socket {}",
            self.manager.entries().count(),
            socket.display()
        );
        let _ = systemd::notify("READY=1\nSTATUS=serving");
        let why = loop {
            tokio::select! {
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
                _ = sighup.recv() => self.reload().await,
                conn = listener.accept() => match conn {
                    Ok((stream, _)) => {
                        if self.serve_request(stream).await == Some(Request::DetachAll) {
                            self.agent.unpin_on_drop();
                            break "detach --all";
                        }
                    }
                    Err(e) => log::warn!("accepting on {}: {e}", socket.display()),
                },
                ready = self.inotify.readable() => {
                    ready.context("waiting on inotify")?.clear_ready();
                    drain_inotify(&self.inotify);
                    self.rescan().await;
                }
                _ = tick.tick() => {
                    if !self.manager.dirs.shared_maps().is_dir() {
                        break PINS_GONE;
                    }
                    self.rescan().await;
                }
                r = self.agent.step() => {
                    r?;
                    // Binds from namespaces not served yet: the events come from this
                    // installation's programs, so the process is an attached one.
                    let pids: Vec<u32> = self
                        .agent
                        .take_unserved()
                        .into_iter()
                        .map(|(pid, _)| pid)
                        .collect();
                    if !pids.is_empty() {
                        self.serve_netns_of(&pids);
                    }
                }
            }
        };
        let _ = systemd::notify("STOPPING=1");
        let _ = std::fs::remove_file(&socket);
        if why == PINS_GONE {
            log::error!(
                "{} is gone (bpffs unmounted, or the pins removed): the kernel dropped every \
                 attachment held only by a pin; restarting to attach and pin everything again \
                 from the config and the records in {}",
                self.manager.dirs.shared_maps().display(),
                self.manager.dirs.run.display()
            );
            return Err(reexec()).context("restarting the daemon after its pins vanished");
        }
        if why == "detach --all" {
            log::info!("detach --all: everything removed; exiting");
        } else {
            log::info!(
                "{why}: exiting; the attachments stay pinned in {}",
                self.manager.dirs.pin.display()
            );
        }
        Ok(())
    }

    /// SIGHUP: a valid config replaces the config-made attachments (added, changed in
    /// place, removed), leaving the others undisturbed; an invalid one changes nothing.
    async fn reload(&mut self) {
        let _ = systemd::notify_reloading();
        match self.config.load() {
            Ok(cfg) => {
                log::info!("SIGHUP: reloading {}", self.config.path.display());
                self.apply(cfg).await;
                self.rescan().await;
            }
            Err(e) => log::error!("SIGHUP: config refused, nothing changed: {e:#}"),
        }
        let _ = systemd::notify("READY=1\nSTATUS=serving");
    }

    async fn apply(&mut self, cfg: Config) {
        let old = Config {
            attach: self.manager.config_specs(),
        };
        let diff = Config::diff(&old, &cfg);
        for spec in &diff.removed {
            match self.manager.detach(&spec.selector.key()).await {
                Ok(m) => log::info!("config: {m}"),
                Err(e) => log::error!("config: {e:#}"),
            }
        }
        for spec in diff
            .added
            .iter()
            .chain(diff.changed.iter().map(|(_, new)| new))
        {
            let r = self
                .manager
                .attach(
                    spec.selector.clone(),
                    spec.allow.clone(),
                    Origin::Config,
                    None,
                )
                .await;
            match r {
                Ok(m) => log::info!("config: {m}"),
                Err(e) => log::error!(
                    "config {} line {}: {} not attached: {e:#}",
                    self.config.path.display(),
                    spec.line,
                    spec.selector
                ),
            }
        }
    }

    /// Answers one request; returns it (the loop ends after `detach --all`: with
    /// everything removed there is nothing left to keep, and the config would only
    /// attach it again).
    async fn serve_request(&mut self, stream: UnixStream) -> Option<Request> {
        let (read, mut write) = stream.into_split();
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(5),
            BufReader::new(read).read_line(&mut line),
        )
        .await;
        if !matches!(read, Ok(Ok(n)) if n > 0) {
            return None;
        }
        let req = Request::decode(&line);
        if let Ok(Request::Events) = req {
            self.stream_events(write);
            return None;
        }
        let result = match &req {
            Ok(req) => self.handle(req.clone()).await,
            Err(e) => Err(anyhow::anyhow!("{e:#}")),
        };
        match &result {
            // `status` and every metrics scrape ask whether a daemon is there.
            Ok(m) if matches!(req, Ok(Request::Ping)) => log::debug!("control: ping: {m}"),
            Ok(m) => log::info!("control: {m}"),
            Err(e) => log::warn!("control: {e:#}"),
        }
        let _ = write
            .write_all(control::encode_reply(&result).as_bytes())
            .await;
        req.ok()
    }

    /// Forwards the agent's events to an `events` client until it goes (or falls so far
    /// behind that it is told how many it missed).
    fn stream_events(&self, mut write: tokio::net::unix::OwnedWriteHalf) {
        let mut rx = self.agent.subscribe();
        log::info!("control: an `events` client subscribed");
        tokio::spawn(async move {
            use tokio::sync::broadcast::error::RecvError;
            loop {
                let line = match rx.recv().await {
                    Ok(line) => line,
                    Err(RecvError::Lagged(n)) => {
                        format!("{{\"kind\":\"lagged\",\"count\":{n},\"line\":\"{n} events not sent: this client read too slowly\"}}\n").into()
                    }
                    Err(RecvError::Closed) => return,
                };
                if write.write_all(line.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }

    async fn handle(&mut self, req: Request) -> Result<String> {
        let r = match req {
            Request::Attach {
                selector,
                allow,
                pid,
            } => self.manager.attach(selector, allow, Origin::Cli, pid).await,
            Request::Detach { selector } => self.manager.detach(&selector.key()).await,
            Request::DetachAll => self.manager.detach_all().await,
            Request::Ping => return Ok(format!("pid {}", std::process::id())),
            Request::Events => unreachable!("streamed by serve_request"),
        };
        // Before replying: the namespaces of what was just attached are served.
        self.rescan().await;
        r
    }

    /// Follows cgroups (attach new matches, forget removed ones, detach the attachments of
    /// ended containers) and namespaces, and re-aims the watches.
    async fn rescan(&mut self) {
        for key in self.manager.rescan() {
            match self.manager.detach(&key).await {
                Ok(m) => log::info!("{m}: its process's cgroup is gone"),
                Err(e) => log::warn!("{e:#}"),
            }
        }
        self.sync_watches();
        self.sync_netns();
        self.agent.set_managed(self.manager.managed());
        if self.sweep_at.is_some_and(|t| Instant::now() >= t) {
            self.sweep_at = None;
            self.agent.sweep_unserved();
        }
    }

    fn sync_watches(&mut self) {
        let want: BTreeSet<PathBuf> = self.manager.watch_dirs();
        self.watches.retain(|dir, wd| {
            let keep = want.contains(dir);
            if !keep {
                // SAFETY: plain syscall on our inotify fd.
                unsafe { libc::inotify_rm_watch(self.inotify.get_ref().as_raw_fd(), *wd) };
            }
            keep
        });
        for dir in want {
            if self.watches.contains_key(&dir) {
                continue;
            }
            let Ok(c) = CString::new(dir.as_os_str().as_bytes()) else {
                continue;
            };
            // SAFETY: plain syscall with a valid C string.
            let wd = unsafe {
                libc::inotify_add_watch(
                    self.inotify.get_ref().as_raw_fd(),
                    c.as_ptr(),
                    libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_TO | libc::IN_ONLYDIR,
                )
            };
            if wd >= 0 {
                self.watches.insert(dir, wd);
            } else {
                let e = io::Error::last_os_error();
                if e.raw_os_error() == Some(libc::ENOSPC) {
                    log::warn!(
                        "cannot watch {} (fs.inotify.max_user_watches reached): new cgroups \
                         there are found by the 1 s rescan only",
                        dir.display()
                    );
                } else {
                    log::debug!("watching {}: {e}", dir.display());
                }
            }
        }
    }

    /// Serves the namespace of every attached process; stops serving namespaces where none
    /// has been for [`NETNS_GRACE`]. The daemon's own namespace is always served.
    fn sync_netns(&mut self) {
        let now = Instant::now();
        let pids = self.manager.netns_pids();
        for ino in self.serve_netns_of(&pids) {
            self.netns_seen.insert(ino, now);
        }
        let own = self.agent.own_ino();
        for ino in self.agent.served_inos() {
            if ino == own {
                continue;
            }
            let last = *self.netns_seen.entry(ino).or_insert(now);
            if now.duration_since(last) > NETNS_GRACE {
                self.agent.stop_serving(ino);
                self.netns_seen.remove(&ino);
            }
        }
    }

    /// Serves the namespaces of `pids` not served yet; returns the inodes of all of them.
    fn serve_netns_of(&mut self, pids: &[u32]) -> BTreeSet<u64> {
        let mut seen = BTreeMap::new();
        for &pid in pids {
            if let Ok(meta) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                seen.entry(std::os::unix::fs::MetadataExt::ino(&meta))
                    .or_insert(pid);
            }
        }
        for (&ino, &pid) in &seen {
            if self.agent.serves(ino) {
                continue;
            }
            let label = format!("network namespace net:[{ino}] (of pid {pid})");
            if let Err(e) = Netns::of_pid(pid, label).and_then(|ns| self.agent.serve(ns)) {
                log::warn!("cannot serve the network namespace of pid {pid}: {e:#}");
            }
        }
        seen.into_keys().collect()
    }
}

/// Why the loop ends when the shared maps' pins vanish.
const PINS_GONE: &str = "pins gone";

/// Replaces this process with a fresh start of the same command line (same pid, so a
/// systemd unit keeps its main process). Pinned links are what keeps a cgroup attachment
/// alive without the daemon: once their bpffs is unmounted (or the pins deleted) the kernel
/// detaches them, and only the start path, which re-pins from the config and the records
/// in the run directory (and mounts bpffs where it may), rebuilds them all. Every
/// descriptor is close-on-exec (std, tokio and bpf(2) descriptors are), so the lock and the
/// old maps go with the old image. Returns only when exec fails.
fn reexec() -> io::Error {
    use std::os::unix::process::CommandExt as _;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_default();
    // The binary by its path (the process name stays `freebind-agent`); /proc/self/exe when
    // that path is gone (an upgrade replaced the file).
    let exe = std::env::current_exe()
        .ok()
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
    std::process::Command::new(exe).arg0(arg0).args(args).exec()
}

fn drain_inotify(fd: &AsyncFd<OwnedFd>) {
    let mut buf = [0u8; 4096];
    // SAFETY: reads into our own buffer from our own non-blocking fd.
    while unsafe { libc::read(fd.get_ref().as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) } > 0 {}
}
