//! Host runtime library.
pub mod pool;
pub mod snapshot;
