//! *(issue 26)* vGPU profiles as resources.
//!
//! The kubelet wants device IDs before anything is allocated, and a vGPU is
//! made only when a pod asks for one. So a profile's resource lists *slots*:
//! - one per vGPU the plugin made for a pod, its slot written in the vGPU's
//!   instance id (`k8s-vgpu:<slot>`), so the mapping lives in hypemand's
//!   journal and survives the plugin's restarts;
//! - then as many free slots as hypemand says the profile has room for now:
//!   the sum over parents of `ListVgpuTypes`' `available`, which is already
//!   conservative (sibling functions share the framebuffer).
//!
//! Allocate makes a vGPU for each free slot it is given (placement, the
//! least-loaded parent, is hypemand's), and answers its device nodes and the
//! variable KubeVirt reads. A vGPU whose slot no pod holds is deleted, but only
//! after two PodResources reads in a row that began after its Allocate had
//! answered: the kubelet records a pod's devices only once Allocate returns,
//! so a read in between must not take the vGPU away.

use std::collections::{BTreeSet, HashMap};

use hypeman_api::gpu::{MDEV, VENDOR_VFIO};
use hypeman_api::{Vgpu, VgpuType};

use crate::api::deviceplugin as dp;
use crate::config::Config;

/// The instance id of a vGPU the plugin made: this, then its slot.
pub const INSTANCE_PREFIX: &str = "k8s-vgpu:";

/// At most this many slots per resource, whatever hypemand says.
pub const SLOTS_MAX: usize = 1024;

/// A slot of a vGPU resource: a device ID the kubelet sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// The kubelet's device ID: the resource name (`/` as `_`), `-`, a number.
    pub id: String,
    /// The resource it belongs to.
    pub resource: String,
    /// The profile a vGPU made for it has.
    pub profile: String,
    /// The vGPU made for it, if any.
    pub vgpu: Option<Vgpu>,
    /// Free, or carrying a ready vGPU; false while hypemand does not answer.
    pub healthy: bool,
}

/// The slot IDs of `resource` start with this.
fn slot_prefix(resource: &str) -> String {
    format!("{}-", resource.replace('/', "_"))
}

/// The instance id a vGPU made for `slot` carries.
pub fn instance_for(slot: &str) -> String {
    format!("{INSTANCE_PREFIX}{slot}")
}

/// The slot a vGPU was made for, if the plugin made it for `resource`.
fn slot_of<'a>(v: &'a Vgpu, resource: &str) -> Option<&'a str> {
    let slot = v.instance_id.as_deref()?.strip_prefix(INSTANCE_PREFIX)?;
    let n = slot.strip_prefix(&slot_prefix(resource))?;
    (!n.is_empty() && n.len() <= 4 && n.bytes().all(|b| b.is_ascii_digit())).then_some(slot)
}

/// The slots of every configured profile, by resource, then held before free.
pub fn slots(config: &Config, types: &[VgpuType], vgpus: &[Vgpu]) -> Vec<Slot> {
    let mut out = Vec::new();
    for rule in &config.vgpus {
        let resource = rule.resource();
        let mut held: Vec<Slot> = Vec::new();
        for v in vgpus.iter().filter(|v| v.profile == rule.profile) {
            let Some(id) = slot_of(v, &resource) else {
                continue;
            };
            if held.len() < SLOTS_MAX && !held.iter().any(|s| s.id == id) {
                held.push(Slot {
                    id: id.to_string(),
                    resource: resource.clone(),
                    profile: rule.profile.clone(),
                    healthy: v.state == "ready",
                    vgpu: Some(v.clone()),
                });
            }
        }
        held.sort_by(|a, b| a.id.cmp(&b.id));
        let room: i64 = types
            .iter()
            .filter(|t| t.name == rule.profile)
            .map(|t| t.available.max(0))
            .fold(0i64, |a, b| a.saturating_add(b));
        let free = usize::try_from(room)
            .unwrap_or(usize::MAX)
            .min(SLOTS_MAX - held.len());
        let prefix = slot_prefix(&resource);
        let mut made = 0;
        let mut n = 0usize;
        let mut free_slots = Vec::with_capacity(free);
        while made < free {
            let id = format!("{prefix}{n}");
            n += 1;
            if held.iter().any(|s| s.id == id) {
                continue;
            }
            free_slots.push(Slot {
                id,
                resource: resource.clone(),
                profile: rule.profile.clone(),
                vgpu: None,
                healthy: true,
            });
            made += 1;
        }
        out.extend(held);
        out.extend(free_slots);
    }
    out
}

