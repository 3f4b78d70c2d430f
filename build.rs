//! Links the agent's optimized x86_64 builds with `link/hot-text.ld`, which puts the
//! functions a running agent executes at the front of its code (see scripts/hot_text.py
//! and BENCHMARKS.md, "Code the idle agent keeps resident"). Debug builds and tests link
//! as usual. `LABGATE_NO_HOT_TEXT=1` turns it off, to measure against.

use std::env;
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link/hot-text.ld");
    println!("cargo:rerun-if-env-changed=LABGATE_NO_HOT_TEXT");
    let optimized = env::var("OPT_LEVEL").is_ok_and(|o| o != "0");
    // Measured with the toolchain's own linker (rust-lld, the default for this target);
    // the ARM gateways' cross linker has not been tried with it.
    let x86_64 = env::var("TARGET").is_ok_and(|t| t == "x86_64-unknown-linux-gnu");
    let off = env::var_os("LABGATE_NO_HOT_TEXT").is_some_and(|v| v != "0");
    let Ok(dir) = env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let script = Path::new(&dir).join("link").join("hot-text.ld");
    if optimized && x86_64 && !off && script.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=labgate=-Wl,-T,{}",
            script.display()
        );
    }
}
