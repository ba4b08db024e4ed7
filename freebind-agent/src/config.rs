//! The daemon's TOML configuration: which cgroups to serve, and with which policy.
//!
//! ```toml
//! [[attach]]
//! cgroup = "system.slice/docker-*.scope"    # relative to the cgroup2 mount; a glob
//! allow = ["192.0.2.0/24", "2001:db8::/32"] # omitted: any address
//! [[attach]]
//! unit = "nginx.service"
//! ```
//!
//! An invalid file is refused whole, with one line naming the file, the line and the
//! reason: a daemon that applied the valid half of a config would serve a set of cgroups
//! nobody wrote down. Unknown keys are refused for the same reason — a typo such as
//! `alow` would otherwise mean "any address". An empty file (or one without `[[attach]]`)
//! is valid and serves nothing: that is how an operator pauses the daemon without
//! stopping it, and a reload with a real config picks up from there.
use std::{collections::HashMap, fmt, fs, path::Path};

use anyhow::{anyhow, Result};
use serde::Deserialize;
use toml::Spanned;

use crate::{policy::Policy, selector::CgroupGlob};

/// Where `freebind-agent daemon` reads its configuration unless told otherwise.
pub const DEFAULT_CONFIG: &str = "/etc/freebind/agent.toml";

/// A commented configuration, kept parseable by a unit test; `deploy/config/agent.toml`
/// is meant to say the same.
pub const EXAMPLE: &str = r#"# freebind-agent daemon configuration.
#
# Each [[attach]] selects cgroups; their processes' sockets may bind addresses that are
# not (yet) local, as with IP_FREEBIND. The file is checked whole: one error and nothing
# of it is applied. With no [[attach]] at all the daemon serves nothing.

# Every Docker container, on IPv4 and IPv6 documentation prefixes only.
[[attach]]
# Relative to the cgroup2 mount (/sys/fs/cgroup). Glob per level: *, ?, [...];
# a * never crosses a '/', and ** is refused.
cgroup = "system.slice/docker-*.scope"
# Prefixes the cgroup may bind while they are not local; a bare address is a /32 or
# /128. Omitted: any address.
allow = ["192.0.2.0/24", "2001:db8::/32"]

# A systemd unit, by name (.service, .scope, .slice, .socket, .mount or .swap).
[[attach]]
unit = "nginx.service"
"#;

/// Longest [`Selector::key`], leaving room under `NAME_MAX` for a suffix the caller adds.
const KEY_MAX: usize = 200;

/// Systemd's `UNIT_NAME_MAX` less the NUL.
const UNIT_NAME_MAX: usize = 255;

/// What an `[[attach]]` selects.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Selector {
    /// Cgroups by path relative to the cgroup2 mount, possibly a glob.
    Cgroup(CgroupGlob),
    /// A systemd unit by name; the daemon resolves it to the unit's cgroup.
    Unit(String),
}

impl Selector {
    /// A stable name for this selector, usable as a file or bpffs directory name: no `/`,
    /// no NUL, at most 200 bytes, readable, and distinct for distinct selectors.
    ///
    /// `unit:NAME` or `cgroup:PATH` with `/` written as `:`, after escaping `%`, `:` and `~`
    /// as `%25`, `%3A` and `%7E` — reversible by [`Selector::from_key`]. A longer key keeps
    /// its first 183 bytes and ends in `~` and a 64-bit FNV-1a hash of the selector in hex:
    /// `~` never occurs in a short key, so a long key never collides with a short one, and
    /// two long keys only on a hash collision. FNV rather than std's hasher because the
    /// key names pinned state that must survive an upgrade of the agent, and std does not
    /// promise a stable algorithm.
    pub fn key(&self) -> String {
        let (kind, body) = self.kind_body();
        let mut key = format!("{kind}:");
        for c in body.chars() {
            match c {
                '%' => key.push_str("%25"),
                ':' => key.push_str("%3A"),
                '~' => key.push_str("%7E"),
                '/' => key.push(':'),
                c => key.push(c),
            }
        }
        if key.len() <= KEY_MAX {
            return key;
        }
        let hash = fnv1a64(format!("{kind}:{body}").as_bytes());
        let mut cut = KEY_MAX - 17;
        while !key.is_char_boundary(cut) {
            cut -= 1;
        }
        key.truncate(cut);
        format!("{key}~{hash:016x}")
    }

