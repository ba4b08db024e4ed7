//! `cargo xtask test --kernel 6.1`: the privileged end-to-end tests inside a QEMU guest
//! that boots one of Debian's own kernels, so the older kernels the field runs are tested
//! on a machine that runs a newer one.
//!
//! The guest is a busybox initramfs that loads the modules Debian builds separately,
//! mounts the host's root read-only over 9p, gives it tmpfs where the tests write, and
//! runs the host-built test binaries there in a chroot, each under a time limit. Their
//! output streams back over the serial console; each binary's output and status, and the
//! final status, are also written to the writable target share, which the host reads
//! first once qemu has exited (the console can interleave kernel messages mid-line).

mod host_tools;
mod packages;
mod results;

use std::{
    collections::HashSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};

use crate::{
    build_steps::workspace_cargo,
    cmd::{display, output, step},
    paths::Paths,
};
use packages::{apt_newest, cached_debs, newest_deb, prepare_cache, unpack_or_refetch};
use results::{after_marker, judge, kernel_trouble, leading_number, outcome, Summary, Verdict};

/// Downloaded packages (kernels, busybox-static) and their unpacked trees. Kept across
/// runs (and clones): Debian drops superseded 6.1 builds from the mirror, so the cache may
/// be the only copy.
pub const KERNEL_CACHE: &str = "/var/cache/freebind-kernels";

/// End-to-end test files (`tests/tests/NAME.rs`) left to the host, and why. Every other
/// file runs in the guest: a new test file is tested on the old kernels unless it is
/// listed here.
pub const HOST_ONLY: &[(&str, &str)] = &[
    (
        "deploy_manifests",
        "reads the deployment files, no kernel involved; installs its validators from PyPI \
         on first use, and the guest has no network",
    ),
    (
        "cli_docs",
        "completion scripts and man pages, no kernel involved but one log line; installs \
         zsh, fish and groff with apt when missing, and the guest has no network",
    ),
];

/// Run first, in this order: the kernel's verdict on what freebind needs, then the two
/// modes.
const FIRST: &[&str] = &["kernel_compat", "check", "native_mode", "steer_mode"];
/// Run last: its storms are the likeliest to stop a guest, and the rest is known by then.
const LAST: &[&str] = &["reliability"];

/// Test files that boot systemd in systemd-nspawn from the debootstrap root
/// ([`freebind_e2e::SANDBOX_ROOT`]). The guest has no network to build it: the host builds
/// it first, and the guest sees it read-only (nspawn's `--volatile=overlay` keeps it so).
pub const NEED_SANDBOX_ROOT: &[&str] = &["systemd_units", "sandbox_smoke"];

/// Printed by the guest's init after the tests: `<marker> <exit status>`.
const EXIT_MARKER: &str = "FREEBIND-GUEST-EXIT";
/// Printed before and after each test binary.
const TEST_MARKER: &str = "FREEBIND-GUEST-TEST";

/// Modules the guest loads before anything else (with their dependencies): 9p carries the
/// host's root; veth and dummy are the test bed's links; sch_ingress and cls_bpf are what
/// `tc` needs for BPF classifiers. Which of them Debian builds in differs by release.
const MODULES: &[&str] = &[
    "virtio_pci",
    "9pnet_virtio",
    "9p",
    "veth",
    "dummy",
    "sch_ingress",
    "cls_bpf",
    // systemd-nspawn --volatile=overlay, for the systemd sandbox tests.
    "overlay",
    // `status` and the metrics list sockets with sock_diag, which the kernel would
    // otherwise load on demand through a modprobe the chroot cannot serve.
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

pub struct Options<'a> {
    pub kernel: &'a str,
    /// Test files to run (empty: every file but [`HOST_ONLY`]).
    pub tests: Vec<String>,
    /// Extra environment for the tests (FREEBIND_LONG, CI).
    pub env: Vec<(String, String)>,
    /// Passed to every test binary (a name filter, `--nocapture`, …).
    pub args: &'a [String],
    /// The whole guest: qemu is killed after it.
    pub timeout: Duration,
    /// Each test binary: stopped after it (TERM, KILL 10 s later), and failed.
    pub test_timeout: Duration,
}

