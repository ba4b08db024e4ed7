//! The deployment files in `deploy/`, checked the way their consumers read them, and
//! against the decisions they encode: the Kubernetes manifests by a YAML parser and the
//! Kubernetes JSON schemas (kubernetes-validate, strict, offline) and yamllint; the
//! Dockerfile by hadolint; the systemd unit by `systemd-analyze verify` and `security`;
//! then the privileges, paths and versions they must agree on.
//!
//! Unprivileged. The validators are installed on first use into a virtual environment
//! under `target/tmp/` (pinned in `deploy/check/requirements.txt`; needs python3 with
//! venv, and PyPI once). Nothing is skipped: a missing tool is a failure that says what
//! to install.
use std::{
    collections::BTreeSet,
    fs,
    io::Write as _,
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::OnceLock,
};

use serde_json::Value;

/// The agent's capabilities, everywhere it runs: the unit's CapabilityBoundingSet=, the
/// DaemonSet's `capabilities.add` and the privileges table of `README.md`
/// must each be exactly this set.
const CAPABILITIES: [&str; 3] = ["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_SYS_PTRACE"];
/// Where the agent is installed: the unit (and `cargo xtask install`'s default prefix),
/// the image, the DaemonSet.
const AGENT_BINARY: &str = "/usr/local/sbin/freebind-agent";
/// The daemon's `--config` everywhere.
const CONFIG_PATH: &str = "/etc/freebind/agent.toml";
/// The oldest Kubernetes the DaemonSet supports (securityContext.appArmorProfile is 1.30)
/// and the newest whose schemas kubernetes-validate bundles.
const KUBERNETES_VERSIONS: &str = "1.30,1.37";
/// `systemd-analyze security` exposure, in tenths, the unit must stay at or under (it rates
/// 3.2 with systemd 252).
const UNIT_EXPOSURE_MAX: u32 = 35;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the test crate lives in the workspace")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Runs `cmd` and returns its stdout; panics with its stderr unless it succeeds.
fn output(cmd: &mut Command, stdin: Option<&str>) -> String {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .current_dir(repo())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("writing to {what}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("waiting for {what}: {e}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{stderr}{stdout}",
        out.status
    );
    stdout.into_owned()
}

/// The virtual environment holding the validators, made (once per requirements file, and
/// under a lock, as several test processes may want it) when missing.
fn venv() -> &'static Path {
    static VENV: OnceLock<PathBuf> = OnceLock::new();
    VENV.get_or_init(|| {
        let tmp = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(&tmp).unwrap();
        let lock = fs::File::create(tmp.join("deploy-check.lock")).unwrap();
        // SAFETY: flock on a descriptor this function keeps open until it returns.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let dir = tmp.join("deploy-check-venv");
        let requirements = read("deploy/check/requirements.txt");
        let stamp = dir.join("freebind-requirements.txt");
        let usable = || {
            Command::new(dir.join("bin/python"))
                .args(["-c", ""])
                .status()
                .is_ok_and(|s| s.success())
        };
        // The stamp is written last; a venv whose interpreter went away is made anew.
        if fs::read_to_string(&stamp).ok().as_deref() == Some(requirements.as_str()) && usable() {
            return dir;
        }
        eprintln!(
            "installing the deployment validators (deploy/check/requirements.txt) into {}",
            dir.display()
        );
        let _ = fs::remove_dir_all(&dir);
        output(Command::new("python3").args(["-m", "venv"]).arg(&dir), None);
        output(
            Command::new(dir.join("bin/pip"))
                .args(["install", "--disable-pip-version-check", "--no-input", "-q"])
                .arg("-r")
                .arg(repo().join("deploy/check/requirements.txt")),
            None,
        );
        fs::write(&stamp, requirements).unwrap();
        dir
    })
}

fn venv_tool(name: &str) -> Command {
    Command::new(venv().join("bin").join(name))
}

/// Every YAML document of `deploy/kubernetes`, parsed and validated against the schemas.
fn manifests() -> &'static [Value] {
    static DOCS: OnceLock<Vec<Value>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let mut files: Vec<PathBuf> = fs::read_dir(repo().join("deploy/kubernetes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
            .collect();
        files.sort();
        assert!(!files.is_empty(), "no manifests in deploy/kubernetes");
        let json = output(
            venv_tool("python")
                .arg("deploy/check/manifests.py")
                .args(["kubernetes", KUBERNETES_VERSIONS])
                .args(&files),
            None,
        );
        let docs: Vec<Value> = serde_json::from_str(&json).unwrap();
        docs.into_iter().map(|d| d["doc"].clone()).collect()
    })
}

