//! `_core.NetProxy` and `_core.check_allow_network`: the host egress proxy of one kernel and
//! the validation of `allow_network` entries (runtime `net/`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;

use supermachine_runtime::net::{Policy, Proxy, ProxyConfig, StaticResolver};

fn parse_policy(entries: &[String]) -> PyResult<Policy> {
    Policy::parse(entries).map_err(|e| PyValueError::new_err(e.to_string()))
}

fn seconds(name: &str, s: f64) -> PyResult<Duration> {
    if s.is_finite() && s > 0.0 {
        Ok(Duration::from_secs_f64(s))
    } else {
        Err(PyValueError::new_err(format!("{name} must be a positive number of seconds, not {s}")))
    }
}

/// Raises ValueError naming the first bad `allow_network` entry and what is accepted.
#[pyfunction]
fn check_allow_network(entries: Vec<String>) -> PyResult<()> {
    parse_policy(&entries).map(|_| ())
}

/// An HTTP proxy on 127.0.0.1 that lets connections out only as `allow` says.
#[pyclass(module = "supermachine_kernel._core")]
pub struct NetProxy {
    inner: Mutex<Option<Proxy>>,
    port: u16,
}

#[pymethods]
impl NetProxy {
    /// `resolve` (for tests) replaces the system resolver by a table name -> addresses;
    /// `test_route` (for tests) connects to a mapped address instead of the checked one.
    #[new]
    #[pyo3(signature = (allow, *, port=0, max_connections=64, bandwidth=None, head_timeout=10.0, idle_timeout=300.0, connect_timeout=10.0, resolve=None, test_route=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        allow: Vec<String>,
        port: u16,
        max_connections: usize,
        bandwidth: Option<u64>,
        head_timeout: f64,
        idle_timeout: f64,
        connect_timeout: f64,
        resolve: Option<HashMap<String, Vec<String>>>,
        test_route: Option<HashMap<String, String>>,
    ) -> PyResult<NetProxy> {
        let mut config = ProxyConfig::new(parse_policy(&allow)?);
        if max_connections == 0 {
            return Err(PyValueError::new_err("max_connections must be at least 1"));
        }
        if bandwidth == Some(0) {
            return Err(PyValueError::new_err("bandwidth must be at least 1 byte/s (None = no cap)"));
        }
        config.max_connections = max_connections;
        config.bandwidth = bandwidth;
        config.head_timeout = seconds("head_timeout", head_timeout)?;
        config.idle_timeout = seconds("idle_timeout", idle_timeout)?;
        config.connect_timeout = seconds("connect_timeout", connect_timeout)?;
        if let Some(table) = resolve {
            let mut map = HashMap::new();
            for (name, addrs) in table {
                let addrs = addrs
                    .iter()
                    .map(|a| a.parse::<IpAddr>().map_err(|_| PyValueError::new_err(format!("resolve[{name:?}]: {a:?} is not an IP address"))))
                    .collect::<PyResult<Vec<_>>>()?;
                map.insert(name.trim_end_matches('.').to_ascii_lowercase(), addrs);
            }
            config.resolver = Arc::new(StaticResolver(map));
        }
        for (from, to) in test_route.unwrap_or_default() {
            let parse = |a: &str| a.parse::<IpAddr>().map_err(|_| PyValueError::new_err(format!("test_route: {a:?} is not an IP address")));
            config.test_route.insert(parse(&from)?, parse(&to)?);
        }
        let proxy = py.allow_threads(|| Proxy::start(port, config)).map_err(|e| PyOSError::new_err(format!("cannot start the network proxy: {e}")))?;
        let port = proxy.local_addr().port();
        Ok(NetProxy { inner: Mutex::new(Some(proxy)), port })
    }

    /// The port on 127.0.0.1.
    #[getter]
    fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`, the value for HTTP_PROXY/HTTPS_PROXY.
    #[getter]
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Client connections open now (0 once closed).
    #[getter]
    fn active_connections(&self) -> usize {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or(0, |p| p.active_connections())
    }

    /// `(messages, dropped)`: the 403 and 503 refusals since the last call, oldest first, and
    /// how many older ones were dropped; empty once closed.
    fn take_refusals(&self) -> (Vec<String>, usize) {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).as_ref().map_or((Vec::new(), 0), |p| p.take_refusals())
    }

    /// Stops the proxy and cuts its connections. Idempotent.
    fn close(&self, py: Python<'_>) {
        let taken = self.inner.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut p) = taken {
            py.allow_threads(|| p.close());
        }
    }

    fn __enter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) {
        self.close(py)
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NetProxy>()?;
    m.add_function(wrap_pyfunction!(check_allow_network, m)?)?;
    Ok(())
}
