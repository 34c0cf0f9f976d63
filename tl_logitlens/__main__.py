"""``python -m tl_logitlens ...`` is ``tl-logitlens ...`` (and ``torchrun -m tl_logitlens eval ...``)."""

from tl_logitlens.cli import main

raise SystemExit(main())
