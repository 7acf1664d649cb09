//! auth layer (under construction).
