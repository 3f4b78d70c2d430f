//! The linker script that optimized x86_64 builds link with (`link/hot-text.ld`, applied
//! by `build.rs`). The test suite builds only the dev profile, which does not use it, so
//! a script the linker rejects, or one that no longer places anything, would otherwise
//! show only in a release build. This links a small program with it, the way `build.rs`
//! hands it to rustc, and runs it.

use std::path::Path;
use std::process::Command;

#[test]
fn the_code_layout_script_links_a_program_that_runs_with_its_hot_code_first() {
    if !cfg!(all(
        target_arch = "x86_64",
        target_os = "linux",
        target_env = "gnu"
    )) {
        // build.rs applies the script to x86_64-unknown-linux-gnu only.
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("link/hot-text.ld");
    let dir = tempfile::tempdir().expect("temp dir");
    let src = dir.path().join("main.rs");
    std::fs::write(
        &src,
        "fn main() { let n = std::env::args().count(); println!(\"ran with {n} argument(s)\"); }\n",
    )
    .expect("write main.rs");
    let prog = dir.path().join("prog");
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(&rustc)
        .args(["-C", "opt-level=2", "-C"])
        .arg(format!("link-arg=-Wl,-T,{}", script.display()))
        .arg("-o")
        .arg(&prog)
        .arg(&src)
        .output()
        .expect("run rustc");
    assert!(
        out.status.success(),
        "rustc with {} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&prog)
        .arg("x")
        .output()
        .expect("run the program");
    assert_eq!(
        String::from_utf8_lossy(&run.stdout),
        "ran with 2 argument(s)\n"
    );
    // The standard library's functions the script names landed in .text.hot, before
    // .text.
    let elf = std::fs::read(&prog).expect("read the program");
    let sections = section_headers(&elf);
    let hot = sections.iter().find(|s| s.0 == ".text.hot");
    let text = sections.iter().find(|s| s.0 == ".text");
    let (Some(hot), Some(text)) = (hot, text) else {
        panic!("no .text.hot or .text in {sections:?}");
    };
    assert!(hot.2 > 0, "nothing placed in .text.hot: {sections:?}");
    assert!(
        hot.1 < text.1,
        ".text.hot is not before .text: {sections:?}"
    );
}

/// (name, address, size) of each section of a little-endian ELF64 file.
fn section_headers(elf: &[u8]) -> Vec<(String, u64, u64)> {
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let u32_at = |o: usize| u32::from_le_bytes(elf[o..o + 4].try_into().unwrap()) as usize;
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    assert_eq!(&elf[..5], b"\x7fELF\x02", "not an ELF64 file");
    let shoff = u64_at(0x28) as usize;
    let shentsize = u16_at(0x3a);
    let shnum = u16_at(0x3c);
    let shstrndx = u16_at(0x3e);
    let header = |i: usize| shoff + i * shentsize;
    let strtab = u64_at(header(shstrndx) + 0x18) as usize;
    (0..shnum)
        .map(|i| {
            let h = header(i);
            let name_at = strtab + u32_at(h);
            let end = elf[name_at..].iter().position(|&b| b == 0).unwrap();
            let name = String::from_utf8_lossy(&elf[name_at..name_at + end]).into_owned();
            (name, u64_at(h + 0x10), u64_at(h + 0x20))
        })
        .collect()
}
