//! Cgroup globs: which cgroups an `[[attach]]` of the daemon's config selects by path.
//!
//! A glob is a path relative to the cgroup2 mount, matched one component at a time with
//! `*`, `?` and `[...]` (the `glob` crate's syntax, `[!...]` negates). A `*` never crosses
//! a `/`, and `**` is refused rather than read as `*`: a recursive wildcard would make the
//! daemon walk and watch whole subtrees, and a silent downgrade to `*` would select less
//! than the operator asked for. List each level instead (`kubepods.slice/*/*`).
//!
//! Nothing here checks the filesystem type: the daemon finds the mount with
//! [`crate::cgroup::Cgroup2`], and the tests stand plain directories in for cgroups.
use std::{
    fmt, fs, io,
    path::{Component, Path, PathBuf},
};

use anyhow::{bail, Result};
use glob::Pattern;

/// Longest name of one directory (Linux `NAME_MAX`); a longer component can never match.
const NAME_MAX: usize = 255;

/// A cgroup path pattern relative to the cgroup2 mount, e.g. `system.slice/docker-*.scope`.
///
/// Two globs are equal when their normalized text is (`/a/b/` and `a/b` are the same glob);
/// the config uses that to refuse a selector written twice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct CgroupGlob {
    /// Normalized: no leading or trailing `/`.
    text: String,
    parts: Vec<Part>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Part {
    /// Looked up directly: no directory listing for a level without wildcards.
    Literal(String),
    Wild(Pattern),
}

impl Part {
    fn matches(&self, name: &str) -> bool {
        match self {
            Part::Literal(l) => l == name,
            Part::Wild(p) => p.matches(name),
        }
    }
}

impl CgroupGlob {
    /// Parses a glob relative to the cgroup2 mount. A leading `/` also means the mount's
    /// root (systemd and `/proc/PID/cgroup` write cgroups that way); a trailing `/` is
    /// dropped. Refused: an empty path or the root itself (freebind attaches below the
    /// root, never to the whole host by accident), `.`/`..` components, `**`, NUL or other
    /// control characters, a component longer than `NAME_MAX`, an invalid `[...]`, and a
    /// path that starts with `/sys/` — that is a filesystem path, not one relative to the
    /// mount, and read as relative it would silently match nothing.
    pub fn parse(s: &str) -> Result<Self> {
        if s.starts_with("/sys/") || s == "/sys" {
            let hint = ["/sys/fs/cgroup/unified/", "/sys/fs/cgroup/"]
                .iter()
                .find_map(|m| s.strip_prefix(m))
                .filter(|rest| !rest.is_empty())
                .map(|rest| format!(" (did you mean {:?}?)", rest.trim_end_matches('/')))
                .unwrap_or_default();
            bail!(
                "cgroup {s:?} is a filesystem path: write it relative to the cgroup2 mount{hint}"
            );
        }
        if s.chars().any(char::is_control) {
            bail!("cgroup {s:?} contains a control character");
        }
        let trimmed = s.trim_matches('/');
        if trimmed.is_empty() {
            bail!("cgroup {s:?} is empty or the root cgroup: name a cgroup below the root");
        }
        let mut parts = Vec::new();
        for comp in trimmed.split('/') {
            match comp {
                "" => bail!("cgroup {s:?} has an empty component ('//')"),
                "." | ".." => bail!("cgroup {s:?} must not contain '.' or '..' components"),
                _ if comp.len() > NAME_MAX => {
                    bail!("cgroup {s:?} has a component longer than {NAME_MAX} bytes")
                }
                _ if comp.contains("**") => bail!(
                    "cgroup {s:?}: '**' is not supported ('*' matches within one level; write \
                     one '*' per level)"
                ),
                _ if !comp.contains(['*', '?', '[']) => parts.push(Part::Literal(comp.into())),
                _ => match Pattern::new(comp) {
                    Ok(p) => parts.push(Part::Wild(p)),
                    Err(e) => bail!("cgroup {s:?}: invalid glob {comp:?}: {}", e.msg),
                },
            }
        }
        Ok(Self {
            text: trimmed.to_string(),
            parts,
        })
    }

    /// The normalized text: relative, no trailing `/`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// True when the glob has no wildcard: it names exactly one cgroup.
    pub fn is_literal(&self) -> bool {
        self.parts.iter().all(|p| matches!(p, Part::Literal(_)))
    }

