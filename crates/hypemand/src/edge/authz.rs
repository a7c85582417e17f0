//! Authorization, declared once, for every edge.
//!
//! [`Method::actions`] is the one table from a changing method to the polkit
//! actions that guard it. Every change an edge makes goes through [`Authz`]:
//! it resolves what the caller named to one record, once, asks the
//! [`Authorizer`] about that exact record (its address, vendor:device and name
//! go to polkit as details), and hands the service that record and nothing
//! else. A name re-pointed while polkit was deciding cannot redirect the
//! change, and a Register registers the host device it asked about.
//!
//! The authorizer is built once, at start-up (the daemon's polkit
//! [`Bouncer`](super::polkit::Bouncer)); edges hold no bus connection for it
//! and pass only a [`Caller`]. Tests put a fake in its place.

use std::sync::Arc;

use async_trait::async_trait;
use hypeman_api::Error;
use zbus::message::Header;

use crate::service::{Candidate, DeviceView, Op, Service, Target};
use crate::store::registry::OnRelease;

/// Every method that changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Register and Create.
    Register,
    /// Delete.
    Delete,
    /// Bind and BindWithOptions without `force`.
    Bind,
    /// Unbind.
    Unbind,
    /// Attach and AttachWithOptions without `force`.
    Attach,
    /// Detach.
    Detach,
    /// Bind with `force`: overrides the soft blockers.
    ForceBind,
    /// Attach with `force`: overrides the soft blockers.
    ForceAttach,
    /// Changing a device's tags (issue 15): authorized as registering.
    SetTags,
    /// *(issue 26)* Partitioning a device: SetVirtualFunctions.
    Partition,
    /// *(issue 27)* Attach under a lease whose end gives the device back to
    /// its host driver: that end is an Unbind, so Bind's action is asked too.
    AttachGivingBack,
    /// The same, forced.
    ForceAttachGivingBack,
}

impl Method {
    /// Every method, for the table's test.
    #[cfg(test)]
    pub const ALL: [Method; 12] = [
        Method::Register,
        Method::Delete,
        Method::Bind,
        Method::Unbind,
        Method::Attach,
        Method::Detach,
        Method::ForceBind,
        Method::ForceAttach,
        Method::SetTags,
        Method::Partition,
        Method::AttachGivingBack,
        Method::ForceAttachGivingBack,
    ];

    /// The table: which polkit actions each method needs, every one of them
    /// granted, in this order.
    pub const fn actions(self) -> &'static [Action] {
        match self {
            Method::Register | Method::SetTags => &[Action::Register],
            Method::Delete => &[Action::Delete],
            Method::Bind | Method::Unbind => &[Action::Bind],
            Method::Attach | Method::Detach => &[Action::Attach],
            Method::ForceBind => &[Action::Bind, Action::Force],
            Method::ForceAttach => &[Action::Attach, Action::Force],
            Method::Partition => &[Action::Partition],
            Method::AttachGivingBack => &[Action::Attach, Action::Bind],
            Method::ForceAttachGivingBack => &[Action::Attach, Action::Bind, Action::Force],
        }
    }

    /// Whether the method overrides soft blockers once authorized.
    pub const fn forces(self) -> bool {
        matches!(
            self,
            Method::ForceBind | Method::ForceAttach | Method::ForceAttachGivingBack
        )
    }

    /// The method a change of the service is authorized as.
    pub fn of(op: &Op) -> Method {
        match op {
            Op::Delete => Method::Delete,
            Op::Bind { force: false } => Method::Bind,
            Op::Bind { force: true } => Method::ForceBind,
            Op::Unbind => Method::Unbind,
            Op::Attach { force, lease, .. } => {
                let gives_back = lease
                    .as_ref()
                    .is_some_and(|l| l.lease.on_release == OnRelease::GiveBack);
                match (force, gives_back) {
                    (false, false) => Method::Attach,
                    (true, false) => Method::ForceAttach,
                    (false, true) => Method::AttachGivingBack,
                    (true, true) => Method::ForceAttachGivingBack,
                }
            }
            Op::Detach => Method::Detach,
            Op::SetTags { .. } => Method::SetTags,
            Op::SetVirtualFunctions { .. } => Method::Partition,
        }
    }
}

