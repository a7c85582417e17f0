//! *(issue 26)* The vGPUs hypemand makes: `CreateVgpu`, `DeleteVgpu`,
//! `ListVgpus`, and resolving at start-up what a crash left half made.
//!
//! The rules:
//! - placement: among the registered GPUs that offer the profile now (and
//!   are on the asked NUMA node, or are the asked parent), the least loaded
//!   by framebuffer; a GPU whose load is not known comes last;
//! - claim first: the vGPU is journaled as claimed (`ready` false, its
//!   function and mdev UUID chosen) before the first write to the host, and
//!   as ready once the host shows it; a failed write is undone and the claim
//!   removed. A crash between the two is resolved at start-up, before READY:
//!   what the host shows is kept (marked ready), anything else is undone and
//!   the claim dropped; never left unknown;
//! - everything on one GPU happens under its lock, one at a time;
//! - a vGPU is deleted only while no process holds its VFIO nodes;
//! - *(issue 27)* a vGPU made with a lease is released when its holder
//!   ends: `detach` clears its instance (the vGPU stays made), `give-back`
//!   deletes it, under the GPU's lock as DeleteVgpu does.

use hypeman_api::gpu::{Vgpu, VgpuRequest};
use hypeman_api::validate::validate_instance_id;
use hypeman_api::Error;

use super::error::{host_error, Result};
use super::leases::{LeaseRequest, Leased};
use super::{LeaseShown, Service, Target};
use crate::host::vgpu::{Carried, Framework};
use crate::pci::PciAddress;
use crate::store::registry::{new_device_id, now_rfc3339, Lease, OnRelease};
use crate::store::{Change, StoredVgpu};

/// Where a request goes: the parent chosen, before authorization is asked
/// about it.
#[derive(Debug, Clone)]
pub struct VgpuPlan {
    /// The parent GPU's record.
    pub parent: Target,
    type_id: String,
    framework: Framework,
}

impl Service {
    /// Chooses the parent for `req` (read-only): the registered GPU that
    /// offers its profile now, least loaded by framebuffer.
    pub async fn plan_vgpu(&self, req: &VgpuRequest) -> Result<VgpuPlan> {
        if let Some(i) = &req.instance_id {
            validate_instance_id(i)?;
        }
        let asked: Option<PciAddress> = match &req.parent {
            None => None,
            Some(p) => Some(match self.snapshot().resolve(p) {
                Some(d) => d.pci_address,
                None => PciAddress::parse(p)
                    .ok()
                    .filter(|a| self.snapshot().by_address(*a).is_some())
                    .ok_or_else(|| super::error::not_found(p))?,
            }),
        };
        let mut offers = Vec::new();
        for (parent, known) in self.vgpu_parents().await? {
            if asked.is_some_and(|a| a != parent.host.address) {
                continue;
            }
            if req.numa_node.is_some() && parent.host.numa_node != req.numa_node {
                continue;
            }
            let Some(c) = parent
                .counted(&known)
                .into_iter()
                .find(|c| c.name == req.profile && c.available > 0)
            else {
                continue;
            };
            let load = parent.used_mb(&known);
            offers.push((load.is_none(), load.unwrap_or(0), parent.host.address, c));
        }
        offers.sort_by_key(|(unknown, load, address, _)| (*unknown, *load, *address));
        let Some((_, _, address, c)) = offers.into_iter().next() else {
            let mut where_ = String::new();
            if let Some(p) = &req.parent {
                where_.push_str(&format!(" on {p}"));
            }
            if let Some(n) = req.numa_node {
                where_.push_str(&format!(" on NUMA node {n}"));
            }
            return Err(Error::InvalidArgument(format!(
                "no registered GPU{where_} can make a vGPU of profile {:?} now; `hypemanctl vgpu types` lists what can be made",
                hypeman_api::validate::shorten(&req.profile)
            )));
        };
        let id = self
            .snapshot()
            .by_address(address)
            .map(|d| d.id.clone())
            .ok_or_else(|| super::error::device_not_found(address))?;
        Ok(VgpuPlan {
            parent: self.resolve(&id)?,
            type_id: c.id,
            framework: c.framework,
        })
    }

