//! `cargo xtask install`: the release agent, its systemd unit, (when there is none) the
//! example configuration, its shell completions and man pages, then
//! `systemctl enable --now` where systemd runs the machine. With `--destdir` it only
//! stages the files, for a package.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{
    build_steps::build,
    cmd::step,
    docs::{self, Generated},
    paths::Paths,
    setup::is_root,
};

/// The unit as shipped: its paths name the default prefix, rewritten by [`render_unit`].
const UNIT_TEMPLATE: &str = include_str!("../../deploy/systemd/freebind-agent.service");
/// The commented example configuration; it selects nothing.
const EXAMPLE_CONFIG: &str = include_str!("../../deploy/config/agent.toml");
/// The agent's path in [`UNIT_TEMPLATE`] (and in the container image): the default prefix.
const TEMPLATE_BINARY: &str = "/usr/local/sbin/freebind-agent";
const UNIT_NAME: &str = "freebind-agent.service";
/// Where the unit goes, whatever the prefix: a unit the administrator installed.
const UNIT_PATH: &str = "/etc/systemd/system/freebind-agent.service";
/// The daemon's default `--config`, which the unit names too.
const CONFIG_PATH: &str = "/etc/freebind/agent.toml";

#[derive(clap::Args)]
pub struct Options {
    /// Installation prefix: the agent goes to PREFIX/sbin/freebind-agent, completions and
    /// man pages below PREFIX/share.
    #[arg(long, value_name = "DIR", default_value = "/usr/local")]
    prefix: PathBuf,
    /// Stage every file below DIR instead of / (for packaging); runs no systemctl.
    #[arg(long, value_name = "DIR")]
    destdir: Option<PathBuf>,
    /// Install the files, but do not enable or start the service.
    #[arg(long)]
    no_enable: bool,
}

pub fn run(paths: &Paths, options: &Options) -> Result<()> {
    // Everything that can be refused is refused before the build, which takes minutes.
    let prefix = prefix_text(&options.prefix)?;
    let binary = agent_path(&options.prefix)?;
    let unit = render_unit(UNIT_TEMPLATE, &binary)?;
    if options.destdir.is_none() && !is_root() {
        bail!(
            "installing into / needs root: run `sudo -E env \"PATH=$PATH\" cargo xtask install`, \
             or stage the files with --destdir DIR"
        );
    }
    build(paths)?;
    let docs = docs::generate(paths, &paths.docs)?;

    let staged = |path: &str| match &options.destdir {
        Some(destdir) => destdir.join(path.trim_start_matches('/')),
        None => PathBuf::from(path),
    };
    let binary_dest = staged(&binary);
    let bytes =
        fs::read(&paths.agent).with_context(|| format!("reading {}", paths.agent.display()))?;
    let binary_changed = if fs::read(&binary_dest).is_ok_and(|old| old == bytes) {
        println!("✔ {} is up to date", binary_dest.display());
        false
    } else {
        println!(
            "→ installing the agent: {} → {}",
            paths.agent.display(),
            binary_dest.display()
        );
        // A new file renamed over the old one: a running daemon keeps its (old)
        // executable, where copying into it would fail with ETXTBSY.
        replace_file(&binary_dest, &bytes, 0o755)?
    };

    let unit_dest = staged(UNIT_PATH);
    if fs::read_to_string(&unit_dest).is_ok_and(|old| old == unit) {
        println!("✔ {} is up to date", unit_dest.display());
    } else {
        println!(
            "→ installing the unit (ExecStart={binary} …): {} (local changes belong in \
             `systemctl edit freebind-agent`)",
            unit_dest.display()
        );
        replace_file(&unit_dest, unit.as_bytes(), 0o644)?;
    }

    let config_dest = staged(CONFIG_PATH);
    if config_dest.exists() {
        println!(
            "✔ keeping {} (it exists; the commented example is deploy/config/agent.toml)",
            config_dest.display()
        );
    } else {
        println!(
            "→ installing the example configuration, which selects nothing: {}",
            config_dest.display()
        );
        // Root's only: the daemon refuses a config others can change, and what it
        // attaches (which cgroups, which prefixes) is nobody else's business.
        replace_file(&config_dest, EXAMPLE_CONFIG.as_bytes(), 0o600)?;
    }

    install_docs(&docs, &prefix, &staged)?;
    if options.destdir.is_none() {
        completion_hints(&prefix);
    }

    if let Some(destdir) = &options.destdir {
        println!(
            "staged below {}; not running systemctl (on the target: systemctl enable --now \
             {UNIT_NAME})",
            destdir.display()
        );
        return Ok(());
    }
    if let Some(why) = not_systemd() {
        println!(
            "{why}: skipping `systemctl daemon-reload` and `systemctl enable --now {UNIT_NAME}`"
        );
        return Ok(());
    }
    let was_active = Command::new("systemctl")
        .args(["is-active", "--quiet", UNIT_NAME])
        .status()
        .is_ok_and(|s| s.success());
    step(
        "making systemd read the unit",
        Command::new("systemctl").arg("daemon-reload"),
    )?;
    if options.no_enable {
        println!("--no-enable: the service is neither enabled nor started");
        if was_active && binary_changed {
            println!(
                "the running daemon is the previous binary: `systemctl restart {UNIT_NAME}` \
                 switches (the attachments stay pinned meanwhile)"
            );
        }
        return Ok(());
    }
    step(
        "enabling and starting the daemon",
        Command::new("systemctl").args(["enable", "--now", UNIT_NAME]),
    )
    .with_context(|| format!("see `journalctl -u {UNIT_NAME}`"))?;
    if was_active && binary_changed {
        step(
            "restarting the daemon on the new binary (the attachments stay pinned meanwhile)",
            Command::new("systemctl").args(["restart", UNIT_NAME]),
        )
        .with_context(|| format!("see `journalctl -u {UNIT_NAME}`"))?;
    }
    Ok(())
}

