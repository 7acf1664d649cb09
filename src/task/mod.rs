//! task layer (under construction).
