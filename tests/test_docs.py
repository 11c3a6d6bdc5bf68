"""Nothing in the repository points outside it, and the documentation site builds strictly.

A user's clone holds only the repository, so every link and path a reader (or a docstring) is
sent to must be inside it. The scan covers the README, ``docs/``, the benchmarks' README and
scripts, the examples, the notebooks, the package, the tests, ``scripts/`` and the build files.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Folders at the top of the repository: a path that starts with one names a repository file.
TOP_FOLDERS = ("curvlab", "tests", "docs", "examples", "notebooks", "benchmarks", "scripts", ".ci")
# Home and workspace folders of a machine: a path into one is outside any clone.
MACHINE_FOLDERS = ("work", "home", "Users", "root", "mnt", "scratch")
WEB_SCHEMES = ("http://", "https://", "mailto:")

_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[ \t]*$", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^()\s<>]+(?:\([^()\s]*\))?)>?"  # [text](target
                          r"(?:\s+[\"'][^\n]*?[\"'])?\s*\)")  # an optional "title", then )
_REF_LINK = re.compile(r"^[ \t]*\[[^\]\n]+\]:[ \t]*<?(\S+?)>?(?:[ \t]+.*)?$", re.M)
_HTML_LINK = re.compile(r"\b(?:href|src)\s*=\s*[\"']([^\"']+)[\"']")
_SNIPPET = re.compile(r"^[ \t]*--8<--[ \t]+[\"']([^\"']+)[\"']", re.M)
_PARENT = re.compile(r"(?<![\w./-])((?:\.\./)+)([^\s`'\"()\[\]<>,;:]*)")
_MACHINE = "|".join(MACHINE_FOLDERS)
_ABSOLUTE = re.compile(rf"(?<![\w.~/:-])(/(?:{_MACHINE})(?:/[^\s`'\"()\[\]<>,;]*)?)(?![\w-])")
_CAPS_DOC = re.compile(r"(?<![\w./-])((?:[\w.-]+/)*[A-Z][A-Z0-9_-]*\.md)(?![\w/-])")
_TOP = "|".join(re.escape(f) for f in TOP_FOLDERS)
_REPO_PATH = re.compile(rf"(?<![\w./-])((?:{_TOP})/[\w./-]*\w)")
_PLACEHOLDER = re.compile(r"[<>*{}$%\[\]]")


def scanned_files() -> list[Path]:
    """Every file whose text is checked."""
    files = [ROOT / "README.md", ROOT / "mkdocs.yml", ROOT / "pyproject.toml", ROOT / "Makefile",
             ROOT / ".ci" / "run"]
    files += sorted((ROOT / "docs").rglob("*.md"))
    files += sorted((ROOT / "benchmarks").glob("*.md")) + sorted((ROOT / "benchmarks").glob("*.py"))
    files += sorted((ROOT / "examples").glob("*.py"))
    files += sorted((ROOT / "notebooks").glob("*.ipynb"))
    files += sorted((ROOT / "curvlab").rglob("*.py"))
    files += sorted(p for p in (ROOT / "tests").rglob("*.py") if p != Path(__file__).resolve())
    files += sorted(p for p in (ROOT / "scripts").glob("*") if p.is_file())
    return [f for f in files if f.is_file()]


def _texts(path: Path) -> list[tuple[str, str]]:
    """``(kind, text)`` pieces of a file: ``"markdown"`` or ``"code"``."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".md":
        return [("markdown", text)]
    if path.suffix == ".ipynb":
        cells = json.loads(text)["cells"]
        return [("markdown" if c["cell_type"] == "markdown" else "code", "".join(c["source"]))
                for c in cells]
    return [("code", text)]


def _inside(path: Path) -> bool:
    return path == ROOT or ROOT in path.parents


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _names_of_files() -> set[str]:
    """Base names of the files in the repository's own folders (for bare document names)."""
    names = {p.name for p in ROOT.iterdir() if p.is_file()}
    for folder in TOP_FOLDERS:
        if (ROOT / folder).is_dir():
            names |= {p.name for p in (ROOT / folder).rglob("*") if p.is_file()}
    return names


def _check_link(source: Path, target: str) -> str | None:
    """Why a Markdown link target is not allowed, or ``None``."""
    if target.startswith("#") or target.lower().startswith(WEB_SCHEMES):
        return None
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) and not re.match(r"^[a-zA-Z]:[\\/]", target):
        return "a link to a non-web address" if target.lower().startswith("file:") else None
    path = unquote(target.split("#", 1)[0].split("?", 1)[0])
    if not path:
        return None
    if path.startswith(("/", "~", "\\")) or re.match(r"^[a-zA-Z]:[\\/]", path):
        return "a link to an absolute path"
    resolved = (source.parent / path).resolve()
    if not _inside(resolved):
        return "a link outside the repository"
    if not resolved.exists():
        return "a link to a file that does not exist"
    return None


