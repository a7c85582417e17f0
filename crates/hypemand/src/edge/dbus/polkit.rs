//! The bouncer: asks polkitd, and decides alone only when polkitd is absent.
//! Handlers never come here directly: [`super::authz`] does, from its table.
//!
//! Every caller is checked with polkitd, root included: the answer is
//! polkitd's to give, and a rule set that denies nothing today may tomorrow.
//! Only when polkitd is absent or failing does the bouncer decide alone, and
//! then it lets uid 0 through and nobody else (so a host without polkit is
//! still administrable by root, and never open to anyone else).
//!
//! The subject is the caller's unique bus name from the message header, so
//! polkitd looks up the caller's own uid, session and process, never the
//! daemon's. Checks hold no lock: a caller waiting on a password prompt delays
//! nobody else.

use std::collections::HashMap;
use std::time::Duration;

use zbus::message::{Flags, Header};
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use hypeman_api::Error;

/// How long a check without interaction may take before polkit counts as failing.
const NON_INTERACTIVE_LIMIT: Duration = Duration::from_secs(25);

/// The polkit actions (`polkit/org.hypeman.devices.policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Register,
    Delete,
    /// Bind and Unbind.
    Bind,
    /// Attach and Detach.
    Attach,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::Register => "org.hypeman.devices.register",
            Action::Delete => "org.hypeman.devices.delete",
            Action::Bind => "org.hypeman.devices.bind",
            Action::Attach => "org.hypeman.devices.attach",
        }
    }
}

/// What the check is about; passed to polkit as details so rules can grant
/// one device and not another.
#[derive(Debug, Clone)]
pub struct Target {
    pub pci_address: String,
    /// `vendor:device`, e.g. `10de:27b8`.
    pub device_id: String,
    pub name: String,
}

/// What was decided and why, for the log and the reply.
enum Verdict {
    Granted(&'static str),
    Denied(String),
    NeedsInteraction,
}

/// The daemon's one bouncer: one polkit proxy and one uid cache for its
/// whole life.
pub struct Bouncer {
    conn: Connection,
    authority: AuthorityProxy<'static>,
    dbus: zbus::fdo::DBusProxy<'static>,
    /// Unique names are never reused on a bus, so a sender's uid is
    /// remembered (a bounded cache, cleared when full).
    uids: std::sync::Mutex<HashMap<String, u32>>,
}

impl Bouncer {
    pub async fn new(conn: &Connection) -> zbus::Result<Self> {
        let authority = AuthorityProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        let dbus = zbus::fdo::DBusProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?;
        Ok(Bouncer {
            conn: conn.clone(),
            authority,
            dbus,
            uids: std::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Authorizes the caller of the message `header` for `action` on `target`.
    pub async fn check(
        &self,
        header: &Header<'_>,
        action: Action,
        target: &Target,
    ) -> Result<(), Error> {
        let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
        let interactive = header
            .primary()
            .flags()
            .contains(Flags::ALLOW_INTERACTIVE_AUTH);
        let uid = self.caller_uid(&sender).await;
        let answer = self.ask_polkit(header, action, target, interactive).await;
        note_polkit_health(answer.as_ref().err());
        let verdict = match answer {
            Ok(r) if r.is_authorized => Verdict::Granted("polkit"),
            Ok(r) if r.is_challenge && !interactive => Verdict::NeedsInteraction,
            Ok(r) if r.details.contains_key("polkit.dismissed") => {
                Verdict::Denied("the authentication dialog was dismissed".into())
            }
            Ok(_) => Verdict::Denied(format!("polkit does not allow {}", action.id())),
            Err(_) if uid == Some(0) => Verdict::Granted("root, polkit unavailable"),
            Err(e) => Verdict::Denied(format!(
                "polkit is unavailable ({e}), and only root may {} without it",
                verb(action)
            )),
        };
        let uid_text = uid.map_or_else(|| "unknown".to_string(), |u| u.to_string());
        match verdict {
            Verdict::Granted(by) => {
                tracing::debug!(
                    uid = %uid_text, sender = %sender, action = action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = "granted", by, "authorization"
                );
                Ok(())
            }
            Verdict::NeedsInteraction => {
                tracing::info!(
                    uid = %uid_text, sender = %sender, action = action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = "interaction required", "authorization"
                );
                Err(Error::InteractiveAuthorizationRequired(format!(
                    "{} needs an administrator's password: call again allowing interactive authorization (hypemanctl --allow-interactive), or be granted {} by a polkit rule",
                    capitalise(verb(action)),
                    action.id()
                )))
            }
            Verdict::Denied(why) => {
                tracing::info!(
                    uid = %uid_text, sender = %sender, action = action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = "denied", reason = %why, "authorization"
                );
                Err(Error::AccessDenied(format!(
                    "not allowed to {} {} ({}): {why}",
                    verb(action),
                    target.name,
                    target.pci_address
                )))
            }
        }
    }

    async fn ask_polkit(
        &self,
        header: &Header<'_>,
        action: Action,
        target: &Target,
        interactive: bool,
    ) -> Result<zbus_polkit::policykit1::AuthorizationResult, String> {
        let subject = Subject::new_for_message_header(header).map_err(|e| e.to_string())?;
        let details = HashMap::from([
            ("pci_address", target.pci_address.as_str()),
            ("device_id", target.device_id.as_str()),
            ("name", target.name.as_str()),
        ]);
        let flags = if interactive {
            CheckAuthorizationFlags::ALLOW_USER_INTERACTION
        } else {
            CheckAuthorizationFlags::empty()
        };
        let call = self
            .authority
            .check_authorization(&subject, action.id(), &details, flags, "");
        if interactive {
            // A person may be typing a password; polkit's agent has its own timeout.
            return call.await.map_err(|e| e.to_string());
        }
        match tokio::time::timeout(NON_INTERACTIVE_LIMIT, call).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {NON_INTERACTIVE_LIMIT:?}")),
        }
    }

    /// The caller's uid, from the bus daemon.
    async fn caller_uid(&self, sender: &str) -> Option<u32> {
        if let Some(uid) = self.uids.lock().ok().and_then(|m| m.get(sender).copied()) {
            return Some(uid);
        }
        let name = zbus::names::BusName::try_from(sender).ok()?;
        let uid = self.dbus.get_connection_unix_user(name).await.ok()?;
        if let Ok(mut m) = self.uids.lock() {
            if m.len() >= 4096 {
                m.clear();
            }
            m.insert(sender.to_string(), uid);
        }
        Some(uid)
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }
}

/// Says once, at warning level, that polkit stopped answering (and once that
/// it is back), instead of on every change made meanwhile: on a host without
/// polkit at all, root's every change would otherwise log a warning.
fn note_polkit_health(error: Option<&String>) {
    use std::sync::atomic::{AtomicBool, Ordering};
    static DOWN: AtomicBool = AtomicBool::new(false);
    match error {
        Some(e) if !DOWN.swap(true, Ordering::SeqCst) => {
            tracing::warn!(error = %e, "polkit is unavailable: only root may make changes until it answers again")
        }
        Some(e) => tracing::debug!(error = %e, "polkit is still unavailable"),
        None if DOWN.swap(false, Ordering::SeqCst) => {
            tracing::info!("polkit answers again")
        }
        None => {}
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Register => "register",
        Action::Delete => "delete",
        Action::Bind => "bind or unbind",
        Action::Attach => "attach or detach",
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}
