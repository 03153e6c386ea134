"""Arguments, files and edge inputs a new user can get wrong (issue 13): each must fail
early with an error naming the bad argument or file, or give the documented result.

Shapes are tiny: every case runs in well under a second on CPU.
"""

from __future__ import annotations

import pytest
import torch

from dsa_compile.config import DSAConfig

# --------------------------------------------------------------------------------------
# DSAConfig (finding 6)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value"), [
    ("softcap", float("inf")), ("softcap", float("nan")), ("softcap", -1.0),
    ("softcap", True), ("softcap", "5"),
    ("min_keys", -3), ("min_keys", "big"), ("min_keys", 2.0),
    ("sites", 5), ("sites", ["a", 5]), ("exclude", None), ("exclude", 3),
    ("index_fp8", "yes"), ("index_fp8", 1),
    ("top_k", True), ("top_k", 2.0), ("index_heads", True), ("index_dim", 0),
    ("dense_below", False), ("dense_below", -1),
])
def test_config_rejects_bad_field(field, value):
    with pytest.raises(ValueError, match=rf"DSAConfig\.{field} must be"):
        DSAConfig(**{field: value})


def test_config_keeps_str_and_sequences_of_patterns():
    assert DSAConfig(sites="*.attn", exclude="*.0.*").sites == ("*.attn",)
    assert DSAConfig(exclude="*.0.*").exclude == ("*.0.*",)
    config = DSAConfig(sites=["a", "b"], exclude=["c"], softcap=30, min_keys=0)
    assert config.sites == ("a", "b") and config.exclude == ("c",) and config.softcap == 30
    assert DSAConfig().sites is None and DSAConfig().exclude == ()
    hash(config)  # frozen and now hashable: lists became tuples


# --------------------------------------------------------------------------------------
# Device groups (finding 8)
# --------------------------------------------------------------------------------------


def test_check_same_device_groups_names_both_groups():
    from dsa_compile.ops.checks import check_same_device_groups

    cpu, meta = torch.zeros(1), torch.zeros(1, device="meta")
    check_same_device_groups("attention", {"q": cpu, "k": cpu}, {"w": cpu, "key_mask": None})
    with pytest.raises(ValueError, match=r"dsa\.attention: q_idx, w are on meta but q, k are "
                                         r"on cpu; move them to one device"):
        check_same_device_groups("attention", {"q": cpu, "k": cpu}, {"q_idx": meta, "w": meta})
    with pytest.raises(ValueError, match="w is on meta but q_idx is on cpu"):
        check_same_device_groups("attention", {"q": cpu}, {"q_idx": cpu, "w": meta})


# --------------------------------------------------------------------------------------
# calibrate, selection_recall, save / load (findings 3, 4, 13)
# --------------------------------------------------------------------------------------

CFG = DSAConfig(top_k=4)


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def token_batches(n=2, length=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (1, length), generator=g) for _ in range(n)]


def indexer_state(model):
    from dsa_compile.indexer import REGISTRY

    return {name: {n: p.detach().clone() for n, p in ix.named_parameters()}
            for name, ix in REGISTRY.indexers_of(model).items()}


@pytest.mark.parametrize(("arg", "value"), [
    ("lr", -1.0), ("lr", 0.0), ("lr", float("nan")), ("lr", float("inf")), ("lr", True),
    ("rows_per_step", 0), ("rows_per_step", 2.5), ("checkpoint_every", 0), ("steps", -1),
    ("steps", 1.5), ("recall_weight", float("nan")), ("head_max", float("nan")),
    ("seed", "zero"), ("config", {"top_k": 4}),
])
def test_calibrate_rejects_bad_argument_before_any_work(arg, value, monkeypatch):
    import dsa_compile.calibration as calibration

    monkeypatch.setattr(calibration, "capture_sites", None)  # must not be reached
    with pytest.raises(ValueError, match=rf"calibrate: {arg} must be"):
        calibration.calibrate(tiny_llama(), token_batches(), **{"config": CFG, arg: value},
                              progress=False)


def test_empty_batches_say_so():
    from dsa_compile.calibration import calibrate, fit_indexers
    from dsa_compile.metrics import selection_recall

    model = tiny_llama()
    with pytest.raises(ValueError, match="calibrate: batches is empty"):
        calibrate(model, [], CFG, progress=False)
    with pytest.raises(ValueError, match="selection_recall: batches is empty"):
        selection_recall(model, [], CFG)
    with pytest.raises(ValueError, match="fit_indexers: batches is empty"):
        fit_indexers(model, iter([]), CFG)


