//! PyO3 bindings: `supermachine_kernel._core`. Thin wrappers only; logic lives in the runtime crate.
use pyo3::prelude::*;

pub mod errors;
mod image;
mod net;
mod pool;
mod tcp;
mod vm;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", supermachine_protocol::PROTOCOL_VERSION)?;
    errors::register(m)?;
    vm::register(m)?;
    pool::register(m)?;
    image::register(m)?;
    net::register(m)?;
    tcp::register(m)?;
    Ok(())
}
