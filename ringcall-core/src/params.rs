//! Typed params: a serde `Deserializer` over the parsed request's tape, so
//! [`Request::params`](super::Request::params) fills a `#[derive(Deserialize)]` struct
//! straight from the tape, borrowing strings from the receive buffer where the struct does,
//! and an error names the field it is about (`params.items[2].name: …`).

use std::fmt;

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};
use simd_json::ValueType;
use simd_json::prelude::*;
use simd_json::tape::Value;

use crate::error::HandlerError;

/// Deserializes `T` from `params`; a failure is a 400 naming the field.
pub(crate) fn from_value<'i, T: de::Deserialize<'i>>(params: Value<'_, 'i>) -> Result<T, HandlerError> {
    T::deserialize(ValueDeserializer(params)).map_err(|e| HandlerError::bad_request(e.to_string()))
}

/// Why params did not fit the type, and where.
#[derive(Debug)]
pub(crate) struct ParamsError {
    /// The path below `params`, outermost first (`.user`, `[2]`).
    path: String,
    message: String,
}

impl ParamsError {
    /// The same error one level further out, at `segment`.
    fn within(mut self, segment: fmt::Arguments<'_>) -> Self {
        self.path.insert_str(0, &segment.to_string());
        self
    }
}

impl fmt::Display for ParamsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "params{}: {}", self.path, self.message)
    }
}

impl std::error::Error for ParamsError {}

impl de::Error for ParamsError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self { path: String::new(), message: msg.to_string() }
    }

    fn missing_field(field: &'static str) -> Self {
        Self { path: format!(".{field}"), message: "missing (required)".to_owned() }
    }
}

struct ValueDeserializer<'t, 'i>(Value<'t, 'i>);

