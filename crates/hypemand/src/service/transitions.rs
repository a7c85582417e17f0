//! The vfio transitions: Bind, Unbind, Attach, Detach, and bringing the host in
//! line with the registry (at start-up, and when a device comes back).
//!
//! Each runs under the device's own lock on the record re-read by id, asks
//! [`placement`] where the device is against where it should be, stores what
//! it is about to do before touching the host (so a crash half way is finished
//! by the next start), and on failure puts the record back as it was.

use std::future::Future;

use super::error::{in_use, Result};
use super::leases::{same_attachment, LeaseRequest, Leased};
use super::placement::{placement, Needed};
use super::{DeviceView, Service, Target};
use crate::host::HostDevice;
use crate::pci::PciAddress;
use crate::store::StoredDevice;
use hypeman_api::validate::validate_instance_id;

/// A driver name for logs: `nvidia`, or `(none)`.
fn driver_text(d: Option<&str>) -> &str {
    d.unwrap_or("(none)")
}

impl Service {
    /// Runs `op` holding the device's lock, with the stored record re-read by
    /// id under the lock (it may have changed or gone while we waited) and the
    /// device read from the host once, then publishes what changed. `op`
    /// decides from that one read: nothing reads the device again before the
    /// first write.
    pub(super) async fn with_device<F, Fut>(&self, target: &Target, op: F) -> Result<DeviceView>
    where
        F: FnOnce(StoredDevice, Option<HostDevice>) -> Fut,
        Fut: Future<Output = Result<(DeviceView, DeviceView)>>,
    {
        self.refuse_if_stopping()?;
        let lock = self.device_lock(target.record().pci_address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        let stored = self.current(target)?;
        // *(issue 30)* The device read now; what clients were told of it, if
        // that differs (events were missed): the change is announced from
        // what they were told.
        let (initial, told) = self.read_through(stored.pci_address).await?;
        match op(stored.clone(), initial.clone()).await {
            Ok((before, after)) => {
                let before = match told {
                    Some(t) => self.view(before.stored, t),
                    None => before,
                };
                self.publish_change(&before, &after).await;
                Ok(after)
            }
            Err(e) => {
                // A failed operation may still have moved something (a rollback
                // that could not finish, a device that vanished): say what is
                // true now.
                if let Ok(now) = self.live(stored.pci_address).await {
                    let current = self.current(target).unwrap_or_else(|_| stored.clone());
                    let before = self.view(stored, told.unwrap_or(initial));
                    let after = self.view(current, now);
                    self.publish_change(&before, &after).await;
                }
                Err(e)
            }
        }
    }

    /// `Bind`: moves the device to vfio-pci (idempotent).
    pub async fn bind(&self, target: &Target) -> Result<DeviceView> {
        self.with_device(target, |s, live| {
            self.bind_locked(s, live, false, target.is_forced())
        })
        .await
    }

    /// `Unbind`: gives the device back to its host driver (idempotent).
    pub async fn unbind(&self, target: &Target) -> Result<DeviceView> {
        self.with_device(target, |s, live| async move {
            if let Some(instance) = &s.attached_to {
                return Err(in_use(&s.name, instance));
            }
            let _group = self.hold_group(&s, live.as_ref(), None).await?;
            self.unbind_locked(s, live).await
        })
        .await
    }

    /// `Attach`: binds if needed, then marks the device as held by `instance`.
    #[cfg(test)]
    pub async fn attach(&self, target: &Target, instance: &str) -> Result<DeviceView> {
        self.attach_leased(target, instance, None).await
    }

    /// `Attach` *(issue 27)* with a lease: the attachment is released when
    /// the lease's holder ends ([`super::leases`]).
    pub async fn attach_leased(
        &self,
        target: &Target,
        instance: &str,
        lease: Option<LeaseRequest>,
    ) -> Result<DeviceView> {
        validate_instance_id(instance)?;
        let instance = instance.to_string();
        let forced = target.is_forced();
        self.with_device(target, |s, live| async move {
            match &s.attached_to {
                Some(other) if *other != instance => return Err(in_use(&s.name, other)),
                Some(_) if same_attachment(s.lease.as_ref(), lease.as_ref()) => {
                    let v = self.view(s, live);
                    return Ok((v.clone(), v));
                }
                Some(_) => {
                    let held = s
                        .lease
                        .as_ref()
                        .map_or("without a lease".to_string(), |l| {
                            format!("under the lease of {}", l.describe())
                        });
                    return Err(hypeman_api::Error::InUse(format!(
                        "{} is already attached to {instance} {held}; detach it first to attach it under another lease",
                        s.name
                    )));
                }
                None => {}
            }
            let _group = self.hold_group(&s, live.as_ref(), Some(&instance)).await?;
            let (before, bound) = self.bind_locked(s, live, true, forced).await?;
            let stored = self
                .modify(&bound.stored.id, |d| {
                    d.attached_to = Some(instance.clone());
                    d.lease = lease.as_ref().map(|l| l.lease.clone());
                })
                .await?;
            if let Some(l) = &lease {
                self.start_lease(Leased::Device(stored.id.clone()), l);
            }
            tracing::info!(
                pci_address = %stored.pci_address,
                device_id = %stored.id,
                device_name = %stored.name,
                instance = %instance,
                holder = %lease.as_ref().map(|l| l.lease.describe()).unwrap_or_default(),
                "device attached"
            );
            Ok((before, self.view(stored, bound.live)))
        })
        .await
    }

    /// `Detach`: clears the attachment; the device stays on vfio-pci.
    pub async fn detach(&self, target: &Target) -> Result<DeviceView> {
        self.with_device(target, |s, live| async move {
            let before = self.view(s.clone(), live.clone());
            if s.attached_to.is_none() {
                return Ok((before.clone(), before));
            }
            let stored = self
                .modify(&s.id, |d| {
                    d.attached_to = None;
                    d.lease = None;
                })
                .await?;
            self.end_lease(&Leased::Device(stored.id.clone()));
            tracing::info!(
                pci_address = %stored.pci_address,
                device_id = %stored.id,
                device_name = %stored.name,
                "device detached"
            );
            Ok((before, self.view(stored, live)))
        })
        .await
    }

    /// Moves a device to vfio-pci; the caller holds its lock. `strict` (Attach)
    /// requires the whole IOMMU group to be assignable now, not merely movable.
    /// `force` overrides the soft blockers (the caller was authorized for it).
    async fn bind_locked(
        &self,
        s: StoredDevice,
        live: Option<HostDevice>,
        strict: bool,
        force: bool,
    ) -> Result<(DeviceView, DeviceView)> {
        let dev = live.ok_or_else(|| super::seen::absent(&s))?;
        // *(issue 28)* Another card than the one registered: never moved,
        // forced or not, and nothing written.
        if let Some(e) = super::identity::refusal(&s, &dev) {
            return Err(e);
        }
        let before = self.view(s.clone(), Some(dev.clone()));
        let on_vfio = placement(&s, Some(&dev)).on_vfio();
        // Hard blockers (no IOMMU, a bridge) and partitions (virtual
        // functions enabled): never, forced or not.
        let vm = self.door.virtual_machine().await.unwrap_or(false);
        if let Some(e) = super::blockers::move_refusal(&dev, vm) {
            return Err(e);
        }
        if let Some(b) = self.vgpus_blocker(&dev).await? {
            return Err(b.kind.refusal(b.message));
        }
        if strict || !on_vfio {
            // The group is read once, for both checks below.
            let members = self.door.read_group(&dev).await?;
            if !on_vfio {
                // The host must not be using it: checked under the device's
                // lock, right before the first write.
                let soft: Vec<_> = self
                    .blockers_now(&dev, &members)
                    .await?
                    .into_iter()
                    .filter(super::blockers::Blocker::soft)
                    .collect();
                if !soft.is_empty() {
                    let list = super::blockers::describe(&soft);
                    if !force {
                        return Err(super::blockers::refusal(&soft));
                    }
                    tracing::warn!(
                        pci_address = %s.pci_address,
                        device_id = %s.id,
                        device_name = %s.name,
                        overridden = %super::blockers::codes(&soft),
                        blockers = %list,
                        "forced: taking a device the host is using"
                    );
                }
            }
            // Scoped: a snapshot held across the changes below would make each
            // of them copy the registry.
            let snapshot = self.snapshot();
            let registered = |a: PciAddress| snapshot.by_address(a).is_some();
            self.door.check(&dev, members, strict, registered).await?;
        }
        if on_vfio {
            // Already there: nothing on the host changes; remember it should stay.
            let stored = self.modify(&s.id, |d| d.want_vfio = true).await?;
            return Ok((before, self.view(stored, Some(dev))));
        }
        // Store before touching: if we crash half way, the next start knows the
        // device should be on vfio-pci and which driver it came from.
        let original = s.original_driver.clone().or_else(|| dev.driver.clone());
        self.modify(&s.id, |d| {
            d.want_vfio = true;
            d.original_driver = original.clone();
        })
        .await?;
        let taken = self
            .with_holder_stopped(dev.driver.as_deref(), &s, self.door.take(&dev))
            .await;
        match taken {
            Ok(after) => {
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    from = %driver_text(dev.driver.as_deref()),
                    "device bound to vfio-pci"
                );
                let stored = self
                    .snapshot()
                    .by_id(&s.id)
                    .map(|d| (**d).clone())
                    .unwrap_or_else(|| s.clone());
                Ok((before, self.view(stored, Some(after))))
            }
            Err(e) => {
                if let Err(se) = self
                    .modify(&s.id, |d| {
                        d.want_vfio = s.want_vfio;
                        d.original_driver = s.original_driver.clone();
                    })
                    .await
                {
                    tracing::error!(pci_address = %s.pci_address, error = %se, "cannot record the failed bind");
                }
                tracing::warn!(pci_address = %s.pci_address, device_name = %s.name, error = %e, "bind failed");
                Err(e)
            }
        }
    }

