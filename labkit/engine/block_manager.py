"""Paged KV-cache bookkeeping: fixed-size blocks, a block table per request, a free list."""
from __future__ import annotations

from collections import deque

from labkit.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, req: Request, num_new_tokens: int) -> int:
        total = req.num_computed_tokens + num_new_tokens
        return max(0, -(-total // self.block_size) - len(req.block_table))

    def can_allocate(self, req: Request, num_new_tokens: int) -> bool:
        return self.blocks_needed(req, num_new_tokens) <= len(self.free_blocks)

    def allocate(self, req: Request, num_new_tokens: int) -> None:
        """Give `req` room for `num_new_tokens` more tokens after its computed ones."""
        for _ in range(self.blocks_needed(req, num_new_tokens)):
            req.block_table.append(self.free_blocks.popleft())

    def free(self, req: Request) -> None:
        self.free_blocks.extend(reversed(req.block_table))
        req.block_table = []
