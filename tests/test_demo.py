"""The demo runs end to end and its exactness check is real."""

import re

from leank.cli import main


def test_demo_small(capsys):
    rc = main(["demo", "--prompt-tokens", "300", "--new-tokens", "40", "--sink", "8", "--recent", "32",
               "--flush-every", "8", "--random-weights", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 0
    dev = float(re.search(r"dense float64 LeanK function\| = ([0-9.e+-]+)", out).group(1))
    assert dev < 1e-4
    k = re.search(r"K cache bytes\s+([\d,]+)\s+([\d,]+)", out)
    dense_k, leank_k = (int(x.replace(",", "")) for x in k.groups())
    assert leank_k < 0.6 * dense_k
