//! Debian packages for the guest, fetched with apt into a cache that outlives runs: the
//! newest of apt's candidate and the cache's copies, downloads that enter the cache only
//! whole, and a cached package that does not unpack fetched again once.

use std::{
    cmp::Ordering as Order,
    fmt, fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicBool, Ordering},
};

use anyhow::{bail, Context as _, Result};

use crate::cmd::{output, step};

/// Written into an unpacked package's tree once it is complete.
const UNPACKED: &str = ".freebind-unpacked";

static APT_UPDATED: AtomicBool = AtomicBool::new(false);

/// `apt-get update`, at most once per run, saying why.
pub(super) fn apt_update(why: &str) -> Result<()> {
    if APT_UPDATED.swap(true, Ordering::Relaxed) {
        return Ok(());
    }
    step(
        &format!("{why}: updating apt's package lists"),
        Command::new("apt-get").arg("update"),
    )
}

/// A Debian package at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Package {
    pub(super) name: String,
    pub(super) version: String,
}

impl Package {
    /// Newer Debian version first; between packages of one version (never seen), the
    /// numbers in the name (`6.1.0-57` after `6.1.0-9`).
    fn newness(&self, other: &Self) -> Order {
        compare_versions(&self.version, &other.version)
            .then_with(|| version_key(&self.name).cmp(&version_key(&other.name)))
    }
}

impl fmt::Display for Package {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.name, self.version)
    }
}

/// A `.deb` in the cache.
#[derive(Clone, Debug)]
pub(super) struct CachedDeb {
    pub(super) package: Package,
    pub(super) path: PathBuf,
}

/// apt's candidate versions for `names` (`apt-cache policy`); names without one are left
/// out.
pub(super) fn apt_candidates(names: &[&str]) -> Result<Vec<Package>> {
    let policy = output(Command::new("apt-cache").arg("policy").args(names))?;
    Ok(parse_policy(&policy))
}

fn parse_policy(policy: &str) -> Vec<Package> {
    let mut found = Vec::new();
    let mut current: Option<&str> = None;
    for line in policy.lines() {
        if !line.starts_with(char::is_whitespace) {
            current = line.strip_suffix(':');
        } else if let (Some(name), Some(version)) =
            (current, line.trim().strip_prefix("Candidate:"))
        {
            let version = version.trim();
            if version != "(none)" && !version.is_empty() {
                found.push(Package {
                    name: name.to_string(),
                    version: version.to_string(),
                });
            }
        }
    }
    found
}

/// The newest candidate apt has among the packages `search` finds; after one
/// `apt-get update` when it has none. None when apt cannot say (offline, no lists).
pub(super) fn apt_newest(what: &str, search: impl Fn() -> Result<Vec<String>>) -> Option<Package> {
    let find = || -> Result<Option<Package>> {
        let names = search()?;
        if names.is_empty() {
            return Ok(None);
        }
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        Ok(apt_candidates(&names)?
            .into_iter()
            .max_by(|a, b| a.newness(b)))
    };
    match find() {
        Ok(Some(package)) => return Some(package),
        Ok(None) => {}
        Err(e) => println!("? {e:#}"),
    }
    if let Err(e) = apt_update(&format!("apt has no {what}")) {
        println!("? {e:#}; trying the cache");
        return None;
    }
    find().unwrap_or_else(|e| {
        println!("? {e:#}; trying the cache");
        None
    })
}

/// The `.deb`s in the cache whose package name satisfies `pick`, from the name apt gives
/// a download: `NAME_VERSION_ARCH.deb`, the epoch's `:` written `%3a`.
pub(super) fn cached_debs(cache: &Path, pick: impl Fn(&str) -> bool) -> Result<Vec<CachedDeb>> {
    let mut debs = Vec::new();
    for entry in fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", cache.display()))?
            .path();
        let Some(package) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(parse_deb_name)
        else {
            continue;
        };
        if path.is_file() && pick(&package.name) {
            debs.push(CachedDeb { package, path });
        }
    }
    Ok(debs)
}

