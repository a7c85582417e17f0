//! The kubelet's side: serving one socket per resource, registering them,
//! registering again when the kubelet restarts, and keeping hypemand's
//! attachments in step with the pods the kubelet reports.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tonic::transport::{Channel, Endpoint, Server};

use crate::api::deviceplugin as dp;
use crate::api::deviceplugin::device_plugin_server::DevicePluginServer;
use crate::api::deviceplugin::registration_client::RegistrationClient;
use crate::api::podresources as pr;
use crate::api::podresources::pod_resources_lister_client::PodResourcesListerClient;
use crate::node::{Node, K8S_PREFIX};
use crate::plugin::Plugin;

/// The kubelet's registration socket, in the device plugin directory.
pub const KUBELET_SOCKET: &str = "kubelet.sock";

impl From<tonic::Status> for KubeletError {
    fn from(s: tonic::Status) -> Self {
        KubeletError::Refused(Box::new(s))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("cannot reach {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("the kubelet refused: {0}")]
    Refused(Box<tonic::Status>),
    #[error("cannot listen on {path}: {source}")]
    Listen {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// A gRPC channel over a unix socket.
pub async fn channel(path: &Path) -> Result<Channel, KubeletError> {
    let p = path.to_path_buf();
    // The URI is required by the API and ignored by the connector.
    Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let p = p.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(p).await?)) }
        }))
        .await
        .map_err(|source| KubeletError::Connect {
            path: path.display().to_string(),
            source,
        })
}

