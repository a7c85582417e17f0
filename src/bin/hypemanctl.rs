//! hypemanctl: the command-line client of hypemand. Thin: parse, call, print.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hypeman_devices::bus::record::{Available, Record};
use hypeman_devices::bus::BusChoice;
use hypeman_devices::client::{available_json, seed_json, Client, ClientError};

/// Register and inspect PCI devices set aside for VM passthrough.
#[derive(Parser, Debug)]
#[command(name = "hypemanctl", version)]
struct Args {
    /// Bus hypemand is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", global = true)]
    bus: BusChoice,
    /// Print JSON (the seed's documents) instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Register a host PCI device for passthrough.
    Register {
        pci_address: String,
        /// Name for the device [default: pci-<address>]
        #[arg(long)]
        name: Option<String>,
    },
    /// List registered devices.
    List,
    /// Show one registered device by id or name.
    Get { id_or_name: String },
    /// Unregister a device.
    Delete { id_or_name: String },
    /// List every PCI device on the host.
    Available,
}

fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hypemanctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hypemanctl: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<(), ClientError> {
    let client = Client::connect(&args.bus).await?;
    match args.command {
        Command::Register { pci_address, name } => {
            let r = client
                .register(&pci_address, name.as_deref().unwrap_or(""))
                .await?;
            print_records(&[r], args.json);
        }
        Command::List => print_records(&client.list().await?, args.json),
        Command::Get { id_or_name } => print_records(&[client.get(&id_or_name).await?], args.json),
        Command::Delete { id_or_name } => {
            client.delete(&id_or_name).await?;
            if !args.json {
                println!("deleted {id_or_name}");
            }
        }
        Command::Available => print_available(&client.available().await?, args.json),
    }
    Ok(())
}

fn print_json(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn print_records(records: &[Record], json: bool) {
    if json {
        match records {
            [one] => print_json(&seed_json(one)),
            many => print_json(&serde_json::Value::Array(
                many.iter().map(seed_json).collect(),
            )),
        }
        return;
    }
    println!(
        "{:<24}  {:<16}  {:<12}  {:<4}  {:>5}  {:<12}  {:<4}  {:<10}  DEVICE",
        "ID", "NAME", "PCI ADDRESS", "TYPE", "GROUP", "DRIVER", "VFIO", "ATTACHED"
    );
    for r in records {
        println!(
            "{:<24}  {:<16}  {:<12}  {:<4}  {:>5}  {:<12}  {:<4}  {:<10}  {} {}",
            r.id,
            r.name,
            r.pci_address,
            r.kind,
            r.iommu_group
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            r.driver.as_deref().unwrap_or("-"),
            if r.bound_to_vfio { "yes" } else { "no" },
            r.attached_to.as_deref().unwrap_or("-"),
            r.vendor_name,
            r.device_name
        );
    }
}

fn print_available(devices: &[Available], json: bool) {
    if json {
        print_json(&serde_json::Value::Array(
            devices.iter().map(available_json).collect(),
        ));
        return;
    }
    println!(
        "{:<12}  {:<9}  {:<4}  {:>5}  {:<14}  {:<24}  DEVICE",
        "PCI ADDRESS", "ID", "TYPE", "GROUP", "DRIVER", "REGISTERED AS"
    );
    for d in devices {
        println!(
            "{:<12}  {}:{}  {:<4}  {:>5}  {:<14}  {:<24}  {} {}",
            d.pci_address,
            d.vendor_id,
            d.device_id,
            d.kind,
            d.iommu_group
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into()),
            d.current_driver.as_deref().unwrap_or("-"),
            d.registered_as.as_deref().unwrap_or("-"),
            d.vendor_name,
            d.device_name
        );
    }
}
