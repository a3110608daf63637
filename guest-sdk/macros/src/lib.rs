//! The `#[scalar]` and `#[aggregate]` attributes and `#[derive(AggregateState)]` of the
//! `riffle-udf` guest SDK.
//!
//! They leave the author's code untouched (so it stays plain, natively testable Rust) and
//! generate, next to it, a module holding the function's self-description and its batch entry
//! points: for a scalar, a module of the function's own name (modules and functions live in
//! different namespaces); for an aggregate, a module named after the state type in snake case.
//! The `export_udfs!` macro then calls each listed module's `__riffle_register`.

mod aggregate;

use proc_macro::TokenStream;
use proc_macro2::Span;
use quote::{format_ident, quote};
use syn::{
    Expr, ExprLit, FnArg, ItemFn, Lit, LitStr, Meta, Pat, ReturnType, Token, punctuated::Punctuated,
};

/// Turns `fn name(a: A, b: B) -> R` into a Riffle scalar UDF.
///
/// Arguments may be `bool`, `i32`, `i64`, `f32`, `f64`, `&str`, `&[u8]`, `Timestamp`, `Date`, or
/// `Option<_>` of those. A non-`Option` argument that is NULL makes the row NULL without calling
/// the function. The return type is one of those value types (owned: `String`, `Vec<u8>`),
/// optionally wrapped in `Option` (NULL) and/or `Result<_, E: Display>` (a per-row error).
///
/// Options: `#[scalar(name = "sql_name")]` renames the function in SQL;
/// `#[scalar(nondeterministic)]` declares that it may return different results for the same
/// inputs (its module then gets a real clock and real randomness).
#[proc_macro_attribute]
pub fn scalar(attr: TokenStream, item: TokenStream) -> TokenStream {
    match expand(attr.into(), item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Turns an `impl` block of an aggregate's state type into a Riffle aggregate UDF.
///
/// The type must implement `AggregateState` (derive it) and `Default` (the empty state). The
/// block must define `fn update(&mut self, a: A, ...)` with argument types as for `#[scalar]`,
/// `fn merge(&mut self, other: Self)`, and `fn finish(&self) -> R` with a result type as for
/// `#[scalar]` (a `Result` error is the group's error); it may define `fn retract(&mut self,
/// a: A, ...)` with the same arguments as `update`, which makes the aggregate usable in sliding
/// OVER frames. Options as for `#[scalar]`; the default SQL name is the type's name in snake
/// case.
#[proc_macro_attribute]
pub fn aggregate(attr: TokenStream, item: TokenStream) -> TokenStream {
    match parse_options(attr.into()).and_then(|o| aggregate::expand(o, item.into())) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

/// Derives `AggregateState` for a struct with named fields of state value types: the fields,
/// in order, are the state's columns.
#[proc_macro_derive(AggregateState)]
pub fn derive_aggregate_state(item: TokenStream) -> TokenStream {
    match aggregate::derive_state(item.into()) {
        Ok(tokens) => tokens.into(),
        Err(e) => e.to_compile_error().into(),
    }
}

pub(crate) struct Options {
    pub(crate) name: Option<String>,
    pub(crate) deterministic: bool,
}

pub(crate) fn parse_options(attr: proc_macro2::TokenStream) -> syn::Result<Options> {
    let mut options = Options {
        name: None,
        deterministic: true,
    };
    let metas = syn::parse::Parser::parse2(Punctuated::<Meta, Token![,]>::parse_terminated, attr)?;
    for meta in metas {
        match &meta {
            Meta::Path(p) if p.is_ident("nondeterministic") => options.deterministic = false,
            Meta::NameValue(nv) if nv.path.is_ident("name") => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => options.name = Some(s.value()),
                other => return Err(syn::Error::new_spanned(other, "expected a string literal")),
            },
            other => {
                return Err(syn::Error::new_spanned(
                    other,
                    "unknown option: expected `name = \"...\"` or `nondeterministic`",
                ));
            }
        }
    }
    Ok(options)
}

/// The function's `///` comments, joined as they would appear in rustdoc.
fn doc_of(item: &ItemFn) -> String {
    doc_of_attrs(&item.attrs)
}

/// `///` comments among `attrs`, joined as they would appear in rustdoc.
pub(crate) fn doc_of_attrs(attrs: &[syn::Attribute]) -> String {
    let lines: Vec<String> = attrs
        .iter()
        .filter(|a| a.path().is_ident("doc"))
        .filter_map(|a| match &a.meta {
            Meta::NameValue(nv) => match &nv.value {
                Expr::Lit(ExprLit {
                    lit: Lit::Str(s), ..
                }) => Some(s.value()),
                _ => None,
            },
            _ => None,
        })
        .map(|l| l.strip_prefix(' ').unwrap_or(&l).to_string())
        .collect();
    lines.join("\n").trim().to_string()
}

fn expand(
    attr: proc_macro2::TokenStream,
    item: proc_macro2::TokenStream,
) -> syn::Result<proc_macro2::TokenStream> {
    let options = parse_options(attr)?;
    let func: ItemFn = syn::parse2(item)?;
    let sig = &func.sig;
    if let Some(asyncness) = &sig.asyncness {
        return Err(syn::Error::new_spanned(asyncness, "UDFs cannot be async"));
    }
    if !sig.generics.params.is_empty() {
        return Err(syn::Error::new_spanned(
            &sig.generics,
            "UDFs cannot be generic: each argument needs one concrete column type",
        ));
    }
    let ret = match &sig.output {
        ReturnType::Type(_, ty) => ty.as_ref().clone(),
        ReturnType::Default => {
            return Err(syn::Error::new_spanned(
                sig,
                "a scalar UDF must return a value (one per row)",
            ));
        }
    };

    let mut arg_names = Vec::new();
    let mut arg_types = Vec::new();
    for input in &sig.inputs {
        match input {
            FnArg::Typed(pt) => match pt.pat.as_ref() {
                Pat::Ident(id) => {
                    arg_names.push(id.ident.to_string());
                    arg_types.push(pt.ty.as_ref().clone());
                }
                other => {
                    return Err(syn::Error::new_spanned(
                        other,
                        "UDF arguments must be plain names (`amount: f64`)",
                    ));
                }
            },
            FnArg::Receiver(r) => {
                return Err(syn::Error::new_spanned(r, "UDFs cannot take `self`"));
            }
        }
    }

    let ident = &sig.ident;
    let vis = &func.vis;
    let sql_name = LitStr::new(
        &options.name.unwrap_or_else(|| ident.to_string()),
        Span::call_site(),
    );
    let doc = LitStr::new(&doc_of(&func), Span::call_site());
    let deterministic = options.deterministic;
    let arity = arg_types.len();
    let readers: Vec<_> = (0..arity).map(|i| format_ident!("__arg{i}")).collect();
    let indices: Vec<_> = (0..arity).map(syn::Index::from).collect();

    Ok(quote! {
        #func

        #[doc(hidden)]
        #[allow(non_snake_case, unused_imports, unused_variables, clippy::all)]
        #vis mod #ident {
            use super::*;

            pub fn __riffle_register(registry: &mut ::riffle_udf::__private::Registry) {
                registry.scalar(__riffle_info, __riffle_call);
            }

            pub fn __riffle_info() -> ::riffle_udf::FunctionInfo {
                ::riffle_udf::__private::function_info::<#ret>(
                    #sql_name,
                    #doc,
                    #deterministic,
                    ::std::vec![#(::riffle_udf::__private::arg::<#arg_types>(#arg_names)),*],
                )
            }

            pub fn __riffle_call(
                rows: usize,
                args: &[::riffle_udf::Column],
            ) -> ::std::result::Result<::riffle_udf::CallOutput, ::riffle_udf::CallError> {
                use ::riffle_udf::Reader as _;
                ::riffle_udf::__private::check_arity(args, #arity)?;
                #(let #readers = <#arg_types as ::riffle_udf::Arg<'_>>::reader(&args[#indices], rows)?;)*
                let skips_rows = false #(|| #readers.has_nulls())*;
                if !skips_rows {
                    // SAFETY: every reader checked its buffers cover `rows` rows, and i < rows.
                    Ok(<#ret as ::riffle_udf::Output>::collect(
                        rows,
                        (0..rows).map(|i| super::#ident(#(unsafe { #readers.get_unchecked(i) }),*)),
                    ))
                } else {
                    Ok(<#ret as ::riffle_udf::Output>::collect_skipping(
                        rows,
                        (0..rows).map(|i| {
                            if true #(&& #readers.is_valid(i))* {
                                // SAFETY: as above.
                                Some(super::#ident(#(unsafe { #readers.get_unchecked(i) }),*))
                            } else {
                                None
                            }
                        }),
                    ))
                }
            }
        }
    })
}
