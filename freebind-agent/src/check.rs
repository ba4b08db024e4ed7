//! `freebind-agent check`: everything freebind needs from the kernel and the process, as a
//! table with what to do about each missing piece.
//!
//! The kernel rows are [`kernel::REQUIREMENTS`], the list the agent itself checks when it
//! starts, and the capability rows [`kernel::PRIVILEGES`]: `check` says what the agent
//! would, all at once instead of the first missing piece. Every row is collected whatever
//! the others say; what this process may not probe is marked so, not guessed.
use std::{
    fs, io,
    path::{Path, PathBuf},
};

use anyhow::Result;

use crate::{
    cgroup::unescape_mountinfo,
    kernel::{self, Caps, Kind, Mode, Privilege, Release, Requirement, PRIVILEGES, REQUIREMENTS},
    paths::BPFFS_MOUNT,
};

/// A row's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Present,
    /// freebind cannot run, or not everywhere it should, until it is fixed.
    Missing,
    /// This process may not find out (a probe that takes privileges it lacks).
    NotProbed,
    /// freebind runs without it, doing less or in another way.
    Limited,
}

impl Mark {
    fn symbol(self) -> char {
        match self {
            Mark::Present => '✔',
            Mark::Missing => '✘',
            Mark::NotProbed => '–',
            Mark::Limited => '!',
        }
    }
}

#[derive(Debug)]
struct Row {
    mark: Mark,
    name: String,
    detail: String,
    /// What to do, for anything but [`Mark::Present`].
    fix: Option<String>,
}

impl Row {
    fn new(mark: Mark, name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            mark,
            name: name.into(),
            detail: detail.into(),
            fix: None,
        }
    }

    fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

#[derive(Debug)]
struct Section {
    title: &'static str,
    rows: Vec<Row>,
}

/// Prints the table; true when everything freebind needs is there.
pub fn run() -> Result<bool> {
    // As the agent does before probing: kernels before 5.11 charge maps to the memlock limit.
    kernel::raise_memlock();
    let (caps, caps_error) = match Caps::effective() {
        Ok(caps) => (caps, None),
        Err(e) => (Caps::default(), Some(e)),
    };
    let mut sections: Vec<Section> = [
        (Kind::Kernel, "Kernel"),
        (Kind::Program, "Program types"),
        (Kind::Helper, "Helpers"),
        (Kind::Map, "Map types"),
    ]
    .into_iter()
    .map(|(kind, title)| Section {
        title,
        rows: REQUIREMENTS
            .iter()
            .filter(|r| r.kind == kind)
            .map(|r| requirement_row(r, caps))
            .collect(),
    })
    .collect();
    let modes = modes_section(&sections);
    let release_row = release_row(kernel::running_release(), &sections);
    sections[0].rows.insert(0, release_row);
    sections.push(modes);
    sections.push(system_section());
    sections.push(privileges_section(caps, caps_error));
    let unprivileged_bpf = fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    print!("{}", render(&sections, unprivileged_bpf));
    Ok(passed(&sections))
}

/// Everything is there: nothing missing, nothing left unknown.
fn passed(sections: &[Section]) -> bool {
    sections
        .iter()
        .flat_map(|s| &s.rows)
        .all(|r| matches!(r.mark, Mark::Present | Mark::Limited))
}

fn requirement_row(r: &Requirement, caps: Caps) -> Row {
    let lacking = r.unprobeable(caps);
    if !lacking.is_empty() {
        let doing = match r.kind {
            Kind::Map => "creating maps",
            _ => "loading programs",
        };
        return Row::new(
            Mark::NotProbed,
            r.name(),
            format!(
                "not probed: {doing} needs {}; run as root to test",
                names(&lacking)
            ),
        );
    }
    match r.probe() {
        Ok(true) => Row::new(Mark::Present, r.name(), r.detail()),
        Ok(false) => {
            Row::new(Mark::Missing, r.name(), format!("missing; {}", r.detail())).fix(format!(
                "upgrade to {}; everything freebind uses is in Linux {} or later",
                r.remedy(),
                kernel::oldest_release()
            ))
        }
        Err(e) => {
            let refused = e
                .chain()
                .filter_map(|c| c.downcast_ref::<io::Error>())
                .any(|e| e.raw_os_error() == Some(libc::EPERM));
            let fix = if refused {
                "bpf() refused although this process holds the capabilities: a seccomp \
                 filter or an LSM (a container runtime's default profile) blocks it"
            } else if Mode::Native.needs(r.mode()) {
                "the agent stops at this error when it starts"
            } else {
                "the agent starts without it (see Modes)"
            };
            Row::new(Mark::Missing, r.name(), format!("probe failed: {e:#}")).fix(fix)
        }
    }
}

