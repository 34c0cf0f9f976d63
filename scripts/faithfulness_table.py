"""The demo model's faithfulness table in docs/faithfulness.md: written from tl.faithfulness, and checked.

    python scripts/faithfulness_table.py            # print the table (Markdown) and the JSON of its numbers
    python scripts/faithfulness_table.py --write    # replace the table in docs/faithfulness.md
    python scripts/faithfulness_table.py --check    # recompute it; exit 1 when the page's numbers differ

The settings (:data:`SETTINGS`): the 100 held-out demo stories (``tl.demo_texts()``), the logit lens, the
demo tuned lens and the demo Jacobian lens at the sites they share by default (``resid_post``), each
story's last position, ``intervention="ablate"``, seed 0 and 1000 bootstrap replicates. About a minute on
one busy CPU core.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "faithfulness.md"
START, END = "<!-- faithfulness-table:start -->", "<!-- faithfulness-table:end -->"
SETTINGS = {"intervention": "ablate", "positions": "last", "seed": 0, "n_bootstrap": 1000}
DIGITS = 3
# the page rounds to 3 decimals; recomputing agrees to float32 rounding (about 1e-5 relative: two runs, one
# and two threads, differed in one printed digit, a ratio's bound of 126.445 vs 126.446), so one unit of the
# last digit either way, plus 1e-4 of the value for the large ratios, is all a rounding boundary can move
TOLERANCE = 1.5 * 10**-DIGITS
RELATIVE = 1e-4


def compute():
    import tl_logitlens as tl

    model = tl.load_model("demo")
    lenses = [None, tl.load_lens("demo", model), tl.load_lens("demo-jacobian", model)]
    return tl.faithfulness(model, tl.demo_texts(), lenses=lenses, **SETTINGS)


def block(res) -> str:
    head = (
        f"{res.n_positions} positions (each story's last) of {res.n_documents} stories, "
        f"intervention `{res.intervention}`, seed {res.seed}, {res.confidence:.0%} bootstrap intervals over "
        f"stories ({res.n_bootstrap} replicates); Δ log p and KL in nats."
    )
    return f"{START}\n{head}\n\n{res.to_markdown(DIGITS)}\n{END}"


def numbers(text: str) -> list[float]:
    """Every number in the table's rows, in order."""
    inside = text.split(START, 1)[1].split(END, 1)[0]
    rows = [line for line in inside.splitlines() if line.startswith("| ") and not line.startswith("| site")]
    return [float(x) for row in rows for x in re.findall(r"-?\d+\.\d+", row.split("|", 3)[3])]


def main() -> int:
    res = compute()
    table = block(res)
    if "--write" in sys.argv:
        page = PAGE.read_text(encoding="utf-8")
        before, rest = page.split(START, 1)
        PAGE.write_text(before + table + rest.split(END, 1)[1], encoding="utf-8")
        print(f"wrote {PAGE}")
        return 0
    if "--check" in sys.argv:
        page, fresh = numbers(PAGE.read_text(encoding="utf-8")), numbers(table)
        bad = [
            (i, a, b)
            for i, (a, b) in enumerate(zip(page, fresh))
            if abs(a - b) > TOLERANCE + RELATIVE * abs(a)
        ]
        if len(page) != len(fresh) or bad:
            print(
                f"docs/faithfulness.md is out of date ({len(page)} vs {len(fresh)} numbers; differ: {bad[:5]}); "
                "run python scripts/faithfulness_table.py --write",
                file=sys.stderr,
            )
            return 1
        print(
            json.dumps(
                {
                    "numbers": len(fresh),
                    "max_difference": max((abs(a - b) for a, b in zip(page, fresh)), default=0),
                }
            )
        )
        return 0
    print(table)
    print(json.dumps(res.to_dict()["results"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
