//! Embeds the eBPF object built by `cargo xtask` (nightly, bpf-linker) in
//! the hearth binary, so the agent ships as one file.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=HEARTH_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let object = std::env::var_os("HEARTH_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target/ebpf/bpfel-unknown-none/release/hearth"));
    if !object.is_file() {
        panic!(
            "the eBPF object {} does not exist: build through `cargo xtask build` \
             (or `cargo xtask build-ebpf` first), which compiles the kernel programs",
            object.display()
        );
    }
    println!("cargo:rerun-if-changed={}", object.display());
    println!(
        "cargo:rustc-env=HEARTH_EBPF_OBJECT_PATH={}",
        object.display()
    );
}
