"""A griffe extension for the documentation site (``mkdocs.yml``): reads curvlab's docstrings.

curvlab's docstrings are Google style with reStructuredText inline markup. Before mkdocstrings
parses them, this extension

- renames an ``Example:`` section to ``Examples:``, the name under which griffe renders doctest
  lines (``>>>``) as code; under any other name they would be read as Markdown text;
- turns the roles ``:func:`~curvlab.x.f``` (and ``:class:``, ``:meth:``, ...) into code spans
  (``f``; the full path without ``~``);
- turns a paragraph that ends in the literal-block marker ``::`` into one that ends in ``:``
  (the indented block after it is a code block in Markdown too).

The source files are not changed.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", re.M)
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|exc|obj|py:\w+):`(~?)([^`]+)`")
_LITERAL = re.compile(r"(\S)::[ \t]*$", re.M)


def _role(match: re.Match[str]) -> str:
    tilde, target = match.groups()
    return f"``{target.rsplit('.', 1)[-1] if tilde else target}``"


def rewrite(text: str) -> str:
    """The docstring ``text`` with the three rewrites above.

    Example:
        >>> rewrite("See :func:`~curvlab.linalg.lanczos`::")
        'See ``lanczos``:'
    """
    text = _EXAMPLE.sub(r"\1Examples:", text)
    text = _ROLE.sub(_role, text)
    return _LITERAL.sub(r"\1:", text)


class CurvlabDocstrings(griffe.Extension):
    """Applies :func:`rewrite` to every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value)
