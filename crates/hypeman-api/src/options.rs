//! The options dictionary (`a{sv}`) of `BindWithOptions` and
//! `AttachWithOptions`: today only `force` (b), which overrides the soft
//! blockers and needs the `org.hypeman.devices.force` authorization as well.
//!
//! Unknown keys and wrong types are refused, not ignored: a caller that
//! believes it asked for something must not be told yes for something else.

use std::collections::HashMap;

use zbus::{OwnedVariant as OwnedValue, Variant as Value};

use crate::error::Error;

/// The key of the force option.
pub const FORCE: &str = "force";

/// What a caller asked for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// Override the soft blockers (needs `org.hypeman.devices.force`).
    pub force: bool,
}

impl Options {
    /// The dictionary a client sends.
    pub fn to_dict(self) -> HashMap<&'static str, Value<'static>> {
        let mut d = HashMap::new();
        if self.force {
            d.insert(FORCE, Value::from(true));
        }
        d
    }

    /// Reads what the daemon received.
    pub fn from_dict(d: &HashMap<String, OwnedValue>) -> Result<Options, Error> {
        let mut out = Options::default();
        for (key, value) in d {
            match key.as_str() {
                FORCE => {
                    out.force = bool::try_from(value).map_err(|_| {
                        Error::InvalidArgument(format!(
                            "option {FORCE:?} must be a boolean (b), not {}",
                            value.value_signature()
                        ))
                    })?;
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown option {shown:?}; the options are: {FORCE} (b)"
                    )));
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let sent = Options { force: true }.to_dict();
        let got: HashMap<String, OwnedValue> = sent
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect();
        assert_eq!(Options::from_dict(&got).unwrap(), Options { force: true });
        assert_eq!(
            Options::from_dict(&HashMap::new()).unwrap(),
            Options::default()
        );
        let mut bad = HashMap::new();
        bad.insert("force".to_string(), OwnedValue::from(1u32));
        assert!(matches!(
            Options::from_dict(&bad),
            Err(Error::InvalidArgument(m)) if m.contains("boolean")
        ));
        let mut unknown = HashMap::new();
        unknown.insert("forse".to_string(), OwnedValue::from(true));
        assert!(matches!(
            Options::from_dict(&unknown),
            Err(Error::InvalidArgument(m)) if m.contains("unknown option")
        ));
    }
}
