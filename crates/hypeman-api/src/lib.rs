//! The contract of `org.hypeman.Devices`, shared by the daemon and every client.
//!
//! Both sides compile this crate and nothing else of each other, so a name, a
//! record key or an error can only be spelled one way:
//!
//! - [`bus`]: which bus to use (`--bus system|session|ADDRESS`);
//! - [`names`]: the bus name, object paths and interface names;
//! - [`options`]: the options dictionary of BindWithOptions/AttachWithOptions;
//! - [`request`]: the seed's create request (JSON and `a{sv}`);
//! - [`validate`]: the rules for names, instance ids and tags;
//! - [`record`]: the device record and the available-device dictionary, with the
//!   seed's JSON documents;
//! - [`error`]: every error name, once, for the daemon's replies and the
//!   client's typed errors alike;
//! - [`proxy`]: typed zbus proxies of the manager and of a device object;
//! - [`gpu`]: vGPU types and GPU capacity *(issue 26)*.

#![warn(missing_docs)]

pub mod bus;
pub mod error;
pub mod gpu;
pub mod names;
pub mod options;
pub mod proxy;
pub mod record;
pub mod request;
pub mod validate;

pub use bus::BusChoice;
pub use error::Error;
pub use gpu::{GpuResources, Vgpu, VgpuRequest, VgpuType};
pub use names::*;
pub use options::Options;
pub use record::{Available, Blocker, Record};
pub use request::CreateRequest;
