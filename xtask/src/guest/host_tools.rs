//! The host's tools for the guest (qemu, depmod, xz), installed with apt when missing.
//!
//! qemu's packages come from one source package and must all be of one version: a host
//! with qemu-utils from backports (qemu-img is common on build machines) cannot take
//! qemu-system-x86 from the release, whose qemu-system-common that qemu-utils Breaks, and
//! apt would remove qemu-utils to make room. So qemu-system-x86 is asked for at the
//! installed qemu's version; when the host's apt sources do not have it and it is a
//! backport, it comes from the release's backports suite through an apt configuration of
//! this project's own (the host's sources plus backports, with lists of their own, in the
//! package cache), which leaves the host's apt configuration as it was.

use std::{fs, path::Path, process::Command};

use anyhow::{bail, Context as _, Result};

use super::packages::{apt_candidates, apt_update};
use crate::cmd::{output, step};

/// Debian packages the guest needs on the host, with a file each provides. The static
/// busybox the initramfs needs is not installed (busybox-static conflicts with, and would
/// remove, `busybox`): it is taken from its package in the cache (see `static_busybox`).
const HOST_PACKAGES: &[(&str, &str)] = &[
    ("qemu-system-x86", "/usr/bin/qemu-system-x86_64"),
    ("kmod", "/sbin/depmod"),
    ("xz-utils", "/usr/bin/xz"),
];

const QEMU: &str = "qemu-system-x86";

/// Installs what the guest needs, saying so; checks only (no apt) when all is there.
pub(super) fn ensure(cache: &Path) -> Result<()> {
    let missing: Vec<&str> = HOST_PACKAGES
        .iter()
        .filter(|(_, file)| !Path::new(file).exists())
        .map(|(package, _)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let candidates = apt_candidates(&missing).unwrap_or_default();
    if missing
        .iter()
        .any(|m| !candidates.iter().any(|c| c.name == *m))
    {
        apt_update(&format!(
            "apt has no candidate for some of {}",
            missing.join(", ")
        ))?;
    }
    let qemu = if missing.contains(&QEMU) {
        installed_qemu()?
    } else {
        None
    };
    let mut apt = Apt::host();
    let mut requests: Vec<String> = missing.iter().map(|m| m.to_string()).collect();
    if let Some((package, version)) = &qemu {
        println!("{package} {version} is installed: {QEMU} must be of that version too");
        for r in requests.iter_mut().filter(|r| *r == QEMU) {
            *r = format!("{QEMU}={version}");
        }
        if !apt.has_version(QEMU, version)? {
            apt_update(&format!("apt's lists have no {QEMU} {version}"))?;
        }
        if !apt.has_version(QEMU, version)? {
            if !is_backport(version) {
                bail!(
                    "{package} {version} is installed, and apt offers no {QEMU} of that version \
                     (qemu's packages must all be of one version): install {QEMU} {version} \
                     yourself, or remove {package}"
                );
            }
            apt = Apt::with_backports(cache)?;
            if !apt.has_version(QEMU, version)? {
                bail!(
                    "{package} {version} is installed, and neither apt's sources nor {} have \
                     {QEMU} of that version: install it yourself, or remove {package}",
                    apt.backports.as_deref().unwrap_or("backports")
                );
            }
        }
    }
    // --no-remove: apt aborts rather than remove a package of the host's to make room.
    let mut install = apt.command("apt-get");
    install.args(["install", "-y", "--no-install-recommends", "--no-remove"]);
    if let Some(suite) = &apt.backports {
        // qemu's backported packages depend on backported ones (seabios, qemu-system-data)
        // that apt would not pick by itself: -t prefers backports for what this one install
        // brings in. Installed packages stay as they are (nothing asks to upgrade them).
        install.args(["-t", suite]);
    }
    step(
        &format!("installing {} for the test guest", requests.join(", ")),
        install
            .args(&requests)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing the guest's tools")
}

/// An installed package built from qemu's source, and its version.
fn installed_qemu() -> Result<Option<(String, String)>> {
    let list = output(Command::new("dpkg-query").args([
        "-W",
        "-f",
        "${db:Status-Abbrev}\t${source:Package}\t${Package}\t${Version}\n",
    ]))?;
    Ok(parse_installed_qemu(&list))
}

fn parse_installed_qemu(list: &str) -> Option<(String, String)> {
    list.lines().find_map(|line| {
        let mut fields = line.split('\t');
        let (status, source, package, version) = (
            fields.next()?,
            fields.next()?,
            fields.next()?,
            fields.next()?,
        );
        (status.starts_with("ii") && source == "qemu")
            .then(|| (package.to_string(), version.to_string()))
    })
}

/// Debian's backports mark their versions `~bpoNN+M`.
fn is_backport(version: &str) -> bool {
    version.contains("~bpo")
}

/// How apt is run: with the host's configuration, or with the host's sources plus the
/// release's backports and lists of their own.
struct Apt {
    options: Vec<String>,
    backports: Option<String>,
}

impl Apt {
    fn host() -> Apt {
        Apt {
            options: Vec::new(),
            backports: None,
        }
    }

    /// The host's sources plus `<codename>-backports` from the host's Debian mirror, in
    /// `cache/apt`, with its package lists fetched.
    fn with_backports(cache: &Path) -> Result<Apt> {
        let os_release = fs::read_to_string("/etc/os-release")
            .context("reading /etc/os-release for the release's codename")?;
        let codename = os_release
            .lines()
            .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
            .map(|c| c.trim_matches('"').to_string())
            .filter(|c| !c.is_empty())
            .context("/etc/os-release names no VERSION_CODENAME (is this Debian?)")?;
        let suite = format!("{codename}-backports");
        let dir = cache.join("apt");
        let parts = dir.join("sources.list.d");
        let lists = dir.join("lists");
        let _ = fs::remove_dir_all(&parts);
        fs::create_dir_all(&parts).with_context(|| format!("creating {}", parts.display()))?;
        fs::create_dir_all(lists.join("partial"))
            .with_context(|| format!("creating {}", lists.display()))?;
        let host_parts = Path::new("/etc/apt/sources.list.d");
        let mut host_sources = String::new();
        for entry in
            fs::read_dir(host_parts).with_context(|| format!("reading {}", host_parts.display()))?
        {
            let path = entry?.path();
            // apt reads only these two kinds; anything else there is disabled.
            if !matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("sources" | "list")
            ) {
                continue;
            }
            let text =
                fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            host_sources.push_str(&text);
            host_sources.push('\n');
            let copy = parts.join(path.file_name().unwrap());
            fs::write(&copy, text).with_context(|| format!("writing {}", copy.display()))?;
        }
        if let Ok(list) = fs::read_to_string("/etc/apt/sources.list") {
            host_sources.push_str(&list);
        }
        let (uri, signed_by) = debian_mirror(&host_sources, &codename);
        let mut stanza = format!("Types: deb\nURIs: {uri}\nSuites: {suite}\nComponents: main\n");
        if let Some(keyring) = signed_by {
            stanza.push_str(&format!("Signed-By: {keyring}\n"));
        }
        let file = parts.join("freebind-backports.sources");
        fs::write(&file, stanza).with_context(|| format!("writing {}", file.display()))?;
        let apt = Apt {
            options: vec![
                format!("Dir::Etc::SourceParts={}", parts.display()),
                format!("Dir::State::Lists={}", lists.display()),
            ],
            backports: Some(suite.clone()),
        };
        step(
            &format!(
                "adding {suite} ({uri}) in an apt configuration of the guest's own, {}",
                dir.display()
            ),
            apt.command("apt-get").arg("update"),
        )?;
        Ok(apt)
    }

    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        for o in &self.options {
            cmd.args(["-o", o]);
        }
        cmd
    }

    /// Whether apt can install `package` at exactly `version`.
    fn has_version(&self, package: &str, version: &str) -> Result<bool> {
        let madison = output(self.command("apt-cache").args(["madison", package]))?;
        Ok(madison
            .lines()
            .any(|l| l.split('|').nth(1).map(str::trim) == Some(version)))
    }
}