fn parse_deb_name(file: &str) -> Option<Package> {
    let stem = file.strip_suffix(".deb")?;
    let mut parts = stem.split('_');
    let (name, version, _arch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || name.is_empty() || version.is_empty() {
        return None;
    }
    Some(Package {
        name: name.to_string(),
        version: version.replace("%3a", ":").replace("%3A", ":"),
    })
}

/// The newest of apt's candidate and the cache's copies. The cache wins a tie (no
/// download) and when it is newer (apt's lists are stale, or the mirror dropped it); a
/// failed download falls back to it.
pub(super) fn newest_deb(
    cache: &Path,
    what: &str,
    candidate: Option<Package>,
    cached: Vec<CachedDeb>,
) -> Result<CachedDeb> {
    let newest_cached = cached
        .into_iter()
        .max_by(|a, b| a.package.newness(&b.package));
    match (candidate, newest_cached) {
        (Some(candidate), Some(cached)) if cached.package.newness(&candidate) != Order::Less => {
            if cached.package != candidate {
                println!(
                    "apt's newest {what} is {candidate}, older than {} in {} \
                     (stale package lists?): using the cached one",
                    cached.package,
                    cache.display()
                );
            }
            Ok(cached)
        }
        (Some(candidate), cached) => match fetch_deb(cache, &candidate) {
            Ok(path) => Ok(CachedDeb {
                package: candidate,
                path,
            }),
            Err(e) => {
                let cached = cached.with_context(|| {
                    format!(
                        "downloading {candidate} failed and {} has no {what}",
                        cache.display()
                    )
                })?;
                println!(
                    "? cannot download {candidate} ({e:#}); using {} from {}",
                    cached.package,
                    cache.display()
                );
                Ok(cached)
            }
        },
        (None, Some(cached)) => {
            println!(
                "apt offers no {what}: using {} from {}",
                cached.package,
                cache.display()
            );
            Ok(cached)
        }
        (None, None) => bail!(
            "no {what}: apt has none (even after `apt-get update`) and {} holds none",
            cache.display()
        ),
    }
}

/// A scratch directory in the cache named after this process, so that a run that dies
/// leaves one that the next run recognises as stale (see [`prepare_cache`]).
fn scratch(cache: &Path, kind: &str, name: &str) -> PathBuf {
    cache.join(format!(".{kind}-{}-{name}", std::process::id()))
}

/// Creates the cache and removes the scratch directories of runs that are gone (a
/// download or an unpacking cut short). Other runs' live ones are left alone: the cache
/// is shared by every checkout on the machine.
pub(super) fn prepare_cache(cache: &Path) -> Result<()> {
    fs::create_dir_all(cache).with_context(|| format!("creating {}", cache.display()))?;
    for entry in fs::read_dir(cache).with_context(|| format!("reading {}", cache.display()))? {
        let path = entry
            .with_context(|| format!("reading {}", cache.display()))?
            .path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let pid = [".download-", ".unpack-"]
            .iter()
            .find_map(|prefix| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                println!("removing {}, left by an interrupted run", path.display());
                fs::remove_dir_all(&path)
                    .with_context(|| format!("removing {}", path.display()))?;
            }
        }
    }
    Ok(())
}

/// Downloads `package` with `apt-get download` into a scratch directory, checks it is a
/// whole package (`dpkg-deb --info`), then moves it into the cache: an interrupted
/// download never leaves a `.deb` there.
fn fetch_deb(cache: &Path, package: &Package) -> Result<PathBuf> {
    let dir = scratch(cache, "download", &package.name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    // apt downloads as its sandbox user, `_apt`, into a directory that user may write
    // (else it falls back to root, with a warning).
    if let Some(uid) = apt_sandbox_uid() {
        std::os::unix::fs::chown(&dir, Some(uid), None)
            .with_context(|| format!("giving {} to _apt", dir.display()))?;
    }
    let result = (|| {
        step(
            &format!("downloading {package} into {}", cache.display()),
            Command::new("apt-get")
                .args(["download", &format!("{}={}", package.name, package.version)])
                .current_dir(&dir),
        )?;
        let deb = fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download left no .deb in {}", dir.display()))?;
        output(Command::new("dpkg-deb").arg("--info").arg(&deb))
            .with_context(|| format!("{} is not a whole package", deb.display()))?;
        let name = deb.file_name().context("a .deb without a name")?;
        let dest = cache.join(name);
        std::os::unix::fs::chown(&deb, Some(0), Some(0))
            .with_context(|| format!("giving {} to root", deb.display()))?;
        fs::rename(&deb, &dest)
            .with_context(|| format!("moving {} to {}", deb.display(), dest.display()))?;
        Ok(dest)
    })();
    let _ = fs::remove_dir_all(&dir);
    result
}

/// The uid of apt's sandbox user, `_apt`, when there is one.
fn apt_sandbox_uid() -> Option<u32> {
    let passwd = fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        match fields[..] {
            ["_apt", _, uid, ..] => uid.parse().ok(),
            _ => None,
        }
    })
}

