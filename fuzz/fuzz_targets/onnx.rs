#![no_main]

// libfuzzer-sys's panic hook aborts on every panic, even one caught on purpose:
// `decode_onnx` turns a panic of the third-party graph evaluator into an error. The
// default hook lets that catch work; an uncaught panic still aborts (libfuzzer-sys
// catches it around the body and aborts), so it is still a crash.
libfuzzer_sys::fuzz_target!(
    init: {
        let _ = std::panic::take_hook();
    },
    |data: &[u8]| rampart_fuzz::onnx(data)
);
