"""What a federated client trains, behind a small injected interface.

The ClientApp and ServerApp know nothing about Wav2Vec2 or SynthGRID: they load
a *task factory* named in the run config (``run_config["task"] =
"package.module:function"``), call it with the run config, and get a
:class:`FederatedTask`:

* ``build_model() -> nn.Module``: must give the same frozen weights on every
  node (from a checkpoint, or a seeded init); only trainable parameters travel.
* ``build_loaders(partition_id, num_partitions) -> (train_loader, eval_loader)``:
  the client's OWN data; it never leaves the client.
* ``loss_fn(model, batch) -> (mean loss tensor, batch size)``.
* ``error_counts(model, batch) -> (word errors, reference words)`` for WER.

The import string works in every runtime (in-process, Ray actors, SuperNode
subprocesses), which a Python closure would not.

Only model updates leave a client. Nothing in this module puts data, features
or transcripts in a record: :func:`federated_state` is the trainable
``named_parameters`` of the model and nothing else.
"""

from __future__ import annotations

import copy
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol

import numpy as np
import torch
from torch import nn

from common.device import move_to_device

Batch = Any


@dataclass
class FederatedTask:
    build_model: Callable[[], nn.Module]
    build_loaders: Callable[[int, int], tuple[Iterable[Batch], Iterable[Batch]]]
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]]
    error_counts: Callable[[nn.Module, Batch], tuple[int, int]]


class LocalDP(Protocol):
    """Sample-level DP-SGD for one client's local training (implemented with Opacus in privacy/dp.py).

    `attach` returns the private (model, optimizer, loader) for this round's training;
    `epsilon(delta)` is the budget spent by this client over ALL rounds so far.
    """

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: Iterable[Batch]) -> tuple[nn.Module, torch.optim.Optimizer, Iterable[Batch]]: ...

    def epsilon(self, delta: float) -> float: ...

    def to_json(self) -> str: ...  # the privacy ledger so far (kept in checkpoints and client state)

    def restore(self, saved: str, steps: int) -> None: ...  # continue a to_json() ledger of `steps` steps (before attach)


def load_object(reference: str) -> Any:
    """'package.module:attribute' -> the attribute."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"run_config['task'] must look like 'package.module:function', got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(f"cannot import task module {module_name!r} (from run_config['task']={reference!r}): {error}") from error
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no {attribute!r} (from run_config['task']={reference!r})") from None


def load_task(run_config: Mapping[str, Any]) -> FederatedTask:
    if "task" not in run_config:
        raise KeyError("run_config has no 'task' (a 'package.module:function' returning a FederatedTask)")
    task = load_object(str(run_config["task"]))(dict(run_config))
    if not isinstance(task, FederatedTask):
        raise TypeError(f"{run_config['task']} returned {type(task).__name__}, expected FederatedTask")
    return task


# --------------------------------------------------------------------------- state and deltas
def federated_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The parameters that are trained and exchanged: trainable named_parameters, as float32 numpy."""
    return {name: p.detach().cpu().to(torch.float32).numpy().copy() for name, p in model.named_parameters() if p.requires_grad}


def load_federated_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy exchanged arrays into the model's trainable parameters; names and shapes must match exactly."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise KeyError(f"federated state does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(np.asarray(arrays[name]))
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"federated state {name!r} has shape {tuple(value.shape)}, the model expects {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def write_state_npz(path, state: Mapping[str, np.ndarray]) -> None:
    """The trained parameters as an .npz (atomically: a crash leaves the previous file or none)."""
    import io

    from common.files import atomic_write_bytes

    buffer = io.BytesIO()
    np.savez(buffer, **state)
    atomic_write_bytes(path, buffer.getvalue())


