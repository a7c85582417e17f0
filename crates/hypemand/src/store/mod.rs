//! What the daemon remembers across restarts: the registry in memory
//! ([`registry`]) and its file on disk ([`file`], `devices.json`).

pub mod file;
pub mod registry;

pub use file::{Loaded, Store, StoreError};
pub use registry::{Change, ChangeError, Conflict, Registry, StoredDevice};
