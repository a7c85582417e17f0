//! `org.hypeman.Devices1` on `/org/hypeman/Devices`: the registry's front door.
//!
//! Every changing method is one call of [`Manager::change`]: authorize the
//! caller for the change on what it named, have the service apply it, answer
//! the record. Argument signatures are checked before any handler runs, by
//! [`Exported`](super::exported::Exported). Device1's methods are these,
//! with the device's own id.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use hypeman_api::{Available, Error, Options, Record};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::OwnedVariant as OwnedValue;
use zbus::{interface, OwnedObjectPath};

use super::device_path;
use crate::edge::authz::{Authz, Caller};
use crate::service::leases::LeaseRequest;
use crate::service::{Op, Service};

/// Replies of this many entries are followed by a heap trim: megabytes of
/// buffers would otherwise stay with the process after they are sent.
const LARGE_REPLY: usize = 1024;

/// What the manager and every device object share: the service and the gate.
pub struct Manager {
    pub(super) service: Arc<Service>,
    authz: Arc<Authz>,
}

/// A reply, after which the heap is trimmed if it is large.
fn trimmed<T>(reply: Vec<T>) -> Vec<T> {
    if reply.len() >= LARGE_REPLY {
        crate::memory::trim_soon();
    }
    reply
}

/// `force` from an options dictionary (Bind: a holder is Attach's only).
fn force(options: &HashMap<String, OwnedValue>) -> Result<bool, Error> {
    let o = Options::from_dict(options)?;
    if o.holder_pidfd.is_some() || o.holder_unit.is_some() {
        return Err(Error::InvalidArgument(
            "holder_pidfd and holder_unit are options of Attach: a Bind holds nothing".into(),
        ));
    }
    Ok(o.force)
}

impl Manager {
    /// The manager of `service`, authorizing through `authz`.
    pub fn new(service: Arc<Service>, authz: Arc<Authz>) -> Self {
        Manager { service, authz }
    }

    /// Every changing method: `op` on what the caller of `header` named.
    pub(super) async fn change(
        &self,
        header: &Header<'_>,
        id_or_name: &str,
        op: Op,
    ) -> Result<Record, Error> {
        let view = self
            .authz
            .apply(&Caller::Bus(header), id_or_name, op)
            .await?;
        Ok(view.into_record())
    }

    /// Register and Create.
    async fn register(
        &self,
        header: &Header<'_>,
        pci_address: &str,
        name: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        let view = self
            .authz
            .register(&Caller::Bus(header), pci_address, name, tags)
            .await?;
        Ok((device_path(&view.stored.id)?, view.into_record()))
    }

    /// Bind, Bind with options.
    pub(super) fn bind(options: Option<&HashMap<String, OwnedValue>>) -> Result<Op, Error> {
        Ok(Op::Bind {
            force: options.map(force).transpose()?.unwrap_or(false),
        })
    }

    /// Attach, Attach with options.
    pub(super) async fn attach(
        &self,
        instance_id: &str,
        options: Option<&HashMap<String, OwnedValue>>,
    ) -> Result<Op, Error> {
        let o = options
            .map(Options::from_dict)
            .transpose()?
            .unwrap_or_default();
        // The holder is proven before anyone is asked to authorize.
        let lease = self.lease(&o).await?;
        Ok(Op::Attach {
            instance_id: instance_id.to_string(),
            force: o.force,
            lease,
        })
    }

    /// The lease `o` asks for, its holder proven (Attach, CreateVgpu).
    async fn lease(&self, o: &Options) -> Result<Option<LeaseRequest>, Error> {
        let on_release = o.on_release.unwrap_or_default();
        Ok(match (&o.holder_pidfd, &o.holder_unit) {
            (Some(fd), _) => Some(LeaseRequest::on_pidfd(fd, on_release)?),
            (None, Some(unit)) => {
                Some(LeaseRequest::on_unit(self.service.holders_bus(), unit, on_release).await?)
            }
            (None, None) => None,
        })
    }
}

