//! libFuzzer entry point; the harness and its oracles are `holdfast_fuzz::dns_query`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::dns_query(data));
