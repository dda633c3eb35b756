//! Compiles the control-plane protocol with protox (a pure-Rust protobuf compiler), so building
//! Holdfast never needs `protoc` on the machine.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/holdfast/control/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    // `sqlx::migrate!` embeds migrations/ at build time: rebuild when they change.
    println!("cargo:rerun-if-changed=migrations");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
