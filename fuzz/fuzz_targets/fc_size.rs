#![no_main]
//! See `flashcopy_csi::fuzzing::fc_size`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::fc_size(data));
