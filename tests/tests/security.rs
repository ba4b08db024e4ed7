//! Least privilege and policy enforcement, tested rather than assumed: what an agent without
//! its capabilities does, who may read or change freebind's pinned objects and config,
//! whether a process in a managed cgroup can slip a refused address past the policy, and
//! whether another cgroup program's deny (as systemd's SocketBindDeny= attaches) survives
//! next to freebind's programs.
use std::{
    fs,
    os::{
        fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
        unix::fs::{MetadataExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    process::{Command, Output},
};

use freebind_e2e::{
    agent_path, bpf_programs_attached, ensure_tools, require_root, run_in,
    scenario::{local_sockets, try_bind, EADDRNOTAVAIL},
    tool, wait_until, Agent, Cgroup, Daemon, Installation, Link, Netns, TempDir,
};

/// Cgroup programs of one attachment.
const PROGRAMS: usize = 10;

/// Debian's python3, which any user can run.
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

/// The unprivileged user the hostile process runs as.
const NOBODY: &str = "65534";

fn show(out: &Output) -> String {
    freebind_e2e::show_output(out)
}

/// The single line of a refused command, after checking it failed without panicking.
fn one_line_refusal(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected a refusal: {}", show(out));
    assert_ne!(out.status.code(), Some(101), "panicked: {}", show(out));
    assert!(!stderr.contains("panicked"), "panicked: {}", show(out));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {}", show(out));
    lines[0].to_owned()
}

#[test]
fn without_bpf_or_sys_admin_capabilities_root_is_refused_in_one_line_and_nothing_is_attached_or_pinned(
) {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-sec");
    let inst = Installation::new("fb-sec");
    // uid 0 with CAP_BPF and CAP_SYS_ADMIN gone from the bounding set, as in a container
    // that keeps root but not those.
    for args in [
        vec!["run", "--cgroup", cg.relative()],
        vec!["attach", "--cgroup", cg.relative()],
        vec!["daemon"],
    ] {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--bounding-set=-bpf,-sys_admin", "--inh-caps=-all"])
            .arg(agent_path())
            .arg("--pin-dir")
            .arg(inst.pin_dir())
            .arg("--run-dir")
            .arg(inst.run_dir())
            .args(&args);
        let out = cmd.output().expect("setpriv");
        let line = one_line_refusal(&out);
        assert!(
            line.contains("uid 0 lacks CAP_BPF (or CAP_SYS_ADMIN)"),
            "{args:?}: {line}"
        );
        assert_eq!(bpf_programs_attached(&cg), vec![], "{args:?}");
        assert!(!inst.pin_dir().exists(), "{args:?} pinned something");
    }
}

/// Every regular file below `dir`.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if e.file_type().unwrap().is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The kernel ids of the maps pinned at `paths` (`bpftool -j map show pinned`).
fn map_ids(paths: &[PathBuf]) -> Vec<u64> {
    paths
        .iter()
        .filter_map(|p| {
            let out = Command::new(tool("bpftool"))
                .args(["-j", "map", "show", "pinned"])
                .arg(p)
                .output()
                .unwrap();
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
            v.get("id").and_then(|i| i.as_u64())
        })
        .collect()
}

/// Run by an unprivileged process in the managed cgroup: every way it could reach
/// freebind's state, each printed as `WHAT: ok` or `WHAT: ERRNO`.
const HOSTILE_PY: &str = r#"
import ctypes, errno, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
NR_BPF = 321
def bpf(cmd, attr):
    buf = ctypes.create_string_buffer(attr, 128)
    r = libc.syscall(NR_BPF, cmd, buf, 128)
    return "ok" if r >= 0 else errno.errorcode[ctypes.get_errno()]
def try_(what, f):
    try:
        f(); print(f"{what}: ok")
    except OSError as e:
        print(f"{what}: {errno.errorcode[e.errno]}")
args = json.loads(sys.argv[1])
for p in args["pins"]:
    path = ctypes.create_string_buffer(p.encode())
    # BPF_OBJ_GET = 7: { pathname u64, bpf_fd u32, file_flags u32 }
    print(f"BPF_OBJ_GET {p}: " + bpf(7, struct.pack("=QII", ctypes.addressof(path), 0, 0)))
    try_(f"open {p}", lambda: os.close(os.open(p, os.O_RDWR)))
for i in args["map_ids"]:
    # BPF_MAP_GET_FD_BY_ID = 14: { map_id u32, next_id u32, open_flags u32 }
    print(f"BPF_MAP_GET_FD_BY_ID {i}: " + bpf(14, struct.pack("=III", i, 0, 0)))
for i in args["prog_ids"]:
    # BPF_PROG_GET_FD_BY_ID = 13
    print(f"BPF_PROG_GET_FD_BY_ID {i}: " + bpf(13, struct.pack("=III", i, 0, 0)))
cg = os.open(args["cgroup"], os.O_RDONLY | os.O_DIRECTORY)
for t in (8, 9, 46):  # INET4_BIND, INET6_BIND, SETSOCKOPT
    # BPF_PROG_DETACH = 9: { target_fd, attach_bpf_fd, attach_type, attach_flags }
    print(f"BPF_PROG_DETACH type {t}: " + bpf(9, struct.pack("=IIII", cg, 0, t, 0)))
try_("create in the pin directory", lambda: os.close(os.open(args["pin_dir"] + "/x", os.O_CREAT | os.O_WRONLY, 0o600)))
try_("write the config", lambda: os.close(os.open(args["config"], os.O_WRONLY)))
try_("read the config", lambda: os.close(os.open(args["config"], os.O_RDONLY)))
def control():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(args["control"])
try_("connect the control socket", control)
"#;

#[test]
fn an_unprivileged_process_in_the_managed_cgroup_cannot_open_or_change_freebinds_maps_programs_or_policy(
) {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cg = Cgroup::new("fb-sec");
    let inst = Installation::new("fb-sec");
    let conf_dir = TempDir::new("fb-sec-conf");
    let config = conf_dir.path().join("agent.toml");
    fs::write(
        &config,
        format!(
            "[[attach]]\ncgroup = \"{}\"\nallow = [\"192.0.2.0/24\"]\n",
            cg.relative()
        ),
    )
    .unwrap();
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    // The hostile user must be able to reach the paths it tries (so that what stops it is
    // the objects' own permissions, not a directory on the way).
    fs::set_permissions(conf_dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let daemon = Daemon::start(&inst, &link.server, &["--config", config.to_str().unwrap()]);
    wait_until(
        "the config's attachment",
        freebind_e2e::scenario::SETTLE,
        || bpf_programs_attached(&cg).len() == PROGRAMS,
    );

    // Every pinned object (maps, programs, links) is root's, mode 0600.
    let pins = files_below(inst.pin_dir());
    assert!(pins.len() > 20, "{pins:?}");
    for p in &pins {
        let m = fs::metadata(p).unwrap();
        assert_eq!(m.uid(), 0, "{}", p.display());
        assert_eq!(
            m.mode() & 0o777,
            0o600,
            "{} has mode {:o}",
            p.display(),
            m.mode()
        );
    }
    let map_ids = map_ids(&pins);
    assert!(map_ids.len() >= 9, "{map_ids:?}");
    let prog_ids = freebind_e2e::bpf_program_ids_at(cg.path());
    let before = policy_dump(&inst, cg.relative());

    let arg = serde_json::json!({
        "pins": pins,
        "map_ids": map_ids,
        "prog_ids": prog_ids,
        "cgroup": cg.path(),
        "pin_dir": inst.pin_dir(),
        "config": config,
        "control": inst.run_dir().join("control.sock"),
    })
    .to_string();
    let out = run_in(
        &link.server,
        Some(&cg),
        &[
            "setpriv",
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--inh-caps=-all",
            // The system's interpreter: a per-user one (pyenv under /root) is not
            // reachable by nobody.
            SYSTEM_PYTHON,
            "-c",
            HOSTILE_PY,
            &arg,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", show(&out));
    let attempts: Vec<&str> = text.lines().collect();
    assert!(
        attempts.len() >= 2 * pins.len() + map_ids.len() + prog_ids.len() + 3 + 4,
        "{text}"
    );
    for line in &attempts {
        let (what, result) = line.rsplit_once(": ").unwrap();
        // A detach must name the program by a descriptor, which this process cannot get
        // (BPF_PROG_GET_FD_BY_ID is refused above); without one the kernel has nothing to
        // detach (EINVAL). The program ids compared below show nothing went.
        let nameless_detach = what.starts_with("BPF_PROG_DETACH") && result == "EINVAL";
        assert!(
            matches!(result, "EACCES" | "EPERM") || nameless_detach,
            "an unprivileged process in the managed cgroup got {what}: {result}\n{text}"
        );
    }
    // Nothing it tried changed anything: the same programs, the same policy.
    assert_eq!(freebind_e2e::bpf_program_ids_at(cg.path()), prog_ids);
    assert_eq!(policy_dump(&inst, cg.relative()), before);
    assert_eq!(
        try_bind(&link.server, Some(&cg), "tcp", "203.0.113.5", 8080, true),
        Err(EADDRNOTAVAIL)
    );
    drop(daemon);
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
            assert!(out.status.success(), "{}: {}", dir.display(), show(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .collect()
}

#[test]
fn the_daemon_refuses_a_config_that_someone_other_than_root_can_change() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("fb-sec");
    let inst = Installation::new("fb-sec");
    let dir = TempDir::new("fb-sec-conf");
    let config = dir.path().join("agent.toml");
    fs::write(&config, "# nothing attached\n").unwrap();
    let start = |why: &str| {
        let out = inst
            .command(Some(&ns), &["daemon", "--config", config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{}", show(&out));
        // The daemon logs its start (the kernel's features) before reading the config;
        // the refusal is the one error line.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| !l.starts_with('[')).collect();
        assert_eq!(errors.len(), 1, "{}", show(&out));
        assert!(
            errors[0].starts_with("freebind-agent: error: "),
            "{}",
            show(&out)
        );
        let line = errors[0];
        assert!(line.contains(&config.display().to_string()), "{line}");
        assert!(line.contains(why), "{line}");
        assert!(!inst.pin_dir().exists(), "pinned before refusing: {line}");
    };
    fs::set_permissions(&config, fs::Permissions::from_mode(0o666)).unwrap();
    start("writable by its group or by others");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o620)).unwrap();
    start("writable by its group or by others");
    fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(&config, Some(65534), None).unwrap();
    start("owned by uid 65534");
}

/// Binds as the managed process would, and prints one JSON object per attempt: the
/// family of the socket, the address family in the sockaddr, the address, the errno name
/// (or `ok`) and getsockname() afterwards.
const BYPASS_PY: &str = r#"
import ctypes, errno, json, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
def sockaddr(fam, sa_family, ip, port):
    if fam == socket.AF_INET:
        return struct.pack("=H", sa_family) + struct.pack("!H", port) + socket.inet_aton(ip) + b"\0" * 8
    return struct.pack("=H", sa_family) + struct.pack("!H", port) + b"\0" * 4 + socket.inet_pton(socket.AF_INET6, ip) + b"\0" * 4
def bind(s, sa_family, ip, port):
    buf = sockaddr(s.family, sa_family, ip, port)
    r = libc.bind(s.fileno(), buf, len(buf))
    return "ok" if r == 0 else errno.errorcode[ctypes.get_errno()]
def sock(fam, native):
    s = socket.socket(fam, socket.SOCK_STREAM)
    if native:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return s
native = sys.argv[1] == "native"
out = {}
AF4, AF6, UNSPEC = socket.AF_INET, socket.AF_INET6, 0
for name, fam, safam, ip, port in [
    ("v4 refused", AF4, AF4, "203.0.113.5", 7100),
    ("v4-mapped refused", AF6, AF6, "::ffff:203.0.113.5", 7101),
    ("v4-mapped allowed", AF6, AF6, "::ffff:192.0.2.20", 7102),
    ("AF_UNSPEC refused", AF4, UNSPEC, "203.0.113.5", 7103),
    ("AF_UNSPEC allowed", AF4, UNSPEC, "192.0.2.20", 7104),
    ("AF_UNSPEC any", AF4, UNSPEC, "0.0.0.0", 7105),
    ("AF_UNSPEC on AF_INET6", AF6, UNSPEC, "2001:db8::20", 7106),
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
    out[name + " kept"] = s  # keep it open until the end
print(json.dumps({k: v for k, v in out.items() if not k.endswith(" kept")}))
"#;

/// The kernel's own answers outside any cgroup, for comparison.
fn bypass_probe(ns: &Netns, cgroup: Option<&Cgroup>, mode: &str) -> serde_json::Value {
    let out = run_in(ns, cgroup, &["python3", "-c", BYPASS_PY, mode]);
    assert!(out.status.success(), "{}", show(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&out)))
}

#[test]
fn the_policy_cannot_be_bypassed_with_v4_mapped_addresses_af_unspec_or_a_second_bind() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cg = Cgroup::new("fb-sec");
    let agent = Agent::run(
        &link.server,
        &cg,
        &["--allow", "192.0.2.0/24", "--allow", "2001:db8::/32"],
    );
    let outside = bypass_probe(&link.server, None, "native");
    for mode in ["native", "steered"] {
        let r = bypass_probe(&link.server, Some(&cg), mode);
        let result = |k: &str| r[k][0].as_str().unwrap().to_owned();
        let name = |k: &str| format!("{mode}: {k}: {}", r[k]);
        // A refused IPv4 address is refused the same way written v4-mapped on an AF_INET6
        // socket; an allowed one binds either way.
        assert_eq!(
            result("v4 refused"),
            "EADDRNOTAVAIL",
            "{}",
            name("v4 refused")
        );
        assert_eq!(
            result("v4-mapped refused"),
            "EADDRNOTAVAIL",
            "{}",
            name("v4-mapped refused")
        );
        assert_eq!(
            result("v4-mapped allowed"),
            "ok",
            "{}",
            name("v4-mapped allowed")
        );
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
    }
    // The second binds were never judged: no decision for their addresses was logged.
    for second in ["203.0.113.5:7111", "192.0.2.21:7113", "203.0.113.5:7115"] {
        assert!(
            !agent.log().contains(&format!("bind {second}/tcp")),
            "a second bind was judged: {second}\n{}",
            agent.log()
        );
    }
}

/// A cgroup/bind4 program of the test's own that denies one port (returns 0, so the
/// kernel fails the bind with EPERM), attached with BPF_PROG_ATTACH and BPF_F_ALLOW_MULTI
/// as systemd attaches SocketBindDeny=. Detached (and unloaded) on drop.
struct DenyPort {
    prog: OwnedFd,
    cgroup: fs::File,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_DETACH: libc::c_long = 9;
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
    fn attach(cgroup: &Cgroup, port: u16) -> DenyPort {
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
        let fd = bpf(BPF_PROG_LOAD, &mut attr)
            .unwrap_or_else(|e| panic!("BPF_PROG_LOAD of the port-{port} deny program: {e}"));
        // SAFETY: a new descriptor the kernel just gave us.
        let prog = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let cg = fs::File::open(cgroup.path()).unwrap();
        let mut attr = [0u8; 128];
        put(&mut attr, 0, &(cg.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 4, &(prog.as_raw_fd() as u32).to_ne_bytes());
        put(&mut attr, 8, &BPF_CGROUP_INET4_BIND.to_ne_bytes());
        put(&mut attr, 12, &BPF_F_ALLOW_MULTI.to_ne_bytes());
        bpf(BPF_PROG_ATTACH, &mut attr)
            .unwrap_or_else(|e| panic!("BPF_PROG_ATTACH to {}: {e}", cgroup.path().display()));
        DenyPort { prog, cgroup: cg }
    }
}

impl Drop for DenyPort {
    fn drop(&mut self) {
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

#[test]
fn another_programs_deny_on_the_same_cgroup_keeps_its_effect_whatever_freebind_decides() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let link = Link::new();
    let cg = Cgroup::new("fb-coexist");
    // One deny attached before freebind, one after it: the kernel runs every program of
    // the cgroup and any refusal wins, in either order.
    let before = DenyPort::attach(&cg, 7777);
    let agent = Agent::run(&link.server, &cg, &["--allow", "192.0.2.0/24"]);
    let after = DenyPort::attach(&cg, 7778);
    let attached = bpf_programs_attached(&cg);
    let deny = attached
        .iter()
        .filter(|(ty, name)| ty == "cgroup_inet4_bind" && name == "fb_test_deny")
        .count();
    assert_eq!((deny, attached.len()), (2, PROGRAMS + 2), "{attached:?}");

    let bind = |addr: &str, port: u16, native: bool| {
        try_bind(&link.server, Some(&cg), "tcp", addr, port, native)
    };
    for port in [7777, 7778] {
        for native in [true, false] {
            let how = if native { "native" } else { "steered" };
            assert_eq!(
                bind("192.0.2.10", port, native),
                Err(libc::EPERM),
                "{how} absent allowed :{port}"
            );
            assert_eq!(
                bind("127.0.0.1", port, native),
                Err(libc::EPERM),
                "{how} local :{port}"
            );
            let refused = bind("203.0.113.5", port, native);
            assert!(
                matches!(refused, Err(libc::EPERM | EADDRNOTAVAIL)),
                "{how} refused :{port}: {refused:?}"
            );
        }
        assert!(
            !local_sockets(&link.server, "tcp")
                .iter()
                .any(|s| s.ends_with(&format!(":{port}"))),
            "a denied bind left a socket on port {port}"
        );
    }
    // Everything else freebind serves as usual, in both modes.
    assert_eq!(
        bind("192.0.2.10", 7779, true),
        Ok(()),
        "native, port not denied"
    );
    assert_eq!(
        bind("192.0.2.10", 7780, false),
        Ok(()),
        "steered, port not denied"
    );
    assert_eq!(
        bind("203.0.113.5", 7781, true),
        Err(EADDRNOTAVAIL),
        "outside the policy"
    );
    assert!(
        agent.log().contains("bind 192.0.2.10:7780/tcp"),
        "{}",
        agent.log()
    );

    // freebind leaving does not take the denies with it.
    agent.stop();
    let attached = bpf_programs_attached(&cg);
    assert_eq!(attached.len(), 2, "{attached:?}");
    assert_eq!(
        try_bind(&link.server, Some(&cg), "tcp", "127.0.0.1", 7777, true),
        Err(libc::EPERM)
    );
    drop((before, after));
    assert_eq!(bpf_programs_attached(&cg), vec![]);
}