/// One resource's server, stopped (and its socket removed) when dropped.
pub struct Served {
    pub resource: String,
    pub socket: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Creates the listening socket at `socket`, mode 0600 whatever the umask:
/// it is bound inside a private directory (0700) beside it, set to 0600 there,
/// then renamed into place, so no one but root can ever connect to it (the
/// kubelet is root). A stale socket is replaced by the rename.
pub fn listen_private(socket: &Path) -> Result<UnixListener, std::io::Error> {
    use std::os::unix::fs::PermissionsExt;
    let dir = socket.parent().unwrap_or(Path::new("."));
    let private = tempfile::Builder::new()
        .prefix(".hypeman-socket-")
        .tempdir_in(dir)?;
    let staged = private.path().join("s");
    let listener = UnixListener::bind(&staged)?;
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
    std::fs::rename(&staged, socket)?;
    Ok(listener)
}

/// Serves `resource` on its socket in `dir` (a stale socket is replaced).
pub fn serve(dir: &Path, resource: &str, node: Arc<Node>) -> Result<Served, KubeletError> {
    let socket = dir.join(crate::socket_name(resource));
    let listener = listen_private(&socket).map_err(|source| KubeletError::Listen {
        path: socket.display().to_string(),
        source,
    })?;
    let plugin = Plugin {
        resource: resource.to_string(),
        node,
    };
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    let name = resource.to_string();
    let task = tokio::spawn(async move {
        if let Err(e) = Server::builder()
            .add_service(DevicePluginServer::new(plugin))
            .serve_with_incoming(incoming)
            .await
        {
            tracing::error!(resource = %name, error = %e, "the plugin server stopped");
        }
    });
    Ok(Served {
        resource: resource.to_string(),
        socket,
        task,
    })
}

/// Registers a served resource with the kubelet.
pub async fn register(dir: &Path, served: &Served) -> Result<(), KubeletError> {
    let ch = channel(&dir.join(KUBELET_SOCKET)).await?;
    let endpoint = served
        .socket
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    RegistrationClient::new(ch)
        .register(dp::RegisterRequest {
            version: crate::API_VERSION.into(),
            endpoint,
            resource_name: served.resource.clone(),
            options: Some(crate::plugin::options()),
        })
        .await?;
    tracing::info!(resource = %served.resource, "registered with the kubelet");
    Ok(())
}

/// Which devices (PCI addresses) each pod holds, of these resources.
pub fn pods_holding(pods: &[pr::PodResources], resources: &[String]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for p in pods {
        let instance = format!("{K8S_PREFIX}{}/{}", p.namespace, p.name);
        for c in &p.containers {
            for d in c
                .devices
                .iter()
                .filter(|d| resources.contains(&d.resource_name))
            {
                for id in &d.device_ids {
                    out.insert(id.clone(), instance.clone());
                }
            }
        }
    }
    out
}

/// Brings hypemand's `k8s:` attachments in line with the pods: a device a
/// pod holds is attached to it; a device attached to a pod that is gone is
/// detached (it stays on vfio-pci for the next pod). *(issue 26)* A vGPU
/// made for a slot no pod holds is deleted (`delete_unheld`).
pub async fn sync_pods(
    node: &Node,
    socket: &Path,
    resources: &[String],
) -> Result<(), KubeletError> {
    let read = node
        .teardown
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .read_begins();
    let ch = channel(socket).await?;
    let pods = PodResourcesListerClient::new(ch)
        .list(pr::ListPodResourcesRequest {})
        .await?
        .into_inner()
        .pod_resources;
    let want = pods_holding(&pods, resources);
    node.refresh().await;
    let view = node.current();
    delete_unheld(node, read, &view.slots, &want).await;
    for d in view.devices.iter() {
        let wanted = want.get(&d.pci_address);
        let result = match (&d.attached_to, wanted) {
            (Some(now), Some(w)) if now == w => continue,
            (None, Some(w)) => node.client.attach(&d.id, w).await.map(|_| "attached"),
            (Some(now), None) if now.starts_with(K8S_PREFIX) => node
                .client
                .detach(&d.id)
                .await
                .map(|_| "detached: its pod is gone"),
            (Some(now), Some(w)) if now.starts_with(K8S_PREFIX) => {
                match node.client.detach(&d.id).await {
                    Ok(_) => node
                        .client
                        .attach(&d.id, w)
                        .await
                        .map(|_| "moved to its new pod"),
                    Err(e) => Err(e),
                }
            }
            _ => continue,
        };
        match result {
            Ok(what) => {
                tracing::info!(pci_address = %d.pci_address, instance = %wanted.map_or("", |s| s.as_str()), "{what}")
            }
            Err(e) => {
                tracing::warn!(pci_address = %d.pci_address, error = %e, "cannot bring the attachment in line with the pods")
            }
        }
    }
    Ok(())
}

/// *(issue 26)* Deletes the vGPUs no pod has held in two reads in a row
/// that began after their Allocate answered (see [`crate::vgpu`]). A vGPU
/// hypemand will not delete yet (its VMM still has it open) is tried again
/// at the next read.
async fn delete_unheld(
    node: &Node,
    read: u64,
    slots: &[crate::vgpu::Slot],
    want: &BTreeMap<String, String>,
) {
    let held = slots
        .iter()
        .filter(|s| want.contains_key(&s.id))
        .map(|s| s.id.clone())
        .collect();
    let gone = node
        .teardown
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .after_read(read, slots, &held);
    for v in gone {
        let slot = v.instance_id.as_deref().unwrap_or_default();
        match node.client.delete_vgpu(&v.id).await {
            Ok(()) => {
                tracing::info!(vgpu_id = %v.id, instance_id = %slot, "vGPU deleted: no pod holds it")
            }
            Err(e) => {
                tracing::warn!(vgpu_id = %v.id, instance_id = %slot, error = %e, "cannot delete a vGPU no pod holds; will try again")
            }
        }
    }
}

/// Runs [`sync_pods`] every `every` until dropped (the PodResources API has
/// no watch in v1; hypemand's side is followed by its signals).
pub async fn follow_pods(
    node: Arc<Node>,
    socket: PathBuf,
    resources: Vec<String>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        match sync_pods(&node, &socket, &resources).await {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot read the kubelet's pod resources; will retry");
            }
            Err(_) => {}
        }
    }
}
