//! `cargo xtask test --kernel 6.1`: the privileged end-to-end tests inside a QEMU guest
//! that boots one of Debian's own kernels, so the older kernels the field runs are tested
//! on a machine that runs a newer one.
//!
//! The guest is a busybox initramfs that loads the modules Debian builds separately,
//! mounts the host's root read-only over 9p, gives it tmpfs where the tests write, and
//! runs the host-built test binaries there in a chroot. Their output and a final status
//! line come back over the serial console.

use std::{
    collections::HashSet,
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
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

/// Downloaded kernel packages and their unpacked trees. Kept across runs (and clones):
/// Debian drops superseded 6.1 builds from the mirror, so the cache may be the only copy.
pub const KERNEL_CACHE: &str = "/var/cache/freebind-kernels";

/// The test files that run in the guest. Left to the host: systemd_units and
/// sandbox_smoke (they boot a debootstrap root with systemd-nspawn, which needs the
/// host's systemd and a writable root), containers and deploy_manifests (container
/// runtimes and images), cli_docs (it installs zsh, fish and groff with apt).
pub const GUEST_TESTS: &[&str] = &[
    "kernel_compat",
    "check",
    "native_mode",
    "steer_mode",
    "agent_cli",
    "observability",
    "daemon",
];

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
    // `status` and the metrics list sockets with sock_diag, which the kernel would
    // otherwise load on demand through a modprobe the chroot cannot serve.
    "inet_diag",
    "tcp_diag",
    "udp_diag",
];

/// Debian packages the guest needs on the host, with a file each provides.
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    // Static: the initramfs has no C library before it chroots into the host's root.
    ("busybox-static", "/bin/busybox"),
    ("kmod", "/sbin/depmod"),
    ("xz-utils", "/usr/bin/xz"),
];

pub struct Options<'a> {
    pub kernel: &'a str,
    /// Test files to run (empty: [`GUEST_TESTS`]).
    pub tests: Vec<String>,
    /// Extra environment for the tests (FREEBIND_LONG, CI).
    pub env: Vec<(String, String)>,
    /// Passed to every test binary (a name filter, `--nocapture`, …).
    pub args: &'a [String],
    pub timeout: Duration,
}

/// Builds the guest and runs the tests in it; fails when a test fails or the guest does
/// not say how they ended.
pub fn run(paths: &Paths, options: &Options<'_>) -> Result<()> {
    ensure_host_packages()?;
    let kernel = kernel_tree(options.kernel)?;
    let binaries = test_binaries(paths)?;
    let wanted: Vec<String> = if options.tests.is_empty() {
        GUEST_TESTS.iter().map(|t| t.to_string()).collect()
    } else {
        options.tests.clone()
    };
    let mut selected = Vec::new();
    for name in &wanted {
        let binary = binaries
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("no end-to-end test file named {name}"))?;
        selected.push(binary.clone());
    }
    let work = paths.root.join("target/guest").join(&kernel.release);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let accel = accelerator();
    let script = test_script(paths, &selected, options);
    let initramfs = work.join("initramfs.cpio");
    let target = paths.root.join("target");
    write_initramfs(&kernel, &script, &target, &initramfs)?;
    boot(&kernel, &initramfs, &target, accel, options.timeout)
}

