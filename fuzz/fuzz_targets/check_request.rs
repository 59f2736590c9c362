//! `check_request`: see `arbiter::fuzzing::check_request` (the property it checks and the
//! input it reads; `tests/fuzz_corpus.rs` replays the corpus through it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::check_request(data));
