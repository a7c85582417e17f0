//! The real backend: the kernel's sysfs under `--sysfs-root` (default `/sys`).
//!
//! Paths are always built from a parsed [`PciAddress`], never from caller input, so
//! a request cannot name a file outside `bus/pci/devices/<address>`.

use std::path::{Path, PathBuf};

use super::{Host, HostDevice, HostError, Sriov};
use crate::pci::sysfs::{link_name, parse_override, read_hex};
use crate::pci::PciAddress;

pub struct SysfsHost {
    root: PathBuf,
    /// procfs, for how the host uses a device (`--host-root`/proc).
    proc_root: PathBuf,
    /// *(issue 28)* `/lib/modules` (`--host-root`/lib/modules).
    modules_root: PathBuf,
    /// `modprobe` is tried at most once per driver name per daemon run.
    modprobed: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl SysfsHost {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        SysfsHost {
            root: root.into(),
            proc_root: PathBuf::from("/proc"),
            modules_root: PathBuf::from("/lib/modules"),
            modprobed: Default::default(),
        }
    }

    /// Reads procfs at `proc_root` instead of `/proc`.
    pub fn with_proc(mut self, proc_root: impl Into<PathBuf>) -> Self {
        self.proc_root = proc_root.into();
        self
    }

    /// Reads the kernel modules' files under `modules_root` instead of
    /// `/lib/modules`.
    pub fn with_modules(mut self, modules_root: impl Into<PathBuf>) -> Self {
        self.modules_root = modules_root.into();
        self
    }

    fn driver_dir(&self, driver: &str) -> Result<PathBuf, HostError> {
        // Driver names come from the kernel's own links or from our constants,
        // but a name with a separator must never become a path.
        if driver.is_empty() || driver.contains('/') || driver.contains("..") {
            return Err(HostError::NoDriver(driver.to_string()));
        }
        Ok(self.root.join("bus/pci/drivers").join(driver))
    }

    /// Writes one value to an existing sysfs attribute (never creates a file).
    fn write_attr(&self, path: &Path, value: &str) -> Result<(), HostError> {
        use std::io::Write;
        let to_err = |e: std::io::Error| HostError::Write {
            path: path.display().to_string(),
            value: value.trim_end().to_string(),
            errno: e.raw_os_error().unwrap_or(5),
        };
        // O_TRUNC as a shell's `>` does: sysfs ignores it, a plain file (a test
        // tree) is left holding exactly the value.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(to_err)?;
        // sysfs takes one write(2) per value; write_all would retry a short write.
        f.write_all(value.as_bytes()).map_err(to_err)
    }

    fn devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    fn device_dir(&self, address: PciAddress) -> PathBuf {
        self.devices_dir().join(address.to_string())
    }

    fn read_device(&self, address: PciAddress, dir: &Path) -> Result<HostDevice, HostError> {
        let hex16 = |name: &str| read_hex(&dir.join(name), 0xffff).map(|v| v as u16);
        // Subsystem ids are absent on some bridges and on captured trees; 0 is what
        // lspci shows for "none".
        let optional16 = |name: &str| match read_hex(&dir.join(name), 0xffff) {
            Ok(v) => v as u16,
            Err(_) => 0,
        };
        let driver_override = match std::fs::read_to_string(dir.join("driver_override")) {
            Ok(text) => parse_override(&text),
            Err(_) => None, // kernels before 3.16 have no driver_override
        };
        Ok(HostDevice {
            address,
            vendor: hex16("vendor")?,
            device: hex16("device")?,
            class: read_hex(&dir.join("class"), 0xff_ffff)?,
            subsystem_vendor: optional16("subsystem_vendor"),
            subsystem_device: optional16("subsystem_device"),
            driver: driver_name(dir),
            iommu_group: link_name(&dir.join("iommu_group")).and_then(|g| g.parse().ok()),
            driver_override,
            // -1 (no NUMA) and a missing file both mean none.
            boot_vga: std::fs::read_to_string(dir.join("boot_vga")).is_ok_and(|t| t.trim() == "1"),
            numa_node: std::fs::read_to_string(dir.join("numa_node"))
                .ok()
                .and_then(|t| t.trim().parse::<i64>().ok())
                .and_then(|n| u32::try_from(n).ok()),
            sriov: read_sriov(dir),
            // The kernel's link to the physical function's device directory,
            // whose name is its address.
            physfn: link_name(&dir.join("physfn")).and_then(|n| PciAddress::parse(&n).ok()),
            reset_method: read_reset_method(dir),
            vfio_dev: read_vfio_dev(dir),
        })
    }
}