/// Installs what the guest needs, saying so; checks only (no apt) when all is there.
fn ensure_host_packages() -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    let busybox_static =
        output(Command::new("dpkg-query").args(["-W", "-f=${Status}", "busybox-static"]))
            .is_ok_and(|s| s.ends_with(" installed"));
    let mut missing = missing;
    if !busybox_static && !missing.contains(&"busybox-static") {
        missing.push("busybox-static");
    }
    if missing.is_empty() {
        return Ok(());
    }
    step(
        &format!("installing {} for the test guest", missing.join(", ")),
        Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing the guest's tools (run `apt-get update` if apt has no candidate)")
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

/// The newest `linux-image-<version>…-amd64-unsigned` apt knows, downloaded into
/// [`KERNEL_CACHE`] once; the newest cached one when apt no longer has any (or cannot
/// download it).
fn kernel_tree(version: &str) -> Result<KernelTree> {
    let cache = Path::new(KERNEL_CACHE);
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    let newest = apt_newest(version);
    let deb = match &newest {
        Ok(Some(package)) => match cached_deb(cache, |name| name == package)? {
            Some(deb) => deb,
            None => {
                let fetched = step(
                    &format!("downloading {package} into {KERNEL_CACHE}"),
                    Command::new("apt-get")
                        .args(["download", package])
                        .current_dir(cache),
                );
                match (fetched, cached_deb(cache, |name| name == package)?) {
                    (Ok(()), Some(deb)) => deb,
                    (result, _) => {
                        let why = result
                            .err()
                            .map_or("no .deb".to_string(), |e| format!("{e:#}"));
                        println!("? cannot download {package} ({why}); trying the cache");
                        newest_cached(cache, version)?
                    }
                }
            }
        },
        Ok(None) | Err(_) => {
            if let Err(e) = &newest {
                println!("? apt-cache: {e:#}; trying the cache");
            }
            newest_cached(cache, version)?
        }
    };
    unpack(&deb)
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

/// Orders packages by the numbers in their names: `6.1.0-56` after `6.1.0-9`.
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

fn apt_newest(version: &str) -> Result<Option<String>> {
    let pattern = format!(
        "^linux-image-{}[.-].*amd64-unsigned$",
        version.replace('.', "\\.")
    );
    let list = output(Command::new("apt-cache").args(["search", "--names-only", &pattern]))?;
    Ok(list
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|package| is_image_of(package, version))
        .max_by_key(|package| version_key(package))
        .map(str::to_string))
}

/// A cached `.deb` whose package name satisfies `pick` (the newest of them).
fn cached_deb(cache: &Path, pick: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let mut debs: Vec<(String, PathBuf)> = fs::read_dir(cache)
        .with_context(|| format!("reading {}", cache.display()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|e| e == "deb"))
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let package = name.split('_').next()?.to_string();
            Some((package, path))
        })
        .filter(|(package, _)| pick(package))
        .collect();
    debs.sort_by_key(|(package, _)| version_key(package));
    Ok(debs.pop().map(|(_, path)| path))
}

fn newest_cached(cache: &Path, version: &str) -> Result<PathBuf> {
    cached_deb(cache, |package| is_image_of(package, version))?.with_context(|| {
        format!(
            "no linux-image-{version}…-amd64-unsigned package: apt has none \
             (run `apt-get update`?) and {KERNEL_CACHE} holds none"
        )
    })
}

