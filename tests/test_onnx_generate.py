"""Stateful ONNX decoders (export(..., past=True)) and generation on onnxruntime.

The PyTorch reference is the DSA model itself: each step re-runs the whole sequence with
every SDPA call swapped for ``torch.ops.dsa.attention`` and the site's registry indexer
(``attention_override(model, "dsa", config)``, no cache: the selection of a query only
depends on its own and earlier tokens, so this is what a cached decode must give). The
file uses the same registry indexers. With top_k covering every key the tokens must equal
the dense model's ``generate``. Tiny random Llama-family models; prompts longer than top_k
so that DSA selects.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hf_models import tiny_lm  # tests/ is on sys.path (rootdir conftest)

import dsa_compile.onnx as dsa_onnx
from dsa_compile.config import DSAConfig
from dsa_compile.evaluation import attention_override
from dsa_compile.onnx import functions
from dsa_compile.onnx.generation import Decoder, generate

ort = pytest.importorskip("onnxruntime")

SPARSE = DSAConfig(top_k=8, dense_below=0)
COVERING = DSAConfig(top_k=256, dense_below=0)
NEW = 6


def _prompt(length: int, seed: int) -> list[int]:
    return torch.randint(1, 96, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def _export(model, path, config=SPARSE, dense=False, **kw) -> str:
    ids = torch.tensor([_prompt(21, 0)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # data-free indexers of tiny prompts
        dsa_onnx.export(model, (ids,), path, config=config, past=True, dense=dense,
                        query_chunk=4, **kw)
    return str(path)


@torch.no_grad()
def _dsa_greedy(model, prompt: list[int], steps: int, config: DSAConfig) -> list[int]:
    """Greedy tokens of the PyTorch DSA model (full re-run per step, no cache)."""
    ids = torch.tensor([prompt])
    with attention_override(model, "dsa", config):
        for _ in range(steps):
            nxt = model(input_ids=ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def family_files(request, tmp_path_factory):
    model = tiny_lm(request.param)
    folder = tmp_path_factory.mktemp(request.param)
    return model, _export(model, folder / "dsa.onnx"), _export(model, folder / "dense.onnx",
                                                               dense=True)


# ---------------------------------------------------------------------------- dsa ops


def test_files_of_earlier_releases_keep_verifying():
    """verify accepts the bodies earlier releases wrote (functions.RETIRED_BODIES): these
    are the digests of the releases before the q_offset overloads and before query tiles."""
    pinned = {
        ("Attention", ""): "5941137f222accb498286fb89105a1c57714598322304d288ecadffc9d4806b3",
        ("Attention", "key_mask"):
            "bca2cb15a7382b9ed19f08f643d3d74659e9fee19c94d38df720a3b085ab0a33",
        ("IndexerTopK", ""): "b7fd69fb92af07c5d5623927a26b1d52cb44df3d496850fd8b947e41ecf38c43",
        ("IndexerTopK", "key_mask"):
            "8c06d80346cc52e6eac62d56d08ffcdfaec4724381e4d24fff2505aefc8feaf2",
    }
    bodies = functions.all_functions()
    assert hashlib.sha256(bodies["SparseAttention", ""].SerializeToString(
        deterministic=True)).hexdigest() == \
        "33512ebdcb9d9e4276595d3d4761ab4295150c0e05c34f4b59f9561b71edc1f2"
    for key, digest in pinned.items():
        assert digest in functions.RETIRED_BODIES[key], key
    # every overload of today keeps its predecessor accepted
    assert set(functions.RETIRED_BODIES) == {k for k in bodies if k[0] != "SparseAttention"}


@pytest.mark.parametrize("lq,lk,q_offset", [(1, 40, 39), (1, 40, 4), (1, 40, 20), (5, 40, 35),
                                            (7, 7, 0), (3, 30, 20), (24, 50, 26)],
                         ids=["decode", "decode-sees-few", "decode-mid", "chunk-at-end",
                              "prefill", "chunk-mid", "tall-chunk"])
@pytest.mark.parametrize("key_mask", [False, True], ids=["nomask", "keymask"])
def test_runtime_q_offset_matches_the_attribute(lq, lk, q_offset, key_mask):
    g = torch.Generator().manual_seed(lq + lk)
    q, k, v = (torch.randn(2, 4, lq, 16, generator=g), torch.randn(2, 2, lk, 16, generator=g),
               torch.randn(2, 2, lk, 16, generator=g))
    q_idx, k_idx = torch.randn(2, lq, 2, 8, generator=g), torch.randn(2, lk, 8, generator=g)
    w = torch.rand(2, lq, 2, generator=g) + 0.1
    mask = torch.ones(2, lk, dtype=torch.bool)
    mask[1, :3] = False
    feed = {"q": q, "k": k, "v": v, "q_idx": q_idx, "k_idx": k_idx, "w": w}
    if key_mask:
        feed["key_mask"] = mask
    # Chunks of >= MASKED_DENSE_MIN_ROWS rows score queries-first, shorter ones keys-first.
    chunk = 32 if lq >= functions.MASKED_DENSE_MIN_ROWS else 4
    model = functions.op_model("Attention", key_mask=key_mask, q_offset_input=True, top_k=6,
                               scale=0.25, query_chunk=chunk)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {**{n: t.numpy() for n, t in feed.items()},
                                "q_offset": np.array(q_offset, np.int64)})
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, 6, 0.25, True, q_offset,
                                   mask if key_mask else None, 0.0, 0)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)

    topk = functions.op_model("IndexerTopK", key_mask=key_mask, q_offset_input=True, top_k=6)
    session = ort.InferenceSession(topk.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = {"q_idx": q_idx.numpy(), "k_idx": k_idx.numpy(), "w": w.numpy(),
              "q_offset": np.array([q_offset], np.int64)}
    if key_mask:
        inputs["key_mask"] = mask.numpy()
    (idx,) = session.run(None, inputs)
    want_idx = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, 6, q_offset, True,
                                          mask if key_mask else None)
    np.testing.assert_array_equal(idx, want_idx.numpy())


@pytest.mark.parametrize("q_offset", [3, 24, 25, 39])
@pytest.mark.parametrize("lq", [1, 3])
def test_runtime_q_offset_keeps_the_dense_below_rule(lq, q_offset):
    """Rows that see at most dense_below keys take exact dense attention (here 25 > top_k),
    in the one-row decode body as in the chunked one."""
    g = torch.Generator().manual_seed(q_offset)
    lk = q_offset + lq
    q, k, v = (torch.randn(1, 4, lq, 16, generator=g), torch.randn(1, 2, lk, 16, generator=g),
               torch.randn(1, 2, lk, 16, generator=g))
    q_idx, k_idx = torch.randn(1, lq, 2, 8, generator=g), torch.randn(1, lk, 8, generator=g)
    w = torch.rand(1, lq, 2, generator=g) + 0.1
    model = functions.op_model("Attention", q_offset_input=True, top_k=6, scale=0.25,
                               query_chunk=4, dense_below=25)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"q": q.numpy(), "k": k.numpy(), "v": v.numpy(),
                                "q_idx": q_idx.numpy(), "k_idx": k_idx.numpy(), "w": w.numpy(),
                                "q_offset": np.array(q_offset, np.int64)})
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, 6, 0.25, True, q_offset, None,
                                   0.0, 25)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5)


def test_verify_refuses_q_offset_input_with_attribute(tmp_path):
    model = tiny_lm("llama")
    proto = dsa_onnx.verify(_export(model, tmp_path / "d.onnx"))
    assert proto["dsa_nodes"] == {"Attention": 2}
    assert proto["functions"] == ["Attention:key_mask+q_offset"]
    assert proto["rewrite"] == "decoder"
    import onnx

    bad = onnx.load(tmp_path / "d.onnx")
    node = next(n for n in bad.graph.node if n.domain == functions.DOMAIN)
    node.attribute.append(onnx.helper.make_attribute("q_offset", 3))
    with pytest.raises(ValueError, match="both a q_offset input"):
        dsa_onnx.verify(bad)


# ---------------------------------------------------------------------------- decoder


def test_decoder_interface_and_metadata(family_files):
    model, dsa_file, dense_file = family_files
    session = ort.InferenceSession(dsa_file, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    layers = model.config.num_hidden_layers
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{kind}" for i in range(layers)
                         for kind in ("key", "value", "index_key")]
    outs = [o.name for o in session.get_outputs()]
    assert outs == ["logits"] + [n.replace("past_key_values", "present") for n in names[3:]]
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dsa_compile.decoder"])
    assert meta["attention"] == "dsa" and meta["layers"] == layers
    assert len(meta["state"]) == 3 * layers
    dense = ort.InferenceSession(dense_file, providers=["CPUExecutionProvider"])
    assert len(dense.get_inputs()) == 3 + 2 * layers


def test_prefill_then_chunk_logits_match_pytorch_dsa(family_files):
    """Past length 0 (prefill of 13 tokens), then a chunk of 8 with past 13 and one decode
    step with past 21: logits equal the PyTorch DSA model's at those positions."""
    model, dsa_file, _ = family_files
    ids = torch.tensor([_prompt(22, 3)])
    with torch.no_grad(), attention_override(model, "dsa", SPARSE):
        want = model(input_ids=ids, use_cache=False).logits[0].numpy()
    dec = Decoder(dsa_file)
    got = [dec.prefill(ids[:, :13].numpy(), np.ones((1, 13), np.int64))]
    dec.mask = np.ones((1, 21), np.int64)
    out = dec.session.run(None, {"input_ids": ids[:, 13:21].numpy(), "attention_mask": dec.mask,
                                 "position_ids": np.arange(13, 21)[None], **dec.state})
    logits = out[0][0]
    dec.state = dict(zip(dec.past_names, out[1:]))
    dec.positions = np.array([[20]])
    got.append(dec.step(ids[:, 21].numpy()))
    np.testing.assert_allclose(got[0][0], want[12], atol=1e-4)
    np.testing.assert_allclose(logits, want[13:21], atol=1e-4)
    np.testing.assert_allclose(got[1][0], want[21], atol=1e-4)


