"""The docs cannot rot: the API page is generated from the code, and every relative link resolves."""
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "tools"))
from apidoc import render  # noqa: E402  (a developer tool, outside the installed package)


def test_api_reference_is_current():
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == render(), "run: python tools/apidoc.py > docs/api.md"


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
