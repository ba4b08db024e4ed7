//! The agent's command line as an operator meets it: `exec` passes CMD through untouched,
//! and every bad input gets one line, a non-zero exit, and leaves nothing attached (checked
//! with the kernel's own query, not the agent's bookkeeping).
use std::{
    fs,
    os::unix::process::ExitStatusExt as _,
    path::Path,
    process::{Command, Output, Stdio},
    time::Duration,
};

use freebind_e2e::{
    agent_command, bpf_programs_attached, cgroup2_mount, ensure_tools, require_root, unique_name,
    wait_for_log, Cgroup, Proc,
};

fn agent(args: &[&str]) -> Output {
    agent_command()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run freebind-agent")
}

/// One line on stderr naming `what`, a failure exit, and no program left on `cgroup`.
fn assert_clean_refusal(out: &Output, what: &str, cgroup: &Cgroup) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "expected a failure; stderr: {stderr}"
    );
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    assert!(lines[0].starts_with("freebind-agent: error: "), "{stderr}");
    assert!(lines[0].contains(what), "expected {what:?} in: {stderr}");
    assert_eq!(
        bpf_programs_attached(cgroup),
        vec![],
        "programs left attached after: {stderr}"
    );
}

fn find_dir(root: &Path, name: &str) -> bool {
    fs::read_dir(root).into_iter().flatten().flatten().any(|e| {
        e.file_type().map(|t| t.is_dir()).unwrap_or(false)
            && (e.file_name() == name || find_dir(&e.path(), name))
    })
}

#[test]
fn a_bad_prefix_is_refused_in_one_line_and_attaches_nothing() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-cli");
    for (bad, what) in [
        ("192.0.2.0/33", "invalid prefix \"192.0.2.0/33\""),
        ("banana", "invalid prefix \"banana\""),
        ("192.0.2.10/24", "host bits are set"),
    ] {
        let out = agent(&["run", "--cgroup", cg.relative(), "--allow", bad]);
        assert_clean_refusal(&out, what, &cg);
    }
}

#[test]
fn a_network_namespace_that_does_not_exist_is_refused_in_one_line_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-cli");
    let missing = unique_name("fb-nons");
    let what = format!("opening network namespace /run/netns/{missing}");
    let out = agent(&["run", "--cgroup", cg.relative(), "--netns", &missing]);
    assert_clean_refusal(&out, &what, &cg);

    let mut cmd = agent_command();
    cmd.args(["exec", "--netns", &missing, "--", "true"]);
    let child = cmd.stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_clean_refusal(&out, &what, &cg);
    assert!(
        !find_dir(cgroup2_mount(), &format!("freebind-exec-{pid}")),
        "transient cgroup left behind"
    );
}

#[test]
fn a_path_that_is_not_a_cgroup_v2_directory_is_refused_in_one_line() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-cli");
    let missing = unique_name("fb-missing");
    let out = agent(&["run", "--cgroup", &missing]);
    assert_clean_refusal(&out, "no such directory", &cg);

    let tmp = std::env::temp_dir().join(unique_name("fb-notcg"));
    fs::create_dir(&tmp).unwrap();
    let out = agent(&["run", "--cgroup", &tmp.to_string_lossy()]);
    let _ = fs::remove_dir(&tmp);
    assert_clean_refusal(&out, "is not a cgroup v2 directory", &cg);

    let file = cg.path().join("cgroup.procs");
    let out = agent(&["run", "--cgroup", &file.to_string_lossy()]);
    assert_clean_refusal(&out, "is not a cgroup v2 directory (not a directory)", &cg);
}

#[test]
fn without_root_the_agent_refuses_in_one_line_and_attaches_nothing() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-cli");
    let agent_path = freebind_e2e::agent_path();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&agent_path)
        .args(["run", "--cgroup", &cg.path().to_string_lossy()])
        .output()
        .expect("setpriv");
    assert_clean_refusal(&out, "must run as root: uid 65534 lacks CAP_BPF", &cg);
}

#[test]
fn exec_passes_stdout_through_untouched_returns_the_status_and_removes_its_cgroup() {
    if !require_root() {
        return;
    }
    let child = agent_command()
        .args(["exec", "--", "sh", "-c", "echo out; echo err >&2; exit 7"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "out\n",
        "the agent wrote to stdout"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("err\n") && stderr.contains("ready"),
        "{stderr}"
    );
    assert!(
        !find_dir(cgroup2_mount(), &format!("freebind-exec-{pid}")),
        "transient cgroup left behind"
    );
}

#[test]
fn exec_of_a_missing_command_exits_127_and_leaves_nothing() {
    if !require_root() {
        return;
    }
    let missing = unique_name("/nonexistent/fb-cmd");
    let child = agent_command()
        .args(["exec", "--", &missing])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(127));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot run"),
        "{out:?}"
    );
    assert!(
        !find_dir(cgroup2_mount(), &format!("freebind-exec-{pid}")),
        "transient cgroup left behind"
    );
}

#[test]
fn exec_forwards_sigterm_to_cmd_and_exits_with_its_status() {
    if !require_root() {
        return;
    }
    ensure_tools();
    let mut cmd = agent_command();
    cmd.args([
        "exec",
        "--",
        "python3",
        "-c",
        "import signal, sys, time\n\
         signal.signal(signal.SIGTERM, lambda *a: (print('got TERM', flush=True), sys.exit(42)))\n\
         print('handler installed', flush=True)\n\
         time.sleep(60)",
    ]);
    let proc = Proc::spawn(cmd, "freebind-agent exec");
    wait_for_log(&proc, "handler installed", Duration::from_secs(30));
    proc.signal(libc::SIGTERM);
    let status = proc
        .wait_timeout(Duration::from_secs(20))
        .expect("exec did not end after SIGTERM");
    assert_eq!(
        status.code(),
        Some(42),
        "{status:?} (signal {:?}); log:\n{}",
        status.signal(),
        proc.log()
    );
    assert!(proc.log().contains("got TERM"), "{}", proc.log());
}
