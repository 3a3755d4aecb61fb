//! Embeds the kernel object built by `cargo xtask build-ebpf` when it exists; otherwise an
//! empty placeholder, and the daemon runs L7-only (the workspace builds without bpf-linker).

use std::{env, fs, path::PathBuf};

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let target = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| if t.is_absolute() { t } else { manifest.join("..").join(t) })
        .unwrap_or_else(|| manifest.join("../target"));
    let object = target.join("bpfel-unknown-none/release/speedmimi-ebpf");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("speedmimi-ebpf.o");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    println!("cargo:rerun-if-changed={}", object.display());
    match fs::read(&object) {
        Ok(bytes) => fs::write(&out, bytes).expect("write embedded eBPF object"),
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {} (run `cargo xtask build-ebpf`); building L7-only",
                object.display()
            );
            fs::write(&out, []).expect("write empty eBPF placeholder");
        }
    }
}
