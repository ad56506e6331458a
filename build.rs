//! Compiles the protos (ours and the vendored Envoy ext_authz closure) without a system `protoc`:
//! protox parses them in pure Rust, and the same descriptor set feeds code generation and reflection.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/s2sauthz/v1/authorizer.proto",
        "proto/s2sauthz/v1/registry.proto",
        "proto/vendor/envoy/service/auth/v3/external_auth.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile(protos, ["proto", "proto/vendor"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
