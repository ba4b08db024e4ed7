//! The agent's command line fed generated arguments (the real binary, as root): whatever
//! the input, no panic (exit code 101, "panicked"), a refusal is a non-zero exit with one
//! line for the agent's own errors (clap's usage errors: exit 2, starting `error:`), and
//! after every refusal nothing is attached to the test's cgroups and nothing pinned. A
//! command line that is accepted (a glob, a pid of the test's own) is undone with
//! `detach --all`, which must leave nothing either, so each case starts from nothing.
//!
//! The values can reach only what the test made: globs are anchored below the test's
//! cgroup (a bare `*` would select every top-level cgroup of the host), a pid that names
//! some other live process becomes the test's own sleeper's, and systemd is a socket
//! path where nothing listens (a generated name could be a real unit).
use std::{cell::Cell, path::Path, process::Stdio};

use freebind_e2e::{bpf_programs_attached, require_root, Cgroup, Installation, Proc, TempDir};
use proptest::prelude::*;

/// Values an operator could mistype: real-looking and hostile ones.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[0-9a-f.:/]{0,24}",
        "[a-z0-9*?./-]{0,24}",
        Just("../../..".to_owned()),
        Just("/proc/self/ns/net".to_owned()),
        Just("192.0.2.0/24".to_owned()),
        Just("999999999".to_owned()),
        Just(String::new()),
        "\\PC{0,12}",
    ]
}

/// What the generated values may name: the test's cgroup (relative to the mount), its
/// child that holds a sleeper, and the sleeper's pid.
#[derive(Clone)]
struct Reach {
    cgroup: String,
    member: String,
    sleeper: u32,
}

impl Reach {
    fn value_for(&self, flag: &'static str) -> BoxedStrategy<String> {
        let me = self.clone();
        match flag {
            "--cgroup" => prop_oneof![
                4 => value().prop_map(move |v| {
                    if v.contains(['*', '?', '[']) {
                        format!("{}/{v}", me.cgroup)
                    } else {
                        v
                    }
                }),
                1 => Just(self.member.clone()),
            ]
            .boxed(),
            "--pid" => prop_oneof![
                4 => value().prop_map(move |v| match v.parse::<u32>() {
                    Ok(pid) if Path::new(&format!("/proc/{pid}")).exists() => {
                        me.sleeper.to_string()
                    }
                    _ => v,
                }),
                1 => Just(self.sleeper.to_string()),
            ]
            .boxed(),
            _ => value().boxed(),
        }
    }

    fn argv(&self) -> impl Strategy<Value = Vec<String>> {
        let verb = prop_oneof![
            Just("attach"),
            Just("detach"),
            Just("run"),
            Just("hook"),
            Just("bogus")
        ];
        let flag = prop_oneof![
            Just("--cgroup"),
            Just("--allow"),
            Just("--unit"),
            Just("--pid"),
            Just("--netns"),
            Just("--key"),
            Just("--all"),
            Just("--nope"),
        ];
        let me = self.clone();
        let pair = flag.prop_flat_map(move |f| (Just(f), me.value_for(f)));
        (verb, proptest::collection::vec(pair, 0..4)).prop_map(|(verb, pairs)| {
            let mut v = vec![verb.to_owned()];
            for (f, val) in pairs {
                v.push(f.to_owned());
                v.push(val);
            }
            v
        })
    }
}

#[test]
fn generated_command_lines_never_panic_and_each_refusal_leaves_nothing_attached() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-fuzz");
    let member = cg.child("member");
    let mut sleep = std::process::Command::new("sleep");
    sleep.arg("3600");
    member.join_on_exec(&mut sleep);
    let sleeper = Proc::spawn(sleep, "fuzz-sleeper");
    let inst = Installation::new("fb-fuzz");
    let no_systemd = TempDir::new("fb-fuzz-systemd");
    let reach = Reach {
        cgroup: cg.relative().to_owned(),
        member: member.relative().to_owned(),
        sleeper: sleeper.pid(),
    };
    let left_behind = || -> Option<String> {
        let pins = inst.pinned_attachments();
        if !pins.is_empty() {
            return Some(format!("pinned {pins:?}"));
        }
        [&cg, &member].into_iter().find_map(|c| {
            let progs = bpf_programs_attached(c);
            (!progs.is_empty()).then(|| format!("programs on {}: {progs:?}", c.relative()))
        })
    };
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (refused, accepted, attached) = (Cell::new(0), Cell::new(0), Cell::new(0));
    let case = |args: Vec<String>| -> Result<(), TestCaseError> {
        // `run` with a valid cgroup would serve until stopped: point it at the
        // test's cgroup only with a policy that cannot parse, so it must refuse.
        let args: Vec<String> = if args[0] == "run" {
            let mut a = args.clone();
            a.extend([
                "--cgroup".into(),
                cg.relative().into(),
                "--allow".into(),
                "not-a-prefix".into(),
            ]);
            a
        } else {
            args
        };
        let out = inst
            .command(None, &args.iter().map(String::as_str).collect::<Vec<_>>())
            .env("FREEBIND_SYSTEMD_SOCKET", no_systemd.path().join("private"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert_ne!(
            out.status.code(),
            Some(101),
            "{:?} panicked: {}",
            args,
            stderr
        );
        prop_assert!(!stderr.contains("panicked"), "{:?}: {}", args, stderr);
        if out.status.success() {
            accepted.set(accepted.get() + 1);
            if !bpf_programs_attached(&member).is_empty() {
                attached.set(attached.get() + 1);
            }
            let undo = inst.run(&["detach", "--all"]);
            prop_assert!(
                undo.status.success(),
                "detach --all after {:?}: {}",
                args,
                String::from_utf8_lossy(&undo.stderr)
            );
            let left = left_behind();
            prop_assert!(
                left.is_none(),
                "detach --all after {:?} left {:?}",
                args,
                left
            );
        } else {
            refused.set(refused.get() + 1);
            let first = stderr.lines().next().unwrap_or_default();
            if out.status.code() == Some(2) {
                prop_assert!(first.starts_with("error:"), "{:?}: {}", args, stderr);
            } else {
                prop_assert_eq!(stderr.lines().count(), 1, "{:?}: {}", args, stderr);
                prop_assert!(
                    first.starts_with("freebind-agent: error: "),
                    "{:?}: {}",
                    args,
                    stderr
                );
            }
            let left = left_behind();
            prop_assert!(left.is_none(), "{:?} was refused but left {:?}", args, left);
        }
        Ok(())
    };
    // Valid targets first, so the accept-and-undo path runs every time, not only when
    // the generator happens on one.
    let glob = format!("{}/m*", cg.relative());
    let pid = sleeper.pid().to_string();
    for fixed in [
        vec!["attach", "--cgroup", member.relative()],
        vec!["attach", "--cgroup", &glob, "--allow", "192.0.2.0/24"],
        vec!["attach", "--pid", &pid],
    ] {
        let args: Vec<String> = fixed.iter().map(|a| a.to_string()).collect();
        case(args.clone()).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    assert_eq!(
        (accepted.get(), attached.get()),
        (3, 3),
        "each valid attach must be accepted and attach programs to {}",
        member.relative()
    );
    runner
        .run(&reach.argv(), case)
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "fuzz_cli: 3 valid and 64 generated command lines, {} refused, {} accepted (each undone)",
        refused.get(),
        accepted.get()
    );
}
