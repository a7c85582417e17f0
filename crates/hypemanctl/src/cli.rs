//! `hypemanctl`'s command line, from which `hypemanctl generate-assets` also
//! writes its man page and shell completions.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use hypeman_api::BusChoice;

/// Register PCI devices for VM passthrough and move them to vfio-pci and back,
/// through hypemand.
#[derive(Parser, Debug)]
#[command(
    name = "hypemanctl",
    version,
    disable_help_subcommand = true,
    after_help = "Exit status: 0 success; 1 the daemon refused or could not be reached (one line on stderr says why); 2 bad usage."
)]
pub struct CtlArgs {
    /// Bus hypemand is on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system", global = true)]
    pub bus: BusChoice,
    /// Print JSON (the seed's documents) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Let polkit ask for a password [default: yes when stdin is a terminal]
    #[arg(long, global = true, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub allow_interactive: Option<bool>,
    /// What to do.
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum CtlCommand {
    /// Register a host PCI device for passthrough.
    Register {
        /// dddd:bb:dd.f or bb:dd.f
        pci_address: String,
        /// Name for the device [default: pci-ADDRESS, e.g. pci-0000-a2-00-0]
        #[arg(long)]
        name: Option<String>,
        /// A tag, KEY=VALUE (repeatable).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// List registered devices.
    List {
        /// Only devices with this tag, KEY=VALUE (repeatable: every one must match).
        #[arg(long = "tag", value_name = "KEY=VALUE", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Set or remove a device's tags.
    Tag {
        /// The device's id or name.
        id_or_name: String,
        /// Tags to set, KEY=VALUE.
        #[arg(value_name = "KEY=VALUE", value_parser = parse_tag)]
        set: Vec<(String, String)>,
        /// A tag key to remove (repeatable).
        #[arg(long = "remove", value_name = "KEY")]
        remove: Vec<String>,
    },
    /// Show one registered device.
    Get {
        /// The device's id or name.
        id_or_name: String,
    },
    /// Unregister a device (gives it back to its driver first if hypemand took it).
    Delete {
        /// The device's id or name.
        id_or_name: String,
    },
    /// List the host's PCI devices with what blocks each (with --json, only
    /// the passable ones, in the seed's shape, unless --all).
    Available {
        /// With --json: every function, with `passable` and `blockers`.
        #[arg(long)]
        all: bool,
    },
    /// Move a device to vfio-pci.
    Bind {
        /// The device's id or name.
        id_or_name: String,
        /// Take it even though the host is using it (its display, a mounted
        /// disk, a routed interface, an open node, its group): needs the
        /// org.hypeman.devices.force authorization. Never overrides no-iommu
        /// or bridge.
        #[arg(long)]
        force: bool,
    },
    /// Give a device back to its host driver.
    Unbind {
        /// The device's id or name.
        id_or_name: String,
    },
    /// Bind if needed, then mark a device as held by a VM instance.
    Attach {
        /// The device's id or name.
        id_or_name: String,
        /// The instance (VM) that holds it.
        instance: String,
        /// Attach every registered member of the device's IOMMU group (a VM
        /// that holds one function of a group can reach them all).
        #[arg(long)]
        group: bool,
        /// As for bind: take it even though the host is using it.
        #[arg(long)]
        force: bool,
        /// The lease: what releases the device.
        #[command(flatten)]
        lease: LeaseArgs,
        /// Run this command holding the device: attach under a lease on it,
        /// run it, and exit with its status once the device is released.
        #[arg(last = true, value_name = "COMMAND")]
        command: Vec<std::ffi::OsString>,
    },
    /// Clear a device's attachment (it stays on vfio-pci).
    Detach {
        /// The device's id or name.
        id_or_name: String,
    },
    /// Give a registered SR-IOV physical function COUNT virtual functions
    /// (0 removes them); answers once they have all appeared. Needs the
    /// org.hypeman.devices.partition authorization. Refused while one of its
    /// virtual functions is on vfio-pci or attached.
    Sriov {
        /// The physical function's id or name.
        id_or_name: String,
        /// How many virtual functions, at most its sriov_total_vfs.
        count: u32,
    },
    /// The host's GPU capacity: vGPU profiles and how many more fit, or the
    /// whole GPUs (with --json, Hypeman's GPUResourceStatus document).
    Resources,
    /// vGPUs on registered GPUs.
    Vgpu {
        /// What to do with them.
        #[command(subcommand)]
        command: VgpuCommand,
    },
    /// Print one line per event as it happens (Ctrl-C to stop).
    Monitor,
    /// The daemon's version and counts.
    Status,
    /// Write shell completions and man pages into a directory (used by make install).
    #[command(hide = true)]
    GenerateAssets {
        /// Where to write them.
        dir: PathBuf,
    },
}

/// The `vgpu` subcommands.
#[derive(Subcommand, Debug)]
pub enum VgpuCommand {
    /// The vGPU types each registered GPU offers now, and how many more fit.
    Types,
    /// Make a vGPU of PROFILE (a name `vgpu types` shows) on the least
    /// loaded registered GPU that offers it. Needs the
    /// org.hypeman.devices.partition authorization.
    Create {
        /// The profile: `NVIDIA L40S-4Q`.
        profile: String,
        /// The instance (VM) that will hold it.
        #[arg(long)]
        instance: Option<String>,
        /// Only on this registered GPU (id, name or PCI address).
        #[arg(long)]
        parent: Option<String>,
        /// Only on a GPU on this NUMA node.
        #[arg(long)]
        numa_node: Option<u32>,
        /// The lease: what releases the vGPU (detach clears its instance,
        /// give-back deletes it).
        #[command(flatten)]
        lease: LeaseArgs,
    },
    /// Delete a vGPU; refused while a process (the VM) holds it.
    Delete {
        /// The vGPU's id.
        id: String,
    },
    /// The vGPUs hypemand made.
    List,
}

/// *(issue 27)* A lease's options, for `attach` and `vgpu create`.
#[derive(Args, Debug, Default)]
pub struct LeaseArgs {
    /// Lease it to this process: hypemand releases it when the process
    /// ends (hypemanctl opens its pidfd).
    #[arg(long, value_name = "PID", conflicts_with = "holder_unit")]
    pub holder_pid: Option<u32>,
    /// Lease it to this systemd unit (the VM's service or scope): hypemand
    /// releases it when the unit stops, fails, or runs again as another
    /// invocation.
    #[arg(long, value_name = "UNIT")]
    pub holder_unit: Option<String>,
    /// What the holder's end does: detach (the default) or give-back
    /// (a device goes back to its host driver too; a vGPU is deleted).
    #[arg(long, value_name = "WHAT", value_parser = ["detach", "give-back"])]
    pub on_release: Option<String>,
}

/// `KEY=VALUE` (the value may be empty or contain `=`).
fn parse_tag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// Writes bash, zsh and fish completions and the man page of hypemanctl into
/// `dir` (hypemand writes its own: `hypemand --write-man-page DIR`).
pub fn generate_assets(dir: &std::path::Path) -> std::io::Result<()> {
    use clap::CommandFactory;
    use clap_complete::Shell;
    std::fs::create_dir_all(dir)?;
    for (shell, file) in [
        (Shell::Bash, "hypemanctl.bash"),
        (Shell::Zsh, "_hypemanctl"),
        (Shell::Fish, "hypemanctl.fish"),
    ] {
        let mut out = std::fs::File::create(dir.join(file))?;
        clap_complete::generate(shell, &mut CtlArgs::command(), "hypemanctl", &mut out);
    }
    let cmd = CtlArgs::command();
    let mut ctl = std::fs::File::create(dir.join("hypemanctl.1"))?;
    clap_mangen::Man::new(cmd.clone()).render(&mut ctl)?;
    // hypemanctl(1) refers to hypemanctl-<command>(1): one page each.
    // and a command with commands of its own (vgpu) to
    // hypemanctl-<command>-<subcommand>(1).
    let version = cmd.get_version().unwrap_or_default().to_string();
    let mut pages: Vec<(String, clap::Command)> = Vec::new();
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("hypemanctl-{}", sub.get_name());
        for nested in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            pages.push((format!("{name}-{}", nested.get_name()), nested.clone()));
        }
        pages.push((name, sub.clone()));
    }
    for (name, page) in pages {
        let page = page.name(name.clone()).version(version.clone());
        let mut f = std::fs::File::create(dir.join(format!("{name}.1")))?;
        clap_mangen::Man::new(page).render(&mut f)?;
    }
    Ok(())
}