/// The polkit actions (`polkit/org.hypeman.devices.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Register, Create, SetTags.
    Register,
    /// Delete.
    Delete,
    /// Bind and Unbind.
    Bind,
    /// Attach and Detach.
    Attach,
    /// Overriding soft blockers, asked in addition to Bind or Attach.
    Force,
    /// *(issue 26)* Partitioning a device (virtual functions, vGPUs).
    Partition,
}

impl Action {
    /// The action's id in the policy file.
    pub fn id(self) -> &'static str {
        match self {
            Action::Register => "org.hypeman.devices.register",
            Action::Delete => "org.hypeman.devices.delete",
            Action::Bind => "org.hypeman.devices.bind",
            Action::Attach => "org.hypeman.devices.attach",
            Action::Force => "org.hypeman.devices.force",
            Action::Partition => "org.hypeman.devices.partition",
        }
    }
}

/// What a check is about; passed to polkit as details so rules can grant
/// one device and not another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Details {
    /// The function's address, `0000:a2:00.0`.
    pub pci_address: String,
    /// `vendor:device`, e.g. `10de:27b8`.
    pub device_id: String,
    /// The registered name (or the name it is about to get).
    pub name: String,
}

/// Who is asking.
#[derive(Debug)]
pub enum Caller<'a> {
    /// The sender of a D-Bus message (a `system-bus-name` subject).
    Bus(&'a Header<'a>),
    /// A process on a socket, from `SO_PEERCRED` and its start time read
    /// when it connected (a `unix-process` subject: polkitd checks the start
    /// time, so a reused pid is not mistaken for the caller).
    Process {
        /// The peer's pid.
        pid: u32,
        /// The peer's uid.
        uid: u32,
        /// The peer's start time, in clock ticks since boot.
        start_time: u64,
    },
}

/// Decides whether a caller may take an action on a device: polkit in the
/// daemon, a fake in the edges' in-process tests.
#[async_trait]
pub trait Authorizer: Send + Sync {
    /// `Ok` if `caller` may take `action` on the device of `details`; the
    /// refusal otherwise (`AccessDenied`, `InteractiveAuthorizationRequired`,
    /// `Busy`).
    async fn check(
        &self,
        caller: &Caller<'_>,
        action: Action,
        details: &Details,
    ) -> Result<(), Error>;
}

/// *(issue 29)* One operation as metrics count it: its result whatever
/// refused it (the arguments, the lookup, polkit or the service), and its
/// time from authorization to its end.
struct Counted {
    operation: &'static str,
    authorized: Option<std::time::Instant>,
}

impl Counted {
    fn new(operation: &'static str) -> Self {
        Counted {
            operation,
            authorized: None,
        }
    }

    fn authorized(&mut self) {
        self.authorized = Some(std::time::Instant::now());
    }

    fn done<T>(self, result: Result<T, Error>) -> Result<T, Error> {
        crate::telemetry::get().operation(
            self.operation,
            result.as_ref().map(drop).map_err(Error::short_name),
            self.authorized.map(|t| t.elapsed()),
        );
        result
    }
}

/// The gate every change passes.
pub struct Authz {
    service: Arc<Service>,
    authorizer: Arc<dyn Authorizer>,
}

impl Authz {
    /// The gate of `service`, asking `authorizer`.
    pub fn new(service: Arc<Service>, authorizer: Arc<dyn Authorizer>) -> Self {
        Authz {
            service,
            authorizer,
        }
    }

    async fn check(&self, caller: &Caller<'_>, method: Method, d: &Details) -> Result<(), Error> {
        for action in method.actions() {
            let began = std::time::Instant::now();
            let answer = self.authorizer.check(caller, *action, d).await;
            // *(issue 29)* Every check, by action and what it answered.
            let result = match &answer {
                Ok(()) => "granted",
                Err(Error::AccessDenied(_)) => "denied",
                Err(Error::InteractiveAuthorizationRequired(_)) => "interaction_required",
                Err(Error::Busy(_)) => "busy",
                Err(_) => "error",
            };
            crate::telemetry::get().polkit_check(action.id(), result, began.elapsed());
            answer?;
        }
        Ok(())
    }

    /// Checks `op`'s arguments, resolves `id_or_name` once, authorizes the
    /// caller for `op` on that record, then has the service apply it to that
    /// record.
    pub async fn apply(
        &self,
        caller: &Caller<'_>,
        id_or_name: &str,
        op: Op,
    ) -> Result<DeviceView, Error> {
        let mut counted = Counted::new(op.name());
        let result = async {
            op.validate()?;
            let method = Method::of(&op);
            let target = self.service.resolve(id_or_name)?;
            self.check(caller, method, &Self::details(target.record()))
                .await?;
            let target: Target = if method.forces() {
                target.forced()
            } else {
                target
            };
            counted.authorized();
            self.service.apply(&target, op).await
        }
        .await;
        counted.done(result)
    }

