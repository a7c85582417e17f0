//! *(issue 29)* `GET /metrics` on `--metrics-listen ADDR:PORT`: what an
//! operator graphs and alerts on, in the OpenMetrics text format
//! (`prometheus-client`).
//!
//! Two kinds of family: what the daemon counted as it worked
//! ([`crate::telemetry`]: operations, polkit checks, store commits, hotplug
//! events), and what a scrape reads of the registered devices
//! ([`Service::census`]: how many in each state, each one's labels, its
//! PCIe error counters read now, its health verdict).
//!
//! Reads only, so no authorization, as D-Bus reads. The listener is bounded
//! as the REST socket is: the same deadlines for a request's headers, its
//! body and the writing of its answer (`edge/rest/conn.rs`), a body of at
//! most [`MAX_BODY`](super::rest::MAX_BODY), and at most
//! [`MAX_CONNECTIONS`] connections. TCP carries no uid to share slots by,
//! so a full table makes room by closing its oldest connection that has no
//! request under way: connections that never send a request cannot keep a
//! scraper out; they are closed as new ones come, and by the header
//! deadline. At most [`MAX_SCRAPES`] scrapes are built at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::TokioTimer;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

use super::rest::conn::{handle, Deadlined, Phase};
use super::rest::HEADER_TIMEOUT;
use crate::service::census::Sample;
use crate::service::Service;

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 32;

/// Scrapes answered at once; the others wait their turn (each within the
/// answer's deadline). A scrape reads every registered device's counters
/// and builds its text: many at once would only share the same cores and
/// hold their texts together.
pub const MAX_SCRAPES: usize = 2;

/// What the handler shares: the service, and the turns of scrapes.
struct Shared {
    service: Arc<Service>,
    turns: tokio::sync::Semaphore,
}

/// The OpenMetrics text format's content type.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Binds `address` (port 0: a free one), and says where.
pub async fn listen(address: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tracing::info!(metrics_listen = %bound, "serving metrics at http://{bound}/metrics");
    Ok(listener)
}

/// The routes: `GET /metrics`, and nothing else.
pub fn router(service: Arc<Service>) -> Router {
    let shared = Arc::new(Shared {
        service,
        turns: tokio::sync::Semaphore::new(MAX_SCRAPES),
    });
    Router::new()
        .route("/metrics", get(scrape))
        .with_state(shared)
}

/// One connection in the table: whether a request is under way, and how
/// to close it.
struct Open {
    busy: Arc<AtomicBool>,
    abort: tokio::task::AbortHandle,
}

/// The open connections, oldest first.
#[derive(Default)]
struct Table {
    next: u64,
    open: BTreeMap<u64, Open>,
}

impl Table {
    /// Makes room for one more: closes the oldest idle connection when the
    /// table is full. False when every connection has a request under way.
    fn room(&mut self) -> bool {
        if self.open.len() < MAX_CONNECTIONS {
            return true;
        }
        let idle = self
            .open
            .iter()
            .find(|(_, o)| !o.busy.load(Ordering::SeqCst))
            .map(|(k, _)| *k);
        match idle.and_then(|k| self.open.remove(&k)) {
            Some(o) => {
                o.abort.abort();
                true
            }
            None => false,
        }
    }
}

fn lock(t: &Mutex<Table>) -> std::sync::MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, service: Arc<Service>) {
    let router = router(service);
    let table = Arc::new(Mutex::new(Table::default()));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and the like: back off a little rather than spin.
                tracing::warn!(error = %e, "cannot accept a metrics connection");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let mut t = lock(&table);
        if !t.room() {
            tracing::debug!(peer = %peer, "metrics connection refused: every connection is answering");
            continue;
        }
        let busy = Arc::new(AtomicBool::new(false));
        let phase = Arc::new(Phase::default());
        let io = Deadlined::new(stream, phase.clone());
        let (router, flag) = (router.clone(), busy.clone());
        let id = t.next;
        t.next += 1;
        let done = table.clone();
        let task = tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (router, phase, flag) = (router.clone(), phase.clone(), flag.clone());
                flag.store(true, Ordering::SeqCst);
                async move {
                    let r = handle(router, phase, req).await;
                    flag.store(false, Ordering::SeqCst);
                    r
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service);
            if let Err(e) = conn.await {
                tracing::debug!(peer = %peer, error = %e, "metrics connection ended");
            }
            lock(&done).open.remove(&id);
        });
        t.open.insert(
            id,
            Open {
                busy,
                abort: task.abort_handle(),
            },
        );
    }
}

