//! Data packages (`P` lines, docs/protocols.md §1.4): `<var>(;<var>)*`, each var a two-letter
//! type, an 8-character value (7 hex digits offset by 0x8000000, then an SI prefix; or
//! `     nan`) and optional `,`-separated metadata (`1x` status, `2xx` range, `4…` noise).

use std::fmt;

/// The offset added to every encoded value (`MSCRIPT_PARAMETER_OFFSET`).
const OFFSET: i64 = 0x800_0000;
/// Largest magnitude an encoded value can have after the offset.
const MAX_RAW: i64 = OFFSET - 1;

/// SI prefix characters and their factors, smallest first. `i` (integer) is separate.
pub const SI_PREFIXES: [(char, f64); 13] = [
    ('a', 1e-18),
    ('f', 1e-15),
    ('p', 1e-12),
    ('n', 1e-9),
    ('u', 1e-6),
    ('m', 1e-3),
    (' ', 1.0),
    ('k', 1e3),
    ('M', 1e6),
    ('G', 1e9),
    ('T', 1e12),
    ('P', 1e15),
    ('E', 1e18),
];

fn factor(prefix: char) -> Option<f64> {
    if prefix == 'i' {
        return Some(1.0);
    }
    SI_PREFIXES
        .iter()
        .find(|(c, _)| *c == prefix)
        .map(|(_, f)| *f)
}

/// A variable type: its two-letter code, with meaning and unit where documented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VarType(pub [u8; 2]);

impl VarType {
    /// The two-letter code (`da`, `ba` …).
    pub fn code(&self) -> &str {
        std::str::from_utf8(&self.0).unwrap_or("??")
    }

    /// (meaning, unit) from PalmSens' `MSCRIPT_VAR_TYPES_LIST`; unknown codes are
    /// `("unknown", "")`, never an error.
    pub fn describe(&self) -> (&'static str, &'static str) {
        match &self.0 {
            b"aa" => ("unknown", ""),
            b"ab" => ("WE vs RE potential", "V"),
            b"ac" => ("CE vs GND potential", "V"),
            b"ad" => ("SE vs GND potential", "V"),
            b"ae" => ("RE vs GND potential", "V"),
            b"af" => ("WE vs GND potential", "V"),
            b"ag" => ("WE vs CE potential", "V"),
            b"ah" => ("S2 vs RE potential", "V"),
            b"ai" => ("SE vs S2 potential", "V"),
            [b'a', c @ b's'..=b'z'] => (AIN[usize::from(c - b's')], "V"),
            b"ba" => ("WE current", "A"),
            b"bb" => ("WE2 current", "A"),
            b"ca" => ("Phase", "degrees"),
            b"cb" => ("Impedance", "Ohm"),
            b"cc" => ("Z_real", "Ohm"),
            b"cd" => ("Z_imag", "Ohm"),
            b"ce" => ("EIS E TDD", "V"),
            b"cf" => ("EIS I TDD", "A"),
            b"cg" => ("EIS sampling frequency", "Hz"),
            b"ch" => ("EIS E AC", "Vrms"),
            b"ci" => ("EIS E DC", "V"),
            b"cj" => ("EIS I AC", "Arms"),
            b"ck" => ("EIS I DC", "A"),
            b"da" => ("Applied potential", "V"),
            b"db" => ("Applied current", "A"),
            b"dc" => ("Applied frequency", "Hz"),
            b"dd" => ("Applied AC amplitude", "Vrms"),
            b"ea" => ("Channel", ""),
            b"eb" => ("Time", "s"),
            b"ec" => ("Pin mask", ""),
            b"ed" => ("Temperature", "degC"),
            b"ee" => ("Count", ""),
            b"ef" => ("Board temperature", "degC"),
            b"eg" => ("Time vs potential derivative", "s/V"),
            [b'h', b'a'..=b'd'] => ("Generic current", "A"),
            [b'i', b'a'..=b'd'] => ("Generic potential", "V"),
            [b'j', b'a'..=b'd'] => ("Misc generic", ""),
            _ => ("unknown", ""),
        }
    }
}

const AIN: [&str; 8] = [
    "AIN0 potential",
    "AIN1 potential",
    "AIN2 potential",
    "AIN3 potential",
    "AIN4 potential",
    "AIN5 potential",
    "AIN6 potential",
    "AIN7 potential",
];

