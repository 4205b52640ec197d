"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from labkit.distributed import TPGroup
from labkit.layers.linear import linear
from labkit.layers.switches import KernelSwitches

if TYPE_CHECKING:
    from labkit.kernels.gemv import GemvWorkspace


class VocabParallelEmbedding(nn.Module):
    profile_category = "other"

    def __init__(self, vocab_size: int, hidden_size: int, *, tp: TPGroup):
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + self.tp.size - 1) // self.tp.size
        self.start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = loaded[self.start : self.start + self.shard_size]
        param.data.zero_()  # the last rank's shard may run past the vocab: pad with zeros
        param.data[: shard.shape[0]].copy_(shard)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.shard_size)
        y = F.embedding(local.masked_fill(mask, 0), self.weight)
        return self.tp.all_reduce(y.masked_fill_(mask.unsqueeze(-1), 0))


CPU_VOCAB_ROWS_MAX = 64


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the rows that will be sampled; the full vocab is gathered on rank 0 only."""

    profile_category = "matmul"  # a matmul, though it shares the embedding's sharding

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        tp: TPGroup,
        switches: KernelSwitches,
        workspace: GemvWorkspace | None,
    ):
        super().__init__(vocab_size, hidden_size, tp=tp)
        self.switches, self.workspace = switches, workspace

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.is_cpu and hidden.shape[0] <= CPU_VOCAB_ROWS_MAX:
            # MKL's sgemm reads the [vocab, hidden] weight 1.4-2.9x faster with the vocabulary as
            # the output's rows at 4-64 rows (a decode step's batch; PERF_NOTES.md, CPU).
            local = torch.mm(self.weight, hidden.t()).t().contiguous()  # the sampler reads rows
        else:
            local = linear(hidden, self.weight, switches=self.switches, workspace=self.workspace)
        logits = self.tp.gather_last_dim(local)
        return None if logits is None else logits[..., : self.vocab_size]
