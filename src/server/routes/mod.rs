//! HTTP handlers, one file per route group.

pub mod adapt;
pub mod genotypes;
pub mod health;
pub mod models;
pub mod tasks;