    /// Gives a device back to its host driver; the caller holds its lock
    /// and read the device as `live`.
    pub(crate) async fn unbind_locked(
        &self,
        s: StoredDevice,
        live: Option<HostDevice>,
    ) -> Result<(DeviceView, DeviceView)> {
        let dev = live.ok_or_else(|| super::seen::absent(&s))?;
        let before = self.view(s.clone(), Some(dev.clone()));
        // A device left with no driver by an unbind cut short (a crash between
        // unbind and probe) is given back too, not only one still on vfio-pci.
        if !placement(&s, Some(&dev)).held() {
            let stored = self
                .modify(&s.id, |d| {
                    d.want_vfio = false;
                    d.original_driver = None;
                })
                .await?;
            return Ok((before, self.view(stored, Some(dev))));
        }
        // Store first (keeping the original driver): a crash half way leaves a
        // record that the next start completes.
        self.modify(&s.id, |d| d.want_vfio = false).await?;
        let given = self.with_holder_stopped(
            s.original_driver.as_deref(),
            &s,
            self.door.give_back(&dev, s.original_driver.as_deref()),
        );
        match given.await {
            Ok(after) => {
                let stored = self.modify(&s.id, |d| d.original_driver = None).await?;
                tracing::info!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    to = %driver_text(after.driver.as_deref()),
                    "device given back to the host"
                );
                Ok((before, self.view(stored, Some(after))))
            }
            Err(e) => {
                if let Err(se) = self.modify(&s.id, |d| d.want_vfio = s.want_vfio).await {
                    tracing::error!(pci_address = %s.pci_address, error = %se, "cannot record the failed unbind");
                }
                tracing::warn!(pci_address = %s.pci_address, device_name = %s.name, error = %e, "unbind failed");
                Err(e)
            }
        }
    }

    /// Runs `step` (an unbind from `driver`, or a probe back to it) with the
    /// service that holds `driver`'s devices stopped, and starts the service
    /// again afterwards, whatever the step did: on success, after a rollback
    /// and after a failure. Without such a service, just runs `step`.
    pub(super) async fn with_holder_stopped<T, E>(
        &self,
        driver: Option<&str>,
        s: &StoredDevice,
        step: impl Future<Output = std::result::Result<T, E>>,
    ) -> Result<T>
    where
        hypeman_api::Error: From<E>,
    {
        let holder = match driver {
            Some(d) => self.door.holder(d).await.unwrap_or_else(|e| {
                tracing::warn!(driver = d, error = %e, "cannot ask systemd whether a service holds the driver's devices; going on");
                None
            }),
            None => None,
        };
        let Some(holder) = holder else {
            return Ok(step.await?);
        };
        tracing::info!(pci_address = %s.pci_address, device_name = %s.name, holder_service = %holder.unit, "stopping the service that holds the device");
        if let Err(e) = self.door.set_unit(&holder.unit, false).await {
            // It may have stopped partly: ask for it back, then refuse.
            let _ = self.door.set_unit(&holder.unit, true).await;
            return Err(hypeman_api::Error::Failed(format!(
                "cannot stop {} before unbinding {}: {e}; nothing was changed",
                holder.unit, s.pci_address
            )));
        }
        let result = step.await;
        match self.door.set_unit(&holder.unit, true).await {
            Ok(()) => {
                tracing::info!(pci_address = %s.pci_address, holder_service = %holder.unit, "service started again")
            }
            Err(e) => {
                tracing::error!(pci_address = %s.pci_address, holder_service = %holder.unit, error = %e, "cannot start the service again; start it by hand")
            }
        }
        Ok(result?)
    }

    /// Brings the host in line with the registry: a device that should be on
    /// vfio-pci but is elsewhere (after a reboot, a replug) is bound again, and
    /// one whose unbind was cut short is given back. Failures are logged.
    pub async fn reconcile(&self) {
        let devices: Vec<std::sync::Arc<StoredDevice>> = self
            .snapshot()
            .iter()
            .filter(|d| d.want_vfio || d.original_driver.is_some())
            .cloned()
            .collect();
        let addrs: Vec<PciAddress> = devices.iter().map(|d| d.pci_address).collect();
        let live: Vec<_> = self
            .door
            .read_many(addrs)
            .await
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.ok().flatten())
            .collect();
        for (i, s) in devices.into_iter().enumerate() {
            // Only devices away from where they belong need the device's lock.
            if let Some(Some(l)) = live.get(i) {
                if placement(&s, Some(l)).needed() == Needed::Nothing {
                    continue;
                }
            }
            if let Err(e) = self.reconcile_one(&Target(s.clone(), false)).await {
                tracing::warn!(
                    pci_address = %s.pci_address,
                    device_id = %s.id,
                    device_name = %s.name,
                    error = %e,
                    "could not bring the device to its desired state"
                );
            }
        }
    }

    /// Reconciles one device (also the path a returning device takes).
    pub async fn reconcile_one(&self, target: &Target) -> Result<()> {
        self.with_device(target, |s, live| async move {
            let view = self.view(s.clone(), live.clone());
            match placement(&s, live.as_ref()).needed() {
                Needed::Nothing => Ok((view.clone(), view)),
                Needed::Bind => {
                    tracing::info!(
                        pci_address = %s.pci_address,
                        device_id = %s.id,
                        device_name = %s.name,
                        driver = %driver_text(view.driver()),
                        "device should be on vfio-pci: binding it again"
                    );
                    self.bind_locked(s, live, false, false).await
                }
                Needed::GiveBack => {
                    tracing::info!(
                        pci_address = %s.pci_address,
                        device_id = %s.id,
                        device_name = %s.name,
                        "an unbind was cut short: giving the device back"
                    );
                    self.unbind_locked(s, live).await
                }
            }
        })
        .await
        .map(|_| ())
    }
}
#[cfg(test)]
mod tests {
    //! The transition table: every state crossed with every operation, and every
    //! injected fault at every step, on the simulated kernel.

