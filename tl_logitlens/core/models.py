"""Load models: TransformerLens names, hub names, local Hugging Face checkpoint folders, Hugging Face
model objects and the built-in demo models."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tl_logitlens.core import compat as _compat

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_DEMO_DIR = Path(__file__).resolve().parent.parent / "demo_models"
# "org/name": what the hub calls a repository (legacy un-namespaced names are all in TransformerLens's list)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"dtype {dtype!r} is not a torch dtype; use e.g. 'float32' or torch.bfloat16")


def check_device(device: str | torch.device | None) -> str | torch.device | None:
    """``device`` unchanged if this torch can use it; ValueError (saying what to pass) if not.

    Checked before anything is loaded, so a typo or a GPU that is not there is a clear error, not a
    RuntimeError from deep inside TransformerLens after the weights are read.
    """
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be a string such as 'cpu' or 'cuda:0', or a torch.device, not {type(device).__name__}")
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device {device!r} is not a torch device; use 'cpu', 'cuda', 'cuda:0' or 'mps'") from err
    kind = parsed.type
    if kind == "cpu":
        return device
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = bool(backend is not None and hasattr(backend, "is_available") and backend.is_available())
    if not available:
        build = f"torch {torch.__version__}"
        raise ValueError(
            f"device {device!r} was asked for, but {build} has no usable {kind} device here "
            f"(torch.{'backends.mps' if kind == 'mps' else kind}.is_available() is False); use device='cpu'"
        )
    if parsed.index is not None and hasattr(backend, "device_count") and parsed.index >= backend.device_count():
        raise ValueError(
            f"device {device!r} does not exist: this machine has {backend.device_count()} {kind} device(s), "
            f"numbered from 0"
        )
    return device


def is_checkpoint_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and any((path / f).is_file() for f in _WEIGHT_FILES)


def load_model(
    name_or_path: str | os.PathLike | Any,
    *,
    device: str | torch.device | None = None,
    dtype: Any = None,
    tokenizer: Any = None,
    **kwargs: Any,
) -> Any:
    """A TransformerLens model in eval mode, ready for every analysis in this package.

    ``name_or_path`` is one of:

    - a built-in demo model name (``"demo"``, ``"demo-bert"``), loaded offline from the package;
    - a local Hugging Face checkpoint folder (``config.json``, weights, tokenizer), loaded offline
      from its own config;
    - a TransformerLens model name (``"gpt2"``, ``"EleutherAI/pythia-70m"``, ``"microsoft/phi-1_5"``),
      loaded by TransformerLens's own by-name path (``HookedTransformer.from_pretrained`` on 3.x,
      ``TransformerBridge.boot_transformers`` on 4.x), from the Hugging Face cache or the hub.
      BERT/RoBERTa masked-LM names (``"bert-base-cased"``, ``"FacebookAI/roberta-large"``) load as
      masked LMs. On 4.x any other hub id (``"org/name"``) loads through the bridge too; on 3.x a
      name TransformerLens does not list is a ValueError (download it and pass the folder);
    - a Hugging Face model object (a causal LM, ``*ForCausalLM``/``*LMHeadModel``, or a masked LM,
      ``*ForMaskedLM``), with its tokenizer from ``tokenizer=`` (an object, a name or a folder) or,
      without one, from the model's own ``name_or_path``; the object itself is not modified;
    - a model object you built already (a ``HookedTransformer``, ``HookedEncoder`` or
      ``TransformerBridge``), returned as it is (put in eval mode).

    With TransformerLens 3.x the result is a ``HookedTransformer``; with 4.x (which has none) it is a
    ``TransformerBridge`` booted with ``boot_transformers`` and put in compatibility mode, which
    folds and centres the weights as ``from_pretrained`` did: the same numbers either way. On 3.x, an
    architecture ``HookedTransformer`` cannot build from a checkpoint's config (Granite; Gemma 2,
    whose shapes 3.9 knows only from its hub names) loads through the ``TransformerBridge`` that 3.9
    also ships. Phi-1.5/Phi-2 on 3.9 with transformers 5: TransformerLens's config converter reads
    ``PhiConfig.partial_rotary_factor``, which transformers 5 moved into ``rope_parameters``; while
    the config is converted the attribute is supplied from ``rope_parameters`` (the same number), and
    the model is then TransformerLens's own ``HookedTransformer``. GPT-2 checkpoints whose
    ``n_inner`` is not ``4 * n_embd`` get ``d_mlp = n_inner`` (TransformerLens 3.9 assumes 4x).

    Weight processing (TransformerLens's defaults, ``fold_ln=True``, ``center_writing_weights=True``,
    ``center_unembed=True``) changes what some numbers mean, not the model's predictions:

    - ``center_unembed`` subtracts each token's mean from ``W_U`` (and ``b_U``), so every logit moves
      by the position's mean logit: log-probs, ranks, entropy, KL and logit *differences* are
      unchanged, but a single-logit attribution total is the checkpoint's logit minus the mean logit
      over the vocabulary;
    - ``fold_ln`` folds the final norm's gain into ``W_U``, so ``norm="none"`` reads the residual
      stream with that folded (and centred) ``W_U``, which is not the checkpoint's raw ``lm_head``.

    For the checkpoint's raw logits pass ``center_unembed=False, center_writing_weights=False``; for
    the raw ``lm_head`` under ``norm="none"`` pass ``fold_ln=False`` too (``tests/test_models.py``
    checks both against Hugging Face on 3.x and 4.x).

    ``kwargs`` go to TransformerLens (``fold_ln``, ``center_unembed``, ...; on 4.x the weight-processing
    options go to ``enable_compatibility_mode``, the rest to ``boot_transformers``). Masked LMs take
    none: their post-LN blocks are not processed.

    Raises:
        ValueError: a device this torch cannot use, an unknown name, a name TransformerLens lists
            whose files are not in the cache while offline, a folder that is no checkpoint, a
            Hugging Face model without a language-model head or without a tokenizer to be found.
        TypeError: anything else as ``name_or_path``.

    Example:
        >>> import tl_logitlens as tl
        >>> model = tl.load_model("demo")
        >>> raw = tl.load_model("demo", center_unembed=False, center_writing_weights=False)
    """
    if hasattr(name_or_path, "cfg") and hasattr(name_or_path, "run_with_cache"):
        if tokenizer is not None:
            raise ValueError("a TransformerLens model carries its own tokenizer; set model.tokenizer instead of tokenizer=")
        return name_or_path.eval()
    device = check_device(device)
    if _is_hf_model(name_or_path):
        return _load_hf_object(name_or_path, tokenizer, device, dtype, **kwargs)
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(
            "load_model takes a model name, a local folder or a model object (TransformerLens or Hugging Face), "
            f"not {type(name_or_path).__name__}"
        )
    if tokenizer is not None:
        raise ValueError(
            "tokenizer= goes with a Hugging Face model object; a name or a checkpoint folder brings its own tokenizer"
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
    from tl_logitlens.core.encoders import is_encoder_name, load_encoder

    if is_encoder_name(name):  # BERT/RoBERTa masked LMs: HookedEncoder, not HookedTransformer
        with _hub_errors(name):
            return load_encoder(name, device=device, dtype=torch_dtype, **kwargs)
    return _load_named(name, device, torch_dtype, **kwargs)


def _load_named(name: str, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    try:
        official = _compat.official_model_name(name)
    except ValueError:
        official = None
    if official is None:
        if _compat.HookedTransformer is None and _HUB_ID.match(name):
            with _hub_errors(name):  # 4.x: the bridge loads any hub id from its own config
                return _boot_bridge(name, device, dtype, **kwargs)
        if _compat.HookedTransformer is None:
            hint = "or a hub id 'org/name' (TransformerLens 4.x loads any hub model through its bridge)"
        else:
            hint = (
                f"TransformerLens {_compat.TL_VERSION} loads by name only the models it lists; for any other hub "
                "model download it (huggingface_hub.snapshot_download('org/name')) and pass the folder"
            )
        raise ValueError(
            f"{name!r} is neither a local folder nor a model TransformerLens knows; pass a checkpoint "
            "folder, or a name from transformer_lens.supported_models.OFFICIAL_MODEL_NAMES "
            f"(e.g. 'gpt2', 'EleutherAI/pythia-70m'); {hint}"
        )
    with _hub_errors(official):
        if _compat.HookedTransformer is None:
            return _boot_bridge(official, device, dtype, **kwargs)
        return _from_pretrained_hooked(official, device, dtype, **kwargs)


def _from_pretrained_hooked(official: str, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """TransformerLens 3.x's own by-name load (``HookedTransformer.from_pretrained``)."""
    with _phi_rotary_fraction():
        try:
            return _compat.HookedTransformer.from_pretrained(official, device=device, dtype=dtype, **kwargs).eval()
        except (IndexError, KeyError, RuntimeError) as err:
            mismatch = _hard_coded_shape_mismatch(official)
            if mismatch is None:
                raise
            raise ValueError(
                f"TransformerLens {_compat.TL_VERSION} builds {official!r} with a shape fixed by its name "
                f"({mismatch}), but the checkpoint it found has another; load the checkpoint from its own "
                "config by passing its folder instead (huggingface_hub.snapshot_download(name) gives it)"
            ) from err


