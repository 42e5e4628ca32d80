"""The federated task for Wav2Vec2 CTC on SynthGRID (or any corpus in the data.manifest format).

``run_config["task"] = "privacy.federated.synthgrid_task:wav2vec2_synthgrid_task"``
makes the Flower ClientApp / ServerApp (privacy/federated) train a
``Wav2Vec2ForCTC`` on speaker-partitioned clients:

* every client holds whole speakers of the ``train`` split
  (:func:`privacy.federated.partition.partition_by_speaker`, seeded), so the
  federation is non-IID; the last ``task-client-eval-utterances`` utterances of
  each client are held out for Flower's per-round (federated) evaluation and
  never trained on;
* a batch is a dict of tensors only: ``input_values (B, N)`` float waveforms
  (16 kHz, zero-mean / unit-variance per utterance, zero-padded),
  ``attention_mask (B, N)`` long and ``labels (B, L)`` token ids (char or word) padded
  with -100 (as Hugging Face's CTC loss expects). Transcripts are recovered from
  ``labels`` for WER, so no string has to travel inside a batch either. Only
  tensors keeps Opacus' Poisson loader able to build an empty batch.
* :func:`build_model`: ``build_wav2vec2_ctc(size="tiny")`` from the local
  pretrained checkpoint (``task-checkpoint``; "" = random init), then ALWAYS
  :func:`models.wav2vec2.make_dp_compatible`. Doing it in every run (not only
  with DP) means the server, every client, the centralised baseline and the DP
  runs all train exactly the same parameters in the same parametrisation
  (folded positional conv, frozen ``masked_spec_embed``), so the WER difference
  between runs is due to FL / DP and nothing else, and the server's and
  clients' state dicts always match.

Only the trainable parameters (their updates) leave a client; the client app
(client_app.py) builds its reply from ``federated_state(model)`` alone.

Run-config keys read here (Flower allows only str/int/float/bool values):
``task-data-dir``, ``task-checkpoint``, ``task-train-split`` ("train"),
``task-client-eval-utterances`` (4), ``task-trainable-layers`` (-1 = all),
``task-train-positional-conv`` (True), ``task-eval-batch-size`` (16), plus the
shared ``seed`` and ``batch-size``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from privacy.federated.task import FederatedTask

log = logging.getLogger(__name__)

LABEL_PAD = -100  # Hugging Face's ignore index; Wav2Vec2ForCTC masks labels < 0
TASK_REFERENCE = "privacy.federated.synthgrid_task:wav2vec2_synthgrid_task"

DEFAULT_TASK_CONFIG: dict[str, Any] = {
    "task-data-dir": "",
    "task-checkpoint": "",
    "task-train-split": "train",
    "task-client-eval-utterances": 4,
    "task-trainable-layers": -1,
    "task-train-positional-conv": True,
    "task-eval-batch-size": 16,
    "task-tokenizer": "word",  # word | char (data.tokenizer; word units leave the CTC blank plateau on SynthGRID)
    # privacy/federated/lora_task.py (adapter=lora): LoRA on the top task-trainable-layers layers + the CTC head
    "task-lora-rank": 4,
    "task-lora-alpha": 8.0,
    "task-lora-targets": "q_proj,v_proj",
    "task-lora-dropout": 0.0,
}


def make_tokenizer(kind: str, data_dir: str | Path):
    """Char tokenizer, or whole words of the training transcripts (data.tokenizer=word)."""
    from data.manifest import read_split
    from data.tokenizer import CharTokenizer, WordTokenizer

    if kind == "char":
        return CharTokenizer()
    if kind == "word":
        return WordTokenizer(w for u in read_split(data_dir, "train") for w in u.text.split())
    raise ValueError(f"data.tokenizer={kind!r}: the Wav2Vec2 task supports char or word")


# --------------------------------------------------------------------------- data
class CTCPairsDataset(Dataset):
    """(model input, token ids long (L,)) pairs held in memory; the input is a waveform float32 (N,)
    or, for the LoRA task, the frozen encoder's cached output (T, H)."""

    def __init__(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} target sequences")
        self.inputs, self.targets = list(inputs), list(targets)

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]


