"""The training input pipeline on grain: annotation records -> batches of images and token arrays.

The batch of step `s` is a pure function of (config, s), which makes `--resume` exact:

- Which example fills each slot: the global batch of step s is elements s*B .. s*B+B-1 of one infinite
  sample order, a grain `MapDataset` of example ids (`sample_order`). Its groups (the whole data, the
  --data folders under --data-weights, or the prompts under --balance-prompts) each repeat their members,
  shuffled anew every epoch (grain's `shuffle` seeded by (seed, group), then `repeat`), so each example
  comes once per epoch of its group. Several groups are interleaved by grain's `mix`, which is
  deterministic where the old hand-written sampler drew a group per slot at random: in every window of
  sum(proportions) elements each group has exactly its share (grain scales the weights to integers, the
  smallest to 100, so a weight holds to 1%). Element n costs O(groups) to compute: no replay on resume.
- How each example is loaded: `TrainData.load(example_id, step, slot)`, the one function of its slot:
  the image decoded and resized with PIL (`paliseg.images`, the model's own preprocessing), with
  --augment-geometric/--augment-flip moved first and its suffix rewritten to match (`train.augment`,
  seeded by (seed, 4, step, slot): loc tokens from the moved boxes, seg tokens from the moved masks through
  the run's VAE, on the CPU), photometric jitter seeded by (seed, 3, step, slot), its token arrays and
  mask-loss targets (no tf.data: TensorFlow would cost seconds and memory for none of this).

Multi-host: the global batch is laid out [grad_accum, micro_batch]; process p of P loads the slice
p/P..(p+1)/P of every micro-batch (`local_slots`), which `jax.make_array_from_process_local_data`
reassembles. Each process reads its own grain dataset: its element j is local slot j % L of step j // L,
batched by L = grad_accum x micro_batch / P.

Workers: `--workers N` grain worker processes (`mp_prefetch`, started with spawn) each load whole
batches (worker i the steps i, i+N, ...), which grain hands back in step order, so the batches do not
depend on N; 0 loads them in the training process. Each loading process works on `--prefetch` batches
at a time, in threads. A worker costs about a second of CPU to start (a fresh interpreter importing
grain, which imports JAX without initialising any device, numpy and PIL) and some 200 MB; it exits with
the training process, even one killed by SIGKILL (`_start_worker`).

The data state saved with each checkpoint (`state`): grain's own iterator state is that of the interleave
of its workers' iterators, so it depends on --workers (a 2-worker state does not restore a 1-worker
iterator: grain raises IndexError). The checkpoint holds instead the state grain's `ElasticIterator`
keeps, the index of the next element of the sample order, which depends on neither --workers nor the
number of processes; a run resumed with other --workers reads the same batches.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import multiprocessing
import os
import threading
from collections.abc import Iterator

import grain
import jax
import numpy as np
from absl import flags

import vae
from paliseg import dataset, images, records
from paliseg import tokens as codec
from train import augment
from train.config import TrainConfig
from vae.masks import crop_to_64
from vae.model import MASK_SIZE

TEXT_FIELDS = ("tokens", "mask_ar", "mask_loss", "mask_input")


@dataclasses.dataclass(frozen=True)
class Example:
    record: records.Record
    text: dict[str, np.ndarray]  # TEXT_FIELDS, each int32 [seq_len]
    width: int = 0  # the image's size (the ground truth's resolution)
    height: int = 0


def read_examples(config: TrainConfig, tokenizer) -> list[list[Example]]:
    """Every training example of every --data folder (one list per folder), tokenized and length-checked.

    Raises before anything is compiled: a missing split names the folder and the splits it has, records
    whose image is missing or does not decode (`paliseg.dataset`) are listed by file:line, and so are the
    examples whose tokens do not fit `seq_len`, with the length they need.
    """
    per_folder: list[list[Example]] = []
    unusable: list[dataset.Skip] = []
    too_long: list[tuple[str, int]] = []
    for folder in config.data:
        examples = []
        # The mask loss reads the ground-truth masks: a missing or unreadable one is refused here, not mid-run.
        masks = config.mask_loss_weight > 0
        for checked in dataset.check(dataset.read_records(folder, config.split), masks=masks):
            if isinstance(checked, dataset.Skip):
                unusable.append(checked)
                continue
            record = checked.record
            # encode_example truncates silently (as big_vision does); one extra slot shows whether it would.
            text = tokenizer.encode_example(record.prefix, record.suffix, config.seq_len + 1)
            if text["mask_input"][-1]:
                too_long.append((record.where, _length(tokenizer, record)))
                continue
            fields = {key: np.asarray(text[key][:-1], np.int32) for key in TEXT_FIELDS}
            examples.append(Example(record, fields, checked.width, checked.height))
        if not examples and not too_long and not unusable:
            raise ValueError(f"{dataset.split_location(folder, config.split)}: no training examples")
        per_folder.append(examples)
    if unusable:
        counts = ", ".join(f"{reason}: {count}" for reason, count in dataset.skip_counts(unusable).items())
        listed = "\n  ".join(f"{skip.where}: {skip.message}" for skip in unusable[:20])
        more = f"\n  ... and {len(unusable) - 20} more" if len(unusable) > 20 else ""
        raise ValueError(
            f"{len(unusable)} record(s) cannot be trained on ({counts}; `paliseg validate` "
            f"lists every problem):\n  {listed}{more}"
        )
    if too_long:
        longest = max(length for _, length in too_long)
        listed = "\n  ".join(f"{where}: {length} tokens" for where, length in too_long[:20])
        more = f"\n  ... and {len(too_long) - 20} more" if len(too_long) > 20 else ""
        raise ValueError(
            f"{len(too_long)} example(s) do not fit --seq-len {config.seq_len} "
            f"(the longest needs {longest}; raise --seq-len or drop them):\n  {listed}{more}"
        )
    return per_folder


def mask_loss_fields(seq_len: int) -> dict[str, tuple[tuple[int, ...], type]]:
    """The shape and dtype of each of an example's mask-loss arrays (`mask_loss_targets`). Its objects get
    a fixed number of slots: the most objects with seg tokens (4 loc + 16 seg tokens each) `seq_len` tokens
    hold, so every example fits and the step's shapes depend on the config only."""
    slots = seq_len // (4 + codec.SEG_PER_OBJECT)
    return {
        "seg_positions": ((slots, codec.SEG_PER_OBJECT), np.int32),
        "target_masks": ((slots, MASK_SIZE, MASK_SIZE), np.float32),
        "target_objects": ((slots,), np.float32),
    }


