//! The connections to the application: one pool per backend address, shared by every inbound
//! connection (direct mTLS and HBONE alike), as Envoy's inbound cluster pools its upstream
//! connections across downstream ones. A new mTLS connection therefore costs no new backend
//! connection, and the HTTP/2 streams of one caller no longer queue behind each other on one
//! HTTP/1.1 backend connection.
//!
//! - HTTP/1.1: a connection carries one request at a time. It is lent to a request
//!   ([`Lease`]) and given back once the response has been read to its end and the connection
//!   is ready for the next request; a response dropped half-way closes it. Idle connections
//!   are a stack (the most recently used first, so the fewest stay warm), at most
//!   [`MAX_IDLE`], each closed after [`IDLE_TIMEOUT`] unused.
//! - HTTP/2: requests share a connection, at most [`H2_STREAMS_PER_CONN`] at once; more open
//!   another connection.
//! - At most `connections.max` connections to the applications are open in all (the descriptor
//!   budget reserves one per downstream connection): past it the oldest idle connection is
//!   closed to make room, or the request waits up to the connect timeout and is refused `503`
//!   `UO`, as Envoy's circuit breaker refuses it.
//! - No lock is held across a connect: concurrent HTTP/1.1 requests dial their own
//!   connections, and only the opening of an HTTP/2 connection is serialized (so that a burst
//!   of first requests opens one, not one each).
//!
//! A request that never left because its pooled connection had just been closed by the
//! application is sent again once, on a new connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::http_common::{Metered, Prefixed};
use crate::refusal::Refusal;

/// A request body on its way to the application.
pub(crate) type ReqBody = Metered<Prefixed<Incoming>>;

/// How long an unused connection to the application stays open: the upstream idle timeout
/// Envoy and Istio default to (`HttpProtocolOptions.idle_timeout`, and DestinationRule
/// `connectionPool.http.idleTimeout`: "Default 1 hour"). An application that closes idle
/// connections sooner (IIS after 2 min, Node.js after 5 s) closes them first; the pool drops a
/// closed connection when it next looks at it.
pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

/// At most this many idle HTTP/1.1 connections are kept per backend; a connection given back
/// when the stack is full is closed. Envoy's default circuit breaker caps connections per
/// cluster at 1024 (`max_connections`).
pub(crate) const MAX_IDLE: usize = 1024;

/// Streams per HTTP/2 connection before another is opened: RFC 9113 §6.5.2 recommends that
/// `SETTINGS_MAX_CONCURRENT_STREAMS` "be no smaller than 100", so an application honouring it
/// never makes a stream wait; the streams of a busier caller are spread over more connections.
pub(crate) const H2_STREAMS_PER_CONN: usize = 100;

#[derive(Debug, thiserror::Error)]
pub(crate) enum BackendError {
    #[error("cannot connect to backend {0}: {1}")]
    Connect(SocketAddr, std::io::Error),
    #[error("connect to backend {0} timed out")]
    ConnectTimeout(SocketAddr),
    #[error("backend {0}: {1}")]
    Http(SocketAddr, hyper::Error),
    #[error("backend {0}: every connection the descriptor budget allows (connections.max) is busy")]
    Overflow(SocketAddr),
}

impl BackendError {
    /// How the caller is answered.
    pub(crate) fn refusal(&self) -> Refusal {
        match self {
            BackendError::Overflow(_) => Refusal::UpstreamOverflow,
            _ => Refusal::Upstream,
        }
    }
}

/// Every backend's pool, built once from the inbound listeners.
pub(crate) struct Backends {
    pools: HashMap<SocketAddr, Arc<Pool<ReqBody>>>,
    connect_timeout: Duration,
    budget: Arc<Budget>,
}

impl Backends {
    /// `max_conns`: how many connections to the applications may be open at once, in all —
    /// `connections.max`, the budget that reserves one descriptor per downstream connection for
    /// its backend connection (docs/config.md "Resource limits").
    pub(crate) fn new(
        addrs: impl IntoIterator<Item = SocketAddr>,
        connect_timeout: Duration,
        max_conns: usize,
    ) -> Self {
        let budget = Budget::new(max_conns);
        let pools = addrs
            .into_iter()
            .map(|a| (a, budget.pool(a, connect_timeout, IDLE_TIMEOUT)))
            .collect();
        Backends {
            pools,
            connect_timeout,
            budget,
        }
    }

