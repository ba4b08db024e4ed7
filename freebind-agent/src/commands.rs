//! The agent's verbs, each a short sequence over the library: check what can be checked
//! before anything changes, then act.
use std::{
    ffi::OsString,
    io::Write as _,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::signal::unix::{signal, SignalKind};

use crate::{
    agent::Agent,
    cgroup::{Cgroup2, TransientCgroup},
    config::{check_unit_name, Selector},
    control::{self, Request},
    daemon::{ConfigSource, Daemon},
    events, exec, kernel,
    manager::{Manager, Origin},
    netns::Netns,
    paths::StateDirs,
    pin::StateLock,
    pinned,
    policy::Policy,
    selector::CgroupGlob,
    status::{self, ForegroundGuard},
};

/// Everything that must hold before the agent touches the kernel. Runs before any thread
/// exists (see [`Cgroup2::locate_or_mount`]).
fn prepare(allow: &[String]) -> Result<(Policy, Cgroup2)> {
    let policy = Policy::parse(allow)?;
    kernel::check_privileges()?;
    kernel::enter_host_cgroup_namespace();
    let cg = Cgroup2::locate_or_mount()?;
    kernel::raise_memlock();
    kernel::check_features()?;
    Ok((policy, cg))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

/// The namespaces named with `--netns`, opened before anything changes.
fn open_netns(names: &[String]) -> Result<Vec<Netns>> {
    names.iter().map(|n| Netns::named(n)).collect()
}

/// `run --cgroup PATH`: attach to an existing cgroup until SIGINT/SIGTERM.
pub fn run(
    opts: &StateOptions,
    cgroup: &Path,
    allow: &[String],
    netns: &[String],
    serve: &ServeOptions,
) -> Result<()> {
    let (policy, cg) = prepare(allow)?;
    serve.apply()?;
    let cgroup = cg.resolve(cgroup)?;
    let extra = open_netns(netns)?;
    runtime()?.block_on(async {
        let mut sigint =
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        let mut sigterm =
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let _metrics = serve.start_metrics(opts, &cg).await?;
        let mut agent = Agent::start(&cgroup, &policy, extra)?;
        let _record = foreground_record(opts, &agent, &cg, &cgroup, allow);
        log::info!(
            "ready: serving {} until SIGINT or SIGTERM",
            cgroup.display()
        );
        let sig = agent
            .serve_until(async {
                tokio::select! {
                    _ = sigint.recv() => "SIGINT",
                    _ = sigterm.recv() => "SIGTERM",
                }
            })
            .await?;
        drop(agent);
        log::info!("{sig}: detached from {}", cgroup.display());
        Ok(())
    })
}

/// `exec [--netns NS] -- CMD`: a transient cgroup, attached, CMD in it (and in NS); returns
/// CMD's exit code.
pub fn exec(
    opts: &StateOptions,
    cmd: &[OsString],
    allow: &[String],
    netns: Option<&str>,
    serve: &ServeOptions,
) -> Result<i32> {
    let (policy, cg) = prepare(allow)?;
    serve.apply()?;
    // CMD enters the namespace through a descriptor of its own, the agent serves it
    // through another.
    let cmd_netns = netns.map(Netns::named).transpose()?;
    let extra = netns.map(Netns::named).transpose()?.into_iter().collect();
    runtime()?.block_on(async {
        // Handlers first: a signal from here on is CMD's to receive, never a default
        // death of the agent that would leave the transient cgroup behind.
        let signals = exec::Signals::install()?;
        let _metrics = serve.start_metrics(opts, &cg).await?;
        let transient = TransientCgroup::create(&cg)?;
        let mut agent = Agent::start(transient.path(), &policy, extra)?;
        let record = foreground_record(opts, &agent, &cg, transient.path(), allow);
        log::info!("ready: running {} under freebind", cmd[0].to_string_lossy());
        let code = agent
            .serve_until(exec::run_in_cgroup(
                cmd,
                transient.path(),
                cmd_netns.as_ref(),
                signals,
            ))
            .await??;
        let left = transient.procs();
        if !left.is_empty() {
            log::warn!(
                "{} process(es) CMD left in {} (daemonized?) are being stopped: run daemons in the foreground under exec",
                left.len(),
                transient.path().display()
            );
            transient.kill_all();
        }
        drop(record);
        drop(agent);
        drop(transient);
        Ok(code)
    })
}

/// Options of the serving verbs (`run`, `exec`, `daemon`).
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// The event ring buffer's size.
    pub event_ring_bytes: Option<u32>,
}

impl ServeOptions {
    fn apply(&self) -> Result<()> {
        if let Some(bytes) = self.event_ring_bytes {
            crate::loader::set_event_ring_bytes(bytes)?;
        }
        Ok(())
    }

    /// The metrics server, listening before the agent attaches anything (a taken port
    /// changes nothing); it stops with the returned guard.
    async fn start_metrics(
        &self,
        opts: &StateOptions,
        cg: &Cgroup2,
    ) -> Result<Option<AbortOnDrop>> {
        let Some(addr) = self.metrics else {
            return Ok(None);
        };
        let task = crate::metrics::serve(addr, opts.dirs.clone(), cg.clone()).await?;
        Ok(Some(AbortOnDrop(task)))
    }
}

/// Ends a background task when dropped.
pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Records a foreground attachment for `status` and the metrics (best effort: serving
/// does not depend on it). The cgroup is named relative to the cgroup2 mount, which may be
/// a private one (`ip netns exec` hides the host's).
fn foreground_record(
    opts: &StateOptions,
    agent: &Agent,
    cg: &Cgroup2,
    cgroup: &Path,
    allow: &[String],
) -> Option<ForegroundGuard> {
    let name = Path::new("/").join(cgroup.strip_prefix(cg.mount()).unwrap_or(cgroup));
    agent
        .foreground_record(&name, allow)
        .write(&opts.dirs)
        .map_err(|e| log::warn!("`status` will not list this agent: {e:#}"))
        .ok()
}

/// Where the pinned state lives and how systemd is reached (global options).
pub struct StateOptions {
    pub dirs: StateDirs,
    pub systemd_socket: PathBuf,
}

/// What `attach`/`detach` point at.
pub enum Target {
    Unit(String),
    /// A cgroup path or glob, relative to the cgroup2 mount or absolute below it.
    Cgroup(PathBuf),
    /// A process: its cgroup, and its network namespace served.
    Pid(u32),
}

/// `daemon [--config PATH]`: the system-wide agent until SIGTERM/SIGINT.
pub fn daemon(opts: &StateOptions, config: Option<&Path>, serve: &ServeOptions) -> Result<()> {
    let (_, cg) = prepare(&[] as &[String])?;
    serve.apply()?;
    // An invalid config is refused before anything changes.
    let source = ConfigSource::new(config);
    source.load()?;
    runtime()?.block_on(async {
        let lock = StateLock::acquire(&opts.dirs)?;
        let metrics = serve.start_metrics(opts, &cg).await?;
        let manager = Manager::open(&opts.dirs, cg, &opts.systemd_socket, lock)?;
        let r = Daemon::start(manager, source).await?.run().await;
        drop(metrics);
        r
    })
}

/// `attach TARGET [--allow PREFIX]...`: sent to the running daemon, or done here (pinned,
/// recorded) when none runs. Returns the line to print.
pub fn attach(opts: &StateOptions, target: &Target, allow: &[String]) -> Result<String> {
    Policy::parse(allow)?;
    let (selector, pid) = selector_of(target)?;
    change(
        opts,
        Request::Attach {
            selector,
            allow: allow.to_vec(),
            pid,
        },
    )
}

/// `detach TARGET` or `detach --all`.
pub fn detach(opts: &StateOptions, target: Option<&Target>) -> Result<String> {
    let req = match target {
        Some(t) => Request::Detach {
            selector: selector_of(t)?.0,
        },
        None => Request::DetachAll,
    };
    change(opts, req)
}

/// `hook --key KEY`: a unit's `ExecStartPre=`, attaching what systemd did not to the
/// cgroup this process runs in (the unit's).
pub fn hook(opts: &StateOptions, key: &str) -> Result<()> {
    let cg = Cgroup2::locate_or_mount()?;
    let mut own = cg.own_cgroup()?;
    // With Delegate=, systemd runs ExecStartPre= in a `.control` child of the unit's cgroup.
    if own.file_name().is_some_and(|n| n == ".control") {
        own.pop();
    }
    // A drop-in left behind (its detach could not reach systemd) must not keep the unit
    // from starting: say so in its journal and let it start.
    if !opts.dirs.attachment(key).exists() {
        log::warn!(
            "attachment {key} is not pinned in {}: starting without it (remove the drop-in \
             with `freebind-agent detach`)",
            opts.dirs.pin.display()
        );
        return Ok(());
    }
    let n = pinned::start_hook(&opts.dirs, key, &own)?;
    if n > 0 {
        log::info!("attached {n} program(s) to {}", own.display());
    }
    Ok(())
}

fn selector_of(target: &Target) -> Result<(Selector, Option<u32>)> {
    Ok(match target {
        Target::Unit(name) => {
            check_unit_name(name)?;
            (Selector::Unit(name.clone()), None)
        }
        Target::Cgroup(path) => (Selector::Cgroup(relative_glob(path)?), None),
        Target::Pid(pid) => {
            // Read as the host names it, also from inside a container (a DaemonSet pod).
            kernel::enter_host_cgroup_namespace();
            let file = format!("/proc/{pid}/cgroup");
            let text = std::fs::read_to_string(&file)
                .map_err(|e| anyhow!("process {pid}: {e} (reading {file})"))?;
            let rel = text
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .ok_or_else(|| anyhow!("process {pid} is in no cgroup v2 ({file})"))?;
            let rel = rel.trim();
            if rel == "/" {
                bail!("process {pid} is in the root cgroup: give it a cgroup of its own");
            }
            let glob =
                CgroupGlob::parse(rel).with_context(|| format!("process {pid}'s cgroup {rel}"))?;
            (Selector::Cgroup(glob), Some(*pid))
        }
    })
}

/// A cgroup argument as a glob relative to the cgroup2 mount.
fn relative_glob(path: &Path) -> Result<CgroupGlob> {
    let rel = if path.is_absolute() {
        let cg = Cgroup2::locate_or_mount()?;
        path.strip_prefix(cg.mount())
            .map_err(|_| {
                anyhow!(
                    "cgroup {} is not below the cgroup v2 mount {}",
                    path.display(),
                    cg.mount().display()
                )
            })?
            .to_path_buf()
    } else {
        path.to_path_buf()
    };
    CgroupGlob::parse(&rel.to_string_lossy())
}

/// How long `attach`/`detach` wait for the state lock when no daemon answers.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends `req` to the daemon, or does it here under the state lock when none runs.
fn change(opts: &StateOptions, req: Request) -> Result<String> {
    if let Some(reply) = control::send(&opts.dirs.control_socket(), &req)? {
        return reply;
    }
    let (_, cg) = prepare(&[] as &[String])?;
    // Another `attach`/`detach` may hold the lock for a moment, or a daemon that is
    // starting (it listens once its config is applied): wait, asking it again.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let lock = loop {
        match StateLock::try_acquire(&opts.dirs)? {
            Ok(lock) => break lock,
            Err(holder) => {
                if let Some(reply) = control::send(&opts.dirs.control_socket(), &req)? {
                    return reply;
                }
                if std::time::Instant::now() > deadline {
                    bail!(
                        "another freebind agent{} holds {} and does not answer on {}",
                        holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                        opts.dirs.lock_file().display(),
                        opts.dirs.control_socket().display()
                    );
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    };
    runtime()?.block_on(async {
        let mut manager = Manager::open(&opts.dirs, cg, &opts.systemd_socket, lock)?;
        let out = match req {
            Request::Attach {
                selector,
                allow,
                pid,
            } => {
                let m = manager.attach(selector, allow, Origin::Cli, pid).await?;
                log::warn!(
                    "no freebind daemon is running: the attachment is pinned, but addresses \
                     are watched only while `freebind-agent daemon` runs (until then binds in \
                     namespaces no daemon served are left to the kernel)"
                );
                m
            }
            Request::Detach { selector } => manager.detach(&selector.key()).await?,
            Request::DetachAll => {
                let out = manager.detach_all().await?;
                // The parking addresses the last daemon left in its own namespace.
                crate::parking::V6Pool::release(std::sync::Arc::new(Netns::current()?));
                out
            }
            Request::Ping | Request::Events => bail!("no freebind daemon is running"),
        };
        Ok(out)
    })
}

/// `status [--json]`: what is attached and which managed sockets are live or dormant.
pub fn status(opts: &StateOptions, json: bool) -> Result<String> {
    kernel::check_privileges()?;
    kernel::enter_host_cgroup_namespace();
    let cg = Cgroup2::locate_or_mount()?;
    let s = status::collect(&opts.dirs, &cg)?;
    Ok(if json { s.to_json() } else { s.render() })
}

/// `events [--json]`: the running daemon's stream, printed until interrupted.
pub fn events(opts: &StateOptions, json: bool) -> Result<()> {
    let socket = opts.dirs.control_socket();
    let Some(stream) = control::subscribe(&socket)? else {
        bail!(
            "no freebind daemon answers on {}: events come from the daemon (a foreground \
             `run` or `exec` logs the same lines itself)",
            socket.display()
        );
    };
    let mut out = std::io::stdout().lock();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stream)) {
        let line = line.with_context(|| format!("reading events from {}", socket.display()))?;
        if let Some(e) = line.strip_prefix("error\t") {
            bail!("the daemon refused: {e}");
        }
        let text = if json { line } else { events::render(&line) };
        if writeln!(out, "{text}").and_then(|()| out.flush()).is_err() {
            // The reader went away (`| head`).
            return Ok(());
        }
    }
    bail!(
        "the daemon closed the event stream on {} (it stopped)",
        socket.display()
    )
}

/// `check`: prints the requirement table; 0 when everything is there, 1 otherwise.
pub fn check() -> Result<i32> {
    Ok(if crate::check::run()? { 0 } else { 1 })
}
