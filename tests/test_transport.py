"""Codecs wired into both engines: error feedback through clients' states, bytes from the encoded
form, ``none`` as before codecs, the same numbers on Flower, exact resume, ``compare --codecs``.

Data: scikit-learn's digits (1 797 images, 16×16), 2 or 3 clients, a 16-wide feature.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_flower import LoopbackGrid, _task_identity, assert_same_numbers

import fedrir
from fedrir import runs, streams
from fedrir.algorithms.base import payload_bytes
from fedrir.cli import main
from fedrir.compare import compare, run_dir
from fedrir.config import Config, with_overrides
from fedrir.engine import rounds
from fedrir.engine.codecs import CHUNK
from fedrir.engine.runtime import torch_threads
from fedrir.engine.transport import RESIDUAL, Transport, split_state
from fedrir.errors import ConfigError, FedrirError
from fedrir.flower.app import make_client_app, serve
from fedrir.flower.runner import run_flower
from fedrir.results import RoundRecord, pooled


def tiny(cache: Path, **overrides: Any) -> Config:
    base = {
        "dataset": "digits",
        "clients": 3,
        "partition": "dir",
        "alpha": 1.0,
        "rounds": 2,
        "batch_size": 50,
        "embed_dim": 16,
        "cache_dir": str(cache),
        "checkpoint_every": 0,
        "device": "cpu",
        "threads": 1,
        "algorithm": "fedavg",
    }
    return with_overrides(Config(), base | overrides)


def test_topk_on_the_downlink_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match=r"'downlink': 'topk:0.1\+int8': top-k cannot") as e:
        Config(downlink="topk:0.1+int8")
    assert "\n" not in str(e.value) and "use none, fp16, bf16, int8 or qsgd:B" in str(e.value)
    assert Config(downlink="qsgd:4", uplink="topk:0.1").downlink == "qsgd:4"


def test_error_feedback_through_the_client_state(tmp_path: Path) -> None:
    """Over two rounds of a real client, Σ updates sent + the residual in its stored state =
    Σ true updates (upload − what it received), and the algorithm never sees the residual."""
    config = tiny(tmp_path, uplink="topk:0.05+int8")
    algorithm, data = runs.prepare(config)
    transport = Transport(algorithm)
    received = rounds.initial_server(algorithm)
    state = rounds.initial_client(algorithm, 0, received)
    true_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in received.items()}
    sent_sum = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in received.items()}
    largest = 0.0
    for r in (1, 2):
        inner, _ = split_state(state)
        assert not any(k.startswith(RESIDUAL) for k in inner)
        rng = algorithm.runtime.generator(streams.train_seed(config.seed, r, 0))
        upload = algorithm.local_update(received, inner, data.clients[0], rng).payload
        update, _ = transport.train(received, state, data.clients[0], r, 0)
        decoded, _ = transport.unpack(update.payload, received)
        for k, v in received.items():
            if v.is_floating_point():
                true_sum[k] += upload[k].double() - v.double()
                sent_sum[k] += decoded[k].double() - v.double()
                largest = max(largest, (upload[k] - v).abs().max().item())
        state = update.state
        received = decoded  # the next round starts from what the server now holds
    _, residual = split_state(state)
    assert residual is not None and set(residual) == {
        k for k, v in received.items() if v.is_floating_point() and v.dim() >= 2
    }
    tolerance = 16 * torch.finfo(torch.float32).eps * max(largest, 1.0)
    for k in true_sum:  # vectors travel as they are: their residual is zero
        r_k = residual[k].double() if k in residual else 0.0
        assert (sent_sum[k] + r_k - true_sum[k]).abs().max().item() <= tolerance, k
    assert any(r_k.abs().sum() > 0 for r_k in residual.values())  # something was held back


def encoded_size(t: torch.Tensor, spec: str) -> int:
    """The encoded bytes of one tensor, counted by hand: int8 sends a code per entry and a
    float32 scale per chunk, fp16 two bytes per entry; both an int32 header (dtype code and
    shape). Vectors, scalars and tensors that are not floats travel as they are."""
    if not t.is_floating_point() or t.dim() < 2:
        return t.numel() * t.element_size()
    values = {"int8": t.numel() + 4 * math.ceil(t.numel() / CHUNK), "fp16": 2 * t.numel()}
    return values[spec] + 4 * (1 + t.dim())


def test_bytes_are_the_encoded_size_and_the_ratio_follows(tmp_path: Path) -> None:
    config = tiny(tmp_path, uplink="int8", downlink="fp16", join_ratio=0.7)
    result = fedrir.run(config, out=None)
    algorithm, _ = runs.prepare(config)
    payload = rounds.initial_server(algorithm)  # FedAvg sends and uploads the whole model
    up = sum(encoded_size(t, "int8") for t in payload.values())
    down = sum(encoded_size(t, "fp16") for t in payload.values())
    raw = payload_bytes(payload)
    for record in result.history:
        assert record.participants == record.selected == 2  # int(3 · 0.7)
        assert record.bytes_up == record.message_bytes_up == 2 * up
        assert record.bytes_down == 2 * down
        assert (record.raw_bytes_up, record.raw_bytes_down) == (2 * raw, 2 * raw)
        # this model is tiny, so its vectors (sent as they are) weigh more than the usual 0.2 %
        assert record.compression_up == raw / up > 3.8
        assert record.compression_down == raw / down > 1.9
        assert 0 < record.codec_seconds < record.seconds
    s = result.summary
    assert s["bytes_uploaded"] == 2 * 2 * up and s["raw_bytes_uploaded"] == 2 * 2 * raw
    assert s["compression_up"] == raw / up and s["uplink"] == "int8" and s["downlink"] == "fp16"
    assert 0 < s["codec_share"] < 1


def test_none_is_the_loop_without_codecs_bit_for_bit(tmp_path: Path) -> None:
    """The run with ``none`` both ways equals, to the last bit, the round loop written with the
    algorithm's methods alone (as the engine was before codecs), with FedRIR's private state."""
    config = tiny(tmp_path, algorithm="fedrir", join_ratio=0.7, rounds=2)
    result = fedrir.run(config, out=None)
    with torch_threads(config):  # as fedrir.run computes: the same float sums
        algorithm, data = runs.prepare(config)
        server = rounds.initial_server(algorithm)
        states = {c: rounds.initial_client(algorithm, c, server) for c in range(3)}
        for r, record in zip((1, 2), result.history, strict=True):
            plan = rounds.plan_round(config, r, 3)
            updates = []
            for c in plan.participants:
                rng = algorithm.runtime.generator(streams.train_seed(config.seed, r, c))
                update = algorithm.local_update(server, states[c], data.clients[c], rng)
                states[c] = update.state
                updates.append((update.payload, update.num_examples))
            server = algorithm.aggregate(server, updates)
            evaluations = {
                c: algorithm.evaluate(
                    server,
                    states[c],
                    data.clients[c],
                    algorithm.runtime.generator(streams.eval_seed(config.seed, r, c)),
                )
                for c in range(3)
            }
            expected = pooled(evaluations)
            assert record.client_accuracies == expected["client_accuracies"]
            assert (record.accuracy, record.loss) == (expected["accuracy"], expected["loss"])
            raw = sum(payload_bytes(p) for p, _ in updates)
            assert record.bytes_up == record.raw_bytes_up == raw
            codec = (record.compression_up, record.compression_down, record.codec_seconds)
            assert codec == (1.0, 1.0, 0.0)


CODECS = {"uplink": "topk:0.1+int8", "downlink": "int8"}
"""Stochastic both ways, with error feedback."""


def test_flower_loopback_equals_in_process_with_codecs(tmp_path: Path) -> None:
    cfg = with_overrides(tiny(tmp_path, clients=2, **CODECS), {"engine": "flower"})
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    grid = LoopbackGrid(make_client_app(lambda _: cfg, tmp_path / "states"), 2)
    with _task_identity():
        result = serve(grid, cfg, None, timeout=5.0)
    assert_same_numbers(result.history, sim.history)
    for f, s in zip(result.history, sim.history, strict=True):
        assert (f.raw_bytes_up, f.raw_bytes_down) == (s.raw_bytes_up, s.raw_bytes_down)
        assert (f.compression_up, f.compression_down) == (s.compression_up, s.compression_down)
        assert f.compression_up > 10 and f.compression_down > 3.8
        assert f.bytes_up <= f.message_bytes_up  # serialized messages: a little more
    assert result.summary["bytes_evaluation_downloaded"] > 0
    assert (
        result.summary["bytes_evaluation_downloaded"] == sim.summary["bytes_evaluation_downloaded"]
    )


@pytest.mark.slow
def test_flower_simulation_equals_in_process_with_codecs(tmp_path: Path) -> None:
    """On Ray, with bf16 broadcasts (which NumPy cannot hold: they cross as their bits)."""
    cfg = with_overrides(
        tiny(tmp_path, clients=2, uplink="topk:0.05+qsgd:4", downlink="bf16"), {"engine": "flower"}
    )
    sim = fedrir.run(with_overrides(cfg, {"engine": "sim"}), out=None)
    result = run_flower(cfg, tmp_path / "run")
    assert_same_numbers(result.history, sim.history)
    assert result.summary["compression_down"] == sim.summary["compression_down"] > 1.9
    assert result.summary["raw_bytes_uploaded"] == sim.summary["raw_bytes_uploaded"]


def test_resume_with_error_feedback_equals_the_uninterrupted_run(tmp_path: Path) -> None:
    cfg = tiny(tmp_path, rounds=3, checkpoint_every=1, join_ratio=0.7, **CODECS)
    reference = fedrir.run(cfg, out=None)
    out = tmp_path / "run"

    def stop_after_round_2(_: RoundRecord | None, round_: int) -> None:
        if round_ == 2:
            raise FedrirError("stopped on purpose after round 2")

    with pytest.raises(FedrirError, match="stopped on purpose"):
        fedrir.run(cfg, out=out, on_round=stop_after_round_2)
    manifest = json.loads((out / "checkpoint" / "manifest.json").read_text())
    assert manifest["round"] == 2
    stored = [load_file(out / "checkpoint" / name) for name in manifest["clients"].values()]
    assert any(k.startswith(RESIDUAL) for state in stored for k in state)  # residual checkpointed
    resumed = fedrir.resume(out)
    untimed = {"seconds": 0, "elapsed": 0, "codec_seconds": 0}
    assert [r.to_json() | untimed for r in resumed.history] == [
        r.to_json() | untimed for r in reference.history
    ]


def test_compare_codecs_names_cells_and_tabulates_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tiny(tmp_path, rounds=1, clients=2)
    out = tmp_path / "grid"
    rows = compare(config, ["fedavg"], [0], out, codecs=["none", "topk:0.01+int8"])
    by_codec = {r["codec"]: r for r in rows}
    assert set(by_codec) == {"none", "topk:0.01+int8"}
    for codec, row in by_codec.items():
        summary = json.loads((run_dir(out, "fedavg", 0, codec) / "summary.json").read_text())
        assert summary["uplink"] == codec
        assert row["compression_up"] == summary["compression_up"]
        assert row["mb_uploaded_per_round"] == summary["bytes_uploaded_per_round"] / 1e6
    assert (out / "runs" / "fedavg-topk0.01+int8-seed0" / "summary.json").exists()
    assert by_codec["none"]["compression_up"] == 1.0
    assert by_codec["topk:0.01+int8"]["compression_up"] > 20  # a tiny model: vectors weigh more
    assert by_codec["none"]["mb_downloaded_per_round"] == by_codec["none"]["mb_uploaded_per_round"]
    md = (out / "results.md").read_text()
    assert "| fedavg | topk:0.01+int8 |" in md and "ratio up / down" in md
    # a bad codec: one line listing the valid forms, before anything runs
    bad = tmp_path / "bad"
    code = main(["compare", "--algorithms", "fedavg", "--codecs", "none,topk:2", "--out", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "'topk:2'" in err and "topk:R+C" in err
    assert not bad.exists()


def test_a_checkpoint_from_before_codecs_resumes(tmp_path: Path) -> None:
    """A manifest without the codec fields (as written before codecs were wired) resumes, its
    rounds counted as sent unencoded, to the numbers of the uninterrupted run."""
    cfg = tiny(tmp_path, rounds=2, checkpoint_every=1, clients=2)
    reference = fedrir.run(cfg, out=None)
    out = tmp_path / "run"

    def stop_after_round_1(_: RoundRecord | None, round_: int) -> None:
        if round_ == 1:
            raise FedrirError("stopped on purpose after round 1")

    with pytest.raises(FedrirError, match="stopped on purpose"):
        fedrir.run(cfg, out=out, on_round=stop_after_round_1)
    path = out / "checkpoint" / "manifest.json"
    manifest = json.loads(path.read_text())
    for name in ("raw_bytes_up", "raw_bytes_down", "codec_seconds"):
        del manifest["counters"][name]
    for record in manifest["history"]:
        for name in ("raw_bytes_up", "raw_bytes_down", "compression_up", "compression_down"):
            del record[name]
        del record["codec_seconds"]
    path.write_text(json.dumps(manifest))
    resumed = fedrir.resume(out)
    untimed = {"seconds": 0, "elapsed": 0}
    assert [r.to_json() | untimed for r in resumed.history] == [
        r.to_json() | untimed for r in reference.history
    ]
    assert resumed.summary["raw_bytes_uploaded"] == reference.summary["raw_bytes_uploaded"]