    /// `CreateVgpu` on the parent `plan` chose (and authorization was asked
    /// about): claim, write, verify, ready; and *(issue 27)* with a lease
    /// (its holder proven by the edge), watched from then on.
    pub async fn create_vgpu(
        &self,
        plan: VgpuPlan,
        req: VgpuRequest,
        lease: Option<LeaseRequest>,
    ) -> Result<Vgpu> {
        self.refuse_if_stopping()?;
        let lock = self.device_lock(plan.parent.record().pci_address);
        let _held = lock.lock().await;
        self.refuse_if_stopping()?;
        let parent = self.current(&plan.parent)?;
        let host = self
            .live(parent.pci_address)
            .await?
            .ok_or_else(|| super::seen::absent(&parent))?;
        let slots = self.door.vgpu_slots(&host).await.map_err(|e| {
            host_error(format!("cannot read the vGPU slots of {}", host.address), e)
        })?;
        let claimed: Vec<PciAddress> = self
            .snapshot()
            .vgpus()
            .filter(|v| plan.framework == Framework::VendorVfio && v.mdev_uuid.is_none())
            .map(|v| v.pci_address)
            .collect();
        let slot = slots
            .iter()
            .filter(|s| s.framework == plan.framework && !claimed.contains(&s.address))
            .find(|s| {
                let offered = s
                    .creatable
                    .iter()
                    .any(|t| t.id == plan.type_id && t.available > 0);
                offered && s.current.is_none()
            })
            .ok_or_else(|| {
                Error::InUse(format!(
                    "{} has no free function for {:?} any more (taken meanwhile); try again",
                    parent.name, req.profile
                ))
            })?;
        let uuid = (plan.framework == Framework::Mdev).then(|| uuid::Uuid::new_v4().to_string());
        let mut record = StoredVgpu {
            id: new_device_id(),
            profile: req.profile.clone(),
            type_id: plan.type_id.clone(),
            framework: plan.framework.as_str().to_string(),
            parent_pci_address: parent.pci_address,
            pci_address: slot.address,
            mdev_uuid: uuid.clone(),
            instance_id: req.instance_id.clone(),
            created_at: now_rfc3339(),
            ready: false,
            lease: lease.as_ref().map(|l| l.lease.clone()),
        };
        // Claimed before the first write: a crash from here on is resolved
        // at the next start.
        self.commit(Change::AddVgpu(record.clone())).await?;
        crate::pause::at(crate::pause::Point::VgpuClaimed);
        let made = self
            .door
            .make_vgpu(slot.address, &plan.type_id, uuid.as_deref())
            .await;
        crate::pause::at(crate::pause::Point::VgpuWritten);
        if let Err(e) = made {
            tracing::warn!(pci_address = %slot.address, parent = %parent.name, error = %e, "could not make the vGPU; the claim goes");
            let _ = self.commit(Change::RemoveVgpu(record.id.clone())).await;
            return Err(if e.is_timeout() {
                Error::Timeout(e.to_string())
            } else {
                Error::Failed(e.to_string())
            });
        }
        record.ready = true;
        self.commit(Change::ReplaceVgpu(record.clone())).await?;
        if let Some(l) = &lease {
            self.start_lease(Leased::Vgpu(record.id.clone()), l);
        }
        tracing::info!(
            vgpu_id = %record.id,
            profile = %record.profile,
            pci_address = %record.pci_address,
            parent = %parent.name,
            instance = %record.instance_id.as_deref().unwrap_or(""),
            holder = %record.lease.as_ref().map(Lease::describe).unwrap_or_default(),
            "vGPU made"
        );
        let v = self.vgpu_view(&record).await;
        if let Some(p) = self.publisher() {
            p.vgpu_created(&v).await;
        }
        Ok(v)
    }

