//! The options dictionary (`a{sv}`) of `BindWithOptions` and
//! `AttachWithOptions`:
//!
//! - `force` (b) overrides the soft blockers and needs the
//!   `org.hypeman.devices.force` authorization as well;
//! - *(issue 27)* Attach only: `holder_pidfd` (h), a pidfd of the process
//!   that holds the device (usually the VMM), and `on_release` (s),
//!   `detach` (the default) or `give-back`: what happens when the holder
//!   ends. Without a holder, an attachment stays until it is detached.
//!
//! Unknown keys and wrong types are refused, not ignored: a caller that
//! believes it asked for something must not be told yes for something else.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use zbus::{OwnedVariant as OwnedValue, Variant as Value};

use crate::error::Error;

/// The key of the force option.
pub const FORCE: &str = "force";
/// *(issue 27)* The key of the holder's pidfd.
pub const HOLDER_PIDFD: &str = "holder_pidfd";
/// *(issue 27)* The key of what the holder's end does.
pub const ON_RELEASE: &str = "on_release";

/// Every key, as an error lists them.
const KEYS: &str = "force (b), holder_pidfd (h), on_release (s: detach or give-back)";

/// *(issue 27)* What happens to a leased device when its holder ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnRelease {
    /// The attachment is cleared; the device stays on vfio-pci.
    #[default]
    Detach,
    /// Cleared, and the device goes back to its host driver (Unbind).
    GiveBack,
}

impl OnRelease {
    /// The name the API uses.
    pub fn as_str(self) -> &'static str {
        match self {
            OnRelease::Detach => "detach",
            OnRelease::GiveBack => "give-back",
        }
    }

    /// Reads the API's name.
    pub fn parse(s: &str) -> Result<OnRelease, Error> {
        match s {
            "detach" => Ok(OnRelease::Detach),
            "give-back" => Ok(OnRelease::GiveBack),
            other => {
                let shown: String = other.chars().take(64).collect();
                Err(Error::InvalidArgument(format!(
                    "{ON_RELEASE} {shown:?} is not known; it is detach (the default) or give-back"
                )))
            }
        }
    }
}

/// What a caller asked for.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Override the soft blockers (needs `org.hypeman.devices.force`).
    pub force: bool,
    /// *(issue 27)* A pidfd of the holder (Attach only).
    pub holder_pidfd: Option<Arc<OwnedFd>>,
    /// *(issue 27)* What the holder's end does; `None`: not said (detach).
    pub on_release: Option<OnRelease>,
}

impl Options {
    /// Whether nothing was asked (the plain method does the same).
    pub fn is_empty(&self) -> bool {
        !self.force && self.holder_pidfd.is_none() && self.on_release.is_none()
    }

    /// The dictionary a client sends (borrowing the pidfd it holds).
    pub fn to_dict(&self) -> HashMap<&'static str, Value<'_>> {
        let mut d = HashMap::new();
        if self.force {
            d.insert(FORCE, Value::from(true));
        }
        if let Some(fd) = &self.holder_pidfd {
            d.insert(HOLDER_PIDFD, Value::Fd(zbus::Fd::from(fd.as_fd())));
        }
        if let Some(r) = self.on_release {
            d.insert(ON_RELEASE, Value::from(r.as_str()));
        }
        d
    }

    /// Reads what the daemon received. The pidfd is duplicated: the
    /// message's copy closes with the message.
    pub fn from_dict(d: &HashMap<String, OwnedValue>) -> Result<Options, Error> {
        let mut out = Options::default();
        for (key, value) in d {
            let wrong = |what: &str| {
                Error::InvalidArgument(format!(
                    "option {key:?} must be {what}, not {}",
                    value.value_signature()
                ))
            };
            match key.as_str() {
                FORCE => {
                    out.force = bool::try_from(value).map_err(|_| wrong("a boolean (b)"))?;
                }
                HOLDER_PIDFD => {
                    let Value::Fd(fd) = &**value else {
                        return Err(wrong("a file descriptor (h), a pidfd of the holder"));
                    };
                    let owned = fd.as_fd().try_clone_to_owned().map_err(|e| {
                        Error::Failed(format!("cannot keep the holder's pidfd: {e}"))
                    })?;
                    out.holder_pidfd = Some(Arc::new(owned));
                }
                ON_RELEASE => {
                    let s = <&str>::try_from(&**value).map_err(|_| wrong("a string (s)"))?;
                    out.on_release = Some(OnRelease::parse(s)?);
                }
                other => {
                    let shown: String = other.chars().take(64).collect();
                    return Err(Error::InvalidArgument(format!(
                        "unknown option {shown:?}; the options are: {KEYS}"
                    )));
                }
            }
        }
        if out.on_release.is_some() && out.holder_pidfd.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{ON_RELEASE} needs a holder ({HOLDER_PIDFD}): without one, an attachment stays until it is detached"
            )));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owned(d: HashMap<&'static str, Value<'_>>) -> HashMap<String, OwnedValue> {
        d.into_iter()
            .map(|(k, v)| (k.to_string(), v.try_to_owned().unwrap()))
            .collect()
    }

    #[test]
    fn round_trip_and_refusals() {
        let sent = Options {
            force: true,
            ..Default::default()
        };
        let got = Options::from_dict(&owned(sent.to_dict())).unwrap();
        assert!(got.force && got.holder_pidfd.is_none() && got.on_release.is_none());
        assert!(Options::from_dict(&HashMap::new()).unwrap().is_empty());
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

    #[test]
    fn a_holder_and_what_its_end_does() {
        let file = std::fs::File::open("/dev/null").unwrap();
        let sent = Options {
            holder_pidfd: Some(Arc::new(OwnedFd::from(file))),
            on_release: Some(OnRelease::GiveBack),
            ..Default::default()
        };
        let got = Options::from_dict(&owned(sent.to_dict())).unwrap();
        assert_eq!(got.on_release, Some(OnRelease::GiveBack));
        assert!(got.holder_pidfd.is_some());
        // An unknown value, a wrong type, and on_release without a holder.
        let mut d = HashMap::new();
        d.insert(
            ON_RELEASE.to_string(),
            Value::from("keep").try_to_owned().unwrap(),
        );
        assert!(matches!(
            Options::from_dict(&d),
            Err(Error::InvalidArgument(m)) if m.contains("give-back")
        ));
        d.insert(
            ON_RELEASE.to_string(),
            Value::from("detach").try_to_owned().unwrap(),
        );
        assert!(matches!(
            Options::from_dict(&d),
            Err(Error::InvalidArgument(m)) if m.contains("needs a holder")
        ));
        let mut d = HashMap::new();
        d.insert(HOLDER_PIDFD.to_string(), OwnedValue::from(7u32));
        assert!(matches!(
            Options::from_dict(&d),
            Err(Error::InvalidArgument(m)) if m.contains("(h)")
        ));
    }
}
