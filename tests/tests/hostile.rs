//! Hostile UDFs fail cleanly, within their limits, with typed errors naming the UDF and its
//! module hash, and the host keeps serving. The sandbox hides files, environment, network and
//! the real clock.

mod common;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, StringArray};
use arrow::datatypes::{Int64Type, TimestampMicrosecondType};
use common::*;
use riffle::RiffleError;
use riffle::error::{Blame, UdfFailureKind};
use riffle::udf::{RowErrorPolicy, UdfModule};

fn ints(n: i64) -> Vec<ArrayRef> {
    vec![Arc::new(Int64Array::from_iter_values(0..n))]
}

fn strings(values: &[&str]) -> Vec<ArrayRef> {
    vec![Arc::new(StringArray::from(values.to_vec()))]
}

fn call(
    module: &UdfModule,
    function: &str,
    args: &[ArrayRef],
) -> riffle::Result<riffle::udf::UdfOutput> {
    let rows = args.first().map_or(3, |a| a.len());
    module.call(module.function_index(function).unwrap(), rows, args)
}

fn failure(err: &RiffleError) -> (&str, &UdfFailureKind, &str, &str) {
    match err {
        RiffleError::UdfFailure {
            function,
            hash,
            kind,
            detail,
            ..
        } => (function, kind, hash, detail),
        other => panic!("expected a UDF failure, got {other}"),
    }
}

#[test]
fn each_hostile_udf_fails_with_its_own_typed_error_and_the_module_keeps_working() {
    let module = module("hostile");
    let hash = module.hash().to_string();

    let err = call(&module, "spin", &ints(10)).unwrap_err();
    let (function, kind, h, _) = failure(&err);
    assert_eq!((function, h), ("spin", hash.as_str()));
    assert_eq!(kind, &UdfFailureKind::Timeout(limits().call_timeout));
    assert_eq!(err.blame(), Blame::Udf);
    assert!(
        err.to_string().contains("exceeded its CPU deadline"),
        "{err}"
    );

    let err = call(&module, "balloon", &ints(10)).unwrap_err();
    let (function, kind, _, _) = failure(&err);
    assert_eq!(function, "balloon");
    assert_eq!(kind, &UdfFailureKind::OutOfMemory(limits().memory_bytes));

    let err = call(&module, "boom", &ints(10)).unwrap_err();
    let (function, kind, _, detail) = failure(&err);
    assert_eq!((function, kind), ("boom", &UdfFailureKind::Trap));
    // The panic message, from the guest's captured stderr, is in the report.
    assert!(
        detail.contains("boom: the UDF panicked on purpose at x = 1"),
        "{detail}"
    );

    // After all that, the same module serves the next call.
    let ok = call(&module, "boom", &[Arc::new(Int64Array::from(vec![0, -5]))]).unwrap();
    assert_eq!(
        ok.array.as_primitive::<Int64Type>().values().to_vec(),
        vec![0, -5]
    );
}

#[test]
fn an_instance_grown_by_a_large_batch_is_dropped_not_pooled() {
    // Its memory would stay resident while pooled: linear memory never shrinks.
    let module = module("conformance");
    let affine = module.function_index("affine").unwrap();
    let small: ArrayRef = Arc::new(Float64Array::from(vec![1.0; 1000]));
    module
        .call(affine, 1000, std::slice::from_ref(&small))
        .unwrap();
    assert_eq!(module.live_instances(), 1);
    // 3 Mi rows: 24 MiB in and 24 MiB out, within the 64 MiB cap but past a quarter of it.
    let rows = 3 << 20;
    let large: ArrayRef = Arc::new(Float64Array::from(vec![1.0; rows]));
    let out = module.call(affine, rows, &[large]).unwrap();
    assert_eq!(out.array.len(), rows);
    assert_eq!(
        module.live_instances(),
        0,
        "the grown instance stayed pooled"
    );
    // The next call gets a fresh instance, which stays.
    module.call(affine, 1000, &[small]).unwrap();
    assert_eq!(module.live_instances(), 1);
}

#[tokio::test]
async fn a_failing_query_leaves_the_session_serving_the_next_one() {
    let session = session(RowErrorPolicy::Fail);
    session
        .load_udfs(&udf("hostile"), Vec::new(), None)
        .unwrap();
    session.load_udfs(&udf("fraud"), Vec::new(), None).unwrap();
    let err = session
        .sql("SELECT spin(x) FROM (VALUES (1), (2)) AS t(x)")
        .await
        .unwrap_err();
    let (function, kind, _, _) = failure(riffle_error(&err));
    assert_eq!(function, "spin");
    assert!(matches!(kind, UdfFailureKind::Timeout(_)));
    let out = query(
        &session,
        "SELECT risk_score(x, 'US') AS r FROM (VALUES (10.0), (20.0)) AS t(x)",
    )
    .await
    .unwrap();
    assert_eq!(out.num_rows(), 2);
}

