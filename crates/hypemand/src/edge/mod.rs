//! The edges: where the world talks to the service.
//!
//! - [`dbus`]: `org.hypeman.Devices` on the bus (methods, objects, signals);
//! - [`authz`] and [`polkit`]: authorization, declared once, for every front
//!   end;
//! - [`rest`]: Hypeman's `/devices` REST endpoints on a unix socket;
//! - [`metrics`]: OpenMetrics over HTTP, for Prometheus;
//! - [`udev`]: hotplug events from the kernel (or the simulated one);
//! - [`systemd`]: readiness, status, watchdog.

pub mod authz;
pub mod dbus;
pub mod metrics;
pub mod polkit;
pub mod rest;
pub mod systemd;
pub mod udev;
