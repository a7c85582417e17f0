//! The udev edge: kernel hotplug events in, one ordered stream into the service.
//!
//! Both the udev monitor (real host) and the simulated kernel feed the same
//! channel, and one dispatcher task drains it in batches, so a burst of events
//! costs one read per device rather than one per event, and never blocks a
//! method call: the dispatcher is just another task on the runtime. What a
//! batch means for the registered devices ([`Service::on_events`]) is here
//! too, next to where the events come from.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::host::{EventKind, HostDevice, HostEvent};
use crate::pci::PciAddress;
use crate::service::placement::{placement, Needed};
use crate::service::Service;

/// The most events handled as one batch.
const MAX_BATCH: usize = 4096;

pub enum Msg {
    Event(HostEvent),
    /// Answered once every event sent before it has been handled.
    Sync(oneshot::Sender<()>),
}

pub type Sender = mpsc::UnboundedSender<Msg>;
pub type Receiver = mpsc::UnboundedReceiver<Msg>;

pub fn channel() -> (Sender, Receiver) {
    mpsc::unbounded_channel()
}

/// Runs until every sender is gone.
pub fn spawn_dispatcher(service: Arc<Service>, mut rx: Receiver) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut batch = Vec::new();
            let mut syncs = Vec::new();
            let mut next = Some(first);
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(e),
                    Msg::Sync(s) => syncs.push(s),
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                service.on_events(batch).await;
            }
            for s in syncs {
                let _ = s.send(());
            }
        }
    })
}

/// Waits until the dispatcher has handled everything sent so far.
pub async fn sync(tx: &Sender) {
    let (done, wait) = oneshot::channel();
    if tx.send(Msg::Sync(done)).is_ok() {
        let _ = wait.await;
    }
}

/// Which netlink group carries events here: `udev` (processed by udevd) when
/// udevd runs, else the raw `kernel` group (nothing arrives on `udev` without
/// udevd, as in containers and test machines).
pub fn netlink_group() -> &'static str {
    if Path::new("/run/udev/control").exists() {
        "udev"
    } else {
        "kernel"
    }
}

/// Opens the udev monitor for subsystem `pci` and forwards its events. Must be
/// called before the first enumeration, so no event falls between the two.
pub fn open_udev(tx: Sender) -> std::io::Result<()> {
    let group = netlink_group();
    let builder = match group {
        "udev" => udev::MonitorBuilder::new()?,
        _ => udev::MonitorBuilder::new_kernel()?,
    };
    let socket = builder.match_subsystem("pci")?.listen()?;
    // SAFETY: the monitor socket owns its file descriptor from `listen()` until
    // it is dropped, which only happens when the AsyncFd holding it is dropped.
    let fd = unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(|e| std::io::Error::other(format!("cannot watch the udev monitor: {e}")))?;
    tracing::info!(group, "listening for PCI uevents");
    tokio::spawn(async move {
        loop {
            let mut guard = match fd.readable().await {
                Ok(g) => g,
                Err(e) => {
                    tracing::error!(error = %e, "the udev monitor failed; hotplug is no longer followed");
                    return;
                }
            };
            for event in guard.get_inner().iter() {
                let Some(ev) = to_host_event(&event) else {
                    continue;
                };
                if tx.send(Msg::Event(ev)).is_err() {
                    return;
                }
            }
            guard.clear_ready();
        }
    });
    Ok(())
}

fn to_host_event(event: &udev::Event) -> Option<HostEvent> {
    let kind = match event.event_type() {
        udev::EventType::Add => EventKind::Add,
        udev::EventType::Remove => EventKind::Remove,
        udev::EventType::Bind => EventKind::Bind,
        udev::EventType::Unbind => EventKind::Unbind,
        udev::EventType::Change => EventKind::Change,
        udev::EventType::Unknown => return None,
    };
    let name = event.sysname().to_string_lossy().into_owned();
    let Ok(address) = PciAddress::parse(&name) else {
        tracing::debug!(sysname = %name, "ignoring a uevent for a non-PCI-function name");
        return None;
    };
    let mut ev = HostEvent::new(kind, address);
    ev.error_event = event.property_value("ERROR_EVENT").is_some();
    Some(ev)
}

