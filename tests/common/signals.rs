//! The daemon's signals as a client receives them: one zbus `MessageStream`
//! on the test bus, matched before the caller goes on, so a test waits for
//! the signal itself (no file written by a monitor, no polling) and keeps the
//! order they came in for assertions about order.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use zbus::{MatchRule, MessageStream, OwnedVariant};

use super::{TestBus, NAME};

/// A hang guard, not a timing assertion: a signal that never comes fails the
/// test instead of hanging CI.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// One signal, decoded by its member's signature.
#[derive(Debug, Clone)]
pub enum Signal {
    /// `PropertiesChanged` of an object: its path and the changed values.
    Changed {
        path: String,
        changed: HashMap<String, OwnedVariant>,
    },
    /// `HostDeviceAdded` / `HostDeviceRemoved` and their address.
    Host { added: bool, address: String },
    /// Anything else the daemon sent: member and path.
    Other { member: String, path: String },
}

impl Signal {
    /// Whether this is a change of `property` on `path` (any path when
    /// `None`) to `value`.
    pub fn sets<V>(&self, path: Option<&str>, property: &str, value: V) -> bool
    where
        V: TryFrom<OwnedVariant> + PartialEq,
    {
        let Signal::Changed { path: p, changed } = self else {
            return false;
        };
        path.is_none_or(|want| want == p)
            && changed
                .get(property)
                .and_then(|v| v.try_clone().ok())
                .and_then(|v| V::try_from(v).ok())
                .is_some_and(|v| v == value)
    }
}

/// Every signal the daemon sends on `bus` (under one object path, or all),
/// from the moment this is made.
pub struct Signals {
    rt: tokio::runtime::Runtime,
    stream: MessageStream,
    /// Everything received so far, in order.
    pub seen: Vec<Signal>,
    // Kept so the stream's connection lives as long as it does.
    _conn: zbus::Connection,
}

impl Signals {
    /// Subscribes (the match is in place at the bus when this returns).
    pub fn watch(bus: &TestBus, path: Option<&str>) -> Signals {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let (conn, stream) = rt.block_on(async {
            let conn = hypeman_api::BusChoice::Address(bus.address.clone())
                .builder()
                .build()
                .await
                .expect("connect to the test bus");
            let mut rule = MatchRule::builder()
                .msg_type(zbus::message::Type::Signal)
                .sender(NAME);
            if let Some(p) = path {
                rule = rule.path(p.to_string());
            }
            let rule = rule.build().expect("a match rule");
            let stream = MessageStream::for_match_rule(rule, &conn, None)
                .await
                .expect("subscribe");
            (conn, stream)
        });
        Signals {
            rt,
            stream,
            seen: Vec::new(),
            _conn: conn,
        }
    }

    /// Waits for the next signal and records it.
    fn next(&mut self) -> Signal {
        let stream = &mut self.stream;
        let msg = self
            .rt
            .block_on(async { tokio::time::timeout(HANG_GUARD, stream.next()).await })
            .unwrap_or_else(|_| panic!("no signal within the hang guard; seen: {:?}", self.seen))
            .expect("the stream ended")
            .expect("a readable message");
        let header = msg.header();
        let member = header.member().map(|m| m.to_string()).unwrap_or_default();
        let path = header.path().map(|p| p.to_string()).unwrap_or_default();
        let body = msg.body();
        let signal = match member.as_str() {
            "PropertiesChanged" => {
                let (_iface, changed, _invalidated): (
                    String,
                    HashMap<String, OwnedVariant>,
                    Vec<String>,
                ) = body.deserialize().expect("PropertiesChanged's body");
                Signal::Changed { path, changed }
            }
            "HostDeviceAdded" | "HostDeviceRemoved" => {
                let (address,): (String,) = body.deserialize().expect("an address");
                Signal::Host {
                    added: member == "HostDeviceAdded",
                    address,
                }
            }
            _ => Signal::Other { member, path },
        };
        self.seen.push(signal.clone());
        signal
    }

    /// Waits until a signal satisfies `pred` (one already seen counts) and
    /// returns its position in [`Signals::seen`].
    pub fn wait_for(&mut self, pred: impl Fn(&Signal) -> bool) -> usize {
        if let Some(i) = self.seen.iter().position(&pred) {
            return i;
        }
        loop {
            let s = self.next();
            if pred(&s) {
                return self.seen.len() - 1;
            }
        }
    }

    /// Waits for a change of `property` to `value` on `path` (any, if `None`).
    pub fn wait_set<V>(&mut self, path: Option<&str>, property: &str, value: V) -> usize
    where
        V: TryFrom<OwnedVariant> + PartialEq + Clone,
    {
        self.wait_for(|s| s.sets(path, property, value.clone()))
    }

    /// Waits for `HostDeviceAdded` (or `Removed`) of `address`.
    pub fn wait_host(&mut self, added: bool, address: &str) -> usize {
        self.wait_for(
            |s| matches!(s, Signal::Host { added: a, address: x } if *a == added && x == address),
        )
    }
}

/// A process's exit as an event: readable once the process has exited.
struct Exit(tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>);

impl Exit {
    fn of(pid: u32) -> Option<Exit> {
        use std::os::fd::FromRawFd;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd as i32) };
        // SAFETY: the AsyncFd owns the descriptor, which stays open (and
        // refers to this process) until the AsyncFd is dropped.
        unsafe { tokio::io::unix::AsyncFd::register(fd) }
            .ok()
            .map(Exit)
    }

    async fn wait(&self) {
        let _ = self.0.readable().await;
    }
}

/// Waits, on `NameOwnerChanged` and not by polling, until `name` is owned
/// (`owned`) or has no owner on `bus`. With `pid`, gives up as soon as that
/// process exits (returns false: it died first).
pub fn wait_name(bus: &TestBus, name: &str, owned: bool, pid: Option<u32>) -> bool {
    // On a thread of its own: async tests call this from inside their runtime.
    let address = bus.address.clone();
    std::thread::scope(|s| {
        s.spawn(|| wait_name_on(&address, name, owned, pid))
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

fn wait_name_on(address: &str, name: &str, owned: bool, pid: Option<u32>) -> bool {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let conn = hypeman_api::BusChoice::Address(address.to_string())
            .builder()
            .build()
            .await
            .expect("connect to the test bus");
        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("the bus's proxy");
        // Subscribed before the first look, so no change falls in between.
        let mut changes = dbus
            .receive_name_owner_changed_with_args(&[(0, name)])
            .await
            .expect("NameOwnerChanged");
        let bus_name = zbus::names::BusName::try_from(name).expect("a bus name");
        if dbus.name_has_owner(bus_name).await.expect("NameHasOwner") == owned {
            return true;
        }
        let exit = pid.and_then(Exit::of);
        let changed = async {
            while let Some(c) = changes.next().await {
                if c.args().is_ok_and(|a| a.new_owner().is_some() == owned) {
                    return;
                }
            }
        };
        let exited = async {
            match &exit {
                Some(e) => e.wait().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = changed => true,
            () = exited => false,
            () = tokio::time::sleep(HANG_GUARD) => {
                panic!("{name} was not {} within the hang guard", if owned { "owned" } else { "released" })
            }
        }
    })
}
