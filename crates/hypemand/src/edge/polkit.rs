//! The bouncer: asks polkitd, and decides alone only when polkitd is absent.
//! Handlers never come here directly: [`super::authz`] does, from its table,
//! through the [`Authorizer`] the bouncer is.
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
//!
//! *(issue 13)* Every check rides the daemon's one bus connection, and the bus
//! allows a connection only so many outstanding calls (128 by default). So
//! checks in flight are capped well below that, [`MAX_CHECKS`] in all and
//! [`MAX_CHECKS_PER_UID`] per caller's uid. A uid's further calls wait their
//! turn in a queue of their own, bounded at [`MAX_PENDING_PER_UID`]; past
//! that they are answered `Busy` at once. One user's flood cannot take the
//! slots everyone else needs, and a busy but honest client only waits. "polkitd is not there" (its name has no owner) is told apart
//! from a transient failure (the bus's limit, a timeout): only the first lets
//! root decide alone; the second is `Busy`, retryable, for everyone. Each
//! check has a deadline, and is cancelled at polkitd when the deadline passes
//! or the caller leaves the bus. Outages and floods are logged once per
//! episode, not per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Semaphore;
use zbus::message::Flags;
use zbus::Connection;
use zbus_polkit::policykit1::{AuthorityProxy, CheckAuthorizationFlags, Subject};

use hypeman_api::Error;

use super::authz::{Action, Authorizer, Caller, Details};

/// How long a check without interaction may take before polkit counts as failing.
const NON_INTERACTIVE_LIMIT: Duration = Duration::from_secs(25);
/// How long a person may take at a password prompt.
const INTERACTIVE_LIMIT: Duration = Duration::from_secs(300);
/// Checks in flight at once, in all: well below the bus's 128 outstanding
/// replies per connection, leaving room for the daemon's other calls.
pub const MAX_CHECKS: usize = 64;
/// Checks in flight at once for one uid.
pub const MAX_CHECKS_PER_UID: usize = 8;
/// Calls of one uid in flight or waiting for one of its slots.
pub const MAX_PENDING_PER_UID: usize = 128;

/// Why polkitd gave no answer.
#[derive(Debug)]
enum NoAnswer {
    /// polkitd is not on the bus.
    Absent(String),
    /// It is, but could not answer now (the bus's limits, a timeout).
    Transient(String),
    /// The caller left the bus; nobody is waiting for the answer.
    CallerGone,
}

impl std::fmt::Display for NoAnswer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoAnswer::Absent(e) | NoAnswer::Transient(e) => f.write_str(e),
            NoAnswer::CallerGone => f.write_str("the caller left the bus"),
        }
    }
}

/// polkitd's name has no owner and cannot be started: it is not there.
fn classify(e: zbus::Error) -> NoAnswer {
    let name = match &e {
        zbus::Error::MethodError(name, _, _) => name.to_string(),
        zbus::Error::FDO(fdo) => zbus::DBusError::name(&**fdo).to_string(),
        _ => String::new(),
    };
    match name.as_str() {
        "org.freedesktop.DBus.Error.ServiceUnknown"
        | "org.freedesktop.DBus.Error.NameHasNoOwner" => NoAnswer::Absent(e.to_string()),
        _ => NoAnswer::Transient(e.to_string()),
    }
}

/// One uid's share: its slots, and how many of its calls hold or await one.
struct Share {
    slots: Arc<Semaphore>,
    pending: usize,
}

