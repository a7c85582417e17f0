//! `hypeman-bench`: what the daemon costs, measured against the bus itself.
//!
//! Starts a private `dbus-daemon` and `hypemand --simulate` on a generated host
//! of N devices (GPUs, NICs with SR-IOV virtual functions, NVMe drives,
//! bridges), N of them registered, and measures each figure of issue 8 with real
//! D-Bus calls. Everything it starts it stops by pid.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};
use zbus::{Connection, MatchRule, MessageStream, OwnedVariant};

mod host;
mod report;

use host::store;
pub use host::{generated_host, pci_address};
use report::{percentile, sorted_us};
pub use report::{scaling_verdicts, table, TARGETS};

const BUS_TEMPLATE: &str = include_str!("../../../tests/data/system.conf.in");
const POLICY: &str = include_str!("../../../dbus/org.hypeman.Devices.conf");
const SIM_POLICY: &str = include_str!("../../../tests/data/simulator.conf");
/// The bench's own trivial peer on the same bus (for `list_floor_ms`).
const FLOOR_NAME: &str = "org.hypeman.BenchFloor";
const FLOOR_POLICY: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <policy context="default">
    <allow own="org.hypeman.BenchFloor"/>
    <allow send_destination="org.hypeman.BenchFloor"/>
  </policy>
</busconfig>
"#;

/// A device object's properties, as `GetAll` answers them.
type Properties = HashMap<String, OwnedVariant>;
/// `GetManagedObjects`' answer.
type Objects = HashMap<zbus::OwnedObjectPath, HashMap<String, Properties>>;

/// The floors: a peer that answers each measured call with a reply of the
/// same size and shape as the daemon's, built once, to a request of the
/// same shape. What the bus and the two ends' (de)serialisation cost, with
/// no registry, no host and no work of the daemon's. *(issue 30)* `Get`,
/// a device's `GetAll` and `GetManagedObjects` beside `List`.
struct Floor {
    list: Vec<hypeman_api::Record>,
    get: hypeman_api::Record,
    get_all: Properties,
    objects: Objects,
}

#[zbus::interface(name = "org.hypeman.BenchFloor1")]
impl Floor {
    fn list(&self) -> Vec<hypeman_api::Record> {
        self.list.clone()
    }
    fn get(&self, _id_or_name: &str) -> hypeman_api::Record {
        self.get.clone()
    }
    fn get_all(&self, _interface: &str) -> Properties {
        self.get_all.clone()
    }
    fn get_managed_objects(&self) -> Objects {
        self.objects.clone()
    }
}

/// One call's answer, deserialised.
async fn answer<T>(
    conn: &Connection,
    path: &str,
    iface: &str,
    method: &str,
    body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) -> BenchResult<T>
where
    T: for<'d> serde::Deserialize<'d> + zbus::zvariant::Type,
{
    let r = conn
        .call_method(Some(hypeman_api::BUS_NAME), path, Some(iface), method, body)
        .await
        .map_err(err(method))?;
    r.body().deserialize().map_err(err(method))
}

/// How long one call takes.
async fn timed(
    conn: &Connection,
    destination: &str,
    path: &str,
    iface: &str,
    method: &str,
    body: &(impl serde::Serialize + zbus::zvariant::DynamicType),
) -> BenchResult<Duration> {
    let t = Instant::now();
    conn.call_method(Some(destination), path, Some(iface), method, body)
        .await
        .map_err(err(method))?;
    Ok(t.elapsed())
}
use hypeman_api::{
    DEVICE_IFACE, MANAGER_IFACE as IFACE, SIMULATOR_IFACE as SIM_IFACE, SIMULATOR_PATH as SIM_PATH,
};

pub type BenchResult<T> = Result<T, String>;

/// Concurrent clients of `register_16_per_s`.
const CLIENTS: usize = 16;