/// PREFIX/sbin/freebind-agent, refused when systemd would read the path differently on
/// the ExecStart= line (spaces, quotes, `%` specifiers, `$` variables, escapes).
fn agent_path(prefix: &Path) -> Result<String> {
    Ok(format!("{}/sbin/freebind-agent", prefix_text(prefix)?))
}

/// The prefix as text without a trailing `/` (empty for `/`), refused as [`agent_path`]
/// says.
fn prefix_text(prefix: &Path) -> Result<String> {
    let Some(text) = prefix.to_str() else {
        bail!("--prefix {} is not UTF-8", prefix.display());
    };
    if !prefix.is_absolute() {
        bail!("--prefix {text} must be an absolute path");
    }
    if let Some(c) = text
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\%$;".contains(*c))
    {
        bail!("--prefix {text:?}: {c:?} would need escaping in the unit's ExecStart=");
    }
    Ok(text.trim_end_matches('/').to_owned())
}

/// The completion scripts and man pages `docs::generate` wrote, below PREFIX/share; the
/// agent's pages there that it no longer writes (a subcommand gone) are removed.
fn install_docs(docs: &Generated, prefix: &str, staged: &dyn Fn(&str) -> PathBuf) -> Result<()> {
    for (completion, source) in &docs.completions {
        let dest = staged(&format!("{prefix}/{}", completion.installed));
        let bytes = fs::read(source).with_context(|| format!("reading {}", source.display()))?;
        if fs::read(&dest).is_ok_and(|old| old == bytes) {
            println!("✔ {} is up to date", dest.display());
        } else {
            println!(
                "→ installing the {} completion: {} → {}",
                completion.shell,
                source.display(),
                dest.display()
            );
            replace_file(&dest, &bytes, 0o644)?;
        }
    }
    let man_dir = staged(&format!("{prefix}/{}", docs::MAN_DIR));
    let mut names = Vec::new();
    let mut changed = Vec::new();
    for page in &docs.man_pages {
        let name = page.file_name().context("a man page without a name")?;
        let bytes = fs::read(page).with_context(|| format!("reading {}", page.display()))?;
        if replace_file(&man_dir.join(name), &bytes, 0o644)? {
            changed.push(name.to_string_lossy());
        }
        names.push(name.to_owned());
    }
    if changed.is_empty() {
        println!(
            "✔ the {} man pages in {} are up to date",
            names.len(),
            man_dir.display()
        );
    } else {
        println!(
            "→ installed {} of {} man pages into {}: {}",
            changed.len(),
            names.len(),
            man_dir.display(),
            changed.join(", ")
        );
    }
    for old in docs::man_pages(&man_dir)? {
        if !old
            .file_name()
            .is_some_and(|n| names.iter().any(|m| m == n))
        {
            println!(
                "→ removing {} (the agent no longer has that subcommand)",
                old.display()
            );
            fs::remove_file(&old).with_context(|| format!("removing {}", old.display()))?;
        }
    }
    Ok(())
}

