//! *(issue 28)* The vfio driver the kernel means for a function.
//!
//! Since 6.x, vfio-pci-core has *variant* drivers for devices that need more
//! than plain vfio-pci (Grace Hopper's `nvgrace_gpu_vfio_pci`, migration
//! capable `mlx5_vfio_pci`, `hisi_acc_vfio_pci`, `pds_vfio_pci`,
//! `virtio_vfio_pci`). Each declares its devices with
//! `PCI_DRIVER_OVERRIDE_DEVICE_VFIO`, which `depmod` writes to
//! `modules.alias` as `alias vfio_pci:<modalias pattern> <module>`; vfio-pci
//! itself declares the catch-all `alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci`.
//! As NVIDIA's k8s-driver-manager does (`internal/nvpassthrough/modalias.go`)
//! and libvirt since 10.0: the function's modalias is split into its seven
//! fields, a pattern field is either `*` or must equal the function's, and
//! of the patterns that match, the one with the fewest wildcards names the
//! driver (the first such line on a tie); `vfio-pci` when none does.
//!
//! A function's modalias is what `modalias_show` (drivers/pci/pci-sysfs.c)
//! prints: `pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X` of the ids and
//! class the daemon already reads, so it is made here rather than read.

use std::sync::OnceLock;

use super::HostDevice;
use hypeman_api::VFIO_DRIVER;

/// The most `alias vfio_pci:` lines kept (a kernel has a few dozen).
const MAX_ALIASES: usize = 4096;

/// The seven fields of a pattern, as numbers; `None` is `*` (any).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fields([Option<u32>; 7]);

impl Fields {
    /// `v…d…sv…sd…bc…sc…i…` (after `vfio_pci:`), each field hex or `*`.
    fn parse(s: &str) -> Option<Fields> {
        let mut rest = s.strip_prefix('v')?;
        let mut text: [&str; 7] = [""; 7];
        for (i, sep) in ["d", "sv", "sd", "bc", "sc", "i"].iter().enumerate() {
            let (before, after) = rest.split_once(sep)?;
            text[i] = before;
            rest = after;
        }
        text[6] = rest;
        let mut out = [None; 7];
        for (slot, t) in out.iter_mut().zip(text) {
            if t != "*" {
                let ok = !t.is_empty() && t.len() <= 8 && t.bytes().all(|b| b.is_ascii_hexdigit());
                *slot = Some(u32::from_str_radix(t, 16).ok().filter(|_| ok)?);
            }
        }
        Some(Fields(out))
    }

    /// Whether this pattern matches a device's fields, and with how many
    /// wildcards. Numbers, not text: a List asks it of every record.
    fn matches(&self, device: &[u32; 7]) -> Option<usize> {
        let mut wild = 0;
        for (pattern, mine) in self.0.iter().zip(device) {
            match pattern {
                None => wild += 1,
                Some(p) if p == mine => {}
                Some(_) => return None,
            }
        }
        Some(wild)
    }
}

/// A function's modalias fields, as `modalias_show` prints them.
fn fields_of(dev: &HostDevice) -> [u32; 7] {
    [
        u32::from(dev.vendor),
        u32::from(dev.device),
        u32::from(dev.subsystem_vendor),
        u32::from(dev.subsystem_device),
        (dev.class >> 16) & 0xff,
        (dev.class >> 8) & 0xff,
        dev.class & 0xff,
    ]
}

/// The `alias vfio_pci:` lines of a `modules.alias`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VfioAliases {
    aliases: Vec<(Fields, String)>,
}

impl VfioAliases {
    /// Reads the lines `alias vfio_pci:PATTERN MODULE`; anything else, and
    /// a malformed line, is skipped.
    pub fn parse(text: &str) -> VfioAliases {
        let aliases = text
            .lines()
            .filter_map(|l| {
                let rest = l.trim().strip_prefix("alias vfio_pci:")?;
                let mut words = rest.split_whitespace();
                let pattern = Fields::parse(words.next()?)?;
                let module = words.next()?;
                let ok = module.len() <= 64
                    && module
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                (ok && words.next().is_none()).then(|| (pattern, module.to_string()))
            })
            .take(MAX_ALIASES)
            .collect();
        VfioAliases { aliases }
    }

    /// The driver for `dev`: the best match's (its pci_driver name: the
    /// module's, `vfio-pci` for vfio_pci's own catch-all), `vfio-pci` when
    /// nothing matches.
    pub fn driver_for(&self, dev: &HostDevice) -> &str {
        let mine = fields_of(dev);
        let mut best: Option<(usize, &str)> = None;
        for (pattern, module) in &self.aliases {
            if let Some(w) = pattern.matches(&mine) {
                if best.is_none_or(|(b, _)| w < b) {
                    best = Some((w, module));
                }
            }
        }
        match best {
            Some((_, m)) if m != "vfio_pci" && m != VFIO_DRIVER => m,
            _ => VFIO_DRIVER,
        }
    }

    /// Whether `driver` is one of the variants the table names.
    fn names(&self, driver: &str) -> bool {
        self.aliases.iter().any(|(_, m)| m == driver)
    }

    /// How many variant drivers (not vfio_pci itself) the table names.
    pub fn variants(&self) -> usize {
        let mut v: Vec<&str> = self
            .aliases
            .iter()
            .map(|(_, m)| m.as_str())
            .filter(|m| *m != "vfio_pci")
            .collect();
        v.sort_unstable();
        v.dedup();
        v.len()
    }
}

