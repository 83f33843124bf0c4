#![no_main]
// The harness and its properties: pigeon_cesql::fuzzing::expression.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_cesql::fuzzing::expression(data));
