//! Serving the API so that slow or idle clients cannot exhaust the server:
//! at most `max_connections` at once (further clients wait in the kernel's
//! backlog), a connection that does not deliver a whole request head within
//! `header_timeout` of its start (or of the first byte of a later request)
//! is closed, and so is one with no request in flight and no traffic for
//! `idle_timeout`. HTTP/1 and HTTP/2 (hyper-util's auto builder). A request
//! is in flight until its answer's body is sent, so a streamed answer (the
//! event stream, `GET /v1/events/stream`) is never cut by either timeout,
//! even while the client's HTTP/2 frames arrive.
//!
//! With TLS (`tokio-rustls`), the handshake is part of the request head: a
//! connection must finish it and deliver its first request head within
//! `header_timeout` of opening, so a client that opens TLS and stalls holds
//! a permit no longer than one that stalls in plain HTTP.
//!
//! The timers are hearth's own watchdog rather than hyper's
//! `header_read_timeout`, which also runs while a kept-alive connection waits
//! for its next request and so would make the idle timeout moot.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tower::ServiceExt;

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Listens on `addr` with a backlog of `max_connections` (the kernel caps
/// it at `somaxconn`): with the default 128 a burst of connections
/// overflows the queue and clients wait a SYN retransmit (1 s) to get in.
pub fn bind(addr: std::net::SocketAddr, max_connections: u32) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(max_connections.max(128))
}

/// How long shutdown waits for open connections to finish their requests.
const DRAIN: Duration = Duration::from_secs(10);

/// Serves `app` on `listener` until `shutdown` resolves, then lets open
/// connections finish (up to [`DRAIN`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    raise_fd_limit(limits.max_connections);
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let (stop_tx, stop_rx) = watch::channel(false);
    let builder = Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
        };
        let (stream, _peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // EMFILE and friends: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let builder = builder.clone();
        let mut stop = stop_rx.clone();
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let activity = Arc::new(Activity::new());
            let watched = Watched {
                stream,
                activity: activity.clone(),
            };
            match acceptor {
                None => serve_connection(watched, app, builder, activity, limits, &mut stop).await,
                Some(acceptor) => {
                    // The handshake runs under the header timeout's watchdog.
                    let handshake = tokio::select! {
                        done = acceptor.accept(watched) => done,
                        reason = watchdog(&activity, limits) => {
                            tracing::debug!(reason, "connection closed during the TLS handshake");
                            return;
                        }
                        _ = stopped(&mut stop) => return,
                    };
                    match handshake {
                        Ok(tls) => {
                            serve_connection(tls, app, builder, activity, limits, &mut stop).await
                        }
                        Err(e) => tracing::debug!(error = %e, "TLS handshake failed"),
                    }
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    if tokio::time::timeout(DRAIN, permits.acquire_many(all))
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {}s of shutdown: closing them",
            DRAIN.as_secs()
        );
    }
}

/// Serves HTTP on one connection (plain or TLS) until it ends, outstays a
/// timeout, or shutdown has let its requests finish.
async fn serve_connection<S>(
    io: S,
    app: Router,
    builder: Builder<TokioExecutor>,
    activity: Arc<Activity>,
    limits: Limits,
    stop: &mut watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(io);
    let counted = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let app = app.clone();
        let guard = counted.request_started();
        async move {
            // The request stays in flight until its answer's body is sent
            // (or dropped): a streamed answer, such as the event stream,
            // is a request being handled, not an idle connection.
            let response = app.oneshot(request).await;
            response.map(|r| {
                r.map(|body| {
                    axum::body::Body::new(Counted {
                        body,
                        _guard: guard,
                    })
                })
            })
        }
    });
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let watchdog = watchdog(&activity, limits);
    tokio::pin!(watchdog);
    tokio::select! {
        _ = conn.as_mut() => {}
        reason = &mut watchdog => tracing::debug!(reason, "connection closed"),
        _ = stopped(stop) => {
            conn.as_mut().graceful_shutdown();
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = &mut watchdog => {}
            }
        }
    }
}

/// Resolves once shutdown began.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// What the watchdog knows of one connection.
struct Activity {
    state: Mutex<State>,
}

struct State {
    /// Requests being handled.
    in_flight: usize,
    /// When the request head being read began (the connection's start, or
    /// the first byte after the last answer); `None` when none is awaited.
    head_since: Option<Instant>,
    /// The last traffic or answer.
    last_active: Instant,
}

impl Activity {
    fn new() -> Self {
        let now = Instant::now();
        Activity {
            state: Mutex::new(State {
                in_flight: 0,
                head_since: Some(now),
                last_active: now,
            }),
        }
    }

