//! tunnel layer (under construction).
