"""Tests of the documentation site: strict build, API coverage, examples,
and pages that fit a 1280-pixel-wide browser window."""

import atexit
import doctest
import functools
import glob
import html
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest
from absl.testing import parameterized

import keras_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings_handlers.python", "ruff")
# mkdocs.yml's `line_length` for signatures.
SIGNATURE_LINE_LENGTH = 72
# Characters of a code line that fit a code block of a 1280-pixel-wide
# window with room for the copy button (measured in Chromium, below).
CODE_LINE_LENGTH = 76
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _missing_docs_packages():
    return [
        name for name in DOCS_PACKAGES
        if importlib.util.find_spec(name.split(".")[0]) is None
        or importlib.util.find_spec(name) is None
    ]


needs_docs_packages = pytest.mark.skipif(
    bool(_missing_docs_packages()),
    reason="the docs build needs the `docs` extra (pip install "
    f"'.[docs]'); missing: {_missing_docs_packages()}",
)


def _build(site):
    result = subprocess.run(
        [
            sys.executable, "-m", "mkdocs", "build", "--strict",
            "--config-file", os.path.join(ROOT, "mkdocs.yml"),
            "--site-dir", site,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    return result.returncode, result.stdout + result.stderr


@functools.cache
def _built_site():
    """The site, built once for the browser checks."""
    site = tempfile.mkdtemp(prefix="keras_bn_site_")
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    returncode, output = _build(site)
    assert returncode == 0, output
    return site


def _code_blocks(markdown):
    """Yields `(line_number, lines)` of each code block in `markdown`."""
    lines = markdown.split("\n")
    i = 0
    while i < len(lines):
        fence = re.match(r"^( *)```", lines[i])
        if fence:
            indent, start = len(fence.group(1)), i + 1
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                i += 1
            yield start + 1, [line[indent:] for line in lines[start:i]]
        elif (
            lines[i].startswith("    ")
            and (i == 0 or not lines[i - 1].strip())
            and not re.match(r"^ *([-*]|\d+\.) ", lines[i])
        ):
            start = i
            while i < len(lines) and (
                lines[i].startswith("    ") or not lines[i].strip()
            ):
                i += 1
            yield start + 1, [line[4:] for line in lines[start:i]]
            continue
        i += 1


# Run in each page after Material's scripts have added the copy buttons:
# records code blocks that scroll sideways or whose text runs under the
# copy button, tables that scroll, and a page wider than the window.
_OVERFLOW_SCRIPT = r"""
<script>
window.addEventListener("load", () => setTimeout(() => {
  const found = [];
  const canvas = document.createElement("canvas").getContext("2d");
  document.querySelectorAll("pre").forEach((pre) => {
    const code = pre.querySelector("code") || pre;
    const style = getComputedStyle(code);
    canvas.font = style.fontSize + " " + style.fontFamily;
    const lines = code.textContent.replace(/\n$/, "").split("\n");
    const box = code.getBoundingClientRect();
    const left = box.left + parseFloat(style.paddingLeft);
    const top = box.top + parseFloat(style.paddingTop);
    const height = parseFloat(style.lineHeight);
    const nav = pre.querySelector(".md-code__nav");
    const button = nav ? nav.getBoundingClientRect() : null;
    lines.forEach((line, k) => {
      const right = left + canvas.measureText(line).width;
      const lineTop = top + k * height;
      const covered = button && right > button.left
        && lineTop < button.bottom && lineTop + height > button.top;
      if (code.scrollWidth > code.clientWidth + 1 && right > box.right
          || covered) {
        found.push((covered ? "under the copy button: " : "overflows: ")
                   + line);
      }
    });
  });
  document.querySelectorAll("table").forEach((table) => {
    const wrap = table.parentElement;
    if (wrap.scrollWidth > wrap.clientWidth + 1) {
      found.push("table overflows: " + table.rows[0].textContent.trim());
    }
  });
  if (document.documentElement.scrollWidth > window.innerWidth + 1) {
    found.push("page wider than the window");
  }
  document.body.setAttribute("data-overflow", JSON.stringify(found));
}, 1000));
</script>
"""


def _overflow(site, page):
    """What overflows on `page` (an HTML file of `site`) in Chromium."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "site")
        shutil.copytree(site, copy)
        path = os.path.join(copy, page)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("</body>", _OVERFLOW_SCRIPT + "</body>"))
        dom = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1280,900",
                "--virtual-time-budget=5000", "--dump-dom",
                "file://" + path,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    found = re.search(r'data-overflow="([^"]*)"', dom)
    assert found, f"the check did not run on {page}"
    return json.loads(html.unescape(found.group(1)))


def _html_page(page):
    name = os.path.basename(page)[:-3]
    return "index.html" if name == "index" else f"{name}/index.html"


class DocsTest(parameterized.TestCase):
    @pytest.mark.slow
    @needs_docs_packages
    def test_strict_build(self):
        with tempfile.TemporaryDirectory() as site:
            returncode, output = _build(site)
            self.assertEqual(returncode, 0, output)
            with open(os.path.join(site, "api", "index.html")) as f:
                api = f.read()
        missing = [
            name for name in keras_bn.__all__
            if name != "__version__" and f'id="keras_bn.{name}' not in api
        ]
        self.assertEqual(missing, [], "public names without an API entry")
        signatures = [
            html.unescape(re.sub(r"<[^>]+>", "", block))
            for block in re.findall(
                r'<div class="doc-signature highlight"><pre>(.*?)</pre>',
                api,
                flags=re.S,
            )
        ]
        self.assertNotEmpty(signatures)
        for signature in signatures:
            lines = signature.strip().split("\n")
            self.assertLessEqual(
                max(len(line) for line in lines),
                SIGNATURE_LINE_LENGTH,
                signature,
            )
        layer = [s for s in signatures if s.startswith("BatchNormalization(")]
        self.assertLen(layer, 1)
        # One argument a line.
        self.assertIn("\n    momentum=0.99,\n", layer[0])

    @parameterized.named_parameters(
        (os.path.basename(page)[:-3], page) for page in PAGES
    )
    def test_code_lines_fit_the_page(self, page):
        with open(page) as f:
            markdown = f.read()
        long_lines = [
            (start + k, line)
            for start, lines in _code_blocks(markdown)
            for k, line in enumerate(lines)
            if len(line.rstrip()) > CODE_LINE_LENGTH
        ]
        self.assertEqual(long_lines, [], f"{page}: code lines too long")

    @pytest.mark.slow
    @needs_docs_packages
    @pytest.mark.skipif(
        CHROMIUM is None,
        reason="the browser check needs Chromium (apt-get install chromium)",
    )
    @parameterized.named_parameters(
        (os.path.basename(page)[:-3], _html_page(page)) for page in PAGES
    )
    def test_page_fits_1280_pixels(self, page):
        found = _overflow(_built_site(), page)
        self.assertEqual(found, [], f"{page} at 1280 pixels")

    def test_api_page_covers_every_public_name(self):
        with open(os.path.join(DOCS, "api.md")) as f:
            api = f.read()
        missing = [
            name for name in keras_bn.__all__
            if name != "__version__" and f"::: keras_bn.{name}" not in api
        ]
        self.assertEqual(missing, [], "add them to docs/api.md")

    @parameterized.named_parameters(
        (os.path.basename(page)[:-3], page) for page in PAGES
    )
    def test_page_examples(self, page):
        result = doctest.testfile(
            page,
            module_relative=False,
            optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE,
        )
        self.assertEqual(result.failed, 0, f"{page}: see the output above")
