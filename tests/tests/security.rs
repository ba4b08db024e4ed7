//! Least privilege and policy enforcement, tested rather than assumed: what an agent without
//! its capabilities does, who may read or change freebind's pinned objects and config,
//! whether a process in a managed cgroup can slip a refused address past the policy, and
//! whether another cgroup program's deny (attached as systemd attaches SocketBindDeny=, or
//! the older way) survives next to freebind's programs.
use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::CString,
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{FileTypeExt as _, MetadataExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
    process::{Command, ExitStatus},
    time::Duration,
};

use freebind_e2e::{
    agent_command, agent_path, bpf_program_ids_at, bpf_programs_attached, ensure_tools,
    require_root, run_in,
    scenario::{bind_decision, try_bind, EADDRNOTAVAIL, SETTLE},
    tool, unique_name, wait_for_log, wait_until, Agent, Cgroup, Daemon, Installation, Link, Netns,
    Proc, TempDir,
};

/// Cgroup programs of one attachment.
const PROGRAMS: usize = 10;

/// Debian's python3, which any user can run.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The unprivileged user the hostile process runs as.
const NOBODY: u32 = 65534;

/// `setpriv` turning root into that user, with no capability left to inherit.
const AS_NOBODY: [&str; 5] = [
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "--inh-caps=-all",
];

/// How long a command that must end by itself (a refusal to start, a probe) may take. One
/// that is still running then is serving: a refusal that did not come.
const END_TIMEOUT: Duration = Duration::from_secs(30);

/// [`ran`] for a command that must refuse to start.
fn refused(cmd: Command, what: &str) -> (ExitStatus, String) {
    ran(cmd, &format!("{what}, which must be refused,"))
}

/// Runs `cmd` to its end and returns its exit status and what it printed; kills it by
/// pid and fails when it is still running after [`END_TIMEOUT`].
fn ran(cmd: Command, what: &str) -> (ExitStatus, String) {
    let proc = Proc::spawn(cmd, what);
    match proc.wait_timeout(END_TIMEOUT) {
        Some(status) => (status, proc.log()),
        None => {
            proc.kill();
            panic!(
                "{what} still running after {END_TIMEOUT:?}; killed\n{}",
                proc.log()
            );
        }
    }
}

/// The single line of a refused command, after checking it failed without panicking.
fn one_line_refusal(status: ExitStatus, output: &str) -> String {
    let show = || format!("{status}\n{output}");
    assert!(!status.success(), "expected a refusal: {}", show());
    assert_ne!(status.code(), Some(101), "panicked: {}", show());
    assert!(!output.contains("panicked"), "panicked: {}", show());
    let lines: Vec<&str> = output.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {}", show());
    lines[0].to_owned()
}

/// `text` as a config file in `dir`, root's and mode 0600, as `cargo xtask install` writes
/// it.
fn write_config(dir: &TempDir, text: &str) -> PathBuf {
    let config = dir.path().join("agent.toml");
    fs::write(&config, text).unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    config
}

/// A daemon serving a cgroup of the test's own, with `192.0.2.0/24` allowed, from a config
/// file that is root's and 0600 in a directory anyone may enter (so that only the file's
/// own mode stands between a user and it). Fields drop in order: the daemon first.
struct Served {
    daemon: Daemon,
    config: PathBuf,
    _conf: TempDir,
    inst: Installation,
    cg: Cgroup,
    link: Link,
}

impl Served {
    fn new() -> Served {
        ensure_tools();
        let link = Link::new();
        let cg = Cgroup::new("fb-sec");
        let inst = Installation::new("fb-sec");
        let conf = TempDir::new("fb-sec-conf");
        fs::set_permissions(conf.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let config = write_config(&conf, &attach_config(&cg, "192.0.2.0/24"));
        Served {
            daemon: serve(&inst, &link.server, &cg, &config),
            config,
            _conf: conf,
            inst,
            cg,
            link,
        }
    }
}

/// `daemon --config CONFIG` in `ns`, once it has attached `cg` as the config says.
fn serve(inst: &Installation, ns: &Netns, cg: &Cgroup, config: &Path) -> Daemon {
    let daemon = Daemon::start(inst, ns, &["--config", config.to_str().unwrap()]);
    wait_until("the config's attachment", SETTLE, || {
        bpf_programs_attached(cg).len() == PROGRAMS
    });
    daemon
}

fn attach_config(cg: &Cgroup, allow: &str) -> String {
    format!(
        "[[attach]]\ncgroup = \"{}\"\nallow = [\"{allow}\"]\n",
        cg.relative()
    )
}

#[test]
fn without_bpf_or_sys_admin_capabilities_root_is_refused_in_one_line_and_nothing_is_attached_or_pinned(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let ns = Netns::new("fb-sec");
    let cg = Cgroup::new("fb-sec");
    let conf = TempDir::new("fb-sec-conf");
    // Were the check gone, the daemon would attach the test's cgroup, and nothing else.
    let config = write_config(&conf, &attach_config(&cg, "192.0.2.0/24"));
    let config = config.to_str().unwrap();
    for args in [
        vec!["run", "--cgroup", cg.relative()],
        vec!["attach", "--cgroup", cg.relative()],
        vec!["daemon", "--config", config],
    ] {
        let inst = Installation::new("fb-sec");
        // uid 0 with CAP_BPF and CAP_SYS_ADMIN gone from the bounding set, as in a
        // container that keeps root but not those.
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set=-bpf,-sys_admin", "--inh-caps=-all"])
            .arg(agent_path())
            .arg("--pin-dir")
            .arg(inst.pin_dir())
            .arg("--run-dir")
            .arg(inst.run_dir())
            .args(&args);
        ns.enter_on_exec(&mut cmd);
        let (status, output) = refused(cmd, &format!("{} without CAP_BPF", args[0]));
        let line = one_line_refusal(status, &output);
        assert!(
            line.contains("uid 0 lacks CAP_BPF (or CAP_SYS_ADMIN)"),
            "{args:?}: {line}"
        );
        assert_eq!(bpf_programs_attached(&cg), vec![], "{args:?}");
        for dir in [inst.pin_dir(), inst.run_dir()] {
            assert!(!dir.exists(), "{args:?} created {}", dir.display());
        }
    }
}

#[test]
fn the_daemon_refuses_a_config_that_someone_other_than_root_can_change() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let ns = Netns::new("fb-sec");
    let cg = Cgroup::new("fb-sec");
    let inst = Installation::new("fb-sec");
    let dir = TempDir::new("fb-sec-conf");
    let config = write_config(&dir, &attach_config(&cg, "192.0.2.0/24"));
    let start = |why: &str| {
        let cmd = inst.command(Some(&ns), &["daemon", "--config", config.to_str().unwrap()]);
        let (status, output) = refused(cmd, "freebind-daemon");
        assert!(!status.success(), "{output}");
        // The daemon logs its start (the kernel's features) before reading the config;
        // the refusal is the one error line.
        let errors: Vec<&str> = output.lines().filter(|l| !l.starts_with('[')).collect();
        assert_eq!(errors.len(), 1, "{output}");
        let line = errors[0];
        assert!(line.starts_with("freebind-agent: error: "), "{output}");
        assert!(line.contains(&config.display().to_string()), "{line}");
        assert!(line.contains(why), "{line}");
        for dir in [inst.pin_dir(), inst.run_dir()] {
            assert!(
                !dir.exists(),
                "created {} before refusing: {line}",
                dir.display()
            );
        }
        assert_eq!(bpf_programs_attached(&cg), vec![], "{line}");
    };
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).unwrap();
    start("writable by its group or by others");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o620)).unwrap();
    start("writable by its group or by others");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&config, Some(NOBODY), None).unwrap();
    start("owned by uid 65534");
    // The same file, root's and 0600 as installed, is served: what refused it was who
    // could change it.
    std::os::unix::fs::chown(&config, Some(0), None).unwrap();
    let _daemon = serve(&inst, &ns, &cg, &config);
}

