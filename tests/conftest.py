import os
import tempfile

# Inductor's on-disk caches key on graphs, not on the Python bodies of custom ops, so a cache left by
# an older checkout can replay stale guards: every test run compiles into a cache of its own.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="vnm-inductor-"))

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
