//! *(issue 30)* Device objects that cost nothing until a call names one, as
//! systemd serves its units through sd-bus's fallback vtables.
//!
//! zbus keeps a node per exported object; this keeps none per device. The
//! bus socket's reader ([`super::socket`]) hands over every method call on
//! a path under `/org/hypeman/Devices/` (and `Introspect` of that path
//! itself, which lists the devices), and this answers it:
//!
//! - the path's last element is a device id the registry has: a
//!   `Device1` object is made for the call ([`DeviceObject::exported`]: the
//!   manager and the id), and the call goes to it through the same
//!   [`Exported`] base, so arguments, authorization and replies are exactly
//!   those of an exported object;
//! - `org.freedesktop.DBus.Properties` and `Introspectable` on it are
//!   answered here, as zbus's own would;
//! - anything else is `UnknownObject`, with zbus's words.
//!
//! `Peer` is not taken: zbus answers it on every path. Signals need no
//! object (`PropertiesChanged` and the ObjectManager's are sent by path).
//! A device exists on the bus exactly while the registry holds it: there is
//! no export to race a call.

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use tokio::sync::mpsc;
use zbus::message::{Header, Message, Type};
use zbus::names::{InterfaceName, MemberName};
use zbus::object_server::{DispatchResult, Interface, SignalEmitter};
use zbus::{fdo, BoxDBusError, Connection, ObjectServer, OwnedVariant, Variant};

use super::device::DeviceObject;
use super::exported::Exported;
use super::manager::{Manager, ManagerObject};
use super::objects::Objects;
use hypeman_api::{DEVICE_IFACE, MANAGER_PATH};

const PEER: &str = "org.freedesktop.DBus.Peer";
const INTROSPECTABLE: &str = "org.freedesktop.DBus.Introspectable";
const PROPERTIES: &str = "org.freedesktop.DBus.Properties";

/// Whether the bus socket's reader hands `msg` over to the fallback: a
/// method call, with an interface other than `Peer`, on a path under the
/// manager's, or `Introspect` of the manager's path (which lists devices).
pub fn takes(msg: &Message) -> bool {
    if msg.message_type() != Type::MethodCall {
        return false;
    }
    let header = msg.header();
    let (Some(path), Some(iface)) = (header.path(), header.interface()) else {
        // zbus answers a call without an interface ("Missing interface").
        return false;
    };
    if iface.as_str() == PEER {
        return false;
    }
    match path.as_str().strip_prefix(MANAGER_PATH) {
        Some("") => iface.as_str() == INTROSPECTABLE,
        Some(rest) => rest.starts_with('/'),
        None => false,
    }
}

/// The answerer of the calls the socket hands over.
pub struct Fallback {
    /// Set once the objects are served: until then, as before any export,
    /// every path is unknown.
    manager: OnceLock<Arc<Manager>>,
}

impl Fallback {
    /// Starts answering the calls that arrive on `calls` for `conn`.
    pub fn start(conn: &Connection, calls: mpsc::Receiver<Message>) -> Arc<Fallback> {
        let fallback = Arc::new(Fallback {
            manager: OnceLock::new(),
        });
        tokio::spawn(fallback.clone().run(conn.clone(), calls));
        fallback
    }

    /// Serves `manager`'s devices from now on.
    pub fn serve(&self, manager: Arc<Manager>) {
        if self.manager.set(manager).is_err() {
            tracing::warn!("the device objects were already served");
        }
    }

    /// One task per call, as zbus's object server spawns one per method
    /// call: a call waiting on polkit holds up no other. It ends when the
    /// socket's reader does (the connection's end), which drops `calls`'s
    /// sender.
    async fn run(self: Arc<Self>, conn: Connection, mut calls: mpsc::Receiver<Message>) {
        while let Some(msg) = calls.recv().await {
            let (conn, fallback) = (conn.clone(), self.clone());
            tokio::spawn(async move {
                let header = msg.header();
                if let Err(e) = fallback.dispatch(&conn, &msg, &header).await {
                    if let Err(e) = conn.reply_dbus_error(&header, e).await {
                        tracing::debug!(error = %e, "cannot send an error reply");
                    }
                }
            });
        }
    }