def test_nan_model_weight_is_reported_not_an_eigh_error():
    from dsa_compile.calibration import calibrate
    from dsa_compile.metrics import selection_recall

    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' .* "
                                         r"holds NaN or inf"):
        calibrate(model, token_batches(), CFG, steps=1, progress=False)
    with pytest.raises(ValueError, match=r"selection_recall: batch 0: the attention k of site "
                                         r"'model\.layers\.0\.self_attn' holds NaN or inf"):
        selection_recall(model, token_batches(), CFG)


def test_indexer_fit_refuses_non_finite_activations():
    from dsa_compile.indexer import Indexer

    ix = Indexer(4, 2, 8)
    before = {n: p.detach().clone() for n, p in ix.named_parameters()}
    q, k = torch.randn(1, 4, 32, 8), torch.randn(1, 2, 32, 8)
    k[0, 1, 3, 0] = float("inf")
    with pytest.raises(ValueError, match=r"Indexer\.fit: the site's k .* holds NaN or inf"):
        ix.fit(q, k)
    assert not ix.fitted
    assert all(torch.equal(p, before[n]) for n, p in ix.named_parameters())


def _diverge_at(monkeypatch, call: int, how: str):
    """Make calibrate's loss (how="loss") or gradient (how="grad") NaN from the call-th
    indexer_kl call on."""
    import dsa_compile.calibration as calibration

    real, calls = calibration.indexer_kl, []

    def kl(indexer, *args, **kwargs):
        loss = real(indexer, *args, **kwargs)
        calls.append(1)
        if len(calls) < call:
            return loss
        poison = indexer.wq.sum() * float("nan")
        if how == "loss":
            return loss + poison
        return torch.where(torch.tensor(True), loss, poison)  # finite loss, NaN gradient

    monkeypatch.setattr(calibration, "indexer_kl", kl)


@pytest.mark.parametrize(("how", "message"), [
    ("loss", r"step 2: the loss of site 'model\.layers\.0\.self_attn' is nan"),
    ("grad", r"step 2 made the weights \['wq'\] of site 'model\.layers\.0\.self_attn' "
             r"non-finite"),
])
def test_calibrate_stops_on_divergence_and_restores_indexers(monkeypatch, tmp_path, how,
                                                             message):
    from dsa_compile.calibration import calibrate, save_indexers
    from dsa_compile.indexer import REGISTRY

    model = tiny_llama()
    calibrate(model, token_batches(), CFG, steps=0, progress=False)  # fits the indexers
    before = indexer_state(model)
    _diverge_at(monkeypatch, 2, how)
    with pytest.raises(ValueError, match=rf"training diverged: {message} \(lr=0\.01\); lower "
                                         r"lr .* restored"):
        calibrate(model, token_batches(), CFG, steps=5, progress=False)
    after = indexer_state(model)
    assert all(torch.equal(after[s][n], before[s][n]) for s in before for n in before[s])
    assert all(not p.requires_grad for ix in REGISTRY.indexers_of(model).values()
               for p in ix.parameters())
    save_indexers(model, tmp_path / "ok.safetensors")  # still finite, so it saves


