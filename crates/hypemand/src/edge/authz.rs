//! Authorization, declared once.
//!
//! [`Method::action`] is the one table from a changing method to the polkit
//! action that guards it. Every changing handler goes through [`Authz`]: it
//! resolves what the caller named to one record, once, asks the bouncer about
//! that exact record (its address, vendor:device and name go to polkit as
//! details), and hands back the resolved [`Target`]. The service then acts on
//! that record's id and nothing else: a name re-pointed while polkit was
//! deciding cannot redirect the change.

use std::sync::Arc;

use hypeman_api::Error;
use tokio::sync::OnceCell;
use zbus::Connection;

use super::polkit::{Action, Bouncer, Caller, Target as PolkitTarget};
use crate::service::{Service, Target};

/// Every method that changes anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Register,
    Delete,
    Bind,
    Unbind,
    Attach,
    Detach,
    /// Bind or Attach with `force`: overrides the soft blockers.
    ForceBind,
    ForceAttach,
    /// Changing a device's tags (issue 15): authorized as registering.
    SetTags,
}

impl Method {
    pub const ALL: [Method; 9] = [
        Method::Register,
        Method::Delete,
        Method::Bind,
        Method::Unbind,
        Method::Attach,
        Method::Detach,
        Method::ForceBind,
        Method::ForceAttach,
        Method::SetTags,
    ];

    /// The table: which polkit actions each method needs, every one of them
    /// granted, in this order.
    pub const fn actions(self) -> &'static [Action] {
        match self {
            Method::Register | Method::SetTags => &[Action::Register],
            Method::Delete => &[Action::Delete],
            Method::Bind | Method::Unbind => &[Action::Bind],
            Method::Attach | Method::Detach => &[Action::Attach],
            Method::ForceBind => &[Action::Bind, Action::Force],
            Method::ForceAttach => &[Action::Attach, Action::Force],
        }
    }

    /// Whether the method overrides soft blockers once authorized.
    pub const fn forces(self) -> bool {
        matches!(self, Method::ForceBind | Method::ForceAttach)
    }
}

/// The gate every changing handler passes.
pub struct Authz {
    service: Arc<Service>,
    /// Built on first use from the serving connection, then kept for the
    /// daemon's life.
    bouncer: OnceCell<Bouncer>,
}

impl Authz {
    pub fn new(service: Arc<Service>) -> Self {
        Authz {
            service,
            bouncer: OnceCell::new(),
        }
    }

    async fn bouncer(&self, conn: &Connection) -> Result<&Bouncer, Error> {
        self.bouncer
            .get_or_try_init(|| Bouncer::new(conn))
            .await
            .map_err(|e| Error::Failed(format!("cannot reach the bus to ask polkit: {e}")))
    }

    /// Resolves `id_or_name` once and authorizes `method` on that record for
    /// the caller of `header`.
    pub async fn device(
        &self,
        conn: &Connection,
        caller: &Caller<'_>,
        method: Method,
        id_or_name: &str,
    ) -> Result<Target, Error> {
        let target = self.service.resolve(id_or_name)?;
        let d = target.record();
        let details = PolkitTarget {
            pci_address: d.pci_address.to_string(),
            device_id: format!("{}:{}", d.vendor_id, d.device_id),
            name: d.name.clone(),
        };
        let bouncer = self.bouncer(conn).await?;
        for action in method.actions() {
            bouncer.check(caller, *action, &details).await?;
        }
        Ok(if method.forces() {
            target.forced()
        } else {
            target
        })
    }

    /// Authorizes registering the host device at `pci_address` under `name`
    /// (empty: the default name).
    pub async fn register(
        &self,
        conn: &Connection,
        caller: &Caller<'_>,
        pci_address: &str,
        name: &str,
    ) -> Result<(), Error> {
        if !name.is_empty() {
            crate::store::registry::validate_name(name)?;
        }
        let host = self.service.inspect(pci_address).await?;
        let details = PolkitTarget {
            pci_address: host.address.to_string(),
            device_id: format!("{:04x}:{:04x}", host.vendor, host.device),
            name: if name.is_empty() {
                host.address.default_name()
            } else {
                name.to_string()
            },
        };
        self.bouncer(conn)
            .await?
            .check(caller, Action::Register, &details)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every action in the table is declared in the shipped policy, and every
    /// declared action guards some method.
    #[test]
    fn the_table_matches_the_policy() {
        let policy = include_str!("../../../../polkit/org.hypeman.devices.policy");
        let mut used: Vec<&str> = Method::ALL
            .iter()
            .flat_map(|m| m.actions().iter().map(|a| a.id()))
            .collect();
        used.sort();
        used.dedup();
        for id in &used {
            assert!(policy.contains(&format!("<action id=\"{id}\">")), "{id}");
        }
        assert_eq!(policy.matches("<action id=").count(), used.len());
        // Force is never kept, and the example rule does not grant it.
        let force = &policy[policy.find("org.hypeman.devices.force").unwrap()..];
        assert!(!force.contains("auth_admin_keep"));
        let rule = include_str!("../../../../polkit/50-org.hypeman.devices.rules");
        assert!(rule.contains("action.id !== \"org.hypeman.devices.force\""));
    }
}
