//! `outrigger check`: would this request be allowed, and by which policy? The same engine and
//! the same policy files as the running agent, no traffic.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use outrigger_policy::{HttpAttrs, MtlsMode, Reason, Request, normalize_path};

use crate::config::AgentConfig;
use crate::policy_files::{self, PolicyInputs};

#[derive(Args)]
pub struct CheckArgs {
    /// The agent configuration file (its workload, policy paths and options are used).
    #[arg(long, short = 'c', value_name = "FILE")]
    config: PathBuf,
    /// The caller's principal (`cluster.local/ns/NS/sa/SA`, or a `spiffe://` URI). Without it
    /// the caller is plaintext (no identity).
    #[arg(long, value_name = "PRINCIPAL")]
    from: Option<String>,
    /// The caller's IP address (source.ip, ipBlocks).
    #[arg(long, value_name = "IP", default_value = "10.0.0.1")]
    source_ip: IpAddr,
    /// The workload port called (default: the first inbound listener's port).
    #[arg(long)]
    port: Option<u16>,
    /// Check a TCP connection (L4 attributes only) instead of an HTTP request.
    #[arg(long, conflicts_with_all = ["method", "path", "host", "header"])]
    tcp: bool,
    /// HTTP method.
    #[arg(long, default_value = "GET")]
    method: String,
    /// HTTP path, with query if any; normalized as the agent would.
    #[arg(long, default_value = "/")]
    path: String,
    /// HTTP host (:authority).
    #[arg(long, default_value = "localhost")]
    host: String,
    /// A request header `name=value` (repeatable).
    #[arg(long, value_name = "NAME=VALUE")]
    header: Vec<String>,
    /// The TLS SNI of the connection (connection.sni).
    #[arg(long)]
    sni: Option<String>,
    /// A file holding the request's JWT: verified with the workload's RequestAuthentication
    /// rules (keys fetched as the agent would), its claims used by the policies.
    #[arg(long, value_name = "FILE", conflicts_with = "tcp")]
    jwt: Option<PathBuf>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

pub const AFTER_HELP: &str = "\
Examples:
  outrigger check -c agent.yaml --from cluster.local/ns/default/sa/sleep --method POST --path /api/x
  outrigger check -c agent.yaml --from cluster.local/ns/default/sa/sleep --port 5432 --tcp
  outrigger check -c agent.yaml --path /admin --header x-user=alice --json

Exit status: 0 allowed; 1 denied or refused; 2 usage error (a bad or missing flag);
3 the check could not be made (bad configuration, policy or input).";

/// Runs the check; returns whether the request would be allowed.
pub fn run(args: CheckArgs) -> anyhow::Result<bool> {
    let cfg = AgentConfig::load(&args.config)?;
    let inputs = PolicyInputs::from_config(&cfg);
    let cluster = cluster_policy(&cfg, &inputs)?;
    let state =
        policy_files::load(&inputs, 1).map_err(|e| anyhow::anyhow!("invalid policy:\n{e}"))?;
    let snap = &state.snapshot;
    let port = args
        .port
        .or_else(|| cfg.inbound.first().map(|l| l.listen.port()))
        .unwrap_or(0);
    let principal = args.from.as_deref().map(|p| {
        p.strip_prefix(outrigger_identity::SPIFFE_SCHEME)
            .unwrap_or(p)
            .to_string()
    });
    if let Some(p) = &principal {
        outrigger_identity::Identity::from_principal(p)
            .map_err(|e| anyhow::anyhow!("--from {p}: {e}"))?;
    }
    let headers: Vec<(String, String)> = args
        .header
        .iter()
        .map(|h| {
            h.split_once('=')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
                .ok_or_else(|| anyhow::anyhow!("--header {h}: write it as name=value"))
        })
        .collect::<Result<_, _>>()?;

    let mtls = snap.mtls_mode(port);
    let applied: Vec<_> = snap
        .applied()
        .iter()
        .map(|a| {
            json!({
                "kind": a.kind.to_string(),
                "name": a.key(),
                "scope": a.scope.to_string(),
                "action": a.action.map(|x| x.to_string()),
                "dry_run": a.dry_run,
                "source": a.source.to_string(),
            })
        })
        .collect();

    // Refused resources (istiod would reject them) and their fail-closed effect, and warnings
    // about loaded ones: shown with every answer, since they shape it.
    let refused_resources: Vec<_> = snap
        .refused()
        .iter()
        .map(|r| {
            json!({
                "kind": r.kind,
                "name": r.name,
                "source": r.source.to_string(),
                "error": r.error.to_string(),
                "effect": r.effect.to_string(),
            })
        })
        .collect();
    let warnings: Vec<String> = snap.warnings().iter().map(|w| w.to_string()).collect();
    let mut out = json!({
        "workload": cfg.identity.to_string(),
        "port": port,
        "mtls_mode": mtls.mode.to_string(),
        "mtls_mode_from": mtls.source,
        "policies": applied,
        "refused": refused_resources,
        "warnings": warnings,
    });
    if let Some(c) = cluster {
        out["cluster_policy"] = c;
    }

    // PeerAuthentication first: a plaintext caller under STRICT never reaches authorization,
    // and a DISABLE port carries no verified identity.
    let refused = match (mtls.mode, &principal) {
        (MtlsMode::Strict, None) => Some("plaintext connection refused: mTLS mode is STRICT"),
        (MtlsMode::Disable, Some(_)) => Some(
            "mTLS is DISABLEd on this port: the connection would pass through undecrypted, with no verified identity",
        ),
        _ => None,
    };
    let mut allowed = false;
    if let Some(why) = refused {
        out["allowed"] = json!(false);
        out["reason"] = json!(why);
    } else {
        let claims = match &args.jwt {
            Some(path) => match verify_jwt(&cfg, snap, path)? {
                Ok(c) => {
                    out["jwt"] = json!({
                        "verified": c.is_some(),
                        "request_principal": c.as_ref().and_then(|c| c.principal()),
                    });
                    c
                }
                Err(why) => {
                    out["allowed"] = json!(false);
                    out["reason"] = json!(format!("401 Jwt verification fails: {why}"));
                    return finish(&args, out, false);
                }
            },
            None => None,
        };
        let mut req = Request::tcp(args.source_ip, IpAddr::V4(Ipv4Addr::LOCALHOST), port);
        req.jwt = claims.as_ref();
        req.source_principal = principal.as_deref();
        req.sni = args.sni.as_deref();
        let normalized;
        if !args.tcp {
            normalized = match normalize_path(&args.path, cfg.policy.path_normalization) {
                Ok(n) => n,
                Err(e) => {
                    out["allowed"] = json!(false);
                    out["reason"] = json!(format!(
                        "400 Bad Request: the path cannot be normalized: {e}"
                    ));
                    return finish(&args, out, false);
                }
            };
            out["normalized_path"] = json!(normalized.path);
            req = req.with_http(HttpAttrs {
                method: &args.method,
                host: &args.host,
                path: &normalized.path,
                headers: &headers,
            });
        }
        let d = snap.authorize(&req);
        allowed = d.allowed && d.custom.is_none();
        let why = match d.reason {
            Reason::NoPolicies => {
                "no AuthorizationPolicy applies to this workload: allowed".to_string()
            }
            Reason::NoAllowPolicies => {
                "no DENY policy matched and there are no ALLOW policies: allowed".to_string()
            }
            Reason::AllowMatched(m) => format!("allowed by {} rule {}", m.policy, m.rule),
            Reason::DenyMatched(m) => format!("denied by DENY policy {} rule {}", m.policy, m.rule),
            Reason::CustomProviderUnavailable(m) => format!(
                "denied by CUSTOM policy {} rule {}: its provider is not available to Outrigger",
                m.policy, m.rule
            ),
            Reason::NoAllowMatched => {
                let allows: Vec<String> = snap
                    .applied()
                    .iter()
                    .filter(|a| a.action == Some(outrigger_policy::Action::Allow) && !a.dry_run)
                    .map(|a| a.key())
                    .collect();
                format!(
                    "denied: ALLOW policies apply ({}) and none of their rules matched",
                    allows.join(", ")
                )
            }
        };
        out["allowed"] = json!(allowed);
        out["reason"] = json!(why);
        out["policy"] = json!(d.policy());
        if !d.audit.is_empty() {
            out["audit"] = json!(
                d.audit
                    .iter()
                    .map(|m| format!("{} rule {}", m.policy, m.rule))
                    .collect::<Vec<_>>()
            );
        }
        if let Some(would) = d.dry_run_allowed {
            out["dry_run_would_allow"] = json!(would);
            out["dry_run_matched"] = json!(
                d.dry_run
                    .iter()
                    .map(|m| format!("{} rule {}", m.policy, m.rule))
                    .collect::<Vec<_>>()
            );
        }
    }
    finish(&args, out, allowed)
}

/// With `policy.kubernetes`: the cluster's policy as the agent last persisted it (its last
/// good set, in `stateFile`), merged with the files. `check` does not call the API server.
#[cfg(feature = "kubernetes")]
fn cluster_policy(
    cfg: &AgentConfig,
    inputs: &PolicyInputs,
) -> anyhow::Result<Option<serde_json::Value>> {
    let (Some(k), Some(merge)) = (&cfg.policy.kubernetes, &inputs.cluster) else {
        return Ok(None);
    };
    match crate::kube_policy::for_check(k, merge)? {
        Some(info) => Ok(Some(json!({
            "state_file": k.state_file.display().to_string(),
            "server": info.server,
            "saved_at_unix": info.saved_at_unix,
        }))),
        None => anyhow::bail!(
            "policy.kubernetes: no cluster policy persisted in {} yet; `check` reads the set the \
             running agent persists there (it does not call the API server): start the agent \
             first",
            k.state_file.display()
        ),
    }
}

#[cfg(not(feature = "kubernetes"))]
fn cluster_policy(
    _cfg: &AgentConfig,
    _inputs: &PolicyInputs,
) -> anyhow::Result<Option<serde_json::Value>> {
    Ok(None)
}

/// Verifies the token in `path` as the agent would: `Ok(Ok(None))` when no RequestAuthentication
/// applies (the token would be ignored), `Ok(Err(reason))` for a 401.
fn verify_jwt(
    cfg: &AgentConfig,
    snap: &outrigger_policy::Snapshot,
    path: &std::path::Path,
) -> anyhow::Result<Result<Option<outrigger_policy::JwtClaims>, String>> {
    let token = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--jwt {}: {e}", path.display()))?;
    let token = token.trim();
    let rules = snap.jwt_rules();
    if rules.is_empty() {
        eprintln!("note: no RequestAuthentication applies to this workload: the token is ignored");
        return Ok(Ok(None));
    }
    // Put the token everywhere the rules look for one in headers.
    let mut b = http::Request::get("/");
    b = b.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    for r in rules {
        if let outrigger_policy::request_authn::TokenLocations::Explicit { headers, .. } =
            &r.locations
        {
            for (name, prefix) in headers {
                b = b.header(name.as_str(), format!("{prefix}{token}"));
            }
        }
    }
    let (mut parts, ()) = b.body(())?.into_parts();
    let settings = crate::agent::jwt_settings(&cfg.jwt)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        let cache = outrigger_proxy::jwt_authn::JwksCache::new(
            settings,
            std::sync::Arc::new(outrigger_proxy::Metrics::new()),
        );
        outrigger_proxy::jwt_authn::authenticate(&cache, rules, &mut parts).await
    });
    Ok(result.map_err(|e| e.reason))
}

