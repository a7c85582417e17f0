//! PCI address parsing: never panics; whatever it accepts prints back to a
//! canonical form that parses to the same address and names no path.
#![no_main]
use hypemand::fuzzing::PciAddress;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(a) = PciAddress::parse(s) {
        let canon = a.to_string();
        assert_eq!(canon.len(), 12);
        assert!(!canon.contains('/') && !canon.contains(".."));
        assert_eq!(PciAddress::parse(&canon), Ok(a));
        assert!(a.function < 8 && a.device < 32);
    }
});
