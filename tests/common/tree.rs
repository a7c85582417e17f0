//! One builder of sysfs trees for `--sysfs-root`: the kernel's own layout
//! (DESIGN.md section 4), with files and links and no kernel behind them.
//! Every test that hands the real backend a tree builds it here.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};

/// A PCI function to lay out.
pub struct Function<'a> {
    /// `0000:a2:00.0`.
    pub address: &'a str,
    /// The directory under `devices/` it hangs from, `pci0000:a0`.
    pub parent: &'a str,
    /// Attribute files and their contents (`vendor`, `0x10de\n`).
    pub attrs: &'a [(&'a str, &'a [u8])],
    /// The bound driver (its directory is made, with `bind` and `unbind`).
    pub driver: Option<&'a str>,
    /// The IOMMU group (the function is listed in its `devices/`).
    pub group: Option<&'a str>,
}

/// A sysfs tree in a fresh directory.
pub struct SysfsTree {
    pub dir: tempfile::TempDir,
}

impl SysfsTree {
    /// An empty tree: `bus/pci/devices` and `drivers_probe`, nothing else.
    pub fn new() -> SysfsTree {
        let dir = tempfile::tempdir().expect("a tree directory");
        std::fs::create_dir_all(dir.path().join("bus/pci/devices")).expect("bus/pci/devices");
        std::fs::write(dir.path().join("bus/pci/drivers_probe"), "").expect("drivers_probe");
        SysfsTree { dir }
    }

    /// The tree's root, what `--sysfs-root` is given.
    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// A driver's directory with its `bind` and `unbind` files.
    pub fn driver(&self, name: &str) -> PathBuf {
        let dir = self.root().join("bus/pci/drivers").join(name);
        std::fs::create_dir_all(&dir).expect("a driver directory");
        for f in ["bind", "unbind"] {
            if !dir.join(f).exists() {
                std::fs::write(dir.join(f), "").expect("a driver file");
            }
        }
        dir
    }

    /// Lays `f` out as the kernel does, and returns its device directory.
    pub fn function(&self, f: &Function<'_>) -> PathBuf {
        let root = self.root();
        let dev = root.join("devices").join(f.parent).join(f.address);
        std::fs::create_dir_all(&dev).expect("a device directory");
        for (name, value) in f.attrs {
            std::fs::write(dev.join(name), value).expect("an attribute");
        }
        symlink(
            format!("../../../devices/{}/{}", f.parent, f.address),
            root.join("bus/pci/devices").join(f.address),
        )
        .expect("the bus link");
        if let Some(d) = f.driver {
            self.driver(d);
            symlink(format!("../../../bus/pci/drivers/{d}"), dev.join("driver"))
                .expect("the driver link");
        }
        if let Some(g) = f.group {
            let members = root.join("kernel/iommu_groups").join(g).join("devices");
            std::fs::create_dir_all(&members).expect("the group");
            symlink(
                format!("../../../kernel/iommu_groups/{g}"),
                dev.join("iommu_group"),
            )
            .expect("the group link");
            symlink(
                format!("../../../../devices/{}/{}", f.parent, f.address),
                members.join(f.address),
            )
            .expect("the group's member link");
        }
        dev
    }
}
