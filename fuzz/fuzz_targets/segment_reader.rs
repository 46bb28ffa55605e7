#![no_main]
//! `turnstile::fuzzing::segment_reader` under libFuzzer (see `turnstile::fuzzing` for the property).

libfuzzer_sys::fuzz_target!(|data: &[u8]| turnstile::fuzzing::segment_reader(data));
