//! Sizes and rates as users write them: `50M`, `1.5GiB`, `800Mbit`, `64K`.
//!
//! `K`, `M`, `G`, `T` and `KiB`.. are powers of 1024; `KB`, `MB`.. powers of
//! 1000; `Kbit`, `Mbit`, `Gbit` decimal bits. `Mb`/`Kb` are refused as
//! ambiguous: users mean bits or bytes and we cannot tell which.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("'{0}' is not a size: expected a number with an optional unit like 64K, 50M, 1GiB, 100MB or 800Mbit")]
    Malformed(String),
    #[error("'{0}' is ambiguous: write {1}bit for bits or {1}B for bytes")]
    Ambiguous(String, String),
    #[error("'{0}' is too large")]
    TooLarge(String),
}

pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.matches('.').count() > 1 {
        return Err(SizeError::Malformed(text.to_string()));
    }
    let unit = unit.trim();
    let multiplier: f64 = match unit {
        "" | "B" | "b" => 1.0,
        _ => unit_multiplier(text, unit)?,
    };
    let value: f64 = number
        .parse()
        .map_err(|_| SizeError::Malformed(text.to_string()))?;
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(SizeError::TooLarge(text.to_string()));
    }
    Ok(bytes.round() as u64)
}

fn unit_multiplier(text: &str, unit: &str) -> Result<f64, SizeError> {
    let prefix = unit.chars().next().unwrap_or(' ').to_ascii_uppercase();
    let power = match prefix {
        'K' => 1,
        'M' => 2,
        'G' => 3,
        'T' => 4,
        _ => return Err(SizeError::Malformed(text.to_string())),
    };
    let rest = &unit[1..];
    let binary = 1024f64.powi(power);
    let decimal = 1000f64.powi(power);
    match rest {
        "" | "iB" | "ib" | "IB" => Ok(binary),
        "B" => Ok(decimal),
        "bit" | "Bit" | "BIT" | "bps" => Ok(decimal / 8.0),
        "b" => Err(SizeError::Ambiguous(
            text.to_string(),
            unit[..1].to_ascii_uppercase(),
        )),
        _ => Err(SizeError::Malformed(text.to_string())),
    }
}

/// Formats bytes for people: `52428800` → `50.0 MiB`.
pub struct HumanBytes(pub u64);

impl fmt::Display for HumanBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit < UNITS.len() - 1 {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_suffixes_are_powers_of_1024() {
        assert_eq!(parse_size("50M").unwrap(), 52_428_800);
        assert_eq!(parse_size("64K").unwrap(), 65_536);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert_eq!(parse_size("1.5M").unwrap(), 1_572_864);
        assert_eq!(parse_size("10m").unwrap(), 10 << 20);
    }

    #[test]
    fn decimal_and_bit_suffixes() {
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("1KB").unwrap(), 1000);
        assert_eq!(parse_size("800Mbit").unwrap(), 100_000_000);
        assert_eq!(parse_size("8Kbit").unwrap(), 1000);
        assert_eq!(parse_size("1Gbit").unwrap(), 125_000_000);
    }

    #[test]
    fn plain_numbers_are_bytes() {
        assert_eq!(parse_size("0").unwrap(), 0);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        assert_eq!(parse_size("100B").unwrap(), 100);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_text() {
        for bad in ["", "M", "-5M", "5X", "5 MBs", "1.2.3M", ".5M", "5Mbitz"] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains(bad.trim()), "{bad}: {err}");
        }
        assert!(matches!(parse_size("5Mb"), Err(SizeError::Ambiguous(..))));
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::TooLarge(..))
        ));
    }

    #[test]
    fn human_bytes() {
        assert_eq!(HumanBytes(52_428_800).to_string(), "50.0 MiB");
        assert_eq!(HumanBytes(512).to_string(), "512 B");
    }
}
