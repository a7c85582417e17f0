//! The systemd edge: readiness, the status line, the watchdog and stopping,
//! over `NOTIFY_SOCKET`.
//!
//! Every call is a no-op when the daemon was not started by systemd (no
//! `NOTIFY_SOCKET`), so the same binary runs by hand, under tests and as a unit.

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;

use crate::service::Service;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify systemd");
    }
}

/// `READY=1` with the first status line. Call once the name is owned, the store
/// loaded and the host reconciled.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STOPPING=1`.
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Keeps `STATUS=` current: a new line whenever the summary changes.
pub fn spawn_status(service: Arc<Service>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last = String::new();
        loop {
            let summary = service.summary();
            if summary != last {
                send(&[NotifyState::Status(&summary)]);
                last = summary;
            }
            service.changed().await;
        }
    })
}

/// Pets the watchdog at half of `WATCHDOG_USEC`, from a task on the runtime
/// that serves requests, after touching the registry: a daemon whose runtime
/// or registry is stuck stops petting and systemd restarts it.
pub fn spawn_watchdog(service: Arc<Service>) -> Option<tokio::task::JoinHandle<()>> {
    let period = sd_notify::watchdog_enabled()? / 2;
    let period = period.max(Duration::from_millis(10));
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog enabled"
    );
    Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let _ = service.snapshot();
            send(&[NotifyState::Watchdog]);
        }
    }))
}
