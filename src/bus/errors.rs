//! How service errors travel on the bus: `org.hypeman.Devices.Error.<Name>` with
//! the human message as the error's description.

use zbus::message::{Header, Message};
use zbus::names::ErrorName;
use zbus::DBusError;

use crate::error::Error;

impl DBusError for Error {
    fn create_reply(&self, call: &Header<'_>) -> zbus::Result<Message> {
        let message = self.to_string();
        Message::error(call, self.name()).build(&(message,))
    }

    fn name(&self) -> ErrorName<'_> {
        // Every name is built from fixed identifiers, so it is valid.
        ErrorName::from_string_unchecked(self.dbus_error_name())
    }

    fn description(&self) -> Option<&str> {
        None
    }
}
