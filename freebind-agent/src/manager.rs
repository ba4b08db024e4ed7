//! The pinned attachments of one installation and what each is attached to: cgroups by
//! path or glob, systemd units (through a drop-in), processes by pid. Used by the daemon
//! for its whole life and by `attach`/`detach` when no daemon runs; whoever holds a
//! `Manager` holds the state lock.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Deserialize;

use crate::{
    cgroup::{cgroup_id, Cgroup2},
    config::{AttachSpec, Selector},
    paths::StateDirs,
    pin::{self, StateLock},
    pinned::{self, PinnedAttachment},
    policy::Policy,
    systemd::{self, Systemd},
};

/// Who asked for an attachment: a reload of the config only touches its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Config,
    Cli,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Config => "config",
            Origin::Cli => "cli",
        }
    }
}

/// One attachment: what was asked, its pinned programs, and where they are attached.
pub struct Entry {
    pub selector: Selector,
    pub allow: Vec<String>,
    pub policy: Policy,
    pub origin: Origin,
    /// `attach --pid N`: the process whose network namespace is served.
    pub pid: Option<u32>,
    pinned: PinnedAttachment,
    /// Cgroups (absolute paths) this entry's programs are attached to, by cgroup id.
    pub cgroups: BTreeMap<u64, PathBuf>,
    /// For a unit: the pid of the systemd that manages it (its namespace is the unit's).
    pub manager_pid: Option<u32>,
    /// For a unit: its cgroup's path, the same at every start (systemd recreates it).
    pub unit_cgroup: Option<PathBuf>,
}

/// An attachment's record in `RUN/attach/KEY`, as TOML.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Record {
    pub unit: Option<String>,
    pub cgroup: Option<String>,
    #[serde(default)]
    pub allow: Vec<String>,
    pub origin: String,
    pub pid: Option<u32>,
}

impl Record {
    pub(crate) fn read(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path)?;
        toml::from_str(&text).map_err(|e| anyhow!("{}", e.message()))
    }

    /// The selector it names, checked against the record's file name.
    pub(crate) fn selector(&self, key: &str) -> Result<Selector> {
        let selector = match (&self.unit, &self.cgroup) {
            (Some(u), None) => Selector::Unit(u.clone()),
            (None, Some(g)) => Selector::Cgroup(crate::selector::CgroupGlob::parse(g)?),
            _ => bail!("a record names exactly one of unit or cgroup"),
        };
        if selector.key() != key {
            bail!("its selector {selector} does not match its name");
        }
        Ok(selector)
    }
}

pub struct Manager {
    pub dirs: StateDirs,
    pub cg: Cgroup2,
    systemd_socket: PathBuf,
    systemd: Option<Systemd>,
    entries: BTreeMap<String, Entry>,
    _lock: StateLock,
}

impl Manager {
    /// Takes over the pinned state: bpffs mounted when needed, half-built leftovers of a
    /// crashed agent removed, the shared maps pinned, and every recorded attachment adopted
    /// (checked, not re-attached).
    pub fn open(
        dirs: &StateDirs,
        cg: Cgroup2,
        systemd_socket: &Path,
        lock: StateLock,
    ) -> Result<Self> {
        pin::ensure_bpffs(&dirs.pin)?;
        pin::remove_leftovers(&dirs.pin);
        if dirs.shared_maps().exists() {
            pin::check_shared_maps(&dirs.shared_maps())?;
        }
        let mut m = Self {
            dirs: dirs.clone(),
            cg,
            systemd_socket: systemd_socket.to_path_buf(),
            systemd: None,
            entries: BTreeMap::new(),
            _lock: lock,
        };
        let records = pin::list_dir(&dirs.records());
        for (key, path) in &records {
            if let Err(e) = m.adopt(key, path) {
                // Its pins stay attached: enforcement is never dropped for a record this
                // agent cannot read (another build's, say).
                log::warn!(
                    "cannot adopt {}: {e:#} (its pins are left as they are)",
                    path.display()
                );
            }
        }
        // Pins without a record: an agent died between pinning and recording, or after
        // removing a record to detach.
        for key in pinned::pinned_keys(dirs) {
            if !records.iter().any(|(k, _)| *k == key) {
                log::info!("removing pinned attachment {key}: it has no record");
                if let Ok(p) = PinnedAttachment::open(dirs, &key) {
                    p.remove(dirs);
                } else {
                    pin::remove_tree(&dirs.attachment(&key));
                }
            }
        }
        Ok(m)
    }