/// The manager as the bus sees it.
pub struct ManagerObject(pub Arc<Manager>);

impl super::exported::AllProperties for ManagerObject {}

#[interface(name = "org.hypeman.Devices1")]
impl ManagerObject {
    /// Registers a host PCI device for passthrough (the seed's `POST /devices`).
    /// An empty `name` means `pci-<address>`.
    async fn register(
        &self,
        #[zbus(header)] header: Header<'_>,
        pci_address: &str,
        name: &str,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        self.0
            .register(&header, pci_address, name, Default::default())
            .await
    }

    /// Registers from the seed's create request as a dictionary:
    /// `pci_address` (s), optional `name` (s) and `tags` (a{ss}).
    async fn create(
        &self,
        #[zbus(header)] header: Header<'_>,
        request: HashMap<String, OwnedValue>,
    ) -> Result<(OwnedObjectPath, Record), Error> {
        let r = hypeman_api::CreateRequest::from_dict(&request)?;
        let name = r.name.as_deref().unwrap_or("");
        self.0.register(&header, &r.pci_address, name, r.tags).await
    }

    /// The registered devices carrying every pair of `tags` (exact match).
    async fn list_by_tags(&self, tags: BTreeMap<String, String>) -> Result<Vec<Record>, Error> {
        let views = self.0.service.list_tagged(&tags).await?;
        Ok(views.into_iter().map(|v| v.into_record()).collect())
    }

    /// Sets the pairs of `set` and removes the keys of `remove` on a
    /// device's tags (authorized as register).
    async fn set_tags(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
        set: BTreeMap<String, String>,
        remove: Vec<String>,
    ) -> Result<Record, Error> {
        self.0
            .change(&header, id_or_name, Op::SetTags { set, remove })
            .await
    }

    /// Every registered device.
    async fn list(&self) -> Result<Vec<Record>, Error> {
        let views = self.0.service.list().await?;
        Ok(trimmed(
            views.into_iter().map(|v| v.into_record()).collect(),
        ))
    }

    /// One device, by id or exact name.
    async fn get(&self, id_or_name: &str) -> Result<Record, Error> {
        Ok(self.0.service.get(id_or_name).await?.into_record())
    }

    /// Unregisters a device; refuses while it is attached.
    async fn delete(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
    ) -> Result<(), Error> {
        self.0
            .change(&header, id_or_name, Op::Delete)
            .await
            .map(drop)
    }

    /// Every PCI device on the host, registered or not.
    async fn list_available(&self) -> Result<Vec<Available>, Error> {
        let views = self.0.service.list_available().await?;
        Ok(trimmed(views.iter().map(|v| v.record()).collect()))
    }

    /// Moves a device to vfio-pci (idempotent).
    async fn bind(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        self.0
            .change(&header, id_or_name, Manager::bind(None)?)
            .await
    }

    /// Gives a device back to its host driver (idempotent).
    async fn unbind(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        self.0.change(&header, id_or_name, Op::Unbind).await
    }

    /// Binds if needed, then marks the device attached to `instance_id`.
    async fn attach(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
        instance_id: &str,
    ) -> Result<Record, Error> {
        let op = self.0.attach(instance_id, None).await?;
        self.0.change(&header, id_or_name, op).await
    }

