"""Lens files: every format read by its content, written atomically, checked before anything is built.

#22 (files): the Jacobian lens's own folder and the reference ``.pt`` (TransformerLens 4.3 and
``anthropics/jacobian-lens``), the tuned lens in tuned-lens 0.2.0's format, bit-exact round trips.
#23: crafted files give a ``ValueError`` naming the file and what is wrong (finding 7), a lens file with
NaN weights is refused at load (finding 1), and a save killed at any moment leaves the old lens or the
new one (finding 3).
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tl_logitlens as tl
from tests.helpers import SHARED, assert_close, require_shared, tiny_model
from tl_logitlens.core import compat as _compat
from tl_logitlens.lenses import JacobianLens, TunedLens, load_lens
from tl_logitlens.lenses import files as lens_files
from tl_logitlens.lenses.files import read_lens_folder, write_lens_folder
from tl_logitlens.lenses.fingerprint import model_record

JLENS = SHARED / "lenses" / "stories260K-jacobian-lens"
TUNED = SHARED / "lenses" / "stories260K-tuned-lens"


@pytest.fixture(scope="module")
def model():
    return tiny_model("RMS", folded=False)


def _tuned(model, seed: int) -> TunedLens:
    lens = TunedLens.for_model(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        lens.weight.copy_(torch.randn(lens.weight.shape, generator=gen) * 0.1)
        lens.bias.copy_(torch.randn(lens.bias.shape, generator=gen) * 0.1)
    return lens


def _jacobian(model, seed: int, n_prompts: int = 5) -> JacobianLens:
    gen = torch.Generator().manual_seed(seed)
    d, n = model.cfg.d_model, model.cfg.n_layers
    eye = torch.eye(d)
    jacobians = {layer: eye + torch.randn(d, d, generator=gen) * 0.1 for layer in range(n - 1)}
    return JacobianLens(jacobians, n_prompts=n_prompts, d_model=d, n_layers=n, meta=model_record(model))


def _same_jacobians(a: JacobianLens, b: JacobianLens) -> bool:
    return a.source_layers == b.source_layers and all(torch.equal(a.jacobians[k], b.jacobians[k]) for k in a.jacobians)


# --------------------------------------------------------------------------------------------------
# round trips, bit for bit


def test_jacobian_lens_own_format_round_trip_is_bit_exact(tmp_path, model):
    lens = _jacobian(model, 0)
    lens.name = "J (stories)"
    path = lens.save(tmp_path / "jl")
    assert sorted(p.name for p in path.iterdir()) == ["jacobian_lens.json", "jacobian_lens.safetensors"]
    back = load_lens(tmp_path / "jl", model)
    assert isinstance(back, JacobianLens) and _same_jacobians(back, lens)
    assert (back.n_prompts, back.d_model, back.n_layers, back.name) == (5, lens.d_model, lens.n_layers, "J (stories)")
    assert back.meta["fingerprint"] == lens.meta["fingerprint"]
    a = tl.logit_lens(model, "Hello world", lens=lens, sites="resid_post")
    b = tl.logit_lens(model, "Hello world", lens=back, sites="resid_post")
    assert_close(a.top_logprobs, b.top_logprobs, atol=0, rtol=0)


def test_jacobian_lens_reference_format_round_trip_is_bit_exact(tmp_path, model):
    lens = _jacobian(model, 1)
    lens.save(tmp_path / "j.pt", format="jlens")
    payload = torch.load(tmp_path / "j.pt", weights_only=True)
    assert set(payload) == {"J", "n_prompts", "source_layers", "d_model", "metadata"}
    assert payload["source_layers"] == [0, 1] and payload["d_model"] == model.cfg.d_model
    assert all(m.dtype == torch.float32 for m in payload["J"].values())
    back = load_lens(tmp_path / "j.pt", model)
    assert _same_jacobians(back, lens) and back.n_prompts == 5 and back.n_layers == model.cfg.n_layers
    assert back.meta["fingerprint"] == lens.meta["fingerprint"]  # it rides in metadata["tl_logitlens"]
    # recognised by content, whatever the name
    os.replace(tmp_path / "j.pt", tmp_path / "lens.bin")
    assert _same_jacobians(load_lens(tmp_path / "lens.bin", model), lens)


def test_reference_file_layout_matches_the_shared_one(tmp_path, model):
    shared = torch.load(require_shared(JLENS / "jlens.pt"), weights_only=True)
    _jacobian(model, 1).save(tmp_path / "j.pt", format="jlens")
    ours = torch.load(tmp_path / "j.pt", weights_only=True)
    assert set(ours) == set(shared)
    for key in ("n_prompts", "source_layers", "d_model", "metadata"):
        assert type(ours[key]) is type(shared[key]), key
    assert all(type(k) is int for k in ours["J"]) and all(type(k) is int for k in shared["J"])


def test_tuned_lens_in_tuned_lens_format_round_trips_and_matches_the_shared_layout(tmp_path, model):
    lens = _tuned(model, 0)
    path = lens.save(tmp_path / "tl", format="tuned-lens")
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "params.pt"]
    config = json.loads((path / "config.json").read_text())
    shared_config = json.loads((require_shared(TUNED) / "config.json").read_text())
    assert list(config) == list(shared_config)
    assert (config["d_model"], config["num_hidden_layers"], config["lens_type"]) == (
        model.cfg.d_model, model.cfg.n_layers, "linear_tuned_lens"
    )
    params = torch.load(path / "params.pt", weights_only=True)
    shared_params = torch.load(TUNED / "params.pt", weights_only=True)
    assert type(params) is type(shared_params)
    n = model.cfg.n_layers
    assert list(params) == [f"{i}.{k}" for i in range(n) for k in ("weight", "bias")] == list(shared_params)[: 2 * n]
    back = load_lens(path, model)
    assert torch.equal(back.weight, lens.weight) and torch.equal(back.bias, lens.bias)
    assert back.meta["format"] == "tuned-lens 0.2.0" and "fingerprint" in back.meta  # tied to the model it was loaded for
    # and our own format, both ways
    lens.save(tmp_path / "own")
    again = load_lens(tmp_path / "own", model)
    assert torch.equal(again.weight, lens.weight) and torch.equal(again.bias, lens.bias)


def test_unknown_save_formats_are_refused(tmp_path, model):
    with pytest.raises(ValueError, match="format must be 'tl_logitlens'.*or 'tuned-lens'"):
        _tuned(model, 0).save(tmp_path / "x", format="pt")
    with pytest.raises(ValueError, match="format must be 'tl_logitlens'.*or 'jlens'"):
        _jacobian(model, 0).save(tmp_path / "x", format="tuned-lens")


def test_transformer_lens_fit_checkpoint_is_read(tmp_path, model):
    lens = _jacobian(model, 2)
    n_done = 4
    payload = {"jacobian_sum": {k: m * n_done for k, m in lens.jacobians.items()}, "n_done": n_done, "next_idx": 4,
               "source_layers": [0, 1], "target_layer": 2, "skip_first": 16}
    torch.save(payload, tmp_path / "ckpt.pt")
    back = load_lens(tmp_path / "ckpt.pt", model)
    assert back.n_prompts == n_done
    for k in lens.jacobians:
        assert_close(back.jacobians[k], lens.jacobians[k], atol=1e-6, rtol=1e-6)
    assert back.meta["format"] == "J-lens fit checkpoint"


def test_shared_reference_jlens_loads_and_reads_as_transformer_lens_does(stories):
    """jlens.pt (TransformerLens 4.3's fit on stories260K) loads with weights_only, takes n_layers from the
    model, and reads story 10 as TransformerLens's own readout does (reference.pt) to 1e-4 nats."""
    path = require_shared(JLENS / "jlens.pt")
    lens = load_lens(path, stories)
    assert isinstance(lens, JacobianLens) and lens.n_layers == stories.cfg.n_layers == 5
    assert lens.source_layers == (0, 1, 2, 3) and lens.n_prompts == 8
    ref = torch.load(JLENS / "reference.pt", weights_only=True)
    tokens = ref["input_ids"]
    res = tl.logit_lens(stories, tokens, lens=lens, sites="resid_post", positions=None, top_k=3)
    for layer in range(4):
        logp = ref["lens_logits"][layer].float().log_softmax(-1)
        ids = res.top_ids[layer, 0]
        assert_close(res.top_logprobs[layer, 0], logp.gather(-1, ids.cpu()), atol=1e-4, rtol=0)


@pytest.mark.skipif(_compat.TL_MAJOR < 4, reason="TransformerLens 4.3's JacobianLens (the other side of the round trip) is not in 3.9")
def test_reference_files_round_trip_with_transformer_lens_4(tmp_path, model):
    from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

    lens = _jacobian(model, 3)
    lens.save(tmp_path / "ours.pt", format="jlens")
    theirs = TLJacobianLens.load(str(tmp_path / "ours.pt"))
    assert theirs.n_prompts == 5 and theirs.d_model == lens.d_model and theirs.source_layers == list(lens.source_layers)
    assert all(torch.equal(theirs.jacobians[k], lens.jacobians[k]) for k in lens.jacobians)
    theirs.save(str(tmp_path / "theirs.pt"), dtype=torch.float32)
    back = load_lens(tmp_path / "theirs.pt", model)
    assert _same_jacobians(back, lens) and back.n_prompts == 5


# --------------------------------------------------------------------------------------------------
# crafted and damaged files (#23 finding 7) and non-finite weights (finding 1)


def _own_tuned(tmp_path, model) -> Path:
    return _tuned(model, 0).save(tmp_path / "own")


def _tuned_lens_folder(tmp_path, model) -> Path:
    return _tuned(model, 0).save(tmp_path / "tl", format="tuned-lens")


def _edit_own_meta(folder: Path, stem: str, edit) -> None:
    tensors, meta = read_lens_folder(folder, stem)
    edit(meta)
    write_lens_folder(folder, stem, tensors, meta)


def _huge_layers(tmp_path, model):
    folder = _tuned_lens_folder(tmp_path, model)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1e9}))
    return folder


