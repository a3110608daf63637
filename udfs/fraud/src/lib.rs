//! Fraud-detection features for the fraud demo pipeline.
//!
//! `risk_score` is a small logistic model over the transaction amount and the merchant's
//! country. Its weights have defaults and can be replaced per deployment through the module's
//! init configuration (`key = value` lines, e.g. `country.NG = 2.5`), which is how a trained
//! model's weights reach the sandbox. All math goes through `riffle_udf::math` so the native
//! build (used in tests and benchmarks) and the Wasm build agree bit for bit.

use std::sync::OnceLock;

use riffle_udf::{AggregateState, Timestamp, aggregate, export_udfs, math, scalar};

/// Weights of the risk model.
#[derive(Clone, Debug, PartialEq)]
pub struct Model {
    pub intercept: f64,
    pub log_amount: f64,
    pub high_amount: f64,
    pub unknown_country: f64,
    /// Weight per two-letter country code, indexed by [`code_index`]. A row's lookup is one
    /// load with no loop: inside the sandbox every loop iteration and call also checks the CPU
    /// deadline, and a search through a list of codes made up a quarter of a Wasm call.
    countries: Box<[Option<f64>; CODES]>,
}

/// Two ASCII letters: 26 x 26 codes.
const CODES: usize = 26 * 26;

/// Index of a two-letter code in any letter case, `None` for anything else.
#[inline]
fn code_index(code: &str) -> Option<usize> {
    let &[a, b] = code.as_bytes() else {
        return None;
    };
    let letter = |c: u8| c.to_ascii_uppercase().wrapping_sub(b'A');
    let (a, b) = (letter(a), letter(b));
    (a < 26 && b < 26).then(|| a as usize * 26 + b as usize)
}

impl Default for Model {
    fn default() -> Self {
        let mut model = Model {
            intercept: -6.0,
            log_amount: 0.55,
            high_amount: 1.8,
            unknown_country: 0.9,
            countries: Box::new([None; CODES]),
        };
        for (code, weight) in [
            ("US", 0.0),
            ("GB", 0.1),
            ("DE", 0.05),
            ("FR", 0.1),
            ("NL", 0.1),
            ("IN", 0.6),
            ("BR", 0.9),
            ("NG", 2.2),
            ("RU", 1.9),
            ("CN", 0.8),
        ] {
            model.countries[code_index(code).expect("a two-letter code")] = Some(weight);
        }
        model
    }
}

impl Model {
    /// Parses `key = value` lines (`#` starts a comment) on top of the default weights.
    pub fn parse(config: &str) -> Result<Model, String> {
        let mut model = Model::default();
        for (n, line) in config.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once('=')
                .ok_or_else(|| format!("line {}: expected `key = value`", n + 1))?;
            let (key, value) = (key.trim(), value.trim());
            let value: f64 = value
                .parse()
                .map_err(|e| format!("line {}: {key}: {e}", n + 1))?;
            match key {
                "intercept" => model.intercept = value,
                "log_amount" => model.log_amount = value,
                "high_amount" => model.high_amount = value,
                "unknown_country" => model.unknown_country = value,
                _ => match key.strip_prefix("country.").map(code_index) {
                    Some(Some(code)) => model.countries[code] = Some(value),
                    Some(None) => {
                        return Err(format!(
                            "line {}: {key}: a country code is two ASCII letters",
                            n + 1
                        ));
                    }
                    None => return Err(format!("line {}: unknown key {key:?}", n + 1)),
                },
            }
        }
        Ok(model)
    }

    fn country_weight(&self, country: &str) -> f64 {
        code_index(country)
            .and_then(|i| self.countries[i])
            .unwrap_or(self.unknown_country)
    }

    /// Probability-like score in (0, 1).
    pub fn score(&self, amount: f64, country: &str) -> f64 {
        // Negative and NaN amounts count as 0, as with `amount.max(0.0)`, which on wasm32 is a
        // call into libc's `fmax` per row.
        let amount = if amount > 0.0 { amount } else { 0.0 };
        // A soft step around 2,000: large amounts weigh more without a cliff.
        let high = 1.0 / (1.0 + math::exp(-(amount - 2_000.0) / 250.0));
        let z = self.intercept
            + self.log_amount * math::log1p(amount)
            + self.high_amount * high
            + self.country_weight(country);
        1.0 / (1.0 + math::exp(-z))
    }
}

static MODEL: OnceLock<Model> = OnceLock::new();

fn model() -> &'static Model {
    MODEL.get_or_init(Model::default)
}

/// Applies the init configuration: model weights as `key = value` lines.
pub fn configure(config: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(config).map_err(|e| format!("config is not UTF-8: {e}"))?;
    let parsed = Model::parse(text)?;
    let current = MODEL.get_or_init(|| parsed.clone());
    if *current != parsed {
        return Err("the model was already configured differently".into());
    }
    Ok(())
}

/// Fraud risk in (0, 1) from the amount and the merchant's ISO country code.
#[scalar]
pub fn risk_score(amount: f64, country: &str) -> f64 {
    model().score(amount, country)
}

/// Great-circle distance in kilometres between two points given in degrees.
#[scalar]
pub fn haversine_km(lat1: f64, lon1: f64, lat2: f64, lon2: f64) -> f64 {
    const EARTH_RADIUS_KM: f64 = 6_371.008_8;
    let (p1, p2) = (lat1.to_radians(), lat2.to_radians());
    let dp = p2 - p1;
    let dl = (lon2 - lon1).to_radians();
    let a = math::pow(math::sin(dp / 2.0), 2.0)
        + math::cos(p1) * math::cos(p2) * math::pow(math::sin(dl / 2.0), 2.0);
    2.0 * EARTH_RADIUS_KM * math::asin(math::sqrt(a.clamp(0.0, 1.0)))
}

