//! The config parser fed arbitrary text and near-valid configs: it never panics, and every
//! refusal is one line naming the file (and, where it can, the line).
use std::path::Path;

use freebind_agent::config::Config;
use proptest::prelude::*;

const ORIGIN: &str = "/etc/freebind/agent.toml";

/// Checks the parser's answer: an error is one line starting with `config ORIGIN`.
fn check(text: &str) {
    let r = std::panic::catch_unwind(|| Config::parse(text, Path::new(ORIGIN)));
    let r = r.unwrap_or_else(|_| panic!("the parser panicked on {text:?}"));
    if let Err(e) = r {
        let msg = format!("{e:#}");
        assert!(
            !msg.contains('\n'),
            "more than one line for {text:?}: {msg}"
        );
        assert!(
            msg.starts_with(&format!("config {ORIGIN}")),
            "{text:?}: {msg}"
        );
    }
}

/// Pieces of real configs, to build texts that get past TOML into the checks behind it.
fn fragment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("[[attach]]\n".to_owned()),
        Just("[attach]\n".to_owned()),
        "cgroup = \"[a-z*?/.\\[\\]-]{0,24}\"\n",
        "unit = \"[a-zA-Z0-9@.:\\\\/-]{0,24}\"\n",
        "allow = \\[(\"[0-9a-f.:/]{0,20}\", ?){0,3}\\]\n",
        "[a-z]{1,8} = [0-9]{1,4}\n",
        Just("allow = \"192.0.2.0/24\"\n".to_owned()),
        Just("cgroup = 7\n".to_owned()),
        any::<String>(),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_errors_are_one_line(text in any::<String>()) {
        check(&text);
    }

    #[test]
    fn near_valid_configs_never_panic_and_errors_are_one_line(
        parts in proptest::collection::vec(fragment(), 0..8)
    ) {
        check(&parts.concat());
    }
}