/// The GPUs whose profiles are offered as vGPU resources (they offer one, or
/// carry a vGPU of one): not offered whole as well.
pub fn parents(config: &Config, types: &[VgpuType], vgpus: &[Vgpu]) -> BTreeSet<String> {
    let named = |p: &str| config.vgpus.iter().any(|r| r.profile == p);
    types
        .iter()
        .filter(|t| named(&t.name))
        .map(|t| t.parent.clone())
        .chain(
            vgpus
                .iter()
                .filter(|v| named(&v.profile))
                .map(|v| v.parent_pci_address.clone()),
        )
        .collect()
}

/// What a container is given for its vGPUs: their device nodes (with
/// `/dev/vfio/vfio` beside group nodes and `/dev/iommu` beside VFIO cdevs,
/// which a VMM opens with them), and KubeVirt's variables:
/// `PCI_RESOURCE_<NAME>` with the virtual functions' addresses
/// (vendor-VFIO), `MDEV_PCI_RESOURCE_<NAME>` with the mdevs' UUIDs.
pub fn response(resource: &str, vgpus: &[Vgpu]) -> dp::ContainerAllocateResponse {
    let mut nodes: Vec<String> = Vec::new();
    let mut add = |n: &str| {
        if !nodes.iter().any(|x| x == n) {
            nodes.push(n.to_string());
        }
    };
    let all: Vec<&String> = vgpus.iter().flat_map(|v| &v.device_nodes).collect();
    if all.iter().any(|n| !n.starts_with("/dev/vfio/devices/")) {
        add(crate::VFIO_CONTAINER);
    }
    if all.iter().any(|n| n.starts_with("/dev/vfio/devices/")) {
        add(crate::IOMMU_DEVICE);
    }
    for n in all {
        add(n);
    }
    let joined = |framework: &str, f: fn(&Vgpu) -> Option<&str>| {
        let v: Vec<&str> = vgpus
            .iter()
            .filter(|v| v.framework == framework)
            .filter_map(f)
            .collect();
        (!v.is_empty()).then(|| v.join(","))
    };
    let mut envs = HashMap::new();
    if let Some(a) = joined(VENDOR_VFIO, |v| Some(v.pci_address.as_str())) {
        envs.insert(crate::pci_resource_env(resource), a);
    }
    if let Some(u) = joined(MDEV, |v| v.mdev_uuid.as_deref()) {
        envs.insert(crate::mdev_resource_env(resource), u);
    }
    dp::ContainerAllocateResponse {
        envs,
        devices: nodes.iter().map(|n| crate::plugin::spec(n)).collect(),
        ..Default::default()
    }
}

/// When a slot's Allocate began and answered, counted in PodResources reads.
#[derive(Debug, Default)]
pub struct Teardown {
    /// Reads begun so far.
    reads: u64,
    /// Per slot: the reads begun when its Allocate answered (`u64::MAX`
    /// while it runs). A read counts against a slot's vGPU only if it began
    /// later.
    answered_at: HashMap<String, u64>,
    /// Per vGPU id: counting reads in a row that showed no pod holding it.
    unheld: HashMap<String, u32>,
}

impl Teardown {
    /// A PodResources read begins: its number.
    pub fn read_begins(&mut self) -> u64 {
        self.reads += 1;
        self.reads
    }

    /// An Allocate of `slot` begins.
    pub fn allocating(&mut self, slot: &str) {
        self.answered_at.insert(slot.to_string(), u64::MAX);
    }

    /// The Allocate of `slot` answered: `ok` whether it made the vGPU.
    pub fn answered(&mut self, slot: &str, ok: bool) {
        if ok {
            self.answered_at.insert(slot.to_string(), self.reads);
        } else {
            self.answered_at.remove(slot);
        }
    }