/// `pci:v%08Xd%08Xsv%08Xsd%08Xbc%02Xsc%02Xi%02X`, as the kernel prints it
/// (the matching uses the same numbers, [`fields_of`]).
#[cfg(test)]
fn modalias(dev: &HostDevice) -> String {
    format!(
        "pci:v{:08X}d{:08X}sv{:08X}sd{:08X}bc{:02X}sc{:02X}i{:02X}",
        dev.vendor,
        dev.device,
        dev.subsystem_vendor,
        dev.subsystem_device,
        (dev.class >> 16) & 0xff,
        (dev.class >> 8) & 0xff,
        dev.class & 0xff
    )
}

/// The host's table, read once at start-up ([`set_table`]); empty until.
static TABLE: OnceLock<VfioAliases> = OnceLock::new();

/// Keeps the host's table for the daemon's life (the modules of a running
/// kernel do not change under it).
pub fn set_table(table: VfioAliases) {
    let _ = TABLE.set(table);
}

fn table() -> &'static VfioAliases {
    static EMPTY: OnceLock<VfioAliases> = OnceLock::new();
    TABLE
        .get()
        .unwrap_or_else(|| EMPTY.get_or_init(VfioAliases::default))
}

/// The vfio driver Bind uses for `dev` on this host.
pub fn vfio_driver(dev: &HostDevice) -> String {
    table().driver_for(dev).to_string()
}

/// The vfio driver `dev` is on, or else the one Bind would use.
pub fn shown(dev: &HostDevice) -> String {
    match &dev.driver {
        Some(d) if on_vfio(dev) => d.clone(),
        _ => vfio_driver(dev),
    }
}

/// Whether `dev` is on a vfio driver: `vfio-pci`, a variant the host's
/// table names, or any driver that registered the function's VFIO device
/// (`vfio-dev/`: only vfio-pci-core drivers do).
pub fn on_vfio(dev: &HostDevice) -> bool {
    dev.vfio_dev.is_some() || dev.driver.as_deref().is_some_and(is_vfio_driver)
}

/// Whether `driver` is vfio-pci or a variant of it the host's table names.
pub fn is_vfio_driver(driver: &str) -> bool {
    driver == VFIO_DRIVER || table().names(driver)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as depmod writes them for the drivers' id tables
    /// (drivers/vfio/pci/nvgrace-gpu/main.c: 0x2342, 0x2345, 0x2348;
    /// drivers/vfio/pci/mlx5/main.c: 0x101e; vfio_pci's own catch-all),
    /// among lines of other modules that must be ignored.
    pub(crate) const ALIASES: &str = "\
alias pci:v000010DEd*sv*sd*bc03sc*i* nvidia
alias vfio_pci:v000015B3d0000101Esv*sd*bc*sc*i* mlx5_vfio_pci
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002345sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v000010DEd00002348sv*sd*bc*sc*i* nvgrace_gpu_vfio_pci
alias vfio_pci:v*d*sv*sd*bc*sc*i* vfio_pci
alias vfio_pci:v000010DEd00002342 broken
alias vfio_pci:v000010DEd00002342sv*sd*bc*sc*i* ../../evil extra
";

    fn dev(vendor: u16, device: u16, class: u32) -> HostDevice {
        HostDevice {
            vendor,
            device,
            class,
            subsystem_vendor: vendor,
            subsystem_device: 0x16e6,
            ..HostDevice::example()
        }
    }

    /// The fields matched are the kernel's modalias's, read back as a
    /// pattern is.
    #[test]
    fn the_modalias_is_the_kernels() {
        let gh = dev(0x10de, 0x2342, 0x030200);
        let text = modalias(&gh);
        assert_eq!(
            text,
            "pci:v000010DEd00002342sv000010DEsd000016E6bc03sc02i00"
        );
        let parsed = Fields::parse(text.strip_prefix("pci:").unwrap()).unwrap();
        assert_eq!(parsed.0.map(Option::unwrap), fields_of(&gh));
    }

    #[test]
    fn the_fewest_wildcards_win_and_vfio_pci_is_the_rest() {
        let t = VfioAliases::parse(ALIASES);
        assert_eq!(t.aliases.len(), 5, "{t:?}");
        // Grace Hopper: nvgrace's exact ids (5 wildcards) beat the catch-all (7).
        assert_eq!(
            t.driver_for(&dev(0x10de, 0x2342, 0x030200)),
            "nvgrace_gpu_vfio_pci"
        );
        // A ConnectX-7 virtual function.
        assert_eq!(
            t.driver_for(&dev(0x15b3, 0x101e, 0x020000)),
            "mlx5_vfio_pci"
        );
        // Any other: vfio-pci's catch-all, by its driver name.
        assert_eq!(t.driver_for(&dev(0x10de, 0x27b8, 0x030200)), "vfio-pci");
        // No table at all (no modules.alias): vfio-pci.
        assert_eq!(
            VfioAliases::default().driver_for(&dev(0x10de, 0x2342, 0x030200)),
            "vfio-pci"
        );
        assert!(t.names("mlx5_vfio_pci") && !t.names("nvidia") && !t.names("broken"));
    }
}
