//! The in-memory twins of the interfaces (store, router, upstream), for tests (behind the
//! `test-util` feature): each passes the conformance test its real implementation passes.

mod router;
mod store;
mod upstream;

pub use router::{MemoryNetwork, MemoryRouter};
pub use store::MemoryStore;
pub use upstream::{Fault, MemoryUpstream, RequestKind, UpstreamRequest};
