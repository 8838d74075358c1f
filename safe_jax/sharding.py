"""Meshes and sharding rules for training on one host, a GPU cluster or a TPU pod.

One mesh with three axes serves every strategy:

- ``data``: pure data parallelism; parameters are replicated along it.
- ``fsdp``: data parallelism whose devices also split the parameters, gradients and optimizer
  state (ZeRO-3 / FSDP); XLA gathers each weight just before it is used.
- ``tensor``: optional model parallelism over the output features of dense and conv kernels.

The batch is split over ``data`` × ``fsdp``. Parameters are placed by regex rules over their
'/'-joined paths (as in big_vision's ``sharding.py``): first match wins, and the default rule
shards the largest evenly divisible dimension of every large leaf over ``fsdp``. The same rules
apply unchanged to any tree whose paths end like the parameters': an optax state (its
params-shaped ``mu`` / ``nu`` plus scalar counts), a LoRA tree, or ``jax.eval_shape`` output.

Activations are normally left to XLA's propagation from the batch sharding. Where a layout has
to be pinned (e.g. after a reshape that hides the batch dimension), ``with_logical_constraint``
applies ``LOGICAL_RULES`` to per-dimension logical names inside ``jit``.
"""

from __future__ import annotations

import math
import re
from typing import Any, Sequence, Union

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from safe_jax.errors import SafeJaxError

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = Union[str, tuple[str, ...], None]

# Logical dimension name -> mesh axis (or axes, or None: unsharded). Used for explicit parameter
# rules and for activation constraints; the default parameter rule needs none of them.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),       # input features of a kernel / model width
    ("mlp", "tensor"),       # output features of a kernel
    ("heads", "tensor"),
    ("kv", None),            # per-head features
    ("length", None),        # tokens: text context, flattened pixels
    ("height", None),
    ("width", None),
    ("channels", None),      # activation channels (NHWC)
    ("conv_kernel", None),   # spatial taps of a conv kernel
    ("lora_rank", None),
)

# Parameter rules: (regex searched in the '/'-joined path, action). Actions:
#   "replicate"                 every device holds the whole leaf
#   "auto"                      the FSDP default (see ``auto_spec``)
#   tuple of logical names      one per dimension, mapped through the logical rules
#   PartitionSpec               used as given
# Biases and norm scales are tiny and read by every device: never worth a gather.
PARAM_RULES: tuple[tuple[str, Any], ...] = (
    (r"(^|/)(bias|scale)$", "replicate"),
    (r".*", "auto"),
)

