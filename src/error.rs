//! The errors the daemon answers with. Each maps to one D-Bus error name
//! (`org.hypeman.Devices.Error.<Name>`, see [`Error::dbus_name`]) and carries a
//! message a person can act on.

use crate::pci::AddressError;
use crate::registry::ValidationError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    InvalidPciAddress(#[from] AddressError),
    #[error("{0}")]
    InvalidName(ValidationError),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("no PCI device {0} on this host; `hypemanctl available` lists the devices there are")]
    DeviceNotFound(String),
    #[error("no registered device with id or name {0:?}")]
    NotFound(String),
    #[error("{address} is already registered as {name} ({id})")]
    AlreadyRegistered {
        address: String,
        name: String,
        id: String,
    },
    #[error("the name {0} is already taken by another device")]
    NameTaken(String),
    #[error("{name} is attached to instance {instance}; detach it first")]
    InUse { name: String, instance: String },
    #[error("{0}")]
    NoIommu(String),
    #[error("{0}")]
    VfioUnavailable(String),
    #[error("{0}")]
    IommuGroupConflict(String),
    #[error("{0}")]
    BindFailed(String),
    #[error("{0}")]
    Timeout(String),
    #[error("the registry could not be saved, nothing was changed: {0}")]
    StoreFailed(String),
    #[error("{0}")]
    Failed(String),
    /// polkit (or, without polkitd, the uid rule) said no.
    #[error("{0}")]
    AccessDenied(String),
    /// polkit would ask for a password, but the caller did not allow interaction.
    #[error("{0}")]
    InteractiveAuthorizationRequired(String),
}

impl From<ValidationError> for Error {
    fn from(e: ValidationError) -> Self {
        match e {
            ValidationError::Name(_) => Error::InvalidName(e),
            ValidationError::InstanceId(_) => Error::InvalidArgument(e.to_string()),
        }
    }
}

impl Error {
    /// The last component of the D-Bus error name.
    pub fn dbus_name(&self) -> &'static str {
        match self {
            Error::InvalidPciAddress(_) => "InvalidPciAddress",
            Error::InvalidName(_) => "InvalidName",
            Error::InvalidArgument(_) => "InvalidArgument",
            Error::DeviceNotFound(_) => "DeviceNotFound",
            Error::NotFound(_) => "NotFound",
            Error::AlreadyRegistered { .. } => "AlreadyRegistered",
            Error::NameTaken(_) => "NameTaken",
            Error::InUse { .. } => "InUse",
            Error::NoIommu(_) => "NoIommu",
            Error::VfioUnavailable(_) => "VfioUnavailable",
            Error::IommuGroupConflict(_) => "IommuGroupConflict",
            Error::BindFailed(_) => "BindFailed",
            Error::Timeout(_) => "Timeout",
            Error::StoreFailed(_) => "StoreFailed",
            Error::Failed(_) => "Failed",
            Error::AccessDenied(_) => "AccessDenied",
            Error::InteractiveAuthorizationRequired(_) => "InteractiveAuthorizationRequired",
        }
    }

    /// The full D-Bus error name. Authorization errors use the bus's standard
    /// names, so every D-Bus client already knows what they mean.
    pub fn dbus_error_name(&self) -> String {
        match self {
            Error::AccessDenied(_) | Error::InteractiveAuthorizationRequired(_) => {
                format!("org.freedesktop.DBus.Error.{}", self.dbus_name())
            }
            _ => format!("org.hypeman.Devices.Error.{}", self.dbus_name()),
        }
    }
}

impl From<crate::vfio::VfioError> for Error {
    fn from(e: crate::vfio::VfioError) -> Self {
        use crate::vfio::VfioError as V;
        let message = e.to_string();
        match e {
            V::NoIommu(_) => Error::NoIommu(message),
            V::VfioUnavailable => Error::VfioUnavailable(message),
            V::GroupConflict { .. } => Error::IommuGroupConflict(message),
            V::Step { .. } if e.is_timeout() => Error::Timeout(message),
            V::Step { .. } => Error::BindFailed(message),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