    use super::*;
    use crate::host::sim::{Fault, FaultKind};
    use crate::host::{Host, Op};
    use crate::service::testing::{example, service_on, Fixture};
    use crate::service::Result;
    use hypeman_api::VFIO_DRIVER;
    use std::time::Duration;

    const GPU: &str = "0000:a2:00.0";

    fn setup() -> Fixture {
        service_on(&example("l4.toml"), Duration::from_millis(300))
    }

    fn addr() -> PciAddress {
        PciAddress::parse(GPU).unwrap()
    }

    #[derive(Debug, Clone, Copy, PartialEq)]
    enum State {
        Unbound,
        Native,
        Vfio,
        Attached,
    }

    #[derive(Debug, Clone, Copy)]
    enum Action {
        Bind,
        Unbind,
        Attach1,
        Attach2,
        Detach,
        Delete,
    }

    const STATES: [State; 4] = [State::Unbound, State::Native, State::Vfio, State::Attached];
    const ACTIONS: [Action; 6] = [
        Action::Bind,
        Action::Unbind,
        Action::Attach1,
        Action::Attach2,
        Action::Detach,
        Action::Delete,
    ];

    async fn enter(f: &Fixture, state: State) {
        f.service
            .register_at(GPU, "l4-gpu", Default::default())
            .await
            .unwrap();
        match state {
            State::Unbound => f.sim.unbind(addr(), "nvidia").unwrap(),
            State::Native => {}
            State::Vfio => {
                f.service
                    .bind(&f.service.resolve("l4-gpu").unwrap())
                    .await
                    .unwrap();
            }
            State::Attached => {
                f.service
                    .attach(&f.service.resolve("l4-gpu").unwrap(), "vm-1")
                    .await
                    .unwrap();
            }
        }
    }