def _hard_coded_shape_mismatch(official: str) -> str | None:
    """'16 layers, d_model 2048 by name; 2 layers, d_model 64 in config.json' when they differ."""
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    try:
        cfg = loading.get_pretrained_model_config(official)
        hf = AutoConfig.from_pretrained(official)
    except Exception:  # noqa: BLE001 - only a diagnosis; the original error is re-raised
        return None
    hf_shape = (getattr(hf, "num_hidden_layers", None), getattr(hf, "hidden_size", None))
    if hf_shape == (cfg.n_layers, cfg.d_model) or None in hf_shape:
        return None
    return (
        f"{cfg.n_layers} layers, d_model {cfg.d_model} by name; "
        f"{hf_shape[0]} layers, d_model {hf_shape[1]} in the checkpoint's config.json"
    )


@contextlib.contextmanager
def _hub_errors(name: str) -> Iterator[None]:
    """Missing hub files (offline and not cached, or no such repository) as a ValueError saying what to pass."""
    try:
        yield
    except OSError as err:
        from huggingface_hub import constants

        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE})"
        offline = " with the hub offline (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE else ""
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"could not load {name!r}: its files are neither in {where} nor fetched from the hub{offline} "
            f"({first}); connect to the hub, or download it first (huggingface_hub.snapshot_download({name!r})), "
            "or pass a local checkpoint folder"
        ) from err