    /// The selector a short [`Selector::key`] names; `None` for a hashed (long) key or
    /// anything that is not a key.
    pub fn from_key(key: &str) -> Option<Self> {
        if key.contains('~') {
            return None;
        }
        let (kind, body) = key.split_once(':')?;
        let body = body.replace(':', "/");
        let body = body
            .replace("%3A", ":")
            .replace("%7E", "~")
            .replace("%25", "%");
        let sel = match kind {
            "unit" => check_unit_name(&body).ok().map(|()| Selector::Unit(body))?,
            "cgroup" => CgroupGlob::parse(&body).ok().map(Selector::Cgroup)?,
            _ => return None,
        };
        // Each '%' of a key starts an escape, so the replaces above undo `key` exactly;
        // this check refuses what `key` never writes (a stray '%', "a::b").
        (sel.key() == key).then_some(sel)
    }

    fn kind_body(&self) -> (&'static str, &str) {
        match self {
            Selector::Cgroup(g) => ("cgroup", g.as_str()),
            Selector::Unit(u) => ("unit", u),
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, body) = self.kind_body();
        write!(f, "{kind} {body}")
    }
}

/// 64-bit FNV-1a: tiny and fixed forever, which is all [`Selector::key`] needs.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Refuses what systemd would refuse as a unit name (`unit_name_is_valid()`), and units
/// that have no cgroup of their own to attach to (targets, timers, paths, devices,
/// automounts). A template (`foo@.service`) is refused too: it never runs itself.
pub fn check_unit_name(name: &str) -> Result<()> {
    const WITH_CGROUP: [&str; 6] = ["service", "scope", "slice", "socket", "mount", "swap"];
    const WITHOUT: [&str; 5] = ["target", "timer", "path", "device", "automount"];
    let invalid = |why: String| Err(anyhow!("invalid unit name {name:?}: {why}"));
    if name.len() > UNIT_NAME_MAX {
        return invalid(format!("longer than {UNIT_NAME_MAX} bytes"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || ":-_.\\@".contains(*c)))
    {
        return invalid(format!(
            "{c:?} is not allowed (only A-Z a-z 0-9 : - _ . \\ @)"
        ));
    }
    let Some((stem, suffix)) = name.rsplit_once('.') else {
        return invalid("no unit type suffix such as .service".into());
    };
    if WITHOUT.contains(&suffix) {
        return invalid(format!(
            "a .{suffix} has no cgroup (use a .service, .scope, .slice, .socket, .mount or \
             .swap)"
        ));
    }
    if !WITH_CGROUP.contains(&suffix) {
        return invalid(format!(
            "unknown unit type .{suffix} (expected .service, .scope, .slice, .socket, .mount \
             or .swap)"
        ));
    }
    if stem.is_empty() {
        return invalid("empty name before the suffix".into());
    }
    if let Some((prefix, instance)) = stem.split_once('@') {
        if prefix.is_empty() || instance.contains('@') {
            return invalid("'@' must separate a template name and an instance".into());
        }
        if instance.is_empty() {
            return invalid(format!(
                "a template never runs itself: name an instance ({prefix}@NAME.{suffix}) or select \
                 its instances with a cgroup glob"
            ));
        }
    }
    Ok(())
}

/// One `[[attach]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachSpec {
    pub selector: Selector,
    pub policy: Policy,
    /// The prefixes as written, for records and logs.
    pub allow: Vec<String>,
    /// The line of its `[[attach]]` header, for messages that point back at the file.
    pub line: usize,
}

/// The daemon's configuration: each selector at most once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub attach: Vec<AttachSpec>,
}

/// What a reload changes, keyed by selector; each list in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigDiff {
    pub added: Vec<AttachSpec>,
    /// Same selector, different set of prefixes: `(old, new)`.
    pub changed: Vec<(AttachSpec, AttachSpec)>,
    pub removed: Vec<AttachSpec>,
    /// The new specs whose policy is the same; only their line or spelling moved.
    pub unchanged: Vec<AttachSpec>,
}

