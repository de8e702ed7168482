//! HTTP plumbing shared by every stage: streamed body types, header rules, and the
//! one table that turns the proxy's errors into responses.

pub mod body;
pub mod error;
pub mod headers;
pub mod rewrite;
pub mod stream;
pub mod target;
pub mod tls_client;
