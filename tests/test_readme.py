"""The README is the package's page on a package index, where a link to a
file of the repository has nowhere to go: it names files as paths."""

import os
import re
import unittest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Inline links and images `[text](target)`, reference definitions
# `[label]: target`, and HTML `href`/`src` attributes.
_TARGETS = (
    r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)",
    r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)",
    r"""\b(?:href|src)\s*=\s*["']([^"']+)""",
)


def relative_links(markdown):
    """Link targets in `markdown` that are not absolute URLs or anchors."""
    prose = re.sub(r"```.*?```", "", markdown, flags=re.S)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    found = []
    for pattern in _TARGETS:
        for target in re.findall(pattern, prose, flags=re.M):
            if not re.match(r"(https?|mailto):|#", target):
                found.append(target)
    return found


class ReadmeTest(unittest.TestCase):
    def test_no_relative_links(self):
        with open(os.path.join(ROOT, "README.md")) as f:
            readme = f.read()
        self.assertEqual(
            relative_links(readme), [],
            "relative links break on a package index page; name the file "
            "as a path (`docs/...`) or link an absolute URL",
        )

    def test_the_check_finds_relative_links(self):
        markdown = (
            "[a](docs/a.md) ![b](b.png) [ok](https://x.org) [c](#top)\n"
            "[d]: examples/README.md\n<a href=\"e.md\">e</a>\n"
            "`[f](in/code.md)`\n```\n[g](in/block.md)\n```\n"
        )
        self.assertEqual(
            relative_links(markdown),
            ["docs/a.md", "b.png", "examples/README.md", "e.md"],
        )


if __name__ == "__main__":
    unittest.main()
