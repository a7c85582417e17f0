//! Every error of the API, written once.
//!
//! `error_table!` below is the only list of error names: it makes the enum,
//! the reply the daemon sends ([`zbus::DBusError`]) and the conversion a client
//! makes from a reply (`From<zbus::Error>`), so the two sides cannot drift.
//! Each daemon error carries the human message as its description; a client
//! gets the same message back in the same variant.

use zbus::message::{Header, Message};
use zbus::names::ErrorName;

macro_rules! error_table {
    ($( $(#[$doc:meta])* $variant:ident => $name:literal, )*) => {
        /// What the daemon answered, or why it could not be asked.
        #[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
        pub enum Error {
            $( $(#[$doc])* #[error("{0}")] $variant(String), )*
            /// Nobody owns `org.hypeman.Devices` on this bus, and the bus
            /// could not start it.
            #[error("hypemand is not running on this bus (start it with `systemctl start hypemand`, or install its D-Bus activation file so the bus starts it)")]
            NotRunning,
            /// The bus could not be reached.
            #[error("cannot connect to the bus: {0}")]
            Connect(String),
            /// The call did not complete for a reason of the bus's or zbus's own.
            #[error("{0}")]
            Bus(String),
            /// Any other D-Bus error: its name and message, kept as they came.
            #[error("{message} ({name})")]
            Other {
                /// The D-Bus error name.
                name: String,
                /// Its message.
                message: String,
            },
        }

        impl Error {
            /// The full D-Bus error name.
            pub fn error_name(&self) -> &str {
                match self {
                    $( Error::$variant(_) => $name, )*
                    Error::NotRunning => "org.freedesktop.DBus.Error.ServiceUnknown",
                    Error::Connect(_) | Error::Bus(_) => "org.hypeman.Devices.Error.Failed",
                    Error::Other { name, .. } => name,
                }
            }

            /// The error for a D-Bus error name and its message (the client side).
            pub fn from_name(name: &str, message: String) -> Error {
                match name {
                    $( $name => Error::$variant(message), )*
                    "org.freedesktop.DBus.Error.ServiceUnknown"
                    | "org.freedesktop.DBus.Error.NameHasNoOwner" => Error::NotRunning,
                    _ => Error::Other { name: name.to_string(), message },
                }
            }
        }
    };
}

error_table! {
    /// Not a PCI address (`dddd:bb:dd.f` or `bb:dd.f`).
    InvalidPciAddress => "org.hypeman.Devices.Error.InvalidPciAddress",
    /// A device name that breaks the naming rule.
    InvalidName => "org.hypeman.Devices.Error.InvalidName",
    /// Any other argument that breaks a rule (an instance id, an empty key).
    InvalidArgument => "org.hypeman.Devices.Error.InvalidArgument",
    /// No such PCI function on the host.
    DeviceNotFound => "org.hypeman.Devices.Error.DeviceNotFound",
    /// No registered device with that id or name.
    NotFound => "org.hypeman.Devices.Error.NotFound",
    /// The host device is already registered (under another id).
    AlreadyRegistered => "org.hypeman.Devices.Error.AlreadyRegistered",
    /// The name is taken by another device.
    NameTaken => "org.hypeman.Devices.Error.NameTaken",
    /// Attached to an instance.
    InUse => "org.hypeman.Devices.Error.InUse",
    /// The function has no IOMMU group: the IOMMU is off, or a VM has no virtual one.
    NoIommu => "org.hypeman.Devices.Error.NoIommu",
    /// The function can never be passed through (a PCI bridge: vfio-pci
    /// refuses them); nothing was registered or changed.
    NotPassable => "org.hypeman.Devices.Error.NotPassable",
    /// vfio-pci is not available on this host (`modprobe vfio-pci`).
    VfioUnavailable => "org.hypeman.Devices.Error.VfioUnavailable",
    /// A member of the IOMMU group is bound to a driver that keeps DMA ownership.
    IommuGroupConflict => "org.hypeman.Devices.Error.IommuGroupConflict",
    /// A step of a driver change failed; the message says how the device was left.
    BindFailed => "org.hypeman.Devices.Error.BindFailed",
    /// The kernel did not answer within the deadline.
    Timeout => "org.hypeman.Devices.Error.Timeout",
    /// The registry could not be written; nothing changed.
    StoreFailed => "org.hypeman.Devices.Error.StoreFailed",
    /// Anything else the daemon could not do; the message says what.
    Failed => "org.hypeman.Devices.Error.Failed",
    /// The host is using the device or a member of its IOMMU group (the
    /// message lists every blocker); nothing was written. *(issue 14)*
    HostInUse => "org.hypeman.Devices.Error.HostInUse",
    /// Too much is in flight (authorization checks, most often): nothing was
    /// changed; try again in a moment.
    Busy => "org.hypeman.Devices.Error.Busy",
    /// *(issue 28)* Another card than the one registered sits at the
    /// address (another vendor, device or subsystem): it is never bound or
    /// attached; delete the record and register again to accept it.
    HardwareChanged => "org.hypeman.Devices.Error.HardwareChanged",
    /// polkit (or, without polkitd, the uid rule) said no. The bus's standard
    /// name, so every D-Bus client knows what it means.
    AccessDenied => "org.freedesktop.DBus.Error.AccessDenied",
    /// polkit would ask for a password, but the caller did not allow interaction.
    InteractiveAuthorizationRequired => "org.freedesktop.DBus.Error.InteractiveAuthorizationRequired",
}

impl Error {
    /// The last component of the error name (`NotFound`).
    pub fn short_name(&self) -> &str {
        let n = self.error_name();
        n.rsplit('.').next().unwrap_or(n)
    }
}

impl zbus::DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        Message::error(call, self.name()).build(&(self.to_string(),))
    }

    fn name(&self) -> ErrorName<'_> {
        ErrorName::try_from(self.error_name()).unwrap_or_else(|_| {
            ErrorName::from_static_str_unchecked("org.hypeman.Devices.Error.Failed")
        })
    }

    fn description(&self) -> Option<&str> {
        None
    }
}

impl From<zbus::Error> for Error {
    fn from(e: zbus::Error) -> Self {
        match e {
            zbus::Error::MethodError(name, desc, _) => {
                let name = name.to_string();
                let message = desc.unwrap_or_else(|| name.clone());
                Error::from_name(&name, message)
            }
            // Standard errors (ServiceUnknown, AccessDenied, ...) arrive typed.
            zbus::Error::FDO(fdo) => {
                let name = zbus::DBusError::name(&*fdo).to_string();
                let message = zbus::DBusError::description(&*fdo)
                    .unwrap_or(&name)
                    .to_string();
                Error::from_name(&name, message)
            }
            e => Error::Bus(e.to_string()),
        }
    }
}

impl From<zbus::fdo::Error> for Error {
    fn from(e: zbus::fdo::Error) -> Self {
        Error::from(zbus::Error::FDO(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_name_round_trips() {
        let all = [
            Error::InvalidPciAddress("m".into()),
            Error::NotFound("m".into()),
            Error::AccessDenied("m".into()),
            Error::InteractiveAuthorizationRequired("m".into()),
            Error::Timeout("m".into()),
            Error::HardwareChanged("m".into()),
        ];
        for e in all {
            assert_eq!(Error::from_name(e.error_name(), "m".into()), e);
        }
        assert_eq!(Error::NotFound(String::new()).short_name(), "NotFound");
        assert_eq!(
            Error::AccessDenied(String::new()).error_name(),
            "org.freedesktop.DBus.Error.AccessDenied"
        );
        assert_eq!(
            Error::from_name("org.freedesktop.DBus.Error.NameHasNoOwner", String::new()),
            Error::NotRunning
        );
    }
}
