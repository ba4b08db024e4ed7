use std::{
    env,
    process::{Command, Stdio},
};

use anyhow::{bail, Context as _, Result};

/// Prints `$ <command line>`, runs it with inherited stdio and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> Result<()> {
    run_with_header(cmd, &format!("$ {}", display(cmd)))
}

/// Like [`run`], for a setup step: prints `→ <what>: <command line>`.
pub fn step(what: &str, cmd: &mut Command) -> Result<()> {
    run_with_header(cmd, &format!("→ {what}: {}", display(cmd)))
}

fn run_with_header(cmd: &mut Command, header: &str) -> Result<()> {
    println!("{header}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !status.success() {
        bail!("`{}` failed: {status}", display(cmd));
    }
    Ok(())
}

/// Runs a query silently and returns its stdout; stderr is kept for the error.
pub fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run `{}`", display(cmd)))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = stderr.trim_end();
        let separator = if stderr.is_empty() { "" } else { "\n" };
        bail!(
            "`{}` failed: {}{separator}{stderr}",
            display(cmd),
            out.status
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{}` printed non-UTF-8", display(cmd)))
}

/// A copy-pastable rendering: explicit environment (PATH aside, it is long and only
/// ever prepended to), program, arguments, and the directory when it is not ours.
pub fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        if env::current_dir().ok().as_deref() != Some(dir) {
            words.push(format!("cd {} &&", quote(&dir.to_string_lossy())));
        }
    }
    for (key, value) in cmd.get_envs() {
        if let (Some(value), false) = (value, key == "PATH") {
            words.push(format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            ));
        }
    }
    words.push(quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|arg| quote(&arg.to_string_lossy())));
    words.join(" ")
}

fn quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}
