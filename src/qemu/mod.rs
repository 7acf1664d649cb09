//! qemu layer (under construction).
