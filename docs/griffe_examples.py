"""A griffe extension for the API pages: a Google-style ``Example:`` section is read as ``Examples:``.

Griffe renders a singular ``Example:`` as an admonition (plain Markdown), so ``>>> x[-1][0]`` in it
reads as a Markdown reference link; ``Examples:`` renders ``>>>`` lines as code, as intended.
"""

from __future__ import annotations

import re

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:\s*$", flags=re.M)


class ExampleAsExamples(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _SINGULAR.sub(r"\1Examples:", obj.docstring.value)