# Below this many elements a leaf is replicated: gathering it would cost more than it saves.
MIN_SHARD_SIZE = 2 ** 14


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over ``devices`` (default: all devices of all hosts).

    One size may be -1 and takes what the others leave. ``jax.make_mesh`` orders the devices
    for the physical topology (ICI rings on TPU, NVLink islands on GPU, hosts outermost), so
    the innermost axes get the fastest links. Axes are ``AxisType.Auto``: GSPMD propagation,
    which is what ``jit`` with in/out shardings and ``with_sharding_constraint`` expect.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    desc = f"mesh data={data} fsdp={fsdp} tensor={tensor}"
    if sizes.count(-1) > 1:
        raise SafeJaxError(f"{desc}: at most one axis size may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise SafeJaxError(f"{desc}: axis sizes must be positive (or -1 for 'the rest')")
    known = math.prod(s for s in sizes if s != -1)
    n = len(devices)
    if -1 in sizes:
        if n % known:
            raise SafeJaxError(f"{desc}: {known} does not divide the {n} available devices")
        sizes[sizes.index(-1)] = n // known
    elif known != n:
        raise SafeJaxError(f"{desc}: needs {known} devices but {n} are available "
                           "(use -1 for one axis, or pass devices=)")
    return jax.make_mesh(tuple(sizes), MESH_AXES, (AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_RULES) -> P:
    """Per-dimension logical names -> PartitionSpec; mesh axes the mesh lacks are dropped."""
    table = dict(rules)
    present = set(mesh.axis_names) if mesh is not None else None
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise SafeJaxError(f"no sharding rule for logical axis {name!r} (known: {', '.join(table)})")
        axes = table[name]
        axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        if present is not None:
            axes = tuple(a for a in axes if a in present)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def path_str(path: Sequence[Any]) -> str:
    """A jax key path as 'a/b/0/c' (dict keys, attribute names and sequence indices alike)."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else np.shape(leaf)


def _axis_size(mesh: Mesh, axes: MeshAxes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes)


def auto_spec(path: str, shape: tuple[int, ...], mesh: Mesh, min_size: int = MIN_SHARD_SIZE) -> P:
    """The FSDP default for one leaf.

    Small leaves are replicated. With a ``tensor`` axis, a dense or conv ``kernel``'s output
    features (last dim) go over it when divisible. Then the largest remaining dimension
    divisible by the ``fsdp`` size goes over ``fsdp`` (ties: the earlier dimension, i.e. the
    input features of a kernel). A leaf with no divisible dimension stays replicated.
    """
    spec: list[Any] = [None] * len(shape)
    if math.prod(shape) < min_size or not shape:
        return P()
    tensor = mesh.shape.get("tensor", 1)
    if tensor > 1 and path.rsplit("/", 1)[-1] == "kernel" and len(shape) in (2, 4) and shape[-1] % tensor == 0:
        spec[-1] = "tensor"
    fsdp = mesh.shape.get("fsdp", 1)
    if fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def _explicit_spec(path: str, shape: tuple[int, ...], spec: P, mesh: Mesh) -> P:
    if len(spec) > len(shape):
        raise SafeJaxError(f"sharding rule {spec} has more dimensions than '{path}' {shape}")
    for dim, axes in zip(shape, spec):
        if dim % _axis_size(mesh, axes):
            raise SafeJaxError(f"sharding rule {spec} does not fit '{path}' {shape}: "
                               f"{dim} is not divisible by mesh axes {axes} of size {_axis_size(mesh, axes)}")
    return spec


def leaf_spec(path: str, shape: tuple[int, ...], mesh: Mesh, rules: Sequence[tuple[str, Any]] = PARAM_RULES,
              logical_rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_RULES,
              min_size: int = MIN_SHARD_SIZE) -> P:
    """The PartitionSpec of one leaf under the first rule whose regex is found in ``path``."""
    for pattern, action in rules:
        if not re.search(pattern, path):
            continue
        if isinstance(action, P):
            return _explicit_spec(path, shape, action, mesh)
        if action == "replicate" or not shape:
            return P()
        if action == "auto":
            return auto_spec(path, shape, mesh, min_size)
        if isinstance(action, (tuple, list)):
            if len(action) != len(shape):
                raise SafeJaxError(f"sharding rule {action} names {len(action)} dimensions, '{path}' has shape {shape}")
            return _explicit_spec(path, shape, logical_to_spec(action, mesh, logical_rules), mesh)
        raise SafeJaxError(f"unknown sharding action {action!r} for rule {pattern!r}")
    return P()


def param_partition_specs(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = PARAM_RULES, *,
                          logical_rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_RULES,
                          min_size: int = MIN_SHARD_SIZE) -> Any:
    """A PartitionSpec for every leaf of ``tree`` (params, optax state, LoRA tree, abstract shapes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: leaf_spec(path_str(path), _shape(leaf), mesh, rules, logical_rules, min_size), tree)


def shardings_for(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]] = PARAM_RULES, **kw: Any) -> Any:
    """``param_partition_specs`` as NamedShardings: ready for ``jax.device_put`` and ``jit``."""
    specs = param_partition_specs(tree, mesh, rules, **kw)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def local_value(x: jax.Array) -> np.ndarray:
    """A replicated value read from this process's own copy (works on every process of a run)."""
    return np.asarray(x.addressable_data(0))


