//! gateway

pub mod dataplane;
