//! How the daemon's own failures become the contract's errors
//! ([`hypeman_api::Error`]), each with a message a person can act on.

use hypeman_api::Error;

use crate::host::door::StepError;
use crate::host::vfio::VfioError;
use crate::pci::AddressError;
use crate::store::{ChangeError, Conflict};
use hypeman_api::validate::shorten;

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl From<AddressError> for Error {
    fn from(e: AddressError) -> Self {
        Error::InvalidPciAddress(e.to_string())
    }
}

impl From<VfioError> for Error {
    fn from(e: VfioError) -> Self {
        let message = e.to_string();
        match e {
            VfioError::NoIommu(_) => Error::NoIommu(message),
            VfioError::VfioUnavailable(_) => Error::VfioUnavailable(message),
            VfioError::GroupConflict { .. } => Error::IommuGroupConflict(message),
            VfioError::Step { .. } if e.is_timeout() => Error::Timeout(message),
            VfioError::Step { .. } => Error::BindFailed(message),
        }
    }
}

impl From<crate::host::sriov::SriovError> for Error {
    fn from(e: crate::host::sriov::SriovError) -> Self {
        use crate::host::sriov::SriovError;
        match e {
            SriovError::Move(v) => v.into(),
            e if e.is_timeout() => Error::Timeout(e.to_string()),
            e => Error::Failed(e.to_string()),
        }
    }
}

/// A host read or write that failed, with what was being done.
pub fn host_error(what: String, e: StepError) -> Error {
    match e {
        StepError::Timeout(d) => {
            Error::Timeout(format!("{what}: the kernel did not answer within {d:?}"))
        }
        e @ StepError::Stuck(_) => Error::Timeout(format!("{what}: {e}")),
        e => Error::Failed(format!("{what}: {e}")),
    }
}

pub fn not_found(key: &str) -> Error {
    Error::NotFound(format!(
        "no registered device with id or name {:?}",
        shorten(key)
    ))
}

pub fn device_not_found(what: impl std::fmt::Display) -> Error {
    Error::DeviceNotFound(format!(
        "no PCI device {what} on this host; `hypemanctl available` lists the devices there are"
    ))
}

pub fn in_use(name: &str, instance: &str) -> Error {
    Error::InUse(format!(
        "{name} is attached to instance {instance}; detach it first"
    ))
}

pub fn name_taken(name: &str) -> Error {
    Error::NameTaken(format!(
        "the name {name} is already taken by another device"
    ))
}

pub fn store_failed(e: impl std::fmt::Display) -> Error {
    Error::StoreFailed(format!(
        "the registry could not be saved, nothing was changed: {e}"
    ))
}

/// What a refused registry change means to the caller.
pub fn change_error(e: ChangeError) -> Error {
    match e {
        ChangeError::Conflict(Conflict::Address { address, name, id }) => {
            Error::AlreadyRegistered(format!("{address} is already registered as {name} ({id})"))
        }
        ChangeError::Conflict(Conflict::Name(n)) => name_taken(&n),
        ChangeError::Conflict(Conflict::Vgpu(on)) => Error::InUse(format!(
            "{on} already carries a vGPU; pick another function, or let placement choose"
        )),
        ChangeError::Conflict(Conflict::Id(id)) => {
            Error::Failed(format!("generated id {id} collided; try again"))
        }
        ChangeError::Missing(id) => not_found(&id),
        ChangeError::KeyChanged(id) => Error::Failed(format!(
            "internal error: the keys of device {id} were about to change"
        )),
    }
}

/// A change asked for while the daemon stops.
pub fn stopping() -> Error {
    Error::Failed("hypemand is stopping; try again once it is back".into())
}
