"""Smoke test of examples/synthetic_recall.py: the task is well formed and the whole
pipeline (train, apply, fit, calibrate, compare) runs on a tiny setting."""

import importlib.util
from pathlib import Path

import torch


def _example():
    path = Path(__file__).resolve().parents[1] / "examples" / "synthetic_recall.py"
    spec = importlib.util.spec_from_file_location("synthetic_recall_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_target_is_the_value_stored_with_its_key():
    task = _example().Task(pairs=4, keys=8, noise=3)
    ids, targets = task.batch(5, 40, torch.Generator().manual_seed(0))
    assert ids.shape == targets.shape == (5, 40)
    assert ids.min() >= 0 and ids.max() < task.vocab
    for row, target in zip(ids.tolist(), targets.tolist()):
        stored = dict(zip(row[0:8:2], row[1:8:2]))
        assert len(stored) == 4  # distinct keys
        asked = [t for t, y in enumerate(target) if y != -100]
        assert asked == list(range(32, 40, 2))
        assert all(target[t] == stored[row[t]] for t in asked)
        assert all(task.keys * 2 <= x < task.vocab for x in row[8:32])  # noise only


def test_pipeline_runs_and_prints_the_table(capsys):
    threads = torch.get_num_threads()
    _example().main(["--quick", "--length", "64", "--steps", "4", "--calib-steps", "2",
                     "--threads", str(threads)])
    out = capsys.readouterr().out
    assert "2 of 2 attention sites rewritten to DSA" in out
    for row in ("dense", "sliding window (4)", "DSA fitted", "DSA calibrated", "oracle top-4"):
        assert row in out
    table = out[out.index("method"):].splitlines()[1:6]
    accuracies = [float(line.split()[-2]) for line in table]
    assert all(0.0 <= a <= 1.0 for a in accuracies), table