/// `GET /metrics`: OpenMetrics, or the Prometheus text format 0.0.4 for a
/// client that asks for `text/plain` and not OpenMetrics.
async fn scrape(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let openmetrics =
        accept.contains("application/openmetrics-text") || !accept.contains("text/plain");
    let Ok(_turn) = shared.turns.acquire().await else {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    };
    let devices = Devices(shared.service.census().await);
    let mut registry = Registry::default();
    crate::telemetry::get().register(&mut registry);
    registry.register_collector(Box::new(devices));
    let mut text = String::with_capacity(64 * 1024);
    let (encoded, content_type) = if openmetrics {
        (
            prometheus_client::encoding::text::encode(&mut text, &registry),
            OPENMETRICS,
        )
    } else {
        (
            prometheus_client::encoding::prometheus_text::encode(&mut text, &registry),
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    };
    // The text (megabytes at thousands of devices) is freed once it is
    // written: the heap is trimmed then, as after a large bus reply.
    crate::memory::trim_soon();
    match encoded {
        Ok(()) => ([(header::CONTENT_TYPE, content_type)], text).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot encode the metrics: {e}\n"),
        )
            .into_response(),
    }
}

/// The families a scrape reads of the devices.
#[derive(Debug)]
struct Devices(Vec<Sample>);

impl prometheus_client::collector::Collector for Devices {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let devices = &self.0;
        let count = |f: fn(&Sample) -> bool| devices.iter().filter(|d| f(d)).count() as i64;
        let mut e = encoder.encode_descriptor(
            "hypeman_devices",
            "Registered devices, by state (registered, present, on_vfio, attached)",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in [
            ("registered", devices.len() as i64),
            ("present", count(|d| d.present)),
            ("on_vfio", count(|d| d.on_vfio)),
            ("attached", count(|d| d.attached)),
        ] {
            ConstGauge::new(n).encode(e.encode_family(&[("state", state)])?)?;
        }
        let mut e = encoder.encode_descriptor(
            "hypeman_device",
            "A registered device: its id, name, address, ids, type, driver and NUMA node",
            None,
            MetricType::Info,
        )?;
        for d in devices {
            e.encode_info(&[
                ("id", d.id.as_str()),
                ("name", d.name.as_str()),
                ("pci_address", d.pci_address.as_str()),
                ("vendor_id", d.vendor_id.as_str()),
                ("device_id", d.device_id.as_str()),
                ("type", d.kind),
                ("driver", d.driver.as_str()),
                ("numa_node", d.numa_node.as_str()),
            ])?;
        }
        let mut e = encoder.encode_descriptor(
            "hypeman_device_pcie_errors",
            "PCIe errors the kernel's AER driver counted on a registered device, by severity",
            None,
            MetricType::Counter,
        )?;
        for d in devices {
            let Some(aer) = d.aer else { continue };
            for (severity, n) in aer.by_severity() {
                let labels = [
                    ("pci_address", d.pci_address.as_str()),
                    ("severity", severity),
                ];
                ConstCounter::new(n).encode(e.encode_family(&labels)?)?;
            }
        }
        let mut e = encoder.encode_descriptor(
            "hypeman_device_health",
            "A registered device's health: 0 ok, 1 degraded, 2 failed",
            None,
            MetricType::Gauge,
        )?;
        for d in devices {
            let labels = [("pci_address", d.pci_address.as_str())];
            ConstGauge::new(d.health.gauge()).encode(e.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    /// In process, with `oneshot`: a scrape of a service on a simulated
    /// host answers OpenMetrics ending in `# EOF`, and 0.0.4 when asked.
    #[tokio::test]
    async fn a_scrape_answers_both_formats() {
        let f = crate::service::testing::with_events(
            "l40s-vgpu.toml",
            std::time::Duration::from_secs(5),
        )
        .await;
        let get = |accept: &'static str| {
            axum::http::Request::get("/metrics")
                .header(header::ACCEPT, accept)
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let body = |r: Response| async move {
            use http_body_util::BodyExt;
            let bytes = r.into_body().collect().await.unwrap().to_bytes();
            String::from_utf8(bytes.to_vec()).unwrap()
        };
        let r = router(f.service.clone())
            .oneshot(get("application/openmetrics-text;version=1.0.0"))
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_TYPE], OPENMETRICS);
        let text = body(r).await;
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert!(
            text.contains("hypeman_devices{state=\"registered\"} 0"),
            "{text}"
        );
        let r = router(f.service.clone())
            .oneshot(get("text/plain;version=0.0.4"))
            .await
            .unwrap();
        assert!(r.headers()[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/plain; version=0.0.4"));
        let text = body(r).await;
        assert!(!text.contains("# EOF"), "{text}");
        let r = router(f.service.clone())
            .oneshot(
                axum::http::Request::post("/metrics")
                    .body(axum::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
    }
}
