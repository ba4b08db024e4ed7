//! The config parser fed arbitrary text and near-valid configs: it never panics, every
//! refusal is one line naming the file (and, where it can, the line), and it accepts
//! exactly the configs the documented format allows — a parser that refused everything
//! would fail here as surely as one that accepted a typo.
use std::{cell::Cell, path::Path};

use freebind_agent::config::{Config, Selector, EXAMPLE};
use proptest::{
    prelude::*,
    test_runner::{Config as RunnerConfig, TestRunner},
};

const ORIGIN: &str = "/etc/freebind/agent.toml";

/// The example the installation ships, every `[[attach]]` in it commented out.
const SHIPPED: &str = include_str!("../../deploy/config/agent.toml");

/// The parser's answer, after checking it did not panic and that an error is one line
/// starting with `config ORIGIN`.
fn check(text: &str) -> Result<Config, String> {
    let r = std::panic::catch_unwind(|| Config::parse(text, Path::new(ORIGIN)));
    let r = r.unwrap_or_else(|_| panic!("the parser panicked on {text:?}"));
    r.map_err(|e| {
        let msg = format!("{e:#}");
        assert!(
            !msg.contains('\n'),
            "more than one line for {text:?}: {msg}"
        );
        assert!(
            msg.starts_with(&format!("config {ORIGIN}")),
            "{text:?}: {msg}"
        );
        msg
    })
}

/// What a config parses to: each `[[attach]]` as its selector (`cgroup X`, `unit X`) and
/// its prefixes as written.
fn summary(config: &Config) -> Vec<(String, Vec<String>)> {
    config
        .attach
        .iter()
        .map(|a| (a.selector.to_string(), a.allow.clone()))
        .collect()
}

#[track_caller]
fn accepted(text: &str) -> Vec<(String, Vec<String>)> {
    match check(text) {
        Ok(config) => summary(&config),
        Err(e) => panic!("a valid config was refused: {e}\n{text}"),
    }
}

fn owned(entries: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
    entries
        .iter()
        .map(|(sel, allow)| {
            (
                (*sel).to_owned(),
                allow.iter().map(|a| (*a).to_owned()).collect(),
            )
        })
        .collect()
}

/// `key = value` at the start of a line: a commented-out setting, not prose about one.
fn is_key_line(line: &str) -> bool {
    line.split_once(" = ")
        .is_some_and(|(key, _)| !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase()))
}

