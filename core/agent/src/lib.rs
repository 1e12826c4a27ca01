//! The agent's pure parts, as a library so the fuzz targets in `core/fuzz` reach them; the
//! binary (`main.rs`) holds everything that does I/O.

pub mod conn;