def collate_waveforms(items: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """-> input_values (B, N) zero-padded, attention_mask (B, N) 1 = real sample, labels (B, L) padded with -100."""
    batch = len(items)
    wave_len = max(int(w.shape[0]) for w, _ in items)
    label_len = max(int(t.shape[0]) for _, t in items)
    input_values = torch.zeros(batch, wave_len)
    attention_mask = torch.zeros(batch, wave_len, dtype=torch.long)
    labels = torch.full((batch, label_len), LABEL_PAD, dtype=torch.long)
    for i, (wave, target) in enumerate(items):
        input_values[i, : len(wave)] = wave
        attention_mask[i, : len(wave)] = 1
        labels[i, : len(target)] = target
    return {"input_values": input_values, "attention_mask": attention_mask, "labels": labels}


def normalise_waveform(wave: np.ndarray) -> torch.Tensor:
    """Zero mean, unit variance per utterance (Wav2Vec2FeatureExtractor's do_normalize)."""
    wave = np.asarray(wave, dtype=np.float32)
    return torch.from_numpy((wave - wave.mean()) / np.sqrt(wave.var() + 1e-7))


# (data dir, split) -> (utterance ids, speakers, transcripts, audio paths, samples per file, sample rate), validated
_SPLIT_CACHE: dict[tuple[str, str], tuple[list[str], list[str], list[str], list[str], list[int], int]] = {}
# (data dir, split) -> normalised waveforms; kept apart so that a task on cached features never holds the audio
_WAVE_CACHE: dict[tuple[str, str], list[torch.Tensor]] = {}


def _split_entry(data_dir: str | Path, split: str, tokenizer=None) -> tuple[tuple[str, str], tuple]:
    """The validated manifest of a split, read once per process: every file checked (transcripts against the first
    caller's tokenizer, as AVSRDataset does), its sample count kept."""
    import soundfile as sf

    from data.dataset import AVSRDataset
    from data.tokenizer import CharTokenizer

    key = (str(Path(data_dir).resolve()), split)
    if key not in _SPLIT_CACHE:
        # the dataset validates every file (exists, decodes, sample rate, transcript in the vocabulary); the
        # waveforms are read by read_split_waveforms only, since its __getitem__ also computes filterbanks wav2vec2 does not use
        dataset = AVSRDataset(data_dir, split, tokenizer=tokenizer or CharTokenizer(), modalities=("audio",), return_waveform=True)
        utterances = list(dataset.utterances)
        _SPLIT_CACHE[key] = (
            [u.id for u in utterances], [u.speaker for u in utterances], [u.text for u in utterances],
            [str(u.audio) for u in utterances], [int(sf.info(str(u.audio)).frames) for u in utterances], dataset.sample_rate,
        )
    return key, _SPLIT_CACHE[key]


def _targets(ids: Sequence[str], texts: Sequence[str], tokenizer) -> list[torch.Tensor]:
    from data.tokenizer import CharTokenizer

    tokenizer = tokenizer or CharTokenizer()
    return [torch.tensor(tokenizer.encode(text, utt_id=i), dtype=torch.long) for i, text in zip(ids, texts)]


def iter_split_waveforms(data_dir: str | Path, split: str) -> Iterator[torch.Tensor]:
    """Normalised waveforms of a split in manifest order, one at a time: the split's files are validated first
    (`_split_entry`), then each is read when the caller asks for it, so a caller that keeps less than the audio
    (the LoRA task's feature cache) never holds the whole split's waveforms (~7 GB of float32 for the 51,200
    training utterances of synthgrid_population_25600_test200)."""
    from data.media import read_wav

    _, (_, _, _, paths, _, rate) = _split_entry(data_dir, split)
    return (normalise_waveform(read_wav(path, expected_rate=rate)) for path in paths)


def read_split_waveforms(data_dir: str | Path, split: str) -> list[torch.Tensor]:
    """Normalised waveforms of a split in manifest order, read now and not kept (see load_split for the kept ones)."""
    return list(iter_split_waveforms(data_dir, split))


def load_split(data_dir: str | Path, split: str, tokenizer=None) -> tuple[list[str], list[str], list[torch.Tensor], list[torch.Tensor]]:
    """(speakers, texts, normalised waveforms, token ids of `tokenizer`) of a split; the audio is read once per process.

    Audio is read through data.dataset.AVSRDataset (audio only, waveforms), so missing,
    corrupt or wrongly sampled files fail with its error messages. Only the audio is
    cached: the targets are encoded with the tokenizer of each call (default: characters),
    so a char and a word run in one process never share token ids.
    """
    key, (ids, speakers, texts, _, _, _) = _split_entry(data_dir, split, tokenizer)
    if key not in _WAVE_CACHE:
        _WAVE_CACHE[key] = read_split_waveforms(data_dir, split)
    return speakers, texts, _WAVE_CACHE[key], _targets(ids, texts, tokenizer)


def load_split_without_audio(data_dir: str | Path, split: str, tokenizer=None) -> tuple[list[str], list[str], list[int], list[torch.Tensor]]:
    """(speakers, texts, samples per waveform, token ids) of a split, validated as by load_split but without keeping
    its audio: for tasks that train on cached encoder outputs (a 12,800-speaker corpus's waveforms are ~4 GB)."""
    _, (ids, speakers, texts, _, num_samples, _) = _split_entry(data_dir, split, tokenizer)
    return speakers, texts, num_samples, _targets(ids, texts, tokenizer)


def split_speakers(data_dir: str | Path, split: str) -> list[str]:
    """Speaker of every utterance, from the manifest only (no audio is read): for start-up checks."""
    from data.manifest import read_split

    return [u.speaker for u in read_split(data_dir, split)]


def client_indices(
    speakers: Sequence[str], partition_id: int, num_partitions: int, seed: int, eval_utterances: int
) -> tuple[list[int], list[int]]:
    """(train, held-out eval) utterance indices of one client: whole speakers, the last few held out."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    return client_partitions(speakers, num_partitions, seed, eval_utterances)[partition_id]


def client_partitions(
    speakers: Sequence[str], num_partitions: int, seed: int, eval_utterances: int
) -> list[tuple[list[int], list[int]]]:
    """(train, held-out eval) utterance indices of every client, from ONE partition of the speakers (who asks for all
    clients calls this once: a population of thousands would otherwise be partitioned thousands of times)."""
    from privacy.federated.partition import partition_by_speaker

    return [hold_out(indices, eval_utterances) for indices in partition_by_speaker(speakers, num_partitions, seed)]


def hold_out(indices: Sequence[int], eval_utterances: int) -> tuple[list[int], list[int]]:
    """(train, held-out eval) of one client's utterance indices: the last `eval_utterances` held out."""
    held = min(max(int(eval_utterances), 0), len(indices) - 1)
    if held <= 0:
        return list(indices), list(indices[-1:])  # too little data to hold out: evaluate on the training data
    return list(indices[:-held]), list(indices[-held:])


def centralised_indices(speakers: Sequence[str], num_partitions: int, seed: int, eval_utterances: int) -> list[int]:
    """The union of every client's training indices: what the centralised baseline trains on."""
    return sorted(i for train, _ in client_partitions(speakers, num_partitions, seed, eval_utterances) for i in train)


# --------------------------------------------------------------------------- model
_MODEL_CACHE: dict[tuple, nn.Module] = {}


def build_wav2vec2_for_task(
    vocab_size: int,
    checkpoint: Optional[str],
    seed: int,
    trainable_layers: Optional[int] = None,
    train_positional_conv: bool = True,
) -> nn.Module:
    """A DP-compatible Wav2Vec2ForCTC (see the module docstring); the same weights for the same arguments."""
    from models.wav2vec2 import build_wav2vec2_ctc, make_dp_compatible

    key = (vocab_size, checkpoint or "", seed, trainable_layers, train_positional_conv)
    if key not in _MODEL_CACHE:
        # lm_head is freshly initialised: seed it so that every node builds the same model
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            model = build_wav2vec2_ctc(vocab_size, size="tiny", checkpoint_dir=checkpoint or None)
            make_dp_compatible(model, trainable_layers=trainable_layers, train_positional_conv=train_positional_conv)
        finally:
            torch.random.set_rng_state(state)
        _MODEL_CACHE[key] = model
    # from_pretrained leaves the model in eval mode; Opacus (and training) expect train mode
    return copy.deepcopy(_MODEL_CACHE[key]).train()


def ctc_loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Hugging Face's CTC loss (mean over the batch of per-utterance loss / target length)."""
    if not isinstance(batch, Mapping) or batch["input_values"].shape[0] == 0:
        return torch.zeros((), requires_grad=True), 0  # an empty Poisson batch
    out = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, int(batch["input_values"].shape[0])


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_module", model)  # Opacus' GradSampleModule keeps the model in ._module


@torch.no_grad()
def decode_batch(model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer) -> tuple[list[str], list[str], float]:
    """(references, greedy CTC hypotheses, mean CTC loss) of a batch; references are decoded from the labels."""
    from data.ctc_decode import ctc_greedy_decode

    inner = _unwrapped(model)
    out = model(input_values=batch["input_values"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    lengths = inner._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1)).long()
    hyps = ctc_greedy_decode(out.logits.log_softmax(-1), lengths, tokenizer)
    refs = [tokenizer.decode([int(i) for i in row if i >= 0]) for row in batch["labels"]]
    return refs, hyps, float(out.loss)


def word_error_counts(model: nn.Module, batch: Mapping[str, torch.Tensor], tokenizer) -> tuple[int, int]:
    from common.metrics import wer_details

    if not isinstance(batch, Mapping) or batch["input_values"].shape[0] == 0:
        return 0, 0
    refs, hyps, _ = decode_batch(model, batch, tokenizer)
    details = wer_details(refs, hyps)
    errors = int(details["substitutions"] + details["deletions"] + details["insertions"])
    return errors, int(details["ref_words"])


def transcribe(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], tokenizer,
               decode: Optional[Callable] = None) -> tuple[list[str], list[str], float]:
    """(references, greedy CTC hypotheses, mean CTC loss per utterance) of every utterance of `loader`, in its order.

    `decode(model, batch, tokenizer) -> (refs, hyps, mean loss)` reads one batch (default :func:`decode_batch`,
    waveforms; the cached-feature task passes its own)."""
    from common.device import move_to_device

    decode = decode or decode_batch
    model.eval()
    device = next(model.parameters()).device
    refs: list[str] = []
    hyps: list[str] = []
    loss_sum = 0.0
    for batch in loader:
        r, h, loss = decode(model, move_to_device(batch, device), tokenizer)
        refs += r
        hyps += h
        loss_sum += loss * len(r)
    return refs, hyps, loss_sum / max(len(refs), 1)