def read_state_npz(path) -> dict[str, np.ndarray]:
    """:func:`write_state_npz`'s file -> numpy dict (no pickled objects are read)."""
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def state_to_arrays(state: Mapping[str, np.ndarray]):
    """numpy dict -> flwr ArrayRecord (keys kept in order)."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord({name: Array(np.ascontiguousarray(value)) for name, value in state.items()})


# the parsed header of each .npy header seen (bytes -> dtype, fortran order, shape, data offset); see _array_numpy
_NPY_HEADERS: dict[bytes, tuple[np.dtype, bool, tuple[int, ...], int]] = {}
_NPY_HEADERS_KEPT = 1024


def _array_numpy(array) -> np.ndarray:
    """``array.numpy()`` (a flwr Array holds ``np.save``'s bytes), parsing each distinct header once.

    Flower's ``Array.numpy`` calls ``np.load``, which parses the header's Python literal for every array: with the
    ~6 arrays of a LoRA update decoded by every client and again by the server, 9 % of a round of one-step clients
    (py-spy, session 20). The headers of a federation's arrays are a handful of distinct byte strings, so each is
    parsed once by numpy's own reader; the data are then a copy of the bytes after it. Anything but a plain .npy
    (another serialisation type, an object array) goes through ``Array.numpy`` as before.
    """
    data = array.data
    if array.stype != "numpy.ndarray" or not data.startswith(b"\x93NUMPY") or len(data) < 12 or data[6:8] not in (b"\x01\x00", b"\x02\x00"):
        return array.numpy()
    size_bytes = 2 if data[6] == 1 else 4  # .npy format 1.0: a 2-byte header length; 2.0: 4 bytes
    offset = 8 + size_bytes + int.from_bytes(data[8:8 + size_bytes], "little")
    header = data[:offset]
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        import io

        stream = io.BytesIO(header)
        np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if size_bytes == 2 else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(stream)
        if dtype.hasobject or stream.tell() != offset:
            return array.numpy()
        parsed = (dtype, fortran, shape, offset)
        if len(_NPY_HEADERS) < _NPY_HEADERS_KEPT:  # bounded: a client sending ever new shapes cannot grow the server
            _NPY_HEADERS[header] = parsed
    dtype, fortran, shape, offset = parsed
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != offset + count * dtype.itemsize:
        return array.numpy()  # np.load names what is wrong with a truncated or padded array
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset).copy()
    return flat.reshape(shape, order="F" if fortran else "C")


def arrays_to_state(record) -> dict[str, np.ndarray]:
    """flwr ArrayRecord -> numpy dict (equal to ``{name: array.numpy()}``, see _array_numpy)."""
    return {name: _array_numpy(array) for name, array in record.items()}


def compute_delta(new: Mapping[str, np.ndarray], old: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (np.asarray(new[name], np.float32) - np.asarray(old[name], np.float32)) for name in old}


def apply_delta(old: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {name: (np.asarray(old[name], np.float32) + np.asarray(delta[name], np.float32)) for name in old}


def update_norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


# --------------------------------------------------------------------------- local training / evaluation
def build_local_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"local optimizer {name!r}: expected sgd | adam")


class IterateAverage:
    """Bias-corrected exponential moving average of a run's iterates theta_1..theta_t (global models or parameters).

    avg_t = sum_i beta^(t-i) theta_i / sum_i beta^(t-i), i.e. a <- beta a + (1 - beta) theta and avg = a / (1 - beta^t)
    (Adam's bias correction), so the starting model carries no weight and round t's model weighs (1 - beta) / (1 - beta^t).
    Under DP each round's step carries fresh noise that the next rounds do not undo; averaging the iterates averages
    that noise over about 1 / (1 - beta) rounds (Polyak-Ruppert averaging; De et al. 2022 use an EMA for DP-SGD).
    The server averages its global models per round (server_app.run_server); the centralised baseline its model per
    optimiser step (:func:`train_local`'s ``ema``).
    """

    def __init__(self, decay: float):
        if not 0 < float(decay) < 1:
            raise ValueError(f"ema (federated.ema)={decay!r}: expected a decay in (0, 1) (0 turns averaging off)")
        self.decay = float(decay)
        self.steps = 0
        self.accumulator: dict[str, np.ndarray] = {}

    def update(self, state: Mapping[str, np.ndarray]) -> None:
        self.steps += 1
        for name, value in state.items():
            value = np.asarray(value, np.float64)
            previous = self.accumulator.get(name, np.zeros_like(value))
            self.accumulator[name] = self.decay * previous + (1.0 - self.decay) * value

    def average(self) -> dict[str, np.ndarray]:
        if not self.steps:
            raise RuntimeError("IterateAverage.average() before any update")
        correction = 1.0 - self.decay ** self.steps
        return {name: (value / correction).astype(np.float32) for name, value in self.accumulator.items()}


def train_local(
    model: nn.Module,
    loader: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]],
    *,
    epochs: int = 1,
    steps: Optional[int] = None,
    lr: float = 0.05,
    optimizer: str = "sgd",
    dp: Optional[LocalDP] = None,
    prox_mu: float = 0.0,
    global_params: Optional[Mapping[str, np.ndarray]] = None,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[int, Optional[float], int], None]] = None,
    optimizer_reset_every: int = 0,
    lr_decay: str = "none",
    ema: float = 0.0,
    checkpoint_every: int = 0,
    on_checkpoint: Optional[Callable[[dict[str, Any]], None]] = None,
    resume_from: Optional[Mapping[str, Any]] = None,
) -> dict[str, float]:
    """Local SGD or Adam (DP-SGD / DP-Adam when `dp` is given) for `epochs`, or exactly `steps` steps if set.

    The optimiser is created here, so its state (Adam's moments) lives for one
    round on one client and never travels; under DP it only post-processes the
    noised gradient, so the guarantee is the same as DP-SGD's.

    FedProx: the proximal term mu/2 ||w - w_global||^2 is applied as its exact
    gradient step, w -= lr * mu * (w - w_global), after each optimiser step,
    not through the loss. Under DP-SGD this matters: Opacus builds the update
    from per-sample gradients only, so a data-independent term in the loss would
    be silently dropped; as a separate step it is post-processing (no privacy
    cost) and identical to the loss term for plain SGD. With Adam the proximal step
    stays this plain step (Adam does not rescale it), so mu means the same with both.

    device: where the model is moved and each batch goes (`common.device`); None = where the model is.
    on_step(steps done, the step's loss or None for an empty batch, its examples): after every step (logging).
    optimizer_reset_every: k > 0 re-creates the optimiser (fresh Adam moments) before every k-th step, the data
    order unchanged: the centralised baseline run as a federation's client restarts its optimiser every round
    (a diagnostic of FedAvg's gap, federated.centralised_optimizer_reset_every); 0 keeps one optimiser.
    lr_decay: "linear" sets the lr of step i (0-based) of `steps` to lr * (1 - i / steps), so the last step takes
    1/steps of it (the centralised baseline's side of federated.lr_decay); "none" keeps lr. Needs `steps`.
    ema: beta in (0, 1) leaves the model at the bias-corrected EMA of its trainable parameters after every step
    (:class:`IterateAverage`; the centralised baseline's side of federated.ema); 0 leaves the last step's.
    checkpoint_every / on_checkpoint: k > 0 calls on_checkpoint(state) after every k-th step (after on_step) with
    what continuing needs (:func:`local_training_state`: trainable parameters, optimiser, the loader's position and
    generator, torch's generator, the EMA, the running loss); resume_from: such a state, to continue after its step
    exactly as if never stopped. Without DP both need a loader with a torch ``generator`` (its shuffle order).
    Under DP the state also holds the privacy ledger (``dp.to_json()``), and a resumed run continues it: its epsilon
    counts every step of the model it releases. The DP loader's batches and noise come from the OS CSPRNG, never
    stored, so the resumed steps draw new ones (no loader position is restored) and the run is not bit-identical
    to an uninterrupted one; the steps an interrupted attempt ran after its checkpoint released nothing (their
    model was not written), so the ledger does not hold them.
    """
    if prox_mu > 0 and global_params is None:
        raise ValueError("FedProx (prox_mu > 0) needs global_params")
    if isinstance(optimizer_reset_every, bool) or not isinstance(optimizer_reset_every, int) or optimizer_reset_every < 0:
        raise ValueError(f"optimizer_reset_every={optimizer_reset_every!r}: expected an int >= 0 (0: never)")
    if optimizer_reset_every and dp is not None:
        raise ValueError("optimizer_reset_every > 0 with DP: Opacus wraps the optimiser once; resets are for the non-private baseline only")
    if lr_decay not in ("none", "linear"):
        raise ValueError(f"lr_decay={lr_decay!r}: expected none | linear")
    if lr_decay != "none" and (steps is None or steps < 1):
        raise ValueError(f"lr_decay={lr_decay!r} needs a step count (steps >= 1), got steps={steps!r}")
    if (checkpoint_every or resume_from is not None) and dp is None and getattr(loader, "generator", None) is None:
        raise ValueError("train_local checkpoints / resumption without DP need a loader with a torch generator "
                         "(DataLoader(..., generator=...)): its shuffle order is the data's position (the loader has none)")
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    anchors = {name: torch.as_tensor(np.asarray(global_params[name])).to(device) for name in trainable} if prox_mu > 0 else {}
    optimizer_name = optimizer
    optimizer = build_local_optimizer(optimizer_name, list(trainable.values()), lr)
    run_model, run_loader = model, loader
    if dp is not None:
        from privacy.dp import dp_step_on_empty_batch

        if resume_from is not None:
            if resume_from.get("dp_ledger") is None:
                raise ValueError("resume_from holds no privacy ledger (a state of a run without DP): resuming it under DP "
                                 "would release steps no accountant counts")
            dp.restore(str(resume_from["dp_ledger"]), int(resume_from["done"]))
        run_model, optimizer, run_loader = dp.attach(model, optimizer, loader)
    elif resume_from is not None and resume_from.get("dp_ledger") is not None:
        raise ValueError("resume_from is the state of a DP run (it holds a privacy ledger); resume it with its DP session")
    average = IterateAverage(ema) if ema else None
    run_model.train()
    total_loss, total_examples, done = 0.0, 0, 0
    max_epochs = epochs if steps is None else math.inf
    epoch = 0
    generator = getattr(loader, "generator", None) if dp is None else None  # under DP the order is the CSPRNG's
    skip = 0  # batches of the resumed epoch that ran before the checkpoint
    if resume_from is not None:
        from common.seeding import restore_rng_state
        from privacy.federated.server_checkpoint import as_tensors

        done, epoch, skip = int(resume_from["done"]), int(resume_from["epoch"]), int(resume_from["batches_in_epoch"])
        if dp is not None:
            skip = 0  # no position to return to: the DP loader draws every batch afresh from the CSPRNG
        total_loss, total_examples = float(resume_from["total_loss"]), int(resume_from["total_examples"])
        with torch.no_grad():
            for name, value in resume_from["params"].items():
                trainable[name].copy_(torch.as_tensor(np.asarray(value)).to(trainable[name]))
        optimizer.load_state_dict(as_tensors(resume_from["optimizer"]))
        if average is not None:
            average.steps = int(resume_from["ema"]["steps"])
            average.accumulator = {k: np.asarray(v) for k, v in resume_from["ema"]["accumulator"].items()}
        if generator is not None:
            generator.set_state(torch.as_tensor(np.asarray(resume_from["epoch_generator"]), dtype=torch.uint8))
        restore_rng_state(as_tensors(resume_from["generators"]))
    while epoch < max_epochs and (steps is None or done < steps):
        epoch_generator = generator.get_state().clone() if generator is not None else None  # this epoch's shuffle order
        batches_in_epoch = 0
        for batch in run_loader:
            if steps is not None and done >= steps:
                break
            batches_in_epoch += 1
            if skip:
                skip -= 1
                continue
            if optimizer_reset_every and done and done % optimizer_reset_every == 0:
                optimizer = build_local_optimizer(optimizer_name, list(trainable.values()), lr)
            if lr_decay == "linear":
                for group in optimizer.param_groups:
                    group["lr"] = lr * (1.0 - done / steps)
            optimizer.zero_grad(set_to_none=True)
            loss, n = loss_fn(run_model, move_to_device(batch, device))
            if n == 0:  # Poisson sampling can draw an empty batch
                if dp is None:
                    continue
                dp_step_on_empty_batch(optimizer)  # still a (noise-only) step of the mechanism, and accounted
            else:
                loss.backward()
                optimizer.step()
            if prox_mu > 0:
                with torch.no_grad():
                    for name, p in trainable.items():
                        p.sub_(lr * prox_mu * (p - anchors[name].to(p.dtype)))
            if n:
                total_loss += float(loss.detach()) * n
                total_examples += n
            done += 1
            if average is not None:
                average.update({name: p.detach().cpu().numpy() for name, p in trainable.items()})
            if on_step is not None:
                on_step(done, float(loss.detach()) if n else None, n)
            if checkpoint_every and on_checkpoint is not None and done % checkpoint_every == 0:
                on_checkpoint(local_training_state(done, epoch, batches_in_epoch, epoch_generator, total_loss, total_examples,
                                                   trainable, optimizer, average, dp))
        epoch += 1
        if steps is not None and done == 0 and epoch > 3:
            raise RuntimeError("local training made no step in 3 passes over the loader: the client has no data")
    if average is not None and done:
        with torch.no_grad():
            for name, value in average.average().items():
                trainable[name].copy_(torch.as_tensor(value).to(trainable[name]))
    return {"train_loss": total_loss / max(total_examples, 1), "num-examples": total_examples, "steps": done}


def local_training_state(done: int, epoch: int, batches_in_epoch: int, epoch_generator: torch.Tensor, total_loss: float,
                         total_examples: int, trainable: Mapping[str, torch.Tensor], optimizer, average: Optional[IterateAverage],
                         dp: Optional[LocalDP] = None) -> dict[str, Any]:
    """:func:`train_local`'s state after step `done` (arrays, numbers, strings and lists only:
    server_checkpoint.write_checkpoint stores it without pickling). Without DP the loader's position is the generator
    state its epoch started from plus the batches drawn since; under DP (no position: epoch_generator None) the
    privacy ledger after step `done`. The global generators (common.seeding.capture_rng_state) are taken as they are now."""
    from common.seeding import capture_rng_state

    return {"done": done, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "epoch_generator": epoch_generator,
            "dp_ledger": None if dp is None else dp.to_json(),
            "total_loss": total_loss, "total_examples": total_examples,
            "params": {name: p.detach().cpu().numpy().copy() for name, p in trainable.items()},
            "optimizer": copy.deepcopy(optimizer.state_dict()),  # a copy: the optimiser's tensors change in place
            "generators": capture_rng_state(),  # torch's (dropout) and NumPy's (transformers' SpecAugment time masks)
            "ema": None if average is None else {"steps": average.steps, "accumulator": dict(average.accumulator)}}


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Batch],
    loss_fn: Callable[[nn.Module, Batch], tuple[torch.Tensor, int]],
    error_counts: Callable[[nn.Module, Batch], tuple[int, int]],
    device: Optional[torch.device] = None,
) -> dict[str, float]:
    """Mean loss and corpus WER (sum of word errors / sum of reference words) over `loader`."""
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    model.eval()
    total_loss, examples, errors, words = 0.0, 0, 0, 0
    for batch in loader:
        batch = move_to_device(batch, device)
        loss, n = loss_fn(model, batch)
        total_loss += float(loss) * n
        examples += n
        e, w = error_counts(model, batch)
        errors += int(e)
        words += int(w)
    return {
        "eval_loss": total_loss / max(examples, 1),
        "eval_wer": errors / max(words, 1),
        "num-examples": examples,
        "word_errors": errors,
        "words": words,
    }


# --------------------------------------------------------------------------- a tiny task for tests and smoke runs
def tiny_synthetic_task(run_config: Mapping[str, Any]) -> FederatedTask:
    """A 2-layer classifier on synthetic speaker-grouped data ("one word per utterance", so WER = error rate).

    Each utterance is a `dim`-d feature vector of one of `classes` words plus a
    per-speaker offset (the non-IID part); utterances are split over clients
    with :func:`partition_by_speaker`. Deterministic from run_config['seed'].
    """
    from torch.utils.data import DataLoader, TensorDataset

    from privacy.federated.partition import partition_by_speaker

    seed = int(run_config.get("seed", 0))
    dim, classes = 8, 4
    hidden = int(run_config.get("tiny-hidden", 16))
    num_speakers = int(run_config.get("tiny-speakers", 6))
    per_speaker = int(run_config.get("tiny-utterances-per-speaker", 24))
    batch_size = int(run_config.get("batch-size", 16))

    g = torch.Generator().manual_seed(seed + 1)
    centers = torch.randn(classes, dim, generator=g) * 2.0
    offsets = torch.randn(num_speakers, dim, generator=g) * 0.5
    labels = torch.randint(0, classes, (num_speakers * per_speaker,), generator=g)
    speakers = torch.arange(num_speakers).repeat_interleave(per_speaker)
    features = centers[labels] + offsets[speakers] + torch.randn(len(labels), dim, generator=g)

    def build_model() -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, classes))

    def build_loaders(partition_id: int, num_partitions: int):
        parts = partition_by_speaker([f"spk{int(s)}" for s in speakers], num_partitions, seed)
        idx = torch.tensor(parts[partition_id])
        n_eval = max(1, len(idx) // 4)
        train_idx, eval_idx = idx[n_eval:], idx[:n_eval]
        loader_g = torch.Generator().manual_seed(seed + 100 + partition_id)
        train = DataLoader(TensorDataset(features[train_idx], labels[train_idx]), batch_size=batch_size, shuffle=True, generator=loader_g)
        test = DataLoader(TensorDataset(features[eval_idx], labels[eval_idx]), batch_size=batch_size)
        return train, test

    def loss_fn(model: nn.Module, batch):
        x, y = batch
        if len(y) == 0:  # an empty Poisson batch
            return torch.zeros((), requires_grad=True), 0
        return nn.functional.cross_entropy(model(x), y), len(y)

    def error_counts(model: nn.Module, batch):
        x, y = batch
        return int((model(x).argmax(-1) != y).sum()), len(y)

    return FederatedTask(build_model, build_loaders, loss_fn, error_counts)
