"""Every ```python block of the recipe pages marked ``<!-- test: execute -->`` runs, in order, in
one namespace per page (pages of snippets for other frameworks are not marked)."""
import pathlib
import re

import pytest

MARKER = "<!-- test: execute -->"
RECIPES = sorted(p for p in (pathlib.Path(__file__).parent.parent / "docs" / "recipes").glob("*.md")
                 if MARKER in p.read_text())
CODE = re.compile(r"```python\n(.*?)```", re.DOTALL)


@pytest.mark.parametrize("page", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_page_runs(page):
    blocks = CODE.findall(page.read_text())
    assert blocks, f"{page.name} has no python blocks"
    namespace = {"__name__": f"recipe_{page.stem}"}
    for index, block in enumerate(blocks):
        try:
            exec(compile(block, f"{page.name}[block {index}]", "exec"), namespace)
        except Exception as error:  # name the failing block
            raise AssertionError(f"{page.name} block {index} failed: {error!r}") from error


def test_the_torch_recipes_are_executed():
    assert {"composition.md", "torch_func.md"} <= {p.name for p in RECIPES}
