"""The model runners: they turn the scheduled requests into a ``Step`` (token ids,
positions, cache slots, block tables), run the model and sample. Prefill runs eagerly.

- ``CpuModelRunner``: each decode batch size is captured once as a CPU graph
  (``DecodeGraph``) and replayed without the per-op Python, unless its capture is refused
  (then it stays eager).
- ``CudaModelRunner``: the same steps, built on the host and copied to the GPU; each decode
  batch size is captured once as a ``torch.cuda.CUDAGraph`` (``CudaDecodeGraph``: every
  CUDA op is sync-free and capturable, index values are checked in the kernels) and
  replayed with one launch. Tokens are chosen on the GPU, penalties, temperature, top-k /
  top-p and logprobs included (``select_on_device``, each request drawing from its own
  generator on the GPU): one copy of B ids back, plus the few logprobs asked for. The
  device's index-check flag is read after each step (ops.check_device_errors), where the
  token copy has synced anyway.
"""

from __future__ import annotations

import dataclasses
import time
from typing import NamedTuple

import torch

from .. import ops
from ..layers import KVCache, Step
from .model import DecoderModel
from .sampling import TokenLogprobs, select, select_on_device, token_logprobs
from .scheduler import Request


# CPU decode graphs serve batches up to this size: each batch size's graph keeps its own
# intermediates (~1.2 MiB per row on SmolLM2, so graphs for every size up to B grow as B^2:
# 1.3 GB at 48), while the Python overhead they remove matters less as a step's compute
# grows with the batch. Larger batches run eagerly.
GRAPH_MAX_BATCH = 16


