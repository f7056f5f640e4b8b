"""The house rules of the code base, checked: no import cycle between pml_scale's modules, no
function over 60 lines, one atomic-rename tail, a config schema that stays readable, and no module
citing a file that is not in the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pml_scale"
KERNELS = REPO / "kernels"  # installed as pml_scale.kernels
MAX_FUNCTION_LINES = 60
LENGTH_EXEMPT: set[str] = set()  # no exceptions (the @triton.jit kernel bodies are skipped by kind)
TRAIN_MAX_LINES = 350


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for pml_scale and its kernels."""
    out = {}
    for root, prefix in ((PACKAGE, "pml_scale"), (KERNELS, "pml_scale.kernels")):
        for path in root.rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _imported(name: str, path: Path, tree: ast.AST, known: dict) -> set[str]:
    """The pml_scale modules a module imports, at any depth (a function-level import is still an edge)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imported(name, path, ast.parse(path.read_text()), known) for name, path in known.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None. A package's __init__ importing its own
    submodules is not a cycle unless a submodule imports the package back."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package's __init__ re-exporting its own modules
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _is_triton_jit(fn: ast.AST) -> bool:
    return any("jit" in ast.unparse(d) for d in getattr(fn, "decorator_list", ()))


def long_functions() -> list[str]:
    out = []
    for path in [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]:
        rel = str(path.relative_to(REPO))
        if rel in LENGTH_EXEMPT:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_triton_jit(node):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    out.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    return out


def test_no_import_cycle():
    assert find_cycle(import_graph()) is None


def test_the_checker_sees_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": set()}) is None


def test_no_function_over_60_lines():
    assert long_functions() == []


def test_os_replace_only_in_atomic():
    users = [str(p.relative_to(REPO)) for d in ("pml_scale", "kernels", "benchmarks", "launch")
             for p in (REPO / d).rglob("*.py") if "os.replace(" in p.read_text()]
    assert users == ["pml_scale/atomic.py"]


def test_config_schema_stays_short():
    assert len((PACKAGE / "config.py").read_text().splitlines()) < 400


def test_the_trainer_reads_in_one_sitting_and_names_no_loss():
    """The loop stays short, and what a loss needs is its TrainingLoss hooks, never a branch here."""
    text = (PACKAGE / "train.py").read_text()
    assert len(text.splitlines()) <= TRAIN_MAX_LINES
    assert not re.search(r"loss\.name ==|loss_name ==", text)


# Files the code writes (a grid's report), named in its docstrings; not part of the repository.
GENERATED = {"tables.md"}
TOP_LEVEL = ("pml_scale/", "kernels/", "docs/", "tests/", "benchmarks/", "configs/", "launch/")


def cited_missing() -> list[str]:
    """Repository paths (``pml_scale/labels/traffic.py``) and document names (``design.md``) that a
    module or a document names but the repository does not hold."""
    cited = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w.-]+\.(?:md|py))\b")
    documents = {p.name for p in REPO.rglob("*.md") if ".git" not in p.parts}
    missing = []
    for path in [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py"), REPO / "README.md", *(REPO / "docs").rglob("*.md")]:
        for name in cited.findall(path.read_text()):
            if name.startswith(TOP_LEVEL):
                ok = (REPO / name).exists()
            elif "/" not in name and name.endswith(".md"):
                ok = name in documents or name in GENERATED
            else:
                continue  # a bare module name (train.py) or a relative example path
            if not ok:
                missing.append(f"{path.relative_to(REPO)}: {name}")
    return missing


def test_cited_files_exist():
    assert cited_missing() == []
