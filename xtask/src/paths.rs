use std::{env, path::PathBuf};

/// Where things are, for every step and for `demo`/`bench`.
pub struct Paths {
    /// The cargo workspace root; every command runs there.
    pub root: PathBuf,
    /// The eBPF crate: its own cargo workspace, built with nightly.
    pub ebpf_crate: PathBuf,
    /// The eBPF object the agent embeds (absolute).
    pub ebpf_object: PathBuf,
    /// The release agent binary (absolute).
    pub agent: PathBuf,
    /// Generated completion scripts and man pages (`cargo xtask docs`), absolute.
    pub docs: PathBuf,
}

impl Paths {
    pub fn new() -> Self {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives inside the workspace")
            .to_path_buf();
        let ebpf_crate = root.join("freebind-ebpf");
        // The eBPF build clears CARGO_TARGET_DIR (see build_steps), so its object is
        // always under its own target directory, where the agent's build.rs looks.
        let ebpf_object = ebpf_crate.join("target/bpfel-unknown-none/release/freebind");
        let target_dir = env::var_os("CARGO_TARGET_DIR")
            .map(|dir| root.join(dir))
            .unwrap_or_else(|| root.join("target"));
        let agent = target_dir.join("release/freebind-agent");
        let docs = target_dir.join("docs");
        Self {
            root,
            ebpf_crate,
            ebpf_object,
            agent,
            docs,
        }
    }
}