impl Service {
    /// Handles a batch of hotplug events (udev, or the simulated kernel).
    ///
    /// Every `add` and `remove` is announced (`HostDeviceAdded`/`Removed`), for
    /// registered and unregistered devices alike. The rest is coalesced per
    /// device: each address in the batch is read once, and a registered device's
    /// object signals only what really changed. A registered device that came
    /// back and should be on vfio-pci is bound again, through the same code and
    /// rollback as `Bind`, in a task of its own so events keep flowing.
    pub async fn on_events(self: &Arc<Self>, batch: Vec<HostEvent>) {
        let mut order: Vec<PciAddress> = Vec::new();
        let mut last: HashMap<PciAddress, EventKind> = HashMap::new();
        let mut added: std::collections::HashSet<PciAddress> = Default::default();
        for ev in &batch {
            if ev.error_event {
                tracing::warn!(pci_address = %ev.address, "the kernel reports a PCIe error event (AER recovery) for this device");
            }
            tracing::debug!(pci_address = %ev.address, action = ev.kind.as_str(), enumerated = ev.enumerated, "host event");
            if !ev.enumerated {
                if let Some(p) = self.publisher() {
                    match ev.kind {
                        EventKind::Add => p.host_added(ev.address).await,
                        EventKind::Remove => p.host_removed(ev.address).await,
                        _ => {}
                    }
                }
                if ev.kind == EventKind::Add {
                    added.insert(ev.address);
                }
            }
            if last.insert(ev.address, ev.kind).is_none() {
                order.push(ev.address);
            }
        }
        // The enumeration already read its devices; the rest are read in one go.
        let mut known: HashMap<PciAddress, HostDevice> = batch
            .into_iter()
            .filter_map(|e| e.device.map(|d| (e.address, d)))
            .collect();
        // The kernel sends `remove` as the device goes: trust it rather than a
        // sysfs read that may still see the last of it.
        let to_read: Vec<PciAddress> = order
            .iter()
            .copied()
            .filter(|a| !known.contains_key(a) && last.get(a) != Some(&EventKind::Remove))
            .collect();
        let read: Vec<_> = match self.door.read_many(to_read.clone()).await {
            Ok(results) => to_read.iter().copied().zip(results).collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh devices after events");
                Vec::new()
            }
        };
        let mut fresh: HashMap<PciAddress, Option<HostDevice>> = HashMap::new();
        for (a, r) in read {
            match r {
                Ok(l) => {
                    fresh.insert(a, l);
                }
                Err(e) => {
                    tracing::warn!(pci_address = %a, error = %e, "cannot refresh the device after an event")
                }
            }
        }
        for address in order {
            let live = if let Some(d) = known.remove(&address) {
                Some(d)
            } else if last.get(&address) == Some(&EventKind::Remove) {
                None
            } else if let Some(l) = fresh.remove(&address) {
                l
            } else {
                continue;
            };
            self.refresh(address, live, added.contains(&address)).await;
        }
    }

    async fn refresh(
        self: &Arc<Self>,
        address: PciAddress,
        live: Option<HostDevice>,
        came_back: bool,
    ) {
        let first_sight = !self.seen().knows(address);
        let stored = {
            let snapshot = self.snapshot();
            match snapshot.by_address(address) {
                // First sight of a registered device (the start-up
                // enumeration): nothing was announced yet, so nothing to
                // compare with; no record is copied.
                Some(_) if first_sight && !came_back => None,
                Some(s) => Some(s.clone()),
                None => None,
            }
        };
        let Some(stored) = stored else {
            self.seen().set(address, live);
            return;
        };
        if first_sight {
            self.seen().set(address, live.clone());
        } else {
            // An operation on the device is under way: it publishes the final
            // state itself, so the intermediate steps it causes are not announced.
            let lock = self.device_lock(address);
            let held = lock.try_lock();
            if held.is_ok() {
                if let Some(prev) = self.seen().get(address) {
                    if prev != live {
                        let before = self.view(stored.clone(), prev);
                        let after = self.view(stored.clone(), live.clone());
                        self.publish_change(&before, &after).await;
                    }
                }
            }
            drop(held);
        }
        // What the event showed is announced first (the native driver, back
        // from the unplug), and only then does the re-claim take the device:
        // clients see the device return before they see it move.
        if came_back && placement(&stored, live.as_ref()).needed() == Needed::Bind {
            tracing::info!(
                pci_address = %address,
                device_id = %stored.id,
                device_name = %stored.name,
                "a registered device came back: moving it to vfio-pci again"
            );
            let this = self.clone();
            let name = stored.name.clone();
            let Ok(target) = self.resolve(&stored.id) else {
                return;
            };
            // Its own task: it waits for the device's lock, and events keep flowing.
            tokio::spawn(async move {
                if let Err(e) = this.reconcile_one(&target).await {
                    tracing::warn!(pci_address = %address, device_name = %name, error = %e, "could not move the returning device to vfio-pci");
                }
            });
        }
    }
}
