//! `#[aggregate]` and `#[derive(AggregateState)]`.

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote};
use syn::{
    Data, DeriveInput, Fields, FnArg, ImplItem, ImplItemFn, ItemImpl, LitStr, Pat, ReturnType, Type,
};

use crate::{Options, doc_of_attrs};

fn error(span: impl quote::ToTokens, message: &str) -> syn::Error {
    syn::Error::new_spanned(span, message)
}

/// `DecayedAverage` -> `decayed_average`, `KllSketch` -> `kll_sketch`.
fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::new();
    for (i, c) in chars.iter().enumerate() {
        if c.is_uppercase() {
            let after_lower = i > 0 && (chars[i - 1].is_lowercase() || chars[i - 1].is_numeric());
            let before_lower = i > 0
                && chars[i - 1].is_uppercase()
                && chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            if after_lower || before_lower {
                out.push('_');
            }
            out.extend(c.to_lowercase());
        } else {
            out.push(*c);
        }
    }
    out
}

/// The typed arguments of a method after its receiver, which must be `&mut self` or `&self`.
fn method_args(method: &ImplItemFn, mutable: bool) -> syn::Result<(Vec<String>, Vec<Type>)> {
    let mut inputs = method.sig.inputs.iter();
    match inputs.next() {
        Some(FnArg::Receiver(r)) if r.reference.is_some() && r.mutability.is_some() == mutable => {}
        _ => {
            return Err(error(
                &method.sig,
                if mutable {
                    "expected `&mut self` as the first argument"
                } else {
                    "expected `&self` as the only argument"
                },
            ));
        }
    }
    let mut names = Vec::new();
    let mut types = Vec::new();
    for input in inputs {
        match input {
            FnArg::Typed(pt) => match pt.pat.as_ref() {
                Pat::Ident(id) => {
                    names.push(id.ident.to_string());
                    types.push(pt.ty.as_ref().clone());
                }
                other => {
                    return Err(error(
                        other,
                        "arguments must be plain names (`amount: f64`)",
                    ));
                }
            },
            FnArg::Receiver(r) => return Err(error(r, "unexpected receiver")),
        }
    }
    Ok((names, types))
}

