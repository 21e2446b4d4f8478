"""Tensor-parallel layers (ringfuse.distributed) on tp = 2 and 3 spawned CPU ranks vs the
unsharded layers: fp32 within 1e-5 relative (max |diff| / max |ref|), bf16 within the
tolerance rule (2x torch's own bf16 error vs fp32, plus a floor), quantized shards within
the Int8Linear bounds."""

from __future__ import annotations

import pytest
import torch

from . import workers_tp
from .harness import run_ranks, values
from .test_allreduce import no_segment_left_behind  # noqa: F401  (autouse fixture)


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_linear_layers_match_the_unsharded_ones(world, dtype):
    """fp32: within 1e-5 of the unsharded layer. bf16: the sharded result's error vs the
    fp32 layer is at most 2x the unsharded bf16 layer's (+ a floor of one bf16 step)."""
    for rank, out in enumerate(values(run_ranks(workers_tp.linears, world, dtype))):
        n_local = out["ref_col"].shape[-1] // world
        local = slice(rank * n_local, (rank + 1) * n_local)
        pairs = [(out["col_local"], out["ref_col"][..., local], out["ref32_col"][..., local]),
                 (out["col_gathered"], out["ref_col"], out["ref32_col"]),
                 (out["mlp"], out["ref_mlp"], out["ref32_mlp"]),
                 (out["row_full_input"], out["ref_mlp"], out["ref32_mlp"])]  # fmt: skip
        for got, ref, ref32 in pairs:
            if dtype == "float32":
                assert rel(got, ref) <= 1e-5
            else:
                err, err_torch = (got.float() - ref32).abs().max(), (ref.float() - ref32).abs().max()
                assert err <= 2 * err_torch + 2**-8 * ref32.abs().max()
        assert out["empty_col"].shape == (0, 7, n_local) and out["empty_mlp"].shape == (0, 7, 96)
        for quant in ("w8a8", "w8a16"):
            err = ((out[f"mlp_{quant}"] - out["ref32_mlp"]).norm() / out["ref32_mlp"].norm()).item()
            assert err <= (0.03 if quant == "w8a8" else 0.02), (quant, err)


@pytest.mark.parametrize("world,vocab", [(2, 1000), (3, 1000), (3, 49152), (2, 49157), (2, 1), (3, 1), (3, 4)])
def test_vocab_parallel_embedding_and_lm_head(world, vocab):
    """Ids at both ends of every shard; a vocab tp does not divide (padding rows); a rank
    with no rows at all (vocab 1: its embedding raised an IndexError before the sum)."""
    for out in values(run_ranks(workers_tp.embeddings, world, vocab)):
        assert torch.equal(out["emb"], out["ref_emb"])  # one nonzero row per id: the sum is exact
        assert out["logits"].shape == out["ref_logits"].shape
        assert rel(out["logits"], out["ref_logits"]) <= 1e-5
        assert torch.equal(out["argmax"], out["ref_argmax"])
        assert out["shares"] and rel(out["tied_logits"], out["ref_tied"]) <= 1e-5
        assert torch.equal(out["tied_argmax"], out["ref_tied_argmax"])


def test_bad_sizes_give_clear_errors():
    for errors in values(run_ranks(workers_tp.bad_sizes, 2)):
        assert "out_features (7) must be divisible by the tensor-parallel size 2; tp sizes that divide it: [1, 7]" in errors[0]
        assert "in_features (7) must be divisible" in errors[1]
        assert "input must be [..., 16], got (2, 15)" in errors[2]
        assert "ids must be in [0, 10), got [10, 10]" in errors[3]


def test_layers_need_an_initialized_group():
    from ringfuse import distributed as rd

    with pytest.raises(RuntimeError, match="need torch.distributed"):
        rd.ColumnParallelLinear(4, 4)


@pytest.mark.parametrize("world,heads,kv_heads,tied,fuse", [(2, 4, 2, False, False), (2, 4, 1, True, True),
                                                            (3, 6, 3, True, False), (3, 6, 1, False, True),
                                                            (2, 6, 3, False, False), (2, 6, 3, True, True)])  # fmt: skip
def test_parallelized_hf_llama_matches_the_original(world, heads, kv_heads, tied, fuse):
    """A tiny random LlamaForCausalLM: KV heads split (kv % tp == 0), replicated (tp % kv ==
    0) or split into uneven whole GQA groups as the runtime splits them (6 / 3 heads over tp
    = 2: 2 + 4 query heads, o_proj's columns alike), tied and untied
    embeddings, separate or fused gate/up; full logits on every rank within 1e-4."""
    pytest.importorskip("transformers")
    for out in values(run_ranks(workers_tp.llama, world, heads, kv_heads, tied, fuse)):
        assert out["counts"] == {"attention": 2, "mlp": 2, "embedding": 1, "lm_head": 1}
        assert out["fused"] == (2 if fuse else 0)
        assert out["logits"].shape == out["ref"].shape
        assert (out["logits"] - out["ref"]).abs().max().item() <= 1e-4


def test_parallelize_names_the_valid_tp_sizes():
    pytest.importorskip("transformers")
    for out in values(run_ranks(workers_tp.llama, 3, 4, 2, False)):
        assert out["error"] == "tensor-parallel size 3 does not fit 4 query / 2 KV heads; valid tp sizes: [1, 2, 4]"


@pytest.mark.parametrize("tied", [False, True])
def test_loading_only_this_ranks_slices(tmp_path, tied):
    """A parallelized model with other weights loads the original's slices from its
    safetensors file (get_slice reads) or from a full state_dict: logits as the original's."""
    pytest.importorskip("transformers")
    for out in values(run_ranks(workers_tp.load_shards, 2, str(tmp_path), tied)):
        assert out["file_diff"].item() <= 1e-4 and out["dict_diff"].item() <= 1e-4
        assert "shape" in out["error"] and "this rank's shard needs" in out["error"]


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reloaded_after_their_first_call(world):
    for out in values(run_ranks(workers_tp.reloads, world)):
        assert rel(out["reloaded"], out["ref_reloaded"]) <= 1e-5
        assert rel(out["col_w8a16"], out["ref_col_w8a16"]) <= 1e-5  # the same int8 weights and scales
        assert rel(out["row_w8a16"], out["ref_row_w8a16"]) <= 1e-5
        assert rel(out["col_w8a8"], out["ref_col_w8a8"]) <= 0.02  # activations quantized per token too
        assert rel(out["row_w8a8"], out["ref_row_w8a8"]) <= 0.02


def test_a_group_this_rank_is_not_in_is_refused():
    res = values(run_ranks(workers_tp.wrong_group, 2))
    assert res[0] == "member"
    assert "is not a member of the group passed" in res[1]
