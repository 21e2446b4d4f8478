"""Device-side value checks (kernels/device_errors.py) under the Triton interpreter: a kernel
that meets an out-of-range index skips what it points at, raises its check in the flag,
and computes every other row as it would have; ops.check_device_errors reports and clears
it.
The references are the same kernels on the valid inputs (bitwise) or fp64 math."""

from __future__ import annotations

import pytest
import torch

from ringfuse import ops
from ringfuse.kernels import attention as triton_attention
from ringfuse.kernels import device_errors
from ringfuse.kernels import rotary_embedding as triton_rotary

from .test_attention_triton import (
    assert_close_2x,
    decode_inputs,
    decode_reference,
    make,
    reference,
    to_pages,
    torch_baseline,
)
from .triton_helpers import interp_only

pytestmark = [interp_only, pytest.mark.usefixtures("interpreter_bf16_round_to_nearest_even")]

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def clean_flag():
    device_errors.take(CPU)  # what an earlier test left
    yield
    device_errors.take(CPU)


def test_valid_inputs_raise_nothing():
    q, k, v = decode_inputs(2, 4, 2, 40, 64, torch.float32, seed=1)
    out = torch.empty_like(q)
    triton_attention.decode_attention_fwd(out, q, k, v, torch.tensor([40, 0], dtype=torch.int32), 0.125)
    assert device_errors.take(CPU) == 0
    ops.check_device_errors()  # nothing to report


def test_decode_seq_lens_out_of_range_give_zero_rows():
    """len -1 and len S_max + 1 (which would read past the cache): zeros and the flag; the
    valid rows are bitwise what a valid call gives."""
    b, hq, hkv, s_max, d = 4, 6, 2, 50, 64
    q, k, v = decode_inputs(b, hq, hkv, s_max, d, torch.bfloat16, seed=2)
    bad = torch.tensor([50, -1, 13, 51], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    triton_attention.decode_attention_fwd(out, q, k, v, bad, 0.125, num_splits=2)
    assert device_errors.take(CPU) == device_errors.SEQ_LENS
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[3], torch.zeros_like(out[3]))
    good = torch.empty_like(q)
    triton_attention.decode_attention_fwd(good, q, k, v, torch.tensor([50, 0, 13, 0], dtype=torch.int32), 0.125,
                                          num_splits=2)  # fmt: skip
    assert torch.equal(out, good)
    assert device_errors.take(CPU) == 0


def test_paged_seq_len_past_the_block_table():
    b, hq, hkv, d, block_size = 2, 4, 2, 64, 16
    q, k, v = decode_inputs(b, hq, hkv, 64, d, torch.float32, seed=3)
    k_pages, v_pages, block_table = to_pages(k, v, block_size, seed=3)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor([64, 65], dtype=torch.int32)  # 65 > 4 blocks x 16
    triton_attention.paged_decode_attention_fwd(out, q, k_pages, v_pages, block_table, seq_lens, 0.125)
    assert device_errors.take(CPU) == device_errors.SEQ_LENS
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_close_2x(out[:1], decode_reference(q[:1], k[:1], v[:1], seq_lens[:1], 0.125, None),
                    decode_reference(q[:1], k[:1], v[:1], seq_lens[:1], 0.125, None, torch.float32, True))  # fmt: skip


