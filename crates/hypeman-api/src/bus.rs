//! Which bus to use: the daemon serves on it, clients call on it.

/// `system`, `session`, or a D-Bus address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusChoice {
    /// The system bus; honours `DBUS_SYSTEM_BUS_ADDRESS`.
    System,
    /// The session bus.
    Session,
    /// A bus address such as `unix:path=/run/test/bus`.
    Address(String),
}

impl std::str::FromStr for BusChoice {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "system" => BusChoice::System,
            "session" => BusChoice::Session,
            other => BusChoice::Address(other.to_string()),
        })
    }
}

impl BusChoice {
    /// A connection builder for this bus.
    pub fn builder(&self) -> zbus::connection::Builder<'static> {
        match self {
            BusChoice::System => zbus::connection::Builder::system(),
            BusChoice::Session => zbus::connection::Builder::session(),
            BusChoice::Address(a) => zbus::connection::Builder::address(a.as_str()),
        }
    }
}
