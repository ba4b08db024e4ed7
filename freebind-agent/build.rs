//! Embeds the eBPF object built by `cargo xtask build-ebpf`.
//!
//! The object is built with nightly and bpf-linker, which a plain `cargo build` of this
//! crate cannot do; when it is missing, an empty object is embedded and the agent says at
//! start that it must be built with `cargo xtask build`.
use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=FREEBIND_EBPF_OBJECT");
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let object = env::var_os("FREEBIND_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            manifest.join("../freebind-ebpf/target/bpfel-unknown-none/release/freebind")
        });
    println!("cargo:rerun-if-changed={}", object.display());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap()).join("freebind.bpf.o");
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).unwrap(),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: build with `cargo xtask build`",
                object.display()
            );
            fs::write(&out, []).unwrap();
        }
    }
}