    /// The pool of `addr`. Every listener's backend has one; any other address (none today)
    /// gets a pool of its own that lives as long as the caller keeps it.
    pub(crate) fn pool(&self, addr: SocketAddr) -> Arc<Pool<ReqBody>> {
        match self.pools.get(&addr) {
            Some(p) => p.clone(),
            None => self.budget.pool(addr, self.connect_timeout, IDLE_TIMEOUT),
        }
    }
}

/// How many connections to the applications may be open at once, shared by every pool: one
/// permit per open connection, held by the connection's task.
pub(crate) struct Budget {
    permits: Arc<Semaphore>,
    /// Every pool, to close an idle connection of any of them when the budget is spent.
    pools: Mutex<Vec<Weak<dyn IdleConns>>>,
}

/// A pool's idle connections, seen from the budget.
trait IdleConns: Send + Sync {
    /// When the oldest idle connection was given back.
    fn oldest_idle(&self) -> Option<Instant>;
    /// Closes the oldest idle connection (its task ends and gives its permit back).
    fn close_oldest_idle(&self);
}

impl Budget {
    pub(crate) fn new(max_conns: usize) -> Arc<Self> {
        Arc::new(Budget {
            permits: Arc::new(Semaphore::new(max_conns.clamp(1, Semaphore::MAX_PERMITS))),
            pools: Mutex::default(),
        })
    }

    /// A pool drawing on this budget.
    pub(crate) fn pool<B: PoolBody>(
        self: &Arc<Self>,
        addr: SocketAddr,
        connect_timeout: Duration,
        idle_timeout: Duration,
    ) -> Arc<Pool<B>> {
        let pool = Arc::new(Pool {
            addr,
            connect_timeout,
            idle_timeout,
            idle: Mutex::default(),
            h2: Mutex::default(),
            h2_dial: tokio::sync::Mutex::new(()),
            budget: self.clone(),
        });
        let weak: Weak<dyn IdleConns> = Arc::downgrade(&pool) as Weak<dyn IdleConns>;
        let mut pools = locked(&self.pools);
        pools.retain(|p| p.strong_count() > 0);
        pools.push(weak);
        pool
    }

    /// A permit for a new connection. When every one is taken, the oldest idle connection of
    /// any pool is closed to make room, then this waits for a permit until `deadline`.
    async fn acquire(&self, deadline: Duration) -> Option<OwnedSemaphorePermit> {
        if let Ok(p) = self.permits.clone().try_acquire_owned() {
            return Some(p);
        }
        let pools: Vec<_> = locked(&self.pools)
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        if let Some(p) = pools
            .iter()
            .filter_map(|p| Some((p.oldest_idle()?, p)))
            .min_by_key(|(since, _)| *since)
            .map(|(_, p)| p)
        {
            p.close_oldest_idle();
        }
        drop(pools);
        let wait = self.permits.clone().acquire_owned();
        tokio::time::timeout(deadline, wait).await.ok()?.ok()
    }
}

/// The pooled connections to one backend address, for request bodies of type `B`.
pub(crate) struct Pool<B = ReqBody> {
    addr: SocketAddr,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Idle<B>>,
    h2: Mutex<Vec<H2Conn<B>>>,
    /// Held while an HTTP/2 connection is being opened.
    h2_dial: tokio::sync::Mutex<()>,
    /// Shared by every pool: how many connections may be open.
    budget: Arc<Budget>,
}

struct Idle<B> {
    /// Oldest first; taken from the end.
    conns: Vec<(client1::SendRequest<B>, Instant)>,
    /// A task is closing expired connections.
    sweeping: bool,
}

impl<B> Default for Idle<B> {
    fn default() -> Self {
        Idle {
            conns: Vec::new(),
            sweeping: false,
        }
    }
}

struct H2Conn<B> {
    tx: client2::SendRequest<B>,
    streams: Arc<AtomicUsize>,
}

