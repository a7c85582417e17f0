//! Which registered device goes to which extended resource.
//!
//! ```toml
//! [[resource]]
//! name = "hypeman.io/nvidia-l4"
//! selector = "10de:27b8"        # vendor:device, or vendor:* (KubeVirt's pciVendorSelector)
//!
//! [[resource]]
//! name = "hypeman.io/ml-nic"
//! selector = "8086:*"
//! tags = { team = "ml" }        # and every tag must match
//! ```
//!
//! The first rule that matches wins. A device no rule matches goes to the
//! default resource, `hypeman.io/<type>` (`hypeman.io/gpu`, `hypeman.io/pci`),
//! unless `default = false`.
//!
//! *(issue 26)* vGPU profiles are resources only when named:
//!
//! ```toml
//! [[vgpu]]
//! profile = "NVIDIA L40S-4Q"        # as ListVgpuTypes names it
//! # name = "hypeman.io/l40s-4q"     # default: hypeman.io/vgpu-nvidia-l40s-4q
//! ```
//!
//! A GPU that offers a named profile (or carries a vGPU of one) is then not
//! offered whole as well.
//!
//! *(issue 28)* Which VFIO nodes a pod gets, where the kernel offers the
//! device cdev (6.2+) beside the group node:
//!
//! ```toml
//! iommufd = "auto"     # both (the default); "prefer": the cdev and
//!                      # /dev/iommu only; "never": the group node only
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not valid: {message}")]
    Invalid { path: String, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "yes")]
    pub default: bool,
    #[serde(default, rename = "resource")]
    pub resources: Vec<Rule>,
    /// *(issue 26)* The vGPU profiles offered as resources.
    #[serde(default, rename = "vgpu")]
    pub vgpus: Vec<VgpuRule>,
    /// *(issue 28)* Which VFIO nodes a pod gets.
    #[serde(default)]
    pub iommufd: Iommufd,
}

/// *(issue 28)* Which VFIO nodes Allocate gives, for a device whose kernel
/// offers its VFIO cdev (a device without one always gets its group node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Iommufd {
    /// The group node (and `/dev/vfio/vfio`) and the cdev (and
    /// `/dev/iommu`): the VMM chooses (current QEMU, Kata, KubeVirt).
    #[default]
    Auto,
    /// The cdev and `/dev/iommu` only.
    Prefer,
    /// The group node and `/dev/vfio/vfio` only (VMMs before iommufd).
    Never,
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default: true,
            resources: Vec::new(),
            vgpus: Vec::new(),
            iommufd: Iommufd::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    #[serde(default)]
    pub selector: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

/// *(issue 26)* A vGPU profile offered as a resource.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VgpuRule {
    /// The profile's name, as `ListVgpuTypes` shows it: `NVIDIA L40S-4Q`.
    pub profile: String,
    /// The resource name; `hypeman.io/vgpu-<profile, lowercased, each run of
    /// other characters as ->` when absent.
    #[serde(default)]
    pub name: Option<String>,
}

impl VgpuRule {
    /// The resource this profile is offered as.
    pub fn resource(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("hypeman.io/vgpu-{}", slug(&self.profile)))
    }
}

/// `NVIDIA L40S-4Q` -> `nvidia-l40s-4q`: ASCII letters (lowercased) and
/// digits kept, every run of anything else one `-`, none at either end.
pub fn slug(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// The longest vGPU resource name: its slots' instance ids
/// (`k8s-vgpu:<name, / as _>-<n>`) must stay within hypemand's 128.
pub const VGPU_RESOURCE_MAX: usize = 100;

/// A resource name as the kubelet takes it: `domain/name`, DNS-ish.
fn valid_resource(name: &str) -> bool {
    let Some((domain, rest)) = name.split_once('/') else {
        return false;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 63
            && s.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.' || c == '_'
            })
    };
    ok(domain) && domain.contains('.') && ok(rest)
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        Config::parse(&text, &shown)
    }

    /// Reads and checks a config's text; `shown` names it in errors.
    pub fn parse(text: &str, shown: &str) -> Result<Config, ConfigError> {
        let shown = shown.to_string();
        let c: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        for r in &c.resources {
            if !valid_resource(&r.name) {
                return Err(ConfigError::Invalid {
                    path: shown,
                    message: format!(
                        "resource name {:?} is not domain/name in lowercase (hypeman.io/gpu)",
                        r.name
                    ),
                });
            }
            if let Some(s) = &r.selector {
                if parse_selector(s).is_none() {
                    return Err(ConfigError::Invalid {
                        path: shown,
                        message: format!("selector {s:?} is not vvvv:dddd or vvvv:*"),
                    });
                }
            }
        }
        let mut taken: Vec<String> = c.resources.iter().map(|r| r.name.clone()).collect();
        if c.default {
            taken.extend(["hypeman.io/gpu".to_string(), "hypeman.io/pci".to_string()]);
        }
        let mut profiles = std::collections::BTreeSet::new();
        for v in &c.vgpus {
            let invalid = |message: String| ConfigError::Invalid {
                path: shown.clone(),
                message,
            };
            if v.profile.trim().is_empty() || v.profile.len() > 128 || slug(&v.profile).is_empty() {
                return Err(invalid(format!(
                    "vgpu profile {:?} must be a profile name of 1-128 characters with a letter or digit, as `hypemanctl vgpu types` shows",
                    v.profile.chars().take(128).collect::<String>()
                )));
            }
            if !profiles.insert(v.profile.clone()) {
                return Err(invalid(format!(
                    "vgpu profile {:?} is named twice; each profile is one resource",
                    v.profile
                )));
            }
            let name = v.resource();
            if !valid_resource(&name) || name.len() > VGPU_RESOURCE_MAX {
                return Err(invalid(format!(
                    "vgpu resource name {name:?} is not domain/name in lowercase of at most {VGPU_RESOURCE_MAX} characters (hypeman.io/l40s-4q)"
                )));
            }
            if taken.contains(&name) {
                return Err(invalid(format!(
                    "resource name {name:?} is used twice; a vGPU profile needs a resource of its own"
                )));
            }
            taken.push(name);
        }
        Ok(c)
    }

    /// *(issue 26)* The vGPU profile offered as `resource`, if it is one.
    pub fn vgpu_profile(&self, resource: &str) -> Option<&str> {
        self.vgpus
            .iter()
            .find(|v| v.resource() == resource)
            .map(|v| v.profile.as_str())
    }

    /// The resource a device belongs to, if any.
    pub fn resource_for(
        &self,
        vendor: &str,
        device: &str,
        kind: &str,
        tags: &std::collections::HashMap<String, String>,
    ) -> Option<String> {
        for r in &self.resources {
            let ids = r.selector.as_deref().is_none_or(|s| {
                parse_selector(s).is_some_and(|(v, d)| v == vendor && d.is_none_or(|d| d == device))
            });
            let tagged = r.tags.iter().all(|(k, v)| tags.get(k) == Some(v));
            if ids && tagged {
                return Some(r.name.clone());
            }
        }
        self.default.then(|| format!("hypeman.io/{kind}"))
    }
}