def test_greedy_tokens_equal_pytorch_dsa(family_files):
    model, dsa_file, _ = family_files
    prompt = _prompt(21, 1)
    got = generate(dsa_file, [prompt], NEW)[0, len(prompt):].tolist()
    assert got == _dsa_greedy(model, prompt, NEW, SPARSE)


def test_batch_of_two_left_padded_equals_each_prompt_alone(family_files):
    model, dsa_file, dense_file = family_files
    prompts = [_prompt(21, 2), _prompt(14, 4)]
    got = generate(dsa_file, prompts, NEW)
    dense = generate(dense_file, prompts, NEW)
    assert (got[1, :7] == 0).all()  # left padding
    for row, prompt in enumerate(prompts):
        assert got[row, 21:].tolist() == _dsa_greedy(model, prompt, NEW, SPARSE)
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
        assert dense[row, 21:].tolist() == alone[0, len(prompt):].tolist()


def test_covering_top_k_equals_dense_generate(tmp_path):
    model = tiny_lm("llama", seed=3)
    dsa_file = _export(model, tmp_path / "dsa.onnx", config=COVERING, logits="last")
    dense_file = _export(model, tmp_path / "dense.onnx", dense=True)
    prompts = [_prompt(21, 5), _prompt(12, 6)]
    got = generate(dsa_file, prompts, NEW)
    assert np.array_equal(got, generate(dense_file, prompts, NEW))
    pad = torch.zeros(2, 21, dtype=torch.long)
    mask = torch.zeros(2, 21, dtype=torch.long)
    for row, p in enumerate(prompts):
        pad[row, 21 - len(p):], mask[row, 21 - len(p):] = torch.tensor(p), 1
    want = model.generate(input_ids=pad, attention_mask=mask, max_new_tokens=NEW,
                          do_sample=False)
    assert got[:, 21:].tolist() == want[:, 21:].tolist()