fn manifest(kind: &str) -> &'static Value {
    let mut found = manifests().iter().filter(|d| d["kind"] == kind);
    let doc = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} in deploy/kubernetes"));
    assert!(found.next().is_none(), "more than one {kind}");
    doc
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap_or_else(|| panic!("not a string: {s}")))
        .collect()
}

fn capability_set<'a>(names: impl IntoIterator<Item = &'a str>) -> BTreeSet<String> {
    names.into_iter().map(str::to_owned).collect()
}

fn documented_capabilities() -> BTreeSet<String> {
    capability_set(CAPABILITIES)
}

// ---- Kubernetes --------------------------------------------------------------------------

#[test]
fn kubernetes_manifests_parse_and_match_the_kubernetes_schemas() {
    let kinds: Vec<&str> = manifests()
        .iter()
        .map(|d| d["kind"].as_str().unwrap())
        .collect();
    // In the order `kubectl apply -f` needs them.
    assert_eq!(
        kinds,
        ["Namespace", "ServiceAccount", "ConfigMap", "DaemonSet"]
    );
    let namespace = manifest("Namespace")["metadata"]["name"].as_str().unwrap();
    for doc in &manifests()[1..] {
        assert_eq!(
            doc["metadata"]["namespace"], namespace,
            "{} outside the Namespace",
            doc["kind"]
        );
    }
    output(
        venv_tool("yamllint").args([
            "--strict",
            "-c",
            "deploy/check/yamllint.yaml",
            "deploy/kubernetes",
        ]),
        None,
    );
}

fn pod_spec() -> &'static Value {
    &manifest("DaemonSet")["spec"]["template"]["spec"]
}

/// The init containers, then the containers.
fn containers(spec: &Value) -> impl Iterator<Item = &Value> {
    ["initContainers", "containers"]
        .into_iter()
        .flat_map(move |key| spec[key].as_array().into_iter().flatten())
}

fn agent_container() -> &'static Value {
    let list = pod_spec()["containers"].as_array().unwrap();
    assert_eq!(list.len(), 1, "one container, the agent");
    &list[0]
}

