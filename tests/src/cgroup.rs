//! Child cgroups under the cgroup v2 mount, with a guard that kills and removes them.

use std::fs;
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::util::unique_name;

/// How long `Drop` waits for killed processes to leave the cgroup.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The cgroup v2 mount point of this process's mount namespace, read from
/// `/proc/self/mountinfo` (first `cgroup2` mount whose root is `/`, else the first
/// `cgroup2` mount). `/sys/fs/cgroup` on most hosts, `/sys/fs/cgroup/unified` on hybrid
/// layouts; never assumed. Panics when there is none.
pub fn cgroup2_mount() -> &'static Path {
    static MOUNT: OnceLock<PathBuf> = OnceLock::new();
    MOUNT.get_or_init(|| {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_else(|e| panic!("cannot read /proc/self/mountinfo: {e}"));
        find_cgroup2(&info).unwrap_or_else(|| {
            panic!("no cgroup2 filesystem in /proc/self/mountinfo; freebind needs cgroup v2")
        })
    })
}

/// Finds the cgroup2 mount point in mountinfo text (see proc(5): fields, then `-`, then
/// the filesystem type).
fn find_cgroup2(mountinfo: &str) -> Option<PathBuf> {
    let mut fallback = None;
    for line in mountinfo.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        if *root == "/" {
            return Some(mount_point);
        }
        fallback.get_or_insert(mount_point);
    }
    fallback
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = oct
                    .iter()
                    .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A child cgroup of the cgroup v2 root, named `unique_name(prefix)`.
///
/// Dropping it kills every process still inside (`cgroup.kill`, or SIGKILL to each pid
/// where the kernel has no `cgroup.kill`), waits up to 5 s for them to leave, removes any
/// child cgroups, then the directory itself. `Drop` never panics; it prints what failed.
#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    relative: String,
}

impl Cgroup {
    /// Creates the cgroup directory.
    pub fn new(prefix: &str) -> Cgroup {
        let relative = unique_name(prefix);
        let path = cgroup2_mount().join(&relative);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Cgroup { path, relative }
    }

    /// A child cgroup `name` (a container's scope below a slice, say), with its own guard.
    pub fn child(&self, name: &str) -> Cgroup {
        let path = self.path.join(name);
        fs::create_dir(&path)
            .unwrap_or_else(|e| panic!("cannot create cgroup {}: {e}", path.display()));
        Cgroup {
            path,
            relative: format!("{}/{name}", self.relative),
        }
    }

    /// Absolute path of the cgroup directory (in the test's mount namespace).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path relative to the cgroup2 mount, without a leading `/` (e.g.
    /// `freebind-test-1234-3-9f1c`): what `freebind-agent run --cgroup` takes.
    pub fn relative(&self) -> &str {
        &self.relative
    }

    /// The pids listed in `cgroup.procs`.
    pub fn procs(&self) -> Vec<u32> {
        read_procs(&self.path)
            .unwrap_or_else(|e| panic!("cannot read {}/cgroup.procs: {e}", self.path.display()))
    }

    /// Moves process `pid` into this cgroup.
    pub fn add_pid(&self, pid: u32) {
        let procs = self.path.join("cgroup.procs");
        fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("cannot move pid {pid} into {}: {e}", procs.display()));
    }

    /// Makes `cmd` join this cgroup between `fork()` and `exec()`, so the program runs in
    /// it from its first instruction (its sockets are the cgroup's from the start).
    pub fn join_on_exec(&self, cmd: &mut Command) {
        let procs = self.path.join("cgroup.procs");
        // Opened before fork (close-on-exec): the child only calls write(2), which is
        // async-signal-safe. Writing "0" to cgroup.procs moves the writing process.
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&procs)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", procs.display()));
        // SAFETY: the closure only calls write(2) and reads errno.
        unsafe {
            cmd.pre_exec(move || {
                if libc::write(file.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

fn read_procs(dir: &Path) -> std::io::Result<Vec<u32>> {
    Ok(fs::read_to_string(dir.join("cgroup.procs"))?
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

/// Kills everything in `dir` (and below), waits for it to drain, removes the tree.
/// Returns a description of the first failure.
fn kill_and_remove(dir: &Path) -> Result<(), String> {
    let kill_file = dir.join("cgroup.kill");
    let has_kill = kill_file.exists();
    if has_kill {
        // cgroup.kill (Linux 5.14) kills the whole subtree, forks included.
        fs::OpenOptions::new()
            .write(true)
            .open(&kill_file)
            .and_then(|mut f| f.write_all(b"1"))
            .map_err(|e| format!("write 1 to {}: {e}", kill_file.display()))?;
    }
    let start = Instant::now();
    loop {
        let pids =
            read_procs(dir).map_err(|e| format!("read {}/cgroup.procs: {e}", dir.display()))?;
        if pids.is_empty() {
            break;
        }
        if !has_kill {
            for pid in &pids {
                // By pid only; a process that is already gone gives ESRCH, which is fine.
                // SAFETY: plain syscall.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
        }
        if start.elapsed() > DRAIN_TIMEOUT {
            return Err(format!(
                "processes {pids:?} still in {} after {DRAIN_TIMEOUT:?}",
                dir.display()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
    // Child cgroups first: rmdir of a cgroup with children fails with EBUSY.
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                kill_and_remove(&entry.path())?;
            }
        }
    }
    // The kernel can report EBUSY for a moment after the last task left.
    let mut last = None;
    for _ in 0..50 {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => last = Some(e),
            Err(e) => return Err(format!("rmdir {}: {e}", dir.display())),
        }
        thread::sleep(Duration::from_millis(50));
    }
    Err(format!(
        "rmdir {}: {}",
        dir.display(),
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        if let Err(e) = kill_and_remove(&self.path) {
            eprintln!("freebind-e2e: cannot remove cgroup: {e}");
        }
    }
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn finds_hybrid_and_unified_mounts() {
        let hybrid = "25 1 0:23 / /sys rw - sysfs sysfs rw\n\
            31 25 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro,mode=755\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:9 - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        let bound = "50 1 0:30 /sub /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n\
            51 1 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(bound), Some(PathBuf::from("/sys/fs/cgroup")));
        let only_bound = "50 1 0:30 /sub /mnt/cg\\040x rw - cgroup2 cgroup2 rw\n";
        assert_eq!(find_cgroup2(only_bound), Some(PathBuf::from("/mnt/cg x")));
        assert_eq!(find_cgroup2("25 1 0:23 / /sys rw - sysfs sysfs rw\n"), None);
    }
}
