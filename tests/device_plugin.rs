//! *(issue 17)* `hypeman-device-plugin` against a kubelet stand-in: the
//! Registration and PodResources servers, written here from the published
//! API (the generated types are the plugin crate's, from its .proto files),
//! calling the plugin as the kubelet does. hypemand runs `--simulate` on the
//! workstation host, on a private bus.

use crate::common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use hypeman_device_plugin::api::deviceplugin as dp;
use hypeman_device_plugin::api::deviceplugin::device_plugin_client::DevicePluginClient;
use hypeman_device_plugin::api::deviceplugin::registration_server::{
    Registration, RegistrationServer,
};
use hypeman_device_plugin::api::podresources as pr;
use hypeman_device_plugin::api::podresources::pod_resources_lister_server::{
    PodResourcesLister, PodResourcesListerServer,
};
use hypeman_device_plugin::kubelet::channel;
use hypeman_device_plugin::socket_name;
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

struct Kubelet(mpsc::UnboundedSender<dp::RegisterRequest>);

#[tonic::async_trait]
impl Registration for Kubelet {
    async fn register(
        &self,
        r: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let _ = self.0.send(r.into_inner());
        Ok(Response::new(dp::Empty {}))
    }
}

#[derive(Clone, Default)]
struct Pods(Arc<Mutex<Vec<pr::PodResources>>>);

#[tonic::async_trait]
impl PodResourcesLister for Pods {
    async fn list(
        &self,
        _: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: self.0.lock().unwrap().clone(),
        }))
    }
}

/// Serves the stand-in's Registration on `dir/kubelet.sock` until aborted.
fn kubelet(
    dir: &Path,
    tx: mpsc::UnboundedSender<dp::RegisterRequest>,
) -> tokio::task::JoinHandle<()> {
    let sock = dir.join("kubelet.sock");
    let _ = std::fs::remove_file(&sock);
    let listener = tokio::net::UnixListener::bind(&sock).unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(RegistrationServer::new(Kubelet(tx)))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    })
}

/// Serves `lister` as the kubelet's PodResources on `sock` until aborted.
fn pod_resources<L: PodResourcesLister>(sock: &Path, lister: L) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(sock).unwrap();
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(lister))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    })
}

/// The plugin on `bus`, for the kubelet in `dir`, reading pods from
/// `pods_sock` every 0.1 s. Under umask 0, so the sockets' mode is the
/// plugin's own doing.
fn start_plugin(bus: &TestBus, dir: &Path, pods_sock: &Path, config: &Path) -> Proc {
    let mut cmd = std::process::Command::new(bin("hypeman-device-plugin"));
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    Proc {
        child: cmd
            .arg(format!("--bus={}", bus.address))
            .arg("--kubelet-dir")
            .arg(dir)
            .arg("--pod-resources")
            .arg(pods_sock)
            .args(["--pod-resources-interval", "0.1"])
            .arg("--config")
            .arg(config)
            .spawn()
            .unwrap(),
    }
}

/// A safety net only (as `wait_until`'s): a hung plugin fails the test
/// instead of hanging it. No assertion is about time.
async fn next<T>(f: impl std::future::Future<Output = Option<T>>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("nothing arrived")
        .expect("the stream ended")
}

/// An Allocate of one device for one container, as the kubelet sends it.
fn one(pci_address: &str) -> dp::AllocateRequest {
    dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: vec![pci_address.into()],
        }],
    }
}

/// The next message of a ListAndWatch stream.
async fn msg(s: &mut tonic::Streaming<dp::ListAndWatchResponse>) -> dp::ListAndWatchResponse {
    next(async { s.message().await.ok().flatten() }).await
}

fn devices(list: &dp::ListAndWatchResponse) -> Vec<(String, String, Option<i64>)> {
    list.devices
        .iter()
        .map(|d| {
            (
                d.id.clone(),
                d.health.clone(),
                d.topology
                    .as_ref()
                    .and_then(|t| t.nodes.first())
                    .map(|n| n.id),
            )
        })
        .collect()
}