@pytest.mark.parametrize("window", [None, 30])
def test_paged_bad_block_ids_zero_their_row(window):
    """Sequence 0's second block id is -3 and sequence 1's blocks all lie past the pages:
    both rows are zeros and the flag says block_table; sequence 2 is bitwise the contiguous
    result. With a window of 30 keys, sequence 0 (60 keys) reads blocks 1-3 only, and the
    bad id of its block 1 still counts; a bad id before the window would not (never read)."""
    b, hq, hkv, d, block_size, s_max = 3, 4, 2, 64, 16, 64
    q, k, v = decode_inputs(b, hq, hkv, s_max, d, torch.float32, seed=4)
    k_pages, v_pages, block_table = to_pages(k, v, block_size, seed=4)
    num_blocks = k_pages.shape[0]
    block_table[0, 1] = -3
    block_table[1] = num_blocks + 5
    seq_lens = torch.tensor([60, 40, 33], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))
    triton_attention.paged_decode_attention_fwd(out, q, k_pages, v_pages, block_table, seq_lens, 0.125, num_splits=3,
                                                window=window)  # fmt: skip
    assert device_errors.take(CPU) == device_errors.BLOCK_TABLE
    assert torch.equal(out[:2], torch.zeros_like(out[:2]))
    good = torch.empty_like(q)
    triton_attention.decode_attention_fwd(good, q, k, v, seq_lens, 0.125, num_splits=3, window=window)
    assert torch.equal(out[2], good[2])
    if window:  # sequence 0 reads keys 30..59: blocks 1..3; a bad block 0 is never read
        block_table[0, 1], block_table[0, 0] = 5, -3
        block_table[1] = torch.arange(4)
        triton_attention.paged_decode_attention_fwd(out, q, k_pages, v_pages, block_table, seq_lens, 0.125,
                                                    num_splits=3, window=window)  # fmt: skip
        assert device_errors.take(CPU) == 0


@pytest.mark.parametrize("bad_slot", [-2, 4 * 16, 10**9])
def test_write_kv_bad_slot_writes_nothing(bad_slot):
    g = torch.Generator().manual_seed(5)
    num_blocks, block_size, hkv, d, T = 4, 16, 2, 64, 5
    k, v = make((T, hkv, d), torch.float16, g), make((T, hkv, d), torch.float16, g)
    slots = torch.tensor([3, bad_slot, -1, 40, 63])
    k_cache, v_cache = make((num_blocks, hkv, block_size, d), torch.float16, g), make((num_blocks, hkv, block_size, d), torch.float16, g)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    for t, s in enumerate(slots.tolist()):
        if 0 <= s < num_blocks * block_size:
            ref_k[s // block_size, :, s % block_size] = k[t]
            ref_v[s // block_size, :, s % block_size] = v[t]
    triton_attention.write_kv_fwd(k_cache, v_cache, k, v, slots, block_size)
    assert device_errors.take(CPU) == device_errors.SLOT_MAPPING
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


def test_rotary_bad_position_leaves_the_token():
    g = torch.Generator().manual_seed(6)
    x = make((4, 3, 64), torch.float32, g)
    cache = ops.cos_sin_cache(32, 64)
    positions = torch.tensor([0, 32, 7, -1])
    got = x.clone()
    triton_rotary.rotary_embedding_fwd(got, positions, cache, False)
    assert device_errors.take(CPU) == device_errors.POSITIONS
    assert torch.equal(got[1], x[1]) and torch.equal(got[3], x[3])
    want = x.clone()
    triton_rotary.rotary_embedding_fwd(want, torch.tensor([0, 0, 7, 0]), cache, False)
    assert torch.equal(got[[0, 2]], want[[0, 2]])
    assert device_errors.take(CPU) == 0


@pytest.mark.parametrize("case", ["decreasing", "past_the_end", "run_longer_than_max", "nonzero_start"])
def test_varlen_bad_offsets_skip_their_sequence(case):
    """One sequence's offsets are bad: its rows keep the sentinel, the flag says
    cu_seqlens, and the sequences with good offsets match the fp64 reference."""
    hq, hkv, d = 2, 1, 32
    cu_q = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    max_q, bad = 8, 1  # (fp32 at D 32: 64-row query tiles)
    if case == "decreasing":
        cu_k = torch.tensor([0, 5, 4, 20], dtype=torch.int32)  # sequence 1: k 5 -> 4
    elif case == "past_the_end":
        cu_k = torch.tensor([0, 5, 12, 21], dtype=torch.int32)  # sequence 2 ends past Tk = 20
        bad = 2
    elif case == "run_longer_than_max":  # sequence 2 has 68 query rows; max_seqlen_q 8 sizes one 64-row tile
        cu_q = cu_k = torch.tensor([0, 5, 12, 80], dtype=torch.int32)
        bad = 2
    else:
        cu_q = torch.tensor([1, 5, 12, 20], dtype=torch.int32)  # must start at 0
        bad = 0
    g = torch.Generator().manual_seed(7)
    tq, tk = int(cu_q[-1]), int(cu_k[-1]) - (case == "past_the_end")
    q, k, v = make((tq, hq, d), torch.float32, g), make((tk, hkv, d), torch.float32, g), make((tk, hkv, d), torch.float32, g)
    out = torch.full_like(q, -7.0)
    triton_attention.flash_attention_varlen_fwd(out, q, k, v, cu_q, cu_k, max_q, d**-0.5, True)
    assert device_errors.take(CPU) == device_errors.CU_SEQLENS
    q0, q1 = int(cu_q[bad]), int(cu_q[bad + 1])
    assert (out[q0:q1] == -7.0).all()
    for b in range(3):
        if b == bad:
            continue
        (a0, a1), (k0, k1) = cu_q[b : b + 2].tolist(), cu_k[b : b + 2].tolist()
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a0:a1], k[k0:k1], v[k0:k1]))
        got = out[a0:a1].transpose(0, 1)[None]
        assert_close_2x(got, reference(qs, ks, vs, d**-0.5, True, None)[0], torch_baseline(qs, ks, vs, d**-0.5, True, None))