/// Builds the guest and runs the tests in it; fails when a test fails, a binary runs no
/// test, or the guest does not say how they ended.
pub fn run(paths: &Paths, options: &Options<'_>) -> Result<()> {
    let cache = Path::new(KERNEL_CACHE);
    prepare_cache(cache)?;
    host_tools::ensure(cache)?;
    let kernel = kernel_tree(cache, options.kernel)?;
    let busybox = static_busybox(cache)?;
    let binaries = test_binaries(paths)?;
    let wanted: Vec<String> = if options.tests.is_empty() {
        guest_test_files(&paths.root)?
    } else {
        for name in &options.tests {
            if let Some((_, why)) = HOST_ONLY.iter().find(|(n, _)| n == name) {
                println!("note: {name} normally runs on the host only: it {why}");
            }
        }
        options.tests.clone()
    };
    let mut selected = Vec::new();
    for name in &wanted {
        let binary = binaries.iter().find(|(n, _)| n == name).with_context(|| {
            let names: Vec<&str> = binaries.iter().map(|(n, _)| n.as_str()).collect();
            format!(
                "no end-to-end test file named {name} (there are: {})",
                names.join(", ")
            )
        })?;
        selected.push(binary.clone());
    }
    let layout = Layout::new(paths, &kernel.release)?;
    for (name, exe) in &selected {
        if !exe.starts_with(&layout.target) {
            bail!(
                "cargo built {name} at {}, outside the target directory {} (from \
                 CARGO_TARGET_DIR, else target/) that the guest mounts writable",
                exe.display(),
                layout.target.display()
            );
        }
    }
    // Results of an earlier run must not be read as this one's.
    if layout.out.exists() {
        fs::remove_dir_all(&layout.out)
            .with_context(|| format!("removing {}", layout.out.display()))?;
    }
    fs::create_dir_all(&layout.out)
        .with_context(|| format!("creating {}", layout.out.display()))?;
    let accel = accelerator();
    let script = test_script(paths, &selected, options, &layout.out);
    let initramfs = layout.work.join("initramfs.cpio");
    write_initramfs(
        &kernel,
        &busybox,
        &init_script(&layout),
        &script,
        &initramfs,
    )?;
    let console = boot(&kernel, &initramfs, &layout.target, accel, options.timeout)?;
    let names: Vec<&str> = selected.iter().map(|(n, _)| n.as_str()).collect();
    report(&kernel, accel, &names, &layout.out, &console, options)
}

/// Where the guest's files live on the host, which are the same paths in the guest.
struct Layout {
    /// Cargo's target directory (the test binaries; tests write below it): writable.
    target: PathBuf,
    /// `<target>/guest/<release>`: the initramfs.
    work: PathBuf,
    /// `<work>/run`: what the guest writes back (per binary `NAME.log` and `NAME.result`,
    /// and `exit`).
    out: PathBuf,
    /// Host directories that stay visible (read-only) though they may lie below one the
    /// guest gives a tmpfs: the workspace (sources, the tests' fixtures; a clone in /tmp)
    /// and the systemd sandbox root's directory in /var/cache.
    keep: Vec<PathBuf>,
}

impl Layout {
    fn new(paths: &Paths, release: &str) -> Result<Self> {
        // paths.rs places the agent at `<target dir>/release/freebind-agent`, with the
        // target directory from CARGO_TARGET_DIR (relative to the workspace) or target/:
        // the same directory here. Canonical: the guest mounts onto these paths outside
        // the chroot, where the host's symlinks would not resolve.
        let target = paths
            .agent
            .parent()
            .and_then(Path::parent)
            .context("the agent's path has no target directory")?;
        let canonical =
            |p: &Path| fs::canonicalize(p).with_context(|| format!("resolving {}", p.display()));
        let target = canonical(target)?;
        let root = canonical(&paths.root)?;
        let work = target.join("guest").join(release);
        let out = work.join("run");
        let mut keep = vec![root.clone()];
        if let Some(sandbox) = Path::new(freebind_e2e::SANDBOX_ROOT).parent() {
            if let Ok(sandbox) = fs::canonicalize(sandbox) {
                keep.push(sandbox);
            }
        }
        Ok(Self {
            target,
            work,
            out,
            keep,
        })
    }
}