#[derive(Debug, Clone)]
pub struct Config {
    pub devices: usize,
    pub quick: bool,
    pub hypemand: PathBuf,
}

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn err<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// A process's resident set, in KiB (`VmRSS` of `/proc/PID/status`). The one
/// RSS reading of the project: the end-to-end tests use it too.
pub fn rss_kib(pid: u32) -> BenchResult<f64> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(err("read /proc status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| "no VmRSS".to_string())
}

/// Runs the whole benchmark for one N and returns the figures.
pub async fn run(cfg: &Config) -> BenchResult<serde_json::Map<String, Value>> {
    let n = cfg.devices;
    let extra = if cfg.quick { 20 } else { 200 };
    // Registers of the 16 concurrent clients, each.
    let per_client = if cfg.quick { 4 } else { 64 };
    let dir = tempfile::tempdir().map_err(err("tempdir"))?;
    let d = dir.path();
    std::fs::write(
        d.join("host.toml"),
        generated_host(n + extra + CLIENTS * per_client),
    )
    .map_err(err("write fixture"))?;
    std::fs::create_dir(d.join("state")).map_err(err("mkdir"))?;
    std::fs::write(d.join("state/devices.json"), store(n)).map_err(err("write store"))?;
    std::fs::write(d.join("policy.conf"), POLICY).map_err(err("write policy"))?;
    std::fs::write(d.join("sim.conf"), SIM_POLICY).map_err(err("write policy"))?;
    std::fs::write(d.join("floor.conf"), FLOOR_POLICY).map_err(err("write policy"))?;
    let conf = BUS_TEMPLATE
        .replace("@LISTEN@", &format!("unix:path={}/bus", d.display()))
        .replace(
            "@INCLUDES@",
            &format!(
                "<include>{0}/policy.conf</include><include>{0}/sim.conf</include><include>{0}/floor.conf</include>",
                d.display()
            ),
        );
    std::fs::write(d.join("system.conf"), conf).map_err(err("write bus config"))?;
    let mut bus = Guard(
        Command::new("dbus-daemon")
            .arg(format!("--config-file={}/system.conf", d.display()))
            .args(["--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err("start dbus-daemon (apt-get install dbus-daemon)"))?,
    );
    let mut line = String::new();
    let out = bus.0.stdout.take().ok_or("no bus stdout")?;
    BufReader::new(out)
        .read_line(&mut line)
        .map_err(err("bus address"))?;
    let address = line.trim().to_string();

    // startup_ready_ms: spawn to READY=1 with N stored devices.
    let notify = UnixDatagram::bind(d.join("notify")).map_err(err("notify socket"))?;
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(err("timeout"))?;
    // *(issue 29)* A free port for the metrics (the bench reads no log).
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(err("a free port"))?;
    let started = Instant::now();
    let daemon = Guard(
        Command::new(&cfg.hypemand)
            .arg(format!("--bus={address}"))
            .arg(format!("--state-dir={}/state", d.display()))
            .arg(format!("--simulate={}/host.toml", d.display()))
            .args(["--log-level", "warn"])
            .arg(format!("--metrics-listen={metrics}"))
            .env("NOTIFY_SOCKET", d.join("notify"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err(&format!("start {}", cfg.hypemand.display())))?,
    );
    let mut buf = [0u8; 4096];
    loop {
        let k = notify.recv(&mut buf).map_err(err("waiting for READY=1"))?;
        if String::from_utf8_lossy(&buf[..k]).contains("READY=1") {
            break;
        }
    }
    let startup_ready_ms = started.elapsed().as_secs_f64() * 1e3;
    let pid = daemon.0.id();

    let conn: Connection = zbus::connection::Builder::address(address.as_str())
        .build()
        .await
        .map_err(err("connect"))?;
    let call = |conn: &Connection, iface: &str, method: &str, path: &str, body: Value| {
        let conn = conn.clone();
        let (iface, method, path) = (iface.to_string(), method.to_string(), path.to_string());
        async move {
            let r = match body {
                Value::Null => {
                    conn.call_method(
                        Some(hypeman_api::BUS_NAME),
                        path.as_str(),
                        Some(iface.as_str()),
                        method.as_str(),
                        &(),
                    )
                    .await
                }
                Value::String(s) => {
                    conn.call_method(
                        Some(hypeman_api::BUS_NAME),
                        path.as_str(),
                        Some(iface.as_str()),
                        method.as_str(),
                        &(s,),
                    )
                    .await
                }
                Value::Array(a) => {
                    let a: Vec<String> = a
                        .iter()
                        .map(|v| v.as_str().unwrap_or_default().to_string())
                        .collect();
                    conn.call_method(
                        Some(hypeman_api::BUS_NAME),
                        path.as_str(),
                        Some(iface.as_str()),
                        method.as_str(),
                        &(a[0].as_str(), a[1].as_str()),
                    )
                    .await
                }
                _ => return Err("bad body".to_string()),
            };
            r.map(|_| ()).map_err(|e| format!("{method}: {e}"))
        }
    };
    let m = hypeman_api::MANAGER_PATH;

    // ping/get interleaved on one connection.
    let rounds = if cfg.quick { 200 } else { 2000 };
    let (mut pings, mut gets) = (Vec::new(), Vec::new());
    let target_name = format!("dev-{}", n / 2);
    for _ in 0..rounds {
        let t = Instant::now();
        call(&conn, "org.freedesktop.DBus.Peer", "Ping", m, Value::Null).await?;
        pings.push(t.elapsed());
        let t = Instant::now();
        call(&conn, IFACE, "Get", m, json!(target_name)).await?;
        gets.push(t.elapsed());
    }
    let (pings, gets) = (sorted_us(&pings), sorted_us(&gets));

    let median_ms = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2].as_secs_f64() * 1e3
    };
    let mut lists = Vec::new();
    let mut avail = Vec::new();
    let mut scrapes = Vec::new();
    for _ in 0..if cfg.quick { 3 } else { 7 } {
        let t = Instant::now();
        scrape(metrics).await?;
        scrapes.push(t.elapsed());
        let t = Instant::now();
        call(&conn, IFACE, "ListAvailable", m, Value::Null).await?;
        avail.push(t.elapsed());
    }

    // list_floor_ms: the same reply from the bench's own trivial peer, on the
    // same bus, called the same way.
    let reply = conn
        .call_method(Some(hypeman_api::BUS_NAME), m, Some(IFACE), "List", &())
        .await
        .map_err(err("List"))?;
    let records: Vec<hypeman_api::Record> =
        reply.body().deserialize().map_err(err("List reply"))?;
    let device = hypeman_api::device_path(&device_id(&conn, &target_name).await?)
        .ok_or("no device path")?
        .to_string();
    const PROPS: &str = "org.freedesktop.DBus.Properties";
    const OBJECTS: &str = "org.freedesktop.DBus.ObjectManager";
    let floor = Floor {
        list: records,
        get: answer(&conn, m, IFACE, "Get", &(target_name.as_str(),)).await?,
        get_all: answer(&conn, &device, PROPS, "GetAll", &(DEVICE_IFACE,)).await?,
        objects: answer(&conn, m, OBJECTS, "GetManagedObjects", &()).await?,
    };
    let floor_conn = zbus::connection::Builder::address(address.as_str())
        .serve_at("/floor", floor)
        .name(FLOOR_NAME)
        .build()
        .await
        .map_err(err("floor connection"))?;
    // *(issue 30)* Get and a device's GetAll against their floors, each
    // pair back to back on one connection; GetManagedObjects likewise.
    const FLOOR_IFACE: &str = "org.hypeman.BenchFloor1";
    let (mut g, mut gf, mut a, mut af) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let key = (target_name.as_str(),);
    for _ in 0..rounds {
        let bus_name = hypeman_api::BUS_NAME;
        g.push(timed(&conn, bus_name, m, IFACE, "Get", &key).await?);
        gf.push(timed(&conn, FLOOR_NAME, "/floor", FLOOR_IFACE, "Get", &key).await?);
        a.push(timed(&conn, bus_name, &device, PROPS, "GetAll", &(DEVICE_IFACE,)).await?);
        af.push(
            timed(
                &conn,
                FLOOR_NAME,
                "/floor",
                FLOOR_IFACE,
                "GetAll",
                &(DEVICE_IFACE,),
            )
            .await?,
        );
    }
    let (mut mo, mut mof) = (Vec::new(), Vec::new());
    for _ in 0..if cfg.quick { 3 } else { 7 } {
        mo.push(
            timed(
                &conn,
                hypeman_api::BUS_NAME,
                m,
                OBJECTS,
                "GetManagedObjects",
                &(),
            )
            .await?,
        );
        mof.push(
            timed(
                &conn,
                FLOOR_NAME,
                "/floor",
                FLOOR_IFACE,
                "GetManagedObjects",
                &(),
            )
            .await?,
        );
    }
    let p50 = |v: &[Duration]| percentile(&sorted_us(v), 0.5);
    let get_over_floor = p50(&g) / p50(&gf);
    let getall_over_floor = p50(&a) / p50(&af);
    let managed_objects_ms = median_ms(&mut mo);
    let managed_objects_floor_ms = median_ms(&mut mof);
    // *(issue 30)* Each List back to back with its floor, as Get's: measured
    // apart, the floor moved by a third between runs on a busy machine.
    let mut floors = Vec::new();
    for _ in 0..if cfg.quick { 3 } else { 7 } {
        let t = Instant::now();
        call(&conn, IFACE, "List", m, Value::Null).await?;
        lists.push(t.elapsed());
        let t = Instant::now();
        conn.call_method(
            Some(FLOOR_NAME),
            "/floor",
            Some("org.hypeman.BenchFloor1"),
            "List",
            &(),
        )
        .await
        .map_err(err("floor List"))?;
        floors.push(t.elapsed());
    }
    drop(floor_conn);

    // register_per_s: durable Registers into a registry already holding N.
    let t = Instant::now();
    for i in n..n + extra {
        call(
            &conn,
            IFACE,
            "Register",
            m,
            json!([pci_address(i), format!("new-{i}")]),
        )
        .await?;
    }
    let register_per_s = extra as f64 / t.elapsed().as_secs_f64();

    // register_16_per_s: the same from 16 clients at once, each on its own
    // connection (changes that wait for a sync share the next one).
    let clients = connections(&address, CLIENTS).await?;
    let t = Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let first = n + extra + c * per_client;
            tokio::spawn(async move {
                for i in first..first + per_client {
                    conn.call_method(
                        Some(hypeman_api::BUS_NAME),
                        hypeman_api::MANAGER_PATH,
                        Some(IFACE),
                        "Register",
                        &(pci_address(i), format!("new-{i}")),
                    )
                    .await
                    .map_err(|e| format!("Register: {e}"))?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    for task in tasks {
        task.await.map_err(err("client task"))??;
    }
    let register_16_per_s = (CLIENTS * per_client) as f64 / t.elapsed().as_secs_f64();
    // Deleted again (not timed), so the figures after this one are taken
    // with N + extra devices registered, as before this phase existed.
    for i in n + extra..n + extra + CLIENTS * per_client {
        call(&conn, IFACE, "Delete", m, json!(format!("new-{i}"))).await?;
    }

    // bind_unbind_per_s on a GPU (device 0).
    let cycles = if cfg.quick { 10 } else { 100 };
    let t = Instant::now();
    for _ in 0..cycles {
        call(&conn, IFACE, "Bind", m, json!("dev-0")).await?;
        call(&conn, IFACE, "Unbind", m, json!("dev-0")).await?;
    }
    let bind_unbind_per_s = cycles as f64 / t.elapsed().as_secs_f64();

    // hotplug_to_signal: Unplug/Plug to PropertiesChanged(Present) seen here,
    // on device 16 (device 0 on a host of fewer: `--devices 1` measures the
    // idle RSS of a one-device daemon).
    let hot: usize = if n > 16 { 16 } else { 0 };
    let gpu_path = format!("{m}/{}", device_id(&conn, &format!("dev-{hot}")).await?);
    let mut stream = changes_of(&conn, &gpu_path).await?;
    let mut hotplug = Vec::new();
    let addr16 = pci_address(hot);
    for _ in 0..if cfg.quick { 5 } else { 50 } {
        for (method, want) in [("Unplug", false), ("Plug", true)] {
            let t = Instant::now();
            call(&conn, SIM_IFACE, method, SIM_PATH, json!(addr16)).await?;
            wait_changed(&mut stream, "Present", &zbus::Variant::from(want)).await?;
            hotplug.push(t.elapsed());
        }
    }
    let hotplug = sorted_us(&hotplug);
    drop(stream);

    // lease_release: a holder's SIGKILL to the PropertiesChanged clearing
    // AttachedTo (issue 27), on a GPU leased to a process of the bench's.
    call(&conn, IFACE, "Bind", m, json!("dev-0")).await?;
    let leases = lease_release(
        &conn,
        &format!("{m}/{}", device_id(&conn, "dev-0").await?),
        {
            if cfg.quick {
                5
            } else {
                50
            }
        },
    )
    .await?;

    // 64 connections x 500 Get (50 with --quick), all at once.
    let per = if cfg.quick { 50 } else { 500 };
    let conns = connections(&address, 64).await?;
    let t = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, conn)| {
            let name = format!("dev-{}", (c * 37) % n.max(1));
            tokio::spawn(async move {
                let mut errors = 0u64;
                for _ in 0..per {
                    let r = conn
                        .call_method(
                            Some(hypeman_api::BUS_NAME),
                            hypeman_api::MANAGER_PATH,
                            Some(IFACE),
                            "Get",
                            &(name.as_str(),),
                        )
                        .await;
                    if r.is_err() {
                        errors += 1;
                    }
                }
                errors
            })
        })
        .collect();
    let mut errors = 0u64;
    for task in tasks {
        errors += task.await.unwrap_or(per as u64);
    }
    let concurrent_get_per_s = (64 * per) as f64 / t.elapsed().as_secs_f64();
    let rss_idle_kib = rss_kib(pid)?;

    let mut out = serde_json::Map::new();
    let round = |v: f64| (v * 100.0).round() / 100.0;
    out.insert("devices".into(), json!(n));
    out.insert("ping_p50_us".into(), json!(round(percentile(&pings, 0.5))));
    out.insert("ping_p99_us".into(), json!(round(percentile(&pings, 0.99))));
    out.insert("get_p50_us".into(), json!(round(percentile(&gets, 0.5))));
    out.insert("get_p99_us".into(), json!(round(percentile(&gets, 0.99))));
    out.insert(
        "get_over_ping".into(),
        json!(round(percentile(&gets, 0.5) / percentile(&pings, 0.5))),
    );
    let list_ms = median_ms(&mut lists);
    let list_floor_ms = median_ms(&mut floors);
    out.insert("list_ms".into(), json!(round(list_ms)));
    out.insert("list_floor_ms".into(), json!(round(list_floor_ms)));
    out.insert(
        "list_over_floor".into(),
        json!(round(list_ms / list_floor_ms.max(1e-6))),
    );
    out.insert("available_ms".into(), json!(round(median_ms(&mut avail))));
    out.insert("get_over_floor".into(), json!(round(get_over_floor)));
    out.insert("getall_over_floor".into(), json!(round(getall_over_floor)));
    out.insert(
        "managed_objects_ms".into(),
        json!(round(managed_objects_ms)),
    );
    out.insert(
        "managed_objects_floor_ms".into(),
        json!(round(managed_objects_floor_ms)),
    );
    out.insert(
        "managed_objects_over_floor".into(),
        json!(round(
            managed_objects_ms / managed_objects_floor_ms.max(1e-6)
        )),
    );
    let scrape_ms = median_ms(&mut scrapes);
    out.insert("metrics_scrape_ms".into(), json!(round(scrape_ms)));
    out.insert(
        "metrics_scrape_over_list".into(),
        json!(round(scrape_ms / list_ms.max(1e-6))),
    );
    out.insert("register_per_s".into(), json!(round(register_per_s)));
    out.insert("register_16_per_s".into(), json!(round(register_16_per_s)));
    out.insert("startup_ready_ms".into(), json!(round(startup_ready_ms)));
    out.insert("rss_idle_kib".into(), json!(rss_idle_kib));
    out.insert("bind_unbind_per_s".into(), json!(round(bind_unbind_per_s)));
    out.insert(
        "hotplug_to_signal_p99_ms".into(),
        json!(round(percentile(&hotplug, 0.99) / 1e3)),
    );
    out.insert(
        "lease_release_p50_ms".into(),
        json!(round(percentile(&leases, 0.5) / 1e3)),
    );
    out.insert(
        "lease_release_p99_ms".into(),
        json!(round(percentile(&leases, 0.99) / 1e3)),
    );
    out.insert(
        "concurrent_get_per_s".into(),
        json!(round(concurrent_get_per_s)),
    );
    out.insert("errors".into(), json!(errors));
    drop(daemon);
    drop(bus);
    Ok(out)
}

/// *(issue 29)* One `GET /metrics` in OpenMetrics, read whole; an error
/// unless it answered 200 with the families of N devices.
async fn scrape(address: std::net::SocketAddr) -> BenchResult<usize> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(address)
        .await
        .map_err(err("connect to the metrics"))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n")
        .await
        .map_err(err("send the scrape"))?;
    let mut got = Vec::with_capacity(1 << 20);
    s.read_to_end(&mut got)
        .await
        .map_err(err("read the scrape"))?;
    let ok = got.starts_with(b"HTTP/1.1 200") && got.ends_with(b"# EOF\n");
    if !ok {
        return Err(format!(
            "the scrape did not answer 200 and # EOF: {}",
            String::from_utf8_lossy(&got[..got.len().min(200)])
        ));
    }
    Ok(got.len())
}

/// The `PropertiesChanged` of the object at `path`, subscribed.
async fn changes_of(conn: &Connection, path: &str) -> BenchResult<MessageStream> {
    let rule = MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .member("PropertiesChanged")
        .path(path)
        .build()
        .map_err(err("match rule"))?;
    MessageStream::for_match_rule(rule, conn, None)
        .await
        .map_err(err("subscribe"))
}

/// Reads `stream` (one object's `PropertiesChanged`) until `property` is
/// set to `want`.
async fn wait_changed(
    stream: &mut MessageStream,
    property: &str,
    want: &zbus::Variant<'_>,
) -> BenchResult<()> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .map_err(|_| format!("no PropertiesChanged of {property} within 10 s"))?
            .ok_or("signal stream ended")?
            .map_err(err("signal"))?;
        type Changed = (String, HashMap<String, OwnedVariant>, Vec<String>);
        let Ok((_, changed, _)) = msg.body().deserialize::<Changed>() else {
            continue;
        };
        if changed.get(property).is_some_and(|v| **v == *want) {
            return Ok(());
        }
    }
}

