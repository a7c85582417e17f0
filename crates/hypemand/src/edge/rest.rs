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
//! Hostile clients are bounded ([`deadlines`](self#deadlines)): bodies over
//! [`MAX_BODY`] get 413, malformed JSON and wrong types 400; every phase of a
//! request has its deadline; connections are capped in all and per user (a
//! user's subordinate uids count as the user), with [`RESERVED_CONNECTIONS`]
//! kept for root and members of [`RESERVED_GROUP`]; a slot is given back as
//! soon as its peer has hung up.
//!
//! # Deadlines
//!
//! | phase | deadline | past it |
//! |---|---|---|
//! | a request's headers (the first, and each next one on a kept-alive connection: the idle timeout) | [`HEADER_TIMEOUT`] | the connection is closed |
//! | its body, from the end of the headers | [`BODY_TIMEOUT`] | 408 `request_timeout`, closed |
//! | the answer, from the end of the body | [`REQUEST_TIMEOUT`] | 503 `timeout`, closed; the work goes on to its end |
//! | writing the response, from when it is ready | [`WRITE_TIMEOUT`] | the connection is closed |

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
use serde_json::{json, Value};
use tokio::net::UnixListener;

use super::authz::{Authz, Caller};
use crate::service::{Op, Service};

/// The largest request body accepted.
pub const MAX_BODY: usize = 16 * 1024;
/// How long a client has to send a request's headers (the first, and each
/// next one on a kept-alive connection: an idle connection is closed then).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client has to send a request's body once its headers are in.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the daemon has to answer once the body is in. A handler is never
/// cut short (a half-done change is worse than a late one): past this the
/// client gets 503 and the work finishes on its own.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client has to read a response once it is ready (pipelined
/// requests whose responses are never read hold their connection no longer).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once, in all and per user.
pub const MAX_CONNECTIONS: usize = 64;
pub const MAX_CONNECTIONS_PER_UID: usize = 16;
/// Of [`MAX_CONNECTIONS`], the ones only root and members of
/// [`RESERVED_GROUP`] may take: a plain user filling every other slot
/// (from one account, or from its subordinate uids) never locks them out.
pub const RESERVED_CONNECTIONS: usize = 16;
/// The group the shipped polkit rule lets change devices.
pub const RESERVED_GROUP: &str = "hypeman";

/// What the handlers share.
pub struct Api {
    service: Arc<Service>,
    authz: Arc<Authz>,
}

impl Api {
    /// The API of `service`, authorizing changes through `authz`.
    pub fn new(service: Arc<Service>, authz: Arc<Authz>) -> Arc<Self> {
        Arc::new(Api { service, authz })
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
    let view = api
        .authz
        .register(&peer.caller(), &r.pci_address, name, r.tags)
        .await?;
    Ok((StatusCode::CREATED, Json(doc(&view.record().seed()))))
}

/// `tags[key]=value` pairs (the SDK's nested brackets); other parameters are
/// refused, so a misspelt filter does not silently list everything.
fn tag_filter(query: Option<&str>) -> Result<BTreeMap<String, String>, ApiError> {
    let mut filter = BTreeMap::new();
    for (n, (k, v)) in form_urlencoded::parse(query.unwrap_or("").as_bytes()).enumerate() {
        // Not collected past the limit: the service would refuse it anyway.
        if n >= hypeman_api::validate::MAX_TAGS {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!(
                    "a tag filter has at most {} pairs",
                    hypeman_api::validate::MAX_TAGS
                ),
            ));
        }
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
    api.authz.apply(&peer.caller(), &id, Op::Delete).await?;
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

use super::polkit::start_time;

/// `SO_PEERGROUPS` (Linux 4.13): the supplementary groups the peer had when
/// it connected. The libc crate does not export it for every target.
const SO_PEERGROUPS: libc::c_int = 59;

/// The groups a connected peer had when it connected, as the kernel recorded
/// them (not read from /proc later, where the pid may be another's).
fn peer_groups(fd: &impl std::os::fd::AsRawFd) -> Vec<u32> {
    let mut groups = vec![0 as libc::gid_t; 64];
    loop {
        let mut len = (groups.len() * std::mem::size_of::<libc::gid_t>()) as libc::socklen_t;
        // SAFETY: getsockopt into a buffer of `len` bytes that it may fill.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let n = len as usize / std::mem::size_of::<libc::gid_t>();
        if r == 0 {
            groups.truncate(n);
            return groups;
        }
        // ERANGE: `len` says how much it needs (bounded: NGROUPS_MAX 65536).
        if std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && n > groups.len()
            && n <= 65_536
        {
            groups.resize(n, 0);
            continue;
        }
        return Vec::new();
    }
}

/// One small system file, re-read only when it changes (device, inode, size
/// and modification time), and never past 4 MiB.
struct Watched<T> {
    path: std::path::PathBuf,
    seen: Option<(u64, u64, u64, i64, i64)>,
    parsed: T,
}

impl<T: Default> Watched<T> {
    fn new(path: impl Into<std::path::PathBuf>) -> Self {
        Watched {
            path: path.into(),
            seen: None,
            parsed: T::default(),
        }
    }