/// The mirror and keyring of the host's source for `codename` itself (not -security, not
/// -updates), from deb822 stanzas or one-line entries; Debian's own mirror otherwise.
fn debian_mirror(sources: &str, codename: &str) -> (String, Option<String>) {
    for stanza in sources.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        if field("Suites").is_some_and(|s| s.split_whitespace().any(|s| s == codename)) {
            if let Some(uri) = field("URIs").and_then(|u| u.split_whitespace().next()) {
                return (uri.to_string(), field("Signed-By").map(str::to_string));
            }
        }
    }
    for line in sources.lines() {
        let Some(rest) = line.trim().strip_prefix("deb ") else {
            continue;
        };
        let rest = rest.trim_start();
        // Options come first, in brackets: `deb [arch=amd64 signed-by=…] URI SUITE …`.
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']').map_or("", |(_, r)| r),
            None => rest,
        };
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            if suite == codename {
                return (uri.to_string(), None);
            }
        }
    }
    ("http://deb.debian.org/debian".to_string(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_installed_qemu_is_found_by_its_source_package() {
        let list = "ii \tqemu\tqemu-utils\t1:10.0.2+ds-2+deb13u1~bpo12+1\n\
                    rc \tqemu\tqemu-system-x86\t1:7.2+dfsg-7\n\
                    ii \tkmod\tkmod\t30+20221128-1\n";
        assert_eq!(
            parse_installed_qemu(list),
            Some((
                "qemu-utils".to_string(),
                "1:10.0.2+ds-2+deb13u1~bpo12+1".to_string()
            ))
        );
        assert_eq!(parse_installed_qemu("ii \tkmod\tkmod\t30\n"), None);
        assert!(is_backport("1:10.0.2+ds-2+deb13u1~bpo12+1"));
        assert!(!is_backport("1:7.2+dfsg-7+deb12u18+b3"));
    }

    #[test]
    fn the_mirror_is_the_one_of_the_release_itself() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm \
                      bookworm-updates\nComponents: main\nSigned-By: /k.gpg\n\n\
                      Types: deb\nURIs: http://deb.debian.org/debian-security\n\
                      Suites: bookworm-security\nComponents: main\n";
        assert_eq!(
            debian_mirror(deb822, "bookworm"),
            (
                "http://mirror.example/debian".to_string(),
                Some("/k.gpg".to_string())
            )
        );
        let one_line = "deb http://security.debian.org/ bookworm-security main\n\
                        deb [arch=amd64] http://ftp.example/debian bookworm main\n";
        assert_eq!(
            debian_mirror(one_line, "bookworm"),
            ("http://ftp.example/debian".to_string(), None)
        );
        assert_eq!(
            debian_mirror("", "bookworm").0,
            "http://deb.debian.org/debian"
        );
    }
}
