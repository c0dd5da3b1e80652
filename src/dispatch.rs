//! The static dispatch table: the [`Routes`] trait and the [`routes!`](crate::routes) macro that
//! implements it.
//!
//! A table is a unit struct whose `call` is a `match` on the cmdid, so dispatch compiles to a
//! jump table or a few compares: no `Box<dyn>`, no `HashMap`, no allocation. The macro checks
//! the table at compile time: a duplicate cmdid, or one below [`RESERVED_BELOW`], fails the
//! build.

use std::borrow::Cow;

use crate::protocol::{Reply, Request};

/// cmdids below this are reserved for the built-in commands (ping, stats, …) that every
/// ringcall server answers itself.
pub const RESERVED_BELOW: u32 = 1000;

/// What a handler returns: `Ok` after writing its data (or nothing, for `null`), or an error
/// that becomes the reply instead of any data it wrote.
pub type HandlerResult = Result<(), HandlerError>;

/// A handler: a plain function from the parsed request to a reply.
pub type Handler = fn(&Request<'_, '_>, Reply<'_>) -> HandlerResult;

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

    /// A reply with any code (use the protocol's codes: 400, 404, 500, 503).
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

/// A compile-time dispatch table, normally written with [`routes!`](crate::routes).
pub trait Routes: Send + Sync + 'static {
    /// The cmdids this table answers, in declaration order.
    const CMDIDS: &'static [u32];

    /// Runs the handler for `cmdid`; `None` when the table has no such command.
    fn call(cmdid: u32, request: &Request<'_, '_>, reply: Reply<'_>) -> Option<HandlerResult>;
}

/// A table with no commands: a server that answers only the built-ins.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRoutes;

impl Routes for NoRoutes {
    const CMDIDS: &'static [u32] = &[];

    fn call(_: u32, _: &Request<'_, '_>, _: Reply<'_>) -> Option<HandlerResult> {
        None
    }
}

/// Compile-time check behind [`routes!`](crate::routes): panics (a build error in a `const`)
/// on a duplicate or reserved cmdid.
pub const fn check_cmdids(cmdids: &[u32]) {
    let mut i = 0;
    while i < cmdids.len() {
        assert!(
            cmdids[i] >= RESERVED_BELOW,
            "routes!: cmdids below 1000 are reserved for ringcall's built-in commands"
        );
        let mut j = i + 1;
        while j < cmdids.len() {
            assert!(cmdids[i] != cmdids[j], "routes!: duplicate cmdid in the table");
            j += 1;
        }
        i += 1;
    }
}

/// Declares a static dispatch table: a unit struct implementing [`Routes`].
///
/// ```
/// use ringcall::{HandlerResult, Reply, Request};
///
/// fn hello(_req: &Request<'_, '_>, reply: Reply<'_>) -> HandlerResult {
///     reply.str("hello");
///     Ok(())
/// }
///
/// ringcall::routes! {
///     /// My service's commands.
///     pub MyService {
///         2000 => hello,
///         10000 => ringcall::handlers::echo,
///     }
/// }
/// ```
///
/// A duplicate cmdid does not compile:
///
/// ```compile_fail
/// # use ringcall::{HandlerResult, Reply, Request};
/// # fn a(_: &Request<'_, '_>, _: Reply<'_>) -> HandlerResult { Ok(()) }
/// ringcall::routes! { Twice { 2000 => a, 2000 => a } }
/// ```
///
/// Nor does a cmdid in the reserved range below 1000:
///
/// ```compile_fail
/// # use ringcall::{HandlerResult, Reply, Request};
/// # fn a(_: &Request<'_, '_>, _: Reply<'_>) -> HandlerResult { Ok(()) }
/// ringcall::routes! { Reserved { 7 => a } }
/// ```
#[macro_export]
macro_rules! routes {
    ($(#[$meta:meta])* $vis:vis $name:ident { $($cmdid:literal => $handler:path),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        impl $crate::dispatch::Routes for $name {
            const CMDIDS: &'static [u32] = &[$($cmdid),*];

            #[inline]
            #[deny(unreachable_patterns)]
            fn call(
                cmdid: u32,
                request: &$crate::Request<'_, '_>,
                reply: $crate::Reply<'_>,
            ) -> ::core::option::Option<$crate::HandlerResult> {
                match cmdid {
                    $($cmdid => ::core::option::Option::Some($handler(request, reply)),)*
                    _ => ::core::option::Option::None,
                }
            }
        }

        const _: () = $crate::dispatch::check_cmdids(
            <$name as $crate::dispatch::Routes>::CMDIDS,
        );
    };
}
