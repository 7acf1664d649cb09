//! client layer (under construction).
