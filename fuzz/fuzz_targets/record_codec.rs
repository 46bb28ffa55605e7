#![no_main]
//! `turnstile::fuzzing::record_codec` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::record_codec(data));
