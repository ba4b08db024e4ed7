//! Pinned attachments: one policy's cgroup programs pinned on bpffs, attached to any number
//! of cgroups through pinned links, so that enforcement outlives the agent.
//!
//! Layout below `StateDirs::attachment(KEY)`: one pin per cgroup program (what systemd's
//! `BPFProgram=` names), `ALLOW_V4`/`ALLOW_V6` (the policy), and `links/CGROUP_ID/PROGRAM`.
use std::{
    fs::File,
    os::fd::{AsFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context as _, Result};
use aya::{
    maps::{LpmTrie, MapData, MapInfo},
    programs::ProgramInfo,
};
use freebind_common::{maps, programs};

use crate::{
    kernel,
    loader::{self, AllowMaps, Attachment, MapPins},
    paths::StateDirs,
    pin,
    policy::Policy,
};

/// How long a detach waits for the kernel to release unpinned links.
const LINK_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// One pinned cgroup program.
pub struct PinnedProgram {
    pub name: &'static str,
    pub attach_type: u32,
    pub id: u32,
    pub path: PathBuf,
    fd: OwnedFd,
}

/// A policy's programs, pinned under their attachment key.
pub struct PinnedAttachment {
    key: String,
    pub programs: Vec<PinnedProgram>,
    allow: AllowMaps,
}

/// How a cgroup stands with respect to an attachment's programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presence {
    /// Every program is attached there (once).
    All,
    /// Some are: a half-done attach, or some other tool detached a few.
    Some,
    None,
}

impl PinnedAttachment {
    /// Loads the programs with `policy` and pins them under `key`, atomically.
    pub fn create(dirs: &StateDirs, key: &str, policy: &Policy) -> Result<Self> {
        let shared = dirs.shared_maps();
        if !shared.exists() {
            crate::agent::pin_shared_maps(dirs)?;
        }
        let target = dirs.attachment(key);
        pin::create_dir_atomically(&target, |tmp| {
            let (mut attachment, _maps) = Attachment::load(
                policy,
                MapPins::Pinned {
                    shared: &shared,
                    policy: Some(tmp),
                },
            )?;
            for name in programs::CGROUP_ATTACH_ORDER {
                attachment
                    .pin_program(name, &tmp.join(name))
                    .with_context(|| format!("pinning {name}"))?;
            }
            Ok(())
        })
        .with_context(|| format!("pinning attachment {}", target.display()))?;
        Self::open(dirs, key)
    }

