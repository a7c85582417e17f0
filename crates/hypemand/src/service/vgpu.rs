//! *(issue 26)* vGPUs: which registered GPUs offer which types now
//! (`ListVgpuTypes`), and the host's GPU capacity in Hypeman's shape
//! (`GpuResources`).
//!
//! The rules:
//! - only registered parents count, present, a GPU, with no hard blocker
//!   (no IOMMU, a bridge); their driver keeps them, so the host's use of
//!   them blocks nothing here;
//! - what is creatable is what the driver lists now; NVIDIA's rules (one
//!   framebuffer size per GPU unless in mixed mode) are never re-implemented;
//! - a count is conservative: sibling functions share the GPU's framebuffer,
//!   so a type offered by N free functions is counted at most as many times
//!   as the framebuffer left holds it, and at least once when the driver
//!   lists it (that much it proves). The framebuffer a GPU has is known from
//!   mdev's `max_instance` × `framebuffer`, or, for vendor-VFIO, as the
//!   largest type its functions offer while it carries no vGPU (remembered
//!   per GPU); while it is unknown, a listed type counts once.

use std::collections::{BTreeMap, HashMap};

use hypeman_api::gpu::{GpuDevice, GpuProfile, GpuResources, VgpuType as ApiType};

use super::error::{host_error, Result};
use super::Service;
use crate::host::vgpu::{Framework, Slot};
use crate::host::HostDevice;
use crate::pci::DeviceType;

/// What is known of one GPU's framebuffer, learned from its driver's lists.
#[derive(Debug, Clone, Default)]
pub struct Capacity {
    /// The GPU's framebuffer in MiB.
    total_mb: Option<u64>,
    /// Each type id's framebuffer in MiB, as last listed.
    type_mb: HashMap<String, u64>,
}

/// A registered GPU that offers vGPUs, as read now.
pub(super) struct Parent {
    pub(super) host: HostDevice,
    slots: Vec<Slot>,
}

/// One type on one parent, counted.
pub(super) struct Counted {
    pub(super) framework: Framework,
    pub(super) id: String,
    pub(super) name: String,
    framebuffer_mb: Option<u64>,
    pub(super) available: u64,
}

impl Parent {
    /// Learns what the lists say of the GPU's framebuffer.
    fn learn(&self, known: &mut Capacity) {
        for t in self.slots.iter().flat_map(|s| &s.creatable) {
            if let Some(fb) = t.framebuffer_mb {
                known.type_mb.insert(t.id.clone(), fb);
                if let Some(max) = t.max_instances {
                    let total = fb.saturating_mul(u64::from(max));
                    known.total_mb = Some(known.total_mb.map_or(total, |k| k.max(total)));
                }
            }
        }
        let vendor = self
            .slots
            .iter()
            .any(|s| s.framework == Framework::VendorVfio);
        if vendor && !self.slots.iter().any(Slot::used) {
            // Empty, every size the GPU holds is listed: the largest is it all.
            let largest = self
                .slots
                .iter()
                .flat_map(|s| &s.creatable)
                .filter_map(|t| t.framebuffer_mb)
                .max();
            if largest.is_some() {
                known.total_mb = largest;
            }
        }
    }

    /// The framebuffer its vGPUs take, if every one of them is known.
    pub(super) fn used_mb(&self, known: &Capacity) -> Option<u64> {
        let mut sum = 0u64;
        for s in &self.slots {
            if let Some(id) = s.current {
                sum += known.type_mb.get(&id.to_string())?;
            }
            for m in &s.mdevs {
                sum += known.type_mb.get(&m.type_id)?;
            }
        }
        Some(sum)
    }

