//! The write gate: every change to the registry passes here, one at a time,
//! and is on disk before anyone can see it.
//!
//! Readers never take the gate: they read the last published snapshot.

use std::sync::Arc;

use super::error::{change_error, not_found, store_failed, Result};
use super::Service;
use crate::store::{Change, StoredDevice};

impl Service {
    /// Checks `change`, writes the registry as it will be to disk off the
    /// reactor, then applies it. The caller holds the gate, so nothing else
    /// changes the registry in between.
    pub(crate) async fn commit(&self, change: Change) -> Result<()> {
        let current = self.snapshot();
        current.check(&change).map_err(change_error)?;
        let store = self.store.clone();
        let change = tokio::task::spawn_blocking(move || {
            // `current` is dropped here, so applying below copies nothing
            // unless a reader still holds this snapshot.
            store.save_with(&current, &change).map(|()| change)
        })
        .await
        .map_err(|e| store_failed(format!("the writer thread failed: {e}")))?
        .map_err(|e| {
            tracing::error!(error = %e, "registry write failed");
            store_failed(e)
        })?;
        {
            let mut guard = self.registry.write().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = Arc::make_mut(&mut guard).apply(change) {
                // Unreachable while the gate is held; said loudly if it ever is.
                tracing::error!(error = %e, "a checked change no longer applies");
                return Err(hypeman_api::Error::Failed(e.to_string()));
            }
        }
        self.change_notify.notify_one();
        Ok(())
    }

    /// Takes the gate.
    pub(crate) async fn gate(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.gate.lock().await
    }

    /// Changes one stored device durably, by id; `NotFound` if it is gone.
    pub(crate) async fn modify(
        &self,
        id: &str,
        f: impl FnOnce(&mut StoredDevice),
    ) -> Result<StoredDevice> {
        let _gate = self.gate().await;
        let before = self
            .snapshot()
            .by_id(id)
            .cloned()
            .ok_or_else(|| not_found(id))?;
        let mut after = before.clone();
        f(&mut after);
        // The id, name and address are keys: they never change this way.
        after.id.clone_from(&before.id);
        after.name.clone_from(&before.name);
        after.pci_address = before.pci_address;
        if after != before {
            self.commit(Change::Replace(after.clone())).await?;
        }
        Ok(after)
    }
}