/// Says so when an installed completion is where this machine's zsh or fish does not
/// look: Debian's zsh reads vendor-completions below /usr only (below /usr/local, its
/// $fpath has site-functions), fish those of `$XDG_DATA_DIRS` (unset: /usr/share only).
fn completion_hints(prefix: &str) {
    let searched = |program: &str, script: &str| -> Option<Vec<PathBuf>> {
        let out = Command::new(program)
            .args(["-c", script])
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(PathBuf::from)
                .collect(),
        )
    };
    for completion in docs::COMPLETIONS {
        let installed = format!("{prefix}/{}", completion.installed);
        let Some(dir) = Path::new(&installed).parent() else {
            continue;
        };
        let (script, variable, remedy) = match completion.shell {
            "zsh" => (
                "print -rl -- $fpath",
                "$fpath",
                format!(
                    "add `fpath+=({})` before compinit in ~/.zshrc",
                    dir.display()
                ),
            ),
            "fish" => (
                "printf '%s\\n' $__fish_vendor_completionsdirs",
                "$__fish_vendor_completionsdirs, from $XDG_DATA_DIRS",
                format!("add {prefix}/share to XDG_DATA_DIRS"),
            ),
            _ => continue,
        };
        if searched(completion.shell, script).is_some_and(|dirs| !dirs.iter().any(|d| d == dir)) {
            println!(
                "note: {} here does not look in {} ({variable}): {remedy} (or install with \
                 --prefix /usr)",
                completion.shell,
                dir.display()
            );
        }
    }
}

/// The unit with every mention of the template's agent path (ExecStart=,
/// RequiresMountsFor=) naming `binary` instead.
fn render_unit(template: &str, binary: &str) -> Result<String> {
    let exec_start = format!("ExecStart={TEMPLATE_BINARY} ");
    if template
        .lines()
        .filter(|l| l.starts_with("ExecStart="))
        .count()
        != 1
        || !template.lines().any(|l| l.starts_with(&exec_start))
    {
        bail!("deploy/systemd/freebind-agent.service must have one `{exec_start}…` line");
    }
    Ok(template.replace(TEMPLATE_BINARY, binary))
}

/// Why `systemctl` cannot run here, if it cannot: systemd must be PID 1 (and say so, as
/// sd_booted() checks, with /run/systemd/system).
fn not_systemd() -> Option<String> {
    let comm = fs::read_to_string("/proc/1/comm").unwrap_or_default();
    let comm = comm.trim();
    if comm != "systemd" {
        return Some(format!("PID 1 is {comm:?}, not systemd"));
    }
    if !Path::new("/run/systemd/system").is_dir() {
        return Some("systemd is PID 1 but /run/systemd/system is missing".into());
    }
    None
}

