//! A real systemd (Debian 12 "bookworm", systemd 252) booted in a systemd-nspawn container,
//! for end-to-end tests of freebind's systemd integration: the agent on the host attaching
//! to the cgroups of the sandbox's units, `BPFProgram=` drop-ins, `systemctl restart` loops.
//!
//! PID 1 of the test machines is not systemd, so the tests bring their own. The container's
//! cgroup tree is an ordinary subtree of the host's cgroup2 mount, under a [`Cgroup`] the
//! sandbox makes, so the host sees (and can attach programs to) every unit cgroup.
//!
//! Facts this is built on (systemd-nspawn 252, Linux 6.18, hybrid cgroup host), measured:
//! - `SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1` makes nspawn mount the host's cgroup2 (with a
//!   cgroup namespace) as the container's `/sys/fs/cgroup`. Without it, on a hybrid host,
//!   the container's systemd runs hybrid too and silently ignores `BPFProgram=`.
//! - `--system-call-filter=bpf`: nspawn's seccomp filter refuses `bpf()` otherwise, and
//!   systemd needs it for `BPFProgram=`, `IPAddressDeny=` and its device policy.
//! - `--keep-unit --register=no`: nspawn neither asks the host's systemd for a scope nor
//!   registers with machined (neither exists here). It uses the cgroup it was started in,
//!   and splits it: nspawn moves itself to `supervisor/` and puts the container in
//!   `payload/`, the root of the container's cgroup namespace, where its systemd makes
//!   `init.scope`, `system.slice/UNIT`, ….
//! - `--volatile=overlay`: the container's `/` is an overlay of the cached root (lower,
//!   never written) and a tmpfs private to the container, so tests can write anywhere and
//!   any number of sandboxes can share one root at once (nspawn then takes only a shared
//!   lock on the directory).
//! - `--machine=` must be unique: nspawn keeps per-machine state named after it
//!   (`/run/systemd/nspawn/propagate/NAME`), and with the default (the directory's name)
//!   parallel sandboxes would share it. It is also the container's hostname, because the
//!   cached root has no `/etc/hostname`, which tells sandboxes apart in logs.
//! - On SIGTERM, nspawn sends SIGRTMIN+3 to the container's PID 1: an orderly poweroff,
//!   measured at 0.1–0.2 s. Booting to `running` takes 0.2–0.5 s.
//! - systemd's private bus socket (`/run/systemd/private`) refuses any peer outside the
//!   container's PID namespace: `SO_PEERCRED` reports pid 0 for it, and systemd 252 logs
//!   "Incoming private connection from unprivileged client, refusing: No data available".
//!   The system bus (`/run/dbus/system_bus_socket`, dbus-daemon) accepts host root; see
//!   [`Sandbox::systemd_socket`] and [`Sandbox::system_bus_socket`].
//! - systemd 252 attaches a `BPFProgram=` at `start` (and at `daemon-reload` for a running
//!   unit) but not at `restart`: the unit keeps the program from the last start in its
//!   table, logs "bpf-foreign: Foreign BPF program already exists, ignoring" and attaches
//!   nothing to the new cgroup (systemd/systemd#26845, open). `stop` then `start` works.
//!   A program that fails to load is only logged too (#27497): the unit starts without it.
//! - Inside, processes get nspawn's bounding set: `CAP_SYS_ADMIN` (which `bpf()` accepts
//!   in place of `CAP_BPF` and `CAP_PERFMON`), no `CAP_BPF`, `CAP_PERFMON` or
//!   `CAP_SYS_RESOURCE` (so `RLIMIT_MEMLOCK` cannot be raised; the kernel charges BPF
//!   memory to the cgroup anyway), and `CAP_NET_ADMIN` only with a network namespace of
//!   its own. [`Sandbox::exec`] and [`Sandbox::spawn`] keep the test's capabilities.

use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Once, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

use crate::cgroup::Cgroup;
use crate::netns::Netns;
use crate::process::{reader, Proc};
use crate::tools::{install_missing, tool};
use crate::util::{show_cmd, show_output};

/// Where the cached sandbox root lives: made once by `debootstrap`, then only ever the
/// read-only lower layer of each sandbox's overlay.
pub const SANDBOX_ROOT: &str = "/var/cache/freebind-e2e/bookworm";

/// Environment variable naming the Debian mirror `debootstrap` uses (default
/// `http://deb.debian.org/debian`).
pub const MIRROR_ENV: &str = "FREEBIND_E2E_DEBIAN_MIRROR";

const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
const SUITE: &str = "bookworm";
const VARIANT: &str = "minbase";
/// What the root holds beyond `minbase`: systemd as PID 1, the system bus, `ip`.
const INCLUDE: &str = "systemd,systemd-sysv,dbus,iproute2";

/// Bump when the way the root is made changes: a root whose stamp differs is rebuilt.
const ROOT_REVISION: u32 = 1;
/// Written last into a finished root (which is then renamed into place): says how it
/// was made.
const STAMP_FILE: &str = ".freebind-e2e-root";

/// bpffs, bound into every sandbox so programs pinned on the host are visible inside
/// (and `BPFProgram=` can name them at the same path).
pub(crate) const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: u32 = 0xcafe_4a11;

