"""Rank bodies of tests/distributed/test_tensor_parallel.py: every rank builds the same full
layers from one seed, shards them, and returns the sharded layer's output next to the full
layer's."""

from __future__ import annotations

import torch

from ringfuse import distributed as rd


def linears(rank, world, dtype_name):
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(0)
    k, n = 96, 48 * 6  # divisible by 2 and 3
    col, row = torch.nn.Linear(k, n).to(dtype), torch.nn.Linear(n, k).to(dtype)
    x = torch.randn(5, 7, k).to(dtype)
    out = {}
    c = rd.ColumnParallelLinear.from_linear(col)
    out["col_local"] = c(x)
    out["col_gathered"] = rd.ColumnParallelLinear.from_linear(col, gather_output=True)(x)
    r = rd.RowParallelLinear.from_linear(row)
    out["mlp"] = r(torch.relu(c(x)))  # column -> row: one all-reduce
    out["row_full_input"] = rd.RowParallelLinear.from_linear(row, input_is_parallel=False)(torch.relu(col(x)))
    out["ref_col"], out["ref_mlp"] = col(x), row(torch.relu(col(x)))
    out["empty_col"], out["empty_mlp"] = c(x[:0]), r(torch.relu(c(x[:0])))  # no tokens (a view to -1 failed)
    c32, r32, x32 = col.float(), row.float(), x.float()  # the fp32 reference of the tolerance rule
    out["ref32_col"], out["ref32_mlp"] = c32(x32), r32(torch.relu(c32(x32)))
    for quant in ("w8a8", "w8a16"):
        cq = rd.ColumnParallelLinear.from_linear(col.float(), quant=quant)
        rq = rd.RowParallelLinear.from_linear(row.float(), quant=quant)
        out[f"mlp_{quant}"] = rq(torch.relu(cq(x.float())))
    return out


