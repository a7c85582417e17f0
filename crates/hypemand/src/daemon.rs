//! `hypemand`'s life: load, reconcile, serve, and shut down once, properly.

use std::path::PathBuf;
use std::sync::Arc;

use crate::edge::authz::Authz;
use crate::edge::dbus::{self as bus, BusChoice, ServeError};
use crate::edge::polkit::Bouncer;
use crate::edge::{systemd, udev as hotplug};
use crate::host::door::Door;
use crate::host::sim::{FixtureError, SimHost};
use crate::host::sysfs::SysfsHost;
use crate::host::units::Units;
use crate::host::{EventKind, Host, HostEvent};
use crate::pci::PciIds;
use crate::service::commit::Commits;
use crate::service::Service;
use crate::store::{Loaded, Store, StoreError};

/// Everything `hypemand` can be told on its command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// Which bus to serve on.
    pub bus: BusChoice,
    /// Where `devices.json` and its journal live.
    pub state_dir: PathBuf,
    /// The sysfs to read and write (`/sys`, or a tree for tests).
    pub sysfs_root: PathBuf,
    /// procfs, for how the host uses its devices.
    pub proc_root: PathBuf,
    /// *(issue 28)* The kernel modules' directory (`modules.alias` names
    /// the vfio variant drivers).
    pub modules_root: PathBuf,
    /// Where Hypeman's REST API is served (systemd's socket wins); none: not.
    pub api_socket: Option<PathBuf>,
    /// A fixture: serve a simulated host instead of sysfs.
    pub simulate: Option<PathBuf>,
    /// With `simulate`: where the simulated kernel keeps its state between
    /// daemon runs (absent: every start is a fresh boot).
    pub simulate_state: Option<PathBuf>,
    /// The deadline of each sysfs operation.
    pub sysfs_timeout: std::time::Duration,
    /// The budget of one walk of /proc for how the host uses its devices.
    pub usage_timeout: std::time::Duration,
    /// The journal's compaction size (none: the default rule).
    pub journal_limit: Option<u64>,
    /// *(issue 29)* Where OpenMetrics is served; none: not.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// *(issue 29)* New non-fatal and correctable errors that make a
    /// device `degraded`.
    pub health_threshold: u64,
}