def test_varlen_without_max_seqlen_q_covers_every_run():
    """max_seqlen_q None: the grid is sized by Tq (no sync to find the longest run)."""
    hq, hkv, d = 2, 2, 32
    cu = torch.tensor([0, 3, 40], dtype=torch.int32)
    g = torch.Generator().manual_seed(8)
    q, k, v = make((40, hq, d), torch.float32, g), make((40, hkv, d), torch.float32, g), make((40, hkv, d), torch.float32, g)
    got, want = torch.empty_like(q), torch.empty_like(q)
    triton_attention.flash_attention_varlen_fwd(got, q, k, v, cu, cu, None, d**-0.5, True)
    triton_attention.flash_attention_varlen_fwd(want, q, k, v, cu, cu, 37, d**-0.5, True)
    assert device_errors.take(CPU) == 0
    assert torch.equal(got, want)


def test_check_device_errors_reports_and_clears():
    """ops.check_device_errors raises DeviceValueError naming each bad input once, then the
    flag is clear; a device without a flag has nothing to report."""
    flag = device_errors.flag(CPU)
    flag[2] = flag[0] = 1  # what the kernels store for SLOT_MAPPING (1 << 2) and SEQ_LENS (1 << 0)
    with pytest.raises(ops.DeviceValueError, match=r"seq_lens outside .*; a slot_mapping value") as e:
        ops.check_device_errors(CPU)
    assert isinstance(e.value, ValueError) and "block_table" not in str(e.value)
    assert not flag.any()
    ops.check_device_errors(CPU)
    flag[3] = 1  # POSITIONS
    ops.check_device_errors(torch.device("meta"))  # another device: this flag untouched
    with pytest.raises(ops.DeviceValueError, match="position"):
        ops.check_device_errors()


def test_varlen_max_seqlen_q_zero_with_rows_is_flagged():
    """max_seqlen_q 0 sizes an empty grid: sequences with query rows are flagged, not
    silently skipped."""
    cu = torch.tensor([0, 3, 5], dtype=torch.int32)
    g = torch.Generator().manual_seed(9)
    q, k = make((5, 2, 32), torch.float32, g), make((5, 1, 32), torch.float32, g)
    out = torch.full_like(q, -7.0)
    triton_attention.flash_attention_varlen_fwd(out, q, k, k, cu, cu, 0, 32**-0.5, True)
    assert device_errors.take(CPU) == device_errors.CU_SEQLENS
    assert (out == -7.0).all()
