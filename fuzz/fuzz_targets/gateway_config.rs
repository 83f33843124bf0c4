#![no_main]
// The harness and its properties: pigeon_gateway::fuzzing::gateway_config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_gateway::fuzzing::gateway_config(data));