#[test]
fn a_config_made_writable_by_others_is_refused_at_reload_and_the_policy_it_would_replace_stays() {
    if !require_root() {
        return;
    }
    let served = Served::new();
    let (link, cg, inst, config, daemon) = (
        &served.link,
        &served.cg,
        &served.inst,
        &served.config,
        &served.daemon,
    );
    let before = policy_dump(inst, cg.relative());
    let refused_bind = || try_bind(&link.server, Some(cg), "tcp", "203.0.113.5", 8080, true);
    assert_eq!(refused_bind(), Err(EADDRNOTAVAIL));

    // An administrator's slip makes the file writable by everyone, and a user in the
    // managed cgroup rewrites it to allow any address.
    fs::set_permissions(config, fs::Permissions::from_mode(0o666)).unwrap();
    let hostile = attach_config(cg, "0.0.0.0/0");
    let mut argv: Vec<&str> = AS_NOBODY.to_vec();
    let config_text = config.to_str().unwrap();
    argv.extend([
        SYSTEM_PYTHON,
        "-c",
        "import sys; open(sys.argv[1], 'w').write(sys.argv[2])",
        config_text,
        hostile.as_str(),
    ]);
    let out = run_in(&link.server, Some(cg), &argv);
    assert!(out.status.success(), "{}", freebind_e2e::show_output(&out));
    assert_eq!(fs::read_to_string(config).unwrap(), hostile);

    daemon.proc().signal(libc::SIGHUP);
    wait_for_log(daemon.proc(), "SIGHUP: config refused", SETTLE);
    let log = daemon.log();
    let line = log
        .lines()
        .find(|l| l.contains("SIGHUP: config refused"))
        .unwrap();
    assert!(
        line.contains("writable by its group or by others"),
        "{line}"
    );
    assert_eq!(policy_dump(inst, cg.relative()), before);
    assert_eq!(refused_bind(), Err(EADDRNOTAVAIL));

    // Once only root can change it, the same text is applied: the refusal was the mode's.
    fs::set_permissions(config, fs::Permissions::from_mode(0o600)).unwrap();
    daemon.proc().signal(libc::SIGHUP);
    wait_until("the reloaded policy", SETTLE, || {
        policy_dump(inst, cg.relative()) != before
    });
    assert_eq!(refused_bind(), Ok(()));
}

/// The directories and the other files below `dir`, `dir` itself first.
fn tree(dir: &Path) -> (Vec<PathBuf>, Vec<PathBuf>) {
    let (mut dirs, mut files) = (vec![dir.to_path_buf()], Vec::new());
    for e in fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            let (d, f) = tree(&e.path());
            dirs.extend(d);
            files.extend(f);
        } else {
            files.push(e.path());
        }
    }
    (dirs, files)
}

/// A pinned object as bpftool names it: `map`, `prog` or `link`, and its kernel id.
fn pinned_object(path: &Path) -> (&'static str, u64) {
    for kind in ["map", "prog", "link"] {
        let out = Command::new(tool("bpftool"))
            .args(["-j", kind, "show", "pinned"])
            .arg(path)
            .output()
            .unwrap();
        let id = serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.get("id").and_then(|i| i.as_u64()));
        if let (true, Some(id)) = (out.status.success(), id) {
            return (kind, id);
        }
    }
    panic!("{} is no map, program or link to bpftool", path.display());
}

/// The IP family of a policy map (`ALLOW_V4`, `ALLOW_V6`), 0 for any other object.
fn policy_family(path: &Path) -> u8 {
    match path.file_name().and_then(|n| n.to_str()) {
        Some("ALLOW_V4") => 4,
        Some("ALLOW_V6") => 6,
        _ => 0,
    }
}

fn assert_mode(path: &Path, ok: impl Fn(u32) -> bool, want: &str) {
    let m = fs::metadata(path).unwrap();
    assert_eq!(m.uid(), 0, "{} is not root's", path.display());
    assert!(
        ok(m.mode() & 0o7777),
        "{} has mode {:04o}; it must be {want}",
        path.display(),
        m.mode() & 0o7777
    );
}