def problems_in(source: Path, pieces: list[tuple[str, str]],
                names: set[str] | None = None) -> list[str]:
    """Every reference in ``pieces`` (the text of ``source``) that points outside the repository,
    or, for links and repository paths, to a file that does not exist."""
    names = _names_of_files() if names is None else names
    where = source.relative_to(ROOT) if _inside(source) else source
    found: list[str] = []

    def report(text: str, pos: int, why: str, target: str) -> None:
        found.append(f"{where}:{_line(text, pos)}: {why}: {target}")

    for kind, text in pieces:
        if kind == "markdown":
            # Links in prose only: code blocks and code spans show text, not links (same length,
            # so line numbers stay right).
            prose = _FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)
            prose = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), prose)
            for pattern in (_INLINE_LINK, _REF_LINK, _HTML_LINK):
                for m in pattern.finditer(prose):
                    why = _check_link(source, m.group(1))
                    if why:
                        report(text, m.start(1), why, m.group(1))
            for m in _SNIPPET.finditer(text):
                snippet = re.sub(r"(:\d+)+$", "", m.group(1))
                if not _inside((ROOT / snippet).resolve()) or not (ROOT / snippet).exists():
                    report(text, m.start(1), "an included file outside the repository or "
                                             "missing", m.group(1))
        for m in _PARENT.finditer(text):
            up = m.group(1).count("../")
            base = source.parent.resolve()
            for _ in range(up):
                base = base.parent
            if not _inside(base):
                report(text, m.start(), "a relative path that leaves the repository",
                       m.group(0))
        for m in _ABSOLUTE.finditer(text):
            report(text, m.start(1), "an absolute path on a machine", m.group(1))
        for m in re.finditer(re.escape(str(ROOT) + os.sep), text):
            report(text, m.start(), "the absolute path of this checkout", str(ROOT))
        for m in _CAPS_DOC.finditer(text):
            doc = m.group(1)
            candidates = [source.parent / doc, ROOT / doc]
            if any(c.exists() and _inside(c.resolve()) for c in candidates):
                continue
            if "/" not in doc and doc in names:
                continue
            report(text, m.start(1), "a document that is not in the repository", doc)
        for m in _REPO_PATH.finditer(text):
            path = m.group(1)
            token = re.match(r"[^\s`'\"()]*", text[m.start(1):])
            if token and _PLACEHOLDER.search(token.group(0)):
                continue  # a pattern or template (``examples/*.py``, ``docs/<name>.png``)
            if not (ROOT / path).exists():
                report(text, m.start(1), "a repository path that does not exist", path)
    return found


def test_nothing_points_outside_the_repository() -> None:
    names = _names_of_files()
    found = [p for f in scanned_files() for p in problems_in(f, _texts(f), names)]
    assert not found, ("references outside the repository, or to missing files (a clone has "
                       "only the repository):\n" + "\n".join(found))


def test_the_scan_finds_what_it_should() -> None:
    """The checks fail where they should: a sample with one problem per kind, and a clean one."""
    names = _names_of_files()
    doc = ROOT / "docs" / "sample.md"
    bad = ("See [the contract](../../shared/DESIGN.md), [gone](missing.md),\n"
           "[abs](/etc/hosts) and ![fig](../../figure.png).\n"
           "The math is in MATH.md section 3; the old copy was at /work/shared/MATH.md.\n"
           "A path: ../../shared/notes.txt, and tests/no_such_test.py.\n")
    found = problems_in(doc, [("markdown", bad)], names)
    expected = ["a link outside the repository: ../../shared/DESIGN.md",
                "a link to a file that does not exist: missing.md",
                "a link to an absolute path: /etc/hosts",
                "a link outside the repository: ../../figure.png",
                "a document that is not in the repository: MATH.md",
                "an absolute path on a machine: /work/shared/MATH.md",
                "a relative path that leaves the repository: ../../shared/notes.txt",
                "a repository path that does not exist: tests/no_such_test.py"]
    for item in expected:
        assert any(item in p for p in found), (item, found)
    module = ROOT / "curvlab" / "sample.py"
    found = problems_in(module, [("code", '"""Schema in DESIGN.md; see ../../shared/x."""')],
                        names)
    assert len(found) == 2, found
    good = ("See [the math](math.md#4-empirical-ntk), [arXiv](https://arxiv.org/abs/2311.18718),\n"
            "`[not a link](nowhere.md)`, docs/math.md section 5, README.md, `../runs/<run>.h5`,\n"
            "examples/*.py and /shared/sweeps/mup on a cluster.\n")
    assert problems_in(doc, [("markdown", good)], names) == []


def test_docstring_extension_rewrites() -> None:
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_docstrings",
                                                  ROOT / "scripts" / "griffe_docstrings.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Uses :func:`~curvlab.linalg.lanczos` and :class:`curvlab.EigResult`::\n\nExample:\n"
    assert module.rewrite(text) == ("Uses ``lanczos`` and ``curvlab.EigResult``:\n\n"
                                    "Examples:\n")


def test_docs_build_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: any warning (a broken link, a docstring it cannot render)
    fails, as in CI's ``make docs``. About 5 s on a 2-core CPU."""
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
         str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False)
    elapsed = time.perf_counter() - start
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "api" / "linalg" / "index.html").exists()
    assert elapsed < 120, f"the docs build took {elapsed:.0f} s"