def embeddings(rank, world, vocab):
    torch.manual_seed(1)
    emb = torch.nn.Embedding(vocab, 32)
    head = torch.nn.Linear(32, vocab, bias=False)
    per = -(-vocab // world)
    edges = sorted({0, vocab - 1} | {min(vocab - 1, r * per + d) for r in range(world) for d in (-1, 0, per - 1)
                                     if 0 <= r * per + d < vocab})  # fmt: skip
    ids = torch.tensor([edges, list(reversed(edges))])
    pe = rd.VocabParallelEmbedding.from_embedding(emb)
    h = torch.randn(3, 32)
    ph = rd.ParallelLMHead.from_linear(head)
    tied = rd.ParallelLMHead(32, vocab, tie_to=pe)
    logits = ph(h)
    h_tie = torch.randn(2, 32)
    h_tie[1] = 0  # all logits equal: argmax must pick id 0, like torch
    return {"emb": pe(ids), "ref_emb": emb(ids), "logits": logits, "ref_logits": head(h),
            "argmax": ph.argmax(h), "ref_argmax": head(h).argmax(-1),
            "tied_logits": tied(h_tie), "ref_tied": h_tie @ emb.weight.T, "tied_argmax": tied.argmax(h_tie),
            "ref_tied_argmax": (h_tie @ emb.weight.T).argmax(-1), "shares": tied.weight is pe.weight}


def bad_sizes(rank, world):
    errors = []
    for make in (lambda: rd.ColumnParallelLinear(16, 7), lambda: rd.RowParallelLinear(7, 16)):
        try:
            make()
        except ValueError as e:
            errors.append(str(e))
    layer = rd.ColumnParallelLinear(16, 8)
    try:
        layer(torch.randn(2, 15))
    except ValueError as e:
        errors.append(str(e))
    emb = rd.VocabParallelEmbedding(10, 4)
    try:
        emb(torch.tensor([10]))
    except ValueError as e:
        errors.append(str(e))
    return errors


def llama(rank, world, heads, kv_heads, tied, fuse_mlp=False):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                                   max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        try:
            counts = rd.parallelize(model, fuse_mlp=fuse_mlp)
        except ValueError as e:
            return {"error": str(e)}
        got = model(input_ids=ids, attention_mask=mask).logits
    fused = sum(isinstance(m, rd.ParallelGatedMLP) for m in model.modules())
    return {"counts": counts, "logits": got, "ref": ref, "fused": fused}


def load_shards(rank, world, tmp_dir, tied):
    import os

    import transformers

    def build(seed, hidden=48):
        cfg = transformers.LlamaConfig(vocab_size=101, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(cfg).eval()

    source = build(0)
    from safetensors.torch import save_model

    path = os.path.join(tmp_dir, f"rank{rank}")
    os.makedirs(path)
    save_model(source, os.path.join(path, "model.safetensors"))  # a tied head is stored once
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    out = {}
    with torch.no_grad():
        ref = source(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        from_file = build(5)
        rd.parallelize(from_file)
        rd.load_safetensors_shard(from_file, os.path.join(path, "model.safetensors"))
        out["file_diff"] = (from_file(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - ref).abs().max()
        from_dict = build(6)
        rd.parallelize(from_dict)
        rd.load_state_dict_shard(from_dict, source.state_dict())
        out["dict_diff"] = (from_dict(input_ids=ids, attention_mask=torch.ones_like(ids)).logits - ref).abs().max()
        wrong = build(7, hidden=64)
        try:
            rd.load_state_dict_shard(from_dict, wrong.state_dict())
        except ValueError as e:
            out["error"] = str(e)
    return out


def reloads(rank, world):
    """Shards loaded after their first call: float through nn.Module.load_state_dict (the
    prepared kernel must see the new weights), int8 from a full quantized state_dict through
    load_state_dict_shard (column shards take their rows of weight_q / weight_scale / bias,
    row shards their columns of weight_q with every row's scale)."""
    from ringfuse.nn import quantize_weight

    torch.manual_seed(2)
    k, n = 96, 48 * 6
    col, row, new_col = torch.nn.Linear(k, n), torch.nn.Linear(n, k), torch.nn.Linear(k, n)
    x = torch.randn(3, k)
    out = {}
    c = rd.ColumnParallelLinear.from_linear(col)
    c(x[:1])  # prepared (the decode-size kernel) and run once
    rows = slice(c.row_start, c.row_start + c.out_per_rank)
    c.load_state_dict({"weight": new_col.weight.detach()[rows], "bias": new_col.bias.detach()[rows]})
    out["reloaded"], out["ref_reloaded"] = c(x[:1]), new_col(x[:1])[:, rows]
    for quant in ("w8a16", "w8a8"):
        cq, rq = rd.ColumnParallelLinear(k, n, quant=quant), rd.RowParallelLinear(n, k, quant=quant)
        cq(x), rq(torch.zeros(3, rq.in_per_rank))  # made with their initial weights first
        cw, cs = quantize_weight(col.weight.detach())
        rw, rs = quantize_weight(row.weight.detach())
        rd.load_state_dict_shard(cq, {"weight_q": cw, "weight_scale": cs, "bias": col.bias.detach()})
        rd.load_state_dict_shard(rq, {"weight_q": rw, "weight_scale": rs, "bias": row.bias.detach()})
        pre = x @ (cw.float() * cs[:, None]).T + col.bias.detach()  # [3, n], dequantized math
        h = torch.relu(pre)
        out[f"col_{quant}"], out[f"ref_col_{quant}"] = cq(x), pre[:, rows]
        out[f"row_{quant}"] = rq(h[:, rq.col_start : rq.col_start + rq.in_per_rank])
        out[f"ref_row_{quant}"] = h @ (rw.float() * rs[:, None]).T + row.bias.detach()
    return out


def wrong_group(rank, world):
    import torch.distributed as dist

    sub = dist.new_group([0])
    if rank == 0:
        return "member"
    try:
        rd.ColumnParallelLinear(8, 8, group=sub)
    except ValueError as e:
        return str(e)
    return "no error"