#[test]
fn the_documented_configs_parse_to_what_they_say() {
    // As installed: everything commented out, so it serves nothing.
    assert_eq!(accepted(SHIPPED), vec![]);
    // The same file with its examples taken into use, as its header tells the operator.
    let uncommented: String = SHIPPED
        .lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with("[[attach]]") || is_key_line(rest) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        accepted(&uncommented),
        owned(&[
            ("unit nginx.service", &["192.0.2.0/24", "2001:db8::/32"]),
            ("unit haproxy.service", &["198.51.100.7"]),
            ("cgroup system.slice/docker-*.scope", &[]),
        ])
    );
    assert_eq!(
        accepted(EXAMPLE),
        owned(&[
            (
                "cgroup system.slice/docker-*.scope",
                &["192.0.2.0/24", "2001:db8::/32"]
            ),
            ("unit nginx.service", &[]),
        ])
    );
    for (text, want) in [
        ("", owned(&[])),
        ("# paused\n\n", owned(&[])),
        ("attach = []\n", owned(&[])),
        (
            "[[attach]]\ncgroup = \"/machine.slice/\"\n",
            owned(&[("cgroup machine.slice", &[])]),
        ),
        (
            "[[attach]]\nallow = [\"203.0.113.0/25\", \"2001:db8:1::5/128\"]\nunit = \"getty@tty1.service\"\n\
             [[attach]]\ncgroup = \"a.slice/b-?.scope\"\nallow = [\"198.51.100.7\"]\n",
            owned(&[
                ("unit getty@tty1.service", &["203.0.113.0/25", "2001:db8:1::5/128"]),
                ("cgroup a.slice/b-?.scope", &["198.51.100.7"]),
            ]),
        ),
        (
            "attach = [{ unit = \"a.socket\" }, { cgroup = \"x/[ab]*\", allow = [\"0.0.0.0/0\"] }]\n",
            owned(&[("unit a.socket", &[]), ("cgroup x/[ab]*", &["0.0.0.0/0"])]),
        ),
        // The same name as a unit and as a cgroup are two selectors.
        (
            "[[attach]]\nunit = \"a.slice\"\n[[attach]]\ncgroup = \"a.slice\"\n",
            owned(&[("unit a.slice", &[]), ("cgroup a.slice", &[])]),
        ),
    ] {
        assert_eq!(accepted(text), want, "{text}");
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

/// A value and whether the parser must accept it.
type Judged = (String, bool);

fn valid(s: &str) -> Judged {
    (s.to_owned(), true)
}

fn invalid(s: &str) -> Judged {
    (s.to_owned(), false)
}

/// A cgroup glob: generated well-formed ones, and the mistakes the parser names.
fn cgroup_value() -> impl Strategy<Value = Judged> {
    prop_oneof![
        4 => "[a-z][a-z0-9-]{0,6}(\\.slice)?(/[a-z][a-z0-9]{0,4}-[*?]\\.scope)?"
            .prop_map(|s| (s, true)),
        1 => prop::sample::select(vec![
            invalid(""),
            invalid("/"),
            invalid("a/../b"),
            invalid("a//b"),
            invalid("a/**"),
            invalid("a/[b"),
            invalid("/sys/fs/cgroup/system.slice"),
        ]),
    ]
}

/// A unit name: well-formed ones of every type that has a cgroup, and refused ones.
fn unit_value() -> impl Strategy<Value = Judged> {
    prop_oneof![
        4 => (
            "[a-z][a-z0-9-]{0,6}(@[a-z0-9]{1,4})?",
            prop::sample::select(vec!["service", "scope", "slice", "socket", "mount", "swap"]),
        )
            .prop_map(|(stem, suffix)| (format!("{stem}.{suffix}"), true)),
        1 => prop::sample::select(vec![
            invalid("nginx"),
            invalid("multi-user.target"),
            invalid("nginx.servic"),
            invalid("getty@.service"),
            invalid("@tty1.service"),
            invalid("ng inx.service"),
        ]),
    ]
}

/// One prefix of an `allow` list.
fn prefix_value() -> impl Strategy<Value = Judged> {
    prop::sample::select(vec![
        valid("192.0.2.0/24"),
        valid("198.51.100.7"),
        valid("203.0.113.0/25"),
        valid("0.0.0.0/0"),
        valid("2001:db8::/32"),
        valid("2001:db8:1::5/128"),
        valid("2001:db8:1::5"),
        invalid("banana"),
        invalid("192.0.2.10/24"),
        invalid("192.0.2.0/33"),
        invalid("300.1.2.3"),
        invalid("2001:db8::/129"),
        invalid(""),
    ])
}

/// What selects: a cgroup, a unit, both or neither (the last two refused).
#[derive(Debug, Clone)]
enum Select {
    Cgroup(Judged),
    Unit(Judged),
    Both(Judged, Judged),
    Neither,
}

/// One generated `[[attach]]`.
#[derive(Debug, Clone)]
struct Entry {
    select: Select,
    /// `None`: no `allow` key (any address).
    allow: Option<Vec<Judged>>,
    /// `allow` before the selector.
    allow_first: bool,
    /// A misspelt key (`alow = […]`), refused whatever else the entry says.
    typo: bool,
}

impl Entry {
    fn render(&self) -> String {
        let quoted = |s: &str| format!("\"{s}\"");
        let mut select = String::new();
        match &self.select {
            Select::Cgroup((c, _)) => select += &format!("cgroup = {}\n", quoted(c)),
            Select::Unit((u, _)) => select += &format!("unit = {}\n", quoted(u)),
            Select::Both((c, _), (u, _)) => {
                select += &format!("cgroup = {}\nunit = {}\n", quoted(c), quoted(u))
            }
            Select::Neither => {}
        }
        let allow = match &self.allow {
            None => String::new(),
            Some(list) => {
                let items: Vec<String> = list.iter().map(|(p, _)| quoted(p)).collect();
                format!("allow = [{}]\n", items.join(", "))
            }
        };
        let typo = if self.typo {
            "alow = [\"192.0.2.0/24\"]\n"
        } else {
            ""
        };
        if self.allow_first {
            format!("[[attach]]\n{allow}{typo}{select}")
        } else {
            format!("[[attach]]\n{select}{typo}{allow}")
        }
    }

    /// The selector as the parser writes it, when the entry is valid.
    fn selector(&self) -> Option<String> {
        if self.typo {
            return None;
        }
        let selector = match &self.select {
            Select::Cgroup((c, true)) => format!("cgroup {c}"),
            Select::Unit((u, true)) => format!("unit {u}"),
            _ => return None,
        };
        match &self.allow {
            None => Some(selector),
            // An empty list would read as "nothing" but mean "any address".
            Some(list) if list.is_empty() => None,
            Some(list) => list.iter().all(|(_, ok)| *ok).then_some(selector),
        }
    }

    fn prefixes(&self) -> Vec<String> {
        self.allow
            .iter()
            .flatten()
            .map(|(p, _)| p.clone())
            .collect()
    }
}

fn entry() -> impl Strategy<Value = Entry> {
    let select = prop_oneof![
        6 => cgroup_value().prop_map(Select::Cgroup),
        6 => unit_value().prop_map(Select::Unit),
        1 => (cgroup_value(), unit_value()).prop_map(|(c, u)| Select::Both(c, u)),
        1 => Just(Select::Neither),
    ];
    let allow = prop_oneof![
        2 => Just(None),
        5 => prop::collection::vec(
            prop_oneof![5 => prefix_value().prop_filter("valid", |p| p.1), 1 => prefix_value()],
            1..4,
        )
        .prop_map(Some),
        1 => Just(Some(Vec::new())),
    ];
    (select, allow, any::<bool>(), prop::bool::weighted(0.05)).prop_map(
        |(select, allow, allow_first, typo)| Entry {
            select,
            allow,
            allow_first,
            typo,
        },
    )
}

/// The parse a config of `entries` must give: every entry valid and every selector once,
/// or a refusal.
fn expected(entries: &[Entry]) -> Option<Vec<(String, Vec<String>)>> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for e in entries {
        let selector = e.selector()?;
        if out.iter().any(|(s, _)| *s == selector) {
            return None;
        }
        out.push((selector, e.prefixes()));
    }
    Some(out)
}

