"""How the predictors run on a cluster: the actor pool's size, batches and resources, from the
cluster's CPUs, GPUs and memory. No torch here: the driver plans, the actors import torch.
`pipeline.prediction_dataset` uses the plan; `predictor.Predictor` is what runs in each actor."""

from __future__ import annotations

from dataclasses import dataclass

from ray_fer.config import UserError

# Host memory a predictor actor declares (measured: 1.3 GB RSS at batch 512, 64 px). Declaring it
# also keeps Ray from fusing the decode tasks into the actors, which it does when the two stages
# ask for the same resources (ray-project/ray#54433): decoding must stay on its own CPU tasks.
PREDICTOR_MEMORY = 2 * 1024**3
# With faces: the detector's passes and a batch of 128 decoded photos (bench_faces.py section 3,
# 2 CPU actors: peak USS 1.5-3.0 GB on 1280x960 photos, 3.2 GB on 24-megapixel ones, whose copies
# decoding caps; Ray Data measured up to 3.1-4.3 GiB per actor, object-store pages included).
FACE_PREDICTOR_MEMORY = 4 * 1024**3
DECODE_SHARE = 0.1  # CPUs kept for decode tasks and the write stage beside CPU predictor actors
CPU_CHUNK = 128  # rows per model call on CPU (a predictor batch holds several)


class PlanError(UserError):
    """A cluster that cannot run the predictors as asked; the message names the fix."""


@dataclass(frozen=True)
class PredictorPlan:
    """Where predictor actors run and how big they are, sized from the cluster's resources."""

    device: str  # "gpu" or "cpu"
    actors: int  # most actors in the pool
    min_actors: int  # actors the pool starts with; it grows to `actors` as GPU nodes arrive
    num_cpus: float  # CPUs each actor reserves (fractional: leaves whole CPUs to the decode tasks)
    num_gpus: int  # GPUs each actor reserves
    threads: int  # torch threads per actor
    batch_size: int  # images per predictor call
    tasks_in_flight: int  # batches queued per actor, so decode output is waiting when a batch ends
    memory: int  # host memory each actor declares: torch, the model and a batch's activations
    decode_cpus: float  # CPUs each read-and-decode task reserves


def plan_predictors(
    resources: dict[str, float], *, device: str = "auto", actors: int | None = None, batch_size: int | None = None,
    autoscaling: bool = False, faces: bool = False,
) -> PredictorPlan:
    """Size the predictor pool so that it never takes every CPU: the decode tasks that feed it
    need one, and an actor pool holding all CPUs waits for ever (RAY-NOTES).

    With `faces` (photos: the detector runs in the actors) a batch is CPU_CHUNK (128) files on CPU
    and 256 on GPU (a few hundred MB of decoded photos); the pool has the same shape as without.

    On GPUs the pool starts with the GPUs present (at least one) and grows to `actors` (default:
    the GPUs present) as nodes arrive. Only an `autoscaling` cluster may have fewer GPUs than
    asked, none included: the pool waits for the autoscaler's first GPU node, as `device=gpu`
    on a cluster whose GPU nodes are scaled to zero needs.
    """
    cpus = float(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    if cpus < 1:
        raise PlanError(f"the Ray cluster has {cpus:g} CPUs; labelling needs at least 1 for reading and decoding")
    decode_cpus = 1.0 if cpus >= 2 else 0.5
    # declare at most half the cluster's memory across the pool: a small laptop must not wait for ever
    wanted = FACE_PREDICTOR_MEMORY if faces else PREDICTOR_MEMORY
    memory_total = float(resources.get("memory", 0)) or 2.0 * wanted * max(gpus, 1)
    if device == "gpu" and gpus == 0 and not autoscaling:
        raise PlanError("device=gpu but the Ray cluster has no GPUs (and this local instance cannot add any); "
                        "use --set device=auto or device=cpu")
    if device == "gpu" or (device == "auto" and gpus > 0):
        n = actors or max(gpus, 1)
        if n > gpus and not autoscaling:
            raise PlanError(f"actors={n} but the Ray cluster has {gpus} GPUs; each GPU actor takes one GPU")
        # one CPU per actor for its host-side work, unless that would leave none for decoding
        return PredictorPlan(device="gpu", actors=n, min_actors=max(1, min(gpus, n)),
                             num_cpus=min(1.0, cpus / (2 * n)), num_gpus=1,
                             threads=2, batch_size=batch_size or (256 if faces else 512), tasks_in_flight=4,
                             memory=int(min(wanted, memory_total / (2 * n))), decode_cpus=decode_cpus)
    # CPU: decoding a small face costs about a twentieth of the model's work for it (FER2013 on one
    # core: ~15,000 decodes/s, ~600 model images/s), so decode tasks (a quarter CPU each) and the
    # write stage share DECODE_SHARE of the CPUs (at least 0.75) and the actors the rest; their
    # torch threads add up to the CPUs: one single-threaded actor per CPU on small machines (on
    # 48-64 px faces processes scale better than threads), two threads each on larger ones. With
    # faces the same shape, smaller batches (decoded photos are larger than faces: 128 photos of
    # 1280x960 hold ~270 MB; under --faces auto a store of crops still gets CPU_CHUNK-row model
    # calls: at 64 rows, labelling FER2013 train ran at 475 img/s, at 128 as fast as whole). Each node of a
    # cluster of 1-CPU nodes keeps 0.375 CPU beside its actor, room for a decode task.
    headroom = max(0.75, DECODE_SHARE * cpus)
    threads = max(1, round(cpus / actors)) if actors else (1 if cpus <= 4 else 2)
    n = actors or max(1, round(cpus / threads))
    return PredictorPlan(device="cpu", actors=n, min_actors=n, num_cpus=max(cpus - headroom, 0.25) / n, num_gpus=0,
                         threads=threads, batch_size=batch_size or (CPU_CHUNK if faces else 4 * CPU_CHUNK), tasks_in_flight=2,
                         memory=int(min(wanted, memory_total / (2 * n))), decode_cpus=0.25)
