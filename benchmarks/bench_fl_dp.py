"""Costs of the Wav2Vec2 FL + DP variant: DP-SGD vs SGD steps, Flower vs a plain loop, update compression.

    python -m benchmarks.bench_fl_dp          -> benchmarks/results/fl_dp.json

1. DP-SGD step time / SGD step time on wav2vec2 tiny (batch 8 x 2 s, the size a
   SynthGRID client trains with). Opacus hooks mode and ghost clipping, each
   against plain SGD, measured INTERLEAVED (SGD, hooks, ghost, SGD, ...) so that
   the load of the shared machine hits all three alike; ratios of medians.
2. The same federated training (wav2vec2 tiny, SynthGRID task, 2 clients x 2
   rounds x 2 local steps + per-round federated evaluation, no DP) through
   Flower's simulation engine with Ray, through the in-process sequential grid,
   and as a plain Python loop that does the same work (build model, load
   weights, train, delta, FedAvg, evaluate) without Flower; ratios to the loop.
   Needs the SynthGRID corpus (data.dir of the default config); skipped if absent.
3. int8 / top-k (5 %, fp16 values; 50 %, int4 values) compression of a wav2vec2-tiny-sized update: bytes,
   ratio, compress + decompress time, relative L2 error.
4. A one-step LoRA client of the population runs (the top encoder layer with LoRA r=4 on q, v + the
   CTC head, on cached features of 2 utterances x 150 frames): a fresh deep copy of the model per
   client (``task.build_model()``) against the one reused model per process of
   ``privacy.federated.client_app.client_model``, each followed by loading the global state and one
   SGD step; interleaved, ratio of medians.
5. The same client step (the reused model) as trained, without attention dropout, and compiled with
   torch.compile: what a round could save (section 5's docstring); interleaved, ratios of medians.
6. The message path around that step (session 20; py-spy put 39 % of a round of ~400 one-step clients outside the step):
   seeding torch, decoding the global state, encoding the reply, and the server's decode and wire-byte count of
   the reply, as Flower's own calls do it (torch.manual_seed, Array.numpy, each object's id recomputed) against
   this project's (common.seeding.seed_torch, task.arrays_to_state, compression.wire_nbytes_with_part), which
   give the same results (tests); interleaved, ratio of medians; and both as a fraction of section 5's step.
"""

from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result

BATCH, SAMPLES, LABEL_LEN, VOCAB = 8, 32000, 25, 29


# --------------------------------------------------------------------------- 1. DP-SGD step cost
def _dp_step_times(repeats: int = 6) -> dict:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from models.wav2vec2 import build_wav2vec2_ctc, make_dp_compatible
    from privacy.dp import CTCCriterion

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SAMPLES, generator=gen)
    y = torch.randint(1, VOCAB, (BATCH, LABEL_LEN), generator=gen)
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)

    torch.manual_seed(0)
    base = build_wav2vec2_ctc(VOCAB)
    report = make_dp_compatible(base)
    base.train()

    def sgd_step_fn():
        model = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)

        def step():
            opt.zero_grad(set_to_none=True)
            model(input_values=x, labels=y).loss.backward()
            opt.step()

        return step

    def dp_step_fn(mode: str):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
        kwargs = dict(module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
                      poisson_sampling=False, grad_sample_mode=mode)
        if mode == "ghost":
            dp_model, dp_opt, criterion, _ = PrivacyEngine().make_private(criterion=CTCCriterion(), **kwargs)

            def step():
                dp_opt.zero_grad(set_to_none=True)
                criterion(dp_model(input_values=x).logits, y).backward()
                dp_opt.step()
        else:
            dp_model, dp_opt, _ = PrivacyEngine().make_private(**kwargs)

            def step():
                dp_opt.zero_grad(set_to_none=True)
                dp_model(input_values=x, labels=y).loss.backward()
                dp_opt.step()

        return step

    steps = {"sgd": sgd_step_fn(), "dp_hooks": dp_step_fn("hooks"), "dp_ghost": dp_step_fn("ghost")}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for step in steps.values():  # warm-up
        step()
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "batch": BATCH, "seconds_audio": SAMPLES / 16000, "trainable_params": report.trainable_params, "repeats": repeats,
        "sgd_step_s": med["sgd"], "dp_hooks_step_s": med["dp_hooks"], "dp_ghost_step_s": med["dp_ghost"],
        "dp_hooks_over_sgd": med["dp_hooks"] / med["sgd"], "dp_ghost_over_sgd": med["dp_ghost"] / med["sgd"],
        "goal_dp_over_sgd_below": 2.0,
    }