    fn read(&self) {
        let mut s = self.state.lock().unwrap();
        let now = Instant::now();
        s.last_active = now;
        if s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(now);
        }
    }

    fn wrote(&self) {
        self.state.lock().unwrap().last_active = Instant::now();
    }

    fn request_started(self: &Arc<Self>) -> RequestGuard {
        let mut s = self.state.lock().unwrap();
        s.in_flight += 1;
        s.head_since = None;
        RequestGuard(self.clone())
    }

    /// When the connection is due to close and why; `None` while a request
    /// is handled (handlers have their own bounds).
    fn deadline(&self, limits: Limits) -> Option<(Instant, &'static str)> {
        let s = self.state.lock().unwrap();
        if s.in_flight > 0 {
            None
        } else if let Some(since) = s.head_since {
            Some((since + limits.header_timeout, "header timeout"))
        } else {
            Some((s.last_active + limits.idle_timeout, "idle timeout"))
        }
    }
}

/// Counts one request in flight until dropped.
struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        s.in_flight -= 1;
        s.last_active = Instant::now();
    }
}

/// An answer's body that holds its request's [`RequestGuard`] until it is
/// dropped (hyper drops it once sent, or when the client goes).
struct Counted {
    body: axum::body::Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Counted {
    type Data = hyper::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Resolves (with the reason) when the connection has outstayed a timeout.
async fn watchdog(activity: &Activity, limits: Limits) -> &'static str {
    let recheck = limits.header_timeout.min(limits.idle_timeout);
    loop {
        match activity.deadline(limits) {
            Some((at, reason)) if at <= Instant::now() => return reason,
            Some((at, _)) => tokio::time::sleep_until(at).await,
            None => tokio::time::sleep(recheck).await,
        }
    }
}

/// The TCP stream, telling [`Activity`] of its traffic.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let poll = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write(cx, buf);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        poll
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let poll = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        if matches!(poll, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.wrote();
        }
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// Raises the soft limit of open files to the hard limit, so that
/// `max_connections` sockets fit next to the store's and the VMs' files.
fn raise_fd_limit(max_connections: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_err() {
        tracing::warn!(soft, hard, "cannot raise the open-file limit");
    }
    let limit = getrlimit(Resource::RLIMIT_NOFILE).map_or(soft, |(s, _)| s);
    // Headroom for the store, logs and the drivers' files.
    if (limit as usize) < max_connections + 256 {
        tracing::warn!(
            limit,
            max_connections,
            "the open-file limit is below --max-connections plus headroom: accepts may fail"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_closes_after_the_header_timeout() {
        let activity = Activity::new();
        let start = Instant::now();
        assert_eq!(watchdog(&activity, limits()).await, "header timeout");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn after_an_answer_the_idle_timeout_applies_until_a_byte_arrives() {
        let activity = Arc::new(Activity::new());
        let guard = activity.request_started();
        // A request in flight has no deadline.
        assert!(activity.deadline(limits()).is_none());
        tokio::time::advance(Duration::from_secs(100)).await;
        drop(guard);
        let start = Instant::now();
        let (at, reason) = activity.deadline(limits()).unwrap();
        assert_eq!(
            (at - start, reason),
            (Duration::from_secs(60), "idle timeout")
        );
        tokio::time::advance(Duration::from_secs(5)).await;
        activity.read();
        let (at, reason) = activity.deadline(limits()).unwrap();
        assert_eq!(
            (at - start, reason),
            (Duration::from_secs(15), "header timeout")
        );
        assert_eq!(watchdog(&activity, limits()).await, "header timeout");
        assert_eq!(start.elapsed(), Duration::from_secs(15));
    }

    /// A streamed answer (the event stream) keeps its request in flight
    /// while its body is sent, so neither timeout cuts it, even as the
    /// client's frames arrive (HTTP/2 window updates and pings); the idle
    /// timeout starts when the body is done.
    #[tokio::test(start_paused = true)]
    async fn a_streamed_answer_is_in_flight_until_its_body_ends() {
        use http_body_util::BodyExt;
        let activity = Arc::new(Activity::new());
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<hyper::body::Bytes, io::Error>>(1);
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        let mut body = Counted {
            body: axum::body::Body::from_stream(stream),
            _guard: activity.request_started(),
        };
        tokio::time::advance(Duration::from_secs(120)).await;
        activity.read();
        assert!(activity.deadline(limits()).is_none());
        tx.send(Ok(hyper::body::Bytes::from_static(b": \n\n")))
            .await
            .unwrap();
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.into_data().unwrap(), &b": \n\n"[..]);
        assert!(activity.deadline(limits()).is_none());
        drop(tx);
        assert!(body.frame().await.is_none());
        drop(body);
        let (_, reason) = activity.deadline(limits()).unwrap();
        assert_eq!(reason, "idle timeout");
    }
}
