//! Conformance fixtures: for every supported type, three functions that pin down how NULLs and
//! per-row errors cross the boundary. The host's tests run them in SQL over columns with NULLs.
//!
//! - `id_<t>(Option<T>) -> Option<T>`: sees NULLs, returns them unchanged.
//! - `strict_<t>(T) -> T`: a NULL argument yields NULL without calling the function.
//! - `check_<t>(T) -> Result<T, String>`: a row error for "bad" values (negative numbers, NaN,
//!   `false`, empty strings and byte strings, instants and days before 1970).

use riffle_udf::{Date, Timestamp, export_udfs, scalar};

macro_rules! conformance {
    ($($arg:ty => $ret:ty, $id:ident, $strict:ident, $check:ident, |$x:ident| $own:expr, |$b:ident| $bad:expr;)*) => {$(
        /// Identity over a nullable argument.
        #[scalar]
        pub fn $id(x: Option<$arg>) -> Option<$ret> {
            x.map(|$x| $own)
        }

        /// Identity over a non-nullable argument.
        #[scalar]
        pub fn $strict(x: $arg) -> $ret {
            let $x = x;
            $own
        }

        /// Identity that fails for bad values.
        #[scalar]
        pub fn $check(x: $arg) -> Result<$ret, String> {
            let $b = &x;
            if $bad {
                return Err(format!("bad value {:?}", x));
            }
            let $x = x;
            Ok($own)
        }
    )*};
}

conformance! {
    bool => bool, id_bool, strict_bool, check_bool, |x| x, |b| !*b;
    i32 => i32, id_int32, strict_int32, check_int32, |x| x, |b| *b < 0;
    i64 => i64, id_int64, strict_int64, check_int64, |x| x, |b| *b < 0;
    f32 => f32, id_float32, strict_float32, check_float32, |x| x, |b| b.is_nan() || *b < 0.0;
    f64 => f64, id_float64, strict_float64, check_float64, |x| x, |b| b.is_nan() || *b < 0.0;
    &str => String, id_utf8, strict_utf8, check_utf8, |x| x.to_string(), |b| b.is_empty();
    &[u8] => Vec<u8>, id_binary, strict_binary, check_binary, |x| x.to_vec(), |b| b.is_empty();
    Timestamp => Timestamp, id_timestamp, strict_timestamp, check_timestamp, |x| x, |b| b.0 < 0;
    Date => Date, id_date, strict_date, check_date, |x| x, |b| b.0 < 0;
}

/// Number of arguments that are NULL in each row: exercises several nullable arguments of
/// different types at once.
#[scalar]
pub fn count_nulls(a: Option<i64>, b: Option<&str>, c: Option<f64>) -> i32 {
    [a.is_none(), b.is_none(), c.is_none()]
        .iter()
        .filter(|n| **n)
        .count() as i32
}

/// A constant, for functions without arguments.
#[scalar]
pub fn forty_two() -> i64 {
    42
}

/// `x * 2 + 1`: the cheapest possible float function, so its cost is the boundary's cost. The
/// benchmark compares it with the same expression native.
#[scalar]
pub fn affine(x: f64) -> f64 {
    x * 2.0 + 1.0
}

export_udfs!(
    id_bool,
    strict_bool,
    check_bool,
    id_int32,
    strict_int32,
    check_int32,
    id_int64,
    strict_int64,
    check_int64,
    id_float32,
    strict_float32,
    check_float32,
    id_float64,
    strict_float64,
    check_float64,
    id_utf8,
    strict_utf8,
    check_utf8,
    id_binary,
    strict_binary,
    check_binary,
    id_timestamp,
    strict_timestamp,
    check_timestamp,
    id_date,
    strict_date,
    check_date,
    count_nulls,
    forty_two,
    affine,
);
