#![no_main]
//! See `flashcopy_csi::fuzzing::checkpoint`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::checkpoint(data));