    /// Every type offered on it, counted conservatively.
    pub(super) fn counted(&self, known: &Capacity) -> Vec<Counted> {
        let free_mb = match (known.total_mb, self.used_mb(known)) {
            (Some(t), Some(u)) => Some(t.saturating_sub(u)),
            _ => None,
        };
        let mut by_id: BTreeMap<(Framework, String), Counted> = BTreeMap::new();
        for s in &self.slots {
            for t in &s.creatable {
                let c = by_id
                    .entry((s.framework, t.id.clone()))
                    .or_insert_with(|| Counted {
                        framework: s.framework,
                        id: t.id.clone(),
                        name: t.name.clone(),
                        framebuffer_mb: t.framebuffer_mb,
                        available: 0,
                    });
                // A vendor-VFIO function that carries a vGPU offers nothing
                // more, whatever its list says.
                if s.framework == Framework::Mdev || s.current.is_none() {
                    c.available += u64::from(t.available);
                }
            }
        }
        by_id
            .into_values()
            .map(|mut c| {
                if c.available > 0 {
                    let cap = match (free_mb, c.framebuffer_mb) {
                        (Some(free), Some(fb)) if fb > 0 => free / fb,
                        _ => 1,
                    };
                    c.available = c.available.min(cap).max(1);
                }
                c
            })
            .collect()
    }
}

impl Service {
    /// The registered GPUs that offer vGPUs, read now (their slots by one
    /// read each), and what is known of their framebuffer, updated.
    pub(super) async fn vgpu_parents(&self) -> Result<Vec<(Parent, Capacity)>> {
        let vm = self.door.virtual_machine().await.unwrap_or(false);
        let mut out = Vec::new();
        let mut views = self.list().await?;
        views.sort_by_key(|v| v.stored.pci_address);
        for view in views {
            let Some(host) = view.live.clone() else {
                continue;
            };
            if view.stored.kind != DeviceType::Gpu
                || super::blockers::hard_refusal(&host, vm).is_some()
            {
                continue;
            }
            let slots = self.door.vgpu_slots(&host).await.map_err(|e| {
                host_error(format!("cannot read the vGPU types of {}", host.address), e)
            })?;
            if slots.is_empty() {
                continue;
            }
            let parent = Parent { host, slots };
            let known = {
                let mut all = self.vgpu_capacity.lock().unwrap_or_else(|p| p.into_inner());
                let known = all.entry(parent.host.address).or_default();
                parent.learn(known);
                known.clone()
            };
            out.push((parent, known));
        }
        Ok(out)
    }

    /// The `vgpus` blocker of `dev` when its functions carry vGPUs now.
    pub(crate) async fn vgpus_blocker(
        &self,
        dev: &HostDevice,
    ) -> Result<Option<super::blockers::Blocker>> {
        let slots = self
            .door
            .vgpu_slots(dev)
            .await
            .map_err(|e| host_error(format!("cannot read the vGPUs of {}", dev.address), e))?;
        Ok(super::blockers::vgpus(dev.address, &slots))
    }

    /// `ListVgpuTypes`: one entry per registered parent and type it offers
    /// now, by parent address, each parent's in its driver's order.
    pub async fn list_vgpu_types(&self) -> Result<Vec<ApiType>> {
        let mut out = Vec::new();
        for (p, known) in self.vgpu_parents().await? {
            for c in p.counted(&known) {
                out.push(ApiType {
                    parent: p.host.address.to_string(),
                    framework: c.framework.as_str().to_string(),
                    type_id: c.id,
                    name: c.name,
                    framebuffer_mb: c.framebuffer_mb.map_or(0, |f| f as i64),
                    available: c.available as i64,
                });
            }
        }
        Ok(out)
    }

    /// `GpuResources` (`GET /resources/gpu`): the host's GPU capacity as
    /// Hypeman's `GPUResourceStatus`.
    pub async fn gpu_resources(&self) -> Result<GpuResources> {
        let parents = self.vgpu_parents().await?;
        if parents.is_empty() {
            return self.passthrough_resources().await;
        }
        let (mut total, mut used) = (0i64, 0i64);
        let mut profiles: BTreeMap<String, GpuProfile> = BTreeMap::new();
        for (p, known) in &parents {
            total += p.slots.len() as i64;
            used += p.slots.iter().filter(|s| s.used()).count() as i64;
            for c in p.counted(known) {
                let e = profiles
                    .entry(c.name.clone())
                    .or_insert_with(|| GpuProfile {
                        name: c.name.clone(),
                        framebuffer_mb: c.framebuffer_mb.map_or(0, |f| f as i64),
                        available: 0,
                    });
                e.available += c.available as i64;
            }
        }
        Ok(GpuResources {
            mode: "vgpu".into(),
            total_slots: total,
            used_slots: used,
            profiles: Some(profiles.into_values().collect()),
            devices: None,
        })
    }