def mask_loss_targets(
    text: dict[str, np.ndarray], target_masks: np.ndarray, seg_ids: np.ndarray, seq_len: int
) -> dict[str, np.ndarray]:
    """The mask loss's targets of one example (`train.step.mask_loss`): its objects with seg tokens, in suffix
    order, in zero-padded slots (`mask_loss_fields`): `seg_positions` int32 [slots, 16], the index in
    `tokens[1:]` (the step's targets) of each seg token of its tokenized `text`; `target_masks` float32
    [slots, 64, 64], the object's ground truth as the VAE's encoder sees it (`object_crops`, or the crops the
    geometric augmentation encoded); `target_objects` float32 [slots], 1 for a real object."""
    suffix_segs = np.isin(text["tokens"], seg_ids) & (text["mask_loss"] == 1)
    positions = (np.flatnonzero(suffix_segs) - 1).reshape(-1, codec.SEG_PER_OBJECT)
    targets = {key: np.zeros(shape, dtype) for key, (shape, dtype) in mask_loss_fields(seq_len).items()}
    targets["seg_positions"][: len(positions)] = positions
    targets["target_masks"][: len(target_masks)] = target_masks
    targets["target_objects"][: len(target_masks)] = 1.0
    return targets


def object_crops(example: Example) -> np.ndarray:
    """float32 [objects with seg tokens, 64, 64]: each such object's ground truth cropped to its box (its loc
    tokens) and resized as the VAE's encoder sees it (`vae.masks.crop_to_64`), in suffix order. The record's
    mask is the union of its prompt's objects, the mask `paliseg eval` scores against."""
    record = example.record
    boxes = [
        codec.locs_to_box(o.locs, example.width, example.height)
        for o in codec.parse_suffix(record.suffix, require_seg=False).objects
        if o.seg is not None
    ]
    if not boxes:
        return np.zeros((0, MASK_SIZE, MASK_SIZE), np.float32)
    mask = dataset.read_mask(record, example.width, example.height)
    return np.stack([crop_to_64(mask, box) for box in boxes])