    fn adopt(&mut self, key: &str, path: &Path) -> Result<()> {
        let r = Record::read(path)?;
        let selector = r.selector(key)?;
        let policy = Policy::parse(&r.allow)?;
        let origin = if r.origin == "config" {
            Origin::Config
        } else {
            Origin::Cli
        };
        let pinned = match PinnedAttachment::open(&self.dirs, key) {
            Ok(p) => p,
            Err(e) => {
                log::info!("re-pinning attachment {selector}: {e:#}");
                pin::remove_tree(&self.dirs.attachment(key));
                PinnedAttachment::create(&self.dirs, key, &policy)?
            }
        };
        let mut entry = Entry {
            selector,
            allow: r.allow,
            policy,
            origin,
            pid: r.pid.filter(|p| Path::new(&format!("/proc/{p}")).exists()),
            pinned,
            cgroups: BTreeMap::new(),
            manager_pid: None,
            unit_cgroup: None,
        };
        // The cgroups it holds links for, found again by id among the selector's matches
        // at the next rescan; links of removed cgroups are dropped now.
        entry.pinned.forget_removed_cgroups(&self.dirs);
        entry.pinned.set_policy(&entry.policy)?;
        log::info!(
            "adopted pinned attachment {} (policy: {})",
            entry.selector,
            entry.policy
        );
        self.entries.insert(key.to_owned(), entry);
        Ok(())
    }

    pub fn entries(&self) -> impl Iterator<Item = (&String, &Entry)> {
        self.entries.iter()
    }

    /// Config-made attachments, as the config would write them.
    pub fn config_specs(&self) -> Vec<AttachSpec> {
        self.entries
            .values()
            .filter(|e| e.origin == Origin::Config)
            .map(|e| AttachSpec {
                selector: e.selector.clone(),
                policy: e.policy.clone(),
                allow: e.allow.clone(),
                line: 0,
            })
            .collect()
    }

    async fn systemd(&mut self) -> Result<&Systemd> {
        if self.systemd.is_none() {
            self.systemd = Some(Systemd::connect(&self.systemd_socket, self.cg.mount()).await?);
        }
        Ok(self.systemd.as_ref().expect("connected above"))
    }

    /// Attaches `selector` with `allow` (or changes the policy of an existing attachment
    /// in place). Returns a one-line summary for the operator.
    pub async fn attach(
        &mut self,
        selector: Selector,
        allow: Vec<String>,
        origin: Origin,
        pid: Option<u32>,
    ) -> Result<String> {
        let policy = Policy::parse(&allow)?;
        let key = selector.key();
        if let Some(e) = self.entries.get_mut(&key) {
            if e.policy != policy {
                e.pinned.set_policy(&policy)?;
                log::info!(
                    "{}: policy changed from {} to {policy}",
                    e.selector,
                    e.policy
                );
                e.policy = policy;
                e.allow = allow;
            }
            // A config entry that an operator also attached by hand stays the config's.
            if origin == Origin::Config {
                e.origin = origin;
            }
            e.pid = pid.or(e.pid);
            self.write_record(&key)?;
            let summary = self.attach_targets(&key).await?;
            return Ok(summary);
        }
        // Check what can be checked before anything is pinned.
        match &selector {
            Selector::Unit(name) => {
                self.systemd().await?.unit(name).await?;
            }
            Selector::Cgroup(glob) if glob.is_literal() => {
                self.cg.resolve(Path::new(glob.as_str()))?;
            }
            Selector::Cgroup(_) => {}
        }
        let pinned = match PinnedAttachment::open(&self.dirs, &key) {
            Ok(mut p) => {
                p.set_policy(&policy)?;
                p
            }
            Err(_) => {
                pin::remove_tree(&self.dirs.attachment(&key));
                PinnedAttachment::create(&self.dirs, &key, &policy)?
            }
        };
        self.entries.insert(
            key.clone(),
            Entry {
                selector,
                allow,
                policy,
                origin,
                pid,
                pinned,
                cgroups: BTreeMap::new(),
                manager_pid: None,
                unit_cgroup: None,
            },
        );
        let result = async {
            self.write_record(&key)?;
            self.attach_targets(&key).await
        }
        .await;
        if result.is_err() {
            // Leave nothing half-attached behind.
            let _ = self.detach(&key).await;
        }
        result
    }

