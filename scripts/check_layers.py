"""Check deltatune's layering and size rules by reading the sources with `ast` (nothing is imported).

    python scripts/check_layers.py            # this checkout
    python scripts/check_layers.py PATH       # another tree holding PATH/src/deltatune (and PATH/tests)

Prints one line per rule, each failing rule followed by its offending items (file:line  what), and exits 1 if any
rule is broken, 0 otherwise. `tests/test_layers.py` loads this file and calls `collect_findings(root)`.

Layers, lowest first (a module may import only from lower layers, or from its own sub-package without a cycle):
errors < files < config_text < config (0) < data (1) < model (2) < runtime (3) < evaluate (4)
< train | delta (5, siblings) < tasks (6) < pipeline (7) < sweep < cli (8) < deltatune/__init__ < __main__.
`docs` may import level 0, data and model; `demo` imports nothing of ours; only cli may import docs or demo.
"""

from __future__ import annotations

import ast
import re
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "deltatune"

# Rank of each top-level module or sub-package. A cross-group import must go to a strictly lower rank, so equal
# ranks (train/delta) are siblings that may not import each other.
RANKS: dict[str, float] = {
    "demo": -1.0,  # imports nothing of ours: every deltatune import from demo lands on a higher rank
    "errors": 0.0,
    "files": 0.1,
    "progress": 0.1,  # stage lines and bars on stderr: every layer may report progress
    "config_text": 0.15,  # overrides, relative paths and error lines for config: below the typed groups
    "config": 0.2,
    "data": 1.0,
    "model": 2.0,
    "docs": 2.5,  # level 0, data and model only
    "runtime": 3.0,
    "evaluate": 4.0,
    "train": 5.0,
    "delta": 5.0,
    "tasks": 6.0,
    "pipeline": 7.0,
    "sweep": 8.0,
    "cli": 8.5,  # cli may import sweep, not the other way round
    "": 9.0,  # deltatune/__init__.py: a facade nobody inside the package imports
    "__main__": 10.0,
}
LEVELS: dict[str, str] = {
    "demo": "demo", "errors": "0", "files": "0", "progress": "0", "config_text": "0", "config": "0", "data": "1",
    "model": "2", "docs": "docs",
    "runtime": "3", "evaluate": "4", "train": "5", "delta": "5", "tasks": "6", "pipeline": "7", "sweep": "8",
    "cli": "8", "": "top", "__main__": "top",
}
ONLY_IMPORTED_BY: dict[str, set[str]] = {"docs": {"cli"}, "demo": {"cli"}}

# The target layout, shown as information only (a module not there yet breaks no rule by itself).
LAYOUT = {
    "errors": [], "files": [], "progress": [], "config_text": [], "config": [], "tasks": [], "pipeline": [],
    "sweep": [], "cli": [], "__main__": [],
    "data": ["sources", "formats", "split_cache", "tools", "reasoning", "examples", "text_examples", "templates",
             "batching", "cache", "stream", "dedupe", "lint"],
    "model": ["load", "parts", "host_memory", "stored", "methods", "gguf_vocab", "export"],
    "runtime": ["distributed", "precision", "faults"],
    "evaluate": ["loss", "generate", "metrics", "evaluate", "probes", "data_files", "preference"],
    "train": ["loop", "optim", "checkpoint", "dist_checkpoint", "metrics_log", "trackers"],
    "delta": ["measures", "weights", "causal", "classifier", "preference", "render", "summary", "benchmarks"],
    "docs": ["documents", "prepare"],
    "demo": ["orders", "routing", "preferences"],
}
OPTIONAL_MODULES = {"files"}

LOCAL_IMPORTS_ALLOWED_IN = {f"{PACKAGE}.cli"}
TASKS_MODULE = f"{PACKAGE}.tasks"
TASK_ATTRS = {"task", "task_type"}
# Task names ("sft", "text", "classification") count when compared with a `task`/`task_type` value
# (TASK_ATTRS); alone they are also record-format names ("text", "classification"), which data code
# may compare. Report and peft task types name a task and nothing else, so they count anywhere.
TASK_STRINGS = {"causal_lm", "SEQ_CLS", "CAUSAL_LM"}