/// How long [`SandboxBuilder::boot`] waits for the container's systemd (measured: under
/// 1 s; the bound is for loaded CI machines).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Drop` lets the container power off before SIGKILL (measured: 0.2 s; a unit
/// that ignores SIGTERM would hold it for its 90 s stop timeout).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(20);
/// Default bound for [`Sandbox::exec`].
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long leftovers of an [`Sandbox::exec`] get to die after `cgroup.kill`.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// PATH inside the container (the host's PATH may name directories it does not have).
const CONTAINER_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Tools the sandbox needs on the host, with the Debian package that provides each.
const SANDBOX_TOOLS: &[(&str, &str)] = &[
    ("debootstrap", "debootstrap"),
    ("systemd-nspawn", "systemd-container"),
];

/// Numbers the cgroups of [`Sandbox::exec`] calls.
static EXEC_COUNTER: AtomicU32 = AtomicU32::new(0);

// ---------------------------------------------------------------------------------------
// The cached root.

/// The cached sandbox root ([`SANDBOX_ROOT`]), built on first use: `debootstrap
/// --variant=minbase --include=systemd,systemd-sysv,dbus,iproute2 bookworm` (measured:
/// 70 s, 210 MB; network needed; mirror from `FREEBIND_E2E_DEBIAN_MIRROR`).
///
/// Safe to call from parallel tests and processes: the build runs under an exclusive
/// `flock` on `bookworm.lock` next to it, into `bookworm.partial`, which is renamed into
/// place only when complete (with a stamp saying how it was made; a root with another
/// stamp is rebuilt). `cargo xtask test` calls this before the end-to-end tests so the
/// first test does not pay for it. Installs `debootstrap` and `systemd-container` with
/// apt when they are missing (as root). Panics with the debootstrap log on failure.
pub fn sandbox_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        ensure_sandbox_tools();
        let root = PathBuf::from(SANDBOX_ROOT);
        if root_is_current(&root) {
            return root;
        }
        let _lock = CacheLock::take();
        if !root_is_current(&root) {
            build_root(&root);
        }
        root
    })
}

fn stamp() -> String {
    format!("revision {ROOT_REVISION}\nsuite {SUITE}\nvariant {VARIANT}\ninclude {INCLUDE}\n")
}

fn root_is_current(root: &Path) -> bool {
    fs::read_to_string(root.join(STAMP_FILE)).is_ok_and(|s| s == stamp())
}

/// `bookworm` → `bookworm.<suffix>`, in the same directory (so `rename` is atomic).
fn sibling(root: &Path, suffix: &str) -> PathBuf {
    let mut name = root.file_name().unwrap_or_default().to_os_string();
    name.push(".");
    name.push(suffix);
    root.with_file_name(name)
}

/// An exclusive `flock` on `<cache>/bookworm.lock`, released when dropped (closed).
struct CacheLock {
    _file: File,
}

impl CacheLock {
    fn take() -> CacheLock {
        let root = Path::new(SANDBOX_ROOT);
        let dir = root.parent().unwrap_or(Path::new("/"));
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        let path = sibling(root, "lock");
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        loop {
            // SAFETY: plain syscall on an fd we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return CacheLock { _file: file };
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != ErrorKind::Interrupted {
                panic!("cannot lock {}: {e}", path.display());
            }
        }
    }
}

fn build_root(root: &Path) {
    let partial = sibling(root, "partial");
    let log_path = sibling(root, "debootstrap.log");
    // A build that was interrupted left its partial tree (maybe with debootstrap's
    // /proc and /sys mounts still in it); we hold the lock, so it is nobody's.
    remove_tree(&partial);
    let mirror = std::env::var(MIRROR_ENV)
        .ok()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| DEFAULT_MIRROR.to_owned());
    eprintln!(
        "freebind-e2e: building the systemd sandbox root {} (debootstrap {SUITE} from {mirror}, \
         about 1 minute, once; log in {})",
        root.display(),
        log_path.display()
    );
    let start = Instant::now();
    let log = File::create(&log_path)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", log_path.display()));
    let log2 = log
        .try_clone()
        .unwrap_or_else(|e| panic!("cannot dup log fd: {e}"));
    let mut cmd = Command::new(tool("debootstrap"));
    cmd.arg(format!("--variant={VARIANT}"))
        .arg(format!("--include={INCLUDE}"))
        .arg(SUITE)
        .arg(&partial)
        .arg(&mirror)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2);
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run `{}`: {e}", show_cmd(&cmd)));
    if !status.success() {
        unmount_below(&partial);
        let text = fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect();
        panic!(
            "`{}` failed ({status}); cannot build the systemd sandbox root (network needed; \
             a mirror can be set with {MIRROR_ENV}). Last lines of {}:\n{}",
            show_cmd(&cmd),
            log_path.display(),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    customize_root(&partial);
    fs::write(partial.join(STAMP_FILE), stamp())
        .unwrap_or_else(|e| panic!("cannot write the stamp in {}: {e}", partial.display()));
    if root.exists() {
        // Made another way (older revision): moved aside first so the new root appears
        // atomically. Sandboxes still running on it keep their overlay's lower layer
        // until they stop; that only happens when this code changes.
        let stale = sibling(root, "stale");
        remove_tree(&stale);
        fs::rename(root, &stale)
            .unwrap_or_else(|e| panic!("cannot move the old root {} aside: {e}", root.display()));
        remove_tree(&stale);
    }
    fs::rename(&partial, root).unwrap_or_else(|e| {
        panic!(
            "cannot rename {} to {}: {e}",
            partial.display(),
            root.display()
        )
    });
    eprintln!(
        "freebind-e2e: sandbox root ready in {:.0?}",
        start.elapsed()
    );
}

/// Adjusts a fresh debootstrap tree. It boots as it is (measured: `multi-user.target`
/// in 0.15 s, no failed unit), so little is needed.
fn customize_root(root: &Path) {
    // debootstrap copies the host's /etc/hostname; without one the container's hostname
    // stays the unique machine name nspawn sets.
    match fs::remove_file(root.join("etc/hostname")) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => panic!("cannot remove {}/etc/hostname: {e}", root.display()),
    }
    // The downloaded .debs (about 40 MB) are not needed once installed.
    let archives = root.join("var/cache/apt/archives");
    if let Ok(entries) = fs::read_dir(&archives) {
        for entry in entries.flatten() {
            if entry.path().extension() == Some(OsStr::new("deb")) {
                let _ = fs::remove_file(entry.path());
            }
        }
    }
}