    fn write_record(&self, key: &str) -> Result<()> {
        let e = &self.entries[key];
        let mut text =
            String::from("# freebind attachment record: `freebind-agent detach` removes it\n");
        match &e.selector {
            Selector::Unit(u) => text += &format!("unit = {}\n", toml_str(u)),
            Selector::Cgroup(g) => text += &format!("cgroup = {}\n", toml_str(g.as_str())),
        }
        let allow: Vec<String> = e.allow.iter().map(|a| toml_str(a)).collect();
        text += &format!("allow = [{}]\n", allow.join(", "));
        text += &format!("origin = \"{}\"\n", e.origin.as_str());
        if let Some(pid) = e.pid {
            text += &format!("pid = {pid}\n");
        }
        pin::write_atomically(&self.dirs.records().join(key), &text, pin::PRIVATE)
    }

    /// Attaches an entry where its selector points now: matching cgroups, a unit's drop-in
    /// and current cgroup.
    async fn attach_targets(&mut self, key: &str) -> Result<String> {
        let selector = self.entries[key].selector.clone();
        match selector {
            Selector::Cgroup(ref glob) => {
                let found = glob.expand(self.cg.mount());
                if glob.is_literal() && found.is_empty() {
                    bail!(
                        "cgroup {}: no such directory",
                        self.cg.mount().join(glob.as_str()).display()
                    );
                }
                let (n, failed) = self.attach_cgroups(key, found);
                if let (true, Some(err)) = (glob.is_literal(), failed) {
                    return Err(err);
                }
                Ok(format!(
                    "attached {selector}: {n} cgroup(s) now{}",
                    if glob.is_literal() {
                        String::new()
                    } else {
                        ", more as they appear".into()
                    }
                ))
            }
            Selector::Unit(name) => self.attach_unit(key, &name).await,
        }
    }

    /// Attaches to `found` (relative to the cgroup2 mount) what is not attached yet; a
    /// cgroup that fails is logged and retried at the next rescan, the others go on.
    /// Returns how many cgroups the entry is attached to, and the last failure.
    fn attach_cgroups(&mut self, key: &str, found: Vec<PathBuf>) -> (usize, Option<anyhow::Error>) {
        let mount = self.cg.mount().to_path_buf();
        let e = self.entries.get_mut(key).expect("entry exists");
        let mut failed = None;
        for rel in found {
            let path = mount.join(&rel);
            let Ok(id) = cgroup_id(&path) else { continue };
            if e.cgroups.contains_key(&id) {
                continue;
            }
            match e.pinned.attach(&self.dirs, &path) {
                Ok(newly) => {
                    if newly {
                        log::info!(
                            "attached {} to cgroup {} (may bind while not local: {})",
                            e.selector,
                            path.display(),
                            e.policy
                        );
                    } else {
                        log::debug!("{} was already attached to {}", e.selector, path.display());
                    }
                    e.cgroups.insert(id, path);
                }
                // The cgroup went away meanwhile.
                Err(_) if !path.exists() => {}
                Err(err) => {
                    log::error!("{}: {err:#}", e.selector);
                    failed = Some(err);
                }
            }
        }
        (e.cgroups.len(), failed)
    }