def _huge_layers_own(tmp_path, model):
    folder = _own_tuned(tmp_path, model)
    _edit_own_meta(folder, "tuned_lens", lambda m: m.update(n_layers=10**9))
    return folder


def _truncated_safetensors(tmp_path, model):
    folder = _own_tuned(tmp_path, model)
    data = (folder / "tuned_lens.safetensors").read_bytes()
    (folder / "tuned_lens.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def _json_list(tmp_path, model):
    folder = _tuned_lens_folder(tmp_path, model)
    (folder / "config.json").write_text("[1, 2, 3]")
    return folder


def _not_utf8(tmp_path, model):
    folder = _tuned_lens_folder(tmp_path, model)
    (folder / "config.json").write_bytes(b'{"d_model": \xff\xfe}')
    return folder


def _deeply_nested(tmp_path, model):
    folder = _tuned_lens_folder(tmp_path, model)
    (folder / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    return folder


def _negative_fingerprint_id(tmp_path, model):
    folder = _own_tuned(tmp_path, model)
    _edit_own_meta(folder, "tuned_lens", lambda m: m["fingerprint"]["token_ids"].__setitem__(0, -1))
    return folder


def _nan_own_weight(tmp_path, model):
    folder = _own_tuned(tmp_path, model)
    tensors, meta = read_lens_folder(folder, "tuned_lens")
    tensors["1.weight"][0, 0] = float("nan")
    # crafted by hand: write_lens_folder refuses to write NaN
    save_file(tensors, str(folder / "tuned_lens.safetensors"), metadata={"tl_logitlens": json.dumps(meta)})
    return folder


def _nan_params(tmp_path, model):
    folder = _tuned_lens_folder(tmp_path, model)
    params = torch.load(folder / "params.pt", weights_only=True)
    params["0.bias"][3] = float("inf")
    torch.save(params, folder / "params.pt")
    return folder


def _nan_jacobian(tmp_path, model):
    lens = _jacobian(model, 0)
    lens.save(tmp_path / "j.pt", format="jlens")
    payload = torch.load(tmp_path / "j.pt", weights_only=True)
    payload["J"][1][2, 2] = float("nan")
    torch.save(payload, tmp_path / "j.pt")
    return tmp_path / "j.pt"


def _jlens_other_width(tmp_path, model):
    torch.save({"J": {0: torch.eye(16)}, "n_prompts": 1, "source_layers": [0], "d_model": 16}, tmp_path / "j.pt")
    return tmp_path / "j.pt"


def _jlens_layer_beyond(tmp_path, model):
    d = model.cfg.d_model
    torch.save({"J": {7: torch.eye(d)}, "n_prompts": 1, "source_layers": [7], "d_model": d}, tmp_path / "j.pt")
    return tmp_path / "j.pt"


def _jlens_not_a_dict(tmp_path, model):
    torch.save([torch.eye(3)], tmp_path / "j.pt")
    return tmp_path / "j.pt"


def _jlens_garbage(tmp_path, model):
    (tmp_path / "j.pt").write_bytes(b"PK\x03\x04 not really a zip")
    return tmp_path / "j.pt"


CRAFTED = {
    "num_hidden_layers 1e9": (_huge_layers, r"config.json: num_hidden_layers is 1000000000, but the model's is 3"),
    "own n_layers 1e9": (_huge_layers_own, r"tuned_lens.safetensors: n_layers is 1000000000, but the model's is 3"),
    "truncated safetensors": (_truncated_safetensors, r"tuned_lens.safetensors is not a readable safetensors file"),
    "JSON list": (_json_list, r"config.json holds a JSON list, not an object"),
    "not UTF-8": (_not_utf8, r"config.json is not UTF-8 text"),
    "100k nested brackets": (_deeply_nested, r"config.json is nested too deeply"),
    "negative fingerprint id": (_negative_fingerprint_id, r"tuned_lens.safetensors: the readout fingerprint's token_ids"),
    "NaN own weight": (_nan_own_weight, r"tuned_lens.safetensors: 1.weight holds NaN or inf"),
    "inf in params.pt": (_nan_params, r"params.pt: 0.bias holds NaN or inf"),
    "NaN in J": (_nan_jacobian, r"j.pt: J\[1\] holds NaN or inf"),
    "J of another width": (_jlens_other_width, r"j.pt: d_model is 16, but the model's is 32"),
    "J layer beyond the model": (_jlens_layer_beyond, r"j.pt: layer 7 has a matrix, but this 3-layer model's source layers are 0 to 1"),
    "pt that is a list": (_jlens_not_a_dict, r"j.pt is not a lens file this package reads"),
    "pt that is garbage": (_jlens_garbage, r"j.pt is not a plain tensor checkpoint"),
}


@pytest.mark.parametrize("case", list(CRAFTED), ids=list(CRAFTED))
def test_crafted_lens_files_are_a_value_error_naming_the_file(tmp_path, model, case):
    make, message = CRAFTED[case]
    path = make(tmp_path, model)
    started = time.perf_counter()
    with pytest.raises(ValueError, match=message):
        load_lens(path, model)
    assert time.perf_counter() - started < 30  # refused at once, not after allocating what the file claims


def test_a_malicious_pickle_in_a_jacobian_lens_file_is_refused_not_run(tmp_path, model):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"J": {0: Evil()}, "n_prompts": 1, "d_model": 32}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_lens(tmp_path / "evil.pt", model)
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["tuned", "jacobian"])
def test_own_format_without_its_fingerprint_needs_an_explicit_override(tmp_path, model, kind):
    lens = _tuned(model, 0) if kind == "tuned" else _jacobian(model, 0)
    folder = lens.save(tmp_path / "lens")
    stem = "tuned_lens" if kind == "tuned" else "jacobian_lens"
    _edit_own_meta(folder, stem, lambda m: m.pop("fingerprint"))
    with pytest.raises(ValueError, match="carries no readout fingerprint.*pass check_fingerprint=False"):
        load_lens(folder, model)
    back = load_lens(folder, model, check_fingerprint=False)
    assert back.meta["fingerprint_skipped"] is True and "fingerprint" not in back.meta
    tl.logit_lens(model, "Hello", lens=back, sites="resid_post" if kind == "jacobian" else "resid_pre")
    # the override also lets a lens through whose fingerprint belongs to another model, on the user's word
    other = tiny_model("RMS", folded=False, seed=1)
    lens.save(tmp_path / "again")
    with pytest.raises(ValueError, match="made for another model"):
        load_lens(tmp_path / "again", other)
    load_lens(tmp_path / "again", other, check_fingerprint=False)


