"""Runs the model on one tensor-parallel rank: owns the weights and this rank's KV cache, turns a
step's work into batch tensors (input ids, positions, attention metadata) and returns the logits
of the rows to sample (on rank 0)."""
from __future__ import annotations

import gc
import logging
from dataclasses import dataclass

import torch

from labkit.config import EngineConfig
from labkit.distributed import TPGroup, build_with
from labkit.layers.attention import ForwardContext, SeqSlice, TorchAttentionBackend, forward_context
from labkit.models.loader import build_model
from labkit.observe.timer import PhaseTimer

log = logging.getLogger("labkit")

CPU_KV_CACHE_DEFAULT_BYTES = 2 << 30


@dataclass
class SeqWork:
    """What one sequence computes in a step (plain data: it is sent to the TP workers)."""
    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool               # the last row's logits pick the next token
    all_logits: bool = False   # every row's logits are wanted (prompt logprobs)


class ModelRunner:
    def __init__(self, config: EngineConfig, rank: int = 0, tp_port: int = 0):
        self.config = config
        self.device = torch.device(config.device if config.device == "cpu" else f"cuda:{rank}")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.tp = TPGroup.create(rank, config.tensor_parallel_size, "127.0.0.1", tp_port,
                                 "nccl" if self.device.type == "cuda" else "gloo")
        torch.manual_seed(config.seed)
        hc = config.hf_config
        with build_with(self.tp):
            self.model = build_model(config.model_dir, hc, config.torch_dtype, self.device,
                                     config.load_format, config.seed)
        self.block_size = config.block_size
        self.num_kv_heads = hc.num_key_value_heads // self.tp.size
        self.num_blocks = self._count_kv_blocks()
        shape = (self.num_blocks * self.block_size, self.num_kv_heads, hc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=config.torch_dtype, device=self.device),
                           torch.zeros(shape, dtype=config.torch_dtype, device=self.device))
                          for _ in range(hc.num_hidden_layers)]
        self.backend = TorchAttentionBackend(self.block_size, self.device)
        self.timer = PhaseTimer(self.device)

    def _bytes_per_block(self) -> int:
        hc = self.config.hf_config
        elem = torch.empty((), dtype=self.config.torch_dtype).element_size()
        return 2 * hc.num_hidden_layers * self.block_size * self.num_kv_heads * hc.head_dim * elem

    def _count_kv_blocks(self) -> int:
        c = self.config
        per_block = self._bytes_per_block()
        if c.num_kv_blocks is not None:
            n = c.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            reserve = 1 << 30  # activations and the sampler's working space
            n = int((total * c.gpu_memory_utilization - (total - free) - reserve) // per_block)
        else:
            budget = c.kv_cache_memory_bytes or CPU_KV_CACHE_DEFAULT_BYTES
            # No more than every sequence at full length could use.
            useful = c.max_num_seqs * -(-c.max_model_len // self.block_size)
            n = min(int(budget // per_block), useful)
        if n < 1:
            raise ValueError("the KV cache has no room for a single block: raise "
                             "gpu_memory_utilization / kv_cache_memory_bytes or num_kv_blocks")
        if self.tp.rank == 0:
            log.info("KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per rank)", n,
                     self.block_size, n * self.block_size, n * per_block / 2**20)
        return n

    @torch.inference_mode()
    def execute(self, work: list[SeqWork]) -> torch.Tensor | None:
        """Forward one step; returns on rank 0 the logits of the wanted rows, in order (all rows
        of an `all_logits` item, else its last row if `sample`); None elsewhere."""
        with self.timer.phase("prepare"):
            ids, pos, seqs, sample_rows, row = [], [], [], [], 0
            for w in work:
                n = len(w.token_ids)
                ids.extend(w.token_ids)
                pos.extend(range(w.start_pos, w.start_pos + n))
                seqs.append(SeqSlice(n, w.start_pos + n, w.block_table))
                if w.all_logits:
                    sample_rows.extend(range(row, row + n))
                elif w.sample:
                    sample_rows.append(row + n - 1)
                row += n
            input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
            positions = torch.tensor(pos, dtype=torch.long, device=self.device)
            meta = self.backend.prepare(seqs)
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        with self.timer.phase("forward"):
            with forward_context(ForwardContext(self.backend, meta, self.kv_caches)):
                hidden = self.model(input_ids, positions)
            logits = self.model.compute_logits(hidden[rows]) if sample_rows else None
        return logits

    def close(self) -> None:
        self.model = self.kv_caches = None
        self.tp.close()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