/// Removes a directory tree that may still have mounts in it (an interrupted
/// debootstrap leaves /proc and /sys mounted in its target): those are detached first,
/// so nothing outside the tree is ever deleted through them.
fn remove_tree(dir: &Path) {
    if fs::symlink_metadata(dir).is_err() {
        return;
    }
    unmount_below(dir);
    let left = mounts_below(dir);
    if !left.is_empty() {
        panic!(
            "refusing to delete {}: still mounted below it: {left:?}",
            dir.display()
        );
    }
    fs::remove_dir_all(dir).unwrap_or_else(|e| panic!("cannot remove {}: {e}", dir.display()));
}

/// Mount points at or below `dir` in our mount namespace, deepest first. (mountinfo
/// escapes spaces and backslashes; the cache paths have none.)
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().trim_end_matches('/').to_owned();
    let below = format!("{dir}/");
    let mut found: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_owned))
        .filter(|m| *m == dir || m.starts_with(&below))
        .collect();
    found.sort_by_key(|m| std::cmp::Reverse(m.len()));
    found
}

fn unmount_below(dir: &Path) {
    for mount in mounts_below(dir) {
        let Ok(c) = CString::new(mount.clone()) else {
            continue;
        };
        // SAFETY: plain syscall with a valid C string.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "freebind-e2e: cannot unmount {mount}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// Host prerequisites.

/// Installs `debootstrap` and `systemd-container` (systemd-nspawn) with apt when missing,
/// as the test bed's `ensure_tools` does for its own. Once per process.
fn ensure_sandbox_tools() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| install_missing(SANDBOX_TOOLS));
}

fn is_bpffs(path: &str) -> bool {
    let Ok(c) = CString::new(path) else {
        return false;
    };
    // SAFETY: statfs fills the zeroed plain-data struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // f_type's integer type differs between architectures; the magic fits 32 bits.
    st.f_type as u32 == BPF_FS_MAGIC
}

/// Mounts bpffs at /sys/fs/bpf when it is not one already (it is not by default on these
/// machines: PID 1 is not systemd) and returns that directory. Left mounted: it is the
/// conventional place, and other users may have pinned things in it meanwhile.
pub fn ensure_bpffs() -> &'static Path {
    let path = Path::new(BPFFS);
    if is_bpffs(BPFFS) {
        return path;
    }
    // Under the cache lock so parallel processes do not stack two mounts.
    let _lock = CacheLock::take();
    if is_bpffs(BPFFS) {
        return path;
    }
    let c = |s: &str| CString::new(s).unwrap_or_else(|e| panic!("{s}: {e}"));
    let (src, target, fstype) = (c("bpf"), c(BPFFS), c("bpf"));
    // SAFETY: valid C strings; no data argument.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        panic!(
            "cannot mount bpffs at {BPFFS}: {}",
            std::io::Error::last_os_error()
        );
    }
    path
}

// ---------------------------------------------------------------------------------------
// The sandbox.

/// Options for [`Sandbox`]; from [`Sandbox::builder`].
#[derive(Debug, Clone)]
pub struct SandboxBuilder {
    prefix: String,
    netns: Option<PathBuf>,
    args: Vec<OsString>,
    boot_timeout: Duration,
}

impl SandboxBuilder {
    /// Makes the host file or directory `path` (absolute) visible read-only at the same
    /// path inside (nspawn `--bind-ro=`; the mount point is made in the overlay, not in
    /// the cached root). E.g. the agent binary, so a unit's `ExecStartPre=` can run it:
    /// it is a Debian 12 glibc binary like the sandbox's own.
    pub fn bind_ro(mut self, path: impl AsRef<Path>) -> SandboxBuilder {
        let path = path.as_ref();
        if !path.is_absolute() || !path.exists() {
            panic!(
                "bind_ro({}): needs an absolute path that exists",
                path.display()
            );
        }
        // nspawn splits --bind-ro=SRC:DST:OPTIONS at colons.
        if path.as_os_str().as_bytes().contains(&b':') {
            panic!(
                "bind_ro({}): nspawn cannot bind a path with ':'",
                path.display()
            );
        }
        let mut arg = OsString::from("--bind-ro=");
        arg.push(path);
        self.args.push(arg);
        self
    }

    /// Puts the container in `ns` instead of a private network namespace of its own
    /// (`--network-namespace-path=/run/netns/NAME`), e.g. one end of a test [`Link`].
    /// nspawn drops `CAP_NET_ADMIN` in that mode (the container's systemd then fails to
    /// bring `lo` up); it is given back, as `--private-network` would.
    ///
    /// [`Link`]: crate::Link
    pub fn netns(mut self, ns: &Netns) -> SandboxBuilder {
        self.netns = Some(Path::new("/run/netns").join(ns.name()));
        self
    }