    /// Whether a cgroup path relative to the mount (a leading `/` is ignored) matches.
    /// Non-UTF-8 names never match: a glob from the config is UTF-8.
    pub fn matches(&self, rel: &Path) -> bool {
        let mut names = Vec::new();
        for c in rel.components() {
            match c {
                Component::RootDir | Component::CurDir => {}
                Component::Normal(n) => match n.to_str() {
                    Some(n) => names.push(n),
                    None => return false,
                },
                Component::ParentDir | Component::Prefix(_) => return false,
            }
        }
        names.len() == self.parts.len() && self.parts.iter().zip(names).all(|(p, n)| p.matches(n))
    }

    /// The cgroups under `mount` that match now, relative to it, sorted.
    ///
    /// Walks only as deep as the pattern and lists only the levels that have a wildcard;
    /// a literal level is one `lstat`. Directories that vanish mid-walk (cgroups are
    /// removed at any time) or cannot be read are skipped: the caller learns of them
    /// through its watches, and one bad subtree must not hide the others.
    pub fn expand(&self, mount: &Path) -> Vec<PathBuf> {
        let mut level = vec![PathBuf::new()];
        for part in &self.parts {
            level = level
                .iter()
                .flat_map(|dir| children(mount, dir, part))
                .collect();
        }
        level.sort();
        level
    }

    /// The existing directories (relative to `mount`; the root is the empty path) in which
    /// a new child directory could create a match or lead to one: the daemon watches them
    /// for `IN_CREATE | IN_DELETE | IN_ONLYDIR`.
    ///
    /// Every directory at the last level's parent depth is watched (creation and removal
    /// of the matches themselves), as is every directory before a wildcard level. A
    /// directory before a literal level is watched only while that child is missing:
    /// `system.slice/docker-*.scope` watches `system.slice`, not the root, as long as
    /// `system.slice` exists. So the daemon must recompute the set after every event,
    /// including a watch going away (`IN_IGNORED`, sent when a watched directory is
    /// removed), which is how it learns that a literal level vanished.
    pub fn watch_dirs(&self, mount: &Path) -> Vec<PathBuf> {
        let mut watch = Vec::new();
        let mut level = vec![PathBuf::new()];
        let last = self.parts.len() - 1;
        for (i, part) in self.parts.iter().enumerate() {
            let mut next = Vec::new();
            for dir in &level {
                let found = children(mount, dir, part);
                let needed = match part {
                    Part::Literal(_) => i == last || found.is_empty(),
                    Part::Wild(_) => true,
                };
                // `children` found nothing also when `dir` itself just vanished.
                if needed && is_dir(&mount.join(dir)) {
                    watch.push(dir.clone());
                }
                next.extend(found);
            }
            level = next;
        }
        watch.sort();
        watch
    }
}

/// The children of `mount/dir` that match `part`, as paths relative to `mount`.
fn children(mount: &Path, dir: &Path, part: &Part) -> Vec<PathBuf> {
    match part {
        Part::Literal(name) => {
            let rel = dir.join(name);
            if is_dir(&mount.join(&rel)) {
                vec![rel]
            } else {
                vec![]
            }
        }
        Part::Wild(_) => match fs::read_dir(mount.join(dir)) {
            Ok(entries) => entries
                .filter_map(|e| e.ok())
                // kernfs fills d_type, so this costs no extra stat on cgroupfs; a symlink
                // is not a cgroup and is not followed.
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .filter(|e| e.file_name().to_str().is_some_and(|n| part.matches(n)))
                .map(|e| dir.join(e.file_name()))
                .collect(),
            Err(e) => {
                if e.kind() != io::ErrorKind::NotFound {
                    log::debug!("listing {}: {e}", mount.join(dir).display());
                }
                vec![]
            }
        },
    }
}

/// A directory, not a symlink to one: cgroupfs has no symlinks, so following one would
/// only ever lead out of the hierarchy.
fn is_dir(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.is_dir())
}

