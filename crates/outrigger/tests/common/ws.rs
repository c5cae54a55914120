//! A WebSocket echo application (tokio-tungstenite) for the upgrade tests.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

/// What the application saw of each WebSocket handshake: the request target and the
/// `x-forwarded-client-cert` header.
pub type Handshakes = Arc<Mutex<Vec<(String, Option<String>)>>>;

/// Starts the echo application on 127.0.0.1 (ephemeral port): every text or binary message is
/// sent back.
pub async fn start_ws_echo() -> (SocketAddr, Handshakes) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen: Handshakes = Arc::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let seen = seen2.clone();
            tokio::spawn(async move {
                // tungstenite's callback signature returns its large error response by value.
                #[allow(clippy::result_large_err)]
                let cb = |req: &Request, resp: Response| {
                    let xfcc = req
                        .headers()
                        .get("x-forwarded-client-cert")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    seen.lock().unwrap().push((req.uri().to_string(), xfcc));
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                while let Some(Ok(m)) = ws.next().await {
                    if (m.is_text() || m.is_binary()) && ws.send(m).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, seen)
}
