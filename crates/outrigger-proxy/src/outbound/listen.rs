//! Serving the outbound listeners: one task per listener, handing each accepted connection to
//! HTTP or TCP origination. Apart from the rest of `outbound` because it needs the shared
//! context (`ctx`), which holds the run-time destinations this module's parent defines.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use super::{Bound, DestTransport, OutboundProtocol, endpoints, http_origin, tcp_origin};
use crate::accept;
use crate::ctx::Ctx;

/// Spawns the listeners and the DNS refresh tasks. Every task ends on drain.
pub(crate) fn spawn(bound: Bound, ctx: &Arc<Ctx>, tasks: &mut tokio::task::JoinSet<()>) {
    for dest in &bound.destinations {
        if dest.endpoints.has_dns() {
            tasks.spawn(endpoints::refresh_loop(dest.clone(), ctx.drain.clone()));
        }
    }
    for (dest, l) in bound.listeners {
        tracing::info!(
            listener = %dest.cfg.name,
            listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            destination = %dest.authority,
            protocol = dest.cfg.protocol.as_str(),
            transport = match dest.transport {
                DestTransport::Mtls => "mtls",
                DestTransport::Hbone { .. } => "hbone",
            },
            sni = %dest.cfg.sni(),
            "outbound listener ready"
        );
        let name = dest.cfg.name.clone();
        match dest.cfg.protocol {
            OutboundProtocol::Tcp => {
                tasks.spawn(serve_listener(l, ctx.clone(), name, move |s, src, ctx| {
                    tcp_origin::serve(s, src, dest.clone(), ctx)
                }));
            }
            OutboundProtocol::Http | OutboundProtocol::Http2 => {
                let route = http_origin::Route::Fixed(dest);
                tasks.spawn(serve_listener(l, ctx.clone(), name, move |s, src, ctx| {
                    http_origin::serve(s, src, route.clone(), ctx)
                }));
            }
        }
    }
    if let Some((routes, l)) = bound.proxy {
        tracing::info!(
            listen = %l.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            destinations = routes.len(),
            "outbound HTTP proxy ready"
        );
        let route = http_origin::Route::Proxy(routes);
        let name = "http-proxy".to_string();
        tasks.spawn(serve_listener(l, ctx.clone(), name, move |s, src, ctx| {
            http_origin::serve(s, src, route.clone(), ctx)
        }));
    }
}

async fn serve_listener<F, Fut>(listener: TcpListener, ctx: Arc<Ctx>, name: String, handle: F)
where
    F: Fn(tokio::net::TcpStream, SocketAddr, Arc<Ctx>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    accept::until_drained(&listener, &ctx, &name, |stream, src| {
        let _ = stream.set_nodelay(true);
        tokio::spawn(handle(stream, src, ctx.clone()));
    })
    .await;
}
