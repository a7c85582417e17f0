//! Network interfaces in use: up, and carrying a route that counts.

use super::*;

/// Whether a route to `dest` counts as the host using the interface:
/// link-local and multicast routes exist on every interface that is up and
/// say nothing about traffic.
pub fn route_counts(dest: IpAddr) -> bool {
    match dest {
        IpAddr::V4(a) => !(a.is_link_local() || a.is_multicast()),
        IpAddr::V6(a) => {
            let first = a.segments()[0];
            let link_local = first & 0xffc0 == 0xfe80;
            !(link_local || a.is_multicast())
        }
    }
}

/// Parses a route destination as fixtures write it: `default`, `10.0.0.0/8`,
/// `2001:db8::/32`. The prefix length is checked, then dropped.
pub fn parse_route(text: &str) -> Option<IpAddr> {
    if text == "default" {
        return Some(IpAddr::from([0u8, 0, 0, 0]));
    }
    let (addr, len) = text.split_once('/').unwrap_or((text, "128"));
    let addr: IpAddr = addr.parse().ok()?;
    let len: u8 = len.parse().ok()?;
    let max = if addr.is_ipv4() && text.contains('/') {
        32
    } else {
        128
    };
    (len <= max).then_some(addr)
}

impl HostRoot {
    /// Interfaces under each function that are up and carry a route.
    pub(super) fn net(&self, walked: &mut Walked) {
        let class = self.sys.join("class/net");
        let mut found = Vec::new();
        for name in Self::entries(&class) {
            let dir = class.join(&name);
            let owner = Self::owner(&dir.join("device")).or_else(|| Self::owner(&dir));
            if let Some(a) = owner {
                found.push((a, name, dir));
            }
        }
        if found.is_empty() {
            return;
        }
        let affected: Vec<PciAddress> = found.iter().map(|(a, _, _)| *a).collect();
        let routed = self.routed_interfaces(&affected, walked);
        for (a, name, dir) in found {
            let up = match Self::read_opt(&dir.join("flags")) {
                // IFF_UP, as `ip link` reads it.
                Ok(Some(f)) => {
                    crate::pci::sysfs::parse_hex(&f, u32::MAX).is_some_and(|f| f & 1 == 1)
                }
                Ok(None) => {
                    Self::read_opt(&dir.join("operstate"))
                        .ok()
                        .flatten()
                        .as_deref()
                        == Some("up")
                }
                Err(e) => {
                    Self::mark_unknown(walked, a, e);
                    continue;
                }
            };
            if up && routed.contains(&name) {
                walked
                    .usage
                    .entry(a)
                    .or_default()
                    .push(Use::NetworkActive { interface: name });
            }
        }
    }

    /// Interfaces with at least one route that counts ([`route_counts`]),
    /// from `net/route` and `net/ipv6_route`.
    pub(super) fn routed_interfaces(
        &self,
        affected: &[PciAddress],
        walked: &mut Walked,
    ) -> HashSet<String> {
        let mut out = HashSet::new();
        if let Some(t) = Self::read_all(&self.proc.join("net/route"), affected, walked) {
            // Iface Destination Gateway Flags ...; Destination in host byte
            // order (little-endian on the machines we run on).
            for l in t.lines().skip(1) {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (Some(iface), Some(dest), Some(flags)) = (f.first(), f.get(1), f.get(3)) else {
                    continue;
                };
                let up = u32::from_str_radix(flags, 16).is_ok_and(|f| f & 1 == 1);
                let Ok(d) = u32::from_str_radix(dest, 16) else {
                    continue;
                };
                let ip = IpAddr::from(d.to_le_bytes());
                if up && route_counts(ip) {
                    out.insert(iface.to_string());
                }
            }
        }
        if let Some(t) = Self::read_all(&self.proc.join("net/ipv6_route"), affected, walked) {
            // dest plen src plen next-hop metric refcnt use flags iface
            for l in t.lines() {
                let f: Vec<&str> = l.split_whitespace().collect();
                let (Some(dest), Some(iface)) = (f.first(), f.get(9)) else {
                    continue;
                };
                let Ok(d) = u128::from_str_radix(dest, 16) else {
                    continue;
                };
                if *iface != "lo" && route_counts(IpAddr::from(d.to_be_bytes())) {
                    out.insert(iface.to_string());
                }
            }
        }
        out
    }
}