/// Run by a process in the managed cgroup with what it knows of freebind's objects (ids,
/// pins, directories): each way in, tried for real and carried through to the harm it
/// would do (a link detached, a policy widened to every address) whenever a step
/// succeeds. One line per attempt: `WHAT: done`, or `WHAT: STEP: ERRNO` for the step
/// that was refused.
const HOSTILE_PY: &str = r#"
import ctypes, errno, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
args = json.loads(sys.argv[1])
class Refused(Exception):
    pass
def bpf(step, cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(args["nr_bpf"], cmd, buf, 128)
    if r < 0:
        raise Refused(f"{step}: {errno.errorcode[ctypes.get_errno()]}")
    return r
def call(step, f, *a):
    try:
        return f(*a)
    except OSError as e:
        raise Refused(f"{step}: {errno.errorcode[e.errno]}")
def attempt(what, f):
    try:
        f()
        print(f"{what}: done")
    except Refused as r:
        print(f"{what}: {r}")
BPF_F_RDONLY = 1 << 3
def obj_get(path, flags=0):
    p = ctypes.create_string_buffer(path.encode())
    # BPF_OBJ_GET = 7: { pathname u64, bpf_fd u32, file_flags u32 }
    return bpf("BPF_OBJ_GET", 7, struct.pack("=QII", ctypes.addressof(p), 0, flags))
GET_FD_BY_ID = {"prog": 13, "map": 14, "link": 30}
def by_id(kind, i):
    # { id u32, next_id u32, open_flags u32 }
    return bpf(f"BPF_{kind.upper()}_GET_FD_BY_ID", GET_FD_BY_ID[kind], struct.pack("=III", i, 0, 0))
def harm(o, fd):
    if o["kind"] == "link":
        # BPF_LINK_DETACH = 34: { link_fd u32 }; freebind's programs hang on their links.
        bpf("BPF_LINK_DETACH", 34, struct.pack("=I", fd))
    elif o["family"]:
        # An LPM trie key is the prefix length then the address: /0 admits every address.
        size = 4 + (4 if o["family"] == 4 else 16)
        key = ctypes.create_string_buffer(bytes(size), size)
        value = ctypes.create_string_buffer(b"\x01", 1)
        # BPF_MAP_UPDATE_ELEM = 2: { map_fd u32, pad u32, key u64, value u64, flags u64 }
        bpf("BPF_MAP_UPDATE_ELEM", 2, struct.pack("=IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0))
for o in args["objects"]:
    attempt(f"{o['kind']} {o['id']} by id", lambda: harm(o, by_id(o["kind"], o["id"])))
for o in args["pins"]:
    attempt(f"pin {o['path']}", lambda: harm(o, obj_get(o["path"])))
    attempt(f"pin {o['path']} read-only", lambda: obj_get(o["path"], BPF_F_RDONLY))
    attempt(f"open {o['path']}", lambda: os.close(call("open", os.open, o["path"], os.O_RDONLY)))
for p in args["files"]:
    attempt(f"unlink {p}", lambda: call("unlink", os.unlink, p))
for p in args["entries"]:
    attempt(f"rename {p}", lambda: call("rename", os.rename, p, p + "-moved"))
for d in args["dirs"]:
    attempt(f"mkdir in {d}", lambda: call("mkdir", os.mkdir, os.path.join(d, "x")))
if args["control"]:
    def control():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        call("connect", s.connect, args["control"])
    attempt("connect the control socket", control)
if args["control_pin"]:
    attempt("control pin", lambda: obj_get(args["control_pin"]))
"#;

/// Runs [`HOSTILE_PY`] in `cgroup` (as `nobody` unless `as_root`) and returns what each
/// attempt came to.
fn hostile(
    ns: &Netns,
    cgroup: &Cgroup,
    as_root: bool,
    arg: &serde_json::Value,
) -> BTreeMap<String, String> {
    let arg = arg.to_string();
    let mut argv: Vec<&str> = if as_root { vec![] } else { AS_NOBODY.to_vec() };
    // The system's interpreter: a per-user one (pyenv under /root) is not reachable by
    // nobody.
    argv.extend([SYSTEM_PYTHON, "-c", HOSTILE_PY, &arg]);
    let out = run_in(ns, Some(cgroup), &argv);
    assert!(out.status.success(), "{}", freebind_e2e::show_output(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (what, result) = l.split_once(": ").unwrap();
            (what.to_owned(), result.to_owned())
        })
        .collect()
}

/// A map of the test's own, pinned beside freebind's pin directory with mode 0666: the
/// control that says whether bpf() lets an unprivileged process open a pin whose mode
/// allows it (so a refusal of freebind's pins is their mode's doing), or turns every
/// BPF_OBJ_GET away before looking at the file. Removed on drop.
struct ControlPin {
    dir: PathBuf,
    pin: PathBuf,
}

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;

impl ControlPin {
    fn new(bpffs_dir: &Path) -> ControlPin {
        let dir = bpffs_dir.join(unique_name("fb-sec-control"));
        fs::create_dir(&dir).unwrap();
        let control = ControlPin {
            pin: dir.join("map"),
            dir,
        };
        fs::set_permissions(&control.dir, fs::Permissions::from_mode(0o755)).unwrap();
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_MAP_TYPE_ARRAY.to_ne_bytes());
        put(&mut attr, 4, &4u32.to_ne_bytes());
        put(&mut attr, 8, &4u32.to_ne_bytes());
        put(&mut attr, 12, &1u32.to_ne_bytes());
        put(&mut attr, 28, b"fb_test_control");
        let map = bpf_fd(
            BPF_MAP_CREATE,
            &mut attr,
            "BPF_MAP_CREATE of the control map",
        );
        let path = CString::new(control.pin.as_os_str().as_bytes()).unwrap();
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(path.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 8, &(map.as_raw_fd() as u32).to_ne_bytes());
        bpf(BPF_OBJ_PIN, &mut attr)
            .unwrap_or_else(|e| panic!("BPF_OBJ_PIN {}: {e}", control.pin.display()));
        fs::set_permissions(&control.pin, fs::Permissions::from_mode(0o666)).unwrap();
        control
    }
}

impl Drop for ControlPin {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.dir) {
            eprintln!("freebind-e2e: removing {}: {e}", self.dir.display());
        }
    }
}

