"""trainer.device: resolution, batch moves, and a CPU-only check that nothing in the masked
system creates a tensor on the wrong device (the whole system runs forward and backward on the
`meta` device, where mixing in a CPU tensor is an error exactly as mixing one into CUDA is).
GPU tests are marked `gpu` and skipped without CUDA."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from models.adapters import AdapterSpec, apply_adapter
from models.avhubert import AVHubertModel, avhubert_tiny, freeze_frontends
from common.device import move_to_device, pin_memory_for, resolve_device
from models.heads import AVHubertForCTC
from privacy.contrastive import ProjectionHead
from privacy.masks import build_masks
from privacy.system import MaskedAVSR

def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def masked_system(position: str = "frontend", modality_dropout: float = 0.0, audio_dropout: float = 0.5,
                  layerdrop: float = 0.0, adapter: str = "adalora"):
    """The fine-tuning system as training.avhubert.finetune.build_system assembles it (tiny sizes, CPU)."""
    # modality dropout acts in fine-tuning only when asked (model.finetune_modality_dropout; off as in the original)
    core = AVHubertModel(avhubert_tiny(modality_dropout=modality_dropout, audio_dropout=audio_dropout, encoder_layerdrop=layerdrop,
                                       finetune_modality_dropout=modality_dropout > 0))
    asr = AVHubertForCTC(core, vocab_size=12)
    freeze_frontends(asr)
    masks = build_masks("both", position, 1, core.cfg.encoder_embed_dim, ("audio", "video"), 1.0, core.cfg.encoder_layers,
                        0.0, True, torch.Generator().manual_seed(0))
    projection = ProjectionHead(core.cfg.encoder_embed_dim, 16)
    if adapter != "none":
        core.requires_grad_(False)
    _, handle = apply_adapter(core.encoder, AdapterSpec(kind=adapter, tinit=2, tfinal=2, total_step=10, delta_t=1))
    system = MaskedAVSR(asr, masks, projection)
    for p in asr.ctc_proj.parameters():
        p.requires_grad_(True)
    return system, handle


def inputs(device, batch: int = 4, frames: int = 12):
    g = torch.Generator().manual_seed(1)
    audio = torch.randn(batch, 104, frames, generator=g).to(device)
    video = torch.randn(batch, 1, frames, 88, 88, generator=g).to(device)
    speakers = torch.tensor([0, 0, 1, 1][:batch]).to(device)
    return audio, video, speakers


@pytest.mark.parametrize("position", ["frontend", "encoder"])
def test_whole_masked_system_runs_forward_and_backward_on_the_meta_device(position):
    torch.manual_seed(0)
    system, handle = masked_system(position, modality_dropout=1.0)  # the dropped branch is exercised too
    system.to("meta").train()
    audio, video, speakers = inputs("meta")
    # padding_mask=None: with a mask the attention asks whether any frame is padded (a value meta
    # tensors do not have). ctc_loss has no meta kernel; the loss below uses the CTC log-probs
    # instead, so everything the system computes before the loss is on the meta device.
    out = system(audio, video, None, capture=True)
    cl, _ = system.contrastive_loss(out, speakers, None, temperature=0.1)
    loss = out.ctc.log_probs.mean() + cl + handle.regularization()
    assert loss.device.type == "meta"
    loss.backward()
    trainable = [(n, p) for n, p in system.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and p.grad.device.type == "meta" for _, p in trainable), \
        [n for n, p in trainable if p.grad is None]


def test_the_meta_check_fails_on_a_tensor_created_without_a_device():
    """What the test above catches: the old AdaLoRA penalty built torch.eye on the CPU."""
    system, handle = masked_system()
    system.to("meta")
    name, p = next((n, p) for n, p in handle.peft_model.named_parameters() if "lora_A" in n and p.requires_grad)
    cov = p @ p.T
    with pytest.raises(RuntimeError, match="device"):
        torch.linalg.matrix_norm(cov - torch.eye(cov.shape[0], dtype=cov.dtype))
    assert handle.regularization().device.type == "meta"  # the fixed penalty builds it on the parameters' device


def test_modality_dropout_keeps_the_dropped_branch_in_the_graph():
    """DDP (find_unused_parameters=False) needs a gradient for every trainable parameter on every rank:
    a rank that drops the audio must still give the audio mask parameters a (zero) gradient."""
    torch.manual_seed(0)
    system, _ = masked_system(modality_dropout=1.0, audio_dropout=1.0)  # always drop the audio
    system.train()
    audio, video, _ = inputs("cpu")
    out = system(audio, video, None)
    out.ctc.log_probs.mean().backward()
    audio_mask = system.masks.masks["audio"]
    grads = {n: p.grad for n, p in audio_mask.named_parameters()}
    assert grads and all(g is not None for g in grads.values()), grads
    assert all(torch.count_nonzero(g) == 0 for g in grads.values())  # dropped: no influence on the loss
    video_grads = [p.grad for p in system.masks.masks["video"].parameters()]
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in video_grads)


def test_dropped_modality_is_zero_like_before():
    torch.manual_seed(0)
    model = AVHubertModel(avhubert_tiny(modality_dropout=1.0, audio_dropout=1.0)).train()
    fa, fv = torch.randn(2, 5, 128), torch.randn(2, 5, 128)
    da, dv = model.modality_dropout(fa, fv)
    assert torch.equal(da, torch.zeros_like(fa)) and dv is fv


def test_resolve_device_values_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", local_rank=1) == torch.device("cpu")
    with pytest.raises(ValueError, match=r"trainer.device='cuda:1'.*no usable CUDA device"):
        resolve_device("cuda:1")
    with pytest.raises(ValueError, match=r"pretrain.device='gpu': expected auto \| cpu \| cuda \| cuda:N"):
        resolve_device("gpu", field="pretrain.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("auto", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda", local_rank=1) == torch.device("cuda:1")
    assert resolve_device("cuda:0", local_rank=1) == torch.device("cuda:0")
    with pytest.raises(ValueError, match="GPU index 2 but only 2"):
        resolve_device("cuda:2")


@dataclass
class Pair:
    a: torch.Tensor
    name: str


def test_move_to_device_moves_every_tensor_and_keeps_the_rest():
    batch = {"audio": torch.ones(2), "ids": ["u1", "u2"], "nested": (torch.zeros(1), 3), "pair": Pair(torch.ones(1), "x")}
    moved = move_to_device(batch, torch.device("meta"))
    assert moved["audio"].is_meta and moved["nested"][0].is_meta and moved["pair"].a.is_meta
    assert moved["ids"] == ["u1", "u2"] and moved["nested"][1] == 3 and moved["pair"].name == "x"
    assert not batch["audio"].is_meta  # the input is untouched
    assert pin_memory_for(torch.device("cpu")) is False and pin_memory_for(torch.device("cuda:0")) is True


def test_training_loop_moves_each_batch_to_the_device():
    from training.loop import train

    seen = []
    model = nn.Linear(3, 1)

    def step_fn(m, batch):
        seen.append(batch["x"].device.type)
        return m(torch.ones(2, 3)).sum(), {}

    loader = [{"x": torch.ones(2, 3)}] * 3
    train(model, step_fn, loader, torch.optim.SGD(model.parameters(), lr=0.1), max_steps=3, progress_bar=False,
          device=torch.device("meta"))
    assert seen == ["meta"] * 3


def test_unusable_device_fails_at_start_up(tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    import training.config  # noqa: F401
    from training.avhubert.finetune import validate_options
    from training.config import PROJECT_ROOT

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with initialize_config_dir(version_base="1.3", config_dir=str(PROJECT_ROOT / "conf")):
        cfg = compose("config", overrides=[f"paths.root_dir={tmp_path}", "trainer.device=cuda"])
        pre = compose("config", overrides=[f"paths.root_dir={tmp_path}", "trainer.device=cpu"])
    with pytest.raises(ValueError, match="trainer.device='cuda'"):
        validate_options(cfg)
    assert pre.pretrain.device == "cpu"  # pretraining follows trainer.device unless pretrain.device is given


@gpu
def test_masked_system_trains_a_step_on_cuda_with_bf16_autocast():
    from training.loop import train

    system, handle = masked_system()
    device = resolve_device("cuda")
    system.to(device)
    audio, video, speakers = inputs("cpu")
    targets, lengths = torch.randint(1, 12, (4, 3)), torch.full((4,), 3)

    def step_fn(m, b):
        out = m(b["audio"], b["video"], None, capture=True)
        loss = m.asr.ctc_loss(out.ctc, b["targets"], b["lengths"]) + handle.regularization()
        return loss + 0.1 * m.contrastive_loss(out, b["speakers"], None, 0.1)[0], {}

    batch = {"audio": audio, "video": video, "speakers": speakers, "targets": targets, "lengths": lengths}
    params = [p for p in system.parameters() if p.requires_grad]
    result = train(system, step_fn, [batch] * 2, torch.optim.AdamW(params, 1e-3), max_steps=2, progress_bar=False,
                   device=device, precision="auto")
    assert result.step == 2 and result.bad_steps_total == 0
