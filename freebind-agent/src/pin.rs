//! Pinned state: the bpffs directories that keep freebind's programs attached when no agent
//! runs, guarded by a lock, created atomically, and checked before they are trusted.
//!
//! As tubular does it: everything is built in a temporary directory and renamed into
//! place, so a crash leaves either the old state or the new one, never half of either; the
//! lock keeps two agents from changing it at once; and what is found pinned is checked to
//! be freebind's (map shapes, program names, link targets) before anything is changed.
use std::{
    ffi::CString,
    fs::{self, File, OpenOptions},
    io::{self, Read as _, Write as _},
    os::{
        fd::AsRawFd as _,
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _},
    },
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::maps::MapInfo;
use freebind_common::{maps, LocalAddrKey, SlotKey, SockState, EVENTS_BYTES};

use crate::paths::{StateDirs, BPFFS_MOUNT};

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The mode of the records the agent writes: they name cgroups and policies, which the
/// 0600 config keeps to root as well.
pub const PRIVATE: u32 = 0o600;

/// Maps that every attachment of one installation shares, pinned in
/// [`StateDirs::shared_maps`]: a socket is judged the same whichever attachment sees it,
/// parking slots are allocated once per namespace, and one reader drains the events.
pub const SHARED_MAPS: [&str; 9] = [
    maps::LOCAL_ADDRS,
    maps::EVENTS,
    maps::EVENTS_DROPPED,
    maps::SOCK_STATE,
    maps::SERVED_NETNS,
    maps::PARKING,
    maps::PARK_OWNERS,
    maps::STEER_MAPS,
    // aya-log's ring buffer: one reader for the debug lines of every attachment.
    "AYA_LOGS",
];

/// (map, key size, value size) this build expects of a pinned shared map: a map pinned by
/// a build with other layouts must not be reused.
fn expected_shape(name: &str) -> Option<(u32, u32)> {
    use std::mem::size_of;
    let s = |n: usize| n as u32;
    Some(match name {
        maps::LOCAL_ADDRS => (s(size_of::<LocalAddrKey>()), 1),
        maps::EVENTS => (0, 0),
        maps::EVENTS_DROPPED => (4, 8),
        maps::SOCK_STATE => (4, s(size_of::<SockState>())),
        maps::SERVED_NETNS => (8, 1),
        maps::PARKING => (s(size_of::<LocalAddrKey>()), 4),
        maps::PARK_OWNERS => (s(size_of::<SlotKey>()), s(size_of::<LocalAddrKey>())),
        maps::STEER_MAPS => (8, 4),
        _ => return None,
    })
}

/// Checks that the shared maps pinned in `dir` have the shapes this build uses.
pub fn check_shared_maps(dir: &Path) -> Result<()> {
    for name in SHARED_MAPS {
        let Some((key, value)) = expected_shape(name) else {
            continue;
        };
        let path = dir.join(name);
        let info = MapInfo::from_pin(&path)
            .with_context(|| format!("opening pinned map {}", path.display()))?;
        let size_ok = name != maps::EVENTS || info.max_entries() == EVENTS_BYTES;
        if info.key_size() != key || info.value_size() != value || !size_ok {
            bail!(
                "pinned map {} was made by another freebind build (key {} / value {} bytes, \
                 this build uses {key} / {value}): run `freebind-agent detach --all` with the \
                 build that made it, or remove {}",
                path.display(),
                info.key_size(),
                info.value_size(),
                dir.parent().unwrap_or(dir).display()
            );
        }
    }
    Ok(())
}

/// Makes sure `pin_dir` can hold pins: on bpffs, mounting bpffs on /sys/fs/bpf when the
/// directory would be below it and nothing is mounted there (Debian without systemd, a
/// fresh container).
pub fn ensure_bpffs(pin_dir: &Path) -> Result<()> {
    let mut probe = pin_dir;
    while !probe.exists() {
        probe = probe
            .parent()
            .ok_or_else(|| anyhow!("pin directory {} has no existing parent", pin_dir.display()))?;
    }
    if fs_magic(probe)? != BPF_FS_MAGIC {
        let mount = Path::new(BPFFS_MOUNT);
        if !pin_dir.starts_with(mount) || !mount.is_dir() || fs_magic(mount)? == BPF_FS_MAGIC {
            bail!(
                "pin directory {} is not on a bpf filesystem (mount one: mount -t bpf bpf {})",
                pin_dir.display(),
                probe.display()
            );
        }
        // A mount made in a mount namespace of our own (a container, a unit with
        // ProtectSystem=) would vanish with it, and the pins with it.
        let own = fs::read_link("/proc/self/ns/mnt").ok();
        if own.is_none() || own != fs::read_link("/proc/1/ns/mnt").ok() {
            bail!(
                "no bpf filesystem on {BPFFS_MOUNT}, and this agent runs in a mount namespace of \
                 its own (or cannot read PID 1's), where a mount would vanish with it: mount \
                 bpffs on the host (mount -t bpf bpf {BPFFS_MOUNT})"
            );
        }
        log::info!("mounting bpffs on {BPFFS_MOUNT} (nothing was mounted there)");
        let target = CString::new(mount.as_os_str().as_bytes())?;
        // SAFETY: valid C strings.
        if unsafe {
            libc::mount(
                c"bpf".as_ptr(),
                target.as_ptr(),
                c"bpf".as_ptr(),
                0,
                c"mode=0700".as_ptr().cast(),
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENODEV) {
                bail!("this kernel has no bpf filesystem (CONFIG_BPF_SYSCALL): cannot pin");
            }
            return Err(e).context(format!("mounting bpffs on {BPFFS_MOUNT}"));
        }
    }
    create_trusted_dir(pin_dir)
}

