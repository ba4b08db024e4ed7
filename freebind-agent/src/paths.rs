//! Every place freebind keeps state, named once.
//!
//! Pins live on bpffs and records on /run: both are gone after a reboot, together, so a
//! record never outlives the pins it describes (the daemon re-creates both from its config).
use std::path::{Path, PathBuf};

/// Where pinned programs, maps and links live (`--pin-dir`).
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/freebind";
/// Where the lock, the control socket and the attachment records live (`--run-dir`).
pub const DEFAULT_RUN_DIR: &str = "/run/freebind";
/// bpffs is mounted here when the pin directory is not on one.
pub const BPFFS_MOUNT: &str = "/sys/fs/bpf";

/// The two state directories of one freebind installation (tests use their own pair).
#[derive(Debug, Clone)]
pub struct StateDirs {
    pub pin: PathBuf,
    pub run: PathBuf,
}

impl StateDirs {
    pub fn new(pin: &Path, run: &Path) -> Self {
        Self {
            pin: pin.to_path_buf(),
            run: run.to_path_buf(),
        }
    }

    /// Maps every attachment shares: locality, served namespaces, parking, steering,
    /// events, per-socket state.
    pub fn shared_maps(&self) -> PathBuf {
        self.pin.join("maps")
    }

    /// Attachments, one directory each: pinned programs, policy maps, `links/`.
    pub fn attachments(&self) -> PathBuf {
        self.pin.join("attach")
    }

    pub fn attachment(&self, key: &str) -> PathBuf {
        self.attachments().join(bpffs_name(key))
    }

    /// Pinned links of an attachment, one directory per cgroup (by cgroup id).
    pub fn links(&self, key: &str) -> PathBuf {
        self.attachment(key).join("links")
    }

    /// Per network namespace (by inode): the sk_lookup link and its steering map.
    pub fn netns_dir(&self) -> PathBuf {
        self.pin.join("netns")
    }

    /// Held (flock) by whoever changes pinned state: the daemon for its lifetime, a CLI
    /// command for one change.
    pub fn lock_file(&self) -> PathBuf {
        self.run.join("lock")
    }

    /// The running daemon's control socket: `attach`/`detach` are sent there.
    pub fn control_socket(&self) -> PathBuf {
        self.run.join("control.sock")
    }

    /// One record per attachment: what the operator asked for, to adopt after a restart.
    pub fn records(&self) -> PathBuf {
        self.run.join("attach")
    }

    /// `RUN/foreground/PID`: what a foreground agent (`run`, `exec`) attached, for `status`
    /// and the metrics; removed when it exits.
    pub fn foreground(&self) -> PathBuf {
        self.run.join("foreground")
    }
}

/// bpffs refuses names with a dot (reserved for the kernel's own files, see bpf_lookup()
/// in kernel/bpf/inode.c): an attachment key's dots are written `%2E` there. Keys escape
/// a literal `%` as `%25`, so this stays reversible.
pub fn bpffs_name(key: &str) -> String {
    key.replace('.', "%2E")
}

/// The key a [`bpffs_name`] was made from.
pub fn key_of_bpffs_name(name: &str) -> String {
    name.replace("%2E", ".")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bpffs_names_have_no_dots_and_map_back() {
        for key in [
            "unit:nginx.service",
            "cgroup:system.slice:docker-%25x.scope",
        ] {
            let name = bpffs_name(key);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(key_of_bpffs_name(&name), key);
        }
    }
}
