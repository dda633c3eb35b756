//! libFuzzer entry point; the harness and its oracles are `holdfast_fuzz::datagram_open`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| holdfast_fuzz::datagram_open(data));
