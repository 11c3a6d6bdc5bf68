"""The package's layers hold: its imports are checked against the order in docs/design.md.

The "## Layers" block of docs/design.md lists every module of ``curvlab``, top to bottom; a module
may import only modules on lines below its own. Checked on the source (``ast``, imports inside
functions included), for every module:

- no import of a module on its own line or a line above (upward imports);
- no import cycle, also inside a subpackage (``callbacks/``, ``linalg/``, ``models/``);
- no private name (``_name``) taken from another module, except between modules of one
  subpackage;
- no import of ``curvlab.testing`` from production code, and no import of the package root
  (``curvlab/__init__.py`` re-exports everything, so it imports everything);
- no optional extra (Lightning, transformers, TensorBoard, the comparison libraries) imported at
  module level outside the adapters that need it.

The checker is tested on small made-up packages too, so that each rule is shown to fail.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "curvlab"
DESIGN = ROOT / "docs" / "design.md"

OPTIONAL = ("lightning", "pytorch_lightning", "transformers", "accelerate", "tensorboard",
            "pyhessian", "curvlinops", "hessian_eigenthings", "nngeometry", "timm", "torchvision")
# Adapters that exist to use an optional extra (they import it at module level by design).
ADAPTERS = ("callbacks.lightning", "callbacks.hf")


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name inside the package, e.g. "callbacks.monitor"
    target: str  # "" for the package root
    names: tuple[str, ...]  # names taken from the target (from-imports)
    module_level: bool
    line: int


def layer_order(design: Path = DESIGN) -> list[list[str]]:
    """The entries of each line of the Layers block, top first (``"sweep.py"``, ``"linalg/"``)."""
    text = design.read_text()
    block = re.search(r"## Layers\n.*?```\n(.*?)```", text, re.S)
    if block is None:
        raise ValueError(f"{design}: no fenced block under '## Layers'")
    lines = []
    for row in block.group(1).splitlines():
        if not row or row[0].isspace():
            continue  # a description's continuation
        entries = []
        for token in row.split():
            if not re.fullmatch(r"[\w]+(\.py|/)", token):
                break
            entries.append(token)
        lines.append(entries)
    return lines


def module_names(package: Path) -> list[str]:
    """Dotted names of the modules (``"ntk"``, ``"linalg.lanczos"``); the root excluded."""
    names = []
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        if parts:
            names.append(".".join(parts))
    return names


def entry_of(module: str, package: Path = PACKAGE) -> str:
    """The Layers entry a module belongs to: ``"ntk.py"``, or ``"linalg/"`` for its package."""
    head, _, rest = module.partition(".")
    return f"{head}/" if rest or (package / head).is_dir() else f"{head}.py"


def _is_package(package: Path, module: str) -> bool:
    return (package / module.replace(".", "/") / "__init__.py").exists()


def _tree(package: Path, module: str) -> ast.Module:
    """The parsed source of ``module`` (its ``__init__.py`` for a subpackage)."""
    rel = module.replace(".", "/")
    path = package / rel / "__init__.py" if _is_package(package, module) else package / f"{rel}.py"
    return ast.parse(path.read_text(), str(path))


def imports(package: Path) -> list[Import]:
    """Every import of a package module inside ``package`` (by its directory name)."""
    pkg = package.name
    known = set(module_names(package))
    found = []
    for module in module_names(package):
        tree = _tree(package, module)
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            level = id(node) in top
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == pkg or alias.name.startswith(pkg + "."):
                        target = alias.name[len(pkg) + 1:]
                        found.append(Import(module, target, (), level, node.lineno))
            elif isinstance(node, ast.ImportFrom) and node.module is not None:
                name = node.module
                if node.level:  # relative: resolve against the importer's package
                    parts = module.split(".")
                    base = parts if _is_package(package, module) else parts[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    name = ".".join([pkg, *base, node.module])
                if name != pkg and not name.startswith(pkg + "."):
                    continue
                target = name[len(pkg) + 1:]
                for alias in node.names:  # `from curvlab import ntk` imports the module ntk
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in known:
                        found.append(Import(module, sub, (), level, node.lineno))
                    else:
                        found.append(Import(module, target, (alias.name,), level, node.lineno))
    return found


def private_attributes(package: Path) -> list[tuple[str, str, str, int]]:
    """``(importer, target, attr, line)`` for ``alias._name`` on an imported package module."""
    pkg = package.name
    known = set(module_names(package))
    found = []
    for module in module_names(package):
        tree = _tree(package, module)
        aliases: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(pkg):
                target = node.module[len(pkg) + 1:]
                for alias in node.names:
                    sub = f"{target}.{alias.name}" if target else alias.name
                    if sub in known:
                        aliases[alias.asname or alias.name] = sub
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and node.attr.startswith("_")
                    and not node.attr.startswith("__")):
                found.append((module, aliases[node.value.id], node.attr, node.lineno))
    return found


def _subpackage(module: str) -> str:
    return module.split(".")[0] if "." in module else module


def violations(package: Path, order: list[list[str]]) -> list[str]:
    """Every broken rule of the module docstring, one line each (empty: the layers hold)."""
    rank = {entry: i for i, line in enumerate(order) for entry in line}
    modules = module_names(package)
    entries = {m: entry_of(m, package) for m in modules}
    problems = [f"{m}: not in the Layers block of docs/design.md (as {entries[m]})"
                for m in modules if entries[m] not in rank]
    problems += [f"{entry}: in the Layers block but not in the package" for entry in rank
                 if entry not in entries.values()]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in imports(package):
        where = f"{imp.importer} (line {imp.line})"
        if imp.target == "":
            problems.append(f"{where}: imports the package root ({', '.join(imp.names)}); "
                            "import from the defining module")
            continue
        graph[imp.importer].add(imp.target)
        if (imp.target == "testing" or imp.target.startswith("testing.")) and \
                not imp.importer.startswith("testing"):
            problems.append(f"{where}: production code imports {imp.target}")
        private = [n for n in imp.names if n.startswith("_") and not n.startswith("__")]
        if private and _subpackage(imp.importer) != _subpackage(imp.target):
            problems.append(f"{where}: private {private} from {imp.target}")
        a, b = entries[imp.importer], entries.get(imp.target, entry_of(imp.target, package))
        if a != b and a in rank and b in rank and rank[b] <= rank[a]:
            problems.append(f"{where}: imports {imp.target}, which is "
                            f"{'on the same line' if rank[a] == rank[b] else 'above it'}")
    for importer, target, attr, line in private_attributes(package):
        if _subpackage(importer) != _subpackage(target):
            problems.append(f"{importer} (line {line}): private {target}.{attr}")
    problems += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return list(dict.fromkeys(problems))  # one line per problem, in order


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each strongly connected part of ``graph`` that has one."""
    found: list[list[str]] = []
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append([*stack[stack.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def optional_imports(package: Path) -> list[str]:
    """Module-level imports of optional extras outside the adapters."""
    problems = []
    for module in module_names(package):
        if module in ADAPTERS:
            continue
        for node in _tree(package, module).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name.split(".")[0] in OPTIONAL:
                    problems.append(f"{module} (line {node.lineno}): imports the optional "
                                    f"{name} at module level; import it where it is used")
    return problems


# -- the real package -------------------------------------------------------------------------


def test_the_layers_of_docs_design_hold_for_curvlab() -> None:
    order = layer_order()
    assert len(order) > 10, order  # the block was parsed
    assert violations(PACKAGE, order) == []


def test_no_optional_extra_is_imported_at_module_level() -> None:
    assert optional_imports(PACKAGE) == []


def test_version_comes_from_the_package_metadata() -> None:
    import importlib.metadata

    import curvlab

    assert curvlab.__version__ == importlib.metadata.version("curvlab")


# -- the checker fails where it should --------------------------------------------------------


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "curvlab"
    for rel, text in {"__init__.py": "", **files}.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(text)
    return pkg


ORDER = [["top.py"], ["mid.py", "side.py"], ["sub/"], ["low.py"]]
CLEAN = {"top.py": "from curvlab import mid\nfrom curvlab.low import f\n",
         "mid.py": "from curvlab.sub import a\n", "side.py": "", "low.py": "def f(): pass\n",
         "sub/__init__.py": "from curvlab.sub.a import g\n",
         "sub/a.py": "from curvlab.sub._b import _h\nfrom curvlab import low\n",
         "sub/_b.py": "def _h(): pass\n"}


def test_checker_passes_a_clean_package(tmp_path: Path) -> None:
    assert violations(_package(tmp_path, CLEAN), ORDER) == []


@pytest.mark.parametrize(("change", "message"), [
    ({"low.py": "from curvlab import mid\n"}, r"low \(line 1\): imports mid, which is above it"),
    ({"mid.py": "import curvlab.side\n"}, r"mid \(line 1\): imports side, which is on the same"),
    ({"low.py": "def f():\n    from curvlab.top import x\n"}, r"low \(line 2\): imports top"),
    ({"sub/_b.py": "from curvlab.sub import a\n"}, r"import cycle: sub\.\S* -> .*sub"),
    ({"top.py": "from curvlab.low import _f\n"}, r"top \(line 1\): private \['_f'\] from low"),
    ({"top.py": "from curvlab import low\nlow._f()\n"}, r"top \(line 2\): private low\._f"),
    ({"top.py": "from curvlab.testing import mse\n", "testing.py": ""},
     r"top \(line 1\): production code imports testing"),
    ({"low.py": "from curvlab import __version__\n"}, r"low \(line 1\): imports the package root"),
    ({"extra.py": ""}, r"extra: not in the Layers block"),
])
def test_checker_reports_each_broken_rule(tmp_path: Path, change: dict[str, str],
                                          message: str) -> None:
    found = violations(_package(tmp_path, {**CLEAN, **change}), ORDER)
    assert any(re.search(message, line) for line in found), found


def test_checker_reports_module_level_optional_imports(tmp_path: Path) -> None:
    pkg = _package(tmp_path, {**CLEAN, "low.py": "import transformers\n",
                              "mid.py": "def f():\n    import lightning\n"})
    assert optional_imports(pkg) == ["low (line 1): imports the optional transformers at module "
                                     "level; import it where it is used"]
