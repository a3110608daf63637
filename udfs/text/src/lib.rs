//! Text and enrichment helpers over UTF-8 columns, used by the demos to join and group users
//! whose email addresses were typed differently.

use riffle_udf::{export_udfs, scalar};

/// Providers that ignore dots and `+tags` in the local part of an address.
const DOTLESS_PROVIDERS: &[&str] = &["gmail.com", "googlemail.com"];

/// Canonical form of an email address: trimmed and lower-cased, `+tag` suffixes dropped, and
/// dots dropped for providers that ignore them. A value that is not an address is a row error.
#[scalar]
pub fn normalize_email(email: &str) -> Result<String, String> {
    let email = email.trim().to_lowercase();
    let (local, domain) = email
        .rsplit_once('@')
        .filter(|(l, d)| !l.is_empty() && d.contains('.') && !d.starts_with('.'))
        .ok_or_else(|| format!("not an email address: {email:?}"))?;
    let local = local.split('+').next().unwrap_or(local);
    let domain = if domain == "googlemail.com" {
        "gmail.com"
    } else {
        domain
    };
    let local = if DOTLESS_PROVIDERS.contains(&domain) {
        local.replace('.', "")
    } else {
        local.to_string()
    };
    Ok(format!("{local}@{domain}"))
}

/// The lower-cased domain of an address, or NULL when there is none.
#[scalar]
pub fn email_domain(email: &str) -> Option<String> {
    let (_, domain) = email.trim().rsplit_once('@')?;
    (!domain.is_empty()).then(|| domain.to_lowercase())
}

/// A URL- and key-friendly slug: lower-case alphanumeric words joined by `-`.
#[scalar]
pub fn slugify(text: &str) -> String {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .collect::<Vec<_>>()
        .join("-")
}

export_udfs!(normalize_email, email_domain, slugify);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_gmail_aliases_to_one_address() {
        for alias in [
            "J.Doe+shop@gmail.com",
            " jdoe@GoogleMail.com ",
            "j.d.o.e@gmail.com",
        ] {
            assert_eq!(normalize_email(alias).unwrap(), "jdoe@gmail.com");
        }
        assert_eq!(
            normalize_email("J.Doe@Example.org").unwrap(),
            "j.doe@example.org"
        );
        assert!(normalize_email("no-at-sign").is_err());
        assert!(normalize_email("@example.org").is_err());
    }

    #[test]
    fn domains_and_slugs() {
        assert_eq!(email_domain("a@B.com").as_deref(), Some("b.com"));
        assert_eq!(email_domain("nobody"), None);
        assert_eq!(slugify("  Crème Brûlée & Co. "), "crème-brûlée-co");
    }
}
