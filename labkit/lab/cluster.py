"""labkit.sweep(..., cluster=...): a sweep's engines on a Ray cluster, side by side.

Each engine group (labkit.lab.points.EngineGroup: the model, a TP size, the engine arguments)
runs in a Ray actor of its own, a GroupWorker that reserves the group's `tensor_parallel_size`
GPUs (CPUs where the cluster has no GPU) on one node: the engine's ranks are the actor's child
processes (the "mp" backend), so they share its node. Ray starts the workers as the cluster has
room, so groups run side by side. A worker builds its group again where it runs: the ceilings
(labkit.lab.roofline) are that node's, measured and cached there, and each row names its node
and device. The model must be readable under the same path (or hub name) on every node.

The driver hands each worker one point at a time and keeps each record as it comes back
(SweepRun.keep: the DataFrame, the sweep's file, the live chart, the status line, on_point). A
point that fails (an error such as running out of memory, its worker's process dying, its node
lost) runs once more on a fresh worker, wherever Ray places it; failing again it becomes a row
with its `error`, and the sweep goes on. `stop()` starts no further point and keeps the running
ones; an interrupt (Ctrl-C, the notebook's stop button) and the sweep's end kill every worker
(their rank processes exit with them, as their pipe closes). Ray itself stays up, as for the
"ray" executor backend: it stops with this process, or at `ray.shutdown()`.

Ray is imported here only, when a sweep asks for a cluster.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections import deque
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields

from labkit.lab import machine
from labkit.lab.points import EngineGroup, Point, PointRecord, derive, failed_record, run_point
from labkit.lab.sweep_run import SweepRun, beats_ceilings

log = logging.getLogger("labkit.lab")

ATTEMPTS = 2  # a point's first run and its one retry
POLL_S = 0.2  # how often the driver checks stop() while points run
ERROR_CHARS = 1000  # an error row keeps this much of the error


@dataclass
class Finished:
    """A measured point as a worker sends it back."""

    record: PointRecord
    ceilings: dict  # its node's device ceilings (roofline.Ceilings, as a dict)
    # Rows of the worker's earlier points, derived again under ceilings measured again.
    rederived: dict[Point, dict] = field(default_factory=dict)


class GroupWorker:
    """One engine group on one node (a Ray actor): `start` builds the group there (its config
    and this node's ceilings), the first `run` loads the engine, `close` frees it."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.group: EngineGroup | None = None
        self.engine = ExitStack()
        self.llm, self.loaded = None, False
        self.ran: list[tuple[Point, dict]] = []
        self.remeasured = False

    def start(self) -> dict:
        """This worker's process id and where it runs (machine.WHERE_COLUMNS)."""
        self.group = EngineGroup(**self.spec)
        return {"pid": os.getpid(), **machine.where(self.group.device)}

    def run(self, point: Point, profile_dir: str | None) -> Finished:
        if not self.loaded:
            self.llm = self.engine.enter_context(self.group.engine())
            self.loaded = True
        rec = run_point(self.group, self.llm, point, profile_dir=profile_dir)
        rederived = {}
        if beats_ceilings(rec.row) and not self.remeasured:
            # As in a local sweep (SweepRun.remeasure_if_beaten), on this node's figures.
            self.group.remeasure_ceilings()
            self.remeasured = True
            rec.row = derive(self.group, point, rec.raw)
            rederived = {p: derive(self.group, p, raw) for p, raw in self.ran}
        self.ran.append((point, rec.raw))
        return Finished(rec, asdict(self.group.device_ceilings), rederived)

    def close(self) -> None:
        self.engine.close()


def connect(address: str):
    """The `ray` module, connected: to the Ray this process already uses, else a new local
    instance ("local": every GPU of this machine, every CPU without) or the cluster at
    `address` ("auto": the one `ray start` runs here)."""
    if not isinstance(address, str) or not address:
        raise ValueError(
            f"cluster={address!r} is invalid: None, 'local', 'auto' or a Ray "
            "address such as 'ray://host:10001'"
        )
    try:
        import ray
    except ImportError as e:
        raise ImportError("labkit.sweep(cluster=...) needs Ray: pip install 'labkit[ray]'") from e
    if ray.is_initialized():
        log.info("sweep on the Ray cluster this process is connected to")
    elif address == "local" and threading.current_thread() is not threading.main_thread():
        # Ray's local processes get SIGKILL when the thread that started them ends (Linux's
        # parent-death signal): started from a sweep's thread, Ray would die with the sweep.
        raise RuntimeError(
            "cluster='local' from a thread: a Ray started here would stop when "
            "the thread ends. Call labkit.lab.cluster.connect('local') (or "
            "ray.init()) on the main thread first, or join a `ray start` "
            "cluster with cluster='auto'"
        )
    else:
        log.info("sweep on Ray: ray.init(address=%r)", address)
        ray.init(address=address)
    return ray


@dataclass
class _Group:
    """The driver's view of one engine group: its points to run and its worker."""

    group: EngineGroup
    todo: deque[Point]
    actor: object | None = None
    where: dict = field(default_factory=dict)
    starting: object | None = None  # the ref of the worker's start()
    running: tuple[Point, object] | None = None  # the point in flight and its ref
    failures: dict[Point, int] = field(default_factory=dict)
    workers: int = 0  # started so far (their names count them)


def run(sweep: SweepRun, todo: list[Point], address: str) -> None:
    """Run `todo` on the cluster at `address`, each record kept by `sweep` as it arrives."""
    _Cluster(sweep, connect(address), address).run(todo)


class _Cluster:
    def __init__(self, sweep: SweepRun, ray, address: str):
        from labkit.engine.executor.ray_actors import ACTOR_NAMESPACE, actor_env

        self.sweep, self.ray = sweep, ray
        self.namespace, self.env = ACTOR_NAMESPACE, actor_env()
        self.token = uuid.uuid4().hex[:8]
        self.worker = ray.remote(GroupWorker)
        self.gpu = ray.cluster_resources().get("GPU", 0) > 0
        self.nodes: dict[str, dict] = {}
        self.groups: list[_Group] = []
        sweep.result.meta["cluster"] = {"address": address, "nodes": self.nodes}
        self.profile_dir = None if sweep.profile_dir is None else str(sweep.profile_dir)

    def run(self, todo: list[Point]) -> None:
        groups = [
            _Group(g, deque(p for p in todo if p.tensor_parallel_size == tp))
            for tp, g in self.sweep.groups.items()
        ]
        self.groups = groups = [g for g in groups if g.todo]
        try:
            while True:
                stopping = self.sweep.should_stop()
                for g in groups:
                    self._advance(g, stopping)
                waiting = {
                    ref: g
                    for g in groups
                    for ref in (g.starting, g.running and g.running[1])
                    if ref
                }
                if not waiting:
                    return
                ready, _ = self.ray.wait(list(waiting), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    self._arrived(waiting[ref], ref)
        finally:
            for g in groups:
                self._retire(g)

    def _advance(self, g: _Group, stopping: bool) -> None:
        """Start what the group can: a worker, or its next point on an idle worker."""
        if g.running or g.starting:
            return
        if stopping or not g.todo:
            self._retire(g)
        elif g.actor is None:
            self._launch(g)
        else:
            point = g.todo.popleft()
            g.running = (point, g.actor.run.remote(point, self.profile_dir))
            here = [f"{x.running[0]} on {x.where.get('node')}" for x in self.groups if x.running]
            self.sweep.starting(point, "running " + "; ".join(here))

    def _launch(self, g: _Group) -> None:
        tp = g.group.tp
        gpu = self.gpu and g.group.engine_args.get("device") != "cpu"
        unit = "GPU" if gpu else "CPU"
        if not self._fits(unit, tp):
            why = (
                f"no node of the Ray cluster has {tp} {unit}s for tensor_parallel_size={tp} "
                "(a group's ranks share a node)"
            )
            log.warning("%s: its %d points are rows with that error", why, len(g.todo))
            while g.todo:
                self._keep_failed(g, g.todo.popleft(), why, {})
            return
        options = {"num_gpus": tp, "num_cpus": 1} if gpu else {"num_cpus": tp}
        g.workers += 1
        spec = {f.name: getattr(g.group, f.name) for f in fields(g.group) if f.init}
        g.actor = self.worker.options(
            **options,
            runtime_env={"env_vars": self.env},
            namespace=self.namespace,
            # Named, so the cluster's tools (`ray list actors`) say whose they are.
            name=f"labkit-sweep-{self.token}-tp{tp}-{g.workers}",
        ).remote(spec)
        g.starting = g.actor.start.remote()

    def _fits(self, unit: str, n: int) -> bool:
        return any(
            node["Alive"] and node["Resources"].get(unit, 0) >= n for node in self.ray.nodes()
        )

    def _arrived(self, g: _Group, ref) -> None:
        starting = ref is g.starting
        point = g.todo[0] if starting else g.running[0]
        if starting:
            g.starting = None
        else:
            g.running = None
        try:
            out = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self._failed(g, point, e, requeue=not starting)
            return
        if starting:
            g.where = out
        else:
            self._keep(g, out)

    def _keep(self, g: _Group, done: Finished) -> None:
        rec, meta = done.record, self.sweep.result.meta
        node = rec.row.get("node")
        if node not in self.nodes:
            self.nodes[node] = {"device": rec.row.get("device"), "ceilings": done.ceilings}
        if not meta.get("cluster_ceilings"):
            # The charts' ceilings: the first node's to finish a point (each node's are in
            # meta["cluster"]["nodes"]).
            meta["ceilings"], meta["cluster_ceilings"] = done.ceilings, True
        if done.rederived:
            self.nodes[node]["ceilings"] = done.ceilings
            meta["ceilings_remeasured"] = True
            for other in self.sweep.result.records:
                p = Point.of_row(other.row)
                if other.raw and p in done.rederived and other.row.get("node") == node:
                    other.row = done.rederived[p]
            self.sweep.rows_changed()
        self.sweep.keep(rec)

    def _failed(self, g: _Group, point: Point, e: Exception, *, requeue: bool) -> None:
        """A point's run (or its worker's start) failed: its worker goes; the point runs again
        on a fresh one, or after its last attempt becomes a row with the error."""
        where = g.where
        self._retire(g)
        g.failures[point] = g.failures.get(point, 0) + 1
        error = _describe(e)
        if g.failures[point] < ATTEMPTS:
            log.warning(
                "point %s failed on %s (%s); running it again on a fresh worker",
                point,
                where.get("node", "a worker"),
                error,
            )
            if requeue:
                g.todo.appendleft(point)
            return
        log.warning(
            "point %s failed %d times; kept as a row with its error: %s", point, ATTEMPTS, error
        )
        if not requeue:
            g.todo.popleft()
        self._keep_failed(g, point, error, where)

    def _keep_failed(self, g: _Group, point: Point, error: str, where: dict) -> None:
        where = {k: where.get(k, "") for k in machine.WHERE_COLUMNS}
        self.sweep.keep(failed_record(g.group, point, error[:ERROR_CHARS], where))

    def _retire(self, g: _Group) -> None:
        """Kill the group's worker (its engine's ranks exit with it), forgetting its calls."""
        if g.actor is not None:
            try:
                self.ray.kill(g.actor, no_restart=True)
            except Exception as e:  # already gone (its node lost): nothing left to free
                log.debug("killing a sweep worker: %s", e)
        g.actor, g.starting, g.running, g.where = None, None, None, {}


def _describe(e: Exception) -> str:
    """An error as a row says it: the point's own exception, or what happened to its worker."""
    cause = getattr(e, "cause", None)  # a RayTaskError's: the exception the point raised
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"
