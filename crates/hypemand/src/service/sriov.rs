//! *(issue 26)* `SetVirtualFunctions`: how many SR-IOV virtual functions a
//! registered physical function has.
//!
//! The rules: a count past `sriov_totalvfs` is refused before anything is
//! asked of the kernel; none of its virtual functions may be in a VM's hands
//! (registered and on vfio-pci, or attached), checked under their own locks,
//! which are held until the count is written so nobody binds one meanwhile;
//! the physical function itself may not be attached. The answer comes once
//! the hotplug path has seen every new function appear and every old one
//! go, within the deadline; otherwise the previous count is put back and the
//! error says what happened.

use std::time::Instant;

use hypeman_api::Error;

use super::error::{in_use, Result};
use super::{DeviceView, Service, Target};
use crate::host::HostDevice;
use crate::pci::PciAddress;

/// Up to this many addresses are named in a message, then a count.
const NAMED: usize = 8;

/// `a, b, c and 5 more`.
pub(crate) fn named(addresses: &[PciAddress]) -> String {
    let mut s: Vec<String> = addresses
        .iter()
        .take(NAMED)
        .map(ToString::to_string)
        .collect();
    if addresses.len() > NAMED {
        s.push(format!("and {} more", addresses.len() - NAMED));
    }
    s.join(", ")
}

impl Service {
    /// `SetVirtualFunctions`: gives the physical function `count` virtual
    /// functions (0 removes them).
    pub async fn set_virtual_functions(&self, target: &Target, count: u32) -> Result<DeviceView> {
        self.with_device(target, |s, live| async move {
            let dev = live.ok_or_else(|| super::seen::absent(&s))?;
            let before = self.view(s.clone(), Some(dev.clone()));
            let Some(sriov) = dev.sriov else {
                return Err(Error::InvalidArgument(format!(
                    "{} ({}) has no SR-IOV capability (no sriov_totalvfs): it cannot have virtual functions",
                    s.name, s.pci_address
                )));
            };
            if count > sriov.total_vfs {
                return Err(Error::InvalidArgument(format!(
                    "{} ({}) can have at most {} virtual functions (sriov_totalvfs), not {count}",
                    s.name, s.pci_address, sriov.total_vfs
                )));
            }
            if count == sriov.num_vfs {
                return Ok((before.clone(), before));
            }
            if let Some(instance) = &s.attached_to {
                return Err(in_use(&s.name, instance));
            }
            match dev.driver.as_deref() {
                // vfio-pci takes a count only with its enable_sriov
                // parameter, and a VM may hold the function whole.
                _ if crate::host::variant::on_vfio(&dev) => {
                    return Err(Error::InUse(format!(
                        "{} ({}) is on vfio-pci: give it back to its driver first (`hypemanctl unbind {}`)",
                        s.name, s.pci_address, s.name
                    )))
                }
                None => {
                    return Err(Error::Failed(format!(
                        "{} ({}) has no driver, and the kernel changes virtual functions only through the physical function's driver: bind its driver first",
                        s.name, s.pci_address
                    )))
                }
                Some(_) => {}
            }
            if let Some(b) = self.vgpus_blocker(&dev).await? {
                return Err(Error::InUse(b.message));
            }
            let old = sriov.current_vfs(dev.address);
            // The registered virtual functions, locked (in address order, after
            // the physical function's: nobody takes them the other way round)
            // so none is bound or attached while its function goes away.
            let registered: Vec<PciAddress> = {
                let snapshot = self.snapshot();
                old.iter().copied().filter(|a| snapshot.by_address(*a).is_some()).collect()
            };
            let locks: Vec<_> = registered.iter().map(|a| self.device_lock(*a)).collect();
            let mut held = Vec::with_capacity(locks.len());
            for l in &locks {
                held.push(l.lock().await);
            }
            self.refuse_held_vfs(&registered).await?;
            let after = self
                .with_holder_stopped(dev.driver.as_deref(), &s, self.door.set_vfs(&dev, count))
                .await;
            drop(held);
            // What the locks kept the hotplug path from announcing, said now.
            self.refresh_registered(&registered).await;
            let after = after?;
            tracing::info!(
                pci_address = %s.pci_address,
                device_id = %s.id,
                device_name = %s.name,
                vfs = count,
                previous = sriov.num_vfs,
                "virtual functions set"
            );
            let new = after.sriov.map(|n| n.current_vfs(dev.address)).unwrap_or_default();
            let gone: Vec<PciAddress> = old.iter().copied().filter(|a| !new.contains(a)).collect();
            let missing = self.settle(&new, &gone).await;
            if missing.is_empty() {
                return Ok((before, self.view(s, Some(after))));
            }
            // Back to the count it had.
            let outcome = match self
                .with_holder_stopped(after.driver.as_deref(), &s, self.door.set_vfs(&after, sriov.num_vfs))
                .await
            {
                Ok(_) => format!("it was put back to {} virtual functions", sriov.num_vfs),
                Err(e) => format!("putting back {} virtual functions failed too ({e}); check it with `hypemanctl get`", sriov.num_vfs),
            };
            tracing::warn!(pci_address = %s.pci_address, device_name = %s.name, missing = %named(&missing), "virtual functions did not settle; going back");
            Err(Error::Timeout(format!(
                "{} ({}): {} of its {count} virtual functions did not appear (or the old ones did not go) within {:?}: {}; {outcome}",
                s.name,
                s.pci_address,
                missing.len(),
                self.door.deadline(),
                named(&missing)
            )))
        })
        .await
    }

