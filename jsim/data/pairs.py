"""Index pairs of images for stage 2 and its evaluation, drawn on the device.

A pair is two indices into one image (or embedding) array. Everything here is
jax.random with static shapes, so an epoch's 644,400 training pairs are drawn
inside one jitted call from (key, class index), and nothing goes back to the host.

* `build_class_index(labels)` -> `ClassIndex`: image indices sorted by class, with a
  start offset and count per class; "a random image of class c" is
  order[start[c] + floor(u * count[c])], u ~ U[0, 1), whatever the class sizes.
* `sample_pairs`: the protocol's training / validation pairs over a class subset:
  k pairs for every ordered pair of distinct classes and s pairs of two different
  images for every class (C*(C-1)*k + C*s in all), optionally redrawing every pair
  that falls in an exclusion set (the validation pairs) exactly, or removing it
  (exclusion='remove', the source's wording: fewer pairs, about 641,600 of 644,400).
* `sample_test_pairs` and `pair_case`: the five evaluation cases.
* `linear_to_pair` / `exhaustive_pairs_chunk`: every unordered pair i < j of N images,
  chunk by chunk from a linear index, without holding the ~50M pairs.

Layout of `sample_pairs` output (before the optional shuffle): the dissimilar pairs
first, ordered by (class i, class j, repeat), then the similar pairs by (class, repeat).
"""

from __future__ import annotations

import functools
import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

INT32_MAX = np.iinfo(np.int32).max
# Largest N whose N*(N-1)/2 unordered pairs are addressable by an int32 linear index.
MAX_EXHAUSTIVE_IMAGES = 65536
# config.evaluation.mode: the protocol's sampled test pairs, or every distinct pair.
EVALUATION_MODES = ("sampled", "exhaustive")

# Evaluation cases (PROTOCOL.md, Evaluation).
CASE_NAMES: dict[int, str] = {
  1: "similar, seen class",
  2: "dissimilar, both seen",
  3: "dissimilar, one seen, one unseen",
  4: "similar, unseen class",
  5: "dissimilar, both unseen",
}
SEEN_CASES = (1, 2)
UNSEEN_CASES = (4, 5)


@flax.struct.dataclass
class ClassIndex:
  """Device arrays to draw random images of a given class.

  Attributes:
    order: int32 [N], image indices sorted by class (stable: by index within a class).
    start: int32 [K], offset in `order` of each class's first image.
    count: int32 [K], number of images of each class (may differ between classes).
    labels: int32 [N], the class of each image (for `pair_case`).
  """

  order: jax.Array
  start: jax.Array
  count: jax.Array
  labels: jax.Array

  @property
  def num_classes(self) -> int:
    return self.start.shape[0]

  @property
  def num_images(self) -> int:
    return self.order.shape[0]


def build_class_index(labels, num_classes: int | None = None) -> ClassIndex:
  """ClassIndex of `labels` (int [N], values in [0, num_classes)); built once on the host."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
  if labels.shape[0] > INT32_MAX:
    raise ValueError(f"{labels.shape[0]} images do not fit int32 indices")
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 0
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels outside [0, {num_classes}): min {labels.min()}, max {labels.max()}")
  order = np.argsort(labels, kind="stable").astype(np.int32)
  count = np.bincount(labels, minlength=num_classes).astype(np.int32)
  start = (np.cumsum(count) - count).astype(np.int32)
  return ClassIndex(
    order=jnp.asarray(order),
    start=jnp.asarray(start),
    count=jnp.asarray(count),
    labels=jnp.asarray(labels.astype(np.int32)),
  )


def _uniform_offset(key: jax.Array, n: jax.Array) -> jax.Array:
  """floor(u * n), u ~ U[0, 1): uniform in [0, n) for int32 n >= 1 (clamped against rounding)."""
  u = jax.random.uniform(key, n.shape, jnp.float32)
  return jnp.minimum((u * n.astype(jnp.float32)).astype(jnp.int32), n - 1)


def draw_pairs(key: jax.Array, class_index: ClassIndex, class_a: jax.Array, class_b: jax.Array) -> jax.Array:
  """One random pair per entry: an image of class_a[p] and one of class_b[p] -> int32 [P, 2].

  Where class_a == class_b the two images are different (drawn without replacement),
  so a pair is never an image with itself; that needs >= 2 images in the class.
  """
  ka, kb = jax.random.split(key)
  same = (class_a == class_b).astype(jnp.int32)
  cnt_a = class_index.count[class_a]
  cnt_b = class_index.count[class_b]
  off_a = _uniform_offset(ka, cnt_a)
  off_b = _uniform_offset(kb, jnp.maximum(cnt_b - same, 1))
  off_b = off_b + same * (off_b >= off_a)  # skip image a within its own class
  a = class_index.order[class_index.start[class_a] + off_a]
  b = class_index.order[class_index.start[class_b] + off_b]
  return jnp.stack([a, b], axis=-1)


def num_pairs(num_classes: int, per_ordered_class_pair: int, similar_per_class: int) -> int:
  """C*(C-1)*k + C*s, the size of `sample_pairs`' output."""
  c = num_classes
  return c * (c - 1) * per_ordered_class_pair + c * similar_per_class


