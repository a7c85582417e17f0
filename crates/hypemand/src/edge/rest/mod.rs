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
            Error::HardwareChanged(_) => (S::CONFLICT, "hardware_changed"),
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
        .route("/resources/gpu", get(gpu_resources))
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

/// *(issue 26)* The `gpu` section of Hypeman's `GET /resources`: its
/// `GPUResourceStatus` document.
async fn gpu_resources(State(api): State<Arc<Api>>) -> Result<Json<Value>, ApiError> {
    Ok(Json(doc(&api.service.gpu_resources().await?.document())))
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

pub(in crate::edge) mod conn;
mod slots;
mod socket;

pub use conn::serve;
pub use socket::{activated, listen, SocketError};

#[cfg(test)]
mod tests {
    use super::*;

    /// *(issue 28)* Another card at a registered address is Hypeman's 409,
    /// `hardware_changed`, with the daemon's message.
    #[test]
    fn a_changed_card_is_a_conflict() {
        let e = ApiError::from(Error::HardwareChanged("another card".into()));
        assert_eq!(
            (e.status, e.code, e.message.as_str()),
            (StatusCode::CONFLICT, "hardware_changed", "another card")
        );
    }

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
        use crate::edge::polkit::start_time;
        assert!(start_time(std::process::id()).is_some_and(|t| t > 0));
        assert!(start_time(u32::MAX).is_none());
    }
}