#[test]
fn daemonset_grants_the_documented_privileges_and_nothing_more() {
    let spec = pod_spec();
    assert_eq!(spec["hostPID"], true, "the agent reads the host's /proc");
    for key in ["hostNetwork", "hostIPC"] {
        assert!(
            spec[key].is_null() || spec[key] == false,
            "{key} is not needed"
        );
    }
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert!(
        spec["securityContext"]["privileged"].is_null(),
        "no pod-level privilege"
    );
    for container in containers(spec) {
        let name = &container["name"];
        let sc = &container["securityContext"];
        assert_eq!(sc["privileged"], false, "{name}");
        assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
        assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
        assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"], "{name}");
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        for mount in container["volumeMounts"].as_array().into_iter().flatten() {
            assert_ne!(
                mount["mountPropagation"], "Bidirectional",
                "{name}: Bidirectional needs a privileged container"
            );
        }
    }
    let sc = &agent_container()["securityContext"];
    let added = strings(&sc["capabilities"]["add"]);
    assert_eq!(
        capability_set(added.iter().map(|c| c.trim_start_matches("CAP_"))),
        capability_set(CAPABILITIES.map(|c| c.trim_start_matches("CAP_"))),
        "the agent's capabilities (written without CAP_ in Kubernetes)"
    );
    assert_eq!(sc["appArmorProfile"]["type"], "Unconfined");
    let init = pod_spec()["initContainers"].as_array().unwrap();
    for c in init {
        assert!(
            c["securityContext"]["capabilities"]["add"].is_null(),
            "init container {} needs no capability",
            c["name"]
        );
    }

    let ds = &manifest("DaemonSet")["spec"];
    assert_eq!(ds["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(ds["updateStrategy"]["rollingUpdate"]["maxUnavailable"], 1);
    assert_eq!(spec["priorityClassName"], "system-node-critical");
    let tolerations = spec["tolerations"].as_array().unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t["operator"] == "Exists" && t["key"].is_null() && t["effect"].is_null()),
        "tolerates every taint, to run on every node: {tolerations:?}"
    );
    assert_eq!(
        manifest("Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged",
        "hostPID and SYS_ADMIN are beyond the baseline Pod Security level"
    );
}

#[test]
fn daemonset_mounts_exactly_what_the_agent_needs() {
    let spec = pod_spec();
    let volumes = spec["volumes"].as_array().unwrap();
    let host_paths: BTreeSet<(&str, &str)> = volumes
        .iter()
        .filter(|v| !v["hostPath"].is_null())
        .map(|v| {
            (
                v["hostPath"]["path"].as_str().unwrap(),
                v["hostPath"]["type"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        host_paths,
        BTreeSet::from([
            ("/sys/fs/bpf", "Directory"),
            ("/sys/fs/cgroup", "Directory"),
            ("/run/freebind", "DirectoryOrCreate"),
        ]),
        "host paths: each one is a privilege (see the table in README.md)"
    );
    let volume = |name: &str| {
        volumes
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    };
    let mounts = agent_container()["volumeMounts"].as_array().unwrap();
    let mount = |path: &str| {
        let m = mounts
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("the agent does not mount {path}"));
        (m, volume(m["name"].as_str().unwrap()))
    };

    let (m, v) = mount("/sys/fs/bpf");
    assert_eq!(v["hostPath"]["path"], "/sys/fs/bpf");
    assert_eq!(m["mountPropagation"], "HostToContainer");
    assert!(m["readOnly"] != true, "pins are written there");
    let (m, v) = mount("/sys/fs/cgroup");
    assert_eq!(v["hostPath"]["path"], "/sys/fs/cgroup");
    assert_eq!(m["readOnly"], true);
    let (m, v) = mount("/run/freebind");
    assert_eq!(v["hostPath"]["path"], "/run/freebind");
    assert!(m["readOnly"] != true);
    let (m, v) = mount("/etc/freebind");
    assert_eq!(m["readOnly"], true);
    assert_eq!(
        v["configMap"]["name"],
        manifest("ConfigMap")["metadata"]["name"]
    );
    assert_eq!(mounts.len(), 4, "no other mount: {mounts:?}");

    // The init container checks the same bpffs the agent pins into.
    let init = &spec["initContainers"][0];
    let m = init["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == "/sys/fs/bpf")
        .expect("the init container checks /sys/fs/bpf");
    assert_eq!(
        volume(m["name"].as_str().unwrap())["hostPath"]["path"],
        "/sys/fs/bpf"
    );
}

#[test]
fn daemonset_runs_the_daemon_of_this_version() {
    let agent = agent_container();
    assert_eq!(
        strings(&agent["command"]),
        [AGENT_BINARY, "daemon", "--config", CONFIG_PATH],
        "the image's ENTRYPOINT"
    );
    let image = agent["image"].as_str().unwrap();
    let (_, tag) = image.rsplit_once(':').expect("a tagged image");
    assert_eq!(
        tag,
        env!("CARGO_PKG_VERSION"),
        "the image tag is the workspace version"
    );
    for c in containers(pod_spec()) {
        assert_eq!(
            c["image"], image,
            "{}: one image for the whole pod",
            c["name"]
        );
    }
}

// ---- configuration -----------------------------------------------------------------------

/// The examples of a commented configuration, made live: `#[[attach]]`, `#unit = …` (a
/// `#` directly followed by text) lose their `#`; prose (`# …`) stays a comment.
fn uncomment_examples(text: &str) -> String {
    text.lines()
        .map(|l| match l.trim_start().strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| !c.is_whitespace() && c != '#') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Checks `text` as the daemon's config; returns the number of `[[attach]]`.
fn check_config(text: &str, origin: &str) -> usize {
    let json = output(
        venv_tool("python").args(["deploy/check/manifests.py", "toml", "-"]),
        Some(text),
    );
    let config: Value = serde_json::from_str(&json).unwrap();
    let top = config.as_object().unwrap();
    assert!(
        top.keys().all(|k| k == "attach"),
        "{origin}: unknown keys {:?}",
        top.keys()
    );
    let attach = top.get("attach").map_or(&[][..], |a| a.as_array().unwrap());
    for (i, a) in attach.iter().enumerate() {
        let a = a.as_object().unwrap();
        assert!(
            a.keys()
                .all(|k| ["cgroup", "unit", "allow"].contains(&k.as_str())),
            "{origin}: [[attach]] #{i}: unknown keys {:?}",
            a.keys()
        );
        assert!(
            a.contains_key("cgroup") != a.contains_key("unit"),
            "{origin}: [[attach]] #{i} needs exactly one of cgroup or unit"
        );
        if let Some(allow) = a.get("allow") {
            assert!(!strings(allow).is_empty(), "{origin}: allow = [] means any");
        }
    }
    // The daemon's own parser also checks globs, unit names and prefixes.
    freebind_agent::config::Config::parse(text, Path::new(origin))
        .unwrap_or_else(|e| panic!("{e:#}"));
    attach.len()
}

#[test]
fn configurations_are_freebind_configs_that_select_nothing_until_edited() {
    let configmap = &manifest("ConfigMap")["data"]["agent.toml"];
    let configmap = configmap.as_str().expect("the ConfigMap holds agent.toml");
    for (origin, text) in [
        ("deploy/config/agent.toml", read("deploy/config/agent.toml")),
        ("the DaemonSet's ConfigMap", configmap.to_owned()),
    ] {
        assert_eq!(
            check_config(&text, origin),
            0,
            "{origin}: a fresh install serves nothing"
        );
        let live = uncomment_examples(&text);
        assert!(
            check_config(&live, origin) >= 2,
            "{origin}: its examples, uncommented, are a valid config:\n{live}"
        );
    }
}

// ---- systemd -----------------------------------------------------------------------------

/// `(section, key, value)` of a unit file, in order.
fn unit_entries(text: &str) -> Vec<(String, String, String)> {
    let mut section = String::new();
    let mut entries = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "continuation lines are not parsed here: {line}"
        );
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.to_owned();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        entries.push((
            section.clone(),
            key.trim().to_owned(),
            value.trim().to_owned(),
        ));
    }
    entries
}

fn unit_values<'a>(
    entries: &'a [(String, String, String)],
    section: &str,
    key: &str,
) -> Vec<&'a str> {
    entries
        .iter()
        .filter(|(s, k, _)| s == section && k == key)
        .map(|(_, _, v)| v.as_str())
        .collect()
}

#[test]
fn systemd_unit_runs_the_daemon_early_with_the_documented_privileges() {
    let unit = read("deploy/systemd/freebind-agent.service");
    let entries = unit_entries(&unit);
    let one = |section: &str, key: &str| -> &str {
        match unit_values(&entries, section, key)[..] {
            [value] => value,
            ref all => panic!("[{section}] {key}=: want one value, got {all:?}"),
        }
    };
    let words = |section: &str, key: &str| -> BTreeSet<String> {
        unit_values(&entries, section, key)
            .iter()
            .flat_map(|v| v.split_whitespace())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(one("Service", "Type"), "notify");
    assert_eq!(
        one("Service", "ExecStart"),
        format!("{AGENT_BINARY} daemon --config {CONFIG_PATH}")
    );
    // SIGHUP to the main process, by the shell's own kill ($$ is systemd's $).
    assert_eq!(
        one("Service", "ExecReload"),
        "/bin/sh -c 'kill -HUP $$MAINPID'"
    );
    assert_eq!(one("Service", "Restart"), "on-failure");
    assert_eq!(
        words("Service", "CapabilityBoundingSet"),
        documented_capabilities()
    );
    assert!(unit_values(&entries, "Service", "AmbientCapabilities").is_empty());
    assert_eq!(one("Service", "NoNewPrivileges"), "yes");
    assert_eq!(one("Service", "ProtectSystem"), "strict");
    // What the daemon writes, under ProtectSystem=strict.
    assert_eq!(one("Service", "RuntimeDirectory"), "freebind");
    assert_eq!(one("Service", "RuntimeDirectoryPreserve"), "yes");
    assert!(words("Service", "ReadWritePaths").contains("/run/systemd/system"));
    assert!(
        unit_values(&entries, "Service", "KillMode").is_empty(),
        "the default KillMode=: the daemon has no children"
    );
    assert_eq!(one("Unit", "DefaultDependencies"), "no");
    assert!(words("Unit", "Before").contains("network-pre.target"));
    assert!(words("Unit", "Wants").contains("network-pre.target"));
    assert!(words("Unit", "RequiresMountsFor").contains(AGENT_BINARY));
    assert!(words("Unit", "Conflicts").contains("shutdown.target"));
    // Pins must go to the host's bpffs, never to one mounted in the sandbox's namespace.
    assert_eq!(one("Unit", "AssertPathIsMountPoint"), "/sys/fs/bpf");
    assert!(
        !words("Service", "SystemCallFilter").contains("@mount"),
        "the daemon must not mount bpffs in its own namespace"
    );
    assert_eq!(one("Install", "WantedBy"), "multi-user.target");
}

#[test]
fn systemd_analyze_verifies_the_unit_and_rates_its_sandbox() {
    // verify checks that ExecStart= is executable: point it at a stand-in.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }
    let dir = TempDir(
        PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("deploy-check-unit-{}", std::process::id())),
    );
    let dir = &dir.0;
    fs::create_dir_all(dir).unwrap();
    let stub = dir.join("freebind-agent");
    fs::write(&stub, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    let unit = dir.join("freebind-agent.service");
    let text = read("deploy/systemd/freebind-agent.service");
    fs::write(&unit, text.replace(AGENT_BINARY, stub.to_str().unwrap())).unwrap();

    let analyze = || {
        let mut cmd = Command::new("systemd-analyze");
        // A clear failure rather than a skip (Debian: the systemd package).
        assert!(
            Command::new("systemd-analyze")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "systemd-analyze is needed: apt-get install systemd"
        );
        cmd.env("SYSTEMD_COLORS", "0");
        cmd
    };
    let out = analyze()
        .args(["verify", "--man=no"])
        .arg(&unit)
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify ({}):\n{said}",
        out.status
    );
    let report = output(
        analyze()
            .args(["security", "--offline=true"])
            .arg(format!("--threshold={UNIT_EXPOSURE_MAX}"))
            .arg(&unit),
        None,
    );
    assert!(report.contains("Overall exposure level"), "{report}");
}

// ---- container ---------------------------------------------------------------------------

/// `(INSTRUCTION, arguments)` of a Dockerfile: continuation lines joined, comments and
/// parser directives dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                pending.push_str(head);
                pending.push(' ');
            }
            None => {
                pending.push_str(trimmed);
                let (word, rest) = pending
                    .split_once(char::is_whitespace)
                    .unwrap_or((&pending, ""));
                out.push((word.to_uppercase(), rest.trim().to_owned()));
                pending.clear();
            }
        }
    }
    assert!(pending.is_empty(), "the Dockerfile ends in a continuation");
    out
}

