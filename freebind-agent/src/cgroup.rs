//! Finding the cgroup v2 hierarchy, naming cgroups in it, and transient cgroups for `exec`.
use std::{
    ffi::CString,
    fs,
    io::{self, Write as _},
    os::unix::{ffi::OsStrExt as _, fs::MetadataExt as _},
    path::{Component, Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};

const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// Where this agent found (or mounted) the cgroup v2 hierarchy.
#[derive(Debug, Clone)]
pub struct Cgroup2 {
    mount: PathBuf,
}

impl Cgroup2 {
    /// Finds the cgroup2 mount in `/proc/self/mountinfo` (`/sys/fs/cgroup` on unified hosts,
    /// `/sys/fs/cgroup/unified` on hybrid ones). When none is visible — `ip netns exec`
    /// remounts `/sys` and hides it — mounts a private one in a mount namespace of the
    /// agent's own, so the host sees nothing.
    ///
    /// Must run before any thread is started: `unshare(CLONE_NEWNS)` fails with EINVAL in
    /// a process whose threads share its filesystem information.
    pub fn locate_or_mount() -> Result<Self> {
        let mountinfo =
            fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
        if let Some(mount) = find_cgroup2_mount(&mountinfo) {
            return Ok(Self { mount });
        }
        log::debug!("no cgroup2 mount visible; mounting a private one");
        mount_private_cgroup2()
    }

    pub fn mount(&self) -> &Path {
        &self.mount
    }

    /// Resolves an operator's cgroup path, absolute or relative to the cgroup2 mount; it
    /// must be an existing cgroup v2 directory.
    pub fn resolve(&self, path: &Path) -> Result<PathBuf> {
        if path.components().any(|c| c == Component::ParentDir) {
            bail!("cgroup path {} must not contain '..'", path.display());
        }
        let full = if path.is_absolute() {
            path.to_path_buf()
        } else {
            self.mount.join(path)
        };
        check_cgroup2_dir(&full)?;
        Ok(full)
    }

    /// The cgroup v2 directory this process belongs to (`0::/…` in `/proc/self/cgroup`).
    pub fn own_cgroup(&self) -> Result<PathBuf> {
        let text = fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let rel = text
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .ok_or_else(|| anyhow!("/proc/self/cgroup has no cgroup v2 entry"))?;
        Ok(self.mount.join(rel.trim_start_matches('/')))
    }
}

/// The id the kernel gives a cgroup v2 directory (its inode number); the bind events carry
/// the id of the process's cgroup.
pub fn cgroup_id(dir: &Path) -> Result<u64> {
    Ok(fs::metadata(dir)
        .with_context(|| format!("cgroup {}", dir.display()))?
        .ino())
}

/// The first cgroup2 mount showing the whole hierarchy (mount root `/`); a bind mount of
/// a subtree would make every path built on it wrong.
fn find_cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        if post.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = pre.split_whitespace().skip(3);
        let (root, mount) = (fields.next()?, fields.next()?);
        (root == "/").then(|| PathBuf::from(unescape_mountinfo(mount)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
pub(crate) fn unescape_mountinfo(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn mount_private_cgroup2() -> Result<Cgroup2> {
    // SAFETY: plain syscalls on static C strings.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0 {
            return Err(io::Error::last_os_error())
                .context("no cgroup v2 mount is visible, and unshare(CLONE_NEWNS) to mount a private one failed");
        }
        // Keep the mount below out of the namespace we came from.
        if libc::mount(
            c"none".as_ptr(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error())
                .context("making the private mount namespace private");
        }
    }
    let target = PathBuf::from("/sys/fs/cgroup");
    fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
    let c_target = CString::new(target.as_os_str().as_bytes())?;
    // SAFETY: valid C strings.
    let rc = unsafe {
        libc::mount(
            c"cgroup2".as_ptr(),
            c_target.as_ptr(),
            c"cgroup2".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENODEV) {
            bail!(
                "this kernel has no cgroup v2 (mounting cgroup2 failed: filesystem type unknown)"
            );
        }
        return Err(err).with_context(|| format!("mounting cgroup2 on {}", target.display()));
    }
    Ok(Cgroup2 { mount: target })
}

fn check_cgroup2_dir(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => anyhow!("cgroup {}: no such directory", path.display()),
        _ => anyhow!("cgroup {}: {e}", path.display()),
    })?;
    if !meta.is_dir() {
        bail!(
            "{} is not a cgroup v2 directory (not a directory)",
            path.display()
        );
    }
    let c_path = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs fills the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    let fs_type = st.f_type;
    if fs_type != CGROUP2_SUPER_MAGIC {
        let what = match fs_type {
            0x0027_e0eb => "a cgroup v1 hierarchy",
            0x0102_1994 => "tmpfs",
            0x6265_6572 => "sysfs",
            _ => "not cgroup2",
        };
        bail!(
            "{} is not a cgroup v2 directory (filesystem: {what})",
            path.display()
        );
    }
    Ok(())
}

