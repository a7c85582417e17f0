//! [`Exported`]: the base every interface of the daemon is served through,
//! so what must hold for every method holds without a handler asking for it
//! (bolt's `bolt-exported.c` is the model).
//!
//! - **Arguments.** zbus reads the arguments a method takes and silently
//!   ignores any more; a call whose signature is not exactly the method's
//!   (from the interface's own introspection) is refused with `InvalidArgs`
//!   before any handler runs.
//! - **Large requests.** A body of at least [`LARGE_REQUEST`] bytes makes the
//!   daemon allocate a lot (a million-pair `ListByTags` filter decodes to
//!   hundreds of MiB of strings): the heap is trimmed once it is answered.
//! - **Read-only properties.** zbus answers `Properties.Set` on a property
//!   without a setter with `UnknownProperty`, as if it did not exist; this
//!   answers `PropertyReadOnly` for a property the interface has *(issue 13)*.
//! - **Properties as a table.** An interface whose properties are fields of
//!   one record declares them as rows ([`AllProperties`]): `Get`, `GetAll`
//!   (one record, not one per property), `Set` and the introspection are
//!   answered from the rows, and no getter is written per property.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use async_trait::async_trait;
use zbus::message::{Header, Message};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{fdo, BoxDBusError, Connection, ObjectServer, OwnedVariant, Variant};

/// A request body at least this large is followed by a heap trim once answered.
pub const LARGE_REQUEST: u32 = 64 * 1024;

/// Every property of an object, by name.
pub type Properties = HashMap<String, OwnedVariant>;

/// The future of [`AllProperties::all_properties`].
pub type PropertiesFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = fdo::Result<Properties>> + Send + 'a>>;

/// The future of [`AllProperties::property`].
pub type PropertyFuture<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = fdo::Result<OwnedVariant>> + Send + 'a>>;

/// How a property announces its changes (introspection's
/// `org.freedesktop.DBus.Property.EmitsChangedSignal`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Emits {
    /// Never changes once the object exists.
    Const,
    /// Each change is signalled with its value.
    True,
    /// Changes without a signal (read it when needed).
    False,
}

/// One property an interface declares as a row of its table.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    /// The property's name.
    pub name: &'static str,
    /// Its D-Bus type.
    pub signature: &'static str,
    /// How it announces changes.
    pub emits: Emits,
    /// What it is, for introspection.
    pub doc: &'static str,
}

/// An interface that answers its properties from a table of rows, built
/// from one read, instead of a getter per property.
pub trait AllProperties {
    /// The rows, in introspection order; none: zbus's getters answer.
    fn declared(&self) -> &'static [Declared] {
        &[]
    }
    /// Every property at once.
    fn all_properties(&self) -> Option<PropertiesFuture<'_>> {
        None
    }
    /// One declared property.
    fn property<'a>(&'a self, _name: &'a str) -> Option<PropertyFuture<'a>> {
        None
    }
}

/// The `<property>` elements of `rows`, as zbus writes its own.
fn write_declared(rows: &[Declared], out: &mut String, level: usize) {
    use std::fmt::Write as _;
    let pad = " ".repeat(level + 2);
    for d in rows {
        if !d.doc.is_empty() {
            let _ = writeln!(out, "{pad}<!--");
            for line in d.doc.lines() {
                let _ = writeln!(out, "{pad} {line}");
            }
            let _ = writeln!(out, "{pad} -->");
        }
        let open = format!(
            "{pad}<property name=\"{}\" type=\"{}\" access=\"read\"",
            d.name, d.signature
        );
        match d.emits {
            Emits::True => {
                let _ = writeln!(out, "{open}/>");
            }
            Emits::Const | Emits::False => {
                let value = if d.emits == Emits::Const {
                    "const"
                } else {
                    "false"
                };
                let _ = writeln!(out, "{open}>");
                let _ = writeln!(
                    out,
                    "{pad}  <annotation name=\"org.freedesktop.DBus.Property.EmitsChangedSignal\" value=\"{value}\"/>"
                );
                let _ = writeln!(out, "{pad}</property>");
            }
        }
    }
}

/// Each method's argument signature, by member name.
type Signatures = HashMap<String, String>;

/// The signatures of an interface, read once from its introspection per
/// interface name (a device object is made per device: its introspection is
/// not parsed again for each).
fn signatures_of<T: Interface>(iface: &T) -> Arc<Signatures> {
    static KNOWN: OnceLock<Mutex<HashMap<String, Arc<Signatures>>>> = OnceLock::new();
    let name = T::name().to_string();
    let mut known = KNOWN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(s) = known.get(&name) {
        return s.clone();
    }
    let mut xml = String::from("<node>");
    iface.introspect_to_writer(&mut xml, 0);
    xml.push_str("</node>");
    let mut signatures = Signatures::new();
    match zbus_xml::Node::from_reader(xml.as_bytes()) {
        Ok(node) => {
            for i in node.interfaces() {
                for m in i.methods() {
                    let sig: String = m
                        .args()
                        .iter()
                        .filter(|a| a.direction() != Some(zbus_xml::ArgDirection::Out))
                        .map(|a| a.ty().to_string())
                        .collect();
                    signatures.insert(m.name().to_string(), sig);
                }
            }
        }
        // Our own generated XML: only a zbus bug gets here. Calls then go
        // unchecked rather than all refused, and it is said.
        Err(e) => {
            tracing::error!(interface = %name, error = %e, "cannot read the interface's introspection")
        }
    }
    let signatures = Arc::new(signatures);
    known.insert(name, signatures.clone());
    signatures
}

