//! One connection: its slot, its deadlines (headers, body, answer, writing),
//! and the request handed to the router on a task of its own.

use super::slots::{peer_groups, Accounts, Slots};
use super::*;
use crate::edge::polkit::start_time;

/// What the deadlines of one connection share: when the response being
/// written must be written by. *(issue 29)* The metrics edge's connections
/// have the same deadlines.
#[derive(Default)]
pub(in crate::edge) struct Phase {
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
pub(in crate::edge) struct Deadlined<S> {
    io: TokioIo<S>,
    phase: Arc<Phase>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<S> Deadlined<S> {
    /// `stream`, whose writes must make progress by `phase`'s deadline.
    pub(in crate::edge) fn new(stream: S, phase: Arc<Phase>) -> Self {
        Deadlined {
            io: TokioIo::new(stream),
            phase,
            sleep: None,
        }
    }

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

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Read for Deadlined<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> hyper::rt::Write for Deadlined<S> {
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
pub(in crate::edge) async fn handle(
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

/// [`serve`], with the account files read from `etc`.
async fn serve_with(listener: UnixListener, api: Arc<Api>, etc: &std::path::Path) {
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
        let io = Deadlined::new(stream, phase.clone());
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
