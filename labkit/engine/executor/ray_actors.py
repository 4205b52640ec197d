"""The "ray" backend: ranks 1..N-1 run as Ray actors, each a RankWorker, in a placement group
with one bundle per rank ({"GPU": 1} on CUDA, {"CPU": 1} on the CPU). Bundle 0 is pinned to this
machine and kept for rank 0, which stays in the engine's process (it samples the logits), so the
ranks sit where the cluster has room: on this machine's other cards, or on other nodes.

Ray is imported here only, so `import labkit` never needs it. When no Ray is running in this
process the engine calls `ray.init()`, which joins the cluster of `ray start` (or $RAY_ADDRESS)
when there is one, else starts a local one; either way Ray stays up after the engine closes (for
the next engine; it stops with the process, or at `ray.shutdown()`), as in vLLM. Closing the
engine kills its actors and removes its placement group.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from labkit.engine.executor.base import STARTUP_TIMEOUT_S, RankWorker, WorkerGroup
from labkit.engine.model_runner import RankPlacement
from labkit.engine.resolved_config import ResolvedConfig
from labkit.utils import free_port

try:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
except ImportError as e:
    raise ImportError(
        "distributed_executor_backend='ray' needs Ray: pip install 'labkit[ray]' (or 'ray>=2.40')"
    ) from e

log = logging.getLogger("labkit")

PLACEMENT_TIMEOUT_S = 120  # for a feasible group whose resources other work holds
CLOSE_TIMEOUT_S = 30
ACTOR_NAMESPACE = "labkit"
# The driver's environment that the ranks must share: labkit's kernel switches, and the
# collectives' and Triton's settings. Actors otherwise get the environment of Ray's node.
FORWARDED_ENV_PREFIXES = ("LABKIT_", "NCCL_", "GLOO_", "TRITON_")
# The checkout whose labkit this process imported (labkit/engine/executor/ray_actors.py).
LABKIT_ROOT = Path(__file__).resolve().parents[3]


class RayRank(RankWorker):
    """A RankWorker with what only a Ray actor needs: where Ray placed it, and the CUDA cards
    it may see before it builds its runner."""

    def devices(self) -> tuple[str, list[str]]:
        """(this node's address, the ids of the GPUs Ray assigned to this actor)."""
        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def start_with_devices(
        self, config: ResolvedConfig, placement: RankPlacement, visible: str | None
    ) -> None:
        # Every rank on a node sees all of the engine's cards there (not only its own, as Ray
        # sets it), so that NCCL may use peer-to-peer copies between them.
        if visible is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
        self.start(config, placement)


def actor_env() -> dict[str, str]:
    """The actors' environment variables: PYTHONPATH first names the labkit this process
    imported (a checkout, or site-packages), so that the ranks run the same code."""
    entries = [str(LABKIT_ROOT), *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    path = os.pathsep.join(dict.fromkeys(p for p in entries if p))
    env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    return {**env, "PYTHONPATH": path}


def _ensure_ray() -> None:
    if not ray.is_initialized():
        log.info("starting Ray (or joining the cluster of `ray start`): ray.init()")
        ray.init()


def _reserve(bundles: list[dict[str, float]]):
    """A placement group of `bundles`, ready; a clear error if the cluster can never hold it, or
    not within PLACEMENT_TIMEOUT_S."""
    total = ray.cluster_resources()
    for key in bundles[0]:
        need = sum(b.get(key, 0) for b in bundles)
        if total.get(key, 0) < need:
            raise RuntimeError(
                f"the Ray cluster cannot place {len(bundles)} tensor-parallel ranks: they need "
                f"{need:g} {key!r} and the cluster has {total.get(key, 0):g} (resources: "
                f"{ {k: v for k, v in total.items() if not k.startswith('node:')} })"
            )
    pg = placement_group(bundles, strategy="PACK")
    deadline = time.monotonic() + PLACEMENT_TIMEOUT_S
    while True:
        ready, _ = ray.wait([pg.ready()], timeout=10)
        if ready:
            return pg
        if time.monotonic() > deadline:
            remove_placement_group(pg)
            raise RuntimeError(
                f"the Ray cluster had no room for {bundles} within {PLACEMENT_TIMEOUT_S} s "
                f"(available: {ray.available_resources()}); is another engine holding it?"
            )
        log.warning(
            "waiting for the Ray cluster to free %s (available: %s)",
            bundles,
            ray.available_resources(),
        )


class RayWorkerGroup(WorkerGroup):
    def __init__(self, config: ResolvedConfig):
        _ensure_ray()
        n, self.gpu = config.tensor_parallel_size, config.device == "cuda"
        # Ranks on other nodes reach rank 0's rendezvous at this node's address.
        self.host = ray.util.get_node_ip_address()
        self.port = free_port(self.host)
        unit = {"GPU": 1.0} if self.gpu else {"CPU": 1.0}
        # Rank 0 runs in this process: its bundle must be on this node.
        bundles = [{**unit, f"node:{self.host}": 0.001}] + [dict(unit)] * (n - 1)
        self.pg = _reserve(bundles)
        self.actors: list = []  # every actor (on CUDA, rank 0's card holder first)
        self._ranks: list = []  # the actors of ranks 1..N-1
        self._inflight: list = []
        self._ready: list = []
        self._rank0_cuda: int | None = None
        try:
            self._start(config, n)
        except BaseException:
            self.shutdown()
            raise

    def _actor(self, bundle: int):
        options = {"num_gpus": 1, "num_cpus": 0} if self.gpu else {"num_cpus": 1}
        # Named, so that the cluster's tools (`ray list actors`, the dashboard) tell whose
        # actors they are: labkit-<placement group id>-<bundle>.
        return (
            ray.remote(RayRank)
            .options(
                **options,
                runtime_env={"env_vars": actor_env()},
                name=f"labkit-{self.pg.id.hex()[:12]}-{bundle}",
                namespace=ACTOR_NAMESPACE,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=bundle
                ),
            )
            .remote()
        )

    def _start(self, config: ResolvedConfig, n: int) -> None:
        # On CUDA an idle actor holds rank 0's card (bundle 0) so that Ray says which it is.
        self.actors = [self._actor(bundle) for bundle in range(0 if self.gpu else 1, n)]
        ranks = self.actors[1:] if self.gpu else self.actors
        cards: list[tuple[int | None, str | None]] = [(None, None)] * n
        if self.gpu:
            devices = ray.get([a.devices.remote() for a in self.actors], timeout=STARTUP_TIMEOUT_S)
            cards = _card_layout(devices)
            self._rank0_cuda = _local_index(
                devices[0][1][0], os.environ.get("CUDA_VISIBLE_DEVICES")
            )
        self._ranks = ranks
        self._ready = [
            a.start_with_devices.remote(
                config,
                RankPlacement(rank, self.host, self.port, cards[rank][0], custom_all_reduce=False),
                cards[rank][1],
            )
            for rank, a in enumerate(ranks, start=1)
        ]

    def rank0_placement(self) -> RankPlacement:
        # The peer all-reduce assumes cards 0..N-1 of one process's view: NCCL only here.
        return RankPlacement(0, self.host, self.port, self._rank0_cuda, custom_all_reduce=False)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        for rank, ref in enumerate(self._ready, start=1):
            try:
                ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(
                    f"tensor-parallel worker {rank} (a Ray actor) did not start "
                    f"within {STARTUP_TIMEOUT_S} s"
                ) from None
            except ray.exceptions.RayError as e:
                raise RuntimeError(
                    f"tensor-parallel worker {rank} (a Ray actor) failed to start:\n{e}"
                ) from None

    def call(self, method: str, *args) -> None:
        # A sync actor runs one caller's calls in order; the results are only checked for
        # errors, without waiting (the collectives inside the call synchronise the ranks).
        if self._inflight:
            done, self._inflight = ray.wait(
                self._inflight, num_returns=len(self._inflight), timeout=0
            )
            try:
                ray.get(done)
            except ray.exceptions.RayError as e:
                raise RuntimeError(f"a tensor-parallel worker (a Ray actor) failed:\n{e}") from None
        self._inflight += [a.call.remote(method, args) for a in self._ranks]

    def shutdown(self) -> None:
        if self.pg is None:
            return
        if not ray.is_initialized():
            # Ray was shut down first (ray.shutdown(), the interpreter's exit): a local
            # instance took the actors with it, a cluster ends a driver's actors and groups
            # when the driver disconnects. A call now would start a new Ray instead.
            self.actors, self._ranks, self._inflight, self._ready, self.pg = [], [], [], [], None
            return
        closing = [a.close.remote() for a in self._ranks]
        try:
            ray.get(closing, timeout=CLOSE_TIMEOUT_S)
        except ray.exceptions.RayError as e:  # dead or stuck: killed below all the same
            log.warning("a tensor-parallel worker did not close cleanly: %s", e)
        for a in self.actors:
            ray.kill(a)
        remove_placement_group(self.pg)
        self.actors, self._ranks, self._inflight, self._ready, self.pg = [], [], [], [], None


def _card_layout(devices: list[tuple[str, list[str]]]) -> list[tuple[int, str]]:
    """Per rank (bundle order, rank 0 first): (its CUDA index, CUDA_VISIBLE_DEVICES) where each
    rank sees every card the engine holds on its node, in Ray's id order."""
    per_node: dict[str, list[str]] = {}
    for node, ids in devices:
        per_node.setdefault(node, []).extend(ids)
    # Numeric ids by value ("10" after "9"), as (length, text) orders them.
    order = {node: sorted(set(ids), key=lambda i: (len(i), i)) for node, ids in per_node.items()}
    return [(order[node].index(ids[0]), ",".join(order[node])) for node, ids in devices]


def _local_index(ray_gpu_id: str, visible: str | None) -> int:
    """Rank 0's card as this process numbers it, given its CUDA_VISIBLE_DEVICES: Ray's GPU ids
    are the entries of its node's CUDA_VISIBLE_DEVICES (plain indices when unset), and this
    process may see only some."""
    if visible is None:
        return int(ray_gpu_id)
    entries = [v.strip() for v in visible.split(",")]
    if ray_gpu_id not in entries:
        raise RuntimeError(
            f"Ray gave rank 0 GPU {ray_gpu_id}, which this process cannot see "
            f"(CUDA_VISIBLE_DEVICES={visible})"
        )
    return entries.index(ray_gpu_id)
