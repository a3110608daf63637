"""Fraud-detection features, in Python: the same functions as the Rust module `udfs/fraud`.

Tests check that this module gives the same values as the Rust one, row for row, so that a team
can write its features in either language. Python's `math` inside the component is wasi-libc's
(musl's): its `sin`, `cos`, `asin`, `log1p` and `sqrt` are the same fdlibm code as the Rust SDK's
`riffle_udf::math`, but its `exp` and `pow` are newer, so `exp` comes from `riffle_udf.math`
(the Rust SDK's algorithm) and a square is `x * x` (what the Rust SDK's `pow(x, 2.0)` does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

from riffle_udf import Result, RowError, Timestamp, aggregate, export_udfs, scalar
from riffle_udf.math import LN_2, exp

DEFAULT_COUNTRIES = {
    "US": 0.0,
    "GB": 0.1,
    "DE": 0.05,
    "FR": 0.1,
    "NL": 0.1,
    "IN": 0.6,
    "BR": 0.9,
    "NG": 2.2,
    "RU": 1.9,
    "CN": 0.8,
}


def _ascii_upper(text: str) -> str:
    return "".join(chr(ord(c) - 32) if "a" <= c <= "z" else c for c in text)


@dataclass
class Model:
    """Weights of the risk model."""

    intercept: float = -6.0
    log_amount: float = 0.55
    high_amount: float = 1.8
    unknown_country: float = 0.9
    countries: dict = field(default_factory=lambda: dict(DEFAULT_COUNTRIES))

    @staticmethod
    def parse(config: str) -> "Model":
        """Parses `key = value` lines (`#` starts a comment) on top of the default weights."""
        model = Model()
        for n, line in enumerate(config.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            if "=" not in line:
                raise ValueError(f"line {n}: expected `key = value`")
            key, value = (part.strip() for part in line.split("=", 1))
            try:
                number = float(value)
            except ValueError as e:
                raise ValueError(f"line {n}: {key}: {e}") from None
            if key in ("intercept", "log_amount", "high_amount", "unknown_country"):
                setattr(model, key, number)
            elif key.startswith("country."):
                code = key[8:]
                if not (len(code) == 2 and code.isascii() and code.isalpha()):
                    raise ValueError(f"line {n}: {key}: a country code is two ASCII letters")
                model.countries[_ascii_upper(code)] = number
            else:
                raise ValueError(f"line {n}: unknown key {key!r}")
        return model

    def country_weight(self, country: str) -> float:
        return self.countries.get(_ascii_upper(country), self.unknown_country)

    def score(self, amount: float, country: str) -> float:
        """Probability-like score in (0, 1)."""
        amount = amount if amount >= 0.0 else 0.0  # NaN becomes 0 too, as Rust's f64::max
        # A soft step around 2,000: large amounts weigh more without a cliff.
        high = 1.0 / (1.0 + exp(-(amount - 2_000.0) / 250.0))
        z = self.intercept + self.log_amount * math.log1p(amount) + self.high_amount * high + self.country_weight(country)
        return 1.0 / (1.0 + exp(-z))


MODEL: Optional[Model] = None


def model() -> Model:
    global MODEL
    if MODEL is None:
        MODEL = Model()
    return MODEL


def configure(config: bytes) -> None:
    """Applies the init configuration: model weights as `key = value` lines."""
    global MODEL
    try:
        text = config.decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"config is not UTF-8: {e}") from None
    parsed = Model.parse(text)
    if MODEL is not None and MODEL != parsed:
        raise ValueError("the model was already configured differently")
    MODEL = parsed


@scalar
def risk_score(amount: float, country: str) -> float:
    """Fraud risk in (0, 1) from the amount and the merchant's ISO country code."""
    return model().score(amount, country)


EARTH_RADIUS_KM = 6_371.008_8


def _sin(x: float) -> float:
    # CPython raises for an infinite argument; libm (and so the Rust module) gives NaN.
    return math.nan if math.isinf(x) else math.sin(x)


def _cos(x: float) -> float:
    return math.nan if math.isinf(x) else math.cos(x)


@scalar
def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in kilometres between two points given in degrees."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp = p2 - p1
    dl = math.radians(lon2 - lon1)
    s1, s2 = _sin(dp / 2.0), _sin(dl / 2.0)
    a = s1 * s1 + _cos(p1) * _cos(p2) * (s2 * s2)
    a = a if a != a else min(max(a, 0.0), 1.0)  # clamp, keeping NaN as Rust's clamp does
    return 2.0 * EARTH_RADIUS_KM * math.asin(math.sqrt(a))


@scalar
def amount_bucket(amount: float) -> Result[str]:
    """Order-of-magnitude bucket of an amount. Negative amounts are a row error."""
    if amount != amount or amount < 0.0:
        raise RowError(f"invalid amount {amount}")
    if amount < 10.0:
        return "<10"
    if amount < 100.0:
        return "10-100"
    if amount < 1_000.0:
        return "100-1k"
    if amount < 10_000.0:
        return "1k-10k"
    return ">=10k"


@scalar
def is_night(ts: Timestamp) -> bool:
    """True between 00:00 and 05:59 UTC, when fraud rates peak."""
    return ts.hour_of_day() < 6


#: Half-life of `DecayedAvg`: a transaction's weight halves every hour.
DECAY_HALF_LIFE_MICROS = 3_600 * Timestamp.MICROS_PER_SECOND


def _weight_at(ts: int, at: int) -> float:
    """Weight, as of `at`, of a row at `ts`: 1 at `at`, halving per half-life before it."""
    return exp(-float(at - ts) / float(DECAY_HALF_LIFE_MICROS) * LN_2)


@aggregate
class DecayedAvg:
    """Exponentially decayed average amount (half-life one hour, as of the latest transaction):
    the card's recent spending level, with old history fading out instead of falling off a
    window edge. NULL for a card with no rows."""

    at: Optional[Timestamp] = None
    weighted: float = 0.0
    weight: float = 0.0

    def _advance(self, at: Timestamp) -> None:
        """Moves the reference time to `at` (never backwards), rescaling the sums."""
        if self.at is None:
            self.at = at
        elif self.at < at:
            scale = _weight_at(self.at, at)
            self.weighted *= scale
            self.weight *= scale
            self.at = at

    def update(self, amount: float, ts: Timestamp) -> None:
        self._advance(ts)
        w = _weight_at(ts, self.at)
        self.weighted += amount * w
        self.weight += w

    def retract(self, amount: float, ts: Timestamp) -> None:
        self._advance(ts)
        w = _weight_at(ts, self.at)
        self.weighted -= amount * w
        self.weight -= w

    def merge(self, other: "DecayedAvg") -> None:
        if other.at is not None:
            self._advance(other.at)
            scale = _weight_at(other.at, self.at)
            self.weighted += other.weighted * scale
            self.weight += other.weight * scale

    def finish(self) -> Optional[float]:
        return self.weighted / self.weight if self.weight > 0.0 else None


WitWorld = export_udfs(risk_score, haversine_km, amount_bucket, is_night, DecayedAvg, init=configure)
