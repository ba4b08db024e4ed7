//! `freebind-agent check` as an operator meets it: as root on this kernel every row is
//! there; without privileges the capabilities are missing, with what to do, and the probes
//! that need them are marked as not probed instead of guessed; a missing bpffs is named
//! with the command that mounts it. Each run is read row by row, not grepped as a whole.
use std::{
    fs, io,
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use freebind_e2e::{agent_command, agent_path, cgroup2_mount, require_root, show_output, TempDir};

/// One row of the table: `  ✔ name  detail`, and the `    → fix` line below it, if any.
#[derive(Debug)]
struct Row {
    mark: char,
    name: String,
    detail: String,
    fix: Option<String>,
}

fn rows(stdout: &str) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    for line in stdout.lines() {
        if let Some(fix) = line.strip_prefix("    → ") {
            let row = rows
                .last_mut()
                .unwrap_or_else(|| panic!("a fix before any row: {line:?}"));
            row.fix = Some(fix.to_string());
            continue;
        }
        let Some(rest) = line.strip_prefix("  ") else {
            continue;
        };
        let mut chars = rest.chars();
        let mark = chars
            .next()
            .unwrap_or_else(|| panic!("empty row: {line:?}"));
        let rest = chars
            .as_str()
            .strip_prefix(' ')
            .unwrap_or_else(|| panic!("no space after the mark: {line:?}"));
        // Names have single spaces; two or more end the name column.
        let (name, detail) = rest.split_once("  ").unwrap_or((rest, ""));
        rows.push(Row {
            mark,
            name: name.to_string(),
            detail: detail.trim_start().to_string(),
            fix: None,
        });
    }
    rows
}

fn row<'a>(rows: &'a [Row], name: &str, out: &Output) -> &'a Row {
    rows.iter()
        .find(|r| r.name == name)
        .unwrap_or_else(|| panic!("no row {name:?} in:\n{}", show_output(out)))
}

const BPFFS: &std::ffi::CStr = c"/sys/fs/bpf";

fn is_bpffs() -> bool {
    const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
    // SAFETY: statfs fills the zeroed plain-data struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(BPFFS.as_ptr(), &mut st) == 0 && st.f_type as u32 == BPF_FS_MAGIC }
}

/// What to do to the mounts before `check` runs.
#[derive(Clone, Copy)]
enum Bpffs {
    Mounted,
    Gone,
}

/// `freebind-agent check` as root, in a mount namespace of its own where bpffs is mounted
/// on /sys/fs/bpf or taken away as asked: the host's mounts are neither relied on nor
/// changed. Everything else (cgroup2, /proc) is the host's.
fn check_as_root(bpffs: Bpffs) -> Output {
    let mut cmd = agent_command();
    cmd.arg("check").stdin(Stdio::null());
    // SAFETY: only syscalls on static C strings between fork and exec (no allocation).
    unsafe {
        cmd.pre_exec(move || {
            if libc::unshare(libc::CLONE_NEWNS) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            match bpffs {
                Bpffs::Mounted if !is_bpffs() => {
                    if libc::mount(
                        c"bpf".as_ptr(),
                        BPFFS.as_ptr(),
                        c"bpf".as_ptr(),
                        0,
                        std::ptr::null(),
                    ) != 0
                    {
                        return Err(io::Error::last_os_error());
                    }
                }
                Bpffs::Gone => {
                    // Stacked mounts come off one at a time.
                    while is_bpffs() {
                        if libc::umount2(BPFFS.as_ptr(), libc::MNT_DETACH) != 0 {
                            return Err(io::Error::last_os_error());
                        }
                    }
                }
                Bpffs::Mounted => {}
            }
            Ok(())
        });
    }
    cmd.output().expect("run freebind-agent check")
}

/// "Linux A.B" in a row's detail, as numbers.
fn releases(detail: &str) -> Vec<(u32, u32)> {
    detail
        .split("Linux ")
        .skip(1)
        .filter_map(|s| {
            let (major, rest) = s.split_once('.')?;
            let minor: String = rest.chars().take_while(char::is_ascii_digit).collect();
            Some((major.parse().ok()?, minor.parse().ok()?))
        })
        .collect()
}

