#![no_main]
//! See `flashcopy_csi::fuzzing::csi_params`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::csi_params(data));
