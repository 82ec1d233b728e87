"""A wheel (``pip install .``, not editable) carries the mask registry and every module.

Builds a wheel from a copy of the checkout (``pip wheel --no-deps --no-build-isolation``),
installs it into a fresh venv that sees this interpreter's dependencies (torch,
transformers) but not the checkout, and, from a folder outside the checkout, resolves a
registry model id and runs ``leank masks list`` and ``leank --version``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("leank", "patches", "tilelang_kernels")  # repository folders; the last two install under leank/
SOURCES = (*PACKAGES, "masks", "pyproject.toml", "README.md", "MANIFEST.in")
REFERENCE_MASKS = Path(os.environ.get("LEANK_REFERENCE_MASKS", "/work/shared/reference-masks"))
LLAMA = "meta-llama/Llama-3.1-8B-Instruct"


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=300, **kw)
    assert r.returncode == 0, f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LEANK_MASK_MANIFEST", "PYTHONHOME")}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", **extra)
    return env


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "*.checkpoint.pt")
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=ignore)
        elif p.is_file():
            shutil.copy2(p, src / name)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", dist],
         cwd=src, env=_clean_env())
    (wheel,) = dist.glob("leank-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    py = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    purelib = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # the dependencies come from this interpreter's site-packages, appended after the venv's own
    # (plain path lines: the .pth files there, e.g. an editable install of the checkout, are not run)
    deps = [p for p in {*site.getsitepackages(), sysconfig.get_paths()["purelib"]} if Path(p).is_dir()]
    (purelib / "_leank_test_deps.pth").write_text("\n".join(deps) + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "--no-deps", "-q", wheel], env=_clean_env())
    outside = base / "elsewhere"
    outside.mkdir()
    return dict(wheel=wheel, venv=venv, py=py, purelib=purelib, cwd=outside, src=src)


def test_wheel_holds_every_module_and_the_registry(wheel_venv):
    names = set(zipfile.ZipFile(wheel_venv["wheel"]).namelist())
    src = wheel_venv["src"]
    for pkg in PACKAGES:
        for f in (src / pkg).rglob("*.py"):
            rel = f.relative_to(src).as_posix()
            installed = rel if pkg == "leank" else "leank/" + rel
            assert installed in names, f"{rel} missing from the wheel (expected as {installed})"
    # no generically named top-level packages in site-packages
    assert not any(n.startswith(("patches/", "tilelang_kernels/")) for n in names), sorted(names)[:20]
    registry = [f for f in (src / "masks").rglob("*") if f.is_file()]
    assert any(f.name == "manifest.json" for f in registry)
    for f in registry:
        assert "leank/registry/" + f.relative_to(src / "masks").as_posix() in names, f"{f} missing from the wheel"
    assert "leank/data/tiny-llama/model.safetensors" in names


def test_installed_wheel_resolves_a_registry_model_id(wheel_venv, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    manifest = json.loads((ROOT / "masks" / "manifest.json").read_text())
    info = manifest["models"][LLAMA]["sets"]["default"]
    have_file = False
    for f in REFERENCE_MASKS.glob("*.pth") if REFERENCE_MASKS.is_dir() else []:
        if hashlib.sha256(f.read_bytes()).hexdigest() == info["sha256"]:
            shutil.copy(f, cache / info["file"])  # the published file, as `leank masks fetch` would store it
            have_file = True
    code = f"""
import sys
from pathlib import Path
import leank, leank.masks as M, leank.patches as patches, leank.tilelang_kernels.reference as ref
venv = Path(sys.prefix).resolve()
for mod in (leank, patches, ref):
    assert Path(mod.__file__).resolve().is_relative_to(venv), mod.__file__
reg = M.manifest_path().resolve()
assert reg == Path(leank.__file__).resolve().parent / "registry" / "manifest.json", reg
assert M.lookup_model("llama3.1-8b-instruct")[0] == {LLAMA!r}
assert sorted(p.name for p in (reg.parent / "recipes").glob("*.yaml"))
if {have_file!r}:
    mask = M.resolve_mask({LLAMA!r})
    assert list(mask.keep.shape) == [32, 8, 128] and mask.model_id == {LLAMA!r}
    print("RESOLVED_MASK", mask.sparsity)
else:
    try:
        M.resolve_mask({LLAMA!r})
    except ValueError as e:
        assert "not found at" in str(e) and "leank masks fetch" in str(e), e
        print("MISSING_FILE_ERROR", e)
    else:
        raise AssertionError("expected the missing-file error")
"""
    env = _clean_env(LEANK_CACHE_DIR=str(cache))
    r = _run([wheel_venv["py"], "-c", code], cwd=wheel_venv["cwd"], env=env)
    print(r.stdout)
    assert ("RESOLVED_MASK" if have_file else "MISSING_FILE_ERROR") in r.stdout

    leank_exe = wheel_venv["py"].parent / ("leank.exe" if os.name == "nt" else "leank")
    r = _run([leank_exe, "masks", "list"], cwd=wheel_venv["cwd"], env=env)
    assert f"registry: {wheel_venv['purelib'] / 'leank' / 'registry' / 'manifest.json'}" in r.stdout
    assert LLAMA in r.stdout and "Qwen/Qwen2.5-7B-Instruct" in r.stdout
    assert ("fetched" if have_file else "not fetched") in r.stdout
    r = _run([leank_exe, "--version"], cwd=wheel_venv["cwd"], env=env)
    assert r.stdout.startswith("leank ")
