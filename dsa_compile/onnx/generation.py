"""Generation with a stateful decoder file on onnxruntime: numpy and onnxruntime only.

    from dsa_compile.onnx import generate
    out = generate("decoder.onnx", [[1, 2, 3], [4, 5]], max_new_tokens=32)   # greedy
    out = generate(session, ids, 32, do_sample=True, temperature=0.8, top_k=50, seed=0)

Works with the files of ``dsa_compile.onnx.export(..., past=True)`` (DSA or dense; with
``shared_buffer=True`` the KV and index-key buffers are allocated once, at prompt +
max_new_tokens rows, and updated in place through IOBinding) and any decoder with the
same interface (inputs input_ids, attention_mask, position_ids,
past_key_values.*; outputs logits, present.*). Prompts of unequal length are left-padded;
positions follow Hugging Face (cumsum of the mask - 1). Rows that produced an EOS token
continue with pad tokens until every row has finished or max_new_tokens are made, as
``transformers`` ``generate`` does.

This module imports nothing from torch, triton, onnx or the rest of dsa_compile, so it
is what a deployment needs (the file can be copied beside the model on its own).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence

import numpy as np

META_DECODER = "dsa_compile.decoder"  # same key as dsa_compile.onnx.decoder.META_DECODER


def session_options(threads: int | None = None):
    """The onnxruntime SessionOptions dsa_compile's sessions use (pass them to your own
    ``InferenceSession`` for the same speed).

    Denormal floats are flushed to zero: a masked softmax (-inf logits, or logits far below
    the row's maximum) otherwise makes onnxruntime's CPU exp produce denormals, which run
    ~6x slower (measured on this project's attention bodies). Values below 1.2e-38 become
    0; nothing else changes.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    if threads is not None:
        options.intra_op_num_threads = threads
    return options


def _session(model_or_session, threads: int | None):
    if not isinstance(model_or_session, (str, os.PathLike)):
        return model_or_session
    import onnxruntime as ort

    options = session_options(threads)
    return ort.InferenceSession(os.fspath(model_or_session), options,
                                providers=["CPUExecutionProvider"])


def left_pad(prompts, pad_token_id: int = 0,
             attention_mask=None) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids int64 [B, L], attention_mask int64 [B, L]) from a list of token lists
    (left-padded to the longest) or from a 2-D array with its mask (all ones if None)."""
    if isinstance(prompts, np.ndarray) or (len(prompts) and not isinstance(
            prompts[0], (list, tuple, np.ndarray))):
        ids = np.atleast_2d(np.asarray(prompts, dtype=np.int64))
        mask = (np.ones_like(ids) if attention_mask is None
                else np.asarray(attention_mask, dtype=np.int64))
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask {mask.shape} does not match input_ids {ids.shape}")
        return ids, mask
    rows = [list(map(int, p)) for p in prompts]
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    width = max(map(len, rows))
    ids = np.full((len(rows), width), pad_token_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = r
        mask[i, width - len(r):] = 1
    return ids, mask


class Decoder:
    """A decoder session and its state: :meth:`prefill` a batch, then :meth:`step`.

    ``state`` maps each past_key_values.* input to the present.* array of the last run
    (a concat-layout file), or to its buffer (an ``onnxruntime.OrtValue`` of a
    shared-buffer file, ``export(..., shared_buffer=True)``: every run binds present.* to
    the same OrtValue, so the graph's ScatterND writes the new rows in place).
    """

    def __init__(self, model_or_session, threads: int | None = None) -> None:
        self.session = _session(model_or_session, threads)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.meta = json.loads(meta[META_DECODER]) if META_DECODER in meta else {}
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        missing = {"input_ids", "attention_mask"} - self.inputs.keys()
        if missing or "logits" not in self.output_names:
            raise ValueError(f"not a decoder file: it lacks inputs {sorted(missing)} or the "
                             f"logits output (inputs {sorted(self.inputs)})")
        self.past_names = [n for n in self.inputs if n.startswith("past_key_values.")]
        self.shared_buffer = self.meta.get("state_layout") == "shared_buffer"
        self.state: dict = {}
        self.mask = self.positions = self.binding = None
        self.capacity = 0

    def _present_of(self, past: str) -> str:
        return "present." + past[len("past_key_values."):]

    def _empty_state(self, batch: int, rows: int) -> dict[str, np.ndarray]:
        """Zero state: its dynamic row axis (the past, or a buffer's capacity) ``rows``."""
        state = {}
        for name in self.past_names:
            dims = self.inputs[name].shape
            shape = [batch] + [d if isinstance(d, int) else rows for d in dims[1:]]
            state[name] = np.zeros(shape, dtype=np.float32)
        return state

    def _bind_buffers(self, batch: int) -> None:
        import onnxruntime as ort

        self.binding = self.session.io_binding()
        self.state = {}
        for name, zeros in self._empty_state(batch, self.capacity).items():
            buf = ort.OrtValue.ortvalue_from_numpy(zeros)
            self.binding.bind_ortvalue_input(name, buf)
            self.state[name] = buf

    def _bind_outputs(self) -> None:
        """logits first (get_outputs()[0]; a fresh array each run, its length L changes),
        then every present.* onto its past buffer."""
        b = self.binding
        b.clear_binding_outputs()
        b.bind_output("logits")
        for name, buf in self.state.items():
            b.bind_ortvalue_output(self._present_of(name), buf)

    def _run(self, ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
        if self.shared_buffer:
            if self.mask.shape[1] > self.capacity:
                raise ValueError(f"the decoder's buffers hold {self.capacity} tokens and this "
                                 f"step needs {self.mask.shape[1]}: prefill with a larger "
                                 "capacity")
            b = self.binding
            self._bind_outputs()
            b.bind_cpu_input("input_ids", ids)
            b.bind_cpu_input("attention_mask", self.mask)
            if "position_ids" in self.inputs:
                b.bind_cpu_input("position_ids", positions)
            self.session.run_with_iobinding(b)
            return b.get_outputs()[0].numpy()[:, -1]
        feed = {"input_ids": ids, "attention_mask": self.mask, **self.state}
        if "position_ids" in self.inputs:
            feed["position_ids"] = positions
        out = dict(zip(self.output_names, self.session.run(None, feed)))
        self.state = {n: out[self._present_of(n)] for n in self.past_names}
        return out["logits"][:, -1]

    def prefill(self, ids: np.ndarray, mask: np.ndarray,
                capacity: int | None = None) -> np.ndarray:
        """Run the prompt (int64 [B, L], mask [B, L]); returns next-token logits [B, V].

        capacity: tokens (prompt + new) the buffers of a shared-buffer file hold (default
        L + 256); a concat-layout file grows its state instead and ignores it.
        """
        if self.shared_buffer:
            self.capacity = int(capacity) if capacity is not None else ids.shape[1] + 256
            self._bind_buffers(ids.shape[0])
        else:
            self.state = self._empty_state(ids.shape[0], 0)
        self.mask = mask.astype(np.int64)
        positions = np.cumsum(self.mask, axis=1) - 1
        positions[self.mask == 0] = 1  # as transformers: pads get position 1
        self.positions = positions[:, -1:]
        return self._run(ids.astype(np.int64), positions.astype(np.int64))

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """One token per row (int64 [B]) after the state; returns logits [B, V]."""
        batch = tokens.shape[0]
        self.mask = np.concatenate([self.mask, np.ones((batch, 1), np.int64)], axis=1)
        self.positions = self.positions + 1
        return self._run(tokens.reshape(batch, 1).astype(np.int64), self.positions)


def _choose(logits: np.ndarray, do_sample: bool, temperature: float, top_k: int | None,
            top_p: float | None, rng: np.random.Generator) -> np.ndarray:
    if not do_sample:
        return logits.argmax(-1)
    x = logits.astype(np.float64) / max(temperature, 1e-6)
    if top_k is not None and top_k < x.shape[-1]:
        kth = np.partition(x, -top_k, axis=-1)[:, -top_k][:, None]
        x = np.where(x < kth, -np.inf, x)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-p, axis=-1)
        sorted_p = np.take_along_axis(p, order, -1)
        drop = np.cumsum(sorted_p, -1) - sorted_p > top_p  # keep the first token always
        sorted_p = np.where(drop, 0.0, sorted_p)
        p = np.zeros_like(p)
        np.put_along_axis(p, order, sorted_p, -1)
        p /= p.sum(-1, keepdims=True)
    return np.array([rng.choice(p.shape[-1], p=row) for row in p], dtype=np.int64)


def generate(model_path_or_session, input_ids, max_new_tokens: int,
             attention_mask=None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, pad_token_id: int | None = None,
             threads: int | None = None, timings: dict | None = None) -> np.ndarray:
    """Greedy or sampled generation on onnxruntime.

    Args:
        model_path_or_session: a decoder .onnx path or an ``onnxruntime.InferenceSession``.
        input_ids: a list of token lists (left-padded here) or an int array [B, L] (with
            ``attention_mask`` [B, L] for an already left-padded batch).
        max_new_tokens: tokens to add per row (>= 0).
        do_sample: sample instead of argmax, from softmax(logits / temperature) limited to
            the ``top_k`` most likely and the ``top_p`` nucleus; ``seed`` makes it
            reproducible (numpy's default_rng).
        eos_token_id: stop ids (default: the file's metadata; None there = never stop).
        pad_token_id: left padding and the filler after a row's EOS (default: metadata,
            else 0).
        threads: onnxruntime intra-op threads when given a path.
        timings: a dict to fill with "prefill_s", "decode_s" and "steps".

    Returns:
        int64 [B, L + n]: the (left-padded) prompts followed by the n <= max_new_tokens
        generated tokens.

    Raises:
        ValueError: bad arguments, or a file without the decoder interface.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    decoder = Decoder(model_path_or_session, threads)
    meta = decoder.meta
    if pad_token_id is None:
        pad_token_id = meta.get("pad_token_id")
        pad_token_id = 0 if pad_token_id is None else pad_token_id
    if eos_token_id is None:
        eos_token_id = meta.get("eos_token_id") or []
    eos = np.asarray([eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id),
                     dtype=np.int64)
    ids, mask = left_pad(input_ids, pad_token_id, attention_mask)
    rng = np.random.default_rng(seed)
    out = [ids]
    if max_new_tokens == 0:
        return ids
    start = time.perf_counter()
    logits = decoder.prefill(ids, mask, capacity=ids.shape[1] + max_new_tokens)
    prefill_s = time.perf_counter() - start
    done = np.zeros(ids.shape[0], dtype=bool)
    steps = 0
    while True:
        token = _choose(logits, do_sample, temperature, top_k, top_p, rng)
        token = np.where(done, pad_token_id, token)
        out.append(token[:, None])
        done |= np.isin(token, eos)
        if len(out) - 1 == max_new_tokens or done.all():
            break
        logits = decoder.step(token)
        steps += 1
    if timings is not None:
        timings.update(prefill_s=prefill_s, decode_s=time.perf_counter() - start - prefill_s,
                       steps=steps)
    return np.concatenate(out, axis=1)