impl fmt::Display for VarType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// One variable of a package.
#[derive(Debug, Clone, PartialEq)]
pub struct Var {
    /// What the value is (potential, current, time …).
    pub kind: VarType,
    /// The value in SI units; `None` for `nan`.
    pub value: Option<f64>,
    /// Status bitmask (`1x`): 0x1 timing, 0x2 overload, 0x4 underload, 0x8 overload warning.
    pub status: Option<u8>,
    /// Range index (`2xx`), meaning per device family.
    pub range: Option<u8>,
}

/// Status bits by name, for events and logs.
pub fn status_flags(status: u8) -> Vec<&'static str> {
    [
        (0x1, "timing_error"),
        (0x2, "overload"),
        (0x4, "underload"),
        (0x8, "overload_warning"),
    ]
    .iter()
    .filter(|(bit, _)| status & bit != 0)
    .map(|(_, name)| *name)
    .collect()
}

/// A decoded `P` line.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Package {
    /// The package's variables, in line order.
    pub vars: Vec<Var>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
/// Why a `P` line does not decode.
pub enum PackageError {
    #[error("empty package")]
    /// Nothing after the `P`.
    Empty,
    #[error("variable {0:?}: shorter than type + 8-character value")]
    /// A variable shorter than its type and value.
    Short(String),
    #[error("variable {0:?}: type must be two lowercase letters")]
    /// A type code that is not two lowercase letters.
    Type(String),
    #[error("variable {0:?}: value must be 7 hex digits and an SI prefix, or \"     nan\"")]
    /// A value that is not 7 hex digits and an SI prefix.
    Value(String),
    #[error("variable {0:?}: bad metadata {1:?}")]
    /// A metadata field that does not parse (variable, field).
    Metadata(String, String),
}

impl Package {
    /// Parses what follows the `P`.
    pub fn parse(s: &str) -> Result<Package, PackageError> {
        if s.is_empty() {
            return Err(PackageError::Empty);
        }
        let vars = s.split(';').map(parse_var).collect::<Result<Vec<_>, _>>()?;
        Ok(Package { vars })
    }

    /// The first variable of a type.
    pub fn get(&self, code: &str) -> Option<&Var> {
        self.vars.iter().find(|v| v.kind.code() == code)
    }
}

fn parse_var(s: &str) -> Result<Var, PackageError> {
    let b = s.as_bytes();
    if b.len() < 10 {
        return Err(PackageError::Short(s.to_string()));
    }
    if !b[..10].is_ascii() {
        return Err(PackageError::Value(s.to_string()));
    }
    if !b[0].is_ascii_lowercase() || !b[1].is_ascii_lowercase() {
        return Err(PackageError::Type(s.to_string()));
    }
    let kind = VarType([b[0], b[1]]);
    let value = decode_value(&s[2..10]).ok_or_else(|| PackageError::Value(s.to_string()))?;
    let mut var = Var {
        kind,
        value,
        status: None,
        range: None,
    };
    let meta = &s[10..];
    if meta.is_empty() {
        return Ok(var);
    }
    let Some(meta) = meta.strip_prefix(',') else {
        return Err(PackageError::Metadata(s.to_string(), meta.to_string()));
    };
    for m in meta.split(',') {
        let bad = || PackageError::Metadata(s.to_string(), m.to_string());
        let digits = m.get(1..).ok_or_else(bad)?;
        match m.as_bytes().first() {
            Some(b'1') if digits.len() == 1 => {
                var.status = Some(u8::from_str_radix(digits, 16).map_err(|_| bad())?);
            }
            Some(b'2') if digits.len() == 2 => {
                var.range = Some(u8::from_str_radix(digits, 16).map_err(|_| bad())?);
            }
            // Noise (`4…`) and types this parser does not know are skipped, not errors:
            // newer firmware may add metadata.
            Some(b'4') | Some(b'3') | Some(b'5'..=b'9') => {}
            _ => return Err(bad()),
        }
    }
    Ok(var)
}

/// Decodes an 8-character value field; `Some(None)` is `nan`.
fn decode_value(field: &str) -> Option<Option<f64>> {
    if field == "     nan" {
        return Some(None);
    }
    if field.len() != 8 || !field.is_ascii() {
        return None;
    }
    let (hex, prefix) = field.split_at(7);
    // Copy the 7 digits out before reading the prefix: `a`, `f` and `E` are hex digits.
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let raw = i64::from_str_radix(hex, 16).ok()? - OFFSET;
    let mut chars = prefix.chars();
    let p = chars.next()?;
    if chars.next().is_some() {
        return None;
    }
    let f = factor(p)?;
    // Divide by the exact power of ten for the small prefixes (1e6 is exact in f64,
    // 1e-6 is not): -200000u decodes to -0.2, not -0.19999999999999998.
    Some(Some(if f < 1.0 {
        raw as f64 / (1.0 / f).round()
    } else {
        raw as f64 * f
    }))
}