#[test]
fn an_unprivileged_process_in_the_managed_cgroup_cannot_open_or_change_freebinds_maps_programs_or_links(
) {
    if !require_root() {
        return;
    }
    let served = Served::new();
    let (link, cg, inst) = (&served.link, &served.cg, &served.inst);
    let control_pin = ControlPin::new(inst.pin_dir().parent().unwrap());

    // Every pinned object (maps, programs, links) is root's and 0600; no directory of the
    // pin tree or of the run directory lets anyone else unlink, rename or add an entry.
    let (pin_dirs, pin_files) = tree(inst.pin_dir());
    let (run_dirs, run_files) = tree(inst.run_dir());
    assert!(pin_files.len() > 20, "{pin_files:?}");
    for d in pin_dirs.iter().chain(&run_dirs) {
        assert_mode(d, |m| m & 0o022 == 0, "writable by root alone");
    }
    for f in &pin_files {
        assert_mode(f, |m| m == 0o600, "0600");
    }
    let control = inst.run_dir().join("control.sock");
    assert!(fs::metadata(&control).unwrap().file_type().is_socket());
    assert_mode(&control, |m| m == 0o600, "0600 (only root may connect)");
    for f in &run_files {
        assert_mode(f, |m| m & 0o022 == 0, "writable by root alone");
    }

    let pins: Vec<serde_json::Value> = pin_files
        .iter()
        .map(|p| {
            let (kind, id) = pinned_object(p);
            serde_json::json!({"path": p, "kind": kind, "id": id, "family": policy_family(p)})
        })
        .collect();
    let mut by_id: BTreeSet<(String, u64, u8)> = pins
        .iter()
        .map(|o| {
            let kind = o["kind"].as_str().unwrap().to_owned();
            (
                kind,
                o["id"].as_u64().unwrap(),
                o["family"].as_u64().unwrap() as u8,
            )
        })
        .collect();
    let prog_ids = bpf_program_ids_at(cg.path());
    by_id.extend(prog_ids.iter().map(|&id| ("prog".to_owned(), id, 0)));
    for kind in ["map", "prog", "link"] {
        assert!(by_id.iter().any(|o| o.0 == kind), "no {kind}: {by_id:?}");
    }
    assert_eq!(
        by_id.iter().filter(|o| o.2 != 0).count(),
        2,
        "the attachment's two policy maps: {by_id:?}"
    );
    let objects: Vec<serde_json::Value> = by_id
        .iter()
        .map(|(kind, id, family)| serde_json::json!({"kind": kind, "id": id, "family": family}))
        .collect();
    let strings = |paths: &[PathBuf]| -> Vec<String> {
        paths.iter().map(|p| p.display().to_string()).collect()
    };
    let files: Vec<PathBuf> = pin_files.iter().chain(&run_files).cloned().collect();
    // Below the two directories only: their own parents (bpffs's root, /run) are not
    // freebind's.
    let entries: Vec<PathBuf> = pin_dirs[1..]
        .iter()
        .chain(&run_dirs[1..])
        .chain(&files)
        .cloned()
        .collect();
    let dirs: Vec<PathBuf> = pin_dirs.iter().chain(&run_dirs).cloned().collect();
    let links = live_links(&by_id);
    assert!(!links.is_empty(), "{by_id:?}");
    let policy_before = policy_dump(inst, cg.relative());

    let got = hostile(
        &link.server,
        cg,
        false,
        &serde_json::json!({
            "nr_bpf": libc::SYS_bpf,
            "objects": objects,
            "pins": pins,
            "files": strings(&files),
            "entries": strings(&entries),
            "dirs": strings(&dirs),
            "control": control,
            "control_pin": &control_pin.pin,
        }),
    );

    // Where this user may open a pin whose mode allows it, bpf() looks at the file, and
    // freebind's pins must be refused for their mode (EACCES). Where bpf() is closed to
    // unprivileged users before any file is looked at, it is EPERM for every pin alike.
    let obj_get = match got.get("control pin").map(String::as_str) {
        Some("done") => "BPF_OBJ_GET: EACCES",
        Some("BPF_OBJ_GET: EPERM") => {
            let disabled = fs::read_to_string("/proc/sys/kernel/unprivileged_bpf_disabled")
                .unwrap_or_default();
            assert_ne!(
                disabled.trim(),
                "0",
                "BPF_OBJ_GET of a pin with mode 0666 refused with EPERM although \
                 unprivileged bpf() is enabled"
            );
            eprintln!(
                "freebind-e2e: unprivileged bpf() is disabled ({}): pins are refused before \
                 their mode is looked at; their modes are checked above",
                disabled.trim()
            );
            "BPF_OBJ_GET: EPERM"
        }
        other => panic!("the control pin gave {other:?}"),
    };
    let mut want: BTreeMap<String, String> = BTreeMap::new();
    let mut expect = |what: String, result: &str| {
        want.insert(what, result.to_owned());
    };
    expect("control pin".into(), got["control pin"].as_str());
    expect("connect the control socket".into(), "connect: EACCES");
    // An id gives a descriptor only with CAP_SYS_ADMIN, whatever the sysctl says.
    for (kind, id, _) in &by_id {
        let step = format!("BPF_{}_GET_FD_BY_ID: EPERM", kind.to_uppercase());
        expect(format!("{kind} {id} by id"), &step);
    }
    for p in &pin_files {
        expect(format!("pin {}", p.display()), obj_get);
        expect(format!("pin {} read-only", p.display()), obj_get);
        expect(format!("open {}", p.display()), "open: EACCES");
    }
    for p in &files {
        expect(format!("unlink {}", p.display()), "unlink: EACCES");
    }
    for p in &entries {
        expect(format!("rename {}", p.display()), "rename: EACCES");
    }
    for d in &dirs {
        expect(format!("mkdir in {}", d.display()), "mkdir: EACCES");
    }
    let wrong: Vec<String> = want
        .keys()
        .chain(got.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| want.get(*k) != got.get(*k))
        .map(|k| format!("{k}: got {:?}, want {:?}", got.get(k), want.get(k)))
        .collect();
    assert!(
        wrong.is_empty(),
        "an unprivileged process in the managed cgroup:\n{}",
        wrong.join("\n")
    );

    // Nothing it tried changed anything, and freebind still enforces: an allowed address
    // that is not local binds in both modes, a refused one does not.
    assert_eq!(bpf_program_ids_at(cg.path()), prog_ids);
    assert_eq!(live_links(&by_id), links);
    assert_eq!(policy_dump(inst, cg.relative()), policy_before);
    assert_eq!(tree(inst.pin_dir()).1, pin_files);
    let bind = |addr: &str, port: u16, native: bool| {
        try_bind(&link.server, Some(cg), "tcp", addr, port, native)
    };
    assert_eq!(bind("192.0.2.40", 8080, true), Ok(()), "native");
    assert_eq!(bind("192.0.2.41", 8080, false), Ok(()), "steered");
    assert_eq!(bind("203.0.113.5", 8080, true), Err(EADDRNOTAVAIL));

    // The same attempts by root do what they say: the links go and the policy admits
    // every address. (Last: this undoes the attachment.)
    let harmful: Vec<&serde_json::Value> = objects
        .iter()
        .filter(|o| o["kind"] == "link" || o["family"] != 0)
        .collect();
    let got = hostile(
        &link.server,
        cg,
        true,
        &serde_json::json!({
            "nr_bpf": libc::SYS_bpf, "objects": harmful, "pins": [], "files": [],
            "entries": [], "dirs": [], "control": null, "control_pin": null,
        }),
    );
    assert_eq!(got.len(), harmful.len(), "{got:?}");
    assert!(got.values().all(|r| r == "done"), "{got:?}");
    assert_eq!(live_links(&by_id), Vec::<u64>::new());
    assert_ne!(policy_dump(inst, cg.relative()), policy_before);
}

