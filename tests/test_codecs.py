"""Codecs: round-trip error bounds, unbiasedness, exact top-k, error feedback, exact byte counts."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from safetensors.torch import save

from fedrir.config import Config
from fedrir.engine.codecs import CHUNK, Tensors, _index_dtype, _indices, _positions, parse_codec
from fedrir.errors import ConfigError

SPECS = ["none", "fp16", "bf16", "int8", "qsgd:1", "qsgd:3", "topk:0.1", "topk:0.05+qsgd:5"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def mixed(seed: int) -> Tensors:
    """Every dtype a payload may hold, including a 0-d tensor and a partial last chunk."""
    g = gen(seed)
    return {
        "conv.weight": torch.randn(8, 3, 5, 5, generator=g),
        "fc.weight": torch.randn(3, 1000, generator=g, dtype=torch.float64),
        "head.bias": torch.randn(7, generator=g).to(torch.bfloat16),
        "scale": torch.randn((), generator=g).to(torch.float16),
        "bn.num_batches_tracked": torch.tensor(12, dtype=torch.int64),
    }


def nbytes(tensors: Tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def roundtrip(spec: str, tensors: Tensors, seed: int = 0) -> Tensors:
    codec = parse_codec(spec)
    return codec.decode(codec.encode(tensors, gen(seed), None)[0])


# ----------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("spec", "state"),
    [
        ("none", False),
        ("fp16", False),
        ("bf16", False),
        ("int8", False),
        ("qsgd:1", False),
        ("qsgd:8", False),
        ("topk:1", True),
        ("topk:0.01+int8", True),
        ("topk:1e-3+qsgd:4", True),
        ("topk:.5+bf16", True),
    ],
)
def test_valid_specs_parse(spec: str, state: bool) -> None:
    codec = parse_codec(spec)
    assert codec.spec == spec and codec.has_state is state


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "topk:0",
        "topk:2",
        "topk:-0.1",
        "topk:nan",
        "topk:",
        "qsgd:0",
        "qsgd:9",
        "qsgd:2.5",
        "int8+topk:0.1",
        "fp16+",
        "topk:0.1+",
        "topk:0.1+none",
        "topk:0.1+topk:0.2",
        "topk:0.1+int8+fp16",
        "FP16",
        " fp16",
        "zstd",
    ],
)
def test_bad_specs_are_one_line_errors_listing_the_valid_forms(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_codec(spec)
    message = str(info.value)
    assert "\n" not in message and repr(spec) in message
    assert all(form in message for form in ("none", "fp16", "bf16", "int8", "qsgd:B", "topk:R+C"))


def test_config_validates_both_directions() -> None:
    assert Config(uplink="topk:0.01+int8", downlink="fp16").uplink == "topk:0.01+int8"
    with pytest.raises(ConfigError, match=r"'uplink'.*'topk:0'"):
        Config(uplink="topk:0")
    with pytest.raises(ConfigError, match=r"'downlink'.*'int8\+topk:0.1'"):
        Config(downlink="int8+topk:0.1")


# ----------------------------------------------------------------------------- round trips


def test_none_is_the_input_itself() -> None:
    tensors = mixed(0)
    codec = parse_codec("none")
    encoded, residual = codec.encode(tensors, gen(0), None)
    decoded = codec.decode(encoded)
    assert residual is None and encoded.keys() == decoded.keys() == tensors.keys()
    assert all(encoded[k] is t and decoded[k] is t for k, t in tensors.items())


@pytest.mark.parametrize("spec", SPECS)
def test_shapes_dtypes_restored_and_non_floats_untouched(spec: str) -> None:
    tensors = mixed(1)
    decoded = roundtrip(spec, tensors)
    assert decoded.keys() == tensors.keys()
    for key, t in tensors.items():
        assert decoded[key].shape == t.shape and decoded[key].dtype == t.dtype, key
    assert decoded["bn.num_batches_tracked"] is tensors["bn.num_batches_tracked"]


@pytest.mark.parametrize(("spec", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_casts_are_exact_to_their_dtype(spec: str, dtype: torch.dtype) -> None:
    tensors = mixed(2)
    decoded = roundtrip(spec, tensors)
    for key, t in tensors.items():
        if t.is_floating_point():
            assert torch.equal(decoded[key], t.to(dtype).to(t.dtype)), key
    assert not torch.equal(decoded["conv.weight"], tensors["conv.weight"])  # it did cast


@pytest.mark.parametrize("bits", [1, 3, 8])
def test_qsgd_is_unbiased_with_error_below_one_step(bits: int) -> None:
    """Each entry decodes to one of the two levels around it (2m/L apart, m = its chunk's max |x|,
    L = 2^B − 1), so its error is below one step and its variance at most step²/4: the mean error
    of 2000 independent draws lies within 5 standard deviations of 0 for every entry (a chance of
    about 6e-7 per entry to fail), and the total error within 4 of them.

    x has a partial last chunk. The draws are rows of one tensor, each x padded with zeros to
    whole chunks: the same chunks and scales as x alone, with independent noise per row."""
    n, width, rows, calls = CHUNK + 100, 2 * CHUNK, 200, 10
    x = torch.randn(n, generator=gen(3)) * torch.linspace(0.01, 3, n)
    x[5] = 0.0
    padded = torch.nn.functional.pad(x, (0, width - n))
    step = 2 * padded.abs().view(-1, CHUNK).amax(dim=1).repeat_interleave(CHUNK)[:n] / (2**bits - 1)
    codec, rng = parse_codec(f"qsgd:{bits}"), gen(4)
    error = codec.decode(codec.encode({"x": x}, rng, None)[0])["x"] - x
    assert (error.abs() <= step * (1 + 1e-5)).all()
    total = torch.zeros(n, dtype=torch.float64)
    for _ in range(calls):
        batch = {"x": padded.expand(rows, width)}
        error = codec.decode(codec.encode(batch, rng, None)[0])["x"][:, :n] - x
        assert (error.abs() <= step * (1 + 1e-5)).all()
        total += error.sum(dim=0)
    draws = rows * calls
    sigma = step.double() / 2 / math.sqrt(draws)
    assert (total / draws).abs().le(5 * sigma).all()
    assert abs(total.sum() / draws) <= 4 * sigma.square().sum().sqrt()
    assert total.abs().sum() > 0  # it did round


def test_int8_is_qsgd8() -> None:
    tensors = mixed(5)
    a = parse_codec("int8").encode(tensors, gen(6), None)[0]
    b = parse_codec("qsgd:8").encode(tensors, gen(6), None)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("spec", ["int8", "qsgd:3", "topk:0.1+qsgd:2"])
def test_deterministic_given_the_generator_seed(spec: str) -> None:
    tensors, codec = mixed(7), parse_codec(spec)
    a, b, c = (codec.encode(tensors, gen(seed), None)[0] for seed in (8, 8, 9))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv.weight/v"], c["conv.weight/v"])


# ----------------------------------------------------------------------------- top-k


def test_topk_keeps_exactly_the_k_largest_then_selects_from_update_plus_residual() -> None:
    n = 1000
    g = gen(10)
    magnitudes = torch.randperm(n, generator=g).float() + 1  # distinct: the top k is unique
    x = magnitudes * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    codec = parse_codec("topk:0.03")
    encoded, residual = codec.encode({"x": x.view(10, 100)}, gen(0), None)
    sent = codec.decode(encoded)["x"].view(-1)
    largest = set(range(n - 30 + 1, n + 1))  # the 30 largest magnitudes
    assert {int(m) for m in magnitudes[sent != 0]} == largest
    assert torch.equal(sent[sent != 0], x[sent != 0])
    assert residual is not None and torch.equal(residual["x"].view(-1), x - sent)
    # the next update is added to what was not sent before selecting
    update = torch.randn(n, generator=g) * 10
    encoded, _ = codec.encode({"x": update.view(10, 100)}, gen(0), residual)
    sent = codec.decode(encoded)["x"].view(-1)
    accumulated = update + residual["x"].view(-1)
    assert set((sent != 0).nonzero().view(-1).tolist()) == set(
        accumulated.abs().argsort(descending=True)[:30].tolist()
    )


@pytest.mark.parametrize("spec", ["topk:0.1", "topk:0.05+int8", "topk:0.2+fp16", "topk:0.1+qsgd:1"])
def test_error_feedback_sent_plus_residual_is_the_sum_of_updates(spec: str) -> None:
    """Each round the codec forms acc = update + residual and keeps acc − sent, two float32
    roundings of at most eps · |acc| each: over R rounds Σ sent + residual = Σ updates within
    2 · R · eps · max |acc|."""
    codec, rng, g, rounds = parse_codec(spec), gen(11), gen(12), 6
    residual: Tensors | None = None
    shapes = {"a": (40, 50), "b": (300,)}
    true_sum = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}
    sent_sum = {k: torch.zeros(shape, dtype=torch.float64) for k, shape in shapes.items()}
    largest = 0.0
    for _ in range(rounds):
        update = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
        for k, u in update.items():
            acc = u if residual is None else u + residual[k]
            largest = max(largest, acc.abs().max().item())
        encoded, residual = codec.encode(update, rng, residual)
        for k, v in codec.decode(encoded).items():
            sent_sum[k] += v
            true_sum[k] += update[k]
    assert residual is not None
    tolerance = 2 * rounds * torch.finfo(torch.float32).eps * largest
    for k in shapes:
        assert residual[k].abs().sum() > 0 and (sent_sum[k] != 0).any()
        gap = (sent_sum[k] + residual[k] - true_sum[k]).abs().max().item()
        assert gap <= tolerance, (k, gap, tolerance)


@pytest.mark.parametrize(
    ("gaps", "form"),
    [
        ([0, 0, 1, 253, 254, 255, 256, 509, 510, 511, 3], "g"),  # 7 escapes: 18 bytes, not 22
        ([9] * 50, "g"),
        ([70_000, 5], "i"),  # long gaps: 276 bytes against 8 of int32 indices
        ([0], "i"),  # a tie: the plain form
    ],
)
def test_topk_positions_round_trip_in_the_smaller_form(gaps: list[int], form: str) -> None:
    """Gap g (one less than the distance to the previous index) costs 1 + g // 255 bytes."""
    index = torch.cumsum(torch.tensor(gaps) + 1, dim=0) - 1
    n = int(index[-1]) + 1
    parts = _positions(index, n)
    assert list(parts) == [form]
    assert torch.equal(_indices(parts), index)
    coded = sum(1 + g // 255 for g in gaps)
    plain = len(gaps) * index.to(_index_dtype(n)).element_size()
    assert nbytes(parts) == (coded if coded < plain else plain)


def test_stateless_codecs_refuse_a_residual() -> None:
    with pytest.raises(ValueError, match="keeps no residual"):
        parse_codec("int8").encode({"x": torch.ones(3)}, gen(0), {"x": torch.zeros(3)})


# ----------------------------------------------------------------------------- bytes


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        # a (3, 1000) float32 tensor and an int64 scalar (8 bytes, passed through); the header
        # is 3 int32 (dtype code and two dims): 12 bytes; 3000 entries make 2 chunks of scales
        ("none", 12000 + 8),
        ("fp16", 6000 + 12 + 8),
        ("bf16", 6000 + 12 + 8),
        ("int8", 3000 + 2 * 4 + 12 + 8),
        ("qsgd:3", 1125 + 2 * 4 + 12 + 8),  # 9000 bits
        # top-k keeps 300 of 3000: their gaps (about 10) are one byte each, half of int16 indices
        ("topk:0.1", 300 * 4 + 300 + 12 + 8),
        ("topk:0.1+int8", 300 + 300 + 4 + 12 + 8),
        ("topk:0.1+qsgd:1", 38 + 300 + 4 + 12 + 8),  # 300 bits in 38 bytes
    ],
)
def test_bytes_counted_are_the_encoded_size(spec: str, expected: int) -> None:
    """What is counted is what a transport carries: safetensors stores exactly these data bytes
    (it also refuses tensors that share memory, so no part is a view of a larger buffer)."""
    tensors = {"w": torch.randn(3, 1000, generator=gen(13)), "n": torch.tensor(5)}
    encoded, _ = parse_codec(spec).encode(tensors, gen(0), None)
    assert nbytes(encoded) == expected
    blob = save(encoded)
    header_size = struct.unpack("<Q", blob[:8])[0]
    metadata = json.loads(blob[8 : 8 + header_size])
    data = sum(
        end - start
        for k, v in metadata.items()
        if k != "__metadata__"
        for start, end in [v["data_offsets"]]
    )
    assert data == len(blob) - 8 - header_size == expected


@pytest.mark.parametrize(("spec", "ratio"), [("int8", 3.99), ("topk:0.01+int8", 150)])
def test_compression_ratios(spec: str, ratio: float) -> None:
    tensors = {
        "w": torch.randn(64, CHUNK, generator=gen(14)),
        "b": torch.randn(64, generator=gen(15)),
    }
    encoded, _ = parse_codec(spec).encode(tensors, gen(0), None)
    assert nbytes(tensors) / nbytes(encoded) >= ratio