def test_save_and_load_refuse_nan_indexers(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from dsa_compile.calibration import calibrate, load_indexers, save_indexers
    from dsa_compile.indexer import REGISTRY

    model = tiny_llama()
    calibrate(model, token_batches(), CFG, steps=0, progress=False)
    good = tmp_path / "good.safetensors"
    save_indexers(model, good)
    (ix,) = REGISTRY.indexers_of(model).values()
    with torch.no_grad():
        ix.bw[0] = float("nan")
    with pytest.raises(ValueError, match=r"save_indexers: the indexer of site "
                                         r"'model\.layers\.0\.self_attn' has NaN or inf "
                                         r"weights \['bw'\]"):
        save_indexers(model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()
    with safe_open(good, framework="pt") as f:  # a file whose values were corrupted
        meta, tensors = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    tensors["model.layers.0.self_attn/wq"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan.safetensors", metadata=meta)
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.0\.self_attn/wq' in .*"
                                         r"nan\.safetensors' holds NaN or inf"):
        load_indexers(model, tmp_path / "nan.safetensors")
    load_indexers(model, good)


def test_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    from dsa_compile.calibration import calibrate

    (tmp_path / "ckpt").write_text("")
    with pytest.raises(ValueError, match="checkpoint_dir .*ckpt' exists and is not a folder"):
        calibrate(tiny_llama(), token_batches(), CFG, steps=1, checkpoint_dir=tmp_path / "ckpt",
                  progress=False)


@pytest.mark.parametrize(("name", "content"), [
    ("state.json", b"{not json"), ("state.json", b'{"step": 2}'),
    ("state.json", b'{"step": "2", "losses": [1.0, 2.0]}'),
    ("optimizer.safetensors", b"\x00junk"),
])
def test_corrupt_checkpoint_names_the_file(tmp_path, name, content):
    from dsa_compile.calibration import calibrate

    model = tiny_llama()
    calibrate(model, token_batches(), CFG, steps=2, checkpoint_dir=tmp_path, checkpoint_every=1,
              progress=False)
    before = indexer_state(model)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=rf"calibrate: checkpoint file .*{name}' is corrupt.*"
                                         rf"delete the folder"):
        calibrate(model, token_batches(), CFG, steps=3, checkpoint_dir=tmp_path,
                  progress=False)
    after = indexer_state(model)
    assert all(torch.equal(after[s][n], before[s][n]) for s in before for n in before[s])


# --------------------------------------------------------------------------------------
# Indexer registry: another indexer shape for a site that has one (finding 7)
# --------------------------------------------------------------------------------------


def test_registry_refuses_another_shape_until_reset():
    from dsa_compile.indexer import REGISTRY, reset_indexers

    lin = torch.nn.Linear(4, 4)
    anchors = (["weight", "bias"], [lin.weight, lin.bias])
    ix = REGISTRY.get_or_create("attn", *anchors, 4, 2, 8, DSAConfig(index_heads=2, index_dim=6))
    # None means "the default", which must match any registered shape.
    assert REGISTRY.get_or_create("attn", *anchors, 4, 2, 8, DSAConfig()) is ix
    assert REGISTRY.get_or_create("attn", *anchors, 4, 2, 8, DSAConfig(index_dim=6)) is ix
    with pytest.raises(ValueError, match=r"site 'attn' already has an indexer of shape H_I x "
                                         r"d_I = 2 x 6, but the config asks for 2 x 9.*"
                                         r"reset_indexers\(model\)"):
        REGISTRY.get_or_create("attn", *anchors, 4, 2, 8, DSAConfig(index_dim=9))
    assert reset_indexers(lin) == ["attn"] and REGISTRY.lookup([lin.weight]) is None
    new = REGISTRY.get_or_create("attn", *anchors, 4, 2, 8, DSAConfig(index_dim=9))
    assert new is not ix and (new.index_heads, new.index_dim) == (2, 9)
    assert reset_indexers(torch.nn.Linear(2, 2)) == []


def test_calibrate_with_another_indexer_shape_raises():
    from dsa_compile.calibration import calibrate

    model = tiny_llama()
    calibrate(model, token_batches(), CFG, steps=0, progress=False)
    with pytest.raises(ValueError, match="already has an indexer of shape H_I x d_I = 2 x 4"):
        calibrate(model, token_batches(), DSAConfig(top_k=4, index_dim=6), steps=0,
                  progress=False)


# --------------------------------------------------------------------------------------
# Output files: symlinks, special files, missing folders (findings 12, 13)
# --------------------------------------------------------------------------------------


def test_write_atomic_follows_symlinks_and_refuses_special_files(tmp_path):
    import os

    from dsa_compile.files import write_atomic

    target = tmp_path / "real.bin"
    target.write_bytes(b"old")
    os.chmod(target, 0o640)
    link = tmp_path / "link.bin"
    link.symlink_to(target)
    assert write_atomic(link, b"new", "save") == str(target)
    assert link.is_symlink() and target.read_bytes() == b"new"
    assert oct(os.stat(target).st_mode & 0o777) == oct(0o640)  # permissions kept
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, kind in ((fifo, "a FIFO"), ("/dev/null", "a character device"),
                       (tmp_path, "a directory")):
        with pytest.raises(ValueError, match=rf"save: '.*' is {kind}, not a regular file"):
            write_atomic(path, b"x", "save")
    assert fifo.exists() and not fifo.is_file()
    with pytest.raises(ValueError, match=r"save: the folder '.*missing' of .* does not exist"):
        write_atomic(tmp_path / "missing" / "f.bin", b"x", "save")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "link.bin", "real.bin"]


