import contextlib
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def torch_config_patches():
    """Yields ``set_(module, "name", value)``: set an entry of a torch config module (``torch._dynamo.config``,
    ``torch._inductor.config``; ``"triton.enable_pdl"`` for a nested one) until the block ends, then restore it."""
    with contextlib.ExitStack() as stack:
        def set_(module, name, value):
            stack.enter_context(module.patch(name, value))

        yield set_


@pytest.fixture
def torch_config():
    """``torch_config(module, "name", value)`` for this test (``torch_config_patches``).

    Not ``monkeypatch.setattr``: pytest 9 restores an attribute that is not in the module's ``__dict__`` by
    deleting it, and torch's config modules answer a deleted entry with "... does not exist" for the rest of the
    process (a later test's torch.compile then failed whenever Inductor generated code instead of reading its
    on-disk cache)."""
    with torch_config_patches() as set_:
        yield set_