/// What a response from the application holds on to until it has been read: its HTTP/1.1
/// connection (given back by [`Lease::finish`], closed if dropped), or its place among an
/// HTTP/2 connection's streams.
pub(crate) enum Lease<B = ReqBody> {
    H1 {
        pool: Arc<Pool<B>>,
        tx: client1::SendRequest<B>,
    },
    /// Dropped with the lease: the stream no longer counts against its connection.
    H2(#[allow(dead_code)] StreamSlot),
}

/// One stream counted against its HTTP/2 connection until dropped.
pub(crate) struct StreamSlot(Arc<AtomicUsize>);

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<B: PoolBody> Lease<B> {
    /// The response was read to its end: the connection may carry the next request.
    pub(crate) fn finish(self) {
        if let Lease::H1 { pool, tx } = self {
            pool.give_back(tx);
        }
    }
}

fn closed_twice(addr: SocketAddr) -> BackendError {
    BackendError::Connect(
        addr,
        std::io::Error::other("backend connection closed twice in a row"),
    )
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a request body must be to travel over a pooled connection.
pub(crate) trait PoolBody:
    http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + Unpin
    + 'static
{
}

impl<B> PoolBody for B where
    B: http_body::Body<Data = bytes::Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + Unpin
        + 'static
{
}

impl<B: PoolBody> Pool<B> {
    /// Sends one request, over HTTP/2 when `h2`, and returns the response with what it holds.
    pub(crate) async fn send(
        self: &Arc<Self>,
        req: Request<B>,
        h2: bool,
    ) -> Result<(Response<Incoming>, Lease<B>), BackendError> {
        if h2 {
            self.send_h2(req).await
        } else {
            self.send_h1(req).await
        }
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<B>,
    ) -> Result<(Response<Incoming>, Lease<B>), BackendError> {
        // A second attempt dials afresh: when the application has restarted, every idle
        // connection is dead, and trying each would only fail again.
        for fresh in [false, true] {
            let mut tx = match (fresh, self.take_idle().await) {
                (false, Some(tx)) => tx,
                // Boxed: the dial's future is large and rarely needed, and would otherwise be
                // copied into every request's future.
                _ => Box::pin(self.dial_h1()).await?,
            };
            match tx.try_send_request(req).await {
                Ok(resp) => {
                    let lease = Lease::H1 {
                        pool: self.clone(),
                        tx,
                    };
                    return Ok((resp, lease));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    _ => return Err(BackendError::Http(self.addr, e.into_error())),
                },
            }
        }
        Err(closed_twice(self.addr))
    }

    async fn send_h2(
        self: &Arc<Self>,
        mut req: Request<B>,
    ) -> Result<(Response<Incoming>, Lease<B>), BackendError> {
        for fresh in [false, true] {
            let (mut tx, slot) = self.h2_stream(fresh).await?;
            if tx.ready().await.is_err() {
                continue;
            }
            match tx.try_send_request(req).await {
                Ok(resp) => return Ok((resp, Lease::H2(slot))),
                Err(mut e) => match e.take_message() {
                    Some(back) if !fresh => req = back,
                    _ => return Err(BackendError::Http(self.addr, e.into_error())),
                },
            }
        }
        Err(closed_twice(self.addr))
    }

    /// Sends a WebSocket upgrade request on a connection of its own: after a `101` the
    /// connection belongs to the tunnel, so it never joins the pool.
    pub(crate) async fn upgrade(
        &self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, BackendError> {
        let (stream, permit) = self.dial().await?;
        let (mut tx, conn) = client1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| BackendError::Http(self.addr, e))?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "backend WebSocket connection ended");
            }
        });
        tx.send_request(req)
            .await
            .map_err(|e| BackendError::Http(self.addr, e))
    }

    /// Opens a connection, with the permit its task holds for as long as it is open (the wait
    /// for a permit counts against the connect timeout too; none in time is an overflow).
    async fn dial(&self) -> Result<(TcpStream, OwnedSemaphorePermit), BackendError> {
        let permit = self
            .budget
            .acquire(self.connect_timeout)
            .await
            .ok_or(BackendError::Overflow(self.addr))?;
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| BackendError::ConnectTimeout(self.addr))?
            .map_err(|e| BackendError::Connect(self.addr, e))?;
        let _ = stream.set_nodelay(true);
        Ok((stream, permit))
    }

    async fn dial_h1(&self) -> Result<client1::SendRequest<B>, BackendError> {
        let (stream, permit) = self.dial().await?;
        let (tx, conn) = client1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| BackendError::Http(self.addr, e))?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend HTTP/1 connection ended");
            }
        });
        Ok(tx)
    }

    /// The most recently used idle connection that is still open, if any.
    async fn take_idle(&self) -> Option<client1::SendRequest<B>> {
        loop {
            let (mut tx, since) = locked(&self.idle).conns.pop()?;
            if since.elapsed() >= self.idle_timeout || tx.is_closed() {
                continue;
            }
            // Immediate for a connection given back ready; an error if the application closed
            // it since.
            if tx.ready().await.is_ok() {
                return Some(tx);
            }
        }
    }

    /// Takes back a connection whose response has ended. Until the connection is ready for
    /// another request (the request body may still be going out) a task waits for it, so
    /// the next request never waits on someone else's upload.
    fn give_back(self: &Arc<Self>, mut tx: client1::SendRequest<B>) {
        if tx.is_closed() {
            return;
        }
        if tx.is_ready() {
            self.push_idle(tx);
            return;
        }
        // Dropped while the runtime shuts down: nothing to keep it for.
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let pool = Arc::downgrade(self);
        rt.spawn(async move {
            if tx.ready().await.is_ok()
                && let Some(pool) = pool.upgrade()
            {
                pool.push_idle(tx);
            }
        });
    }

    fn push_idle(self: &Arc<Self>, tx: client1::SendRequest<B>) {
        let start_sweeper = {
            let mut idle = locked(&self.idle);
            if idle.conns.len() >= MAX_IDLE {
                return;
            }
            idle.conns.push((tx, Instant::now()));
            !std::mem::replace(&mut idle.sweeping, true)
        };
        if start_sweeper {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => drop(rt.spawn(sweep(Arc::downgrade(self)))),
                // No runtime (shutting down): nobody will sweep, so the next one given back
                // tries again.
                Err(_) => locked(&self.idle).sweeping = false,
            }
        }
    }

    /// An HTTP/2 connection with room for one more stream, and the stream's place on it.
    /// `fresh`: the last one failed, open another.
    async fn h2_stream(
        &self,
        fresh: bool,
    ) -> Result<(client2::SendRequest<B>, StreamSlot), BackendError> {
        if !fresh && let Some(found) = self.h2_with_room() {
            return Ok(found);
        }
        // Boxed, as the HTTP/1.1 dial: large, and rarely needed.
        Box::pin(self.open_h2(fresh)).await
    }

    /// Opens an HTTP/2 connection (unless another request opened one meanwhile).
    async fn open_h2(
        &self,
        fresh: bool,
    ) -> Result<(client2::SendRequest<B>, StreamSlot), BackendError> {
        let _dialing = self.h2_dial.lock().await;
        // Someone else may have opened one meanwhile.
        if !fresh && let Some(found) = self.h2_with_room() {
            return Ok(found);
        }
        let (stream, permit) = self.dial().await?;
        let (tx, conn) = client2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| BackendError::Http(self.addr, e))?;
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "backend HTTP/2 connection ended");
            }
        });
        let streams = Arc::new(AtomicUsize::new(1));
        locked(&self.h2).push(H2Conn {
            tx: tx.clone(),
            streams: streams.clone(),
        });
        Ok((tx, StreamSlot(streams)))
    }

    fn h2_with_room(&self) -> Option<(client2::SendRequest<B>, StreamSlot)> {
        let mut conns = locked(&self.h2);
        conns.retain(|c| !c.tx.is_closed());
        let c = conns
            .iter()
            .find(|c| c.streams.load(Ordering::Relaxed) < H2_STREAMS_PER_CONN)?;
        c.streams.fetch_add(1, Ordering::Relaxed);
        Some((c.tx.clone(), StreamSlot(c.streams.clone())))
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        locked(&self.idle).conns.len()
    }
}