    /// `InUse` when any of these registered virtual functions is on
    /// vfio-pci or attached.
    async fn refuse_held_vfs(&self, registered: &[PciAddress]) -> Result<()> {
        let mut held = Vec::new();
        let snapshot = self.snapshot();
        for a in registered {
            let Some(r) = snapshot.by_address(*a) else {
                continue;
            };
            let live = self.live(*a).await?;
            let on_vfio = live.as_ref().is_some_and(crate::host::variant::on_vfio);
            match (&r.attached_to, on_vfio) {
                (Some(i), _) => held.push(format!("{} ({a}) is attached to {i}", r.name)),
                (None, true) => held.push(format!("{} ({a}) is on vfio-pci", r.name)),
                (None, false) => {}
            }
        }
        if held.is_empty() {
            return Ok(());
        }
        Err(Error::InUse(format!(
            "virtual functions of this device are in use: {}; detach them and give them back (`hypemanctl unbind`) first; nothing was changed",
            held.join(", ")
        )))
    }

    /// Reads these registered functions again and announces any change.
    async fn refresh_registered(&self, addresses: &[PciAddress]) {
        for a in addresses {
            let Some(stored) = self.snapshot().by_address(*a).map(|s| (**s).clone()) else {
                continue;
            };
            let Ok(live) = self.live(*a).await else {
                continue;
            };
            let prev: Option<HostDevice> = self.seen().get(*a).flatten();
            if prev != live {
                let before = self.view(stored.clone(), prev);
                let after = self.view(stored, live);
                self.publish_change(&before, &after).await;
            }
        }
    }

