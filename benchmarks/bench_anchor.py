"""The anchor: ``tl-logitlens eval`` against tuned-lens 0.2.0's own ``Eval``, on the same texts and lenses.

    python benchmarks/bench_anchor.py [--tunedlens-python /work/venv-tunedlens/bin/python] [--repeats 3]

Both read TinyStories 900-999 (held out from the shared tuned lens's training,
``../shared/corpora/tinystories_1000.json``) in 512-token windows with stories260K, the logit lens
and the tuned lens in ``../shared/lenses/stories260K-tuned-lens`` (tuned-lens 0.2.0's own format),
on 1 thread (``OMP_NUM_THREADS=1``; ``--threads 1`` for tl-logitlens), CPU. Each tool runs in a
fresh process: ``tl_logitlens.cli.commands.main`` with ``eval`` arguments (after ``tune_allocator()``, as the
``tl-logitlens`` command does), and tuned-lens's ``Eval`` command dataclass with ``lens_types=["logit",
"tuned"]`` and its ``execute()`` (what ``python -m tuned_lens eval`` runs; its command line refuses a
list of lens types). *wall* is the whole process (interpreter, imports, model load, evaluation,
output); *in-process* is the time inside that entry point, taken by a driver around it, as wall
time and as CPU time (the process's and its children's: on a loaded machine, the figure to compare). Best of
``--repeats``, the two tools interleaved.

tuned-lens is run from its own virtual environment (it needs ``transformers<5``), which must exist::

    python3 -m venv /work/venv-tunedlens
    /work/venv-tunedlens/bin/pip install torch==2.13.0
    /work/venv-tunedlens/bin/pip install tuned-lens==0.2.0 torchdata==0.9.0 'transformers<5'

Its statistics differ in definition (bits per byte over its own packed 512-token chunks, no
bootstrap), so only the time is compared; nothing of tuned-lens's code is used here beyond calling
its command's entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
STORIES = SHARED / "models" / "stories260K"
CORPUS = SHARED / "corpora" / "tinystories_1000.json"
LENS = SHARED / "lenses" / "stories260K-tuned-lens"
HELD_OUT = slice(900, 1000)
SEQ_LEN = 512

# a driver around each command's own entry point: the time inside it, on stderr's last line
_DRIVER = """
import os, sys, time
t, c = time.perf_counter(), os.times()
{call}
e = os.times()
cpu = (e.user + e.system + e.children_user + e.children_system) - (c.user + c.system + c.children_user + c.children_system)
sys.stderr.write("\\nIN-PROCESS %.4f %.4f\\n" % (time.perf_counter() - t, cpu))
"""
_TL = "from tl_logitlens.cli.commands import main, tune_allocator; tune_allocator(); rc = main(sys.argv[1:]); assert rc == 0, rc"
# its command line cannot take --lens_types logit tuned (simple_parsing refuses a list of Literals), so
# the driver builds the command's own Eval dataclass from the same arguments and calls execute()
_TUNED = (
    "from pathlib import Path; from tuned_lens.scripts.eval_loop import Eval; "
    "from tuned_lens.scripts.ingredients import Data, Distributed, Model; "
    "a = sys.argv[1:]; "
    "Eval(data=Data(name=[a[0]], max_length=int(a[1])), model=Model(name=a[2]), "
    "dist=Distributed(per_gpu_batch_size=int(a[4])), output=Path(a[5]), lens_name=a[3], "
    "lens_types=['logit', 'tuned']).execute()"
)


def _model_for_transformers4(tmp: Path) -> Path:
    """stories260K with a tokenizer config transformers 4 reads: the shared one was saved by transformers
    5, whose ``extra_special_tokens`` list (``<s>``, ``</s>``: already BOS and EOS) transformers 4
    rejects. The weights and tokenizer are the same files (linked)."""
    folder = tmp / "stories260K"
    folder.mkdir()
    for f in STORIES.iterdir():
        if f.name != "tokenizer_config.json":
            (folder / f.name).symlink_to(f)
    config = json.loads((STORIES / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.pop("extra_special_tokens", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def run(cmd: list[str], env: dict[str, str], cwd: str) -> tuple[float, float, float]:
    """The process's wall time, and the wall and CPU time (its own and its children's) inside the entry point."""
    t = time.perf_counter()
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if res.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    inside, cpu = (float(x) for x in res.stderr.strip().splitlines()[-1].split()[-2:])
    return wall, inside, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tunedlens-python", default="/work/venv-tunedlens/bin/python")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8, help="tl-logitlens --batch-size (windows per forward)")
    parser.add_argument("--tunedlens-batch", type=int, default=1, help="tuned-lens --per_gpu_batch_size (its default: 1)")
    args = parser.parse_args()
    if not Path(args.tunedlens_python).exists():
        raise SystemExit(f"no tuned-lens environment at {args.tunedlens_python}; see this script's docstring")
    texts = json.loads(CORPUS.read_text(encoding="utf-8"))[HELD_OUT]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "held_out.json").write_text(json.dumps(texts), encoding="utf-8")
        with open(Path(tmp) / "held_out.jsonl", "w", encoding="utf-8") as fh:
            for text in texts:
                fh.write(json.dumps({"text": text}) + "\n")
        ours = [sys.executable, "-c", _DRIVER.format(call=_TL), "eval", str(STORIES), "--texts", "held_out.json",
                "--lens", str(LENS), "--seq-len", str(SEQ_LEN), "--batch-size", str(args.batch), "--threads", "1",
                "--no-progress", "--json", "ours.json"]
        theirs = [args.tunedlens_python, "-c", _DRIVER.format(call=_TUNED), "held_out.jsonl", str(SEQ_LEN),
                  str(_model_for_transformers4(Path(tmp))), str(LENS), str(args.tunedlens_batch), "theirs"]
        best = {"tl-logitlens eval": [float("inf")] * 3, "tuned-lens 0.2.0 Eval": [float("inf")] * 3}
        for _ in range(args.repeats):
            for name, cmd in (("tl-logitlens eval", ours), ("tuned-lens 0.2.0 Eval", theirs)):
                best[name] = [min(a, b) for a, b in zip(best[name], run(cmd, env, tmp))]
        ev = json.loads((Path(tmp) / "ours.json").read_text(encoding="utf-8"))
    print(f"load: {os.getloadavg()[0]:.1f} (1-minute average) on {os.cpu_count()} cores; 1 thread; best of {args.repeats}")
    print(f"{len(texts)} held-out stories, {ev['n_tokens']:,} tokens scored by tl-logitlens "
          f"(padding {ev['padding_fraction']:.1%}), logit lens + tuned lens, windows of {SEQ_LEN}")
    print(f"{'':24s} {'wall s':>8s} {'in-process s':>13s} {'in-process CPU s':>17s}")
    for name, (wall, inside, cpu) in best.items():
        print(f"{name:24s} {wall:8.2f} {inside:13.2f} {cpu:17.2f}")
    (w_ours, i_ours, c_ours), (w_theirs, i_theirs, c_theirs) = best.values()
    print(f"tl-logitlens / tuned-lens: wall {w_ours / w_theirs:.2f}x, in-process {i_ours / i_theirs:.2f}x, "
          f"in-process CPU {c_ours / c_theirs:.2f}x")


if __name__ == "__main__":
    main()
