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

  jax.distributed.initialize() detects SLURM, Open MPI and cloud TPU by itself;
  JSIM_COORDINATOR / JSIM_NUM_PROCESSES / JSIM_PROCESS_ID set it up by hand (the
  local launcher in launch/ uses those).
  """
  if jax.distributed.is_initialized():
    return
  addr = os.environ.get("JSIM_COORDINATOR")
  if addr:
    jax.distributed.initialize(addr, int(os.environ["JSIM_NUM_PROCESSES"]),
                               int(os.environ["JSIM_PROCESS_ID"]))
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    jax.distributed.initialize()
  else:
    return
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


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
  return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), sharding, lambda idx: np.asarray(x)[idx]),
                      tree)


def put_sharded_batch(x: np.ndarray, mesh: Mesh):
  """A host batch, identical on every process, sharded along its first axis."""
  sharding = batch_sharded(mesh)
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def is_main_process() -> bool:
  return jax.process_index() == 0


def default_compute_dtype():
  """bf16 compute on accelerators, float32 on CPU (config model.dtype='auto')."""
  import jax.numpy as jnp
  return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
