//! guest layer (under construction).

pub mod config;
