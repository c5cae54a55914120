//! The idle connections one upstream endpoint keeps (HTTP/1.1 connections waiting for a
//! request, one shared HTTP/2 connection), and the request body type they carry. A leaf of
//! `outbound`: `endpoints` holds one per endpoint, `pool` fills and drains it.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client1, http2 as client2};

use crate::metrics::Lv;

/// The body sent upstream: the application's (counted), or one of Outrigger's own (empty when
/// a request without a body is replayed; an external authorizer's check).
pub(crate) type UpBody =
    http_body_util::Either<crate::http_common::Metered<Incoming>, http_body_util::Full<Bytes>>;

/// An HTTP/1.1 connection waiting for its next request.
pub(super) struct IdleH1 {
    pub(super) tx: client1::SendRequest<UpBody>,
    pub(super) peer: Lv,
    pub(super) uses: u32,
    pub(super) idle_since: Instant,
}

/// The endpoint's HTTP/2 connection, shared by concurrent requests.
#[derive(Clone)]
pub(super) struct H2Conn {
    pub(super) tx: client2::SendRequest<UpBody>,
    pub(super) peer: Lv,
    pub(super) uses: Arc<AtomicU32>,
}

/// The pooled connections of one endpoint.
#[derive(Default)]
pub(crate) struct EndpointPool {
    pub(super) h1: Mutex<Vec<IdleH1>>,
    pub(super) h2: Mutex<Option<H2Conn>>,
    /// Serializes HTTP/2 connection establishment, so that a burst of concurrent requests
    /// shares one new connection instead of opening one each.
    pub(super) h2_connecting: tokio::sync::Mutex<()>,
}

impl EndpointPool {
    /// Drops every pooled connection (the endpoint was ejected).
    pub fn clear(&self) {
        self.h1.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}
