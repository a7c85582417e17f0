//! `hypemand`'s command line.

use std::path::PathBuf;

use clap::Parser;
use hypeman_api::BusChoice;

/// Keeps the registry of PCI devices set aside for VM passthrough, on D-Bus as
/// org.hypeman.Devices.
#[derive(Parser, Debug)]
#[command(
    name = "hypemand",
    version,
    after_help = "Exit status: 0 stopped by SIGTERM or SIGINT; 1 any other failure; 2 bad options; 3 the state cannot be used; 4 the bus name is taken (another hypemand runs); 5 the bus cannot be reached; 6 the host cannot be used; 7 the REST API socket cannot be served; 8 the metrics address cannot be served."
)]
pub struct DaemonArgs {
    /// Bus to serve on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system")]
    pub bus: BusChoice,
    /// Directory holding devices.json and its journal [default: $STATE_DIRECTORY, else /var/lib/hypeman]
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Root of the host the real backend reads: DIR/sys, and DIR/proc for
    /// mounts, swap, routes and open device nodes.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
    /// Root of the sysfs the real backend reads and writes, overriding
    /// HOST_ROOT/sys (sysfs only) [default: HOST_ROOT/sys]
    #[arg(long, value_name = "DIR")]
    pub sysfs_root: Option<PathBuf>,
    /// Run against a simulated host described by this fixture instead of the real one.
    #[arg(long, value_name = "FIXTURE")]
    pub simulate: Option<PathBuf>,
    /// With --simulate: keep the simulated kernel's state in this file, so a
    /// daemon restart is not a reboot (delete the file to reboot).
    #[arg(long, value_name = "FILE", requires = "simulate")]
    pub simulate_state: Option<PathBuf>,
    /// Serve Hypeman's /devices REST API on this unix socket ("none": do not)
    /// [default: /run/hypeman/devices.sock on the system bus, else none]
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Serve OpenMetrics at http://ADDR:PORT/metrics (reads only, no
    /// authorization; port 0 picks a free one, logged at start-up)
    /// [default: not served]
    #[arg(long, value_name = "ADDR:PORT", env = "HYPEMAND_METRICS_LISTEN")]
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How many new non-fatal and correctable PCIe errors since
    /// registration make a device's health "degraded".
    #[arg(long, value_name = "COUNT", default_value_t = crate::service::health::DEFAULT_THRESHOLD)]
    pub health_threshold: u64,
    /// Deadline of each sysfs operation, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_seconds)]
    pub sysfs_timeout: f64,
    /// Budget of one walk of /proc for who holds a device open, in seconds.
    /// A walk past it stops and says how far it got; Bind and Attach then
    /// answer Busy unless forced.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0, value_parser = parse_seconds)]
    pub usage_timeout: f64,
    /// Compact the journal into devices.json once it holds this many bytes
    /// [default: 1 MiB, or the size of devices.json if larger]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    pub journal_limit: Option<u64>,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Write the man page hypemand.8 into DIR and exit (used by make install).
    #[arg(long, value_name = "DIR", hide = true)]
    pub write_man_page: Option<PathBuf>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 3600"
        )),
    }
}

/// Writes `hypemand.8` into `dir`.
pub fn write_man_page(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    std::fs::create_dir_all(dir)?;
    let mut page = std::fs::File::create(dir.join("hypemand.8"))?;
    clap_mangen::Man::new(DaemonArgs::command())
        .section("8")
        .render(&mut page)
}