    /// Opens what is pinned under `key`, checking that it is freebind's: each program has
    /// its expected name and uses this installation's shared socket-state map.
    pub fn open(dirs: &StateDirs, key: &str) -> Result<Self> {
        let dir = dirs.attachment(key);
        let sock_state = dirs.shared_maps().join(maps::SOCK_STATE);
        let sock_state_id = MapInfo::from_pin(&sock_state)
            .with_context(|| format!("opening pinned map {}", sock_state.display()))?
            .id();
        let mut programs = Vec::new();
        for name in programs::CGROUP_ATTACH_ORDER {
            let path = dir.join(name);
            let info = ProgramInfo::from_pin(&path)
                .with_context(|| format!("opening pinned program {}", path.display()))?;
            let uses_ours = info
                .map_ids()
                .ok()
                .flatten()
                .is_some_and(|ids| ids.contains(&sock_state_id));
            if info.name_as_str() != Some(name) || !uses_ours {
                bail!(
                    "{} is not freebind's {name} of this installation (name {:?}, maps not {}): \
                     remove {}",
                    path.display(),
                    info.name_as_str().unwrap_or("?"),
                    sock_state.display(),
                    dir.display()
                );
            }
            programs.push(PinnedProgram {
                name,
                attach_type: loader::attach_type(name)
                    .ok_or_else(|| anyhow!("{name} has no cgroup attach type"))?,
                id: info.id(),
                fd: kernel::obj_get(&path)?,
                path,
            });
        }
        let allow = AllowMaps {
            v4: open_trie(&dir.join(maps::ALLOW_V4))?,
            v6: open_trie(&dir.join(maps::ALLOW_V6))?,
        };
        Ok(Self {
            key: key.to_owned(),
            programs,
            allow,
        })
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// Replaces the policy in place: the programs stay attached throughout.
    pub fn set_policy(&mut self, policy: &Policy) -> Result<()> {
        self.allow.set(policy)
    }

    /// Which of this attachment's programs the kernel shows attached to `cgroup`, by
    /// anyone (a link of ours, systemd's `BPFProgram=`, the start hook).
    pub fn presence(&self, cgroup: &File) -> Result<Presence> {
        let mut present = 0;
        for p in &self.programs {
            if kernel::attached_programs(cgroup.as_fd(), p.attach_type)
                .context("querying the cgroup's programs (BPF_PROG_QUERY)")?
                .contains(&p.id)
            {
                present += 1;
            }
        }
        Ok(match present {
            0 => Presence::None,
            n if n == self.programs.len() => Presence::All,
            _ => Presence::Some,
        })
    }

    /// Attaches every program that is not attached to `cgroup` yet through links pinned in
    /// `links/CGROUP_ID`, in [`programs::CGROUP_ATTACH_ORDER`]. Returns whether anything
    /// was attached: an attach is idempotent, never doubles a program.
    pub fn attach(&self, dirs: &StateDirs, cgroup: &Path) -> Result<bool> {
        let cg = open_cgroup(cgroup)?;
        let id = cg
            .metadata()
            .with_context(|| format!("cgroup {}", cgroup.display()))?
            .ino();
        let missing: Vec<&PinnedProgram> =
            self.programs
                .iter()
                .map(|p| {
                    let on = kernel::attached_programs(cg.as_fd(), p.attach_type).with_context(
                        || format!("querying the programs of cgroup {}", cgroup.display()),
                    )?;
                    Ok((!on.contains(&p.id)).then_some(p))
                })
                .filter_map(Result::transpose)
                .collect::<Result<_>>()?;
        if missing.is_empty() {
            return Ok(false);
        }
        let links = dirs.links(&self.key).join(id.to_string());
        let link_missing = |tmp: &Path| {
            for p in &missing {
                let pin = tmp.join(p.name);
                // A pin left by a link some other tool detached.
                let _ = std::fs::remove_file(&pin);
                let link = kernel::link_create(p.fd.as_fd(), cg.as_fd(), p.attach_type)
                    .map_err(|e| link_error(e, p.name, cgroup))?;
                kernel::obj_pin(link.as_fd(), &pin)?;
            }
            Ok(())
        };
        if links.is_dir() {
            // Some of ours are still linked there: keep them, add the rest.
            link_missing(&links)?;
        } else {
            pin::create_dir_atomically(&links, link_missing)?;
        }
        Ok(true)
    }

    /// Attaches what is missing on `cgroup` with BPF_PROG_ATTACH, as systemd's
    /// `BPFProgram=` does: no descriptor or pin holds it, the cgroup does, and the kernel
    /// refuses the same program twice (EEXIST, taken as "there"). Returns how many it
    /// attached.
    pub fn attach_legacy(&self, cgroup: &Path) -> Result<usize> {
        let cg = open_cgroup(cgroup)?;
        let mut attached = 0;
        for p in &self.programs {
            let on = kernel::attached_programs(cg.as_fd(), p.attach_type)
                .with_context(|| format!("querying the programs of cgroup {}", cgroup.display()))?;
            if on.contains(&p.id) {
                continue;
            }
            match kernel::prog_attach(cg.as_fd(), p.fd.as_fd(), p.attach_type) {
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(link_error(e, p.name, cgroup)),
                Ok(()) => attached += 1,
            }
        }
        Ok(attached)
    }

    /// Takes every program of this attachment off `cgroup`: its pinned links, and what
    /// systemd or the start hook attached with BPF_PROG_ATTACH.
    pub fn detach(&self, dirs: &StateDirs, cgroup: &Path) -> Result<()> {
        let cg = open_cgroup(cgroup)?;
        let id = cg.metadata()?.ino();
        pin::remove_tree(&dirs.links(&self.key).join(id.to_string()));
        self.detach_legacy(&cg)
            .with_context(|| format!("detaching from cgroup {}", cgroup.display()))?;
        // The kernel releases an unpinned link from a workqueue (bpf_link_put): wait, so
        // that the programs are off when detach returns.
        let deadline = Instant::now() + LINK_RELEASE_WAIT;
        while self.presence(&cg)? != Presence::None {
            if Instant::now() > deadline {
                bail!(
                    "cgroup {} still shows freebind's programs {LINK_RELEASE_WAIT:?} after detaching",
                    cgroup.display()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// BPF_PROG_DETACH of each program BPF_PROG_QUERY shows on `cg`. ENOENT means it was
    /// attached by a link, one being released.
    pub fn detach_legacy(&self, cg: &File) -> Result<()> {
        for p in &self.programs {
            let on = kernel::attached_programs(cg.as_fd(), p.attach_type)?;
            if on.contains(&p.id) {
                match kernel::prog_detach(cg.as_fd(), p.fd.as_fd(), p.attach_type) {
                    Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
                    r => r.with_context(|| format!("detaching {}", p.name))?,
                }
            }
        }
        Ok(())
    }

    /// The cgroup ids this attachment holds links for.
    /// Drops the links of cgroups that are gone (the kernel has released them: their links
    /// point nowhere).
    pub fn forget_removed_cgroups(&self, dirs: &StateDirs) {
        for (name, path) in pin::list_dir(&dirs.links(&self.key)) {
            // Only what the kernel says is released counts: an error reading a pin
            // (EMFILE, ENOMEM) must not unpin live links.
            let defunct = pin::list_dir(&path).iter().all(|(_, link)| {
                matches!(
                    kernel::obj_get(link).and_then(|fd| Ok(kernel::link_target(fd.as_fd())?)),
                    Ok(t) if t.cgroup_id == 0
                )
            });
            if defunct {
                log::debug!("removing the links of removed cgroup {name}");
                pin::remove_tree(&path);
            }
        }
    }

    /// Unpins everything: links first (which detaches them), then programs and policy.
    pub fn remove(self, dirs: &StateDirs) {
        pin::remove_tree(&dirs.links(&self.key));
        pin::remove_tree(&dirs.attachment(&self.key));
    }
}

/// The unit start hook: attaches what is missing of attachment `key` to `cgroup` (see
/// [`PinnedAttachment::attach_legacy`]); this runs as a unit's `ExecStartPre=`, in the
/// unit's fresh cgroup, and exits, so no link could stay.
pub fn start_hook(dirs: &StateDirs, key: &str, cgroup: &Path) -> Result<usize> {
    PinnedAttachment::open(dirs, key)?.attach_legacy(cgroup)
}

fn open_trie<K: aya::Pod>(path: &Path) -> Result<LpmTrie<MapData, K, u8>> {
    let data = MapData::from_pin(path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    LpmTrie::try_from(aya::maps::Map::LpmTrie(data))
        .with_context(|| format!("{} is not a policy trie", path.display()))
}

fn open_cgroup(cgroup: &Path) -> Result<File> {
    File::open(cgroup).with_context(|| format!("opening cgroup {}", cgroup.display()))
}

fn link_error(e: std::io::Error, name: &str, cgroup: &Path) -> anyhow::Error {
    let why = match e.raw_os_error() {
        Some(libc::EINVAL) => {
            " (BPF links to cgroups need Linux 5.7, the getsockname hooks Linux 5.8)"
        }
        Some(libc::E2BIG) => " (the kernel allows 64 programs per cgroup and hook)",
        _ => "",
    };
    anyhow!("attaching {name} to cgroup {}: {e}{why}", cgroup.display())
}

/// Every attachment key pinned in this installation.
pub fn pinned_keys(dirs: &StateDirs) -> Vec<String> {
    pin::list_dir(&dirs.attachments())
        .into_iter()
        .filter(|(_, p)| p.is_dir())
        .map(|(name, _)| crate::paths::key_of_bpffs_name(&name))
        .collect()
}