impl ConfigDiff {
    /// True when a reload has nothing to do.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.changed.is_empty() && self.removed.is_empty()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    attach: Vec<Spanned<RawAttach>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAttach {
    cgroup: Option<Spanned<String>>,
    unit: Option<Spanned<String>>,
    allow: Option<Spanned<Vec<Spanned<String>>>>,
}

impl Config {
    /// Reads and checks `path`; a missing or unreadable file is an error naming it.
    pub fn load(path: &Path) -> Result<Self> {
        let text = fs::read_to_string(path).map_err(|e| {
            // The errno's number adds nothing to its name in a one-line message.
            let e = e.to_string();
            let e = e.split(" (os error ").next().unwrap_or_default();
            anyhow!("config {}: {e}", path.display())
        })?;
        Self::parse(&text, path)
    }

    /// [`Config::load`] for the daemon, which runs as root and attaches what the file says:
    /// a file that a non-root user can change (owned by one, or writable by its group or
    /// by others) would let that user choose which cgroups may bind any address, so it is
    /// refused, as sshd's StrictModes refuses a writable authorized_keys.
    pub fn load_trusted(path: &Path) -> Result<Self> {
        use std::os::unix::fs::MetadataExt as _;
        if let Ok(meta) = fs::metadata(path) {
            // SAFETY: geteuid cannot fail and touches no memory.
            let euid = unsafe { libc::geteuid() };
            if meta.uid() != 0 && meta.uid() != euid {
                return Err(anyhow!(
                    "config {}: owned by uid {}, who could change what freebind attaches; \
                     refused (chown root {0})",
                    path.display(),
                    meta.uid()
                ));
            }
            if meta.mode() & 0o022 != 0 {
                return Err(anyhow!(
                    "config {}: writable by its group or by others (mode {:04o}), who could \
                     change what freebind attaches; refused (chmod 600 {0})",
                    path.display(),
                    meta.mode() & 0o7777
                ));
            }
        }
        Self::load(path)
    }

    /// Checks `text`, read from `origin` (only used in messages). Every error is one line:
    /// `config ORIGIN line N: REASON`.
    pub fn parse(text: &str, origin: &Path) -> Result<Self> {
        let err_at = |pos: usize, msg: &dyn fmt::Display| {
            let line = line_of(text, pos);
            let msg = msg.to_string().replace('\n', "; ");
            anyhow!("config {} line {line}: {msg}", origin.display())
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| match e.span() {
            // `[attach]` for `[[attach]]` is an easy slip, and serde's "invalid type: map,
            // expected a sequence" does not say which bracket is missing.
            Some(span)
                if text
                    .get(span.start..)
                    .is_some_and(|t| t.starts_with("[attach]")) =>
            {
                err_at(
                    span.start,
                    &"[attach] must be [[attach]] (an array of tables: one per selection)",
                )
            }
            Some(span) => err_at(span.start, &e.message()),
            None => anyhow!(
                "config {}: {}",
                origin.display(),
                e.message().replace('\n', "; ")
            ),
        })?;

        let mut attach = Vec::with_capacity(raw.attach.len());
        let mut seen: HashMap<Selector, usize> = HashMap::new();
        for entry in raw.attach {
            let header = entry.span().start;
            let line = line_of(text, header);
            let raw = entry.into_inner();
            let (selector, at) = match (raw.cgroup, raw.unit) {
                (Some(cg), None) => {
                    let sel =
                        CgroupGlob::parse(cg.get_ref()).map_err(|e| err_at(cg.span().start, &e))?;
                    (Selector::Cgroup(sel), cg.span().start)
                }
                (None, Some(unit)) => {
                    check_unit_name(unit.get_ref()).map_err(|e| err_at(unit.span().start, &e))?;
                    (Selector::Unit(unit.get_ref().clone()), unit.span().start)
                }
                _ => {
                    return Err(err_at(
                        header,
                        &"an [[attach]] needs exactly one of cgroup or unit",
                    ))
                }
            };
            let allow: Vec<String> = match raw.allow {
                None => Vec::new(),
                Some(list) if list.get_ref().is_empty() => {
                    // An empty list reads like "nothing" but would mean "any address".
                    return Err(err_at(
                        list.span().start,
                        &"allow = [] would allow any address: omit allow for that, or \
                          list prefixes",
                    ));
                }
                Some(list) => {
                    let mut out = Vec::new();
                    for prefix in list.into_inner() {
                        Policy::parse(&[prefix.get_ref()])
                            .map_err(|e| err_at(prefix.span().start, &e))?;
                        out.push(prefix.into_inner());
                    }
                    out
                }
            };
            if let Some(first) = seen.get(&selector) {
                return Err(err_at(
                    at,
                    &format_args!("{selector} is already selected at line {first}"),
                ));
            }
            seen.insert(selector.clone(), line);
            // Each prefix parsed above; this cannot fail.
            let policy = Policy::parse(&allow).map_err(|e| err_at(header, &e))?;
            attach.push(AttachSpec {
                selector,
                policy,
                allow,
                line,
            });
        }
        Ok(Self { attach })
    }

