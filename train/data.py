"""The training input pipeline: annotation JSONL -> batches of images and token arrays.

Why not tf.data: a deterministic, index-based pipeline makes `--resume` exact by construction and free to
checkpoint. The batch of step `s` is a pure function of (config, s):

- which examples: a sampler draws, per step, a group for each slot of the global batch (groups are the
  whole data, the `--data` folders under `--data-weights`, or the prompts under `--balance-prompts`), and
  takes the group's next example from a permutation that is a function of (seed, group, epoch). The only
  state is how many examples each group has given so far, which `seek(step)` replays in milliseconds.
- how each image is augmented: brightness, contrast and saturation factors seeded by (seed, step, slot).

So the iterator position is the step number, and a resumed run reads exactly the batches an uninterrupted
one would. Importing TensorFlow would cost seconds and memory for none of this. Images are decoded and
resized with PIL (via `paliseg.images`, the model's own preprocessing) in a thread pool, a few steps ahead.

Multi-host: the global batch is laid out [grad_accum, micro_batch]; process p of P loads the slice
p/P..(p+1)/P of every micro-batch, which `jax.make_array_from_process_local_data` reassembles.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from paliseg import dataset, images, records
from paliseg import tokens as codec
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


def mask_loss_targets(example: Example, seg_ids: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """The mask loss's targets of one example (`train.step.mask_loss`): its objects with seg tokens, in suffix
    order, in zero-padded slots (`mask_loss_fields`): `seg_positions` int32 [slots, 16], the index in
    `tokens[1:]` (the step's targets) of each seg token; `target_masks` float32 [slots, 64, 64], the
    ground-truth mask cropped to the object's box (its loc tokens) and resized as the VAE's encoder sees it
    (`vae.masks.crop_to_64`); `target_objects` float32 [slots], 1 for a real object. The record's mask is the
    union of its prompt's objects, the mask `paliseg eval` scores against."""
    text, record = example.text, example.record
    suffix_segs = np.isin(text["tokens"], seg_ids) & (text["mask_loss"] == 1)
    positions = (np.flatnonzero(suffix_segs) - 1).reshape(-1, codec.SEG_PER_OBJECT)
    objects = [o for o in codec.parse_suffix(record.suffix, require_seg=False).objects if o.seg is not None]
    targets = {key: np.zeros(shape, dtype) for key, (shape, dtype) in mask_loss_fields(seq_len).items()}
    if objects:
        mask = dataset.read_mask(record, example.width, example.height)
        targets["seg_positions"][: len(objects)] = positions
        targets["target_objects"][: len(objects)] = 1.0
        for slot, obj in enumerate(objects):
            box = codec.locs_to_box(obj.locs, example.width, example.height)
            targets["target_masks"][slot] = crop_to_64(mask, box)
    return targets


def annotation_digests(config: TrainConfig) -> dict[str, str]:
    """SHA-256 of each --data folder's split: a resumed run checks its data did not change."""
    return {folder: dataset.split_digest(folder, config.split) for folder in config.data}


def _length(tokenizer, record: records.Record) -> int:
    longest = 4096
    return int(np.sum(tokenizer.encode_example(record.prefix, record.suffix, longest)["mask_input"]))


class Sampler:
    """Which example fills each slot of the global batch at each step (see the module docstring)."""

    def __init__(self, group_members: Sequence[np.ndarray], weights: Sequence[float], seed: int, global_batch: int):
        self.group_members = [np.asarray(m, np.int64) for m in group_members]
        self.weights = np.asarray(weights, np.float64) / np.sum(weights)
        self.seed = seed
        self.global_batch = global_batch
        self._step = 0
        self._taken = np.zeros(len(self.group_members), np.int64)  # examples drawn per group before _step
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    def _groups(self, step: int) -> np.ndarray:
        if len(self.group_members) == 1:
            return np.zeros(self.global_batch, np.int64)
        return np.random.default_rng([self.seed, 1, step]).choice(len(self.weights), self.global_batch, p=self.weights)

    def _permutation(self, group: int, epoch: int) -> np.ndarray:
        key = (group, epoch)
        if key not in self._permutations:
            if len(self._permutations) > 64:
                self._permutations.clear()
            self._permutations[key] = np.random.default_rng([self.seed, 2, group, epoch]).permutation(
                len(self.group_members[group])
            )
        return self._permutations[key]

    def seek(self, step: int) -> None:
        if step < self._step:
            self._step, self._taken[:] = 0, 0
        while self._step < step:
            self._taken += np.bincount(self._groups(self._step), minlength=len(self.group_members))
            self._step += 1

    def indices(self, step: int) -> np.ndarray:
        """Example ids (into the concatenation of all groups' members) for the global batch of `step`."""
        self.seek(step)
        groups = self._groups(step)
        taken = self._taken.copy()
        out = np.empty(self.global_batch, np.int64)
        for slot, group in enumerate(groups):
            size = len(self.group_members[group])
            epoch, offset = divmod(int(taken[group]), size)
            out[slot] = self.group_members[group][self._permutation(group, epoch)[offset]]
            taken[group] += 1
        return out


def make_sampler(config: TrainConfig, per_folder: list[list[Example]]) -> Sampler:
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
    return Sampler(groups, weights, config.seed, config.batch_size)


def augment(image: np.ndarray, rng: np.random.Generator, config: TrainConfig) -> np.ndarray:
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

    def __init__(self, config: TrainConfig, tokenizer, image_size: int, process_index: int = 0, process_count: int = 1):
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
        self.sampler = make_sampler(config, self.per_folder)
        self.seg_ids = tokenizer.seg_ids  # where the mask loss's targets are (`mask_loss_targets`)
        local = config.micro_batch_size // process_count
        slots = np.arange(config.batch_size).reshape(config.grad_accum, config.micro_batch_size)
        self.local_slots = slots[:, process_index * local : (process_index + 1) * local]  # [accum, local]

    def __len__(self) -> int:
        return len(self.examples)

    def _load_image(self, example_id: int, step: int, slot: int) -> np.ndarray:
        record = self.examples[example_id].record
        try:
            image = images.preprocess(images.read_image(record.image_path), self.image_size)
        except ValueError as error:
            raise ValueError(f"{record.where}: {error}") from None
        if self.config.augment:
            image = augment(image, np.random.default_rng([self.config.seed, 3, step, slot]), self.config)
        return image

    def _assemble(self, example_ids: np.ndarray, loaded: list[np.ndarray]) -> dict[str, np.ndarray]:
        shape = self.local_slots.shape
        batch = {"image": np.stack(loaded).reshape(*shape, *loaded[0].shape)}
        for key in TEXT_FIELDS:
            batch[key] = np.stack([self.examples[int(e)].text[key] for e in example_ids.ravel()]).reshape(*shape, -1)
        if self.config.mask_loss_weight > 0:
            seq_len = self.config.seq_len
            targets = [mask_loss_targets(self.examples[int(e)], self.seg_ids, seq_len) for e in example_ids.ravel()]
            for key, (field_shape, _) in mask_loss_fields(seq_len).items():
                batch[key] = np.stack([t[key] for t in targets]).reshape(*shape, *field_shape)
        return batch

    def example_ids(self, step: int) -> np.ndarray:
        """int [grad_accum, local_micro_batch]: which examples (indices into `examples`) this process's batch
        of `step` holds."""
        return self.sampler.indices(step)[self.local_slots]

    def _jobs(self, step: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
        example_ids = self.example_ids(step)
        return example_ids, [(int(e), step, int(s)) for e, s in zip(example_ids.ravel(), self.local_slots.ravel())]

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's batch of `step`, loaded in the calling thread."""
        example_ids, jobs = self._jobs(step)
        return self._assemble(example_ids, [self._load_image(*job) for job in jobs])

    def iterate(self, start_step: int, end_step: int) -> Iterator[tuple[int, np.ndarray, dict[str, np.ndarray]]]:
        """(step, example ids, batch) for start_step..end_step-1 (ids and arrays as `example_ids` and `batch`
        give them); images load `prefetch` steps ahead on `workers` threads."""
        with concurrent.futures.ThreadPoolExecutor(self.config.workers, thread_name_prefix="paliseg-data") as pool:
            pending: collections.deque = collections.deque()
            next_step = start_step
            while next_step < end_step or pending:
                while next_step < end_step and len(pending) < self.config.prefetch:
                    example_ids, jobs = self._jobs(next_step)
                    pending.append((next_step, example_ids, [pool.submit(self._load_image, *job) for job in jobs]))
                    next_step += 1
                step, example_ids, futures = pending.popleft()
                yield step, example_ids, self._assemble(example_ids, [future.result() for future in futures])