impl<'de> de::Deserializer<'de> for ValueDeserializer<'_, 'de> {
    type Error = ParamsError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ParamsError> {
        let v = self.0;
        match v.value_type() {
            ValueType::Null => visitor.visit_unit(),
            ValueType::Bool => visitor.visit_bool(v.as_bool().unwrap_or_default()),
            ValueType::I64 => visitor.visit_i64(v.as_i64().unwrap_or_default()),
            ValueType::U64 => visitor.visit_u64(v.as_u64().unwrap_or_default()),
            ValueType::F64 => visitor.visit_f64(v.as_f64().unwrap_or_default()),
            ValueType::String => visitor.visit_borrowed_str(v.into_string().unwrap_or_default()),
            ValueType::Array => {
                let array = v.as_array().expect("an array");
                visitor.visit_seq(Seq { items: array.iter(), index: 0 })
            }
            ValueType::Object => {
                let object = v.as_object().expect("an object");
                visitor.visit_map(Map { members: object.iter(), key: "", value: None })
            }
            _ => visitor.visit_unit(),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ParamsError> {
        if self.0.is_null() { visitor.visit_none() } else { visitor.visit_some(self) }
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ParamsError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ParamsError> {
        let v = self.0;
        if let Some(variant) = v.into_string() {
            return visitor.visit_enum(variant.into_deserializer());
        }
        match v.as_object() {
            Some(object) if object.len() == 1 => {
                let (variant, content) = object.iter().next().expect("one member");
                visitor.visit_enum(Enum { variant, content })
            }
            _ => Err(de::Error::custom("expected a variant name, or an object with one member")),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}

struct Seq<'t, 'i> {
    items: simd_json::tape::array::Iter<'t, 'i>,
    index: usize,
}

impl<'de> SeqAccess<'de> for Seq<'_, 'de> {
    type Error = ParamsError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, ParamsError> {
        let Some(item) = self.items.next() else { return Ok(None) };
        let index = self.index;
        self.index += 1;
        seed.deserialize(ValueDeserializer(item)).map(Some).map_err(|e| e.within(format_args!("[{index}]")))
    }
}

struct Map<'t, 'i> {
    members: simd_json::tape::object::Iter<'t, 'i>,
    key: &'i str,
    value: Option<Value<'t, 'i>>,
}

impl<'de> MapAccess<'de> for Map<'_, 'de> {
    type Error = ParamsError;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, ParamsError> {
        let Some((key, value)) = self.members.next() else { return Ok(None) };
        self.key = key;
        self.value = Some(value);
        seed.deserialize(de::value::BorrowedStrDeserializer::new(key)).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, ParamsError> {
        let value = self.value.take().ok_or_else(|| de::Error::custom("a value without its key"))?;
        let key = self.key;
        seed.deserialize(ValueDeserializer(value)).map_err(|e| e.within(format_args!(".{key}")))
    }
}

struct Enum<'t, 'i> {
    variant: &'i str,
    content: Value<'t, 'i>,
}

impl<'de, 't> de::EnumAccess<'de> for Enum<'t, 'de> {
    type Error = ParamsError;
    type Variant = ValueDeserializer<'t, 'de>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Self::Variant), ParamsError> {
        let variant = seed.deserialize(de::value::BorrowedStrDeserializer::new(self.variant))?;
        Ok((variant, ValueDeserializer(self.content)))
    }
}

impl<'de> de::VariantAccess<'de> for ValueDeserializer<'_, 'de> {
    type Error = ParamsError;

    fn unit_variant(self) -> Result<(), ParamsError> {
        de::Deserialize::deserialize(self)
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, ParamsError> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, ParamsError> {
        de::Deserializer::deserialize_any(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ParamsError> {
        de::Deserializer::deserialize_any(self, visitor)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;
    use simd_json::{Buffers, Tape};

    #[derive(Debug, Deserialize, PartialEq)]
    struct Item<'a> {
        name: &'a str,
        count: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Exact { digits: u8 },
    }

    #[derive(Debug, Deserialize, PartialEq)]
    struct Params<'a> {
        #[serde(borrow)]
        items: Vec<Item<'a>>,
        note: Option<String>,
        mode: Mode,
        #[serde(default)]
        ratio: f64,
    }

    fn parse<T: for<'de> FnOnce(Result<Params<'de>, crate::error::HandlerError>)>(json: &str, check: T) {
        let mut bytes = json.as_bytes().to_vec();
        let len = bytes.len();
        bytes.resize(len + simd_json::INPUT_PADDING, 0);
        let mut buffers = Buffers::new(len);
        let mut tape = Tape::null();
        simd_json::fill_tape_padded(&mut bytes, len, &mut buffers, &mut tape).expect("valid JSON");
        check(super::from_value(tape.as_value()));
    }

    #[test]
    fn a_struct_fills_from_the_tape_borrowing_its_strings() {
        parse(
            r#"{"items":[{"name":"a","count":1},{"name":"b","count":2}],"note":null,"mode":{"exact":{"digits":3}},"ratio":1}"#,
            |p| {
                let p = p.unwrap();
                assert_eq!(p.items, [Item { name: "a", count: 1 }, Item { name: "b", count: 2 }]);
                assert_eq!((p.note, p.mode, p.ratio), (None, Mode::Exact { digits: 3 }, 1.0));
            },
        );
        parse(r#"{"items":[],"note":"n","mode":"fast"}"#, |p| {
            let p = p.unwrap();
            assert_eq!((p.note.as_deref(), p.mode, p.ratio), (Some("n"), Mode::Fast, 0.0));
        });
    }

    #[test]
    fn an_error_is_a_400_naming_the_field() {
        let message = |json: &str| {
            let mut got = None;
            parse(json, |p| {
                let e = p.unwrap_err();
                assert_eq!(e.code(), 400);
                got = Some(e.message().to_owned());
            });
            got.unwrap()
        };
        assert_eq!(
            message(r#"{"items":[{"name":"a","count":1},{"name":"b","count":-2}],"mode":"fast"}"#),
            "params.items[1].count: invalid value: integer `-2`, expected u32"
        );
        assert_eq!(
            message(r#"{"items":[{"count":1}],"mode":"fast"}"#),
            "params.items[0].name: missing (required)"
        );
        assert_eq!(message(r#"{"mode":"fast"}"#), "params.items: missing (required)");
        assert_eq!(
            message(r#"{"items":[],"mode":"slow"}"#),
            "params.mode: unknown variant `slow`, expected `fast` or `exact`"
        );
        assert_eq!(
            message(r#"{"items":"x","mode":"fast"}"#),
            "params.items: invalid type: string \"x\", expected a sequence"
        );
    }
}