    fn get(&mut self, parse: impl FnOnce(&str) -> T) -> &T {
        use std::os::unix::fs::MetadataExt;
        let now = std::fs::metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec()));
        if now != self.seen {
            self.seen = now;
            self.parsed = crate::host::usage::read_text(&self.path)
                .ok()
                .filter(|t| t.len() <= 4 << 20)
                .map(|t| parse(&t))
                .unwrap_or_default();
        }
        &self.parsed
    }
}

/// Who a connecting uid is, for the connection limits: `/etc/subuid` makes
/// a user's subordinate uids that user's (so `unshare -U --map-auto` gives
/// no one more slots), `/etc/passwd` names the owners, and `/etc/group` gives
/// [`RESERVED_GROUP`]'s gid. Files only (no NSS call can stall the accept
/// loop); each is re-read when it changes.
struct Accounts {
    passwd: Watched<HashMap<String, u32>>,
    subuid: Watched<Vec<(String, u32, u32)>>,
    group: Watched<Option<u32>>,
}

impl Accounts {
    fn new(etc: &std::path::Path) -> Self {
        Accounts {
            passwd: Watched::new(etc.join("passwd")),
            subuid: Watched::new(etc.join("subuid")),
            group: Watched::new(etc.join("group")),
        }
    }

    /// The uid a connection counts against: the owner of the subordinate
    /// range `uid` lies in, else `uid` itself.
    fn owner(&mut self, uid: u32) -> u32 {
        let ranges = self.subuid.get(|t| {
            t.lines()
                .filter_map(|l| {
                    let mut f = l.trim().splitn(3, ':');
                    let (name, start, count) = (f.next()?, f.next()?, f.next()?);
                    Some((name.to_string(), start.parse().ok()?, count.parse().ok()?))
                })
                .collect()
        });
        let Some(name) = ranges
            .iter()
            .find(|(_, start, count)| uid >= *start && (uid - start) < *count)
            .map(|(n, _, _)| n.clone())
        else {
            return uid;
        };
        if let Ok(n) = name.parse::<u32>() {
            return n;
        }
        let users = self.passwd.get(|t| {
            t.lines()
                .filter_map(|l| {
                    let mut f = l.split(':');
                    let name = f.next()?;
                    Some((name.to_string(), f.nth(1)?.parse().ok()?))
                })
                .collect()
        });
        // A range whose owner has no account: its uids share one bucket.
        users.get(&name).copied().unwrap_or(u32::MAX)
    }

    fn reserved_gid(&mut self) -> Option<u32> {
        *self.group.get(|t| {
            t.lines().find_map(|l| {
                let mut f = l.split(':');
                (f.next()? == RESERVED_GROUP)
                    .then(|| f.nth(1)?.parse().ok())
                    .flatten()
            })
        })
    }
}

/// A connection's place.
struct Slot {
    owner: u32,
    privileged: bool,
    reserved: bool,
    /// A duplicate of the connection's socket, to see whether the peer has
    /// hung up while its task has not noticed yet.
    fd: std::os::fd::OwnedFd,
}

/// The connections open, counted against the limits.
#[derive(Default)]
struct Slots {
    open: HashMap<u64, Slot>,
    next: u64,
    general: usize,
    reserved: usize,
    per_owner: HashMap<u32, usize>,
}

/// Why a connection was refused, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refused {
    Owner,
    All,
}