#[test]
fn the_sandbox_has_no_files_environment_or_network() {
    // Make sure there is something to find, were the sandbox leaky.
    let secret = std::env::temp_dir().join("riffle-sandbox-secret.txt");
    std::fs::write(&secret, "secret").unwrap();
    let module = module("hostile");
    let paths = [secret.to_str().unwrap(), "/etc/passwd", "Cargo.toml", "."];
    let out = call(&module, "read_file", &strings(&paths)).unwrap();
    assert_eq!(out.row_errors.len(), paths.len(), "{:?}", out.row_errors);
    assert!(out.array.null_count() == paths.len());

    let out = call(&module, "read_env", &strings(&["HOME", "PATH", "USER"])).unwrap();
    assert_eq!(out.array.null_count(), 3);
    let out = call(&module, "env_count", &[]).unwrap();
    assert_eq!(
        out.array.as_primitive::<Int64Type>().values().to_vec(),
        vec![0; 3]
    );

    // A real listener on loopback that the UDF is asked to reach.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let out = call(&module, "connect", &strings(&[&addr])).unwrap();
    assert_eq!(out.row_errors.len(), 1);
    assert!(
        out.row_errors[0].1.contains("connect") || out.row_errors[0].1.contains("socket"),
        "{:?}",
        out.row_errors
    );
    assert!(
        listener.accept().is_err(),
        "the UDF must not have connected"
    );
}

#[test]
fn deterministic_modules_see_a_frozen_clock_and_fixed_randomness() {
    let first = module("hostile");
    let second = engine().load(&udf("hostile")).unwrap();
    let clock = call(&first, "wall_clock", &[]).unwrap();
    let clock = clock.array.as_primitive::<TimestampMicrosecondType>();
    assert_eq!(clock.values().to_vec(), vec![0; 3], "frozen at the epoch");

    let a = call(&first, "random_hash", &ints(100)).unwrap();
    let b = call(&second, "random_hash", &ints(100)).unwrap();
    assert_eq!(
        a.array.to_data(),
        b.array.to_data(),
        "same seed in every instance"
    );

    // A module that declares itself nondeterministic gets the real clock.
    let clock_module = module("clock");
    assert!(!clock_module.spec().deterministic);
    let now = call(&clock_module, "now", &[]).unwrap();
    let now = now
        .array
        .as_primitive::<TimestampMicrosecondType>()
        .value(0);
    let real = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64;
    assert!(
        (real - now).abs() < 60_000_000,
        "real clock: {now} vs {real}"
    );
}

#[test]
fn chatty_output_is_captured_not_leaked() {
    let module = module("hostile");
    let out = call(&module, "chatty", &ints(2)).unwrap();
    assert_eq!(out.array.len(), 2);
}

#[test]
fn files_that_are_not_riffle_modules_are_rejected_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let engine = engine();

    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"definitely not wasm").unwrap();
    let err = engine.load(&garbage).unwrap_err();
    assert!(matches!(err, RiffleError::InvalidModule { .. }), "{err}");
    assert_eq!(err.blame(), Blame::User);

    // A valid core module, but not a component.
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let err = engine.load(&core).unwrap_err();
    assert!(matches!(err, RiffleError::InvalidModule { .. }), "{err}");

    let err = engine.load(&dir.path().join("missing.wasm")).unwrap_err();
    assert!(matches!(err, RiffleError::Io { .. }), "{err}");
}