/// Unpacks `deb` next to it (once; `prepare` finishes the tree), or, when that fails
/// (a truncated `.deb` an older run left), deletes it, downloads it again and retries
/// once.
pub(super) fn unpack_or_refetch(
    cache: &Path,
    deb: &CachedDeb,
    prepare: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    match unpack(cache, &deb.path, prepare) {
        Ok(root) => Ok(root),
        Err(e) => {
            println!(
                "? {e:#}\n  removing {} and downloading it again",
                deb.path.display()
            );
            fs::remove_file(&deb.path)
                .with_context(|| format!("removing {}", deb.path.display()))?;
            let path = fetch_deb(cache, &deb.package)
                .with_context(|| format!("downloading {} again", deb.package))?;
            unpack(cache, &path, prepare)
        }
    }
}

/// Unpacks `deb` into a scratch directory, runs `prepare` on it, marks it complete and
/// moves it next to the `.deb` (the name without `.deb`). Done once: a complete tree is
/// reused.
fn unpack(cache: &Path, deb: &Path, prepare: &dyn Fn(&Path) -> Result<()>) -> Result<PathBuf> {
    let root = deb.with_extension("");
    if root.join(UNPACKED).exists() {
        return Ok(root);
    }
    let name = root
        .file_name()
        .and_then(|n| n.to_str())
        .context("a .deb without a name")?
        .to_string();
    let dir = scratch(cache, "unpack", &name);
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    let result = (|| {
        output(Command::new("dpkg-deb").arg("--info").arg(deb))
            .with_context(|| format!("{} is not a whole package", deb.display()))?;
        step(
            &format!("unpacking {name}"),
            Command::new("dpkg-deb").arg("-x").arg(deb).arg(&dir),
        )?;
        prepare(&dir)?;
        let done = dir.join(UNPACKED);
        fs::write(&done, "").with_context(|| format!("writing {}", done.display()))?;
        if root.exists() {
            // A tree without the mark is an older run's partial one.
            fs::remove_dir_all(&root).with_context(|| format!("removing {}", root.display()))?;
        }
        fs::rename(&dir, &root)
            .with_context(|| format!("moving {} to {}", dir.display(), root.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_dir_all(&dir);
    }
    result.map(|()| root)
}

/// The numbers in a package name: `6.1.0-56` after `6.1.0-9`.
fn version_key(package: &str) -> Vec<u64> {
    package
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().unwrap_or(0))
        .collect()
}

/// Debian version order (`dpkg --compare-versions`): epoch, then upstream version, then
/// revision, each compared as dpkg does (`~` before anything, even the end).
fn compare_versions(a: &str, b: &str) -> Order {
    fn split(v: &str) -> (u64, &str, &str) {
        let (epoch, rest) = match v.split_once(':') {
            Some((e, rest)) if e.chars().all(|c| c.is_ascii_digit()) => {
                (e.parse().unwrap_or(0), rest)
            }
            _ => (0, v),
        };
        match rest.rsplit_once('-') {
            Some((upstream, revision)) => (epoch, upstream, revision),
            None => (epoch, rest, ""),
        }
    }
    let (ea, ua, ra) = split(a);
    let (eb, ub, rb) = split(b);
    ea.cmp(&eb)
        .then_with(|| compare_part(ua.as_bytes(), ub.as_bytes()))
        .then_with(|| compare_part(ra.as_bytes(), rb.as_bytes()))
}

/// dpkg's `verrevcmp`: alternating runs of non-digits (letters before other characters,
/// `~` before the end) and numbers.
fn compare_part(a: &[u8], b: &[u8]) -> Order {
    fn weight(c: Option<u8>) -> i32 {
        match c {
            None => 0,
            Some(c) if c.is_ascii_digit() => 0,
            Some(c) if c.is_ascii_alphabetic() => i32::from(c),
            Some(b'~') => -1,
            Some(c) => i32::from(c) + 256,
        }
    }
    let digit = |s: &[u8], i: usize| s.get(i).is_some_and(u8::is_ascii_digit);
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(a, i)) || (j < b.len() && !digit(b, j)) {
            let (wa, wb) = (weight(a.get(i).copied()), weight(b.get(j).copied()));
            if wa != wb {
                return wa.cmp(&wb);
            }
            i += 1;
            j += 1;
        }
        while a.get(i) == Some(&b'0') {
            i += 1;
        }
        while b.get(j) == Some(&b'0') {
            j += 1;
        }
        let mut first_diff = Order::Equal;
        while digit(a, i) && digit(b, j) {
            if first_diff == Order::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(a, i) {
            return Order::Greater;
        }
        if digit(b, j) {
            return Order::Less;
        }
        if first_diff != Order::Equal {
            return first_diff;
        }
    }
    Order::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packages_of_one_version_are_ordered_by_the_numbers_in_their_names() {
        assert!(
            version_key("linux-image-6.1.0-56-amd64") > version_key("linux-image-6.1.0-9-amd64")
        );
    }

    #[test]
    fn debian_versions_are_ordered_as_dpkg_orders_them() {
        use Order::*;
        for (a, b, order) in [
            ("6.1.192-3", "6.1.192-1", Greater),
            ("6.1.192-1", "6.1.90-1", Greater),
            ("1.0~rc1-1", "1.0-1", Less),
            ("1.0-1", "1.0-1+b1", Less),
            ("1:1.0-1", "2.0-1", Greater),
            ("1:1.35.0-4+deb12u1+b1", "1:1.35.0-4+deb12u1+b1", Equal),
            ("6.12.117-1~deb12u1", "6.12.117-1", Less),
            ("1.0a", "1.0+", Less),
            ("1.01", "1.1", Equal),
            ("2", "10", Less),
        ] {
            assert_eq!(compare_versions(a, b), order, "{a} vs {b}");
            assert_eq!(compare_versions(b, a), order.reverse(), "{b} vs {a}");
        }
    }

    #[test]
    fn cached_debs_are_read_from_apts_file_names() {
        assert_eq!(
            parse_deb_name("busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"),
            Some(Package {
                name: "busybox-static".into(),
                version: "1:1.35.0-4+deb12u1+b1".into()
            })
        );
        assert_eq!(
            parse_deb_name("linux-image-6.1.0-57-amd64-unsigned_6.1.192-3_amd64.deb")
                .map(|p| p.version),
            Some("6.1.192-3".into())
        );
        assert_eq!(
            parse_deb_name("linux-image-6.1.0-57-amd64-unsigned_6.1.192-3_amd64"),
            None
        );
        assert_eq!(parse_deb_name("notes.deb"), None);
    }

    #[test]
    fn apt_cache_policy_gives_candidates() {
        let policy = "qemu-system-x86:\n  Installed: (none)\n  Candidate: 1:7.2+dfsg-7+deb12u18+b3\n  \
                      Version table:\n     1:7.2+dfsg-7+deb12u18+b3 500\nkmod:\n  Installed: (none)\n  \
                      Candidate: (none)\n";
        assert_eq!(
            parse_policy(policy),
            vec![Package {
                name: "qemu-system-x86".into(),
                version: "1:7.2+dfsg-7+deb12u18+b3".into()
            }]
        );
    }
}
