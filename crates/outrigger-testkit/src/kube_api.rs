//! A small stand-in for the Kubernetes API server, for the tests of the cluster policy watch
//! (no API server can run on the test machines). It serves namespaced custom resources the
//! way the API server does for list and watch:
//!
//! - `GET /apis/{group}/{version}/namespaces/{ns}/{plural}`: a list with the current
//!   `metadata.resourceVersion`;
//! - `…?watch=true&resourceVersion=N&allowWatchBookmarks=true`: newline-delimited JSON events
//!   (`ADDED`, `MODIFIED`, `DELETED`, `BOOKMARK`) after `N`, over a chunked response that stays
//!   open; a `resourceVersion` older than the compacted history gets `200` with one `ERROR`
//!   event holding a `Status` with code 410 (`Expired`), as the API server answers;
//! - bearer-token authentication (`401` with a `Status` otherwise), over plain HTTP or TLS.
//!
//! The test drives it: [`FakeKubeApi::apply`] and [`FakeKubeApi::delete`] change objects (one
//! global resourceVersion counter, as etcd's), [`FakeKubeApi::expire_watches`] compacts the
//! history and sends 410 on every open watch, [`FakeKubeApi::drop_watches`] cuts the open
//! watch connections, [`FakeKubeApi::bookmark`] sends bookmarks, [`FakeKubeApi::stop`] and
//! [`FakeKubeApi::restart`] take the whole server away and back on the same port.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

type Body = BoxBody<Bytes, Infallible>;

/// (namespace, plural, name).
type Key = (String, String, String);

#[derive(Clone, Debug)]
enum Signal {
    /// A watch event for (namespace, plural): the JSON line.
    Event(String, String, String),
    /// A bookmark at this resourceVersion (the current one when it was sent).
    Bookmark(u64),
    /// 410: the history is compacted; every open watch gets an ERROR event and ends.
    Expire,
    /// Every open watch connection is cut.
    Drop,
}

struct State {
    rv: u64,
    objects: BTreeMap<Key, Value>,
    /// (resourceVersion, namespace, plural, event line) for watches that resume.
    history: Vec<(u64, String, String, String)>,
    /// A watch from a resourceVersion below this gets 410.
    compacted: u64,
    requests: Vec<String>,
}

struct Inner {
    state: Mutex<State>,
    signals: broadcast::Sender<Signal>,
    token: Option<String>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
}

/// The fake API server. Stops when dropped.
pub struct FakeKubeApi {
    inner: Arc<Inner>,
    addr: SocketAddr,
}

/// The plural of one of Istio's security kinds.
pub fn plural(kind: &str) -> String {
    let lower = kind.to_ascii_lowercase();
    match lower.strip_suffix('y') {
        Some(stem) => format!("{stem}ies"),
        None => format!("{lower}s"),
    }
}

impl FakeKubeApi {
    /// Plain HTTP on 127.0.0.1 (any port); requests need `Bearer <token>` when `token` is set.
    pub async fn start(token: Option<&str>) -> FakeKubeApi {
        Self::start_with(token, None).await
    }