def annotation_digests(config: TrainConfig) -> dict[str, str]:
    """SHA-256 of each --data folder's split: a resumed run checks its data did not change."""
    return {folder: dataset.split_digest(folder, config.split) for folder in config.data}


def _length(tokenizer, record: records.Record) -> int:
    longest = 4096
    return int(np.sum(tokenizer.encode_example(record.prefix, record.suffix, longest)["mask_input"]))


def _group_seed(seed: int, group: int) -> int:
    """The 32-bit shuffle seed of a group (grain adds the epoch to it)."""
    return int(np.random.SeedSequence([seed, 2, group]).generate_state(1)[0])


def sample_order(config: TrainConfig, per_folder: list[list[Example]]) -> grain.MapDataset:
    """The sample order (see the module docstring): element n, slot n % B of step n // B, is an example id
    (an index into the concatenation of the folders' examples); infinite."""
    offsets = np.cumsum([0] + [len(examples) for examples in per_folder])
    if config.balance_prompts:
        by_prompt: dict[str, list[int]] = collections.defaultdict(list)
        for folder, examples in enumerate(per_folder):
            for i, example in enumerate(examples):
                by_prompt[example.record.prefix].append(int(offsets[folder]) + i)
        groups = [np.asarray(by_prompt[prompt]) for prompt in sorted(by_prompt)]
        weights = [1.0] * len(groups)
    elif config.data_weights is not None:
        groups = [np.arange(offsets[i], offsets[i + 1]) for i in range(len(per_folder))]
        weights = list(config.data_weights)
    else:
        groups, weights = [np.arange(offsets[-1])], [1.0]
    streams = [
        grain.MapDataset.source(members).shuffle(seed=_group_seed(config.seed, group)).repeat()
        for group, members in enumerate(groups)
    ]
    return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)