fn attached(bus: &TestBus, name: &str) -> Option<String> {
    let got = bus.manager("Get", &["s", name]).unwrap();
    got[0]["attached_to"]["data"].as_str().map(str::to_string)
}

fn sockets(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("hypeman-"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_kubelet_sees_hypemands_devices() {
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let mut daemon = Some(Daemon::simulate(&bus, state.path(), "workstation.toml"));
    for (addr, name) in [
        ("0000:00:02.0", "igpu"),
        ("0000:01:00.0", "rtx"),
        ("0000:01:00.1", "rtx-audio"),
        ("0000:06:00.0", "nic2"),
    ] {
        bus.manager("Register", &["ss", addr, name]).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join("device-plugins");
    std::fs::create_dir(&dir).unwrap();
    let config = work.path().join("plugin.toml");
    std::fs::write(
        &config,
        "[[resource]]\nname = \"hypeman.io/nic\"\nselector = \"8086:15f3\"\n\n[[resource]]\nname = \"hypeman.io/gpu\"\nselector = \"10de:*\"\n",
    )
    .unwrap();
    let pods = Pods::default();
    let pods_sock = work.path().join("pod-resources.sock");
    let _pods_server = pod_resources(&pods_sock, pods.clone());
    let (tx, mut registered) = mpsc::unbounded_channel();
    let first_kubelet = kubelet(&dir, tx.clone());
    let mut plugin = start_plugin(&bus, &dir, &pods_sock, &config);

    // Registration: one socket per resource, the fields the kubelet reads.
    let mut regs = Vec::new();
    for _ in 0..3 {
        regs.push(next(registered.recv()).await);
    }
    regs.sort_by(|a, b| a.resource_name.cmp(&b.resource_name));
    let names: Vec<&str> = regs.iter().map(|r| r.resource_name.as_str()).collect();
    assert_eq!(
        names,
        ["hypeman.io/gpu", "hypeman.io/nic", "hypeman.io/pci"]
    );
    for r in &regs {
        assert_eq!(r.version, "v1beta1");
        assert_eq!(r.endpoint, socket_name(&r.resource_name));
        let o = r.options.unwrap();
        assert!(o.get_preferred_allocation_available && !o.pre_start_required);
        assert!(dir.join(&r.endpoint).exists());
        // *(issue 24)* 0600 whatever the umask (was 0777 under umask 0).
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join(&r.endpoint))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: {mode:o}", r.endpoint);
    }
    let client = |resource: &str| {
        let sock: PathBuf = dir.join(socket_name(resource));
        async move { DevicePluginClient::new(channel(&sock).await.unwrap()) }
    };

    // ListAndWatch: the first list, then the unplug as it happens.
    let mut gpu = client("hypeman.io/gpu").await;
    let mut gpus = gpu.list_and_watch(dp::Empty {}).await.unwrap().into_inner();
    let first = msg(&mut gpus).await;
    assert_eq!(
        devices(&first),
        [
            ("0000:00:02.0".into(), "Unhealthy".into(), None),
            ("0000:01:00.0".into(), "Healthy".into(), Some(0)),
            ("0000:01:00.1".into(), "Healthy".into(), None),
        ]
    );
    let mut nic = client("hypeman.io/nic").await;
    let mut nics = nic.list_and_watch(dp::Empty {}).await.unwrap().into_inner();
    assert_eq!(
        devices(&msg(&mut nics).await),
        [("0000:06:00.0".into(), "Healthy".into(), None)]
    );
    bus.sim("Unplug", &["s", "0000:06:00.0"]);
    assert_eq!(
        devices(&msg(&mut nics).await),
        [("0000:06:00.0".into(), "Unhealthy".into(), None)]
    );
    bus.sim("Plug", &["s", "0000:06:00.0"]);
    assert_eq!(
        devices(&msg(&mut nics).await),
        [("0000:06:00.0".into(), "Healthy".into(), None)]
    );
    // *(issue 29)* A fatal PCIe error and the kernel's failed recovery:
    // hypemand judges the device failed, and the kubelet hears Unhealthy;
    // its counters reset and recovered, Healthy again.
    bus.sim("SetAerCounters", &["sttt", "0000:06:00.0", "0", "0", "1"]);
    bus.sim(
        "RecoveryEvent",
        &["ssb", "0000:06:00.0", "FAILED_RECOVERY", "false"],
    );
    assert_eq!(
        devices(&msg(&mut nics).await),
        [("0000:06:00.0".into(), "Unhealthy".into(), None)]
    );
    bus.sim("SetAerCounters", &["sttt", "0000:06:00.0", "0", "0", "0"]);
    bus.sim(
        "RecoveryEvent",
        &["ssb", "0000:06:00.0", "SUCCESSFUL_RECOVERY", "true"],
    );
    assert_eq!(
        devices(&msg(&mut nics).await),
        [("0000:06:00.0".into(), "Healthy".into(), None)]
    );

    // Allocate: bound through hypemand, the exact response.
    let got = nic
        .allocate(one("0000:06:00.0"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        got,
        one_container(
            ("PCI_RESOURCE_HYPEMAN_IO_NIC", "0000:06:00.0"),
            &["/dev/vfio/vfio", "/dev/vfio/6"]
        )
    );
    assert_eq!(bus.host_driver("0000:06:00.0").as_deref(), Some("vfio-pci"));

    // *(issue 24)* The kubelet's list is not trusted: an id given five times
    // is allocated once (the env named it five times), and more ids than
    // the resource has devices are refused before anything is bound.
    let five = dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: vec!["0000:01:00.1".into(); 5],
        }],
    };
    let got = gpu.allocate(five).await.unwrap().into_inner();
    assert_eq!(
        got.container_responses[0].envs["PCI_RESOURCE_HYPEMAN_IO_GPU"],
        "0000:01:00.1"
    );
    assert_eq!(
        got,
        one_container(
            ("PCI_RESOURCE_HYPEMAN_IO_GPU", "0000:01:00.1"),
            &["/dev/vfio/vfio", "/dev/vfio/1"]
        )
    );
    let binds = |bus: &TestBus| {
        bus.writes()
            .iter()
            .filter(|w| w.contains("0000:01:00.1") && w.contains("bind"))
            .count()
    };
    let before = binds(&bus);
    let many = dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest {
            devices_ids: (0..100).map(|i| format!("0000:01:00.{i}")).collect(),
        }],
    };
    let err = gpu.allocate(many).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("asks for 100"), "{err}");
    assert_eq!(bus.host_driver("0000:01:00.0").as_deref(), Some("nvidia"));
    assert_eq!(binds(&bus), before);

    // Refused: a device the host uses (the boot display), and a device whose
    // IOMMU group sibling is attached to another instance. Nothing is bound.
    let err = gpu.allocate(one("0000:00:02.0")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert_eq!(bus.host_driver("0000:00:02.0").as_deref(), Some("i915"));
    bus.manager("Bind", &["s", "rtx"]).unwrap();
    bus.manager("Attach", &["ss", "rtx-audio", "vm-other"])
        .unwrap();
    let err = gpu.allocate(one("0000:01:00.0")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("0000:01:00.1"), "{err}");

    // Pods: a device a pod holds is attached to it; gone with the pod.
    *pods.0.lock().unwrap() = vec![pr::PodResources {
        name: "vm-pod".into(),
        namespace: "default".into(),
        containers: vec![pr::ContainerResources {
            name: "compute".into(),
            devices: vec![pr::ContainerDevices {
                resource_name: "hypeman.io/nic".into(),
                device_ids: vec!["0000:06:00.0".into()],
                topology: None,
            }],
        }],
    }];
    wait_until(|| attached(&bus, "nic2").as_deref() == Some("k8s:default/vm-pod"));
    pods.0.lock().unwrap().clear();
    wait_until(|| attached(&bus, "nic2").is_none());

    // hypemand restarts: the devices stay listed (Unhealthy if the plugin
    // saw it gone), and its signals are followed again afterwards: an unplug
    // and a plug after the restart both reach the kubelet.
    drop(daemon.take());
    wait_name(&bus, NAME, false, None);
    daemon = Some(Daemon::simulate(&bus, state.path(), "workstation.toml"));
    let nic2 = |health: &str| vec![("0000:06:00.0".to_string(), health.to_string(), None)];
    bus.sim("Unplug", &["s", "0000:06:00.0"]);
    while devices(&msg(&mut nics).await) != nic2("Unhealthy") {}
    bus.sim("Plug", &["s", "0000:06:00.0"]);
    loop {
        let list = devices(&msg(&mut nics).await);
        if list == nic2("Healthy") {
            break;
        }
        assert_eq!(list, nic2("Unhealthy"));
    }
    assert!(daemon.is_some());

    // A kubelet restart: its socket re-created, the plugins' removed.
    first_kubelet.abort();
    for s in sockets(&dir) {
        // The plugin may already be replacing the others once the first goes.
        match std::fs::remove_file(dir.join(s)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => panic!("{e}"),
            _ => {}
        }
    }
    let _second_kubelet = kubelet(&dir, tx);
    let mut again: Vec<String> = Vec::new();
    for _ in 0..3 {
        again.push(next(registered.recv()).await.resource_name);
    }
    again.sort();
    assert_eq!(
        again,
        ["hypeman.io/gpu", "hypeman.io/nic", "hypeman.io/pci"]
    );
    wait_until(|| sockets(&dir).len() == 3);

    // Stopping leaves no socket behind.
    let status = plugin.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
    assert_eq!(sockets(&dir), Vec::<String>::new());
}