def test_torch_compiled_dsa_generate_equals_onnx(tmp_path):
    """The literal PyTorch DSA model: a forward compiled with backend="dsa", HF generate
    with its DynamicCache (prefill and Lq = 1 decode steps through the backend)."""
    model = tiny_lm("llama", seed=4)
    path = _export(model, tmp_path / "dsa.onnx")
    prompt = _prompt(21, 7)
    got = generate(path, [prompt], NEW)[0, 21:].tolist()
    torch._dynamo.reset()
    model.forward = torch.compile(model.forward, backend="dsa",
                                  options={"top_k": SPARSE.top_k, "dense_below": 0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False)
    torch._dynamo.reset()
    assert got == want[0, 21:].tolist()


def test_seeded_sampling_is_reproducible(family_files):
    _, dsa_file, _ = family_files
    prompts = [_prompt(21, 8), _prompt(9, 9)]
    a = generate(dsa_file, prompts, NEW, do_sample=True, temperature=0.9, top_k=20, seed=7)
    b = generate(dsa_file, prompts, NEW, do_sample=True, temperature=0.9, top_k=20, seed=7)
    assert np.array_equal(a, b)
    greedy = generate(dsa_file, prompts, NEW)
    assert np.array_equal(generate(dsa_file, prompts, NEW, do_sample=True, top_k=1, seed=1),
                          greedy)
    nucleus = generate(dsa_file, prompts, NEW, do_sample=True, top_p=1e-6, seed=3)
    assert np.array_equal(nucleus, greedy)


def test_eos_stops_rows_and_pads(family_files):
    _, dsa_file, _ = family_files
    prompt = _prompt(21, 1)
    free = generate(dsa_file, [prompt], NEW)[0, 21:]
    out = generate(dsa_file, [prompt, prompt[:15]], NEW, eos_token_id=int(free[1]),
                   pad_token_id=0)
    assert out[0, 21:23].tolist() == free[:2].tolist()
    assert out.shape[1] <= 21 + NEW


def test_unsupported_family_names_the_reason(tmp_path):
    with pytest.raises(dsa_onnx.ExportError, match="Llama-family"):
        _export(tiny_lm("gpt2"), tmp_path / "x.onnx")
    with pytest.raises(dsa_onnx.ExportError, match="sliding_window"):
        _export(tiny_lm("mistral"), tmp_path / "x.onnx")


# ---------------------------------------------------------------------- shared buffer


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def buffer_files(request, tmp_path_factory):
    """(model, {(dense, shared_buffer): path}) of one family."""
    model = tiny_lm(request.param, seed=6)
    folder = tmp_path_factory.mktemp(f"buffer_{request.param}")
    return model, {(dense, shared): _export(model, folder / f"{dense}_{shared}.onnx",
                                            dense=dense, shared_buffer=shared)
                   for dense in (False, True) for shared in (False, True)}


def test_shared_buffer_generates_what_concat_generates(buffer_files):
    """Batch of two, left-padded: the in-place buffers give the concat decoder's tokens,
    which are the PyTorch DSA model's (DSA) and Hugging Face generate's (dense)."""
    model, files = buffer_files
    prompts = [_prompt(21, 11), _prompt(13, 12)]
    for dense in (False, True):
        got = generate(files[dense, True], prompts, NEW)
        assert np.array_equal(got, generate(files[dense, False], prompts, NEW))
    dsa = generate(files[False, True], prompts, NEW)
    for row, prompt in enumerate(prompts):
        assert dsa[row, 21:].tolist() == _dsa_greedy(model, prompt, NEW, SPARSE)


def test_shared_buffer_is_written_in_place_row_by_row(buffer_files):
    """The bound buffers keep their storage; after a prefill and three steps they hold
    the concat decoder's state in rows 0 .. L + 2 and zeros after."""
    _, files = buffer_files
    ids = np.array([_prompt(17, 13)])
    shared, concat = Decoder(files[False, True]), Decoder(files[False, False])
    shared.prefill(ids, np.ones_like(ids), capacity=32)
    concat.prefill(ids, np.ones_like(ids))
    pointers = {n: v.data_ptr() for n, v in shared.state.items()}
    for token in (5, 9, 11):
        a = shared.step(np.array([token]))
        np.testing.assert_allclose(a, concat.step(np.array([token])), atol=1e-5)
    assert {n: v.data_ptr() for n, v in shared.state.items()} == pointers
    for name, buf in shared.state.items():
        arr, want = buf.numpy(), concat.state[name]
        rows = want.shape[-2]
        assert rows == 20
        got = arr[..., :rows, :]
        np.testing.assert_allclose(got, want, atol=1e-5)
        assert not np.any(arr[..., rows:, :])


def test_shared_buffer_runs_without_iobinding_and_refuses_overflow(buffer_files):
    """A plain session.run is the functional form (present = past with the rows written);
    a step past the capacity is a clear error, not a silent wrap or a crash."""
    _, files = buffer_files
    session = ort.InferenceSession(files[False, True], providers=["CPUExecutionProvider"])
    meta = json.loads(session.get_modelmeta().custom_metadata_map["dsa_compile.decoder"])
    assert meta["state_layout"] == "shared_buffer"
    ids = np.array([_prompt(9, 14)])
    dec = Decoder(files[False, False])
    want = dec.prefill(ids, np.ones_like(ids))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "position_ids": np.arange(9)[None]}
    for i in session.get_inputs()[3:]:
        feed[i.name] = np.zeros([1] + [d if isinstance(d, int) else 12 for d in i.shape[1:]],
                                np.float32)
    out = session.run(None, feed)
    np.testing.assert_allclose(out[0][:, -1], want, atol=1e-5)
    np.testing.assert_allclose(out[1][..., :9, :], dec.state["past_key_values.0.key"],
                               atol=1e-6)
    small = Decoder(session)
    small.prefill(ids, np.ones_like(ids), capacity=10)
    small.step(np.array([3]))
    with pytest.raises(ValueError, match="buffers hold 10 tokens"):
        small.step(np.array([4]))


