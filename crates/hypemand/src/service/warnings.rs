//! *(issue 28)* What a client should know of a function that does not stop
//! it being passed through, shown beside the blockers in `ListAvailable`:
//!
//! - `no-reset`: the kernel cannot reset the function between tenants (no
//!   `reset_method`), so a VM may find what the previous one left in it;
//! - `acs-override`: the kernel runs with `pcie_acs_override=`, so its IOMMU
//!   groups are not isolation boundaries and a VM given one function may
//!   reach others. Said of every function, and on the status line.

use crate::host::HostDevice;

/// The code of a function the kernel cannot reset.
pub const NO_RESET: &str = "no-reset";
/// The code of a boot whose IOMMU groups are overridden.
pub const ACS_OVERRIDE: &str = "acs-override";

/// What the status line adds on a boot with the ACS override.
pub const ACS_OVERRIDE_NOTE: &str =
    "pcie_acs_override= is set: IOMMU groups are not isolation boundaries";

/// The warnings of `host`, on a boot with (or without) the ACS override.
pub fn of(host: &HostDevice, acs_override: bool) -> Vec<hypeman_api::Blocker> {
    let at = host.address.to_string();
    let mut out = Vec::new();
    if host.reset_method.as_deref() == Some("") {
        out.push(hypeman_api::Blocker {
            code: NO_RESET.into(),
            message: format!(
                "the kernel cannot reset {at} between tenants (it offers no reset_method): a VM may find what the previous one left in the device"
            ),
            pci_address: at.clone(),
        });
    }
    if acs_override {
        out.push(hypeman_api::Blocker {
            code: ACS_OVERRIDE.into(),
            message: format!(
                "the kernel runs with pcie_acs_override=, so {at}'s IOMMU group is not an isolation boundary: a VM given it may reach other devices"
            ),
            pci_address: at,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(reset_method: Option<&str>) -> HostDevice {
        HostDevice {
            reset_method: reset_method.map(String::from),
            ..HostDevice::example()
        }
    }

    #[test]
    fn only_a_function_the_kernel_cannot_reset_and_an_overridden_boot_warn() {
        let codes = |d: &HostDevice, acs: bool| -> Vec<String> {
            of(d, acs).into_iter().map(|w| w.code).collect()
        };
        assert!(codes(&device(Some("flr bus")), false).is_empty());
        // A kernel that does not say is not a kernel that cannot.
        assert!(codes(&device(None), false).is_empty());
        assert_eq!(codes(&device(Some("")), false), [NO_RESET]);
        assert_eq!(codes(&device(Some("")), true), [NO_RESET, ACS_OVERRIDE]);
        assert_eq!(codes(&device(Some("flr")), true), [ACS_OVERRIDE]);
    }
}
