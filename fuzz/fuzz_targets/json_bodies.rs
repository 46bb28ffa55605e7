#![no_main]
//! `turnstile::fuzzing::json_bodies` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::json_bodies(data));
