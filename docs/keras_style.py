"""Rendering of Keras-style text on the documentation site.

Keras-style docstrings and pages put runnable `>>>` examples and a
`Call arguments:` list in plain text, which Markdown would render as nested
block quotes (with `x["a"](b)` read as a link) and one run-on paragraph.
Before rendering, examples become `pycon` code blocks, call arguments a
bulleted list, and an `Args:` entry that names several arguments over
several lines one line. The sources stay as `help()` and doctest read them.

Two entry points: the Griffe extension `KerasDocstrings` (docstrings, for
mkdocstrings) and the MkDocs hook `on_page_markdown` (the pages).
"""

import re

import griffe

_ENTRY = re.compile(r"^    (\w+): (.*)$")
_GROUP = re.compile(r"^    \w+(, \w+)*,$")


def _fence_examples(lines):
    """Wraps each run of lines that starts with `>>>` in a code block."""
    out, in_example, in_fence = [], False, False
    for line in lines:
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif line.startswith(">>>") and not in_example and not in_fence:
            out.append("```pycon")
            in_example = True
        elif in_example and not line.strip():
            out.append("```")
            in_example = False
        out.append(line)
    if in_example:
        out.append("```")
    return out


def _join_grouped_arguments(lines):
    """Joins an `Args:` entry naming several arguments over several lines.

    Google-style parsers expect `name: description` on the entry's first
    line; "a, b,\n        c: As in ..." is rewritten as "a, b, c: As in".
    """
    out = []
    for line in lines:
        if (
            out
            and _GROUP.match(out[-1])
            and line.startswith("        ")
        ):
            out[-1] = f"{out[-1]} {line.strip()}"
            continue
        out.append(line)
    return out


def _list_call_arguments(lines):
    out, in_section = [], False
    for line in lines:
        if line == "Call arguments:":
            out.extend(["**Call arguments:**", ""])
            in_section = True
            continue
        if in_section and line and not line.startswith(" "):
            in_section = False
        if in_section:
            entry = _ENTRY.match(line)
            if entry:
                line = f"- `{entry.group(1)}`: {entry.group(2)}"
            elif line.startswith("        "):
                line = "  " + line.strip()
        out.append(line)
    return out


class KerasDocstrings(griffe.Extension):
    def on_object(self, *, obj, **kwargs):
        if obj.is_alias or obj.docstring is None:
            return
        lines = obj.docstring.value.split("\n")
        lines = _fence_examples(_join_grouped_arguments(lines))
        lines = _list_call_arguments(lines)
        obj.docstring.value = "\n".join(lines)


def on_page_markdown(markdown, **kwargs):
    return "\n".join(_fence_examples(markdown.split("\n")))