    /// Over TLS with the given server certificate chain and key (PEM).
    pub async fn start_tls(token: Option<&str>, chain_pem: &str, key_pem: &str) -> FakeKubeApi {
        use rustls_pki_types::pem::PemObject;
        let chain: Vec<rustls_pki_types::CertificateDer<'static>> =
            rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
                .collect::<Result<_, _>>()
                .expect("server chain");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let cfg = rustls::ServerConfig::builder_with_provider(outrigger_tls::crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        Self::start_with(token, Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start_with(
        token: Option<&str>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> FakeKubeApi {
        let (signals, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                rv: 100,
                objects: BTreeMap::new(),
                history: Vec::new(),
                compacted: 0,
                requests: Vec::new(),
            }),
            signals,
            token: token.map(str::to_string),
            tls,
            tasks: Mutex::new(Vec::new()),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().unwrap();
        let api = FakeKubeApi { inner, addr };
        api.serve(listener);
        api
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…`.
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{}", self.addr)
    }

    fn serve(&self, listener: TcpListener) {
        let inner = self.inner.clone();
        let accept = tokio::spawn({
            let inner = inner.clone();
            async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        continue;
                    };
                    let inner2 = inner.clone();
                    let conn = tokio::spawn(async move {
                        let tls = inner2.tls.clone();
                        let svc = service_fn(move |req| {
                            let inner = inner2.clone();
                            async move { Ok::<_, Infallible>(handle(&inner, req).await) }
                        });
                        let http = hyper::server::conn::http1::Builder::new();
                        match tls {
                            Some(acceptor) => {
                                if let Ok(tls) = acceptor.accept(tcp).await {
                                    let _ = http.serve_connection(TokioIo::new(tls), svc).await;
                                }
                            }
                            None => {
                                let _ = http.serve_connection(TokioIo::new(tcp), svc).await;
                            }
                        }
                    });
                    inner.tasks.lock().unwrap().push(conn.abort_handle());
                }
            }
        });
        inner.tasks.lock().unwrap().push(accept.abort_handle());
    }

    /// Takes the server away: the port is closed and every connection cut.
    pub fn stop(&self) {
        for t in self.inner.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// Serves again on the same port, with the same objects and history.
    pub async fn restart(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) => {
                    tries += 1;
                    assert!(tries < 100, "cannot rebind {}: {e}", self.addr);
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        };
        self.serve(listener);
    }

    /// Creates or replaces an object (ADDED or MODIFIED). `resourceVersion`, `uid`,
    /// `creationTimestamp` are set as the API server sets them. Returns its resourceVersion.
    pub fn apply(&self, mut obj: Value) -> u64 {
        let ns = obj["metadata"]["namespace"].as_str().unwrap().to_string();
        let name = obj["metadata"]["name"].as_str().unwrap().to_string();
        let kind = obj["kind"].as_str().unwrap().to_string();
        let plural = plural(&kind);
        let mut st = self.inner.state.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let key = (ns.clone(), plural.clone(), name.clone());
        let existing = st.objects.get(&key).cloned();
        let meta = obj["metadata"].as_object_mut().unwrap();
        meta.insert("resourceVersion".into(), rv.to_string().into());
        match &existing {
            Some(old) => {
                meta.insert("uid".into(), old["metadata"]["uid"].clone());
                meta.insert(
                    "creationTimestamp".into(),
                    old["metadata"]["creationTimestamp"].clone(),
                );
                let generation = old["metadata"]["generation"].as_u64().unwrap_or(1) + 1;
                meta.insert("generation".into(), generation.into());
            }
            None => {
                meta.insert("uid".into(), format!("uid-{ns}-{name}-{rv}").into());
                meta.entry("creationTimestamp")
                    .or_insert_with(|| "2024-05-01T10:00:00Z".into());
                meta.insert("generation".into(), 1.into());
            }
        }
        meta.insert(
            "managedFields".into(),
            json!([{"manager": "kubectl", "operation": "Update", "time": "2024-05-01T10:00:00Z"}]),
        );
        let ty = if existing.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, obj.clone());
        let line = json!({"type": ty, "object": obj}).to_string();
        st.history
            .push((rv, ns.clone(), plural.clone(), line.clone()));
        let _ = self.inner.signals.send(Signal::Event(ns, plural, line));
        rv
    }

    /// Deletes an object (DELETED, with the object at a new resourceVersion).
    pub fn delete(&self, ns: &str, kind: &str, name: &str) {
        let plural = plural(kind);
        let mut st = self.inner.state.lock().unwrap();
        let key = (ns.to_string(), plural.clone(), name.to_string());
        let Some(mut obj) = st.objects.remove(&key) else {
            panic!("no {kind} {ns}/{name} to delete");
        };
        st.rv += 1;
        let rv = st.rv;
        obj["metadata"]["resourceVersion"] = rv.to_string().into();
        let line = json!({"type": "DELETED", "object": obj}).to_string();
        st.history
            .push((rv, ns.to_string(), plural.clone(), line.clone()));
        let _ = self
            .inner
            .signals
            .send(Signal::Event(ns.to_string(), plural, line));
    }

    /// Compacts the history (every resourceVersion so far becomes too old) and ends every open
    /// watch with an ERROR event `410 Gone`: watchers must list again.
    pub fn expire_watches(&self) {
        let mut st = self.inner.state.lock().unwrap();
        st.rv += 1;
        st.compacted = st.rv;
        st.history.clear();
        let _ = self.inner.signals.send(Signal::Expire);
    }

    /// Cuts every open watch connection (without an error event).
    pub fn drop_watches(&self) {
        let _ = self.inner.signals.send(Signal::Drop);
    }

    /// Sends a BOOKMARK with the current resourceVersion (returned) on every open watch that asked for
    /// bookmarks.
    pub fn bookmark(&self) -> u64 {
        let rv = self.inner.state.lock().unwrap().rv;
        let _ = self.inner.signals.send(Signal::Bookmark(rv));
        rv
    }

    /// The requests served so far (`METHOD path?query`), oldest first.
    pub fn requests(&self) -> Vec<String> {
        self.inner.state.lock().unwrap().requests.clone()
    }

    /// How many watch requests have been made.
    pub fn watch_count(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.contains("watch=true") || r.contains("watch=1"))
            .count()
    }

    /// How many list requests have been made.
    pub fn list_count(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| !r.contains("watch=true") && !r.contains("watch=1"))
            .count()
    }
}

impl Drop for FakeKubeApi {
    fn drop(&mut self) {
        self.stop();
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code,
    })
}

fn reply(code: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())).boxed())
        .unwrap()
}

async fn handle(inner: &Arc<Inner>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_string();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (kv.to_string(), String::new()),
        })
        .collect();
    inner.state.lock().unwrap().requests.push(format!(
        "{} {}",
        req.method(),
        req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("")
    ));
    if let Some(token) = &inner.token {
        let want = format!("Bearer {token}");
        let got = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if got != Some(want.as_str()) {
            return reply(
                StatusCode::UNAUTHORIZED,
                status(401, "Unauthorized", "Unauthorized"),
            );
        }
    }
    // /apis/{group}/{version}/namespaces/{ns}/{plural}
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, ns, plural) = match parts.as_slice() {
        ["apis", g, v, "namespaces", ns, p] => (*g, *v, ns.to_string(), p.to_string()),
        _ => {
            return reply(
                StatusCode::NOT_FOUND,
                status(
                    404,
                    "NotFound",
                    "the server could not find the requested resource",
                ),
            );
        }
    };
    if group != "security.istio.io" || !matches!(version, "v1" | "v1beta1") {
        return reply(
            StatusCode::NOT_FOUND,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    let api_version = format!("{group}/{version}");
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    if !watch {
        let st = inner.state.lock().unwrap();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((n, p, _), _)| *n == ns && *p == plural)
            .map(|(_, v)| {
                let mut v = v.clone();
                v["apiVersion"] = api_version.clone().into();
                v
            })
            .collect();
        let kind = items
            .first()
            .and_then(|i| i["kind"].as_str().map(str::to_string))
            .unwrap_or_else(|| "List".into());
        return reply(
            StatusCode::OK,
            json!({
                "apiVersion": api_version,
                "kind": format!("{kind}List"),
                "metadata": {"resourceVersion": st.rv.to_string()},
                "items": items,
            }),
        );
    }
    let bookmarks = query.get("allowWatchBookmarks").map(String::as_str) == Some("true");
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading the history, under the lock: nothing falls in between.
    let (mut rx, backlog, expired) = {
        let st = inner.state.lock().unwrap();
        let rx = inner.signals.subscribe();
        let expired = from < st.compacted;
        let backlog: Vec<String> = st
            .history
            .iter()
            .filter(|(rv, n, p, _)| *rv > from && *n == ns && *p == plural)
            .map(|(_, _, _, l)| l.clone())
            .collect();
        (rx, backlog, expired)
    };
    let (tx, body_rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let kind_guess = {
        let st = inner.state.lock().unwrap();
        st.objects
            .iter()
            .find(|((n, p, _), _)| *n == ns && *p == plural)
            .and_then(|(_, v)| v["kind"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let task = tokio::spawn(async move {
        let gone = |from: u64| {
            let line = json!({"type": "ERROR", "object": status(410, "Expired",
                &format!("too old resource version: {from}"))});
            Bytes::from(format!("{line}\n"))
        };
        if expired {
            let _ = tx.send(gone(from)).await;
            return;
        }
        for l in backlog {
            if tx.send(Bytes::from(format!("{l}\n"))).await.is_err() {
                return;
            }
        }
        loop {
            let sig = match rx.recv().await {
                Ok(s) => s,
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(gone(from)).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let line = match sig {
                Signal::Event(n, p, l) if n == ns && p == plural => l,
                Signal::Event(..) => continue,
                Signal::Bookmark(rv) if bookmarks => json!({"type": "BOOKMARK", "object": {
                    "apiVersion": api_version, "kind": kind_guess,
                    "metadata": {"resourceVersion": rv.to_string()},
                }})
                .to_string(),
                Signal::Bookmark(_) => continue,
                Signal::Expire => {
                    let _ = tx.send(gone(from)).await;
                    return;
                }
                Signal::Drop => return,
            };
            if tx.send(Bytes::from(format!("{line}\n"))).await.is_err() {
                return;
            }
        }
    });
    inner.tasks.lock().unwrap().push(task.abort_handle());
    let stream = futures_util::stream::unfold(body_rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}
