#![no_main]
//! `turnstile::fuzzing::request_heads` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::request_heads(data));
