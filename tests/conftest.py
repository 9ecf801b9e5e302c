import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request):
    return torch.device(request.param)


def native_buildable() -> bool:
    """Whether gradfilter's native CPU kernels build (or are built) on this machine.

    Where they do not, their tests skip; with ``GRADFILTER_REQUIRE_NATIVE=1`` (CI sets it) a
    failed build raises instead, so a broken kernel cannot pass as a machine without a compiler.
    """
    from gradfilter import native

    try:
        with native.use_native(True):
            return native.available()
    except RuntimeError:
        if os.environ.get("GRADFILTER_REQUIRE_NATIVE") == "1":
            raise
        return False


@pytest.fixture(params=[True, 1, False], ids=["simd", "simd4", "portable"])
def simd(request):
    """A native-kernel test three times (``native.use_simd``): with every vector path the CPU
    has (AVX2/AVX-512 on x86), with the 4-lane paths alone (SSE2 on x86: the helpers ARM's NEON
    paths share, so x86 runs the code ARM boards run), and with the portable scalar paths."""
    if not native_buildable():
        yield request.param
        return
    from gradfilter import native

    with native.use_simd(request.param):
        yield request.param
