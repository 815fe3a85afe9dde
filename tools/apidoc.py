"""Render the API reference (docs/api.md) from the public names' signatures and docstrings.

``python tools/apidoc.py > docs/api.md``; a test checks that the committed page is current. A
developer tool: it is not part of the installed package.
"""
from __future__ import annotations

import inspect

import adam_mini_tx


def _signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def render() -> str:
    """The markdown page: one section per name in ``adam_mini_tx.__all__``, in that order."""
    lines = ["# API reference", "",
             "Generated from the docstrings by `python tools/apidoc.py > docs/api.md`; "
             "`tests/test_docs.py` fails when this page is out of date.", ""]
    for name in adam_mini_tx.__all__:
        obj = getattr(adam_mini_tx, name)
        kind = "class" if inspect.isclass(obj) else "function"
        lines += [f"## `{name}`", "", f"```python\n{kind} {name}{_signature(obj)}\n```", "",
                  inspect.cleandoc(obj.__doc__ or "(no docstring)"), ""]
        if inspect.isclass(obj):
            for method_name, method in vars(obj).items():
                if method_name.startswith("_") or not callable(method) or not method.__doc__:
                    continue
                lines += [f"### `{name}.{method_name}`", "",
                          f"```python\n{method_name}{_signature(method)}\n```", "",
                          inspect.cleandoc(method.__doc__), ""]
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