/// A place in one uid's queue; given back when dropped.
struct Pending<'a> {
    bouncer: &'a Bouncer,
    uid: u32,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut m = self
            .bouncer
            .per_uid
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(share) = m.get_mut(&self.uid) {
            share.pending -= 1;
            if share.pending == 0 {
                m.remove(&self.uid);
            }
        }
    }
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
    authority: AuthorityProxy<'static>,
    dbus: zbus::fdo::DBusProxy<'static>,
    /// Unique names are never reused on a bus, so a sender's uid is
    /// remembered (a bounded cache, cleared when full).
    uids: std::sync::Mutex<HashMap<String, u32>>,
    /// Checks in flight, in all and per uid.
    slots: Semaphore,
    per_uid: std::sync::Mutex<HashMap<u32, Share>>,
    /// A flood is under way (said once until it is over).
    flooded: AtomicBool,
    /// For cancellation ids.
    next_check: AtomicU64,
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
            authority,
            dbus,
            uids: std::sync::Mutex::new(HashMap::new()),
            slots: Semaphore::new(MAX_CHECKS),
            per_uid: std::sync::Mutex::new(HashMap::new()),
            flooded: AtomicBool::new(false),
            next_check: AtomicU64::new(0),
        })
    }

    /// A place in `uid`'s queue and the semaphore of its slots, unless its
    /// queue is full.
    fn enqueue(&self, uid: u32) -> Option<(Pending<'_>, Arc<Semaphore>)> {
        let mut m = self.per_uid.lock().unwrap_or_else(|p| p.into_inner());
        let share = m.entry(uid).or_insert_with(|| Share {
            slots: Arc::new(Semaphore::new(MAX_CHECKS_PER_UID)),
            pending: 0,
        });
        if share.pending >= MAX_PENDING_PER_UID {
            return None;
        }
        share.pending += 1;
        Some((Pending { bouncer: self, uid }, share.slots.clone()))
    }

    /// Says once that callers are being turned away, and once that it ended.
    fn note_flood(&self, busy: bool, uid: Option<u32>) {
        if busy && !self.flooded.swap(true, Ordering::SeqCst) {
            tracing::warn!(
                uid = %uid.map_or_else(|| "unknown".into(), |u| u.to_string()),
                limit_per_uid = MAX_CHECKS_PER_UID,
                limit = MAX_CHECKS,
                "too many authorization checks in flight: answering Busy until they drain"
            );
        } else if !busy
            && self.slots.available_permits() == MAX_CHECKS
            && self.flooded.swap(false, Ordering::SeqCst)
        {
            tracing::info!("authorization checks are back under their limits");
        }
    }

    /// Asks polkitd, under a deadline, and cancels the check at polkitd when
    /// the deadline passes or the caller leaves the bus.
    async fn ask_polkit(
        &self,
        caller: &Caller<'_>,
        sender: &str,
        action: Action,
        target: &Details,
        interactive: bool,
    ) -> Result<zbus_polkit::policykit1::AuthorizationResult, NoAnswer> {
        let subject = match caller {
            Caller::Bus(header) => Subject::new_for_message_header(header),
            Caller::Process {
                pid,
                uid,
                start_time,
            } => Subject::new_for_pid(*pid, Some(*start_time), Some(*uid)),
        }
        .map_err(|e| NoAnswer::Transient(e.to_string()))?;
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
        let limit = if interactive {
            INTERACTIVE_LIMIT
        } else {
            NON_INTERACTIVE_LIMIT
        };
        let cancel_id = format!(
            "hypemand-{}-{}",
            std::process::id(),
            self.next_check.fetch_add(1, Ordering::Relaxed)
        );
        // The caller leaving: its unique name losing its owner. (A process
        // on a socket is not watched: its check ends at the deadline.)
        let gone = async {
            if !matches!(caller, Caller::Bus(_)) {
                return std::future::pending().await;
            }
            let Ok(name) = zbus::names::BusName::try_from(sender) else {
                return std::future::pending().await;
            };
            let Ok(mut changes) = self
                .dbus
                .receive_name_owner_changed_with_args(&[(0, name.as_str())])
                .await
            else {
                return std::future::pending().await;
            };
            // Already gone before the watch began?
            if !self
                .dbus
                .name_has_owner(name.as_ref())
                .await
                .unwrap_or(true)
            {
                return;
            }
            while let Some(change) = changes.next().await {
                if change.args().is_ok_and(|a| a.new_owner().is_none()) {
                    return;
                }
            }
            std::future::pending().await
        };
        let call =
            self.authority
                .check_authorization(&subject, action.id(), &details, flags, &cancel_id);
        let outcome = tokio::select! {
            r = tokio::time::timeout(limit, call) => match r {
                Ok(r) => return r.map_err(classify),
                Err(_) => NoAnswer::Transient(format!("no answer within {limit:?}")),
            },
            () = gone => NoAnswer::CallerGone,
        };
        match self.authority.cancel_check_authorization(&cancel_id).await {
            Ok(()) => tracing::info!(
                sender = %sender,
                action = %action.id(),
                reason = %outcome,
                "authorization check cancelled at polkitd"
            ),
            Err(e) => tracing::debug!(error = %e, "cannot cancel the check at polkitd"),
        }
        Err(outcome)
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
}

