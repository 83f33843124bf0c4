#![no_main]
// The harness and its properties: pigeon_relay::fuzzing::relay_config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_relay::fuzzing::relay_config(data));
