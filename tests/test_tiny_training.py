"""The tiny model's training data and schedule (eval/train_tiny_model.py), and a CPU smoke run."""

from __future__ import annotations

import json

import pytest
import torch

from eval import train_tiny_model as ttm
from leank.train.tiny import build_word_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer()


def test_curriculum_grows_from_short_to_max_len():
    ranges = [ttm.curriculum(s, 1000, 8192) for s in range(0, 1001, 50)]
    his = [hi for _, hi in ranges]
    assert his[0] == 64 and his[-1] == 8192
    assert all(a <= b for a, b in zip(his, his[1:]))
    assert all(64 <= lo <= hi for lo, hi in ranges)
    assert ttm.curriculum(399, 1000, 8192)[1] <= 512 < ttm.curriculum(450, 1000, 8192)[1]


def test_induction_stage_then_mixed_tasks(tok):
    data = ttm.Batches(tok, seed=0, steps=100, tokens_per_step=2048, max_len=512, induction_steps=10)
    offsets = set()
    for step in range(10):
        ids, mask, kinds = data.batch(step)
        assert 16 <= ids.shape[1] <= 64 and (kinds == 0).all()
        half = ids.shape[1] // 2
        assert torch.equal(ids[:, :half], ids[:, half:2 * half])  # the second half repeats the first
        assert mask[:, half - 1:ids.shape[1] - 1].all() and not mask[:, :half - 1].any()
        offsets.add(half)
    assert len(offsets) > 3  # the copy offset varies: no fixed-offset shortcut
    seen = set()
    for step in range(10, 40):
        ids, mask, kinds = data.batch(step)
        assert kinds.shape == (ids.shape[0],) and mask.shape == ids.shape
        seen |= set(kinds.tolist())
        assert all(mask[i].any() for i in range(ids.shape[0]))
    assert seen == {0, 1, 2}
    a, b = data.batch(25), data.batch(25)  # a pure function of (seed, step)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_task_mix_argument_rejects_bad_weights():
    parser_type = ttm._weights
    assert parser_type("1,0,2") == (1.0, 0.0, 2.0)
    for bad in ("1,1", "a,b,c", "-1,1,1", "0,0,0"):
        with pytest.raises(Exception, match="three non-negative weights"):
            parser_type(bad)


def test_cpu_smoke_run_writes_model_and_log(tmp_path):
    out = tmp_path / "tiny"
    rc = ttm.main(["--device", "cpu", "--smoke", "--steps", "6", "--induction-steps", "3", "--log-every", "2",
                   "--eval-n", "2", "--out", str(out)])
    assert rc == 0
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run"] == 6 and log["induction_steps"] == 3
    assert "loss_induction" in log["log"][0] and "multikey@512" in log["heldout_full_cache_accuracy"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
