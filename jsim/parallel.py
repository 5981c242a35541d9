"""Devices and hosts: one 'data' mesh axis, state replicated, batches sharded.

Under jax.jit with a batch sharded over the mesh, BatchNorm's batch statistics
are computed over the global batch by XLA: no axis_name, no pmap.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when the environment asks for it.

  Must run before anything touches a JAX device. Three ways in:
    * JSIM_COORDINATOR=host:port, JSIM_NUM_PROCESSES, JSIM_PROCESS_ID set by hand
      (launch/local_multiprocess.py does this);
    * inside an `srun` step of more than one task: SLURM (launch/slurm.sbatch);
    * under `mpirun` (Open MPI).
  The last two are detected by jax.distributed.initialize() itself. With SLURM it
  gives each process GPU number SLURM_LOCALID (one process per GPU, every GPU of the
  node visible to every task); JSIM_LOCAL_DEVICE_IDS=all (every visible GPU: one
  process per node) or a list such as 0,1 overrides that.
  CPU collectives go over gloo (`jax_cpu_collectives_implementation`); GPUs use NCCL.
  """
  if jax.distributed.is_initialized():
    return
  addr = os.environ.get("JSIM_COORDINATOR")
  if addr:
    try:
      args = (addr, int(os.environ["JSIM_NUM_PROCESSES"]), int(os.environ["JSIM_PROCESS_ID"]))
    except (KeyError, ValueError):
      raise ValueError("JSIM_COORDINATOR is set: JSIM_NUM_PROCESSES and JSIM_PROCESS_ID must be integers too") from None
  elif (
    "SLURM_STEP_NODELIST" in os.environ
    and int(os.environ.get("SLURM_STEP_NUM_TASKS", os.environ.get("SLURM_NTASKS", "1"))) > 1
  ) or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    args = ()  # jax.distributed detects SLURM / Open MPI itself
  else:
    return
  # CPU processes need a cross-process collective backend: gloo (jax's default) unless
  # a version or the environment left it unset. No effect on GPUs.
  if not getattr(jax.config, "jax_cpu_collectives_implementation", "gloo"):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*args, local_device_ids=_local_device_ids())
  logging.info(
    "process %d of %d, %d local / %d global devices",
    jax.process_index(),
    jax.process_count(),
    jax.local_device_count(),
    jax.device_count(),
  )


def _local_device_ids() -> list[int] | None:
  """JSIM_LOCAL_DEVICE_IDS: unset -> JAX's choice; 'all' -> every visible GPU; '0,1' -> those."""
  spec = os.environ.get("JSIM_LOCAL_DEVICE_IDS", "").strip()
  if not spec:
    return None
  if spec == "all":
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    count = len(visible) or int(os.environ.get("SLURM_GPUS_ON_NODE", "0"))
    if not count:
      raise ValueError(
        "JSIM_LOCAL_DEVICE_IDS=all: cannot count the GPUs (neither CUDA_VISIBLE_DEVICES nor "
        "SLURM_GPUS_ON_NODE is set); list them instead, e.g. JSIM_LOCAL_DEVICE_IDS=0,1,2,3"
      )
    return list(range(count))
  try:
    return [int(v) for v in spec.split(",")]
  except ValueError:
    raise ValueError(f"JSIM_LOCAL_DEVICE_IDS={spec!r}: expected 'all' or a comma-separated list of integers") from None


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(batch_size: int, mesh: Mesh, key: str) -> None:
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{key}={batch_size} is not divisible by the {n} devices; choose a multiple of {n}")


def put_replicated(tree, mesh: Mesh):
  """Puts a host pytree on every device (the same value on every process)."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]), tree
  )


def ensure_replicated(tree, mesh: Mesh):
  """`tree` as arrays replicated over `mesh`: unchanged if its first leaf already is.

  A jitted step whose outputs are replicated compiles a second time when first fed
  fresh (single-device, uncommitted) arrays such as zeroed metric sums; placing them
  like the outputs keeps it at one compilation.
  """
  leaves = jax.tree.leaves(tree)
  if leaves and getattr(leaves[0], "sharding", None) == replicated(mesh):
    return tree
  return put_replicated(tree, mesh)


def put_sharded_batch(x: np.ndarray, mesh: Mesh):
  """A host batch, identical on every process, sharded along its first axis."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def is_main_process() -> bool:
  return jax.process_index() == 0


def sync_processes(name: str) -> None:
  """Waits until every process reaches this point (no-op with one process).

  Used after process 0 writes a file that the others read next (result.json,
  the embeddings): without it they could look before it exists.
  """
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def default_compute_dtype():
  """bf16 compute on accelerators, float32 on CPU (config model.dtype='auto')."""
  import jax.numpy as jnp

  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