/// What the kernel rows mean for freebind's two mechanisms: the agent starts only when
/// both work (its bind hooks hold both), and says so in the same words.
fn modes_section(sections: &[Section]) -> Section {
    let mark_of = |r: &Requirement| {
        let name = r.name();
        sections
            .iter()
            .flat_map(|s| &s.rows)
            .find(|row| row.name == name)
            .map_or(Mark::NotProbed, |row| row.mark)
    };
    let row = |mode: Mode, name: &str, what: &str| {
        let needed: Vec<&Requirement> = REQUIREMENTS
            .iter()
            .filter(|r| mode.needs(r.mode()))
            .collect();
        let with = |mark: Mark| -> Vec<String> {
            needed
                .iter()
                .filter(|r| mark_of(r) == mark)
                .map(|r| r.name())
                .collect()
        };
        let (missing, unknown) = (with(Mark::Missing), with(Mark::NotProbed));
        if let Some(first) = needed.iter().find(|r| mark_of(r) == Mark::Missing) {
            Row::new(
                Mark::Missing,
                name,
                format!("{what}; this kernel lacks {}", missing.join(", ")),
            )
            .fix(format!("{}: {}", first.name(), first.remedy()))
        } else if !unknown.is_empty() {
            Row::new(
                Mark::NotProbed,
                name,
                format!(
                    "{what}; {} of its {} rows not probed",
                    unknown.len(),
                    needed.len()
                ),
            )
        } else {
            Row::new(
                Mark::Present,
                name,
                format!("{what}; all {} rows it needs are here", needed.len()),
            )
        }
    };
    Section {
        title: "Modes",
        rows: vec![
            row(
                Mode::Native,
                "native mode",
                "the kernel's own IP_FREEBIND, set from cgroup/setsockopt",
            ),
            row(
                Mode::Steer,
                "steer mode",
                "parking and sk_lookup steering for sockets that bind without setsockopt \
                 (without it: native mode only)",
            ),
            row(
                Mode::SteerUdp,
                "steer mode for UDP",
                "parked UDP sockets entered for steering by a BTF iterator (without it: \
                 TCP steered, UDP left to the kernel)",
            ),
        ],
    }
}

/// "A, B and C".
fn names(privileges: &[Privilege]) -> String {
    let names: Vec<&str> = privileges.iter().map(|p| p.name).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} and {last}", rest.join(", ")),
        _ => names.concat(),
    }
}

/// The release is a guide, the probes are the truth: distributions backport features, so
/// an older release that passed every probe is only worth a remark.
fn release_row(release: Result<String>, sections: &[Section]) -> Row {
    let name = "Linux release";
    let oldest = kernel::oldest_release();
    let release = match release {
        Ok(r) => r,
        Err(e) => return Row::new(Mark::NotProbed, name, format!("{e:#}")),
    };
    let Some(parsed) = Release::parse(&release) else {
        return Row::new(
            Mark::Limited,
            name,
            format!("{release}: not a release number; the probes below decide"),
        );
    };
    let needs = format!("everything freebind uses is in Linux {oldest} or later");
    if parsed >= oldest {
        return Row::new(Mark::Present, name, format!("{release}; {needs}"));
    }
    let probes_passed = sections
        .iter()
        .flat_map(|s| &s.rows)
        .all(|r| r.mark == Mark::Present);
    if probes_passed {
        Row::new(
            Mark::Limited,
            name,
            format!("{release}; {needs}, but every probe passed (backported features)"),
        )
    } else {
        Row::new(Mark::Missing, name, format!("{release}; {needs}"))
            .fix(format!("upgrade to Linux {oldest} or later"))
    }
}

fn system_section() -> Section {
    let rows = match fs::read_to_string("/proc/self/mountinfo") {
        Ok(mountinfo) => {
            let mounts = mounts(&mountinfo);
            let filesystems = fs::read_to_string("/proc/filesystems").unwrap_or_default();
            vec![
                cgroup2_row(&mounts, &filesystems),
                bpffs_row(&mounts, Path::new(BPFFS_MOUNT)),
            ]
        }
        Err(e) => ["cgroup v2", "bpffs"]
            .into_iter()
            .map(|name| {
                Row::new(
                    Mark::NotProbed,
                    name,
                    format!("reading /proc/self/mountinfo: {e}"),
                )
            })
            .collect(),
    };
    Section {
        title: "System",
        rows,
    }
}