    /// Any other `systemd-nspawn` option, e.g. `--setenv=…` or `--bind=…`.
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> SandboxBuilder {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// How long to wait for the container's systemd to be up (default 60 s).
    pub fn boot_timeout(mut self, timeout: Duration) -> SandboxBuilder {
        self.boot_timeout = timeout;
        self
    }

    /// Boots the sandbox: makes its cgroup, starts systemd-nspawn in it, waits until the
    /// container's systemd is `running` (or `degraded`, printing the failed units).
    /// Panics with nspawn's output (the console) on failure.
    pub fn boot(self) -> Sandbox {
        let root = sandbox_root();
        ensure_bpffs();
        let cgroup = Cgroup::new(&self.prefix);
        let machine = machine_name(cgroup.relative());
        let mut cmd = Command::new(tool("systemd-nspawn"));
        cmd.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1")
            .env("SYSTEMD_COLORS", "0")
            .current_dir("/")
            .arg("--directory")
            .arg(root)
            .arg(format!("--machine={machine}"))
            .args([
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--volatile=overlay",
                "--system-call-filter=bpf",
                "--setenv=SYSTEMD_COLORS=0",
            ])
            .arg(format!("--bind={BPFFS}"));
        match &self.netns {
            Some(path) => {
                let mut arg = OsString::from("--network-namespace-path=");
                arg.push(path);
                cmd.arg(arg).arg("--capability=CAP_NET_ADMIN");
            }
            None => {
                cmd.arg("--private-network");
            }
        }
        cmd.args(&self.args).arg("--boot");
        cgroup.join_on_exec(&mut cmd);
        let start = Instant::now();
        let deadline = start + self.boot_timeout;
        let nspawn = Proc::spawn(cmd, "systemd-nspawn");
        let mut sandbox = Sandbox {
            payload: cgroup.path().join("payload"),
            machine,
            leader: 0,
            boot_time: Duration::ZERO,
            nspawn,
            cgroup: Some(cgroup),
        };
        // From here a panic drops `sandbox`, which stops nspawn, prints its log (the
        // console) and removes the cgroup.
        sandbox.leader = sandbox.find_leader(deadline);
        sandbox.wait_running(deadline);
        sandbox.boot_time = start.elapsed();
        sandbox
    }
}

/// nspawn wants a valid hostname (it becomes the container's): at most 64 characters of
/// letters, digits and `-`.
fn machine_name(name: &str) -> String {
    let mut m: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if m.starts_with('-') {
        m.replace_range(..1, "s");
    }
    m
}

/// A booted systemd 252 (Debian 12) in a systemd-nspawn container, its cgroup tree under
/// a test cgroup of the host, its `/` a throw-away overlay of [`sandbox_root`].
///
/// Host view of the cgroups (`C` = [`Sandbox::outer_cgroup`], `unique_name(prefix)`
/// under the cgroup2 mount):
///
/// ```text
/// C/supervisor/                      systemd-nspawn
/// C/payload/                         [`Sandbox::cgroup`]: "/" for the container's systemd
/// C/payload/init.scope/              its PID 1 ([`Sandbox::leader_pid`])
/// C/payload/system.slice/NAME.service  [`Sandbox::unit_cgroup`]
/// C/exec-N/                          each [`Sandbox::exec`] while it runs
/// ```
///
/// Dropping it powers the container off (SIGTERM to nspawn, which asks PID 1 to power
/// off; SIGKILL after 20 s), removes the cgroup tree (killing whatever is left) and
/// nspawn's per-machine directory. The container's mounts and network namespace die with
/// its processes. `Drop` never panics; if the thread is panicking, nspawn's output (the
/// container's console) is printed.
#[derive(Debug)]
pub struct Sandbox {
    machine: String,
    leader: u32,
    payload: PathBuf,
    boot_time: Duration,
    nspawn: Proc,
    /// `None` only while dropping.
    cgroup: Option<Cgroup>,
}

impl Sandbox {
    /// Boots a sandbox with the default options (a private network namespace, nothing
    /// bound in but bpffs). See [`SandboxBuilder::boot`].
    pub fn boot(prefix: &str) -> Sandbox {
        Sandbox::builder(prefix).boot()
    }

    /// Options for a sandbox whose cgroup and machine name are `unique_name(prefix)`.
    pub fn builder(prefix: &str) -> SandboxBuilder {
        SandboxBuilder {
            prefix: prefix.to_owned(),
            netns: None,
            args: Vec::new(),
            boot_timeout: BOOT_TIMEOUT,
        }
    }

    /// The machine name, which is also the container's hostname.
    pub fn machine(&self) -> &str {
        &self.machine
    }

    /// From starting nspawn to systemd reporting `running`.
    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// The container's PID 1 (systemd), as a host pid.
    pub fn leader_pid(&self) -> u32 {
        self.leader
    }

    /// The systemd-nspawn process (in `<outer>/supervisor`).
    pub fn nspawn_pid(&self) -> u32 {
        self.nspawn.pid()
    }

    /// The host directory of the sandbox's cgroup root (`<outer>/payload`): the cgroup the
    /// container's systemd calls `/`, under which it makes `init.scope`, `system.slice`, ….
    pub fn cgroup(&self) -> &Path {
        &self.payload
    }