# --------------------------------------------------------------------------- 2. Flower overhead
def _plain_federated_loop(run_config: dict, num_clients: int) -> float:
    """The federation's work without Flower: per round and client build, load, train, delta; FedAvg; evaluate."""
    from privacy.federated.task import (
        apply_delta, compute_delta, evaluate, federated_state, load_federated_state, load_task, train_local,
    )

    t0 = time.perf_counter()
    torch.manual_seed(int(run_config["seed"]))
    task = load_task(run_config)
    global_state = federated_state(task.build_model())
    for server_round in range(1, int(run_config["num-rounds"]) + 1):
        deltas, weights = [], []
        for pid in range(num_clients):
            torch.manual_seed(int(run_config["seed"]) * 100003 + server_round * 1009 + pid)
            model = task.build_model()
            load_federated_state(model, global_state)
            train_loader, _ = task.build_loaders(pid, num_clients)
            stats = train_local(model, train_loader, task.loss_fn, steps=int(run_config["local-steps"]), lr=float(run_config["lr"]))
            deltas.append(compute_delta(federated_state(model), global_state))
            weights.append(stats["num-examples"])
        mean = {k: sum(w * d[k] for w, d in zip(weights, deltas)) / sum(weights) for k in global_state}
        global_state = apply_delta(global_state, mean)
        for pid in range(num_clients):
            model = task.build_model()
            load_federated_state(model, global_state)
            _, eval_loader = task.build_loaders(pid, num_clients)
            evaluate(model, eval_loader, task.loss_fn, task.error_counts)
    return time.perf_counter() - t0


def _flower_overhead(data_dir: Path) -> dict:
    from privacy.federated.runner import run_federated
    from privacy.federated.settings import resolve_run_config
    from privacy.federated.synthgrid_task import TASK_REFERENCE, load_split

    num_clients = 2
    run_config = resolve_run_config({
        "task": TASK_REFERENCE, "task-data-dir": str(data_dir), "seed": 0, "num-clients": num_clients,
        "num-rounds": 2, "local-steps": 2, "batch-size": 4, "lr": 0.1, "min-train-nodes": 2,
    })
    load_split(data_dir, "train")  # read the audio once so no measured run pays for it
    plain = [_plain_federated_loop(run_config, num_clients)]
    out = {"clients": num_clients, "rounds": 2, "local_steps": 2, "batch": 4}
    seq, ray = [], []
    for _ in range(2):  # interleaved: plain, sequential, ray, plain, ...
        t0 = time.perf_counter()
        run_federated(run_config, num_clients, backend="sequential")
        seq.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        try:
            run_federated(run_config, num_clients, backend="ray")
            ray.append(time.perf_counter() - t0)
        except Exception as error:  # Ray can be unavailable in a sandbox; the rest is still worth reporting
            out["ray_error"] = f"{type(error).__name__}: {error}"[:300]
        plain.append(_plain_federated_loop(run_config, num_clients))
    out.update(plain_loop_s=min(plain), sequential_s=min(seq), sequential_over_plain=min(seq) / min(plain), goal_below=1.3)
    if ray:
        out.update(ray_s=min(ray), ray_over_plain=min(ray) / min(plain))
    return out


# --------------------------------------------------------------------------- 3. compression
def _compression() -> dict:
    from models.wav2vec2 import build_wav2vec2_ctc, make_dp_compatible
    from privacy.federated.compression import build_compressor, decompress, dense_nbytes, payload_nbytes
    from privacy.federated.task import federated_state

    torch.manual_seed(0)
    model = build_wav2vec2_ctc(VOCAB)
    make_dp_compatible(model)
    rng = np.random.default_rng(0)
    delta = {k: (rng.standard_normal(v.shape) * 1e-3).astype(np.float32) for k, v in federated_state(model).items()}
    dense = dense_nbytes(delta)
    flat = np.concatenate([v.ravel() for v in delta.values()])
    out = {"update_params": int(flat.size), "dense_bytes": dense}
    for name, kwargs in (("int8", {"int8_block_size": 256}), ("int8_per_tensor", {}), ("topk", {"topk_fraction": 0.05}),
                         ("topk_int4_values", {"topk_fraction": 0.5, "topk_value_bits": 4})):
        kind = name.split("_")[0]
        times_c, times_d = [], []
        for _ in range(5):
            compressor = build_compressor(kind, error_feedback=False, **kwargs)
            t0 = time.perf_counter()
            payload = compressor.compress(delta)
            times_c.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            restored = decompress(payload, reference_shapes={k: v.shape for k, v in delta.items()})  # as the server decodes
            times_d.append(time.perf_counter() - t0)
        back = np.concatenate([restored[k].ravel() for k in delta])
        sent = payload_nbytes(payload)
        out[name] = {
            "bytes": sent, "ratio": dense / sent, "compress_ms": 1e3 * statistics.median(times_c),
            "decompress_ms": 1e3 * statistics.median(times_d),
            "relative_l2_error": float(np.linalg.norm(back - flat) / np.linalg.norm(flat)),
        }
    return out