# ---------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm2_files(tmp_path_factory):
    """SmolLM2-135M-Instruct (the real model), 300 tokens of real text, and shared-buffer
    decoders with top_k 64 (sparse) and 512 (covering every key)."""
    from dsa_compile.evaluation import load_causal_lm, token_blocks

    model, tokenizer = load_causal_lm()
    text = token_blocks(tokenizer, 300, 1)
    folder = tmp_path_factory.mktemp("smollm2")
    configs = {"sparse": DSAConfig(top_k=64, dense_below=0),
               "covering": DSAConfig(top_k=512, dense_below=0)}
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, config in configs.items():
            files[name] = str(folder / f"{name}.onnx")
            dsa_onnx.export(model, (text,), files[name], config=config, past=True,
                            shared_buffer=True, logits="last")
    return model, text[0].tolist(), configs, files


def test_smollm2_generate_equals_pytorch_dsa_and_dense(smollm2_files):
    """The real model, a left-padded batch of two (300 and 240 tokens: prefill with
    past 0, then decode steps with past > 0): top_k 64 gives the PyTorch DSA model's
    greedy tokens, top_k covering every key gives Hugging Face generate's."""
    model, text, configs, files = smollm2_files
    prompts = [text, text[40:280]]
    got = generate(files["sparse"], prompts, 4)
    for row, prompt in enumerate(prompts):
        assert got[row, 300:].tolist() == _dsa_greedy(model, prompt, 4, configs["sparse"])
    covering = generate(files["covering"], prompts, 4)
    ids = torch.zeros(2, 300, dtype=torch.long)
    mask = torch.zeros(2, 300, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, 300 - len(p):], mask[row, 300 - len(p):] = torch.tensor(p), 1
    with torch.no_grad():
        want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                              do_sample=False)
    assert covering[:, 300:].tolist() == want[:, 300:].tolist()
    # 64 of 300 keys changes the logits (not these few greedy tokens): the prefill's
    # last-position logits are the PyTorch DSA model's, away from the dense model's.
    ids = torch.tensor([text])
    with torch.no_grad():
        dense = model(input_ids=ids).logits[0, -1].numpy()
        with attention_override(model, "dsa", configs["sparse"]):
            sparse = model(input_ids=ids, use_cache=False).logits[0, -1].numpy()
    onnx_sparse = Decoder(files["sparse"]).prefill(ids.numpy(), np.ones_like(ids.numpy()))[0]
    np.testing.assert_allclose(onnx_sparse, sparse, atol=2e-3)
    assert np.abs(sparse - dense).max() > 0.05


