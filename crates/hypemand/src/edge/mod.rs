//! The edges: where the world talks to the service.
//!
//! - [`dbus`]: `org.hypeman.Devices` on the bus (methods, objects, signals,
//!   authorization);
//! - [`udev`]: hotplug events from the kernel (or the simulated one);
//! - [`systemd`]: readiness, status, watchdog.

pub mod dbus;
pub mod systemd;
pub mod udev;
