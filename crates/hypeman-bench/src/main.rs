//! hypeman-bench: measures hypemand against the D-Bus floor. Thin: options in,
//! `bench::run`, JSON on stdout, a table on stderr.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use hypeman_bench::{self as bench, Config};

/// Benchmark hypemand on a generated simulated host.
#[derive(Parser, Debug)]
#[command(name = "hypeman-bench", version)]
struct Args {
    /// Number of PCI functions on the host, all registered.
    #[arg(long, default_value_t = 4096)]
    devices: usize,
    /// Fewer iterations (a smoke run).
    #[arg(long)]
    quick: bool,
    /// Run at N = 256, 1024, 4096 and 16384 and print the scaling table.
    #[arg(long)]
    scaling: bool,
    /// The hypemand to measure [default: the one next to this program]
    #[arg(long)]
    hypemand: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let hypemand = args.hypemand.unwrap_or_else(bench::default_hypemand);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hypeman-bench: {e}");
            return ExitCode::FAILURE;
        }
    };
    let sizes = if args.scaling {
        vec![256, 1024, 4096, 16384]
    } else {
        vec![args.devices]
    };
    let mut runs = Vec::new();
    for n in sizes {
        let cfg = Config {
            devices: n,
            quick: args.quick,
            hypemand: hypemand.clone(),
        };
        match runtime.block_on(bench::run(&cfg)) {
            Ok(figures) => {
                eprintln!("== N = {n}\n{}", bench::table(&figures));
                runs.push(serde_json::Value::Object(figures));
            }
            Err(e) => {
                eprintln!("hypeman-bench: N = {n}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.scaling {
        let maps: Vec<_> = runs.iter().filter_map(|r| r.as_object().cloned()).collect();
        eprintln!("== across sizes (issues 18 and 30)");
        for line in bench::scaling_verdicts(&maps) {
            eprintln!("{line}");
        }
    }
    let out = match runs.as_slice() {
        [one] => one.clone(),
        _ => serde_json::Value::Array(runs),
    };
    println!("{out}");
    ExitCode::SUCCESS
}
