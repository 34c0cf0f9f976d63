"""Published lenses (``tl.load_lens("jlens:NAME" | "tuned:NAME", model)``): the registry lists every
Neuronpedia J-lens and every tuned-lens Space lens at a pinned revision; names resolve to the right hub
files; the hub cache is read offline, a missing file names the command that fetches it, a damaged one is
refused; a lens for another model is refused; a lens made on the raw stream reads TransformerLens's
processed model exactly (LayerNorm demo model, RMSNorm stories260K) or is refused.

No network: every hub file comes from a cache built here in the hub's own layout (``HF_HUB_CACHE`` at a
temporary folder, ``HF_HUB_OFFLINE`` on), or from a mocked download function.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

import tl_logitlens as tl
from tests.helpers import SHARED, STORIES, assert_close, require_shared
from tl_logitlens.core import compat as _compat
from tl_logitlens.lenses import published
from tl_logitlens.lenses.jacobian import JacobianLens
from tl_logitlens.lenses.loading import load_lens
from tl_logitlens.lenses.tuned import TunedLens

JLENS_DIR = SHARED / "lenses" / "stories260K-jacobian-lens"
TUNED_DIR = SHARED / "lenses" / "stories260K-tuned-lens"
REV = "0123456789abcdef0123456789abcdef01234567"
JLENS_REPO, TUNED_REPO = "tests/jacobian-lens", "tests/tuned-lens"
NEURONPEDIA_REVISION = "a4114d7752d11eb546e6cf372213d7e75526d3a1"
TUNED_LENS_REVISION = "1ac7285852a22309f571c2555efc37375d0c4cda"
# The lens folders of the Space AlignmentResearch/tuned-lens at commit 1ac7285 ("Lamma-3-8b (#48)"), read
# off the Space's tree pages (lens/, lens/EleutherAI, lens/facebook, lens/meta-llama, ...): every folder
# holding config.json and params.pt, as tuned-lens 0.2.0's load_artifacts reads them.
TUNED_LENS_FOLDERS = [
    "gpt2", "gpt2-large", "gpt2-xl", "EleutherAI/gpt-neox-20b",
    *(f"EleutherAI/pythia-{s}-deduped" for s in ("70m", "160m", "410m", "1.4b", "2.8b", "6.9b", "12b")),
    *(f"EleutherAI/pythia-{s}-deduped-v0" for s in ("70m", "160m", "410m", "1b", "1.4b", "2.8b", "6.9b", "12b")),
    *(f"facebook/llama-{s}" for s in ("7b", "13b", "30b", "65b")),
    *(f"facebook/opt-{s}" for s in ("125m", "1.3b", "6.7b")),
    "CarperAI/stable-vicuna-13b", "lmsys/vicuna-13b-v1.1",
    "meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf", "meta-llama/Llama-2-7b-chat-hf/hh-rlhf",
    "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-13b-chat-hf",
    "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct",
]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# a hub cache in the hub's own layout, and a registry of test entries


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, offline: nothing here reaches the network."""
    import huggingface_hub

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def put(cache: Path, repo_id: str, repo_type: str, path: str, content: bytes, lfs: bool = True) -> Path:
    """``content`` filed as ``hf_hub_download`` files it: ``blobs/<etag>`` (the LFS sha256, or the git blob
    sha1 of a small file) and ``snapshots/<revision>/<path>`` linking to it. Returns the blob."""
    folder = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    if lfs:
        etag = hashlib.sha256(content).hexdigest()
    else:
        etag = hashlib.sha1(f"blob {len(content)}\0".encode() + content).hexdigest()
    blob = folder / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    pointer = folder / "snapshots" / REV / path
    pointer.parent.mkdir(parents=True, exist_ok=True)
    pointer.symlink_to(os.path.relpath(blob, pointer.parent))
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REV)
    return blob