    /// The vGPU record `id`; `NotFound` when there is none.
    pub fn vgpu_record(&self, id: &str) -> Result<StoredVgpu> {
        self.snapshot()
            .vgpu(id)
            .map(|v| (**v).clone())
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no vGPU with id {:?}; `hypemanctl vgpu list` lists them",
                    hypeman_api::validate::shorten(id)
                ))
            })
    }

    /// `DeleteVgpu`: refused (`HostInUse`) while a process holds its VFIO
    /// nodes; writes `0`, or removes the mdev, then drops the record.
    pub async fn delete_vgpu(&self, id: &str) -> Result<()> {
        self.refuse_if_stopping()?;
        let first = self.vgpu_record(id)?;
        let lock = self.device_lock(first.parent_pci_address);
        let _held = lock.lock().await;
        let record = self.vgpu_record(id)?;
        self.delete_vgpu_locked(&record).await
    }

    /// Deletes `record`'s vGPU, its GPU's lock held.
    async fn delete_vgpu_locked(&self, record: &StoredVgpu) -> Result<()> {
        let id = record.id.as_str();
        let nodes = self
            .door
            .vfio_nodes(record.pci_address, record.mdev_uuid.as_deref())
            .await
            .map_err(|e| host_error(format!("cannot read the nodes of vGPU {id}"), e))?;
        match self.door.vfio_holders(nodes).await {
            Ok(held) if !held.is_empty() => {
                return Err(Error::HostInUse(format!(
                    "vGPU {id} is in use: {}; stop the VM first, nothing was changed",
                    held.join("; ")
                )))
            }
            Ok(_) => {}
            Err(why) => {
                return Err(Error::Busy(format!(
                    "cannot tell whether a process holds vGPU {id} ({why}); nothing was changed, try again"
                )))
            }
        }
        let there = self
            .door
            .carried(record.pci_address, record.mdev_uuid.as_deref())
            .await
            .map_err(|e| host_error(format!("cannot read vGPU {id}"), e))?;
        let ours = match (&there, &record.mdev_uuid) {
            (Carried::Type(t), None) => t.to_string() == record.type_id,
            (Carried::Mdev, Some(_)) => true,
            _ => false,
        };
        if ours {
            self.door
                .unmake_vgpu(record.pci_address, record.mdev_uuid.as_deref())
                .await
                .map_err(|e| host_error(format!("cannot remove vGPU {id}"), e))?;
        } else {
            tracing::warn!(vgpu_id = %id, pci_address = %record.pci_address, "the vGPU was already gone from the host; dropping its record");
        }
        self.commit(Change::RemoveVgpu(record.id.clone())).await?;
        self.end_lease(&Leased::Vgpu(record.id.clone()));
        tracing::info!(vgpu_id = %id, pci_address = %record.pci_address, "vGPU deleted");
        if let Some(p) = self.publisher() {
            p.vgpu_deleted(id).await;
        }
        Ok(())
    }

    /// *(issue 27)* Releases vGPU `id` if it still has `lease`, under its
    /// GPU's lock: `give-back` deletes it as DeleteVgpu does; `detach` (or a
    /// give-back the host refuses, say because a process still holds its
    /// nodes) clears its instance and lease, and the vGPU stays made.
    pub async fn release_vgpu_lease(&self, id: &str, lease: &Lease, reason: &str) {
        self.end_lease_of(&Leased::Vgpu(id.to_string()), lease);
        let Ok(first) = self.vgpu_record(id) else {
            return;
        };
        let lock = self.device_lock(first.parent_pci_address);
        let _held = lock.lock().await;
        let Ok(record) = self.vgpu_record(id) else {
            return;
        };
        if record.lease.as_ref() != Some(lease) {
            return;
        }
        let instance = record.instance_id.clone().unwrap_or_default();
        if lease.on_release == OnRelease::GiveBack {
            match self.delete_vgpu_locked(&record).await {
                Ok(()) => {
                    tracing::info!(vgpu_id = %id, %instance, holder = %lease.describe(), %reason, "lease released: vGPU deleted");
                    return;
                }
                Err(e) => tracing::warn!(
                    vgpu_id = %id,
                    holder = %lease.describe(),
                    error = %e,
                    "lease released, but the vGPU cannot be deleted: its instance is cleared instead; delete it with hypemanctl vgpu delete"
                ),
            }
        }
        let before = self.vgpu_view(&record).await;
        let mut after = record.clone();
        after.instance_id = None;
        after.lease = None;
        if let Err(e) = self.commit(Change::ReplaceVgpu(after.clone())).await {
            tracing::warn!(vgpu_id = %id, holder = %lease.describe(), error = %e, "releasing a vGPU lease did not finish");
            return;
        }
        tracing::info!(vgpu_id = %id, %instance, holder = %lease.describe(), %reason, "lease released: vGPU's instance cleared");
        let after = self.vgpu_view(&after).await;
        if let Some(p) = self.publisher() {
            p.vgpu_changed(&before, &after).await;
        }
    }

    /// `ListVgpus`: every vGPU record, by id.
    pub async fn list_vgpus(&self) -> Vec<Vgpu> {
        let records: Vec<StoredVgpu> = self.snapshot().vgpus().map(|v| (**v).clone()).collect();
        let mut out = Vec::with_capacity(records.len());
        for r in &records {
            out.push(self.vgpu_view(r).await);
        }
        out
    }

    /// The contract's record of a vGPU, with its nodes read now.
    async fn vgpu_view(&self, r: &StoredVgpu) -> Vgpu {
        let device_nodes = self
            .door
            .vfio_nodes(r.pci_address, r.mdev_uuid.as_deref())
            .await
            .unwrap_or_default();
        let lease = LeaseShown::of(r.lease.as_ref());
        Vgpu {
            id: r.id.clone(),
            profile: r.profile.clone(),
            type_id: r.type_id.clone(),
            framework: r.framework.clone(),
            parent_pci_address: r.parent_pci_address.to_string(),
            pci_address: r.pci_address.to_string(),
            mdev_uuid: r.mdev_uuid.clone(),
            device_nodes,
            instance_id: r.instance_id.clone(),
            created_at: r.created_at.clone(),
            state: if r.ready { "ready" } else { "creating" }.into(),
            holder_pid: lease.pid,
            holder_unit: lease.unit,
            holder_invocation: lease.invocation,
            on_release: lease.on_release,
        }
    }

    /// At start-up, before READY: every claim a crash left is resolved. What
    /// the host shows is kept and marked ready; anything else is undone
    /// (a type id left on the function by a write that was never verified
    /// is written back to 0 only if it is the claim's) and the claim goes.
    pub async fn reconcile_vgpus(&self) {
        let claims: Vec<StoredVgpu> = self
            .snapshot()
            .vgpus()
            .filter(|v| !v.ready)
            .map(|v| (**v).clone())
            .collect();
        for mut c in claims {
            let there = self
                .door
                .carried(c.pci_address, c.mdev_uuid.as_deref())
                .await;
            let keep = match (&there, &c.mdev_uuid) {
                (Ok(Carried::Type(t)), None) => t.to_string() == c.type_id,
                (Ok(Carried::Mdev), Some(_)) => true,
                _ => false,
            };
            let result = if keep {
                c.ready = true;
                tracing::info!(vgpu_id = %c.id, pci_address = %c.pci_address, "a vGPU claimed before a crash is on the host: kept");
                self.commit(Change::ReplaceVgpu(c.clone())).await
            } else {
                tracing::info!(vgpu_id = %c.id, pci_address = %c.pci_address, "a vGPU claimed before a crash is not on the host: its claim goes");
                self.commit(Change::RemoveVgpu(c.id.clone())).await
            };
            if let Err(e) = result {
                tracing::error!(vgpu_id = %c.id, error = %e, "cannot resolve a vGPU claim");
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
    use crate::host::Op as HostOp;

    fn a(s: &str) -> PciAddress {
        PciAddress::parse(s).unwrap()
    }

    fn req(profile: &str) -> VgpuRequest {
        VgpuRequest {
            profile: profile.into(),
            instance_id: Some("vm-1".into()),
            ..Default::default()
        }
    }

    /// A GPU of `fixture` registered as `gpu0` with `vfs` virtual functions.
    async fn gpu_with_vfs(fixture: &str, address: &str, vfs: u32) -> Fixture {
        let f = with_events(fixture, Duration::from_secs(10)).await;
        let gpu = f
            .service
            .register_at(address, "gpu0", Default::default())
            .await
            .unwrap();
        let t = f.service.resolve(&gpu.stored.id).unwrap();
        f.service.set_virtual_functions(&t, vfs).await.unwrap();
        f
    }

    async fn create(f: &Fixture, r: VgpuRequest) -> Result<Vgpu> {
        let plan = f.service.plan_vgpu(&r).await?;
        f.service.create_vgpu(plan, r, None).await
    }

    fn vgpu_writes(f: &Fixture) -> Vec<String> {
        f.sim
            .journal()
            .into_iter()
            .filter(|j| j.contains("vgpu_type") || j.contains("mdev"))
            .collect()
    }

    /// vendor-VFIO: the type id is written to a free function and read
    /// back; the record is ready and says what a VMM opens; when no
    /// function is left, the request is refused; Delete writes 0.
    #[tokio::test]
    async fn vendor_vfio_vgpus_are_made_and_deleted() {
        let f = gpu_with_vfs("l40s-vgpu.toml", "0000:41:00.0", 2).await;
        let v = create(&f, req("NVIDIA L40S-4Q")).await.unwrap();
        assert_eq!(
            (v.pci_address.as_str(), v.type_id.as_str(), v.state.as_str()),
            ("0000:41:00.4", "1152", "ready")
        );
        assert_eq!(v.framework, "vendor-vfio");
        assert_eq!(v.instance_id.as_deref(), Some("vm-1"));
        let group = f.sim_group("0000:41:00.4");
        assert_eq!(v.device_nodes, [format!("/dev/vfio/{group}")]);
        let w = create(&f, req("NVIDIA L40S-4Q")).await.unwrap();
        assert_eq!(w.pci_address, "0000:41:00.5");
        let e = create(&f, req("NVIDIA L40S-4Q")).await.unwrap_err();
        assert!(
            matches!(&e, Error::InvalidArgument(m) if m.contains("NVIDIA L40S-4Q")),
            "{e:?}"
        );
        assert_eq!(f.service.list_vgpus().await.len(), 2);
        f.service.delete_vgpu(&v.id).await.unwrap();
        assert_eq!(
            vgpu_writes(&f),
            [
                "set_vgpu_type 0000:41:00.4 1152",
                "set_vgpu_type 0000:41:00.5 1152",
                "set_vgpu_type 0000:41:00.4 0",
            ]
        );
        assert!(f.service.vgpu_record(&v.id).is_err());
        let e = f.service.delete_vgpu(&v.id).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{e:?}");
    }

    /// A read-back mismatch and a refused write each leave the function
    /// free and no record.
    #[tokio::test]
    async fn a_failed_vendor_write_is_undone() {
        let f = gpu_with_vfs("l40s-vgpu.toml", "0000:41:00.0", 1).await;
        for kind in [FaultKind::Mismatch, FaultKind::Errno(16)] {
            f.sim.clear_faults();
            f.sim.inject(Fault {
                op: HostOp::SetVgpuType,
                address: a("0000:41:00.4"),
                kind: kind.clone(),
            });
            let e = create(&f, req("NVIDIA L40S-2Q")).await.unwrap_err();
            assert!(
                matches!(&e, Error::Failed(m) if m.contains("0000:41:00.4")),
                "{kind}: {e:?}"
            );
            assert!(
                f.service.list_vgpus().await.is_empty(),
                "{kind}: the claim goes"
            );
        }
        assert_eq!(
            vgpu_writes(&f),
            [
                "set_vgpu_type 0000:41:00.4 1151",
                "set_vgpu_type 0000:41:00.4 0",
                "set_vgpu_type 0000:41:00.4 1151",
                "set_vgpu_type 0000:41:00.4 0",
            ]
        );
        f.sim.clear_faults();
        create(&f, req("NVIDIA L40S-2Q")).await.unwrap();
    }

    /// Another tool's vGPU, made on the function between the daemon's read
    /// and its write (the write is then refused), is not removed by the
    /// undo: only 0 over the daemon's own type, or over nothing, is written.
    #[tokio::test]
    async fn an_undo_never_removes_another_tools_vgpu() {
        let f = gpu_with_vfs("l40s-vgpu.toml", "0000:41:00.0", 1).await;
        f.sim.set_vgpu(a("0000:41:00.4"), "1152").unwrap();
        // The daemon's own attempt, as if it had read the function free.
        let e = f
            .service
            .door
            .make_vgpu(a("0000:41:00.4"), "1151", None)
            .await
            .unwrap_err();
        assert!(e.outcome.contains("carries type 1152, not ours"), "{e}");
        assert_eq!(
            vgpu_writes(&f),
            ["set_vgpu_type 0000:41:00.4 1151"],
            "no 0 written over the other's"
        );
    }

    /// mdev: a UUID is written to the type's create and the mdev is there;
    /// one that never appears is refused and nothing is left; Delete
    /// removes it; a held vGPU is not deleted.
    #[tokio::test]
    async fn mdev_vgpus_are_made_checked_and_deleted() {
        let f = gpu_with_vfs("a100-mdev.toml", "0000:82:00.0", 2).await;
        f.sim.inject(Fault {
            op: HostOp::CreateMdev,
            address: a("0000:82:00.4"),
            kind: FaultKind::Lost,
        });
        let e = create(&f, req("GRID A100-10C")).await.unwrap_err();
        assert!(
            matches!(&e, Error::Failed(m) if m.contains("did not appear")),
            "{e:?}"
        );
        assert!(f.service.list_vgpus().await.is_empty());
        f.sim.clear_faults();
        let v = create(&f, req("GRID A100-10C")).await.unwrap();
        let uuid = v.mdev_uuid.clone().expect("an mdev UUID");
        assert!(crate::host::vgpu::valid_uuid(&uuid));
        assert_eq!(v.framework, "mdev");
        f.sim.hold_node(&v.device_nodes[0], 4242, "qemu-system-x86");
        let e = f.service.delete_vgpu(&v.id).await.unwrap_err();
        assert!(
            matches!(&e, Error::HostInUse(m) if m.contains("4242 (qemu-system-x86)")),
            "{e:?}"
        );
        f.sim.hold_node(&v.device_nodes[0], 0, "");
        f.service.delete_vgpu(&v.id).await.unwrap();
        let writes = vgpu_writes(&f);
        assert_eq!(writes.len(), 3, "{writes:?}");
        assert!(
            writes[1].starts_with("create_mdev 0000:82:00.4 "),
            "{writes:?}"
        );
        assert!(
            writes[2].starts_with("remove_mdev 0000:82:00.4 1"),
            "{writes:?}"
        );
    }

    /// Placement: the least loaded GPU by framebuffer, and only on the NUMA
    /// node or parent asked for.
    #[tokio::test]
    async fn placement_is_the_least_loaded_gpu() {
        let dir = tempfile::tempdir().unwrap();
        let text =
            std::fs::read_to_string(super::super::testing::example("l40s-vgpu.toml")).unwrap();
        let second = text[text.find("[[device]]").unwrap()..]
            .replace("0000:41:00.0", "0000:c1:00.0")
            .replace("iommu_group = 30", "iommu_group = 130")
            .replace("numa_node = 0", "numa_node = 1");
        let path = dir.path().join("two.toml");
        std::fs::write(&path, format!("{text}\n{second}")).unwrap();
        let f = super::super::testing::service_on_events(&path, Duration::from_secs(10)).await;
        for (addr, name) in [("0000:41:00.0", "gpu-a"), ("0000:c1:00.0", "gpu-b")] {
            let g = f
                .service
                .register_at(addr, name, Default::default())
                .await
                .unwrap();
            let t = f.service.resolve(&g.stored.id).unwrap();
            f.service.set_virtual_functions(&t, 2).await.unwrap();
        }
        let first = create(&f, req("NVIDIA L40S-8Q")).await.unwrap();
        assert_eq!(
            first.parent_pci_address, "0000:41:00.0",
            "equal: the lower address"
        );
        let second = create(&f, req("NVIDIA L40S-8Q")).await.unwrap();
        assert_eq!(second.parent_pci_address, "0000:c1:00.0", "the less loaded");
        let mut on_a = req("NVIDIA L40S-8Q");
        on_a.parent = Some("gpu-a".into());
        assert_eq!(
            create(&f, on_a).await.unwrap().parent_pci_address,
            "0000:41:00.0"
        );
        let mut numa = req("NVIDIA L40S-8Q");
        numa.numa_node = Some(1);
        assert_eq!(
            create(&f, numa).await.unwrap().parent_pci_address,
            "0000:c1:00.0"
        );
        let mut nowhere = req("NVIDIA L40S-8Q");
        nowhere.numa_node = Some(7);
        assert!(create(&f, nowhere).await.is_err());
    }

    /// At start-up a claim is kept when the host shows it and dropped when
    /// it does not.
    #[tokio::test]
    async fn claims_are_resolved_at_start_up() {
        let f = gpu_with_vfs("l40s-vgpu.toml", "0000:41:00.0", 2).await;
        let claim = |vf: &str| StoredVgpu {
            id: new_device_id(),
            profile: "NVIDIA L40S-4Q".into(),
            type_id: "1152".into(),
            framework: "vendor-vfio".into(),
            parent_pci_address: a("0000:41:00.0"),
            pci_address: a(vf),
            mdev_uuid: None,
            instance_id: None,
            created_at: now_rfc3339(),
            ready: false,
            lease: None,
        };
        let written = claim("0000:41:00.4");
        let unwritten = claim("0000:41:00.5");
        f.service
            .commit(Change::AddVgpu(written.clone()))
            .await
            .unwrap();
        f.service
            .commit(Change::AddVgpu(unwritten.clone()))
            .await
            .unwrap();
        f.sim.set_vgpu(a("0000:41:00.4"), "1152").unwrap();
        f.service.reconcile_vgpus().await;
        assert!(f.service.vgpu_record(&written.id).unwrap().ready);
        assert!(f.service.vgpu_record(&unwritten.id).is_err());
    }
}
