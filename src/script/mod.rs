//! script layer (under construction).