/// Every end-to-end test file but [`HOST_ONLY`]: [`FIRST`], then by name, [`LAST`] last.
fn guest_test_files(root: &Path) -> Result<Vec<String>> {
    let files = test_files(root)?;
    for (name, _) in HOST_ONLY {
        if !files.iter().any(|f| f == name) {
            bail!("HOST_ONLY in xtask/src/guest.rs names {name}, which is no file in tests/tests");
        }
    }
    let mut guest: Vec<String> = files
        .into_iter()
        .filter(|f| !HOST_ONLY.iter().any(|(n, _)| n == f))
        .collect();
    guest.sort_by_key(|f| {
        let rank = match FIRST.iter().position(|n| n == f) {
            Some(i) => i,
            None if LAST.contains(&f.as_str()) => FIRST.len() + 1,
            None => FIRST.len(),
        };
        (rank, f.clone())
    });
    Ok(guest)
}

/// The names of `tests/tests/*.rs` (each is one test binary).
fn test_files(root: &Path) -> Result<Vec<String>> {
    let dir = root.join("tests/tests");
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", dir.display()))?
            .path();
        if path.extension().is_some_and(|e| e == "rs") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                files.push(stem.to_string());
            }
        }
    }
    files.sort();
    Ok(files)
}

/// An unpacked kernel package: `boot/vmlinuz-<release>` and `lib/modules/<release>`.
struct KernelTree {
    root: PathBuf,
    release: String,
}

impl KernelTree {
    fn vmlinuz(&self) -> PathBuf {
        self.root
            .join("boot")
            .join(format!("vmlinuz-{}", self.release))
    }

    fn modules(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }
}

/// The newest `linux-image-<series>…-amd64-unsigned` of apt's and [`KERNEL_CACHE`]'s,
/// downloaded there when apt's is newer, unpacked, its modules indexed.
fn kernel_tree(cache: &Path, series: &str) -> Result<KernelTree> {
    let what = format!("linux-image-{series}…-amd64-unsigned package");
    let candidate = apt_newest(&what, || apt_kernel_images(series));
    let cached = cached_debs(cache, |name| is_image_of(name, series))?;
    let deb = newest_deb(cache, &what, candidate, cached)?;
    let root = unpack_or_refetch(cache, &deb, &|tree| {
        let release = module_release(tree)?;
        step(
            "indexing its modules",
            Command::new("/sbin/depmod")
                .arg("-b")
                .arg(tree)
                .arg(&release),
        )
    })?;
    let tree = KernelTree {
        release: module_release(&root)?,
        root,
    };
    if !tree.vmlinuz().is_file() {
        bail!("{} has no {}", deb.path.display(), tree.vmlinuz().display());
    }
    println!("kernel {} from {}", tree.release, deb.path.display());
    Ok(tree)
}

/// The kernel release a package tree holds modules for (`lib/modules/<release>`).
fn module_release(tree: &Path) -> Result<String> {
    let modules = tree.join("lib/modules");
    fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{} is empty", modules.display()))
}

/// The generic amd64 image packages of `series` apt knows (any version).
fn apt_kernel_images(series: &str) -> Result<Vec<String>> {
    let pattern = format!(
        "^linux-image-{}[.-].*amd64-unsigned$",
        series.replace('.', "\\.")
    );
    let list = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|package| is_image_of(package, series))
        .map(str::to_string)
        .collect())
}

