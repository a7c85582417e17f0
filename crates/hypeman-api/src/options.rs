//! The options dictionary (`a{sv}`) of `BindWithOptions` and
//! `AttachWithOptions`:
//!
//! - `force` (b) overrides the soft blockers and needs the
//!   `org.hypeman.devices.force` authorization as well;
//! - *(issue 27)* Attach only: `holder_pidfd` (h), a pidfd of the process
//!   that holds the device (usually the VMM), and `on_release` (s),
//!   `detach` (the default) or `give-back`: what happens when the holder
//!   ends. Without a holder, an attachment stays until it is detached.
//! - *(issue 27)* Attach only: `holder_unit` (s), a systemd unit (the VM's
//!   scope or service) whose end releases the device, instead of a process.
//!
//! `CreateVgpu`'s request reads the three lease keys through
//! [`Options::from_dict`] too, so a vGPU's lease has the same rules.
//!
//! Unknown keys and wrong types are refused, not ignored: a caller that
//! believes it asked for something must not be told yes for something else.

use std::collections::HashMap;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use zbus::{OwnedVariant as OwnedValue, Variant as Value};

use crate::error::Error;

/// The key of the force option.
pub const FORCE: &str = "force";
/// *(issue 27)* The key of the holder's pidfd.
pub const HOLDER_PIDFD: &str = "holder_pidfd";
/// *(issue 27)* The key of the holder's systemd unit.
pub const HOLDER_UNIT: &str = "holder_unit";
/// *(issue 27)* The key of what the holder's end does.
pub const ON_RELEASE: &str = "on_release";

/// Every key, as an error lists them.
const KEYS: &str =
    "force (b), holder_pidfd (h), holder_unit (s), on_release (s: detach or give-back)";

/// The unit types a holder may be: a VM runs as a service or in a scope
/// (systemd-run --scope, machined), and a slice groups several.
const UNIT_SUFFIXES: [&str; 3] = [".service", ".scope", ".slice"];

/// *(issue 27)* Checks a holder unit's name as systemd's
/// `unit_name_is_valid` does for the types a holder may be: at most 255
/// bytes of `A-Z a-z 0-9 : - _ . \\ @`, a non-empty prefix, and one of
/// `.service`, `.scope` or `.slice`. Anything else is refused before systemd
/// is asked.
pub fn validate_unit_name(name: &str) -> Result<(), Error> {
    let shown: String = name.chars().take(64).collect();
    let ok_chars = name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b":-_.\\@".contains(&c));
    let suffix = UNIT_SUFFIXES
        .iter()
        .find(|s| name.len() > s.len() && name.ends_with(*s));
    if name.len() > 255 || !ok_chars || suffix.is_none() {
        return Err(Error::InvalidArgument(format!(
            "{HOLDER_UNIT} {shown:?} is not a unit name: it is up to 255 of A-Z a-z 0-9 : - _ . \\ @ and ends in .service, .scope or .slice (vm-1.service, machine-vm1.scope)"
        )));
    }
    Ok(())
}

/// *(issue 27)* `pidfd_open(2)` of `pid`: what a client passes as
/// `holder_pidfd`. Opened now, it names the process `pid` is now, and no
/// later reuse of the number.
pub fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: the syscall reads only its arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = RawFd::try_from(r).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: the kernel just gave us this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

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
    /// *(issue 27)* A systemd unit holding the device (Attach only).
    pub holder_unit: Option<String>,
    /// *(issue 27)* What the holder's end does; `None`: not said (detach).
    pub on_release: Option<OnRelease>,
}

impl Options {
    /// Whether nothing was asked (the plain method does the same).
    pub fn is_empty(&self) -> bool {
        !self.force
            && self.holder_pidfd.is_none()
            && self.holder_unit.is_none()
            && self.on_release.is_none()
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
        if let Some(u) = &self.holder_unit {
            d.insert(HOLDER_UNIT, Value::from(u.as_str()));
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
                HOLDER_UNIT => {
                    let s = <&str>::try_from(&**value).map_err(|_| wrong("a string (s)"))?;
                    validate_unit_name(s)?;
                    out.holder_unit = Some(s.to_string());
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
        if out.holder_pidfd.is_some() && out.holder_unit.is_some() {
            return Err(Error::InvalidArgument(format!(
                "{HOLDER_PIDFD} and {HOLDER_UNIT} both name a holder: a lease has one, give either"
            )));
        }
        if out.on_release.is_some() && out.holder_pidfd.is_none() && out.holder_unit.is_none() {
            return Err(Error::InvalidArgument(format!(
                "{ON_RELEASE} needs a holder ({HOLDER_PIDFD} or {HOLDER_UNIT}): without one, an attachment stays until it is detached"
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
        // A unit: a valid name, one holder at most.
        let unit = Options {
            holder_unit: Some("machine-vm1.scope".into()),
            on_release: Some(OnRelease::Detach),
            ..Default::default()
        };
        let got = Options::from_dict(&owned(unit.to_dict())).unwrap();
        assert_eq!(got.holder_unit.as_deref(), Some("machine-vm1.scope"));
        for bad in [
            "",
            ".service",
            "vm",
            "vm-1.timer",
            "../x.service",
            "a b.service",
        ] {
            let mut d = HashMap::new();
            d.insert(
                HOLDER_UNIT.to_string(),
                Value::from(bad).try_to_owned().unwrap(),
            );
            assert!(
                matches!(Options::from_dict(&d), Err(Error::InvalidArgument(m)) if m.contains("not a unit name")),
                "{bad:?}"
            );
        }
        assert!(validate_unit_name(&format!("{}.service", "a".repeat(247))).is_ok());
        assert!(validate_unit_name(&format!("{}.service", "a".repeat(248))).is_err());
        assert!(validate_unit_name("vm@1\\x2d.service").is_ok());
        let both = Options {
            holder_unit: Some("vm-1.service".into()),
            ..sent
        };
        assert!(matches!(
            Options::from_dict(&owned(both.to_dict())),
            Err(Error::InvalidArgument(m)) if m.contains("either")
        ));
        let mut d = HashMap::new();
        d.insert(HOLDER_PIDFD.to_string(), OwnedValue::from(7u32));
        assert!(matches!(
            Options::from_dict(&d),
            Err(Error::InvalidArgument(m)) if m.contains("(h)")
        ));
    }
}
