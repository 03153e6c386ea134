"""Calibration lowers held-out KL; save/load round-trips and fails clearly."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from dsa_compile.calibration import (
    attention_target,
    calibrate,
    kl_on,
    load_indexers,
    save_indexers,
)
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import attention_override
from dsa_compile.indexer import REGISTRY

CFG = DSAConfig(top_k=16, index_dim=9)


def tiny_llama(hidden=64, layers=2, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, initializer_range=0.2,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def batches(n, length=111, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 101, (1, length), generator=g) for _ in range(n)]


def test_calibration_lowers_heldout_kl():
    model = tiny_llama()
    held = batches(2, seed=7)
    calibrate(model, batches(8), CFG, steps=0, progress=False)
    # Start from the data-free init so there is something to win back in a few steps.
    for ix in REGISTRY.indexers_of(model).values():
        ix.reset_parameters()
    before = kl_on(model, held, CFG)
    res = calibrate(model, batches(8), CFG, steps=40, lr=1e-2, progress=False)
    after = kl_on(model, held, CFG)
    assert res.steps == 40 and len(res.losses) == 40 and res.tokens == 8 * 111
    assert after < 0.5 * before, (before, after)
    assert all(not p.requires_grad for ix in REGISTRY.indexers_of(model).values()
               for p in ix.parameters())
    assert all(p.requires_grad for p in model.parameters())  # model flags restored


def test_attention_target_keeps_a_single_heads_peak():
    # Keys A, B, C; head 0 retrieves A, the other three heads spread over B and C.
    probs = torch.tensor([[0.8, 0.2, 0.0]] + [[0.0, 0.3, 0.7]] * 3).view(1, 2, 2, 1, 3)
    summed = attention_target(probs, head_max=0.0)[0, 0]
    torch.testing.assert_close(summed, torch.tensor([0.2, 0.275, 0.525]))
    peak = attention_target(probs, head_max=1.0)[0, 0]
    torch.testing.assert_close(peak, torch.tensor([0.8, 0.3, 0.7]) / 1.8)
    assert summed[0] < summed[1] and peak[0] > peak[1]  # only the max keeps A above B
    mixed = attention_target(probs, head_max=0.5)[0, 0]
    torch.testing.assert_close(mixed, 0.5 * summed + 0.5 * peak)
    torch.testing.assert_close(mixed.sum(), torch.tensor(1.0))


def test_head_max_out_of_range_raises():
    with pytest.raises(ValueError, match="head_max"):
        calibrate(tiny_llama(), batches(1), CFG, steps=1, head_max=1.5, progress=False)


def test_checkpoints_resume(tmp_path):
    model = tiny_llama()
    calibrate(model, batches(2), CFG, steps=6, checkpoint_dir=tmp_path, checkpoint_every=3,
              progress=False)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 6 and len(state["losses"]) == 6
    res = calibrate(model, batches(2), CFG, steps=9, checkpoint_dir=tmp_path,
                    checkpoint_every=3, progress=False)
    assert len(res.losses) == 9 and res.losses[:6] == state["losses"]
    assert (tmp_path / "log.jsonl").read_text().count("\n") == 3


def _state(model):
    return {s: {n: p.detach().clone() for n, p in ix.named_parameters()}
            for s, ix in REGISTRY.indexers_of(model).items()}


def test_save_load_round_trip_exact(tmp_path):
    model = tiny_llama()
    calibrate(model, batches(2), CFG, steps=3, progress=False)
    saved = _state(model)
    path = tmp_path / "ix.safetensors"
    assert save_indexers(model, path) == sorted(saved)
    x = batches(1, seed=3)[0]
    with torch.no_grad(), attention_override(model, "dsa", CFG):
        before = model(x).logits
    # A fresh copy of the same weights: nothing registered until loaded.
    copy = tiny_llama()
    copy.load_state_dict(model.state_dict())
    assert REGISTRY.indexers_of(copy) == {}
    loaded = load_indexers(copy, path)
    assert sorted(loaded) == sorted(saved)
    for site, params in _state(copy).items():
        for name, value in params.items():
            assert torch.equal(value, saved[site][name]), (site, name)
    with torch.no_grad(), attention_override(copy, "dsa", CFG):
        after = copy(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


class _Logits(torch.nn.Module):
    """A wrapper as users compile it: ids -> logits, the LM one module down."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, ids):
        return self.lm(ids, use_cache=False).logits


def test_save_load_across_a_wrapper(tmp_path):
    # Indexers created by torch.compile of a wrapper are anchored on "lm.model...";
    # saved from the inner model they must carry the inner names (they once saved no
    # anchors at all, and the file then failed to load).
    model = tiny_llama()
    x = batches(1, seed=3)[0]
    compiled = torch.compile(_Logits(model), backend="dsa",
                             options={"top_k": CFG.top_k, "index_dim": CFG.index_dim,
                                      "dense_below": 0})
    with torch.no_grad():
        compiled(x)
    inner = REGISTRY.indexers_of(model)
    assert sorted(inner) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert sorted(REGISTRY.indexers_of(_Logits(model))) == [f"lm.{s}" for s in sorted(inner)]
    path = tmp_path / "ix.safetensors"
    save_indexers(model, path)
    meta = json.loads(__import__("safetensors").safe_open(path, "pt").metadata()["sites"])
    assert all(m["anchors"] and all(f.startswith("model.") for f in m["anchors"])
               for m in meta.values())
    copy = tiny_llama()
    copy.load_state_dict(model.state_dict())
    load_indexers(copy, path)
    with torch.no_grad(), attention_override(model, "dsa", CFG):
        before = model(x).logits
    with torch.no_grad(), attention_override(copy, "dsa", CFG):
        after = copy(x).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_corrupt_file_raises(tmp_path):
    model = tiny_llama()
    calibrate(model, batches(1), CFG, steps=0, progress=False)
    path = tmp_path / "ix.safetensors"
    save_indexers(model, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_indexers(model, path)
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupt"):
        load_indexers(model, path)


def test_file_for_another_model_names_the_site(tmp_path):
    model = tiny_llama()
    calibrate(model, batches(1), CFG, steps=0, progress=False)
    path = tmp_path / "ix.safetensors"
    save_indexers(model, path)
    wider = tiny_llama(hidden=128)
    with pytest.raises(ValueError, match=r"site 'model.layers.0.self_attn'.*another model"):
        load_indexers(wider, path)
    other = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match=r"site 'model.layers.0.self_attn'.*not in the model"):
        load_indexers(other, path)


def test_missing_site_raises(tmp_path):
    model = tiny_llama(layers=3)
    calibrate(model, batches(1), CFG, steps=0, progress=False)
    path = tmp_path / "ix.safetensors"
    save_indexers(model, path, sites=["model.layers.0.self_attn", "model.layers.1.self_attn"])
    with pytest.raises(ValueError, match=r"site 'model.layers.2.self_attn'.*missing"):
        load_indexers(model, path)


def test_no_attention_site_raises():
    with pytest.raises(ValueError, match="no F.scaled_dot_product_attention"):
        calibrate(torch.nn.Linear(4, 4), [torch.randn(2, 4)], CFG, steps=1, progress=False)


def test_public_names_resolve_to_functions_every_time():
    """The lazy public API must not be shadowed by a submodule of the same name."""
    import dsa_compile

    for _ in range(2):
        for name in ("calibrate", "save_indexers", "load_indexers", "apply", "explain",
                     "selection_recall"):
            assert callable(getattr(dsa_compile, name)) and not isinstance(
                getattr(dsa_compile, name), type(dsa_compile)), name
