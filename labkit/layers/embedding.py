"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocab."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from labkit.distributed import building_tp
from labkit.layers.linear import linear


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp = building_tp()
        self.vocab_size = vocab_size
        self.shard_size = (vocab_size + self.tp.size - 1) // self.tp.size
        self.start = self.tp.rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        shard = loaded[self.start:self.start + self.shard_size]
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

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if hidden.is_cpu and hidden.shape[0] <= CPU_VOCAB_ROWS_MAX:
            # MKL's sgemm reads the [vocab, hidden] weight 1.4-2.9x faster with the vocabulary as
            # the output's rows at 4-64 rows (a decode step's batch; PERF_NOTES.md, CPU).
            local = torch.mm(self.weight, hidden.t()).t().contiguous()  # the sampler reads rows
        else:
            local = linear(hidden, self.weight)
        logits = self.tp.gather_last_dim(local)
        return None if logits is None else logits[..., : self.vocab_size]
