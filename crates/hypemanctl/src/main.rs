//! hypemanctl: the command-line client of hypemand. Thin: parse, call, print.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use clap::Parser;
use futures_util::StreamExt;
use hypeman_api::Options;
use hypemanctl::cli::{generate_assets, CtlArgs, CtlCommand, VgpuCommand};
use hypemanctl::{Available, Client, ClientError, Record};
use serde_json::{json, Value};
use zbus::{MatchRule, MessageStream, OwnedObjectPath, OwnedVariant};

fn main() -> ExitCode {
    let args = match CtlArgs::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    if let CtlCommand::GenerateAssets { dir } = &args.command {
        return match generate_assets(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("hypemanctl: cannot write to {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("hypemanctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("hypemanctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command; answers the exit status (the command's, for `attach --`).
async fn run(args: CtlArgs) -> Result<u8, ClientError> {
    let interactive = args
        .allow_interactive
        .unwrap_or_else(|| std::io::stdin().is_terminal());
    let client = Client::connect(&args.bus)
        .await?
        .allow_interactive(interactive);
    let json = args.json;
    match args.command {
        CtlCommand::Register {
            pci_address,
            name,
            tags,
        } => {
            let d = if tags.is_empty() {
                client
                    .register(&pci_address, name.as_deref().unwrap_or(""))
                    .await?
            } else {
                let request = hypeman_api::CreateRequest {
                    pci_address,
                    name,
                    tags: tags.into_iter().collect(),
                };
                client.create(&request).await?
            };
            print_devices(&[d], json, true);
        }
        CtlCommand::List { tags } if tags.is_empty() => {
            print_devices(&client.list().await?, json, false)
        }
        CtlCommand::List { tags } => print_devices(
            &client.list_by_tags(&tags.into_iter().collect()).await?,
            json,
            false,
        ),
        CtlCommand::Tag {
            id_or_name,
            set,
            remove,
        } => {
            let d = client
                .set_tags(&id_or_name, &set.into_iter().collect(), &remove)
                .await?;
            print_devices(std::slice::from_ref(&d), json, true);
            if !json {
                print_tags(&d);
            }
        }
        CtlCommand::Get { id_or_name } => {
            let mut d = client.get(&id_or_name).await?;
            // *(issue 29)* Asked for: the counters read now, not the
            // verdict of the last read that Get shows.
            d.health = Some(client.health(&d.id).await?);
            if json {
                // The seed's document, and the lease when there is one.
                let mut doc = serde_json::to_value(d.seed()).unwrap_or_default();
                if let (Some(o), Some(l)) = (doc.as_object_mut(), lease_json(&d)) {
                    o.insert("lease".into(), l);
                }
                if let (Some(o), Some(r)) = (doc.as_object_mut(), &d.reset_method) {
                    o.insert("reset_method".into(), r.as_str().into());
                }
                if let (Some(o), Some(h)) = (doc.as_object_mut(), &d.hardware_changed) {
                    o.insert("hardware_changed".into(), h.as_str().into());
                }
                // *(issue 29)* Said when it is not ok: the seed's document
                // stays the seed's for a healthy device.
                let unwell = d.health.as_deref().filter(|h| *h != "ok");
                if let (Some(o), Some(h)) = (doc.as_object_mut(), unwell) {
                    o.insert("health".into(), h.into());
                }
                pretty(&doc);
            } else {
                print_devices(std::slice::from_ref(&d), json, true);
                if let Some(h) = &d.hardware_changed {
                    println!("hardware changed: {h}");
                }
                if let Some(h) = &d.health {
                    println!("health: {h}");
                }
                print_reset(d.reset_method.as_deref());
                print_lease(&d);
                print_tags(&d);
                print_sriov(&d);
                print_blockers(&client.blockers(&d.id).await?);
            }
        }
        CtlCommand::Delete { id_or_name } => {
            client.delete(&id_or_name).await?;
            if json {
                println!("{}", json!({ "deleted": id_or_name }));
            } else {
                println!("deleted {id_or_name}");
            }
        }
        CtlCommand::Available { all } => print_available(&client.available().await?, json, all),
        CtlCommand::Bind { id_or_name, force } => print_devices(
            &[client
                .bind_with(
                    &id_or_name,
                    Options {
                        force,
                        ..Default::default()
                    },
                )
                .await?],
            json,
            true,
        ),
        CtlCommand::Unbind { id_or_name } => {
            print_devices(&[client.unbind(&id_or_name).await?], json, true)
        }
        CtlCommand::Attach {
            id_or_name,
            instance,
            group,
            force,
            lease,
            command,
        } => {
            if !command.is_empty() {
                if group {
                    return Err(ClientError::InvalidArgument(
                        "--group and a command: lease one device to a command at a time".into(),
                    ));
                }
                if lease.holder_pid.is_some() || lease.holder_unit.is_some() {
                    return Err(ClientError::InvalidArgument(
                        "--holder-pid or --holder-unit and a command: the command is the holder; give one".into(),
                    ));
                }
                let options = Options {
                    force,
                    ..lease_options(lease)?
                };
                let code = hypemanctl::hold::attach_while(
                    &client,
                    &id_or_name,
                    &instance,
                    options,
                    &command,
                )
                .await?;
                return Ok(code);
            }
            let options = Options {
                force,
                ..lease_options(lease)?
            };
            let attached = if group {
                attach_group(&client, &id_or_name, &instance, options).await?
            } else {
                vec![client.attach_with(&id_or_name, &instance, options).await?]
            };
            print_devices(&attached, json, attached.len() == 1)
        }
        CtlCommand::Detach { id_or_name } => {
            print_devices(&[client.detach(&id_or_name).await?], json, true)
        }
        CtlCommand::Sriov { id_or_name, count } => {
            let pf = client.set_virtual_functions(&id_or_name, count).await?;
            print_devices(std::slice::from_ref(&pf), json, true);
            if !json {
                print_sriov(&pf);
            }
        }
        CtlCommand::Status => status(&client, json).await?,
        CtlCommand::Resources => resources(&client, json).await?,
        CtlCommand::Vgpu {
            command: VgpuCommand::Types,
        } => vgpu_types(&client, json).await?,
        CtlCommand::Vgpu {
            command:
                VgpuCommand::Create {
                    profile,
                    instance,
                    parent,
                    numa_node,
                    lease,
                },
        } => {
            let req = hypeman_api::VgpuRequest {
                profile,
                instance_id: instance,
                parent,
                numa_node,
                lease: lease_options(lease)?,
            };
            print_vgpus(&[client.create_vgpu(&req).await?], json, true);
        }
        CtlCommand::Vgpu {
            command: VgpuCommand::Delete { id },
        } => client.delete_vgpu(&id).await?,
        CtlCommand::Vgpu {
            command: VgpuCommand::List,
        } => print_vgpus(&client.vgpus().await?, json, false),
        CtlCommand::Monitor => monitor(&client, json).await?,
        CtlCommand::GenerateAssets { .. } => {}
    }
    Ok(0)
}

/// Attaches the named device, then every other registered member of its
/// IOMMU group, to `instance`; stops at the first refusal.
async fn attach_group(
    client: &Client,
    id_or_name: &str,
    instance: &str,
    options: Options,
) -> Result<Vec<Record>, ClientError> {
    let first = client
        .attach_with(id_or_name, instance, options.clone())
        .await?;
    let mut attached = vec![first.clone()];
    let Some(group) = first.iommu_group else {
        return Ok(attached);
    };
    for member in client.available().await? {
        let Some(id) = member.registered_as.as_deref() else {
            continue;
        };
        if member.iommu_group == Some(group) && id != first.id {
            attached.push(client.attach_with(id, instance, options.clone()).await?);
        }
    }
    Ok(attached)
}

fn pretty(v: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A table with names, driver and vfio columns, or the seed's JSON (one
/// document for one device, an array for a list).
fn print_devices(devices: &[Record], json: bool, single: bool) {
    if json {
        match devices {
            [one] if single => pretty(&one.seed()),
            many => pretty(&many.iter().map(Record::seed).collect::<Vec<_>>()),
        }
        return;
    }
    println!(
        "{:<24}  {:<16}  {:<12}  {:<4}  {:>5}  {:>4}  {:<14}  {:<4}  {:<12}  DEVICE",
        "ID", "NAME", "PCI ADDRESS", "TYPE", "GROUP", "NUMA", "DRIVER", "VFIO", "ATTACHED TO"
    );
    for d in devices {
        let driver = match (&d.driver, d.present) {
            (_, false) => "(unplugged)".to_string(),
            (Some(dr), true) => dr.clone(),
            (None, true) => "-".to_string(),
        };
        println!(
            "{:<24}  {:<16}  {:<12}  {:<4}  {:>5}  {:>4}  {:<14}  {:<4}  {:<12}  {} {}",
            d.id,
            d.name,
            d.pci_address,
            d.kind,
            or_dash(d.iommu_group),
            or_dash(d.numa_node),
            driver,
            if d.bound_to_vfio { "yes" } else { "no" },
            d.attached_to.as_deref().unwrap_or("-"),
            d.vendor_name,
            d.device_name
        );
    }
}

/// *(issue 27)* The lease of an attachment, as JSON: `pid` (a process
/// lease) or `invocation` (a unit lease), `unit` when known, `on_release`.
fn lease_json(d: &Record) -> Option<Value> {
    lease_doc(
        d.holder_pid,
        d.holder_unit.as_deref(),
        d.holder_invocation.as_deref(),
        d.on_release.as_deref(),
    )
}

/// A lease's JSON from a record's (or a vGPU's) four fields.
fn lease_doc(
    pid: Option<i64>,
    unit: Option<&str>,
    invocation: Option<&str>,
    on_release: Option<&str>,
) -> Option<Value> {
    let on_release = on_release?;
    let mut l = serde_json::Map::new();
    if let Some(pid) = pid {
        l.insert("pid".into(), pid.into());
    }
    if let Some(unit) = unit {
        l.insert("unit".into(), unit.into());
    }
    if let Some(inv) = invocation {
        l.insert("invocation".into(), inv.into());
    }
    l.insert("on_release".into(), on_release.into());
    Some(Value::Object(l))
}

/// *(issue 27)* The options a `LeaseArgs` asks for; `--holder-pid`'s pidfd
/// is opened here, so the daemon is given the process this pid is now.
fn lease_options(lease: hypemanctl::cli::LeaseArgs) -> Result<Options, ClientError> {
    let holder_pidfd = match lease.holder_pid {
        Some(pid) => Some(std::sync::Arc::new(
            hypemanctl::hold::pidfd_open(pid).map_err(|e| {
                ClientError::InvalidArgument(format!("cannot open a pidfd of process {pid}: {e}"))
            })?,
        )),
        None => None,
    };
    Ok(Options {
        holder_pidfd,
        holder_unit: lease.holder_unit,
        on_release: lease
            .on_release
            .as_deref()
            .map(hypeman_api::options::OnRelease::parse)
            .transpose()?,
        ..Default::default()
    })
}

/// `lease: pid 4242 in vm-1.service (on release: detach)`, `lease: unit
/// vm-1.service, invocation 0123… (on release: detach)`, or that there is
/// none.
fn print_lease(d: &Record) {
    let (Some(_), Some(r)) = (&d.attached_to, &d.on_release) else {
        if d.attached_to.is_some() {
            println!("lease: none (attached until detached)");
        }
        return;
    };
    match (d.holder_pid, &d.holder_unit, &d.holder_invocation) {
        (Some(pid), Some(unit), _) => println!("lease: pid {pid} in {unit} (on release: {r})"),
        (Some(pid), None, _) => println!("lease: pid {pid} (on release: {r})"),
        (None, Some(unit), Some(inv)) => {
            println!("lease: unit {unit}, invocation {inv} (on release: {r})")
        }
        _ => println!("lease: (on release: {r})"),
    }
}

fn or_dash(v: Option<i64>) -> String {
    v.map_or_else(|| "-".into(), |g| g.to_string())
}

/// `sriov: 2 of 64 virtual functions` for a physical function, `parent:
/// ADDRESS` for a virtual function.
fn print_sriov(d: &Record) {
    if let (Some(n), Some(total)) = (d.sriov_vfs, d.sriov_total_vfs) {
        println!("sriov: {n} of {total} virtual functions");
    }
    if let Some(p) = &d.parent {
        println!("parent: {p}");
    }
}

/// `tags: k=v, k=v` (sorted), when the device has any.
fn print_tags(d: &Record) {
    if d.tags.is_empty() {
        return;
    }
    let mut pairs: Vec<String> = d.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    println!("tags: {}", pairs.join(", "));
}

/// `code`: message lines, one per blocker.
fn print_blockers(blockers: &[hypeman_api::Blocker]) {
    if blockers.is_empty() {
        return;
    }
    println!();
    println!("The host is using it; bind and attach are refused (--force overrides all but no-iommu and bridge):");
    for b in blockers {
        println!("{} [{}]: {}", b.pci_address, b.code, b.message);
    }
}

/// As Hypeman's `GET /devices/available`, `--json` lists only the passable
/// functions, in the seed's shape; `--all` lists every function with
/// `passable` and `blockers`. The table shows everything.
fn print_available(devices: &[Available], json: bool, all: bool) {
    if json && all {
        let docs: Vec<Value> = devices
            .iter()
            .map(|d| {
                let mut doc = serde_json::to_value(d.seed()).unwrap_or_default();
                doc["passable"] = json!(d.passable);
                let shape = |b: &hypeman_api::Blocker| {
                    json!({"code": b.code, "message": b.message, "pci_address": b.pci_address})
                };
                doc["blockers"] = d.blockers.iter().map(shape).collect();
                doc["warnings"] = d.warnings.iter().map(shape).collect();
                if let Some(r) = &d.reset_method {
                    doc["reset_method"] = json!(r);
                }
                if let Some(v) = &d.vfio_driver {
                    doc["vfio_driver"] = json!(v);
                }
                doc
            })
            .collect();
        pretty(&docs);
        return;
    }
    if json {
        pretty(
            &devices
                .iter()
                .filter(|d| d.passable)
                .map(Available::seed)
                .collect::<Vec<_>>(),
        );
        return;
    }
    println!(
        "{:<12}  {:<9}  {:<4}  {:>5}  {:>4}  {:<14}  {:<24}  {:<16}  DEVICE",
        "PCI ADDRESS", "ID", "TYPE", "GROUP", "NUMA", "DRIVER", "REGISTERED AS", "BLOCKED BY"
    );
    for d in devices {
        let codes: Vec<&str> = d.blockers.iter().map(|b| b.code.as_str()).collect();
        println!(
            "{:<12}  {}:{}  {:<4}  {:>5}  {:>4}  {:<14}  {:<24}  {:<16}  {} {}",
            d.pci_address,
            d.vendor_id,
            d.device_id,
            d.kind,
            or_dash(d.iommu_group),
            or_dash(d.numa_node),
            d.current_driver.as_deref().unwrap_or("-"),
            d.registered_as.as_deref().unwrap_or("-"),
            if codes.is_empty() {
                "-".to_string()
            } else {
                codes.join(",")
            },
            d.vendor_name,
            d.device_name
        );
    }
    // Why each blocked function must stay with the host, then what does
    // not block but should be known (the ACS override once, not per line).
    let blocked: Vec<_> = devices.iter().flat_map(|d| &d.blockers).collect();
    if !blocked.is_empty() {
        println!();
        for b in blocked {
            println!("{} [{}]: {}", b.pci_address, b.code, b.message);
        }
    }
    let warned: Vec<_> = devices
        .iter()
        .flat_map(|d| &d.warnings)
        .filter(|w| w.code != ACS_OVERRIDE)
        .collect();
    if !warned.is_empty() {
        println!();
        for w in warned {
            println!("warning: {} [{}]: {}", w.pci_address, w.code, w.message);
        }
    }
    if acs_override(devices) {
        println!("\nwarning: {ACS_OVERRIDE_LINE}");
    }
}

/// *(issue 28)* The code of a boot whose IOMMU groups are overridden, as
/// every ListAvailable entry says it.
const ACS_OVERRIDE: &str = "acs-override";

/// The ACS override, said once.
const ACS_OVERRIDE_LINE: &str = "the kernel runs with pcie_acs_override=: IOMMU groups are not isolation boundaries, and a VM given one function may reach others";

/// Whether the daemon warns of the ACS override (every entry carries it).
fn acs_override(devices: &[Available]) -> bool {
    devices
        .iter()
        .any(|d| d.warnings.iter().any(|w| w.code == ACS_OVERRIDE))
}

/// `reset method: flr bus`, or that the kernel cannot reset the device.
fn print_reset(reset_method: Option<&str>) {
    match reset_method {
        Some("") => {
            println!("reset method: none (the kernel cannot reset this device between tenants)")
        }
        Some(r) => println!("reset method: {r}"),
        None => {}
    }
}

/// `resources`: the GPU capacity, as Hypeman's document or a table.
async fn resources(client: &Client, json: bool) -> Result<(), ClientError> {
    let r = client.gpu_resources().await?;
    if json {
        pretty(&r.document());
        return Ok(());
    }
    println!(
        "gpu mode {}: {} of {} slots used",
        r.mode, r.used_slots, r.total_slots
    );
    if let Some(profiles) = &r.profiles {
        println!("{:<28}  {:>14}  AVAILABLE", "PROFILE", "FRAMEBUFFER MB");
        for p in profiles {
            println!("{:<28}  {:>14}  {}", p.name, p.framebuffer_mb, p.available);
        }
    }
    if let Some(devices) = &r.devices {
        println!("{:<40}  AVAILABLE", "GPU");
        for d in devices {
            println!("{:<40}  {}", d.name, if d.available { "yes" } else { "no" });
        }
    }
    Ok(())
}

/// vGPU records as JSON documents or a table; `single` prints one document,
/// not a list.
fn print_vgpus(vgpus: &[hypeman_api::Vgpu], json: bool, single: bool) {
    let doc = |v: &hypeman_api::Vgpu| {
        json!({"id": v.id, "profile": v.profile, "type_id": v.type_id, "framework": v.framework,
            "parent_pci_address": v.parent_pci_address, "pci_address": v.pci_address,
            "mdev_uuid": v.mdev_uuid, "device_nodes": v.device_nodes,
            "instance_id": v.instance_id, "created_at": v.created_at, "state": v.state,
            "lease": lease_doc(v.holder_pid, v.holder_unit.as_deref(),
                v.holder_invocation.as_deref(), v.on_release.as_deref())})
    };
    if json {
        match vgpus {
            [one] if single => pretty(&doc(one)),
            many => pretty(&many.iter().map(doc).collect::<Vec<_>>()),
        }
        return;
    }
    println!(
        "{:<24}  {:<20}  {:<12}  {:<12}  {:<8}  {:<12}  {:<20}  NODES",
        "ID", "PROFILE", "FUNCTION", "PARENT", "STATE", "INSTANCE", "HOLDER"
    );
    for v in vgpus {
        let holder = match (v.holder_pid, &v.holder_unit, &v.on_release) {
            (Some(pid), _, Some(r)) => format!("pid {pid} ({r})"),
            (None, Some(unit), Some(r)) => format!("{unit} ({r})"),
            _ => "-".into(),
        };
        println!(
            "{:<24}  {:<20}  {:<12}  {:<12}  {:<8}  {:<12}  {:<20}  {}",
            v.id,
            v.profile,
            v.pci_address,
            v.parent_pci_address,
            v.state,
            v.instance_id.as_deref().unwrap_or("-"),
            holder,
            v.device_nodes.join(",")
        );
    }
}

/// `vgpu types`: what each registered GPU offers now.
async fn vgpu_types(client: &Client, json: bool) -> Result<(), ClientError> {
    let types = client.vgpu_types().await?;
    if json {
        let docs: Vec<Value> = types
            .iter()
            .map(|t| {
                json!({"parent": t.parent, "framework": t.framework, "type_id": t.type_id,
                    "name": t.name, "framebuffer_mb": t.framebuffer_mb, "available": t.available})
            })
            .collect();
        pretty(&docs);
        return Ok(());
    }
    println!(
        "{:<12}  {:<11}  {:<12}  {:<28}  {:>14}  AVAILABLE",
        "PARENT", "FRAMEWORK", "TYPE", "NAME", "FRAMEBUFFER MB"
    );
    for t in types {
        println!(
            "{:<12}  {:<11}  {:<12}  {:<28}  {:>14}  {}",
            t.parent, t.framework, t.type_id, t.name, t.framebuffer_mb, t.available
        );
    }
    Ok(())
}

async fn status(client: &Client, json: bool) -> Result<(), ClientError> {
    let version = client.version().await?;
    let devices = client.list().await?;
    let host = client.available().await?;
    let on_vfio = devices.iter().filter(|d| d.bound_to_vfio).count();
    let attached = devices.iter().filter(|d| d.attached_to.is_some()).count();
    let unleased = devices
        .iter()
        .filter(|d| d.attached_to.is_some() && d.on_release.is_none())
        .count();
    if json {
        pretty(&json!({
            "version": version,
            "registered": devices.len(),
            "bound_to_vfio": on_vfio,
            "attached": attached,
            "attached_without_lease": unleased,
            "host_devices": host.len(),
            "acs_override": acs_override(&host),
        }));
    } else {
        println!("hypemand {version}");
        println!(
            "{} registered, {on_vfio} on vfio-pci, {attached} attached ({unleased} without a lease); {} PCI devices on the host",
            devices.len(),
            host.len()
        );
        if acs_override(&host) {
            println!("warning: {ACS_OVERRIDE_LINE}");
        }
    }
    Ok(())
}

fn variant_json(v: &OwnedVariant) -> Value {
    if let Ok(s) = String::try_from(v.clone()) {
        return json!(s);
    }
    if let Ok(b) = bool::try_from(v.clone()) {
        return json!(b);
    }
    if let Ok(i) = i64::try_from(v.clone()) {
        return json!(i);
    }
    json!(format!("{:?}", &**v))
}

fn id_of(path: &str) -> String {
    path.rsplit('/').next().unwrap_or(path).to_string()
}

/// One line per event, as it happens: registrations, removals, property
/// changes, host devices coming and going.
async fn monitor(client: &Client, json: bool) -> Result<(), ClientError> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .sender(hypeman_api::BUS_NAME)
        .path_namespace(hypeman_api::MANAGER_PATH)
        .build()
        .map_err(|e| ClientError::Bus(e.to_string()))?;
    let mut stream = MessageStream::for_match_rule(rule, client.connection(), None).await?;
    let mut names: HashMap<String, String> = client
        .list()
        .await?
        .into_iter()
        .map(|d| (d.id, d.name))
        .collect();
    eprintln!(
        "hypemanctl: monitoring {} (Ctrl-C to stop)",
        hypeman_api::BUS_NAME
    );
    let mut out = std::io::stdout();
    while let Some(msg) = stream.next().await {
        let Ok(msg) = msg else { continue };
        let header = msg.header();
        let (Some(member), Some(path)) = (header.member(), header.path()) else {
            continue;
        };
        let path = path.as_str().to_string();
        let line: Option<(Value, String)> = match member.as_str() {
            "InterfacesAdded" => {
                type Ifaces = HashMap<String, HashMap<String, OwnedVariant>>;
                let Ok((obj, ifaces)) = msg.body().deserialize::<(OwnedObjectPath, Ifaces)>()
                else {
                    continue;
                };
                let props = ifaces
                    .get(hypeman_api::DEVICE_IFACE)
                    .cloned()
                    .unwrap_or_default();
                let get = |k: &str| props.get(k).map(variant_json).unwrap_or(Value::Null);
                let id = id_of(obj.as_str());
                let name = get("Name").as_str().unwrap_or_default().to_string();
                let addr = get("PciAddress").as_str().unwrap_or_default().to_string();
                names.insert(id.clone(), name.clone());
                Some((
                    json!({"event": "registered", "id": id, "name": name, "pci_address": addr}),
                    format!("registered {name} ({id}) at {addr}"),
                ))
            }
            "InterfacesRemoved" => {
                let Ok((obj, _)) = msg.body().deserialize::<(OwnedObjectPath, Vec<String>)>()
                else {
                    continue;
                };
                let id = id_of(obj.as_str());
                let name = names.remove(&id).unwrap_or_default();
                Some((
                    json!({"event": "unregistered", "id": id, "name": name}),
                    format!("unregistered {name} ({id})"),
                ))
            }
            "PropertiesChanged" => {
                type Changed = (String, HashMap<String, OwnedVariant>, Vec<String>);
                let Ok((_, changed, _)) = msg.body().deserialize::<Changed>() else {
                    continue;
                };
                let id = id_of(&path);
                let name = names.get(&id).cloned().unwrap_or_default();
                let mut props: Vec<(String, Value)> = changed
                    .iter()
                    .map(|(k, v)| (k.clone(), variant_json(v)))
                    .collect();
                props.sort_by(|a, b| a.0.cmp(&b.0));
                let text = props
                    .iter()
                    .map(|(k, v)| {
                        format!(
                            "{k}={}",
                            v.as_str().map_or_else(|| v.to_string(), str::to_string)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(" ");
                let map: serde_json::Map<String, Value> = props.into_iter().collect();
                Some((
                    json!({"event": "changed", "id": id, "name": name, "properties": map}),
                    format!("changed {name} ({id}): {text}"),
                ))
            }
            "HostDeviceAdded" | "HostDeviceRemoved" => {
                let Ok(addr) = msg.body().deserialize::<String>() else {
                    continue;
                };
                let (event, verb) = if member.as_str() == "HostDeviceAdded" {
                    ("host_device_added", "appeared")
                } else {
                    ("host_device_removed", "disappeared")
                };
                Some((
                    json!({"event": event, "pci_address": addr}),
                    format!("host device {addr} {verb}"),
                ))
            }
            "VgpuCreated" => {
                let Ok(v) = msg.body().deserialize::<hypeman_api::Vgpu>() else {
                    continue;
                };
                Some((
                    json!({"event": "vgpu_created", "id": v.id, "profile": v.profile,
                        "pci_address": v.pci_address, "parent_pci_address": v.parent_pci_address}),
                    format!(
                        "vGPU {} ({}) made on {} of {}",
                        v.id, v.profile, v.pci_address, v.parent_pci_address
                    ),
                ))
            }
            "VgpuDeleted" => {
                let Ok(id) = msg.body().deserialize::<String>() else {
                    continue;
                };
                Some((
                    json!({"event": "vgpu_deleted", "id": id}),
                    format!("vGPU {id} deleted"),
                ))
            }
            _ => None,
        };
        if let Some((j, text)) = line {
            let _ = if json {
                writeln!(out, "{j}")
            } else {
                writeln!(out, "{text}")
            };
            let _ = out.flush();
        }
    }
    Ok(())
}
