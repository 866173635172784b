"""Running a pipeline artifact: one program per stage, each on the ranks of its submesh, microbatches flowing through.

A pipeline artifact (``manifest["pipeline"]``, format 3, or 2 from an older bmc; made by ``bmc compile --stages S
[--microbatches K]``) holds one program per stage. Each stage is loaded as an ordinary artifact of its own
(:func:`stage_manifest`: its program, submesh, signature and its ranks' weights), so everything a single program
has — verification, packed weights, collectives, simulation — works per stage unchanged.

The schedule is GPipe's, forward only: the inputs' first dim is split into K microbatches; the ranks of stage s run
microbatch k as soon as it arrives from stage s - 1 and send on what later stages need, so stage s works on
microbatch k while stage s + 1 works on k - 1. A send completes before the stage starts its next microbatch (MPI
need not move a large message while neither rank is inside an MPI call; the next stage is normally waiting for it
already, so this costs the copy). Rank i of a stage receives from rank i of the previous stage
(every stage ends with replicated results, so any of its ranks holds all of them). A stage's ranks get only the
graph inputs its program reads: rank 0 (which holds them) sends them to the stage's first rank, which broadcasts
them inside its stage. At the end the first rank of each stage that makes graph outputs (the values
``pipeline.outputs`` names) broadcasts them, stacked along the first dim, to every rank (rank 0 those that are
graph inputs returned as they are): outputs made early do not travel the chain. (Format 2 artifacts, made before
this, also send their early outputs along the chain; this runtime takes them from the stage that made them too.)

* **under MPI** every rank loads only its stage (its program, its weights) on a communicator of the stage's ranks;
  a load failure on any rank is the same error on every rank; a failure during a run aborts the job (as for a single
  program: the other ranks wait in collectives or receives). Sends and receives use the collective watchdog.
* **simulated** (``simulate=True``) every stage runs in this process, one after the other per microbatch, each with
  its own simulated ranks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bmc.errors import ArtifactError, BmcError
from bmc.runtime.executor import Model


def stage_manifest(manifest: dict, index: int) -> dict:
    """Stage ``index`` of a pipeline artifact as the manifest of an ordinary artifact (its ranks renumbered from 0)."""
    st = manifest["pipeline"]["stages"][index]
    ranks = st["ranks"]
    view = {k: v for k, v in manifest.items() if k not in ("pipeline", "kernels", "implicit_inputs")}
    view.update(signature=st["signature"], mesh=st["mesh"], world_size=len(ranks),
                rank_map=[list(c) for c in np.ndindex(*st["mesh"]["shape"])],
                programs={"main": manifest["programs"][st["program"]]},
                weights={str(local): manifest["weights"][str(rank)] for local, rank in enumerate(ranks)})
    view.update({k: st[k] for k in ("kernels", "implicit_inputs") if k in st})
    return view


def _check(manifest: dict, where: str) -> None:
    """The pipeline section is consistent (its stages cover the ranks in order, each names its program)."""
    pipe = manifest["pipeline"]
    try:
        stages = pipe["stages"]
        ranks = [r for st in stages for r in st["ranks"]]
        ok = (isinstance(pipe.get("microbatches"), int) and pipe["microbatches"] >= 1 and len(stages) >= 1
              and len(pipe["outputs"]) == len(manifest["signature"]["outputs"])
              and ranks == list(range(manifest["world_size"]))
              and len({len(st["ranks"]) for st in stages}) == 1
              and all(st["program"] in manifest["programs"] and int(np.prod(st["mesh"]["shape"])) == len(st["ranks"])
                      for st in stages))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ArtifactError("manifest.json has a malformed pipeline section", where=where,
                            fix="the artifact is damaged; recompile the model")


class PipelineModel(Model):
    """A loaded pipeline artifact; called like :class:`bmc.runtime.executor.Model` (its stages exchange host arrays:
    inputs on a device are copied to the host, outputs are numpy arrays)."""

    _device_outputs = False

    def __init__(self, path: Path, manifest: dict, stages: list[Model], device, *, mpi=None, stage: int = 0,
                 stats: dict | None = None):
        super().__init__(path, manifest, [], device, mpi=mpi, stats=stats)
        self.stages = stages  # every stage in process; under MPI, this rank's only
        self._stage = stage  # under MPI: this rank's stage
        pipe = manifest["pipeline"]
        self.microbatches = pipe["microbatches"]
        self._entries = pipe["stages"]
        self._made = pipe["outputs"]  # the values the outputs are, in signature order (their names may differ)
        made = {o["name"]: o for st in self._entries for o in st["signature"]["outputs"]}
        # per stage: (name, dtype, shape) of what it receives from the stage before it
        self._received = [[], *([(n, made[n]["dtype"], made[n]["shape"]) for n in st["sends"]]
                                for st in self._entries[:-1])]
        # per stage: the graph inputs its program reads
        self._reads = [[i["name"] for i in self._all_inputs
                        if i["name"] in {j["name"] for j in st["signature"]["inputs"]}] for st in self._entries]
        # where each output comes from at the end: (world rank, value names, stage or None: graph inputs on rank 0)
        inputs = {i["name"] for i in self._all_inputs}
        maker = {}
        for s, st in enumerate(self._entries):
            for o in st["signature"]["outputs"]:
                maker.setdefault(o["name"], s)
        by_source: dict = {}
        for n in dict.fromkeys(self._made):
            by_source.setdefault(None if n in inputs else maker[n], []).append(n)
        self._sources = [(0 if s is None else self._entries[s]["ranks"][0], names, s)
                         for s, names in sorted(by_source.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]

    def _microbatches(self, given: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
        k = self.microbatches
        return [{n: a[i * (len(a) // k):(i + 1) * (len(a) // k)] if k > 1 else a for n, a in given.items()}
                for i in range(k)]

    def _stacked(self, parts: list[list[np.ndarray]]) -> list[np.ndarray]:
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in zip(*parts)]

    def _run_stage(self, model: Model, env: dict[str, Any]) -> None:
        env.update(model.run({n: env[n] for n in model.input_names}))

    def _execute_locked(self, inputs: dict[str, Any], outputs: str = "auto") -> list[np.ndarray]:
        if self.mpi is not None:
            return self._execute_mpi(inputs)
        given = dict(zip(self.input_names, self._check_inputs(inputs)))
        parts = []
        for env in self._microbatches(given):
            for model in self.stages:
                self._run_stage(model, env)
            parts.append([env[n] for n in self._made])
        return self._stacked(parts)

    def _distributed(self, arrays: dict | None, error: BaseException | None) -> dict[str, np.ndarray]:
        """Rank 0's checked inputs, each stage getting those its program reads (rank 0 keeps them all); rank 0's
        error is raised on every rank."""
        ctx, s = self.mpi, self._stage
        ctx.agree(error)
        first = self._entries[s]["ranks"][0]
        spec = {i["name"]: i for i in self._all_inputs}
        held = None
        if ctx.rank == 0:
            for t, st in enumerate(self._entries):
                if t != s and self._reads[t]:
                    ctx.send_arrays(st["ranks"][0], [arrays[n] for n in self._reads[t]],
                                    what=f"sending stage {t} its inputs")
            held = arrays
        elif ctx.rank == first and self._reads[s]:
            held = ctx.recv_arrays(0, [(n, spec[n]["dtype"], spec[n]["shape"]) for n in self._reads[s]])
        stage = self.stages[0].mpi
        mine = stage.bcast_arrays({n: held[n] for n in self._reads[s]} if stage.rank == 0 else None, None,
                                  what="input") if self._reads[s] else {}
        return arrays if ctx.rank == 0 else mine

    def _execute_mpi(self, inputs: dict[str, Any], outputs: str = "auto") -> list[np.ndarray]:
        ctx = self.mpi
        given = self._agreed_inputs(inputs)
        self.stats["input_bytes"] = sum(a.nbytes for a in given.values())
        s, last = self._stage, len(self._entries) - 1
        local = self._entries[s]["ranks"].index(ctx.rank)
        model = self.stages[0]
        mine = next((names for _, names, t in self._sources if t == s), [])  # the graph outputs this stage makes
        parts = []
        try:
            for env in self._microbatches(given):
                if s > 0:
                    env.update(ctx.recv_arrays(self._entries[s - 1]["ranks"][local], self._received[s]))
                self._run_stage(model, env)
                if s < last:
                    ctx.send_arrays(self._entries[s + 1]["ranks"][local], [env[n] for n in self._entries[s]["sends"]],
                                    what=f"stage {s} sending to stage {s + 1}")
                parts.append([env[n] for n in mine])
        except BmcError as e:
            self._abort(e)
        got = {}
        for root, names, t in self._sources:  # each stage's outputs from its first rank, in stage order
            held = None
            if ctx.rank == root:
                held = {n: given[n] for n in names} if t is None else dict(zip(names, self._stacked(parts)))
            got.update(ctx.bcast_arrays(held, None, root=root, what="output"))
        return [got[n] for n in self._made]


def load_pipeline(path: Path, manifest: dict, ctx, *, device: str, threads: int | None,
                  collectives: str | None) -> PipelineModel:
    """Load a pipeline artifact: every stage in this process (``ctx`` None: simulated), or this rank's stage."""
    from bmc.runtime import executor

    _check(manifest, str(path))
    n = len(manifest["pipeline"]["stages"])
    if ctx is None:
        stages = [executor._load_local(path, stage_manifest(manifest, i), device=device, threads=threads)
                  for i in range(n)]
        return PipelineModel(path, manifest, stages, stages[0]._device)
    mine = next(i for i, st in enumerate(manifest["pipeline"]["stages"]) if ctx.rank in st["ranks"])
    view = stage_manifest(manifest, mine)
    error, model = None, None
    try:
        from bmc.runtime.mpi import MPIContext

        comm = ctx.world.Split(color=mine, key=ctx.rank)
        sub = MPIContext(ctx.MPI, view, str(path), timeout_s=ctx.timeout_s, check=ctx.check, comm=comm)
        model = executor._load_mpi(path, view, sub, device=device, threads=threads, collectives=collectives)
    except BmcError as e:  # agreed inside the stage; now across the stages too
        error = e
    ctx.agree(error)
    ctx.impl = sub.impl  # what runs this rank's collectives (its stage's)
    stats = {**model.stats, "stage": mine}
    return PipelineModel(path, manifest, [model], model._device, mpi=ctx, stage=mine, stats=stats)