class DecodeRow(NamedTuple):
    """One request's input to a decode step."""

    token: int  # its last sampled token, which goes in now
    position: int
    slot: int  # where the token's k / v go in the paged cache
    blocks: list[int]  # its block table row


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

    def table_width(self, reqs: list[Request]) -> int:
        """Columns of a decode step's block table: the longest request's blocks."""
        return max(len(r.blocks) for r in reqs)

    def decode_rows(self, reqs: list[Request]) -> list[DecodeRow]:
        """Each request's input to a decode step: the last sampled token goes in now."""
        return [DecodeRow(r.out_ids[-1], r.length - 1, self.slot(r, r.length - 1), r.blocks) for r in reqs]

    def decode_step(self, reqs: list[Request]) -> Step:
        rows, width = self.decode_rows(reqs), self.table_width(reqs)
        return Step(
            input_ids=torch.tensor([r.token for r in rows], dtype=torch.int64),
            positions=torch.tensor([r.position for r in rows], dtype=torch.int64),
            slot_mapping=torch.tensor([r.slot for r in rows], dtype=torch.int64),
            block_table=torch.tensor([r.blocks + [0] * (width - len(r.blocks)) for r in rows], dtype=torch.int32),
            seq_lens=torch.tensor([r.position + 1 for r in rows], dtype=torch.int32),
        )

    def logits(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of the step's last token per sequence, run eagerly."""
        with torch.no_grad():
            return self.model.logits(self.model.forward(step, self.kv))

    def decode_logits(self, reqs: list[Request]) -> torch.Tensor:
        """[B, V] fp32 logits of the decode step of reqs: replayed from their batch size's CPU
        graph (its buffers take the requests' inputs directly, no Step tensors), else eager."""
        if self.graphs is not None:
            with torch.no_grad():
                logits = self._graph_logits(reqs)
            if logits is not None:
                return logits
        return self.logits(self.decode_step(reqs))

    @staticmethod
    def sample(logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None], float]:
        """(each request's next token, its logprobs where asked, the time they were chosen)."""
        tokens = select(logits, [r.params for r in reqs], [r.seen for r in reqs], [r.generator for r in reqs])
        logprobs = token_logprobs(logits, tokens, [r.params.logprobs for r in reqs])  # [None]s unless asked
        return tokens, logprobs, time.perf_counter()

    def _graph_logits(self, reqs: list[Request]) -> torch.Tensor | None:
        """The decode step of reqs through its batch size's CPU graph (captured on first use),
        or None when graphs cannot serve it (the caller then runs the model eagerly)."""
        key = (len(reqs), torch.get_num_threads())
        if key[0] > GRAPH_MAX_BATCH:
            return None
        graph = self.graphs.get(key)
        if graph is False:  # refused before: this batch size runs eagerly
            return None
        if graph is None:
            graph = DecodeGraph(self.model, self.kv, key[0], -(-self.max_model_len // self.block_size))
        try:
            logits = graph.run_rows(self.decode_rows(reqs))
        except ops.CaptureBusy:  # another thread kept capturing: eager this time, capture later
            return None
        except ops.NotCapturable:  # something in this step is not a recorded kernel: stay eager
            self.graphs[key] = False
            return None
        self.graphs[key] = graph
        return logits


def _on(step: Step, device: torch.device) -> Step:
    """The step with its tensors copied to ``device``."""
    moved = {f.name: getattr(step, f.name).to(device, non_blocking=True) for f in dataclasses.fields(step)
             if isinstance(getattr(step, f.name), torch.Tensor)}  # fmt: skip
    return dataclasses.replace(step, **moved)


class CudaModelRunner(CpuModelRunner):
    """``decode_graphs``: replay decode steps as CUDA graphs, one per batch size."""

    def __init__(self, model: DecoderModel, kv: KVCache, max_model_len: int, decode_graphs: bool):
        super().__init__(model, kv, max_model_len, decode_graphs)
        self.device = model.device

    def prefill_step(self, reqs: list[Request]) -> Step:
        return _on(super().prefill_step(reqs), self.device)

    def table_width(self, reqs: list[Request]) -> int:
        """max_model_len's blocks: the paged decode splits the keys by the table's width, so
        eager and graph steps (whose static table has that width) split alike and give the
        same bits."""
        return -(-self.max_model_len // self.block_size)

    def decode_step(self, reqs: list[Request]) -> Step:
        return _on(super().decode_step(reqs), self.device)

    def decode_logits(self, reqs: list[Request]) -> torch.Tensor:
        step = self.decode_step(reqs)
        if self.graphs is not None:
            with torch.no_grad():
                logits = self._graph_logits(step)
            if logits is not None:
                return logits
        return self.logits(step)

    def sample(self, logits: torch.Tensor, reqs: list[Request]) -> tuple[list[int], list[TokenLogprobs | None], float]:
        params = [r.params for r in reqs]
        tokens = select_on_device(logits, params, [r.seen for r in reqs], [r.generator for r in reqs]).tolist()
        logprobs = token_logprobs(logits, tokens, [p.logprobs for p in params])  # on the GPU, small results back
        ops.check_device_errors(self.device)  # the ids' copy to the host synced already
        return tokens, logprobs, time.perf_counter()

    def _graph_logits(self, step: Step) -> torch.Tensor | None:
        """This decode step through its batch size's CUDA graph (captured on first use), or
        None where the capture failed (that batch size then runs eagerly, with a warning)."""
        batch = step.input_ids.shape[0]
        graph = self.graphs.get(batch)
        if graph is False:
            return None
        if graph is None:
            graph = CudaDecodeGraph(self.model, self.kv, batch, -(-self.max_model_len // self.block_size))
            try:
                logits = graph.run(step)
            except RuntimeError as e:
                import warnings

                warnings.warn(f"decode batch size {batch} could not be captured as a CUDA graph ({e}); it runs "
                              "eagerly", RuntimeWarning, stacklevel=2)  # fmt: skip
                self.graphs[batch] = False
                return None
            self.graphs[batch] = graph
            return logits
        return graph.run(step)


class CudaDecodeGraph:
    """A decode step of ``batch`` sequences as a torch.cuda.CUDAGraph: the first ``run``
    runs the step once on a side stream (Triton compiles, the allocator's pools fill; it
    writes the step's k / v, which the replay writes again, the same values), then captures
    the embedding, the layers and the LM head on static input buffers; every run copies the
    step's inputs into them and replays. The same kernels on the same data as eager: the
    same logits."""

    def __init__(self, model: DecoderModel, kv: KVCache, batch: int, max_blocks: int):
        self.model, self.kv, self.graph, self.out = model, kv, None, None
        dev = model.device
        self.step = Step(input_ids=torch.zeros(batch, dtype=torch.int64, device=dev),
                         positions=torch.zeros(batch, dtype=torch.int64, device=dev),
                         slot_mapping=torch.zeros(batch, dtype=torch.int64, device=dev),
                         block_table=torch.zeros(batch, max_blocks, dtype=torch.int32, device=dev),
                         seq_lens=torch.ones(batch, dtype=torch.int32, device=dev))  # fmt: skip

    def _forward(self) -> torch.Tensor:
        return self.model.lm_head(self.model.forward(self.step, self.kv))  # [B, V]

    def run(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of this decode step."""
        s, width = self.step, step.block_table.shape[1]
        s.input_ids.copy_(step.input_ids)
        s.positions.copy_(step.positions)
        s.slot_mapping.copy_(step.slot_mapping)
        s.block_table[:, :width].copy_(step.block_table)
        s.block_table[:, width:] = 0  # never read: past every sequence's length
        s.seq_lens.copy_(step.seq_lens)
        if self.graph is None:
            dev = self.model.device
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                self._forward()
            torch.cuda.current_stream(dev).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self._forward()
            self.graph, self.out = graph, out  # only a capture that finished is kept
        self.graph.replay()
        return self.model.cap_logits(self.out.float())


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
        s = self.step  # numpy views of the same memory: run_rows writes Python ints at ~0.1 us each
        self._np = (s.input_ids.numpy(), s.positions.numpy(), s.slot_mapping.numpy(), s.block_table.numpy(),
                    s.seq_lens.numpy())  # fmt: skip

    def run(self, step: Step) -> torch.Tensor:
        """[B, V] fp32 logits of this decode step."""
        s, width = self.step, step.block_table.shape[1]
        s.input_ids.copy_(step.input_ids)
        s.positions.copy_(step.positions)
        s.slot_mapping.copy_(step.slot_mapping)
        s.block_table[:, :width].copy_(step.block_table)
        s.block_table[:, width:] = 0
        s.seq_lens.copy_(step.seq_lens)
        return self._run()

    def run_rows(self, rows: list[DecodeRow]) -> torch.Tensor:
        """run() for the decode step of these rows (CpuModelRunner.decode_rows), written
        straight into the captured buffers instead of building a Step's tensors and copying
        them in."""
        ids, positions, slots, table, seq_lens = self._np
        for b, r in enumerate(rows):
            ids[b], positions[b], slots[b], seq_lens[b] = r.token, r.position, r.slot, r.position + 1
            table[b, : len(r.blocks)] = r.blocks
            table[b, len(r.blocks) :] = 0
        return self._run()

    def _run(self) -> torch.Tensor:
        s = self.step
        self.model.embed_tokens(s.input_ids, out=self.h)
        if self.graph is None:
            # the weights, the RoPE table and the KV cache are the runtime's own and never
            # resized: the graph holds them without re-checking ~360 addresses per replay
            static = [*self.model.converted_tensors().values(), self.model.cos_sin, *self.kv.k, *self.kv.v]
            with ops.capture_cpu_graph(static) as g:  # runs this step's kernels while recording them
                self.out = self.model.lm_head(self.model.forward(s, self.kv, h=self.h))  # [B, V / tp]
            self.graph = g
        else:
            self.graph.replay()
        return self.model.cap_logits(self.out.float())

