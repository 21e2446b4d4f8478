"""Distributed: the ring all-reduce (shared memory / torch.distributed transports) and its
collectives. See allreduce.py."""

from .allreduce import (
    RingMismatchError,
    RingTimeoutError,
    all_gather,
    all_reduce,
    backend_for,
    ddp_comm_hook,
    destroy,
    get_communicator,
    init,
    reduce_scatter,
    set_timeout,
)
from ..layers.sharding import attention_head_split, head_split
from .tensor_parallel import (
    ColumnParallelLinear,
    ParallelGatedMLP,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_safetensors_shard,
    load_state_dict_shard,
    parallelize,
)

__all__ = [
    "ColumnParallelLinear",
    "ParallelGatedMLP",
    "ParallelLMHead",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "RingMismatchError",
    "RingTimeoutError",
    "all_gather",
    "attention_head_split",
    "all_reduce",
    "backend_for",
    "ddp_comm_hook",
    "destroy",
    "get_communicator",
    "head_split",
    "init",
    "load_safetensors_shard",
    "load_state_dict_shard",
    "parallelize",
    "reduce_scatter",
    "set_timeout",
]
