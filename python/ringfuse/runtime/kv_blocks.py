"""The paged KV cache's blocks: free, held by requests (reference-counted), or keeping a
prompt prefix for reuse (prefix caching, as vLLM's automatic prefix caching).

A full block of prompt tokens is identified by its tokens and everything before them: the
key of block j is (key of block j - 1, tokens of block j), compared exactly (no hash can
collide into wrong k/v), the parent by identity with the stored key. After a prefill the engine registers the prompt's full blocks; a
later prompt that starts with the same tokens (the chat template's system prompt, earlier
turns of a conversation) maps those blocks instead of computing them again. Blocks a
request still holds are never handed out; cached blocks nobody holds are evicted least
recently used first, only when no free block is left. At least one prompt token is always
computed (its logits pick the first new token), so a prompt never reuses its last token.
"""

from __future__ import annotations

from collections import OrderedDict, deque


class _Key:
    """A block's prefix key: its tokens and the (stored) key of the block before it. The
    hash is computed once and parents compare by identity, so a lookup costs O(tokens)
    instead of re-hashing the whole chain at every block."""

    __slots__ = ("parent", "tokens", "_hash")

    def __init__(self, parent, tokens: tuple):
        self.parent, self.tokens = parent, tokens
        self._hash = hash((id(parent), tokens))

    def __hash__(self):
        return self._hash

    def __eq__(self, other):
        return isinstance(other, _Key) and self.parent is other.parent and self.tokens == other.tokens


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free = deque(range(num_blocks))  # neither held nor cached
        self.refs = [0] * num_blocks  # requests holding each block
        self.cached: dict[_Key, int] = {}  # prefix key -> block
        self.key_of: dict[int, _Key] = {}  # block -> its prefix key (cached blocks only)
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached, held by nobody: evictable, oldest first

    def available(self) -> int:
        return len(self.free) + len(self.idle)

    def _keys(self, prompt: list[int], count: int, insert_blocks=None):
        """The keys of the prompt's first `count` blocks, as stored (canonical) objects; stops
        at the first block not cached, unless insert_blocks gives blocks to cache them as."""
        parent = None
        for j in range(count):
            key = _Key(parent, tuple(prompt[j * self.block_size : (j + 1) * self.block_size]))
            block = self.cached.get(key)
            if block is not None:
                key = self.key_of[block]  # the stored object: the next key's parent
            elif insert_blocks is None:
                return
            elif insert_blocks[j] not in self.key_of:
                block = insert_blocks[j]
                self.cached[key], self.key_of[block] = block, key
            else:  # this block is cached under another prefix: the chain cannot go on
                return
            yield key, block
            parent = key

    def allocate(self, prompt: list[int], total: int) -> tuple[list[int], int] | None:
        """(blocks for a request of `total` blocks, prompt tokens already in them), or None
        if they do not fit now. The leading blocks are cached prefix blocks when they match."""
        reused = []
        if self.prefix_caching:
            reused = [b for _, b in self._keys(prompt, (len(prompt) - 1) // self.block_size)]
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
        if self.prefix_caching:
            for _ in self._keys(prompt, len(prompt) // self.block_size, insert_blocks=blocks):
                pass

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):  # a prefix's last block becomes the oldest: evicted before its parents
            self.refs[b] -= 1
            if self.refs[b] == 0:
                if b in self.key_of:
                    self.idle[b] = None  # most recently used at the end
                else:
                    self.free.append(b)