    async fn dispatch(
        &self,
        conn: &Connection,
        msg: &Message,
        header: &Header<'_>,
    ) -> Result<(), BoxDBusError> {
        // `takes` saw both.
        let (Some(path), Some(iface)) = (header.path(), header.interface()) else {
            return Err(fdo::Error::Failed("Missing object path or interface".into()).into());
        };
        let member = header
            .member()
            .ok_or_else(|| fdo::Error::Failed("Missing member".into()))?;
        let unknown = || fdo::Error::UnknownObject(format!("Unknown object '{path}'"));
        let manager = self.manager.get().ok_or_else(unknown)?;
        let server = conn.object_server();
        if path.as_str() == MANAGER_PATH {
            let xml = manager_introspection(server, manager).await?;
            return call(&Introspection(xml), server, conn, msg, member).await;
        }
        let id = path
            .as_str()
            .strip_prefix(MANAGER_PATH)
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|id| !id.contains('/'))
            .ok_or_else(unknown)?;
        if manager.service.snapshot().by_id(id).is_none() {
            return Err(unknown().into());
        }
        let object = DeviceObject::exported(manager.clone(), id.to_string());
        match iface.as_str() {
            DEVICE_IFACE => call(&object, server, conn, msg, member).await,
            PROPERTIES => call(&ObjectProperties(object), server, conn, msg, member).await,
            INTROSPECTABLE => {
                let xml = node_xml(&[&object], std::iter::empty());
                call(&Introspection(xml), server, conn, msg, member).await
            }
            other => {
                Err(fdo::Error::UnknownInterface(format!("Unknown interface '{other}'")).into())
            }
        }
    }
}

/// `member` of `iface`, as zbus's object server calls it: the interface
/// replies itself on success; an error is for the caller to send.
async fn call<I: Interface>(
    iface: &I,
    server: &ObjectServer,
    conn: &Connection,
    msg: &Message,
    member: &MemberName<'_>,
) -> Result<(), BoxDBusError> {
    match iface.call(server, conn, msg, member.clone()) {
        DispatchResult::Async(f) => f.await,
        // Every interface here answers from `&self`.
        DispatchResult::NotFound | DispatchResult::RequiresMut => {
            Err(fdo::Error::UnknownMethod(format!("Unknown method '{member}'")).into())
        }
    }
}

/// `org.freedesktop.DBus.Introspectable` and `Peer` as sd-bus and zbus
/// describe them (zbus keeps its own types of these private).
const STANDARD: &str = r#"  <interface name="org.freedesktop.DBus.Introspectable">
    <method name="Introspect">
      <arg type="s" direction="out"/>
    </method>
  </interface>
  <interface name="org.freedesktop.DBus.Peer">
    <method name="Ping">
    </method>
    <method name="GetMachineId">
      <arg type="s" direction="out"/>
    </method>
  </interface>
"#;

/// The introspection of a node with the standard interfaces, `ifaces`
/// (by name, as zbus orders them) and child nodes `children`.
fn node_xml<'a>(ifaces: &[&dyn Introspect], children: impl Iterator<Item = &'a str>) -> String {
    let mut xml = String::from(
        "\n<!DOCTYPE node PUBLIC \"-//freedesktop//DTD D-BUS Object Introspection 1.0//EN\"\n \
         \"http://www.freedesktop.org/standards/dbus/1.0/introspect.dtd\">\n<node>\n",
    );
    xml.push_str(STANDARD);
    let mut ifaces: Vec<_> = ifaces
        .iter()
        .chain([&(&fdo::Properties as &dyn Introspect)])
        .collect();
    ifaces.sort_by_key(|i| i.name());
    for i in ifaces {
        i.write(&mut xml);
    }
    for child in children {
        xml.push_str("  <node name=\"");
        xml.push_str(child);
        xml.push_str("\"/>\n");
    }
    xml.push_str("</node>\n");
    xml
}

/// An interface's name and introspection, object-safe.
trait Introspect {
    fn name(&self) -> InterfaceName<'static>;
    fn write(&self, xml: &mut String);
}

impl<I: Interface> Introspect for I {
    fn name(&self) -> InterfaceName<'static> {
        I::name()
    }
    fn write(&self, xml: &mut String) {
        self.introspect_to_writer(xml, 2);
    }
}

/// The manager's node: its interfaces, and every registered device as a
/// child node (what `busctl tree` walks).
async fn manager_introspection(
    server: &ObjectServer,
    manager: &Arc<Manager>,
) -> Result<String, BoxDBusError> {
    let failed = |e: zbus::Error| fdo::Error::Failed(e.to_string());
    let devices = server
        .interface::<_, Exported<ManagerObject>>(MANAGER_PATH)
        .await
        .map_err(failed)?;
    let objects = server
        .interface::<_, Exported<Objects>>(MANAGER_PATH)
        .await
        .map_err(failed)?;
    let (devices, objects) = (devices.get().await, objects.get().await);
    let snapshot = manager.service.snapshot();
    Ok(node_xml(
        &[&*devices, &*objects],
        snapshot.iter().map(|d| d.id.as_str()),
    ))
}

