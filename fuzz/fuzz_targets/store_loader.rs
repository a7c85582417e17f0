//! The store loader on arbitrary file contents: never panics; either loads a
//! registry that saves and loads back identically, refuses a newer version or
//! an unparsable file (leaving it in place), or drops broken records while
//! keeping the original aside without losing a byte of it.
#![no_main]
use hypemand::store::{Loaded, Store, StoreError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(dir) = tempfile::tempdir() else { return };
    let store = Store::new(dir.path());
    if std::fs::write(store.path(), data).is_err() {
        return;
    }
    match store.load() {
        Ok((registry, Loaded::Existing)) => {
            store.save(&registry).expect("save what was loaded");
            assert_eq!(store.load().expect("load what was saved").0, registry);
        }
        Ok((registry, Loaded::Dropped { aside, .. })) => {
            assert_eq!(std::fs::read(aside).expect("the kept file"), data);
            assert_eq!(store.load().expect("load the cleaned file").0, registry);
        }
        Ok((_, Loaded::Fresh)) => panic!("a file was there"),
        Err(StoreError::Newer { .. } | StoreError::Unparsable { .. }) => {
            assert_eq!(std::fs::read(store.path()).expect("left in place"), data)
        }
        Err(e) => panic!("unexpected: {e}"),
    }
});