fn fs_magic(path: &Path) -> Result<i64> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: statfs fills the zeroed struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type)
}

/// Builds directory `target` atomically: `fill` populates a temporary sibling, which is then
/// renamed into place. On failure the temporary directory is removed; pins in it go, and
/// links pinned there detach with them.
pub fn create_dir_atomically(target: &Path, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = target
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", target.display()))?;
    create_trusted_dir(parent)?;
    let name = target
        .file_name()
        .ok_or_else(|| anyhow!("{} has no name", target.display()))?;
    // No dot: bpffs refuses dotted names (see paths::bpffs_name); no key starts with `_`.
    let tmp = parent.join(format!(
        "{LEFTOVER_PREFIX}{}-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    remove_tree(&tmp);
    fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let result = fill(&tmp).and_then(|()| {
        fs::rename(&tmp, target)
            .with_context(|| format!("renaming {} to {}", tmp.display(), target.display()))
    });
    if result.is_err() {
        remove_tree(&tmp);
    }
    result
}

const LEFTOVER_PREFIX: &str = "_new-";

/// Removes what a crashed agent left half-built (`_new-*` directories) below `dir`.
pub fn remove_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let path = e.path();
        if e.file_name().to_string_lossy().starts_with(LEFTOVER_PREFIX) {
            log::info!(
                "removing {} (left half-built by an earlier agent)",
                path.display()
            );
            remove_tree(&path);
        } else if path.is_dir() {
            remove_leftovers(&path);
        }
    }
}

/// Removes a directory of pins (best effort: what cannot be removed is logged).
pub fn remove_tree(dir: &Path) {
    match fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => log::warn!("removing {}: {e}", dir.display()),
    }
}

/// The state lock: an exclusive `flock` on `RUN/lock`, holding the holder's pid.
pub struct StateLock {
    _file: File,
}

impl StateLock {
    /// Takes the lock, or returns the pid of the process holding it.
    pub fn try_acquire(dirs: &StateDirs) -> Result<std::result::Result<Self, Option<u32>>> {
        create_trusted_dir(&dirs.run)?;
        let path = dirs.lock_file();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("opening lock file {}", path.display()))?;
        // SAFETY: flock on a file we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
                return Err(e).with_context(|| format!("locking {}", path.display()));
            }
            let mut text = String::new();
            let _ = file.read_to_string(&mut text);
            return Ok(Err(text.trim().parse().ok()));
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Ok(Self { _file: file }))
    }

    /// Takes the lock or fails naming the holder.
    pub fn acquire(dirs: &StateDirs) -> Result<Self> {
        match Self::try_acquire(dirs)? {
            Ok(lock) => Ok(lock),
            Err(holder) => bail!(
                "another freebind agent{} holds {}",
                holder.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                dirs.lock_file().display()
            ),
        }
    }
}

/// Writes `contents` to `path` atomically: a synced temporary file (of `mode`) renamed into
/// place, so a reader (systemd reading a drop-in, the next agent reading a record) never
/// sees half a file. The temporary name starts with a dot and does not end like `path`,
/// so systemd ignores it should it read the directory meanwhile.
pub fn write_atomically(path: &Path, contents: &str, mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| anyhow!("{} has no parent", path.display()))?;
    create_trusted_dir(dir)?;
    let tmp = dir.join(format!(
        ".{}.tmp{}",
        path.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let result = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(contents.as_bytes())?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// Creates `dir` (and its parents) as needed, mode 0755 whatever the umask, and refuses
/// it when it is not a directory only root (or this agent's user) can change: whoever
/// else can write it can rename or remove what freebind keeps there (`/sys/fs/bpf` is
/// world-writable on many hosts, so a pin directory below it may have been made by
/// anyone before the agent first ran).
pub fn create_trusted_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, PermissionsExt as _};
    if !dir.is_dir() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
        // The umask may have taken more than group and other write.
        let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
    }
    let meta = fs::symlink_metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    // SAFETY: geteuid cannot fail and touches no memory.
    let euid = unsafe { libc::geteuid() };
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symbolic link: freebind keeps its state only in a real directory",
            dir.display()
        );
    }
    if meta.uid() != 0 && meta.uid() != euid {
        bail!(
            "{}: owned by uid {}, who could rename or remove what freebind keeps there; \
             refused (remove it, or chown root {0})",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 {
        bail!(
            "{}: writable by its group or by others (mode {:04o}), who could rename or remove \
             what freebind keeps there; refused (chmod 755 {0})",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// A directory's entries by name, without temporary ones.
pub fn list_dir(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    !n.starts_with('.') && !n.starts_with(LEFTOVER_PREFIX)
                })
                .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
