//! Byte sizes written as Kubernetes quantities (`256Mi`, `1G`, `1.5Gi`, `1000000`): how the
//! operator reads `spec.engine.prefixCacheMemory` and how the sidecar reads the flag the
//! operator passes it, so the two agree on every spelling.

/// Bytes in `text`, a non-negative Kubernetes quantity with a binary (`Ki` .. `Ei`) or decimal
/// (`k` .. `E`) suffix or none. Fractions are allowed where the result is a whole number of
/// bytes; exponents (`1e9`) and milli-units are not, as no one sizes memory with them.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    let multiplier: u64 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        _ => return Err(invalid(text)),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
        return Err(invalid(text));
    }
    let digits = |s: &str| -> Result<u128, String> {
        if s.is_empty() {
            Ok(0)
        } else {
            s.parse::<u128>().map_err(|_| invalid(text))
        }
    };
    let scale = 10u128
        .checked_pow(u32::try_from(fraction.len()).map_err(|_| invalid(text))?)
        .ok_or_else(|| invalid(text))?;
    // whole * m + fraction * m / 10^len, exactly.
    let m = u128::from(multiplier);
    let fraction_bytes = digits(fraction)?
        .checked_mul(m)
        .ok_or_else(|| too_large(text))?;
    if fraction_bytes % scale != 0 {
        return Err(format!("{text:?} is not a whole number of bytes"));
    }
    let bytes = digits(whole)?
        .checked_mul(m)
        .and_then(|b| b.checked_add(fraction_bytes / scale))
        .ok_or_else(|| too_large(text))?;
    u64::try_from(bytes).map_err(|_| too_large(text))
}

fn invalid(text: &str) -> String {
    format!(
        "{text:?} is not a byte size: expected a number with an optional suffix (Ki, Mi, Gi, Ti, k, M, G, T), e.g. 256Mi"
    )
}

fn too_large(text: &str) -> String {
    format!("{text:?} is too large")
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn reads_the_spellings_kubernetes_users_write() {
        for (text, bytes) in [
            ("0", 0),
            ("1000000", 1_000_000),
            ("256Mi", 256 << 20),
            ("1Gi", 1 << 30),
            ("1.5Gi", 3 << 29),
            ("2G", 2_000_000_000),
            ("500k", 500_000),
            ("0.5Ki", 512),
            (" 64Mi ", 64 << 20),
        ] {
            assert_eq!(parse_bytes(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn refuses_what_is_not_a_byte_size_with_the_reason() {
        for text in [
            "", "Mi", "-1", "1e9", "100m", "1.2.3Gi", "12 Mi", "1.0001k", "20Ei",
        ] {
            let err = parse_bytes(text).expect_err(text);
            assert!(err.contains(&format!("{:?}", text.trim())), "{text}: {err}");
        }
    }
}
