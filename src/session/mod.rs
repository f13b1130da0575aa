//! Per-client session state that must survive moving between server connections: settings
//! from the startup packet and from `SET`/`RESET`, and whether the client is pinned to its
//! server connection because it used something that cannot move.

pub mod effects;
pub mod scan;
mod settings;

pub use effects::{Effect, effects_of};
pub use settings::Settings;
