"""The paged KV cache's blocks: free, held by requests (reference-counted), or keeping a
prompt prefix for reuse (prefix caching, as vLLM's automatic prefix caching).

A full block of prompt tokens is identified by its tokens and everything before them: the
key of block j is (key of block j - 1, tokens of block j), compared exactly (no hash can
collide into wrong k/v). After a prefill the engine registers the prompt's full blocks; a
later prompt that starts with the same tokens (the chat template's system prompt, earlier
turns of a conversation) maps those blocks instead of computing them again. Blocks a
request still holds are never handed out; cached blocks nobody holds are evicted least
recently used first, only when no free block is left. At least one prompt token is always
computed (its logits pick the first new token), so a prompt never reuses its last token.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = deque(range(num_blocks))  # neither held nor cached
        self.refs = [0] * num_blocks  # requests holding each block
        self.cached: dict[tuple, int] = {}  # prefix key -> block
        self.key_of: dict[int, tuple] = {}  # block -> its prefix key (cached blocks only)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody: evictable, oldest first

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def _keys(self, prompt: list[int], count: int):
        key = None
        for j in range(count):
            key = (key, tuple(prompt[j * self.block_size : (j + 1) * self.block_size]))
            yield key

    def allocate(self, prompt: list[int], total: int) -> tuple[list[int], int] | None:
        """(blocks for a request of `total` blocks, prompt tokens already in them), or None
        if they do not fit now. The leading blocks are cached prefix blocks when they match."""
        reused = []
        if self.prefix_caching:
            for key in self._keys(prompt, (len(prompt) - 1) // self.block_size):
                block = self.cached.get(key)
                if block is None:
                    break
                reused.append(block)
        fresh = total - len(reused)
        if fresh > self.available() - sum(1 for b in reused if b in self.idle):
            return None
        for b in reused:
            self.idle.pop(b, None)
            self.refs[b] += 1
        blocks = reused + [self._take() for _ in range(fresh)]
        return blocks, len(reused) * self.block_size

    def _take(self) -> int:
        if self.free:
            b = self.free.popleft()
        else:  # evict the least recently used cached prefix block
            b, _ = self.idle.popitem(last=False)
            del self.cached[self.key_of.pop(b)]
        self.refs[b] = 1
        return b

    def register(self, prompt: list[int], blocks: list[int]) -> None:
        """After prefill: keep the prompt's full blocks for reuse."""
        if not self.prefix_caching:
            return
        for key, b in zip(self._keys(prompt, len(prompt) // self.block_size), blocks):
            if key not in self.cached and b not in self.key_of:
                self.cached[key], self.key_of[b] = b, key

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None  # most recently used at the end
                else:
                    self.free.append(b)
