//! `cargo xtask docs [--out DIR]`: shell completion scripts and man pages, written by the
//! release agent's hidden `generate` subcommand from its own clap definitions (so they
//! never drift from the parser). `cargo xtask install` installs them.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{build_steps::build, cmd::output, paths::Paths};

/// A completion script: what `freebind-agent generate completion SHELL` is asked for,
/// its file in `completions/`, and where `install` puts it below PREFIX (the directory
/// the shell's own packaging reads vendor completions from).
pub struct Completion {
    pub shell: &'static str,
    pub file: &'static str,
    pub installed: &'static str,
}

pub const COMPLETIONS: &[Completion] = &[
    Completion {
        shell: "bash",
        file: "freebind-agent.bash",
        // bash-completion loads completions/NAME when NAME is first completed.
        installed: "share/bash-completion/completions/freebind-agent",
    },
    Completion {
        shell: "zsh",
        file: "_freebind-agent",
        installed: "share/zsh/vendor-completions/_freebind-agent",
    },
    Completion {
        shell: "fish",
        file: "freebind-agent.fish",
        installed: "share/fish/vendor_completions.d/freebind-agent.fish",
    },
];

/// Where `install` puts the man pages, below PREFIX.
pub const MAN_DIR: &str = "share/man/man1";

#[derive(clap::Args)]
pub struct Options {
    /// Write completions/ and man/ below DIR [default: target/docs].
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
}

/// What [`generate`] wrote.
pub struct Generated {
    /// Each completion with the file its script is in.
    pub completions: Vec<(&'static Completion, PathBuf)>,
    /// The man pages, sorted.
    pub man_pages: Vec<PathBuf>,
}

pub fn run(paths: &Paths, options: &Options) -> Result<()> {
    build(paths)?;
    generate(paths, options.out.as_deref().unwrap_or(&paths.docs)).map(drop)
}

/// Writes `out/completions/*` and `out/man/*.1` with the release agent (built already).
pub fn generate(paths: &Paths, out: &Path) -> Result<Generated> {
    let dir = out.join("completions");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut completions = Vec::new();
    for completion in COMPLETIONS {
        let script =
            output(Command::new(&paths.agent).args(["generate", "completion", completion.shell]))?;
        if script.trim().is_empty() {
            bail!("the agent printed an empty {} script", completion.shell);
        }
        let path = dir.join(completion.file);
        fs::write(&path, script).with_context(|| format!("writing {}", path.display()))?;
        println!("→ {} completion: {}", completion.shell, path.display());
        completions.push((completion, path));
    }

    let man = out.join("man");
    // The page of a subcommand that has gone must not stay behind, to be installed.
    for old in man_pages(&man)? {
        fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
    }
    output(
        Command::new(&paths.agent)
            .arg("generate")
            .arg("man")
            .arg(&man),
    )?;
    let man_pages = man_pages(&man)?;
    if !man_pages.iter().any(|p| p.ends_with("freebind-agent.1")) {
        bail!("the agent wrote no freebind-agent.1 into {}", man.display());
    }
    println!(
        "→ man pages: {} ({})",
        man.display(),
        man_pages
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| n.to_string_lossy())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(Generated {
        completions,
        man_pages,
    })
}

/// The agent's pages in `dir` (`freebind-agent*.1`), sorted; none when `dir` is missing.
pub fn man_pages(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    };
    let mut pages = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("reading {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with("freebind-agent") && name.ends_with(".1") {
            pages.push(entry.path());
        }
    }
    pages.sort();
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_go_where_each_shell_looks() {
        let installed: Vec<&str> = COMPLETIONS.iter().map(|c| c.installed).collect();
        assert_eq!(
            installed,
            [
                "share/bash-completion/completions/freebind-agent",
                "share/zsh/vendor-completions/_freebind-agent",
                "share/fish/vendor_completions.d/freebind-agent.fish",
            ]
        );
        // zsh autoloads a completion function by its file name, from `#compdef`.
        let zsh = COMPLETIONS.iter().find(|c| c.shell == "zsh").unwrap();
        assert!(zsh.file.starts_with('_') && zsh.installed.ends_with(zsh.file));
    }

    #[test]
    fn man_pages_are_the_agents_only() {
        let dir = std::env::temp_dir().join(format!("xtask-docs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        for name in [
            "freebind-agent.1",
            "freebind-agent-status.1",
            "other.1",
            "freebind-agent.1.gz",
        ] {
            fs::write(dir.join(name), "").unwrap();
        }
        let names: Vec<String> = man_pages(&dir)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["freebind-agent-status.1", "freebind-agent.1"]);
        assert!(man_pages(&dir.join("missing")).unwrap().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