def test_formats_without_a_fingerprint_are_checked_by_shape_and_layer_count(tmp_path, model):
    _tuned(model, 0).save(tmp_path / "tl", format="tuned-lens")
    deeper = tiny_model("RMS", folded=False, n_layers=4)
    with pytest.raises(ValueError, match="num_hidden_layers is 3, but the model's is 4"):
        load_lens(tmp_path / "tl", deeper)
    wider = tiny_model("RMS", folded=False, d_model=64)
    with pytest.raises(ValueError, match="d_model is 32, but the model's is 64"):
        load_lens(tmp_path / "tl", wider)
    torch.save({"J": {0: torch.eye(32), 2: torch.eye(32)}, "n_prompts": 1, "source_layers": [0, 2], "d_model": 32},
               tmp_path / "j.pt")
    with pytest.raises(ValueError, match="layer 2 has a matrix, but this 3-layer model's source layers are 0 to 1"):
        load_lens(tmp_path / "j.pt", model)
    assert load_lens(tmp_path / "j.pt", deeper).n_layers == 4


@pytest.mark.parametrize(
    "model_arg, error, message",
    [("demo", TypeError, r"takes the model object, not 'demo'; load it first: model = tl.load_model\('demo'\)"),
     (object(), TypeError, "needs a TransformerLens model")],
    ids=["a name", "not a model"],
)
def test_load_lens_without_a_model_object_says_to_pass_one(model_arg, error, message):
    with pytest.raises(error, match=message):
        tl.load_lens("demo", model_arg)


