"""Tests of the documentation site: strict build, API coverage, examples."""

import doctest
import glob
import importlib.util
import os
import subprocess
import sys
import tempfile

import pytest
from absl.testing import parameterized

import keras_bn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
PAGES = sorted(glob.glob(os.path.join(DOCS, "*.md")))
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings_handlers.python")


def _missing_docs_packages():
    return [
        name for name in DOCS_PACKAGES
        if importlib.util.find_spec(name.split(".")[0]) is None
        or importlib.util.find_spec(name) is None
    ]


class DocsTest(parameterized.TestCase):
    @pytest.mark.slow
    @pytest.mark.skipif(
        bool(_missing_docs_packages()),
        reason="the docs build needs the `docs` extra (pip install "
        f"'.[docs]'); missing: {_missing_docs_packages()}",
    )
    def test_strict_build(self):
        with tempfile.TemporaryDirectory() as site:
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
            self.assertEqual(
                result.returncode, 0, result.stdout + result.stderr
            )
            with open(os.path.join(site, "api", "index.html")) as f:
                api = f.read()
        missing = [
            name for name in keras_bn.__all__
            if name != "__version__" and f'id="keras_bn.{name}' not in api
        ]
        self.assertEqual(missing, [], "public names without an API entry")

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
