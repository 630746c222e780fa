"""Codecs for what crosses the transport: casts, stochastic quantization, top-k with error feedback.

A codec turns a ``dict[str, Tensor]`` into another ``dict[str, Tensor]`` (the encoded form), so any
transport can carry it and its bytes are ``Σ numel · element_size`` over the encoded tensors, which
is exactly what is sent: values, indices, scales and headers. Algorithms never see codecs; the
engine encodes at the boundary (uplink: the update, i.e. the upload minus what was broadcast) and
decodes before aggregation.

Specs (the ``uplink`` / ``downlink`` config keys):

- ``none``: the tensors themselves, bit for bit.
- ``fp16``, ``bf16``: casts.
- ``qsgd:B`` (``int8`` = ``qsgd:8``), 1 ≤ B ≤ 8: QSGD-style stochastic quantization (Alistarh et
  al., "QSGD: Communication-Efficient SGD via Gradient Quantization and Encoding", NeurIPS 2017)
  with one scale ``m = max |x|`` per chunk of :data:`CHUNK` entries and the 2^B levels
  ``m · (2j/L − 1)``, ``j = 0 … L = 2^B − 1``, evenly spaced over [−m, m]. Each entry rounds to
  one of its two neighbouring levels with the probability that makes it unbiased
  (E[decode(encode(x))] = x); the error of an entry is below one step, 2m/L. Codes are bit-packed,
  B bits each (at B = 8 they are the bytes themselves, uint8 codes 0 … 255). Using all 2^B codes
  (rather than QSGD's symmetric 2s + 1 levels around 0) makes B = 1 possible (levels ±m) and the
  step slightly finer for the same bits.
- ``topk:R``, 0 < R ≤ 1: keep the round(R · n) entries of largest magnitude of each tensor (at
  least one), with error feedback (Stich et al., "Sparsified SGD with Memory", NeurIPS 2018):
  selection is from ``update + residual``, and what was not sent becomes the new residual, which the
  client keeps in its private state (so it is checkpointed and resumes exactly).
- ``topk:R+C``, C one of the casts or quantizers: the kept values travel through C, and C's error
  on them also goes into the residual, so Σ sent + residual = Σ true updates up to float rounding.

Top-k sends its entries in index order, and their positions in whichever of two forms is smaller
for the tensor: ``i``, the indices in the smallest integer dtype that holds them, or ``g``, the gaps
between consecutive indices (minus one) as bytes, a gap g of 255 or more as ⌊g / 255⌋ bytes 255
(each adding 255) followed by g mod 255. At R = 1 % the gaps average 100, so a position costs
about 1.1 bytes instead of 4 (int32 indices for tensors of more than 65 536 entries): with int8
values top-k 1 % sends ~2.1 bytes per kept entry, ~190× fewer than float32, where int32 indices
would cap it at 80×. At R = 0.1 % the gaps average 1000 and plain indices are smaller.

Encoded keys are ``<key>/<part>``: ``v`` values, ``i`` indices or ``g`` gaps (above), ``s``
scales, ``h`` header (int32: dtype code, then the shape), ``r`` a tensor passed through as it is
(anything but float32/64, float16 and bfloat16, e.g. BatchNorm's ``num_batches_tracked``).
``decode`` needs nothing but the encoded dict and the codec.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import torch

from fedrir.errors import ConfigError, FedrirError

Tensors = dict[str, torch.Tensor]

CHUNK = 2048
"""Entries per quantization scale: 4 bytes of scale per 2048 values (0.2 % at 8 bits)."""

FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
"""The dtypes a codec encodes, by their header code (the position here); others pass through."""

VALID_FORMS = (
    "none, fp16, bf16, int8, qsgd:B (1 <= B <= 8 bits; int8 = qsgd:8), "
    "topk:R (keep a fraction 0 < R <= 1), or topk:R+C with C one of fp16, bf16, int8, qsgd:B"
)


class _Values(Protocol):
    """How a flat vector of values travels: its encoded parts and back."""

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> Tensors: ...

    def decode(
        self, parts: Mapping[str, torch.Tensor], count: int, dtype: torch.dtype
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class _Raw:
    """Values as they are (plain ``topk:R``)."""

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> Tensors:
        return {"v": x}

    def decode(
        self, parts: Mapping[str, torch.Tensor], count: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return parts["v"].to(dtype)


@dataclass(frozen=True)
class _Cast:
    """Values cast to a narrower float dtype."""

    dtype: torch.dtype

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> Tensors:
        return {"v": x.to(self.dtype)}

    def decode(
        self, parts: Mapping[str, torch.Tensor], count: int, dtype: torch.dtype
    ) -> torch.Tensor:
        return parts["v"].to(dtype)


@dataclass(frozen=True)
class _Qsgd:
    """Unbiased stochastic rounding to 2^bits levels per chunk, bit-packed (see the module doc)."""

    bits: int

    @property
    def top(self) -> int:
        return (1 << self.bits) - 1

    def encode(self, x: torch.Tensor, rng: torch.Generator) -> Tensors:
        n = x.numel()
        chunks = _pad(x.float(), CHUNK).view(-1, CHUNK)
        scales = chunks.abs().amax(dim=1)
        inverse = torch.where(scales > 0, 1 / scales, 0.0).unsqueeze(1)
        level = (chunks * inverse + 1) * (self.top / 2)  # in [0, L]: E[code] = level
        noise = torch.rand(level.shape, generator=rng, dtype=level.dtype, device=level.device)
        codes = (level + noise).floor_().clamp_(0, self.top).to(torch.uint8).view(-1)[:n]
        return {"v": _pack(codes, self.bits), "s": scales}

    def decode(
        self, parts: Mapping[str, torch.Tensor], count: int, dtype: torch.dtype
    ) -> torch.Tensor:
        codes = _pad(_unpack(parts["v"], self.bits, count).float(), CHUNK).view(-1, CHUNK)
        values = (codes * (2 / self.top) - 1) * parts["s"].unsqueeze(1)
        return values.view(-1)[:count].to(dtype)


def _pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    return torch.nn.functional.pad(x, (0, -x.numel() % multiple))


def _pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits`` low bits of each uint8 code, concatenated into ⌈n · bits / 8⌉ bytes.

    Eight codes make one integer of 8 · bits ≤ 56 bits, which is cut into ``bits`` bytes.
    """
    if bits == 8:
        return codes.clone()  # compact: not a view into the padded chunks
    shifts = bits * torch.arange(7, -1, -1, device=codes.device)
    words = (_pad(codes, 8).view(-1, 8).long() << shifts).sum(dim=1, keepdim=True)
    packed = (words >> (8 * torch.arange(bits - 1, -1, -1, device=codes.device))) & 255
    return packed.to(torch.uint8).view(-1)[: -(-codes.numel() * bits // 8)].clone()


def _unpack(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """The first ``count`` codes that :func:`_pack` put into ``packed``."""
    if bits == 8:
        return packed
    arange = torch.arange(bits - 1, -1, -1, device=packed.device)
    groups = _pad(packed, bits).view(-1, bits).long()
    words = (groups << (8 * arange)).sum(dim=1, keepdim=True)
    codes = (words >> (bits * torch.arange(7, -1, -1, device=packed.device))) & ((1 << bits) - 1)
    return codes.to(torch.uint8).view(-1)[:count]


def _positions(index: torch.Tensor, n: int) -> Tensors:
    """The ascending ``index`` (below ``n``) as the smaller of its two forms (module doc)."""
    gaps = torch.diff(index, prepend=index.new_full((1,), -1)) - 1
    escapes = gaps // 255
    plain = index.to(_index_dtype(n))
    if len(index) + int(escapes.sum()) >= plain.numel() * plain.element_size():
        return {"i": plain}
    ends = torch.cumsum(escapes + 1, dim=0) - 1
    coded = torch.full((int(ends[-1]) + 1,), 255, dtype=torch.uint8, device=index.device)
    coded[ends] = (gaps % 255).to(torch.uint8)
    return {"g": coded}


def _indices(parts: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The indices :func:`_positions` encoded, as int64."""
    if "i" in parts:
        return parts["i"].long()
    coded = parts["g"].long()
    totals = torch.cumsum(coded, dim=0)[coded != 255]  # a gap ends at each byte below 255
    gaps = torch.diff(totals, prepend=totals.new_zeros(1))
    return torch.cumsum(gaps + 1, dim=0) - 1


def _index_dtype(n: int) -> torch.dtype:
    """The smallest integer dtype that holds every index below ``n``."""
    for dtype in (torch.uint8, torch.int16, torch.int32):
        if n - 1 <= torch.iinfo(dtype).max:
            return dtype
    return torch.int64


def _header(x: torch.Tensor) -> torch.Tensor:
    return torch.tensor([FLOATS.index(x.dtype), *x.shape], dtype=torch.int32)


@dataclass(frozen=True)
class Codec:
    """One direction's codec, built by :func:`parse_codec` from its spec."""

    spec: str
    values: _Values | None
    """How (kept) values travel; ``None`` for ``none``: the tensors themselves."""
    fraction: float | None = None
    """Top-k's kept fraction R; ``None`` sends every entry."""

    @property
    def has_state(self) -> bool:
        """Whether each client must keep a residual (error feedback) between rounds."""
        return self.fraction is not None

    def encode(
        self, tensors: Mapping[str, torch.Tensor], rng: torch.Generator, residual: Tensors | None
    ) -> tuple[Tensors, Tensors | None]:
        """``(encoded, new residual)``; the residual is ``None`` unless :attr:`has_state`.

        ``residual`` is the previous call's (``None`` at first: zeros). Randomness (quantization)
        comes only from ``rng``.
        """
        if residual is not None and not self.has_state:
            raise ValueError(f"codec {self.spec!r} keeps no residual, but one was passed")
        if self.values is None:
            return dict(tensors), None
        encoded: Tensors = {}
        new_residual: Tensors = {}
        for key, x in tensors.items():
            if x.dtype not in FLOATS:
                encoded[f"{key}/r"] = x
                continue
            flat = x.reshape(-1)
            if self.fraction is None:
                parts = self.values.encode(flat, rng)
            else:
                if residual is not None:
                    flat = flat + residual[key].reshape(-1)
                parts, rest = self._top_k(flat, rng)
                new_residual[key] = rest.view(x.shape)
            encoded.update({f"{key}/{part}": t for part, t in parts.items()})
            encoded[f"{key}/h"] = _header(x)
        return encoded, (new_residual if self.has_state else None)

    def _top_k(self, flat: torch.Tensor, rng: torch.Generator) -> tuple[Tensors, torch.Tensor]:
        """Parts for the largest entries of ``flat``, and what was not sent (the new residual)."""
        assert self.values is not None and self.fraction is not None
        n = flat.numel()
        k = min(n, max(1, round(self.fraction * n)))
        index = flat.abs().topk(k, sorted=False).indices.sort().values
        kept = flat[index]
        parts = self.values.encode(kept, rng)
        sent = self.values.decode(parts, k, flat.dtype)
        parts.update(_positions(index, n))
        return parts, flat.index_put((index,), kept - sent)

    def decode(self, encoded: Mapping[str, torch.Tensor]) -> Tensors:
        """The tensors ``encoded`` stands for, with their shapes and dtypes."""
        if self.values is None:
            return dict(encoded)
        groups: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in encoded.items():
            key, _, part = name.rpartition("/")
            groups.setdefault(key, {})[part] = t
        out: Tensors = {}
        for key, parts in groups.items():
            if "r" in parts:
                out[key] = parts["r"]
                continue
            if "h" not in parts:
                raise FedrirError(f"'{key}' has no header: it was not encoded by {self.spec!r}")
            code, *shape = parts["h"].tolist()
            dtype, count = FLOATS[code], math.prod(shape)
            if self.fraction is None:
                out[key] = self.values.decode(parts, count, dtype).view(shape)
            else:
                index = _indices(parts)
                dense = torch.zeros(count, dtype=dtype, device=index.device)
                dense[index] = self.values.decode(parts, len(index), dtype)
                out[key] = dense.view(shape)
        return out


_VALUES: dict[str, _Values] = {
    "fp16": _Cast(torch.float16),
    "bf16": _Cast(torch.bfloat16),
    "int8": _Qsgd(8),
    **{f"qsgd:{b}": _Qsgd(b) for b in range(1, 9)},
}
_TOPK = re.compile(r"topk:((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)")


def parse_codec(spec: str) -> Codec:
    """The codec a spec names; anything else is a one-line :class:`ConfigError`."""
    if spec == "none":
        return Codec(spec, None)
    if spec in _VALUES:
        return Codec(spec, _VALUES[spec])
    head, plus, tail = spec.partition("+")
    match = _TOPK.fullmatch(head)
    if match and 0 < float(match[1]) <= 1 and (tail in _VALUES or not plus):
        return Codec(spec, _VALUES[tail] if plus else _Raw(), float(match[1]))
    raise ConfigError(f"invalid codec {spec!r}: expected {VALID_FORMS}")
