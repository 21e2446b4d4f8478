import pytest

from ringfuse import _C

ISAS = ["avx2", "scalar"] if _C.build_info()["cpu_has_avx2"] else ["scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a CPU test on every code path this machine has (AVX2 and the scalar fallback)."""
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("auto")