def photometric(image: np.ndarray, rng: np.random.Generator, config: TrainConfig) -> np.ndarray:
    """Photometric jitter on an HxWx3 image in [-1, 1], as tf.image's adjust_* ops on [0, 1] values:
    brightness adds a delta, contrast scales around each channel's mean, saturation blends with grey."""
    x = (image + 1.0) * 0.5
    x = x + rng.uniform(-config.brightness, config.brightness)
    mean = x.mean(axis=(0, 1), keepdims=True)
    x = (x - mean) * rng.uniform(1 - config.contrast, 1 + config.contrast) + mean
    grey = x @ np.asarray([0.2989, 0.587, 0.114], np.float32)
    x = grey[..., None] + (x - grey[..., None]) * rng.uniform(1 - config.saturation, 1 + config.saturation)
    return (np.clip(x, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


class TrainData:
    """Batches for this process: dicts of numpy arrays shaped [grad_accum, local_micro_batch, ...]."""

    def __init__(
        self,
        config: TrainConfig,
        tokenizer,
        image_size: int,
        process_index: int = 0,
        process_count: int = 1,
        vae_path: str | os.PathLike | None = None,
    ):
        """`vae_path`: the run's VAE (the one that wrote the data's seg tokens), which the geometric
        augmentation re-encodes the moved masks with; needed only with --augment-geometric/--augment-flip."""
        if config.micro_batch_size % process_count:
            raise ValueError(
                f"the micro-batch ({config.batch_size} / --grad-accum {config.grad_accum}) must be "
                f"a multiple of the number of processes ({process_count})"
            )
        self.config = config
        self.image_size = image_size
        self.per_folder = read_examples(config, tokenizer)
        self.digests = annotation_digests(config)
        self.examples = [example for examples in self.per_folder for example in examples]
        self.order = sample_order(config, self.per_folder)
        self.tokenizer = tokenizer  # the augmented suffixes are tokenized as they are made
        self.geometric = config.augment_geometric or config.augment_flip
        if self.geometric and vae_path is None:
            raise ValueError("the geometric augmentation re-encodes masks: it needs the run's VAE (vae_path)")
        self.vae_path = vae_path
        self._vae = None  # loaded by the first augmented example, in each loading process
        local = config.micro_batch_size // process_count
        slots = np.arange(config.batch_size).reshape(config.grad_accum, config.micro_batch_size)
        self.local_slots = slots[:, process_index * local : (process_index + 1) * local]  # [accum, local]

    def __len__(self) -> int:
        return len(self.examples)

    def load(self, example_id: int, step: int, slot: int) -> dict[str, np.ndarray]:
        """The arrays of example `example_id` in slot `slot` of step `step`'s global batch: "image" float32
        [size, size, 3], the TEXT_FIELDS and, with the mask loss, its targets (`mask_loss_targets`). With the
        geometric augmentation (seeded by (seed, 4, step, slot)) the image is moved and the text and mask
        targets describe the moved objects (`train.augment`)."""
        example, config = self.examples[example_id], self.config
        try:
            pixels = images.read_image(example.record.image_path)
        except ValueError as error:
            raise ValueError(f"{example.record.where}: {error}") from None
        if self.geometric:
            image, text, crops = self._moved(example, pixels, np.random.default_rng([config.seed, 4, step, slot]))
        else:
            image, text = images.preprocess(pixels, self.image_size), example.text
            crops = object_crops(example) if config.mask_loss_weight > 0 else None
        if config.augment:
            image = photometric(image, np.random.default_rng([config.seed, 3, step, slot]), config)
        loaded = {"image": image, **text}
        if config.mask_loss_weight > 0:
            loaded.update(mask_loss_targets(text, crops, self.tokenizer.seg_ids, config.seq_len))
        return loaded

    def _moved(self, example: Example, pixels, rng: np.random.Generator) -> tuple[np.ndarray, dict, np.ndarray]:
        """(image, text fields, crops of the objects with seg tokens) of `example` under a geometric transform
        drawn from `rng`: every object's mask is the record's union mask (see `train.augment`)."""
        record = example.record
        objects = codec.parse_suffix(record.suffix, require_seg=False).objects
        union = dataset.read_mask(record, example.width, example.height) if any(o.seg for o in objects) else None
        transform = augment.draw_transform(rng, self.config, self.image_size)
        moved = augment.transform_example(pixels, record.suffix, [union] * len(objects), transform,
                                          self.config.augment_min_visible)  # fmt: skip
        # The run's VAE runs on the CPU: a worker process never claims an accelerator, and the codes do not
        # depend on the process that encoded them (--workers 0 on a GPU host gives the batches of --workers 2).
        with _on_the_cpu():
            if self._vae is None:
                self._vae = vae.load(self.vae_path)
            [targets] = augment.encode(self._vae, [moved])
        text = self.tokenizer.encode_example(record.prefix, targets.suffix, self.config.seq_len)
        return moved.image, {key: np.asarray(text[key], np.int32) for key in TEXT_FIELDS}, targets.target_masks

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_vae": None}  # each loading process loads its own

    def _element(self, index: int) -> dict[str, np.ndarray]:
        """Element `index` of this process's grain dataset: local slot index % L of step index // L."""
        step, local = divmod(index, self.local_slots.size)
        slot = int(self.local_slots.flat[local])
        example_id = int(self.order[step * self.config.batch_size + slot])
        return {"example_id": np.int64(example_id), **self.load(example_id, step, slot)}

    def _stack(self, elements: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """A step's elements -> its batch, [grad_accum, local_micro_batch, ...]."""
        shape = self.local_slots.shape
        return {
            key: np.stack([e[key] for e in elements]).reshape(*shape, *value.shape)
            for key, value in elements[0].items()
        }

    def _steps(self, start_step: int, end_step: int) -> grain.MapDataset:
        per_step = self.local_slots.size
        return (
            grain.MapDataset.range(start_step * per_step, end_step * per_step)
            .map(self._element)
            .batch(per_step, batch_fn=self._stack)
        )

    def example_ids(self, step: int) -> np.ndarray:
        """int [grad_accum, local_micro_batch]: which examples (indices into `examples`) this process's batch
        of `step` holds."""
        first = step * self.config.batch_size
        return np.asarray([self.order[first + int(slot)] for slot in self.local_slots.flat]).reshape(
            self.local_slots.shape
        )

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of `step`, loaded in the calling thread."""
        batch = self._steps(step, step + 1)[0]
        del batch["example_id"]
        return batch

    def state(self, step: int) -> dict[str, int]:
        """The data state a checkpoint of `step` saves (see the module docstring)."""
        return {"global_next_index": step * self.config.batch_size}

    def check_state(self, state: dict[str, int] | None, step: int) -> None:
        """Refuse a checkpoint of `step` whose saved data state is another step's; a checkpoint written before
        data states were saved has none (None) and resumes from its step."""
        if state is not None and state != self.state(step):
            raise ValueError(
                f"checkpoint {step}: its data state {state} is not that of step {step} ({self.state(step)}; "
                f"--batch-size {self.config.batch_size})"
            )

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """(step, example ids, batch) for start_step..end_step-1 (ids and arrays as `example_ids` and `batch`
        give them), loaded `--prefetch` steps ahead by `--workers` grain worker processes."""
        _accept_absl_defaults()
        prefetch = self.config.prefetch
        batches = self._steps(start_step, end_step).to_iter_dataset(
            grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=prefetch)
        )
        batches = batches.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=self.config.workers, per_worker_buffer_size=prefetch),
            worker_init_fn=_start_worker,
        )
        iterator = iter(batches)
        try:
            for step, shared in zip(range(start_step, end_step), iterator):
                # A worker's arrays arrive in shared memory, unlinked when their array is freed: plain copies
                # free them now, whatever the step keeps (a copy costs little beside the decoding).
                batch = {key: np.array(value) for key, value in shared.items()}
                yield step, batch.pop("example_id"), batch
        finally:
            iterator.close()


def _on_the_cpu() -> contextlib.AbstractContextManager:
    """Where the geometric augmentation's VAE runs: the CPU. Only where another backend is the default does
    this set the default device (a context that is part of jit's cache key: on a CPU host the VAE's programs
    stay the ones every other caller compiled)."""
    if jax.default_backend() == "cpu":
        return contextlib.nullcontext()
    return jax.default_device(jax.local_devices(backend="cpu")[0])


def _accept_absl_defaults() -> None:
    """grain 0.2.18 reads an absl flag when it starts worker processes, which fails in a program that never
    parsed absl flags (paliseg has its own settings): their defaults stand."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _start_worker(worker_index: int, worker_count: int) -> None:
    """A grain worker's start: JAX on the CPU only (the geometric augmentation's VAE; an accelerator is the
    training process's), and exit when the training process does. grain's workers stop when the iterator
    is closed; a killed training process never closes it, and its workers would run on."""
    del worker_index, worker_count
    jax.config.update("jax_platforms", "cpu")
    parent = multiprocessing.parent_process()

    def watch() -> None:
        parent.join()
        os._exit(1)

    threading.Thread(target=watch, name="paliseg-parent-watch", daemon=True).start()