    /// Waits, until the deadline, for the hotplug path to have seen every
    /// function of `present` appear and every one of `gone` go; answers the
    /// ones it did not.
    async fn settle(&self, present: &[PciAddress], gone: &[PciAddress]) -> Vec<PciAddress> {
        let until = Instant::now() + self.door.deadline();
        let mut events = self.hotplug.subscribe();
        loop {
            let seen = |a: &PciAddress| matches!(self.seen().get(*a), Some(Some(_)));
            let missing: Vec<PciAddress> = present
                .iter()
                .filter(|a| !seen(a))
                .chain(gone.iter().filter(|a| seen(a)))
                .copied()
                .collect();
            if missing.is_empty() {
                return missing;
            }
            let next = tokio::time::timeout_at(until.into(), events.changed()).await;
            if !matches!(next, Ok(Ok(()))) {
                return missing;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::{with_events, Fixture};
    use super::*;
    use crate::host::sim::{Fault, FaultKind};
    use crate::host::{Host, Op as HostOp};

    const PF: &str = "0000:3b:00.0";

    /// The X710 host.
    async fn sriov_host(deadline: Duration) -> Fixture {
        with_events("sriov-nic.toml", deadline).await
    }

    fn a(s: &str) -> PciAddress {
        PciAddress::parse(s).unwrap()
    }

    fn count_writes(f: &Fixture) -> Vec<String> {
        f.sim
            .journal()
            .into_iter()
            .filter(|j| j.starts_with("set_num_vfs"))
            .collect()
    }

    /// 2 → 4 writes 0 first, as the kernel requires, and answers once the
    /// hotplug path has seen all four functions, each naming its parent.
    #[tokio::test]
    async fn a_new_count_goes_through_zero_and_answers_once_every_function_is_seen() {
        let f = sriov_host(Duration::from_secs(10)).await;
        let pf = f
            .service
            .register_at(PF, "x710", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&pf.stored.id).unwrap();
        let after = f.service.set_virtual_functions(&target, 4).await.unwrap();
        assert_eq!(after.record().sriov_vfs, Some(4));
        assert_eq!(
            count_writes(&f),
            ["set_num_vfs 0000:3b:00.0 0", "set_num_vfs 0000:3b:00.0 4"]
        );
        for vf in [
            "0000:3b:02.0",
            "0000:3b:02.1",
            "0000:3b:02.2",
            "0000:3b:02.3",
        ] {
            let seen = f.service.seen().get(a(vf)).flatten().expect(vf);
            assert_eq!(seen.physfn, Some(a(PF)), "{vf}");
            assert_eq!(
                seen.driver.as_deref(),
                Some("iavf"),
                "{vf}: its driver probed it"
            );
        }
        // The same count again writes nothing.
        f.service.set_virtual_functions(&target, 4).await.unwrap();
        assert_eq!(count_writes(&f).len(), 2);
        // 0 removes them all, in one write.
        f.service.set_virtual_functions(&target, 0).await.unwrap();
        assert_eq!(
            count_writes(&f).last().unwrap(),
            "set_num_vfs 0000:3b:00.0 0"
        );
        assert!(f.service.seen().get(a("0000:3b:02.0")).unwrap().is_none());
        assert!(f.sim.device(a("0000:3b:02.0")).unwrap().is_none());
    }

    /// A count past the total, a function without SR-IOV and a virtual
    /// function in a VM's hands are refused before anything is written.
    #[tokio::test]
    async fn refusals_write_nothing() {
        let f = sriov_host(Duration::from_secs(10)).await;
        let pf = f
            .service
            .register_at(PF, "x710", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&pf.stored.id).unwrap();
        let e = f.service.vfs_refused(&target, 65).await;
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("at most 64")),
            "{e:?}"
        );
        let vf = f
            .service
            .register_at("0000:3b:02.1", "vf1", Default::default())
            .await
            .unwrap();
        let no = f.service.resolve(&vf.stored.id).unwrap();
        let e = f.service.vfs_refused(&no, 1).await;
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("no SR-IOV")),
            "{e:?}"
        );
        f.service.bind(&no).await.unwrap();
        let e = f.service.vfs_refused(&target, 0).await;
        assert!(
            matches!(&e, Error::InUse(m) if m.contains("vf1 (0000:3b:02.1) is on vfio-pci")),
            "{e:?}"
        );
        // A physical function on vfio-pci (no VFs, so it could be bound).
        f.service.unbind(&no).await.unwrap();
        f.service.set_virtual_functions(&target, 0).await.unwrap();
        f.service.bind(&target).await.unwrap();
        let e = f.service.vfs_refused(&target, 2).await;
        assert!(
            matches!(&e, Error::InUse(m) if m.contains("is on vfio-pci")),
            "{e:?}"
        );
        assert_eq!(count_writes(&f), ["set_num_vfs 0000:3b:00.0 0"]);
    }

    /// A function that never appears: the error names it, and the previous
    /// count is made again.
    #[tokio::test]
    async fn a_function_that_never_appears_puts_the_previous_count_back() {
        let f = sriov_host(Duration::from_millis(500)).await;
        let pf = f
            .service
            .register_at(PF, "x710", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&pf.stored.id).unwrap();
        f.sim.inject(Fault {
            op: HostOp::SetNumVfs,
            address: a(PF),
            kind: FaultKind::Lost,
        });
        let e = f.service.vfs_refused(&target, 3).await;
        let Error::Timeout(m) = &e else {
            panic!("{e:?}")
        };
        assert!(
            m.contains("1 of its 3") && m.contains("0000:3b:02.2"),
            "{m}"
        );
        assert!(m.contains("put back to 2"), "{m}");
        assert_eq!(
            count_writes(&f),
            [
                "set_num_vfs 0000:3b:00.0 0",
                "set_num_vfs 0000:3b:00.0 3",
                "set_num_vfs 0000:3b:00.0 0",
                "set_num_vfs 0000:3b:00.0 2"
            ]
        );
        let now = f.sim.device(a(PF)).unwrap().unwrap();
        assert_eq!(now.sriov.unwrap().num_vfs, 2);
    }

    /// An NVIDIA GPU gets its virtual functions as NVIDIA's `sriov-manage -e`
    /// gives them: moved to pci-pf-stub (loaded first), the count written,
    /// and given back to nvidia; its functions are nvidia's too.
    #[tokio::test]
    async fn an_nvidia_gpu_goes_through_pci_pf_stub() {
        let f = with_events("l40s-vgpu.toml", Duration::from_secs(10)).await;
        let gpu = "0000:41:00.0";
        let pf = f
            .service
            .register_at(gpu, "l40s", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&pf.stored.id).unwrap();
        let after = f.service.set_virtual_functions(&target, 4).await.unwrap();
        assert_eq!(after.driver(), Some("nvidia"));
        assert_eq!(after.record().sriov_vfs, Some(4));
        let writes: Vec<String> = f
            .sim
            .journal()
            .into_iter()
            .filter(|j| j.contains(gpu))
            .collect();
        assert_eq!(
            writes,
            [
                "set_override 0000:41:00.0 pci-pf-stub",
                "unbind 0000:41:00.0 0000:41:00.0",
                "probe 0000:41:00.0 0000:41:00.0",
                "set_num_vfs 0000:41:00.0 4",
                "clear_override 0000:41:00.0",
                "unbind 0000:41:00.0 0000:41:00.0",
                "probe 0000:41:00.0 0000:41:00.0",
            ]
        );
        for vf in ["0000:41:00.4", "0000:41:00.7"] {
            let d = f.sim.device(a(vf)).unwrap().expect(vf);
            assert_eq!(
                (d.driver.as_deref(), d.physfn),
                (Some("nvidia"), Some(a(gpu)))
            );
        }
        // The stub's module is not left out of the way: it was loaded.
        assert!(f.sim.driver_loaded("pci-pf-stub"));
    }

    /// A physical function with virtual functions is registered, but never
    /// bound or attached, forced or not; with none, it binds.
    #[tokio::test]
    async fn virtual_functions_block_moving_their_physical_function() {
        let f = sriov_host(Duration::from_secs(10)).await;
        let pf = f
            .service
            .register_at(PF, "x710", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&pf.stored.id).unwrap();
        for t in [target.clone(), target.clone().forced()] {
            let e = f.service.bind(&t).await.unwrap_err();
            assert!(
                matches!(&e, Error::HostInUse(m) if m.contains("2 SR-IOV virtual functions enabled (0000:3b:02.0, 0000:3b:02.1)")),
                "{e:?}"
            );
            let e = f.service.attach(&t, "vm").await.unwrap_err();
            assert!(matches!(&e, Error::HostInUse(_)), "{e:?}");
        }
        assert!(!f
            .sim
            .journal()
            .iter()
            .any(|j| j.contains("driver_override")));
        f.service.set_virtual_functions(&target, 0).await.unwrap();
        let bound = f.service.bind(&target).await.unwrap();
        assert!(bound.bound_to_vfio());
    }
}