def test_save_indexers_writes_through_a_symlink_and_refuses_a_device(tmp_path):
    from dsa_compile.calibration import calibrate, load_indexers, save_indexers

    model = tiny_llama()
    calibrate(model, token_batches(), CFG, steps=0, progress=False)
    target = tmp_path / "indexers.safetensors"
    target.write_bytes(b"")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    save_indexers(model, link)
    assert link.is_symlink() and target.stat().st_size > 0
    load_indexers(model, link)
    with pytest.raises(ValueError, match=r"save_indexers: '/dev/null' is a character device"):
        save_indexers(model, "/dev/null")


# --------------------------------------------------------------------------------------
# ONNX: structural verification at load, destination checked before export (finding 12)
# --------------------------------------------------------------------------------------


def _ours(op="Attention", **attrs):
    """A one-node dsa model finished as export finishes it (markers, hash, full check)."""
    from dsa_compile.onnx import functions
    from dsa_compile.onnx.export import finish_model

    attrs = {"top_k": 4, "scale": 0.125, **attrs} if op != "SparseAttention" else \
        {"scale": 0.125, **attrs}
    if op == "IndexerTopK":
        del attrs["scale"]
    model = functions.op_model(op, **attrs)
    ranks = {"k_idx": 3, "w": 3, "lse": 3, "indices": 4 if op == "SparseAttention" else 3}
    for value in [*model.graph.input, *model.graph.output]:  # the checker wants ranks
        dims = value.type.tensor_type.shape.dim
        for i in range(ranks.get(value.name, 4)):
            dims.add().dim_param = f"{value.name}_{i}"
    return finish_model(model, None)


def _fake_markers(model):
    """What a foreign file can copy: our producer, metadata and opset."""
    import onnx

    from dsa_compile.onnx import functions
    from dsa_compile.onnx.export import META_VERSION, PRODUCER

    model.producer_name = PRODUCER
    onnx.helper.set_model_props(model, {META_VERSION: "0.1.0"})
    model.opset_import.append(onnx.helper.make_opsetid(functions.DOMAIN, functions.VERSION))
    return model


def test_verify_accepts_our_one_node_models():
    import dsa_compile.onnx as dsa_onnx

    for op in ("Attention", "IndexerTopK", "SparseAttention"):
        assert dsa_onnx.verify(_ours(op))["dsa_nodes"] == {op: 1}


def test_verify_refuses_a_foreign_model_with_our_markers(tmp_path):
    import onnx

    import dsa_compile.onnx as dsa_onnx

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])])
    path = tmp_path / "foreign.onnx"
    onnx.save(_fake_markers(onnx.helper.make_model(graph)), path)
    with pytest.raises(ValueError, match="foreign.onnx' has no dsa node"):
        dsa_onnx.load_session(path)


def test_verify_refuses_a_forged_function_body():
    import onnx

    import dsa_compile.onnx as dsa_onnx
    from dsa_compile.onnx.export import functions_digest

    model = _ours("SparseAttention")
    body = model.functions[0]  # someone else's computation under our op's name
    del body.node[:]
    body.node.extend([onnx.helper.make_node("Identity", ["q"], ["out"]),
                      onnx.helper.make_node("ReduceMax", ["q"], ["lse"], keepdims=0)])
    with pytest.raises(ValueError, match=r"function dsa\.SparseAttention is not the body this "
                                         r"dsa_compile writes"):
        dsa_onnx.verify(model)
    # A consistent hash does not help a forged body; a missing or stale hash fails too.
    _set_hash(model, functions_digest(model))
    with pytest.raises(ValueError, match="is not the body"):
        dsa_onnx.verify(model)
    for digest, message in ((None, "carries no 'dsa_compile.functions_sha256' content check"),
                            ("0" * 64, "do not match the hash recorded at export")):
        model = _ours("SparseAttention")
        _set_hash(model, digest)
        with pytest.raises(ValueError, match=message):
            dsa_onnx.verify(model)


