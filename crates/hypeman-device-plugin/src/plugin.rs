//! The DevicePlugin service of one resource: the device list (streamed as it
//! changes), the preferred allocation (one NUMA node, IOMMU groups kept
//! together), and Allocate (bind through hypemand, all or nothing; for a
//! vGPU resource, make the vGPUs, all or nothing: see [`crate::vgpu`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use tonic::{Request, Response, Status};

use crate::api::deviceplugin as dp;
use crate::api::deviceplugin::device_plugin_server::DevicePlugin;
use crate::config::Iommufd;
use crate::node::{Node, NodeDevice, View};
use crate::vgpu::Slot;

pub struct Plugin {
    pub resource: String,
    pub node: Arc<Node>,
}

fn health(healthy: bool) -> String {
    if healthy { "Healthy" } else { "Unhealthy" }.into()
}

impl Plugin {
    fn mine(&self, view: &View) -> Vec<NodeDevice> {
        view.devices
            .iter()
            .filter(|d| d.resource == self.resource)
            .cloned()
            .collect()
    }

    fn my_slots(&self, view: &View) -> Vec<Slot> {
        view.slots
            .iter()
            .filter(|s| s.resource == self.resource)
            .cloned()
            .collect()
    }

    /// *(issue 26)* The profile, when this resource is a vGPU profile's.
    fn profile(&self) -> Option<&str> {
        self.node.config.vgpu_profile(&self.resource)
    }

    /// The list the kubelet gets: devices by PCI address, or vGPU slots
    /// (no topology: the parent is hypemand's choice at Allocate).
    pub fn devices(&self, view: &View) -> Vec<dp::Device> {
        if self.profile().is_some() {
            return self
                .my_slots(view)
                .into_iter()
                .map(|s| dp::Device {
                    id: s.id,
                    health: health(s.healthy),
                    topology: None,
                })
                .collect();
        }
        self.mine(view)
            .into_iter()
            .map(|d| dp::Device {
                id: d.pci_address.clone(),
                health: health(d.healthy),
                topology: d.numa_node.map(|n| dp::TopologyInfo {
                    nodes: vec![dp::NumaNode { id: n }],
                }),
            })
            .collect()
    }
}

/// A preferred allocation: `must` first, then, on the NUMA node that can give
/// the most, whole IOMMU groups before single functions.
pub fn prefer(
    devices: &[NodeDevice],
    available: &[String],
    must: &[String],
    size: usize,
) -> Vec<String> {
    let by_addr: HashMap<&str, &NodeDevice> = devices
        .iter()
        .map(|d| (d.pci_address.as_str(), d))
        .collect();
    let mut chosen: Vec<String> = must.iter().take(size).cloned().collect();
    let avail: Vec<&NodeDevice> = available
        .iter()
        .filter(|a| !chosen.contains(a))
        .filter_map(|a| by_addr.get(a.as_str()).copied())
        .collect();
    // Groups among the available devices, by NUMA node.
    let mut groups: BTreeMap<(Option<i64>, Option<i64>), Vec<&NodeDevice>> = BTreeMap::new();
    for d in &avail {
        let key = (
            d.numa_node,
            d.iommu_group.or(Some(-1 - groups.len() as i64)),
        );
        groups.entry(key).or_default().push(d);
    }
    let mut per_numa: BTreeMap<Option<i64>, usize> = BTreeMap::new();
    for d in &avail {
        *per_numa.entry(d.numa_node).or_default() += 1;
    }
    // The NUMA node of the must-include devices, else the one with the most.
    let must_numa: BTreeSet<Option<i64>> = chosen
        .iter()
        .filter_map(|a| by_addr.get(a.as_str()).map(|d| d.numa_node))
        .collect();
    let mut order: Vec<Option<i64>> = per_numa.keys().copied().collect();
    order.sort_by_key(|n| (!must_numa.contains(n), std::cmp::Reverse(per_numa[n])));
    for numa in order {
        let mut gs: Vec<&Vec<&NodeDevice>> = groups
            .iter()
            .filter(|((n, _), _)| *n == numa)
            .map(|(_, g)| g)
            .collect();
        // Groups that fit whole first, larger first.
        gs.sort_by_key(|g| std::cmp::Reverse(g.len()));
        for g in &gs {
            if chosen.len() + g.len() <= size {
                chosen.extend(g.iter().map(|d| d.pci_address.clone()));
            }
        }
        for g in gs {
            for d in g {
                if chosen.len() < size && !chosen.contains(&d.pci_address) {
                    chosen.push(d.pci_address.clone());
                }
            }
        }
    }
    chosen.truncate(size);
    chosen
}

