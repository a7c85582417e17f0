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
}

fn yes() -> bool {
    true
}

impl Default for Config {
    fn default() -> Self {
        Config {
            default: true,
            resources: Vec::new(),
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
        let c: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
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
        Ok(c)
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
        assert!(
            valid_resource("hypeman.io/gpu")
                && !valid_resource("gpu")
                && !valid_resource("Hypeman.io/x")
        );
    }
}
