//! Name and instance-id validation: never panics, and accepts only what the
//! contract's patterns allow.
#![no_main]
use hypeman_api::validate::{validate_instance_id, validate_name};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if validate_name(s).is_ok() {
        let b = s.as_bytes();
        assert!((2..=63).contains(&b.len()) && b[0].is_ascii_alphanumeric());
        assert!(b.iter().all(|c| c.is_ascii_alphanumeric() || b"_.-".contains(c)));
    }
    if validate_instance_id(s).is_ok() {
        assert!((1..=128).contains(&s.len()));
        // A '/' only in the device plugin's k8s:<namespace>/<pod>: exactly
        // one, both parts non-empty, and never with "..".
        let pod = s.starts_with("k8s:")
            && s.matches('/').count() == 1
            && !s.contains("..")
            && !s.ends_with('/')
            && !s.starts_with("k8s:/");
        assert!(s
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"_.:-".contains(&c) || (c == b'/' && pod)));
    }
});