def test_verify_accepts_an_earlier_releases_body(monkeypatch):
    """A body listed in functions.RETIRED_BODIES (what an earlier release wrote) verifies;
    the same body unlisted does not."""
    import hashlib

    import onnx

    import dsa_compile.onnx as dsa_onnx
    from dsa_compile.onnx import functions
    from dsa_compile.onnx.export import functions_digest

    model = _ours("Attention")
    body = model.functions[0]
    body.node.append(onnx.helper.make_node("Identity", ["q"], ["unused_copy_of_q"]))
    _set_hash(model, functions_digest(model))
    with pytest.raises(ValueError, match="is not the body"):
        dsa_onnx.verify(model)
    old = hashlib.sha256(body.SerializeToString(deterministic=True)).hexdigest()
    monkeypatch.setitem(functions.RETIRED_BODIES, ("Attention", ""), (old,))
    assert dsa_onnx.verify(model)["dsa_nodes"] == {"Attention": 1}


def _set_hash(model, digest):
    from dsa_compile.onnx.export import META_FUNCTIONS

    for prop in list(model.metadata_props):
        if prop.key == META_FUNCTIONS:
            model.metadata_props.remove(prop)
    if digest is not None:
        model.metadata_props.add(key=META_FUNCTIONS, value=digest)


@pytest.mark.parametrize(("edit", "message"), [
    ("top_k=0", r"has top_k = 0, which must be >= 1"),
    ("causal=2", r"has causal = 2, which must be 0 or 1"),
    ("scale=nan", r"has scale = nan, which must be finite"),
    ("softcap=-1", r"has softcap = -1.0, which must be finite and >= 0"),
    ("query_chunk=0", r"has query_chunk = 0"),
    ("drop:top_k", r"lacks the required attribute 'top_k'"),
    ("extra:window", r"unknown attributes \['window'\]"),
    ("int-scale", r"attribute 'scale' of type INT"),
    ("drop-input", r"has 5 inputs; dsa\.Attention takes 6 to 8"),
    ("op:Attention2", r"Attention2\) is not a dsa op"),
])
def test_verify_checks_dsa_node_attributes_and_arity(edit, message):
    import onnx

    import dsa_compile.onnx as dsa_onnx

    model = _ours("Attention")
    node = model.graph.node[0]
    attrs = {a.name: a for a in node.attribute}
    if edit.startswith("drop:"):
        node.attribute.remove(attrs[edit[5:]])
    elif edit.startswith("extra:"):
        node.attribute.append(onnx.helper.make_attribute(edit[6:], 3))
    elif edit == "int-scale":
        attrs["scale"].CopyFrom(onnx.helper.make_attribute("scale", 1))
    elif edit == "drop-input":
        del node.input[-1]
    elif edit.startswith("op:"):
        node.op_type = edit[3:]
    else:
        name, value = edit.split("=")
        if name in attrs:
            node.attribute.remove(attrs[name])
        node.attribute.append(onnx.helper.make_attribute(
            name, float(value) if name in ("scale", "softcap") else int(value)))
    with pytest.raises(ValueError, match=r"verify: 'model': node .*\(dsa\..*" + message):
        dsa_onnx.verify(model)


def test_export_checks_the_destination_before_exporting(tmp_path, monkeypatch):
    import importlib

    import dsa_compile.onnx as dsa_onnx

    # The package re-exports the function `export`, which shadows the module attribute.
    export_module = importlib.import_module("dsa_compile.onnx.export")

    def never(*args, **kwargs):
        raise AssertionError("the export started")

    monkeypatch.setattr(export_module, "to_dsa_program", never)
    model = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"export: the folder '.*no_such_dir' .* does not exist"):
        dsa_onnx.export(model, (torch.randn(2, 4),), tmp_path / "no_such_dir" / "m.onnx")
    with pytest.raises(ValueError, match=r"export: '/dev/null' is a character device"):
        dsa_onnx.export(model, (torch.randn(2, 4),), "/dev/null")
    with pytest.raises(ValueError, match=r"export: '.*' is a directory"):
        dsa_onnx.export(model, (torch.randn(2, 4),), tmp_path)


def test_save_atomic_writes_through_a_symlink(tmp_path):
    import onnx

    from dsa_compile.onnx.export import save_atomic

    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    model = _ours("SparseAttention")
    save_atomic(model, link)
    assert link.is_symlink() and onnx.load(target) == model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "real.onnx"]


# --------------------------------------------------------------------------------------
# NaN scores never select nothing (finding 3)
# --------------------------------------------------------------------------------------