# --------------------------------------------------------------------------- 4. client model: copy or reuse
def _client_model_reuse(clients: int = 60, repeats: int = 5) -> dict:
    from models.wav2vec2 import build_wav2vec2_ctc
    from models.wav2vec2_lora import CachedTopCTC, add_lora, ctc_loss_on_cached
    from privacy.federated.task import federated_state, load_federated_state

    torch.manual_seed(0)
    template = CachedTopCTC(build_wav2vec2_ctc(60, size="tiny"), 3)
    add_lora(template, 4, 8.0, ["q_proj", "v_proj"])
    global_state = federated_state(template)
    gen = torch.Generator().manual_seed(0)
    hidden, lengths = torch.randn(2, 150, 128, generator=gen), torch.tensor([150, 120])
    labels = torch.randint(1, 60, (2, 12), generator=gen)
    reused = copy.deepcopy(template)

    def client(model):
        load_federated_state(model, global_state)
        model.zero_grad(set_to_none=True)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        ctc_loss_on_cached(model.train(), hidden, lengths, labels, 0).backward()
        opt.step()

    times: dict[str, list[float]] = {"fresh": [], "reused": []}
    for _ in range(repeats):  # interleaved, so the machine's load hits both alike
        for name in times:
            t0 = time.perf_counter()
            for _ in range(clients):
                client(copy.deepcopy(template) if name == "fresh" else reused)
            times[name].append((time.perf_counter() - t0) / clients)
    fresh, reuse = statistics.median(times["fresh"]), statistics.median(times["reused"])
    return {"clients_per_repeat": clients, "fresh_copy_ms": 1e3 * fresh, "reused_ms": 1e3 * reuse,
            "reused_over_fresh": reuse / fresh}


# --------------------------------------------------------------------------- 5. client step: where it could be cheaper
def _client_step_levers(clients: int = 40, repeats: int = 5) -> dict:
    """The one-step LoRA client of section 4 (the reused model) as the federation trains it, against the same step
    without attention dropout (p = 0 in scaled-dot-product attention; the trained model would differ, so this
    prices the option, it does not change it) and with the layer compiled (torch.compile, dynamic shapes; lengths
    vary between 100 and 150 frames as utterances do). Interleaved; ratios of medians to the step as trained."""
    from models.wav2vec2 import build_wav2vec2_ctc
    from models.wav2vec2_lora import CachedTopCTC, add_lora, ctc_loss_on_cached

    torch.manual_seed(0)
    template = CachedTopCTC(build_wav2vec2_ctc(60, size="tiny"), 3)
    add_lora(template, 4, 8.0, ["q_proj", "v_proj"])
    attention_dropout = float(template.config.attention_dropout)
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(clients):
        lengths = torch.randint(100, 151, (2,), generator=gen)
        hidden = torch.randn(2, int(lengths.max()), 128, generator=gen)
        hidden[(torch.arange(hidden.shape[1])[None, :] >= lengths[:, None])] = 0
        batches.append((hidden, lengths, torch.randint(1, 60, (2, 12), generator=gen)))
    models = {"as_trained": copy.deepcopy(template), "no_attention_dropout": copy.deepcopy(template),
              "compiled": copy.deepcopy(template)}
    for layer in models["no_attention_dropout"].layers:
        layer.attention.dropout = 0.0
    models["compiled"].forward = torch.compile(models["compiled"].forward, dynamic=True)

    def clients_pass(model):
        for hidden, lengths, labels in batches:
            model.zero_grad(set_to_none=True)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
            ctc_loss_on_cached(model.train(), hidden, lengths, labels, 0).backward()
            opt.step()

    t0 = time.perf_counter()
    clients_pass(models["compiled"])  # compilation (and recompilation for new shapes) happens here
    compile_s = time.perf_counter() - t0
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            t0 = time.perf_counter()
            clients_pass(model)
            times[name].append((time.perf_counter() - t0) / clients)
    median = {name: statistics.median(t) for name, t in times.items()}
    return {"clients_per_repeat": clients, "attention_dropout": attention_dropout, "compile_first_pass_s": compile_s,
            **{f"{name}_ms": 1e3 * m for name, m in median.items()},
            "no_attention_dropout_over_as_trained": median["no_attention_dropout"] / median["as_trained"],
            "compiled_over_as_trained": median["compiled"] / median["as_trained"]}