impl Slots {
    /// Takes a place, if the limits allow, first giving back the places of
    /// peers that have already hung up.
    fn take(
        &mut self,
        owner: u32,
        privileged: bool,
        fd: std::os::fd::OwnedFd,
    ) -> Result<u64, Refused> {
        let mut swept = false;
        loop {
            let mine = self.per_owner.get(&owner).copied().unwrap_or(0);
            let owner_ok = privileged || mine < MAX_CONNECTIONS_PER_UID;
            let place = if !owner_ok {
                Err(Refused::Owner)
            } else if self.general < MAX_CONNECTIONS - RESERVED_CONNECTIONS {
                Ok(false)
            } else if privileged && self.reserved < RESERVED_CONNECTIONS {
                Ok(true)
            } else {
                Err(Refused::All)
            };
            match place {
                Ok(reserved) => {
                    if reserved {
                        self.reserved += 1;
                    } else {
                        self.general += 1;
                    }
                    if !privileged {
                        *self.per_owner.entry(owner).or_default() += 1;
                    }
                    self.next += 1;
                    self.open.insert(
                        self.next,
                        Slot {
                            owner,
                            privileged,
                            reserved,
                            fd,
                        },
                    );
                    return Ok(self.next);
                }
                Err(why) if swept => return Err(why),
                Err(_) => {
                    self.sweep();
                    swept = true;
                }
            }
        }
    }

    /// Gives a place back (once: a swept place is already back).
    fn give(&mut self, id: u64) {
        let Some(s) = self.open.remove(&id) else {
            return;
        };
        if s.reserved {
            self.reserved -= 1;
        } else {
            self.general -= 1;
        }
        if !s.privileged {
            if let Some(n) = self.per_owner.get_mut(&s.owner) {
                *n -= 1;
                if *n == 0 {
                    self.per_owner.remove(&s.owner);
                }
            }
        }
    }

    /// Gives back the places whose peer has closed its end: a client that
    /// opens a connection per request has reconnected before the old
    /// connection's task has read the end of it.
    fn sweep(&mut self) {
        use std::os::fd::AsRawFd;
        let mut polled: Vec<(u64, libc::pollfd)> = self
            .open
            .iter()
            .map(|(id, s)| {
                (
                    *id,
                    libc::pollfd {
                        fd: s.fd.as_raw_fd(),
                        events: 0,
                        revents: 0,
                    },
                )
            })
            .collect();
        let mut fds: Vec<libc::pollfd> = polled.iter().map(|(_, p)| *p).collect();
        // SAFETY: poll over descriptors this process owns, without waiting.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
        if n <= 0 {
            return;
        }
        for ((id, _), p) in polled.drain(..).zip(fds) {
            // POLLHUP: the peer has closed (or shut down both ways); nothing
            // more can come from it or be sent to it.
            if p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
                self.give(id);
            }
        }
    }
}

/// What the deadlines of one connection share: when the response being
/// written must be written by.
#[derive(Default)]
struct Phase {
    write_by: Mutex<Option<tokio::time::Instant>>,
}

