#![no_main]
//! See `flashcopy_csi::fuzzing::nbd_handshake`.
libfuzzer_sys::fuzz_target!(|data: &[u8]| flashcopy_csi::fuzzing::nbd_handshake(data));
