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

impl Service {
    /// A one-line summary for systemd's status. Made at every change, so
    /// it walks no list of every device: counts are kept as things change.
    pub fn summary(&self) -> String {
        let snapshot = self.snapshot();
        let on_vfio = self
            .seen()
            .on_vfio()
            .into_iter()
            .filter(|a| snapshot.by_address(*a).is_some())
            .count();
        let attached = snapshot.attached();
        let n = snapshot.len();
        let line = format!(
            "{n} device{} registered, {on_vfio} on vfio-pci, {attached} attached",
            if n == 1 { "" } else { "s" }
        );
        match self.status_note() {
            Some(note) => format!("{line}; {note}"),
            None => line,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::service::testing::{example, service_on};
    use std::time::Duration;

    /// The status line's counts follow Bind, Attach, Detach, Unbind and
    /// Delete, though they are kept as things change, not counted anew.
    #[tokio::test]
    async fn the_summary_follows_every_change() {
        let f = service_on(&example("l4.toml"), Duration::from_secs(5));
        let s = &f.service;
        let line = |n: &str, vfio: u32, attached: u32| {
            format!("{n} registered, {vfio} on vfio-pci, {attached} attached")
        };
        assert_eq!(s.summary(), line("0 devices", 0, 0));
        s.register("0000:a2:00.0", "gpu", Default::default())
            .await
            .unwrap();
        s.register("0000:3b:00.0", "nic", Default::default())
            .await
            .unwrap();
        let (gpu, nic) = (s.resolve("gpu").unwrap(), s.resolve("nic").unwrap());
        assert_eq!(s.summary(), line("2 devices", 0, 0));
        s.bind(&nic).await.unwrap();
        assert_eq!(s.summary(), line("2 devices", 1, 0));
        s.attach(&gpu, "vm-1").await.unwrap();
        assert_eq!(s.summary(), line("2 devices", 2, 1));
        s.detach(&gpu).await.unwrap();
        assert_eq!(s.summary(), line("2 devices", 2, 0));
        s.unbind(&gpu).await.unwrap();
        assert_eq!(s.summary(), line("2 devices", 1, 0));
        s.delete(&nic).await.unwrap();
        assert_eq!(s.summary(), line("1 device", 0, 0));
    }
}
