//! What a handler's work ends in when it fails: the error reply it becomes. Defined here
//! because the core encodes it (into the reply, a deferred answer, a params error); the
//! service layer's handlers return it.

use std::borrow::Cow;

/// What a handler returns: `Ok` after writing its data (or nothing, for `null`), or an error
/// that becomes the reply instead of any data it wrote.
pub type HandlerResult = Result<(), HandlerError>;

/// A handler failure, turned into an error reply (`{"code":…,"error":…}`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (code {code})")]
pub struct HandlerError {
    code: u16,
    message: Cow<'static, str>,
}

impl HandlerError {
    /// A 500 reply: the handler could not do its work.
    pub fn internal(message: impl Into<Cow<'static, str>>) -> Self {
        Self { code: 500, message: message.into() }
    }

    /// A 400 reply: the request's params were not what the handler needs.
    pub fn bad_request(message: impl Into<Cow<'static, str>>) -> Self {
        Self { code: 400, message: message.into() }
    }

    /// A 503 reply: the service is overloaded; the caller may retry later.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self { code: 503, message: message.into() }
    }

    /// A reply with any code (use the protocol's codes: 400, 404, 500, 503, 504).
    pub fn with_code(code: u16, message: impl Into<Cow<'static, str>>) -> Self {
        Self { code, message: message.into() }
    }

    /// The reply code.
    pub fn code(&self) -> u16 {
        self.code
    }

    /// The reply's error message.
    pub fn message(&self) -> &str {
        &self.message
    }
}