fn finish(args: &CheckArgs, out: serde_json::Value, allowed: bool) -> anyhow::Result<bool> {
    if args.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(allowed);
    }
    println!("Workload:  {}", out["workload"].as_str().unwrap_or(""));
    if let Some(c) = out.get("cluster_policy") {
        println!(
            "Cluster:   the policies of {} as the agent last persisted them in {} (saved at \
             {} Unix time)",
            c["server"].as_str().unwrap_or("?"),
            c["state_file"].as_str().unwrap_or(""),
            c["saved_at_unix"]
        );
    }
    let pols = out["policies"].as_array().cloned().unwrap_or_default();
    println!("Policies in force ({}):", pols.len());
    for p in &pols {
        println!(
            "  {} {}{} ({}{}) {}",
            p["kind"].as_str().unwrap_or(""),
            p["name"].as_str().unwrap_or(""),
            p["action"]
                .as_str()
                .map(|a| format!(" {a}"))
                .unwrap_or_default(),
            p["scope"].as_str().unwrap_or(""),
            if p["dry_run"] == json!(true) {
                ", dry-run"
            } else {
                ""
            },
            p["source"].as_str().unwrap_or(""),
        );
    }
    for r in out["refused"].as_array().cloned().unwrap_or_default() {
        println!(
            "Refused:   {} {} ({}): {}\n           -> {}",
            r["kind"].as_str().unwrap_or(""),
            r["name"].as_str().unwrap_or(""),
            r["source"].as_str().unwrap_or(""),
            r["error"].as_str().unwrap_or(""),
            r["effect"].as_str().unwrap_or(""),
        );
    }
    for w in out["warnings"].as_array().cloned().unwrap_or_default() {
        println!("Warning:   {}", w.as_str().unwrap_or(""));
    }
    println!(
        "Port {}:  mTLS {} ({})",
        out["port"],
        out["mtls_mode"].as_str().unwrap_or(""),
        out["mtls_mode_from"]
            .as_str()
            .unwrap_or("agent default: policy.defaultMtlsMode")
    );
    let what = if args.tcp {
        "TCP connection".to_string()
    } else {
        format!(
            "{} {} (normalized: {})",
            args.method,
            args.path,
            out["normalized_path"].as_str().unwrap_or("-")
        )
    };
    println!(
        "Request:   {what} from {}",
        args.from
            .as_deref()
            .unwrap_or("a plaintext caller (no identity)")
    );
    if let Some(j) = out.get("jwt") {
        let what = match j["request_principal"].as_str() {
            Some(p) => format!("verified, request principal {p}"),
            None => "ignored: no RequestAuthentication applies to this workload".to_string(),
        };
        println!("JWT:       {what}");
    }
    println!(
        "Decision:  {} — {}",
        if allowed { "ALLOW" } else { "DENY" },
        out["reason"].as_str().unwrap_or("")
    );
    if let Some(a) = out.get("audit") {
        println!("Audit:     {a}");
    }
    if let Some(w) = out.get("dry_run_would_allow") {
        println!(
            "Dry-run:   would {} ({})",
            if w == &json!(true) { "allow" } else { "deny" },
            out["dry_run_matched"]
        );
    }
    Ok(allowed)
}
