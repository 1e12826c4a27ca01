//! The guest's network egress, decided and carried on the host: [`policy`] (the admin's
//! `allow_network` entries and the per-connection decision, pure) and [`proxy`] (the HTTP
//! proxy of one kernel that applies it, resolves names itself and relays with caps), serving
//! only its own user's connections ([`peer`]).
//! Design: docs/issue13-network.md.
pub mod peer;
pub mod policy;
pub mod proxy;

pub use policy::{Policy, PolicyError, Refusal};
pub use proxy::{Proxy, ProxyConfig, Resolver, StaticResolver, SystemResolver};