/// One line of /proc/self/mountinfo: what is mounted where.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The directory of the filesystem that is mounted (`/` for all of it).
    root: String,
    point: PathBuf,
    fstype: String,
}

fn mounts(mountinfo: &str) -> Vec<Mount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (pre, post) = line.split_once(" - ")?;
            let mut fields = pre.split_whitespace().skip(3);
            Some(Mount {
                root: unescape_mountinfo(fields.next()?),
                point: PathBuf::from(unescape_mountinfo(fields.next()?)),
                fstype: post.split_whitespace().next()?.to_string(),
            })
        })
        .collect()
}

/// "/a (also /b, /c)".
fn points(mounts: &[&Mount]) -> String {
    let all: Vec<String> = mounts
        .iter()
        .map(|m| m.point.display().to_string())
        .collect();
    match all.split_first() {
        Some((first, rest)) if !rest.is_empty() => format!("{first} (also {})", rest.join(", ")),
        _ => all.concat(),
    }
}

/// Only a mount of the whole hierarchy will do, as for the agent (cgroup::Cgroup2): paths
/// built on a subtree's mount would name other cgroups.
fn cgroup2_row(mounts: &[Mount], filesystems: &str) -> Row {
    let name = "cgroup v2";
    let whole: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fstype == "cgroup2" && m.root == "/")
        .collect();
    if !whole.is_empty() {
        return Row::new(
            Mark::Present,
            name,
            format!("mounted on {}", points(&whole)),
        );
    }
    let known = filesystems
        .lines()
        .any(|l| l.split_whitespace().last() == Some("cgroup2"));
    if known {
        Row::new(
            Mark::Limited,
            name,
            "no cgroup2 mount visible here (`ip netns exec` hides it)",
        )
        .fix(
            "`run` and `exec` mount a private one; to attach to the host's cgroups, run the \
             agent where the host's cgroup2 mount is visible",
        )
    } else {
        Row::new(Mark::Missing, name, "this kernel has no cgroup2 filesystem")
            .fix("boot a kernel with cgroup v2 (CONFIG_CGROUPS, CONFIG_CGROUP_BPF)")
    }
}

/// What was mounted last on a point is what is there: a later mount hides an earlier one.
fn bpffs_row(mounts: &[Mount], expected: &Path) -> Row {
    let name = "bpffs";
    let elsewhere: Vec<&Mount> = mounts
        .iter()
        .filter(|m| m.fstype == "bpf" && m.point != expected)
        .collect();
    let here = mounts.iter().rev().find(|m| m.point == expected);
    if here.is_some_and(|m| m.fstype == "bpf") {
        let also = if elsewhere.is_empty() {
            String::new()
        } else {
            format!(" (also {})", points(&elsewhere))
        };
        return Row::new(
            Mark::Present,
            name,
            format!("mounted on {}{also}", expected.display()),
        );
    }
    let detail = if elsewhere.is_empty() {
        "not mounted".to_string()
    } else {
        format!(
            "not mounted on {}, only on {}",
            expected.display(),
            points(&elsewhere)
        )
    };
    Row::new(Mark::Missing, name, detail).fix(format!(
        "mount -t bpf bpf {} (the agent mounts it itself when it starts as root)",
        expected.display()
    ))
}

fn privileges_section(caps: Caps, caps_error: Option<anyhow::Error>) -> Section {
    let mut rows: Vec<Row> = PRIVILEGES.iter().map(|p| privilege_row(p, caps)).collect();
    if let Some(e) = caps_error {
        rows.insert(
            0,
            Row::new(Mark::NotProbed, "capabilities", format!("{e:#}")),
        );
    }
    Section {
        title: "Privileges",
        rows,
    }
}

fn privilege_row(p: &Privilege, caps: Caps) -> Row {
    if caps.has(p) {
        return Row::new(Mark::Present, p.name, p.why);
    }
    let mark = if p.required {
        Mark::Missing
    } else {
        Mark::Limited
    };
    Row::new(mark, p.name, p.why).fix(format!("run as root, or grant {}", p.grant))
}

/// The table, sections one after the other, each aligned on its own longest name; a
/// row's fix goes on the line below it.
fn render(sections: &[Section], unprivileged_bpf: Option<u32>) -> String {
    let mut out = String::new();
    for (i, section) in sections.iter().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(section.title);
        out.push('\n');
        let width = section
            .rows
            .iter()
            .map(|r| r.name.chars().count())
            .max()
            .unwrap_or(0);
        for row in &section.rows {
            let line = format!(
                "  {} {:<width$}  {}",
                row.mark.symbol(),
                row.name,
                row.detail
            );
            out.push_str(line.trim_end());
            out.push('\n');
            if let Some(fix) = &row.fix {
                out.push_str(&format!("    → {fix}\n"));
            }
        }
    }
    out.push('\n');
    out.push_str(&summary(sections, unprivileged_bpf));
    out
}

