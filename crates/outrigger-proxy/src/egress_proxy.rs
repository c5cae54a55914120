//! The agent's own HTTP(S) fetches (JWKS, OpenID discovery) through a corporate forward proxy,
//! configured the way every other tool on the host is: `HTTPS_PROXY`, `HTTP_PROXY` and
//! `NO_PROXY`. Windows networks typically reach Azure AD only through such a proxy.
//!
//! The rules are Go's (`golang.org/x/net/http/httpproxy`, which istiod and istio-agent use
//! through `http.ProxyFromEnvironment`):
//! * `HTTPS_PROXY` is used for `https://` URLs and `HTTP_PROXY` for `http://` URLs; the
//!   upper-case name wins over the lower-case one.
//! * A proxy value without a scheme means `http://`; only `http://` proxies are supported here
//!   (the tunnel is made with `CONNECT`; `socks5://` and `https://` proxies are refused at
//!   start with the variable's name).
//! * `NO_PROXY` is a comma-separated list of: `*` (no proxy at all), an IP address, a CIDR
//!   range, or a domain name that matches itself and its subdomains (`.corp.example` matches
//!   only the subdomains); an entry may carry `:port`.
//! * `localhost` and loopback addresses are never proxied.
//!
//! The environment is read by the binary and handed over as [`EgressProxy`]: the library reads
//! no environment variable itself.

use std::net::IpAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A forward proxy's address, from `http://[user:password@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAddr {
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization` value for `user:password@` in the URL (Basic).
    pub authorization: Option<String>,
}

/// One `NO_PROXY` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoProxyEntry {
    All,
    Ip(IpAddr, Option<u16>),
    Net(ipnet::IpNet),
    /// A domain, lower-case, without a leading dot; `subdomains_only` when written `.x`.
    Domain {
        name: String,
        subdomains_only: bool,
        port: Option<u16>,
    },
}

/// `HTTPS_PROXY` / `HTTP_PROXY` / `NO_PROXY`, parsed once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EgressProxy {
    pub https: Option<ProxyAddr>,
    pub http: Option<ProxyAddr>,
    no_proxy: Vec<NoProxyEntry>,
}

impl EgressProxy {
    /// Reads the variables through `get` (the binary passes `std::env::var`). An error names
    /// the variable and says what is wrong with it.
    pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<EgressProxy, String> {
        let var = |upper: &str| {
            [upper.to_string(), upper.to_ascii_lowercase()]
                .into_iter()
                .find_map(|n| get(&n).filter(|v| !v.trim().is_empty()).map(|v| (n, v)))
        };
        let proxy = |upper: &str| -> Result<Option<ProxyAddr>, String> {
            match var(upper) {
                None => Ok(None),
                Some((name, v)) => parse_proxy(v.trim())
                    .map(Some)
                    .map_err(|e| format!("{name}={v}: {e}")),
            }
        };
        let no_proxy = match var("NO_PROXY") {
            None => Vec::new(),
            Some((name, v)) => parse_no_proxy(&v).map_err(|e| format!("{name}={v}: {e}"))?,
        };
        Ok(EgressProxy {
            https: proxy("HTTPS_PROXY")?,
            http: proxy("HTTP_PROXY")?,
            no_proxy,
        })
    }

    /// The proxy to use for `host:port` over `https` or plain http, or `None` to go direct.
    pub fn for_target(&self, https: bool, host: &str, port: u16) -> Option<&ProxyAddr> {
        let proxy = if https { &self.https } else { &self.http }.as_ref()?;
        let host = host.trim_matches(['[', ']']).trim_end_matches('.');
        let host = host.to_ascii_lowercase();
        let ip = host.parse::<IpAddr>().ok();
        if host == "localhost" || ip.is_some_and(|ip| ip.is_loopback()) {
            return None;
        }
        let port_ok = |p: &Option<u16>| p.is_none_or(|p| p == port);
        let excluded = self.no_proxy.iter().any(|e| match e {
            NoProxyEntry::All => true,
            NoProxyEntry::Ip(a, p) => ip == Some(*a) && port_ok(p),
            NoProxyEntry::Net(n) => ip.is_some_and(|ip| n.contains(&ip)),
            NoProxyEntry::Domain {
                name,
                subdomains_only,
                port: p,
            } => {
                let sub = host.len() > name.len()
                    && host.ends_with(name.as_str())
                    && host.as_bytes()[host.len() - name.len() - 1] == b'.';
                port_ok(p) && (sub || (!subdomains_only && host == *name))
            }
        });
        (!excluded).then_some(proxy)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{s}` is not a port"))
}

