"""The model runner of the CPU: turns the scheduled requests into a ``Step`` (token ids,
positions, cache slots, block tables), runs the model and samples. Prefill runs eagerly;
each decode batch size is captured once as a CPU graph (``DecodeGraph``) and replayed,
without the per-op Python, unless its capture is refused (then it stays eager).
A GPU runner would own CUDA graphs the same way."""

from __future__ import annotations

import time

import torch

from .. import ops
from ..layers import KVCache, Step
from .model import DecoderModel
from .sampling import TokenLogprobs, select, token_logprobs
from .scheduler import Request


class CpuModelRunner:
    """``decode_graphs``: replay decode steps as CPU graphs (single rank only: the
    all-reduce is not a recorded kernel)."""

    def __init__(self, model: DecoderModel, kv: KVCache, max_model_len: int, decode_graphs: bool):
        self.model, self.kv, self.max_model_len = model, kv, max_model_len
        self.block_size = kv.block_size
        # decode graphs by (batch, threads), False where a capture was refused; None: off
        self.graphs: dict | None = {} if decode_graphs else None

    def slot(self, r: Request, position: int) -> int:
        """Where the token at ``position`` of request r lives in the paged cache."""
        return r.blocks[position // self.block_size] * self.block_size + position % self.block_size

    def prefill_step(self, reqs: list[Request]) -> Step:
        """The prompts' tokens past their cached prefixes, packed; with any cached prefix, the
        attention reads each prompt's whole context back from the cache."""
        ids, pos, slots, cu, ctx, cu_ctx = [], [], [], [0], [], [0]
        for r in reqs:
            n = len(r.prompt_ids)
            ids += r.prompt_ids[r.cached :]
            pos += range(r.cached, n)
            slots += [self.slot(r, p) for p in range(r.cached, n)]
            cu.append(cu[-1] + n - r.cached)
            ctx += [self.slot(r, p) for p in range(n)]
            cu_ctx.append(cu_ctx[-1] + n)
        reuse = any(r.cached for r in reqs)
        return Step(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            cu_seqlens=torch.tensor(cu, dtype=torch.int32),
            max_seqlen=max(len(r.prompt_ids) - r.cached for r in reqs),
            logit_rows=torch.tensor(cu[1:], dtype=torch.int64) - 1,
            context_slots=torch.tensor(ctx, dtype=torch.int64) if reuse else None,
            cu_seqlens_context=torch.tensor(cu_ctx, dtype=torch.int32) if reuse else None,
        )

    def decode_step(self, reqs: list[Request]) -> Step:
        width = max(len(r.blocks) for r in reqs)
        table = torch.zeros(len(reqs), width, dtype=torch.int32)
        for b, r in enumerate(reqs):
            table[b, : len(r.blocks)] = torch.tensor(r.blocks, dtype=torch.int32)
        pos = [r.length - 1 for r in reqs]  # the last sampled token goes in now
        return Step(
            input_ids=torch.tensor([r.out_ids[-1] for r in reqs], dtype=torch.int64),
            positions=torch.tensor(pos, dtype=torch.int64),
            slot_mapping=torch.tensor([self.slot(r, p) for r, p in zip(reqs, pos)], dtype=torch.int64),
            block_table=table,
            seq_lens=torch.tensor([p + 1 for p in pos], dtype=torch.int32),
        )

    def logits(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of the step's last token per sequence."""
        with torch.no_grad():
            logits = self._graph_logits(step) if not step.is_prefill and self.graphs is not None else None
            if logits is None:
                logits = self.model.logits(self.model.forward(step, self.kv))
        return logits

    @staticmethod
    def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None], float]:
        """(each request's next token, its logprobs where asked, the time they were chosen)."""
        tokens = select(logits, [r.params for r in reqs], [r.seen for r in reqs], [r.generator for r in reqs])
        logprobs = token_logprobs(logits, tokens, [r.params.logprobs for r in reqs])  # [None]s unless asked
        return tokens, logprobs, time.perf_counter()

    def _graph_logits(self, step: Step) -> torch.Tensor | None:
        """This decode step through its batch size's CPU graph (captured on first use), or
        None when graphs cannot serve it (the caller then runs the model eagerly)."""
        key = (step.input_ids.shape[0], torch.get_num_threads())
        graph = self.graphs.get(key)
        if graph is False:  # refused before: this batch size runs eagerly
            return None
        if graph is None:
            graph = DecodeGraph(self.model, self.kv, key[0], -(-self.max_model_len // self.block_size))
        try:
            logits = graph.run(step)
        except ops.NotCapturable:  # something in this step is not a recorded kernel: stay eager
            self.graphs[key] = False
            return None
        self.graphs[key] = graph
        return logits


class DecodeGraph:
    """A decode step of ``batch`` sequences captured as a CPU graph (ops.capture_cpu_graph):
    the first ``run`` captures the layers and the LM head on static input buffers, later
    runs copy the step's inputs into them and replay the recorded kernels, without the
    per-op Python. Bitwise the same logits as ``model.logits(model.forward(step, kv))``.
    Single rank only (the all-reduce is not a recorded kernel)."""

    def __init__(self, model: DecoderModel, kv: KVCache, batch: int, max_blocks: int):
        self.model, self.kv, self.graph, self.out = model, kv, None, None
        self.h = torch.zeros(batch, model.config.hidden_size, dtype=model.dtype)  # [B, hidden]
        self.step = Step(input_ids=torch.zeros(batch, dtype=torch.int64), positions=torch.zeros(batch, dtype=torch.int64),
                         slot_mapping=torch.zeros(batch, dtype=torch.int64),
                         block_table=torch.zeros(batch, max_blocks, dtype=torch.int32),
                         seq_lens=torch.ones(batch, dtype=torch.int32))  # fmt: skip

    def run(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of this decode step."""
        s, width = self.step, step.block_table.shape[1]
        self.h.copy_(self.model.embed_tokens(step.input_ids))
        s.positions.copy_(step.positions)
        s.slot_mapping.copy_(step.slot_mapping)
        s.block_table[:, :width].copy_(step.block_table)
        s.block_table[:, width:] = 0
        s.seq_lens.copy_(step.seq_lens)
        if self.graph is None:
            with ops.capture_cpu_graph() as g:  # runs this step's kernels while recording them
                self.out = self.model.lm_head(self.model.forward(s, self.kv, h=self.h))  # [B, V / tp]
            self.graph = g
        else:
            self.graph.replay()
        return self.model.cap_logits(self.out.float())

