//! Compiles `slipway/agent/v1/agent.proto` with protox (pure Rust, no system `protoc`) and
//! generates the prost messages and tonic client/server with tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "slipway/agent/v1/agent.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Small starting buffers per stream (see `slipway_proto::Codec`).
        .codec_path("crate::Codec")
        .compile_fds(fds)?;
    Ok(())
}