/// Why the daemon stopped with a failure. Each kind has its own exit status (see
/// README "Exit status"), so a supervisor can tell them apart.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The state directory or the registry in it cannot be used.
    #[error(transparent)]
    State(#[from] StoreError),
    /// The state directory cannot be created.
    #[error("cannot create the state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The simulated host's fixture cannot be used.
    #[error(transparent)]
    Fixture(#[from] FixtureError),
    /// The bus cannot be served (or the name is taken).
    #[error(transparent)]
    Bus(#[from] ServeError),
    /// The REST socket cannot be served.
    #[error(transparent)]
    Api(#[from] crate::edge::rest::SocketError),
    /// *(issue 29)* The metrics address cannot be served.
    #[error("cannot serve metrics on {address}: {source}")]
    Metrics {
        /// The address asked for.
        address: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// SIGTERM and SIGINT cannot be handled.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    /// The store's writer thread cannot be started.
    #[error("cannot start the store's writer thread: {0}")]
    Writer(#[source] std::io::Error),
    /// A start-up thread panicked (what it said).
    #[error("a start-up thread failed: {0}")]
    Thread(String),
}

/// Exit statuses. 2 is left to the argument parser (bad options).
pub mod exit {
    /// Any other failure.
    pub const FAILURE: u8 = 1;
    /// Bad options (the argument parser's).
    pub const USAGE: u8 = 2;
    /// The state directory or the registry cannot be used.
    pub const STATE: u8 = 3;
    /// Another hypemand owns the name on this bus.
    pub const NAME_TAKEN: u8 = 4;
    /// The bus cannot be reached or served.
    pub const BUS: u8 = 5;
    /// The host (a fixture) cannot be used.
    pub const HOST: u8 = 6;
    /// The REST socket cannot be served.
    pub const API: u8 = 7;
    /// *(issue 29)* The metrics address cannot be served.
    pub const METRICS: u8 = 8;
}

impl DaemonError {
    /// The exit status this failure stops the daemon with.
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::State(_) | DaemonError::StateDir { .. } => exit::STATE,
            DaemonError::Fixture(_) => exit::HOST,
            DaemonError::Bus(ServeError::NameTaken) => exit::NAME_TAKEN,
            DaemonError::Bus(_) => exit::BUS,
            DaemonError::Api(_) => exit::API,
            DaemonError::Metrics { .. } => exit::METRICS,
            DaemonError::Signals(_) | DaemonError::Writer(_) | DaemonError::Thread(_) => {
                exit::FAILURE
            }
        }
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn run(opts: Options) -> Result<(), DaemonError> {
    // Start-up's phases are logged with the time since this point.
    let began = std::time::Instant::now();
    let ms = move || began.elapsed().as_secs_f64() * 1e3;
    crate::pause::configure(opts.simulate.is_some());
    let store = Store::new(&opts.state_dir);
    // The store, the PCI ID database and a simulated host are read at once,
    // each on its own thread: start-up takes the longest of them, not the sum.
    let (sim, opened, ids) = std::thread::scope(|s| {
        let opened = s.spawn(|| {
            std::fs::create_dir_all(&opts.state_dir).map_err(|source| DaemonError::StateDir {
                path: opts.state_dir.clone(),
                source,
            })?;
            let opened = store.open()?;
            tracing::debug!(elapsed_ms = ms(), "store read");
            Ok::<_, DaemonError>(opened)
        });
        let ids = s.spawn(PciIds::load);
        let sim = opts
            .simulate
            .as_ref()
            .map(|fixture| SimHost::open(fixture, opts.simulate_state.as_deref()).map(Arc::new))
            .transpose();
        tracing::debug!(elapsed_ms = ms(), "host opened");
        let join = |e: Box<dyn std::any::Any + Send>| {
            let why = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "it panicked".into());
            DaemonError::Thread(why)
        };
        (
            sim,
            opened.join().map_err(join).and_then(|r| r),
            ids.join().map_err(join),
        )
    });
    let (sim, opened, ids) = (sim?, opened?, ids?);
    let host: Arc<dyn Host> = match &sim {
        Some(sim) => sim.clone(),
        None => Arc::new(
            SysfsHost::new(&opts.sysfs_root)
                .with_proc(&opts.proc_root)
                .with_modules(&opts.modules_root),
        ),
    };
    let running_kernel = opts.sysfs_root == std::path::Path::new("/sys");
    // Services that hold devices are systemd's on the running kernel, the
    // fixture's on a simulated host, and nobody's on a --sysfs-root tree.
    let units = match &sim {
        Some(sim) => Units::Sim(sim.clone()),
        None if running_kernel => Units::Systemd(Default::default()),
        None => Units::None,
    };
    let load_note = match &opened.loaded {
        Loaded::Dropped { dropped, aside } => Some(format!(
            "{dropped} record{} dropped at start-up (original kept at {})",
            if *dropped == 1 { "" } else { "s" },
            aside
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )),
        _ => None,
    };
    tracing::info!(
        host = %host.describe(),
        registry = %store.path().display(),
        elapsed_ms = ms(),
        devices = opened.registry.len(),
        replayed = opened.replayed,
        pci_ids = %ids.source(),
        "starting"
    );
    let door = Door::new(host.clone(), opts.sysfs_timeout)
        .with_usage_deadline(opts.usage_timeout)
        .with_units(units);
    let commits = Commits::start(store, opened, opts.journal_limit).map_err(DaemonError::Writer)?;
    let service = Service::new(door.clone(), ids, commits);
    service.set_health_threshold(opts.health_threshold);
    // *(issue 28)* A boot whose IOMMU groups are overridden is said on the
    // status line for as long as the daemon runs.
    let acs_override = door.acs_override().await.unwrap_or(false);
    if acs_override {
        tracing::warn!(
            "the kernel runs with pcie_acs_override=: IOMMU groups are not isolation boundaries"
        );
    }
    let notes: Vec<String> = load_note
        .into_iter()
        .chain(acs_override.then(|| crate::service::warnings::ACS_OVERRIDE_NOTE.to_string()))
        .collect();
    if !notes.is_empty() {
        service.set_status_note(notes.join("; "));
    }

    // *(issue 28)* The vfio variant drivers this kernel has, before the
    // host is enumerated: what is on vfio is counted by them from the first
    // event on.
    let variants = door.load_vfio_aliases().await;
    tracing::info!(variants, "vfio variant drivers named by modules.alias");

    // Events first, enumeration second: nothing can happen in between unseen.
    let (events, rx) = hotplug::channel();
    if let Some(sim) = &sim {
        let tx = events.clone();
        sim.set_event_sink(Box::new(move |e| {
            let _ = tx.send(hotplug::Msg::Event(e));
        }));
        let tx = events.clone();
        sim.set_lost_sink(Box::new(move || {
            let _ = tx.send(hotplug::Msg::Lost);
        }));
        service.follow_events();
    } else if running_kernel {
        match hotplug::open_udev(events.clone()) {
            Ok(()) => service.follow_events(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the udev monitor; hotplug will not be followed, and every read goes to sysfs")
            }
        }
    } else {
        tracing::info!(sysfs_root = %opts.sysfs_root.display(), "not the running kernel's sysfs: hotplug is not followed");
    }
    let _dispatcher = hotplug::spawn_dispatcher(service.clone(), rx);
    match door.devices().await {
        Ok(devices) => {
            for d in devices {
                let mut ev = HostEvent::new(EventKind::Add, d.address);
                ev.enumerated = true;
                ev.device = Some(d);
                let _ = events.send(hotplug::Msg::Event(ev));
            }
        }
        Err(e) => tracing::error!(error = %e, "cannot enumerate the host's PCI devices"),
    }
    hotplug::sync(&events).await;
    service.remember_absent();
    tracing::debug!(elapsed_ms = ms(), "host enumerated");
    // Desired state next (after a reboot the devices are back on their native
    // drivers), so the first client already sees them where they belong.
    // *(issue 28)* Before anything is re-bound: identities learned, a card
    // that is not the registered one said.
    service.check_identities().await;
    service.reconcile().await;
    // vGPUs claimed before a crash: kept or undone before anyone is answered.
    service.reconcile_vgpus().await;
    // Leases whose holder ended while hypemand was not watching: released.
    // Unit holders are asked about on the daemon's own bus, connected here
    // (nothing is exported and no name is taken until serve).
    let (conn, fallback) = bus::connect(&opts.bus).await?;
    service.set_holders_bus(conn.clone());
    service.reconcile_leases().await;
    tracing::debug!(elapsed_ms = ms(), "host reconciled");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(DaemonError::Signals)?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(DaemonError::Signals)?;

    // The API socket before the bus name: a daemon that cannot serve what it
    // was told to fails before it takes the name.
    let api_socket = match crate::edge::rest::activated()? {
        Some(l) => Some(l),
        None => match &opts.api_socket {
            Some(path) => Some(crate::edge::rest::listen(path)?),
            None => None,
        },
    };
    // *(issue 29)* Likewise the metrics address.
    let metrics = match opts.metrics_listen {
        Some(address) => Some(
            crate::edge::metrics::listen(address)
                .await
                .map_err(|source| DaemonError::Metrics { address, source })?,
        ),
        None => None,
    };
    tracing::debug!(elapsed_ms = ms(), "serving on the bus");
    // One connection, one bouncer and one gate for the daemon's life, shared
    // by every edge: the REST edge holds no bus connection of its own.
    let bouncer = Bouncer::new(&conn)
        .await
        .map_err(|e| DaemonError::Bus(ServeError::Connect(e)))?;
    let authz = Arc::new(Authz::new(service.clone(), Arc::new(bouncer)));
    let sim = sim.map(|s| (s, events.clone()));
    bus::serve(&conn, &fallback, service.clone(), authz.clone(), sim).await?;
    let api_created = api_socket.as_ref().and_then(|l| l.created.clone());
    let _api = api_socket.map(|l| {
        let api = crate::edge::rest::Api::new(service.clone(), authz.clone());
        AbortOnDrop(tokio::spawn(crate::edge::rest::serve(l.listener, api)))
    });
    let _metrics = metrics.map(|l| {
        AbortOnDrop(tokio::spawn(crate::edge::metrics::serve(
            l,
            service.clone(),
        )))
    });
    let summary = service.summary();
    tracing::info!(name = hypeman_api::BUS_NAME, status = %summary, elapsed_ms = ms(), "ready");
    systemd::ready(&summary);
    crate::memory::release_free_memory();
    let _status = systemd::spawn_status(service.clone());
    let _watchdog = systemd::spawn_watchdog(service.clone());

    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
    systemd::stopping();
    // Let a change that is being written finish before the name goes away.
    service.quiesce().await;
    if let Err(e) = conn.release_name(hypeman_api::BUS_NAME).await {
        tracing::warn!(error = %e, "could not release the bus name");
    }
    if let Some(path) = api_created {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}

/// A task stopped when its handle goes.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
