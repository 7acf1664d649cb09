//! guest layer (under construction).