impl fmt::Display for CgroupGlob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A scratch tree standing in for a cgroup2 mount; removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(dirs: &[&str]) -> Self {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let root = std::env::temp_dir().join(format!(
                "freebind-selector-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            for d in dirs {
                fs::create_dir_all(root.join(d)).expect("creating test dir");
            }
            fs::create_dir_all(&root).expect("creating test root");
            Tree(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn glob(s: &str) -> CgroupGlob {
        CgroupGlob::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn paths(v: &[&str]) -> Vec<PathBuf> {
        v.iter().map(PathBuf::from).collect()
    }

    #[test]
    fn normalizes_slashes() {
        assert_eq!(glob("/system.slice/").as_str(), "system.slice");
        assert_eq!(glob("/a/b*/"), glob("a/b*"));
        assert!(glob("system.slice/nginx.service").is_literal());
        assert!(!glob("system.slice/docker-*.scope").is_literal());
        assert!(!glob("a/[bc]").is_literal());
    }

    #[test]
    fn refuses_bad_globs_with_reasons() {
        for (bad, why) in [
            ("", "empty"),
            ("/", "root cgroup"),
            ("a//b", "empty component"),
            ("a/../b", "'..'"),
            ("./a", "'.'"),
            ("a/**", "'**' is not supported"),
            ("a/x**y", "'**' is not supported"),
            ("a/[bc", "invalid glob \"[bc\""),
            ("a\nb", "control character"),
            (
                "/sys/fs/cgroup/system.slice",
                "did you mean \"system.slice\"",
            ),
            ("/sys/fs/cgroup/unified/a/", "did you mean \"a\""),
            ("/sys/kernel", "filesystem path"),
        ] {
            let err = CgroupGlob::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert!(!err.contains('\n'), "{bad:?}: {err}");
        }
        let long = "x".repeat(NAME_MAX + 1);
        assert!(CgroupGlob::parse(&long).is_err());
    }

    #[test]
    fn star_stays_within_one_level() {
        let g = glob("system.slice/docker-*.scope");
        assert!(g.matches(Path::new("system.slice/docker-abc.scope")));
        assert!(g.matches(Path::new("/system.slice/docker-abc.scope")));
        assert!(!g.matches(Path::new("system.slice/docker-a/b.scope")));
        assert!(!g.matches(Path::new("system.slice")));
        assert!(!g.matches(Path::new("system.slice/docker-abc.scope/child")));
        assert!(!g.matches(Path::new("system.slice/../system.slice/docker-a.scope")));
        let g = glob("a/?/[!x]*");
        assert!(g.matches(Path::new("a/b/cd")));
        assert!(!g.matches(Path::new("a/bb/cd")));
        assert!(!g.matches(Path::new("a/b/xd")));
    }

    #[test]
    fn expands_level_by_level() {
        let t = Tree::new(&[
            "system.slice/docker-1.scope/inner",
            "system.slice/docker-2.scope",
            "system.slice/nginx.service",
            "user.slice/docker-3.scope",
        ]);
        fs::write(t.0.join("system.slice/docker-file.scope"), b"").unwrap();
        assert_eq!(
            glob("system.slice/docker-*.scope").expand(&t.0),
            paths(&["system.slice/docker-1.scope", "system.slice/docker-2.scope"])
        );
        assert_eq!(
            glob("*/docker-*.scope").expand(&t.0),
            paths(&[
                "system.slice/docker-1.scope",
                "system.slice/docker-2.scope",
                "user.slice/docker-3.scope"
            ])
        );
        assert_eq!(
            glob("system.slice/nginx.service").expand(&t.0),
            paths(&["system.slice/nginx.service"])
        );
        assert_eq!(glob("system.slice/gone.service").expand(&t.0), paths(&[]));
        assert_eq!(glob("missing.slice/*").expand(&t.0), paths(&[]));
        assert_eq!(
            glob("*/*/inner").expand(&t.0),
            paths(&["system.slice/docker-1.scope/inner"])
        );
    }

    #[test]
    fn does_not_follow_symlinks_out_of_the_tree() {
        let outside = Tree::new(&["escape"]);
        let t = Tree::new(&["a"]);
        std::os::unix::fs::symlink(&outside.0, t.0.join("a/link")).unwrap();
        assert_eq!(glob("a/*").expand(&t.0), paths(&[]));
        assert_eq!(glob("a/link/escape").expand(&t.0), paths(&[]));
    }

    #[test]
    fn watches_only_where_a_match_can_appear() {
        let t = Tree::new(&["system.slice/x.service", "a/x/b1", "a/y", "a/z/c"]);
        // The literal level exists: no watch on the root.
        assert_eq!(
            glob("system.slice/docker-*.scope").watch_dirs(&t.0),
            paths(&["system.slice"])
        );
        assert_eq!(
            glob("a/*/b*").watch_dirs(&t.0),
            paths(&["a", "a/x", "a/y", "a/z"])
        );
        // A missing literal level is waited for in its deepest existing ancestor.
        assert_eq!(glob("machine.slice/*").watch_dirs(&t.0), paths(&[""]));
        assert_eq!(glob("a/y/new/*").watch_dirs(&t.0), paths(&["a/y"]));
        // A fully literal glob watches its parent, for the cgroup's removal and return.
        assert_eq!(
            glob("system.slice/x.service").watch_dirs(&t.0),
            paths(&["system.slice"])
        );
        assert_eq!(glob("top").watch_dirs(&t.0), paths(&[""]));
    }
}
