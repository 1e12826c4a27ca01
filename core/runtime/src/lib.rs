//! Host runtime library.