/// *(issue 27)* `rounds` times: attaches the device at `path` under a lease
/// on a fresh `sleep` (its pidfd passed), SIGKILLs the holder and times
/// the kill to the `PropertiesChanged` clearing `AttachedTo`. In µs, sorted.
async fn lease_release(conn: &Connection, path: &str, rounds: usize) -> BenchResult<Vec<f64>> {
    let mut stream = changes_of(conn, path).await?;
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let mut holder = Guard(
            Command::new("sleep")
                .arg("infinity")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(err("start a holder (sleep)"))?,
        );
        let pid = holder.0.id();
        let options = hypeman_api::Options {
            holder_pidfd: Some(std::sync::Arc::new(
                hypeman_api::options::pidfd_open(pid).map_err(err("pidfd_open"))?,
            )),
            ..Default::default()
        };
        conn.call_method(
            Some(hypeman_api::BUS_NAME),
            hypeman_api::MANAGER_PATH,
            Some(IFACE),
            "AttachWithOptions",
            &("dev-0", "vm-bench", options.to_dict()),
        )
        .await
        .map_err(err("AttachWithOptions"))?;
        wait_changed(&mut stream, "AttachedTo", &zbus::Variant::from("vm-bench")).await?;
        let t = Instant::now();
        holder.0.kill().map_err(err("SIGKILL the holder"))?;
        wait_changed(&mut stream, "AttachedTo", &zbus::Variant::from("")).await?;
        times.push(t.elapsed());
        holder.0.wait().map_err(err("reap the holder"))?;
    }
    Ok(sorted_us(&times))
}

