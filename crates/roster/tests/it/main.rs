//! Roster's one integration-test binary: a real server on 127.0.0.1:0, driven over real HTTP.

mod common;

mod admin;
mod altertable;
mod auth;
mod bad_input;
mod browser;
mod cli;
mod client_side;
mod crash;
mod customerio;
mod events;
mod flags;
mod flags_differential;
mod flagsmith;
mod fuzz;
mod graph;
mod identify;
mod import;
mod limits;
mod metrics;
mod multinode;
mod node_sdks;
mod openapi;
mod operations;
mod profiles;
mod query;
mod security;
mod segment;