/// `Introspectable` of a node whose introspection is `.0`.
struct Introspection(String);

#[zbus::interface(
    name = "org.freedesktop.DBus.Introspectable",
    introspection_docs = false
)]
impl Introspection {
    async fn introspect(&self) -> String {
        self.0.clone()
    }
}

/// `Properties` of a device object: zbus's own, on the one interface the
/// object has.
struct ObjectProperties(Exported<DeviceObject>);

impl ObjectProperties {
    fn check(&self, interface_name: &InterfaceName<'_>) -> fdo::Result<()> {
        if interface_name.as_str() == DEVICE_IFACE {
            Ok(())
        } else {
            Err(fdo::Error::UnknownInterface(format!(
                "Unknown interface '{interface_name}'"
            )))
        }
    }
}

#[zbus::interface(name = "org.freedesktop.DBus.Properties", introspection_docs = false)]
impl ObjectProperties {
    async fn get(
        &self,
        interface_name: InterfaceName<'_>,
        property_name: &str,
        #[zbus(connection)] conn: &Connection,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedVariant, BoxDBusError> {
        self.check(&interface_name)?;
        self.0
            .get(property_name, server, conn, Some(&header), &emitter)
            .await
            .unwrap_or_else(|| {
                Err(
                    fdo::Error::UnknownProperty(format!("Unknown property '{property_name}'"))
                        .into(),
                )
            })
    }

    #[allow(clippy::too_many_arguments)]
    async fn set(
        &self,
        interface_name: InterfaceName<'_>,
        property_name: &str,
        value: Variant<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<(), BoxDBusError> {
        self.check(&interface_name)?;
        match self
            .0
            .set(property_name, &value, server, conn, Some(&header), &emitter)
        {
            DispatchResult::Async(f) => f.await,
            DispatchResult::NotFound | DispatchResult::RequiresMut => Err(
                fdo::Error::UnknownProperty(format!("Unknown property '{property_name}'")).into(),
            ),
        }
    }

    async fn get_all(
        &self,
        interface_name: InterfaceName<'_>,
        #[zbus(object_server)] server: &ObjectServer,
        #[zbus(connection)] conn: &Connection,
        #[zbus(header)] header: Header<'_>,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> fdo::Result<HashMap<String, OwnedVariant>> {
        self.check(&interface_name)?;
        self.0.get_all(server, conn, Some(&header), &emitter).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(path: &str, iface: &str, member: &str) -> Message {
        Message::method_call(path, member)
            .interface(iface)
            .build(&())
            .unwrap()
    }

    /// What the socket hands over: calls on device paths and the manager's
    /// introspection; never Peer, the manager's methods, or other paths.
    #[test]
    fn takes_the_device_subtree_and_nothing_else() {
        let dev = "/org/hypeman/Devices/abc";
        assert!(takes(&call(dev, DEVICE_IFACE, "Attach")));
        assert!(takes(&call(dev, PROPERTIES, "GetAll")));
        assert!(takes(&call(dev, INTROSPECTABLE, "Introspect")));
        assert!(takes(&call(
            "/org/hypeman/Devices/abc/x",
            DEVICE_IFACE,
            "Attach"
        )));
        assert!(takes(&call(MANAGER_PATH, INTROSPECTABLE, "Introspect")));
        assert!(!takes(&call(dev, PEER, "Ping")));
        assert!(!takes(&call(MANAGER_PATH, "org.hypeman.Devices1", "List")));
        assert!(!takes(&call(MANAGER_PATH, PROPERTIES, "GetAll")));
        assert!(!takes(&call(
            "/org/hypeman/DevicesX/abc",
            DEVICE_IFACE,
            "Attach"
        )));
        assert!(!takes(&call(
            "/org/hypeman/Simulator",
            INTROSPECTABLE,
            "Introspect"
        )));
        let no_iface = Message::method_call(dev, "Attach").build(&()).unwrap();
        assert!(!takes(&no_iface));
    }

    /// The node's introspection parses, lists the standard interfaces and
    /// the children.
    #[test]
    fn a_node_lists_its_interfaces_and_children() {
        let xml = node_xml(&[], ["a1", "b2"].into_iter());
        let node = zbus_xml::Node::from_reader(xml.as_bytes()).unwrap();
        let names: Vec<_> = node
            .interfaces()
            .iter()
            .map(|i| i.name().to_string())
            .collect();
        assert_eq!(names, [INTROSPECTABLE, PEER, PROPERTIES]);
        let children: Vec<_> = node
            .nodes()
            .iter()
            .map(|n| n.name().unwrap_or_default().to_string())
            .collect();
        assert_eq!(children, ["a1", "b2"]);
    }
}
