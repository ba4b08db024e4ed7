//! Processes started inside a namespace (and optionally a cgroup), with guards.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::netns::Netns;
use crate::util::{show_cmd, unique_name};

/// Grace period between SIGTERM and SIGKILL in [`Proc::kill`].
const KILL_GRACE: Duration = Duration::from_secs(5);

/// Default bound for [`run_in`].
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// When set (to anything non-empty), process logs are left in the temp directory.
const KEEP_LOGS_ENV: &str = "FREEBIND_E2E_KEEP_LOGS";

/// A running child process with its stdout and stderr captured to a log file.
///
/// It leads its own process group. Signals go to its pid only (never to a name), and only
/// while it is unreaped, so the pid cannot have been reused; once it has exited, what is
/// left of its process group (children of a `sh -c` wrapper) gets SIGKILL before it is
/// reaped. Dropping it kills it like [`Proc::kill`]; then, if the thread is panicking
/// (a failing test), prints its log; the log file is removed unless
/// `FREEBIND_E2E_KEEP_LOGS` is set (non-empty).
#[derive(Debug)]
pub struct Proc {
    name: String,
    pid: u32,
    child: Mutex<Reaper>,
    log_path: PathBuf,
}

impl Proc {
    /// Spawns `cmd` (with whatever `pre_exec` it already has) with stdin from /dev/null
    /// and stdout + stderr into a fresh log file; `PYTHONUNBUFFERED=1` so Python servers
    /// log as they go. `name` labels the log (and messages).
    pub fn spawn(mut cmd: Command, name: &str) -> Proc {
        let label: String = name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .take(24)
            .collect();
        let log_path = std::env::temp_dir().join(format!(
            "{}.log",
            unique_name(&format!("freebind-e2e-{label}"))
        ));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("cannot create log {}: {e}", log_path.display()));
        let log2 = log
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup log fd: {e}"));
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .env("PYTHONUNBUFFERED", "1")
            .process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| {
            let _ = fs::remove_file(&log_path);
            panic!("cannot spawn `{}`: {e}", show_cmd(&cmd))
        });
        Proc {
            name: name.to_owned(),
            pid: child.id(),
            child: Mutex::new(Reaper::new(child)),
            log_path,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The label given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Everything the process wrote to stdout and stderr so far (lossy UTF-8).
    pub fn log(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// Where the log file is.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    fn child(&self) -> MutexGuard<'_, Reaper> {
        // A poisoned lock only means another thread panicked while holding it; the
        // Reaper itself is still coherent.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The exit status if the process has exited (reaping it), else `None`.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.child()
            .poll()
            .unwrap_or_else(|e| panic!("waitpid({}) for {}: {e}", self.pid, self.name))
    }

    /// Sends SIGTERM, waits up to 5 s, then SIGKILL; returns the exit status. Returns the
    /// status at once when the process already exited. Safe to call more than once.
    pub fn kill(&self) -> ExitStatus {
        self.terminate(KILL_GRACE)
    }

    /// Like [`Proc::kill`] with a chosen grace period before SIGKILL.
    pub fn terminate(&self, grace: Duration) -> ExitStatus {
        self.stop_child(grace)
            .unwrap_or_else(|e| panic!("waitpid({}) for {}: {e}", self.pid, self.name))
    }

    /// [`Proc::terminate`] that never panics, for `Drop`.
    pub(crate) fn terminate_quiet(&self, grace: Duration) {
        if let Err(e) = self.stop_child(grace) {
            eprintln!("freebind-e2e: waitpid({}) for {}: {e}", self.pid, self.name);
        }
    }

    fn stop_child(&self, grace: Duration) -> std::io::Result<ExitStatus> {
        let mut child = self.child();
        if let Some(status) = child.poll()? {
            return Ok(status);
        }
        child.signal(libc::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < grace {
            if let Some(status) = child.poll()? {
                return Ok(status);
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "freebind-e2e: {} (pid {}) ignored SIGTERM for {grace:?}; sending SIGKILL",
            self.name, self.pid
        );
        child.kill_and_wait()
    }

    /// Sends signal `sig` (e.g. `libc::SIGHUP`) to the process, if it has not exited.
    pub fn signal(&self, sig: libc::c_int) {
        let mut child = self.child();
        if let Ok(None) = child.poll() {
            child.signal(sig);
        }
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still
    /// running then.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if start.elapsed() >= timeout {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.terminate_quiet(KILL_GRACE);
        if thread::panicking() {
            eprintln!(
                "----- log of {} (pid {}) -----\n{}\n----- end of log of {} -----",
                self.name,
                self.pid,
                self.log(),
                self.name
            );
        }
        let keep = std::env::var_os(KEEP_LOGS_ENV).is_some_and(|v| !v.is_empty());
        if keep {
            eprintln!(
                "freebind-e2e: log of {} kept at {}",
                self.name,
                self.log_path.display()
            );
        } else {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

/// A child that leads its own process group, and its exit status once reaped.
///
/// Once the child has exited, and while its zombie still pins the group id (so the id
/// cannot name anyone else), whatever is left in its process group (e.g. what a `sh -c`
/// wrapper started) gets SIGKILL, then the child is reaped. Programs that daemonize with
/// `setsid` have left the group and are the cgroup guard's business.
#[derive(Debug)]
struct Reaper {
    child: Child,
    status: Option<ExitStatus>,
}

impl Reaper {
    fn new(child: Child) -> Reaper {
        Reaper {
            child,
            status: None,
        }
    }

    fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Sends `sig` to the child if it is not reaped yet (only then is the pid surely ours).
    fn signal(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: plain syscall on our unreaped child.
            unsafe { libc::kill(self.pid(), sig) };
        }
    }

    /// Sends `sig` to the child's whole process group if the child is not reaped yet.
    fn signal_group(&self, sig: libc::c_int) {
        if self.status.is_none() {
            // SAFETY: plain syscall; the unreaped leader pins the group id.
            unsafe { libc::kill(-self.pid(), sig) };
        }
    }

    /// The exit status if the child has exited (cleaning its group and reaping it).
    fn poll(&mut self) -> std::io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        // SAFETY: siginfo_t is plain data that waitid fills in; WNOWAIT leaves the child
        // unreaped, so its pid (and group id) stay ours.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let r = unsafe {
            libc::waitid(
                libc::P_PID,
                self.pid() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: waitid succeeded, so `info` is initialised; si_pid is 0 while the child
        // has not changed state.
        if unsafe { info.si_pid() } == 0 {
            return Ok(None);
        }
        self.signal_group(libc::SIGKILL);
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(Some(status))
    }

    /// SIGKILLs the whole group and reaps the child.
    fn kill_and_wait(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.signal_group(libc::SIGKILL);
        let status = self.child.wait()?;
        self.status = Some(status);
        Ok(status)
    }
}

fn command_in(ns: &Netns, cgroup: Option<&Cgroup>, argv: &[&str]) -> Command {
    let (program, args) = argv
        .split_first()
        .unwrap_or_else(|| panic!("empty argv for a process in netns {}", ns.name()));
    let mut cmd = ns.command(program);
    cmd.args(args);
    if let Some(cg) = cgroup {
        cg.join_on_exec(&mut cmd);
    }
    cmd
}

/// Starts `argv` inside `ns` (setns before exec) and, when given, inside `cgroup` (joined
/// before exec, so every socket it makes is the cgroup's), output captured to a log.
pub fn spawn_in(ns: &Netns, cgroup: Option<&Cgroup>, argv: &[&str]) -> Proc {
    let name = argv.first().map_or("proc", |p| {
        Path::new(p)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(p)
    });
    Proc::spawn(command_in(ns, cgroup, argv), name)
}

/// Runs a short-lived `argv` inside `ns` (and `cgroup`), like [`spawn_in`], and returns
/// its output (whatever its exit status). Panics if it runs longer than 60 s. When it
/// exits, anything it left running in its process group is killed.
pub fn run_in(ns: &Netns, cgroup: Option<&Cgroup>, argv: &[&str]) -> Output {
    run_in_timeout(ns, cgroup, argv, RUN_TIMEOUT)
}

/// [`run_in`] with a chosen bound: after `timeout` the command is killed and the call
/// panics with what it printed.
pub fn run_in_timeout(
    ns: &Netns,
    cgroup: Option<&Cgroup>,
    argv: &[&str],
    timeout: Duration,
) -> Output {
    let mut cmd = command_in(ns, cgroup, argv);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("PYTHONUNBUFFERED", "1")
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn `{}`: {e}", show_cmd(&cmd)));
    let out_reader = reader(child.stdout.take());
    let err_reader = reader(child.stderr.take());
    let mut child = Reaper::new(child);
    let start = Instant::now();
    let status = loop {
        match child.poll() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if start.elapsed() >= timeout => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("waitpid for `{}`: {e}", show_cmd(&cmd)),
        }
    };
    let Some(status) = status else {
        let _ = child.kill_and_wait();
        // The readers finish once every holder of the pipes is gone; something that left
        // the process group may keep them open, so give them a moment only.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !(out_reader.is_finished() && err_reader.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let text = |h: thread::JoinHandle<Vec<u8>>| {
            if h.is_finished() {
                String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
            } else {
                "<still open>".to_owned()
            }
        };
        panic!(
            "`{}` in netns {} still running after {timeout:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            show_cmd(&cmd),
            ns.name(),
            text(out_reader),
            text(err_reader)
        );
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Reads a child's pipe to its end on a thread of its own (both pipes at once, so that
/// neither fills up while the other is read).
pub(crate) fn reader<R: Read + Send + 'static>(pipe: Option<R>) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    })
}

/// Waits until `proc`'s log contains `needle`; panics with the log on timeout, or at once
/// if the process exits without having written it.
pub fn wait_for_log(proc: &Proc, needle: &str, timeout: Duration) {
    let start = Instant::now();
    loop {
        if proc.log().contains(needle) {
            return;
        }
        if let Some(status) = proc.try_wait() {
            // One last look: it may have written the needle just before exiting.
            let log = proc.log();
            if log.contains(needle) {
                return;
            }
            panic!(
                "{} (pid {}) exited ({status}) without logging {needle:?}; log:\n{log}",
                proc.name(),
                proc.pid()
            );
        }
        if start.elapsed() >= timeout {
            panic!(
                "timed out after {timeout:?} waiting for {} (pid {}) to log {needle:?}; log:\n{}",
                proc.name(),
                proc.pid(),
                proc.log()
            );
        }
        thread::sleep(Duration::from_millis(50));
    }
}
