//! The parsed request: the envelope fields of protocol v1 read off simd-json's tape, with
//! `params` left on the tape for the handler (strings borrow the receive buffer: zero copy).

use std::fmt;

use simd_json::ValueType;
use simd_json::prelude::*;
use simd_json::tape::{Tape, Value};

use crate::stats::StatsRegistry;

/// What a handler can see of the core it runs on.
#[derive(Debug)]
pub struct CoreContext {
    core: usize,
    stats: std::sync::Arc<StatsRegistry>,
}

impl CoreContext {
    /// The context of core `core`, whose counters are in `stats`.
    pub fn new(core: usize, stats: std::sync::Arc<StatsRegistry>) -> Self {
        Self { core, stats }
    }

    /// Index of the core (worker thread) serving this request.
    pub fn core(&self) -> usize {
        self.core
    }

    /// The counters of every core of this server.
    pub fn stats(&self) -> &StatsRegistry {
        &self.stats
    }
}

/// A parsed request, borrowed from the connection's receive buffer.
///
/// `'t` is the parse tape, `'i` the input bytes the strings point into.
pub struct Request<'t, 'i> {
    cmdid: u32,
    timestamp: Option<i64>,
    timeout: Option<std::time::Duration>,
    params: Value<'t, 'i>,
    id: Option<Value<'t, 'i>>,
    context: &'t CoreContext,
    identity: Option<&'t str>,
}

impl<'t, 'i> Request<'t, 'i> {
    /// The command id.
    pub fn cmdid(&self) -> u32 {
        self.cmdid
    }

    /// The request's `timestamp`, when it sent one.
    pub fn timestamp(&self) -> Option<i64> {
        self.timestamp
    }

    /// The request's `timeout_ms`, when it sent one: how long after the server read the
    /// request the caller still wants an answer. Past it the reply is a 504.
    pub fn timeout(&self) -> Option<std::time::Duration> {
        self.timeout
    }

    /// Deserializes `params` into `T`, borrowing strings from the request where `T` does
    /// (`&str` fields: zero copy, unless the string had escapes).
    ///
    /// # Errors
    /// A 400 [`HandlerError`](crate::error::HandlerError) naming the field and what was wrong, e.g.
    /// `params.user.age: invalid type: string "x", expected u32`.
    pub fn params<T: serde::Deserialize<'i>>(&self) -> Result<T, crate::error::HandlerError> {
        super::params::from_value(self.params)
    }

    /// The request's `id`, when it sent one (a number or a string).
    pub fn id(&self) -> Option<Value<'t, 'i>> {
        self.id
    }

    /// The `params` object as parsed (an empty object when the request had none).
    pub fn params_value(&self) -> Value<'t, 'i> {
        self.params
    }

    /// `params[key]`, if present.
    pub fn param(&self, key: &str) -> Option<Value<'t, 'i>> {
        self.params.get(key)
    }

    /// `params[key]` as a string, if it is one.
    pub fn param_str(&self, key: &str) -> Option<&'i str> {
        self.param(key).and_then(|v| v.into_string())
    }

    /// `params[key]` as an unsigned integer, if it is one.
    pub fn param_u64(&self, key: &str) -> Option<u64> {
        self.param(key).and_then(|v| v.as_u64())
    }

    /// `params[key]` as a signed integer, if it is one.
    pub fn param_i64(&self, key: &str) -> Option<i64> {
        self.param(key).and_then(|v| v.as_i64())
    }

    /// `params[key]` as a float, if it is a number.
    pub fn param_f64(&self, key: &str) -> Option<f64> {
        self.param(key).and_then(|v| v.cast_f64())
    }

    /// `params[key]` as a bool, if it is one.
    pub fn param_bool(&self, key: &str) -> Option<bool> {
        self.param(key).and_then(|v| v.as_bool())
    }

    /// The caller's verified identity: with mutual TLS, the first DNS name in its client
    /// certificate's subject alternative names (`None` without mutual TLS).
    pub fn identity(&self) -> Option<&'t str> {
        self.identity
    }

    /// The core this request runs on, and the server's counters.
    pub fn context(&self) -> &'t CoreContext {
        self.context
    }
}

/// Why a well-formed JSON document is not a valid request. Displayed as the 400 message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EnvelopeError {
    NotAnObject,
    MissingCmdid,
    BadCmdid,
    BadTimestamp,
    BadTimeout,
    BadParams,
    BadId,
}

impl fmt::Display for EnvelopeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::NotAnObject => "request must be a JSON object",
            Self::MissingCmdid => "missing cmdid",
            Self::BadCmdid => "cmdid must be an integer from 0 to 4294967295",
            Self::BadTimestamp => "timestamp must be an integer",
            Self::BadTimeout => "timeout_ms must be a non-negative integer (milliseconds)",
            Self::BadParams => "params must be a JSON object",
            Self::BadId => "id must be a number or a string",
        })
    }
}

/// A request that failed envelope validation, with the id to echo if it had a usable one.
pub(crate) struct Rejected<'t, 'i> {
    pub error: EnvelopeError,
    pub id: Option<Value<'t, 'i>>,
}

/// Reads the protocol v1 envelope off a parsed document.
///
/// `empty_params` is a tape holding `{}`, used when the request has no `params`.
pub(crate) fn decode<'t, 'i>(
    tape: &'t Tape<'i>,
    empty_params: &'t Tape<'static>,
    context: &'t CoreContext,
    identity: Option<&'t str>,
) -> Result<Request<'t, 'i>, Rejected<'t, 'i>> {
    let root = tape.as_value();
    let reject = |error, id| Err(Rejected { error, id });
    let Some(object) = root.as_object() else {
        return reject(EnvelopeError::NotAnObject, None);
    };
    let (mut cmdid, mut timestamp, mut timeout, mut params, mut id) = (None, None, None, None, None);
    let mut first_error = None;
    for (key, value) in object.iter() {
        let outcome = match key {
            "cmdid" => read_cmdid(value).map(|c| cmdid = Some(c)),
            "timestamp" => value.as_i64().map(|t| timestamp = Some(t)).ok_or(EnvelopeError::BadTimestamp),
            "timeout_ms" => value
                .as_u64()
                .map(|ms| timeout = Some(std::time::Duration::from_millis(ms)))
                .ok_or(EnvelopeError::BadTimeout),
            "params" => match value.as_object() {
                Some(_) => {
                    params = Some(value);
                    Ok(())
                }
                None if value.is_null() => Ok(()),
                None => Err(EnvelopeError::BadParams),
            },
            "id" => match value.value_type() {
                ValueType::String | ValueType::I64 | ValueType::U64 | ValueType::F64 => {
                    id = Some(value);
                    Ok(())
                }
                _ => Err(EnvelopeError::BadId),
            },
            _ => Ok(()),
        };
        if let Err(e) = outcome {
            first_error.get_or_insert(e);
        }
    }
    if let Some(error) = first_error {
        return reject(error, id);
    }
    let Some(cmdid) = cmdid else {
        return reject(EnvelopeError::MissingCmdid, id);
    };
    Ok(Request {
        cmdid,
        timestamp,
        timeout,
        params: params.unwrap_or_else(|| empty_params.as_value()),
        id,
        context,
        identity,
    })
}

fn read_cmdid(value: Value<'_, '_>) -> Result<u32, EnvelopeError> {
    value.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(EnvelopeError::BadCmdid)
}
