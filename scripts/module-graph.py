#!/usr/bin/env python3
"""The module graph of a crate, read from its `use crate::...` lines and `crate::x::` paths:
which modules import which, the import cycles among them, and which modules import items
that live in `lib.rs` (the crate root) rather than in a leaf module.

Issue 14 asks that `outrigger-proxy` read top-down — shared types in leaf modules, no import
circles, nothing importing from `lib.rs` — and that CI check it. CI runs `--check`: it fails on
an import circle and on any module importing an item `lib.rs` defines or brings in with `use`.
`--check-circles` fails on circles only (and reports the imports from `lib.rs`).

usage: module-graph.py [--check | --check-circles] [CRATE_SRC_DIR]
       (default crates/outrigger-proxy/src)
"""
import os
import re
import sys


def module_of(src, path):
    rel = os.path.relpath(path, src)[:-3]  # strip .rs
    parts = rel.split(os.sep)
    if parts[-1] in ("lib", "main"):
        return "crate"
    if parts[-1] == "mod":
        parts = parts[:-1]
    return "::".join(parts)


def main():
    args = [a for a in sys.argv[1:] if a not in ("--check", "--check-circles")]
    check = "--check" in sys.argv[1:]
    check_circles = "--check-circles" in sys.argv[1:]
    src = args[0] if args else "crates/outrigger-proxy/src"
    files = []
    for root, _, names in os.walk(src):
        files += [os.path.join(root, n) for n in names if n.endswith(".rs")]
    modules = {module_of(src, f): f for f in files}

    # Items defined in the crate root (pub structs, enums, fns, traits, types, consts).
    root_text = open(modules["crate"]).read()
    root_items = set(
        re.findall(
            r"^pub(?:\(crate\))?\s+(?:struct|enum|fn|trait|type|const|static|async fn)\s+(\w+)",
            root_text,
            re.M,
        )
    )
    # Names `lib.rs` brings in with `use` (re-exported or not): a module could reach them as
    # `crate::Name` too, and that is importing from `lib.rs` just the same.
    for m in re.finditer(r"^(?:pub(?:\(crate\))?\s+)?use\s+([^;]+);", root_text, re.M):
        body = m.group(1)
        names = body[body.index("{") + 1 : body.rindex("}")].split(",") if "{" in body else [body]
        for n in names:
            n = n.strip()
            if n:
                root_items.add(n.split(" as ")[-1].split("::")[-1].strip())
    root_items.discard("self")

    def resolve(path):
        """The longest known module a `crate::a::b::C` path names, or ('crate', item)."""
        segs = path.split("::")
        for n in range(len(segs), 0, -1):
            m = "::".join(segs[:n])
            if m in modules:
                return m, None
        return "crate", segs[0]

    edges = {}
    from_root = {}
    for mod, path in modules.items():
        if mod == "crate":
            continue
        text = open(path).read()
        # Test modules may reach anywhere: only non-test code counts.
        text = text.split("#[cfg(test)]")[0]
        # Comments (doc comments too) name paths without importing them.
        text = re.sub(r"(?m)^\s*//.*$", "", text)
        deps = set()
        for m in re.finditer(r"\bcrate::((?:\w+::)*\w+|\{[^}]*\})", text):
            body = m.group(1)
            if body.startswith("{"):
                names = [n.strip().split("::")[0] for n in body[1:-1].split(",") if n.strip()]
                paths = names
            else:
                paths = [body]
            for p in paths:
                target, item = resolve(p)
                if target == "crate":
                    if item in root_items:
                        from_root.setdefault(mod, set()).add(item)
                    continue
                if target != mod and not target.startswith(mod + "::"):
                    deps.add(target)
        # `super::x` in a child module names a sibling.
        if "::" in mod:
            parent = mod.rsplit("::", 1)[0]
            for m in re.finditer(r"\bsuper::(\w+)", text):
                sib = f"{parent}::{m.group(1)}"
                if sib in modules and sib != mod:
                    deps.add(sib)
        edges[mod] = deps

    # Strongly connected components (Tarjan): every component of more than one module is a
    # circle of imports.
    index, low, on, stack, comps, counter = {}, {}, set(), [], [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            visit(v)

    print(f"{src}: {len(modules)} modules")
    for c in comps:
        print(f"import circle ({len(c)} modules): {' -> '.join(c)}")
    for mod in sorted(from_root):
        print(f"{mod} imports from lib.rs: {', '.join(sorted(from_root[mod]))}")
    if not comps and not from_root:
        print("no import circles; nothing imports from lib.rs")
    if (check and (comps or from_root)) or (check_circles and comps):
        sys.exit(1)


if __name__ == "__main__":
    main()
