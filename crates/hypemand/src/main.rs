//! hypemand: the hypeman-devices system daemon. Thin: options in, `daemon::run`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hypemand::args::{write_man_page, DaemonArgs};
use hypemand::daemon::{self, exit, Options};

/// journald (with structured fields: `pci_address` becomes `PCI_ADDRESS`) when
/// systemd connected stderr to the journal, else human-readable stderr.
/// Returns whether logs go to journald.
fn init_logging(filter: &str) -> bool {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let env_filter = tracing_subscriber::EnvFilter::new(filter);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journald) => {
                tracing_subscriber::registry()
                    .with(env_filter)
                    // No prefix: fields are PCI_ADDRESS, not F_PCI_ADDRESS
                    // (tracing-journald's default), as the README promises.
                    .with(
                        journald
                            .with_syslog_identifier("hypemand".into())
                            .with_field_prefix(None),
                    )
                    .init();
                return true;
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
    false
}

fn main() -> ExitCode {
    hypemand::memory::tune_allocator();
    // A file size limit reached is a failed write (EFBIG, the caller gets
    // StoreFailed), not a killed daemon, as PostgreSQL does.
    // SAFETY: setting a signal's disposition to ignore, before any thread starts.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    let args = match DaemonArgs::try_parse() {
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
    if let Some(dir) = &args.write_man_page {
        return match write_man_page(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hypemand: cannot write to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let filter = args
        .log_level
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".into());
    let journald = init_logging(&filter);

    // STATE_DIRECTORY may list several directories separated by ':'; ours is the first.
    let state_dir = args.state_dir.unwrap_or_else(|| {
        std::env::var("STATE_DIRECTORY")
            .ok()
            .and_then(|s| s.split(':').next().map(PathBuf::from))
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or_else(|| PathBuf::from("/var/lib/hypeman"))
    });
    let system_bus = matches!(args.bus, hypeman_api::BusChoice::System);
    let opts = Options {
        bus: args.bus,
        state_dir,
        sysfs_root: args
            .sysfs_root
            .unwrap_or_else(|| args.host_root.join("sys")),
        proc_root: args.host_root.join("proc"),
        modules_root: args.host_root.join("lib/modules"),
        api_socket: match args.api_socket {
            Some(p) if p.as_os_str() == "none" => None,
            Some(p) => Some(p),
            None if system_bus => Some(PathBuf::from("/run/hypeman/devices.sock")),
            None => None,
        },
        simulate: args.simulate,
        simulate_state: args.simulate_state,
        sysfs_timeout: std::time::Duration::from_secs_f64(args.sysfs_timeout),
        usage_timeout: std::time::Duration::from_secs_f64(args.usage_timeout),
        journal_limit: args.journal_limit,
        metrics_listen: args.metrics_listen,
        health_threshold: args.health_threshold,
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
    let deadline = opts.sysfs_timeout;
    let result = runtime.block_on(daemon::run(opts));
    // A host call stuck in the kernel keeps its blocking thread; do not wait
    // for it past one more deadline, or SIGTERM would hang with it.
    runtime.shutdown_timeout(deadline);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once: to the journal as a structured line, or to stderr as a
            // plain one (the log line would only repeat it there).
            if journald {
                tracing::error!(error = %e, "hypemand stopped");
            } else {
                eprintln!("hypemand: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}
