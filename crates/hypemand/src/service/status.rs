//! The one-line summary of the registry that systemd's status line shows.

use super::Service;

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
        s.register_at("0000:a2:00.0", "gpu", Default::default())
            .await
            .unwrap();
        s.register_at("0000:3b:00.0", "nic", Default::default())
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