def test_a_fifo_or_device_is_not_read_as_a_lens(tmp_path, model):
    os.mkfifo(tmp_path / "pipe.pt")
    with pytest.raises(ValueError, match="neither a folder nor a regular file"):
        load_lens(tmp_path / "pipe.pt", model)
    with pytest.raises(ValueError, match="neither a folder nor a regular file"):
        load_lens("/dev/zero", model)


# --------------------------------------------------------------------------------------------------
# a save killed at any moment leaves the old lens or the new one (#23 finding 3)


def _fork_and_save(save, stage: str | None) -> int:
    """Save in a forked child that dies (os._exit, as a kill -9 would leave things) at ``stage``; returns
    the child's exit status. Stages: during the first file's write, after the files are written but before
    the folder is swapped in, after the swap before the old folder is removed."""
    pid = os.fork()
    if pid == 0:  # the child: never returns
        try:
            if stage == "mid-write":
                from safetensors import torch as st

                def half_then_die(real):
                    def write(obj, path, *args, **kwargs):
                        real(obj, path, *args, **kwargs)
                        data = Path(path).read_bytes()
                        Path(path).write_bytes(data[: len(data) // 2])
                        os._exit(9)

                    return write

                torch.save, st.save_file = half_then_die(torch.save), half_then_die(st.save_file)
            elif stage == "before-swap":
                lens_files._fsync_folder = lambda folder: os._exit(9)
            elif stage == "after-swap":
                real_exchange = lens_files._exchange

                def exchange_then_die(a, b):
                    real_exchange(a, b)
                    os._exit(9)

                lens_files._exchange = exchange_then_die
            elif stage == "atomic-file":  # the file is written and flushed, not yet renamed into place
                os.replace = lambda *a: os._exit(9)
            save()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _loads_as(path, model, candidates) -> int:
    back = load_lens(path, model)
    for i, c in enumerate(candidates):
        if isinstance(c, TunedLens) and torch.equal(back.weight, c.weight) and torch.equal(back.bias, c.bias):
            return i
        if isinstance(c, JacobianLens) and _same_jacobians(back, c):
            return i
    raise AssertionError("the folder loads as neither the old lens nor the new one")


SAVES = {
    "tuned, own format": (_tuned, {}, "lens", ["mid-write", "before-swap", "after-swap"]),
    "tuned, tuned-lens format": (_tuned, {"format": "tuned-lens"}, "lens", ["mid-write", "before-swap", "after-swap"]),
    "jacobian, own format": (_jacobian, {}, "lens", ["mid-write", "before-swap", "after-swap"]),
    "jacobian, reference file": (_jacobian, {"format": "jlens"}, "lens.pt", ["mid-write", "atomic-file"]),
}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child at each stage of a save")
@pytest.mark.parametrize("case", list(SAVES), ids=list(SAVES))
def test_a_save_killed_at_each_stage_leaves_the_old_lens(tmp_path, model, case):
    make, kwargs, name, stages = SAVES[case]
    old, new = make(model, 0), make(model, 1)
    path = tmp_path / name
    old.save(path, **kwargs)
    for stage in stages:
        assert _fork_and_save(lambda: new.save(path, **kwargs), stage) == 9, stage
        assert _loads_as(path, model, [old, new]) == (1 if stage == "after-swap" else 0), stage
    if name == "lens":
        assert [p.name for p in tmp_path.iterdir() if p.name != name], "the killed saves left their temporary folders"
    assert _fork_and_save(lambda: new.save(path, **kwargs), None) == 0
    assert _loads_as(path, model, [old, new]) == 1
    if name == "lens":  # the next save clears what the killed ones left beside the folder
        assert [p.name for p in tmp_path.iterdir()] == [name]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kill -9 of a forked child saving in a loop")
@pytest.mark.parametrize("kwargs", [{}, {"format": "tuned-lens"}], ids=["own format", "tuned-lens format"])
def test_kill_9_at_random_moments_never_leaves_a_mix_or_nothing(tmp_path, model, kwargs):
    lenses = [_tuned(model, 0), _tuned(model, 1)]
    path = tmp_path / "lens"
    lenses[0].save(path, **kwargs)
    rng = random.Random(0)
    seen = set()
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            try:
                i = 0
                while True:
                    i += 1
                    lenses[i % 2].save(path, **kwargs)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        seen.add(_loads_as(path, model, lenses))
    assert seen <= {0, 1}
