//! Compiles the .proto files with `protox` (pure Rust, no system `protoc`) and generates
//! the tonic/prost code; also writes the encoded descriptor set for gRPC reflection.

use std::path::PathBuf;

use prost::Message;

const PROTOS: &[&str] = &[
    "proto/feedgraph/v1/graph.proto",
    "proto/feedgraph/v1/feed.proto",
    "proto/feedgraph/internal/v1/shard.proto",
    "proto/feedgraph/internal/v1/replication.proto",
    "proto/feedgraph/internal/v1/admin.proto",
    "proto/feedgraph/internal/v1/scorer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("feedgraph_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().build_server(true).build_client(true).compile_fds(fds)?;
    Ok(())
}
