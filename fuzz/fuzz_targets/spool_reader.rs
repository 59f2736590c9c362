//! `spool_reader`: see `arbiter::fuzzing::spool_reader` (the property it checks and the
//! input it reads; `tests/fuzz_corpus.rs` replays the corpus through it).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| arbiter::fuzzing::spool_reader(data));
