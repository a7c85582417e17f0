//! hypeman-device-plugin: see the library's documentation.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hypeman_api::BusChoice;
use hypeman_device_plugin::config::Config;
use hypeman_device_plugin::kubelet::{self, Served, KUBELET_SOCKET};
use hypeman_device_plugin::node::Node;
use inotify::{Inotify, WatchMask};
use tokio_stream::StreamExt;

/// Offers the devices hypemand sets aside to the kubelet as extended
/// resources (device plugin API v1beta1).
#[derive(Parser, Debug)]
#[command(name = "hypeman-device-plugin", version)]
struct Args {
    /// Bus hypemand is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system")]
    bus: BusChoice,
    /// The kubelet's device plugin directory.
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/kubelet/device-plugins"
    )]
    kubelet_dir: PathBuf,
    /// The kubelet's PodResources socket.
    #[arg(
        long,
        value_name = "PATH",
        default_value = "/var/lib/kubelet/pod-resources/kubelet.sock"
    )]
    pod_resources: PathBuf,
    /// How often the pods' devices are read from PodResources, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0)]
    pod_resources_interval: f64,
    /// Resource rules (TOML) [default: every device in hypeman.io/<type>]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hypeman-device-plugin: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypeman-device-plugin: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The resources to serve: every rule's, and the defaults.
fn resources(config: &Config) -> Vec<String> {
    let mut r: Vec<String> = config.resources.iter().map(|r| r.name.clone()).collect();
    if config.default {
        for kind in ["gpu", "pci"] {
            r.push(format!("hypeman.io/{kind}"));
        }
    }
    r.extend(config.vgpus.iter().map(|v| v.resource()));
    r.sort();
    r.dedup();
    r
}

/// Serves and registers every resource; what failed to register waits for
/// the next kubelet start.
async fn start(dir: &Path, names: &[String], node: &Arc<Node>) -> Result<Vec<Served>, String> {
    let mut served = Vec::new();
    for name in names {
        served.push(kubelet::serve(dir, name, node.clone()).map_err(|e| e.to_string())?);
    }
    if dir.join(KUBELET_SOCKET).exists() {
        for s in &served {
            if let Err(e) = kubelet::register(dir, s).await {
                tracing::warn!(resource = %s.resource, error = %e, "registration failed; waiting for the kubelet");
            }
        }
    } else {
        tracing::info!(dir = %dir.display(), "no kubelet.sock yet; waiting for the kubelet");
    }
    Ok(served)
}

async fn run(args: Args) -> Result<(), String> {
    let config = match &args.config {
        Some(p) => Config::load(p).map_err(|e| e.to_string())?,
        None => Config::default(),
    };
    let names = resources(&config);
    let client = hypemanctl::Client::connect(&args.bus)
        .await
        .map_err(|e| e.to_string())?
        .allow_interactive(false);
    let node = Node::new(client, config);
    // Read once before serving: the kubelet's first list is the real one,
    // never an empty list followed by the devices. (`follow` reads again
    // once subscribed, so nothing between the two reads goes unseen.)
    node.refresh().await;
    let _follow = AbortOnDrop(tokio::spawn(node.clone().follow()));
    let every = Duration::from_secs_f64(args.pod_resources_interval.clamp(0.05, 3600.0));
    let _pods = AbortOnDrop(tokio::spawn(kubelet::follow_pods(
        node.clone(),
        args.pod_resources.clone(),
        names.clone(),
        every,
    )));

    // The kubelet re-creates kubelet.sock when it restarts and removes the
    // plugins' sockets: either means serving and registering again.
    let dir = args.kubelet_dir.clone();
    let inotify = Inotify::init().map_err(|e| format!("inotify: {e}"))?;
    inotify
        .watches()
        .add(
            &dir,
            WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_TO,
        )
        .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
    let mut events = inotify
        .into_event_stream([0u8; 4096])
        .map_err(|e| format!("inotify: {e}"))?;
    let mut served = start(&dir, &names, &node).await?;

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| e.to_string())?;
    let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            ev = events.next() => {
                let Some(Ok(ev)) = ev else { break };
                let name = ev.name.map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let ours = served.iter().any(|s| s.socket.file_name().is_some_and(|f| f.to_string_lossy() == name));
                let created = ev.mask.contains(inotify::EventMask::CREATE) || ev.mask.contains(inotify::EventMask::MOVED_TO);
                let kubelet_back = name == KUBELET_SOCKET && created;
                let ours_gone = ours && ev.mask.contains(inotify::EventMask::DELETE);
                if kubelet_back || ours_gone {
                    tracing::info!(event = %name, "the kubelet restarted: serving and registering again");
                    // Drop first: the old sockets go before the new ones are made.
                    drop(std::mem::take(&mut served));
                    served = start(&dir, &names, &node).await?;
                }
            }
        }
    }
    tracing::info!("stopping: removing the plugin sockets");
    drop(served);
    Ok(())
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
