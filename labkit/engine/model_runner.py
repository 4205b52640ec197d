"""Runs the model on one tensor-parallel rank: owns the weights and this rank's KV cache, turns a
step's work into batch tensors (input ids, positions, attention metadata) and returns the logits
of the rows to sample (on rank 0).

Start-up is a sequence of named steps (ModelRunner.__init__ lists them in order): device, kernel
switches, TP group, model, attention backend, activation profile, KV cache size and allocation,
CUDA graphs."""

from __future__ import annotations

import gc
import logging
import math
import mmap
import os
import time
from dataclasses import dataclass

import torch

from labkit.distributed import TPGroup
from labkit.engine.cuda_graphs import DecodeGraphs
from labkit.engine.resolved_config import ResolvedConfig
from labkit.layers.attention import AttentionBackend, AttentionInputs, SeqSlice
from labkit.layers.attention.torch_backend import TorchAttentionBackend
from labkit.layers.switches import KernelSwitches
from labkit.models.loader import build_model
from labkit.models.model_parts import ModelParts
from labkit.observe.timer import PhaseTimer
from labkit.transfer import to_device

log = logging.getLogger("labkit")

CPU_KV_CACHE_DEFAULT_BYTES = 2 << 30
MAX_GRAPH_BATCH = 512


@dataclass
class SeqWork:
    """What one sequence computes in a step (plain data: it is sent to the TP workers)."""

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    sample: bool  # the last row's logits pick the next token
    all_logits: bool = False  # every row's logits are wanted (prompt logprobs)
    # Async scheduling: the last token was sampled last step and is still on the device; it is
    # row `pending_row` of that step's sampled ids (`token_ids` holds a 0 in its place).
    pending_row: int = -1


@dataclass(frozen=True)
class RankPlacement:
    """Where one tensor-parallel rank runs and how it meets the others (plain data: it is sent
    to the TP workers)."""

    rank: int = 0
    host: str = "127.0.0.1"  # the TP group's rendezvous: rank 0's address ...
    port: int = 0  # ... and port (unused for a single rank)
    cuda_index: int | None = None  # this rank's CUDA card; None: card `rank`
    custom_all_reduce: bool = True  # may use the NVLink peer all-reduce (same-host cards 0..N-1)