# ---------------------------------------------------------------------------- deploy

_BLOCKED_IMPORT = r"""
import importlib.abc, importlib.util, sys
BLOCKED = ("torch", "triton", "onnx", "transformers", "dsa_compile")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"blocked import of {name}")
sys.meta_path.insert(0, Block())
spec = importlib.util.spec_from_file_location("generation", sys.argv[1])
generation = importlib.util.module_from_spec(spec)
spec.loader.exec_module(generation)
out = generation.generate(sys.argv[2], [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]], 4)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(out.tolist(), loaded)
"""


def test_generation_runs_with_numpy_and_onnxruntime_only(family_files):
    """The deploy module, loaded on its own with torch, triton, onnx, transformers and
    dsa_compile blocked from importing, generates the same tokens."""
    _, dsa_file, _ = family_files
    module = os.path.join(os.path.dirname(dsa_onnx.__file__), "generation.py")
    run = subprocess.run([sys.executable, "-c", _BLOCKED_IMPORT, module, dsa_file],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    tokens, loaded = run.stdout.strip().rsplit(" [", 1)
    assert loaded == "]"
    want = generate(dsa_file, [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14], [3, 4]], 4)
    assert json.loads(tokens) == want.tolist()


@pytest.mark.parametrize("layout", [[], ["--shared-buffer"]], ids=["concat", "shared-buffer"])
def test_cli_exports_a_decoder_and_generates(tmp_path, capsys, layout):
    from dsa_compile.onnx.cli import main

    folder = tmp_path / "tiny"
    model = tiny_lm("llama", seed=5)
    model.save_pretrained(folder)
    out = tmp_path / "cli.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["export", str(folder), "--out", str(out), "--top-k", "8", "--past",
                     "--seq-len", "21", "--query-chunk", "4", *layout]) == 0
    assert json.loads(capsys.readouterr().out)["dsa_nodes"] == {"Attention": 2}
    prompt = _prompt(21, 10)
    assert main(["generate", str(out), "--ids", " ".join(map(str, prompt)),
                 "--max-new-tokens", str(NEW)]) == 0
    report = json.loads(capsys.readouterr().out)
    want = _dsa_greedy(model, prompt, NEW, DSAConfig(top_k=8))
    eos = model.generation_config.eos_token_id  # generation stops after it (as HF's)
    if eos in want:
        want = want[:want.index(eos) + 1]
    assert report["new_tokens"][0] == want