/// Unpacks the package next to it (once) and builds its module dependency lists.
fn unpack(deb: &Path) -> Result<KernelTree> {
    let root = deb.with_extension("");
    let done = root.join(".freebind-unpacked");
    if !done.exists() {
        if root.exists() {
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        step(
            "unpacking the kernel",
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root),
        )?;
    }
    let modules = root.join("lib/modules");
    let release = fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .next()
        .with_context(|| format!("{} is empty", modules.display()))?;
    if !done.exists() {
        step(
            "indexing its modules",
            Command::new("/sbin/depmod")
                .arg("-b")
                .arg(&root)
                .arg(&release),
        )?;
        fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
    }
    let tree = KernelTree { root, release };
    if !tree.vmlinuz().is_file() {
        bail!("{} has no {}", deb.display(), tree.vmlinuz().display());
    }
    println!("kernel {} from {}", tree.release, deb.display());
    Ok(tree)
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

/// What runs in the chroot: each test binary, its status, and the overall status.
fn test_script(paths: &Paths, tests: &[(String, PathBuf)], options: &Options<'_>) -> String {
    let mut s = String::from("#!/bin/sh\n");
    s += "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n";
    s += "export HOME=/root TMPDIR=/tmp RUST_BACKTRACE=1\n";
    s += &format!(
        "export FREEBIND_AGENT={}\n",
        sh_quote(&paths.agent.to_string_lossy())
    );
    for (key, value) in &options.env {
        s += &format!("export {key}={}\n", sh_quote(value));
    }
    s += "cd /tmp\nfailed=0\n";
    let args: Vec<String> = options.args.iter().map(|a| sh_quote(a)).collect();
    // One test at a time: the emulated CPU is slow enough without two tests competing.
    let threads = if options.args.iter().any(|a| a.starts_with("--test-threads")) {
        String::new()
    } else {
        " --test-threads=1".to_string()
    };
    for (name, exe) in tests {
        s += &format!(
            "echo {TEST_MARKER} {name} start $(cut -d' ' -f1 /proc/uptime)\n\
             {}{threads} {}\n\
             rc=$?\n\
             echo {TEST_MARKER} {name} end $(cut -d' ' -f1 /proc/uptime) status $rc\n\
             [ $rc = 0 ] || failed=1\n",
            sh_quote(&exe.to_string_lossy()),
            args.join(" ")
        );
    }
    s += "exit $failed\n";
    s
}

/// The guest's PID 1. The host's root is read-only in the guest: every place the tests,
/// the agent or the servers write gets a tmpfs.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /newroot /usr/bin /usr/sbin /sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo "freebind-guest: kernel $(uname -r) up after $(cut -d' ' -f1 /proc/uptime) s"
for m in $(cat /modules/order); do
    insmod /modules/$m || echo "freebind-guest: insmod $m failed"
done
# cache=loose: the share is read-only, nothing changes under the guest.
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot \
    || { echo "freebind-guest: cannot mount the host's root"; echo "@EXIT@ 125"; poweroff -f; }
# The project (its sources, and the test binaries under target/) may live below a
# directory that gets a tmpfs next (a clone in /tmp): held aside here, put back after.
mkdir -p /project
mount --bind "/newroot@ROOT@" /project
mount -t proc proc /newroot/proc
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
mkdir -p "/newroot@ROOT@"
mount --move /project "/newroot@ROOT@" \
    || echo "freebind-guest: cannot mount the project at @ROOT@"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 target "/newroot@TARGET@" \
    || echo "freebind-guest: cannot mount @TARGET@ writable"
mkdir -p /newroot/run/netns /newroot/run/lock /newroot/var/log/nginx /newroot/var/lib/nginx
cp /tests.sh /newroot/run/freebind-guest-tests.sh
echo "freebind-guest: running the tests after $(cut -d' ' -f1 /proc/uptime) s"
chroot /newroot /bin/sh /run/freebind-guest-tests.sh
echo "@EXIT@ $?"
sync
poweroff -f
"#;

/// Writes the initramfs: busybox, the init script, the tests' script, and the modules
/// (decompressed: busybox's insmod reads plain ELF) in load order.
fn write_initramfs(kernel: &KernelTree, script: &str, target: &Path, path: &Path) -> Result<()> {
    let mut cpio = Cpio::default();
    for dir in ["bin", "dev", "modules", "proc", "sys", "newroot"] {
        cpio.dir(dir);
    }
    cpio.char_device("dev/console", 5, 1);
    let busybox = fs::read("/bin/busybox").context("reading /bin/busybox")?;
    cpio.file("bin/busybox", 0o755, &busybox);
    cpio.file("bin/sh", 0o755, &busybox);
    cpio.file(
        "init",
        0o755,
        INIT.replace("@EXIT@", EXIT_MARKER)
            .replace("@TARGET@", &target.to_string_lossy())
            .replace(
                "@ROOT@",
                &target.parent().unwrap_or(target).to_string_lossy(),
            )
            .as_bytes(),
    );
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

/// Boots the guest, streams its console, and reads the tests' status from it.
fn boot(
    kernel: &KernelTree,
    initramfs: &Path,
    target: &Path,
    accel: &str,
    timeout: Duration,
) -> Result<()> {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-machine", "q35", "-m", "2G", "-smp", "2"]);
    if accel == "kvm" {
        cmd.args(["-accel", "kvm", "-cpu", "host"]);
    } else {
        cmd.args(["-accel", "tcg,thread=multi", "-cpu", "max"]);
    }
    cmd.arg("-kernel")
        .arg(kernel.vmlinuz())
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 quiet loglevel=4 rdinit=/init",
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
        // Some tests write their findings under target/ (as they do on the host).
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
    let mut status = None;
    let mut results: Vec<(String, String)> = Vec::new();
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
        if let Some(rest) = line.strip_prefix(&format!("{EXIT_MARKER} ")) {
            status = rest.trim().parse::<i32>().ok();
        }
        if let Some(rest) = line.strip_prefix(&format!("{TEST_MARKER} ")) {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let [name, "end", _, "status", rc] = words[..] {
                results.push((name.to_string(), rc.to_string()));
            }
        }
    }
    let exit = child.wait().context("waiting for qemu")?;
    finished.store(true, Ordering::Relaxed);
    let _ = watchdog.join();
    println!(
        "\n== guest {} ({accel}): booted to init in {}, ran {} s in all",
        kernel.release,
        booted.map_or("?".to_string(), |d| format!("{:.1} s", d.as_secs_f64())),
        started.elapsed().as_secs()
    );
    for (name, rc) in &results {
        let verdict = if rc == "0" { "ok" } else { "FAILED" };
        println!("   {name}: {verdict} (status {rc})");
    }
    if timed_out.load(Ordering::Relaxed) {
        bail!(
            "the guest did not finish within {} s (qemu killed)",
            timeout.as_secs()
        );
    }
    match status {
        Some(0) => Ok(()),
        Some(rc) => bail!(
            "end-to-end tests failed in the {} guest (status {rc})",
            kernel.release
        ),
        None => bail!(
            "the {} guest stopped ({exit}) without printing {EXIT_MARKER}",
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
        assert!(
            version_key("linux-image-6.1.0-56-amd64") > version_key("linux-image-6.1.0-9-amd64")
        );
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
