//! The client side of `org.hypeman.Devices`, and `hypemanctl` on top of it.
//!
//! It depends on the contract crate ([`hypeman_api`]) only: the records, the
//! error table and the proxies are the daemon's own, so nothing here is copied
//! and nothing of the daemon is compiled in.
//!
//! - [`Client`]: the calls, with polkit interaction on or off;
//! - [`cli`]: `hypemanctl`'s command line (also its man page and completions).
//!
//! The seed registers a device like this (Go):
//!
//! ```go
//! device, err := client.Devices.New(context.TODO(), hypeman.DeviceNewParams{
//!     PciAddress: "0000:a2:00.0",
//! })
//! fmt.Printf("%+v\n", device.ID)
//! ```
//!
//! Here, over D-Bus:
//!
//! ```no_run
//! # async fn demo() -> Result<(), hypemanctl::ClientError> {
//! use hypemanctl::BusChoice;
//! use hypemanctl::Client;
//!
//! let client = Client::connect(&BusChoice::System).await?;
//! let device = client.register("0000:a2:00.0", "").await?;
//! println!("{}", device.id);
//! // The seed's JSON document, `attached_to: null` included:
//! println!("{}", serde_json::to_string_pretty(&device.seed()).unwrap());
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod cli;
pub mod hold;

use zbus::proxy::MethodFlags;
use zbus::{Connection, OwnedObjectPath};

pub use hypeman_api::proxy::{DeviceProxy, DevicesProxy};
pub use hypeman_api::record::{SeedAvailable, SeedDevice};
pub use hypeman_api::{Available, BusChoice, Record};

/// What the daemon answered, or why it could not be asked: the contract's one
/// error table.
pub type ClientError = hypeman_api::Error;

/// A connection to the daemon's manager object.
pub struct Client {
    conn: Connection,
    proxy: zbus::Proxy<'static>,
    flags: MethodFlags,
}

impl Client {
    /// Connects to hypemand on `bus`.
    pub async fn connect(bus: &BusChoice) -> Result<Self, ClientError> {
        let conn = bus
            .builder()
            .build()
            .await
            .map_err(|e| ClientError::Connect(e.to_string()))?;
        let proxy = async {
            zbus::proxy::Builder::new(&conn)
                .destination(hypeman_api::BUS_NAME)
                .path(hypeman_api::MANAGER_PATH)
                .interface(hypeman_api::MANAGER_IFACE)
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
        }
        .await
        .map_err(|e| ClientError::Connect(e.to_string()))?;
        Ok(Client {
            conn,
            proxy,
            flags: MethodFlags::empty(),
        })
    }

    /// Lets polkit ask the user for a password (through their agent) instead of
    /// failing with `InteractiveAuthorizationRequired`.
    pub fn allow_interactive(mut self, yes: bool) -> Self {
        self.flags.set(MethodFlags::ALLOW_INTERACTIVE_AUTH, yes);
        self
    }

    /// The bus connection (for signal streams).
    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    async fn call<B, R>(&self, method: &str, body: &B) -> Result<R, ClientError>
    where
        B: serde::Serialize + zbus::zvariant::DynamicType,
        R: for<'d> zbus::zvariant::DynamicDeserialize<'d>,
    {
        self.proxy
            .call_with_flags(method, self.flags, body)
            .await?
            .ok_or_else(|| ClientError::Failed(format!("{method} returned no reply")))
    }

    /// `Register`: sets the host device at `pci_address` aside under `name` (empty: the default).
    pub async fn register(&self, pci_address: &str, name: &str) -> Result<Record, ClientError> {
        let (_, r): (OwnedObjectPath, Record) = self.call("Register", &(pci_address, name)).await?;
        Ok(r)
    }

    /// Registers from the seed's create request (with tags).
    pub async fn create(
        &self,
        request: &hypeman_api::CreateRequest,
    ) -> Result<Record, ClientError> {
        let (_, r): (OwnedObjectPath, Record) = self.call("Create", &(request.to_dict(),)).await?;
        Ok(r)
    }

    /// The devices carrying every pair of `tags`.
    pub async fn list_by_tags(
        &self,
        tags: &std::collections::HashMap<String, String>,
    ) -> Result<Vec<Record>, ClientError> {
        self.call("ListByTags", &(tags,)).await
    }

    /// Sets `set` and removes `remove` on a device's tags.
    pub async fn set_tags(
        &self,
        id_or_name: &str,
        set: &std::collections::HashMap<String, String>,
        remove: &[String],
    ) -> Result<Record, ClientError> {
        self.call("SetTags", &(id_or_name, set, remove)).await
    }

    /// `List`: every registered device.
    pub async fn list(&self) -> Result<Vec<Record>, ClientError> {
        self.call("List", &()).await
    }

    /// `Get`: one device by id or name.
    pub async fn get(&self, id_or_name: &str) -> Result<Record, ClientError> {
        self.call("Get", &(id_or_name,)).await
    }

