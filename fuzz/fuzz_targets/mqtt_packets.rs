#![no_main]
// The harness and its properties: pigeon_gateway::fuzzing::mqtt_packets.
libfuzzer_sys::fuzz_target!(|data: &[u8]| pigeon_gateway::fuzzing::mqtt_packets(data));