fn summary(sections: &[Section], unprivileged_bpf: Option<u32>) -> String {
    let count = |mark| {
        sections
            .iter()
            .flat_map(|s| &s.rows)
            .filter(|r| r.mark == mark)
            .count()
    };
    let (missing, unknown, limited) = (
        count(Mark::Missing),
        count(Mark::NotProbed),
        count(Mark::Limited),
    );
    let mut out = String::new();
    if missing == 0 && unknown == 0 {
        out.push_str("Everything freebind needs is here");
        if limited > 0 {
            out.push_str(&format!(" ({limited} ! marks what it would do less)"));
        }
        out.push_str(".\n");
        return out;
    }
    let mut parts = Vec::new();
    if missing > 0 {
        parts.push(format!("{missing} ✘ missing"));
    }
    if unknown > 0 {
        parts.push(format!("{unknown} – not probed"));
    }
    if limited > 0 {
        parts.push(format!("{limited} ! limited"));
    }
    // Only steering pieces missing: the agent starts, with what "Modes" says is left.
    let runs_with_less = unknown == 0
        && sections.iter().any(|s| {
            s.rows
                .iter()
                .any(|r| r.name == "native mode" && r.mark == Mark::Present)
        })
        && sections
            .iter()
            .filter(|s| matches!(s.title, "System" | "Privileges"))
            .all(|s| s.rows.iter().all(|r| r.mark != Mark::Missing));
    if runs_with_less {
        out.push_str(&format!(
            "Runs with less: {} (see Modes for what is left).\n",
            parts.join(", ")
        ));
        return out;
    }
    out.push_str(&format!("Not ready: {}.\n", parts.join(", ")));
    if unknown > 0 {
        out.push_str("Run `freebind-agent check` as root to probe the rows marked –");
        match unprivileged_bpf {
            Some(0) => out.push_str(
                " (kernel.unprivileged_bpf_disabled = 0, but these program and map types \
                 take capabilities whatever it says)",
            ),
            Some(n) => out.push_str(&format!(
                " (kernel.unprivileged_bpf_disabled = {n}: bpf() refuses any process without \
                 CAP_BPF)"
            )),
            None => {}
        }
        out.push_str(".\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(mark: Mark) -> Row {
        Row::new(mark, "x", "")
    }

    #[test]
    fn mountinfo_gives_cgroup2_and_bpffs_on_a_hybrid_host() {
        let mi = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
                  40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                  43 23 0:39 / /sys/fs/bpf rw,relatime - bpf bpf rw\n";
        let m = mounts(mi);
        let row = cgroup2_row(&m, "");
        assert_eq!(row.mark, Mark::Present);
        assert_eq!(row.detail, "mounted on /sys/fs/cgroup/unified");
        let row = bpffs_row(&m, Path::new("/sys/fs/bpf"));
        assert_eq!(row.mark, Mark::Present);
        assert_eq!(row.detail, "mounted on /sys/fs/bpf");
    }

    #[test]
    fn mount_points_are_unescaped_and_optional_fields_skipped() {
        let m = mounts(r"50 40 0:38 / /mnt/my\040bpf rw shared:7 master:1 - bpf none rw");
        assert_eq!(
            m,
            [Mount {
                root: "/".into(),
                point: "/mnt/my bpf".into(),
                fstype: "bpf".into(),
            }]
        );
    }

    #[test]
    fn a_cgroup2_subtree_mount_is_not_the_hierarchy() {
        let m = mounts("50 40 0:38 /system.slice /mnt/sub rw - cgroup2 cgroup2 rw\n");
        let row = cgroup2_row(&m, "nodev\tcgroup\nnodev\tcgroup2\n");
        assert_eq!(row.mark, Mark::Limited, "{row:?}");
        let row = cgroup2_row(&m, "nodev\tcgroup\n");
        assert_eq!(row.mark, Mark::Missing, "{row:?}");
    }

    #[test]
    fn bpffs_elsewhere_or_nowhere_is_missing_with_the_mount_command() {
        let expected = Path::new("/sys/fs/bpf");
        let row = bpffs_row(&mounts("9 1 0:5 / /run/bpf rw - bpf bpf rw\n"), expected);
        assert_eq!(row.mark, Mark::Missing);
        assert_eq!(row.detail, "not mounted on /sys/fs/bpf, only on /run/bpf");
        let row = bpffs_row(&[], expected);
        assert_eq!(row.detail, "not mounted");
        let hidden = mounts(
            "9 1 0:5 / /sys/fs/bpf rw - bpf bpf rw\n\
             10 9 0:6 / /sys/fs/bpf rw - tmpfs tmpfs rw\n",
        );
        assert_eq!(bpffs_row(&hidden, expected).detail, "not mounted");
        assert_eq!(
            row.fix.as_deref(),
            Some(
                "mount -t bpf bpf /sys/fs/bpf (the agent mounts it itself when it starts as root)"
            )
        );
    }

    #[test]
    fn missing_capabilities_say_what_root_would_add() {
        let none = Caps::default();
        let rows: Vec<Row> = PRIVILEGES.iter().map(|p| privilege_row(p, none)).collect();
        let net_admin = rows.iter().find(|r| r.name == "CAP_NET_ADMIN").unwrap();
        assert_eq!(net_admin.mark, Mark::Missing);
        assert_eq!(
            net_admin.fix.as_deref(),
            Some("run as root, or grant CAP_NET_ADMIN")
        );
        let ptrace = rows.iter().find(|r| r.name == "CAP_SYS_PTRACE").unwrap();
        assert_eq!(ptrace.mark, Mark::Limited);
        let root = Caps::from_status("CapEff:\t000001ffffffffff\n");
        assert!(PRIVILEGES
            .iter()
            .all(|p| privilege_row(p, root).mark == Mark::Present));
    }

    #[test]
    fn without_privileges_kernel_features_are_not_probed() {
        let rows: Vec<Row> = REQUIREMENTS
            .iter()
            .filter(|r| r.kind == Kind::Program)
            .map(|r| requirement_row(r, Caps::default()))
            .collect();
        assert!(!rows.is_empty());
        for row in rows {
            assert_eq!(row.mark, Mark::NotProbed, "{row:?}");
            assert!(row.detail.ends_with("; run as root to test"), "{row:?}");
        }
    }

    #[test]
    fn an_old_release_fails_unless_every_probe_passed() {
        let old = || Ok("4.19.0-26-amd64".to_string());
        let passing = [Section {
            title: "t",
            rows: vec![row(Mark::Present)],
        }];
        assert_eq!(release_row(old(), &passing).mark, Mark::Limited);
        let failing = [Section {
            title: "t",
            rows: vec![row(Mark::Present), row(Mark::NotProbed)],
        }];
        let r = release_row(old(), &failing);
        assert_eq!(r.mark, Mark::Missing);
        assert_eq!(
            r.fix,
            Some(format!(
                "upgrade to Linux {} or later",
                kernel::oldest_release()
            ))
        );
        assert_eq!(release_row(Ok("99.0".into()), &failing).mark, Mark::Present);
    }

    #[test]
    fn rows_align_per_section_and_fixes_go_below() {
        let sections = [Section {
            title: "Privileges",
            rows: vec![
                Row::new(Mark::Present, "CAP_BPF", "loading"),
                Row::new(Mark::Missing, "CAP_NET_ADMIN", "attaching").fix("run as root"),
            ],
        }];
        assert_eq!(
            render(&sections, Some(2)),
            "Privileges\n\
             \x20 ✔ CAP_BPF        loading\n\
             \x20 ✘ CAP_NET_ADMIN  attaching\n\
             \x20   → run as root\n\
             \n\
             Not ready: 1 ✘ missing.\n"
        );
        assert!(!passed(&sections));
    }

    #[test]
    fn limits_alone_still_pass() {
        let sections = [Section {
            title: "t",
            rows: vec![row(Mark::Present), row(Mark::Limited)],
        }];
        assert!(passed(&sections));
        assert!(summary(&sections, None).starts_with("Everything freebind needs is here"));
        let sections = [Section {
            title: "t",
            rows: vec![row(Mark::NotProbed)],
        }];
        assert!(!passed(&sections));
        assert!(summary(&sections, Some(2)).contains("as root"));
    }

    #[test]
    fn privileges_are_listed_as_prose() {
        assert_eq!(names(&PRIVILEGES[..1]), "CAP_BPF (or CAP_SYS_ADMIN)");
        assert_eq!(
            names(&PRIVILEGES[..3]),
            "CAP_BPF (or CAP_SYS_ADMIN), CAP_PERFMON (or CAP_SYS_ADMIN) and CAP_NET_ADMIN"
        );
    }
}
