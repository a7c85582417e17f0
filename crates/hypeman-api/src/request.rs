//! The seed's create request (`POST /devices`, and D-Bus `Create(a{sv})`):
//! `pci_address`, an optional `name` and optional `tags`.
//!
//! One type for both front ends, so the two cannot read a request
//! differently: JSON through serde (unknown fields refused), `a{sv}` through
//! [`CreateRequest::from_dict`] (unknown keys and wrong types refused).

use std::collections::{BTreeMap, HashMap};

use serde::Deserialize;
use zbus::{OwnedVariant, Variant};

use crate::error::Error;

/// The seed's create request: what `POST /devices` and `Create` take.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    /// The host device to register, `0000:a2:00.0`.
    pub pci_address: String,
    /// Its name; `pci-<address>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Its tags (Hypeman's rules).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
}

impl CreateRequest {
    /// The dictionary a D-Bus client sends.
    pub fn to_dict(&self) -> HashMap<&'static str, Variant<'static>> {
        let mut d = HashMap::new();
        d.insert("pci_address", Variant::from(self.pci_address.clone()));
        if let Some(n) = &self.name {
            d.insert("name", Variant::from(n.clone()));
        }
        if !self.tags.is_empty() {
            let tags: HashMap<String, String> = self.tags.clone().into_iter().collect();
            d.insert("tags", Variant::from(tags));
        }
        d
    }

    /// Reads what the daemon received.
    pub fn from_dict(d: &HashMap<String, OwnedVariant>) -> Result<CreateRequest, Error> {
        let wrong = |key: &str, want: &str, v: &OwnedVariant| {
            Error::InvalidArgument(format!(
                "{key:?} must be {want}, not {}",
                v.value_signature()
            ))
        };
        let mut out = CreateRequest::default();
        let mut has_address = false;
        for (key, v) in d {
            match key.as_str() {
                "pci_address" => {
                    out.pci_address =
                        String::try_from(v.clone()).map_err(|_| wrong(key, "a string (s)", v))?;
                    has_address = true;
                }
                "name" => {
                    out.name = Some(
                        String::try_from(v.clone()).map_err(|_| wrong(key, "a string (s)", v))?,
                    );
                }
                "tags" => {
                    let tags: HashMap<String, String> = HashMap::try_from(v.clone())
                        .map_err(|_| wrong(key, "a string map (a{ss})", v))?;
                    out.tags = tags.into_iter().collect();
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown key {shown:?}; a create request has pci_address (s), name (s) and tags (a{{ss}})"
                    )));
                }
            }
        }
        if !has_address {
            return Err(Error::InvalidArgument(
                "a create request needs pci_address (s)".into(),
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(d: HashMap<&'static str, Variant<'static>>) -> HashMap<String, OwnedVariant> {
        d.into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect()
    }

    #[test]
    fn round_trip_and_refusals() {
        let r = CreateRequest {
            pci_address: "0000:a2:00.0".into(),
            name: Some("gpu".into()),
            tags: [("team".to_string(), "ml".to_string())]
                .into_iter()
                .collect(),
        };
        assert_eq!(CreateRequest::from_dict(&owned(r.to_dict())).unwrap(), r);
        let mut no_addr = owned(r.to_dict());
        no_addr.remove("pci_address");
        assert!(CreateRequest::from_dict(&no_addr).is_err());
        let mut bad = owned(r.to_dict());
        bad.insert("tags".into(), OwnedVariant::from(3u32));
        assert!(
            matches!(CreateRequest::from_dict(&bad), Err(Error::InvalidArgument(m)) if m.contains("a{ss}"))
        );
        let mut extra = owned(r.to_dict());
        extra.insert("nmae".into(), OwnedVariant::from(true));
        assert!(CreateRequest::from_dict(&extra).is_err());
        let json: Result<CreateRequest, _> =
            serde_json::from_str(r#"{"pci_address": "a2:00.0", "tag": {}}"#);
        assert!(json.is_err());
    }
}