/// Encodes a value with the smallest SI prefix that keeps it in range, which gives the
/// most precision (0 encodes with the space prefix). `None` when the value is not finite
/// or too large for any prefix.
pub fn encode_value(v: f64) -> Option<String> {
    if v == 0.0 {
        return Some(format!("{:07X} ", OFFSET));
    }
    if !v.is_finite() {
        return None;
    }
    SI_PREFIXES
        .iter()
        .find_map(|(p, _)| encode_value_with(v, *p))
}

/// Encodes a value with a given prefix (`i` for integers); `None` if it does not fit.
/// `nan` encodes as `     nan`.
pub fn encode_value_with(v: f64, prefix: char) -> Option<String> {
    if v.is_nan() {
        return Some("     nan".into());
    }
    let raw = (v / factor(prefix)?).round();
    if !raw.is_finite() || raw.abs() > MAX_RAW as f64 {
        return None;
    }
    Some(format!("{:07X}{prefix}", raw as i64 + OFFSET))
}

/// The documented text of an error code (`COMM_PROTOCOL_EXCEPTIONS`, the codes
/// docs/protocols.md lists); `None` for codes not in that list.
pub fn error_text(code: u16) -> Option<&'static str> {
    Some(match code {
        0x0001 => "An unspecified error has occurred",
        0x0002 => "An invalid VarType has been used",
        0x0003 => "The command was not recognized",
        0x0004 => "Unknown register",
        0x0006 => "Communication mode invalid",
        0x0007 => "An argument has an unexpected value",
        0x0008 => "Command exceeds maximum length",
        0x0009 => "The command has timed out",
        0x000C => "No script has been loaded",
        0x000F => "The given potential is not valid",
        0x0010 => "Variable is NaN or infinite",
        0x0011 => "The given frequency is not valid",
        0x0012 => "The given amplitude is not valid",
        0x0014 => "Cannot perform OCP measurement when cell on",
        0x001B => "Not supported by this device",
        0x001F => "Device is not licensed for this technique",
        0x0023 => "Command is invalid for the selected PGStat mode",
        0x0028 => "Division by zero",
        0x0032 => "Critical cell overload, measurement aborted",
        0x005A => "Cannot meet the requested timing",
        0x4001 => "The script command is unknown",
        0x4004 => "Unexpected character",
        0x4005 => "The script is too large",
        0x400B => "Measurement loops cannot be nested",
        0x4018 => "The script ended unexpectedly",
        0x401A => "Command not allowed inside a measurement loop",
        0x4026 => "Variable already exists",
        0x4027 => "This command requires cell_on",
        0x4028 => "This command requires cell_off",
        0x402B => "Invalid variable name",
        0x420B => "Argument variable has not been declared",
        0x7FFF => "Fatal error, the device must be reset",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1e-30)
    }

    fn var(p: &Package, code: &str) -> f64 {
        p.get(code).and_then(|v| v.value).unwrap()
    }

    #[test]
    fn exchange_a_lsv_packages_decode_exactly() {
        // docs/protocols.md §1.7 exchange A: (da V, ba A), status 0, range 0x88.
        let cases = [
            ("da7F85F3Fu;ba48D503Dp,10,288", -0.499905, -5.7847747e-5),
            ("da7F9234Bu;ba4E2C324p,10,288", -0.449717, -5.2247772e-5),
            ("da806EC24u;baAE16C6Dp,10,288", 0.453668, 4.8327789e-5),
            ("da807B031u;baB360495p,10,288", 0.503857, 5.3871765e-5),
        ];
        for (line, e, i) in cases {
            let p = Package::parse(line).unwrap();
            assert!(close(var(&p, "da"), e), "{line}: {}", var(&p, "da"));
            assert!(close(var(&p, "ba"), i), "{line}: {}", var(&p, "ba"));
            let ba = p.get("ba").unwrap();
            assert_eq!((ba.status, ba.range), (Some(0), Some(0x88)));
            assert_eq!(p.get("da").unwrap().status, None);
        }
    }

    #[test]
    fn the_c_readme_sample_decodes_to_microamps_not_volts() {
        // docs/protocols.md points out the C README prints -4.999E-01 A for this package; the
        // correct current is -54879760 pA.
        let p = Package::parse("da7F85F3Fu;ba4BA99F0p,10,288").unwrap();
        assert!(close(var(&p, "ba"), -5.487976e-5));
    }

    #[test]
    fn exchange_b_cv_package_with_underload_status() {
        let p = Package::parse("da84E63DAn;ba82AB973f,14,284").unwrap();
        assert!(close(var(&p, "da"), 0.00513737));
        assert!(close(var(&p, "ba"), 2.799987e-9));
        let ba = p.get("ba").unwrap();
        assert_eq!(ba.status, Some(0x4));
        assert_eq!(status_flags(0x4), ["underload"]);
        assert_eq!(ba.range, Some(132));
    }

    #[test]
    fn exchange_c_eis_package() {
        let p = Package::parse("dcDF5DFF4u;cc896D904m,10,287;cd82DB1A8u,10,287").unwrap();
        assert!(close(var(&p, "dc"), 99.999732));
        assert!(close(var(&p, "cc"), 9885.956));
        assert!(close(var(&p, "cd"), 2.9946));
        assert_eq!(p.get("cc").unwrap().range, Some(135));
        assert_eq!(p.get("cd").unwrap().kind.describe(), ("Z_imag", "Ohm"));
    }

    #[test]
    fn encoder_vectors() {
        // docs/protocols.md §1.7 encoder vectors.
        assert_eq!(encode_value_with(0.01, 'm').unwrap(), "800000Am");
        assert_eq!(encode_value_with(-0.01, 'm').unwrap(), "7FFFFF6m");
        assert_eq!(encode_value(0.0).unwrap(), "8000000 ");
        assert_eq!(encode_value_with(123.0, 'i').unwrap(), "800007Bi");
        assert_eq!(encode_value(0.5).unwrap(), "807A120u");
        assert_eq!(encode_value(-0.5).unwrap(), "7F85EE0u");
        assert_eq!(encode_value(1.234e-6).unwrap(), "812D450p");
        assert_eq!(encode_value(-2.5e-9).unwrap(), "7D9DA60f");
        assert_eq!(encode_value(100e3).unwrap(), "DF5E100m");
        assert_eq!(encode_value_with(f64::NAN, 'u').unwrap(), "     nan");
        // and the manual's example decodes back
        let p = Package::parse("da800000Am").unwrap();
        assert!(close(var(&p, "da"), 0.01));
    }

    #[test]
    fn decoded_values_are_correctly_rounded() {
        let p = Package::parse("da7FCF2C0u;ba800000Am").unwrap();
        assert_eq!(var(&p, "da"), -0.2);
        assert_eq!(var(&p, "ba"), 0.01);
    }

    #[test]
    fn prefixes_that_are_hex_digits_are_not_read_as_digits() {
        // `a`, `f`, `E` are both hex digits and SI prefixes.
        assert!(close(
            var(&Package::parse("ba800000Aa").unwrap(), "ba"),
            10e-18
        ));
        assert!(close(
            var(&Package::parse("ba800000Af").unwrap(), "ba"),
            10e-15
        ));
        assert!(close(
            var(&Package::parse("ba800000AE").unwrap(), "ba"),
            10e18
        ));
    }

    #[test]
    fn nan_unknown_types_and_noise_metadata_are_accepted() {
        let p = Package::parse("da     nan;zz8000001 ,10,40123").unwrap();
        assert_eq!(p.get("da").unwrap().value, None);
        assert_eq!(p.get("zz").unwrap().kind.describe(), ("unknown", ""));
        assert_eq!(p.get("zz").unwrap().value, Some(1.0));
    }

    #[test]
    fn malformed_packages_are_errors_not_panics() {
        for bad in [
            "",
            "da",
            "da7F85F3F",
            "Da7F85F3Fu",
            "da7G85F3Fu",
            "da7F85F3Fx",
            "da7F85F3Fu,",
            "da7F85F3Fu,1",
            "da7F85F3Fuextra",
            "daé85F3Fuu",
        ] {
            assert!(Package::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    proptest::proptest! {
        /// encode → decode returns the value within the precision of the chosen prefix.
        #[test]
        fn encode_decode_round_trip(mantissa in -1.0e8f64..1.0e8, exp in -18i32..12) {
            let v = mantissa * 10f64.powi(exp);
            if let Some(field) = encode_value(v) {
                let p = Package::parse(&format!("ba{field}")).unwrap();
                let back = p.get("ba").unwrap().value.unwrap();
                let prefix = field.chars().last().unwrap();
                let step = factor(prefix).unwrap();
                proptest::prop_assert!((back - v).abs() <= step * 0.5 * (1.0 + 1e-9) + v.abs() * 1e-12, "{} -> {} -> {}", v, field, back);
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_the_package_parser(s in "\\PC{0,64}") {
            let _ = Package::parse(&s);
        }
    }
}
