//! Generates the gRPC messages, clients and servers of `proto/users.proto` and
//! `proto/health.proto` (needs `protoc`: `PROTOC`, or on `PATH`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure()
        .compile_protos(&["proto/users.proto", "proto/health.proto"], &["proto"])?;
    Ok(())
}
