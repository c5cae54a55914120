#!/usr/bin/env python3
"""A CycloneDX 1.5 JSON SBOM of the `outrigger` binary for one target, from Cargo's own view
of the build: `cargo metadata --filter-platform TARGET` (the resolved graph, features as the
release build uses them) and Cargo.lock (each crate's SHA-256). Only what ships in the binary
is listed: the normal dependencies reachable from the `outrigger` package on that target (no
dev- or build-dependencies). scripts/release.sh writes one per target; scripts/package-test.sh
checks them.

Written here rather than installing cargo-cyclonedx so that CI does not compile another tool.

usage: sbom.py TARGET OUT.json
"""
import json
import subprocess
import sys
import tomllib
import uuid
from datetime import datetime, timezone
import os


def purl(pkg):
    return f"pkg:cargo/{pkg['name']}@{pkg['version']}"


def main():
    target, out = sys.argv[1], sys.argv[2]
    meta = json.loads(
        subprocess.run(
            ["cargo", "metadata", "--format-version", "1", "--locked", "--filter-platform", target],
            check=True,
            capture_output=True,
        ).stdout
    )
    with open("Cargo.lock", "rb") as f:
        lock = tomllib.load(f)
    checksums = {(p["name"], p["version"]): p.get("checksum") for p in lock["package"]}
    pkgs = {p["id"]: p for p in meta["packages"]}
    nodes = {n["id"]: n for n in meta["resolve"]["nodes"]}
    root = next(p["id"] for p in meta["packages"] if p["name"] == "outrigger")

    # Normal dependencies reachable from the binary's package.
    def normal_deps(node_id):
        return sorted(
            {
                d["pkg"]
                for d in nodes[node_id]["deps"]
                if any(k["kind"] is None for k in d["dep_kinds"])
            }
        )

    seen, stack = set(), [root]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(normal_deps(n))

    def component(pid, kind):
        p = pkgs[pid]
        c = {
            "type": kind,
            "bom-ref": purl(p),
            "name": p["name"],
            "version": p["version"],
            "purl": purl(p),
        }
        if p.get("license"):
            c["licenses"] = [{"expression": p["license"]}]
        if p.get("description"):
            c["description"] = p["description"].strip()
        digest = checksums.get((p["name"], p["version"]))
        if digest:
            c["hashes"] = [{"alg": "SHA-256", "content": digest}]
        return c

    epoch = int(os.environ.get("SOURCE_DATE_EPOCH", "0")) or None
    when = datetime.fromtimestamp(epoch, timezone.utc) if epoch else datetime.now(timezone.utc)
    bom = {
        "bomFormat": "CycloneDX",
        "specVersion": "1.5",
        # Reproducible: the same sources and target give the same serial number.
        "serialNumber": "urn:uuid:"
        + str(uuid.uuid5(uuid.NAMESPACE_URL, f"outrigger:{pkgs[root]['version']}:{target}:{epoch}")),
        "version": 1,
        "metadata": {
            "timestamp": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "tools": {"components": [{"type": "application", "name": "scripts/sbom.py"}]},
            "component": component(root, "application")
            | {"properties": [{"name": "cdx:rust:target", "value": target}]},
        },
        "components": [component(pid, "library") for pid in sorted(seen - {root})],
        "dependencies": [
            {"ref": purl(pkgs[pid]), "dependsOn": [purl(pkgs[d]) for d in normal_deps(pid)]}
            for pid in sorted(seen)
        ],
    }
    with open(out, "w") as f:
        json.dump(bom, f, indent=2)
        f.write("\n")


if __name__ == "__main__":
    main()