    async fn act(f: &Fixture, action: Action) -> Result<()> {
        match action {
            Action::Bind => f
                .service
                .bind(&f.service.resolve("l4-gpu").unwrap())
                .await
                .map(|_| ()),
            Action::Unbind => f
                .service
                .unbind(&f.service.resolve("l4-gpu").unwrap())
                .await
                .map(|_| ()),
            Action::Attach1 => f
                .service
                .attach(&f.service.resolve("l4-gpu").unwrap(), "vm-1")
                .await
                .map(|_| ()),
            Action::Attach2 => f
                .service
                .attach(&f.service.resolve("l4-gpu").unwrap(), "vm-2")
                .await
                .map(|_| ()),
            Action::Detach => f
                .service
                .detach(&f.service.resolve("l4-gpu").unwrap())
                .await
                .map(|_| ()),
            Action::Delete => f
                .service
                .delete(&f.service.resolve("l4-gpu").unwrap())
                .await
                .map(|_| ()),
        }
    }

    /// What each (state, action) must lead to: Ok((driver, attached, registered))
    /// or the error name.
    fn expected(
        state: State,
        action: Action,
    ) -> std::result::Result<(Option<&'static str>, Option<&'static str>, bool), &'static str> {
        use Action as A;
        use State as S;
        let vfio = Some(VFIO_DRIVER);
        let nv = Some("nvidia");
        match (state, action) {
            (S::Unbound, A::Bind) => Ok((vfio, None, true)),
            (S::Unbound, A::Unbind | A::Detach) => Ok((None, None, true)),
            (S::Unbound, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Unbound, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Unbound, A::Delete) => Ok((None, None, false)),
            (S::Native, A::Bind) => Ok((vfio, None, true)),
            (S::Native, A::Unbind | A::Detach) => Ok((nv, None, true)),
            (S::Native, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Native, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Native, A::Delete) => Ok((nv, None, false)),
            (S::Vfio, A::Bind | A::Detach) => Ok((vfio, None, true)),
            (S::Vfio, A::Unbind) => Ok((nv, None, true)),
            (S::Vfio, A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Vfio, A::Attach2) => Ok((vfio, Some("vm-2"), true)),
            (S::Vfio, A::Delete) => Ok((nv, None, false)),
            (S::Attached, A::Bind | A::Attach1) => Ok((vfio, Some("vm-1"), true)),
            (S::Attached, A::Detach) => Ok((vfio, None, true)),
            (S::Attached, A::Unbind | A::Attach2 | A::Delete) => Err("InUse"),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_state_by_every_operation() {
        for state in STATES {
            for action in ACTIONS {
                let f = setup();
                enter(&f, state).await;
                let host_before = f.sim.device(addr()).unwrap().unwrap();
                let got = act(&f, action).await;
                let dev = f.sim.device(addr()).unwrap().unwrap();
                let stored = f.service.snapshot().by_address(addr()).cloned();
                let case = format!("{state:?} x {action:?}");
                match expected(state, action) {
                    Ok((driver, attached, registered)) => {
                        assert!(got.is_ok(), "{case}: {got:?}");
                        assert_eq!(dev.driver.as_deref(), driver, "{case}");
                        assert_eq!(stored.is_some(), registered, "{case}");
                        if let Some(s) = stored {
                            assert_eq!(s.attached_to.as_deref(), attached, "{case}");
                            assert_eq!(s.want_vfio, driver == Some(VFIO_DRIVER), "{case}");
                        }
                        // The override is set exactly while on vfio-pci.
                        let want_override =
                            (driver == Some(VFIO_DRIVER)).then(|| VFIO_DRIVER.to_string());
                        assert_eq!(dev.driver_override, want_override, "{case}");
                    }
                    Err(name) => {
                        let e = got.expect_err(&case);
                        assert_eq!(e.short_name(), name, "{case}: {e}");
                        assert_eq!(dev, host_before, "{case}: the host changed");
                    }
                }
            }
        }
    }

    fn fault_kinds(op: Op) -> Vec<FaultKind> {
        let mut k = vec![FaultKind::Errno(5), FaultKind::Errno(16), FaultKind::Stall];
        if op == Op::Unbind {
            k.push(FaultKind::Grab);
        }
        k
    }

    /// Every fault at every step of every path that touches the host: either the
    /// operation succeeds as it would have, or it fails and the device's driver,
    /// override and stored record are exactly as before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fault_at_every_step_restores_the_device() {
        let paths = [
            (State::Native, Action::Bind),
            (State::Unbound, Action::Bind),
            (State::Native, Action::Attach1),
            (State::Vfio, Action::Unbind),
            (State::Vfio, Action::Delete),
        ];
        let mut failures_seen = 0;
        for (state, action) in paths {
            for op in Op::ALL {
                for kind in fault_kinds(op) {
                    let f = setup();
                    enter(&f, state).await;
                    let host_before = f.sim.device(addr()).unwrap().unwrap();
                    let stored_before = f.service.snapshot().by_address(addr()).cloned();
                    f.sim.inject(Fault {
                        op,
                        address: addr(),
                        kind: kind.clone(),
                    });
                    let got = act(&f, action).await;
                    f.sim.clear_faults();
                    let case = format!("{state:?} x {action:?} with {kind:?} on {op}");
                    match got {
                        Ok(()) => {
                            let (driver, _, registered) = expected(state, action).unwrap();
                            let dev = f.sim.device(addr()).unwrap().unwrap();
                            assert_eq!(dev.driver.as_deref(), driver, "{case}");
                            assert_eq!(
                                f.service.snapshot().by_address(addr()).is_some(),
                                registered,
                                "{case}"
                            );
                        }
                        Err(e) => {
                            failures_seen += 1;
                            let dev = f.sim.device(addr()).unwrap().unwrap();
                            assert_eq!(dev, host_before, "{case}: {e}");
                            assert_eq!(
                                f.service.snapshot().by_address(addr()).cloned(),
                                stored_before,
                                "{case}"
                            );
                            let name = e.short_name();
                            if kind == FaultKind::Stall {
                                assert_eq!(name, "Timeout", "{case}: {e}");
                            } else {
                                assert_eq!(name, "BindFailed", "{case}: {e}");
                            }
                            assert!(e.to_string().contains("step"), "{case}: {e}");
                            assert!(e.to_string().contains("put back"), "{case}: {e}");
                        }
                    }
                }
            }
        }
        assert!(
            failures_seen > 20,
            "only {failures_seen} faults made an operation fail"
        );
    }

