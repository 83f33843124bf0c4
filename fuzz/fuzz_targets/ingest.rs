#![no_main]
// The harness and its properties: pigeon_relay::fuzzing::ingest.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_relay::fuzzing::ingest(data));