/// The links among `objects` that still hold their program to a cgroup or a network
/// namespace (`bpftool link show`: a detached link keeps its id, with a target of 0).
fn live_links(objects: &BTreeSet<(String, u64, u8)>) -> Vec<u64> {
    let out = Command::new(tool("bpftool"))
        .args(["-j", "link", "show"])
        .output()
        .unwrap();
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let live: BTreeSet<u64> = all
        .iter()
        .filter(|l| {
            ["cgroup_id", "netns_ino"]
                .iter()
                .any(|k| l.get(*k).and_then(|v| v.as_u64()).is_some_and(|v| v != 0))
        })
        .filter_map(|l| l.get("id").and_then(|i| i.as_u64()))
        .collect();
    objects
        .iter()
        .filter(|o| o.0 == "link" && live.contains(&o.1))
        .map(|o| o.1)
        .collect()
}

/// The attachment's policy tries as bpftool dumps them.
fn policy_dump(inst: &Installation, key_cgroup: &str) -> String {
    let dir = inst
        .pin_dir()
        .join("attach")
        .join(format!("cgroup:{}", key_cgroup.replace('.', "%2E")));
    ["ALLOW_V4", "ALLOW_V6"]
        .iter()
        .map(|m| {
            let out = Command::new(tool("bpftool"))
                .args(["-j", "map", "dump", "pinned"])
                .arg(dir.join(m))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}: {}",
                dir.display(),
                freebind_e2e::show_output(&out)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

/// Lists the process's descriptors above stderr, one `fd N -> TARGET` line each. The one
/// os.listdir() read the list through is closed by the time it is looked at.
const DESCRIPTORS_PY: &str = "import os
for fd in sorted(os.listdir('/proc/self/fd'), key=int):
    try:
        if int(fd) > 2:
            print(f'fd {fd} -> ' + os.readlink(f'/proc/self/fd/{fd}'))
    except FileNotFoundError:
        pass
print('end of descriptors')
";

/// What [`DESCRIPTORS_PY`] run as nobody by `cmd` (followed by its argv) lists.
fn descriptors(ns: &Netns, mut cmd: Command, what: &str) -> BTreeSet<String> {
    cmd.args(AS_NOBODY)
        .args([SYSTEM_PYTHON, "-c", DESCRIPTORS_PY]);
    ns.enter_on_exec(&mut cmd);
    let (status, log) = ran(cmd, what);
    assert!(
        status.success() && log.contains("end of descriptors"),
        "{what}: {status}\n{log}"
    );
    log.lines()
        .filter(|l| l.starts_with("fd "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_command_that_exec_starts_holds_no_descriptor_of_the_agent_once_it_drops_root() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let ns = Netns::new("fb-sec");
    let inst = Installation::new("fb-sec");
    // A descriptor of one of the agent's links or maps would be all an unprivileged
    // process needs to detach or rewrite it: the kernel checks what the caller holds, not
    // who it is. What the test itself passes down is the baseline.
    let mut env = Command::new("env");
    env.arg("--");
    let own = descriptors(&ns, env, "the test's own command");
    let mut exec = agent_command();
    exec.arg("--pin-dir")
        .arg(inst.pin_dir())
        .arg("--run-dir")
        .arg(inst.run_dir())
        .args(["exec", "--allow", "192.0.2.0/24", "--"]);
    let under_exec = descriptors(&ns, exec, "freebind-agent exec");
    let added: Vec<&String> = under_exec.difference(&own).collect();
    assert!(
        added.is_empty(),
        "a command under exec holds the agent's {added:?} (the test passes down {own:?})"
    );
}

/// Binds as the managed process would, and prints one JSON object with an entry per
/// attempt.
const BYPASS_PY: &str = r#"
import ctypes, errno, json, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
IP_FREEBIND = 15
def sockaddr(fam, sa_family, ip, port):
    if fam == socket.AF_INET:
        return struct.pack("=H", sa_family) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8
    return struct.pack("=H", sa_family) + struct.pack("!H", port) + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4
def bind(s, sa_family, ip, port):
    buf = sockaddr(s.family, sa_family, ip, port)
    r = libc.bind(s.fileno(), buf, len(buf))
    return "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
def sock(fam, native, kind=socket.SOCK_STREAM):
    s = socket.socket(fam, kind)
    if native:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s
native = sys.argv[1] == "native"
out = {}
keep = []
AF4, AF6, UNSPEC = socket.AF_INET, socket.AF_INET6, 0
for name, fam, safam, ip, port in [
    ("v4 refused", AF4, AF4, "203.0.113.5", 7100),
    ("v4-mapped refused", AF6, AF6, "::ffff:203.0.113.5", 7101),
    ("v4-mapped allowed", AF6, AF6, "::ffff:192.0.2.20", 7102),
    ("AF_UNSPEC refused", AF4, UNSPEC, "203.0.113.5", 7103),
    ("AF_UNSPEC allowed", AF4, UNSPEC, "192.0.2.20", 7104),
    ("AF_UNSPEC any", AF4, UNSPEC, "0.0.0.0", 7105),
    ("AF_UNSPEC on AF_INET6", AF6, UNSPEC, "2001:db8:1::20", 7106),
]:
    s = sock(fam, native)
    out[name] = [bind(s, safam, ip, port), s.getsockname()[:2]]
# A second bind() on a bound socket: to a refused address, to another allowed one.
for name, first, second in [
    ("second bind refused", ("192.0.2.20", 7110), ("203.0.113.5", 7111)),
    ("second bind allowed", ("192.0.2.20", 7112), ("192.0.2.21", 7113)),
    ("second bind after local", ("127.0.0.1", 7114), ("203.0.113.5", 7115)),
]:
    s = sock(AF4, native)
    r1 = bind(s, AF4, *first)
    r2 = bind(s, AF4, *second)
    s.listen(1)
    out[name] = [r1, r2, s.getsockname()[:2]]
    keep.append(s)
# A bind the policy refused, tried again on the same socket (in native mode the socket is
# already freebind: its setsockopt was rewritten), then an allowed address.
port = 7120
for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
    for name, fam, tries, allowed in [
        ("v4", AF4, ["203.0.113.5", "203.0.113.5", "198.51.100.5"], "192.0.2.22"),
        ("v6", AF6, ["2001:db8:2::5", "2001:db8:2::5", "2001:db8:3::5"], "2001:db8:1::22"),
        ("v6 then v4-mapped", AF6, ["2001:db8:2::5", "::ffff:203.0.113.5"], "::ffff:192.0.2.23"),
        ("v4-mapped", AF6, ["::ffff:203.0.113.5", "::ffff:203.0.113.5", "2001:db8:2::5"], "2001:db8:1::23"),
    ]:
        s = sock(fam, native, kind)
        results = [bind(s, fam, ip, port) for ip in tries]
        out[f"{proto} {name} retry"] = {
            "refused": results,
            "freebind": s.getsockopt(socket.SOL_IP, IP_FREEBIND),
            "port before": s.getsockname()[1],
            "allowed": bind(s, fam, allowed, port),
            "bound": list(s.getsockname()[:2]),
            "want": [allowed, port],
        }
        keep.append(s)
        port += 1
print(json.dumps(out))
"#;

fn bypass_probe(ns: &Netns, cgroup: Option<&Cgroup>, mode: &str) -> serde_json::Value {
    let out = run_in(ns, cgroup, &["python3", "-c", BYPASS_PY, mode]);
    assert!(out.status.success(), "{}", freebind_e2e::show_output(&out));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", freebind_e2e::show_output(&out)))
}

/// `agent run` with an installation of the test's own, so that its foreground record goes
/// there and not to the host's run directory.
fn run_agent(link: &Link, cg: &Cgroup, inst: &Installation, allow: &[&str]) -> Agent {
    let mut args: Vec<&str> = allow.iter().flat_map(|a| ["--allow", *a]).collect();
    args.extend([
        "--pin-dir",
        inst.pin_dir().to_str().unwrap(),
        "--run-dir",
        inst.run_dir().to_str().unwrap(),
    ]);
    Agent::run(&link.server, cg, &args)
}

#[test]
fn the_policy_cannot_be_bypassed_with_v4_mapped_addresses_af_unspec_a_retry_or_a_second_bind() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cg = Cgroup::new("fb-sec");
    let inst = Installation::new("fb-sec");
    let agent = run_agent(&link, &cg, &inst, &["192.0.2.0/24", "2001:db8:1::/48"]);
    let outside = bypass_probe(&link.server, None, "native");
    for mode in ["native", "steered"] {
        let r = bypass_probe(&link.server, Some(&cg), mode);
        let result = |k: &str| r[k][0].as_str().unwrap().to_owned();
        let name = |k: &str| format!("{mode}: {k}: {}", r[k]);
        // A refused IPv4 address is refused the same way written v4-mapped on an AF_INET6
        // socket; an allowed one binds either way.
        for (k, want) in [
            ("v4 refused", "EADDRNOTAVAIL"),
            ("v4-mapped refused", "EADDRNOTAVAIL"),
            ("v4-mapped allowed", "ok"),
        ] {
            assert_eq!(result(k), want, "{}", name(k));
        }
        // AF_UNSPEC: the kernel accepts it only for INADDR_ANY; freebind neither turns a
        // refused address into a bind nor an allowed one into something the kernel
        // itself would not accept.
        assert_ne!(
            result("AF_UNSPEC refused"),
            "ok",
            "{}",
            name("AF_UNSPEC refused")
        );
        assert_eq!(
            r["AF_UNSPEC refused"][1], outside["AF_UNSPEC refused"][1],
            "unbound"
        );
        for k in [
            "AF_UNSPEC allowed",
            "AF_UNSPEC any",
            "AF_UNSPEC on AF_INET6",
        ] {
            assert_eq!(r[k], outside[k], "{} (outside: {})", name(k), outside[k]);
        }
        // A second bind() fails and the socket keeps its first address: the kernel
        // refuses it (EINVAL for a freebind socket; a parked one is not freebind, so the
        // kernel's address check comes first: EADDRNOTAVAIL, as for any socket) and
        // freebind does not judge it again.
        for (k, first) in [
            ("second bind refused", "192.0.2.20:7110"),
            ("second bind allowed", "192.0.2.20:7112"),
            ("second bind after local", "127.0.0.1:7114"),
        ] {
            let v = &r[k];
            assert_eq!(v[0], "ok", "{}", name(k));
            assert!(
                matches!(v[1].as_str(), Some("EINVAL" | "EADDRNOTAVAIL")),
                "{}",
                name(k)
            );
            let (ip, port) = first.split_once(':').unwrap();
            assert_eq!(
                v[2],
                serde_json::json!([ip, port.parse::<u16>().unwrap()]),
                "{}",
                name(k)
            );
        }
        // A refused bind tried again on the same socket is refused again, however the
        // address is written, though in native mode the socket is freebind by then; the
        // socket stays unbound and binds an allowed address afterwards.
        let mut retries = 0;
        for (k, v) in r.as_object().unwrap() {
            if !k.ends_with(" retry") {
                continue;
            }
            retries += 1;
            let k = k.as_str();
            assert!(
                v["refused"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|e| e == "EADDRNOTAVAIL"),
                "{}",
                name(k)
            );
            assert_eq!(v["freebind"], u8::from(mode == "native"), "{}", name(k));
            assert_eq!(v["port before"], 0, "{}", name(k));
            assert_eq!(v["allowed"], "ok", "{}", name(k));
            assert_eq!(v["bound"], v["want"], "{}", name(k));
        }
        assert_eq!(retries, 8, "{r}");
    }
    // Decisions reach the log in the order the binds were made: once a bind made after
    // all the others is logged, any decision on a second bind would be there too.
    assert_eq!(
        try_bind(&link.server, Some(&cg), "tcp", "192.0.2.99", 7199, true),
        Ok(())
    );
    wait_for_log(agent.proc(), "bind 192.0.2.99:7199/tcp by", SETTLE);
    for second in ["203.0.113.5:7111", "192.0.2.21:7113", "203.0.113.5:7115"] {
        assert!(
            !agent.log().contains(&format!("bind {second}/tcp")),
            "a second bind was judged: {second}\n{}",
            agent.log()
        );
    }
    drop(agent);
}

/// A cgroup/bind4 program of the test's own that denies one port (returns 0, so the
/// kernel fails the bind with EPERM), attached alongside the cgroup's others: with a bpf
/// link (BPF_LINK_CREATE), as systemd attaches SocketBindDeny=, or with BPF_PROG_ATTACH
/// and BPF_F_ALLOW_MULTI, as older tools do. Detached (and unloaded) on drop.
struct DenyPort {
    prog: OwnedFd,
    cgroup: fs::File,
    /// Its link, when attached with one: closing it detaches the program.
    link: Option<OwnedFd>,
}

#[derive(Clone, Copy, Debug)]
enum AttachWith {
    Link,
    ProgAttach,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_CGROUP_SOCK_ADDR: u32 = 18;
const BPF_CGROUP_INET4_BIND: u32 = 8;
const BPF_F_ALLOW_MULTI: u32 = 2;

fn bpf(cmd: libc::c_long, attr: &mut [u8; 128]) -> std::io::Result<i64> {
    // SAFETY: `attr` is a zero-padded bpf_attr the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// A bpf() command that returns a new descriptor; panics naming `what` when it fails.
fn bpf_fd(cmd: libc::c_long, attr: &mut [u8; 128], what: &str) -> OwnedFd {
    let fd = bpf(cmd, attr).unwrap_or_else(|e| panic!("{what}: {e}"));
    // SAFETY: a new descriptor the kernel just gave us.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

fn put(attr: &mut [u8; 128], off: usize, bytes: &[u8]) {
    attr[off..off + bytes.len()].copy_from_slice(bytes);
}

/// One eBPF instruction: opcode, dst and src registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut i = [0u8; 8];
    i[0] = code;
    i[1] = (src << 4) | dst;
    i[2..4].copy_from_slice(&off.to_le_bytes());
    i[4..8].copy_from_slice(&imm.to_le_bytes());
    i
}

impl DenyPort {
    fn attach(cgroup: &Cgroup, port: u16, with: AttachWith) -> DenyPort {
        // r2 = ctx->user_port (offset 24 in struct bpf_sock_addr; network byte order in
        // the low 16 bits); r0 = 1; if r2 != htons(port) goto exit; r0 = 0; exit.
        let prog: Vec<u8> = [
            insn(0x61, 2, 1, 24, 0),
            insn(0xb7, 0, 0, 0, 1),
            insn(0x55, 2, 0, 1, i32::from(port.to_be())),
            insn(0xb7, 0, 0, 0, 0),
            insn(0x95, 0, 0, 0, 0),
        ]
        .concat();
        let license = c"GPL";
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &BPF_PROG_TYPE_CGROUP_SOCK_ADDR.to_ne_bytes());
        put(&mut attr, 4, &((prog.len() / 8) as u32).to_ne_bytes());
        put(&mut attr, 8, &(prog.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 16, &(license.as_ptr() as u64).to_ne_bytes());
        put(&mut attr, 48, b"fb_test_deny");
        put(&mut attr, 68, &BPF_CGROUP_INET4_BIND.to_ne_bytes());
        let prog = bpf_fd(
            BPF_PROG_LOAD,
            &mut attr,
            &format!("BPF_PROG_LOAD of the port-{port} deny program"),
        );
        let cg = fs::File::open(cgroup.path()).unwrap();
        let mut attr = [0u8; 128];
        // Both commands start { target/prog fd, prog/target fd, attach type, flags }.
        let (first, second) = match with {
            AttachWith::Link => (prog.as_raw_fd(), cg.as_raw_fd()),
            AttachWith::ProgAttach => (cg.as_raw_fd(), prog.as_raw_fd()),
        };
        put(&mut attr, 0, &(first as u32).to_ne_bytes());
        put(&mut attr, 4, &(second as u32).to_ne_bytes());
        put(&mut attr, 8, &BPF_CGROUP_INET4_BIND.to_ne_bytes());
        let what = format!("{with:?} to {}", cgroup.path().display());
        let link = match with {
            AttachWith::Link => Some(bpf_fd(BPF_LINK_CREATE, &mut attr, &what)),
            AttachWith::ProgAttach => {
                put(&mut attr, 12, &BPF_F_ALLOW_MULTI.to_ne_bytes());
                bpf(BPF_PROG_ATTACH, &mut attr).unwrap_or_else(|e| panic!("{what}: {e}"));
                None
            }
        };
        DenyPort {
            prog,
            cgroup: cg,
            link,
        }
    }
}

impl Drop for DenyPort {
    fn drop(&mut self) {
        if self.link.is_some() {
            return;
        }
        let mut attr = [0u8; 128];
        put(
            &mut attr,
            0,
            &(self.cgroup.as_raw_fd() as u32).to_ne_bytes(),
        );
        put(&mut attr, 4, &(self.prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &BPF_CGROUP_INET4_BIND.to_ne_bytes());
        if let Err(e) = bpf(BPF_PROG_DETACH, &mut attr) {
            // Gone with its cgroup already, which is fine.
            if e.raw_os_error() != Some(libc::ENOENT) {
                eprintln!("freebind-e2e: detaching the deny program: {e}");
            }
        }
    }
}

/// Binds a TCP socket to each `ADDR:PORT` (after SO_REUSEADDR in native mode), then
/// listens on it: listen() on a socket that is not bound picks a port of the kernel's
/// choosing, so a bind that took effect despite its error would listen on its own port.
/// Prints `{ADDR:PORT: [errno name or "ok", the port listened on]}`.
const DENIED_PY: &str = r#"
import errno, json, socket, sys
out = {}
for target in sys.argv[2:]:
    ip, port = target.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if sys.argv[1] == "native":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((ip, int(port)))
        r = "ok"
    except OSError as e:
        r = errno.errorcode[e.errno]
    s.listen(1)
    out[target] = [r, s.getsockname()[1]]
    s.close()
print(json.dumps(out))
"#;

#[test]
fn another_programs_deny_on_the_same_cgroup_keeps_its_effect_whatever_freebind_decides() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cg = Cgroup::new("fb-coexist");
    let inst = Installation::new("fb-coexist");
    // Denies attached before freebind and after it, with a link and without: the kernel
    // runs every program of the cgroup and any refusal wins, in any order.
    let mut denies = vec![
        (7776, DenyPort::attach(&cg, 7776, AttachWith::ProgAttach)),
        (7777, DenyPort::attach(&cg, 7777, AttachWith::Link)),
    ];
    let agent = run_agent(&link, &cg, &inst, &["192.0.2.0/24"]);
    denies.push((7778, DenyPort::attach(&cg, 7778, AttachWith::ProgAttach)));
    denies.push((7779, DenyPort::attach(&cg, 7779, AttachWith::Link)));
    let denied: Vec<u16> = denies.iter().map(|(port, _)| *port).collect();
    let count_denies = || {
        let attached = bpf_programs_attached(&cg);
        let deny = attached
            .iter()
            .filter(|(ty, name)| ty == "cgroup_inet4_bind" && name == "fb_test_deny")
            .count();
        (deny, attached.len())
    };
    assert_eq!(count_denies(), (4, PROGRAMS + 4));

    let probe = |native: bool, targets: &[String]| -> serde_json::Value {
        let mode = if native { "native" } else { "steered" };
        let mut argv = vec!["python3", "-c", DENIED_PY, mode];
        argv.extend(targets.iter().map(String::as_str));
        let out = run_in(&link.server, Some(&cg), &argv);
        assert!(out.status.success(), "{}", freebind_e2e::show_output(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let targets = |addrs: &[&str]| -> Vec<String> {
        denied
            .iter()
            .flat_map(|port| addrs.iter().map(move |a| format!("{a}:{port}")))
            .collect()
    };
    for native in [true, false] {
        let how = if native { "native" } else { "steered" };
        let all = targets(&["192.0.2.10", "127.0.0.1", "203.0.113.5"]);
        let r = probe(native, &all);
        for t in &all {
            let (result, listened) = (r[t][0].as_str().unwrap(), r[t][1].as_u64().unwrap());
            // Outside the policy, freebind refuses too; which refusal the caller sees
            // depends on the order the programs ran in.
            let want: &[&str] = if t.starts_with("203.") {
                &["EPERM", "EADDRNOTAVAIL"]
            } else {
                &["EPERM"]
            };
            assert!(want.contains(&result), "{how} {t}: {result}");
            let port: u64 = t.rsplit_once(':').unwrap().1.parse().unwrap();
            assert_ne!(listened, port, "{how} {t}: the denied bind took effect");
        }
    }

    // Everything else freebind serves as usual, in both modes.
    let bind = |addr: &str, port: u16, native: bool| {
        try_bind(&link.server, Some(&cg), "tcp", addr, port, native)
    };
    assert_eq!(bind("192.0.2.10", 7780, true), Ok(()), "native");
    assert_eq!(bind("192.0.2.10", 7781, false), Ok(()), "steered");
    assert_eq!(
        bind("203.0.113.5", 7782, true),
        Err(EADDRNOTAVAIL),
        "outside the policy"
    );
    for (addr_port, verdict) in [
        ("192.0.2.10:7780", "freebind"),
        ("192.0.2.10:7781", "steered"),
        ("203.0.113.5:7782", "refused"),
    ] {
        wait_for_log(agent.proc(), &format!("bind {addr_port}/tcp by"), SETTLE);
        let decision = bind_decision(&agent.log(), addr_port, "tcp").unwrap();
        assert_eq!(decision.verdict, verdict, "{}", decision.line);
    }

    // freebind leaving takes none of the denies with it.
    agent.stop();
    assert_eq!(count_denies(), (4, 4));
    let r = probe(true, &targets(&["127.0.0.1"]));
    for t in targets(&["127.0.0.1"]) {
        assert_eq!(r[&t][0], "EPERM", "{t} after freebind left");
    }
    drop(denies);
    assert_eq!(bpf_programs_attached(&cg), vec![]);
}
