#![no_main]
//! `turnstile::fuzzing::webhook_signature` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::webhook_signature(data));