    /// The re-claim after a replug, with every fault at every step: it fails,
    /// and the device stays as the kernel plugged it (on its native driver,
    /// no override) with the registry unchanged, ready for the next try.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_fault_during_the_reclaim_after_a_replug() {
        let mut failures_seen = 0;
        for op in Op::ALL {
            for kind in fault_kinds(op) {
                let f = setup();
                enter(&f, State::Vfio).await;
                f.sim.unplug(addr()).unwrap();
                f.sim.plug(addr()).unwrap();
                let plugged = f.sim.device(addr()).unwrap().unwrap();
                assert_eq!(plugged.driver.as_deref(), Some("nvidia"));
                let stored_before = f.service.snapshot().by_address(addr()).cloned().unwrap();
                f.sim.inject(Fault {
                    op,
                    address: addr(),
                    kind: kind.clone(),
                });
                let got = f
                    .service
                    .reconcile_one(&f.service.resolve(&stored_before.id).unwrap())
                    .await;
                f.sim.clear_faults();
                let case = format!("reclaim with {kind:?} on {op}");
                let now = f.sim.device(addr()).unwrap().unwrap();
                match got {
                    Ok(()) => assert_eq!(now.driver.as_deref(), Some(VFIO_DRIVER), "{case}"),
                    Err(e) => {
                        failures_seen += 1;
                        assert_eq!(now, plugged, "{case}: {e}");
                        assert_eq!(
                            f.service.snapshot().by_address(addr()).cloned().unwrap(),
                            stored_before,
                            "{case}"
                        );
                        // And the next try, without the fault, succeeds.
                        f.service
                            .reconcile_one(&f.service.resolve(&stored_before.id).unwrap())
                            .await
                            .unwrap();
                        assert_eq!(
                            f.sim.device(addr()).unwrap().unwrap().driver.as_deref(),
                            Some(VFIO_DRIVER)
                        );
                    }
                }
            }
        }
        // The re-claim writes the override, unbinds and probes: each of the
        // three kinds of fault on those steps (and the grab on unbind) must fail it.
        assert!(
            failures_seen >= 10,
            "only {failures_seen} faults made the re-claim fail"
        );
    }

    #[tokio::test]
    async fn group_rules() {
        let f = service_on(&example("desktop.toml"), Duration::from_secs(5));
        let s = &f.service;
        s.register_at("0000:01:00.0", "gpu", Default::default())
            .await
            .unwrap();
        let e = s.bind(&s.resolve("gpu").unwrap()).await.unwrap_err();
        assert_eq!(e.short_name(), "IommuGroupConflict");
        assert!(
            e.to_string()
                .contains("0000:01:00.1 (driver snd_hda_intel)"),
            "{e}"
        );
        s.register_at("0000:01:00.1", "gpu-audio", Default::default())
            .await
            .unwrap();
        // The GPU is registered, so it can follow: the audio function may go first.
        s.bind(&s.resolve("gpu-audio").unwrap()).await.unwrap();
        // But it cannot be attached while the GPU still sits on nvidia.
        let e = s
            .attach(&s.resolve("gpu-audio").unwrap(), "vm-1")
            .await
            .unwrap_err();
        assert_eq!(e.short_name(), "IommuGroupConflict");
        s.bind(&s.resolve("gpu").unwrap()).await.unwrap();
        s.attach(&s.resolve("gpu-audio").unwrap(), "vm-1")
            .await
            .unwrap();
        s.attach(&s.resolve("gpu").unwrap(), "vm-1").await.unwrap();
    }

    #[tokio::test]
    async fn vfio_missing_and_no_iommu() {
        let dir = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(example("l4.toml"))
            .unwrap()
            .replace(
                "name = \"vfio-pci\"",
                "name = \"vfio-pci\"\nloaded = false\nloadable = false",
            );
        let fixture = dir.path().join("novfio.toml");
        std::fs::write(&fixture, text).unwrap();
        let f = service_on(&fixture, Duration::from_secs(5));
        let (s, sim) = (&f.service, &f.sim);
        s.register_at(GPU, "gpu", Default::default()).await.unwrap();
        assert_eq!(
            s.bind(&s.resolve("gpu").unwrap())
                .await
                .unwrap_err()
                .short_name(),
            "VfioUnavailable"
        );
        assert_eq!(
            sim.device(addr()).unwrap().unwrap().driver.as_deref(),
            Some("nvidia")
        );

        // Loadable but not loaded: modprobe (simulated) brings it.
        let text = std::fs::read_to_string(&fixture)
            .unwrap()
            .replace("loadable = false", "loadable = true");
        std::fs::write(&fixture, text).unwrap();
        let f = service_on(&fixture, Duration::from_secs(5));
        let s = &f.service;
        s.register_at(GPU, "gpu", Default::default()).await.unwrap();
        assert!(s
            .bind(&s.resolve("gpu").unwrap())
            .await
            .unwrap()
            .bound_to_vfio());
    }

    /// A Bind or an Attach reads the device from the host once, under its
    /// lock, and decides everything from that read (before: Bind read it
    /// twice, Attach three times).
    #[tokio::test]
    async fn bind_and_attach_read_the_device_once() {
        let f = setup();
        let v = f
            .service
            .register_at(GPU, "gpu", Default::default())
            .await
            .unwrap();
        let t = f.service.resolve(&v.stored.id).unwrap();
        f.service.bind(&t).await.unwrap();
        let reads = |f: &Fixture| f.sim.reads();
        let before = reads(&f);
        f.service.bind(&t).await.unwrap();
        assert_eq!(reads(&f) - before, 1, "a Bind of a device on vfio-pci");
        let before = reads(&f);
        f.service.attach(&t, "vm-1").await.unwrap();
        assert_eq!(reads(&f) - before, 1, "an Attach of a bound device");
        let before = reads(&f);
        f.service.detach(&t).await.unwrap();
        assert_eq!(reads(&f) - before, 1, "a Detach");
    }
}

