//! Hypeman's own `/devices` REST endpoints, on a unix socket *(issue 15)*:
//! what the official SDKs, the hypeman CLI and scripts already speak.
//!
//! | endpoint | answer | D-Bus equivalent |
//! |---|---|---|
//! | `POST /devices` | 201 and the Device | `Create` |
//! | `GET /devices[?tags[k]=v...]` | 200 and the Devices | `List` / `ListByTags` |
//! | `GET /devices/available` | 200, the passable functions | `ListAvailable` (passable only) |
//! | `GET /devices/{id or name}` | 200 and the Device | `Get` |
//! | `DELETE /devices/{id or name}` | 204 | `Delete` |
//!
//! Why here and not a second program: the handlers call the same service
//! code and the same authorization table as the bus, so no rule is written
//! twice. Reads are open; every change is authorized with the same polkit
//! actions as over D-Bus, for the peer's credentials (`SO_PEERCRED`, as a
//! `unix-process` subject with the start time read when it connected).
//!
//! Hostile clients are bounded: bodies over [`MAX_BODY`] get 413, malformed
//! JSON and wrong types 400, a client has [`HEADER_TIMEOUT`] to send each
//! request's headers, and connections are capped in all and per uid.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use hypeman_api::{CreateRequest, Error};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::Semaphore;

use super::authz::{Authz, Method};
use super::polkit::Caller;
use crate::service::Service;

/// The largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a client has to send a request's headers (the first, and each
/// next one on a kept-alive connection).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once, in all and per uid.
pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_CONNECTIONS_PER_UID: usize = 16;

/// What the handlers share.
pub struct Api {
    service: Arc<Service>,
    authz: Arc<Authz>,
    /// The serving bus connection (polkitd is asked through it).
    conn: zbus::Connection,
}

impl Api {
    pub fn new(service: Arc<Service>, authz: Arc<Authz>, conn: zbus::Connection) -> Arc<Self> {
        Arc::new(Api {
            service,
            authz,
            conn,
        })
    }
}

/// The peer of one connection, as the kernel reported it when it connected.
#[derive(Debug, Clone, Copy)]
struct Peer {
    pid: u32,
    uid: u32,
    start_time: u64,
}

impl Peer {
    fn caller(&self) -> Caller<'static> {
        Caller::Process {
            pid: self.pid,
            uid: self.uid,
            start_time: self.start_time,
        }
    }
}

/// Hypeman's error body: `{"code": ..., "message": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(json!({"code": self.code, "message": self.message})),
        )
            .into_response()
    }
}

/// The contract's errors as Hypeman's statuses and codes.
impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        use StatusCode as S;
        let (status, code) = match &e {
            Error::InvalidPciAddress(_) => (S::BAD_REQUEST, "invalid_pci_address"),
            Error::InvalidName(_) => (S::BAD_REQUEST, "invalid_name"),
            Error::InvalidArgument(_) => (S::BAD_REQUEST, "invalid_request"),
            Error::DeviceNotFound(_) => (S::NOT_FOUND, "device_not_found"),
            Error::NotFound(_) => (S::NOT_FOUND, "not_found"),
            Error::AlreadyRegistered(_) | Error::NameTaken(_) => (S::CONFLICT, "conflict"),
            Error::InUse(_) => (S::CONFLICT, "in_use"),
            Error::NoIommu(_) => (S::CONFLICT, "no_iommu"),
            Error::NotPassable(_) => (S::CONFLICT, "not_passable"),
            Error::HostInUse(_) => (S::CONFLICT, "host_in_use"),
            Error::AccessDenied(_) | Error::InteractiveAuthorizationRequired(_) => {
                (S::FORBIDDEN, "forbidden")
            }
            Error::Busy(_) => (S::SERVICE_UNAVAILABLE, "busy"),
            _ => (S::INTERNAL_SERVER_ERROR, "internal_error"),
        };
        ApiError::new(status, code, e.to_string())
    }
}

fn doc(v: &impl serde::Serialize) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// The routes, with the body limit.
pub fn router(api: Arc<Api>) -> Router {
    Router::new()
        .route("/devices", get(list).post(create))
        .route("/devices/available", get(available))
        .route("/devices/{id}", get(retrieve).delete(delete))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(api)
}

async fn create(
    State(api): State<Arc<Api>>,
    Extension(peer): Extension<Peer>,
    body: Result<Json<CreateRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let Json(r) = body.map_err(|rej| {
        if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_request", rej.body_text())
        }
    })?;
    let name = r.name.as_deref().unwrap_or("");
    api.authz
        .register(&api.conn, &peer.caller(), &r.pci_address, name)
        .await?;
    let view = api.service.register(&r.pci_address, name, r.tags).await?;
    Ok((StatusCode::CREATED, Json(doc(&view.record().seed()))))
}

/// `tags[key]=value` pairs (the SDK's nested brackets); other parameters are
/// refused, so a misspelt filter does not silently list everything.
fn tag_filter(query: Option<&str>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut filter = BTreeMap::new();
    for (k, v) in form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let Some(key) = k.strip_prefix("tags[").and_then(|r| r.strip_suffix(']')) else {
            let shown: String = k.chars().take(64).collect();
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown query parameter {shown:?}; filter with tags[KEY]=VALUE"),
            ));
        };
        filter.insert(key.to_string(), v.into_owned());
    }
    Ok(filter)
}

