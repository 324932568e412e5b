//! Generates the `users` gRPC messages, client and server from `proto/users.proto` (needs
//! `protoc`: `PROTOC`, or on `PATH`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/users.proto"], &["proto"])?;
    Ok(())
}
