"""jsim: two-stage image similarity in JAX/Flax (see README.md)."""

__version__ = "0.1.0"
