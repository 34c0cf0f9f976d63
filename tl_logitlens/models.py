"""Load models: TransformerLens names, local Hugging Face checkpoint folders, built-in demo models."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from tl_logitlens import _compat

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_DEMO_DIR = Path(__file__).parent / "demo_models"


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32' or torch.bfloat16")


def is_checkpoint_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def load_model(
    name_or_path: str | os.PathLike | Any,
    *,
    device: str | torch.device | None = None,
    dtype: Any = None,
    **kwargs: Any,
) -> Any:
    """A TransformerLens model in eval mode, ready for every analysis in this package.

    ``name_or_path`` is one of:

    - a built-in demo model name (``"demo"``), loaded offline from the package;
    - a local Hugging Face checkpoint folder (``config.json``, weights, tokenizer), loaded offline;
    - a TransformerLens model name (``"gpt2"``, ``"EleutherAI/pythia-70m"``), loaded with
      ``HookedTransformer.from_pretrained`` exactly as TransformerLens does (this downloads);
    - a model object you built already (a ``HookedTransformer`` or a ``TransformerBridge``),
      returned as it is (put in eval mode).

    With TransformerLens 3.x the result is a ``HookedTransformer``; with 4.x (which has none) it is a
    ``TransformerBridge`` booted with ``boot_transformers`` and put in compatibility mode, which
    folds and centres the weights as ``from_pretrained`` did: the same numbers either way.

    ``kwargs`` go to TransformerLens (``fold_ln``, ``center_unembed``, ...; on 4.x the weight-processing
    options go to ``enable_compatibility_mode``, the rest to ``boot_transformers``).
    """
    if hasattr(name_or_path, "cfg") and hasattr(name_or_path, "run_with_cache"):
        return name_or_path.eval()
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            f"load_model takes a model name, a local folder or a model object, not {type(name_or_path).__name__}"
        )
    torch_dtype = _dtype(dtype)
    name = os.fspath(name_or_path)
    demo = _DEMO_DIR / name
    if "/" not in name and name.startswith("demo") and is_checkpoint_folder(demo):
        return _load_local(demo, device, torch_dtype, **kwargs)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not is_checkpoint_folder(path):
            raise ValueError(
                f"{name!r} exists but is not a Hugging Face checkpoint folder (it needs config.json and "
                f"one of {list(_WEIGHT_FILES)}); pass such a folder, or a model name like 'gpt2'"
            )
        return _load_local(path, device, torch_dtype, **kwargs)
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") > 1:
        raise ValueError(
            f"no folder at {name!r}; pass an existing local checkpoint folder, or a model name like 'gpt2'"
        )
    from tl_logitlens.encoders import is_encoder_name, load_encoder

    if is_encoder_name(name):  # BERT/RoBERTa masked LMs: HookedEncoder, not HookedTransformer
        return load_encoder(name, device=device, dtype=torch_dtype, **kwargs)
    return _load_named(name, device, torch_dtype, **kwargs)


def _load_named(name: str, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    try:
        official = _compat.official_model_name(name)
    except ValueError as err:
        raise ValueError(
            f"{name!r} is neither a local folder nor a model TransformerLens knows; pass a checkpoint "
            "folder, or a name from transformer_lens.supported_models.OFFICIAL_MODEL_NAMES "
            "(e.g. 'gpt2', 'EleutherAI/pythia-70m')"
        ) from err
    if _compat.HookedTransformer is not None:
        return _compat.HookedTransformer.from_pretrained(official, device=device, dtype=dtype, **kwargs).eval()
    return _boot_bridge(official, device, dtype, **kwargs)


# enable_compatibility_mode's options; the rest go to boot_transformers
_COMPAT_OPTIONS = (
    "fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
    "refactor_factored_attn_matrices", "no_processing",
)


def _boot_bridge(name_or_path: str, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """TransformerLens 4.x: ``boot_transformers`` (a hub name or a local folder, read offline) then
    ``enable_compatibility_mode`` with HookedTransformer's defaults (fold_ln and centring), so the
    bridge computes what ``HookedTransformer.from_pretrained`` did on 3.x."""
    compat = {k: kwargs.pop(k) for k in _COMPAT_OPTIONS if k in kwargs}
    bridge = _compat.TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype, **kwargs)
    bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    return bridge.eval()


def _staged_folder(path: Path) -> tempfile.TemporaryDirectory:
    """A neutral-named copy of the folder (symlinks) whose config TransformerLens can read.

    TransformerLens guesses the architecture from substrings of the path ('llama', 'gemma', ...),
    so the folder is seen under a neutral name; GPT-2 configs saved by transformers 5 lack
    ``n_ctx``, which TransformerLens reads, so it is restored from ``n_positions``.
    """
    tmp = tempfile.TemporaryDirectory(prefix="tl_logitlens_")
    staged = Path(tmp.name) / "checkpoint"
    staged.mkdir()
    for item in path.iterdir():
        if item.name != "config.json":
            (staged / item.name).symlink_to(item.resolve())
    config = json.loads((path / "config.json").read_text())
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
    (staged / "config.json").write_text(json.dumps(config))
    return tmp


def _load_local(path: Path, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if _is_masked_lm_config(config):
        from tl_logitlens.encoders import load_encoder

        return load_encoder(path, device=device, dtype=dtype, **kwargs)
    with _staged_folder(path) as tmp:
        staged = str(Path(tmp) / "checkpoint")
        if _compat.HookedTransformer is None:
            bridge = _boot_bridge(staged, device, dtype, **kwargs)
            bridge.cfg.model_name = path.name  # not the staged folder's temporary path
            return bridge
        from transformer_lens import loading_from_pretrained as loading
        from transformers import AutoModelForCausalLM

        fold_ln = kwargs.pop("fold_ln", True)
        center_writing_weights = kwargs.pop("center_writing_weights", True)
        center_unembed = kwargs.pop("center_unembed", True)
        hf_model = AutoModelForCausalLM.from_pretrained(staged, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(staged)
        cfg = loading.get_pretrained_model_config(
            staged, hf_cfg=hf_model.config.to_dict(), fold_ln=fold_ln, device=device, dtype=dtype, **kwargs
        )
        cfg.model_name = path.name
        state_dict = loading.get_pretrained_state_dict(staged, cfg, hf_model, dtype=dtype)
        model = _compat.HookedTransformer(cfg, tokenizer, move_to_device=False)
        model.load_and_process_state_dict(
            state_dict,
            fold_ln=fold_ln,
            center_writing_weights=center_writing_weights,
            center_unembed=center_unembed,
        )
        model.move_model_modules_to_device()
    return model.eval()


def _is_masked_lm_config(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForMaskedLM") for a in archs)