def entry(kind: str, name: str, files: list[dict], model: str | None = None) -> dict:
    repo_id, repo_type = (JLENS_REPO, "model") if kind == "jlens" else (TUNED_REPO, "space")
    return {"kind": kind, "name": name, "model": model or name, "aliases": [], "repo_id": repo_id,
            "repo_type": repo_type, "revision": REV, "files": files}  # fmt: skip


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Write test entries into a registry file that load_lens reads beside the packaged one."""

    def write(*entries: dict) -> Path:
        path = tmp_path / "registry.json"
        path.write_text(json.dumps({"format_version": 1, "lenses": list(entries)}))
        monkeypatch.setenv(published.REGISTRY_ENV, str(path))
        return path

    return write


def reference_bytes(lens: JacobianLens, tmp_path: Path, dtype: torch.dtype = torch.float32) -> bytes:
    """A J-lens file as Neuronpedia publishes it: the reference format's four keys, no metadata of ours."""
    out = tmp_path / "plain.pt"
    J = {layer: m.to(dtype) for layer, m in lens.jacobians.items()}
    torch.save({"J": J, "n_prompts": lens.n_prompts, "source_layers": list(J), "d_model": lens.d_model}, out)
    return out.read_bytes()


def tuned_lens_files(lens: TunedLens, tmp_path: Path) -> tuple[bytes, bytes]:
    """config.json and params.pt of a lens in tuned-lens 0.2.0's format."""
    lens.save(tmp_path / "tl-format", format="tuned-lens")
    return (tmp_path / "tl-format" / "config.json").read_bytes(), (
        tmp_path / "tl-format" / "params.pt"
    ).read_bytes()


@pytest.fixture
def stories_hub(hub, registry):
    """The shared stories260K J-lens and tuned lens, published under test entries and cached."""
    jlens = require_shared(JLENS_DIR / "jlens.pt").read_bytes()
    config = require_shared(TUNED_DIR / "config.json").read_bytes()
    params = (TUNED_DIR / "params.pt").read_bytes()
    put(hub, JLENS_REPO, "model", "stories260K/jlens.pt", jlens)
    put(hub, TUNED_REPO, "space", "lens/stories260K/config.json", config, lfs=False)
    put(hub, TUNED_REPO, "space", "lens/stories260K/params.pt", params)
    registry(
        entry("jlens", "stories260K", [{"path": "stories260K/jlens.pt", "size": len(jlens)}]),
        entry(
            "tuned",
            "stories260K",
            [{"path": "lens/stories260K/config.json"}, {"path": "lens/stories260K/params.pt"}],
        ),
        entry("jlens", "missing", [{"path": "missing/jlens.pt"}], model="stories260K"),
    )
    return hub


# ---------------------------------------------------------------------------------------------------
# the registry


def _transformer_lens_registry() -> dict | None:
    if _compat.TL_MAJOR < 4:
        return None
    import transformer_lens

    path = Path(transformer_lens.__file__).parent / "tools" / "analysis" / "jacobian_lens_registry.json"
    return json.loads(path.read_text()) if path.is_file() else None


def test_registry_lists_every_neuronpedia_j_lens_that_transformer_lens_lists():
    """Every entry of TransformerLens 4.3's registry, with its aliases, file and pinned commit (37 of them;
    on TransformerLens 3.9, which ships no registry, the count and the pin)."""
    ours = {e.name: e for e in published.published_lenses("jlens")}
    assert len(ours) == 37
    assert {(e.repo_id, e.repo_type, e.revision) for e in ours.values()} == {
        ("neuronpedia/jacobian-lens", "model", NEURONPEDIA_REVISION)
    }
    theirs = _transformer_lens_registry()
    if theirs is None:
        return
    listed = {k: v for k, v in theirs.items() if isinstance(v, dict)}
    assert sorted(ours) == sorted(listed)
    assert theirs["revision"] == NEURONPEDIA_REVISION
    for name, e in listed.items():
        mine = ours[name]
        assert (mine.repo_id, [f.path for f in mine.files], list(mine.aliases), mine.corpus) == (
            e["repo_id"], [e["filename"]], e["aliases"], e["corpus"]
        ), name  # fmt: skip
        assert mine.model == (e["aliases"][-1] if e["aliases"] else name)