#[test]
fn as_root_on_this_kernel_every_row_is_there_and_check_exits_0() {
    if !require_root() {
        return;
    }
    let out = check_as_root(Bpffs::Mounted);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = rows(&stdout);
    let not_there: Vec<&Row> = rows.iter().filter(|r| r.mark != '✔').collect();
    assert!(
        not_there.is_empty(),
        "rows not ✔: {not_there:#?}\n{}",
        show_output(&out)
    );
    assert_eq!(out.status.code(), Some(0), "{}", show_output(&out));
    assert!(
        stdout.ends_with("\nEverything freebind needs is here.\n"),
        "{}",
        show_output(&out)
    );

    for name in [
        "BTF",
        "SO_NETNS_COOKIE",
        "cgroup/bind4",
        "cgroup/bind6",
        "cgroup/connect4",
        "cgroup/connect6",
        "cgroup/sendmsg4",
        "cgroup/sendmsg6",
        "cgroup/getsockname4",
        "cgroup/getsockname6",
        "cgroup/setsockopt",
        "sockops",
        "sk_lookup",
        "iter/udp",
        "bpf_setsockopt in cgroup/setsockopt",
        "bpf_set_retval in cgroup/bind4",
        "bpf_sk_assign in sk_lookup",
        "bpf_map_update_elem in iter/udp",
        "BPF_MAP_TYPE_LPM_TRIE",
        "BPF_MAP_TYPE_SOCKHASH",
        "BPF_MAP_TYPE_RINGBUF",
        "BPF_MAP_TYPE_SK_STORAGE",
        "BPF_MAP_TYPE_PERCPU_ARRAY",
        "BPF_MAP_TYPE_HASH_OF_MAPS",
        "BPF_MAP_TYPE_SOCKHASH in a BPF_MAP_TYPE_HASH_OF_MAPS",
        "native mode",
        "steer mode",
        "CAP_BPF (or CAP_SYS_ADMIN)",
        "CAP_PERFMON (or CAP_SYS_ADMIN)",
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
    ] {
        row(&rows, name, &out);
    }
    assert_eq!(
        row(&rows, "cgroup/bind4", &out).detail,
        "BPF_PROG_TYPE_CGROUP_SOCK_ADDR, BPF_CGROUP_INET4_BIND; Linux 4.17"
    );
    assert_eq!(
        row(&rows, "cgroup v2", &out).detail,
        format!("mounted on {}", cgroup2_mount().display())
    );
    assert!(
        row(&rows, "bpffs", &out)
            .detail
            .starts_with("mounted on /sys/fs/bpf"),
        "{}",
        show_output(&out)
    );

    // The oldest release named is the newest of the rows' own releases, not a number
    // written somewhere else.
    let uname = Command::new("uname").arg("-r").output().expect("uname -r");
    let uname = String::from_utf8_lossy(&uname.stdout).trim().to_string();
    let release = row(&rows, "Linux release", &out);
    assert!(
        release.detail.starts_with(&format!("{uname}; ")),
        "{release:?}"
    );
    let newest = rows
        .iter()
        .filter(|r| r.name != "Linux release")
        .flat_map(|r| releases(&r.detail))
        .max()
        .expect("rows name releases");
    assert_eq!(
        releases(&release.detail),
        [newest],
        "the release row names the newest requirement: {release:?}"
    );
}