def test_select_topk_ranks_nan_as_the_lowest_finite_score():
    from dsa_compile.reference import select_topk

    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[nan, nan, nan, nan],            # all NaN: still selects
                           [nan, 2.0, -inf, 1.0],           # finite first, NaN next, -inf never
                           [-inf, nan, -inf, -inf]])
    assert select_topk(scores, 4).tolist() == [[0, 1, 2, 3], [0, 1, 3, -1], [1, -1, -1, -1]]
    assert select_topk(scores, 2).tolist() == [[0, 1], [1, 3], [1, -1]]
    assert select_topk(scores[1:2], 3).tolist() == [[0, 1, 3]]


def test_nan_indexer_weight_does_not_zero_the_attention():
    b, hq, hkv, length, d, top_k = 1, 2, 1, 6, 8, 8  # top_k covers every key
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hkv, hkv))
    q_idx, k_idx = torch.randn(b, length, 2, 4), torch.randn(b, length, 4)
    w = torch.rand(b, length, 2)
    w[0, 3, 0] = float("nan")  # query 3's scores are all NaN
    idx = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, top_k, 0, True, None)
    assert idx[0, 3].tolist() == [0, 1, 2, 3, -1, -1, -1, -1]
    out = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, True, 0, None,
                                  0.0, 0)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------
# Repeated indices count once on every sparse_attention path (finding 9)
# --------------------------------------------------------------------------------------

DUPLICATES = [[3, 3, 7, -1], [0, 15, 15, 2], [5, 5, 5, 5], [9, -1, 9, 1]]
DISTINCT = [[3, 7, -1, -1], [0, 15, 2, -1], [5, -1, -1, -1], [9, -1, -1, 1]]


@pytest.mark.parametrize(("path", "grad"), [("fused", False), ("gemm", False), ("gemm", True),
                                          ("gather", False), ("gather", True)])
def test_sparse_attention_counts_a_repeated_key_once(monkeypatch, path, grad):
    import importlib

    sparse = importlib.import_module("dsa_compile.reference.sparse_attention")
    # Force the path: each runs when the largest selected key is within its ratio x top_k.
    monkeypatch.setattr(sparse, "FUSED_RATIO", 100 if path == "fused" else 0)
    monkeypatch.setattr(sparse, "DENSE_GEMM_RATIO", 100 if path == "gemm" else 0)
    ran = []
    name = {"fused": "_chunk_fused", "gemm": "_chunk_dense", "gather": "_chunk_gathered"}[path]
    real = getattr(sparse, name)
    monkeypatch.setattr(sparse, name, lambda *a: ran.append(name) or real(*a))
    q, k, v = torch.randn(1, 4, 4, 8), torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)

    def run(rows):
        leaves = [t.clone().requires_grad_(grad) for t in (q, k, v)]
        idx = torch.tensor(rows, dtype=torch.int32)[None, None]
        with torch.set_grad_enabled(grad):
            out, lse = torch.ops.dsa.sparse_attention(*leaves, idx, 0.3)
            grads = torch.autograd.grad(out.square().sum(), leaves) if grad else ()
        return out, lse, grads

    got, want = run(DUPLICATES), run(DISTINCT)
    assert ran and set(ran) == {name}
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[1], want[1], atol=1e-6, rtol=0)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=0)


def test_sparse_attention_paths_agree_on_repeats_by_shape():
    from dsa_compile.reference.sparse_attention import FUSED_RATIO

    top_k = 4
    lk = FUSED_RATIO * top_k + 10
    q, k, v = torch.randn(1, 2, 2, 8), torch.randn(1, 1, lk, 8), torch.randn(1, 1, lk, 8)
    near = torch.tensor([[[[1, 1, 2, -1], [0, 0, 0, 3]]]], dtype=torch.int32)  # fused path
    far = near.clone()
    far[0, 0, 1, 3] = lk - 1  # the same first row, reach past FUSED_RATIO x top_k: gather
    out_near, _ = torch.ops.dsa.sparse_attention(q, k, v, near, 0.3)
    out_far, _ = torch.ops.dsa.sparse_attention(q, k, v, far, 0.3)
    torch.testing.assert_close(out_near[:, :, 0], out_far[:, :, 0], atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------
# Empty inputs (finding 10)
# --------------------------------------------------------------------------------------


def _indexer(lq, lk, b=2, h=2, d=4, grad=False):
    return [t.requires_grad_(grad) for t in (torch.randn(b, lq, h, d), torch.randn(b, lk, d),
                                             torch.rand(b, lq, h))]


@pytest.mark.parametrize("causal", [True, False])
def test_indexer_ops_with_no_queries_or_no_keys(causal):
    scores = torch.ops.dsa.indexer_scores(*_indexer(0, 5), 0, causal, None)
    assert scores.shape == (2, 0, 5)
    leaves = _indexer(0, 5, grad=True)
    torch.ops.dsa.indexer_scores(*leaves, 0, causal, None).sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in leaves)
    assert torch.ops.dsa.indexer_scores(*_indexer(4, 0), 0, causal, None).shape == (2, 4, 0)
    assert torch.ops.dsa.indexer_topk(*_indexer(0, 5), 3, 0, causal, None).shape == (2, 0, 3)
    none = torch.ops.dsa.indexer_topk(*_indexer(4, 0), 3, 0, causal, None)
    assert none.shape == (2, 4, 3) and (none == -1).all()


