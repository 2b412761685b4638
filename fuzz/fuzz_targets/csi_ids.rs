#![no_main]
//! See `flashcopy_csi::fuzzing::csi_ids`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::csi_ids(data));
