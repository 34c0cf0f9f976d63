"""The ``tl-logitlens`` command: the parser and ``run``/``demo``/``eval`` (:mod:`.commands`), the ``fit``
commands (:mod:`.fit`), what they share (:mod:`.shared`) and the terminal's tables (:mod:`.terminal`).

The top floor: it may import every other package, none imports it. Standard library only at import, so
``--help`` and argument errors are answered before torch loads.
"""

from tl_logitlens.cli.commands import main

__all__ = ["main"]
