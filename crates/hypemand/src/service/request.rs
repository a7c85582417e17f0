//! What an edge may ask the service to do, as values: an [`Op`] on a
//! resolved [`Target`], or registering a [`Candidate`].
//!
//! Why values and not one method per edge handler: every edge (D-Bus,
//! REST) passes one of these through the same authorization
//! ([`crate::edge::authz::Authz`]) to [`Service::apply`] or
//! [`Service::register`], so a new change is added here once and every edge
//! has it.

use std::collections::BTreeMap;

use hypeman_api::validate::{validate_instance_id, validate_name, validate_tags};

use super::error::{device_not_found, Result};
use super::{DeviceView, Service, Target};
use crate::host::HostDevice;
use crate::pci::PciAddress;

/// A change of one registered device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Unregister (refused while attached).
    Delete,
    /// Move to vfio-pci; `force` overrides the soft blockers.
    Bind {
        /// Override the soft blockers (needs the force action).
        force: bool,
    },
    /// Give back to the host driver.
    Unbind,
    /// Bind if needed, then mark as held by `instance_id`.
    Attach {
        /// The instance that holds the device.
        instance_id: String,
        /// Override the soft blockers (needs the force action).
        force: bool,
        /// *(issue 27)* The holder whose end releases the attachment.
        lease: Option<super::leases::LeaseRequest>,
    },
    /// Clear the attachment.
    Detach,
    /// *(issue 26)* Give a physical function this many SR-IOV virtual
    /// functions.
    SetVirtualFunctions {
        /// The count (0 removes them).
        count: u32,
    },
    /// Set the pairs of `set`, remove the keys of `remove`.
    SetTags {
        /// Pairs to set.
        set: BTreeMap<String, String>,
        /// Keys to remove.
        remove: Vec<String>,
    },
}

impl Op {
    /// *(issue 29)* The operation's name in metrics
    /// (`hypeman_operations_total{operation}`).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Delete => "delete",
            Op::Bind { .. } => "bind",
            Op::Unbind => "unbind",
            Op::Attach { .. } => "attach",
            Op::Detach => "detach",
            Op::SetVirtualFunctions { .. } => "set_virtual_functions",
            Op::SetTags { .. } => "set_tags",
        }
    }

    /// Checks the arguments the caller gave, before anyone is asked to
    /// authorize the change (a malformed request is the caller's to fix).
    pub fn validate(&self) -> Result<()> {
        if let Op::Attach { instance_id, .. } = self {
            validate_instance_id(instance_id)?;
        }
        Ok(())
    }
}

/// A host device about to be registered under a name, read once: what
/// authorization is asked about is what [`Service::register`] registers.
/// Only [`Service::propose`] makes one.
#[derive(Debug, Clone)]
pub struct Candidate {
    host: HostDevice,
    name: String,
    tags: BTreeMap<String, String>,
}

impl Candidate {
    /// The host device as it was read.
    pub fn host(&self) -> &HostDevice {
        &self.host
    }
    /// The name it will be registered under (the default name if none was given).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Service {
    /// Reads the host device at `pci_address` for a Register under `name`
    /// (empty: `pci-<address>`) with `tags`.
    pub async fn propose(
        &self,
        pci_address: &str,
        name: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<Candidate> {
        if !name.is_empty() {
            validate_name(name)?;
        }
        let address = PciAddress::parse(pci_address)?;
        let host = self
            .live(address)
            .await?
            .ok_or_else(|| device_not_found(address))?;
        let name = if name.is_empty() {
            address.default_name()
        } else {
            name.to_string()
        };
        Ok(Candidate { host, name, tags })
    }

    /// Applies `op` to the record `target` resolved to. Delete answers the
    /// device as it was last registered.
    pub async fn apply(&self, target: &Target, op: Op) -> Result<DeviceView> {
        match op {
            Op::Delete => {
                let removed = self.delete(target).await?;
                Ok(self.view(removed, None))
            }
            Op::Bind { .. } => self.bind(target).await,
            Op::Unbind => self.unbind(target).await,
            Op::Attach {
                instance_id, lease, ..
            } => self.attach_leased(target, &instance_id, lease).await,
            Op::Detach => self.detach(target).await,
            Op::SetTags { set, remove } => self.set_tags(target, set, remove).await,
            Op::SetVirtualFunctions { count } => self.set_virtual_functions(target, count).await,
        }
    }

    /// `Register`: sets the candidate's host device aside under a new id and
    /// its name.
    pub async fn register(&self, candidate: Candidate) -> Result<DeviceView> {
        let Candidate { host, name, tags } = candidate;
        validate_tags(&tags)?;
        self.register_host(host, name, tags).await
    }
}
