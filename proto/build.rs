//! Compiles `worker.proto` with `protox` (pure Rust, no system `protoc`) into a
//! descriptor set, then generates the prost messages and tonic client/server from it.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=worker.proto");
    let fds = protox::compile(["worker.proto"], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