fn parse_proxy(v: &str) -> Result<ProxyAddr, String> {
    let rest = match v.split_once("://") {
        None => v,
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("http") => rest,
        Some((scheme, _)) => {
            return Err(format!(
                "`{scheme}://` proxies are not supported (only http://, which tunnels HTTPS with CONNECT)"
            ));
        }
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (host, port) = split_host_port(hostport)?;
    if host.is_empty() {
        return Err("no host".into());
    }
    let authorization = userinfo.map(|u| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(percent_decode(u))
        )
    });
    Ok(ProxyAddr {
        host: host.to_string(),
        port: port.unwrap_or(80),
        authorization,
    })
}

/// `host`, `host:port`, `[v6]`, `[v6]:port`.
fn split_host_port(s: &str) -> Result<(&str, Option<u16>), String> {
    if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("`{s}`: unclosed `[`"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((h, Some(parse_port(p)?))),
            None if after.is_empty() => Ok((h, None)),
            None => Err(format!("`{s}`: unexpected `{after}`")),
        };
    }
    match s.rsplit_once(':') {
        // A bare IPv6 address has several colons and no port.
        Some((h, _)) if h.contains(':') => Ok((s, None)),
        Some((h, p)) => Ok((h, Some(parse_port(p)?))),
        None => Ok((s, None)),
    }
}

fn percent_decode(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

fn parse_no_proxy(v: &str) -> Result<Vec<NoProxyEntry>, String> {
    let mut out = Vec::new();
    for e in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        if e == "*" {
            out.push(NoProxyEntry::All);
            continue;
        }
        if e.contains('/') {
            let net: ipnet::IpNet = e
                .parse()
                .map_err(|_| format!("`{e}` is not a CIDR range"))?;
            out.push(NoProxyEntry::Net(net));
            continue;
        }
        let (host, port) = split_host_port(e)?;
        if let Ok(ip) = host.parse::<IpAddr>() {
            out.push(NoProxyEntry::Ip(ip, port));
            continue;
        }
        // Go also accepts `*.corp.example`, meaning the same as `.corp.example`.
        let host = host.strip_prefix('*').unwrap_or(host);
        let subdomains_only = host.starts_with('.');
        let name = host.trim_start_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            return Err(format!("`{e}` names no host"));
        }
        out.push(NoProxyEntry::Domain {
            name,
            subdomains_only,
            port,
        });
    }
    Ok(out)
}

/// The largest proxy response head read before the tunnel is up.
const MAX_CONNECT_RESPONSE: usize = 8 * 1024;