def host_copy(tree: Any) -> Any:
    """Numpy copies of a tree's arrays, gathering multi-host sharded ones (a collective: every
    process calls it)."""
    def copy(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
            from jax.experimental import multihost_utils
            x = multihost_utils.process_allgather(x, tiled=True)
        return np.asarray(jax.device_get(x))
    return jax.tree.map(copy, tree)


def host_copy_to_process_0(tree: Any) -> Any:
    """``host_copy`` where only process 0 needs the values (an export, sample grids): on process 0
    the numpy tree, on the others ``None``. Multi-host sharded leaves are still gathered by a
    collective every process joins, but one leaf at a time, and the other processes drop each
    leaf at once: their host memory holds one tensor, not the trained tree (3.4 GB for SD 1.5)."""
    if jax.process_count() == 1:
        return host_copy(tree)
    keep = jax.process_index() == 0
    leaves, treedef = jax.tree.flatten(tree)
    out = []
    for leaf in leaves:
        value = host_copy(leaf)  # a collective for sharded leaves: every process, same order
        out.append(value if keep else None)
        del value
    return jax.tree.unflatten(treedef, out) if keep else None


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Block until every process of the run has called this with ``name``: a barrier of JAX's
    distributed runtime (its coordination service), not a device collective.

    Why: the first collective of a device group sets up its communicators, and on CPU clusters
    (gloo) that set-up waits only 30 s for the other processes. Processes can reach their first
    step minutes apart (one compiles while another hits the compilation cache; a busy host), so
    they meet here first, with a long timeout. A process that died stops the others through the
    runtime's heartbeat, as anywhere else."""
    if jax.process_count() == 1:
        return
    import orbax.checkpoint as ocp
    try:
        ocp.multihost.get_barrier_sync_fn()(key=f"safe_jax_{name}", timeout_ms=timeout_s * 1000)
    except jax.errors.JaxRuntimeError as e:
        raise SafeJaxError(f"process {jax.process_index()}: the other processes did not reach '{name}' "
                           f"within {timeout_s} s ({str(e).splitlines()[0]})") from e


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over ``data`` × ``fsdp``; other dimensions whole."""
    return NamedSharding(mesh, logical_to_spec(("batch",), mesh))


def shard_batch(local_batch: Any, mesh: Mesh, sharding: NamedSharding | None = None) -> Any:
    """This process's slice of the batch -> global arrays sharded by ``batch_sharding`` (or ``sharding``).

    Each process passes only the examples it loaded; the global batch is their concatenation
    in process order (``jax.make_array_from_process_local_data``), so it is right on many hosts.
    """
    sharding = batch_sharding(mesh) if sharding is None else sharding
    shards = _axis_size(mesh, sharding.spec[0])

    def put(x):
        x = np.asarray(x)
        if x.ndim == 0:
            raise SafeJaxError("shard_batch: every leaf needs a leading batch dimension (got a scalar)")
        if (x.shape[0] * jax.process_count()) % shards:
            raise SafeJaxError(f"shard_batch: global batch {x.shape[0] * jax.process_count()} is not divisible "
                               f"by the {shards} batch shards (data × fsdp)")
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(put, local_batch)


def with_logical_constraint(x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh,
                            rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_RULES) -> jax.Array:
    """Pin an activation's layout inside ``jit``, e.g. ``("batch", None, None, "channels")``.

    Rarely needed: the batch sharding of the inputs propagates. Use it where propagation is
    ambiguous (after reshapes) or to stop XLA from replicating a large intermediate. ``embed``
    and ``mlp`` are parameter dimensions (``embed`` is the fsdp axis, already used by
    ``batch``); activations normally name only ``batch``, plus ``heads`` / ``mlp`` with a
    ``tensor`` axis.
    """
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules)))
