//! The live demo: a call simulator that makes realistic call-status events ([`simulator`],
//! pure), and the loops that publish them ([`run`]): inside the hub for
//! `demo.simulate_calls`, or through a running hub's HTTP API (`switchboard simulate`); and
//! the echo that answers the voice test page ([`voice_echo`], `switchboard voice-echo`).

pub mod run;
pub(crate) mod simulator;
pub mod voice_echo;
