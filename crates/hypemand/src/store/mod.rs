//! What the daemon remembers across restarts: the registry in memory
//! ([`registry`]), its snapshot on disk ([`mod@file`], `devices.json`) and the
//! changes since ([`journal`], `devices.journal`).

pub mod file;
pub mod journal;
pub mod registry;

pub use file::{Loaded, Opened, Store, StoreError};
pub use registry::{Change, ChangeError, Conflict, Registry, StoredDevice, StoredVgpu};
