"""The residual sum s = round_bf16(x + r) of the bf16 norms, over every class of bf16 value.

The AVX2 kernels round it with Veltkamp's split and redo a row whose sum is not finite with
the integer rounding (csrc/cpu/norm_common.h, bf16_round_split): these tests feed random bit
patterns (subnormals, sums past the split's range near 5.2e33, infinities, NaN) and check
residual_out bitwise against torch's own bf16 add, and out bitwise against the same op on
the precomputed sum (the path without a residual, which the split does not touch)."""

import pytest
import torch

from ringfuse.ops import add_layer_norm, add_rms_norm, add_rms_norm_, layer_norm, rms_norm

HIDDEN = 16 * 20 + 8 + 5  # 16-lane blocks, one 8-lane step and a 5-lane tail


def random_bf16(rows, max_exponent, seed):
    """bf16 values from random bits, biased exponents limited to <= max_exponent (255: all,
    inf and NaN included). Exponent 0 gives subnormals and zeros."""
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 1 << 16, (rows, HIDDEN), generator=g, dtype=torch.int32)
    exponent = (bits >> 7) & 0xFF
    bits = (bits & ~(0xFF << 7)) | ((exponent % (max_exponent + 1)) << 7)
    return bits.to(torch.int16).view(torch.bfloat16)


def cases():
    # (rows, largest biased exponent): squares stay finite below 2^63 (exponent 189), so
    # rms_norm takes the split path there; sums stay finite below 2^127 (exponent 253),
    # which layer_norm's split path covers up to its 5.2e33 limit (exponent 239 and up:
    # redo); 255 adds infinities and NaN.
    # 41 rows: one thread, row pairs then a single row; 97 rows (over 16,384 elements): two
    # threads whose chunks end in a single row
    return [(41, 189, 1), (41, 239, 2), (41, 245, 3), (97, 253, 4), (41, 255, 5), (97, 189, 6)]


def same_bits(got, expect):
    assert torch.equal(got.isnan(), expect.isnan())
    keep = ~expect.isnan()
    assert torch.equal(got[keep].view(torch.int16), expect[keep].view(torch.int16))


@pytest.mark.parametrize("rows,max_exponent,seed", cases())
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_residual_sum_is_torchs_bf16_add_bitwise(isa, op, rows, max_exponent, seed):
    x = random_bf16(rows, max_exponent, seed)
    r = random_bf16(rows, max_exponent, seed + 100)
    w = torch.linspace(0.5, 1.5, HIDDEN).to(torch.bfloat16)
    expect_sum = x + r
    if op == "rms":
        out, res = add_rms_norm(x, r, w)
        expect_out = rms_norm(expect_sum, w)
    else:
        b = torch.linspace(-0.1, 0.1, HIDDEN).to(torch.bfloat16)
        out, res = add_layer_norm(x, r, w, b)
        expect_out = layer_norm(expect_sum, w, b)
    same_bits(res, expect_sum)
    same_bits(out, expect_out)


@pytest.mark.parametrize("rows", [7, 8])  # with a single row at the end, and pairs only
@pytest.mark.parametrize("alias", ["residual_out=x", "residual_out=r", "in-place"])
@pytest.mark.parametrize("op", ["rms", "layer"])
def test_redone_rows_read_intact_inputs_when_outputs_alias_them(isa, op, alias, rows):
    # every row holds a sum past the split's range, so every row is redone
    x = random_bf16(rows, 239, 11)
    r = random_bf16(rows, 239, 12)
    x[:, 3], r[:, 3] = 1e34, 1e34
    x[:, HIDDEN - 1], r[:, HIDDEN - 1] = -2e35, 1.0
    w = torch.linspace(0.5, 1.5, HIDDEN).to(torch.bfloat16)
    expect_sum = x + r
    expect_out = rms_norm(expect_sum, w) if op == "rms" else layer_norm(expect_sum, w)
    if alias == "in-place" and op == "rms":
        xi, ri = x.clone(), r.clone()
        add_rms_norm_(xi, ri, w)
        out, res = xi, ri
    else:
        # in place for layer_norm: out into x and residual_out into r, as add_rms_norm_ does
        target = x.clone() if alias == "residual_out=x" else r.clone()
        xa, ra = (target, r) if alias == "residual_out=x" else (x, target)
        if alias == "in-place":
            xa = x.clone()
            out, res = add_layer_norm(xa, ra, w, out=xa, residual_out=ra)
        else:
            add = add_rms_norm if op == "rms" else add_layer_norm
            out, res = add(xa, ra, w, residual_out=target)
        assert res is ra if alias != "residual_out=x" else res is target
    same_bits(res, expect_sum)
    same_bits(out, expect_out)
