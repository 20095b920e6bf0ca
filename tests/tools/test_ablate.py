"""`chatforge ablate`: which config each attention variant is, and a tiny end-to-end comparison at one budget."""

import json

import pytest

from chatforge.tools.ablate import variant_overrides
from chatforge.cli import main
from chatforge.errors import ChatforgeError


def test_variants_are_config_switches():
    assert variant_overrides("mha", 4, 32) == {"n_kv_head": 4, "sliding_window": None}
    assert variant_overrides("gqa", 4, 32) == {"n_kv_head": 2, "sliding_window": None}
    assert variant_overrides("gqa", 12, 32)["n_kv_head"] == 6
    assert variant_overrides("gqa", 6, 32)["n_kv_head"] == 3
    assert variant_overrides("mqa", 8, 32) == {"n_kv_head": 1, "sliding_window": None}
    assert variant_overrides("swa", 4, 16) == {"n_kv_head": 4, "sliding_window": 16}
    with pytest.raises(ChatforgeError, match="grouped-query"):
        variant_overrides("gqa", 2, 32)
    with pytest.raises(ChatforgeError, match="unknown variant 'moe'"):
        variant_overrides("moe", 4, 32)


def test_ablate_trains_each_variant_on_the_same_budget(tmp_path, capsys):
    out = tmp_path / "ablate"
    args = ["ablate", "--variants", "mha", "mqa", "swa", "--max-tokens", "640", "--window", "8", "--out", str(out),
            "--data", "builtin:english/greetings", "vocab_size=300", "model.n_layer=1", "model.d_model=32",
            "seq_len=32", "batch_size=4", "dtype=fp32"]
    assert main(args) == 0
    rows = {r["variant"]: r for r in json.loads((out / "ablate.json").read_text())}
    L, d, hd = 1, 32, 8  # nano's 4 heads over d_model 32
    # multi-query drops 3 of the 4 key and value heads: 2 projections x d x 3 heads x head_dim parameters
    assert rows["mha"]["params"] - rows["mqa"]["params"] == 2 * d * 3 * hd
    assert rows["swa"]["params"] == rows["mha"]["params"]
    assert [rows[v]["kv_bytes_per_token"] for v in ("mha", "mqa", "swa")] == [2 * L * 4 * hd * 2, 2 * L * 1 * hd * 2,
                                                                              2 * L * 4 * hd * 2]
    assert {r["tokens"] for r in rows.values()} == {640}  # 5 steps of 4 x 32 tokens each
    assert rows["swa"]["sliding_window"] == 8 and rows["mha"]["sliding_window"] is None
    assert rows["mha"]["val_bpb"] != rows["mqa"]["val_bpb"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert table == (out / "ablate.md").read_text().splitlines() and table[3].startswith("| mqa | 1 | - | 21,472 |")
    for png in ("ablate_bpb.png", "ablate_curves.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    # the runs are kept; running again needs --overwrite
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
