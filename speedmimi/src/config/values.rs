//! Scalar config values with their own syntax: durations (`30s`, `500ms`, `1m30s`) and the
//! `ebpf.enabled` switch, which takes a YAML bool or `auto`.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use super::EbpfMode;

/// A duration written as a string of number-unit pairs: `500ms`, `30s`, `5m`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Dur(Duration);

impl Dur {
    pub const fn secs(s: u64) -> Dur {
        Dur(Duration::from_secs(s))
    }

    pub const fn get(self) -> Duration {
        self.0
    }

    /// Parses `1h30m`, `30s`, `250ms`, `100us`; a bare `0` is zero.
    pub fn parse(s: &str) -> Result<Dur, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let mut total = Duration::ZERO;
        let mut rest = s;
        if rest.is_empty() {
            return Err("empty duration".into());
        }
        while !rest.is_empty() {
            let digits = rest.find(|c: char| !c.is_ascii_digit()).unwrap_or(rest.len());
            if digits == 0 {
                return Err(format!("invalid duration {s:?}: expected a number then a unit, as in 30s or 500ms"));
            }
            let n: u64 = rest[..digits].parse().map_err(|_| format!("invalid duration {s:?}: number too large"))?;
            rest = &rest[digits..];
            let unit = rest.find(|c: char| c.is_ascii_digit()).unwrap_or(rest.len());
            let part = match &rest[..unit] {
                "h" => Duration::from_secs(n.saturating_mul(3600)),
                "m" => Duration::from_secs(n.saturating_mul(60)),
                "s" => Duration::from_secs(n),
                "ms" => Duration::from_millis(n),
                "us" => Duration::from_micros(n),
                "" => return Err(format!("invalid duration {s:?}: missing unit (h, m, s, ms, us)")),
                u => return Err(format!("invalid duration {s:?}: unknown unit {u:?} (h, m, s, ms, us)")),
            };
            total = total.saturating_add(part);
            rest = &rest[unit..];
        }
        Ok(Dur(total))
    }
}

impl fmt::Display for Dur {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let d = self.0;
        if d.subsec_nanos() == 0 {
            write!(f, "{}s", d.as_secs())
        } else if d.subsec_nanos().is_multiple_of(1_000_000) {
            write!(f, "{}ms", d.as_millis())
        } else {
            write!(f, "{}us", d.as_micros())
        }
    }
}

impl Serialize for Dur {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

// Errors are raised inside the visitor, while the deserializer still stands on the value,
// so serde_yaml reports the field path and the value's line and column.
impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Dur, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as 30s or 500ms")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Dur, E> {
                Dur::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// A size in bytes written as a number or with a unit: `65536`, `64KiB`, `4MiB`, `1GiB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let n: u64 = t[..split].parse().map_err(|_| format!("invalid size {s:?}: expected e.g. 4MiB or 65536"))?;
        let mult = match t[split..].trim() {
            "" | "B" => 1,
            "KiB" | "K" | "k" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            u => return Err(format!("invalid size {s:?}: unknown unit {u:?} (B, KiB, MiB, GiB)")),
        };
        n.checked_mul(mult).map(ByteSize).ok_or_else(|| format!("invalid size {s:?}: too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            n if n >= 1 << 30 && n % (1 << 30) == 0 => write!(f, "{}GiB", n >> 30),
            n if n >= 1 << 20 && n % (1 << 20) == 0 => write!(f, "{}MiB", n >> 20),
            n if n >= 1 << 10 && n % (1 << 10) == 0 => write!(f, "{}KiB", n >> 10),
            n => write!(f, "{n}"),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<ByteSize, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as 4MiB or 65536")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// `ebpf.enabled`: `auto`, or a YAML/JSON bool, or the strings `true`/`false`.
pub fn ebpf_mode<'de, D: Deserializer<'de>>(d: D) -> Result<EbpfMode, D::Error> {
    struct V;
    impl de::Visitor<'_> for V {
        type Value = EbpfMode;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("auto, true or false")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<EbpfMode, E> {
            Ok(if v { EbpfMode::True } else { EbpfMode::False })
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<EbpfMode, E> {
            match v {
                "auto" => Ok(EbpfMode::Auto),
                "true" => Ok(EbpfMode::True),
                "false" => Ok(EbpfMode::False),
                other => Err(E::custom(format!("invalid value {other:?}: expected auto, true or false"))),
            }
        }
    }
    d.deserialize_any(V)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(Dur::parse("30s").unwrap().get(), Duration::from_secs(30));
        assert_eq!(Dur::parse("500ms").unwrap().get(), Duration::from_millis(500));
        assert_eq!(Dur::parse("1h30m").unwrap().get(), Duration::from_secs(5400));
        assert_eq!(Dur::parse("0").unwrap().get(), Duration::ZERO);
        for bad in ["", "30", "s", "10x", "1.5s", "-1s"] {
            assert!(Dur::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(Dur::parse("250ms").unwrap().to_string(), "250ms");
        assert_eq!(Dur::secs(30).to_string(), "30s");
    }

    #[test]
    fn sizes() {
        assert_eq!(ByteSize::parse("4MiB").unwrap().0, 4 << 20);
        assert_eq!(ByteSize::parse("65536").unwrap().0, 65536);
        assert_eq!(ByteSize::parse("64KiB").unwrap().to_string(), "64KiB");
        assert!(ByteSize::parse("4MB").is_err() && ByteSize::parse("x").is_err());
    }
}