/// A statically linked busybox for the initramfs, which has no C library before it
/// chroots into the host's root: `/bin/busybox` when busybox-static is installed, else
/// the one in busybox-static's package, downloaded into [`KERNEL_CACHE`] and unpacked
/// there. Not installed: it conflicts with, and apt would remove, the host's `busybox`.
fn static_busybox(cache: &Path) -> Result<PathBuf> {
    const PACKAGE: &str = "busybox-static";
    let installed = output(Command::new("dpkg-query").args(["-W", "-f=${Status}", PACKAGE]))
        .is_ok_and(|s| s.ends_with(" installed"));
    let system = Path::new("/bin/busybox");
    if installed && system.is_file() {
        println!("busybox from {PACKAGE} (installed): {}", system.display());
        return Ok(system.to_path_buf());
    }
    let candidate = apt_newest(PACKAGE, || Ok(vec![PACKAGE.to_string()]));
    let cached = cached_debs(cache, |name| name == PACKAGE)?;
    let deb = newest_deb(cache, PACKAGE, candidate, cached)?;
    let root = unpack_or_refetch(cache, &deb, &|tree| {
        let busybox = tree.join("bin/busybox");
        if !busybox.is_file() {
            bail!("{} has no bin/busybox", deb.path.display());
        }
        Ok(())
    })?;
    let busybox = root.join("bin/busybox");
    println!("busybox from {}", deb.path.display());
    Ok(busybox)
}

/// Whether `package` is a generic (not cloud, not rt) amd64 image of `version`: `6.1`
/// matches `linux-image-6.1.0-56-amd64-unsigned` but not 6.12's
/// `linux-image-6.12.107+deb12-amd64-unsigned`.
fn is_image_of(package: &str, version: &str) -> bool {
    let Some(rest) = package
        .strip_prefix("linux-image-")
        .and_then(|r| r.strip_prefix(version))
    else {
        return false;
    };
    let Some(middle) = rest.strip_suffix("-amd64-unsigned") else {
        return false;
    };
    (middle.starts_with(['.', '-']) || middle.is_empty())
        && !middle.ends_with("-cloud")
        && !middle.ends_with("-rt")
}

