//! The agent's command line fed generated arguments (the real binary, as root): whatever
//! the input, no panic (exit code 101, "panicked"), a refusal is a non-zero exit with one
//! line for the agent's own errors (clap's usage errors: exit 2, starting `error:`), and
//! after every refusal nothing is attached to the test's cgroup and nothing pinned.
use std::{cell::Cell, process::Stdio};

use freebind_e2e::{bpf_programs_attached, require_root, Cgroup, Installation};
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

fn argv() -> impl Strategy<Value = Vec<String>> {
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
    (verb, proptest::collection::vec((flag, value()), 0..4)).prop_map(|(verb, pairs)| {
        let mut v = vec![verb.to_owned()];
        for (f, val) in pairs {
            v.push(f.to_owned());
            v.push(val);
        }
        v
    })
}

#[test]
fn generated_command_lines_never_panic_and_each_refusal_leaves_nothing_attached() {
    if !require_root() {
        return;
    }
    let cg = Cgroup::new("fb-fuzz");
    let inst = Installation::new("fb-fuzz");
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    let (refused, accepted) = (Cell::new(0), Cell::new(0));
    runner
        .run(&argv(), |args| {
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
                prop_assert!(
                    inst.pinned_attachments().is_empty(),
                    "{:?} left a pin",
                    args
                );
                prop_assert!(
                    bpf_programs_attached(&cg).is_empty(),
                    "{:?} left programs",
                    args
                );
            }
            // Something valid (`detach --all` on an empty installation) may succeed; it
            // must leave nothing either.
            prop_assert!(
                bpf_programs_attached(&cg).is_empty(),
                "{:?} left programs",
                args
            );
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    println!(
        "fuzz_cli: 64 generated command lines, {} refused, {} accepted",
        refused.get(),
        accepted.get()
    );
}
