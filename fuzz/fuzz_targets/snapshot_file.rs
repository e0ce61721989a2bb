#![no_main]

// The targets live beside the test that replays their corpus in every run.
#[path = "../../tests/fuzz_targets/mod.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| targets::snapshot_file(data));
