//! Build steps:
//! - compile `proto/` with protox (a pure-Rust protobuf compiler, so no
//!   `protoc` is needed on the build machine) and write the file descriptor
//!   set that gRPC reflection serves;
//! - write the file descriptor set of Envoy's ext_authz service
//!   (`envoy.service.auth.v3`), from the `.proto` files the `envoy-types`
//!   crate ships, so reflection can serve it too when ext_authz is on
//!   (`envoy-types` exposes the generated types but no descriptor set);
//! - embed the example in `policies/` so `arbiter serve` with no flags works
//!   from any directory.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    compile_protos(&out_dir)?;
    compile_envoy_descriptor(&out_dir)?;
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
    // Undecodable requests are INVALID_ARGUMENT (src/adapter/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::adapter::codec::Codec")
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}

/// The ext_authz service's file and its imports, compiled from the protos of
/// the `envoy-types` version in the lock file (found with `cargo metadata`),
/// so the descriptor always matches the types the server uses.
fn compile_envoy_descriptor(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let cargo = std::env::var("CARGO")?;
    let target = std::env::var("TARGET")?;
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml");
    let metadata = |offline: bool| {
        let mut command = std::process::Command::new(&cargo);
        command
            .args(["metadata", "--format-version", "1", "--locked"])
            .args(["--filter-platform", &target, "--manifest-path"])
            .arg(&manifest);
        if offline {
            command.arg("--offline");
        }
        command.output()
    };
    // Offline first: the build has every package it needs by now. Only a
    // package this build did not need (a dev-dependency) can be missing, and
    // then cargo fetches it as any build would.
    let mut output = metadata(true)?;
    if !output.status.success() {
        output = metadata(false)?;
    }
    if !output.status.success() {
        return Err(format!(
            "`cargo metadata` failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let envoy_manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "envoy-types")
        .and_then(|package| package["manifest_path"].as_str())
        .ok_or("`cargo metadata` lists no `envoy-types` package")?;
    let proto_root = Path::new(envoy_manifest)
        .parent()
        .ok_or("`envoy-types` has no directory")?
        .join("proto");
    // Its protos are grouped by upstream repository (data-plane-api,
    // googleapis, xds, ...), each one an include root.
    let mut includes = Vec::new();
    for entry in std::fs::read_dir(&proto_root)? {
        let path = entry?.path();
        if path.is_dir() {
            includes.push(path);
        }
    }
    includes.sort();
    let mut compiler = protox::Compiler::new(includes)?;
    compiler.include_imports(true).include_source_info(false);
    compiler.open_file("envoy/service/auth/v3/external_auth.proto")?;
    std::fs::write(
        out_dir.join("envoy_ext_authz_descriptor.bin"),
        compiler.encode_file_descriptor_set(),
    )?;
    println!("cargo:rerun-if-changed={}", manifest.display());
    println!("cargo:rerun-if-changed=Cargo.lock");
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
