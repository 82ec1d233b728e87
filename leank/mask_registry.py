"""The mask registry: ``masks/manifest.json``, fetching into the user cache, ``resolve_mask``.

The manifest (installed as ``leank/registry/manifest.json``; ``masks/`` in a checkout) lists
models (with case-insensitive aliases), their mask sets (``default``; Qwen2.5 also ``yarn``),
source URLs and sha256. Files are fetched into the user cache dir (``$LEANK_CACHE_DIR`` or
``~/.cache/leank/masks``) by ``leank masks fetch NAME`` / :func:`fetch_mask`, and loaded by
:func:`resolve_mask`. (Named ``mask_registry`` because ``leank/registry/`` is the folder the
wheel installs the manifest into.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from leank.patches import context_set_of

from .masks import (
    _PACKAGE_DIR,
    CONTEXT_SETS_DEFAULT,
    PTH_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    ChannelMask,
    _warn,
    load_mask,
)

logger = logging.getLogger("leank.masks")  # records keep the logger name they always had

MANIFEST_ENV = "LEANK_MASK_MANIFEST"
CACHE_ENV = "LEANK_CACHE_DIR"


class MaskFetchError(RuntimeError):
    """A registry mask could not be downloaded (network); the message says where to put it."""


def registry_dirs() -> list[Path]:
    """Folders the registry is looked up in, in order: ``leank/registry/`` (an installed
    wheel; ``masks/`` is packaged there) and ``<checkout>/masks/`` (a checkout, ``PYTHONPATH=.``
    or ``pip install -e .``)."""
    here = Path(_PACKAGE_DIR).resolve()
    return [here / "registry", here.parent / "masks"]


def manifest_path() -> Path:
    """``$LEANK_MASK_MANIFEST``, else the first ``manifest.json`` of :func:`registry_dirs`
    (the checkout's path when there is none, for the error message)."""
    env = os.environ.get(MANIFEST_ENV)
    if env:
        return Path(env).expanduser()
    candidates = [d / "manifest.json" for d in registry_dirs()]
    return next((c for c in candidates if c.is_file()), candidates[-1])


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """Read and check the mask registry (see ``masks/manifest.json``)."""
    path = Path(path) if path is not None else manifest_path()
    if not path.is_file():
        looked = "" if os.environ.get(MANIFEST_ENV) else f" (looked in {', '.join(map(str, registry_dirs()))})"
        raise ValueError(f"mask registry not found at {path}{looked}; set {MANIFEST_ENV} to a manifest.json")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable mask registry ({e})") from e
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise ValueError(f"{path}: expected a JSON object with a 'models' object")
    for mid, entry in models.items():
        sets = entry.get("sets") if isinstance(entry, dict) else None
        if not isinstance(sets, dict) or not sets:
            raise ValueError(f"{path}: model {mid!r} needs a non-empty 'sets' object")
    return data


def _norm(name: str) -> str:
    return name.strip().lower()


def lookup_model(name: str, manifest: dict | None = None) -> tuple[str, dict]:
    """Canonical model id and registry entry for an id or alias (case-insensitive).

    A name with a path prefix (``/models/Llama-3.1-8B-Instruct``) also matches by its last
    component. Unknown names raise ``ValueError`` listing the known ids.
    """
    manifest = manifest if manifest is not None else load_manifest()
    models = manifest["models"]
    table = {}
    for mid, entry in models.items():
        for alias in [mid, *entry.get("aliases", [])]:
            table[_norm(alias)] = mid
    key = _norm(str(name))
    mid = table.get(key) or table.get(_norm(key.rstrip("/").rsplit("/", 1)[-1]))
    if mid is None:
        raise ValueError(f"unknown model {name!r} for the mask registry; known ids: {sorted(models)} "
                         f"(aliases are case-insensitive; pass a mask file path for other models)")
    return mid, models[mid]


def canonical_model_id(name: str) -> str | None:
    """Registry id of ``name`` or None when the registry does not know it (or is absent)."""
    try:
        return lookup_model(name)[0]
    except ValueError:
        return None


def _check_model_id(mask_id: str, config_id: str) -> None:
    if not mask_id or not config_id:
        return
    a, b = canonical_model_id(mask_id), canonical_model_id(config_id)
    if a and b:
        same = a == b
    elif a or b:
        _warn(f"cannot tell whether mask model {mask_id!r} matches model {config_id!r} (one is not in the "
              f"registry); shape checks passed")
        return
    else:
        same = _norm(mask_id).rstrip("/").rsplit("/", 1)[-1] == _norm(config_id).rstrip("/").rsplit("/", 1)[-1]
    if not same:
        raise ValueError(f"mask was made for model {mask_id!r} but the model is {config_id!r} "
                         f"(pass check_model_id=False to override)")


def mask_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where fetched masks live: ``cache_dir``, else ``$LEANK_CACHE_DIR``, else
    ``~/.cache/leank/masks``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "leank" / "masks"


def select_set(
    model_id: str, entry: dict, context_set: str | None, config: Any = None, allow_fallback: bool = False
) -> tuple[str, dict]:
    """Pick a mask set of a registry entry: explicit ``context_set`` wins, else the one the
    config's rope scaling implies, else the entry's ``default_set``. A set that is missing or
    has no published file raises ``ValueError``, or with ``allow_fallback=True`` falls back to
    the default set with a logged warning."""
    sets = entry["sets"]
    default = entry.get("default_set", CONTEXT_SETS_DEFAULT)
    if context_set is not None:
        wanted, why = context_set, "requested"
    elif config is not None:
        wanted, why = context_set_of(config), "implied by the config's rope scaling"
    else:
        wanted, why = default, "default"
    info = sets.get(wanted)
    problem = None
    if info is None:
        problem = f"has no mask set {wanted!r} ({why}); available sets: {sorted(sets)}"
    elif not info.get("file"):
        note = info.get("note", "")
        problem = f"mask set {wanted!r} ({why}) is not published" + (f": {note}" if note else "")
    if problem is None:
        return wanted, info
    can_fall_back = wanted != default and bool(sets.get(default, {}).get("file"))
    if not (allow_fallback and can_fall_back):
        hint = (f"; pass context_set={default!r} or allow_fallback=True to use the {default!r} set"
                if can_fall_back and not allow_fallback else "")
        raise ValueError(f"model {model_id!r} {problem}{hint}")
    _warn(f"model {model_id!r} {problem}; FALLING BACK to mask set {default!r} (allow_fallback=True)")
    return default, sets[default]


def _registry_target(name: str, context_set: str | None, config: Any, allow_fallback: bool,
                     cache_dir: str | os.PathLike | None) -> tuple[str, str, dict, Path]:
    mid, entry = lookup_model(name)
    set_name, info = select_set(mid, entry, context_set, config, allow_fallback)
    return mid, set_name, info, mask_cache_dir(cache_dir) / info["file"]


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_mask(
    name: str,
    context_set: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download a registry mask into the cache dir, check its sha256, return its path.

    Already present with the right checksum: nothing is downloaded. A checksum mismatch
    raises ``ValueError`` (the download is discarded). A network failure raises
    :class:`MaskFetchError` naming the URL and the path to put the file at by hand.
    """
    mid, set_name, info, target = _registry_target(name, context_set, None, False, cache_dir)
    url = url or info.get("url")
    want = info.get("sha256")
    if not url:
        raise ValueError(f"model {mid!r} mask set {set_name!r} has no source URL in the registry")
    if target.is_file() and want and file_sha256(target) == want:
        logger.info("%s (set %s) already in %s", mid, set_name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("downloading %s -> %s", url, target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-", suffix=target.suffix)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    for chunk in iter(lambda: resp.read(1 << 20), b""):
                        out.write(chunk)
            except (urllib.error.URLError, OSError, TimeoutError) as e:
                raise MaskFetchError(
                    f"could not download the {set_name!r} mask of {mid!r} from {url} ({e}). "
                    f"If this machine is offline, download that URL elsewhere and copy the file to "
                    f"{target}" + (f" (sha256 {want})" if want else "")
                    + ", or pass a mask file path to leank.patch(..., masks=PATH)."
                ) from e
        got = file_sha256(tmp)
        if want and got != want:
            raise ValueError(f"sha256 mismatch for {url}: expected {want}, got {got}; "
                             f"download discarded, {target} left unchanged")
        if not want:
            _warn(f"registry has no sha256 for {mid} set {set_name}; downloaded file is unchecked")
        os.replace(tmp, target)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load_registry_mask(mid: str, set_name: str, info: dict, path: Path) -> ChannelMask:
    fmt = info.get("format", "leank-pth")
    want = info.get("sha256")
    if want and file_sha256(path) != want:
        raise ValueError(f"{path}: sha256 differs from the registry ({want}) for {mid!r} set "
                         f"{set_name!r}; delete it and run `leank masks fetch {mid} --set {set_name}`")
    meta = {"registry_set": set_name}
    if fmt == "leank-pth":
        return ChannelMask.from_pth(path, model_id=mid, context_set=set_name, align=info.get("align"),
                                    source=info.get("url", str(path)), metadata=meta)
    if fmt == "safetensors":
        return ChannelMask.load(path)
    raise ValueError(f"registry entry {mid!r} set {set_name!r}: unknown format {fmt!r}")


def _looks_like_path(spec: Any) -> bool:
    if isinstance(spec, os.PathLike):
        return True
    s = str(spec)
    return s.lower().endswith(PTH_SUFFIXES + SAFETENSORS_SUFFIXES) or os.path.isfile(os.path.expanduser(s))


def resolve_mask(
    spec: Any,
    config: Any = None,
    context_set: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    allow_fallback: bool = False,
) -> ChannelMask:
    """Turn what a user passes as ``masks=`` into a validated :class:`ChannelMask`.

    ``spec``: a ``ChannelMask``; a path to a ``.safetensors`` or published ``.pth`` file; or
    a registry model id / alias (file read from the cache dir, see :func:`mask_cache_dir`).
    Set selection for registry ids: explicit ``context_set`` wins, else YaRN rope scaling in
    ``config`` (``rope_parameters`` or ``rope_scaling``) selects ``"yarn"``, else
    ``"default"``; a missing set raises unless ``allow_fallback=True`` (logged). For masks
    given directly, an explicit ``context_set`` different from the mask's raises. When
    ``config`` is given the mask is validated against it.
    """
    if isinstance(spec, ChannelMask):
        mask = spec
    elif isinstance(spec, (str, os.PathLike)) and _looks_like_path(spec):
        mask = load_mask(spec)
    elif isinstance(spec, str):
        mid, set_name, info, path = _registry_target(spec, context_set, config, allow_fallback, cache_dir)
        if not path.is_file():
            raise ValueError(
                f"mask file for {mid!r} (set {set_name!r}) not found at {path}; run "
                f"`leank masks fetch {mid} --set {set_name}` or download {info.get('url')} to that path"
            )
        mask = _load_registry_mask(mid, set_name, info, path)
        context_set = None  # already honoured (or explicitly fallen back)
    else:
        raise ValueError(f"masks: expected a ChannelMask, a mask file path or a model id, got "
                         f"{type(spec).__name__}")
    if context_set is not None and context_set != mask.context_set:
        raise ValueError(f"mask is for context set {mask.context_set!r}, but context_set={context_set!r} "
                         f"was requested")
    if config is not None:
        mask.validate(config)
    return mask