    /// `Delete`: unregisters a device.
    pub async fn delete(&self, id_or_name: &str) -> Result<(), ClientError> {
        self.proxy
            .call_with_flags::<_, _, ()>("Delete", self.flags, &(id_or_name,))
            .await?;
        Ok(())
    }

    /// `ListAvailable`: every PCI function on the host.
    pub async fn available(&self) -> Result<Vec<Available>, ClientError> {
        self.call("ListAvailable", &()).await
    }

    /// `Bind`: moves a device to vfio-pci.
    pub async fn bind(&self, id_or_name: &str) -> Result<Record, ClientError> {
        self.call("Bind", &(id_or_name,)).await
    }

    /// Bind with options (`force`: override the soft blockers).
    pub async fn bind_with(
        &self,
        id_or_name: &str,
        options: hypeman_api::Options,
    ) -> Result<Record, ClientError> {
        if options.is_empty() {
            return self.bind(id_or_name).await;
        }
        self.call("BindWithOptions", &(id_or_name, options.to_dict()))
            .await
    }

    /// Attach with options (`force`: override the soft blockers;
    /// `holder_pidfd` and `on_release`: a lease, issue 27).
    pub async fn attach_with(
        &self,
        id_or_name: &str,
        instance_id: &str,
        options: hypeman_api::Options,
    ) -> Result<Record, ClientError> {
        if options.is_empty() {
            return self.attach(id_or_name, instance_id).await;
        }
        self.call(
            "AttachWithOptions",
            &(id_or_name, instance_id, options.to_dict()),
        )
        .await
    }

    /// The object of device `id`, its properties read anew at each ask.
    async fn device(&self, id: &str) -> Result<DeviceProxy<'_>, ClientError> {
        let path = hypeman_api::device_path(id)
            .ok_or_else(|| ClientError::Failed(format!("{id} is not a device id")))?;
        Ok(DeviceProxy::builder(&self.conn)
            .path(path)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?)
    }

    /// Why the host must keep a registered device (its `Blockers` property).
    pub async fn blockers(&self, id: &str) -> Result<Vec<hypeman_api::Blocker>, ClientError> {
        Ok(self.device(id).await?.blockers().await?)
    }

    /// *(issue 29)* A device's health, its PCIe error counters read now
    /// (the `Health` property).
    pub async fn health(&self, id: &str) -> Result<String, ClientError> {
        Ok(self.device(id).await?.health().await?)
    }

    /// `Unbind`: gives a device back to its host driver.
    pub async fn unbind(&self, id_or_name: &str) -> Result<Record, ClientError> {
        self.call("Unbind", &(id_or_name,)).await
    }

    /// `Attach`: binds if needed, then marks the device held by `instance_id`.
    pub async fn attach(&self, id_or_name: &str, instance_id: &str) -> Result<Record, ClientError> {
        self.call("Attach", &(id_or_name, instance_id)).await
    }

    /// `Detach`: clears the attachment.
    pub async fn detach(&self, id_or_name: &str) -> Result<Record, ClientError> {
        self.call("Detach", &(id_or_name,)).await
    }

    /// `SetVirtualFunctions` *(issue 26)*: a physical function's SR-IOV
    /// virtual functions.
    pub async fn set_virtual_functions(
        &self,
        id_or_name: &str,
        count: u32,
    ) -> Result<Record, ClientError> {
        self.call("SetVirtualFunctions", &(id_or_name, count)).await
    }

    /// `ListVgpuTypes` *(issue 26)*: the vGPU types registered GPUs offer.
    pub async fn vgpu_types(&self) -> Result<Vec<hypeman_api::VgpuType>, ClientError> {
        self.call("ListVgpuTypes", &()).await
    }

    /// `CreateVgpu` *(issue 26)*.
    pub async fn create_vgpu(
        &self,
        req: &hypeman_api::VgpuRequest,
    ) -> Result<hypeman_api::Vgpu, ClientError> {
        self.call("CreateVgpu", &(req.to_dict(),)).await
    }

    /// `DeleteVgpu` *(issue 26)*.
    pub async fn delete_vgpu(&self, id: &str) -> Result<(), ClientError> {
        self.proxy
            .call_with_flags::<_, _, ()>("DeleteVgpu", self.flags, &(id,))
            .await?;
        Ok(())
    }

    /// `ListVgpus` *(issue 26)*.
    pub async fn vgpus(&self) -> Result<Vec<hypeman_api::Vgpu>, ClientError> {
        self.call("ListVgpus", &()).await
    }

    /// `GpuResources` *(issue 26)*: the host's GPU capacity.
    pub async fn gpu_resources(&self) -> Result<hypeman_api::GpuResources, ClientError> {
        self.call("GpuResources", &()).await
    }

    /// The daemon's version.
    pub async fn version(&self) -> Result<String, ClientError> {
        Ok(self.proxy.get_property::<String>("Version").await?)
    }
}