/// `name:tag` of a FROM, refused unless pinned: a tag naming a version, or a digest.
fn pinned_tag(image: &str) -> &str {
    if let Some((_, digest)) = image.split_once('@') {
        assert!(digest.starts_with("sha256:"), "{image}");
        return digest;
    }
    let (_, tag) = image
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("FROM {image}: no tag, which means latest"));
    assert!(
        tag != "latest" && tag.contains(|c: char| c.is_ascii_digit()),
        "FROM {image}: pin a version"
    );
    tag
}

fn version_tuple(v: &str) -> Vec<u32> {
    v.split('.').map(|n| n.parse().unwrap()).collect()
}

#[test]
fn dockerfile_builds_with_xtask_and_ships_the_agent_alone() {
    let text = read("deploy/container/Dockerfile");
    let instructions = dockerfile_instructions(&text);
    let froms: Vec<(usize, &str)> = instructions
        .iter()
        .enumerate()
        .filter(|(_, (i, _))| i == "FROM")
        .map(|(n, (_, args))| (n, args.as_str()))
        .collect();
    assert_eq!(
        froms.len(),
        2,
        "a build stage and a runtime stage: {froms:?}"
    );
    let stage = |n: usize| -> (&str, &str, &[(String, String)]) {
        let from = instructions[n].1.as_str();
        let words: Vec<&str> = from.split_whitespace().collect();
        let [image, as_, name] = words[..] else {
            panic!("FROM {from}: want `IMAGE AS NAME`");
        };
        assert!(as_.eq_ignore_ascii_case("as"), "{from}");
        let end = froms
            .iter()
            .map(|(m, _)| *m)
            .find(|m| *m > n)
            .unwrap_or(instructions.len());
        (image, name, &instructions[n + 1..end])
    };
    let (build_image, build_name, build) = stage(froms[0].0);
    let (runtime_image, _, runtime) = stage(froms[1].0);

    // Build: a Debian 12 Rust image recent enough for the workspace, then xtask.
    let build_tag = pinned_tag(build_image);
    assert!(build_image.starts_with("rust:"), "{build_image}");
    assert!(build_tag.ends_with("-bookworm"), "Debian 12: {build_image}");
    let manifest = read("Cargo.toml");
    let rust_version = manifest
        .lines()
        .find_map(|l| l.strip_prefix("rust-version = "))
        .expect("the workspace's rust-version")
        .trim_matches('"');
    let image_rust = build_tag.trim_end_matches("-bookworm");
    assert!(
        version_tuple(image_rust) >= version_tuple(rust_version),
        "{build_image} is older than rust-version {rust_version}"
    );
    let runs: Vec<&str> = build
        .iter()
        .filter(|(i, _)| i == "RUN")
        .map(|(_, a)| a.as_str())
        .collect();
    let ran = |what: &str| runs.iter().any(|r| r.contains(what));
    assert!(
        ran("--component rust-src"),
        "nightly with rust-src: {runs:?}"
    );
    assert!(
        ran("\"llvm-${major}-dev\""),
        "LLVM of nightly's major: {runs:?}"
    );
    assert!(
        ran("cargo install bpf-linker") && ran("--features \"llvm-${major}\""),
        "bpf-linker for that LLVM, as xtask/src/setup.rs installs it: {runs:?}"
    );
    assert_eq!(runs.last(), Some(&"cargo xtask build"));

    // Runtime: the same Debian release (the agent links its glibc), the binary, an
    // empty config, the daemon as ENTRYPOINT in exec form.
    let runtime_tag = pinned_tag(runtime_image);
    assert!(
        runtime_image.starts_with("debian:")
            && (runtime_tag.starts_with("12") || runtime_tag.contains("bookworm")),
        "Debian 12, as the build stage: {runtime_image}"
    );
    let copies: Vec<&str> = runtime
        .iter()
        .filter(|(i, _)| i == "COPY")
        .map(|(_, a)| a.as_str())
        .collect();
    assert_eq!(
        copies,
        [
            format!("--from={build_name} /src/target/release/freebind-agent {AGENT_BINARY}"),
            format!("deploy/config/agent.toml {CONFIG_PATH}"),
        ]
    );
    assert!(
        runtime
            .iter()
            .all(|(i, _)| i != "RUN" && i != "USER" && i != "ADD"),
        "the runtime stage only copies: {runtime:?}"
    );
    let entrypoints: Vec<&str> = runtime
        .iter()
        .filter(|(i, _)| i == "ENTRYPOINT")
        .map(|(_, a)| a.as_str())
        .collect();
    let [entrypoint] = entrypoints[..] else {
        panic!("one ENTRYPOINT in the runtime stage: {entrypoints:?}");
    };
    let exec_form: Vec<String> = serde_json::from_str(entrypoint)
        .unwrap_or_else(|e| panic!("ENTRYPOINT {entrypoint} is not the exec form: {e}"));
    assert_eq!(exec_form, [AGENT_BINARY, "daemon", "--config", CONFIG_PATH]);
    assert!(
        !instructions.iter().any(|(i, _)| i == "CMD"),
        "no CMD: arguments would be appended to the daemon's"
    );

    // The build context is the repository root: no build outputs in it.
    let ignore = read(".dockerignore");
    for dir in ["target/", "freebind-ebpf/target/", ".git/"] {
        assert!(
            ignore.lines().any(|l| l.trim() == dir),
            ".dockerignore: {dir}"
        );
    }
}

#[test]
fn hadolint_passes_the_dockerfile() {
    output(
        venv_tool("hadolint").args([
            "--no-color",
            "--failure-threshold",
            "style",
            "deploy/container/Dockerfile",
        ]),
        None,
    );
}

// ---- documentation -----------------------------------------------------------------------

#[test]
fn readme_section_documents_the_same_capabilities() {
    let text = read("README.md");
    let rows: BTreeSet<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix("| `CAP_"))
        .filter_map(|rest| rest.split_once("` |"))
        .map(|(name, _)| format!("CAP_{name}"))
        .collect();
    assert_eq!(
        rows,
        documented_capabilities(),
        "rows of the privileges table"
    );
}
