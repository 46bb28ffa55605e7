#![no_main]
//! `turnstile::fuzzing::admission_ticket` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::admission_ticket(data));
