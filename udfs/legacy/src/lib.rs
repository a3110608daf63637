//! A module built for the first UDF contract, `riffle:udf@0.1.0` (scalars only), whose WIT is
//! kept frozen in this crate's `wit/`. It uses raw bindings rather than the SDK, which now
//! speaks 0.2.0: the host's tests load it to prove that modules built before aggregates existed
//! still load and run unchanged.

#[cfg(target_arch = "wasm32")]
mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "riffle:udf/udf",
    });

    use riffle::udf::types::{ArgInfo, DataType, FunctionInfo, Values};

    struct Legacy;

    impl Guest for Legacy {
        fn describe() -> ModuleInfo {
            ModuleInfo {
                abi_version: 1,
                sdk: "raw wit-bindgen, contract 0.1.0".into(),
                functions: vec![FunctionInfo {
                    name: "legacy_triple".into(),
                    args: vec![ArgInfo {
                        name: "x".into(),
                        data_type: DataType::Int64,
                        nullable: false,
                    }],
                    returns: DataType::Int64,
                    returns_null: false,
                    fallible: false,
                    deterministic: true,
                    doc: "Three times x, from a module built for contract 0.1.0.".into(),
                }],
                has_init: false,
            }
        }

        fn init(_config: Vec<u8>) -> Result<(), String> {
            Ok(())
        }

        fn call(function: u32, rows: u32, args: Vec<Column>) -> Result<CallOutput, CallError> {
            if function != 0 {
                return Err(CallError::NoSuchFunction(function));
            }
            let [column] = args.as_slice() else {
                return Err(CallError::BadArguments("expected one column".into()));
            };
            let Values::Int64(values) = &column.values else {
                return Err(CallError::BadArguments("expected an int64 column".into()));
            };
            Ok(CallOutput {
                column: Column {
                    len: rows,
                    validity: column.validity.clone(),
                    values: Values::Int64(values.iter().map(|v| v.wrapping_mul(3)).collect()),
                },
                row_errors: Vec::new(),
            })
        }
    }

    export!(Legacy);
}