#[cfg(test)]
mod resolve_once {
    //! *(issue 13)* An operation acts on the record it was authorized for.

    use crate::service::testing::{example, service_on};
    use hypeman_api::VFIO_DRIVER;
    use std::time::Duration;

    /// The name is re-pointed between the check and the act (the caller
    /// deleted its device and registered another address under the same
    /// name): the operation answers NotFound and the new device is untouched.
    #[tokio::test]
    async fn a_re_pointed_name_does_not_redirect_an_operation() {
        let f = service_on(&example("l4.toml"), Duration::from_secs(5));
        let s = &f.service;
        s.register_at("0000:3b:00.0", "dev", Default::default())
            .await
            .unwrap();
        let authorized = s.resolve("dev").unwrap();
        s.delete(&authorized).await.unwrap();
        s.register_at("0000:a2:00.0", "dev", Default::default())
            .await
            .unwrap();
        for result in [
            s.bind(&authorized).await.map(|_| ()),
            s.attach(&authorized, "vm-1").await.map(|_| ()),
            s.unbind(&authorized).await.map(|_| ()),
            s.detach(&authorized).await.map(|_| ()),
            s.delete(&authorized).await.map(|_| ()),
        ] {
            let e = result.unwrap_err();
            assert_eq!(e.short_name(), "NotFound", "{e}");
            assert!(e.to_string().contains("deleted meanwhile"), "{e}");
        }
        let gpu = s.get("dev").await.unwrap();
        assert_ne!(gpu.driver(), Some(VFIO_DRIVER));
        assert!(gpu.stored.attached_to.is_none());
    }
}