    /// The cgroup the sandbox was started in, holding `supervisor/` (nspawn) and
    /// `payload/` ([`Sandbox::cgroup`]).
    pub fn outer_cgroup(&self) -> &Cgroup {
        self.cgroup
            .as_ref()
            .unwrap_or_else(|| panic!("sandbox {} is being dropped", self.machine))
    }

    /// Host path of the cgroup systemd gave `unit`, e.g.
    /// `<cgroup2>/<outer>/payload/system.slice/NAME.service`, from the unit's
    /// `ControlGroup=` property (relative to the container's cgroup namespace, i.e. to
    /// [`Sandbox::cgroup`]). Panics when the unit has none (not running) or the directory
    /// is not there. For `freebind-agent run --cgroup`, strip [`crate::cgroup2_mount`].
    pub fn unit_cgroup(&self, unit: &str) -> PathBuf {
        let cg = self
            .systemctl(&["show", "--property=ControlGroup", "--value", unit])
            .trim()
            .to_owned();
        if cg.is_empty() {
            let status = self.exec(&["systemctl", "status", "--no-pager", unit]);
            panic!(
                "unit {unit} in sandbox {} has no cgroup (not running?): {}",
                self.machine,
                show_output(&status)
            );
        }
        let path = self.payload.join(cg.trim_start_matches('/'));
        if !path.is_dir() {
            panic!(
                "systemd in sandbox {} puts {unit} in {cg}, but {} is not on the host",
                self.machine,
                path.display()
            );
        }
        path
    }

    /// Host pid of `unit`'s main process (systemd's `MainPID=` is a pid of the
    /// container's namespace). Panics when the unit has none.
    pub fn unit_main_pid(&self, unit: &str) -> u32 {
        let text = self.systemctl(&["show", "--property=MainPID", "--value", unit]);
        let inside: u32 = text.trim().parse().unwrap_or_else(|e| {
            panic!(
                "MainPID of {unit} in sandbox {}: {text:?}: {e}",
                self.machine
            )
        });
        if inside == 0 {
            panic!(
                "unit {unit} in sandbox {} has no main process",
                self.machine
            );
        }
        self.host_pid(inside).unwrap_or_else(|| {
            panic!(
                "pid {inside} of sandbox {} ({unit}) not found under {}",
                self.machine,
                self.payload.display()
            )
        })
    }

    /// The host pid of the container's process `pid_inside`, found in the sandbox's
    /// cgroup tree through `NSpid:` of `/proc/PID/status`.
    pub fn host_pid(&self, pid_inside: u32) -> Option<u32> {
        procs_below(&self.payload).into_iter().find(|&pid| {
            ns_pids(pid).is_some_and(|ns| ns.len() >= 2 && ns.last() == Some(&pid_inside))
        })
    }

    /// Host path of systemd's private bus socket (`/proc/LEADER/root/run/systemd/private`).
    ///
    /// Only a process in the container's PID namespace can use it: for a peer outside,
    /// `SO_PEERCRED` carries pid 0 and systemd 252 closes the connection ("Incoming
    /// private connection from unprivileged client, refusing: No data available").
    /// Connect from a process spawned in [`Sandbox::in_pid_ns`] (host mount namespace,
    /// so this path works), or use [`Sandbox::system_bus_socket`]. It is peer-to-peer D-Bus:
    /// no `Hello()` (busctl's `--address=` does one and fails). Send `BEGIN` in the same
    /// write as `AUTH`, as sd-bus clients do: measured, a client that waited for `OK`, then
    /// wrote `BEGIN` and a `Ping` 16 µs apart got no answer; systemd's debug log shows the
    /// `Ping` handled only when the client hung up 25 s later.
    pub fn systemd_socket(&self) -> PathBuf {
        self.host_path("/run/systemd/private")
    }

    /// Host path of the container's system bus (dbus-daemon), through which
    /// `org.freedesktop.systemd1` is reachable from the host as root, privileged methods
    /// included (measured: `busctl --address=unix:path=THIS call org.freedesktop.systemd1
    /// /org/freedesktop/systemd1 org.freedesktop.systemd1.Manager RestartUnit ss UNIT
    /// replace` works).
    pub fn system_bus_socket(&self) -> PathBuf {
        self.host_path("/run/dbus/system_bus_socket")
    }

    /// `/proc/LEADER/root` + `path_inside` (absolute): the container's file as the host
    /// reaches it, through the container's own mounts (its overlay `/`). Symlinks with
    /// absolute targets in the path would resolve on the host; the usual paths have none.
    pub fn host_path(&self, path_inside: &str) -> PathBuf {
        if !path_inside.starts_with('/') || path_inside.split('/').any(|c| c == "..") {
            panic!("{path_inside:?}: need an absolute path without `..`");
        }
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(&path_inside[1..])
    }