    /// What changes from `old` to `new`, keyed by selector. Policies are compared as sets
    /// of prefixes, so reordering or respelling `allow` changes nothing in the kernel.
    pub fn diff(old: &Config, new: &Config) -> ConfigDiff {
        let olds: HashMap<&Selector, &AttachSpec> =
            old.attach.iter().map(|s| (&s.selector, s)).collect();
        let news: HashMap<&Selector, &AttachSpec> =
            new.attach.iter().map(|s| (&s.selector, s)).collect();
        let mut diff = ConfigDiff::default();
        for spec in &new.attach {
            match olds.get(&spec.selector) {
                None => diff.added.push(spec.clone()),
                Some(o) if prefix_set(&o.policy) != prefix_set(&spec.policy) => {
                    diff.changed.push(((*o).clone(), spec.clone()))
                }
                Some(_) => diff.unchanged.push(spec.clone()),
            }
        }
        diff.removed = old
            .attach
            .iter()
            .filter(|s| !news.contains_key(&s.selector))
            .cloned()
            .collect();
        diff
    }
}

/// The 1-based line of a byte offset (toml's spans are byte ranges).
fn line_of(text: &str, pos: usize) -> usize {
    let before = &text.as_bytes()[..pos.min(text.len())];
    before.iter().filter(|&&b| b == b'\n').count() + 1
}

