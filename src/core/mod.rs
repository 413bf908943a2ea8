//! The bottom layer: the hub's vocabulary, imported by every other layer and importing none
//! of them. Ids and the topic grammar ([`ids`]), the wire protocol ([`wire`]), one event as
//! it is carried and encoded once ([`event`]), who a connection belongs to ([`identity`]),
//! every close code with its reason ([`close`]), and the process-wide Prometheus metrics
//! ([`metrics`]).

pub(crate) mod close;
pub(crate) mod event;
#[cfg(test)]
pub(crate) mod fuzzing;
pub(crate) mod identity;
pub mod ids;
pub(crate) mod metrics;
pub(crate) mod wire;
