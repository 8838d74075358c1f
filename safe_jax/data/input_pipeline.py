"""The training input pipeline: ANCHOR records → per-host batches, deterministic and resumable.

    tfds.data_source ─► seeded shuffle (reshuffled each epoch) ─► repeat ─► decode, crop, flip
      ─► tokenise with subject weights ─► batch ─► this host's batches ─► worker processes
      ─► (GlobalBatches) global jax.Array on the mesh's data axes, images scaled to [-1, 1] there

Every step is a pure function of (seed, position in the global stream). The stream is cut into
per-host batches of ``batch_size`` consecutive records and host ``i`` of ``n`` takes batches
``i, i+n, i+2n, ...``; global batch ``g`` (the hosts' batches in process order) is therefore
records ``[g·n·b, (g+1)·n·b)`` whatever ``n`` is, so a run on 1 or 64 hosts trains on the same
global batches. Hosts see disjoint records whose union is each epoch, and an iterator's state is
just where it is, which is what makes resume exact.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import grain

from safe_jax.data.source import data_source
from safe_jax.data.transforms import DecodeImage, TokenizeWithSubjects
from safe_jax.errors import SafeJaxError
from safe_jax.text.conditioning import DEFAULT_WEIGHT


@dataclasses.dataclass(frozen=True)
class InputConfig:
    """Everything that decides which batches come out; two equal configs give equal batches.

    ``batch_size`` is per host. ``worker_count`` processes each run ``read_threads`` decode
    threads; ``worker_count=0`` runs in this process (tests, debugging). Batches are formed before
    the workers, so the worker count does not change which batches come out.
    """

    name: str = "anchor/sample"
    split: str = "train"
    data_dir: str | None = None
    resolution: int = 512
    crop: str = "center"              # "center" (the authors' recipe) or "random"
    flip: bool = True
    image_dtype: str = "uint8"        # 0..255, scaled to [-1, 1] on the devices by GlobalBatches; or "float32"
    batch_size: int = 4
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None     # None: repeat forever
    drop_remainder: bool = True
    subject_weight: float = DEFAULT_WEIGHT
    subject_format: str = "plain"
    max_length: int = 77              # tokens per caption: the text encoder's max_position_embeddings
    worker_count: int = 2
    worker_buffer_size: int = 2
    read_threads: int = 2
    prefetch: int = 4                 # batches buffered by the read threads
    micro_conditioning: bool = False  # SDXL: batches gain ``time_ids`` [B, 6] float32 (transforms.sdxl_time_ids)

    def __post_init__(self):
        if self.batch_size < 1 or self.resolution < 8:
            raise SafeJaxError(f"need batch_size ≥ 1 and resolution ≥ 8, got {self.batch_size}, {self.resolution}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise SafeJaxError(f"num_epochs must be ≥ 1 or None, got {self.num_epochs}")
        if not isinstance(self.micro_conditioning, bool):
            raise SafeJaxError(f"micro_conditioning must be True or False, got {self.micro_conditioning!r}")


def host_shard() -> tuple[int, int]:
    """(this process's index, the number of processes) from JAX's distributed runtime."""
    import jax

    return jax.process_index(), jax.process_count()


def make_dataset(config: InputConfig, tokenizer: Any, *, source: Any = None,
                 shard: tuple[int, int] | None = None,
                 reward_text: Callable[[str], Mapping[str, Any]] | None = None, start: int = 0) -> grain.IterDataset:
    """This host's batches as a grain IterDataset: dicts of ``images`` [B, R, R, 3] (uint8 0..255, or
    float32 [-1, 1] with ``image_dtype="float32"``), ``input_ids`` [B, 77] int32, ``token_weights``
    [B, 77] float32 and ``image_id`` [B] bytes, with ``micro_conditioning`` SDXL's ``time_ids``
    [B, 6] float32 (original height, width, crop top, left, target height, width), plus what
    ``reward_text`` makes of each caption (a reward model's own tokens, e.g. ``ImageRewardText``;
    it must pickle, for the workers).

    ``source`` defaults to ``data_source(config.name, config.split, config.data_dir)``; ``shard`` to
    ``(jax.process_index(), jax.process_count())``.

    Everything is a pure function of the position in the global stream of per-host batches
    (shuffle, epoch reseeding, augmentation), and host ``index`` of ``count`` reads positions
    ``index, index + count, …``. ``start`` skips the first ``start`` global batches (``start ×
    count`` per-host batches): resuming at a step is ``start=step``, whatever the number of
    processes the earlier run had, as long as the global batch (per-host batch × processes) is the same.
    """
    if source is None:
        source = data_source(config.name, config.split, config.data_dir)
    if len(source) == 0:
        raise SafeJaxError(f"{config.name} split {config.split!r} is empty")
    index, count = shard if shard is not None else host_shard()
    if not 0 <= index < count:
        raise SafeJaxError(f"shard index {index} is not in [0, {count})")

    ds = grain.MapDataset.source(source).seed(config.seed)
    if config.shuffle:
        ds = ds.shuffle()
    ds = ds.repeat(config.num_epochs)  # reseeds the shuffle each epoch
    ds = ds.random_map(DecodeImage(config.resolution, config.crop, config.flip, config.image_dtype,
                                   config.micro_conditioning))
    ds = ds.map(TokenizeWithSubjects(tokenizer, config.subject_weight, config.subject_format, config.max_length,
                                     reward_text))
    ds = ds.batch(config.batch_size, drop_remainder=config.drop_remainder)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise SafeJaxError(f"start must be a global batch index ≥ 0, got {start!r}")
    ds = ds[start * count + index::count]  # lazy: a host decodes only its own batches, keyed by global position
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads, prefetch_buffer_size=config.prefetch))
    if config.worker_count > 0:
        _absl_flags_ready()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=config.worker_count,
                                                         per_worker_buffer_size=config.worker_buffer_size),
                            worker_init_fn=_ignore_ctrl_c)
    return it


def _ignore_ctrl_c(worker_index: int, worker_count: int) -> None:
    """Ctrl-C in a terminal reaches the whole process group: the workers leave it to the trainer,
    which saves (with their iterator position) and then stops them in order."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _absl_flags_ready() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` nobody has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_iterator(config: InputConfig, tokenizer: Any, **kwargs: Any) -> grain.DatasetIterator:
    """``iter(make_dataset(...))``: a DatasetIterator with ``get_state`` / ``set_state``; ``kwargs``
    are ``make_dataset``'s (``source``, ``shard``, ``reward_text``)."""
    return iter(make_dataset(config, tokenizer, **kwargs))