    /// Bind, with options: `force` (b) overrides the soft blockers (the host
    /// is using the device) and needs `org.hypeman.devices.force` as well.
    async fn bind_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = Manager::bind(Some(&options))?;
        self.0.change(&header, id_or_name, op).await
    }

    /// Attach, with options (as BindWithOptions).
    async fn attach_with_options(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
        instance_id: &str,
        options: HashMap<String, OwnedValue>,
    ) -> Result<Record, Error> {
        let op = self.0.attach(instance_id, Some(&options)).await?;
        self.0.change(&header, id_or_name, op).await
    }

    /// Clears the attachment; the device stays on vfio-pci.
    async fn detach(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
    ) -> Result<Record, Error> {
        self.0.change(&header, id_or_name, Op::Detach).await
    }

    /// *(issue 26)* Gives a physical function `count` SR-IOV virtual
    /// functions (0 removes them); answers once every new function has
    /// appeared. Authorized as `org.hypeman.devices.partition`.
    async fn set_virtual_functions(
        &self,
        #[zbus(header)] header: Header<'_>,
        id_or_name: &str,
        count: u32,
    ) -> Result<Record, Error> {
        let op = Op::SetVirtualFunctions { count };
        self.0.change(&header, id_or_name, op).await
    }

    /// *(issue 26)* One entry per registered GPU and vGPU type it offers
    /// now: `parent`, `framework`, `type_id`, `name`, `framebuffer_mb`,
    /// `available`.
    async fn list_vgpu_types(&self) -> Result<Vec<hypeman_api::VgpuType>, Error> {
        self.0.service.list_vgpu_types().await
    }

    /// *(issue 26)* Makes a vGPU from a request (`profile` (s), and
    /// optionally `instance_id` (s), `parent` (s) and `numa_node` (u)) on
    /// the least loaded registered GPU that offers the profile; authorized
    /// as `org.hypeman.devices.partition` on that GPU. Answers the record.
    /// *(issue 27)* `holder_pidfd` (h) or `holder_unit` (s), and
    /// `on_release` (s), lease it as `AttachWithOptions` leases a device:
    /// `detach` clears its instance when the holder ends, `give-back`
    /// deletes it.
    async fn create_vgpu(
        &self,
        #[zbus(header)] header: Header<'_>,
        request: HashMap<String, OwnedValue>,
    ) -> Result<hypeman_api::Vgpu, Error> {
        let req = hypeman_api::VgpuRequest::from_dict(&request)?;
        let lease = self.0.lease(&req.lease).await?;
        self.0
            .authz
            .create_vgpu(&Caller::Bus(&header), req, lease)
            .await
    }

    /// *(issue 26)* Deletes a vGPU by id; refused while a process holds its
    /// VFIO nodes. Authorized as `org.hypeman.devices.partition` on its GPU.
    async fn delete_vgpu(&self, #[zbus(header)] header: Header<'_>, id: &str) -> Result<(), Error> {
        self.0.authz.delete_vgpu(&Caller::Bus(&header), id).await
    }

    /// *(issue 26)* Every vGPU hypemand made.
    async fn list_vgpus(&self) -> Result<Vec<hypeman_api::Vgpu>, Error> {
        Ok(self.0.service.list_vgpus().await)
    }

    /// *(issue 26)* The host's GPU capacity in Hypeman's `GPUResourceStatus`
    /// shape (`mode`, `total_slots`, `used_slots`, `profiles` or `devices`).
    async fn gpu_resources(&self) -> Result<hypeman_api::GpuResources, Error> {
        self.0.service.gpu_resources().await
    }

    /// This build's version.
    #[zbus(property)]
    fn version(&self) -> String {
        crate::VERSION.to_string()
    }

    /// A PCI device appeared on the host (registered or not).
    #[zbus(signal)]
    pub async fn host_device_added(
        emitter: &SignalEmitter<'_>,
        pci_address: &str,
    ) -> zbus::Result<()>;

    /// A PCI device left the host (registered or not).
    #[zbus(signal)]
    pub async fn host_device_removed(
        emitter: &SignalEmitter<'_>,
        pci_address: &str,
    ) -> zbus::Result<()>;

    /// *(issue 26)* A vGPU was made: its record.
    #[zbus(signal)]
    pub async fn vgpu_created(
        emitter: &SignalEmitter<'_>,
        vgpu: hypeman_api::Vgpu,
    ) -> zbus::Result<()>;

    /// *(issue 26)* A vGPU was deleted: its id.
    #[zbus(signal)]
    pub async fn vgpu_deleted(emitter: &SignalEmitter<'_>, id: &str) -> zbus::Result<()>;
}
