//! hypemand: the hypeman-devices system daemon. Thin: options in, `daemon::run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hypeman_devices::bus::BusChoice;
use hypeman_devices::daemon::{self, exit, Options};

/// Keeps the registry of PCI devices set aside for VM passthrough, on D-Bus as
/// org.hypeman.Devices.
#[derive(Parser, Debug)]
#[command(name = "hypemand", version)]
struct Args {
    /// Bus to serve on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system")]
    bus: BusChoice,
    /// Directory holding devices.json [default: $STATE_DIRECTORY, else /var/lib/hypeman]
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Root of the sysfs the real host backend reads and writes.
    #[arg(long, default_value = "/sys")]
    sysfs_root: PathBuf,
    /// Run against a simulated host described by this fixture instead of the real one.
    #[arg(long, value_name = "FIXTURE")]
    simulate: Option<PathBuf>,
    /// With --simulate: keep the simulated kernel's state in this file, so a
    /// daemon restart is not a reboot (delete the file to reboot).
    #[arg(long, value_name = "FILE", requires = "simulate")]
    simulate_state: Option<PathBuf>,
    /// Deadline of each sysfs operation, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = 10.0, value_parser = parse_seconds)]
    sysfs_timeout: f64,
    /// Log filter (error, warn, info, debug, trace, or a tracing directive); RUST_LOG also works.
    #[arg(long)]
    log_level: Option<String>,
}

fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0 and 3600"
        )),
    }
}

/// journald (with structured fields: `pci_address` becomes `PCI_ADDRESS`) when
/// systemd connected stderr to the journal, else human-readable stderr.
fn init_logging(filter: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env_filter = tracing_subscriber::EnvFilter::new(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(env_filter)
                    .with(journald.with_syslog_identifier("hypemand".into()))
                    .init();
                return;
            }
            Err(e) => eprintln!("hypemand: cannot log to journald ({e}); logging to stderr"),
        }
    }
    tracing_subscriber::registry()
        .with(env_filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(exit::USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    init_logging(&filter);

    // STATE_DIRECTORY may list several directories separated by ':'; ours is the first.
    let state_dir = args.state_dir.unwrap_or_else(|| {
        std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|s| s.split(':').next().map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("/var/lib/hypeman"))
    });
    let opts = Options {
        bus: args.bus,
        state_dir,
        sysfs_root: args.sysfs_root,
        simulate: args.simulate,
        simulate_state: args.simulate_state,
        sysfs_timeout: std::time::Duration::from_secs_f64(args.sysfs_timeout),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hypemand: cannot start the async runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    match runtime.block_on(daemon::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "hypemand stopped");
            eprintln!("hypemand: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
