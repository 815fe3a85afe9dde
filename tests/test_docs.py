"""The docs cannot rot: the API page is generated from the code, and every relative link resolves."""
import pathlib
import re

from adam_mini_tx.apidoc import render

ROOT = pathlib.Path(__file__).parent.parent


def test_api_reference_is_current():
    committed = (ROOT / "docs" / "api.md").read_text()
    assert committed == render(), "run: python -m adam_mini_tx.apidoc > docs/api.md"


def test_relative_links_resolve():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if "://" not in target and not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken
