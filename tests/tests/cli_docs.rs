//! What `cargo xtask docs` and `cargo xtask install` ship, made by the agent's hidden
//! `generate` subcommand: completion scripts their shells accept and that complete the
//! visible subcommands (never the hidden `hook` and `generate`), man pages that render
//! without a warning; and log lines that journald reads a priority from when stderr is
//! the journal. All but the journald test run unprivileged.
use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use freebind_e2e::{
    agent_command, ensure_doc_tools, require_root, show_output, tool, unique_name, TempDir,
};

const HIDDEN: &[&str] = &["hook", "generate"];

/// Runs `cmd`; panics with its output unless it exits 0 with nothing on stderr.
fn run_clean(cmd: &mut Command, what: &str) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "{what}: {cmd:?}: {}",
        show_output(&out)
    );
    String::from_utf8(out.stdout).unwrap_or_else(|e| panic!("{what}: not UTF-8: {e}"))
}

/// `freebind-agent generate completion SHELL`, written to `dir/name`.
fn completion(shell: &str, dir: &TempDir, name: &str) -> PathBuf {
    let script = run_clean(
        agent_command().args(["generate", "completion", shell]),
        &format!("generate completion {shell}"),
    );
    assert!(script.contains("freebind-agent"), "{shell}: {script}");
    let path = dir.path().join(name);
    fs::write(&path, script).unwrap();
    path
}

/// The visible subcommands, as `freebind-agent --help` lists them (without `help`).
fn visible_subcommands() -> Vec<String> {
    let help = run_clean(agent_command().arg("--help"), "--help");
    let names: Vec<String> = help
        .lines()
        .skip_while(|l| *l != "Commands:")
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| *n != "help")
        .map(str::to_owned)
        .collect();
    for expected in ["run", "attach", "detach", "status", "exec"] {
        assert!(names.iter().any(|n| n == expected), "{names:?} in:\n{help}");
    }
    for hidden in HIDDEN {
        assert!(!names.iter().any(|n| n == hidden), "{names:?}");
    }
    names
}

/// What a completion of `freebind-agent ` must offer: every visible subcommand, and
/// none of the hidden ones.
fn offers_every_visible_subcommand_and_no_hidden_one(all: &[String]) {
    for sub in visible_subcommands() {
        assert!(all.contains(&sub), "{sub} not offered: {all:?}");
    }
    for hidden in HIDDEN {
        assert!(
            !all.iter().any(|w| w == hidden),
            "{hidden} offered: {all:?}"
        );
    }
}

