//! Line instruments: anything that answers (or streams) one text line per reading, driven
//! by a TOML profile (SCPI meters, MT-SICS balances, CSV line sensors).

pub mod driver;
pub mod profile;
