"""The Python SDK's batch path, natively: the component's exports driven with the bindings
componentize-py generates for the contract, exactly as the host drives them inside the sandbox.

Run with `python3 -m unittest discover -s guest-sdk-py/tests` (scripts/test.sh does). Needs
componentize-py (scripts/install-guest-toolchain.sh installs it) to generate the bindings.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import types
import unittest
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "guest-sdk-py"))

_bindings_dir = tempfile.mkdtemp(prefix="riffle-py-bindings-")
subprocess.run(
    ["componentize-py", "-d", os.path.join(ROOT, "wit"), "-w", "udf", "bindings", _bindings_dir],
    check=True,
    stdout=subprocess.DEVNULL,
)
sys.path.insert(0, _bindings_dir)

from componentize_py_types import Err  # noqa: E402
from wit_world.imports import types as wit  # noqa: E402

import riffle_udf  # noqa: E402
from riffle_udf import Date, Float32, Int32, Result, RowError, Timestamp, aggregate, export_udfs, scalar  # noqa: E402


@scalar
def echo_all(
    b: bool, i: Int32, l: int, f: Float32, d: float, s: str, y: bytes, t: Timestamp, day: Date
) -> str:
    """Every type in, one string out."""
    return f"{b}|{i}|{l}|{f}|{d}|{s}|{y.hex()}|{int(t)}|{int(day)}"


@scalar(name="maybe_len")
def maybe_length(s: Optional[str]) -> Optional[int]:
    return None if s is None else len(s)


@scalar
def strict_double(x: float) -> float:
    return x * 2


@scalar
def checked_sqrt(x: float) -> Result[float]:
    if x < 0:
        raise RowError(f"negative: {x}")
    return math.sqrt(x)


@scalar
def broken(x: float) -> float:
    return x / 0


@scalar
def lies(x: float) -> float:
    return None  # type: ignore[return-value]


@scalar
def flip(b: bool) -> bool:
    return not b


@scalar(nondeterministic=True)
def now_ish() -> Timestamp:
    return Timestamp(42)


@scalar
def refuse() -> Result[int]:
    raise RowError("nothing to give")


@aggregate
class SumCount:
    """Sum and count of values."""

    total: float = 0.0
    count: int = 0
    first: Optional[str] = None

    def update(self, value: float, label: Optional[str]) -> None:
        self.total += value
        self.count += 1
        if self.first is None:
            self.first = label

    def retract(self, value: float, label: Optional[str]) -> None:
        self.total -= value
        self.count -= 1

    def merge(self, other: "SumCount") -> None:
        self.total += other.total
        self.count += other.count
        if self.first is None:
            self.first = other.first

    def finish(self) -> Result[Optional[float]]:
        if self.count < 0:
            raise RowError("more retracted than added")
        return None if self.count == 0 else self.total / self.count


World = export_udfs(echo_all, maybe_length, strict_double, checked_sqrt, broken, lies, flip, now_ish, refuse, SumCount)


def bits(flags):
    return riffle_udf._pack_bits(flags)


def floats(values, validity=None):
    return wit.Column(len=len(values), validity=validity, values=wit.Values_Float64(values))


def strings(values, validity=None):
    data = [v.encode() for v in values]
    offsets = [0]
    for d in data:
        offsets.append(offsets[-1] + len(d))
    return wit.Column(len=len(values), validity=validity, values=wit.Values_Utf8(wit.VarLen(offsets=offsets, data=b"".join(data))))


class DescribeTest(unittest.TestCase):
    def test_signatures_follow_the_annotations(self):
        info = World().describe()
        self.assertEqual(info.abi_version, 2)
        self.assertTrue(info.sdk.startswith("riffle-udf-py"))
        self.assertFalse(info.has_init)
        by_name = {f.name: f for f in info.functions}
        self.assertEqual(
            [a.data_type for a in by_name["echo_all"].args],
            [wit.DataType.BOOLEAN, wit.DataType.INT32, wit.DataType.INT64, wit.DataType.FLOAT32, wit.DataType.FLOAT64,
             wit.DataType.UTF8, wit.DataType.BINARY, wit.DataType.TIMESTAMP, wit.DataType.DATE],
        )
        self.assertEqual(by_name["echo_all"].doc, "Every type in, one string out.")
        m = by_name["maybe_len"]
        self.assertEqual((m.args[0].nullable, m.returns, m.returns_null, m.fallible), (True, wit.DataType.INT64, True, False))
        c = by_name["checked_sqrt"]
        self.assertEqual((c.returns, c.returns_null, c.fallible), (wit.DataType.FLOAT64, False, True))
        self.assertFalse(by_name["now_ish"].deterministic)
        (agg,) = World().describe_aggregates()
        self.assertEqual(agg.name, "sum_count")
        self.assertEqual([(s.name, s.data_type, s.nullable) for s in agg.state],
                         [("total", wit.DataType.FLOAT64, False), ("count", wit.DataType.INT64, False), ("first", wit.DataType.UTF8, True)])
        self.assertTrue(agg.retractable and agg.fallible and agg.returns_null)

    def test_unsupported_types_and_bad_exports_are_refused_when_declared(self):
        with self.assertRaisesRegex(riffle_udf.SignatureError, "return type must be annotated"):
            scalar(lambda x: x)
        with self.assertRaisesRegex(riffle_udf.SignatureError, "unsupported type"):
            @scalar
            def bad(x: list) -> int:
                return 0
        with self.assertRaisesRegex(riffle_udf.SignatureError, "needs a default"):
            @aggregate
            class NoDefault:
                x: float

                def update(self, v: float) -> None: ...
                def merge(self, o) -> None: ...
                def finish(self) -> float: ...
        with self.assertRaisesRegex(riffle_udf.SignatureError, "exported twice"):
            export_udfs(strict_double, strict_double)
        with self.assertRaisesRegex(riffle_udf.SignatureError, "at least one"):
            export_udfs()


class CallTest(unittest.TestCase):
    def call(self, name, rows, args):
        info = World().describe()
        index = [f.name for f in info.functions].index(name)
        return World().call(index, rows, args)

    def test_every_type_crosses_in_arrow_layout(self):
        cols = [
            wit.Column(len=2, validity=None, values=wit.Values_Boolean(bits([True, False]))),
            wit.Column(len=2, validity=None, values=wit.Values_Int32([-7, 2**31 - 1])),
            wit.Column(len=2, validity=None, values=wit.Values_Int64([-(2**63), 5])),
            wit.Column(len=2, validity=None, values=wit.Values_Float32([0.5, -1.25])),
            floats([1e300, -0.0]),
            strings(["zß", ""]),
            wit.Column(len=2, validity=None, values=wit.Values_Binary(wit.VarLen(offsets=[3, 4, 6], data=b"\x00\xff\x10"))),
            wit.Column(len=2, validity=None, values=wit.Values_Timestamp([-1, 1_700_000_000_000_000])),
            wit.Column(len=2, validity=None, values=wit.Values_Date([0, -365])),
        ]
        out = self.call("echo_all", 2, cols)
        data = out.column.values.value
        got = [data.data[data.offsets[i]:data.offsets[i + 1]].decode() for i in range(2)]
        self.assertEqual(got, [
            "True|-7|-9223372036854775808|0.5|1e+300|zß|00|-1|0",
            "False|2147483647|5|-1.25|-0.0||ff10|1700000000000000|-365",
        ])
        self.assertIsNone(out.column.validity)

    def test_nulls_skip_strict_functions_and_reach_optional_ones(self):
        out = self.call("strict_double", 3, [floats([1.0, 99.0, 3.0], validity=bits([True, False, True]))])
        self.assertEqual(out.column.validity, bits([True, False, True]))
        self.assertEqual(out.column.values.value[0::2], [2.0, 6.0])
        out = self.call("maybe_len", 3, [strings(["ab", "zzz", ""], validity=bits([True, False, True]))])
        self.assertEqual(out.column.validity, bits([True, False, True]))
        self.assertEqual(out.column.values.value[0::2], [2, 0])
        out = self.call("flip", 9, [wit.Column(len=9, validity=None, values=wit.Values_Boolean(bits([True] * 8 + [False])))])
        self.assertEqual(out.column.values.value, bits([False] * 8 + [True]))

    def test_row_errors_are_per_row_and_other_exceptions_fail_the_call(self):
        out = self.call("checked_sqrt", 3, [floats([4.0, -1.0, 9.0])])
        self.assertEqual(out.column.validity, bits([True, False, True]))
        self.assertEqual([(e.row, e.message) for e in out.row_errors], [(1, "negative: -1.0")])
        with self.assertRaises(Err) as failed:
            self.call("broken", 1, [floats([1.0])])
        self.assertIsInstance(failed.exception.value, wit.CallError_Failed)
        self.assertIn("broken raised ZeroDivisionError", failed.exception.value.value)
        self.assertIn("in broken", failed.exception.value.value)
        with self.assertRaises(Err) as failed:
            self.call("lies", 1, [floats([1.0])])
        self.assertIn("returned None but its result is not Optional", failed.exception.value.value)

    def test_host_mistakes_are_bad_arguments(self):
        with self.assertRaises(Err) as failed:
            self.call("strict_double", 2, [strings(["a", "b"])])
        self.assertIsInstance(failed.exception.value, wit.CallError_BadArguments)
        with self.assertRaises(Err) as failed:
            World().call(99, 1, [])
        self.assertEqual(failed.exception.value, wit.CallError_NoSuchFunction(99))

    def test_a_function_without_arguments_fills_the_batch(self):
        out = self.call("now_ish", 3, [])
        self.assertEqual(out.column.values.value, [42, 42, 42])
        out = self.call("refuse", 2, [])
        self.assertEqual(out.column.validity, bits([False, False]))
        self.assertEqual([(e.row, e.message) for e in out.row_errors], [(0, "nothing to give"), (1, "nothing to give")])


class AggregateTest(unittest.TestCase):
    def test_update_merge_retract_and_finish_over_many_groups(self):
        w = World()
        values = floats([1.0, 2.0, 3.0, 4.0, 100.0], validity=bits([True, True, True, True, False]))
        labels = strings(["a", "b", "c", "d", "e"], validity=bits([False, True, True, True, True]))
        states = w.aggregate(0, wit.AggregateStep.UPDATE, 3, [], [0, 0, 1, 1, 1], [values, labels])
        self.assertEqual(states[0].values.value, [3.0, 7.0, 0.0])
        self.assertEqual(states[1].values.value, [2, 2, 0])
        self.assertEqual(states[2].validity, bits([True, True, False]))
        # Group 2 takes group 0's and group 1's partial states.
        merged = w.aggregate(0, wit.AggregateStep.MERGE, 3, states, [2, 2], [c for c in w.aggregate(0, wit.AggregateStep.UPDATE, 2, [], [0, 0, 1, 1], [floats([1.0, 2.0, 3.0, 4.0]), strings(["x", "y", "z", "w"])])])
        self.assertEqual(merged[0].values.value, [3.0, 7.0, 10.0])
        retracted = w.aggregate(0, wit.AggregateStep.RETRACT, 3, merged, [1, 1, 1], [floats([3.0, 4.0, 5.0]), strings(["", "", ""])])
        out = w.finish(0, 3, retracted)
        self.assertEqual(out.column.validity, bits([True, False, True]))
        self.assertEqual(out.column.values.value[0], 1.5)
        self.assertEqual([(e.row, e.message) for e in out.row_errors], [(1, "more retracted than added")])


class MathTest(unittest.TestCase):
    def test_exp_is_fdlibm_exp(self):
        from riffle_udf.math import LN_2, exp

        self.assertEqual(exp(0.0), 1.0)
        self.assertLessEqual(abs(exp(1.0) - math.e), math.ulp(math.e))
        self.assertEqual(exp(-745.2), 0.0)
        self.assertEqual(exp(710.0), math.inf)
        self.assertTrue(math.isnan(exp(math.nan)))
        self.assertLessEqual(abs(exp(-3 * LN_2) - 0.125), math.ulp(0.125))
        # Within one unit in the last place of the platform's exp everywhere in range.
        for i in range(-7000, 7000, 7):
            x = i / 10.0 + 0.0123
            want, got = math.exp(x), exp(x)
            self.assertLessEqual(abs(got - want), math.ulp(want), x)


class ReadmeTest(unittest.TestCase):
    def test_the_readme_example_runs_and_describes_itself(self):
        with open(os.path.join(ROOT, "guest-sdk-py", "README.md"), encoding="utf-8") as f:
            text = f.read()
        code = text.split("```python\n", 1)[1].split("```", 1)[0]
        module = types.ModuleType("readme_example")
        sys.modules[module.__name__] = module  # dataclasses look their module up
        exec(compile(code, "README.md", "exec"), module.__dict__)
        example = module.__dict__
        self.assertEqual(example["to_cents"](12.34), 1234)
        self.assertEqual(example["email_domain"]("Ann@Example.COM"), "example.com")
        with self.assertRaises(RowError):
            example["email_domain"]("nobody")
        self.assertEqual(example["hour"](Timestamp(3 * 3_600_000_000 + 5)), 3)
        m = example["MeanAbs"]()
        m.update(-2.0)
        m.update(4.0)
        self.assertEqual(m.finish(), 3.0)
        world = example["WitWorld"]()
        self.assertEqual([f.name for f in world.describe().functions], ["to_cents", "email_domain", "hour"])
        self.assertEqual([a.name for a in world.describe_aggregates()], ["mean_abs"])


if __name__ == "__main__":
    unittest.main()