/// *(issue 28)* The `vfioN` under the function's `vfio-dev/` (kernel 6.2+,
/// registered by vfio-pci-core drivers): the first well-formed entry.
fn read_vfio_dev(dir: &Path) -> Option<String> {
    std::fs::read_dir(dir.join("vfio-dev"))
        .ok()?
        .take(16)
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| {
            n.strip_prefix("vfio").is_some_and(|d| {
                !d.is_empty() && d.len() <= 10 && d.bytes().all(|b| b.is_ascii_digit())
            })
        })
}

/// *(issue 28)* The kernel's `reset_method` (5.15+). The kernel shows the
/// attribute, and `reset`, only for a function it can reset (their
/// `is_visible` is `pci_reset_supported`); an admin may empty it. So: the
/// file's methods when it is there; none when neither file is; not said
/// when only `reset` is (a kernel before 5.15).
fn read_reset_method(dir: &Path) -> Option<String> {
    use std::io::Read;
    let mut text = String::new();
    match std::fs::File::open(dir.join("reset_method"))
        .and_then(|f| f.take(512).read_to_string(&mut text))
    {
        Ok(_) => Some(crate::host::reset_methods(&text)),
        Err(_) if dir.join("reset").exists() => None,
        Err(_) => Some(String::new()),
    }
}

/// A physical function's SR-IOV capability: present only when the kernel
/// lists `sriov_totalvfs` (and it is a number); counts past 65535 are not a
/// PCI device's and are refused as absent.
fn read_sriov(dir: &Path) -> Option<Sriov> {
    let count = |name: &str| -> Option<u32> {
        let t = std::fs::read_to_string(dir.join(name)).ok()?;
        t.trim().parse::<u32>().ok().filter(|n| *n <= 0xffff)
    };
    let total_vfs = count("sriov_totalvfs")?;
    Some(Sriov {
        total_vfs,
        num_vfs: count("sriov_numvfs").unwrap_or(0).min(total_vfs),
        vf_device: read_hex(&dir.join("sriov_vf_device"), 0xffff)
            .ok()
            .map(|v| v as u16),
        offset: count("sriov_offset").unwrap_or(0) as u16,
        stride: count("sriov_stride").unwrap_or(0) as u16,
    })
}

/// The bound driver: the `driver` link's target name. Copies of sysfs made with
/// `cp -rL` turn the link into a directory; then `uevent`'s `DRIVER=` tells.
fn driver_name(dir: &Path) -> Option<String> {
    let link = dir.join("driver");
    if let Some(name) = link_name(&link) {
        return Some(name);
    }
    if !link.exists() {
        return None;
    }
    let uevent = std::fs::read_to_string(dir.join("uevent")).ok()?;
    uevent
        .lines()
        .find_map(|l| l.strip_prefix("DRIVER="))
        .map(|d| d.trim().to_string())
        .filter(|d| !d.is_empty() && !d.contains('/'))
}

/// *(issue 29)* The AER totals under a function's directory; `None` when a
/// file is missing or does not end with its total. Each read is bounded.
fn read_aer(dir: &Path) -> Option<super::aer::AerCounts> {
    use std::io::Read;
    let mut texts: [String; 3] = Default::default();
    for ((file, _), text) in super::aer::FILES.iter().zip(texts.iter_mut()) {
        std::fs::File::open(dir.join(file))
            .and_then(|f| f.take(super::aer::MAX_FILE).read_to_string(text))
            .ok()?;
    }
    super::aer::AerCounts::parse([&texts[0], &texts[1], &texts[2]])
}