def test_registry_lists_every_tuned_lens_of_the_space():
    entries = published.published_lenses("tuned")
    assert sorted(e.name for e in entries) == sorted(TUNED_LENS_FOLDERS)
    for e in entries:
        assert (e.repo_id, e.repo_type, e.revision) == (
            "AlignmentResearch/tuned-lens",
            "space",
            TUNED_LENS_REVISION,
        )
        assert [f.path for f in e.files] == [f"lens/{e.name}/config.json", f"lens/{e.name}/params.pt"]
        assert e.model == e.name.removesuffix("/hh-rlhf")


def test_every_entry_resolves_to_its_repo_file_and_revision(monkeypatch):
    """Each entry, by its key, fetches exactly its files from its repo at its pinned revision (the
    download function mocked); revision= fetches the same files at that revision."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, *, repo_type=None, revision=None, **kwargs):
        calls.append((repo_id, filename, repo_type, revision))
        return f"/nowhere/{filename}"

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    entries = published.published_lenses()
    assert len(entries) == 72
    for e in entries:
        calls.clear()
        paths = published.download(published.resolve(e.key))
        assert calls == [(e.repo_id, f.path, e.repo_type, e.revision) for f in e.files], e.key
        assert list(paths) == [f.path for f in e.files]
        calls.clear()
        published.download(published.resolve(e.key, revision="v2"))
        assert calls == [(e.repo_id, f.path, e.repo_type, "v2") for f in e.files], e.key


@pytest.mark.parametrize(
    ("spec", "key"),
    [
        ("jlens:gpt2", "jlens:gpt2-small"),
        ("jlens:gpt2-small", "jlens:gpt2-small"),
        ("jlens:openai-community/gpt2", "jlens:gpt2-small"),
        ("jlens:google/gemma-2-2b", "jlens:gemma-2-2b"),
        ("jlens:Qwen/Qwen3-1.7B", "jlens:qwen3-1.7b"),
        ("tuned:gpt2", "tuned:gpt2"),
        ("tuned:openai-community/gpt2", "tuned:gpt2"),
        ("tuned:pythia-70m-deduped", "tuned:EleutherAI/pythia-70m-deduped"),
        ("tuned:EleutherAI/pythia-70m-deduped-v0", "tuned:EleutherAI/pythia-70m-deduped-v0"),
        ("tuned:meta-llama/Llama-2-7b-chat-hf", "tuned:meta-llama/Llama-2-7b-chat-hf"),
        ("tuned:huggyllama/llama-7b", "tuned:facebook/llama-7b"),
    ],
)
def test_names_resolve_by_short_name_hub_id_or_alias(spec, key):
    assert published.resolve(spec).key == key


def test_a_bare_kind_looks_up_the_models_own_name(stories_hub):
    model = type("M", (), {"cfg": type("C", (), {"model_name": "gpt2"})()})()
    assert published.resolve("jlens", model).key == "jlens:gpt2-small"
    assert published.resolve("tuned", model).key == "tuned:gpt2"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("jlens:gpt3", r"no published Jacobian lens for 'gpt3'; `tl-logitlens lenses` lists the 37"),
        ("tuned:llama", r"no published tuned lens for 'llama' \(close: tuned:facebook/llama-7b"),
        ("jlens", r"'jlens' names no model"),
    ],
)
def test_unknown_names_are_refused_with_where_to_look(spec, message):
    with pytest.raises(ValueError, match=message):
        published.resolve(spec)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"kind": "lens", "name": "x"}, r"kind is 'lens'"),
        ({**entry("jlens", "x", [{"path": "a.pt"}]), "revision": "main"}, r"revision must pin a commit"),
        ({**entry("jlens", "x", [{"path": "a.pt"}, {"path": "b.pt"}])}, r"a J-lens entry has one file"),
        ({**entry("tuned", "x", [{"path": "lens/x/params.pt"}])}, r"two files"),
        ({**entry("jlens", "x", [{"path": "a.pt", "sha256": "abc"}])}, r"sha256 must be 64"),
    ],
)
def test_a_malformed_registry_entry_is_refused(tmp_path, raw, message):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format_version": 1, "lenses": [raw]}))
    with pytest.raises(ValueError, match=message):
        published.read_registry(path)


# ---------------------------------------------------------------------------------------------------
# the cache, offline


def test_a_cached_lens_loads_offline_printing_nothing_and_equals_the_local_file(stories_hub, stories, capfd):
    jlens = load_lens("jlens:stories260K", stories)
    tuned = load_lens("tuned:stories260K", stories)
    out, err = capfd.readouterr()
    assert out == err == ""
    local_j = load_lens(JLENS_DIR / "jlens.pt", stories)
    local_t = load_lens(TUNED_DIR, stories)
    for layer in local_j.source_layers:
        assert torch.equal(jlens.jacobians[layer], local_j.jacobians[layer])
    assert torch.equal(tuned.weight, local_t.weight) and torch.equal(tuned.bias, local_t.bias)
    record = jlens.meta["published"]
    assert (record["key"], record["repo_id"], record["revision"], record["model"]) == (
        "jlens:stories260K", JLENS_REPO, REV, "stories260K"
    )  # fmt: skip
    assert record["checks"]["stories260K/jlens.pt"]["checked"] == ["sha256", "registry size"]
    checks = tuned.meta["published"]["checks"]
    assert checks["lens/stories260K/config.json"]["checked"] == ["git_sha1"]
    assert checks["lens/stories260K/params.pt"]["checked"] == ["sha256"]
    assert jlens.meta["model_name"] == "stories260K"


def test_a_lens_missing_from_the_cache_offline_names_the_file_and_the_command(stories_hub, stories):
    with pytest.raises(ValueError) as info:
        load_lens("jlens:missing", stories)
    message = str(info.value)
    assert "missing/jlens.pt of tests/jacobian-lens" in message and "HF_HUB_OFFLINE is set" in message
    assert message.endswith(
        f"fetch it once with a network: hf download {JLENS_REPO} missing/jlens.pt --revision {REV}"
    )


def test_an_explicit_repo_file_loads_from_the_cache(stories_hub, stories):
    lens = load_lens("jlens", stories, repo_id=JLENS_REPO, filename="stories260K/jlens.pt", revision=REV)
    assert lens.meta["published"]["repo_id"] == JLENS_REPO and lens.meta["published"]["model"] == ""
    tuned = load_lens(
        "tuned", stories, repo_id=TUNED_REPO, repo_type="space", filename="lens/stories260K", revision=REV
    )
    assert isinstance(tuned, TunedLens)


@pytest.mark.parametrize(
    ("spec", "kwargs", "message"),
    [
        ("demo", {"revision": REV}, r"'demo' is a local lens; revision= go with a lens from the hub"),
        ("jlens:stories260K", {"repo_id": JLENS_REPO, "filename": "x.pt"}, r"says only its kind"),
        ("jlens", {"repo_id": JLENS_REPO}, r"needs both repo_id= and filename="),
        ("jlens", {"repo_id": "no-slash", "filename": "x.pt"}, r"repo_id must be a hub repo 'owner/name'"),
        ("jlens:stories260K", {"repo_type": "space"}, r"repo_type= goes with repo_id="),
        ("nowhere", {"revision": REV}, r"revision= goes with a lens from the hub"),
        ("nowhere", {}, r"no lens at 'nowhere'.*'jlens:NAME' or 'tuned:NAME'"),
    ],
)
def test_hub_options_in_the_wrong_place_are_refused(stories_hub, stories, spec, kwargs, message):
    with pytest.raises(ValueError, match=message):
        load_lens(spec, stories, **kwargs)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte"])
def test_a_damaged_file_in_the_cache_is_refused(stories_hub, stories, damage):
    blob = (
        stories_hub / "models--tests--jacobian-lens" / "snapshots" / REV / "stories260K/jlens.pt"
    ).resolve()
    data = blob.read_bytes()
    if damage == "truncated":
        blob.write_bytes(data[: len(data) // 2])
    else:
        blob.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    with pytest.raises(
        ValueError,
        match=r"jlens\.pt of tests/jacobian-lens\) is damaged or incomplete: sha256 .*--force-download",
    ):
        load_lens("jlens:stories260K", stories)


def test_a_whole_file_the_registry_records_otherwise_says_the_record_is_wrong(stories_hub, stories, registry):
    size = (
        (stories_hub / "models--tests--jacobian-lens" / "snapshots" / REV / "stories260K/jlens.pt")
        .stat()
        .st_size
    )
    registry(
        entry(
            "jlens", "stories260K", [{"path": "stories260K/jlens.pt", "size": size + 1, "sha256": "0" * 64}]
        )
    )
    with pytest.raises(ValueError, match=r"matches the hub's checksum but not this package's registry .*load it by location: "
                       r"tl\.load_lens\('jlens', model, repo_id='tests/jacobian-lens'"):  # fmt: skip
        load_lens("jlens:stories260K", stories)


def test_a_cache_without_symlinks_is_checked_against_the_registry(stories_hub, stories, registry):
    """Some caches copy files into snapshots/ (no symlinks): the blob's name, the hub's checksum, is lost."""
    pointer = stories_hub / "models--tests--jacobian-lens" / "snapshots" / REV / "stories260K/jlens.pt"
    data = pointer.read_bytes()
    pointer.unlink()
    pointer.write_bytes(data)
    registry(entry("jlens", "stories260K", [{"path": "stories260K/jlens.pt"}]))
    lens = load_lens("jlens:stories260K", stories)
    assert (
        lens.meta["published"]["checks"]["stories260K/jlens.pt"]["checked"] == []
    )  # nothing to check against
    digest = hashlib.sha256(data).hexdigest()
    registry(
        entry("jlens", "stories260K", [{"path": "stories260K/jlens.pt", "size": len(data), "sha256": digest}])
    )
    lens = load_lens("jlens:stories260K", stories)
    assert lens.meta["published"]["checks"]["stories260K/jlens.pt"]["checked"] == [
        "registry size",
        "registry sha256",
    ]
    pointer.write_bytes(data[:-10])
    with pytest.raises(ValueError, match=r"damaged or incomplete: .*bytes, but the registry records"):
        load_lens("jlens:stories260K", stories)


def test_a_damaged_small_git_file_is_refused_by_its_git_sha1(stories_hub, stories):
    config = (
        stories_hub
        / f"spaces--{TUNED_REPO.replace('/', '--')}"
        / "snapshots"
        / REV
        / "lens/stories260K/config.json"
    ).resolve()
    config.write_bytes(config.read_bytes().replace(b"64", b"65"))
    with pytest.raises(
        ValueError, match=r"config\.json of tests/tuned-lens\) is damaged or incomplete: git blob sha1"
    ):
        load_lens("tuned:stories260K", stories)


# ---------------------------------------------------------------------------------------------------
# provenance


def test_a_lens_for_another_model_is_refused_before_anything_is_fetched(stories_hub, stories, monkeypatch):
    demo = tl.load_model("demo")
    with pytest.raises(
        ValueError, match=r"\(jlens:stories260K\) was published for 'stories260K', but this model is 'demo'"
    ):
        load_lens("jlens:stories260K", demo)
    with pytest.raises(ValueError, match=r"published for 'stories260K'"):
        load_lens("jlens:missing", demo)  # refused by name: the missing file is never asked for
    # the same weights under another name: refused, unless the user says otherwise
    monkeypatch.setattr(stories.cfg, "model_name", "my-stories")
    with pytest.raises(ValueError, match=r"pass check_fingerprint=False"):
        load_lens("tuned:stories260K", stories)
    lens = load_lens("tuned:stories260K", stories, check_fingerprint=False)
    assert lens.meta["fingerprint_skipped"] is True


def test_a_lens_for_another_revision_of_the_model_is_refused():
    hf_config = type("Config", (), {"_commit_hash": "b" * 40, "_name_or_path": "gpt2"})()
    model = type(
        "M",
        (),
        {
            "cfg": type("C", (), {"model_name": "gpt2"})(),
            "original_model": type("O", (), {"config": hf_config})(),
        },
    )()
    record = {"key": "tuned:gpt2", "model": "gpt2", "aliases": [], "model_revision": "a" * 40}
    with pytest.raises(
        ValueError, match=r"made for revision aaaaaaaaaaaa of 'gpt2', but this model is revision bbbbbbbbbbbb"
    ):
        published.check_published_for(model, record, "tuned lens")
    published.check_published_for(model, {**record, "model_revision": "b" * 40}, "tuned lens")
    published.check_published_for(
        model, {**record, "model": "openai-community/gpt2", "model_revision": None}, "tuned lens"
    )


# ---------------------------------------------------------------------------------------------------
# the raw stream the lenses were made on, and TransformerLens's processed one


def test_a_raw_stream_j_lens_reads_the_centred_layernorm_demo_model_exactly(hub, registry, tmp_path):
    """On a LayerNorm model TransformerLens's centring removes the stream's mean (h' = C h, C = I - 11ᵀ/d);
    a J-lens maps h' to J h' = J h - mean(h)·J 1, and J 1 = 1, which the final norm's centring removes: the
    processed model reads as the raw one (fold_ln and center_unembed leave the log-probs as they are).
    Both models in float64, so what is compared is the maths, not float32 rounding through the blocks."""
    processed = tl.load_model("demo", dtype="float64")
    raw = tl.load_model(
        "demo", dtype="float64", fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    demo_j = load_lens("demo-jacobian", processed)
    put(hub, JLENS_REPO, "model", "demo/jlens.pt", reference_bytes(demo_j, tmp_path))
    leaky = JacobianLens({k: m + 0.05 * torch.outer(torch.arange(m.shape[0]) / m.shape[0], torch.ones(m.shape[0])) for k, m in demo_j.jacobians.items()},
                         n_prompts=1, d_model=demo_j.d_model)  # fmt: skip
    put(hub, JLENS_REPO, "model", "demo/leaky.pt", reference_bytes(leaky, tmp_path))
    registry(
        entry("jlens", "demo", [{"path": "demo/jlens.pt"}]),
        entry("jlens", "leaky", [{"path": "demo/leaky.pt"}], model="demo"),
    )
    on_raw, on_processed = load_lens("jlens:demo", raw), load_lens("jlens:demo", processed)
    assert on_raw.meta["stream_centred"] is False
    texts = tl.demo_texts()[:2]
    a = tl.logit_lens(
        raw, texts, lens=on_raw, sites="resid_post", keep_logprobs=True, positions=None, top_k=1
    )
    b = tl.logit_lens(
        processed, texts, lens=on_processed, sites="resid_post", keep_logprobs=True, positions=None, top_k=1
    )
    valid = a.valid
    assert torch.equal(valid, b.valid)
    assert_close(b.full_logprobs[:, valid], a.full_logprobs[:, valid], atol=1e-5, rtol=0)
    # the same lens stored in float16 (as Neuronpedia stores them): its rounding moves J 1 off 1 by ~5e-4,
    # within what float16 allows, so it loads, and reads the processed model as the raw one to that rounding
    put(hub, JLENS_REPO, "model", "demo/half.pt", reference_bytes(demo_j, tmp_path, torch.float16))
    registry(
        entry("jlens", "demo", [{"path": "demo/jlens.pt"}]),
        entry("jlens", "leaky", [{"path": "demo/leaky.pt"}], model="demo"),
        entry("jlens", "half", [{"path": "demo/half.pt"}], model="demo"),
    )
    half = load_lens("jlens:half", processed)
    assert half.meta["stored_dtype"] == "float16" and half.mean_leak() is None
    c = tl.logit_lens(
        raw,
        texts,
        lens=load_lens("jlens:half", raw),
        sites="resid_post",
        keep_logprobs=True,
        positions=None,
        top_k=1,
    )
    d = tl.logit_lens(
        processed, texts, lens=half, sites="resid_post", keep_logprobs=True, positions=None, top_k=1
    )
    assert_close(d.full_logprobs[:, valid], c.full_logprobs[:, valid], atol=1e-4, rtol=0)  # measured 2.6e-5
    # a lens that reads the stream's mean cannot: refused, with how to load the model uncentred
    with pytest.raises(
        ValueError, match=r"moves the all-ones direction off itself.*center_writing_weights=False"
    ):
        load_lens("jlens:leaky", processed)
    load_lens("jlens:leaky", raw)


def test_a_raw_stream_tuned_lens_is_refused_on_the_centred_demo_model(hub, registry, tmp_path):
    processed = tl.load_model("demo")
    raw = tl.load_model("demo", fold_ln=False, center_writing_weights=False, center_unembed=False)
    config, params = tuned_lens_files(load_lens("demo", processed), tmp_path)
    put(hub, TUNED_REPO, "space", "lens/demo/config.json", config, lfs=False)
    put(hub, TUNED_REPO, "space", "lens/demo/params.pt", params)
    registry(entry("tuned", "demo", [{"path": "lens/demo/config.json"}, {"path": "lens/demo/params.pt"}]))
    with pytest.raises(
        ValueError, match=r"centred writing weights.*tl\.load_model\(\.\.\., center_writing_weights=False\)"
    ):
        load_lens("tuned:demo", processed)
    assert isinstance(load_lens("tuned:demo", raw), TunedLens)


@pytest.mark.parametrize("kind", ["jlens", "tuned"])
def test_published_lenses_read_the_processed_rmsnorm_stories_model_as_the_raw_one(stories_hub, kind):
    """RMSNorm: fold_ln folds the norms' gains into the next weights and nothing centres the stream, so a
    lens made on the raw stream reads the processed model exactly (float64 models: the maths, not float32
    rounding through the blocks, which moves log-probs by up to 2e-5 here)."""
    path = require_shared(STORIES)
    processed = tl.load_model(path, dtype="float64")
    raw = tl.load_model(
        path, dtype="float64", fold_ln=False, center_writing_weights=False, center_unembed=False
    )
    sites = "resid_post" if kind == "jlens" else "resid_pre"
    tokens = processed.to_tokens(["Once upon a time, there was a little girl named Lily. She loved to play"])
    lenses = {m: load_lens(f"{kind}:stories260K", m) for m in (raw, processed)}
    a, b = (
        tl.logit_lens(m, tokens, lens=lenses[m], sites=sites, keep_logprobs=True, top_k=1)
        for m in (raw, processed)
    )
    assert_close(b.full_logprobs, a.full_logprobs, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# half-precision files


@pytest.mark.parametrize("fmt", ["tl_logitlens", "jlens"])
def test_float16_files_are_half_the_size_and_read_back_in_float32(tmp_path, fmt):
    model = tl.load_model("demo")
    lens = load_lens("demo-jacobian", model)
    full = lens.save(tmp_path / f"f32-{fmt}", format=fmt)
    half = lens.save(tmp_path / f"f16-{fmt}", format=fmt, dtype=torch.float16)

    def size(p: Path) -> int:
        return sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else p.stat().st_size

    assert size(half) < 0.6 * size(full)
    back = load_lens(half, model)
    assert back.meta["stored_dtype"] == "float16" and load_lens(full, model).meta["stored_dtype"] == "float32"
    for layer, m in lens.jacobians.items():
        assert back.jacobians[layer].dtype == torch.float32
        assert torch.equal(back.jacobians[layer], m.half().float())
    if fmt == "tl_logitlens":
        card = json.loads((half / "jacobian_lens.json").read_text())
        assert card["stored_dtype"] == "float16"
        from safetensors import safe_open

        with safe_open(str(half / "jacobian_lens.safetensors"), "pt") as fh:
            assert all(fh.get_tensor(k).dtype == torch.float16 for k in fh.keys())
    else:
        assert all(t.dtype == torch.float16 for t in torch.load(half, weights_only=True)["J"].values())
        if _compat.TL_MAJOR >= 4:  # TransformerLens 4.3 reads it as it reads its own (float16) saves
            from transformer_lens.tools.analysis import JacobianLens as TLJacobianLens

            theirs = TLJacobianLens.load(str(half))
            assert all(
                torch.equal(theirs.jacobians[k].float(), back.jacobians[k]) for k in lens.source_layers
            )
    with pytest.raises(ValueError, match=r"dtype must be one of torch\.float32, torch\.float16"):
        lens.save(tmp_path / "x", dtype=torch.int8)


# ---------------------------------------------------------------------------------------------------
# the command line


def test_lenses_command_lists_the_registry_with_sizes_and_what_is_cached(stories_hub, capsys, monkeypatch):
    from tl_logitlens.cli.commands import main

    monkeypatch.setenv("COLUMNS", "80")
    assert main(["lenses"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert "Jacobian lenses (Neuronpedia): 39 of 39" in out and "tuned lenses (tuned-lens): 36 of 36" in out
    row = next(line for line in lines if line.startswith("jlens:stories260K "))
    size = sum(p.stat().st_size for p in (stories_hub / "models--tests--jacobian-lens" / "blobs").iterdir())
    assert row.split()[1:] == [f"{size / 1000:.3g}", "KB", "yes"]
    missing = next(line for line in lines if line.startswith("jlens:missing "))
    assert missing.split()[1:] == ["?", "no", "stories260K"]
    gpt2 = next(line for line in lines if line.startswith("jlens:gpt2-small "))
    assert gpt2.split()[1:] == ["?", "no", "openai-community/gpt2"]
    assert main(["lenses", "--kind", "tuned", "--cached"]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[0] for line in out.splitlines() if line.startswith(("jlens:", "tuned:"))]
    assert rows == ["tuned:stories260K"]


def test_run_and_eval_take_a_published_lens(hub, registry, tmp_path, capsys):
    from tl_logitlens.cli.commands import main

    processed = tl.load_model("demo")
    put(
        hub,
        JLENS_REPO,
        "model",
        "demo/jlens.pt",
        reference_bytes(load_lens("demo-jacobian", processed), tmp_path),
    )
    registry(entry("jlens", "demo", [{"path": "demo/jlens.pt"}]))
    csv = tmp_path / "lens.csv"
    html = tmp_path / "report.html"
    args = ["run", "demo", "The dog was very", "--lens", "jlens:demo", "--csv", str(csv), "--out", str(html)]
    assert main(args) == 0, capsys.readouterr().err
    assert "Jacobian lens" in csv.read_text() and "Jacobian lens" in html.read_text()
    report = tmp_path / "eval.json"
    assert (
        main(
            [
                "eval",
                "demo",
                "--texts",
                "demo",
                "--lens",
                "jlens:demo",
                "--max-tokens",
                "200",
                "--json",
                str(report),
            ]
        )
        == 0
    )
    assert "Jacobian lens" in report.read_text()


def test_a_tuned_lens_from_two_commits_is_refused(stories_hub, stories, monkeypatch, tmp_path):
    """A branch that moved between the two downloads leaves config.json and params.pt in two snapshots."""
    e = published.resolve("tuned:stories260K", revision="main")
    paths = {e.files[0].path: tmp_path / "a" / "config.json", e.files[1].path: tmp_path / "b" / "params.pt"}
    monkeypatch.setattr(published, "fetch", lambda entry: (paths, {}))
    with pytest.raises(
        ValueError, match=r"came from different commits of tests/tuned-lens .*pass revision= a commit hash"
    ):
        load_lens("tuned:stories260K", stories, revision="main")