/// *(issue 26)* A PodResources stand-in that answers one List per permit
/// and says when each arrives: the test decides how far the plugin's reads
/// go, and a List arriving means the read before it was acted on.
#[derive(Clone)]
struct GatedPods {
    pods: Pods,
    permits: Arc<tokio::sync::Semaphore>,
    arrived: mpsc::UnboundedSender<()>,
}

#[tonic::async_trait]
impl PodResourcesLister for GatedPods {
    async fn list(
        &self,
        r: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        let _ = self.arrived.send(());
        self.permits
            .acquire()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .forget();
        self.pods.list(r).await
    }
}

/// hypemand's vGPUs, as `hypemanctl --json vgpu list` gives them.
fn vgpu_list(bus: &TestBus) -> Vec<serde_json::Value> {
    let out = bus.hypemanctl(&["--json", "vgpu", "list"]);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// The answer for one container: one variable and these nodes, rw.
fn one_container((name, value): (&str, &str), nodes: &[&str]) -> dp::AllocateResponse {
    dp::AllocateResponse {
        container_responses: vec![dp::ContainerAllocateResponse {
            envs: [(name.to_string(), value.to_string())].into(),
            mounts: vec![],
            devices: nodes
                .iter()
                .map(|p| dp::DeviceSpec {
                    container_path: p.to_string(),
                    host_path: p.to_string(),
                    permissions: "rw".into(),
                })
                .collect(),
            annotations: Default::default(),
            cdi_devices: vec![],
        }],
    }
}

/// A pod whose one container holds `ids` of `resource`.
fn pod(resource: &str, ids: &[&str]) -> pr::PodResources {
    pr::PodResources {
        name: "vgpu-pod".into(),
        namespace: "default".into(),
        containers: vec![pr::ContainerResources {
            name: "compute".into(),
            devices: vec![pr::ContainerDevices {
                resource_name: resource.into(),
                device_ids: ids.iter().map(|s| s.to_string()).collect(),
                topology: None,
            }],
        }],
    }
}

/// A plugin serving `profile` from a GPU of `fixture_name` with two virtual
/// functions, its PodResources gated: the bus, the daemon, the plugin, the
/// gate, and a client of the profile's resource.
struct VgpuNode {
    bus: TestBus,
    _state: tempfile::TempDir,
    _daemon: Daemon,
    _work: tempfile::TempDir,
    plugin: Proc,
    pods: Pods,
    permits: Arc<tokio::sync::Semaphore>,
    arrived: mpsc::UnboundedReceiver<()>,
    registered: Vec<String>,
    dir: PathBuf,
    _servers: [tokio::task::JoinHandle<()>; 2],
}

impl VgpuNode {
    async fn start(fixture_name: &str, gpu: &str, profile: &str) -> VgpuNode {
        let Sim { bus, state, daemon } = Sim::start(fixture_name);
        bus.manager("Register", &["ss", gpu, "gpu0"]).unwrap();
        let out = bus.hypemanctl(&["sriov", "gpu0", "2"]);
        assert!(out.status.success(), "{out:?}");
        let work = tempfile::tempdir().unwrap();
        let dir = work.path().join("device-plugins");
        std::fs::create_dir(&dir).unwrap();
        let config = work.path().join("plugin.toml");
        std::fs::write(
            &config,
            format!(
                "[[resource]]\nname = \"hypeman.io/gpu\"\nselector = \"10de:*\"\n\n[[vgpu]]\nprofile = \"{profile}\"\n"
            ),
        )
        .unwrap();
        let pods = Pods::default();
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let (arrived_tx, arrived) = mpsc::unbounded_channel();
        let pods_sock = work.path().join("pod-resources.sock");
        let pods_server = pod_resources(
            &pods_sock,
            GatedPods {
                pods: pods.clone(),
                permits: permits.clone(),
                arrived: arrived_tx,
            },
        );
        let (tx, mut reg) = mpsc::unbounded_channel();
        let kubelet_server = kubelet(&dir, tx);
        let plugin = start_plugin(&bus, &dir, &pods_sock, &config);
        let mut registered = Vec::new();
        for _ in 0..3 {
            registered.push(next(reg.recv()).await.resource_name);
        }
        registered.sort();
        VgpuNode {
            bus,
            _state: state,
            _daemon: daemon,
            _work: work,
            plugin,
            pods,
            permits,
            arrived,
            registered,
            dir,
            _servers: [pods_server, kubelet_server],
        }
    }

    async fn client(&self, resource: &str) -> DevicePluginClient<tonic::transport::Channel> {
        DevicePluginClient::new(
            channel(&self.dir.join(socket_name(resource)))
                .await
                .unwrap(),
        )
    }

    /// Lets the plugin's waiting PodResources read answer `pods`, and waits
    /// until the plugin has acted on it (its next read arrives).
    async fn read(&mut self, pods: Vec<pr::PodResources>) {
        *self.pods.0.lock().unwrap() = pods;
        self.permits.add_permits(1);
        next(self.arrived.recv()).await;
    }
}

/// *(issue 26)* A vGPU profile is a resource of slots. Allocate makes the
/// vGPU through hypemand (the slot in its instance id) and answers its nodes
/// and the variable KubeVirt reads; all or nothing; the vGPU is deleted only
/// after two PodResources reads without its pod that began after the
/// Allocate answered, never while a pod lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn vgpu_profiles_are_slots_made_at_allocate_and_deleted_with_the_pod() {
    const R: &str = "hypeman.io/vgpu-nvidia-l40s-4q";
    let slot = |n: u32| format!("hypeman.io_vgpu-nvidia-l40s-4q-{n}");
    let mut node = VgpuNode::start("l40s-vgpu.toml", "0000:41:00.0", "NVIDIA L40S-4Q").await;
    assert_eq!(node.registered, ["hypeman.io/gpu", "hypeman.io/pci", R]);
    // The plugin's first read waits at the gate from here on.
    next(node.arrived.recv()).await;

    // The GPU carries the profile's slots and is not offered whole.
    let mut gpu = node.client("hypeman.io/gpu").await;
    let mut whole = gpu.list_and_watch(dp::Empty {}).await.unwrap().into_inner();
    assert_eq!(devices(&msg(&mut whole).await), []);
    let mut vgpu = node.client(R).await;
    let mut slots = vgpu
        .list_and_watch(dp::Empty {})
        .await
        .unwrap()
        .into_inner();
    let healthy = |ids: &[String]| {
        ids.iter()
            .map(|id| (id.clone(), "Healthy".to_string(), None))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        devices(&msg(&mut slots).await),
        healthy(&[slot(0), slot(1)])
    );

    // More slots than there are, and a slot that is not one: refused, and
    // nothing made.
    let ask = |ids: Vec<String>| dp::AllocateRequest {
        container_requests: vec![dp::ContainerAllocateRequest { devices_ids: ids }],
    };
    let err = vgpu
        .allocate(ask(vec![slot(0), slot(1), slot(2)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = vgpu.allocate(ask(vec![slot(7)])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err}");
    assert_eq!(vgpu_list(&node.bus), Vec::<serde_json::Value>::new());

    // All or nothing: the second vGPU's write fails, the first is deleted.
    node.bus.inject("set_vgpu_type", "0000:41:00.5", "EBUSY");
    let err = vgpu
        .allocate(ask(vec![slot(0), slot(1)]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains(&slot(1)), "{err}");
    assert_eq!(vgpu_list(&node.bus), Vec::<serde_json::Value>::new());
    node.bus.clear_faults();

    // Allocate while a read is under way (it began before the answer).
    let got = vgpu
        .allocate(ask(vec![slot(0)]))
        .await
        .unwrap()
        .into_inner();
    let made = vgpu_list(&node.bus);
    assert_eq!(made.len(), 1, "{made:?}");
    let v = &made[0];
    assert_eq!(v["instance_id"], format!("k8s-vgpu:{}", slot(0)), "{v}");
    assert_eq!(v["pci_address"], "0000:41:00.4", "{v}");
    let group = v["device_nodes"][0].as_str().unwrap();
    assert!(
        group.starts_with("/dev/vfio/") && group[10..].parse::<u32>().is_ok(),
        "{v}"
    );
    assert_eq!(
        got,
        one_container(
            (
                "PCI_RESOURCE_HYPEMAN_IO_VGPU-NVIDIA-L40S-4Q",
                "0000:41:00.4"
            ),
            &["/dev/vfio/vfio", group]
        )
    );
    // The kubelet allocating the same slot again (a container restart)
    // gets the same vGPU, not a second one.
    let again = vgpu
        .allocate(ask(vec![slot(0)]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again, got);
    assert_eq!(vgpu_list(&node.bus).len(), 1);

    let id = v["id"].as_str().unwrap().to_string();
    let alive = |node: &VgpuNode| vgpu_list(&node.bus).iter().any(|v| v["id"] == id);
    // The read that began before the answer does not count, nor does one
    // read alone.
    node.read(vec![]).await;
    assert!(
        alive(&node),
        "a read begun before Allocate answered counted"
    );
    node.read(vec![]).await;
    assert!(alive(&node), "one read without the pod deleted it");
    // The pod lists it: kept, and the count starts again.
    node.read(vec![pod(R, &[&slot(0)])]).await;
    node.read(vec![pod(R, &[&slot(0)])]).await;
    assert!(alive(&node));
    node.read(vec![]).await;
    assert!(alive(&node), "the count did not start again");
    node.read(vec![]).await;
    assert_eq!(vgpu_list(&node.bus), Vec::<serde_json::Value>::new());

    let status = node.plugin.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
}

/// *(issue 26)* An mdev profile: the vGPU's UUID in KubeVirt's
/// `MDEV_PCI_RESOURCE_` variable, its node beside the container node.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_mdev_profile_answers_its_uuid() {
    const R: &str = "hypeman.io/vgpu-grid-a100-4c";
    let mut node = VgpuNode::start("a100-mdev.toml", "0000:82:00.0", "GRID A100-4C").await;
    assert_eq!(node.registered, ["hypeman.io/gpu", "hypeman.io/pci", R]);
    next(node.arrived.recv()).await;
    let mut vgpu = node.client(R).await;
    let got = vgpu
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec!["hypeman.io_vgpu-grid-a100-4c-0".into()],
            }],
        })
        .await
        .unwrap()
        .into_inner();
    let made = vgpu_list(&node.bus);
    assert_eq!(made.len(), 1, "{made:?}");
    let uuid = made[0]["mdev_uuid"].as_str().unwrap();
    let mut nodes = vec!["/dev/vfio/vfio"];
    nodes.extend(
        made[0]["device_nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n.as_str().unwrap()),
    );
    assert_eq!(
        got,
        one_container(
            ("MDEV_PCI_RESOURCE_HYPEMAN_IO_VGPU-GRID-A100-4C", uuid),
            &nodes
        )
    );
    node.read(vec![]).await;
    node.read(vec![]).await;
    node.read(vec![]).await;
    assert_eq!(vgpu_list(&node.bus), Vec::<serde_json::Value>::new());
    let status = node.plugin.signal_and_wait("TERM");
    assert!(status.success(), "{status:?}");
}

/// *(issue 28)* Where the kernel offers the VFIO device cdev, records carry
/// it (`vfio_devices`: the cdev and `/dev/iommu`, once a vfio driver has the
/// function), and the plugin's `iommufd` decides what a pod gets: `auto`
/// both the group node and the cdev, `prefer` the cdev only, `never` the
/// group node only. Each mode with a plugin of its own, stopped by pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn iommufd_decides_which_vfio_nodes_a_pod_gets() {
    const L4: &str = "0000:a2:00.0";
    let bus = TestBus::start_sim();
    let state = tempfile::tempdir().unwrap();
    let _daemon = Daemon::simulate(&bus, state.path(), "grace-hopper.toml");
    bus.manager("Register", &["ss", L4, "l4"]).unwrap();
    let got = bus.manager("Get", &["s", "l4"]).unwrap();
    assert!(
        got[0]
            .get("vfio_devices")
            .is_none_or(|v| v["data"] == serde_json::json!([])),
        "no cdev before a vfio driver has it: {got}"
    );
    let work = tempfile::tempdir().unwrap();
    let pods = Pods::default();
    let pods_sock = work.path().join("pod-resources.sock");
    let _pods_server = pod_resources(&pods_sock, pods.clone());
    let cdev = "/dev/vfio/devices/vfio0";
    for (mode, nodes) in [
        (
            "auto",
            vec!["/dev/vfio/vfio", "/dev/vfio/82", "/dev/iommu", cdev],
        ),
        ("prefer", vec!["/dev/iommu", cdev]),
        ("never", vec!["/dev/vfio/vfio", "/dev/vfio/82"]),
    ] {
        let dir = work.path().join(mode);
        std::fs::create_dir(&dir).unwrap();
        let config = work.path().join(format!("{mode}.toml"));
        std::fs::write(
            &config,
            format!("default = false\niommufd = \"{mode}\"\n[[resource]]\nname = \"hypeman.io/l4\"\nselector = \"10de:27b8\"\n"),
        )
        .unwrap();
        let (tx, mut registered) = mpsc::unbounded_channel();
        let _kubelet = kubelet(&dir, tx);
        let mut plugin = start_plugin(&bus, &dir, &pods_sock, &config);
        let reg = next(registered.recv()).await;
        assert_eq!(reg.resource_name, "hypeman.io/l4");
        let sock: PathBuf = dir.join(&reg.endpoint);
        let mut client = DevicePluginClient::new(channel(&sock).await.unwrap());
        let got = client.allocate(one(L4)).await.unwrap().into_inner();
        assert_eq!(
            got,
            one_container(("PCI_RESOURCE_HYPEMAN_IO_L4", L4), &nodes),
            "{mode}"
        );
        plugin.signal_and_wait("TERM");
    }
    let got = bus.manager("Get", &["s", "l4"]).unwrap();
    assert_eq!(
        got[0]["vfio_devices"]["data"],
        serde_json::json!([cdev, "/dev/iommu"]),
        "{got}"
    );
}