@contextlib.contextmanager
def _phi_rotary_fraction() -> Iterator[None]:
    """TransformerLens 3.9's config converter with ``PhiConfig.partial_rotary_factor`` supplied.

    3.9 reads ``hf_config.partial_rotary_factor``; transformers 5 keeps that fraction in
    ``config.rope_parameters["partial_rotary_factor"]`` only. While TransformerLens converts the config,
    its ``AutoConfig`` returns configs with the attribute set from ``rope_parameters`` (the same
    number). Nothing else changes; 4.x has no such converter.
    """
    if _compat.TL_MAJOR >= 4:
        yield
        return
    from transformer_lens import loading_from_pretrained as loading

    original = loading.AutoConfig

    class _AutoConfig:
        @staticmethod
        def from_pretrained(*args: Any, **kwargs: Any) -> Any:
            config = original.from_pretrained(*args, **kwargs)
            rope = getattr(config, "rope_parameters", None) or {}
            if (
                getattr(config, "model_type", None) == "phi"
                and not hasattr(config, "partial_rotary_factor")
                and "partial_rotary_factor" in rope
            ):
                config.partial_rotary_factor = rope["partial_rotary_factor"]
            return config

    loading.AutoConfig = _AutoConfig
    try:
        yield
    finally:
        loading.AutoConfig = original


# enable_compatibility_mode's options; the rest go to boot_transformers
_COMPAT_OPTIONS = (
    "fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
    "refactor_factored_attn_matrices", "no_processing",
)


