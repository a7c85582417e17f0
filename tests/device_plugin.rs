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
    let listener = tokio::net::UnixListener::bind(&pods_sock).unwrap();
    let lister = pods.clone();
    let _pods_server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(PodResourcesListerServer::new(lister))
            .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
            .await;
    });
    let (tx, mut registered) = mpsc::unbounded_channel();
    let first_kubelet = kubelet(&dir, tx.clone());

    // Under umask 0, so the sockets' mode is the plugin's own doing.
    let mut plugin_cmd = std::process::Command::new(bin("hypeman-device-plugin"));
    // SAFETY: umask is async-signal-safe and touches only the child.
    unsafe {
        use std::os::unix::process::CommandExt;
        plugin_cmd.pre_exec(|| {
            libc::umask(0);
            Ok(())
        });
    }
    let mut plugin = Proc {
        child: plugin_cmd
            .arg(format!("--bus={}", bus.address))
            .arg("--kubelet-dir")
            .arg(&dir)
            .arg("--pod-resources")
            .arg(&pods_sock)
            .args(["--pod-resources-interval", "0.1"])
            .arg("--config")
            .arg(&config)
            .spawn()
            .unwrap(),
    };

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

    // Allocate: bound through hypemand, the exact response.
    let got = nic
        .allocate(one("0000:06:00.0"))
        .await
        .unwrap()
        .into_inner();
    let spec = |p: &str| dp::DeviceSpec {
        container_path: p.into(),
        host_path: p.into(),
        permissions: "rw".into(),
    };
    assert_eq!(
        got,
        dp::AllocateResponse {
            container_responses: vec![dp::ContainerAllocateResponse {
                envs: [(
                    "PCI_RESOURCE_HYPEMAN_IO_NIC".to_string(),
                    "0000:06:00.0".to_string()
                )]
                .into(),
                mounts: vec![],
                devices: vec![spec("/dev/vfio/vfio"), spec("/dev/vfio/6")],
                annotations: Default::default(),
                cdi_devices: vec![],
            }],
        }
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
        got.container_responses[0].devices,
        vec![spec("/dev/vfio/vfio"), spec("/dev/vfio/1")]
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