class ModelRunner:
    def __init__(self, config: ResolvedConfig, placement: RankPlacement = RankPlacement()):
        self.config = config
        self.placement = placement
        self.rank = placement.rank
        self._init_device()
        self._init_kernel_switches()
        self._init_tp_group()
        self._load_model()
        self._init_attention_backend()
        activation_bytes = self._profile_activation_memory()
        self.num_blocks = self._count_kv_blocks(activation_bytes)
        self._kv_map: mmap.mmap | None = None  # the CPU cache's memory (see _allocate_kv_cache)
        self.kv_caches = self._allocate_kv_cache(self.num_blocks)
        self.graphs = self._capture_cuda_graphs()

    def _init_device(self) -> None:
        """This rank's device (CUDA card `rank`, or the CPU), its phase timer, and on a CPU
        shared by several ranks this process's share of the cores."""
        c = self.config
        index = self.placement.cuda_index
        self.device = torch.device(
            c.device if c.device == "cpu" else f"cuda:{self.rank if index is None else index}"
        )
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self._prev_threads = torch.get_num_threads()
        if self.device.type == "cpu" and c.tensor_parallel_size > 1:
            # The ranks share the machine's cores: more threads than cores stalls OpenMP.
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // c.tensor_parallel_size))
        self.timer = PhaseTimer(self.device)

    def _init_kernel_switches(self) -> None:
        """Read the kernel switches (LABKIT_GEMV, LABKIT_PDL) once, for this engine, and on CUDA
        create the gemv kernel's split-K workspace that this engine's layers share."""
        self.switches = KernelSwitches.from_env(self.device)
        self.gemv_workspace = None
        if self.device.type == "cuda":
            from labkit.kernels.gemv import GemvWorkspace

            self.gemv_workspace = GemvWorkspace(self.device)

    def _init_tp_group(self) -> None:
        """This rank's tensor-parallel group (a single rank when TP is 1); ranks meet at the
        placement's host and port."""
        c, p = self.config, self.placement
        self.tp = TPGroup.create(
            self.rank,
            c.tensor_parallel_size,
            p.host,
            p.port,
            self.device,
            p.custom_all_reduce and not c.disable_custom_all_reduce,
            self.switches.pdl,
        )

    def _load_model(self) -> None:
        """Build the model with this engine's group, switches and workspace, and load it."""
        c = self.config
        torch.manual_seed(c.seed)
        parts = ModelParts(self.tp, self.switches, self.gemv_workspace, c.quant_scheme)
        self.model = build_model(
            c.model_dir, c.model_config, c.dtype, self.device, c.load_format, parts, c.seed
        )
        if c.quant_scheme is not None and self.tp.rank == 0:
            log.info(c.quant_scheme.describe())

    def _init_attention_backend(self) -> None:
        """The one attention seam: Triton kernels on CUDA, the torch reference elsewhere."""
        self.block_size = self.config.block_size
        self.num_kv_heads = self.config.model_config.num_key_value_heads // self.tp.size
        self.backend: AttentionBackend
        if self.device.type == "cuda":
            from labkit.layers.attention.triton_backend import TritonAttentionBackend

            self.backend = TritonAttentionBackend(self.block_size, self.device, self.switches)
        else:
            self.backend = TorchAttentionBackend(self.block_size, self.device)

    def _allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A zeroed (K, V) pair per layer, each [num_blocks * block_size, kv heads, head dim].

        On the CPU the cache is one anonymous memory map: the OS hands it out as zeros and
        commits a page only when it is first written, so a 2 GiB cache costs the memory of the
        blocks in use, not 2 GiB up front (torch.zeros would write every page)."""
        c = self.config
        shape = (num_blocks * self.block_size, self.num_kv_heads, c.model_config.head_dim)
        layers = c.model_config.num_hidden_layers
        if self.device.type != "cpu":
            return [
                (
                    torch.zeros(shape, dtype=c.kv_dtype, device=self.device),
                    torch.zeros(shape, dtype=c.kv_dtype, device=self.device),
                )
                for _ in range(layers)
            ]
        per_cache = math.prod(shape)
        self._kv_map = mmap.mmap(-1, 2 * layers * per_cache * c.kv_dtype.itemsize)
        flat = torch.frombuffer(self._kv_map, dtype=c.kv_dtype)
        caches = flat.view(layers, 2, *shape)
        return [(caches[i, 0], caches[i, 1]) for i in range(layers)]

    def _profile_activation_memory(self) -> int:
        """On CUDA, the memory a full-budget prefill needs beyond the weights, measured by running
        one (random tokens, a throwaway KV cache just large enough), as vLLM profiles before
        sizing; 0 elsewhere (the CPU's KV cache has a byte budget of its own)."""
        if self.device.type != "cuda":
            return 0
        c = self.config
        tokens = min(c.max_num_batched_tokens, c.max_model_len)
        blocks = -(-tokens // self.block_size)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        kv = self._allocate_kv_cache(blocks)
        kv_bytes = torch.cuda.memory_allocated(self.device) - base
        ids = torch.randint(0, c.model_config.vocab_size, (tokens,), device=self.device)
        meta = self.backend.prepare([SeqSlice(tokens, tokens, list(range(blocks)))])
        with torch.inference_mode():
            hidden = self.model(
                ids,
                torch.arange(tokens, device=self.device),
                AttentionInputs(self.backend, meta, kv),
            )
            self.model.compute_logits(hidden[-1:])
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(self.device) - base - kv_bytes
        del kv, hidden
        torch.cuda.empty_cache()
        return peak

    def _bytes_per_block(self) -> int:
        hc = self.config.model_config
        elem = self.config.kv_dtype.itemsize
        return 2 * hc.num_hidden_layers * self.block_size * self.num_kv_heads * hc.head_dim * elem

    def _count_kv_blocks(self, activation_bytes: int) -> int:
        """How many KV blocks this rank holds: `num_kv_blocks` if given; on CUDA what
        gpu_memory_utilization leaves after the weights, `activation_bytes` and a reserve; on
        the CPU the byte budget, capped at what every sequence at full length could use."""
        c = self.config
        per_block = self._bytes_per_block()
        if c.num_kv_blocks is not None:
            n = c.num_kv_blocks
        elif self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            # What the profiled prefill needed, plus room for CUDA graphs and the sampler.
            reserve = activation_bytes + (512 << 20)
            n = int((total * c.gpu_memory_utilization - (total - free) - reserve) // per_block)
        else:
            budget = c.kv_cache_memory_bytes or CPU_KV_CACHE_DEFAULT_BYTES
            # No more than every sequence at full length could use.
            useful = c.max_num_seqs * -(-c.max_model_len // self.block_size)
            n = min(int(budget // per_block), useful)
        if n < 1:
            raise ValueError(
                "the KV cache has no room for a single block: raise "
                "gpu_memory_utilization / kv_cache_memory_bytes or num_kv_blocks"
            )
        if self.tp.rank == 0:
            log.info(
                "KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB per rank, %s)",
                n,
                self.block_size,
                n * self.block_size,
                n * per_block / 2**20,
                str(c.kv_dtype).removeprefix("torch."),
            )
        return n

    def _capture_cuda_graphs(self) -> DecodeGraphs | None:
        """Decode graphs over the batch ladder, on CUDA unless `enforce_eager`."""
        c = self.config
        if self.device.type != "cuda" or c.enforce_eager:
            return None
        start = time.perf_counter()
        graphs = DecodeGraphs(
            self.model,
            self.backend,
            self.kv_caches,
            min(c.max_num_seqs, MAX_GRAPH_BATCH),
            -(-c.max_model_len // self.block_size),
            self.device,
        )
        log.info(
            "captured CUDA graphs for decode batch sizes %s in %.1f s",
            graphs.sizes,
            time.perf_counter() - start,
        )
        return graphs

    @torch.inference_mode()
    def execute(
        self, work: list[SeqWork], sampled: torch.Tensor | None = None
    ) -> torch.Tensor | None:
        """Forward one step; returns on rank 0 the logits of the wanted rows, in order (all rows
        of an `all_logits` item, else its last row if `sample`); None elsewhere. `sampled`
        (rank 0): the previous step's sampled ids, where `pending_row`s point."""
        with self.timer.phase("prepare"):
            ids, pos, seqs, sample_rows, row = [], [], [], [], 0
            pending_dst, pending_src = [], []
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
                if w.pending_row >= 0:
                    pending_dst.append(row - 1)
                    pending_src.append(w.pending_row)
            pending = (
                self._pending_inputs(pending_dst, pending_src, sampled) if pending_dst else None
            )
            rows = to_device(sample_rows, torch.long, self.device)
            graphed = self.graphs is not None and self.graphs.can_run(seqs)
            if not graphed:
                input_ids = to_device(ids, torch.long, self.device)
                positions = to_device(pos, torch.long, self.device)
                if pending is not None:
                    input_ids[pending[0]] = pending[1]
                meta = self.backend.prepare(seqs)
        with self.timer.phase("forward"):
            if graphed:
                hidden = self.graphs.run(ids, pos, seqs, pending)
            else:
                hidden = self.model(
                    input_ids, positions, AttentionInputs(self.backend, meta, self.kv_caches)
                )
            logits = self.model.compute_logits(hidden[rows]) if sample_rows else None
        return logits

    def _pending_inputs(self, dst: list[int], src: list[int], sampled: torch.Tensor | None):
        """(rows, ids) of the input tokens still on the device: rank 0 picks them from its
        sampler's output and broadcasts them, so every rank feeds the same ids."""
        if self.tp.rank == 0:
            vals = sampled[to_device(src, torch.long, self.device)]
        else:
            vals = torch.empty(len(src), dtype=torch.long, device=self.device)
        return to_device(dst, torch.long, self.device), self.tp.broadcast(vals)

    def close(self) -> None:
        self.model = self.kv_caches = self.graphs = None
        self._kv_map = None  # unmapped once the last view of it is gone
        if self.gemv_workspace is not None:  # after the graphs that point into it
            self.gemv_workspace.close()
        self.tp.close()
        torch.set_num_threads(self._prev_threads)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
