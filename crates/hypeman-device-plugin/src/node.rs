//! What hypemand says of the registered devices, as the plugin needs it, kept
//! current from hypemand's signals: a device's properties changing, a device
//! registered or deleted, a function appearing or leaving the host, and
//! hypemand itself starting again. Never polled.

use std::sync::Arc;

use futures_util::StreamExt;
use hypemanctl::{Client, ClientError};
use tokio::sync::watch;
use zbus::{MatchRule, MessageStream};

use crate::config::Config;
use crate::vgpu::{self, Slot};

/// How often hypemand is read while it does not answer.
const RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Instances the plugin attaches devices to: `k8s:<namespace>/<pod>`.
pub const K8S_PREFIX: &str = "k8s:";

/// One registered device, for the kubelet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDevice {
    /// hypemand's id of the record.
    pub id: String,
    /// The kubelet's device ID.
    pub pci_address: String,
    pub resource: String,
    /// Present, passable, not failed *(issue 29)*, and not attached
    /// outside Kubernetes.
    pub healthy: bool,
    pub numa_node: Option<i64>,
    pub iommu_group: Option<i64>,
    pub attached_to: Option<String>,
    pub bound_to_vfio: bool,
    /// *(issue 28)* The VFIO cdev and `/dev/iommu`, when the kernel offers them.
    pub vfio_devices: Vec<String>,
}

/// What the plugin offers: every registered device that belongs to a
/// resource, by PCI address, and *(issue 26)* the slots of the vGPU resources.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    pub devices: Vec<NodeDevice>,
    pub slots: Vec<Slot>,
}

/// The view as last read.
pub type Snapshot = Arc<View>;

/// Reads the registry and the host's view once.
pub async fn read(client: &Client, config: &Config) -> Result<View, ClientError> {
    let records = client.list().await?;
    let available = client.available().await?;
    // vGPUs are read only when profiles are offered: a hypemand without
    // them is still served.
    let (types, vgpus) = if config.vgpus.is_empty() {
        (Vec::new(), Vec::new())
    } else {
        (client.vgpu_types().await?, client.vgpus().await?)
    };
    let parents = vgpu::parents(config, &types, &vgpus);
    let mut out: Vec<NodeDevice> = records
        .into_iter()
        .filter(|r| !parents.contains(&r.pci_address))
        .filter_map(|r| {
            let resource = config.resource_for(&r.vendor_id, &r.device_id, &r.kind, &r.tags)?;
            let passable = available
                .iter()
                .find(|a| a.pci_address == r.pci_address)
                .is_some_and(|a| a.passable);
            let outside = r
                .attached_to
                .as_deref()
                .is_some_and(|a| !a.starts_with(K8S_PREFIX));
            // *(issue 29)* A device hypemand judges failed (a fatal PCIe
            // error, or gone under a VM) is Unhealthy; degraded is still
            // offered.
            let failed = r.health.as_deref() == Some("failed");
            Some(NodeDevice {
                healthy: r.present && passable && !outside && !failed,
                id: r.id,
                pci_address: r.pci_address,
                resource,
                numa_node: r.numa_node,
                iommu_group: r.iommu_group,
                attached_to: r.attached_to,
                bound_to_vfio: r.bound_to_vfio,
                vfio_devices: r.vfio_devices,
            })
        })
        .collect();
    out.sort_by(|a, b| a.pci_address.cmp(&b.pci_address));
    Ok(View {
        devices: out,
        slots: vgpu::slots(config, &types, &vgpus),
    })
}

/// The node as last read, and the client to hypemand.
pub struct Node {
    pub client: Client,
    pub config: Config,
    tx: watch::Sender<Snapshot>,
    /// *(issue 26)* When each vGPU slot was allocated, in PodResources reads.
    pub teardown: std::sync::Mutex<vgpu::Teardown>,
    /// *(issue 26)* One vGPU Allocate at a time: a slot is made once.
    pub allocating: tokio::sync::Mutex<()>,
}

impl Node {
    pub fn new(client: Client, config: Config) -> Arc<Node> {
        let (tx, _) = watch::channel(Arc::new(View::default()));
        Arc::new(Node {
            client,
            config,
            tx,
            teardown: Default::default(),
            allocating: Default::default(),
        })
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.tx.subscribe()
    }

    pub fn current(&self) -> Snapshot {
        self.tx.borrow().clone()
    }

    /// Reads again and tells the watchers if anything changed. While
    /// hypemand does not answer (it is restarting), the devices last seen
    /// stay listed, Unhealthy: nothing new is allocated on them, and the
    /// kubelet does not drop them.
    /// Returns whether hypemand answered.
    pub async fn refresh(&self) -> bool {
        let mut answered = true;
        let next = match read(&self.client, &self.config).await {
            Ok(n) => n,
            Err(e) => {
                answered = false;
                tracing::warn!(error = %e, "cannot read the devices from hypemand; marking them Unhealthy");
                let mut last = (*self.current()).clone();
                last.devices.iter_mut().for_each(|d| d.healthy = false);
                last.slots.iter_mut().for_each(|s| s.healthy = false);
                last
            }
        };
        self.tx.send_if_modified(|cur| {
            if **cur == next {
                return false;
            }
            *cur = Arc::new(next);
            true
        });
        answered
    }

    /// Follows hypemand's signals until the bus connection closes.
    pub async fn follow(self: Arc<Self>) {
        let conn = self.client.connection().clone();
        // By path, not by sender: a rule on the well-known name is filtered
        // client-side against the owner zbus last saw, and signals from a
        // restarted hypemand could be dropped until that caught up. A signal
        // from anyone else on this path only causes a read of hypemand.
        let from_hypemand = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .path_namespace(hypeman_api::MANAGER_PATH)
            .build();
        let owner = MatchRule::builder()
            .msg_type(zbus::message::Type::Signal)
            .sender("org.freedesktop.DBus")
            .member("NameOwnerChanged")
            .arg(0, hypeman_api::BUS_NAME)
            .build();
        let (Ok(from_hypemand), Ok(owner)) = (from_hypemand, owner) else {
            tracing::error!("cannot build the signal match rules");
            return;
        };
        let streams = async {
            let a = MessageStream::for_match_rule(
                from_hypemand,
                &conn,
                std::num::NonZeroUsize::new(256),
            )
            .await?;
            let b = MessageStream::for_match_rule(owner, &conn, std::num::NonZeroUsize::new(16))
                .await?;
            Ok::<_, zbus::Error>((a, b))
        };
        let (a, b) = match streams.await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot subscribe to hypemand's signals");
                return;
            }
        };
        // Subscribed first, read second: nothing in between goes unseen.
        let mut answered = self.refresh().await;
        let mut events = futures_util::stream::select(a, b);
        loop {
            // While hypemand does not answer (it is restarting), read again
            // every second as well as on its signals: its coming back can
            // race with the owner-change signal. Otherwise, signals only.
            let closed = if answered {
                events.next().await.is_none()
            } else {
                matches!(tokio::time::timeout(RETRY, events.next()).await, Ok(None))
            };
            if closed {
                return; // the bus connection closed
            }
            // A burst (a Bind changes several properties) is one read.
            while let Some(Some(_)) = futures_util::FutureExt::now_or_never(events.next()) {}
            answered = self.refresh().await;
        }
    }
}