def _pair_class_positions(c: int, k: int, s: int) -> tuple[jax.Array, jax.Array]:
  """Positions (into the class subset) of both classes of every pair, from iota arithmetic."""
  n_dis, n_sim = c * (c - 1) * k, c * s
  t = jnp.arange(n_dis, dtype=jnp.int32)
  q = t // max(k, 1)  # ordered class pair number, row-major over (i, j != i)
  i = q // max(c - 1, 1)
  r = q % max(c - 1, 1)
  j = r + (r >= i)
  u = jnp.arange(n_sim, dtype=jnp.int32) // max(s, 1)
  return jnp.concatenate([i, u]), jnp.concatenate([j, u])


# ---------------------------------------------------------------------------
# Exclusion: an exact set of unordered pairs, searched on the device.


@flax.struct.dataclass
class PairSet:
  """A set of unordered pairs {a, b} as (lo, hi) = (min, max), sorted lexicographically, unique.

  Membership is an exact lexicographic binary search (no hashing; a combined key
  lo * N + hi would overflow int32 for N = 90,000). An empty set holds one (-1, -1)
  sentinel that no real pair matches.
  """

  lo: jax.Array
  hi: jax.Array

  @property
  def size(self) -> int:
    return self.lo.shape[0]

  def contains(self, pairs: jax.Array) -> jax.Array:
    """bool [P]: whether each pair of int [P, 2] (either order) is in the set."""
    q_lo = jnp.minimum(pairs[:, 0], pairs[:, 1]).astype(jnp.int32)
    q_hi = jnp.maximum(pairs[:, 0], pairs[:, 1]).astype(jnp.int32)
    m = self.lo.shape[0]
    # Lower bound: first position whose (lo, hi) >= (q_lo, q_hi), searched in [left, right).
    left = jnp.zeros_like(q_lo)
    right = jnp.full_like(q_lo, m)

    def step(_, lr):
      left, right = lr
      active = left < right
      mid = jnp.minimum((left + right) // 2, m - 1)
      lo_m, hi_m = self.lo[mid], self.hi[mid]
      less = (lo_m < q_lo) | ((lo_m == q_lo) & (hi_m < q_hi))
      left = jnp.where(active & less, mid + 1, left)
      right = jnp.where(active & ~less, mid, right)
      return left, right

    left, _ = jax.lax.fori_loop(0, max(1, math.ceil(math.log2(m + 1))), step, (left, right))
    pos = jnp.minimum(left, m - 1)
    return (self.lo[pos] == q_lo) & (self.hi[pos] == q_hi)


def make_exclusion(pairs) -> PairSet:
  """PairSet of the unordered pairs in int [P, 2] (host or device array), e.g. the validation pairs."""
  pairs = np.asarray(pairs)
  if pairs.ndim != 2 or pairs.shape[1] != 2:
    raise ValueError(f"pairs must have shape [P, 2], got {pairs.shape}")
  if pairs.size == 0:
    return PairSet(lo=jnp.full((1,), -1, jnp.int32), hi=jnp.full((1,), -1, jnp.int32))
  lo = np.minimum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
  hi = np.maximum(pairs[:, 0], pairs[:, 1]).astype(np.int64)
  keys = np.unique(np.stack([lo, hi], axis=1), axis=0)  # sorted lexicographically
  return PairSet(lo=jnp.asarray(keys[:, 0].astype(np.int32)), hi=jnp.asarray(keys[:, 1].astype(np.int32)))


# ---------------------------------------------------------------------------
# Training / validation pairs.


EXCLUSIONS = ("redraw", "remove")


@functools.partial(
  jax.jit, static_argnames=("per_ordered_class_pair", "similar_per_class", "max_redraw_rounds", "shuffle", "exclusion")
)
def sample_pairs_with_stats(
  key: jax.Array,
  class_index: ClassIndex,
  classes: jax.Array,
  per_ordered_class_pair: int,
  similar_per_class: int,
  exclude: PairSet | None = None,
  *,
  max_redraw_rounds: int = 16,
  shuffle: bool = False,
  exclusion: str = "redraw",
) -> tuple[jax.Array, jax.Array, dict]:
  """`sample_pairs` without the host-side check, usable inside jit.

  Returns (pairs, same, stats) with stats = {'collisions': pairs that hit `exclude` in
  the first draw, 'rounds': redraw rounds used, 'remaining': pairs still in `exclude`
  (must be 0; `sample_pairs` raises otherwise), 'kept': how many leading pairs to use},
  all int32 device scalars. With exclusion='remove' the shapes stay static: the
  colliding pairs are moved (stably) behind the kept ones, and kept = P - collisions.
  """
  if exclusion not in EXCLUSIONS:
    raise ValueError(f"exclusion={exclusion!r}: expected one of {EXCLUSIONS}")
  classes = jnp.asarray(classes, jnp.int32)
  pos_a, pos_b = _pair_class_positions(classes.shape[0], per_ordered_class_pair, similar_per_class)
  class_a, class_b = classes[pos_a], classes[pos_b]
  k_draw, k_redraw, k_shuffle = jax.random.split(key, 3)
  pairs = draw_pairs(k_draw, class_index, class_a, class_b)
  zero = jnp.zeros((), jnp.int32)
  kept = jnp.int32(pairs.shape[0])
  removed = None
  if exclude is None:
    stats = {"collisions": zero, "rounds": zero, "remaining": zero}
  elif exclusion == "remove":
    removed = exclude.contains(pairs)
    collisions = jnp.sum(removed, dtype=jnp.int32)
    kept = kept - collisions
    stats = {"collisions": collisions, "rounds": zero, "remaining": zero}
  else:
    hit = exclude.contains(pairs)
    collisions = jnp.sum(hit, dtype=jnp.int32)

    # Redraw only the colliding pairs, from the same classes, until none is left.
    def cond(state):
      r, _, hit = state
      return (r < max_redraw_rounds) & jnp.any(hit)

    def body(state):
      r, pairs, hit = state
      new = draw_pairs(jax.random.fold_in(k_redraw, r), class_index, class_a, class_b)
      pairs = jnp.where(hit[:, None], new, pairs)
      return r + 1, pairs, hit & exclude.contains(new)

    rounds, pairs, hit = jax.lax.while_loop(cond, body, (zero, pairs, hit))
    stats = {"collisions": collisions, "rounds": rounds, "remaining": jnp.sum(hit, dtype=jnp.int32)}
  same = class_a == class_b
  if shuffle:
    perm = jax.random.permutation(k_shuffle, pairs.shape[0])
    pairs, same = pairs[perm], same[perm]
    removed = None if removed is None else removed[perm]
  if removed is not None:  # the kept pairs first, in their (shuffled) order
    order = jnp.argsort(removed, stable=True)
    pairs, same = pairs[order], same[order]
  stats["kept"] = kept
  return pairs, same, stats


def _check_counts(class_index: ClassIndex, classes, k: int, s: int, what: str) -> None:
  """Host-side checks that need concrete values (skipped under tracing)."""
  if isinstance(class_index.count, jax.core.Tracer) or isinstance(classes, jax.core.Tracer):
    return
  classes = np.asarray(classes)
  counts = np.asarray(class_index.count)
  if classes.ndim != 1 or (classes.size and (classes.min() < 0 or classes.max() >= counts.shape[0])):
    raise ValueError(f"{what}: classes must be a 1-D array of indices in [0, {counts.shape[0]})")
  if np.unique(classes).size != classes.size:
    raise ValueError(f"{what}: classes contains duplicates")
  need = 2 if s > 0 else (1 if k > 0 else 0)
  small = classes[counts[classes] < need]
  if small.size:
    raise ValueError(f"{what}: class {int(small[0])} has {int(counts[small[0]])} images, needs >= {need}")


def sample_pairs(
  key: jax.Array,
  class_index: ClassIndex,
  classes,
  per_ordered_class_pair: int,
  similar_per_class: int,
  exclude: PairSet | None = None,
  *,
  max_redraw_rounds: int = 16,
  shuffle: bool = False,
  exclusion: str = "redraw",
) -> tuple[jax.Array, jax.Array]:
  """Pairs over the class subset `classes` (int32 [C]): (pairs int32 [P, 2], same bool [P]).

  For every ordered pair (i, j) of distinct classes of the subset, `per_ordered_class_pair`
  pairs (image of i, image of j); for every class, `similar_per_class` pairs of two
  different images of that class. P = C*(C-1)*k + C*s exactly (protocol: train k=10,
  s=1,790 over 180 classes -> 644,400; validation k=6, s=1,074 -> 386,640). Images are
  drawn with replacement across pairs. The same key gives the same pairs.

  `exclude` (see `make_exclusion`, e.g. the validation pairs, indexing the same image
  array): a drawn pair equal to an excluded one in either order is redrawn from the
  same classes, exactly, for up to `max_redraw_rounds` rounds; if a collision still
  remains, this raises ValueError rather than keep it. With exclusion='remove' such a
  pair is dropped instead, as the source words it ("image pairs present in the
  validation set are removed"): P minus the collisions pairs (protocol: about 641,600
  rather than 644,400, so 2,507 rather than 2,518 updates of 256 an epoch). `shuffle`
  permutes the output (otherwise dissimilar pairs come first, grouped by class pair,
  then similar ones).
  """
  _check_counts(class_index, classes, per_ordered_class_pair, similar_per_class, "sample_pairs")
  p = num_pairs(int(np.shape(classes)[0]), per_ordered_class_pair, similar_per_class)
  if p > INT32_MAX:
    raise ValueError(f"sample_pairs: {p} pairs do not fit int32 indexing")
  pairs, same, stats = sample_pairs_with_stats(
    key,
    class_index,
    classes,
    per_ordered_class_pair,
    similar_per_class,
    exclude,
    max_redraw_rounds=max_redraw_rounds,
    shuffle=shuffle,
    exclusion=exclusion,
  )
  remaining = int(stats["remaining"])
  if remaining:
    raise ValueError(
      f"sample_pairs: {remaining} pairs still collide with the exclusion set after "
      f"{max_redraw_rounds} redraw rounds ({int(stats['collisions'])} collided at first); "
      "the classes are too small for the number of pairs asked"
    )
  if exclusion == "remove":
    kept = int(stats["kept"])
    return pairs[:kept], same[:kept]
  return pairs, same


# ---------------------------------------------------------------------------
# Test pairs: the five cases.


def pair_case(label_a: jax.Array, label_b: jax.Array, seen_mask: jax.Array) -> jax.Array:
  """Evaluation case (int8, 1..5) of pairs with class labels label_a, label_b.

  1 similar seen; 2 dissimilar both seen; 3 dissimilar one seen one unseen;
  4 similar unseen; 5 dissimilar both unseen. seen_mask: bool [num_classes].
  """
  seen_a = seen_mask[label_a]
  seen_b = seen_mask[label_b]
  same = label_a == label_b
  dis = jnp.where(seen_a & seen_b, 2, jnp.where(seen_a | seen_b, 3, 5))
  return jnp.where(same, jnp.where(seen_a, 1, 4), dis).astype(jnp.int8)


def sample_test_pairs(
  key: jax.Array, class_index: ClassIndex, seen_mask, per_ordered_class_pair: int = 50, similar_per_class: int = 9950
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The evaluation pairs over all classes: (pairs int32 [P, 2], same bool [P], case int8 [P]).

  Drawn like `sample_pairs` over every class of `class_index`: `per_ordered_class_pair`
  per ordered pair of distinct classes and `similar_per_class` per class. With the
  protocol's 200 classes x 50 test images (180 seen): cases 1..5 hold 1,791,000 /
  1,611,000 / 360,000 / 199,000 / 19,000 pairs, 3,980,000 in all.

  Same-class pairs are sampled WITH replacement: a class of 50 images has only 1,225
  distinct unordered pairs, so 9,950 per class must repeat pairs (the source calls them
  distinct, which is impossible). Each pair is still two different images, never an
  image paired with itself. For no sampling at all, see the exhaustive mode.
  """
  seen_mask = jnp.asarray(seen_mask, bool)
  if seen_mask.shape != (class_index.num_classes,):
    raise ValueError(f"seen_mask has shape {seen_mask.shape}, expected ({class_index.num_classes},)")
  classes = jnp.arange(class_index.num_classes, dtype=jnp.int32)
  pairs, same = sample_pairs(key, class_index, classes, per_ordered_class_pair, similar_per_class)
  case = pair_case(class_index.labels[pairs[:, 0]], class_index.labels[pairs[:, 1]], seen_mask)
  return pairs, same, case


# ---------------------------------------------------------------------------
# Exhaustive enumeration of all unordered pairs i < j.


def num_exhaustive_pairs(n: int) -> int:
  """N*(N-1)/2; ValueError when that does not fit an int32 linear index (N > 65,536)."""
  if n < 2 or n > MAX_EXHAUSTIVE_IMAGES:
    raise ValueError(f"exhaustive pairs need 2 <= N <= {MAX_EXHAUSTIVE_IMAGES} images, got {n}")
  return n * (n - 1) // 2


def _tri(m: jax.Array) -> jax.Array:
  """m*(m+1)/2 in int32 without overflowing the product (halve the even factor first)."""
  even = (m % 2) == 0
  return jnp.where(even, (m // 2) * (m + 1), m * ((m + 1) // 2))


def linear_to_pair(k: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
  """The k-th unordered pair (i, j), i < j, of n items in row-major order (0,1), (0,2), ..., (n-2,n-1).

  Exact in int32 for n <= 65,536: a float32 square root estimates the row, then an
  integer fix-up corrects the rounding. k: int32 array with values in [0, n(n-1)/2).
  """
  total = num_exhaustive_pairs(n)
  k = jnp.asarray(k, jnp.int32)
  # Count from the end: r pairs lie after k; row i (with m = n-1-i pairs) holds r iff
  # tri(m-1) <= r < tri(m). Counting from the end keeps the float argument free of cancellation.
  r = jnp.int32(total - 1) - k
  m = jnp.floor((1.0 + jnp.sqrt(8.0 * r.astype(jnp.float32) + 1.0)) / 2.0).astype(jnp.int32)
  m = jnp.clip(m, 1, n - 1)
  for _ in range(2):  # the float estimate is off by at most one
    m = m - (_tri(m - 1) > r).astype(jnp.int32)
    m = m + (_tri(m) <= r).astype(jnp.int32)
  i = (n - 1) - m
  j = (n - 1) - (r - _tri(m - 1))
  return i, j


def exhaustive_pairs_chunk(start: jax.Array, chunk_size: int, n: int) -> tuple[jax.Array, jax.Array]:
  """Pairs with linear indices start .. start+chunk_size-1 -> (pairs int32 [chunk, 2], valid bool [chunk]).

  Indices past the last pair are invalid (their pair repeats the last one and must be
  masked). Jittable with `start` traced; never overflows int32, even for n = 65,536.
  """
  total = num_exhaustive_pairs(n)
  remaining = jnp.int32(total) - jnp.asarray(start, jnp.int32)
  offs = jnp.arange(chunk_size, dtype=jnp.int32)
  valid = offs < remaining
  k = jnp.asarray(start, jnp.int32) + jnp.minimum(offs, remaining - 1)
  i, j = linear_to_pair(k, n)
  return jnp.stack([i, j], axis=-1), valid