#[test]
fn unprivileged_the_capabilities_are_missing_and_the_probes_are_not_guessed() {
    if !require_root() {
        return;
    }
    // A copy uid 65534 can reach whatever the permissions on the way to the build are.
    let dir = TempDir::new("fb-check");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let agent: PathBuf = dir.path().join("freebind-agent");
    fs::copy(agent_path(), &agent).expect("copy the agent");
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755)).expect("chmod agent");
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&agent)
        .arg("check")
        .stdin(Stdio::null())
        .output()
        .expect("setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rows = rows(&stdout);
    assert_eq!(out.status.code(), Some(1), "{}", show_output(&out));

    let covered =
        "run as root, or grant CAP_SYS_ADMIN (it covers this, and setns() needs it anyway)";
    for (name, fix) in [
        ("CAP_BPF (or CAP_SYS_ADMIN)", covered),
        ("CAP_PERFMON (or CAP_SYS_ADMIN)", covered),
        ("CAP_NET_ADMIN", "run as root, or grant CAP_NET_ADMIN"),
        ("CAP_SYS_ADMIN", "run as root, or grant CAP_SYS_ADMIN"),
    ] {
        let r = row(&rows, name, &out);
        assert_eq!(r.mark, '✘', "{r:?}\n{}", show_output(&out));
        assert_eq!(r.fix.as_deref(), Some(fix), "{r:?}");
    }
    // The daemon serves other users' namespaces with it; the agent runs without it.
    let ptrace = row(&rows, "CAP_SYS_PTRACE", &out);
    assert_eq!(ptrace.mark, '!', "{ptrace:?}");
    assert_eq!(
        ptrace.fix.as_deref(),
        Some("run as root, or grant CAP_SYS_PTRACE")
    );

    let bind4 = row(&rows, "cgroup/bind4", &out);
    assert_eq!(bind4.mark, '–', "{bind4:?}");
    assert_eq!(
        bind4.detail,
        "not probed: loading programs needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_NET_ADMIN; \
         run as root to test"
    );
    assert_eq!(
        row(&rows, "iter/udp", &out).detail,
        "not probed: loading programs needs CAP_BPF (or CAP_SYS_ADMIN) and CAP_PERFMON \
         (or CAP_SYS_ADMIN); run as root to test"
    );
    assert_eq!(
        row(&rows, "BPF_MAP_TYPE_LPM_TRIE", &out).detail,
        "not probed: creating maps needs CAP_BPF (or CAP_SYS_ADMIN); run as root to test"
    );
    // Nothing that takes privileges is reported either way.
    let first_program = rows.iter().position(|r| r.name == "cgroup/bind4").unwrap();
    let last_map = rows
        .iter()
        .rposition(|r| r.name.starts_with("BPF_MAP_TYPE_"))
        .unwrap();
    let guessed: Vec<&Row> = rows[first_program..=last_map]
        .iter()
        .filter(|r| r.mark != '–')
        .collect();
    assert!(
        guessed.is_empty(),
        "probed without privileges: {guessed:#?}"
    );
    // The modes follow from the rows, and so are not guessed either.
    for name in ["native mode", "steer mode"] {
        let r = row(&rows, name, &out);
        assert_eq!(r.mark, '–', "{r:?}\n{}", show_output(&out));
    }
    // What needs no privilege is still probed.
    for name in ["BTF", "SO_NETNS_COOKIE", "Linux release", "cgroup v2"] {
        let r = row(&rows, name, &out);
        assert_eq!(r.mark, '✔', "{r:?}\n{}", show_output(&out));
    }
    assert!(
        stdout.contains("\nRun `freebind-agent check` as root to probe the rows marked –"),
        "{}",
        show_output(&out)
    );
}

#[test]
fn without_bpffs_check_says_how_to_mount_it_and_exits_1() {
    if !require_root() {
        return;
    }
    let out = check_as_root(Bpffs::Gone);
    let rows = rows(&String::from_utf8_lossy(&out.stdout));
    let bpffs = row(&rows, "bpffs", &out);
    assert_eq!(bpffs.mark, '✘', "{}", show_output(&out));
    assert!(bpffs.detail.starts_with("not mounted"), "{bpffs:?}");
    assert_eq!(
        bpffs.fix.as_deref(),
        Some("mount -t bpf bpf /sys/fs/bpf (the agent mounts it itself when it starts as root)")
    );
    let others: Vec<&Row> = rows
        .iter()
        .filter(|r| r.name != "bpffs" && r.mark != '✔')
        .collect();
    assert!(others.is_empty(), "{others:#?}\n{}", show_output(&out));
    assert_eq!(out.status.code(), Some(1), "{}", show_output(&out));
}
