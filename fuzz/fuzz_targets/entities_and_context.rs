//! `entities_and_context`: see `arbiter::fuzzing::entities_and_context` (the property it checks and the
//! input it reads; `tests/fuzz_corpus.rs` replays the corpus through it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::entities_and_context(data));