/// Writes `bytes` to a new file beside `dest` and renames it over `dest`, creating the
/// parent directories; returns whether the contents changed.
fn replace_file(dest: &Path, bytes: &[u8], mode: u32) -> Result<bool> {
    if fs::read(dest).is_ok_and(|old| old == bytes) {
        return Ok(false);
    }
    let dir = dest
        .parent()
        .with_context(|| format!("{} has no parent directory", dest.display()))?;
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let name = dest.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.xtask-{}", std::process::id()));
    let write = || -> Result<()> {
        let _ = fs::remove_file(&tmp);
        // Created with its final mode (the umask can only narrow it): a config is never
        // readable by others, even for a moment.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(bytes)?;
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.sync_all()?;
        fs::rename(&tmp, dest)?;
        Ok(())
    };
    write().map_err(|e| {
        let _ = fs::remove_file(&tmp);
        e.context(format!("installing {}", dest.display()))
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exec_start(unit: &str) -> &str {
        unit.lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("an ExecStart= line")
    }

    #[test]
    fn default_prefix_installs_the_unit_as_shipped() {
        let binary = agent_path(Path::new("/usr/local")).unwrap();
        assert_eq!(binary, TEMPLATE_BINARY);
        assert_eq!(render_unit(UNIT_TEMPLATE, &binary).unwrap(), UNIT_TEMPLATE);
        assert_eq!(
            exec_start(UNIT_TEMPLATE),
            format!("{TEMPLATE_BINARY} daemon --config {CONFIG_PATH}")
        );
    }

    #[test]
    fn prefix_is_rewritten_everywhere() {
        for (prefix, binary) in [
            ("/opt/freebind", "/opt/freebind/sbin/freebind-agent"),
            ("/usr/", "/usr/sbin/freebind-agent"),
            ("/", "/sbin/freebind-agent"),
        ] {
            let unit = render_unit(UNIT_TEMPLATE, &agent_path(Path::new(prefix)).unwrap()).unwrap();
            assert_eq!(
                exec_start(&unit),
                format!("{binary} daemon --config {CONFIG_PATH}"),
                "{prefix}"
            );
            assert!(!unit.contains(TEMPLATE_BINARY), "{prefix}: {unit}");
            let mounts = unit
                .lines()
                .find_map(|l| l.strip_prefix("RequiresMountsFor="))
                .unwrap();
            assert!(mounts.split(' ').any(|p| p == binary), "{prefix}: {mounts}");
        }
    }

    #[test]
    fn refuses_prefixes_the_unit_cannot_spell() {
        for (prefix, why) in [
            ("usr/local", "absolute"),
            ("/opt/free bind", "' '"),
            ("/opt/%n", "'%'"),
            ("/opt/$HOME", "'$'"),
            ("/opt/a\\b", "'\\\\'"),
        ] {
            let err = agent_path(Path::new(prefix)).unwrap_err().to_string();
            assert!(err.contains(why), "{prefix}: {err}");
        }
    }

    #[test]
    fn refuses_a_template_without_its_exec_start() {
        let moved = UNIT_TEMPLATE.replace(TEMPLATE_BINARY, "/usr/bin/freebind-agent");
        assert!(render_unit(&moved, "/opt/sbin/freebind-agent").is_err());
    }

    #[test]
    fn replaces_files_atomically_and_reports_changes() {
        let dir = std::env::temp_dir().join(format!("xtask-install-{}", std::process::id()));
        let dest = dir.join("a/b/file");
        assert!(replace_file(&dest, b"one", 0o644).unwrap());
        assert!(!replace_file(&dest, b"one", 0o644).unwrap());
        assert!(replace_file(&dest, b"two", 0o755).unwrap());
        assert_eq!(fs::read(&dest).unwrap(), b"two");
        let mode = fs::metadata(&dest).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o755);
        assert_eq!(fs::read_dir(dest.parent().unwrap()).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }
}