/// An interface served through the daemon's base.
pub struct Exported<T> {
    inner: T,
    signatures: Arc<Signatures>,
}

impl<T: Interface> Exported<T> {
    /// `inner`, served through the base.
    pub fn new(inner: T) -> Self {
        let signatures = signatures_of(&inner);
        Exported { inner, signatures }
    }

    /// The refusal of a call whose arguments are not the method's, if they are not.
    fn wrong_arguments<'c>(
        &self,
        msg: &Message,
        name: &MemberName<'_>,
    ) -> Option<DispatchResult<'c>> {
        let expected = self.signatures.get(name.as_str())?;
        let got = msg.header().signature().to_string_no_parens();
        if got == *expected {
            return None;
        }
        let e = fdo::Error::InvalidArgs(format!(
            "this method takes arguments of type \"{expected}\", not \"{got}\""
        ));
        Some(DispatchResult::Async(Box::pin(async move {
            Err(Box::new(e) as BoxDBusError)
        })))
    }

    /// `result`, trimming the heap once its future ends if the request was large.
    fn trimmed<'c>(msg: &Message, result: DispatchResult<'c>) -> DispatchResult<'c> {
        match result {
            DispatchResult::Async(f) if msg.header().primary().body_len() >= LARGE_REQUEST => {
                DispatchResult::Async(Box::pin(async move {
                    let r = f.await;
                    crate::memory::trim_soon();
                    r
                }))
            }
            other => other,
        }
    }
}

#[async_trait]
impl<T: Interface + AllProperties> Interface for Exported<T> {
    fn name() -> InterfaceName<'static> {
        T::name()
    }

    fn spawn_tasks_for_methods(&self) -> bool {
        self.inner.spawn_tasks_for_methods()
    }

    async fn get(
        &self,
        property_name: &str,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> Option<Result<OwnedVariant, BoxDBusError>> {
        if let Some(value) = self.inner.property(property_name) {
            return Some(value.await.map_err(|e| Box::new(e) as BoxDBusError));
        }
        self.inner
            .get(property_name, server, connection, header, emitter)
            .await
    }

    async fn get_all(
        &self,
        server: &ObjectServer,
        connection: &Connection,
        header: Option<&Header<'_>>,
        emitter: &SignalEmitter<'_>,
    ) -> fdo::Result<Properties> {
        match self.inner.all_properties() {
            Some(all) => all.await,
            None => {
                self.inner
                    .get_all(server, connection, header, emitter)
                    .await
            }
        }
    }

    fn set<'call>(
        &'call self,
        property_name: &'call str,
        _value: &'call Variant<'_>,
        server: &'call ObjectServer,
        connection: &'call Connection,
        header: Option<&'call Header<'_>>,
        emitter: &'call SignalEmitter<'_>,
    ) -> DispatchResult<'call> {
        DispatchResult::Async(Box::pin(async move {
            let exists = self
                .inner
                .declared()
                .iter()
                .any(|d| d.name == property_name)
                || self
                    .inner
                    .get(property_name, server, connection, header, emitter)
                    .await
                    .is_some();
            let e = if exists {
                fdo::Error::PropertyReadOnly(format!("property {property_name} is read-only"))
            } else {
                fdo::Error::UnknownProperty(format!("no property {property_name}"))
            };
            Err(Box::new(e) as BoxDBusError)
        }))
    }

    async fn set_mut(
        &mut self,
        _property_name: &str,
        _value: &Variant<'_>,
        _server: &ObjectServer,
        _connection: &Connection,
        _header: Option<&Header<'_>>,
        _emitter: &SignalEmitter<'_>,
    ) -> Option<Result<(), BoxDBusError>> {
        None
    }

    fn call<'call>(
        &'call self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        match self.wrong_arguments(msg, &name) {
            Some(refusal) => refusal,
            None => Self::trimmed(msg, self.inner.call(server, connection, msg, name)),
        }
    }

    fn call_mut<'call>(
        &'call mut self,
        server: &'call ObjectServer,
        connection: &'call Connection,
        msg: &'call Message,
        name: MemberName<'call>,
    ) -> DispatchResult<'call> {
        match self.wrong_arguments(msg, &name) {
            Some(refusal) => refusal,
            None => Self::trimmed(msg, self.inner.call_mut(server, connection, msg, name)),
        }
    }

    fn introspect_to_writer(&self, writer: &mut dyn std::fmt::Write, level: usize) {
        let rows = self.inner.declared();
        if rows.is_empty() {
            return self.inner.introspect_to_writer(writer, level);
        }
        // The declared properties go inside the interface element zbus
        // writes for the methods and signals.
        let mut xml = String::new();
        self.inner.introspect_to_writer(&mut xml, level);
        let close = format!("{}</interface>", " ".repeat(level));
        let at = xml.rfind(&close).unwrap_or(xml.len());
        let mut props = String::new();
        write_declared(rows, &mut props, level);
        xml.insert_str(at, &props);
        let _ = writer.write_str(&xml);
    }
}