impl<B: PoolBody> IdleConns for Pool<B> {
    fn oldest_idle(&self) -> Option<Instant> {
        locked(&self.idle).conns.first().map(|(_, since)| *since)
    }

    fn close_oldest_idle(&self) {
        let oldest = {
            let mut idle = locked(&self.idle);
            (!idle.conns.is_empty()).then(|| idle.conns.remove(0))
        };
        // Dropped outside the lock: the connection's task sees its sender gone and ends.
        drop(oldest);
    }
}

/// Closes the pool's idle connections as they expire; ends when none is left.
async fn sweep<B: PoolBody>(pool: Weak<Pool<B>>) {
    loop {
        let next = {
            let Some(pool) = pool.upgrade() else { return };
            let mut idle = locked(&pool.idle);
            let timeout = pool.idle_timeout;
            idle.conns
                .retain(|(tx, since)| since.elapsed() < timeout && !tx.is_closed());
            match idle.conns.first() {
                Some((_, oldest)) => *oldest + timeout,
                None => {
                    idle.sweeping = false;
                    return;
                }
            }
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http::StatusCode;
    use http_body_util::{BodyExt, Full};
    use hyper::server::conn::{http1 as server1, http2 as server2};
    use hyper::service::service_fn;
    use tokio::net::TcpListener;
    use tokio::sync::Notify;

    use super::*;

    type Body = Full<Bytes>;

    /// An application on 127.0.0.1 that counts its connections: `/` answers at once, `/wait`
    /// when the gate opens, `/big` 4 MiB, `/close` with `connection: close`.
    struct App {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        open: Arc<AtomicUsize>,
        waiting: Arc<AtomicUsize>,
        gate: Arc<Notify>,
    }

    async fn app(h2: bool) -> App {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = App {
            addr: listener.local_addr().unwrap(),
            accepted: Arc::default(),
            open: Arc::default(),
            waiting: Arc::default(),
            gate: Arc::new(Notify::new()),
        };
        let (accepted, open, waiting, gate) = (
            app.accepted.clone(),
            app.open.clone(),
            app.waiting.clone(),
            app.gate.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((s, _)) = listener.accept().await else {
                    return;
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                let (open, waiting, gate) = (open.clone(), waiting.clone(), gate.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let (waiting, gate) = (waiting.clone(), gate.clone());
                        async move {
                            let mut resp = Response::new(Body::new(Bytes::from_static(b"ok")));
                            match req.uri().path() {
                                "/wait" => {
                                    let opened = gate.notified();
                                    waiting.fetch_add(1, Ordering::SeqCst);
                                    opened.await;
                                }
                                "/big" => {
                                    *resp.body_mut() = Body::new(Bytes::from(vec![b'x'; 4 << 20]))
                                }
                                "/close" => {
                                    resp.headers_mut().insert(
                                        http::header::CONNECTION,
                                        http::HeaderValue::from_static("close"),
                                    );
                                }
                                _ => {}
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let io = TokioIo::new(s);
                    if h2 {
                        let _ = server2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = server1::Builder::new().serve_connection(io, svc).await;
                    }
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        app
    }

    fn pool(app: &App, idle_timeout: Duration) -> Arc<Pool<Body>> {
        limited_pool(app, idle_timeout, 1000, Duration::from_secs(5))
    }

    fn limited_pool(
        app: &App,
        idle_timeout: Duration,
        max: usize,
        connect_timeout: Duration,
    ) -> Arc<Pool<Body>> {
        Budget::new(max).pool(app.addr, connect_timeout, idle_timeout)
    }

    fn get(path: &str) -> Request<Body> {
        Request::get(path)
            .header(http::header::HOST, "app")
            .body(Body::default())
            .unwrap()
    }

    /// Waits (bounded) until `cond` holds.
    async fn until(what: &str, cond: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One request read to its end, its connection given back.
    async fn fetch(pool: &Arc<Pool<Body>>, path: &str, h2: bool) -> StatusCode {
        let (resp, lease) = pool.send(get(path), h2).await.unwrap();
        let status = resp.status();
        resp.into_body().collect().await.unwrap();
        lease.finish();
        status
    }

    #[tokio::test]
    async fn http1_connections_are_reused_by_later_requests() {
        let app = app(false).await;
        let pool = pool(&app, IDLE_TIMEOUT);
        for _ in 0..3 {
            assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        }
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle_count(), 1);
    }

    #[tokio::test]
    async fn concurrent_http1_requests_do_not_wait_for_each_other() {
        let app = app(false).await;
        let pool = pool(&app, IDLE_TIMEOUT);
        let slow = tokio::spawn({
            let pool = pool.clone();
            async move { fetch(&pool, "/wait", false).await }
        });
        until("the slow request to reach the app", || {
            app.waiting.load(Ordering::SeqCst) == 1
        })
        .await;
        // Answered while the first is still held: on a connection of its own.
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
        app.gate.notify_waiters();
        assert_eq!(slow.await.unwrap(), StatusCode::OK);
        until("both connections back in the pool", || {
            pool.idle_count() == 2
        })
        .await;
    }

    #[tokio::test]
    async fn a_response_dropped_half_way_closes_its_connection() {
        let app = app(false).await;
        let pool = pool(&app, IDLE_TIMEOUT);
        let (resp, lease) = pool.send(get("/big"), false).await.unwrap();
        let mut body = resp.into_body();
        body.frame().await.unwrap().unwrap();
        drop((body, lease));
        until("the app to see the connection closed", || {
            app.open.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(pool.idle_count(), 0);
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_connection_the_application_closes_is_not_reused() {
        let app = app(false).await;
        let pool = pool(&app, IDLE_TIMEOUT);
        assert_eq!(fetch(&pool, "/close", false).await, StatusCode::OK);
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn idle_connections_are_closed_when_they_expire() {
        let app = app(false).await;
        let pool = pool(&app, Duration::from_millis(100));
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        until("the idle connection to expire", || {
            pool.idle_count() == 0 && app.open.load(Ordering::SeqCst) == 0
        })
        .await;
        // The sweeper has ended; a later connection expires too.
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        until("the second idle connection to expire", || {
            pool.idle_count() == 0 && app.open.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn http2_streams_share_a_connection_until_it_is_full() {
        let app = app(true).await;
        let pool = pool(&app, IDLE_TIMEOUT);
        let n = H2_STREAMS_PER_CONN + 1;
        let held: Vec<_> = (0..n)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { fetch(&pool, "/wait", true).await })
            })
            .collect();
        until("every stream to reach the app", || {
            app.waiting.load(Ordering::SeqCst) == n
        })
        .await;
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
        app.gate.notify_waiters();
        for h in held {
            assert_eq!(h.await.unwrap(), StatusCode::OK);
        }
        // Every stream has ended: the next request finds room on an open connection.
        assert_eq!(fetch(&pool, "/", true).await, StatusCode::OK);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn past_the_connection_budget_a_request_overflows() {
        let app = app(false).await;
        let pool = limited_pool(&app, IDLE_TIMEOUT, 1, Duration::from_millis(200));
        let held = tokio::spawn({
            let pool = pool.clone();
            async move { fetch(&pool, "/wait", false).await }
        });
        until("the held request to reach the app", || {
            app.waiting.load(Ordering::SeqCst) == 1
        })
        .await;
        // The only connection the budget allows is busy: refused as Envoy's overflow, after
        // waiting up to the connect timeout.
        let err = pool.send(get("/"), false).await.err().expect("overflow");
        assert!(matches!(err, BackendError::Overflow(_)), "{err}");
        assert_eq!(err.refusal().flag(), "UO");
        app.gate.notify_waiters();
        assert_eq!(held.await.unwrap(), StatusCode::OK);
        assert_eq!(fetch(&pool, "/", false).await, StatusCode::OK);
        assert_eq!(app.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_spent_budget_closes_the_oldest_idle_connection_of_any_pool() {
        let (app1, app2) = (app(false).await, app(false).await);
        let budget = Budget::new(1);
        let timeout = Duration::from_secs(5);
        let pool1: Arc<Pool<Body>> = budget.pool(app1.addr, timeout, IDLE_TIMEOUT);
        let pool2: Arc<Pool<Body>> = budget.pool(app2.addr, timeout, IDLE_TIMEOUT);
        // The one permit is held by an idle connection to the first application...
        assert_eq!(fetch(&pool1, "/", false).await, StatusCode::OK);
        assert_eq!(pool1.idle_count(), 1);
        // ...which is closed so that the second application can be reached.
        assert_eq!(fetch(&pool2, "/", false).await, StatusCode::OK);
        assert_eq!(pool1.idle_count(), 0);
        until("the first application to see its connection closed", || {
            app1.open.load(Ordering::SeqCst) == 0
        })
        .await;
        assert_eq!(app2.accepted.load(Ordering::SeqCst), 1);
    }
}