impl Host for SysfsHost {
    fn describe(&self) -> String {
        format!(
            "sysfs at {}, procfs at {}",
            self.root.display(),
            self.proc_root.display()
        )
    }

    fn vfio_aliases(&self) -> String {
        use std::io::{BufRead, Read};
        // The running kernel's release, as procfs under the host root says.
        let mut release = String::new();
        let _ = std::fs::File::open(self.proc_root.join("sys/kernel/osrelease"))
            .and_then(|f| f.take(256).read_to_string(&mut release));
        let release = release.trim();
        if release.is_empty() || release.contains('/') || release.starts_with('.') {
            return String::new();
        }
        let Ok(file) = std::fs::File::open(self.modules_root.join(release).join("modules.alias"))
        else {
            return String::new();
        };
        // A distribution's file is a few MiB; only vfio_pci's lines are kept.
        let mut out = String::new();
        for line in std::io::BufReader::new(file.take(64 << 20))
            .lines()
            .map_while(Result::ok)
        {
            if line.starts_with("alias vfio_pci:") && out.len() < 1 << 20 {
                out.push_str(&line);
                out.push('\n');
            }
        }
        out
    }

    fn kernel_cmdline(&self) -> String {
        use std::io::Read;
        let mut text = String::new();
        let _ = std::fs::File::open(self.proc_root.join("cmdline"))
            .and_then(|f| f.take(4096).read_to_string(&mut text));
        text
    }

