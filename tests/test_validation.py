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
