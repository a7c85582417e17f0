//! The simulated-host fixture parser: never panics on any text.
#![no_main]
use hypemand::fuzzing::Fixture;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let p = std::path::Path::new("fuzz.toml");
    if let Ok(f) = Fixture::parse(p, s) {
        let _ = f.into_state(p);
    }
});
