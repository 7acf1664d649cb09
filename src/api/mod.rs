//! api layer (under construction).
