//! Where a registered device is against where it should be, decided in one
//! function ([`placement`]) from the record and the kernel's view. Bind,
//! Unbind, Delete, the start-up reconcile and the re-claim after a replug all
//! ask it, so the rule cannot drift between them.

use crate::host::HostDevice;
use crate::store::StoredDevice;

/// Where the device is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Where {
    /// Not on the host (unplugged).
    Absent,
    /// On vfio-pci.
    OnVfio,
    /// On no driver after an unbind the daemon began and did not finish (a
    /// crash between unbind and probe): it is the daemon's to give back.
    Stranded,
    /// On some other driver, or on none that the daemon caused.
    Host,
}

/// What must happen to bring the device where it belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needed {
    Nothing,
    /// It should be on vfio-pci and is not: bind it (again).
    Bind,
    /// It should be back with the host and the daemon, which moved it, still
    /// holds it (an unbind cut short).
    GiveBack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub now: Where,
    /// The record says it belongs on vfio-pci.
    pub want_vfio: bool,
    /// The record remembers the driver the daemon took it from: the daemon
    /// moved it, so the daemon gives it back.
    pub ours: bool,
}

impl Placement {
    /// The daemon holds the device (on vfio-pci, or stranded by it): Unbind
    /// and Delete have something to give back.
    pub fn held(&self) -> bool {
        matches!(self.now, Where::OnVfio | Where::Stranded)
    }

    pub fn on_vfio(&self) -> bool {
        self.now == Where::OnVfio
    }

    pub fn needed(&self) -> Needed {
        match (self.now, self.want_vfio) {
            (Where::Absent, _) => Needed::Nothing,
            (Where::OnVfio, true) => Needed::Nothing,
            (_, true) => Needed::Bind,
            (Where::OnVfio | Where::Stranded, false) if self.ours => Needed::GiveBack,
            (_, false) => Needed::Nothing,
        }
    }
}

/// The one rule.
pub fn placement(stored: &StoredDevice, live: Option<&HostDevice>) -> Placement {
    let now = match live {
        None => Where::Absent,
        // *(issue 28)* vfio-pci or a variant of it.
        Some(d) if crate::host::variant::on_vfio(d) => Where::OnVfio,
        Some(d) => match d.driver.as_deref() {
            None if stored.original_driver.is_some() => Where::Stranded,
            _ => Where::Host,
        },
    };
    Placement {
        now,
        want_vfio: stored.want_vfio,
        ours: stored.original_driver.is_some(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::registry::tests::sample;
    use hypeman_api::VFIO_DRIVER;

    fn live(driver: Option<&str>) -> HostDevice {
        HostDevice {
            driver: driver.map(str::to_string),
            ..HostDevice::example()
        }
    }

    /// want_vfio, original driver known, live driver (outer `None`: absent);
    /// then where it is, what is needed, whether the daemon holds it.
    type Case<'a> = (bool, bool, Option<Option<&'a str>>, Where, Needed, bool);

    #[test]
    fn the_table() {
        use Needed as N;
        use Where as W;
        let absent: Option<Option<&str>> = None;
        let cases: [Case; 16] = [
            (false, false, absent, W::Absent, N::Nothing, false),
            (true, true, absent, W::Absent, N::Nothing, false),
            (
                false,
                false,
                Some(Some("nvidia")),
                W::Host,
                N::Nothing,
                false,
            ),
            (
                false,
                true,
                Some(Some("nvidia")),
                W::Host,
                N::Nothing,
                false,
            ),
            (true, true, Some(Some("nvidia")), W::Host, N::Bind, false),
            (true, false, Some(Some("nvidia")), W::Host, N::Bind, false),
            (false, false, Some(None), W::Host, N::Nothing, false),
            (true, false, Some(None), W::Host, N::Bind, false),
            (false, true, Some(None), W::Stranded, N::GiveBack, true),
            (true, true, Some(None), W::Stranded, N::Bind, true),
            (
                true,
                true,
                Some(Some(VFIO_DRIVER)),
                W::OnVfio,
                N::Nothing,
                true,
            ),
            (
                true,
                false,
                Some(Some(VFIO_DRIVER)),
                W::OnVfio,
                N::Nothing,
                true,
            ),
            (
                false,
                true,
                Some(Some(VFIO_DRIVER)),
                W::OnVfio,
                N::GiveBack,
                true,
            ),
            (
                false,
                false,
                Some(Some(VFIO_DRIVER)),
                W::OnVfio,
                N::Nothing,
                true,
            ),
            (
                false,
                false,
                Some(Some("pci-stub")),
                W::Host,
                N::Nothing,
                false,
            ),
            (true, true, Some(Some("pci-stub")), W::Host, N::Bind, false),
        ];
        for (want, original, driver, now, needed, held) in cases {
            let mut s = sample("0000:a2:00.0", "gpu");
            s.want_vfio = want;
            s.original_driver = original.then(|| "nvidia".to_string());
            let l = driver.map(live);
            let p = placement(&s, l.as_ref());
            let case = format!("want {want}, original {original}, driver {driver:?}");
            assert_eq!(p.now, now, "{case}");
            assert_eq!(p.needed(), needed, "{case}");
            assert_eq!(p.held(), held, "{case}");
        }
    }
}