#[async_trait::async_trait]
impl Authorizer for Bouncer {
    /// Authorizes `caller` for `action` on `target`.
    async fn check(
        &self,
        caller: &Caller<'_>,
        action: Action,
        target: &Details,
    ) -> Result<(), Error> {
        let (sender, interactive, uid) = match caller {
            Caller::Bus(header) => {
                let sender = header.sender().map(|s| s.to_string()).unwrap_or_default();
                let interactive = header
                    .primary()
                    .flags()
                    .contains(Flags::ALLOW_INTERACTIVE_AUTH);
                let uid = self.caller_uid(&sender).await;
                (sender, interactive, uid)
            }
            Caller::Process { pid, uid, .. } => (format!("pid {pid}"), false, Some(*uid)),
        };
        let busy =
            |why: &str| Error::Busy(format!("{why}; nothing was changed: try again in a moment"));
        // A socket's peer that has exited cannot be checked (polkitd reads
        // its /proc entry): that is the caller's doing, not a busy daemon.
        let exited = || {
            match caller {
            Caller::Process {
                pid, start_time, ..
            } if process_gone(*pid, *start_time) => Some(Error::AccessDenied(format!(
                "the process that connected (pid {pid}) has exited, so it cannot be authorized; nothing was changed"
            ))),
            _ => None,
        }
        };
        if let Some(e) = exited() {
            return Err(e);
        }
        // A place in the caller's queue (an unknown uid shares one), then
        // one of its slots, then a slot of all; a full queue is answered at
        // once, a wait past the deadline too.
        let Some((_queued, mine)) = self.enqueue(uid.unwrap_or(u32::MAX)) else {
            self.note_flood(true, uid);
            return Err(busy("too many of your authorization checks are in flight"));
        };
        let slots = async {
            let mine = mine.acquire_owned().await.ok()?;
            let all = self.slots.acquire().await.ok()?;
            Some((mine, all))
        };
        let Ok(Some((_mine, _slot))) = tokio::time::timeout(NON_INTERACTIVE_LIMIT, slots).await
        else {
            self.note_flood(true, uid);
            return Err(busy("too many authorization checks are in flight"));
        };
        let answer = self
            .ask_polkit(caller, &sender, action, target, interactive)
            .await;
        drop(_slot);
        self.note_flood(false, uid);
        note_polkit_health(match &answer {
            Err(NoAnswer::Absent(e)) => Some(e),
            _ => None,
        });
        let answer = match answer {
            Err(NoAnswer::Transient(e)) => {
                if let Some(gone) = exited() {
                    return Err(gone);
                }
                note_polkit_transient(&e);
                return Err(busy(&format!("polkit could not answer now ({e})")));
            }
            Err(NoAnswer::CallerGone) => {
                return Err(Error::AccessDenied("the caller left the bus".into()))
            }
            other => other,
        };
        let verdict = match answer {
            Ok(r) if r.is_authorized => Verdict::Granted("polkit"),
            Ok(r) if r.is_challenge && !interactive => Verdict::NeedsInteraction,
            Ok(r) if r.details.contains_key("polkit.dismissed") => {
                Verdict::Denied("the authentication dialog was dismissed".into())
            }
            Ok(_) => Verdict::Denied(format!("polkit does not allow {}", action.id())),
            Err(_) if uid == Some(0) => Verdict::Granted("root, polkitd is not running"),
            Err(e) => Verdict::Denied(format!(
                "polkit is unavailable ({e}), and only root may {} without it",
                verb(action)
            )),
        };
        let uid_text = uid.map_or_else(|| "unknown".to_string(), |u| u.to_string());
        match verdict {
            Verdict::Granted(by) => {
                tracing::debug!(
                    uid = %uid_text, sender = %sender, action = %action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = %"granted", by = %by, "authorization"
                );
                Ok(())
            }
            Verdict::NeedsInteraction => {
                tracing::info!(
                    uid = %uid_text, sender = %sender, action = %action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = %"interaction required", "authorization"
                );
                Err(Error::InteractiveAuthorizationRequired(format!(
                    "{} needs an administrator's password: call again allowing interactive authorization (hypemanctl --allow-interactive), or be granted {} by a polkit rule",
                    capitalise(verb(action)),
                    action.id()
                )))
            }
            Verdict::Denied(why) => {
                tracing::info!(
                    uid = %uid_text, sender = %sender, action = %action.id(),
                    pci_address = %target.pci_address, device_name = %target.name,
                    result = %"denied", reason = %why, "authorization"
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
}

/// Says once, at warning level, that polkit stopped answering (and once that
/// it is back), instead of on every change made meanwhile: on a host without
/// polkit at all, root's every change would otherwise log a warning.
fn note_polkit_health(error: Option<&String>) {
    static DOWN: AtomicBool = AtomicBool::new(false);
    match error {
        Some(e) if !DOWN.swap(true, Ordering::SeqCst) => {
            tracing::warn!(error = %e, "polkitd is not running: only root may make changes until it is back")
        }
        Some(e) => tracing::debug!(error = %e, "polkit is still unavailable"),
        None if DOWN.swap(false, Ordering::SeqCst) => {
            tracing::info!("polkit answers again")
        }
        None => {}
    }
}

/// Says once per minute at most that polkitd could not answer for a
/// passing reason (those callers were told `Busy`).
fn note_polkit_transient(error: &str) {
    static LAST: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if last.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
        *last = Some(std::time::Instant::now());
        tracing::warn!(%error, "polkit could not answer a check; the caller was told to try again");
    }
}

fn verb(action: Action) -> &'static str {
    match action {
        Action::Register => "register",
        Action::Delete => "delete",
        Action::Bind => "bind or unbind",
        Action::Attach => "attach or detach",
        Action::Force => "force taking",
        Action::Partition => "partition",
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// A process's start time (clock ticks after boot, field 22 of
/// `/proc/PID/stat`), which polkitd compares to tell a reused pid apart.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `started` has exited (its pid
/// is gone, or now another process's). A start time of 0 means it had
/// already exited when its connection was accepted: gone, since nothing can
/// tell it from a process that has its pid now.
pub fn process_gone(pid: u32, started: u64) -> bool {
    if started == 0 {
        return true;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return true;
    };
    let mut fields = rest.split_whitespace();
    // A zombie has exited too; only its parent has not reaped it yet.
    let state = fields.next();
    let start = fields.nth(18).and_then(|t| t.parse::<u64>().ok());
    state == Some("Z") || start != Some(started)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// *(issue 24)* A socket peer that has exited is told apart from a
    /// running one, and from a pid now used by another process.
    #[test]
    fn an_exited_process_is_gone() {
        let me = std::process::id();
        let mine = start_time(me).unwrap();
        assert!(!process_gone(me, mine));
        assert!(process_gone(me, mine + 1));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let started = start_time(pid).unwrap_or(1);
        // Exited, not yet reaped: a zombie is gone.
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.contains(") Z "))
        {
            std::thread::yield_now();
        }
        assert!(process_gone(pid, started));
        child.wait().unwrap();
        assert!(process_gone(pid, started));
        assert!(process_gone(me, 0));
    }
}
