//! The sysfs attribute readers: hex with or without 0x, trailing garbage,
//! empty input. Never panics; accepted values fit their width and print back.
#![no_main]
use hypemand::fuzzing::{parse_hex, parse_override};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    for max in [0xff, 0xffff, 0xff_ffff] {
        if let Some(v) = parse_hex(s, max) {
            assert!(v <= max);
            assert_eq!(parse_hex(&format!("0x{v:x}\n"), max), Some(v));
        }
    }
    if let Some(o) = parse_override(s) {
        assert!(!o.is_empty() && o != "(null)");
    }
});
