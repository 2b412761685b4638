#![no_main]
//! See `flashcopy_csi::fuzzing::nbd_transmission`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::nbd_transmission(data));
