//! Forwarding: the tower stack around the handler, the handler itself (probe →
//! route → cache → admission → upstream → response), the route table, and the
//! config generation in force.

pub mod handler;
pub mod routes;
pub mod stack;
pub mod state;
