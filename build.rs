//! Compiles the gRPC contracts under `proto/` into Rust (in `OUT_DIR`, included by `src/proto.rs`).
//!
//! No `protoc` is needed: `protox` parses the `.proto` files into a `FileDescriptorSet` in pure
//! Rust, and `tonic-prost-build` generates the messages, clients and servers from it.

const PROTOS: &[&str] = &["proto/agent/v1/agent.proto", "proto/csi/v1/csi.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
