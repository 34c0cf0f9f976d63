"""The TinyStories sample and its seeded train / held-out split, shared by the demo training scripts.

The split is defined once here so that the causal demo (``train_demo.py``) and the masked-LM demo
(``train_demo_bert.py``) hold out exactly the same stories: the 1000 story indices are shuffled with
``random.Random(SPLIT_SEED)`` and the last ``N_HELD_OUT`` of the shuffled order are held out.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpora" / "tinystories_1000.json"
CORPUS_SHA256 = "81eb9eb450a4a0509f719ba60bb1c4cd043d91156b303fdc3c13627639079935"
SPLIT_SEED = 1234
N_HELD_OUT = 100


@dataclass(frozen=True)
class Split:
    train_idx: list[int]
    held_out_idx: list[int]
    train: list[str]
    held_out: list[str]
    sha256: str


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_split(corpus: Path = CORPUS) -> Split:
    """Train and held-out stories; fails if the corpus is not the file the demo models were trained on."""
    digest = sha256(corpus)
    if digest != CORPUS_SHA256:
        raise SystemExit(f"{corpus} has sha256 {digest}, expected {CORPUS_SHA256}")
    stories = json.loads(corpus.read_text())
    order = list(range(len(stories)))
    random.Random(SPLIT_SEED).shuffle(order)
    train_idx, held_idx = order[:-N_HELD_OUT], order[-N_HELD_OUT:]
    return Split(
        train_idx=train_idx,
        held_out_idx=held_idx,
        train=[stories[i] for i in train_idx],
        held_out=[stories[i] for i in held_idx],
        sha256=digest,
    )
