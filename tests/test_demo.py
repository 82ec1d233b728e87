"""The demo runs end to end and its exactness check is real."""

import re

from leank.cli import main


def test_demo_small(capsys):
    rc = main(["demo", "--prompt-tokens", "300", "--new-tokens", "40", "--sink", "8", "--recent", "32",
               "--flush-every", "8", "--random-weights", "--device", "cpu", "--timed-calls", "2"])
    captured = capsys.readouterr()
    out = captured.out
    assert rc == 0
    # two timed generate calls per method (the default on CUDA, where the first compiles and records)
    for label in ("tokens/s, 1st generate", "tokens/s, 2nd generate"):
        assert all(float(x) > 0 for x in re.search(label + r"\s+([\d.]+)\s+([\d.]+)", out).groups())
    # progress on stderr while it works (issue 11: the demo was silent for ~30 s)
    assert re.findall(r"\[(\d)/4\] done in", captured.err) == ["1", "2", "3", "4"]
    dev = float(re.search(r"dense float64 LeanK function\| = ([0-9.e+-]+)", out).group(1))
    assert dev < 1e-4
    k = re.search(r"K cache bytes\s+([\d,]+)\s+([\d,]+)", out)
    dense_k, leank_k = (int(x.replace(",", "")) for x in k.groups())
    assert leank_k < 0.6 * dense_k


def test_demo_default_model_answers_from_pruned_cache(capsys):
    """The bundled tiny model answers a multi-value question with its learned 70% mask."""
    rc = main(["demo", "--prompt-tokens", "1024", "--new-tokens", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "69.8% of K channels pruned" in out
    assert "retrieval (LeanK)" in out and "-> correct" in out.split("retrieval (LeanK)")[1]
    dev = float(re.search(r"dense float64 LeanK function\| = ([0-9.e+-]+)", out).group(1))
    assert dev < 1e-4


def test_demo_half_precision(capsys):
    """``--dtype bfloat16`` (the default on CUDA): the model runs in bf16, says so, and its LeanK logits
    stay within bf16 rounding of the float64 function."""
    rc = main(["demo", "--prompt-tokens", "300", "--new-tokens", "12", "--sink", "8", "--recent", "32",
               "--flush-every", "8", "--random-weights", "--device", "cpu", "--dtype", "bfloat16"])
    out = capsys.readouterr().out
    assert rc == 0 and "device cpu, bfloat16" in out
    assert "tokens/s (generate)" in out and "2nd generate" not in out  # one timed call on the CPU by default
    m = re.search(r"dense float64 LeanK function\| = ([0-9.e+-]+) \(bfloat16 model; logits up to ([0-9.]+)\)", out)
    assert m, out
    dev, scale = float(m.group(1)), float(m.group(2))
    assert 0 < dev < 0.05 * scale