    async fn attach_unit(&mut self, key: &str, name: &str) -> Result<String> {
        let programs: Vec<(&'static str, PathBuf)> = self.entries[key]
            .pinned
            .programs
            .iter()
            .filter_map(|p| {
                crate::loader::section(p.name)
                    .and_then(systemd::bpfprogram_type)
                    .map(|t| (t, p.path.clone()))
            })
            .collect();
        let hook = self.hook_command(key)?;
        let sd = self.systemd().await?;
        let unit = sd.unit(name).await?;
        let manager_pid = sd.pid() as u32;
        let exe_visible = sd
            .root()
            .join(hook.0.strip_prefix("/").unwrap_or(&hook.0))
            .exists();
        if !exe_visible {
            log::warn!(
                "{} is not visible to the systemd managing {name}: only BPFProgram= attaches at \
                 its starts (systemd 252 skips it on `systemctl restart`)",
                hook.0.display()
            );
        }
        let text = systemd::dropin_text(name, &programs, exe_visible.then_some(hook.1.as_str()))?;
        // Rewriting an identical drop-in would only cost a daemon-reload, which detaches and
        // re-attaches every unit's BPFProgram= for a moment.
        let dropin = sd.dropin_path(name);
        if fs::read_to_string(&dropin).ok().as_deref() != Some(text.as_str()) {
            sd.write_dropin(name, &text)?;
            sd.reload().await?;
            log::info!("wrote {} and reloaded systemd", dropin.display());
        }
        let cgroup = unit.cgroup.clone();
        let e = self.entries.get_mut(key).expect("entry exists");
        e.manager_pid = Some(manager_pid);
        // Attached as systemd and the start hook attach (BPF_PROG_ATTACH, which the kernel
        // refuses twice for one program): systemd may apply the new BPFProgram= to the
        // running cgroup after the reload too, and a link would then double it.
        let attached = match &cgroup {
            Some(path) => match e.pinned.attach_legacy(path) {
                Ok(_) => cgroup_id(path).ok(),
                Err(_) if !path.exists() => None,
                Err(err) => return Err(err),
            },
            None => None,
        };
        e.unit_cgroup = cgroup.clone().or(e.unit_cgroup.take());
        match (attached, cgroup) {
            (Some(id), Some(path)) => {
                e.cgroups.insert(id, path.clone());
                log::info!("attached unit {name} (cgroup {})", path.display());
                Ok(format!(
                    "attached unit {name}: running in {}, and at every start",
                    path.display()
                ))
            }
            _ => Ok(format!(
                "attached unit {name}: not running; attached at its next start"
            )),
        }
    }

    /// Attaches every entry where its selector points now (the daemon's start: adopted
    /// entries learn their unit's systemd and cgroup again). Failures are logged.
    pub async fn attach_all_targets(&mut self) {
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        for key in keys {
            if let Err(e) = self.attach_targets(&key).await {
                log::error!("{}: {e:#}", self.entries[&key].selector);
            }
        }
    }

    /// The `ExecStartPre=` that attaches at each start what systemd 252 leaves out: it
    /// skips `BPFProgram=` on `systemctl restart`, and has no getsockname types at all.
    fn hook_command(&self, key: &str) -> Result<(PathBuf, String)> {
        let exe = std::env::current_exe().context("finding freebind-agent's own path")?;
        // `%` starts a specifier in unit files; keys escape their own `%` as `%25`.
        let cmd = format!(
            "+{} --pin-dir {} hook --key {}",
            exe.display(),
            self.dirs.pin.display(),
            key
        )
        .replace('%', "%%");
        Ok((exe, cmd))
    }

    /// Detaches and unpins one attachment. The record goes first: it is the intent, and a
    /// crash after it leaves pins without a record, which the next start removes. A unit
    /// whose drop-in cannot be removed (its systemd unreachable) keeps everything, so that
    /// its starts keep working.
    pub async fn detach(&mut self, key: &str) -> Result<String> {
        let Some(e) = self.entries.get(key) else {
            bail!("nothing is attached as {}", selector_of_key(key));
        };
        let selector = e.selector.clone();
        let mut unit_cgroup = None;
        if let Selector::Unit(name) = &selector {
            unit_cgroup = self
                .detach_unit(name)
                .await
                .with_context(|| format!("{selector} stays attached"))?;
        }
        let e = self.entries.remove(key).expect("looked up above");
        let record = self.dirs.records().join(key);
        match fs::remove_file(&record) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
                self.entries.insert(key.to_owned(), e);
                return Err(err).with_context(|| format!("removing {}", record.display()));
            }
            _ => {}
        }
        let mut failures = Vec::new();
        for path in unit_cgroup.iter().chain(e.cgroups.values()) {
            if path.exists() {
                if let Err(err) = e.pinned.detach(&self.dirs, path) {
                    failures.push(format!("{err:#}"));
                }
            }
        }
        e.pinned.remove(&self.dirs);
        log::info!("detached {selector}");
        if !failures.is_empty() {
            bail!("detached {selector}, with errors: {}", failures.join("; "));
        }
        Ok(format!("detached {selector}"))
    }

    /// Removes a unit's drop-in and reloads systemd; returns the unit's current cgroup.
    async fn detach_unit(&mut self, name: &str) -> Result<Option<PathBuf>> {
        let sd = self.systemd().await?;
        if sd.remove_dropin(name)? {
            sd.reload().await?;
        }
        Ok(sd.unit(name).await.ok().and_then(|u| u.cgroup))
    }

    /// Detaches everything this installation ever pinned, recorded or not, including what
    /// systemd and the start hook attached by BPF_PROG_ATTACH anywhere in the hierarchy.
    pub async fn detach_all(&mut self) -> Result<String> {
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        let mut failures = Vec::new();
        let n = keys.len();
        for key in keys {
            if let Err(e) = self.detach(&key).await {
                failures.push(format!("{e:#}"));
            }
        }
        for key in pinned::pinned_keys(&self.dirs) {
            match PinnedAttachment::open(&self.dirs, &key) {
                Ok(p) => {
                    walk_cgroups(self.cg.mount(), &mut |_, cg| {
                        if let Err(e) = p.detach_legacy(cg) {
                            failures.push(format!("{e:#}"));
                        }
                    });
                    p.remove(&self.dirs);
                }
                Err(_) => pin::remove_tree(&self.dirs.attachment(&key)),
            }
        }
        pin::remove_tree(&self.dirs.pin);
        pin::remove_tree(&self.dirs.records());
        if !failures.is_empty() {
            bail!("detached everything, with errors: {}", failures.join("; "));
        }
        Ok(format!(
            "detached {n} attachment(s); removed {}",
            self.dirs.pin.display()
        ))
    }

    /// Follows the cgroups the selectors match now: attaches new matches, forgets the
    /// cgroups that are gone, follows a unit into the cgroup of its latest start. Returns
    /// the `--pid` attachments whose cgroup is gone (the container ended): the caller
    /// detaches them.
    pub fn rescan(&mut self) -> Vec<String> {
        let mut ended = Vec::new();
        let keys: Vec<String> = self.entries.keys().cloned().collect();
        for key in keys {
            let e = &self.entries[&key];
            match &e.selector {
                Selector::Cgroup(glob) => {
                    let found = glob.expand(self.cg.mount());
                    if e.pid.is_some() && found.is_empty() {
                        ended.push(key.clone());
                        continue;
                    }
                    let _ = self.attach_cgroups(&key, found);
                }
                Selector::Unit(_) => {
                    let e = self.entries.get_mut(&key).expect("listed above");
                    if let Some(path) = &e.unit_cgroup {
                        if let Ok(id) = cgroup_id(path) {
                            e.cgroups.entry(id).or_insert_with(|| path.clone());
                        }
                    }
                }
            }
            let e = self.entries.get_mut(&key).expect("listed above");
            let gone: Vec<u64> = e
                .cgroups
                .iter()
                .filter(|(id, p)| cgroup_id(p).ok() != Some(**id))
                .map(|(id, _)| *id)
                .collect();
            for id in &gone {
                if let Some(p) = e.cgroups.remove(id) {
                    // A unit's cgroup goes at every restart: only globs' are news.
                    let level = match e.selector {
                        Selector::Cgroup(_) => log::Level::Info,
                        Selector::Unit(_) => log::Level::Debug,
                    };
                    log::log!(
                        level,
                        "cgroup {} is gone: forgotten by {}",
                        p.display(),
                        e.selector
                    );
                }
            }
            if !gone.is_empty() {
                e.pinned.forget_removed_cgroups(&self.dirs);
            }
        }
        ended
    }

    /// Directories to watch for cgroups appearing or vanishing.
    pub fn watch_dirs(&self) -> BTreeSet<PathBuf> {
        let mount = self.cg.mount();
        self.entries
            .values()
            .filter_map(|e| match &e.selector {
                Selector::Cgroup(g) => Some(g.watch_dirs(mount)),
                Selector::Unit(_) => None,
            })
            .flatten()
            .map(|d| mount.join(d))
            .collect()
    }

    /// Every cgroup an attachment is attached to now, for the address events.
    pub fn managed(&self) -> Vec<crate::status::ManagedCgroup> {
        self.entries
            .values()
            .flat_map(|e| {
                e.cgroups.values().map(|c| crate::status::ManagedCgroup {
                    attachment: e.selector.to_string(),
                    cgroup: c.clone(),
                })
            })
            .collect()
    }

    /// Processes whose network namespaces must be served: those in attached cgroups (and
    /// below), each unit's systemd, each `--pid`.
    pub fn netns_pids(&self) -> Vec<u32> {
        let mut pids = Vec::new();
        for e in self.entries.values() {
            pids.extend(e.pid);
            pids.extend(e.manager_pid);
            for path in e.cgroups.values() {
                collect_procs(path, &mut pids);
            }
        }
        pids
    }
}

/// Pids in `dir` and its descendants.
pub(crate) fn collect_procs(dir: &Path, out: &mut Vec<u32>) {
    if let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) {
        out.extend(text.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_procs(&e.path(), out);
            }
        }
    }
}

/// Calls `f` with every cgroup directory below `mount`.
pub(crate) fn walk_cgroups(dir: &Path, f: &mut dyn FnMut(&Path, &fs::File)) {
    if let Ok(cg) = fs::File::open(dir) {
        f(dir, &cg);
    }
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                walk_cgroups(&e.path(), f);
            }
        }
    }
}

fn selector_of_key(key: &str) -> String {
    Selector::from_key(key)
        .map(|s| s.to_string())
        .unwrap_or_else(|| key.to_owned())
}

/// A TOML basic string.
fn toml_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