/// `n` connections of their own to the bus at `address`.
async fn connections(address: &str, n: usize) -> BenchResult<Vec<Connection>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(
            zbus::connection::Builder::address(address)
                .build()
                .await
                .map_err(err("connect"))?,
        );
    }
    Ok(out)
}

async fn device_id(conn: &Connection, name: &str) -> BenchResult<String> {
    let reply = conn
        .call_method(
            Some(hypeman_api::BUS_NAME),
            hypeman_api::MANAGER_PATH,
            Some(IFACE),
            "Get",
            &(name,),
        )
        .await
        .map_err(err("Get"))?;
    let r: hypeman_api::Record = reply.body().deserialize().map_err(err("record"))?;
    Ok(r.id)
}

/// The hypemand next to this executable (cargo puts both in `target/<profile>`).
pub fn default_hypemand() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("hypemand")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| Path::new("hypemand").to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(n: u64, register: f64, startup: f64, rss: f64) -> serde_json::Map<String, Value> {
        let over = if n == 4096 { 1.25 } else { 1.1 };
        json!({"devices": n, "register_per_s": register, "bind_unbind_per_s": 100.0,
               "startup_ready_ms": startup, "rss_idle_kib": rss, "list_over_floor": over})
        .as_object()
        .cloned()
        .unwrap()
    }

    #[test]
    fn scaling_verdicts_compare_the_ends() {
        let lines = scaling_verdicts(&[
            run(256, 1000.0, 10.0, 9000.0),
            run(4096, 900.0, 50.0, 17000.0),
            run(16384, 790.0, 151.0, 40000.0),
        ]);
        assert_eq!(
            lines,
            [
                "register_per_s at N = 16384 / at N = 256: 0.79 (>= 0.8: MISSED)",
                "bind_unbind_per_s at N = 16384 / at N = 256: 1.00 (>= 0.8: met)",
                "startup_ready_ms at N = 16384: 151 (<= 150: MISSED; issue 30 <= 100: MISSED)",
                "list_over_floor: 1.1 at N = 256, 1.25 at N = 4096, 1.1 at N = 16384 (<= 1.2 at every size: MISSED)",
                "rss_idle_kib at N = 4096: 17000 (<= 16384: MISSED; issue 30 <= 20480: met)",
            ]
        );
    }
}
