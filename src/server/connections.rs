//! `Connections`: the accept loop, and what a TCP connection may cost the server before it has
//! sent a request. axum's own `serve` keeps a connection for as long as its client likes: one that
//! sends half a request line, or goes quiet between requests, holds a socket (and, at shutdown,
//! the whole process) indefinitely. Here every connection is watched:
//!
//! - at most `max_connections` are open; past that, a new one gets a 503 and is closed at once,
//!   or, while [`MAX_REFUSING`] such answers are under way, is closed unanswered;
//! - a request head must arrive whole within `header_read_timeout` of its first byte;
//! - between requests, a kept-alive connection may sit idle for `idle_timeout`;
//! - on shutdown, idle and half-read connections close at once, and a connection with a request in
//!   flight closes once that request is answered, which its own deadline bounds.

use axum::body::Body;
use axum::http::Request;
use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

/// What a connection may cost; from the server's flags.
#[derive(Clone, Copy, Debug)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long a request in flight at shutdown may still take: its own deadline, and a little
    /// time to send the answer.
    pub drain_timeout: Duration,
}

/// Connections over the limit that are answered at once; each holds its socket for up to a
/// second. Past these a new one is closed unanswered, so a flood of connections holds at most this
/// many sockets beyond `max_connections`.
pub const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` until `shutdown` resolves, then closes every connection as the
/// module documentation says and returns once all are closed.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let open = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    let (stop, stopped) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors, or a connection reset before it was accepted: the
                    // listener itself is fine, so wait a moment and go on.
                    tracing::warn!(%error, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let place = Arc::clone(&open).try_acquire_owned();
        match place.map_err(|_| Arc::clone(&refusing).try_acquire_owned()) {
            Ok(permit) => {
                connections.spawn(watched(
                    stream,
                    app.clone(),
                    limits,
                    stopped.clone(),
                    permit,
                ));
            }
            Err(Ok(refusal)) => {
                connections.spawn(refuse(stream, limits.max_connections, refusal));
            }
            // Dropped here: closed unanswered, and the finished connections below still reaped.
            Err(Err(_)) => {
                metrics::counter!("tnas_connections_closed_total", "reason" => "over_limit_unanswered").increment(1);
            }
        }
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = stop.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Answers a connection over the limit with a 503 and closes it. Its request is not served: it is
/// read only to be dropped (for at most a second), as closing a socket with unread bytes resets the
/// connection, and a client might lose the answer to the reset. The permit keeps its place among
/// the refusals under way.
async fn refuse(mut stream: TcpStream, max_connections: usize, _permit: OwnedSemaphorePermit) {
    metrics::counter!("tnas_connections_closed_total", "reason" => "over_limit").increment(1);
    let message = format!("the server has its limit of {max_connections} connections open; retry after a second, or reuse a connection");
    let body = serde_json::json!({"error": {"code": "too_many_connections", "message": message}})
        .to_string();
    let head = "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close";
    let response = format!("{head}\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let answer_and_drain = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer_and_drain).await;
}

/// Serves one connection under its watchdog; the permit keeps its place among the open ones.
async fn watched(
    stream: TcpStream,
    app: Router,
    limits: ConnectionLimits,
    mut stopped: watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    metrics::gauge!("tnas_open_connections").increment(1.0);
    let activity = Arc::new(Activity::new());
    let io = TokioIo::new(Metered {
        stream,
        activity: Arc::clone(&activity),
    });
    let service = Tracked {
        app,
        activity: Arc::clone(&activity),
    };
    // The watchdog below times request heads; hyper's own timer would time them from idle.
    let connection = hyper::server::conn::http1::Builder::new()
        .header_read_timeout(None)
        .serve_connection(io, service);
    tokio::pin!(connection);
    let ended = tokio::select! {
        result = connection.as_mut() => Ended::Served(result),
        reason = activity.expiry(limits) => Ended::Expired(reason),
        _ = stopped.wait_for(|stop| *stop) => Ended::ShuttingDown,
    };
    let closed_because = match ended {
        Ended::Served(Ok(())) => "client",
        Ended::Served(Err(error)) => {
            tracing::debug!(%error, "connection ended with an error");
            "error"
        }
        Ended::Expired(reason) => reason,
        Ended::ShuttingDown => {
            if activity.is_busy() {
                connection.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(limits.drain_timeout, connection).await;
            }
            "shutdown"
        }
    };
    metrics::counter!("tnas_connections_closed_total", "reason" => closed_because).increment(1);
    metrics::gauge!("tnas_open_connections").decrement(1.0);
}

/// Why [`watched`] stopped waiting on its connection.
enum Ended {
    Served(hyper::Result<()>),
    Expired(&'static str),
    ShuttingDown,
}

/// Where a connection is between requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Opened, or its last response produced, at this time; no byte of a new request yet.
    Idle(Instant),
    /// The first byte of a request head arrived at this time; the head is not whole yet.
    ReadingHead(Instant),
    /// A request is being served (its body read, its answer computed); its own deadline bounds it.
    Busy,
}

/// A connection's phase, updated by its socket (bytes read) and its service (requests in and out).
struct Activity {
    phase: Mutex<Phase>,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            phase: Mutex::new(Phase::Idle(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn phase(&self) -> Phase {
        *self.phase.lock().expect("phase lock is never poisoned")
    }

    fn set(&self, phase: Phase) {
        *self.phase.lock().expect("phase lock is never poisoned") = phase;
        self.changed.notify_one();
    }

    fn is_busy(&self) -> bool {
        self.phase() == Phase::Busy
    }

    /// Bytes arrived: between requests, they start a request head and its timeout.
    fn bytes_read(&self) {
        if let Phase::Idle(_) = self.phase() {
            self.set(Phase::ReadingHead(Instant::now()));
        }
    }

    /// Resolves, with the reason, once the connection has been idle or reading a head too long.
    async fn expiry(&self, limits: ConnectionLimits) -> &'static str {
        loop {
            let changed = self.changed.notified();
            let deadline = match self.phase() {
                Phase::Idle(since) => Some((since + limits.idle_timeout, "idle_timeout")),
                Phase::ReadingHead(since) => {
                    Some((since + limits.header_read_timeout, "header_read_timeout"))
                }
                Phase::Busy => None,
            };
            match deadline {
                Some((at, reason)) => tokio::select! {
                    () = tokio::time::sleep_until(at) => return reason,
                    () = changed => {}
                },
                None => changed.await,
            }
        }
    }
}

/// Marks its connection busy while it lives: from a request's head to its response.
struct BusyGuard(Arc<Activity>);

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.0.set(Phase::Idle(Instant::now()));
    }
}

/// The router as hyper's service, keeping the connection's phase.
#[derive(Clone)]
struct Tracked {
    app: Router,
    activity: Arc<Activity>,
}

impl hyper::service::Service<Request<Incoming>> for Tracked {
    type Response = axum::response::Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        self.activity.set(Phase::Busy);
        let busy = BusyGuard(Arc::clone(&self.activity));
        let app = self.app.clone();
        Box::pin(async move {
            let response = app.oneshot(request.map(Body::new)).await;
            drop(busy);
            response
        })
    }
}

/// The connection's socket, telling its [`Activity`] when bytes arrive.
struct Metered {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Metered {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.bytes_read();
        }
        polled
    }
}

impl AsyncWrite for Metered {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}
