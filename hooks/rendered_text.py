"""mkdocs hook: fail the build when a rendered page shows reStructuredText syntax as text.

The API reference is rendered from Google-style docstrings with markdown cross-references. A leftover
Sphinx role (`:class:`...``) or a literal-block marker (`::` at the end of a paragraph) would be printed as
is; this hook turns that into a build error naming the page and the text.
"""

from __future__ import annotations

import html
import re
from typing import Any

from mkdocs.exceptions import PluginError

_CODE = re.compile(r"<(pre|code)\b.*?</\1>", re.S)
_TAG = re.compile(r"<[^>]+>")
_RST = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|mod|data|exc|obj|ref|const|term|doc):`|\w::(?:\s|$)|^\s*::\s*$", re.M
)


def on_post_page(output: str, page: Any, config: Any) -> str:
    """Check the page's text outside code for reStructuredText roles and `::` markers."""
    text = html.unescape(_TAG.sub(" ", _CODE.sub(" ", output)))
    found = sorted({m.group(0).strip() for m in _RST.finditer(text)})
    if found:
        where = [text[max(0, m.start() - 60) : m.end() + 20].replace("\n", " ") for m in _RST.finditer(text)][:5]
        raise PluginError(f"{page.file.src_uri}: reStructuredText shown as text: {found}; e.g. {where}")
    return output