FIT = ("train/loop.py", "fit", 100, 50)  # file under the package, function, line limit, loop limit
PIPELINE_RUN = ("pipeline.py", "run", 40)
FUNCTION_LIMIT = 60
FUNCTION_EXEMPT = {("train/loop.py", "fit"), ("cli.py", "build_parser"), ("pipeline.py", "run")}
MODULE_LIMIT = 500
CONFIG_FILE = "config.py"
GROUP_LIMIT = 15

# Report order: key -> label of its count line.
RULES: dict[str, str] = {
    "unparseable": "unparseable files",
    "unlayered": "modules outside the layout",
    "unresolved": "unresolved deltatune imports",
    "cycles": "import cycles",
    "upward": "upward imports",
    "local_imports": "function-local deltatune imports outside cli.py",
    "private_names": "private names across modules",
    "private_names_tests": "private names used by tests",
    "task_branches": "task branches outside tasks.py",
    "fit": "fit",
    "pipeline_run": "pipeline.run",
    "config_groups": "config groups",
    "long_functions": f"functions over {FUNCTION_LIMIT} lines",
    "long_modules": f"modules over {MODULE_LIMIT} lines",
}


@dataclass(frozen=True)
class Finding:
    path: str  # relative to the root given to collect_findings
    line: int
    what: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}  {self.what}"


@dataclass
class Report:
    """What `collect_findings` returns: offending items per rule key (see RULES), and the measured sizes."""

    findings: dict[str, list[Finding]]
    summary: dict[str, str]  # rule key -> the text after "label: " on its line, where it is not just a count
    info: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(self.findings.values())

    def lines(self) -> list[str]:
        out = list(self.info)
        for key, label in RULES.items():
            items = self.findings[key]
            out.append(f"{label}: {self.summary.get(key, len(items))}")
            out.extend(f"  {item}" for item in items)
        return out


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    path: str
    line: int
    function: str | None  # enclosing function's qualified name, None at module or class level
    type_checking: bool

    def where(self) -> str:
        notes = [f"in {self.function}()"] if self.function else []
        notes += ["TYPE_CHECKING"] if self.type_checking else []
        return f"{self.path}:{self.line}" + (f" ({', '.join(notes)})" if notes else "")


@dataclass
class Module:
    name: str
    path: Path
    rel: str  # path relative to the root, for messages
    sub: str  # path relative to the package folder, e.g. "train/loop.py"
    is_package: bool
    source: str
    tree: ast.Module | None