#[test]
fn near_valid_configs_are_accepted_exactly_when_every_attach_is_valid() {
    let accepted = Cell::new(0u32);
    let refused = Cell::new(0u32);
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 3000,
        ..RunnerConfig::default()
    });
    runner
        .run(&prop::collection::vec(entry(), 0..5), |entries| {
            let text: String = entries.iter().map(Entry::render).collect();
            let got = check(&text);
            match (expected(&entries), got) {
                (Some(want), Ok(config)) => {
                    prop_assert_eq!(summary(&config), want, "{}", text);
                    accepted.set(accepted.get() + 1);
                }
                (None, Err(_)) => refused.set(refused.get() + 1),
                (Some(_), Err(e)) => prop_assert!(false, "refused a valid config: {e}\n{text}"),
                (None, Ok(c)) => {
                    prop_assert!(
                        false,
                        "accepted an invalid config as {:?}:\n{text}",
                        summary(&c)
                    )
                }
            }
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    // Both outcomes must be common, or the generator tests only one side of the parser.
    let (a, r) = (accepted.get(), refused.get());
    eprintln!("near-valid configs: {a} accepted, {r} refused");
    assert!(
        a >= 300 && r >= 300,
        "{a} configs accepted, {r} refused: the generator is lopsided"
    );
}

/// A selector equal after normalisation (slashes around a cgroup path) is the same one.
#[test]
fn a_cgroup_written_with_slashes_around_it_is_the_same_selector() {
    let text = "[[attach]]\ncgroup = \"a.slice/b\"\n[[attach]]\ncgroup = \"/a.slice/b/\"\n";
    let e = check(text).expect_err(text);
    assert!(e.contains("line 4"), "{e}");
    assert!(e.contains("already selected at line 1"), "{e}");
    let one = check("[[attach]]\ncgroup = \"/a.slice/b/\"\n").unwrap();
    assert!(matches!(&one.attach[0].selector, Selector::Cgroup(g) if g.as_str() == "a.slice/b"));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics_and_errors_are_one_line(text in any::<String>()) {
        let _ = check(&text);
    }

    #[test]
    fn fragments_of_real_configs_never_panic_and_errors_are_one_line(
        parts in proptest::collection::vec(fragment(), 0..8)
    ) {
        let _ = check(&parts.concat());
    }
}