def score_transcripts(refs: Sequence[str], hyps: Sequence[str], loss: float) -> dict[str, float]:
    """Corpus WER / CER (fractions), the mean CTC loss and the number of utterances."""
    from common.metrics import char_error_rate, word_error_rate

    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps), "loss": loss, "utterances": len(refs)}


def evaluate_transcripts(model: nn.Module, loader: Iterable[Mapping[str, torch.Tensor]], tokenizer,
                         decode: Optional[Callable] = None) -> dict[str, float]:
    """Corpus WER / CER (fractions), mean CTC loss per utterance and the number of utterances; greedy decoding.

    The loss is reported because WER saturates at 1.0 (all-blank output) early in training,
    where the loss still tells runs apart.
    """
    return score_transcripts(*transcribe(model, loader, tokenizer, decode))


# --------------------------------------------------------------------------- the task
@dataclass
class SynthGridTask(FederatedTask):
    """A FederatedTask plus what the centralised baseline and the final scoring need.

    ``tokenizer``: the run's tokenizer (built once); ``build_union_loader(num_partitions,
    generator)``: the union of every client's training utterances, shuffled with
    ``generator`` (one data holder, for the centralised baseline);
    ``build_split_loader(split)``: a whole split in order (e.g. the test speakers).
    """

    tokenizer: Any = None
    build_union_loader: Optional[Callable[[int, torch.Generator], DataLoader]] = None
    build_split_loader: Optional[Callable[[str], DataLoader]] = None
    decode: Optional[Callable] = None  # transcribe's batch decoder (None: waveforms, decode_batch)

    def transcribe_split(self, model: nn.Module, split: str) -> tuple[list[str], list[str], float]:
        """(references, hypotheses, mean CTC loss) of every utterance of a split, in manifest order (:func:`transcribe`)."""
        return transcribe(model, self.build_split_loader(split), self.tokenizer, self.decode)

    def evaluate_split(self, model: nn.Module, split: str) -> dict[str, float]:
        """WER / CER / CTC loss of greedy decoding on a whole split."""
        return score_transcripts(*self.transcribe_split(model, split))