def _group(module: str) -> str:
    """The layout group of a deltatune module: its top-level module or sub-package ("" for the package itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _read_modules(pkg_dir: Path, root: Path, unparseable: list[Finding]) -> dict[str, Module]:
    modules: dict[str, Module] = {}
    for path in sorted(pkg_dir.rglob("*.py")):
        sub = path.relative_to(pkg_dir)
        parts = [PACKAGE, *sub.with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        rel = path.relative_to(root).as_posix()
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(source, filename=rel)
        except SyntaxError as err:
            unparseable.append(Finding(rel, err.lineno or 1, f"syntax error: {err.msg}"))
            tree = None
        modules[".".join(parts)] = Module(".".join(parts), path, rel, sub.as_posix(), is_package, source, tree)
    return modules


class _Imports(ast.NodeVisitor):
    """Every deltatune import in one file, with its enclosing function and whether it sits under TYPE_CHECKING."""

    def __init__(self, module: str, is_package: bool, known: set[str]):
        self.package = module if is_package else module.rpartition(".")[0]
        self.module = module
        self.known = known  # module names plus package folders (with or without __init__.py)
        self.scope: list[tuple[str, str]] = []  # ("class" | "def", name)
        self.type_checking = 0
        self.found: list[tuple[ast.AST, str, str | None, bool, str | None]] = []  # node, target, func, tc, name
        self.aliases: dict[str, str] = {}  # local name -> deltatune module it is bound to

    def _function(self) -> str | None:
        if not any(kind == "def" for kind, _ in self.scope):
            return None
        return ".".join(name for _, name in self.scope)

    def _add(self, node: ast.AST, target: str, name: str | None = None) -> None:
        self.found.append((node, target, self._function(), self.type_checking > 0, name))

    def _scoped(self, kind: str, node: ast.AST) -> None:
        self.scope.append((kind, node.name))
        self.generic_visit(node)
        self.scope.pop()

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._scoped("class", node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._scoped("def", node)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._scoped("def", node)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self.type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                self._add(node, alias.name)
                if alias.asname:
                    self.aliases[alias.asname] = alias.name
                else:
                    self.aliases[PACKAGE] = PACKAGE

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            if node.level > 1:
                base = base[: -(node.level - 1)]
            base_name = ".".join(base + ([node.module] if node.module else []))
        else:
            base_name = node.module or ""
        if not (base_name == PACKAGE or base_name.startswith(PACKAGE + ".")):
            return
        for alias in node.names:
            sub = f"{base_name}.{alias.name}"
            if alias.name != "*" and sub in self.known:
                self._add(node, sub)
                self.aliases[alias.asname or alias.name] = sub
            else:
                self._add(node, base_name, None if alias.name == "*" else alias.name)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
        if name in {"import_module", "__import__"} and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and (
                    arg.value == PACKAGE or arg.value.startswith(PACKAGE + ".")):
                self._add(node, arg.value)
        self.generic_visit(node)


def _module_names(tree: ast.Module) -> set[str] | None:
    """Names bound at module level (None when a star import or module __getattr__ makes that unknowable)."""
    names: set[str] = set()

    def targets(node: ast.AST) -> None:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name):
                names.add(sub.id)

    def walk(stmts: list[ast.stmt]) -> bool:
        for stmt in stmts:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(stmt.name)
                if stmt.name == "__getattr__":
                    return False
            elif isinstance(stmt, (ast.Import, ast.ImportFrom)):
                for alias in stmt.names:
                    if alias.name == "*":
                        return False
                    names.add(alias.asname or alias.name.split(".")[0])
            elif isinstance(stmt, ast.Assign):
                for target in stmt.targets:
                    targets(target)
            elif isinstance(stmt, (ast.AnnAssign, ast.AugAssign)):
                targets(stmt.target)
            elif isinstance(stmt, (ast.For, ast.AsyncFor)):
                targets(stmt.target)
            elif isinstance(stmt, (ast.With, ast.AsyncWith)):
                for item in stmt.items:
                    if item.optional_vars is not None:
                        targets(item.optional_vars)
            elif sys.version_info >= (3, 10) and isinstance(stmt, ast.Match):
                return False
            for block in ("body", "orelse", "finalbody"):
                inner = getattr(stmt, block, None)
                if isinstance(inner, list) and not isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                     ast.ClassDef)):
                    if not walk(inner):
                        return False
            for handler in getattr(stmt, "handlers", []):
                if handler.name:
                    names.add(handler.name)
                if not walk(handler.body):
                    return False
        return True

    return names if walk(tree.body) else None


def _dotted(node: ast.AST) -> list[str] | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    parts.append(node.id)
    return parts[::-1]


def _private_uses(tree: ast.Module, rel: str, module: str | None, imports: _Imports,
                  known: set[str]) -> list[Finding]:
    """`from deltatune.x import _name`, `alias._name` and `getattr/setattr(alias, "_name", ...)`, and string
    targets such as monkeypatch.setattr("deltatune.x._name", ...)."""
    out: list[Finding] = []
    for node, target, _, _, name in imports.found:
        if name and _is_private(name) and target != module:
            out.append(Finding(rel, node.lineno, f"imports private {name} from {target}"))
    for node, target, _, _, _ in imports.found:
        if target != module and any(_is_private(part) for part in target.split(".")):
            out.append(Finding(rel, node.lineno, f"imports private module {target}"))

    def resolve(expr: ast.AST) -> str | None:
        parts = _dotted(expr)
        if not parts or parts[0] not in imports.aliases:
            return None
        dotted = ".".join([imports.aliases[parts[0]], *parts[1:]])
        return dotted if dotted in known else None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            owner = resolve(node.value)
            if owner and owner != module:
                out.append(Finding(rel, node.lineno, f"uses private {owner}.{node.attr}"))
        elif isinstance(node, ast.Call) and len(node.args) >= 2:
            owner, key = resolve(node.args[0]), node.args[1]
            if owner and owner != module and isinstance(key, ast.Constant) and isinstance(key.value, str) \
                    and _is_private(key.value):
                out.append(Finding(rel, node.lineno, f"uses private {owner}.{key.value} by name"))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(
                rf"{PACKAGE}(\.\w+)+", node.value):
            parts = node.value.split(".")
            private = [p for p in parts if _is_private(p)]
            owner = ".".join(parts[: parts.index(private[0])]) if private else ""
            if private and owner != module:
                out.append(Finding(rel, node.lineno, f"names private {node.value}"))
    return out


def _is_task_access(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        return node.attr in TASK_ATTRS
    if isinstance(node, ast.Subscript):
        key = node.slice
        return isinstance(key, ast.Constant) and key.value in TASK_ATTRS
    if isinstance(node, ast.Call) and node.args:
        key = node.args[0] if isinstance(node.func, ast.Attribute) and node.func.attr == "get" else (
            node.args[1] if isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) > 1
            else None)
        return isinstance(key, ast.Constant) and key.value in TASK_ATTRS
    return False


def _task_string(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in TASK_STRINGS:
        return node.value
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        for elt in node.elts:
            if (found := _task_string(elt)) is not None:
                return found
    return None


def _task_branches(tree: ast.Module, rel: str) -> list[Finding]:
    out: list[Finding] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare) and any(
                isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops):
            sides = [node.left, *node.comparators]
            if any(_is_task_access(side) for side in sides) or any(_task_string(s) is not None for s in sides):
                out.append(Finding(rel, node.lineno, f"compares {ast.unparse(node)}"[:160]))
        elif sys.version_info >= (3, 10) and isinstance(node, ast.Match):
            values = [p.value for c in node.cases for p in ast.walk(c.pattern) if isinstance(p, ast.MatchValue)]
            if _is_task_access(node.subject) or any(_task_string(v) is not None for v in values):
                out.append(Finding(rel, node.lineno, f"matches on {ast.unparse(node.subject)}"[:160]))
    return out


def _functions(tree: ast.Module) -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) of every function and method, nested ones included."""
    out: list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]] = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child))
                walk(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                walk(child, f"{prefix}{child.name}.")
            else:
                walk(child, prefix)

    walk(tree, "")
    return out


def _span(node: ast.AST) -> int:
    return node.end_lineno - node.lineno + 1


def _tarjan(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components, iteratively (no recursion limit to hit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    comps: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        top = stack.pop()
                        on_stack.discard(top)
                        comp.append(top)
                        if top == node:
                            break
                    comps.append(sorted(comp))
    return comps


def _cycle_path(start: str, members: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest cycle through start inside one component."""
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*path[::-1], start]
                if child not in parents:
                    parents[child] = node
                    nxt.append(child)
        frontier = nxt
    return [start]


def _cycles(edges: list[Edge]) -> list[Finding]:
    graph: dict[str, set[str]] = defaultdict(set)
    first: dict[tuple[str, str], Edge] = {}
    for edge in edges:
        graph[edge.src].add(edge.dst)
        graph.setdefault(edge.dst, set())
        first.setdefault((edge.src, edge.dst), edge)
    out: list[Finding] = []
    for edge in edges:
        if edge.src == edge.dst and first[(edge.src, edge.dst)] is edge:
            out.append(Finding(edge.path, edge.line, f"{edge.src} imports itself"))
    for comp in _tarjan(graph):
        if len(comp) < 2:
            continue
        path = _cycle_path(comp[0], set(comp), graph)
        hops = [first[(a, b)] for a, b in zip(path, path[1:])]
        what = " -> ".join(path) + " via " + ", ".join(hop.where() for hop in hops)
        if len(comp) > len(path) - 1:
            what += f"; component of {len(comp)}: {', '.join(comp)}"
        out.append(Finding(hops[0].path, hops[0].line, what))
    return out


def _upward(edge: Edge) -> str | None:
    src, dst = _group(edge.src), _group(edge.dst)
    if src == dst or src not in RANKS or dst not in RANKS:
        return None
    if dst in ONLY_IMPORTED_BY and src not in ONLY_IMPORTED_BY[dst]:
        allowed = " or ".join(sorted(ONLY_IMPORTED_BY[dst]))
        return f"{edge.src} imports {edge.dst}: only {allowed} may import {dst}"
    if RANKS[dst] >= RANKS[src]:
        how = "sibling" if RANKS[dst] == RANKS[src] else "higher"
        return (f"{edge.src} ({src or PACKAGE}, level {LEVELS[src]}) imports {how} {edge.dst} "
                f"({dst or PACKAGE}, level {LEVELS[dst]})")
    return None


def _top_function(mod: Module | None, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    body = mod.tree.body if mod and mod.tree else []
    return next((n for n in body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name), None)


def _fit_and_run(modules: dict[str, Module], pkg_rel: str, findings: dict[str, list[Finding]],
                 summary: dict[str, str]) -> None:
    by_sub = {m.sub: m for m in modules.values()}
    sub, name, limit, loop_limit = FIT
    mod = by_sub.get(sub)
    fn = _top_function(mod, name)
    if fn is None:
        findings["fit"].append(Finding(f"{pkg_rel}/{sub}", 1, f"no top-level {name}() found"))
        summary["fit"] = f"missing (limit {limit})"
    else:
        loops = [n for n in ast.walk(fn) if isinstance(n, (ast.For, ast.AsyncFor, ast.While))]
        loop = max(loops, key=_span, default=None)
        size, loop_size = _span(fn), _span(loop) if loop else 0
        summary["fit"] = f"{size} lines (limit {limit}), loop body {loop_size} (limit {loop_limit})"
        if size > limit:
            findings["fit"].append(Finding(mod.rel, fn.lineno, f"{name}: {size} lines (limit {limit})"))
        if loop and loop_size > loop_limit:
            findings["fit"].append(Finding(mod.rel, loop.lineno, f"main loop: {loop_size} lines (limit {loop_limit})"))

    sub, name, limit = PIPELINE_RUN
    mod = by_sub.get(sub)
    fn = _top_function(mod, name)
    if fn is None:
        findings["pipeline_run"].append(Finding(f"{pkg_rel}/{sub}", 1, f"no top-level {name}() found"))
        summary["pipeline_run"] = f"missing (limit {limit})"
    else:
        summary["pipeline_run"] = f"{_span(fn)} lines (limit {limit})"
        if _span(fn) > limit:
            findings["pipeline_run"].append(Finding(mod.rel, fn.lineno, f"{name}: {_span(fn)} lines (limit {limit})"))


def _annotation_is_classvar(node: ast.AST) -> bool:
    if isinstance(node, ast.Subscript):
        node = node.value
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "ClassVar[int]" as a string
        return node.value.replace("typing.", "").startswith("ClassVar")
    return (isinstance(node, ast.Name) and node.id == "ClassVar") or (
        isinstance(node, ast.Attribute) and node.attr == "ClassVar")


def _config_groups(modules: dict[str, Module], pkg_rel: str, findings: dict[str, list[Finding]],
                   summary: dict[str, str]) -> None:
    mod = next((m for m in modules.values() if m.sub == CONFIG_FILE), None)
    rel = mod.rel if mod else f"{pkg_rel}/{CONFIG_FILE}"
    classes = {n.name: n for n in (mod.tree.body if mod and mod.tree else []) if isinstance(n, ast.ClassDef)}

    def base_names(cls: ast.ClassDef) -> list[str]:
        return [b.id if isinstance(b, ast.Name) else b.attr for b in cls.bases if isinstance(b, (ast.Name,
                                                                                                 ast.Attribute))]

    def is_model(cls: ast.ClassDef, seen: frozenset[str] = frozenset()) -> bool:
        return any(b == "BaseModel" or (b in classes and b not in seen and is_model(classes[b], seen | {cls.name}))
                   for b in base_names(cls))

    def fields(cls: ast.ClassDef, seen: frozenset[str] = frozenset()) -> list[str]:
        names: list[str] = []
        for b in base_names(cls):  # fields inherited from a base class defined in config.py
            if b in classes and b not in seen:
                names += [n for n in fields(classes[b], seen | {cls.name}) if n not in names]
        for stmt in cls.body:
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                name = stmt.target.id
                if not (name.startswith("_") or name == "model_config" or _annotation_is_classvar(stmt.annotation)
                        or name in names):
                    names.append(name)
        return names

    groups = {name: (cls, fields(cls)) for name, cls in classes.items() if name.endswith("Args") and is_model(cls)}
    if not groups:
        summary["config_groups"] = f"0 (limit {GROUP_LIMIT} fields each)"
        findings["config_groups"].append(Finding(rel, 1, "no pydantic *Args groups found"))
        return
    largest = max(groups, key=lambda n: len(groups[n][1]))
    summary["config_groups"] = (f"{len(groups)}, largest {largest} {len(groups[largest][1])} fields "
                                f"(limit {GROUP_LIMIT})")
    for name, (cls, names) in groups.items():
        if len(names) > GROUP_LIMIT:
            findings["config_groups"].append(Finding(mod.rel, cls.lineno,
                                                     f"{name}: {len(names)} fields (limit {GROUP_LIMIT})"))


class _Tree:
    """The package under root/src/deltatune as parsed modules, plus what the checks found so far."""

    def __init__(self, root: Path):
        self.root = root
        self.pkg_dir = root / "src" / PACKAGE
        self.pkg_rel = self.pkg_dir.relative_to(root).as_posix()
        self.findings: dict[str, list[Finding]] = {key: [] for key in RULES}
        self.summary: dict[str, str] = {}
        self.edges: list[Edge] = []
        if self.pkg_dir.is_dir():
            self.modules = _read_modules(self.pkg_dir, root, self.findings["unparseable"])
        else:
            self.modules = {}
            self.findings["unparseable"].append(Finding(self.pkg_rel, 0, "package folder not found"))
        folders = [d for d in self.pkg_dir.rglob("*") if d.is_dir() and d.name != "__pycache__"]
        self.known = set(self.modules) | {PACKAGE} | {".".join([PACKAGE, *d.relative_to(self.pkg_dir).parts])
                                                      for d in folders}
        self.exported = {name: _module_names(m.tree) for name, m in self.modules.items() if m.tree}

    def _problem(self, target: str, name: str | None) -> str | None:
        if target not in self.known:
            return f"{target} does not exist"
        names = self.exported.get(target)
        if name and names is not None and name not in names:
            return f"{target} has no {'submodule or ' if self.modules[target].is_package else ''}name {name}"
        return None

    def unresolved(self, rel: str, found: list) -> set[tuple[int, str]]:
        """Report imports of what does not exist (one finding per statement and module); return the
        (line, target) pairs of the statements none of whose names resolve, which then make no graph edge."""
        problems: dict[tuple[int, str], list[str]] = defaultdict(list)
        good: set[tuple[int, str]] = set()
        for node, target, _, _, name in found:
            if (text := self._problem(target, name)) is None:
                good.add((node.lineno, target))
            elif text not in problems[(node.lineno, target)]:
                problems[(node.lineno, target)].append(text)
        for (line, _), texts in problems.items():
            missing = [t.rpartition(" name ")[2] for t in texts if " name " in t]
            what = texts[0] if not missing else texts[0].rpartition(" name ")[0] + (
                f" name{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
            self.findings["unresolved"].append(Finding(rel, line, what))
        return {key for key in problems if key not in good}

    def check_module(self, mod: Module) -> None:
        findings = self.findings
        if _group(mod.name) not in RANKS:
            findings["unlayered"].append(Finding(mod.rel, 1, f"{mod.name} is not part of the layout"))
        size = len(mod.source.splitlines())
        if size > MODULE_LIMIT:
            findings["long_modules"].append(Finding(mod.rel, 1, f"{size} lines (limit {MODULE_LIMIT})"))
        if mod.tree is None:
            return
        imports = _Imports(mod.name, mod.is_package, self.known)
        imports.visit(mod.tree)
        dead = self.unresolved(mod.rel, imports.found)
        seen: set[tuple[int, str]] = set()
        for node, target, func, tc, _ in imports.found:
            if (node.lineno, target) in seen:
                continue
            seen.add((node.lineno, target))
            if func and mod.name not in LOCAL_IMPORTS_ALLOWED_IN:
                findings["local_imports"].append(Finding(mod.rel, node.lineno, f"imports {target} in {func}()"))
            if (node.lineno, target) not in dead:
                self.edges.append(Edge(mod.name, target, mod.rel, node.lineno, func, tc))
        findings["private_names"] += _private_uses(mod.tree, mod.rel, mod.name, imports, self.known)
        if mod.name != TASKS_MODULE:
            findings["task_branches"] += _task_branches(mod.tree, mod.rel)
        for qualname, fn in _functions(mod.tree):
            if (mod.sub, qualname) not in FUNCTION_EXEMPT and _span(fn) > FUNCTION_LIMIT:
                findings["long_functions"].append(Finding(mod.rel, fn.lineno,
                                                          f"{qualname}: {_span(fn)} lines (limit {FUNCTION_LIMIT})"))

    def check_graph(self) -> None:
        self.findings["cycles"] = _cycles(self.edges)
        for edge in self.edges:
            if edge.dst in self.known and (upward := _upward(edge)):
                notes = ([f"in {edge.function}()"] if edge.function else []) + (
                    ["TYPE_CHECKING"] if edge.type_checking else [])
                self.findings["upward"].append(Finding(edge.path, edge.line, upward + "".join(
                    f" [{note}]" for note in notes)))

    def check_tests(self) -> None:
        tests_dir = self.root / "tests"
        for path in sorted(tests_dir.rglob("*.py")) if tests_dir.is_dir() else []:
            rel = path.relative_to(self.root).as_posix()
            try:
                tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"), filename=rel)
            except SyntaxError as err:
                self.findings["unparseable"].append(Finding(rel, err.lineno or 1, f"syntax error: {err.msg}"))
                continue
            imports = _Imports(f"tests.{path.stem}", False, self.known)
            imports.visit(tree)
            self.unresolved(rel, imports.found)
            self.findings["private_names_tests"] += _private_uses(tree, rel, None, imports, self.known)

    def info(self) -> list[str]:
        lines = [f"checked {len(self.modules)} modules under {self.pkg_rel}"]
        expected = [f"{PACKAGE}.{group}" + (f".{sub}" if sub else "") for group, subs in LAYOUT.items()
                    if group not in OPTIONAL_MODULES for sub in (subs or [""])]
        missing = [name for name in expected if name not in self.known]
        if missing:
            lines.append(f"layout modules not present yet (information): {', '.join(missing)}")
        return lines


def collect_findings(root: str | Path = REPO) -> Report:
    """Check the tree under `root`: its package in root/src/deltatune, its tests (optional) in root/tests.

    Returns a Report whose `findings` maps every key of RULES to its offending items (an empty list when the rule
    holds); a missing file or function is itself a finding, never an exception.
    """
    tree = _Tree(Path(root).resolve())
    for mod in tree.modules.values():
        tree.check_module(mod)
    tree.check_graph()
    _fit_and_run(tree.modules, tree.pkg_rel, tree.findings, tree.summary)
    _config_groups(tree.modules, tree.pkg_rel, tree.findings, tree.summary)
    tree.summary["long_functions"] = f"{len(tree.findings['long_functions'])} (fit and build_parser exempt)"
    tree.check_tests()
    findings = {key: sorted(set(items), key=lambda f: (f.path, f.line, f.what)) for key, items in tree.findings.items()}
    return Report(findings, tree.summary, tree.info())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    report = collect_findings(args[0] if args else REPO)
    print("\n".join(report.lines()))
    return 1 if report.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
