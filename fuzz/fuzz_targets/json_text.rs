#![no_main]
// The harness and its properties: pigeon_shared::fuzzing::json_text.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_shared::fuzzing::json_text(data));