def task_settings(run_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = {**DEFAULT_TASK_CONFIG, **{k: v for k, v in run_config.items() if k.startswith("task-")}}
    if not cfg["task-data-dir"]:
        raise ValueError("run_config['task-data-dir'] is empty: give the prepared corpus directory (data.dir)")
    return cfg


def speaker_split_loaders(split_items: Callable[[str], tuple], collate: Callable, run_config: Mapping[str, Any]):
    """The three loader builders a SynthGridTask takes, over ``split_items(name) -> (speakers, inputs,
    targets)``: a client's train / held-out loaders (its speakers' utterances, client_indices), the
    centralised baseline's union of every client's training utterances, and a whole split. Split,
    partition seed, held-out size and batch sizes come from ``run_config`` (task_settings).

    A split's items and the speaker partition are computed once per builder set (a task lives for the
    process and every client message asks for its loaders: re-encoding 3,200 transcripts and
    re-partitioning per client cost ~18 % of a population run, measured with cProfile)."""
    cfg = task_settings(run_config)
    seed = int(run_config.get("seed", 0))
    batch_size = int(run_config.get("batch-size", 8))
    eval_batch_size = int(cfg["task-eval-batch-size"])
    split = str(cfg["task-train-split"])
    eval_utterances = int(cfg["task-client-eval-utterances"])
    items: dict[str, tuple] = {}
    partitions: dict[int, list[tuple[list[int], list[int]]]] = {}

    def split_items_once(name: str) -> tuple:
        if name not in items:
            items[name] = split_items(name)
        return items[name]

    def client_split(partition_id: int, num_partitions: int) -> tuple[list[int], list[int]]:
        if not 0 <= partition_id < num_partitions:
            raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
        if num_partitions not in partitions:
            speakers = split_items_once(split)[0]  # the same split as client_indices, partitioned once
            partitions[num_partitions] = client_partitions(speakers, num_partitions, seed, eval_utterances)
        return partitions[num_partitions][partition_id]

    def build_loaders(partition_id: int, num_partitions: int):
        _, inputs, targets = split_items_once(split)
        train_idx, eval_idx = client_split(partition_id, num_partitions)
        train = CTCPairsDataset([inputs[i] for i in train_idx], [targets[i] for i in train_idx])
        held_out = CTCPairsDataset([inputs[i] for i in eval_idx], [targets[i] for i in eval_idx])
        # order: drawn from torch's global RNG, which the ClientApp seeds per (seed, round, client)
        order = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))
        return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=order, collate_fn=collate),
                DataLoader(held_out, batch_size=eval_batch_size, collate_fn=collate))

    def build_union_loader(num_partitions: int, generator: torch.Generator) -> DataLoader:
        speakers, inputs, targets = split_items_once(split)
        idx = centralised_indices(speakers, num_partitions, seed, eval_utterances)
        union = CTCPairsDataset([inputs[i] for i in idx], [targets[i] for i in idx])
        return DataLoader(union, batch_size=batch_size, shuffle=True, generator=generator, collate_fn=collate)

    def build_split_loader(name: str) -> DataLoader:
        _, inputs, targets = split_items_once(name)
        return DataLoader(CTCPairsDataset(inputs, targets), batch_size=eval_batch_size, collate_fn=collate)

    return build_loaders, build_union_loader, build_split_loader


