"""The path names the CPU benches print in their titles follow the ISA level in force."""

import pytest

from ringfuse import _C
from ringfuse.bench import limits
from ringfuse.ops import native

from ..ops.isa import isa_level


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2", "scalar"])
def test_titles_name_the_paths_that_run(isa):
    if isa == "avx512vnni" and not _C.build_info()["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    if isa == "avx2" and not _C.build_info()["cpu_has_avx2"]:
        pytest.skip("no AVX2 on this CPU")
    with isa_level(isa):
        wide, products, whole = limits.wide_path(), limits.attention_path(), limits.cpu_path()
        lanes, flops = native.probe_fma_lanes(), native.probe_fma_flops_per_iter(3)
        assert native.probe_fma(10, 2) > 0
    assert wide == {"avx512vnni": "avx2+avx512", "avx2": "avx2", "scalar": "scalar"}[isa]
    # bench generate / tp / allreduce: the float kernels' widest path, then the int8 GEMM's
    assert whole == {"avx512vnni": "avx2+avx512 (int8 GEMM avx512vnni)", "avx2": "avx2", "scalar": "scalar"}[isa]
    assert products.startswith({"avx512vnni": "products avx512", "avx2": "products avx2",
                                 "scalar": "products scalar"}[isa])  # fmt: skip
    # the FMA peak that "% FMA peak" divides by is measured at the width of the kernels that run
    assert lanes == {"avx512vnni": 16, "avx2": 8, "scalar": 1}[isa] and flops == 3 * 10 * lanes * 2


@pytest.mark.parametrize("isa", ["avx512vnni", "avx2"])
def test_torch_quantized_note_only_when_the_int8_path_is_held_below_the_cpu(isa):
    info = _C.build_info()
    if isa == "avx512vnni" and not info["cpu_has_avx512_vnni"]:
        pytest.skip("no AVX-512 VNNI on this CPU")
    with isa_level(isa):
        note = limits.torch_quantized_isa_note()
    held_below = isa == "avx2" and info["cpu_has_avx512_vnni"]
    assert ("not AVX2" in note) == held_below and (note == "") == (not held_below)