def _boot_bridge(name_or_path: str, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """``boot_transformers`` (a hub name or a local folder, read offline; ``hf_model=`` and
    ``tokenizer=`` for an object) then ``enable_compatibility_mode`` with HookedTransformer's defaults
    (fold_ln and centring), so the bridge computes what ``HookedTransformer.from_pretrained`` did on 3.x."""
    if _compat.TransformerBridge is None:
        raise ImportError(f"this TransformerLens ({_compat.TL_VERSION}) has no TransformerBridge")
    compat = {k: kwargs.pop(k) for k in _COMPAT_OPTIONS if k in kwargs}
    bridge = _compat.TransformerBridge.boot_transformers(name_or_path, device=device, dtype=dtype, **kwargs)
    bridge.enable_compatibility_mode(disable_warnings=True, **compat)
    return bridge.eval()


def _stage_config(config: dict[str, Any], folder: Path) -> None:
    """``config.json`` as TransformerLens reads it: GPT-2 configs saved by transformers 5 lack
    ``n_ctx``, which TransformerLens reads, so it is restored from ``n_positions``."""
    if config.get("model_type") == "gpt2" and "n_ctx" not in config:
        config["n_ctx"] = config.get("n_positions", 1024)
    (folder / "config.json").write_text(json.dumps(config))


def _staged_folder(path: Path) -> tempfile.TemporaryDirectory:
    """A neutral-named copy of the folder (symlinks) whose config TransformerLens can read.

    TransformerLens guesses the architecture from substrings of the path ('llama', 'gemma', ...),
    so the folder is seen under a neutral name.
    """
    tmp = tempfile.TemporaryDirectory(prefix="tl_logitlens_")
    staged = Path(tmp.name) / "checkpoint"
    staged.mkdir()
    for item in path.iterdir():
        if item.name != "config.json":
            (staged / item.name).symlink_to(item.resolve())
    _stage_config(json.loads((path / "config.json").read_text()), staged)
    return tmp


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off while a local checkpoint loads, then as they were: nothing is
    downloaded, and its "Loading weights 100%" bar on every ``load_model("demo")`` is noise."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _load_local(path: Path, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    with _no_progress_bars():
        return _load_local_quietly(path, device, dtype, **kwargs)


def _load_local_quietly(path: Path, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    if _is_masked_lm_config(config):
        from tl_logitlens.core.encoders import load_encoder

        return load_encoder(path, device=device, dtype=dtype, **kwargs)
    with _staged_folder(path) as tmp:
        staged = Path(tmp) / "checkpoint"
        if _compat.HookedTransformer is None:
            model = _boot_bridge(str(staged), device, dtype, **kwargs)
        else:
            from transformers import AutoModelForCausalLM

            model = _hooked_from_config(
                staged,
                lambda: AutoModelForCausalLM.from_pretrained(staged, dtype=dtype),
                lambda: AutoTokenizer.from_pretrained(staged),
                device,
                dtype,
                **kwargs,
            )
    model.cfg.model_name = path.name  # not the staged folder's temporary path
    return model


def _hooked_from_config(staged: Path, hf_model: Any, tokenizer: Any, device: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """TransformerLens 3.x: a ``HookedTransformer`` built from the config in ``staged`` and the weights
    of ``hf_model()``; the 3.x bridge where ``HookedTransformer`` lacks the architecture.

    ``hf_model`` and ``tokenizer`` are callables, so nothing is loaded for a config TransformerLens
    cannot convert.
    """
    from transformer_lens import loading_from_pretrained as loading
    from transformers import AutoConfig

    fold_ln = kwargs.pop("fold_ln", True)
    center_writing_weights = kwargs.pop("center_writing_weights", True)
    center_unembed = kwargs.pop("center_unembed", True)
    hf_config = AutoConfig.from_pretrained(staged)
    try:
        with _phi_rotary_fraction():
            cfg = loading.get_pretrained_model_config(
                str(staged), hf_cfg=hf_config.to_dict(), fold_ln=fold_ln, device=device, dtype=dtype, **kwargs
            )
    except NotImplementedError:
        # HookedTransformer cannot build this architecture from a config (Granite, Gemma 2): the
        # bridge TransformerLens 3.x also ships can, with the same weight processing
        options = {"fold_ln": fold_ln, "center_writing_weights": center_writing_weights, "center_unembed": center_unembed}
        return _boot_bridge(str(staged), device, dtype, hf_model=hf_model(), tokenizer=tokenizer(), **options, **kwargs)
    n_inner = getattr(hf_config, "n_inner", None)
    if hf_config.model_type == "gpt2" and n_inner is not None:
        cfg.d_mlp = n_inner  # TransformerLens 3.9 assumes d_mlp = 4 * n_embd
    model_hf = hf_model()
    state_dict = loading.get_pretrained_state_dict(str(staged), cfg, model_hf, dtype=dtype)
    model = _compat.HookedTransformer(cfg, tokenizer(), move_to_device=False)
    model.load_and_process_state_dict(
        state_dict,
        fold_ln=fold_ln,
        center_writing_weights=center_writing_weights,
        center_unembed=center_unembed,
    )
    model.move_model_modules_to_device()
    return model.eval()


def _is_hf_model(obj: object) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(obj, PreTrainedModel)


def _hf_tokenizer(hf_model: Any, tokenizer: Any) -> Any:
    """The tokenizer for a Hugging Face model object: ``tokenizer=`` (an object, a name or a folder),
    else loaded from the model's own ``name_or_path``."""
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    if isinstance(tokenizer, PreTrainedTokenizerBase):
        return tokenizer
    if tokenizer is not None and not isinstance(tokenizer, (str, os.PathLike)):
        raise TypeError(
            f"tokenizer= takes a transformers tokenizer, a tokenizer name or a folder, not {type(tokenizer).__name__}"
        )
    source = os.fspath(tokenizer) if tokenizer is not None else str(getattr(hf_model, "name_or_path", "") or "")
    if not source:
        raise ValueError(
            f"no tokenizer for this {type(hf_model).__name__}: it was not loaded from a name or folder "
            "(config.name_or_path is empty); pass tokenizer=AutoTokenizer.from_pretrained(...) or a tokenizer folder"
        )
    try:
        with _hub_errors(source):
            return AutoTokenizer.from_pretrained(source)
    except (ValueError, OSError) as err:
        raise ValueError(
            f"no tokenizer found at {source!r} for this {type(hf_model).__name__}: {err}; pass "
            "tokenizer=AutoTokenizer.from_pretrained(...) or a tokenizer folder"
        ) from err


def _load_hf_object(hf_model: Any, tokenizer: Any, device: Any, dtype: Any, **kwargs: Any) -> Any:
    """A Hugging Face causal or masked LM object as a TransformerLens model with the same logits.

    The object is not modified: TransformerLens 3.x copies its weights into a new model, and the
    bridge (4.x) wraps a deep copy, since weight processing folds and centres in place.
    """
    arch = type(hf_model).__name__
    masked = arch.endswith("ForMaskedLM")
    if not (masked or arch.endswith(("ForCausalLM", "LMHeadModel"))):
        raise ValueError(
            f"load_model takes Hugging Face language models with their head (*ForCausalLM, *LMHeadModel, "
            f"*ForMaskedLM), not a {arch}; load it with AutoModelForCausalLM or AutoModelForMaskedLM"
        )
    tok = _hf_tokenizer(hf_model, tokenizer)
    own_dtype = next(hf_model.parameters()).dtype
    torch_dtype = own_dtype if dtype is None else _dtype(dtype)
    name = str(getattr(hf_model, "name_or_path", "") or arch)
    copied = copy.deepcopy(hf_model).to(torch_dtype).eval()
    if not getattr(copied.config, "architectures", None):  # a model built from a config names none
        copied.config.architectures = [arch]
    with tempfile.TemporaryDirectory(prefix="tl_logitlens_") as tmp:
        # the config in a neutral-named folder: TransformerLens reads it from there, offline
        staged = Path(tmp) / "checkpoint"
        staged.mkdir()
        _stage_config(copied.config.to_dict(), staged)
        if masked:
            from tl_logitlens.core.encoders import encoder_from_hf

            model = encoder_from_hf(copied, tok, device=device, source=str(staged), **kwargs)
        elif _compat.HookedTransformer is None:
            model = _boot_bridge(str(staged), device, torch_dtype, hf_model=copied, tokenizer=tok, **kwargs)
        else:
            model = _hooked_from_config(staged, lambda: copied, lambda: tok, device, torch_dtype, **kwargs)
    model.cfg.model_name = Path(name).name if Path(name).exists() else name
    return model


def _is_masked_lm_config(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForMaskedLM") for a in archs)