/// Order-of-magnitude bucket of an amount. Negative amounts are a row error.
#[scalar]
pub fn amount_bucket(amount: f64) -> Result<String, String> {
    let bucket = match amount {
        a if a.is_nan() || a < 0.0 => return Err(format!("invalid amount {amount}")),
        a if a < 10.0 => "<10",
        a if a < 100.0 => "10-100",
        a if a < 1_000.0 => "100-1k",
        a if a < 10_000.0 => "1k-10k",
        _ => ">=10k",
    };
    Ok(bucket.to_string())
}

/// True between 00:00 and 05:59 UTC, when fraud rates peak.
#[scalar]
pub fn is_night(ts: Timestamp) -> bool {
    ts.hour_of_day() < 6
}

/// Half-life of [`DecayedAvg`]: a transaction's weight halves every hour.
pub const DECAY_HALF_LIFE_MICROS: i64 = 3_600 * Timestamp::MICROS_PER_SECOND;

/// Running state of `decayed_avg`: sums weighted as of `at`, the latest event time seen, so
/// that the order rows arrive in changes nothing but rounding (batch and stream agree to
/// floating-point rounding, not necessarily to the bit).
#[derive(Clone, Debug, Default, PartialEq, AggregateState)]
pub struct DecayedAvg {
    /// Latest event time seen (NULL before the first row).
    at: Option<Timestamp>,
    /// Sum of `amount * weight`, each weight as of `at`.
    weighted: f64,
    /// Sum of the weights as of `at`.
    weight: f64,
}

impl DecayedAvg {
    /// Weight, as of `at`, of a row at `ts`: 1 at `at`, halving per half-life before it.
    /// (`exp` of a multiple of ln 2 rather than `exp2`: the Python SDK carries the same `exp`,
    /// so `udfs/fraud_py` computes the same bits.)
    fn weight_at(ts: Timestamp, at: Timestamp) -> f64 {
        math::exp(-((at.0 - ts.0) as f64) / DECAY_HALF_LIFE_MICROS as f64 * std::f64::consts::LN_2)
    }

    /// Moves the reference time to `at` (never backwards), rescaling the sums.
    fn advance(&mut self, at: Timestamp) {
        match self.at {
            Some(old) if old >= at => {}
            Some(old) => {
                let scale = Self::weight_at(old, at);
                self.weighted *= scale;
                self.weight *= scale;
                self.at = Some(at);
            }
            None => self.at = Some(at),
        }
    }
}

/// Exponentially decayed average amount (half-life one hour, as of the latest transaction):
/// the card's recent spending level, with old history fading out instead of falling off a
/// window edge. NULL for a card with no rows.
#[aggregate]
impl DecayedAvg {
    pub fn update(&mut self, amount: f64, ts: Timestamp) {
        self.advance(ts);
        let w = Self::weight_at(ts, self.at.expect("set by advance"));
        self.weighted += amount * w;
        self.weight += w;
    }

    pub fn retract(&mut self, amount: f64, ts: Timestamp) {
        self.advance(ts);
        let w = Self::weight_at(ts, self.at.expect("set by advance"));
        self.weighted -= amount * w;
        self.weight -= w;
    }

    pub fn merge(&mut self, other: Self) {
        if let Some(at) = other.at {
            self.advance(at);
            let scale = Self::weight_at(at, self.at.expect("set by advance"));
            self.weighted += other.weighted * scale;
            self.weight += other.weight * scale;
        }
    }

    pub fn finish(&self) -> Option<f64> {
        (self.weight > 0.0).then(|| self.weighted / self.weight)
    }
}

export_udfs!(risk_score, haversine_km, amount_bucket, is_night, decayed_avg; init = configure);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_probabilities_and_rise_with_amount_and_country_risk() {
        let small = risk_score(5.0, "US");
        let large = risk_score(5_000.0, "US");
        let risky = risk_score(5_000.0, "NG");
        assert!(0.0 < small && small < large && large < risky && risky < 1.0);
        assert_eq!(risk_score(100.0, "us"), risk_score(100.0, "US"));
        assert_eq!(risk_score(100.0, "ZZ"), risk_score(100.0, "??"));
    }

    #[test]
    fn config_overrides_weights_and_reports_bad_lines() {
        let m = Model::parse("intercept = -1\ncountry.us = 3 # comment\n").unwrap();
        assert_eq!(m.intercept, -1.0);
        assert_eq!(m.country_weight("US"), 3.0);
        assert!(Model::parse("bogus = 1").unwrap_err().contains("line 1"));
        assert!(
            Model::parse("country.n1 = 1")
                .unwrap_err()
                .contains("two ASCII letters")
        );
        assert_eq!(m.country_weight("ZZ"), m.unknown_country);
        assert_eq!(m.country_weight("USA"), m.unknown_country);
        assert!(
            Model::parse("intercept = x")
                .unwrap_err()
                .contains("intercept")
        );
    }

    #[test]
    fn haversine_matches_known_distance() {
        // Paris to London is about 344 km.
        let d = haversine_km(48.8566, 2.3522, 51.5074, -0.1278);
        assert!((d - 343.5).abs() < 1.0, "{d}");
        assert_eq!(haversine_km(10.0, 20.0, 10.0, 20.0), 0.0);
    }

    #[test]
    fn buckets_and_night() {
        assert_eq!(amount_bucket(9.99).unwrap(), "<10");
        assert_eq!(amount_bucket(10_000.0).unwrap(), ">=10k");
        assert!(amount_bucket(-1.0).is_err());
        assert!(is_night(Timestamp(3 * 3_600 * 1_000_000)));
        assert!(!is_night(Timestamp(12 * 3_600 * 1_000_000)));
    }
}