type DeviceStream = Pin<Box<dyn Stream<Item = Result<dp::ListAndWatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl DevicePlugin for Plugin {
    async fn get_device_plugin_options(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<dp::DevicePluginOptions>, Status> {
        Ok(Response::new(options()))
    }

    type ListAndWatchStream = DeviceStream;

    async fn list_and_watch(
        &self,
        _: Request<dp::Empty>,
    ) -> Result<Response<Self::ListAndWatchStream>, Status> {
        let mut rx = self.node.subscribe();
        let me = Plugin {
            resource: self.resource.clone(),
            node: self.node.clone(),
        };
        let stream = async_stream(move |tx| async move {
            let mut last = None;
            loop {
                let list = me.devices(&rx.borrow_and_update().clone());
                if last.as_ref() != Some(&list) {
                    let msg = dp::ListAndWatchResponse {
                        devices: list.clone(),
                    };
                    if tx.send(Ok(msg)).await.is_err() {
                        return; // the kubelet went away
                    }
                    last = Some(list);
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn get_preferred_allocation(
        &self,
        request: Request<dp::PreferredAllocationRequest>,
    ) -> Result<Response<dp::PreferredAllocationResponse>, Status> {
        let mine = self.mine(&self.node.current());
        let vgpus = self.profile().is_some();
        let container_responses = request
            .into_inner()
            .container_requests
            .into_iter()
            .map(|c| {
                let size = usize::try_from(c.allocation_size).unwrap_or(0);
                let device_i_ds = if vgpus {
                    // Slots are alike: the kubelet's own order.
                    let mut ids = c.must_include_device_i_ds;
                    ids.extend(c.available_device_i_ds);
                    let mut seen = BTreeSet::new();
                    ids.retain(|id| seen.insert(id.clone()));
                    ids.truncate(size);
                    ids
                } else {
                    prefer(
                        &mine,
                        &c.available_device_i_ds,
                        &c.must_include_device_i_ds,
                        size,
                    )
                };
                dp::ContainerPreferredAllocationResponse { device_i_ds }
            })
            .collect();
        Ok(Response::new(dp::PreferredAllocationResponse {
            container_responses,
        }))
    }

    async fn allocate(
        &self,
        request: Request<dp::AllocateRequest>,
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let mut requests = request.into_inner().container_requests;
        if let Some(profile) = self.profile() {
            return self.allocate_vgpus(profile, &mut requests).await;
        }
        // Read now: the kubelet's view may be a moment old.
        self.node.refresh().await;
        let snapshot = self.node.current();
        check_ids(&mut requests, self.mine(&snapshot).len(), &self.resource).map_err(|e| *e)?;
        let mut bound_here: Vec<String> = Vec::new();
        let mut responses = Vec::new();
        for c in &requests {
            match self
                .allocate_one(&snapshot.devices, &c.devices_ids, &mut bound_here)
                .await
            {
                Ok(r) => responses.push(r),
                Err(status) => {
                    // All or nothing: give back what this call bound.
                    for id in bound_here.iter().rev() {
                        if let Err(e) = self.node.client.unbind(id).await {
                            tracing::error!(device_id = %id, error = %e, "cannot undo a bind after a failed Allocate");
                        }
                    }
                    tracing::warn!(resource = %self.resource, error = %status.message(), "Allocate refused");
                    return Err(status);
                }
            }
        }
        tracing::info!(resource = %self.resource, containers = responses.len(), "allocated");
        Ok(Response::new(dp::AllocateResponse {
            container_responses: responses,
        }))
    }

    async fn pre_start_container(
        &self,
        _: Request<dp::PreStartContainerRequest>,
    ) -> Result<Response<dp::PreStartContainerResponse>, Status> {
        Ok(Response::new(dp::PreStartContainerResponse {}))
    }
}

/// Bounds what the kubelet asks for before anything is bound: each id once
/// (a duplicate, within a container or across them, is dropped: one device
/// cannot be given twice, and 100,000 copies of one id are one bind, not
/// 100,000), then no more ids than the resource has devices.
pub fn check_ids(
    requests: &mut [dp::ContainerAllocateRequest],
    devices: usize,
    resource: &str,
) -> Result<(), Box<Status>> {
    let mut seen = BTreeSet::new();
    for c in requests.iter_mut() {
        c.devices_ids.retain(|id| seen.insert(id.clone()));
    }
    if seen.len() > devices {
        return Err(Box::new(Status::invalid_argument(format!(
            "Allocate asks for {} {resource} devices; this node has {devices}",
            seen.len()
        ))));
    }
    Ok(())
}

impl Plugin {
    async fn allocate_one(
        &self,
        snapshot: &[NodeDevice],
        ids: &[String],
        bound_here: &mut Vec<String>,
    ) -> Result<dp::ContainerAllocateResponse, Status> {
        let mut groups = BTreeSet::new();
        let mut cdevs: Vec<String> = Vec::new();
        for addr in ids {
            let d = snapshot
                .iter()
                .find(|d| &d.pci_address == addr && d.resource == self.resource)
                .ok_or_else(|| {
                    Status::not_found(format!("{addr} is not a {} device here", self.resource))
                })?;
            if !d.healthy {
                return Err(Status::failed_precondition(format!(
                    "{addr} is not healthy (unplugged, failed, in use by the host, or attached outside Kubernetes)"
                )));
            }
            // A VM holding one function of an IOMMU group reaches them all.
            if let Some(sibling) = snapshot.iter().find(|s| {
                s.pci_address != d.pci_address
                    && s.iommu_group.is_some()
                    && s.iommu_group == d.iommu_group
                    && s.attached_to.is_some()
            }) {
                return Err(Status::failed_precondition(format!(
                    "{addr} shares IOMMU group {} with {}, attached to {}",
                    d.iommu_group.unwrap_or_default(),
                    sibling.pci_address,
                    sibling.attached_to.as_deref().unwrap_or_default()
                )));
            }
            // The cdev appears only once a vfio driver has the function:
            // the record Bind answers says it.
            let vfio_devices =
                if d.bound_to_vfio {
                    d.vfio_devices.clone()
                } else {
                    let bound =
                        self.node.client.bind(&d.id).await.map_err(|e| {
                            Status::failed_precondition(format!("binding {addr}: {e}"))
                        })?;
                    bound_here.push(d.id.clone());
                    bound.vfio_devices
                };
            let group = d
                .iommu_group
                .ok_or_else(|| Status::failed_precondition(format!("{addr} has no IOMMU group")))?;
            let cdev = vfio_devices
                .iter()
                .find(|n| n.starts_with("/dev/vfio/devices/"))
                .filter(|_| self.node.config.iommufd != Iommufd::Never);
            if cdev.is_none() || self.node.config.iommufd == Iommufd::Auto {
                groups.insert(group);
            }
            if let Some(c) = cdev {
                cdevs.push(c.clone());
            }
        }
        let mut devices = Vec::new();
        if !groups.is_empty() {
            devices.push(spec(crate::VFIO_CONTAINER));
            devices.extend(groups.iter().map(|g| spec(&format!("/dev/vfio/{g}"))));
        }
        if !cdevs.is_empty() {
            devices.push(spec(crate::IOMMU_DEVICE));
            devices.extend(cdevs.iter().map(|c| spec(c)));
        }
        let envs = HashMap::from([(crate::pci_resource_env(&self.resource), ids.join(","))]);
        Ok(dp::ContainerAllocateResponse {
            envs,
            devices,
            ..Default::default()
        })
    }
}

impl Plugin {
    /// *(issue 26)* Allocate on a vGPU resource: each slot asked gets its
    /// vGPU (made now with the slot in its instance id, or the one already
    /// made for it); on any failure the vGPUs made in this call are deleted.
    async fn allocate_vgpus(
        &self,
        profile: &str,
        requests: &mut [dp::ContainerAllocateRequest],
    ) -> Result<Response<dp::AllocateResponse>, Status> {
        let _one = self.node.allocating.lock().await;
        self.node.refresh().await;
        let slots = self.my_slots(&self.node.current());
        check_ids(requests, slots.len(), &self.resource).map_err(|e| *e)?;
        let asked: Vec<String> = requests
            .iter()
            .flat_map(|c| c.devices_ids.iter().cloned())
            .collect();
        {
            let mut t = self.node.teardown.lock().unwrap_or_else(|e| e.into_inner());
            asked.iter().for_each(|s| t.allocating(s));
        }
        let mut made_here: Vec<String> = Vec::new();
        let result = self
            .make_vgpus(profile, &slots, requests, &mut made_here)
            .await;
        {
            let mut t = self.node.teardown.lock().unwrap_or_else(|e| e.into_inner());
            asked.iter().for_each(|s| t.answered(s, result.is_ok()));
        }
        match result {
            Ok(container_responses) => {
                tracing::info!(resource = %self.resource, made = made_here.len(), slots = asked.len(), "vGPUs allocated");
                Ok(Response::new(dp::AllocateResponse {
                    container_responses,
                }))
            }
            Err(status) => {
                for id in made_here.iter().rev() {
                    if let Err(e) = self.node.client.delete_vgpu(id).await {
                        tracing::error!(vgpu_id = %id, error = %e, "cannot delete a vGPU after a failed Allocate");
                    }
                }
                tracing::warn!(resource = %self.resource, error = %status.message(), "Allocate refused");
                Err(status)
            }
        }
    }

    async fn make_vgpus(
        &self,
        profile: &str,
        slots: &[Slot],
        requests: &[dp::ContainerAllocateRequest],
        made_here: &mut Vec<String>,
    ) -> Result<Vec<dp::ContainerAllocateResponse>, Status> {
        let mut out = Vec::new();
        for c in requests {
            let mut vgpus = Vec::new();
            for id in &c.devices_ids {
                let slot = slots.iter().find(|s| &s.id == id).ok_or_else(|| {
                    Status::not_found(format!("{id} is not a {} slot here", self.resource))
                })?;
                if let Some(v) = &slot.vgpu {
                    if !slot.healthy {
                        return Err(Status::failed_precondition(format!(
                            "{id}'s vGPU {} is {}, not ready (see `hypemanctl vgpu list`)",
                            v.id, v.state
                        )));
                    }
                    vgpus.push(v.clone());
                    continue;
                }
                let req = hypeman_api::VgpuRequest {
                    profile: profile.to_string(),
                    instance_id: Some(crate::vgpu::instance_for(id)),
                    ..Default::default()
                };
                let v = self.node.client.create_vgpu(&req).await.map_err(|e| {
                    Status::failed_precondition(format!("making a {profile} vGPU for {id}: {e}"))
                })?;
                made_here.push(v.id.clone());
                vgpus.push(v);
            }
            out.push(crate::vgpu::response(&self.resource, &vgpus));
        }
        Ok(out)
    }
}

/// A device node given read-write at the same path.
pub fn spec(path: &str) -> dp::DeviceSpec {
    dp::DeviceSpec {
        container_path: path.into(),
        host_path: path.into(),
        permissions: "rw".into(),
    }
}

pub fn options() -> dp::DevicePluginOptions {
    dp::DevicePluginOptions {
        pre_start_required: false,
        get_preferred_allocation_available: true,
    }
}

/// A stream fed by a task through a bounded channel (the task ends when the
/// receiver goes).
fn async_stream<F, Fut>(f: F) -> DeviceStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<dp::ListAndWatchResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// *(issue 24)* Duplicates are dropped, within and across containers, and
    /// more ids than the resource has are refused before anything is bound.
    #[test]
    fn allocate_ids_are_bounded_and_unique() {
        let req = |ids: &[&str]| dp::ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        };
        let mut r = vec![req(&["a", "a", "b"]), req(&["b", "c", "a"])];
        check_ids(&mut r, 6, "hypeman.io/gpu").unwrap();
        assert_eq!(r[0].devices_ids, ["a", "b"]);
        assert_eq!(r[1].devices_ids, ["c"]);
        let mut copies = vec![req(&vec!["a"; 100_000])];
        check_ids(&mut copies, 1, "hypeman.io/gpu").unwrap();
        assert_eq!(copies[0].devices_ids, ["a"]);
        let ids: Vec<String> = (0..4).map(|i| format!("0000:0{i}:00.0")).collect();
        let mut four = vec![dp::ContainerAllocateRequest { devices_ids: ids }];
        let e = check_ids(&mut four, 3, "hypeman.io/gpu").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("asks for 4"), "{}", e.message());
    }

    fn dev(addr: &str, numa: i64, group: i64) -> NodeDevice {
        NodeDevice {
            id: addr.into(),
            pci_address: addr.into(),
            resource: "hypeman.io/gpu".into(),
            healthy: true,
            numa_node: Some(numa),
            iommu_group: Some(group),
            attached_to: None,
            bound_to_vfio: false,
            vfio_devices: Vec::new(),
        }
    }

    #[test]
    fn one_numa_node_and_whole_groups() {
        let devs = vec![
            dev("a", 0, 1),
            dev("b", 1, 2),
            dev("c", 1, 2),
            dev("d", 1, 3),
            dev("e", 0, 4),
        ];
        let all: Vec<String> = devs.iter().map(|d| d.pci_address.clone()).collect();
        // Node 1 has three; group 2 (b, c) is kept together.
        assert_eq!(prefer(&devs, &all, &[], 2), ["b", "c"]);
        assert_eq!(prefer(&devs, &all, &[], 3), ["b", "c", "d"]);
        // A must-include device on node 0 pulls the choice there.
        assert_eq!(prefer(&devs, &all, &["a".into()], 2), ["a", "e"]);
    }
}
