//! The control plane's generated gRPC code (tonic + prost, compiled by `build.rs` with protox).

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("holdfast.control.v1");
}