    /// After read number `read` showed the slots in `held`: the vGPUs to
    /// delete now (unheld in two counting reads in a row).
    pub fn after_read(&mut self, read: u64, slots: &[Slot], held: &BTreeSet<String>) -> Vec<Vgpu> {
        let mut out = Vec::new();
        let made: Vec<(&Slot, &Vgpu)> = slots
            .iter()
            .filter_map(|s| s.vgpu.as_ref().map(|v| (s, v)))
            .collect();
        self.unheld
            .retain(|id, _| made.iter().any(|(_, v)| &v.id == id));
        self.answered_at
            .retain(|slot, at| *at == u64::MAX || made.iter().any(|(s, _)| &s.id == slot));
        for (s, v) in made {
            let counts = read > self.answered_at.get(&s.id).copied().unwrap_or(0);
            if held.contains(&s.id) || !counts {
                self.unheld.remove(&v.id);
                continue;
            }
            let n = self.unheld.entry(v.id.clone()).or_default();
            *n += 1;
            if *n >= 2 {
                out.push(v.clone());
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse("[[vgpu]]\nprofile = \"NVIDIA L40S-4Q\"\n", "t").unwrap()
    }

    fn ty(parent: &str, name: &str, available: i64) -> VgpuType {
        VgpuType {
            parent: parent.into(),
            framework: VENDOR_VFIO.into(),
            type_id: "1152".into(),
            name: name.into(),
            framebuffer_mb: 4096,
            available,
        }
    }

    fn made(id: &str, slot: &str) -> Vgpu {
        Vgpu {
            id: id.into(),
            profile: "NVIDIA L40S-4Q".into(),
            framework: VENDOR_VFIO.into(),
            parent_pci_address: "0000:41:00.0".into(),
            pci_address: "0000:41:00.4".into(),
            device_nodes: vec!["/dev/vfio/90".into()],
            instance_id: Some(instance_for(slot)),
            state: "ready".into(),
            ..Default::default()
        }
    }

    const R: &str = "hypeman.io_vgpu-nvidia-l40s-4q";

    #[test]
    fn held_slots_then_room_summed_over_parents() {
        let types = [
            ty("0000:41:00.0", "NVIDIA L40S-4Q", 2),
            ty("0000:42:00.0", "NVIDIA L40S-4Q", 1),
            ty("0000:41:00.0", "NVIDIA L40S-8Q", 5),
        ];
        let vgpus = [
            made("a", &format!("{R}-1")),
            // Not the plugin's: another instance, another resource, a
            // number that is not one.
            Vgpu {
                instance_id: Some("vm-1".into()),
                ..made("b", "x")
            },
            made("c", "hypeman.io_other-0"),
            made("d", &format!("{R}-+1")),
        ];
        let s = slots(&config(), &types, &vgpus);
        let ids: Vec<&str> = s.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                format!("{R}-1"),
                format!("{R}-0"),
                format!("{R}-2"),
                format!("{R}-3")
            ]
        );
        assert_eq!(s[0].vgpu.as_ref().unwrap().id, "a");
        assert!(s[1..].iter().all(|s| s.vgpu.is_none() && s.healthy));
        assert_eq!(
            parents(&config(), &types, &vgpus)
                .into_iter()
                .collect::<Vec<_>>(),
            ["0000:41:00.0", "0000:42:00.0"]
        );
        let huge = [ty("0000:41:00.0", "NVIDIA L40S-4Q", i64::MAX)];
        assert_eq!(slots(&config(), &huge, &[]).len(), SLOTS_MAX);
    }

    #[test]
    fn the_response_has_the_nodes_and_kubevirts_variables() {
        let vf = made("a", "s-0");
        let md = Vgpu {
            framework: MDEV.into(),
            mdev_uuid: Some("8d1b7e0a-0000-4000-8000-000000000001".into()),
            device_nodes: vec!["/dev/vfio/devices/vfio3".into()],
            ..made("b", "s-1")
        };
        let r = response("hypeman.io/x", &[vf.clone(), md]);
        let paths: Vec<&str> = r.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/dev/vfio/vfio",
                "/dev/iommu",
                "/dev/vfio/90",
                "/dev/vfio/devices/vfio3"
            ]
        );
        assert_eq!(r.envs["PCI_RESOURCE_HYPEMAN_IO_X"], "0000:41:00.4");
        assert_eq!(
            r.envs["MDEV_PCI_RESOURCE_HYPEMAN_IO_X"],
            "8d1b7e0a-0000-4000-8000-000000000001"
        );
        let only = response("hypeman.io/x", &[vf]);
        assert_eq!(only.envs.len(), 1);
        assert_eq!(only.devices.len(), 2);
    }

    /// A read that began before the Allocate answered never counts; two
    /// counting reads in a row without the pod delete; a read showing the
    /// pod starts the count again.
    #[test]
    fn the_window_between_allocate_and_the_kubelets_record() {
        let slot = format!("{R}-0");
        let s = vec![Slot {
            id: slot.clone(),
            resource: "r".into(),
            profile: "p".into(),
            vgpu: Some(made("a", &slot)),
            healthy: true,
        }];
        let none = BTreeSet::new();
        let held: BTreeSet<String> = [slot.clone()].into();
        let mut t = Teardown::default();
        let early = t.read_begins();
        t.allocating(&slot);
        let during = t.read_begins();
        assert!(t.after_read(during, &s, &none).is_empty());
        t.answered(&slot, true);
        assert!(t.after_read(early, &s, &none).is_empty());
        let r = t.read_begins();
        assert!(
            t.after_read(r, &s, &none).is_empty(),
            "one read is not enough"
        );
        let r = t.read_begins();
        assert!(t.after_read(r, &s, &held).is_empty());
        let r = t.read_begins();
        assert!(t.after_read(r, &s, &none).is_empty(), "held in between");
        let r = t.read_begins();
        assert_eq!(t.after_read(r, &s, &none).len(), 1);
    }
}