/// `10de:27b8` or `10de:*`, lowercased.
fn parse_selector(s: &str) -> Option<(String, Option<String>)> {
    let (v, d) = s.split_once(':')?;
    let hex4 = |x: &str| x.len() == 4 && x.chars().all(|c| c.is_ascii_hexdigit());
    if !hex4(v) {
        return None;
    }
    let d = match d {
        "*" => None,
        d if hex4(d) => Some(d.to_ascii_lowercase()),
        _ => return None,
    };
    Some((v.to_ascii_lowercase(), d))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// *(issue 28)* `iommufd` is auto unless said, and only its three words.
    #[test]
    fn iommufd_is_auto_prefer_or_never() {
        assert_eq!(Config::parse("", "t").unwrap().iommufd, Iommufd::Auto);
        for (text, want) in [
            ("iommufd = \"auto\"", Iommufd::Auto),
            ("iommufd = \"prefer\"", Iommufd::Prefer),
            ("iommufd = \"never\"", Iommufd::Never),
        ] {
            assert_eq!(Config::parse(text, "t").unwrap().iommufd, want);
        }
        let e = Config::parse("iommufd = \"always\"", "t").unwrap_err();
        assert!(e.to_string().contains("auto"), "{e}");
    }

    #[test]
    fn rules_in_order_then_the_default() {
        let c: Config = toml::from_str(
            r#"
[[resource]]
name = "hypeman.io/l4"
selector = "10de:27b8"
[[resource]]
name = "hypeman.io/ml"
selector = "8086:*"
tags = { team = "ml" }
"#,
        )
        .unwrap();
        let none = Default::default();
        let ml: std::collections::HashMap<String, String> =
            [("team".to_string(), "ml".to_string())].into();
        assert_eq!(
            c.resource_for("10de", "27b8", "gpu", &none).as_deref(),
            Some("hypeman.io/l4")
        );
        assert_eq!(
            c.resource_for("8086", "1572", "pci", &ml).as_deref(),
            Some("hypeman.io/ml")
        );
        assert_eq!(
            c.resource_for("8086", "1572", "pci", &none).as_deref(),
            Some("hypeman.io/pci")
        );
        let strict = Config {
            default: false,
            ..c
        };
        assert_eq!(strict.resource_for("8086", "1572", "pci", &none), None);
        assert_eq!(slug("NVIDIA L40S-4Q"), "nvidia-l40s-4q");
        assert_eq!(slug("  GRID A100--4C! "), "grid-a100-4c");
        assert_eq!(slug("é"), "");
        assert!(
            valid_resource("hypeman.io/gpu")
                && !valid_resource("gpu")
                && !valid_resource("Hypeman.io/x")
        );
    }

    /// *(issue 26)* vGPU rules: the default name, and each refusal.
    #[test]
    fn vgpu_rules() {
        let c = Config::parse(
            "[[vgpu]]\nprofile = \"NVIDIA L40S-4Q\"\n[[vgpu]]\nprofile = \"GRID A100-4C\"\nname = \"hypeman.io/a100-4c\"\n",
            "t",
        )
        .unwrap();
        assert_eq!(
            c.vgpu_profile("hypeman.io/vgpu-nvidia-l40s-4q"),
            Some("NVIDIA L40S-4Q")
        );
        assert_eq!(c.vgpu_profile("hypeman.io/a100-4c"), Some("GRID A100-4C"));
        assert_eq!(c.vgpu_profile("hypeman.io/gpu"), None);
        for (bad, says) in [
            ("[[vgpu]]\nprofile = \"\"\n", "1-128"),
            ("[[vgpu]]\nprofile = \"--\"\n", "1-128"),
            (
                "[[vgpu]]\nprofile = \"A-1\"\n[[vgpu]]\nprofile = \"A-1\"\n",
                "twice",
            ),
            (
                "[[vgpu]]\nprofile = \"A-1\"\nname = \"hypeman.io/gpu\"\n",
                "used twice",
            ),
            ("[[vgpu]]\nprofile = \"A-1\"\nname = \"Bad\"\n", "lowercase"),
            ("[[vgpu]]\nprofile = \"A-1\"\ncolour = 1\n", "unknown field"),
        ] {
            let e = Config::parse(bad, "t").unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let long = format!("[[vgpu]]\nprofile = \"{}\"\n", "a".repeat(100));
        assert!(Config::parse(&long, "t").is_err());
    }
}