    /// Runs `f` in a short-lived thread that has entered the container's PID namespace
    /// for its children (`setns(CLONE_NEWPID)` applies to the caller's future children
    /// only, never to the caller): whatever `f` spawns is a process of the container's
    /// PID namespace, in the host's other namespaces, and still our own child (so it is
    /// reaped here when killed). What it takes to use [`Sandbox::systemd_socket`] from
    /// a host program. `f` must not start threads (the kernel refuses a thread whose
    /// pid namespace for children differs: `EINVAL`); `Command::output` and
    /// [`Proc::spawn`] start none.
    pub fn in_pid_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        self.check_alive();
        let path = format!("/proc/{}/ns/pid", self.leader);
        let pidns = File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        thread::scope(|s| {
            s.spawn(move || {
                // SAFETY: plain syscall on an fd we own; affects this thread only.
                if unsafe { libc::setns(pidns.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
                    panic!("setns({path}): {}", std::io::Error::last_os_error());
                }
                f()
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        })
    }

    /// Runs `argv` inside the container (all its namespaces and its root, as `nsenter
    /// --all` would) with a clean environment (PATH, `LANG=C.UTF-8`, no pager, no
    /// colours), and returns its output whatever its exit status. Panics after 60 s. It
    /// runs in a cgroup of its own under the sandbox's (not in the container's tree,
    /// which systemd owns), killed when it exits, so nothing it started outlives it.
    ///
    /// Not through `nsenter`: nsenter forks the command into the PID namespace and waits
    /// for it, and when both are killed at once (a timeout) the command is orphaned to
    /// the *host's* init, the reaper of nsenter's namespace. This host's PID 1 never
    /// reaps it, and the zombie, still in the container's PID namespace, holds the
    /// container's shutdown for 10 s. Here the command is our own child.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.exec_timeout(argv, EXEC_TIMEOUT)
    }

    /// [`Sandbox::exec`] with a chosen bound: after `timeout` it is killed and the call
    /// panics with what it printed.
    pub fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        self.check_alive();
        self.run_captured(argv, timeout)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts a long-running `argv` inside the container like [`Sandbox::exec`], output
    /// captured to a log ([`Proc`]). The guard stops it; the sandbox's drop kills it at
    /// the latest.
    pub fn spawn(&self, argv: &[&str]) -> Proc {
        self.check_alive();
        let dir = self.new_exec_cgroup("spawn");
        let cmd = self.inside_command(argv, &dir);
        let name = argv.first().map_or("proc", |p| {
            Path::new(p)
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or(p)
        });
        self.in_pid_ns(|| Proc::spawn(cmd, name))
    }

    /// `systemctl ARGS…` inside; returns its stdout, panics with its output unless it
    /// exits 0.
    pub fn systemctl(&self, args: &[&str]) -> String {
        let mut argv = vec!["systemctl"];
        argv.extend_from_slice(args);
        let out = self.exec(&argv);
        if !out.status.success() {
            panic!(
                "`{}` in sandbox {} failed: {}",
                argv.join(" "),
                self.machine,
                show_output(&out)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `contents` to `path_inside` (absolute), making parent directories, through
    /// [`Sandbox::host_path`]: the write lands in the sandbox's overlay, never in the
    /// cached root.
    pub fn write_file(&self, path_inside: &str, contents: impl AsRef<[u8]>) {
        let host = self.host_path(path_inside);
        if let Some(parent) = host.parent() {
            fs::create_dir_all(parent)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", parent.display()));
        }
        fs::write(&host, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", host.display()));
    }

    /// Writes `/etc/systemd/system/NAME` (a unit, or `NAME.d/x.conf` for a drop-in) and
    /// runs `systemctl daemon-reload`.
    pub fn install_unit(&self, name: &str, contents: &str) {
        self.write_file(&format!("/etc/systemd/system/{name}"), contents);
        self.systemctl(&["daemon-reload"]);
    }

    /// The unit's journal of this boot (`journalctl -u UNIT -o short-monotonic`), for
    /// failure messages. journald writes asynchronously: the last lines may lag.
    pub fn journal(&self, unit: &str) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "--boot",
            "--output=short-monotonic",
            "--unit",
            unit,
        ]);
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// What systemd-nspawn printed so far: its own messages and the container's console
    /// (systemd's boot and shutdown status lines).
    pub fn console_log(&self) -> String {
        self.nspawn.log()
    }

    /// Powers the container off (as dropping it does) and returns nspawn's exit status:
    /// success when the container shut down in an orderly way.
    pub fn shutdown(self) -> ExitStatus {
        self.nspawn.terminate(SHUTDOWN_GRACE)
        // Drop then finds nspawn reaped and removes the cgroup.
    }

    /// Panics (with the end of the console) when nspawn has exited: the container is gone
    /// and its leader pid may name another process by now.
    fn check_alive(&self) {
        if let Some(status) = self.nspawn.try_wait() {
            let log = self.nspawn.log();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            panic!(
                "sandbox {}: systemd-nspawn exited ({status}); end of its output:\n{}",
                self.machine,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
    }

    /// The container's PID 1: the child of nspawn that is pid 1 in its own PID namespace
    /// (nspawn's intermediate child, which forked it, is gone by then). Found in the
    /// payload cgroup, where nspawn puts it.
    fn find_leader(&self, deadline: Instant) -> u32 {
        let nspawn = self.nspawn.pid();
        loop {
            self.check_alive();
            for pid in procs_below(&self.payload) {
                let ns = ns_pids(pid).unwrap_or_default();
                if ns.len() >= 2 && ns.last() == Some(&1) && parent_pid(pid) == Some(nspawn) {
                    return pid;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "sandbox {}: no container PID 1 in {} in time",
                    self.machine,
                    self.payload.display()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for `systemctl is-system-running --wait` to say `running` (or `degraded`:
    /// then prints the failed units, which tests may not care about). Before PID 1 has
    /// its bus up, systemctl says `offline` at once: retried.
    fn wait_running(&self, deadline: Instant) {
        let mut last = String::new();
        loop {
            self.check_alive();
            let now = Instant::now();
            if now >= deadline {
                panic!(
                    "sandbox {}: systemd not up in time (last state {last:?})",
                    self.machine
                );
            }
            let out = self
                .run_captured(
                    &["systemctl", "is-system-running", "--wait"],
                    deadline - now,
                )
                .unwrap_or_else(|e| {
                    panic!("sandbox {}: systemd not up in time: {e}", self.machine)
                });
            let state = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            match state.as_str() {
                "running" => return,
                "degraded" => {
                    let failed = self.exec(&["systemctl", "--failed", "--no-pager", "--full"]);
                    eprintln!(
                        "freebind-e2e: sandbox {} is degraded; failed units:\n{}",
                        self.machine,
                        String::from_utf8_lossy(&failed.stdout)
                    );
                    return;
                }
                "" | "offline" | "unknown" | "initializing" | "starting" => {
                    last = format!("{state} / {}", String::from_utf8_lossy(&out.stderr).trim());
                    thread::sleep(Duration::from_millis(50));
                }
                _ => panic!(
                    "sandbox {}: systemd is {state:?} after boot: {}",
                    self.machine,
                    show_output(&out)
                ),
            }
        }
    }

    /// `argv` as a command that, between `fork()` and `exec()`, joins cgroup `dir` and
    /// enters the container: its cgroup, IPC, UTS, network and mount namespaces, then its
    /// root (what `nsenter --all --root --wd` does, minus the PID namespace, which only
    /// [`Sandbox::in_pid_ns`] can give: spawn it there). The program is looked up in the
    /// container's PATH, after the `chroot`.
    fn inside_command(&self, argv: &[&str], dir: &Path) -> Command {
        let (program, args) = argv
            .split_first()
            .unwrap_or_else(|| panic!("empty argv for sandbox {}", self.machine));
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env_clear()
            .env("PATH", CONTAINER_PATH)
            .env("LANG", "C.UTF-8")
            .env("TERM", "dumb")
            .env("SYSTEMD_PAGER", "cat")
            .env("SYSTEMD_COLORS", "0");
        // Everything is opened before fork; the child only makes syscalls, as pre_exec
        // requires. The cgroup comes first: once in the container's cgroup namespace, a
        // process can no longer move to a cgroup outside it.
        let open =
            |path: String| File::open(&path).unwrap_or_else(|e| panic!("cannot open {path}: {e}"));
        let procs_path = dir.join("cgroup.procs");
        let procs = fs::OpenOptions::new()
            .write(true)
            .open(&procs_path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", procs_path.display()));
        let namespaces: Vec<(File, libc::c_int)> = [
            ("cgroup", libc::CLONE_NEWCGROUP),
            ("ipc", libc::CLONE_NEWIPC),
            ("uts", libc::CLONE_NEWUTS),
            ("net", libc::CLONE_NEWNET),
            ("mnt", libc::CLONE_NEWNS),
        ]
        .into_iter()
        .map(|(name, flag)| (open(format!("/proc/{}/ns/{name}", self.leader)), flag))
        .collect();
        let root = open(format!("/proc/{}/root", self.leader));
        // SAFETY: the closure only makes syscalls (write, setns, fchdir, chroot, chdir)
        // and reads errno.
        unsafe {
            cmd.pre_exec(move || {
                let check = |r: libc::c_int| {
                    if r == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                };
                if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                for (ns, flag) in &namespaces {
                    check(libc::setns(ns.as_raw_fd(), *flag))?;
                }
                check(libc::fchdir(root.as_raw_fd()))?;
                check(libc::chroot(c".".as_ptr()))?;
                check(libc::chdir(c"/".as_ptr()))
            });
        }
        cmd
    }

    /// A new child cgroup of the outer one, `<outer>/<kind>-N`.
    fn new_exec_cgroup(&self, kind: &str) -> PathBuf {
        let dir = self.outer_cgroup().path().join(format!(
            "{kind}-{}",
            EXEC_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", dir.display()));
        dir
    }

    /// Runs `argv` inside in a cgroup of its own; kills what is left in it when the
    /// command exits or after `timeout` (then `Err` with its output so far).
    fn run_captured(&self, argv: &[&str], timeout: Duration) -> Result<Output, String> {
        let dir = self.new_exec_cgroup("exec");
        let mut cmd = self.inside_command(argv, &dir);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = match self.in_pid_ns(|| cmd.spawn()) {
            Ok(child) => child,
            Err(e) => {
                remove_exec_cgroup(&dir);
                panic!("cannot spawn `{}`: {e}", show_cmd(&cmd));
            }
        };
        let out_reader = reader(child.stdout.take());
        let err_reader = reader(child.stderr.take());
        let start = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if start.elapsed() >= timeout => break None,
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(e) => {
                    remove_exec_cgroup(&dir);
                    panic!("waitpid for `{}`: {e}", show_cmd(&cmd));
                }
            }
        };
        // Everything left in the cgroup dies (the command itself after a timeout); the
        // child stays unreaped until then, so its pid is ours throughout.
        remove_exec_cgroup(&dir);
        let timed_out = status.is_none();
        let status = match status {
            Some(status) => status,
            None => child
                .wait()
                .unwrap_or_else(|e| panic!("waitpid for `{}`: {e}", show_cmd(&cmd))),
        };
        // The pipes close once every holder is gone; something that moved itself out of
        // the cgroup could keep them open, so wait a moment only.
        let deadline = Instant::now() + Duration::from_secs(2);
        while !(out_reader.is_finished() && err_reader.is_finished()) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        let take = |h: thread::JoinHandle<Vec<u8>>| {
            if h.is_finished() {
                h.join().unwrap_or_default()
            } else {
                b"<still open>".to_vec()
            }
        };
        let output = Output {
            status,
            stdout: take(out_reader),
            stderr: take(err_reader),
        };
        if timed_out {
            return Err(format!(
                "`{}` in sandbox {} still running after {timeout:?}; killed: {}",
                argv.join(" "),
                self.machine,
                show_output(&output)
            ));
        }
        Ok(output)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        // SIGTERM: nspawn sends SIGRTMIN+3 to PID 1, which powers off; SIGKILL to nspawn's
        // process group after the grace period.
        self.nspawn.terminate_quiet(SHUTDOWN_GRACE);
        // Kills what is left (the container itself if nspawn had to be killed, whose
        // PID 1 then takes the whole PID namespace with it) and removes the tree.
        drop(self.cgroup.take());
        // nspawn's per-machine directory: it refuses to delete it when /run is not a
        // tmpfs (as here, PID 1 not being systemd), and leaves it when killed.
        let propagate = Path::new("/run/systemd/nspawn/propagate").join(&self.machine);
        match fs::remove_dir_all(&propagate) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => eprintln!("freebind-e2e: cannot remove {}: {e}", propagate.display()),
        }
    }
}

/// Kills everything in the (leaf) cgroup `dir`, waits for it to drain, removes it.
/// Prints what fails; never panics (also used on error paths).
fn remove_exec_cgroup(dir: &Path) {
    let kill = dir.join("cgroup.kill");
    if fs::write(&kill, "1").is_err() {
        // No cgroup.kill before Linux 5.14: each pid, by pid.
        for pid in read_procs(dir) {
            // SAFETY: plain syscall; ESRCH for one already gone is fine.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        }
    }
    let start = Instant::now();
    while !read_procs(dir).is_empty() {
        if start.elapsed() > DRAIN_TIMEOUT {
            eprintln!(
                "freebind-e2e: processes {:?} still in {} after {DRAIN_TIMEOUT:?}",
                read_procs(dir),
                dir.display()
            );
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    // The kernel can report EBUSY for a moment after the last task left.
    for _ in 0..100 {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(e) if e.kind() == ErrorKind::NotFound => return,
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                thread::sleep(Duration::from_millis(10))
            }
            Err(e) => {
                eprintln!("freebind-e2e: rmdir {}: {e}", dir.display());
                return;
            }
        }
    }
    eprintln!("freebind-e2e: rmdir {}: still busy", dir.display());
}

fn read_procs(dir: &Path) -> Vec<u32> {
    fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// Pids in cgroup `dir` and all its descendants (read errors ignored: cgroups come and
/// go while systemd works).
fn procs_below(dir: &Path) -> Vec<u32> {
    let mut pids = read_procs(dir);
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                pids.extend(procs_below(&entry.path()));
            }
        }
    }
    pids
}

/// A field of `/proc/PID/status`.
fn status_field(pid: u32, key: &str) -> Option<String> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .map(|v| v.trim().to_owned())
}

/// `NSpid:` — the pid in each PID namespace, from ours to the process's own.
fn ns_pids(pid: u32) -> Option<Vec<u32>> {
    status_field(pid, "NSpid")?
        .split_whitespace()
        .map(|p| p.parse().ok())
        .collect()
}

fn parent_pid(pid: u32) -> Option<u32> {
    status_field(pid, "PPid")?.parse().ok()
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn machine_names_are_hostnames() {
        assert_eq!(machine_name("fb-sbx-12-3-0a1f"), "fb-sbx-12-3-0a1f");
        assert_eq!(machine_name("a_b.c"), "a-b-c");
        assert_eq!(machine_name("-x"), "sx");
        assert_eq!(machine_name(&"y".repeat(80)).len(), 64);
    }

    #[test]
    fn siblings_stay_in_the_cache_directory() {
        assert_eq!(
            sibling(Path::new(SANDBOX_ROOT), "partial"),
            PathBuf::from("/var/cache/freebind-e2e/bookworm.partial")
        );
    }

    /// What an interrupted debootstrap leaves: its target with /proc still mounted in it.
    /// The tree goes, the mount is detached first, the host's /proc is untouched.
    #[test]
    fn remove_tree_detaches_mounts_first() {
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return;
        }
        let dir = std::env::temp_dir().join(crate::unique_name("fb-sbx-tree"));
        fs::create_dir_all(dir.join("proc")).expect("mkdir");
        fs::write(dir.join("file"), "x").expect("write");
        let target = CString::new(dir.join("proc").to_str().expect("utf-8")).expect("cstr");
        // SAFETY: valid C strings, no data.
        let r = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                target.as_ptr(),
                c"proc".as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount proc: {}", std::io::Error::last_os_error());
        assert_eq!(mounts_below(&dir).len(), 1);
        remove_tree(&dir);
        assert!(!dir.exists());
        assert!(Path::new("/proc/self/status").exists());
    }

    #[test]
    fn stamp_names_what_is_installed() {
        assert!(stamp().contains("include systemd,systemd-sysv,dbus,iproute2\n"));
    }
}