    /// Passthrough mode: every registered GPU, available unless attached.
    async fn passthrough_resources(&self) -> Result<GpuResources> {
        let gpus: Vec<GpuDevice> = self
            .list()
            .await?
            .into_iter()
            .filter(|v| v.stored.kind == DeviceType::Gpu && v.present())
            .map(|v| GpuDevice {
                name: if v.device_name.is_empty() {
                    v.stored.name.clone()
                } else {
                    v.device_name.clone()
                },
                available: v.stored.attached_to.is_none(),
            })
            .collect();
        Ok(GpuResources {
            mode: "passthrough".into(),
            total_slots: gpus.len() as i64,
            used_slots: gpus.iter().filter(|g| !g.available).count() as i64,
            profiles: None,
            devices: Some(gpus),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::testing::with_events;
    use super::*;
    use crate::host::Host;
    use crate::pci::PciAddress;
    use hypeman_api::Error;

    fn a(s: &str) -> PciAddress {
        PciAddress::parse(s).unwrap()
    }

    fn counts(types: &[ApiType]) -> Vec<(&str, i64)> {
        types
            .iter()
            .map(|t| (t.name.as_str(), t.available))
            .collect()
    }

    /// vendor-VFIO: four free functions of a 48 GB L40S each offer every
    /// type, counted no more than the framebuffer holds; one 4Q vGPU leaves
    /// only 4 GB types on the others (the driver's lists), counted within
    /// the 44 GB left.
    #[tokio::test]
    async fn vendor_vfio_types_are_counted_conservatively() {
        let f = with_events("l40s-vgpu.toml", Duration::from_secs(10)).await;
        let gpu = f
            .service
            .register_at("0000:41:00.0", "l40s", Default::default())
            .await
            .unwrap();
        // No virtual functions yet: nothing offers vGPUs, passthrough mode.
        assert!(f.service.list_vgpu_types().await.unwrap().is_empty());
        let r = f.service.gpu_resources().await.unwrap();
        assert_eq!((r.mode.as_str(), r.total_slots), ("passthrough", 1));
        let target = f.service.resolve(&gpu.stored.id).unwrap();
        f.service.set_virtual_functions(&target, 4).await.unwrap();
        let types = f.service.list_vgpu_types().await.unwrap();
        assert!(types
            .iter()
            .all(|t| t.parent == "0000:41:00.0" && t.framework == "vendor-vfio"));
        assert_eq!(
            counts(&types),
            [
                ("NVIDIA L40S-1Q", 4),
                ("NVIDIA L40S-2Q", 4),
                ("NVIDIA L40S-4Q", 4),
                ("NVIDIA L40S-8Q", 4),
                ("NVIDIA L40S-24Q", 2),
                ("NVIDIA L40S-48Q", 1),
                ("NVIDIA L40S-2B", 4),
            ]
        );
        assert_eq!(types[2].type_id, "1152");
        assert_eq!(types[2].framebuffer_mb, 4096);

        f.sim.set_vgpu(a("0000:41:00.4"), "1152").unwrap();
        let types = f.service.list_vgpu_types().await.unwrap();
        assert_eq!(counts(&types), [("NVIDIA L40S-4Q", 3)]);
        let r = f.service.gpu_resources().await.unwrap();
        assert_eq!(
            (r.mode.as_str(), r.total_slots, r.used_slots),
            ("vgpu", 4, 1)
        );
        let p = r.profiles.unwrap();
        assert_eq!(
            (p[0].name.as_str(), p[0].framebuffer_mb, p[0].available),
            ("NVIDIA L40S-4Q", 4096, 3)
        );
    }

    /// A daemon that first sees a GPU already carrying vGPUs does not know
    /// its framebuffer: a listed type counts once, what the driver proves;
    /// known, it counts what the framebuffer left holds.
    #[test]
    fn an_unknown_framebuffer_counts_a_listed_type_once() {
        use crate::host::vgpu::VgpuType as HostType;
        let two_q = HostType {
            id: "1151".into(),
            name: "NVIDIA L40S-2Q".into(),
            framebuffer_mb: Some(2048),
            available: 1,
            max_instances: None,
        };
        let slot = |f: &str, current: Option<u32>| Slot {
            address: a(f),
            framework: Framework::VendorVfio,
            current,
            mdevs: Vec::new(),
            creatable: if current.is_some() {
                Vec::new()
            } else {
                vec![two_q.clone()]
            },
        };
        let parent = Parent {
            host: HostDevice {
                address: a("0000:41:00.0"),
                device: 0x26b9,
                driver: Some("nvidia".into()),
                iommu_group: Some(30),
                ..HostDevice::example()
            },
            slots: vec![
                slot("0000:41:00.4", Some(1151)),
                slot("0000:41:00.5", None),
                slot("0000:41:00.6", None),
            ],
        };
        let mut known = Capacity::default();
        parent.learn(&mut known);
        assert_eq!(
            known.total_mb, None,
            "a GPU carrying a vGPU does not show its size"
        );
        let c = parent.counted(&known);
        assert_eq!((c.len(), c[0].available), (1, 1));
        known.total_mb = Some(49152);
        assert_eq!(parent.counted(&known)[0].available, 2);
        // Full but still listed by the driver: once.
        known.total_mb = Some(2048);
        assert_eq!(parent.counted(&known)[0].available, 1);
    }

    /// A GPU that carries vGPUs keeps its virtual functions and its
    /// registration, and shows why (`vgpus`, naming them); once they are
    /// gone, both changes go through.
    #[tokio::test]
    async fn a_parent_with_vgpus_keeps_its_functions_and_registration() {
        let f = with_events("a100-mdev.toml", Duration::from_secs(10)).await;
        let gpu = f
            .service
            .register_at("0000:82:00.0", "a100", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&gpu.stored.id).unwrap();
        f.service.set_virtual_functions(&target, 2).await.unwrap();
        f.sim.set_vgpu(a("0000:82:00.5"), "nvidia-473").unwrap();
        let e = f.sim.set_vgpu(a("0000:82:00.4"), "nvidia-470").unwrap_err();
        assert!(e.contains("cannot be made"), "equal-size mode: {e}");
        let blockers = f.service.device_blockers(&gpu.stored.id).await.unwrap();
        let b = blockers.iter().find(|b| b.code == "vgpus").expect("vgpus");
        assert!(
            b.message
                .contains("0000:82:00.5 (mdev 5e5e5e5e-0000-4000-8000-000000000001)"),
            "{}",
            b.message
        );
        let e = f.service.vfs_refused(&target, 0).await;
        assert!(
            matches!(&e, Error::InUse(m) if m.contains("carries 1 vGPUs")),
            "{e:?}"
        );
        let e = f.service.delete(&target).await.unwrap_err();
        assert!(matches!(&e, Error::InUse(_)), "{e:?}");
        assert_eq!(
            f.sim.device(a("0000:82:00.5")).unwrap().unwrap().physfn,
            Some(a("0000:82:00.0"))
        );
        f.sim.set_vgpu(a("0000:82:00.5"), "").unwrap();
        f.service.set_virtual_functions(&target, 0).await.unwrap();
        f.service.delete(&target).await.unwrap();
    }

    /// mdev: each function's types with available_instances, the GPU's
    /// framebuffer from max_instance × framebuffer.
    #[tokio::test]
    async fn mdev_types_are_read_with_their_descriptions() {
        let f = with_events("a100-mdev.toml", Duration::from_secs(10)).await;
        let gpu = f
            .service
            .register_at("0000:82:00.0", "a100", Default::default())
            .await
            .unwrap();
        let target = f.service.resolve(&gpu.stored.id).unwrap();
        f.service.set_virtual_functions(&target, 4).await.unwrap();
        let types = f.service.list_vgpu_types().await.unwrap();
        assert!(types.iter().all(|t| t.framework == "mdev"));
        assert_eq!(
            counts(&types),
            [
                ("GRID A100-4C", 4),
                ("GRID A100-5C", 4),
                ("GRID A100-8C", 4),
                ("GRID A100-10C", 4),
                ("GRID A100-20C", 2),
                ("GRID A100-40C", 1),
            ]
        );
        assert_eq!(types[0].type_id, "nvidia-470");
        let r = f.service.gpu_resources().await.unwrap();
        assert_eq!(
            (r.mode.as_str(), r.total_slots, r.used_slots),
            ("vgpu", 4, 0)
        );
    }
}