async fn list(
    State(api): State<Arc<Api>>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>, ApiError> {
    let filter = tag_filter(query.as_deref())?;
    let views = api.service.list_tagged(&filter).await?;
    let docs: Vec<Value> = views.iter().map(|v| doc(&v.record().seed())).collect();
    Ok(Json(Value::Array(docs)))
}

async fn available(State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    let docs: Vec<Value> = api
        .service
        .list_available()
        .await?
        .iter()
        .map(|v| v.record())
        .filter(|a| a.passable)
        .map(|a| doc(&a.seed()))
        .collect();
    Ok(Json(Value::Array(docs)))
}

async fn retrieve(
    State(api): State<Arc<Api>>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(doc(&api.service.get(&id).await?.record().seed())))
}

async fn delete(
    State(api): State<Arc<Api>>,
    Extension(peer): Extension<Peer>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let t = api
        .authz
        .device(&api.conn, &peer.caller(), Method::Delete, &id)
        .await?;
    api.service.delete(&t).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Why the API socket cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot create the API socket {path}: {source}")]
    Bind {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; remove it or choose another --api-socket")]
    NotASocket { path: String },
    #[error("another daemon answers on the API socket {path}")]
    Taken { path: String },
    #[error("cannot use the socket systemd passed: {0}")]
    Activation(#[source] std::io::Error),
}

/// Where the API is served from.
pub struct Listening {
    pub listener: UnixListener,
    /// The file this daemon created (removed at a clean stop); none when
    /// systemd passed the socket.
    pub created: Option<std::path::PathBuf>,
}

/// The socket systemd passed (socket activation: `hypemand-api.socket`, or
/// `systemd-socket-activate`), if any: it is served whatever `--api-socket`
/// says, since whoever started the daemon this way wants it served.
pub fn activated() -> Result<Option<Listening>, SocketError> {
    use std::os::fd::FromRawFd;
    let Some(fd) = sd_notify::listen_fds().ok().and_then(|mut fds| fds.next()) else {
        return Ok(None);
    };
    // SAFETY: systemd passed this descriptor to us (LISTEN_PID is ours) and
    // nothing else in the process takes it.
    let std = unsafe { std::os::unix::net::UnixListener::from_raw_fd(fd) };
    std.set_nonblocking(true).map_err(SocketError::Activation)?;
    let listener = UnixListener::from_std(std).map_err(SocketError::Activation)?;
    tracing::info!("API socket passed by systemd");
    Ok(Some(Listening {
        listener,
        created: None,
    }))
}

/// `path`, created mode 0666 (polkit decides who may change what) in a
/// directory created 0755. A stale socket left by a crash is replaced; a
/// live one, or any other file, is refused.
pub fn listen(path: &std::path::Path) -> Result<Listening, SocketError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let shown = path.display().to_string();
    let bind_err = |source| SocketError::Bind {
        path: shown.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(bind_err)?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(bind_err)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(SocketError::Taken { path: shown });
            }
            std::fs::remove_file(path).map_err(bind_err)?;
        }
        Ok(_) => return Err(SocketError::NotASocket { path: shown }),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(bind_err)?;
    tracing::info!(path = %shown, "API socket listening");
    Ok(Listening {
        listener,
        created: Some(path.to_path_buf()),
    })
}

/// A process's start time (clock ticks after boot, field 22 of
/// `/proc/PID/stat`), which polkitd compares to tell a reused pid apart.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command may hold spaces and parentheses: fields follow the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Connections open per uid.
#[derive(Default)]
struct PerUid(Mutex<HashMap<u32, usize>>);

impl PerUid {
    fn take(&self, uid: u32) -> bool {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(uid).or_default();
        if *n >= MAX_CONNECTIONS_PER_UID {
            return false;
        }
        *n += 1;
        true
    }
    fn give(&self, uid: u32) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&uid) {
            *n -= 1;
            if *n == 0 {
                m.remove(&uid);
            }
        }
    }
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, api: Arc<Api>) {
    let router = router(api);
    let all = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_uid = Arc::new(PerUid::default());
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off a little rather than spin.
                tracing::warn!(error = %e, "cannot accept an API connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(cred) = stream.peer_cred() else {
            continue;
        };
        let uid = cred.uid();
        let Some(pid) = cred.pid().and_then(|p| u32::try_from(p).ok()) else {
            continue;
        };
        let Ok(permit) = all.clone().try_acquire_owned() else {
            tracing::debug!(uid, "API connection refused: too many open");
            continue;
        };
        if !per_uid.take(uid) {
            tracing::debug!(uid, "API connection refused: too many open for this uid");
            continue;
        }
        // Read now, while the peer is connected: the process that made this
        // connection, not whatever has its pid later.
        let peer = Peer {
            pid,
            uid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let service = TowerToHyperService::new(router.clone().layer(Extension(peer)));
        let per_uid = per_uid.clone();
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(uid, error = %e, "API connection ended");
            }
            per_uid.give(uid);
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_filters() {
        let f = tag_filter(Some("tags%5Bteam%5D=ml&tags[env]=prod%20a")).unwrap();
        assert_eq!(f.get("team").map(String::as_str), Some("ml"));
        assert_eq!(f.get("env").map(String::as_str), Some("prod a"));
        assert!(tag_filter(None).unwrap().is_empty());
        assert!(tag_filter(Some("tag[x]=1")).is_err());
        assert!(tag_filter(Some("limit=3")).is_err());
    }

    #[test]
    fn own_start_time_reads() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert!(start_time(u32::MAX).is_none());
    }
}
