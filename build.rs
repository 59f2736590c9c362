//! Build steps:
//! - compile `proto/` with protox (a pure-Rust protobuf compiler, so no
//!   `protoc` is needed on the build machine) and write the file descriptor
//!   set that gRPC reflection serves;
//! - embed the example in `policies/` so `arbiter serve` with no flags works
//!   from any directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    compile_protos(&out_dir)?;
    embed_policies(&out_dir)?;
    Ok(())
}

fn compile_protos(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/arbiter/v1/authorizer.proto",
        "proto/arbiter/v1/decision_log.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let encoded = prost::Message::encode_to_vec(&fds);
    std::fs::write(out_dir.join("arbiter_descriptor.bin"), encoded)?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// Writes `embedded_policies.rs`: `FILES`, the schema, `.cedar` files and
/// `entities.json` of `policies/` (not its tests), as `(relative path, text)`.
fn embed_policies(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    println!("cargo:rerun-if-changed=policies");
    let mut files = Vec::new();
    collect(&root, &root, &mut files)?;
    files.sort();
    let mut code = String::from("pub const FILES: &[(&str, &str)] = &[\n");
    for (relative, absolute) in files {
        println!("cargo:rerun-if-changed={}", absolute.display());
        writeln!(
            code,
            "    ({relative:?}, include_str!({:?})),",
            absolute.display().to_string()
        )?;
    }
    code.push_str("];\n");
    std::fs::write(out_dir.join("embedded_policies.rs"), code)?;
    Ok(())
}

fn collect(
    root: &Path,
    dir: &Path,
    files: &mut Vec<(String, PathBuf)>,
) -> Result<(), Box<dyn std::error::Error>> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let relative = path
            .strip_prefix(root)?
            .to_string_lossy()
            .replace('\\', "/");
        if path.is_dir() {
            if relative != "tests" {
                println!("cargo:rerun-if-changed={}", path.display());
                collect(root, &path, files)?;
            }
        } else if relative.ends_with(".cedar")
            || relative.ends_with(".cedarschema")
            || relative == "entities.json"
        {
            files.push((relative, path));
        }
    }
    Ok(())
}
