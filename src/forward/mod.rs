//! Forwarding: the tower stack around the handler, the handler itself (probe →
//! route → cache → admission → upstream → response), the route table, the config
//! generation in force, and the access log record the handler fills in.

pub mod handler;
mod meaning;
mod read_ahead;
mod record;
pub mod routes;
pub mod stack;
pub mod state;
