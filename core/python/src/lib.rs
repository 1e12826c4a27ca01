//! PyO3 bindings: `supermachine_kernel._core`. Thin wrappers only; logic lives in the runtime crate.
use pyo3::prelude::*;

mod image;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", supermachine_protocol::PROTOCOL_VERSION)?;
    image::register(m)?;
    Ok(())
}