def test_reference_attention_with_no_queries_or_no_keys():
    from dsa_compile import reference

    q, kv = torch.randn(1, 4, 0, 8), torch.randn(1, 2, 5, 8)
    out, lse = reference.sparse_attention(q, kv, kv, torch.zeros(1, 1, 0, 3, dtype=torch.int32),
                                          0.3)
    assert out.shape == (1, 4, 0, 8) and lse.shape == (1, 4, 0)
    assert reference.dense_attention(q, kv, kv, 0.3)[0].shape == (1, 4, 0, 8)
    q, kv = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 0, 8)
    out, lse = reference.sparse_attention(q, kv, kv, torch.full((1, 1, 3, 2), -1), 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = reference.dense_attention(q, kv, kv, 0.3, causal=False)
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_onnx_functions_rank_nan_scores_like_the_reference():
    ort = pytest.importorskip("onnxruntime")
    from dsa_compile.onnx import functions

    b, hq, hkv, length, d, top_k = 1, 2, 1, 12, 8, 5
    q_idx, k_idx, w = torch.randn(b, length, 2, 4), torch.randn(b, length, 4), torch.rand(b,
                                                                                        length, 2)
    w[0, 7, 1] = float("nan")  # every score of query 7
    k_idx[0, 2, 0] = float("nan")  # key 2 for every query
    q, k, v = (torch.randn(b, h, length, d) for h in (hq, hkv, hkv))

    def run(op, inputs, **attrs):
        model = functions.op_model(op, query_chunk=4, **attrs)
        session = ort.InferenceSession(model.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})[0]

    got = run("IndexerTopK", (q_idx, k_idx, w), top_k=top_k)
    want = torch.ops.dsa.indexer_topk(q_idx, k_idx, w, top_k, 0, True, None)
    assert (got == want.numpy()).all() and (got[0, 7] >= 0).all()
    got = run("Attention", (q, k, v, q_idx, k_idx, w), top_k=top_k, scale=d ** -0.5)
    want = torch.ops.dsa.attention(q, k, v, q_idx, k_idx, w, top_k, d ** -0.5, True, 0, None,
                                   0.0, 0)
    torch.testing.assert_close(torch.from_numpy(got), want, atol=1e-5, rtol=0)


def test_cli_export_checks_out_before_loading_the_model(tmp_path, capsys):
    from dsa_compile.onnx.cli import main

    out = tmp_path / "missing" / "model.onnx"
    assert main(["export", str(tmp_path / "no-model"), "--out", str(out)]) == 1
    assert "export: the folder" in capsys.readouterr().err and not out.parent.exists()


@pytest.mark.filterwarnings("ignore:dsa. inputs shorter than")
def test_apply_with_another_indexer_shape_raises_until_reset():
    import models  # tests/ is on sys.path

    import dsa_compile
    from dsa_compile.indexer import REGISTRY, reset_indexers

    model, x = models.SDPAAttention().eval(), torch.randn(1, 16, 32)
    dsa_compile.apply(model, (x,), DSAConfig(top_k=16, dense_below=0, index_dim=6))
    with pytest.raises(ValueError, match="already has an indexer of shape H_I x d_I = 2 x 6"):
        dsa_compile.apply(model, (x,), DSAConfig(top_k=16, dense_below=0, index_dim=8))
    assert reset_indexers(model) == [""]  # the root module is the site
    gm = dsa_compile.apply(model, (x,), DSAConfig(top_k=16, dense_below=0, index_dim=8))
    assert [ix.index_dim for ix in REGISTRY.indexers_of(model).values()] == [8]
    torch.testing.assert_close(gm(x), model(x), atol=1e-5, rtol=0)  # top_k covers every key