/// A cgroup made for one `exec`; removed on drop once its processes are gone.
#[derive(Debug)]
pub struct TransientCgroup {
    path: PathBuf,
}

impl TransientCgroup {
    /// Creates `freebind-exec-<pid>` below the agent's own cgroup, or below the root of
    /// the hierarchy when the agent's own cannot take children.
    pub fn create(cg: &Cgroup2) -> Result<Self> {
        let name = format!("freebind-exec-{}", std::process::id());
        let mut tried = Vec::new();
        for parent in [cg.own_cgroup().ok(), Some(cg.mount().to_path_buf())]
            .into_iter()
            .flatten()
        {
            let path = parent.join(&name);
            match fs::create_dir(&path) {
                Ok(()) => return Ok(Self { path }),
                Err(e) => tried.push(format!("{}: {e}", path.display())),
            }
        }
        bail!("cannot create a transient cgroup ({})", tried.join("; "))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pids still in the cgroup.
    pub fn procs(&self) -> Vec<i32> {
        fs::read_to_string(self.path.join("cgroup.procs"))
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    /// Ends what CMD left behind (daemons it forked) so that the cgroup can go.
    pub fn kill_all(&self) {
        let kill_file = self.path.join("cgroup.kill");
        if fs::OpenOptions::new()
            .write(true)
            .open(&kill_file)
            .and_then(|mut f| f.write_all(b"1"))
            .is_err()
        {
            // cgroup.kill needs Linux 5.14; signal each pid instead.
            for pid in self.procs() {
                // SAFETY: plain kill(2) on pids listed in our own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

impl Drop for TransientCgroup {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match fs::remove_dir(&self.path) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    log::error!(
                        "cannot remove transient cgroup {}: {e}",
                        self.path.display()
                    );
                    return;
                }
                Err(_) => {
                    if !self.procs().is_empty() {
                        self.kill_all();
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_on_a_hybrid_host() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
    }

    #[test]
    fn skips_bind_mounts_of_a_subtree() {
        let mi = "50 40 0:38 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw\n\
                  41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            find_cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
    }

    #[test]
    fn finds_nothing_when_sys_was_remounted() {
        let mi = "500 400 0:60 / /sys rw,relatime - sysfs sysfs rw\n";
        assert_eq!(find_cgroup2_mount(mi), None);
    }

    #[test]
    fn unescapes_mount_points() {
        assert_eq!(unescape_mountinfo(r"/mnt/my\040cgroups"), "/mnt/my cgroups");
    }

    #[test]
    fn refuses_parent_components() {
        let cg = Cgroup2 {
            mount: PathBuf::from("/sys/fs/cgroup"),
        };
        let err = cg.resolve(Path::new("../etc")).unwrap_err().to_string();
        assert!(err.contains(".."), "{err}");
    }
}