    /// *(issue 26)* Places `req` on a registered GPU, authorizes
    /// partitioning that GPU, and makes the vGPU there.
    pub async fn create_vgpu(
        &self,
        caller: &Caller<'_>,
        req: hypeman_api::VgpuRequest,
        lease: Option<crate::service::leases::LeaseRequest>,
    ) -> Result<hypeman_api::Vgpu, Error> {
        let mut counted = Counted::new("create_vgpu");
        let result = async {
            let plan = self.service.plan_vgpu(&req).await?;
            self.check(
                caller,
                Method::Partition,
                &Self::details(plan.parent.record()),
            )
            .await?;
            counted.authorized();
            self.service.create_vgpu(plan, req, lease).await
        }
        .await;
        counted.done(result)
    }

    /// *(issue 26)* Authorizes partitioning the vGPU's GPU, then deletes it.
    pub async fn delete_vgpu(&self, caller: &Caller<'_>, id: &str) -> Result<(), Error> {
        let mut counted = Counted::new("delete_vgpu");
        let result = async {
            let record = self.service.vgpu_record(id)?;
            let parent = self
                .service
                .snapshot()
                .by_address(record.parent_pci_address)
                .map(|d| (**d).clone());
            let details = match &parent {
                Some(p) => Self::details(p),
                None => Details {
                    pci_address: record.parent_pci_address.to_string(),
                    device_id: String::new(),
                    name: String::new(),
                },
            };
            self.check(caller, Method::Partition, &details).await?;
            counted.authorized();
            self.service.delete_vgpu(id).await
        }
        .await;
        counted.done(result)
    }

    fn details(d: &crate::store::StoredDevice) -> Details {
        Details {
            pci_address: d.pci_address.to_string(),
            device_id: format!("{}:{}", d.vendor_id, d.device_id),
            name: d.name.clone(),
        }
    }

    /// Reads the host device at `pci_address` once, authorizes registering
    /// that device under `name` (empty: the default name), and registers it.
    pub async fn register(
        &self,
        caller: &Caller<'_>,
        pci_address: &str,
        name: &str,
        tags: std::collections::BTreeMap<String, String>,
    ) -> Result<DeviceView, Error> {
        let mut counted = Counted::new("register");
        let result = async {
            let candidate: Candidate = self.service.propose(pci_address, name, tags).await?;
            let details = Details {
                pci_address: candidate.host().address.to_string(),
                device_id: format!(
                    "{:04x}:{:04x}",
                    candidate.host().vendor,
                    candidate.host().device
                ),
                name: candidate.name().to_string(),
            };
            self.check(caller, Method::Register, &details).await?;
            counted.authorized();
            self.service.register(candidate).await
        }
        .await;
        counted.done(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action in the table is declared in the shipped policy, and every
    /// declared action guards some method.
    #[test]
    fn the_table_matches_the_policy() {
        let policy = include_str!("../../../../polkit/org.hypeman.devices.policy");
        let mut used: Vec<&str> = Method::ALL
            .iter()
            .flat_map(|m| m.actions().iter().map(|a| a.id()))
            .collect();
        used.sort();
        used.dedup();
        for id in &used {
            assert!(policy.contains(&format!("<action id=\"{id}\">")), "{id}");
        }
        assert_eq!(policy.matches("<action id=").count(), used.len());
        // Force is never kept, and the example rule does not grant it.
        let force = &policy[policy.find("org.hypeman.devices.force").unwrap()..];
        assert!(!force.contains("auth_admin_keep"));
        let rule = include_str!("../../../../polkit/50-org.hypeman.devices.rules");
        assert!(rule.contains("action.id !== \"org.hypeman.devices.force\""));
    }

    /// A forced change is authorized as the force method, and needs force.
    #[test]
    fn force_is_asked_for_a_forced_op() {
        let bind = Method::of(&Op::Bind { force: true });
        assert_eq!(bind, Method::ForceBind);
        assert!(bind.actions().contains(&Action::Force));
        let attach = Method::of(&Op::Attach {
            instance_id: "vm".into(),
            force: false,
            lease: None,
        });
        assert!(!attach.actions().contains(&Action::Force));
    }
}
