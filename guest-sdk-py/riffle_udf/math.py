"""Math that gives the same bits as the Rust SDK's ``riffle_udf::math``.

The Rust SDK's math is the ``libm`` crate, a port of the FreeBSD/fdlibm code musl used to
carry. Inside a Python component, ``math`` is wasi-libc's, which is musl's *current* code: the
same fdlibm functions for ``sin``, ``cos``, ``tan``, ``asin``, ``acos``, ``atan``, ``atan2``,
``log1p``, ``expm1`` and ``sqrt`` (bit-identical to the Rust SDK's), but newer, table-driven
``exp``, ``exp2``, ``log``, ``log2`` and ``pow``, which differ from the Rust SDK's in the last
bit for some inputs. A feature that must agree with a Rust module bit for bit takes the
functions below instead; they are pure-Python transcriptions of the same algorithms.
(``x * x`` equals the Rust SDK's ``pow(x, 2.0)``, which special-cases squaring.)

The functions outside the Python component (plain CPython on the build machine, for unit
tests) are the same code, so native tests see the bits the sandbox produces.
"""

from __future__ import annotations

import math as _math
import struct as _struct

__all__ = ["exp", "LN_2"]

#: ln 2, as Rust's ``std::f64::consts::LN_2``.
LN_2 = 0.6931471805599453

_HALF = (0.5, -0.5)
_LN2HI = 6.93147180369123816490e-01
_LN2LO = 1.90821492927058770002e-10
_INVLN2 = 1.44269504088896338700e00
_P1 = 1.66666666666666019037e-01
_P2 = -2.77777777770155933842e-03
_P3 = 6.61375632143793436117e-05
_P4 = -1.65339022054652515390e-06
_P5 = 4.13813679705723846039e-08


def _high_word(x: float) -> int:
    return _struct.unpack("<Q", _struct.pack("<d", x))[0] >> 32


def exp(x: float) -> float:
    """e**x, as fdlibm's ``e_exp.c`` (the Rust SDK's ``riffle_udf::math::exp``).

    Reduces x to r = x - k*ln2 with |r| <= ln2/2 (ln2 split in two parts so that k*ln2hi is
    exact), approximates exp(r) with a degree-5 rational function, and scales by 2**k.
    """
    x = float(x)
    hx = _high_word(x)
    sign = hx >> 31
    hx &= 0x7FFFFFFF
    if hx >= 0x4086232B:  # |x| >= 708.39...
        if x != x:
            return x
        if x > 709.782712893383973096:
            return _math.inf
        if x < -745.13321910194110842:
            return 0.0
    if hx > 0x3FD62E42:  # |x| > ln2/2
        if hx >= 0x3FF0A2B2:  # |x| >= 1.5 ln2
            k = int(_INVLN2 * x + _HALF[sign])  # truncates towards zero, as `as i32`
        else:
            k = 1 - sign - sign
        hi = x - k * _LN2HI
        lo = k * _LN2LO
        x = hi - lo
    elif hx > 0x3E300000:  # |x| > 2**-28
        k = 0
        hi = x
        lo = 0.0
    else:
        return 1.0 + x
    xx = x * x
    c = x - xx * (_P1 + xx * (_P2 + xx * (_P3 + xx * (_P4 + xx * _P5))))
    y = 1.0 + (x * c / (2.0 - c) - lo + hi)
    return y if k == 0 else _math.ldexp(y, k)
