//! `f64` fields that round-trip through JSON whatever their value: finite numbers as numbers,
//! NaN and the infinities as the strings `"NaN"`, `"Infinity"` and `"-Infinity"`. `null`
//! (what older files hold for an undefined standard error) reads back as NaN.
//!
//! ```
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct R {
//!     #[serde(with = "streamppl::records::float")]
//!     se: f64,
//! }
//! let text = serde_json::to_string(&R { se: f64::NAN }).unwrap();
//! assert_eq!(text, r#"{"se":"NaN"}"#);
//! assert!(serde_json::from_str::<R>(&text).unwrap().se.is_nan());
//! assert!(serde_json::from_str::<R>(r#"{"se":null}"#).unwrap().se.is_nan());
//! ```

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Repr {
    Number(f64),
    Text(String),
    Null(()),
}

pub fn serialize<S: Serializer>(value: &f64, s: S) -> Result<S::Ok, S::Error> {
    match *value {
        v if v.is_finite() => s.serialize_f64(v),
        v if v.is_nan() => s.serialize_str("NaN"),
        v if v > 0.0 => s.serialize_str("Infinity"),
        _ => s.serialize_str("-Infinity"),
    }
}

pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    match Repr::deserialize(d)? {
        Repr::Number(v) => Ok(v),
        Repr::Null(()) => Ok(f64::NAN),
        Repr::Text(t) => match t.as_str() {
            "NaN" => Ok(f64::NAN),
            "Infinity" => Ok(f64::INFINITY),
            "-Infinity" => Ok(f64::NEG_INFINITY),
            other => Err(serde::de::Error::custom(format!(
                "`{other}` is not a number (expected a number, \"NaN\", \"Infinity\" or \"-Infinity\")"
            ))),
        },
    }
}

/// The same for `Option<f64>`: `None` is `null`.
pub mod option {
    use super::*;

    pub fn serialize<S: Serializer>(value: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => super::serialize(v, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
        match Option::<Repr>::deserialize(d)? {
            None | Some(Repr::Null(())) => Ok(None),
            Some(Repr::Number(v)) => Ok(Some(v)),
            Some(Repr::Text(t)) => {
                super::deserialize(serde::de::value::StrDeserializer::<D::Error>::new(&t)).map(Some)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct R {
        #[serde(with = "super")]
        v: f64,
        #[serde(with = "super::option", default)]
        o: Option<f64>,
    }

    #[test]
    fn every_value_round_trips() {
        for v in [0.0, -1.5, 1e300, f64::INFINITY, f64::NEG_INFINITY, f64::NAN] {
            for o in [None, Some(v)] {
                let text = serde_json::to_string(&R { v, o }).unwrap();
                let back: R = serde_json::from_str(&text).unwrap();
                assert!(back.v == v || (v.is_nan() && back.v.is_nan()), "{text}");
                assert_eq!(back.o.is_some(), o.is_some(), "{text}");
                if let (Some(a), Some(b)) = (back.o, o) {
                    assert!(a == b || (a.is_nan() && b.is_nan()), "{text}");
                }
            }
        }
        let err = serde_json::from_str::<R>(r#"{"v":"lots"}"#).unwrap_err();
        assert!(err.to_string().contains("lots"), "{err}");
    }
}
