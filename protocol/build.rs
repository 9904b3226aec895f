//! Compiles `proto/*.proto` with prost-build, using the vendored `protoc` so no
//! system protobuf compiler is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=proto/tern.proto");
    println!("cargo:rerun-if-changed=proto/peer.proto");
    let mut config = prost_build::Config::new();
    config.bytes(["."]);
    config.compile_protos(&["proto/tern.proto", "proto/peer.proto"], &["proto"])?;
    Ok(())
}
