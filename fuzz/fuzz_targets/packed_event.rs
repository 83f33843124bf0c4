#![no_main]
// The harness and its properties: pigeon_gateway::fuzzing::packed_event.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_gateway::fuzzing::packed_event(data));
