//! Inbound requests: the registry on the master's event bus and the HTTP
//! API; both end in the same operations (`registry::Service`,
//! `lifecycle`) and the same error codes (`registry::Error::code`).
//!
//! - [`bus`]: a request event parsed (tag → entity/op, `request_id`,
//!   origin, payload digest), its receipt, the job-cache confirmation, the
//!   reply.
//! - [`forward`]: port and hostname forward requests read into the
//!   registry's forward operations.
//! - [`share`]: samba share requests (the reply carries a new password).
//! - [`args`]: a request's arguments read the same way for every entity.
//! - [`backup`]: backup requests, and the backup servers' results.
//! - [`server`]: the request-server component that runs them.
//! - [`http`]: the REST API (`http.listen`): users, sessions, tokens,
//!   servers, audit; writes through [`bus::execute_op`].

pub mod args;
pub mod backup;
pub mod bus;
pub mod forward;
pub mod http;
pub mod server;
pub mod share;