fn prefix_set(p: &Policy) -> Vec<(std::net::IpAddr, u8)> {
    let mut v: Vec<_> = p.allow.iter().map(|p| (p.addr, p.len)).collect();
    v.sort();
    v.dedup();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: &str = "/etc/freebind/agent.toml";

    fn parse(text: &str) -> Result<Config> {
        Config::parse(text, Path::new(ORIGIN))
    }

    #[track_caller]
    fn refused(text: &str, line: usize, why: &str) {
        let err = parse(text).expect_err(text).to_string();
        let head = format!("config {ORIGIN} line {line}: ");
        assert!(err.starts_with(&head), "want {head:?}…, got: {err}");
        assert!(err.contains(why), "want {why:?} in: {err}");
        assert!(!err.contains('\n'), "not one line: {err}");
    }

    fn cgroup(s: &str) -> Selector {
        Selector::Cgroup(CgroupGlob::parse(s).unwrap())
    }

    #[test]
    fn example_parses() {
        let c = parse(EXAMPLE).unwrap();
        assert_eq!(c.attach.len(), 2);
        assert_eq!(c.attach[0].selector, cgroup("system.slice/docker-*.scope"));
        assert_eq!(c.attach[0].allow, ["192.0.2.0/24", "2001:db8::/32"]);
        assert_eq!(
            c.attach[0].policy.to_string(),
            "192.0.2.0/24, 2001:db8::/32"
        );
        assert_eq!(c.attach[1].selector, Selector::Unit("nginx.service".into()));
        assert_eq!(c.attach[1].policy, Policy::default());
        assert_eq!(
            c.attach[0].line,
            EXAMPLE.lines().position(|l| l == "[[attach]]").unwrap() + 1
        );
    }

    #[test]
    fn parses_the_brief_example_with_lines() {
        let c = parse(
            "[[attach]]\n\
             cgroup = \"/system.slice/docker-*.scope/\"\n\
             allow = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n\
             [[attach]]\n\
             unit = \"nginx.service\"\n",
        )
        .unwrap();
        assert_eq!(c.attach[0].line, 1);
        assert_eq!(c.attach[1].line, 4);
        assert_eq!(
            c.attach[0].selector.to_string(),
            "cgroup system.slice/docker-*.scope"
        );
        assert_eq!(c.attach[1].selector.to_string(), "unit nginx.service");
    }

    #[test]
    fn empty_config_serves_nothing() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("# nothing yet\n").unwrap(), Config::default());
        assert_eq!(parse("attach = []\n").unwrap(), Config::default());
    }

    #[test]
    fn refuses_toml_syntax_errors_at_their_line() {
        refused("[[attach]]\nunit = \"nginx.service\nallow = []\n", 2, "");
        refused("\n\n[[attach]\nunit = \"a.service\"\n", 3, "");
        refused(
            "[[attach]]\nunit = \"a.service\"\nunit = \"b.service\"\n",
            3,
            "duplicate key",
        );
    }

    #[test]
    fn refuses_unknown_keys() {
        refused(
            "[[attach]]\nunit = \"nginx.service\"\nalow = [\"192.0.2.0/24\"]\n",
            3,
            "unknown field `alow`",
        );
        refused(
            "# c\n[[atach]]\nunit = \"nginx.service\"\n",
            2,
            "unknown field `atach`",
        );
        refused("verbose = true\n", 1, "unknown field `verbose`");
        refused(
            "\n[attach]\nunit = \"a.service\"\n",
            2,
            "must be [[attach]]",
        );
    }

    #[test]
    fn refuses_wrong_types() {
        refused("[[attach]]\ncgroup = 5\n", 2, "invalid type");
        refused(
            "[[attach]]\nunit = \"a.service\"\nallow = \"192.0.2.0/24\"\n",
            3,
            "invalid type",
        );
    }

    #[test]
    fn needs_exactly_one_of_cgroup_or_unit() {
        let why = "an [[attach]] needs exactly one of cgroup or unit";
        refused(
            "[[attach]]\nunit = \"a.service\"\n\n[[attach]]\nallow = [\"192.0.2.1\"]\n",
            4,
            why,
        );
        refused(
            "[[attach]]\nunit = \"a.service\"\n[[attach]]\n\
             cgroup = \"a.slice\"\nunit = \"b.service\"\n",
            3,
            why,
        );
        refused("[[attach]]\n", 1, why);
    }

    #[test]
    fn refuses_bad_prefixes_at_their_line() {
        refused(
            "[[attach]]\nunit = \"a.service\"\nallow = [\n  \"192.0.2.0/24\",\n  \"banana\",\n]\n",
            5,
            "invalid prefix \"banana\": \"banana\" is not an IPv4 or IPv6 address",
        );
        refused(
            "[[attach]]\nunit = \"a.service\"\nallow = [\"192.0.2.10/24\"]\n",
            3,
            "did you mean 192.0.2.0/24",
        );
        refused(
            "[[attach]]\nunit = \"a.service\"\n\nallow = []\n",
            4,
            "omit allow",
        );
    }

    #[test]
    fn refuses_bad_unit_names() {
        for (unit, why) in [
            ("nginx", "no unit type suffix"),
            ("nginx.servic", "unknown unit type .servic"),
            ("multi-user.target", "a .target has no cgroup"),
            ("ng inx.service", "' ' is not allowed"),
            ("ng/inx.service", "'/' is not allowed"),
            (".service", "empty name"),
            ("getty@.service", "a template never runs itself"),
            ("@tty1.service", "'@' must separate"),
        ] {
            refused(
                &format!("[[attach]]\nallow = [\"192.0.2.1\"]\nunit = {unit:?}\n"),
                3,
                &format!("invalid unit name {unit:?}: {why}"),
            );
        }
        let long = format!("{}.service", "a".repeat(250));
        refused(
            &format!("[[attach]]\nunit = {long:?}\n"),
            2,
            "longer than 255",
        );
        for ok in [
            "getty@tty1.service",
            "system-getty.slice",
            "docker-1a2b.scope",
            r"dev-disk-by\x2duuid-1.swap",
            "run-user-1000.mount",
            "sshd.socket",
        ] {
            check_unit_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn refuses_bad_cgroup_globs() {
        for (cg, why) in [
            ("", "empty"),
            ("/", "root cgroup"),
            ("a/../b", "'..'"),
            (
                "/sys/fs/cgroup/system.slice",
                "relative to the cgroup2 mount",
            ),
            ("a/[b", "invalid glob"),
            ("a/**", "'**'"),
        ] {
            refused(
                &format!("[[attach]]\n\ncgroup = {cg:?}\n"),
                3,
                &format!("cgroup {cg:?}"),
            );
            refused(&format!("[[attach]]\ncgroup = {cg:?}\n"), 2, why);
        }
    }

    #[test]
    fn refuses_a_selector_written_twice_naming_both_lines() {
        refused(
            "[[attach]]\ncgroup = \"system.slice/x-*\"\n\n[[attach]]\nunit = \"a.service\"\n\
             [[attach]]\nallow = [\"192.0.2.1\"]\ncgroup = \"/system.slice/x-*/\"\n",
            8,
            "cgroup system.slice/x-* is already selected at line 1",
        );
        refused(
            "[[attach]]\nunit = \"a.service\"\n[[attach]]\nunit = \"a.service\"\n",
            4,
            "unit a.service is already selected at line 1",
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let err = Config::load(Path::new("/nonexistent/freebind/agent.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err == "config /nonexistent/freebind/agent.toml: No such file or directory",
            "{err}"
        );
    }

    #[test]
    fn keys_are_names_and_reversible() {
        for (sel, key) in [
            (Selector::Unit("nginx.service".into()), "unit:nginx.service"),
            (
                Selector::Unit(r"a:b\x2dc.service".into()),
                r"unit:a%3Ab\x2dc.service",
            ),
            (
                cgroup("system.slice/docker-*.scope"),
                "cgroup:system.slice:docker-*.scope",
            ),
            (cgroup("a:b/c~%d"), "cgroup:a%3Ab:c%7E%25d"),
        ] {
            assert_eq!(sel.key(), key);
            assert_eq!(Selector::from_key(key), Some(sel));
        }
        // ':' is the separator, so "a:b" and "a/b" must not share a key.
        assert_ne!(cgroup("a:b").key(), cgroup("a/b").key());
        assert_ne!(
            cgroup("a:b").key(),
            Selector::Unit("a:b.service".into()).key()
        );
    }

    #[test]
    fn long_keys_are_cut_and_hashed() {
        let a = cgroup(&format!("{}/a-*", "x".repeat(250)));
        let b = cgroup(&format!("{}/b-*", "x".repeat(250)));
        let (ka, kb) = (a.key(), b.key());
        assert!(ka.len() <= KEY_MAX && kb.len() <= KEY_MAX, "{ka}");
        assert_ne!(ka, kb);
        assert_eq!(ka, a.key(), "stable");
        assert!(!ka.contains('/') && !ka.contains('\0'));
        assert_eq!(Selector::from_key(&ka), None);
        // Multi-byte characters are not split.
        let c = cgroup(&"é/".repeat(150)[..299]);
        assert!(c.key().len() <= KEY_MAX);
    }

    fn spec(config: &Config, i: usize) -> AttachSpec {
        config.attach[i].clone()
    }

    #[test]
    fn diff_is_keyed_by_selector() {
        let old = parse(
            "[[attach]]\nunit = \"keep.service\"\nallow = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n\
             [[attach]]\nunit = \"change.service\"\n\
             [[attach]]\ncgroup = \"gone.slice/*\"\n",
        )
        .unwrap();
        let new = parse(
            "[[attach]]\ncgroup = \"new.slice/*\"\n\
             [[attach]]\nunit = \"change.service\"\nallow = [\"192.0.2.1\"]\n\
             [[attach]]\nunit = \"keep.service\"\nallow = [\" 2001:db8::/32\", \"192.0.2.0/24\"]\n",
        )
        .unwrap();
        let d = Config::diff(&old, &new);
        assert_eq!(d.added, [spec(&new, 0)]);
        assert_eq!(d.changed, [(spec(&old, 1), spec(&new, 1))]);
        assert_eq!(d.removed, [spec(&old, 2)]);
        assert_eq!(d.unchanged, [spec(&new, 2)]);
        assert!(!d.is_empty());

        let same = Config::diff(&new, &new);
        assert!(same.is_empty());
        assert_eq!(same.unchanged, new.attach);
        let from_nothing = Config::diff(&Config::default(), &new);
        assert_eq!(from_nothing.added, new.attach);
    }
}