/// Opens a `CONNECT host:port` tunnel through `proxy` (RFC 9110 §9.3.6); once the proxy has
/// answered 2xx, the stream carries the bytes to and from `host:port`.
pub async fn connect_tunnel(proxy: &ProxyAddr, host: &str, port: u16) -> Result<TcpStream, String> {
    let mut s = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| format!("proxy {}:{}: connect: {e}", proxy.host, proxy.port))?;
    let target = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(a) = &proxy.authorization {
        req += &format!("Proxy-Authorization: {a}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| format!("proxy {}:{}: {e}", proxy.host, proxy.port))?;
    // Read the response head byte by byte up to the blank line: anything after it belongs to
    // the tunnel (the TLS server's first bytes), so nothing may be read past it.
    let mut head = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_CONNECT_RESPONSE {
            return Err(format!(
                "proxy {}:{}: response head over {MAX_CONNECT_RESPONSE} bytes",
                proxy.host, proxy.port
            ));
        }
        let n = s
            .read(&mut byte)
            .await
            .map_err(|e| format!("proxy {}:{}: {e}", proxy.host, proxy.port))?;
        if n == 0 {
            return Err(format!(
                "proxy {}:{}: closed the connection before answering CONNECT",
                proxy.host, proxy.port
            ));
        }
        head.push(byte[0]);
    }
    let status_line = head
        .split(|b| *b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim().to_string())
        .unwrap_or_default();
    let code = status_line.split_whitespace().nth(1).unwrap_or("");
    if !code.starts_with('2') || code.len() != 3 {
        return Err(format!(
            "proxy {}:{} refused CONNECT {target}: {status_line}",
            proxy.host, proxy.port
        ));
    }
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| pairs.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    #[test]
    fn variables_and_precedence() {
        let p = EgressProxy::from_env(env(&[
            ("HTTPS_PROXY", "http://proxy.corp:3128"),
            ("https_proxy", "http://other:1"),
            ("http_proxy", "plain.corp"),
        ]))
        .unwrap();
        assert_eq!(p.https.as_ref().unwrap().host, "proxy.corp");
        assert_eq!(p.https.as_ref().unwrap().port, 3128);
        // No scheme means http://, and port 80 when none is given (Go's httpproxy).
        assert_eq!(
            p.http,
            Some(ProxyAddr {
                host: "plain.corp".into(),
                port: 80,
                authorization: None
            })
        );
        let p = EgressProxy::from_env(env(&[("HTTPS_PROXY", "http://u%40x:p%3Aw@[::1]:8080/")]))
            .unwrap();
        let a = p.https.unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 8080));
        // base64("u@x:p:w")
        assert_eq!(a.authorization.as_deref(), Some("Basic dUB4OnA6dw=="));
        assert_eq!(
            EgressProxy::from_env(env(&[])).unwrap(),
            EgressProxy::default()
        );
    }

    #[test]
    fn bad_values_name_the_variable() {
        let e = EgressProxy::from_env(env(&[("https_proxy", "socks5://p:1080")])).unwrap_err();
        assert!(
            e.starts_with("https_proxy=socks5://p:1080: `socks5://`"),
            "{e}"
        );
        let e = EgressProxy::from_env(env(&[("HTTPS_PROXY", "http://p:99999")])).unwrap_err();
        assert!(e.contains("`99999` is not a port"), "{e}");
        let e = EgressProxy::from_env(env(&[("NO_PROXY", "10.0.0.0/40")])).unwrap_err();
        assert!(e.contains("NO_PROXY=10.0.0.0/40"), "{e}");
    }

    /// NO_PROXY as golang.org/x/net/http/httpproxy's TestUseProxy cases read it.
    #[test]
    fn no_proxy_matching() {
        let p = EgressProxy::from_env(env(&[
            ("HTTPS_PROXY", "proxy:3128"),
            (
                "NO_PROXY",
                "corp.example, .internal, 10.0.0.0/8, 192.168.1.7, login.example:8443, *.wild",
            ),
        ]))
        .unwrap();
        let direct = |h: &str, port: u16| p.for_target(true, h, port).is_none();
        assert!(direct("corp.example", 443));
        assert!(direct("sts.corp.example", 443));
        assert!(!direct("notcorp.example", 443));
        assert!(direct("a.internal", 443));
        assert!(
            !direct("internal", 443),
            ".internal matches subdomains only"
        );
        assert!(direct("10.1.2.3", 443));
        assert!(!direct("11.1.2.3", 443));
        assert!(direct("192.168.1.7", 443));
        assert!(direct("login.example", 8443));
        assert!(!direct("login.example", 443));
        assert!(direct("x.wild", 443));
        assert!(direct("STS.Corp.Example.", 443), "case and a trailing dot");
        // Loopback is never proxied.
        assert!(direct("localhost", 443));
        assert!(direct("127.0.0.1", 443));
        assert!(direct("[::1]", 443));
        assert!(!direct("login.microsoftonline.com", 443));
        // http:// URLs use HTTP_PROXY, which is unset here.
        assert!(
            p.for_target(false, "login.microsoftonline.com", 80)
                .is_none()
        );

        let all = EgressProxy::from_env(env(&[("HTTPS_PROXY", "p:1"), ("NO_PROXY", "*")])).unwrap();
        assert!(all.for_target(true, "anything", 443).is_none());
    }

    /// A real tunnel through a real (minimal) proxy on loopback, and a refusal that says so.
    #[tokio::test]
    async fn connect_tunnel_carries_bytes_and_reports_refusals() {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            s.write_all(&b).await.unwrap();
        });
        let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = proxy.local_addr().unwrap();
        tokio::spawn(async move {
            for _ in 0..2 {
                let (mut s, _) = proxy.accept().await.unwrap();
                // One task per connection: the first tunnel stays open while the second
                // request is made.
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        s.read_exact(&mut byte).await.unwrap();
                        head.push(byte[0]);
                    }
                    let head = String::from_utf8(head).unwrap();
                    if head.contains("Proxy-Authorization: Basic dTpw") {
                        let target = head.split_whitespace().nth(1).unwrap().to_string();
                        let mut up = TcpStream::connect(target).await.unwrap();
                        s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                            .await
                            .unwrap();
                        let _ = crate::copy::copy_bidirectional(&mut s, &mut up).await;
                    } else {
                        s.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                            .await
                            .unwrap();
                    }
                });
            }
        });
        let mut p = parse_proxy(&format!("http://u:p@{proxy_addr}")).unwrap();
        let mut t = connect_tunnel(&p, "127.0.0.1", echo_addr.port())
            .await
            .unwrap();
        t.write_all(b"hello").await.unwrap();
        let mut b = [0u8; 5];
        t.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"hello");

        p.authorization = None;
        let e = connect_tunnel(&p, "idp.example", 443).await.unwrap_err();
        assert!(
            e.contains("refused CONNECT idp.example:443: HTTP/1.1 407"),
            "{e}"
        );
    }
}