# --------------------------------------------------------------------------- 6. the message path around a client step
def _message_path(messages: int = 200, repeats: int = 5) -> dict:
    from flwr.app import Message, MetricRecord, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    from common.seeding import seed_torch
    from models.wav2vec2 import build_wav2vec2_ctc
    from models.wav2vec2_lora import CachedTopCTC, add_lora
    from privacy.federated.compression import wire_nbytes_with_part
    from privacy.federated.runner import _set_task_identity
    from privacy.federated.task import arrays_to_state, compute_delta, federated_state, state_to_arrays

    torch.manual_seed(0)
    model = CachedTopCTC(build_wav2vec2_ctc(60, size="tiny"), 3)
    add_lora(model, 4, 8.0, ["q_proj", "v_proj"])
    global_state = federated_state(model)
    new_state = {name: value + np.float32(1e-3) for name, value in global_state.items()}
    _set_task_identity(1)
    global_arrays = state_to_arrays(global_state)

    def wire_as_flower(obj) -> int:  # each object's id computed afresh, as compression.wire_nbytes did until session 20
        return sum(len(child.deflate()) + len(object_id) for object_id, child in get_all_nested_objects(obj).items())

    def one_message(flower: bool, seed: int) -> int:
        torch.manual_seed(seed) if flower else seed_torch(seed)
        state = {n: a.numpy() for n, a in global_arrays.items()} if flower else arrays_to_state(global_arrays)
        reply = Message(RecordDict({"arrays": state_to_arrays(compute_delta(new_state, state)),
                                    "metrics": MetricRecord({"num-examples": 2, "partition-id": seed})}),
                        dst_node_id=5, message_type="train")
        if flower:  # the server: bytes of the reply and of its arrays, then the update
            sent, arrays = wire_as_flower(reply), wire_as_flower(reply.content["arrays"])
            {n: a.numpy() for n, a in reply.content["arrays"].items()}
        else:
            sent, arrays = wire_nbytes_with_part(reply, reply.content["arrays"])
            arrays_to_state(reply.content["arrays"])
        return sent - arrays

    assert one_message(True, 7) == one_message(False, 7)
    times: dict[str, list[float]] = {"flower_calls": [], "this_project": []}
    for _ in range(repeats):
        for name in times:
            t0 = time.perf_counter()
            for i in range(messages):
                one_message(name == "flower_calls", i)
            times[name].append((time.perf_counter() - t0) / messages)
    flower, ours = statistics.median(times["flower_calls"]), statistics.median(times["this_project"])
    return {"messages_per_repeat": messages, "trainable_parameters": int(sum(v.size for v in global_state.values())),
            "flower_calls_ms": 1e3 * flower, "this_project_ms": 1e3 * ours, "this_project_over_flower_calls": ours / flower}


def run() -> dict:
    from training.config import PROJECT_ROOT

    torch.set_num_threads(1)  # the machine is shared; one thread gives steadier ratios
    result = {"dp_step": _dp_step_times(), "compression": _compression(), "client_model": _client_model_reuse(),
              "client_step_levers": _client_step_levers(), "message_path": _message_path()}
    step = result["client_step_levers"]["as_trained_ms"]
    result["message_path"]["as_fraction_of_the_step"] = {
        "flower_calls": result["message_path"]["flower_calls_ms"] / step, "this_project": result["message_path"]["this_project_ms"] / step}
    data_dir = PROJECT_ROOT / "datasets" / "synthgrid"
    if (data_dir / "manifests" / "train.tsv").is_file():
        result["flower_overhead"] = _flower_overhead(data_dir)
    else:
        result["flower_overhead"] = {"skipped": f"no SynthGRID corpus at {data_dir} (python -m scripts.prepare_data)"}
    write_result("fl_dp", result)
    return result


if __name__ == "__main__":
    import json

    print(json.dumps(run(), indent=2))