pub(crate) fn expand(options: Options, item: TokenStream) -> syn::Result<TokenStream> {
    let block: ItemImpl = syn::parse2(item)?;
    if let Some((_, path, _)) = &block.trait_ {
        return Err(error(
            path,
            "put #[aggregate] on the state type's own `impl` block, not a trait impl",
        ));
    }
    if !block.generics.params.is_empty() {
        return Err(error(
            &block.generics,
            "aggregates cannot be generic: each argument needs one concrete column type",
        ));
    }
    let ty = block.self_ty.as_ref();
    let type_name = match ty {
        Type::Path(p) if p.qself.is_none() => p
            .path
            .segments
            .last()
            .map(|s| s.ident.to_string())
            .ok_or_else(|| error(ty, "expected a type name"))?,
        _ => return Err(error(ty, "expected a type name")),
    };
    let method = |name: &str| {
        block.items.iter().find_map(|item| match item {
            ImplItem::Fn(f) if f.sig.ident == name => Some(f),
            _ => None,
        })
    };
    let missing = |name: &str, shape: &str| {
        error(
            &block.self_ty,
            &format!("an aggregate needs `{shape}` in this block (missing `{name}`)"),
        )
    };
    let update = method("update").ok_or_else(|| missing("update", "fn update(&mut self, ...)"))?;
    let merge =
        method("merge").ok_or_else(|| missing("merge", "fn merge(&mut self, other: Self)"))?;
    let finish = method("finish").ok_or_else(|| missing("finish", "fn finish(&self) -> T"))?;
    let retract = method("retract");

    let (arg_names, arg_types) = method_args(update, true)?;
    if arg_types.is_empty() {
        return Err(error(
            &update.sig,
            "`update` needs at least one argument (the aggregated column)",
        ));
    }
    if let Some(retract) = retract {
        let (_, retract_types) = method_args(retract, true)?;
        let same = retract_types.len() == arg_types.len()
            && retract_types
                .iter()
                .zip(&arg_types)
                .all(|(a, b)| quote!(#a).to_string() == quote!(#b).to_string());
        if !same {
            return Err(error(
                &retract.sig,
                "`retract` must take the same arguments as `update`",
            ));
        }
    }
    let (_, merge_types) = method_args(merge, true)?;
    if merge_types.len() != 1 {
        return Err(error(
            &merge.sig,
            "expected `fn merge(&mut self, other: Self)`",
        ));
    }
    let (_, finish_types) = method_args(finish, false)?;
    if !finish_types.is_empty() {
        return Err(error(&finish.sig, "expected `fn finish(&self) -> T`"));
    }
    let ret = match &finish.sig.output {
        ReturnType::Type(_, ty) => ty.as_ref().clone(),
        ReturnType::Default => {
            return Err(error(&finish.sig, "`finish` must return the group's value"));
        }
    };

    let sql_name = options.name.unwrap_or_else(|| snake_case(&type_name));
    let valid = !sql_name.is_empty()
        && sql_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !sql_name.starts_with(|c: char| c.is_ascii_digit());
    if !valid {
        return Err(error(
            &block.self_ty,
            "the aggregate's name must be a SQL identifier (letters, digits, `_`)",
        ));
    }
    let module = format_ident!("{}", sql_name);
    let sql_name = LitStr::new(&sql_name, Span::call_site());
    let doc = LitStr::new(&doc_of_attrs(&block.attrs), Span::call_site());
    let deterministic = options.deterministic;
    let retractable = retract.is_some();
    let arity = arg_types.len();
    let readers: Vec<_> = (0..arity).map(|i| format_ident!("__arg{i}")).collect();
    let indices: Vec<_> = (0..arity).map(syn::Index::from).collect();
    let apply = |method: TokenStream| {
        quote! {
            ::riffle_udf::__private::check_arity(args, #arity)?;
            #(let #readers = <#arg_types as ::riffle_udf::Arg<'_>>::reader(&args[#indices], rows)?;)*
            for (i, group) in group_of.iter().enumerate() {
                // A row where a non-nullable argument is NULL is skipped, as SQL aggregates do.
                if true #(&& #readers.is_valid(i))* {
                    // SAFETY: every reader checked its buffers cover `rows` rows, and i < rows.
                    states[*group as usize].#method(#(unsafe { #readers.get_unchecked(i) }),*);
                }
            }
        }
    };
    let update_body = apply(quote!(update));
    let retract_body = if retractable {
        apply(quote!(retract))
    } else {
        quote! {
            return Err(::riffle_udf::CallError::BadArguments(
                ::std::format!("{} cannot retract rows", #sql_name),
            ));
        }
    };

    Ok(quote! {
        #block

        #[doc(hidden)]
        #[allow(non_snake_case, unused_imports, unused_variables, unreachable_code, clippy::all)]
        pub mod #module {
            use super::*;

            pub fn __riffle_register(registry: &mut ::riffle_udf::__private::Registry) {
                registry.aggregate(::riffle_udf::__private::AggregateFns {
                    info: __riffle_info,
                    step: __riffle_step,
                    finish: __riffle_finish,
                });
            }

            pub fn __riffle_info() -> ::riffle_udf::AggregateInfo {
                ::riffle_udf::__private::aggregate_info::<#ty, #ret>(
                    #sql_name,
                    #doc,
                    #deterministic,
                    #retractable,
                    ::std::vec![#(::riffle_udf::__private::arg::<#arg_types>(#arg_names)),*],
                )
            }

            pub fn __riffle_step(
                step: ::riffle_udf::AggregateStep,
                groups: usize,
                states: &[::riffle_udf::Column],
                group_of: &[u32],
                args: &[::riffle_udf::Column],
            ) -> ::std::result::Result<::std::vec::Vec<::riffle_udf::Column>, ::riffle_udf::CallError> {
                use ::riffle_udf::Reader as _;
                ::riffle_udf::__private::check_groups(group_of, groups)?;
                let mut states = ::riffle_udf::__private::states::<#ty>(states, groups)?;
                let rows = group_of.len();
                match step {
                    ::riffle_udf::AggregateStep::Update => { #update_body }
                    ::riffle_udf::AggregateStep::Retract => { #retract_body }
                    ::riffle_udf::AggregateStep::Merge => {
                        let others =
                            <#ty as ::riffle_udf::AggregateState>::read_states(args, rows)?;
                        for (other, group) in others.into_iter().zip(group_of) {
                            states[*group as usize].merge(other);
                        }
                    }
                }
                Ok(<#ty as ::riffle_udf::AggregateState>::write_states(states))
            }

            pub fn __riffle_finish(
                groups: usize,
                states: &[::riffle_udf::Column],
            ) -> ::std::result::Result<::riffle_udf::CallOutput, ::riffle_udf::CallError> {
                let states = ::riffle_udf::__private::states::<#ty>(states, groups)?;
                Ok(<#ret as ::riffle_udf::Output>::collect(
                    groups,
                    states.iter().map(|s| s.finish()),
                ))
            }
        }
    })
}

pub(crate) fn derive_state(item: TokenStream) -> syn::Result<TokenStream> {
    let input: DeriveInput = syn::parse2(item)?;
    let fields = match &input.data {
        Data::Struct(s) => match &s.fields {
            Fields::Named(named) => &named.named,
            _ => {
                return Err(error(
                    &input.ident,
                    "an aggregate state needs named fields: they name its columns",
                ));
            }
        },
        _ => return Err(error(&input.ident, "an aggregate state must be a struct")),
    };
    if fields.is_empty() {
        return Err(error(
            &input.ident,
            "an aggregate state needs at least one field",
        ));
    }
    if !input.generics.params.is_empty() {
        return Err(error(
            &input.generics,
            "an aggregate state cannot be generic",
        ));
    }
    let ident = &input.ident;
    let names: Vec<_> = fields.iter().map(|f| f.ident.clone().unwrap()).collect();
    let name_strs: Vec<_> = names.iter().map(|n| n.to_string()).collect();
    let types: Vec<_> = fields.iter().map(|f| &f.ty).collect();
    let vars: Vec<_> = (0..names.len())
        .map(|i| format_ident!("__field{i}"))
        .collect();
    let indices: Vec<_> = (0..names.len()).map(syn::Index::from).collect();
    let count = names.len();
    Ok(quote! {
        impl ::riffle_udf::AggregateState for #ident {
            fn state_fields() -> ::std::vec::Vec<::riffle_udf::StateField> {
                ::std::vec![#(::riffle_udf::__private::field::<#types>(#name_strs)),*]
            }

            fn read_states(
                columns: &[::riffle_udf::Column],
                groups: usize,
            ) -> ::std::result::Result<::std::vec::Vec<Self>, ::riffle_udf::CallError> {
                ::riffle_udf::__private::check_state_arity(columns, #count)?;
                #(let mut #vars = <#types as ::riffle_udf::StateValue>::read_column(
                    &columns[#indices],
                    groups,
                )?
                .into_iter();)*
                Ok((0..groups)
                    .map(|_| Self {
                        #(#names: #vars.next().expect("a column of `groups` rows"),)*
                    })
                    .collect())
            }

            fn write_states(states: ::std::vec::Vec<Self>) -> ::std::vec::Vec<::riffle_udf::Column> {
                #(let mut #vars = ::std::vec::Vec::with_capacity(states.len());)*
                for state in states {
                    #(#vars.push(state.#names);)*
                }
                ::std::vec![#(<#types as ::riffle_udf::StateValue>::write_column(#vars)),*]
            }
        }
    })
}
