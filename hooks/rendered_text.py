"""mkdocs hook: fail the build when a rendered page shows reStructuredText syntax or a doctest as text.

The API reference is rendered from Google-style docstrings with markdown cross-references. A leftover
Sphinx role (`:class:`...``) or a literal-block marker (`::` at the end of a paragraph) would be printed as
is, and a `>>>` example outside a docstring's `Examples:` section (which mkdocstrings renders as code) becomes
markdown: three nested block quotes, or the prompt as text. This hook turns each into a build error naming the
page and the text.
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


# a doctest rendered as markdown: `>>> x` is a quote in a quote in a quote; `>>>` left in text (a table cell)
_NESTED_QUOTE = re.compile(r"<blockquote>\s*<blockquote>")
_PROMPT = re.compile(r"(?<!\S)>>>(?=\s)")


def on_post_page(output: str, page: Any, config: Any) -> str:
    """Check the page's text outside code for reStructuredText roles and `::` markers, and for doctests
    rendered as nested quotes or text."""
    outside_code = _CODE.sub(" ", output)
    text = html.unescape(_TAG.sub(" ", outside_code))
    found = sorted({m.group(0).strip() for m in _RST.finditer(text)})
    if found:
        where = [text[max(0, m.start() - 60) : m.end() + 20].replace("\n", " ") for m in _RST.finditer(text)][:5]
        raise PluginError(f"{page.file.src_uri}: reStructuredText shown as text: {found}; e.g. {where}")
    quotes = [
        html.unescape(_TAG.sub(" ", outside_code[m.end() : m.end() + 120]))
        for m in _NESTED_QUOTE.finditer(outside_code)
    ]
    prompts = [text[m.start() : m.start() + 80] for m in _PROMPT.finditer(text)]
    if quotes or prompts:
        where = [" ".join(w.split()) for w in quotes + prompts][:5]
        raise PluginError(
            f"{page.file.src_uri}: a doctest shown as nested quotes or text (put `>>>` examples in a docstring's "
            f"`Examples:` section, which renders as code); e.g. {where}"
        )
    return output