impl Phase {
    fn set(&self, by: Option<tokio::time::Instant>) {
        *self.write_by.lock().unwrap_or_else(|p| p.into_inner()) = by;
    }
    fn get(&self) -> Option<tokio::time::Instant> {
        *self.write_by.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The connection's socket, with the write deadline: a write that cannot
/// make progress past [`Phase::write_by`] fails, and hyper closes the
/// connection.
struct Deadlined {
    io: TokioIo<tokio::net::UnixStream>,
    phase: Arc<Phase>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Deadlined {
    fn stalled<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        let Some(by) = self.phase.get() else {
            return Poll::Pending;
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(by)));
        if sleep.deadline() != by {
            sleep.as_mut().reset(by);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client did not read its response within {WRITE_TIMEOUT:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl hyper::rt::Read for Deadlined {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for Deadlined {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.io).poll_write(cx, buf) {
            std::task::Poll::Pending => self.stalled(cx),
            r => r,
        }
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match std::pin::Pin::new(&mut self.io).poll_write_vectored(cx, bufs) {
            std::task::Poll::Pending => self.stalled(cx),
            r => r,
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match std::pin::Pin::new(&mut self.io).poll_flush(cx) {
            std::task::Poll::Pending => self.stalled(cx),
            r => r,
        }
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// An error response that also closes the connection.
fn closing(e: ApiError) -> Response {
    let mut r = e.into_response();
    r.headers_mut().insert(
        axum::http::header::CONNECTION,
        axum::http::HeaderValue::from_static("close"),
    );
    r
}

/// One request, under its deadlines: the body is read whole within
/// [`BODY_TIMEOUT`] (and [`MAX_BODY`]), the router runs on a task of its own
/// (so neither a client leaving nor [`REQUEST_TIMEOUT`] cuts a change short),
/// and the response must then be written within [`WRITE_TIMEOUT`].
async fn handle(
    router: Router,
    phase: Arc<Phase>,
    req: axum::http::Request<hyper::body::Incoming>,
) -> Result<Response, std::convert::Infallible> {
    use http_body_util::BodyExt;
    phase.set(None);
    let (parts, body) = req.into_parts();
    let body = http_body_util::Limited::new(body, MAX_BODY);
    let response = match tokio::time::timeout(BODY_TIMEOUT, body.collect()).await {
        Err(_) => closing(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {BODY_TIMEOUT:?}"),
        )),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => closing(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is over {MAX_BODY} bytes"),
        )),
        Ok(Err(e)) => closing(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("cannot read the request body: {e}"),
        )),
        Ok(Ok(collected)) => {
            use tower::ServiceExt;
            let req = axum::http::Request::from_parts(
                parts,
                axum::body::Body::from(collected.to_bytes()),
            );
            let task = tokio::spawn(router.oneshot(req));
            match tokio::time::timeout(REQUEST_TIMEOUT, task).await {
                Ok(Ok(Ok(r))) => r,
                Ok(Ok(Err(never))) => match never {},
                Ok(Err(join)) => closing(ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal_error",
                    format!("the request failed: {join}"),
                )),
                Err(_) => closing(ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "timeout",
                    format!("no answer within {REQUEST_TIMEOUT:?}; the request goes on, and GET /devices shows its outcome"),
                )),
            }
        }
    };
    phase.set(Some(tokio::time::Instant::now() + WRITE_TIMEOUT));
    Ok(response)
}

/// Serves `listener` until the task is dropped.
pub async fn serve(listener: UnixListener, api: Arc<Api>) {
    serve_with(listener, api, std::path::Path::new("/etc")).await
}

/// [`serve`], with the account files read from `etc` (tests).
pub async fn serve_with(listener: UnixListener, api: Arc<Api>, etc: &std::path::Path) {
    let router = router(api);
    let slots = Arc::new(Mutex::new(Slots::default()));
    let mut accounts = Accounts::new(etc);
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
        let gid = accounts.reserved_gid();
        let privileged =
            uid == 0 || gid.is_some_and(|g| cred.gid() == g || peer_groups(&stream).contains(&g));
        let owner = if privileged { uid } else { accounts.owner(uid) };
        let Ok(dup) = std::os::fd::AsFd::as_fd(&stream).try_clone_to_owned() else {
            continue;
        };
        let taken = slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(owner, privileged, dup);
        let id = match taken {
            Ok(id) => id,
            Err(why) => {
                tracing::debug!(uid, owner, privileged, refused = ?why, "API connection refused: too many open");
                continue;
            }
        };
        // Read now, while the peer is connected: the process that made this
        // connection, not whatever has its pid later. 0 if it has already
        // exited: its changes are then refused (see `polkit::process_gone`).
        let peer = Peer {
            pid,
            uid,
            start_time: start_time(pid).unwrap_or(0),
        };
        let router = router.clone().layer(Extension(peer));
        let phase = Arc::new(Phase::default());
        let io = Deadlined {
            io: TokioIo::new(stream),
            phase: phase.clone(),
            sleep: None,
        };
        let slots = slots.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |req| handle(router.clone(), phase.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(io, service);
            if let Err(e) = conn.await {
                tracing::debug!(uid, error = %e, "API connection ended");
            }
            slots.lock().unwrap_or_else(|p| p.into_inner()).give(id);
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

    /// In-process: the router on a simulated host, with a fake authorizer in
    /// polkit's place (axum's `examples/testing`, `Router::oneshot`).
    mod in_process {
        use super::*;
        use crate::edge::authz::{Action, Authorizer, Details};
        use crate::host::sim::SimHost;
        use crate::pci::PciAddress;
        use crate::service::testing::{example, service_on, Fixture};
        use axum::body::Body;
        use axum::http::Request;
        use http_body_util::BodyExt;
        use tower::ServiceExt;

        /// Grants or denies everything, remembers what it was asked, and can
        /// unplug a device while it "decides" (as the host may while polkit
        /// waits for a password).
        struct Fake {
            grant: bool,
            asked: Mutex<Vec<(u32, Action, Details)>>,
            unplug_while_deciding: Option<(Arc<SimHost>, PciAddress)>,
        }

        #[async_trait::async_trait]
        impl Authorizer for Fake {
            async fn check(
                &self,
                caller: &Caller<'_>,
                action: Action,
                details: &Details,
            ) -> Result<(), Error> {
                let Caller::Process { uid, .. } = caller else {
                    return Err(Error::Failed("a REST caller is a process".into()));
                };
                self.asked
                    .lock()
                    .unwrap()
                    .push((*uid, action, details.clone()));
                if let Some((sim, address)) = &self.unplug_while_deciding {
                    sim.unplug(*address).unwrap();
                }
                if self.grant {
                    Ok(())
                } else {
                    Err(Error::AccessDenied(format!("denied {}", action.id())))
                }
            }
        }

        fn fake(grant: bool) -> Arc<Fake> {
            Arc::new(Fake {
                grant,
                asked: Mutex::new(Vec::new()),
                unplug_while_deciding: None,
            })
        }

        fn app(f: &Fixture, authorizer: Arc<Fake>) -> Router {
            let authz = Arc::new(Authz::new(f.service.clone(), authorizer));
            let peer = Peer {
                pid: 4242,
                uid: 1000,
                start_time: 7,
            };
            router(Api::new(f.service.clone(), authz)).layer(Extension(peer))
        }

        async fn call(app: Router, method: &str, uri: &str, body: &str) -> (StatusCode, Value) {
            let request = Request::builder()
                .method(method)
                .uri(uri)
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let response = app.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = response.into_body().collect().await.unwrap().to_bytes();
            (
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            )
        }

        const GPU: &str = "0000:01:00.0";

        #[tokio::test]
        async fn a_denied_create_registers_nothing_and_says_forbidden() {
            let f = service_on(&example("workstation.toml"), Duration::from_secs(5));
            let authorizer = fake(false);
            let body = json!({"pci_address": GPU, "name": "l4"}).to_string();
            let (status, doc) = call(app(&f, authorizer.clone()), "POST", "/devices", &body).await;
            assert_eq!(status, StatusCode::FORBIDDEN, "{doc}");
            assert_eq!(doc["code"], "forbidden");
            assert!(f.service.snapshot().is_empty());
            let asked = authorizer.asked.lock().unwrap().clone();
            let details = Details {
                pci_address: GPU.into(),
                device_id: "10de:2684".into(),
                name: "l4".into(),
            };
            assert_eq!(asked, vec![(1000, Action::Register, details)]);
        }

        #[tokio::test]
        async fn create_then_delete_ask_about_the_device_they_change() {
            let f = service_on(&example("workstation.toml"), Duration::from_secs(5));
            let authorizer = fake(true);
            let body = json!({"pci_address": GPU}).to_string();
            let (status, doc) = call(app(&f, authorizer.clone()), "POST", "/devices", &body).await;
            assert_eq!(status, StatusCode::CREATED, "{doc}");
            assert_eq!(doc["name"], "pci-0000-01-00-0");
            let id = doc["id"].as_str().unwrap().to_string();
            let uri = format!("/devices/{id}");
            let (status, _) = call(app(&f, authorizer.clone()), "DELETE", &uri, "").await;
            assert_eq!(status, StatusCode::NO_CONTENT);
            assert!(f.service.snapshot().is_empty());
            let actions: Vec<(Action, String)> = authorizer
                .asked
                .lock()
                .unwrap()
                .iter()
                .map(|(_, a, d)| (*a, d.name.clone()))
                .collect();
            let name = "pci-0000-01-00-0".to_string();
            assert_eq!(
                actions,
                vec![(Action::Register, name.clone()), (Action::Delete, name)]
            );
        }

        /// Register registers the host device it asked about: the device
        /// leaving while polkit decides does not make it register something
        /// else, or read the host again (the old code answered 404 here,
        /// from a second read).
        #[tokio::test]
        async fn register_registers_what_was_authorized() {
            let f = service_on(&example("workstation.toml"), Duration::from_secs(5));
            let address = PciAddress::parse(GPU).unwrap();
            let authorizer = Arc::new(Fake {
                grant: true,
                asked: Mutex::new(Vec::new()),
                unplug_while_deciding: Some((f.sim.clone(), address)),
            });
            let body = json!({"pci_address": GPU, "name": "l4"}).to_string();
            let (status, doc) = call(app(&f, authorizer.clone()), "POST", "/devices", &body).await;
            assert_eq!(status, StatusCode::CREATED, "{doc}");
            assert_eq!(doc["vendor_id"], "10de");
            assert_eq!(doc["device_id"], "2684");
            assert_eq!(authorizer.asked.lock().unwrap().len(), 1);
        }

        #[tokio::test]
        async fn reads_ask_nobody() {
            let f = service_on(&example("workstation.toml"), Duration::from_secs(5));
            let authorizer = fake(false);
            let (status, doc) = call(app(&f, authorizer.clone()), "GET", "/devices", "").await;
            assert_eq!((status, doc), (StatusCode::OK, json!([])));
            let (status, doc) = call(app(&f, authorizer.clone()), "GET", "/devices/nope", "").await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{doc}");
            assert!(authorizer.asked.lock().unwrap().is_empty());
        }
    }

    #[test]
    fn own_start_time_reads() {
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert!(start_time(u32::MAX).is_none());
    }
}