#[test]
fn bash_completion_registers_and_completes_subcommands_and_their_options() {
    let dir = TempDir::new("fb-bash");
    let script = completion("bash", &dir, "freebind-agent.bash");
    // The completion function as `complete -p` names it, called as bash calls it
    // (COMMAND, the word being completed, the word before it); one line per query.
    let driver = r#"
        source "$1" || exit 1
        complete -p freebind-agent || exit 1
        spec=$(complete -p freebind-agent)
        fn=${spec#*-F }
        fn=${fn%% *}
        query() {
            COMP_WORDS=("$@")
            COMP_CWORD=$(( $# - 1 ))
            COMP_LINE="$*"
            COMP_POINT=${#COMP_LINE}
            COMPREPLY=()
            "$fn" freebind-agent "${COMP_WORDS[COMP_CWORD]}" "${COMP_WORDS[COMP_CWORD-1]}"
            echo "[$*] ${COMPREPLY[*]}"
        }
        query freebind-agent st
        query freebind-agent ''
        query freebind-agent status --
        query freebind-agent attach --u
    "#;
    let out = run_clean(
        Command::new(tool("bash"))
            .args(["--norc", "--noprofile", "-c", driver, "bash"])
            .arg(&script),
        "bash completion",
    );
    let mut lines = out.lines();
    let registration = lines.next().unwrap_or_default();
    assert!(
        registration.starts_with("complete ")
            && registration.contains(" -F _freebind__agent ")
            && registration.ends_with(" freebind-agent"),
        "{out}"
    );
    let reply = |query: &str| -> Vec<String> {
        let prefix = format!("[{query}] ");
        out.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no reply to {query:?} in:\n{out}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(reply("freebind-agent st"), ["status"], "{out}");
    let all = reply("freebind-agent ");
    offers_every_visible_subcommand_and_no_hidden_one(&all);
    // A subcommand's own options: what a hyphen in the binary's name breaks in
    // clap_complete's bash script (clap-rs/clap#6421), which the agent works around.
    let status = reply("freebind-agent status --");
    assert!(status.iter().any(|w| w == "--json"), "{status:?}");
    assert_eq!(reply("freebind-agent attach --u"), ["--unit"], "{out}");
}

#[test]
fn zsh_completion_passes_zsh_syntax_check_and_registers_with_compinit() {
    ensure_doc_tools();
    let dir = TempDir::new("fb-zsh");
    let script = completion("zsh", &dir, "_freebind-agent");
    let text = fs::read_to_string(&script).unwrap();
    assert!(text.starts_with("#compdef freebind-agent\n"), "{text}");
    assert!(
        !HIDDEN.iter().any(|h| text.contains(&format!("({h})"))),
        "hidden subcommand in:\n{text}"
    );
    run_clean(Command::new(tool("zsh")).arg("-n").arg(&script), "zsh -n");
    // As a completion directory on $fpath is used: compinit reads #compdef.
    let out = run_clean(
        Command::new(tool("zsh"))
            .args([
                "-f",
                "-c",
                "fpath=(\"$1\" $fpath); autoload -Uz compinit && compinit -u -D && \
                 print -r -- \"$_comps[freebind-agent]\"",
                "zsh",
            ])
            .arg(dir.path())
            .env("HOME", dir.path()),
        "zsh compinit",
    );
    assert_eq!(out.trim(), "_freebind-agent", "{out}");
}

#[test]
fn fish_completion_passes_fish_syntax_check_and_completes() {
    ensure_doc_tools();
    let dir = TempDir::new("fb-fish");
    let script = completion("fish", &dir, "freebind-agent.fish");
    run_clean(
        Command::new(tool("fish")).arg("--no-execute").arg(&script),
        "fish --no-execute",
    );
    let complete = |line: &str| -> Vec<String> {
        let out = run_clean(
            Command::new(tool("fish"))
                .args(["--no-config", "-c", "source $argv[1]; complete -C $argv[2]"])
                .arg(&script)
                .arg(line)
                .env("HOME", dir.path())
                .env("XDG_CONFIG_HOME", dir.path())
                .env("XDG_DATA_HOME", dir.path()),
            &format!("fish complete -C {line:?}"),
        );
        // One candidate a line, then a tab and its description.
        out.lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(complete("freebind-agent st"), ["status"]);
    let all = complete("freebind-agent ");
    offers_every_visible_subcommand_and_no_hidden_one(&all);
    assert!(
        complete("freebind-agent status --").contains(&"--json".to_owned()),
        "no --json for status"
    );
}

#[test]
fn man_pages_render_without_warnings_one_per_visible_subcommand() {
    ensure_doc_tools();
    let dir = TempDir::new("fb-man");
    let out_dir = dir.path().join("man");
    run_clean(
        agent_command().args(["generate", "man"]).arg(&out_dir),
        "generate man",
    );
    let subs = visible_subcommands();
    let mut expected: Vec<String> = subs
        .iter()
        .map(|s| format!("freebind-agent-{s}.1"))
        .chain(["freebind-agent.1".to_owned()])
        .collect();
    expected.sort();
    let mut pages: Vec<String> = fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    assert_eq!(pages, expected, "hidden subcommands get no page");

    // Plain text; newer groff renders `\-` as U+2212 and hyphens as U+2010.
    let render = |page: &Path| -> String {
        run_clean(
            Command::new(tool("groff"))
                .args(["-man", "-Tutf8", "-ww", "-P-cbou"])
                .arg(page),
            &format!("groff {}", page.display()),
        )
        .replace(['\u{2212}', '\u{2010}'], "-")
    };
    for page in &pages {
        let path = out_dir.join(page);
        // -z: format, report every warning (-ww), print nothing.
        run_clean(
            Command::new(tool("groff"))
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&path),
            &format!("groff -z {page}"),
        );
        let text = render(&path);
        let name = page.trim_end_matches(".1");
        assert!(
            text.lines()
                .next()
                .is_some_and(|l| l.starts_with(&format!("{name}(1)"))),
            "{page}:\n{text}"
        );
    }
    let main = render(&out_dir.join("freebind-agent.1"));
    for sub in &subs {
        assert!(
            main.contains(&format!("freebind-agent-{sub}(1)")),
            "freebind-agent.1 does not mention {sub}:\n{main}"
        );
    }
    for hidden in HIDDEN {
        assert!(
            !main.contains(&format!("freebind-agent-{hidden}")),
            "freebind-agent.1 mentions {hidden}:\n{main}"
        );
    }
    // Non-ASCII (check's ✘) is escaped for troff, and comes out whole.
    let check = render(&out_dir.join("freebind-agent-check.1"));
    assert!(check.contains("what to do about each ✘"), "{check}");
}

/// Runs `exec` of a command that does not exist with stderr into `log` and
/// `JOURNAL_STREAM=journal_stream`: the agent attaches, says it is ready (info), fails to
/// start CMD (error) and exits 127. Returns the log.
fn exec_missing_logging_to(log: &Path, journal_stream: &str, missing: &str) -> String {
    let stderr = fs::File::create(log).unwrap();
    let out = agent_command()
        .args(["exec", "--", missing])
        .env("JOURNAL_STREAM", journal_stream)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .output()
        .expect("run freebind-agent exec");
    let log = fs::read_to_string(log).unwrap();
    assert_eq!(
        out.status.code(),
        Some(127),
        "{}\nlog:\n{log}",
        show_output(&out)
    );
    log
}

fn dev_ino(path: &Path) -> String {
    let m = fs::metadata(path).unwrap();
    format!("{}:{}", m.dev(), m.ino())
}

#[test]
fn on_the_journal_stream_lines_carry_syslog_priorities_and_no_timestamps() {
    if !require_root() {
        return;
    }
    let dir = TempDir::new("fb-journal");
    let missing = format!("/nonexistent/{}", unique_name("fb-cmd"));
    let ready = format!("ready: running {missing} under freebind");
    let failed = format!("cannot run {missing}: No such file or directory");

    // stderr is the stream JOURNAL_STREAM names (it is inherited: compare its dev:inode).
    let journal = dir.path().join("journal");
    fs::File::create(&journal).unwrap();
    let log = exec_missing_logging_to(&journal, &dev_ino(&journal), &missing);
    let lines: Vec<&str> = log.lines().collect();
    assert!(
        lines.contains(&format!("<6>{ready}").as_str()),
        "no <6> ready line:\n{log}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("<3>{failed}"))),
        "no <3> line for CMD:\n{log}"
    );
    for line in &lines {
        let priority = line.get(..3).unwrap_or_default();
        assert!(
            ["<3>", "<4>", "<6>", "<7>"].contains(&priority),
            "a line without a priority prefix: {line:?} in:\n{log}"
        );
        assert!(
            !line.contains(" INFO ") && !line.contains("ERROR") && !line.contains('\x1b'),
            "a level word or a colour on the journal stream: {line:?}"
        );
        assert!(!has_timestamp(line), "a timestamp: {line:?}");
    }

    // JOURNAL_STREAM names another file (inherited by a child whose stderr was
    // redirected): today's format, with timestamp and level.
    let other = dir.path().join("other");
    fs::File::create(&other).unwrap();
    let file = dir.path().join("file");
    let log = exec_missing_logging_to(&file, &dev_ino(&other), &missing);
    let plain = |level: &str, message: &str| {
        log.lines().any(|l| {
            l.starts_with('[') && has_timestamp(l) && l.contains(&format!(" {level}] {message}"))
        })
    };
    assert!(plain("INFO ", &ready), "no plain ready line:\n{log}");
    assert!(plain("ERROR", &failed), "no plain error line:\n{log}");
    assert!(
        !log.lines().any(|l| l.starts_with('<')),
        "priority prefixes off the journal:\n{log}"
    );
}

/// Whether `line` has an env_logger timestamp (`2026-01-02T03:04:05Z`) in it.
fn has_timestamp(line: &str) -> bool {
    let b = line.as_bytes();
    b.windows(20).any(|w| {
        let digits = |r: std::ops::Range<usize>| w[r].iter().all(u8::is_ascii_digit);
        digits(0..4)
            && w[4] == b'-'
            && digits(5..7)
            && w[7] == b'-'
            && digits(8..10)
            && w[10] == b'T'
            && digits(11..13)
            && w[13] == b':'
            && digits(14..16)
            && w[16] == b':'
            && digits(17..19)
            && w[19] == b'Z'
    })
}
