"""Reading and writing tuned lenses, and the text they are trained on.

Two formats are read by :func:`load_lens`:

- this package's: ``tuned_lens.safetensors`` (``"{i}.weight"`` ``[d_model, d_model]``, ``"{i}.bias"``
  ``[d_model]``, float32) and ``tuned_lens.json`` (model name, shapes, the readout fingerprint, whether
  the stream was centred, the training settings), written by :meth:`TunedLens.save`;
- tuned-lens 0.2.0's: ``config.json`` and ``params.pt`` with the same keys, translator ``i`` reading
  ``blocks.{i}.hook_resid_pre`` of the model as Hugging Face computes it (uncentred). ``params.pt`` is
  read with ``torch.load(weights_only=True)``: a pickle that needs anything but tensors is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from tl_logitlens.tuned import FORMAT_VERSION, TunedLens

WEIGHTS_FILE = "tuned_lens.safetensors"
CONFIG_FILE = "tuned_lens.json"
DEMO_LENSES = {"demo": Path(__file__).parent / "demo_models" / "demo" / "tuned_lens"}


def save_lens(lens: TunedLens, folder: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(lens.n_layers):
        tensors[f"{i}.weight"] = lens.weight[i].detach().float().cpu().contiguous()
        tensors[f"{i}.bias"] = lens.bias[i].detach().float().cpu().contiguous()
    save_file(tensors, folder / WEIGHTS_FILE, metadata={"format": "tl_logitlens tuned lens",
                                                        "format_version": str(FORMAT_VERSION)})
    meta = {**lens.meta, "name": lens.name, "format": "tl_logitlens tuned lens", "format_version": FORMAT_VERSION}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1) + "\n")


def load_lens(folder_or_name: Any, model: Any) -> TunedLens:
    """A tuned lens for ``model`` from a folder (this package's format or tuned-lens 0.2.0's) or a
    built-in name (``"demo"``: the lens shipped for ``load_model("demo")``), on the model's device.

    Example:
        >>> lens = tl.load_lens("demo", tl.load_model("demo"))   # doctest: +SKIP

    Raises:
        ValueError: no lens at that path; a malformed or unsafe checkpoint; a lens made for another
            model (shapes, readout fingerprint) or for another centring of a LayerNorm model's stream.
    """
    if not isinstance(folder_or_name, (str, os.PathLike)):
        raise TypeError(f"load_lens takes a folder or a built-in name like 'demo', not {type(folder_or_name).__name__}")
    name = os.fspath(folder_or_name)
    folder = DEMO_LENSES.get(name, Path(name).expanduser())
    if not folder.is_dir():
        raise ValueError(
            f"no tuned lens at {name!r}: pass a folder holding {CONFIG_FILE} + {WEIGHTS_FILE} (TunedLens.save), "
            f"or tuned-lens's config.json + params.pt, or a built-in name ({sorted(DEMO_LENSES)})"
        )
    if (folder / CONFIG_FILE).is_file():
        lens = _load_own(folder)
    elif (folder / "config.json").is_file() and (folder / "params.pt").is_file():
        lens = _load_tuned_lens_format(folder)
    else:
        raise ValueError(
            f"{str(folder)!r} holds no tuned lens: expected {CONFIG_FILE} + {WEIGHTS_FILE} (this package) or "
            "config.json + params.pt (tuned-lens 0.2.0)"
        )
    lens.check_model(model)
    return lens.to(model.W_U.device)


def _stack(state: dict[str, torch.Tensor], n_layers: int, d_model: int, bias: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    expected = {f"{i}.weight" for i in range(n_layers)} | ({f"{i}.bias" for i in range(n_layers)} if bias else set())
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(f"{where} does not hold {n_layers} translators: missing {missing[:4]}, unexpected {extra[:4]}")
    for key, t in state.items():
        shape = (d_model, d_model) if key.endswith("weight") else (d_model,)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape or not t.is_floating_point():
            raise ValueError(f"{where}: {key} should be a float tensor of shape {list(shape)}")
    weight = torch.stack([state[f"{i}.weight"].float() for i in range(n_layers)])
    zeros = torch.zeros(d_model)
    b = torch.stack([state[f"{i}.bias"].float() if bias else zeros for i in range(n_layers)])
    return weight, b


def _load_own(folder: Path) -> TunedLens:
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{folder / CONFIG_FILE} is not valid JSON: {err}") from err
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{folder / CONFIG_FILE} has format version {meta.get('format_version')!r}; this version of "
            f"tl_logitlens reads version {FORMAT_VERSION}"
        )
    try:
        d_model, n_layers = int(meta["d_model"]), int(meta["n_layers"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / CONFIG_FILE} lacks d_model/n_layers") from err
    if not (folder / WEIGHTS_FILE).is_file():
        raise ValueError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
    weight, bias = _stack(load_file(folder / WEIGHTS_FILE), n_layers, d_model, True, str(folder / WEIGHTS_FILE))
    name = meta.pop("name", "tuned lens")
    lens = TunedLens(d_model, n_layers, meta=meta, name=name)
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    return lens


def _load_tuned_lens_format(folder: Path) -> TunedLens:
    import pickle

    try:
        config = json.loads((folder / "config.json").read_text())
        d_model, n_layers = int(config["d_model"]), int(config["num_hidden_layers"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{folder / 'config.json'} is not a tuned-lens config (d_model, num_hidden_layers)") from err
    lens_type = config.get("lens_type", "linear_tuned_lens")
    if lens_type != "linear_tuned_lens":
        raise ValueError(f"{folder} holds a tuned-lens {lens_type!r}; only 'linear_tuned_lens' is read")
    try:
        state = torch.load(folder / "params.pt", map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as err:
        raise ValueError(
            f"{folder / 'params.pt'} is not a plain tensor checkpoint (torch.load(weights_only=True) refused "
            f"it: {str(err).splitlines()[0][:200]}); refusing to unpickle anything else"
        ) from err
    if not isinstance(state, dict):
        raise ValueError(f"{folder / 'params.pt'} holds a {type(state).__name__}, not a dict of tensors")
    weight, bias = _stack(state, n_layers, d_model, bool(config.get("bias", True)), str(folder / "params.pt"))
    meta = {
        "format": "tuned-lens 0.2.0",
        "model_name": str(config.get("base_model_name_or_path", "")),
        "d_model": d_model,
        "n_layers": n_layers,
        # tuned-lens reads Hugging Face's residual stream, which TransformerLens's centring changes
        "stream_centred": False,
        "unembed_hash": config.get("unembed_hash"),
        "source": str(folder),
    }
    lens = TunedLens(d_model, n_layers, meta=meta)
    with torch.no_grad():
        lens.weight.copy_(weight)
        lens.bias.copy_(bias)
    return lens


def read_texts(texts: Any) -> list[str]:
    """The documents of ``texts`` as :func:`tl_logitlens.corpus.iter_texts` reads them: a list or iterable
    of strings, a ``.txt``/``.json``/``.jsonl`` file, or a Hugging Face ``datasets`` split (its
    ``"text"`` column); blank documents are skipped and a corpus with none left is an error."""
    from tl_logitlens.corpus import iter_texts

    return list(iter_texts(texts))


def pack_windows(model: Any, texts: list[str], seq_len: int | None) -> torch.Tensor:
    """``[window, seq_len]`` token ids: each text as BOS + its tokens (EOS where the model prepends no
    BOS), concatenated and cut into consecutive windows; each window starts with BOS when the model
    prepends one (so ``seq_len - 1`` stream tokens follow it). The last, shorter, window is dropped
    unless it is the only one."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer; attach one (model.set_tokenizer(...)) to train on text")
    n_ctx = int(model.cfg.n_ctx)
    seq_len = n_ctx if seq_len is None else seq_len
    if not isinstance(seq_len, int) or not 2 <= seq_len <= n_ctx:
        raise ValueError(f"seq_len must be an int from 2 to the model's n_ctx ({n_ctx}), not {seq_len!r}")
    bos = tok.bos_token_id if getattr(model.cfg, "default_prepend_bos", True) else None
    sep = bos if bos is not None else tok.eos_token_id
    stream: list[int] = []
    for i in range(0, len(texts), 256):
        for ids in tok(texts[i : i + 256], add_special_tokens=False, verbose=False)["input_ids"]:
            if sep is not None and (stream or bos is None):  # a window's own BOS starts the first text
                stream.append(sep)
            stream.extend(ids)
    body = seq_len - 1 if bos is not None else seq_len
    n_full = len(stream) // body
    if n_full == 0:
        n_full, body = 1, len(stream)
    data = torch.tensor(stream[: n_full * body], dtype=torch.long).view(n_full, body)
    if bos is not None:
        data = torch.cat([torch.full((n_full, 1), bos, dtype=torch.long), data], 1)
    if data.shape[1] < 2:
        raise ValueError("the texts hold fewer than two tokens; pass more text")
    return data
