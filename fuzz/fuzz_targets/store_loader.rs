//! The store loader on arbitrary file contents: never panics; either loads a
//! registry that saves and loads back identically, refuses a newer version or
//! an unparsable file (leaving it in place), or drops broken records while
//! keeping the original aside without losing a byte of it. The first byte
//! chooses the file: even, `devices.json`; odd, the journal (issue 18) with no
//! snapshot.
#![no_main]
use hypemand::fuzzing::{Loaded, Store, StoreError};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else {
        return;
    };
    let Ok(dir) = tempfile::tempdir() else { return };
    let store = Store::new(dir.path());
    let journal = which % 2 == 1;
    let target = if journal {
        store.journal_path()
    } else {
        store.path()
    };
    if std::fs::write(&target, data).is_err() {
        return;
    }
    match store.open() {
        Ok(opened) => {
            match &opened.loaded {
                Loaded::Existing => {}
                Loaded::Fresh => assert!(journal, "a devices.json was there"),
                Loaded::Dropped { aside, .. } => {
                    let kept = aside.last().expect("a file kept aside");
                    assert_eq!(std::fs::read(kept).expect("the kept file"), data);
                }
            }
            store
                .save(&opened.registry, opened.seq)
                .expect("save what was loaded");
            let again = store.open().expect("load what was saved");
            assert_eq!(again.registry, opened.registry);
            assert_eq!(again.seq, opened.seq);
        }
        Err(StoreError::Newer { .. } | StoreError::Unparsable { .. }) => {
            assert_eq!(std::fs::read(&target).expect("left in place"), data)
        }
        Err(e) => panic!("unexpected: {e}"),
    }
});