/// The end-to-end test binaries cargo builds (release, as the host run uses), by test
/// file name.
fn test_binaries(paths: &Paths) -> Result<Vec<(String, PathBuf)>> {
    let mut cmd = workspace_cargo(paths);
    cmd.args([
        "test",
        "--release",
        "-p",
        "freebind-e2e",
        "--tests",
        "--no-run",
        "--message-format=json",
    ]);
    println!("$ {}", display(&cmd));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{}`", display(&cmd)))?;
    if !out.status.success() {
        bail!("building the end-to-end tests failed: {}", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" || message["profile"]["test"] != true {
            continue;
        }
        let kinds = message["target"]["kind"].as_array();
        if !kinds.is_some_and(|k| k.iter().any(|k| k == "test")) {
            continue;
        }
        if let (Some(name), Some(exe)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            binaries.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    Ok(binaries)
}

/// KVM when it works here; TCG otherwise. A nested `kvm_pvm` device (some cloud VMs)
/// opens fine but stock kernels fail on it, so it counts as none.
fn accelerator() -> &'static str {
    let usable = !Path::new("/sys/module/kvm_pvm").exists()
        && fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if usable {
        "kvm"
    } else {
        "tcg"
    }
}

fn sh_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}

fn sh_path(path: &Path) -> String {
    sh_quote(&path.to_string_lossy())
}

/// What runs in the chroot: each test binary under `timeout`, its output teed into
/// `<out>/NAME.log`, its status into `<out>/NAME.result`, and the overall status.
fn test_script(
    paths: &Paths,
    tests: &[(String, PathBuf)],
    options: &Options<'_>,
    out: &Path,
) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
    // Plain text on the console and in the logs, which are read by people and parsed.
    s += "export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1 NO_COLOR=1 TERM=dumb\n";
    s += &format!("export FREEBIND_AGENT={}\n", sh_path(&paths.agent));
    for (key, value) in &options.env {
        s += &format!("export {key}={}\n", sh_quote(value));
    }
    s += &format!("out={}\n", sh_path(out));
    s += r#"now() { cut -d' ' -f1 /proc/uptime; }
seconds() { cut -d. -f1 /proc/uptime; }
# coreutils' timeout (the chroot is the host's Debian root), else the initramfs's busybox.
# -k: a test that ignores TERM is killed 10 s later.
if command -v timeout >/dev/null 2>&1; then
    stop="timeout -k 10"
else
    stop="/run/freebind-busybox timeout -k 10"
fi
cd /tmp
failed=0
"#;
    let args: Vec<String> = options.args.iter().map(|a| sh_quote(a)).collect();
    let mut flags = String::new();
    // One test at a time: the emulated CPU is slow enough without two tests competing.
    // libtest refuses a flag twice, so the caller's wins.
    if !options.args.iter().any(|a| a.starts_with("--test-threads")) {
        flags += " --test-threads=1";
    }
    if !options.args.iter().any(|a| a.starts_with("--color")) {
        flags += " --color=never";
    }
    let limit = options.test_timeout.as_secs().max(1);
    for (name, exe) in tests {
        // The status goes through a file: a pipeline's status is tee's. The end marker
        // starts a line of its own even when the test's last output did not end one.
        s += &format!(
            r#"echo "{TEST_MARKER} {name} start $(now)"
started=$(seconds)
{{ $stop {limit} {exe}{flags} {args} </dev/null; echo $? >"$out/{name}.status"; }} 2>&1 | tee "$out/{name}.log"
rc=$(cat "$out/{name}.status" 2>/dev/null)
[ -n "$rc" ] || rc=126
timed_out=0
if [ "$rc" != 0 ] && {{ [ "$rc" = 124 ] || [ $(($(seconds) - started)) -ge {limit} ]; }}; then
    timed_out=1
    printf '\n%s\n' "freebind-guest: {name} did not finish within {limit} s: stopped, failed"
fi
echo "$rc $timed_out $(($(seconds) - started))" >"$out/{name}.result"
printf '\n%s\n' "{TEST_MARKER} {name} end $(now) status $rc timeout $timed_out"
[ "$rc" = 0 ] || failed=1
"#,
            exe = sh_path(exe),
            args = args.join(" "),
        );
    }
    s += "exit $failed\n";
    s
}

/// The guest's PID 1. The host's root is read-only in the guest: every place the tests,
/// the agent or the servers write gets a tmpfs, and the target directory is the writable
/// share. Any failure before the tests run ends the guest at once with status 125.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
fail() {
    echo "freebind-guest: $*"
    echo 125 >"/newroot"@OUT@/exit 2>/dev/null
    sync
    printf '\n%s\n' "@EXIT@ 125"
    poweroff -f
    exit 1
}
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "freebind-guest: kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /modules/order); do
    insmod /modules/$m || echo "freebind-guest: insmod $m failed"
done
# cache=loose: the share is read-only, nothing changes under the guest.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot \
    || fail "cannot mount the host's root"
# Directories below those that get a tmpfs next (the project in a clone in /tmp, the
# sandbox root in /var/cache): held aside here, put back after.
@HOLD@mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm 2>/dev/null
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t cgroup2 cgroup2 /newroot/sys/fs/cgroup
mount -t bpf bpf /newroot/sys/fs/bpf
mount -t debugfs debugfs /newroot/sys/kernel/debug 2>/dev/null
for d in /tmp /run /root /var/tmp /var/log /var/lib /var/cache /etc/freebind; do
    [ -d /newroot$d ] && mount -t tmpfs -o mode=0755 tmpfs /newroot$d
done
chmod 1777 /newroot/tmp /newroot/var/tmp
@RESTORE@# The target directory (inside the project, or wherever CARGO_TARGET_DIR puts it).
mkdir -p "/newroot"@TARGET@ \
    && mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 target "/newroot"@TARGET@ \
    || fail "cannot mount "@TARGET@" writable"
[ -d "/newroot"@OUT@ ] || fail "no "@OUT@" on the target share"
mkdir -p /newroot/run/netns /newroot/run/lock /newroot/var/log/nginx /newroot/var/lib/nginx
# The tests' script falls back to busybox's timeout when the host's root has none.
cp /bin/busybox /newroot/run/freebind-busybox
cp /tests.sh /newroot/run/freebind-guest-tests.sh
echo "freebind-guest: running the tests after $(cut -d' ' -f1 /proc/uptime) s"
chroot /newroot /bin/sh /run/freebind-guest-tests.sh
rc=$?
echo $rc >"/newroot"@OUT@/exit
sync
printf '\n%s\n' "@EXIT@ $rc"
poweroff -f
"#;

fn init_script(layout: &Layout) -> String {
    let (mut hold, mut restore) = (String::new(), String::new());
    for (i, dir) in layout.keep.iter().enumerate() {
        let dir = sh_path(dir);
        hold += &format!(
            "mkdir -p /held/{i}\n\
             mount --bind \"/newroot\"{dir} /held/{i} || fail \"cannot hold \"{dir}\" aside\"\n"
        );
        restore += &format!(
            "mkdir -p \"/newroot\"{dir}\n\
             mount --move /held/{i} \"/newroot\"{dir} || fail \"cannot put \"{dir}\" back\"\n"
        );
    }
    INIT.replace("@HOLD@", &hold)
        .replace("@RESTORE@", &restore)
        .replace("@EXIT@", EXIT_MARKER)
        .replace("@OUT@", &sh_path(&layout.out))
        .replace("@TARGET@", &sh_path(&layout.target))
}

/// Writes the initramfs: busybox, the init script, the tests' script, and the modules
/// (decompressed: busybox's insmod reads plain ELF) in load order.
fn write_initramfs(
    kernel: &KernelTree,
    busybox: &Path,
    init: &str,
    script: &str,
    path: &Path,
) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "modules", "proc", "sys", "newroot"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("bin/sh", 0o755, &busybox);
    cpio.file("init", 0o755, init.as_bytes());
    cpio.file("tests.sh", 0o755, script.as_bytes());
    let order = module_order(&kernel.modules())?;
    let mut names = Vec::new();
    for (i, module) in order.iter().enumerate() {
        let source = kernel.modules().join(module);
        let bytes = if module.ends_with(".xz") {
            let out = Command::new("xz")
                .arg("-dc")
                .arg(&source)
                .output()
                .context("running xz")?;
            if !out.status.success() {
                bail!("xz -dc {} failed: {}", source.display(), out.status);
            }
            out.stdout
        } else {
            fs::read(&source).with_context(|| format!("reading {}", source.display()))?
        };
        let base = Path::new(module)
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("m")
            .split('.')
            .next()
            .unwrap_or("m")
            .to_string();
        let name = format!("{i:02}-{base}.ko");
        cpio.file(&format!("modules/{name}"), 0o644, &bytes);
        names.push(name);
    }
    cpio.file(
        "modules/order",
        0o644,
        format!("{}\n", names.join("\n")).as_bytes(),
    );
    let bytes = cpio.finish();
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(&bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// [`MODULES`] that this kernel builds as modules, each after its dependencies
/// (modules.dep, as `depmod -b` wrote it), as paths relative to the modules directory.
fn module_order(modules: &Path) -> Result<Vec<String>> {
    let dep_file = modules.join("modules.dep");
    let text =
        fs::read_to_string(&dep_file).with_context(|| format!("reading {}", dep_file.display()))?;
    let deps: Vec<(String, Vec<String>)> = text
        .lines()
        .filter_map(|line| {
            let (module, deps) = line.split_once(':')?;
            Some((
                module.to_string(),
                deps.split_whitespace().map(str::to_string).collect(),
            ))
        })
        .collect();
    let name_of = |path: &str| {
        Path::new(path)
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.split('.').next())
            .unwrap_or("")
            .replace('-', "_")
    };
    fn visit(
        module: &str,
        deps: &[(String, Vec<String>)],
        seen: &mut HashSet<String>,
        order: &mut Vec<String>,
    ) {
        if !seen.insert(module.to_string()) {
            return;
        }
        if let Some((_, ds)) = deps.iter().find(|(m, _)| m == module) {
            for d in ds {
                visit(d, deps, seen, order);
            }
        }
        order.push(module.to_string());
    }
    let mut seen = HashSet::new();
    let mut order = Vec::new();
    for wanted in MODULES {
        let wanted = wanted.replace('-', "_");
        // Built in (no entry) is fine: the kernel already has it.
        if let Some((module, _)) = deps.iter().find(|(m, _)| name_of(m) == wanted) {
            visit(&module.clone(), &deps, &mut seen, &mut order);
        }
    }
    Ok(order)
}

/// A `newc` cpio archive, the format the kernel unpacks into its initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    inode: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.inode += 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | perm, (0, 0), data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.bytes
    }
}

/// What the console showed.
struct Console {
    lines: Vec<String>,
    booted: Option<Duration>,
    elapsed: Duration,
    exit: ExitStatus,
    timed_out: bool,
}

/// Boots the guest and streams its console until qemu exits or `timeout` passes.
fn boot(
    kernel: &KernelTree,
    initramfs: &Path,
    target: &Path,
    accel: &str,
    timeout: Duration,
) -> Result<Console> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-m", "2G", "-smp", "2"]);
    if accel == "kvm" {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        // One host thread for both vCPUs. With a thread per vCPU (MTTCG) a 6.1 guest
        // hung for good twice: once with a vCPU sitting at a jump-label site in
        // __sys_setsockopt (the 5-byte NOP of the cgroup setsockopt static key, which the
        // kernel live-patches whenever a cgroup's first or last such program comes or
        // goes) and RCU starved. Code one vCPU thread rewrites while another runs it is
        // what multi-threaded TCG handles worst; round-robin vCPUs see every change at
        // once, and the guest still has two CPUs.
        cmd.args(["-accel", "tcg,thread=single", "-cpu", "max"]);
    }
    cmd.arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            // loglevel=5: warnings and the stack traces the kernel prints with them
            // (lockups, oopses) reach the console; notices and boot chatter do not.
            // A CPU stuck in the kernel for 120 s (watchdog_thresh=60) panics the guest,
            // which then stops (panic=-1, -no-reboot): nothing in the guest, not even a
            // test's timeout, can run any more, and the host need not wait for
            // --guest-timeout. 120 s, not the default 20: under TCG on a busy host a
            // descheduled vCPU can look stuck for a while.
            "console=ttyS0 panic=-1 loglevel=5 watchdog_thresh=60 softlockup_panic=1 \
             rdinit=/init",
            "-no-reboot",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-monitor",
            "none",
            "-nic",
            "none",
            // multidevs=remap: the host's root spans several filesystems, whose inode
            // numbers would otherwise collide in the guest.
            "-fsdev",
            "local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot",
            "-device",
            "virtio-9p-pci,fsdev=target,mount_tag=target",
        ])
        // The test binaries live there, the tests write their findings there (as on the
        // host), and the guest writes back each binary's log and status.
        .arg("-fsdev")
        .arg(format!(
            "local,id=target,path={},security_model=none,multidevs=remap",
            target.display()
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    println!(
        "$ {}  # {accel}, timeout {} s",
        display(&cmd),
        timeout.as_secs()
    );
    let started = Instant::now();
    let mut child = cmd.spawn().context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu's console")?;
    let pid = child.id();
    let finished = Arc::new(AtomicBool::new(false));
    let timed_out = Arc::new(AtomicBool::new(false));
    let watchdog = {
        let (finished, timed_out) = (finished.clone(), timed_out.clone());
        thread::spawn(move || {
            while started.elapsed() < timeout {
                if finished.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(200));
            }
            timed_out.store(true, Ordering::Relaxed);
            // SAFETY: kill on the pid of the qemu this process started and has not reaped.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        })
    };
    let mut lines = Vec::new();
    let mut booted = None;
    let mut reader = BufReader::new(stdout);
    let mut raw = Vec::new();
    loop {
        raw.clear();
        match reader.read_until(b'\n', &mut raw) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        println!("{line}");
        if booted.is_none() && line.contains("freebind-guest: kernel") {
            booted = Some(started.elapsed());
        }
        lines.push(line.to_string());
    }
    let exit = child.wait().context("waiting for qemu")?;
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    Ok(Console {
        lines,
        booted,
        elapsed: started.elapsed(),
        exit,
        timed_out: timed_out.load(Ordering::Relaxed),
    })
}

/// Prints each binary's verdict and time, and fails unless every binary passed (or was
/// filtered out), at least one test ran, and the guest ended with status 0.
fn report(
    kernel: &KernelTree,
    accel: &str,
    names: &[&str],
    out: &Path,
    console: &Console,
    options: &Options<'_>,
) -> Result<()> {
    println!(
        "\n== guest {} ({accel}): booted to init in {}, ran {} s in all",
        kernel.release,
        console
            .booted
            .map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        console.elapsed.as_secs()
    );
    let width = names.iter().map(|n| n.len()).max().unwrap_or(0);
    let (mut failed, mut ran) = (Vec::new(), 0);
    for name in names {
        let outcome = outcome(name, out, &console.lines);
        let verdict = judge(&outcome, options.test_timeout);
        let seconds = outcome
            .seconds
            .map_or("? s".to_string(), |s| format!("{s} s"));
        let summary = outcome
            .summary
            .as_ref()
            .map_or(String::new(), |s| s.to_string());
        ran += outcome.summary.as_ref().map_or(0, Summary::ran);
        match &verdict {
            Verdict::Passed => println!("   {name:width$}  ok       {seconds:>6}  {summary}"),
            Verdict::NoneMatched => {
                println!("   {name:width$}  -        {seconds:>6}  no test matches the filter")
            }
            Verdict::Failed(why) => {
                println!("   {name:width$}  FAILED   {seconds:>6}  {why}");
                failed.push(*name);
            }
        }
    }
    println!("   (logs: {})", out.display());
    if console.timed_out {
        bail!(
            "the guest did not finish within {} s (qemu killed)",
            options.timeout.as_secs()
        );
    }
    // The status the guest wrote to the target share, else its console line.
    let status = fs::read_to_string(out.join("exit"))
        .ok()
        .and_then(|s| leading_number(s.trim()))
        .or_else(|| {
            console.lines.iter().rev().find_map(|line| {
                after_marker(line, EXIT_MARKER)?
                    .first()
                    .and_then(|w| leading_number(w))
            })
        });
    match status {
        None => bail!(
            "the {} guest stopped ({}) without a status ({EXIT_MARKER}){}",
            kernel.release,
            console.exit,
            kernel_trouble(&console.lines)
                .map_or(String::new(), |line| format!("; its kernel said: {line}"))
        ),
        Some(125) => bail!(
            "the {} guest could not set up the tests (see its `freebind-guest:` lines)",
            kernel.release
        ),
        Some(_) if !failed.is_empty() => bail!(
            "end-to-end tests failed in the {} guest: {}",
            kernel.release,
            failed.join(", ")
        ),
        Some(0) if ran == 0 => bail!(
            "no test ran in the {} guest: the filter {:?} matches no test in {}",
            kernel.release,
            options.args,
            names.join(", ")
        ),
        Some(0) => Ok(()),
        Some(rc) => bail!(
            "the tests' script ended with status {rc} in the {} guest",
            kernel.release
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_packages_are_matched_by_version() {
        assert!(is_image_of("linux-image-6.1.0-56-amd64-unsigned", "6.1"));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-cloud-amd64-unsigned",
            "6.1"
        ));
        assert!(!is_image_of(
            "linux-image-6.1.0-56-rt-amd64-unsigned",
            "6.1"
        ));
        assert!(!is_image_of(
            "linux-image-6.12.107+deb12-amd64-unsigned",
            "6.1"
        ));
        assert!(is_image_of(
            "linux-image-6.12.107+deb12-amd64-unsigned",
            "6.12"
        ));
    }

    #[test]
    fn host_only_files_exist_and_the_rest_run_in_the_guest() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let guest = guest_test_files(root).unwrap();
        assert_eq!(&guest[..FIRST.len()], FIRST);
        assert_eq!(&guest[guest.len() - LAST.len()..], LAST);
        for (name, _) in HOST_ONLY {
            assert!(!guest.iter().any(|g| g == name), "{name}");
        }
        let all = test_files(root).unwrap();
        assert_eq!(guest.len() + HOST_ONLY.len(), all.len());
    }

    #[test]
    fn cpio_entries_are_aligned() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n");
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(bytes.len() % 4, 0);
    }
}