def wav2vec2_synthgrid_task(run_config: Mapping[str, Any]) -> SynthGridTask:
    """The FederatedTask factory named in run_config['task'] (see the module docstring)."""
    cfg = task_settings(run_config)
    seed = int(run_config.get("seed", 0))
    data_dir = str(cfg["task-data-dir"])
    trainable_layers = int(cfg["task-trainable-layers"])
    tokenizer = make_tokenizer(str(cfg["task-tokenizer"]), data_dir)

    def build_model() -> nn.Module:
        return build_wav2vec2_for_task(
            tokenizer.vocab_size,
            str(cfg["task-checkpoint"]) or None,
            seed,
            trainable_layers=None if trainable_layers < 0 else trainable_layers,
            train_positional_conv=bool(cfg["task-train-positional-conv"]),
        )

    def error_counts(model: nn.Module, batch) -> tuple[int, int]:
        return word_error_counts(model, batch, tokenizer)

    def split_waveforms(name: str):
        speakers, _, waves, targets = load_split(data_dir, name, tokenizer)
        return speakers, waves, targets

    build_loaders, build_union_loader, build_split_loader = speaker_split_loaders(
        split_waveforms, collate_waveforms, run_config)
    return SynthGridTask(build_model, build_loaders, ctc_loss, error_counts, tokenizer=tokenizer,
                         build_union_loader=build_union_loader, build_split_loader=build_split_loader)