#[test]
fn compiled_modules_are_cached_by_content_hash_and_a_corrupt_cache_is_survived() {
    let dir = tempfile::tempdir().unwrap();
    let engine = riffle::udf::UdfEngine::new(riffle::udf::EngineOptions {
        cache_dir: Some(dir.path().to_path_buf()),
        limits: limits(),
    })
    .unwrap();
    let hash = engine.load(&udf("text")).unwrap().hash().to_string();
    let mut cached: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    cached.sort();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert!(
        cached[0].starts_with(&hash) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );
    assert_eq!(
        cached[1],
        format!("{}.sum", cached[0]),
        "the checksum beside it"
    );
    let artifact = dir.path().join(&cached[0]);
    let sum = dir.path().join(&cached[1]);
    let good = std::fs::read(&artifact).unwrap();
    let slugify = || {
        let module = engine.load(&udf("text")).unwrap();
        let out = call(&module, "slugify", &strings(&["Hello World"])).unwrap();
        assert_eq!(out.array.as_string::<i32>().value(0), "hello-world");
    };

    // A second load takes the artifact as it is: the same file, neither rewritten nor
    // replaced.
    let before = std::fs::metadata(&artifact).unwrap();
    slugify();
    let after = std::fs::metadata(&artifact).unwrap();
    assert_eq!(before.modified().unwrap(), after.modified().unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        assert_eq!(before.ino(), after.ino(), "the cached artifact was used");
    }

    // Each damage is done with no module loaded: a loaded module maps its artifact, and the
    // cache's own writers only ever rename whole files into place.
    std::fs::write(&artifact, b"corrupted").unwrap();
    slugify();
    assert_eq!(std::fs::read(&artifact).unwrap(), good, "rewritten");

    // One byte of native code changed, length kept: the checksum catches it and the file is
    // compiled again rather than loaded.
    let mut tampered = good.clone();
    let middle = tampered.len() / 2;
    tampered[middle] ^= 0x40;
    std::fs::write(&artifact, &tampered).unwrap();
    slugify();
    assert_eq!(std::fs::read(&artifact).unwrap(), good, "replaced");

    // A missing checksum is as good as a damaged artifact.
    std::fs::remove_file(&sum).unwrap();
    slugify();
    assert!(sum.exists(), "written again");
    assert_eq!(std::fs::read(&artifact).unwrap(), good);
}

#[cfg(unix)]
#[test]
fn the_module_cache_is_private_and_a_shared_one_is_not_used() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let engine = |cache: &std::path::Path| {
        riffle::udf::UdfEngine::new(riffle::udf::EngineOptions {
            cache_dir: Some(cache.to_path_buf()),
            limits: limits(),
        })
        .unwrap()
    };
    let private = dir.path().join("new/cache");
    engine(&private).load(&udf("text")).unwrap();
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700);
    assert_eq!(
        std::fs::read_dir(&private).unwrap().count(),
        2,
        "the artifact and its checksum"
    );

    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o777)).unwrap();
    let module = engine(&shared).load(&udf("text")).unwrap();
    let out = call(&module, "slugify", &strings(&["A B"])).unwrap();
    assert_eq!(out.array.as_string::<i32>().value(0), "a-b");
    assert_eq!(
        std::fs::read_dir(&shared).unwrap().count(),
        0,
        "nothing cached in a directory others can write"
    );
}

/// Blocking WASI calls (stdout, sleeping) inside a query on either kind of tokio runtime must
/// neither panic the host nor fail the call.
async fn chatty_and_napping_udfs_inside_a_query() {
    let session = session(RowErrorPolicy::Fail);
    session
        .load_udfs(&udf("hostile"), Vec::new(), None)
        .unwrap();
    let out = query(
        &session,
        "SELECT chatty(x) AS c, nap(0) AS n FROM (VALUES (1), (2)) AS t(x)",
    )
    .await
    .unwrap();
    assert_eq!(
        out.column(0).as_primitive::<Int64Type>().values().to_vec(),
        vec![1, 2]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_wasi_calls_work_on_a_multi_threaded_runtime() {
    chatty_and_napping_udfs_inside_a_query().await;
}

#[tokio::test(flavor = "current_thread")]
async fn blocking_wasi_calls_work_on_a_current_thread_runtime() {
    chatty_and_napping_udfs_inside_a_query().await;
}

/// Ten years, in milliseconds: were sleeps unbounded, these tests would hang (and CI fail).
const DECADE_MS: i64 = 10 * 365 * 24 * 3_600 * 1_000;

#[test]
fn sleeping_in_a_frozen_world_completes_at_once() {
    let module = module("hostile");
    let out = call(
        &module,
        "nap",
        &[Arc::new(Int64Array::from(vec![DECADE_MS]))],
    )
    .unwrap();
    assert_eq!(out.array.as_primitive::<Int64Type>().value(0), DECADE_MS);
}

#[test]
fn sleeping_in_real_time_is_cut_off_at_the_call_deadline() {
    let module = module("clock");
    let err = call(
        &module,
        "sleep_ms",
        &[Arc::new(Int64Array::from(vec![DECADE_MS]))],
    )
    .unwrap_err();
    let (function, kind, _, _) = failure(&err);
    assert_eq!(
        (function, kind),
        ("sleep_ms", &UdfFailureKind::Timeout(limits().call_timeout))
    );
    // And short real sleeps just work.
    let ok = call(&module, "sleep_ms", &[Arc::new(Int64Array::from(vec![1]))]).unwrap();
    assert_eq!(ok.array.as_primitive::<Int64Type>().value(0), 1);
}
