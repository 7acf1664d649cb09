//! Records the compiler version for `mtunnel bench` (`MTUNNEL_RUSTC_VERSION`) and writes
//! the one list of built-in handlers and specs: every `handlers/<cmd>.lua` is a built-in
//! command, every `handlers/<name>_spec.lua` a built-in spec (`$OUT_DIR/builtin.rs`).

use std::path::Path;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = std::process::Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!("cargo:rustc-env=MTUNNEL_RUSTC_VERSION={version}");
    println!("cargo:rerun-if-changed=build.rs");
    builtin_handlers();
}

/// Writes `BUILTIN_HANDLERS` and `BUILTIN_SPECS` from the `.lua` files in `handlers/`
/// (`pve.d.lua`, a type stub for editors, is neither).
fn builtin_handlers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("handlers");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .expect("reading handlers/")
        .map(|e| e.expect("reading handlers/").file_name())
        .filter_map(|n| n.to_str()?.strip_suffix(".lua").map(str::to_string))
        .filter(|n| !n.contains('.'))
        .collect();
    names.sort();
    let entry = |name: &str, file: &str| {
        let path = dir.join(file);
        println!("cargo:rerun-if-changed={}", path.display());
        format!(
            "    ({name:?}, include_str!({:?})),\n",
            path.display().to_string()
        )
    };
    let mut handlers = String::new();
    let mut specs = String::new();
    for name in &names {
        match name.strip_suffix("_spec") {
            Some(_) => specs.push_str(&entry(&format!("{name}.lua"), &format!("{name}.lua"))),
            None => handlers.push_str(&entry(name, &format!("{name}.lua"))),
        }
    }
    let out = format!(
        "/// The handlers shipped in the binary: every `handlers/<cmd>.lua`, as (command, code).\n\
         pub const BUILTIN_HANDLERS: &[(&str, &str)] = &[\n{handlers}];\n\n\
         /// The specs shipped in the binary: every `handlers/*_spec.lua`, as (file name, code).\n\
         pub const BUILTIN_SPECS: &[(&str, &str)] = &[\n{specs}];\n"
    );
    let out_dir = std::env::var("OUT_DIR").expect("OUT_DIR");
    std::fs::write(Path::new(&out_dir).join("builtin.rs"), out).expect("writing builtin.rs");
}