    fn virtual_machine(&self) -> bool {
        let read = |p: &str| std::fs::read_to_string(self.root.join(p)).unwrap_or_default();
        if !read("hypervisor/type").trim().is_empty() {
            return true;
        }
        let dmi = format!(
            "{} {}",
            read("class/dmi/id/sys_vendor"),
            read("class/dmi/id/product_name")
        );
        let known = [
            "QEMU",
            "KVM",
            "VMware",
            "VirtualBox",
            "Xen",
            "Amazon EC2",
            "Google Compute Engine",
            "Virtual Machine",
        ];
        if known.iter().any(|k| dmi.contains(k)) {
            return true;
        }
        // The CPU's hypervisor flag, when this is the running kernel's sysfs.
        self.root == std::path::Path::new("/sys")
            && std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "hypervisor"))
            })
    }

    fn devices(&self) -> Result<Vec<HostDevice>, HostError> {
        let dir = self.devices_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| HostError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Ok(address) = PciAddress::parse(&name.to_string_lossy()) else {
                tracing::warn!(entry = %name.to_string_lossy(), "skipping a bus/pci/devices entry that is not a PCI address");
                continue;
            };
            match self.read_device(address, &entry.path()) {
                Ok(d) => out.push(d),
                // A device can vanish between readdir and read (hot-unplug); any
                // other unreadable device is reported but does not hide the rest.
                Err(e) => {
                    tracing::warn!(pci_address = %address, error = %e, "skipping unreadable device")
                }
            }
        }
        out.sort_by_key(|d| d.address);
        Ok(out)
    }

    fn device(&self, address: PciAddress) -> Result<Option<HostDevice>, HostError> {
        let dir = self.device_dir(address);
        if !dir.exists() {
            return Ok(None);
        }
        self.read_device(address, &dir).map(Some)
    }

    fn group_members(&self, group: u32) -> Result<Vec<HostDevice>, HostError> {
        let dir = self
            .root
            .join(format!("kernel/iommu_groups/{group}/devices"));
        let listed: Vec<PciAddress> = std::fs::read_dir(&dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| PciAddress::parse(&e.file_name().to_string_lossy()).ok())
                    .collect()
            })
            .unwrap_or_default();
        if listed.is_empty() {
            // A captured tree may lack kernel/iommu_groups; the links still tell.
            return Ok(self
                .devices()?
                .into_iter()
                .filter(|d| d.iommu_group == Some(group))
                .collect());
        }
        let mut out = Vec::new();
        for a in listed {
            if let Some(d) = self.device(a)? {
                out.push(d);
            }
        }
        out.sort_by_key(|d| d.address);
        Ok(out)
    }

    fn usage(&self, deadline: std::time::Instant) -> super::usage::Walked {
        super::usage::HostRoot {
            sys: self.root.clone(),
            proc: self.proc_root.clone(),
        }
        .read(deadline)
    }

    fn aer(&self, address: PciAddress) -> Result<Option<super::aer::AerCounts>, HostError> {
        Ok(read_aer(&self.device_dir(address)))
    }

    fn driver_loaded(&self, driver: &str) -> bool {
        self.driver_dir(driver).is_ok_and(|d| d.is_dir())
    }

    fn load_driver(&self, driver: &str) -> bool {
        if self.driver_loaded(driver) {
            return true;
        }
        // Only the running kernel's own sysfs can gain a driver through modprobe;
        // a test tree under another root must not load modules on the machine.
        if self.root != Path::new("/sys") {
            return false;
        }
        let first = self
            .modprobed
            .lock()
            .map(|mut tried| tried.insert(driver.to_string()))
            .unwrap_or(false);
        if first {
            match std::process::Command::new("modprobe").arg(driver).status() {
                Ok(st) => tracing::info!(driver, status = %st, "ran modprobe"),
                Err(e) => tracing::warn!(driver, error = %e, "cannot run modprobe"),
            }
        }
        self.driver_loaded(driver)
    }

    fn set_override(&self, address: PciAddress, driver: Option<&str>) -> Result<(), HostError> {
        let value = match driver {
            Some(d) => {
                self.driver_dir(d)?;
                format!("{d}\n")
            }
            None => "\n".to_string(),
        };
        self.write_attr(&self.device_dir(address).join("driver_override"), &value)
    }

    fn unbind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let path = self.driver_dir(driver)?.join("unbind");
        self.write_attr(&path, &address.to_string())
    }

    fn vgpu_slots(&self, parent: &HostDevice) -> Result<Vec<super::vgpu::Slot>, HostError> {
        super::vgpu::read_slots(&self.root, parent)
    }

    fn set_vgpu_type(&self, function: PciAddress, type_id: u32) -> Result<(), HostError> {
        let path = self.device_dir(function).join("nvidia/current_vgpu_type");
        self.write_attr(&path, &format!("{type_id}\n"))
    }

    fn current_vgpu_type(&self, function: PciAddress) -> Result<Option<u32>, HostError> {
        super::vgpu::read_current(&self.device_dir(function))
    }

    fn create_mdev(
        &self,
        function: PciAddress,
        type_id: &str,
        uuid: &str,
    ) -> Result<(), HostError> {
        let path = super::vgpu::mdev_create_path(&self.root, function, type_id, uuid)?;
        self.write_attr(&path, &format!("{uuid}\n"))
    }

    fn remove_mdev(&self, _function: PciAddress, uuid: &str) -> Result<(), HostError> {
        let path = super::vgpu::mdev_dir(&self.root, uuid)?.join("remove");
        self.write_attr(&path, "1\n")
    }

    fn mdev_exists(&self, uuid: &str) -> Result<bool, HostError> {
        Ok(std::fs::symlink_metadata(super::vgpu::mdev_dir(&self.root, uuid)?).is_ok())
    }

    fn vfio_holders(
        &self,
        nodes: &[String],
        deadline: std::time::Instant,
    ) -> Result<Vec<String>, String> {
        super::usage::HostRoot {
            sys: self.root.clone(),
            proc: self.proc_root.clone(),
        }
        .vfio_holders(nodes, deadline)
    }

    fn vfio_nodes(
        &self,
        function: PciAddress,
        mdev: Option<&str>,
    ) -> Result<Vec<String>, HostError> {
        let dir = match mdev {
            Some(u) => super::vgpu::mdev_dir(&self.root, u)?,
            None => self.device_dir(function),
        };
        Ok(super::vgpu::vfio_nodes(&dir))
    }

    fn set_num_vfs(&self, address: PciAddress, count: u32) -> Result<(), HostError> {
        let path = self.device_dir(address).join("sriov_numvfs");
        self.write_attr(&path, &format!("{count}\n"))
    }

    fn bind(&self, address: PciAddress, driver: &str) -> Result<(), HostError> {
        let dir = self.driver_dir(driver)?;
        if !dir.is_dir() {
            return Err(HostError::NoDriver(driver.to_string()));
        }
        self.write_attr(&dir.join("bind"), &address.to_string())
    }

    fn probe(&self, address: PciAddress) -> Result<(), HostError> {
        let path = self.root.join("bus/pci/drivers_probe");
        self.write_attr(&path, &address.to_string())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// *(issue 26)* SR-IOV is read only where `sriov_totalvfs` is a count a
    /// PCI function can have; the current count never exceeds the total.
    #[test]
    fn sriov_is_read_as_the_kernel_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        assert_eq!(read_sriov(d), None, "no sriov_totalvfs: no SR-IOV");
        let write = |name: &str, v: &str| std::fs::write(d.join(name), v).unwrap();
        write("sriov_totalvfs", "64\n");
        write("sriov_numvfs", "2\n");
        write("sriov_vf_device", "154c\n");
        write("sriov_offset", "16\n");
        write("sriov_stride", "1\n");
        let want = Sriov {
            total_vfs: 64,
            num_vfs: 2,
            vf_device: Some(0x154c),
            offset: 16,
            stride: 1,
        };
        assert_eq!(read_sriov(d), Some(want));
        let pf = PciAddress::parse("0000:3b:00.0").unwrap();
        let shown = |v: Vec<PciAddress>| v.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(
            shown(want.current_vfs(pf)),
            ["0000:3b:02.0", "0000:3b:02.1"],
            "the X710's VFs where the kernel puts them"
        );
        // Past the 8th function the device number goes up, past the 32nd
        // device the bus does; beyond bus 255 there is nothing.
        let wide = Sriov {
            offset: 4,
            stride: 2,
            ..want
        };
        assert_eq!(
            shown(wide.vfs(PciAddress::parse("0000:41:1f.0").unwrap(), 3)),
            ["0000:41:1f.4", "0000:41:1f.6", "0000:42:00.0"]
        );
        let last = PciAddress::parse("0000:ff:1f.0").unwrap();
        assert_eq!(shown(wide.vfs(last, 3)), ["0000:ff:1f.4", "0000:ff:1f.6"]);
        assert!(Sriov { offset: 0, ..want }.current_vfs(pf).is_empty());
        write("sriov_numvfs", "4096\n");
        assert_eq!(read_sriov(d).map(|s| s.num_vfs), Some(64));
        for bad in ["65536\n", "-1\n", "lots\n"] {
            write("sriov_totalvfs", bad);
            assert_eq!(read_sriov(d), None, "{bad:?}");
        }
    }

    /// Lays out a device the way the kernel does: the real directory under
    /// `devices/`, a link in `bus/pci/devices`, relative `driver` and
    /// `iommu_group` links.
    pub fn add_device(
        root: &Path,
        addr: &str,
        ids: (&str, &str, &str),
        driver: Option<&str>,
        group: Option<u32>,
    ) {
        let real = root.join("devices/pci0000:00").join(addr);
        std::fs::create_dir_all(&real).unwrap();
        std::fs::write(real.join("vendor"), format!("{}\n", ids.0)).unwrap();
        std::fs::write(real.join("device"), format!("{}\n", ids.1)).unwrap();
        std::fs::write(real.join("class"), format!("{}\n", ids.2)).unwrap();
        std::fs::write(real.join("subsystem_vendor"), "0x10de\n").unwrap();
        std::fs::write(real.join("subsystem_device"), "0x16ca\n").unwrap();
        std::fs::write(real.join("driver_override"), "(null)\n").unwrap();
        let bus = root.join("bus/pci/devices");
        std::fs::create_dir_all(&bus).unwrap();
        symlink(
            format!("../../../devices/pci0000:00/{addr}"),
            bus.join(addr),
        )
        .unwrap();
        if let Some(d) = driver {
            std::fs::create_dir_all(root.join("bus/pci/drivers").join(d)).unwrap();
            symlink(format!("../../../bus/pci/drivers/{d}"), real.join("driver")).unwrap();
        }
        if let Some(g) = group {
            std::fs::create_dir_all(root.join(format!("kernel/iommu_groups/{g}/devices"))).unwrap();
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                real.join("iommu_group"),
            )
            .unwrap();
        }
    }

    #[test]
    fn reads_a_kernel_shaped_tree() {
        let root = tempfile::tempdir().unwrap();
        add_device(
            root.path(),
            "0000:a2:00.0",
            ("0x10de", "0x27b8", "0x030200"),
            Some("nvidia"),
            Some(82),
        );
        add_device(
            root.path(),
            "0000:00:1f.0",
            ("0x8086", "0x1234", "0x060400"),
            None,
            None,
        );
        std::fs::create_dir_all(root.path().join("bus/pci/devices/not-an-address")).unwrap();
        let host = SysfsHost::new(root.path());
        let all = host.devices().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].address.to_string(), "0000:00:1f.0");
        assert_eq!(all[0].driver, None);
        assert_eq!(all[0].iommu_group, None);
        let gpu = host
            .device(PciAddress::parse("a2:00.0").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(
            (gpu.vendor, gpu.device, gpu.class),
            (0x10de, 0x27b8, 0x030200)
        );
        assert_eq!(gpu.driver.as_deref(), Some("nvidia"));
        assert_eq!(gpu.iommu_group, Some(82));
        assert_eq!(gpu.driver_override, None);
        assert_eq!(gpu.subsystem_device, 0x16ca);
        assert!(host
            .device(PciAddress::parse("0000:a3:00.0").unwrap())
            .unwrap()
            .is_none());
    }

    #[test]
    fn driver_from_uevent_when_the_link_was_flattened() {
        let root = tempfile::tempdir().unwrap();
        add_device(
            root.path(),
            "0000:02:00.0",
            ("0x8086", "0x1572", "0x020000"),
            None,
            None,
        );
        let dev = root.path().join("devices/pci0000:00/0000:02:00.0");
        std::fs::create_dir(dev.join("driver")).unwrap();
        std::fs::write(dev.join("uevent"), "DRIVER=i40e\nPCI_CLASS=20000\n").unwrap();
        let host = SysfsHost::new(root.path());
        let d = host
            .device(PciAddress::parse("02:00.0").unwrap())
            .unwrap()
            .unwrap();
        assert_eq!(d.driver.as_deref(), Some("i40e"));
    }

    #[test]
    fn garbage_attributes_are_errors_not_panics() {
        let root = tempfile::tempdir().unwrap();
        add_device(
            root.path(),
            "0000:01:00.0",
            ("0x10de", "nonsense", "0x030200"),
            None,
            None,
        );
        let host = SysfsHost::new(root.path());
        assert!(host.device(PciAddress::parse("01:00.0").unwrap()).is_err());
        assert!(host.devices().unwrap().is_empty());
    }

    /// Reading the machine's own /sys is harmless and proves the parser copes with
    /// a real kernel's files.
    #[test]
    fn reads_the_real_sys_if_present() {
        let host = SysfsHost::new("/sys");
        if !Path::new("/sys/bus/pci/devices").exists() {
            return;
        }
        let all = host.devices().unwrap();
        let listed = std::fs::read_dir("/sys/bus/pci/devices").unwrap().count();
        assert_eq!(all.len(), listed);
        for d in all {
            assert_ne!(d.vendor, 0);
        }
    }
}
