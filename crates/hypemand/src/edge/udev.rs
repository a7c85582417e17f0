//! The udev edge: kernel hotplug events in, one ordered stream into the service.
//!
//! Both the udev monitor (real host) and the simulated kernel feed the same
//! channel, and one dispatcher task drains it in batches, so a burst of events
//! costs one read per device rather than one per event, and never blocks a
//! method call: the dispatcher is just another task on the runtime. This
//! layer only delivers events: what a batch means for the registered devices
//! is the service's to decide ([`Service::on_events`], in `service/hotplug.rs`).

use std::path::Path;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, oneshot};

use crate::host::{EventKind, HostEvent};
use crate::pci::PciAddress;
use crate::service::Service;

/// The most events handled as one batch.
const MAX_BATCH: usize = 4096;

/// What the dispatcher is sent.
pub enum Msg {
    /// A hotplug event (or one of the start-up enumeration).
    Event(HostEvent),
    /// Answered once every event sent before it has been handled.
    Sync(oneshot::Sender<()>),
    /// *(issue 30)* Events were lost (the monitor's ENOBUFS): every
    /// function is read again.
    Lost,
}

/// Where events are sent.
pub type Sender = mpsc::UnboundedSender<Msg>;
/// Where the dispatcher takes them from.
pub type Receiver = mpsc::UnboundedReceiver<Msg>;

/// The dispatcher's channel. Unbounded: the kernel's events cannot be told to
/// wait, and the dispatcher drains them in batches of at most 4096.
pub fn channel() -> (Sender, Receiver) {
    mpsc::unbounded_channel()
}

/// Runs until every sender is gone.
pub fn spawn_dispatcher(service: Arc<Service>, mut rx: Receiver) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            // *(issue 30)* A read-through that found a device unlike its
            // events asks for what lost events get: a full re-read, in order
            // with the events.
            let (first, mut lost) = tokio::select! {
                msg = rx.recv() => match msg {
                    Some(m) => (Some(m), false),
                    None => break,
                },
                () = service.reread_wanted() => (None, true),
            };
            let mut batch = Vec::new();
            let mut syncs = Vec::new();
            let mut next = first;
            while let Some(msg) = next.take() {
                match msg {
                    Msg::Event(e) => batch.push(e),
                    Msg::Sync(s) => syncs.push(s),
                    Msg::Lost => lost = true,
                }
                if batch.len() < MAX_BATCH {
                    next = rx.try_recv().ok();
                }
            }
            if !batch.is_empty() {
                service.on_events(batch).await;
            }
            // After the events that did arrive: the re-read then sees
            // what they left, and what was lost besides.
            if lost {
                service.reread().await;
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
            // *(issue 30)* The iterator ends where libudev's receive
            // returned nothing, with errno set by that receive: ENOBUFS
            // means the kernel dropped events the socket had no room for.
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOBUFS) {
                tracing::warn!("the uevent queue overflowed (ENOBUFS): events were lost; every device is read again");
                if tx.send(Msg::Lost).is_err() {
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
    let text = |key: &str| {
        event
            .property_value(key)
            .map(|v| v.to_string_lossy().into_owned())
    };
    ev.aer = crate::host::aer::Recovery::from_uevent(
        text("ERROR_EVENT").as_deref(),
        text("DEVICE_ONLINE").as_deref(),
    );
    Some(ev)
}
