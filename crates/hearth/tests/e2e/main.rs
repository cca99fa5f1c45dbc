//! End-to-end tests: the real `hearth` binary, over real HTTP, against a real
//! SQLite file and a real PostgreSQL database. Every test runs once per
//! backend (`sqlite::name` and `postgres::name`).

mod common;

mod agents;
mod auth;
mod cli;
mod completions;
mod conformance;
mod dashboard;
mod developer_scoping;
mod events;
mod fleet;
mod hardening;
mod images;
mod metrics;
mod network;
mod node_cli;
mod nodes;
mod pass_status;
mod pool;
mod pool_wake;
mod provisioning;
mod qemu;
mod resources;
mod secrets_at_rest;
mod server;
mod stale;
mod trust_api;
mod webhooks;
mod wire;
