import pytest

from ringfuse import _C

from .isa import isa_level

ISAS = ["avx2", "scalar"] if _C.build_info()["cpu_has_avx2"] else ["scalar"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Run a CPU test on every code path this machine has (AVX2 and the scalar fallback)."""
    with isa_level(request.param):
        yield request.param


AVX512_ISAS = (["avx512vnni"] if _C.build_info()["cpu_has_avx512_vnni"] else []) + ISAS


@pytest.fixture(params=AVX512_ISAS)
def avx512_isa(request):
    """``isa`` plus the avx512vnni level where the host has it: the int8 GEMM's VNNI kernel
    and the AVX-512 paths of the float kernels ("avx2" then means the AVX2 kernels only)."""
    with isa_level(request.param):
        yield request.param


PREFILL_ISAS = (["amx"] if _C.build_info()["cpu_has_amx"] else []) + ISAS


@pytest.fixture(params=PREFILL_ISAS)
def prefill_isa(request):
    """``isa`` plus the bf16 prefill attention's AMX kernel where the host has AMX ("avx2"
    then means the AVX2 kernel for bf16 too)."""
    with isa_level(request.param):
        yield request.param
